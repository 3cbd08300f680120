//! What every call to a target passes through first: a circuit breaker, the target's
//! own slow-down requests, a token-bucket rate limit and a concurrency cap.
//!
//! - **Circuit breaker.** After `circuit_breaker_failures` consecutive failures that say
//!   the target is unwell (transport errors, timeouts, 5xx), the circuit opens: calls
//!   wait instead of failing, so an outage holds the connector's work without burning
//!   retry attempts. After `circuit_breaker_cooldown` one probe call goes through;
//!   success closes the circuit, failure reopens it for twice as long (up to 5 minutes).
//!   The wait still counts against each event's `max_elapsed`, after which the event
//!   fails for good and is dead-lettered. Other connectors are unaffected.
//! - **Adaptive slow-down.** A throttle (`429`/`Retry-After`, Google's 403 rate
//!   reasons, Salesforce's `REQUEST_LIMIT_EXCEEDED`) pauses *every* call to that target
//!   until the hinted time, not just the retry of the call that was throttled. A
//!   Salesforce org past 90% of its daily allocation is paced to one call a second.
//! - **Rate limit** (`rate_limit_per_second`) and **concurrency** (`max_in_flight`).

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{Notify, Semaphore, SemaphorePermit};
use tokio::time::Instant;

use crate::connectors::delivery::DeliverySettings;
use crate::connectors::ConnectorError;
use crate::metrics::Metrics;

const MAX_COOLDOWN: Duration = Duration::from_secs(300);
/// Pace of a Salesforce org close to its daily allocation.
const NEAR_LIMIT_SPACING: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    Closed,
    Open,
    HalfOpen,
}

impl CircuitState {
    /// The `provisioner_circuit_state` gauge value.
    pub fn gauge_value(self) -> i64 {
        match self {
            CircuitState::Closed => 0,
            CircuitState::Open => 1,
            CircuitState::HalfOpen => 2,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
        }
    }
}

struct Breaker {
    state: CircuitState,
    consecutive_failures: u32,
    /// While open: when the next probe may go.
    reopen_at: Instant,
    cooldown: Duration,
    /// A probe is out while half-open; others wait for its verdict.
    probe_in_flight: bool,
}

struct Bucket {
    tokens: f64,
    refilled_at: Instant,
}

pub struct Gate {
    connector: String,
    concurrency: Semaphore,
    rate_per_second: Option<f64>,
    bucket: Mutex<Bucket>,
    /// No call before this instant (throttle hints).
    quiet_until: Mutex<Instant>,
    /// Minimum spacing between calls when a quota is nearly used up.
    spacing: Mutex<Option<(Duration, Instant)>>,
    breaker: Mutex<Breaker>,
    failure_threshold: u32,
    base_cooldown: Duration,
    changed: Notify,
    metrics: Option<std::sync::Arc<Metrics>>,
}

/// Permission to make one call; hand the call's result to [`Admission::finish`].
/// Dropped unfinished (a panic, a cancelled task), a probe's slot is given back, or the
/// circuit would stay half-open with no probe until a restart.
pub struct Admission<'a> {
    gate: &'a Gate,
    _permit: SemaphorePermit<'a>,
    probe: bool,
    finished: bool,
}

impl Gate {
    pub fn new(connector: &str, delivery: &DeliverySettings, metrics: Option<std::sync::Arc<Metrics>>) -> Gate {
        let now = Instant::now();
        let gate = Gate {
            connector: connector.to_string(),
            concurrency: Semaphore::new(delivery.max_in_flight),
            rate_per_second: delivery.rate_limit_per_second,
            bucket: Mutex::new(Bucket {
                tokens: delivery.rate_limit_per_second.unwrap_or(1.0).max(1.0),
                refilled_at: now,
            }),
            quiet_until: Mutex::new(now),
            spacing: Mutex::new(None),
            breaker: Mutex::new(Breaker {
                state: CircuitState::Closed,
                consecutive_failures: 0,
                reopen_at: now,
                cooldown: delivery.circuit_breaker_cooldown,
                probe_in_flight: false,
            }),
            failure_threshold: delivery.circuit_breaker_failures,
            base_cooldown: delivery.circuit_breaker_cooldown,
            changed: Notify::new(),
            metrics,
        };
        gate.publish_state(CircuitState::Closed);
        gate
    }

    pub fn circuit_state(&self) -> CircuitState {
        self.breaker.lock().expect("breaker lock").state
    }

