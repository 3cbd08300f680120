//! provisioner: outbound user provisioning for identity platforms.
//!
//! Identity platforms publish user lifecycle events (CloudEvents) to Kafka; provisioner
//! routes each to the connectors bound to its service provider, applies it with
//! retries while keeping per-user order, replies to blocking callers, and writes every
//! result to a results topic. See `ARCHITECTURE.md` for the map and the invariants.
//!
//! # Layout
//! * `cli`: the command line; `main.rs` only calls [`cli::run`].
//! * `settings`, `secret`: the configuration tree, loading, validation, redaction.
//! * `event`, `result`: the inbound and outbound contracts (see `schemas/`).
//! * `app`: wiring settings into a running service; `shutdown`: signals.
//! * `kafka`: the only module that knows rdkafka.
//! * `pipeline`: scheduling with per-user order, offsets, routing, per-event processing.
//! * `connectors`: the `Connector` trait, its error type and the targets.
//! * `retry`: backoff with jitter and `Retry-After`, in one place.
//! * `metrics`, `admin`, `telemetry`: what operators see.

pub mod admin;
pub mod app;
pub mod cli;
pub mod client;
pub mod connectors;
pub mod dead_letter;
#[cfg(feature = "devtools")]
pub mod devtools;
pub mod domain;
pub mod event;
pub mod kafka;
pub mod metrics;
pub mod pipeline;
pub mod result;
pub mod retry;
pub mod secret;
pub mod settings;
pub mod shutdown;
pub mod telemetry;
