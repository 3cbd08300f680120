//! The integration suite, built as one test binary.
//!
//! Tests that need Kafka use Apache Kafka itself: a single-node KRaft broker started by
//! `support::broker()` on 127.0.0.1 from the jars `scripts/test` fetches from Maven Central
//! (or point `KAFKA_LIBS` at a directory holding them). Tests that stop and restart a
//! broker start one of their own (`Broker::start_own`); tests that need a broker to vanish
//! without a clean shutdown use librdkafka's mock cluster and say so.
//!
//! Modules that use the emulators or run `provisioner demo` need the `devtools` feature
//! (on by default); without it they are left out, and the rest still builds and runs.

mod backpressure;
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
#[cfg(feature = "devtools")]
mod google_emulator_groups;
#[cfg(feature = "devtools")]
mod google_groups;
mod groups;
#[cfg(feature = "devtools")]
mod groups_scim;
#[cfg(feature = "devtools")]
mod isolation;
#[cfg(feature = "devtools")]
mod isolation_parking;
mod kafka_broker;
mod kafka_roundtrip;
mod layering;
mod pipeline;
#[cfg(feature = "devtools")]
mod salesforce;
#[cfg(feature = "devtools")]
mod salesforce_emulator_groups;
#[cfg(feature = "devtools")]
mod salesforce_groups;
#[cfg(feature = "devtools")]
mod scim;
#[cfg(feature = "devtools")]
mod scim_emulator;
#[cfg(feature = "devtools")]
mod scim_groups;
#[cfg(feature = "devtools")]
mod security;
mod service;
#[cfg(feature = "devtools")]
mod state;
#[cfg(feature = "devtools")]
mod state_faults;
mod support;
#[cfg(feature = "devtools")]
mod wedge;
