//! In-memory target emulators for the demo, the benchmark and the fault tests:
//! `provisioner emulate scim|google|salesforce`.
//!
//! Each is faithful to its target's protocol where the connector relies on it (status
//! codes, error bodies, uniqueness, ETags, token checks) and adds what a test needs:
//! latency and injected faults, changeable at run time via `POST /_emulator/faults`,
//! and counters at `GET /_emulator/stats`.

pub mod google;
pub mod salesforce;
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
    /// Answer "slow down" in the target's dialect (SCIM: 429 with
    /// `Retry-After: retry_after_seconds`; Google: 403 userRateLimitExceeded;
    /// Salesforce: 403 REQUEST_LIMIT_EXCEEDED).
    pub rate_429: f64,
    pub retry_after_seconds: u64,
    /// Answer a server error in the target's dialect (Google: 503 backendError).
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

/// The media type of SCIM bodies (RFC 7644 §8.1), injected SCIM errors included.
pub(crate) const SCIM_JSON: &str = "application/scim+json";

/// How a target says "slow down" and "I failed": injected faults speak its dialect.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Dialect {
    /// 429 and 500 with SCIM error bodies.
    #[default]
    Scim,
    /// 403 `userRateLimitExceeded` and 503 `backendError`, Google's error bodies.
    Google,
    /// 403 `REQUEST_LIMIT_EXCEEDED` (no Retry-After) and 500, Salesforce's error arrays.
    Salesforce,
}

impl Dialect {
    fn throttled(self, retry_after_seconds: u64) -> Response {
        match self {
            Dialect::Scim => (
                StatusCode::TOO_MANY_REQUESTS,
                [
                    (header::RETRY_AFTER, retry_after_seconds.to_string()),
                    (header::CONTENT_TYPE, SCIM_JSON.to_string()),
                ],
                Json(serde_json::json!({
                    "schemas": ["urn:ietf:params:scim:api:messages:2.0:Error"],
                    "status": "429", "detail": "rate limit (injected)"
                })),
            )
                .into_response(),
            Dialect::Google => (
                StatusCode::FORBIDDEN,
                Json(serde_json::json!({"error": {"code": 403, "message": "Rate Limit Exceeded (injected)",
                    "errors": [{"domain": "usageLimits", "reason": "userRateLimitExceeded", "message": "Rate Limit Exceeded"}]}})),
            )
                .into_response(),
            Dialect::Salesforce => (
                StatusCode::FORBIDDEN,
                Json(serde_json::json!([{"message": "TotalRequests Limit exceeded. (injected)", "errorCode": "REQUEST_LIMIT_EXCEEDED"}])),
            )
                .into_response(),
        }
    }

    fn server_error(self) -> Response {
        match self {
            Dialect::Scim => (
                StatusCode::INTERNAL_SERVER_ERROR,
                [(header::CONTENT_TYPE, SCIM_JSON)],
                Json(serde_json::json!({
                    "schemas": ["urn:ietf:params:scim:api:messages:2.0:Error"],
                    "status": "500", "detail": "internal error (injected)"
                })),
            )
                .into_response(),
            Dialect::Google => (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(serde_json::json!({"error": {"code": 503, "message": "Backend Error (injected)",
                    "errors": [{"domain": "global", "reason": "backendError", "message": "Backend Error"}]}})),
            )
                .into_response(),
            Dialect::Salesforce => (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(serde_json::json!([{"message": "An unexpected error occurred. (injected)", "errorCode": "UNKNOWN_EXCEPTION"}])),
            )
                .into_response(),
        }
    }
}

/// One request as the emulator answered it (injected faults included).
#[derive(Debug, Clone)]
pub struct LoggedRequest {
    pub at: std::time::Instant,
    pub method: String,
    pub path: String,
    pub status: u16,
}

/// Requests kept in the log; older ones are dropped so a long run stays bounded.
const REQUEST_LOG_LIMIT: usize = 100_000;

/// State shared by the fault middleware and the admin routes.
#[derive(Clone, Default)]
pub struct Control {
    pub faults: Arc<Mutex<Faults>>,
    pub stats: Arc<Stats>,
    pub dialect: Dialect,
    pub log: Arc<Mutex<std::collections::VecDeque<LoggedRequest>>>,
    pub holds: Arc<HoldRecorder>,
}

/// How long the emulator held each `POST` (from the fault middleware's start to its
/// response), by the created resource's `userName`: the target's own latency, timer
/// overshoot and the handler included, so that the benchmark can subtract what the
/// target really took instead of its nominal latency. Off unless turned on.
#[derive(Default)]
pub struct HoldRecorder {
    enabled: std::sync::atomic::AtomicBool,
    by_user_name: Mutex<std::collections::HashMap<String, Duration>>,
}

