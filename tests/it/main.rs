//! The integration suite, built as one test binary.
//!
//! Tests that need Kafka use Apache Kafka itself: a single-node KRaft broker started by
//! `support::broker()` on 127.0.0.1 from the jars `scripts/test` fetches from Maven Central
//! (or point `KAFKA_LIBS` at a directory holding them). Tests that stop and restart a
//! broker start one of their own (`Broker::start_own`); tests that need a broker to vanish
//! without a clean shutdown use librdkafka's mock cluster and say so.

mod backpressure;
mod bad_input;
mod blocking;
mod config;
mod contract;
mod demo;
mod deploy;
mod faults;
mod google;
mod kafka_broker;
mod kafka_roundtrip;
mod pipeline;
mod salesforce;
mod scim;
mod security;
mod service;
mod support;
