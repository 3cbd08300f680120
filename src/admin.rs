//! The admin HTTP server: `/metrics`, `/healthz` and `/readyz`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// What `/readyz` reports: ready once the consumer holds an assignment and the
/// producer has reached a broker. Liveness (`/healthz`) is simply "the process answers".
#[derive(Default)]
pub struct Readiness {
    consumer_assigned: AtomicBool,
    producer_connected: AtomicBool,
}

impl Readiness {
    pub fn set_consumer_assigned(&self, assigned: bool) {
        self.consumer_assigned.store(assigned, Ordering::Relaxed);
    }

    pub fn set_producer_connected(&self, connected: bool) {
        self.producer_connected.store(connected, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.consumer_assigned.load(Ordering::Relaxed) && self.producer_connected.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
struct AdminState {
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
}

/// Binds the admin listener. Separate from [`serve`] so that a bind failure is a
/// startup error, and so callers can learn the port when they asked for port 0.
pub async fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(address).await
}

/// Serves until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let router = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(render_readiness))
        .with_state(AdminState { metrics, readiness });
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

async fn render_metrics(State(state): State<AdminState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.render(),
    )
}

async fn render_readiness(State(state): State<AdminState>) -> impl IntoResponse {
    if state.readiness.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}
