//! The admin HTTP server: `/metrics`, `/healthz` and `/readyz`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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
/// producer has reached a broker, and while no partition is wedged. Liveness
/// (`/healthz`) is simply "the process answers".
///
/// A wedged partition fails readiness, never liveness: a restart would not unwedge it.
/// The partition's events would be redelivered to whichever replica takes it over, which
/// would wedge on the same event and be restarted in turn, a restart storm that moves the
/// wedge between replicas and adds rebalances to it. Readiness shows the problem (rollouts
/// pause, `kubectl get pods` shows it) and leaves the process running to recover by itself
/// when the target does.
#[derive(Default)]
pub struct Readiness {
    consumer_assigned: AtomicBool,
    producer_connected: AtomicBool,
    wedged_partitions: AtomicUsize,
}

impl Readiness {
    pub fn set_consumer_assigned(&self, assigned: bool) {
        self.consumer_assigned.store(assigned, Ordering::Relaxed);
    }

    pub fn set_producer_connected(&self, connected: bool) {
        self.producer_connected.store(connected, Ordering::Relaxed);
    }

    /// How many partitions are wedged now (see `pipeline::wedge`).
    pub fn set_wedged_partitions(&self, wedged: usize) {
        self.wedged_partitions.store(wedged, Ordering::Relaxed);
    }

    pub fn wedged_partitions(&self) -> usize {
        self.wedged_partitions.load(Ordering::Relaxed)
    }

    pub fn is_ready(&self) -> bool {
        self.consumer_assigned.load(Ordering::Relaxed)
            && self.producer_connected.load(Ordering::Relaxed)
            && self.wedged_partitions() == 0
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
        return (StatusCode::OK, "ready\n".to_string());
    }
    let wedged = state.readiness.wedged_partitions();
    let body = if wedged > 0 {
        format!("not ready: {wedged} wedged partition(s)\n")
    } else {
        "not ready\n".to_string()
    };
    (StatusCode::SERVICE_UNAVAILABLE, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wedged_partition_makes_the_service_unready_until_it_moves() {
        let readiness = Readiness::default();
        readiness.set_consumer_assigned(true);
        readiness.set_producer_connected(true);
        assert!(readiness.is_ready());
        readiness.set_wedged_partitions(2);
        assert!(!readiness.is_ready());
        readiness.set_wedged_partitions(0);
        assert!(readiness.is_ready());
    }
}
