//! provisioner: outbound user provisioning for identity platforms.
//!
//! Identity platforms publish user lifecycle events (CloudEvents) to Kafka; provisioner
//! routes each to the connectors bound to its service provider, applies it with
//! retries while keeping per-user order, replies to blocking callers, and writes every
//! result to a results topic. See `ARCHITECTURE.md` for the map and the invariants.
//!
//! # Layout
//! * `cli`: the command line; `main.rs` only calls [`cli::run`].
//! * `settings`: the top of the configuration tree, loading, cross-references; each
//!   section's types and checks live with their code (`kafka::settings`,
//!   `connectors::<type>::settings`). `secret`: redaction and `*_env`/`*_file` references.
//! * `domain`: `User`, `Operation`, `Outcome`, `UserChange` (what a connector is asked to do),
//!   `EventVersion` (the order of a user's events).
//! * `state`: the provisioning state (per user and connector: remote id, account state,
//!   version) on a compacted topic with a local store; stale events make no call.
//! * `event`, `result`: the inbound and outbound contracts (see `schemas/`);
//!   `dead_letter`: dead-letter reason codes and headers.
//! * `app`: wiring settings into a running service; `shutdown`: signals.
//! * `kafka`: the service's rdkafka code (also used by `client` and `devtools`).
//! * `pipeline`: scheduling with per-user order, offsets, routing, per-event processing.
//! * `connectors`: the `Connector` trait, its error type, the one authorised send, and a
//!   folder per target with its settings.
//! * `retry`: backoff with jitter and `Retry-After`, in one place, for any `RetryClass`.
//! * `metrics`, `admin`, `telemetry`: what operators see.
//! * `devtools` (cargo feature `devtools`, on by default): emulators, demo, bench.
//!
//! # Layering
//! Lowest first, each module importing only lower ones: `domain`, `dead_letter`, `retry`,
//! `secret`, `shutdown` → `event` → `result` → `metrics` → `connectors`, `kafka` → `state`
//! → `settings` → `admin`, `client`, `telemetry`, `pipeline` → `app` → `devtools` → `cli`.
//! `tests/it/layering.rs` keeps it so; `ARCHITECTURE.md` says why.

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
pub mod state;
pub mod telemetry;