    /// Waits until a call may be made, or until `deadline` (then `None`: the caller
    /// gives up for good, its retry time is spent).
    pub async fn admit(&self, deadline: Instant) -> Option<Admission<'_>> {
        loop {
            let probe = self.wait_for_circuit(deadline).await?;
            let wait = async {
                self.wait_for_quiet().await;
                self.wait_for_spacing().await;
                self.wait_for_token().await;
                self.concurrency
                    .acquire()
                    .await
                    .expect("gate semaphore is never closed")
            };
            let permit = match tokio::time::timeout_at(deadline, wait).await {
                Ok(permit) => permit,
                Err(_) => {
                    if probe {
                        self.release_probe();
                    }
                    return None;
                }
            };
            // The circuit may have opened while this caller waited for a slot (the
            // calls ahead of it failed): it must not go through an open circuit. Only
            // the probe passes a circuit that is not closed.
            if !probe && self.circuit_state() != CircuitState::Closed {
                drop(permit);
                continue;
            }
            return Some(Admission {
                gate: self,
                _permit: permit,
                probe,
                finished: false,
            });
        }
    }

    /// Lets another caller probe a half-open circuit.
    fn release_probe(&self) {
        self.breaker.lock().expect("breaker lock").probe_in_flight = false;
        self.changed.notify_waiters();
    }

    /// Returns whether this caller is the half-open probe.
    async fn wait_for_circuit(&self, deadline: Instant) -> Option<bool> {
        loop {
            let notified = self.changed.notified();
            let wake_at = {
                let mut breaker = self.breaker.lock().expect("breaker lock");
                match breaker.state {
                    CircuitState::Closed => return Some(false),
                    CircuitState::Open if Instant::now() >= breaker.reopen_at => {
                        breaker.state = CircuitState::HalfOpen;
                        breaker.probe_in_flight = true;
                        drop(breaker);
                        self.publish_state(CircuitState::HalfOpen);
                        tracing::info!(connector = %self.connector, "Circuit half-open: probing the target.");
                        return Some(true);
                    }
                    CircuitState::HalfOpen if !breaker.probe_in_flight => {
                        breaker.probe_in_flight = true;
                        return Some(true);
                    }
                    CircuitState::Open => Some(breaker.reopen_at),
                    CircuitState::HalfOpen => None,
                }
            };
            let wake_at = wake_at.map_or(deadline, |at| at.min(deadline));
            if Instant::now() >= deadline {
                return None;
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(wake_at) => {}
            }
        }
    }

    async fn wait_for_quiet(&self) {
        loop {
            let until = *self.quiet_until.lock().expect("quiet lock");
            if Instant::now() >= until {
                return;
            }
            tokio::time::sleep_until(until).await;
        }
    }

    async fn wait_for_spacing(&self) {
        loop {
            let next = {
                let mut spacing = self.spacing.lock().expect("spacing lock");
                match spacing.as_mut() {
                    None => return,
                    Some((gap, next_at)) => {
                        let now = Instant::now();
                        if now >= *next_at {
                            *next_at = now + *gap;
                            return;
                        }
                        *next_at
                    }
                }
            };
            tokio::time::sleep_until(next).await;
        }
    }

    async fn wait_for_token(&self) {
        let Some(rate) = self.rate_per_second else {
            return;
        };
        loop {
            let wait = {
                let mut bucket = self.bucket.lock().expect("bucket lock");
                let now = Instant::now();
                let capacity = rate.max(1.0);
                let refill = now.duration_since(bucket.refilled_at).as_secs_f64() * rate;
                bucket.tokens = (bucket.tokens + refill).min(capacity);
                bucket.refilled_at = now;
                if bucket.tokens >= 1.0 {
                    bucket.tokens -= 1.0;
                    return;
                }
                Duration::from_secs_f64((1.0 - bucket.tokens) / rate)
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// Reports a Salesforce-style quota reading: near the limit, calls are spaced out.
    pub fn report_quota(&self, used: u64, limit: u64) {
        let near_limit = limit > 0 && used * 10 >= limit * 9;
        let mut spacing = self.spacing.lock().expect("spacing lock");
        match (near_limit, spacing.is_some()) {
            (true, false) => {
                tracing::warn!(connector = %self.connector, used, limit, "API allocation above 90%: pacing calls to one a second.");
                *spacing = Some((NEAR_LIMIT_SPACING, Instant::now()));
            }
            (false, true) => {
                tracing::info!(connector = %self.connector, used, limit, "API allocation back under 90%: pacing lifted.");
                *spacing = None;
            }
            _ => {}
        }
    }

    fn record(&self, result: &Result<(), &ConnectorError>, probe: bool) {
        if let Err(ConnectorError::Throttled {
            retry_after: Some(hint),
            ..
        }) = result
        {
            let mut quiet_until = self.quiet_until.lock().expect("quiet lock");
            let until = Instant::now() + *hint;
            if until > *quiet_until {
                *quiet_until = until;
                tracing::warn!(connector = %self.connector, pause_ms = hint.as_millis() as u64, "Target asked us to slow down; pausing all calls to it.");
            }
        }
        let unhealthy = matches!(
            result,
            Err(ConnectorError::Transport { .. } | ConnectorError::Timeout | ConnectorError::Server { .. })
        );
        let mut breaker = self.breaker.lock().expect("breaker lock");
        let previous = breaker.state;
        if !probe && previous != CircuitState::Closed {
            // A call admitted before the circuit opened: only the probe decides what
            // an open circuit does next.
            return;
        }
        if unhealthy {
            breaker.consecutive_failures += 1;
            let trip = self.failure_threshold > 0
                && (probe
                    || (previous == CircuitState::Closed && breaker.consecutive_failures >= self.failure_threshold));
            if trip {
                if probe {
                    breaker.cooldown = (breaker.cooldown * 2).min(MAX_COOLDOWN);
                } else {
                    breaker.cooldown = self.base_cooldown;
                }
                breaker.state = CircuitState::Open;
                breaker.reopen_at = Instant::now() + breaker.cooldown;
            }
        } else {
            breaker.consecutive_failures = 0;
            if probe || previous != CircuitState::Closed {
                breaker.state = CircuitState::Closed;
                breaker.cooldown = self.base_cooldown;
            }
        }
        if probe {
            breaker.probe_in_flight = false;
        }
        let current = breaker.state;
        let cooldown = breaker.cooldown;
        let failures = breaker.consecutive_failures;
        drop(breaker);
        if current != previous {
            self.publish_state(current);
            match current {
                CircuitState::Open => tracing::error!(
                    connector = %self.connector,
                    consecutive_failures = failures,
                    cooldown_ms = cooldown.as_millis() as u64,
                    "Circuit open: holding calls to this target."
                ),
                CircuitState::Closed => {
                    tracing::info!(connector = %self.connector, "Circuit closed: the target answers again.")
                }
                CircuitState::HalfOpen => {}
            }
        }
        self.changed.notify_waiters();
    }

    fn publish_state(&self, state: CircuitState) {
        if let Some(metrics) = &self.metrics {
            metrics
                .circuit_state
                .with_label_values(&[self.connector.as_str()])
                .set(state.gauge_value());
        }
    }
}

impl Admission<'_> {
    /// Tells the gate how the call went (after which the concurrency slot is freed).
    pub fn finish<T>(mut self, result: &Result<T, ConnectorError>) {
        self.finished = true;
        self.gate.record(&result.as_ref().map(|_| ()), self.probe);
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        if self.probe && !self.finished {
            self.gate.release_probe();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(failures: u32, cooldown_ms: u64) -> DeliverySettings {
        DeliverySettings {
            circuit_breaker_failures: failures,
            circuit_breaker_cooldown: Duration::from_millis(cooldown_ms),
            ..DeliverySettings::default()
        }
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    fn server_error() -> Result<(), ConnectorError> {
        Err(ConnectorError::Server {
            status: 503,
            message: "down".into(),
            retry_after: None,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn the_circuit_opens_holds_probes_and_closes() {
        let gate = Gate::new("t", &delivery(3, 1000), None);
        for _ in 0..3 {
            gate.admit(far()).await.unwrap().finish(&server_error());
        }
        assert_eq!(gate.circuit_state(), CircuitState::Open);
        // Held, not failed: the next admission waits for the cooldown.
        let started = Instant::now();
        let probe = gate.admit(far()).await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(1000));
        assert_eq!(gate.circuit_state(), CircuitState::HalfOpen);
        // A failed probe reopens for twice as long.
        probe.finish(&server_error());
        assert_eq!(gate.circuit_state(), CircuitState::Open);
        let started = Instant::now();
        let probe = gate.admit(far()).await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(2000));
        probe.finish(&Ok::<(), ConnectorError>(()));
        assert_eq!(gate.circuit_state(), CircuitState::Closed);
        let started = Instant::now();
        gate.admit(far()).await.unwrap().finish(&Ok::<(), ConnectorError>(()));
        assert!(started.elapsed() < Duration::from_millis(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_dropped_unfinished_lets_another_probe() {
        let gate = Gate::new("t", &delivery(1, 1000), None);
        gate.admit(far()).await.unwrap().finish(&server_error());
        let probe = gate.admit(far()).await.unwrap();
        assert_eq!(gate.circuit_state(), CircuitState::HalfOpen);
        drop(probe); // the probing task panicked or was cancelled
        let deadline = Instant::now() + Duration::from_secs(1);
        let next = gate.admit(deadline).await.expect("a new probe may go");
        next.finish(&Ok::<(), ConnectorError>(()));
        assert_eq!(gate.circuit_state(), CircuitState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn callers_waiting_for_a_slot_when_the_circuit_opens_are_held() {
        let mut delivery = delivery(2, 1000);
        delivery.max_in_flight = 2;
        let gate = std::sync::Arc::new(Gate::new("t", &delivery, None));
        // Two calls in flight fill the slots; a third waits for one.
        let first = gate.admit(far()).await.unwrap();
        let second = gate.admit(far()).await.unwrap();
        let waiting_gate = gate.clone();
        let waiter = tokio::spawn(async move {
            let admitted = waiting_gate.admit(far()).await.unwrap();
            let state = waiting_gate.circuit_state();
            admitted.finish(&Ok::<(), ConnectorError>(()));
            state
        });
        tokio::task::yield_now().await;
        // Both fail: the circuit opens, and a slot frees up for the waiter.
        first.finish(&server_error());
        second.finish(&server_error());
        assert_eq!(gate.circuit_state(), CircuitState::Open);
        let started = Instant::now();
        let state_when_admitted = waiter.await.unwrap();
        assert!(
            started.elapsed() >= Duration::from_millis(1000),
            "the waiter went through the open circuit"
        );
        assert_eq!(
            state_when_admitted,
            CircuitState::HalfOpen,
            "it was admitted as the probe"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_success_from_before_the_opening_does_not_close_the_circuit() {
        let gate = Gate::new("t", &delivery(1, 1000), None);
        let late = gate.admit(far()).await.unwrap();
        gate.admit(far()).await.unwrap().finish(&server_error());
        assert_eq!(gate.circuit_state(), CircuitState::Open);
        late.finish(&Ok::<(), ConnectorError>(()));
        assert_eq!(gate.circuit_state(), CircuitState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_errors_do_not_trip_the_circuit() {
        let gate = Gate::new("t", &delivery(2, 1000), None);
        for _ in 0..5 {
            gate.admit(far())
                .await
                .unwrap()
                .finish(&Err::<(), _>(ConnectorError::Rejected {
                    status: 400,
                    message: "bad".into(),
                }));
        }
        assert_eq!(gate.circuit_state(), CircuitState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_call_gives_up_at_its_deadline() {
        let gate = Gate::new("t", &delivery(1, 60_000), None);
        gate.admit(far()).await.unwrap().finish(&server_error());
        let deadline = Instant::now() + Duration::from_secs(5);
        assert!(gate.admit(deadline).await.is_none());
        assert!(Instant::now() >= deadline);
    }

    #[tokio::test(start_paused = true)]
    async fn a_throttle_pauses_every_call_to_the_target() {
        let gate = Gate::new("t", &delivery(5, 1000), None);
        gate.admit(far())
            .await
            .unwrap()
            .finish(&Err::<(), _>(ConnectorError::Throttled {
                status: Some(429),
                message: "slow down".into(),
                retry_after: Some(Duration::from_secs(2)),
            }));
        let started = Instant::now();
        gate.admit(far()).await.unwrap().finish(&Ok::<(), ConnectorError>(()));
        assert!(started.elapsed() >= Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn the_token_bucket_paces_calls() {
        let settings = DeliverySettings {
            rate_limit_per_second: Some(10.0),
            ..DeliverySettings::default()
        };
        let gate = Gate::new("t", &settings, None);
        let started = Instant::now();
        for _ in 0..30 {
            gate.admit(far()).await.unwrap().finish(&Ok::<(), ConnectorError>(()));
        }
        // 10 in the initial burst, then 20 more at 10 per second.
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_millis(1900) && elapsed <= Duration::from_millis(2100),
            "{elapsed:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_nearly_spent_quota_spaces_calls_out() {
        let gate = Gate::new("t", &delivery(5, 1000), None);
        gate.report_quota(950, 1000);
        let started = Instant::now();
        for _ in 0..3 {
            gate.admit(far()).await.unwrap().finish(&Ok::<(), ConnectorError>(()));
        }
        assert!(started.elapsed() >= Duration::from_secs(2));
        gate.report_quota(100, 1000);
        let started = Instant::now();
        gate.admit(far()).await.unwrap().finish(&Ok::<(), ConnectorError>(()));
        assert!(started.elapsed() < Duration::from_millis(10));
    }
}