impl HoldRecorder {
    pub fn enable(&self) {
        self.enabled.store(true, Ordering::Relaxed);
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    fn record(&self, user_name: String, held: Duration) {
        self.by_user_name.lock().expect("holds lock").insert(user_name, held);
    }

    /// How long the `POST` that carried `user_name` was held, if one was recorded.
    pub fn take(&self, user_name: &str) -> Option<Duration> {
        self.by_user_name.lock().expect("holds lock").remove(user_name)
    }
}

/// The body of a `POST` when holds are recorded (the request rebuilt around it), with
/// the `userName` it carries.
async fn peek_user_name(control: &Control, request: Request) -> (Request, Option<String>) {
    if !control.holds.is_enabled() || request.method() != axum::http::Method::POST {
        return (request, None);
    }
    let (parts, body) = request.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return (Request::from_parts(parts, Body::empty()), None);
    };
    let user_name = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|body| body.get("userName").and_then(|name| name.as_str()).map(str::to_string));
    (Request::from_parts(parts, Body::from(bytes)), user_name)
}

impl Control {
    pub fn new(faults: Faults, dialect: Dialect) -> Control {
        Control {
            faults: Arc::new(Mutex::new(faults)),
            stats: Arc::default(),
            dialect,
            log: Arc::default(),
            holds: Arc::default(),
        }
    }
}

impl Control {
    /// The request log, oldest first.
    pub fn requests(&self) -> Vec<LoggedRequest> {
        self.log.lock().expect("log lock").iter().cloned().collect()
    }
}

/// Middleware (outermost): records every request with the status it got.
pub async fn log_requests(State(control): State<Control>, request: Request, next: Next) -> Response {
    let method = request.method().to_string();
    let path = request.uri().path().to_string();
    let response = next.run(request).await;
    let mut log = control.log.lock().expect("log lock");
    if log.len() >= REQUEST_LOG_LIMIT {
        log.pop_front();
    }
    log.push_back(LoggedRequest {
        at: std::time::Instant::now(),
        method,
        path,
        status: response.status().as_u16(),
    });
    response
}

/// Middleware: counts the request, then applies latency and maybe a fault.
pub async fn inject_faults(State(control): State<Control>, request: Request, next: Next) -> Response {
    let arrived = std::time::Instant::now();
    let (request, user_name) = peek_user_name(&control, request).await;
    let response = apply_faults(&control, request, next).await;
    if let Some(user_name) = user_name {
        control.holds.record(user_name, arrived.elapsed());
    }
    response
}

async fn apply_faults(control: &Control, request: Request, next: Next) -> Response {
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
        return control.dialect.throttled(faults.retry_after_seconds);
    }
    if fault(faults.rate_500) {
        stats.injected_faults.fetch_add(1, Ordering::Relaxed);
        return control.dialect.server_error();
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

/// Access tokens an emulator issued, with their expiry.
#[derive(Default)]
pub struct TokenStore {
    live: Mutex<std::collections::HashMap<String, std::time::Instant>>,
    issued: AtomicU64,
}

impl TokenStore {
    /// A fresh token valid for `lifetime`.
    pub fn issue(&self, prefix: &str, lifetime: Duration) -> String {
        let token = format!("{prefix}{}", uuid::Uuid::new_v4().simple());
        self.live
            .lock()
            .expect("tokens lock")
            .insert(token.clone(), std::time::Instant::now() + lifetime);
        self.issued.fetch_add(1, Ordering::Relaxed);
        token
    }

    pub fn is_valid(&self, token: &str) -> bool {
        self.live
            .lock()
            .expect("tokens lock")
            .get(token)
            .is_some_and(|expires| std::time::Instant::now() < *expires)
    }

    /// Ends every token, as an expiry or a revocation would.
    pub fn expire_all(&self) {
        self.live.lock().expect("tokens lock").clear();
    }

    pub fn issued(&self) -> u64 {
        self.issued.load(Ordering::Relaxed)
    }
}

/// The token of an `Authorization: Bearer …` (or Salesforce's `OAuth …`) header.
pub fn bearer_token(headers: &axum::http::HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("OAuth "))
}

/// Adds fault injection and the request log (outermost) to a target's API routes.
pub fn with_faults(api: axum::Router, control: &Control) -> axum::Router {
    api.layer(axum::middleware::from_fn_with_state(control.clone(), inject_faults))
        .layer(axum::middleware::from_fn_with_state(control.clone(), log_requests))
}

/// Adds the `/_emulator` routes to `router` and serves it until `shutdown`.
pub fn spawn(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    control: &Control,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let router = router
        .route(
            "/_emulator/stats",
            axum::routing::get(get_stats).with_state(control.clone()),
        )
        .route(
            "/_emulator/faults",
            axum::routing::post(set_faults).with_state(control.clone()),
        );
    tokio::spawn(async move {
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    });
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
