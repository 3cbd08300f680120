//! How provisioner calls one target, for every connector type: concurrency, pacing,
//! retries and the circuit breaker (`[connectors.<name>.delivery]`). The gate
//! (`gate.rs`) and the retry policy (`retry.rs`) are built from it.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::retry::RetryPolicy;

/// How provisioner calls one target: concurrency, pacing and retries.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeliverySettings {
    /// Calls to this target in flight at once.
    #[serde(default = "default_connector_max_in_flight")]
    pub max_in_flight: usize,
    /// Steady request rate (token bucket); unlimited when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_per_second: Option<f64>,
    /// Attempts per operation, the first included.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Full-jitter exponential backoff: attempt n sleeps up to min(max, initial * 2^n).
    #[serde(default = "default_initial_backoff", with = "humantime_serde")]
    pub initial_backoff: Duration,
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Give up retrying once this much time has passed since the first attempt.
    #[serde(default = "default_max_elapsed", with = "humantime_serde")]
    pub max_elapsed: Duration,
    /// Consecutive transport/timeout/5xx failures that open the circuit (0: never).
    #[serde(default = "default_circuit_breaker_failures")]
    pub circuit_breaker_failures: u32,
    /// How long an open circuit holds calls before one probe; doubles (up to 5 min)
    /// while probes fail.
    #[serde(default = "default_circuit_breaker_cooldown", with = "humantime_serde")]
    pub circuit_breaker_cooldown: Duration,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        Self {
            max_in_flight: default_connector_max_in_flight(),
            rate_limit_per_second: None,
            max_attempts: default_max_attempts(),
            initial_backoff: default_initial_backoff(),
            max_backoff: default_max_backoff(),
            max_elapsed: default_max_elapsed(),
            circuit_breaker_failures: default_circuit_breaker_failures(),
            circuit_breaker_cooldown: default_circuit_breaker_cooldown(),
        }
    }
}

impl DeliverySettings {
    /// The retry half of these settings.
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.max_attempts,
            initial_backoff: self.initial_backoff,
            max_backoff: self.max_backoff,
            max_elapsed: self.max_elapsed,
        }
    }

    /// Problems serde cannot see, each with its full key under `key`
    /// (e.g. `connectors.directory.delivery`).
    pub fn check(&self, key: &str, problem: &mut impl FnMut(String, String)) {
        if self.max_in_flight == 0 {
            problem(format!("{key}.max_in_flight"), "must be at least 1".into());
        }
        if self.max_attempts == 0 {
            problem(format!("{key}.max_attempts"), "must be at least 1".into());
        }
        if self.initial_backoff.is_zero() {
            problem(format!("{key}.initial_backoff"), "must be greater than zero".into());
        }
        if self.initial_backoff > self.max_backoff {
            problem(format!("{key}.initial_backoff"), "must not exceed max_backoff".into());
        }
        if self.circuit_breaker_failures > 0 && self.circuit_breaker_cooldown.is_zero() {
            problem(
                format!("{key}.circuit_breaker_cooldown"),
                "must be greater than zero".into(),
            );
        }
        if let Some(rate) = self.rate_limit_per_second {
            if !(rate.is_finite() && rate > 0.0) {
                problem(
                    format!("{key}.rate_limit_per_second"),
                    "must be a positive number".into(),
                );
            }
        }
    }
}

fn default_connector_max_in_flight() -> usize {
    32
}
fn default_max_attempts() -> u32 {
    8
}
fn default_initial_backoff() -> Duration {
    Duration::from_millis(200)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(30)
}
fn default_max_elapsed() -> Duration {
    Duration::from_secs(300)
}
fn default_circuit_breaker_failures() -> u32 {
    5
}
fn default_circuit_breaker_cooldown() -> Duration {
    Duration::from_secs(10)
}
