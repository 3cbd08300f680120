//! The provisioning state: what each connector's target holds for each user, so that no
//! stale or replayed event rolls a target back or re-creates a deleted account, and so
//! that updates and deletes go by the target's own id instead of a search.
//!
//! One record per (user, connector), on a compacted Kafka topic partitioned like the
//! input (the source of truth), cached in an embedded local store.

pub mod record;
pub mod store;
pub mod version;
