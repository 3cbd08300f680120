//! The integration suite, built as one test binary.
//!
//! Tests that need Kafka use a real tansu broker started by `support::broker()` on
//! 127.0.0.1 (install it with `scripts/test`, or point `TANSU_BIN` at a binary).

mod bad_input;
mod blocking;
mod config;
mod contract;
mod demo;
mod deploy;
mod faults;
mod google;
mod kafka_roundtrip;
mod pipeline;
mod salesforce;
mod scim;
mod security;
mod service;
mod support;
