//! Test harness: a real Apache Kafka broker on 127.0.0.1, topic helpers, and polling.

pub mod app;
pub mod broker;
pub mod doubles;
#[cfg(feature = "devtools")]
pub mod google_discovery;
// Only the SCIM tests use it, and they need the emulators (`devtools`) too.
#[cfg(feature = "devtools")]
pub mod scim2_server;
pub mod service;
#[cfg(feature = "devtools")]
pub mod targets;
#[cfg(feature = "devtools")]
pub mod workload;

use std::time::{Duration, Instant};

/// Polls `probe` until it returns `Some`, or panics with `what` after `timeout`.
/// Tests wait with this, never with a bare sleep.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A topic name no other test uses.
pub fn unique_topic(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}
