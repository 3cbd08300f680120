//! The integration suite, built as one test binary.
//!
//! Tests that need Kafka use a real tansu broker started by `support::broker()` on
//! 127.0.0.1 (install it with `scripts/test`, or point `TANSU_BIN` at a binary).

//! Modules that use the emulators or run `provisioner demo` need the `devtools` feature
//! (on by default); without it they are left out, and the rest still builds and runs.

mod bad_input;
mod blocking;
mod config;
mod contract;
#[cfg(feature = "devtools")]
mod demo;
mod deploy;
#[cfg(feature = "devtools")]
mod faults;
#[cfg(feature = "devtools")]
mod google;
mod kafka_roundtrip;
mod layering;
mod pipeline;
#[cfg(feature = "devtools")]
mod salesforce;
#[cfg(feature = "devtools")]
mod scim;
#[cfg(feature = "devtools")]
mod security;
mod service;
mod support;
