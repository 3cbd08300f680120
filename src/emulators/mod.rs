//! In-memory target emulators for the demo, the benchmark and the fault tests:
//! `provisioner emulate scim|google|salesforce`.
//!
//! Each is faithful to its target's protocol where the connector relies on it (status
//! codes, error bodies, uniqueness, ETags, token checks) and adds what a test needs:
//! latency and injected faults, changeable at run time via `POST /_emulator/faults`,
//! and counters at `GET /_emulator/stats`.

pub mod scim;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// Latency and injected faults. Rates are probabilities per request, in [0, 1].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Added to every request.
    #[serde(with = "humantime_serde")]
    pub latency: Duration,
    /// Uniform extra latency in [0, jitter].
    #[serde(with = "humantime_serde")]
    pub jitter: Duration,
    /// Answer 429 with `Retry-After: retry_after_seconds`.
    pub rate_429: f64,
    pub retry_after_seconds: u64,
    /// Answer 500.
    pub rate_500: f64,
    /// Never answer (until the client gives up).
    pub rate_hang: f64,
    /// Send headers, then cut the connection mid-body.
    pub rate_reset: f64,
}

/// Counters every emulator keeps.
#[derive(Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub injected_faults: AtomicU64,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct StatsReport {
    pub requests: u64,
    pub injected_faults: u64,
    pub max_in_flight: usize,
}

impl Stats {
    pub fn report(&self) -> StatsReport {
        StatsReport {
            requests: self.requests.load(Ordering::Relaxed),
            injected_faults: self.injected_faults.load(Ordering::Relaxed),
            max_in_flight: self.max_in_flight.load(Ordering::Relaxed),
        }
    }
}

/// State shared by the fault middleware and the admin routes.
#[derive(Clone, Default)]
pub struct Control {
    pub faults: Arc<Mutex<Faults>>,
    pub stats: Arc<Stats>,
}

impl Control {
    pub fn new(faults: Faults) -> Control {
        Control {
            faults: Arc::new(Mutex::new(faults)),
            stats: Arc::default(),
        }
    }
}

/// Middleware: counts the request, then applies latency and maybe a fault.
pub async fn inject_faults(State(control): State<Control>, request: Request, next: Next) -> Response {
    let stats = &control.stats;
    stats.requests.fetch_add(1, Ordering::Relaxed);
    let now = stats.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
    stats.max_in_flight.fetch_max(now, Ordering::Relaxed);
    let _in_flight = InFlightGuard(stats.clone());
    let faults = control.faults.lock().expect("faults lock").clone();
    let (delay, roll) = {
        let mut rng = rand::rng();
        let jitter_millis = faults.jitter.as_millis() as u64;
        let jitter = Duration::from_millis(if jitter_millis == 0 {
            0
        } else {
            rng.random_range(0..=jitter_millis)
        });
        (faults.latency + jitter, rng.random::<f64>())
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut threshold = 0.0;
    let mut fault = |rate: f64| {
        threshold += rate;
        roll < threshold
    };
    if fault(faults.rate_429) {
        stats.injected_faults.fetch_add(1, Ordering::Relaxed);
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, faults.retry_after_seconds.to_string())],
            Json(serde_json::json!({"status": "429", "detail": "rate limit (injected)"})),
        )
            .into_response();
    }
    if fault(faults.rate_500) {
        stats.injected_faults.fetch_add(1, Ordering::Relaxed);
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(serde_json::json!({"status": "500", "detail": "internal error (injected)"})),
        )
            .into_response();
    }
    if fault(faults.rate_hang) {
        stats.injected_faults.fetch_add(1, Ordering::Relaxed);
        std::future::pending::<()>().await;
    }
    if fault(faults.rate_reset) {
        stats.injected_faults.fetch_add(1, Ordering::Relaxed);
        let broken = futures::stream::once(async {
            Err::<axum::body::Bytes, std::io::Error>(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "connection reset (injected)",
            ))
        });
        return Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_LENGTH, "64")
            .body(Body::from_stream(broken))
            .expect("static response");
    }
    next.run(request).await
}

struct InFlightGuard(Arc<Stats>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `GET /_emulator/stats`.
pub async fn get_stats(State(control): State<Control>) -> Json<StatsReport> {
    Json(control.stats.report())
}

/// `POST /_emulator/faults`: replaces the latency and fault settings.
pub async fn set_faults(State(control): State<Control>, Json(faults): Json<Faults>) -> StatusCode {
    *control.faults.lock().expect("faults lock") = faults;
    StatusCode::NO_CONTENT
}
