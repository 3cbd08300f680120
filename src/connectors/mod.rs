//! Outbound targets behind one [`Connector`] trait, one file per target type.
//!
//! A connector turns one operation on one user into calls to its target and says how
//! it went. It classifies its own errors ([`ConnectorError::is_retryable`]); the
//! retrying itself happens once, in `retry.rs`, driven by the pipeline.
//!
//! **Invariant:** connector calls are idempotent. Create on an existing account adopts
//! it; delete of a missing account is `already_absent`. Redelivery is therefore harmless.

pub mod gate;
pub mod google;
pub mod http;
pub mod jwt;
pub mod naming;
pub mod oauth;
pub mod salesforce;
pub mod scim;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use crate::connectors::gate::Gate;
use crate::event::UserEvent;
use crate::metrics::Metrics;
use crate::result::{ErrorKind, Operation, Outcome};
use crate::retry::RetryPolicy;
use crate::settings::{ConnectorSettings, DeliverySettings, Settings};

/// What a successful operation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub outcome: Outcome,
    /// The target's id for the account, when it has one.
    pub remote_id: Option<String>,
}

pub trait Connector: Send + Sync + 'static {
    /// Applies `operation` for the event's user. Called again on retryable errors, so it
    /// must converge rather than assume where a previous attempt stopped.
    fn apply<'a>(
        &'a self,
        operation: Operation,
        event: &'a UserEvent,
    ) -> BoxFuture<'a, Result<Applied, ConnectorError>>;
}

/// Why a connector call failed. Messages come from the target's error body and our own
/// text; they never carry credentials.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectorError {
    #[error("cannot reach the target: {message}")]
    Transport { message: String },
    #[error("the target did not answer within the request timeout")]
    Timeout,
    #[error("the target throttled the call: {message}")]
    Throttled {
        status: Option<u16>,
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("the target failed with HTTP {status}: {message}")]
    Server {
        status: u16,
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("the target rejected the call with HTTP {status}: {message}")]
    Rejected { status: u16, message: String },
    #[error("authentication failed: {message}")]
    Auth { status: Option<u16>, message: String },
    #[error("{message}")]
    Conflict { status: Option<u16>, message: String },
    #[error("unexpected response from the target: {message}")]
    InvalidResponse { status: Option<u16>, message: String },
    /// The call was never made: the circuit stayed open (or the target kept asking us
    /// to wait) until the event's retry time ran out.
    #[error("the target stayed unavailable (circuit open or throttled) until the retry time ran out")]
    Held,
}

impl ConnectorError {
    /// Exhaustive on purpose: a new variant must decide.
    pub fn is_retryable(&self) -> bool {
        match self {
            ConnectorError::Transport { .. }
            | ConnectorError::Timeout
            | ConnectorError::Throttled { .. }
            | ConnectorError::Server { .. }
            | ConnectorError::Held => true,
            ConnectorError::Rejected { .. }
            | ConnectorError::Auth { .. }
            | ConnectorError::Conflict { .. }
            | ConnectorError::InvalidResponse { .. } => false,
        }
    }

    /// The target's `Retry-After`, when it gave one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ConnectorError::Throttled { retry_after, .. } | ConnectorError::Server { retry_after, .. } => *retry_after,
            ConnectorError::Transport { .. }
            | ConnectorError::Timeout
            | ConnectorError::Rejected { .. }
            | ConnectorError::Auth { .. }
            | ConnectorError::Conflict { .. }
            | ConnectorError::InvalidResponse { .. }
            | ConnectorError::Held => None,
        }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            ConnectorError::Transport { .. } => ErrorKind::Transport,
            ConnectorError::Timeout => ErrorKind::Timeout,
            ConnectorError::Throttled { .. } => ErrorKind::Throttled,
            ConnectorError::Server { .. } => ErrorKind::Server,
            ConnectorError::Rejected { .. } => ErrorKind::Rejected,
            ConnectorError::Auth { .. } => ErrorKind::Auth,
            ConnectorError::Conflict { .. } => ErrorKind::Conflict,
            ConnectorError::InvalidResponse { .. } => ErrorKind::InvalidResponse,
            ConnectorError::Held => ErrorKind::Exhausted,
        }
    }

    pub fn http_status(&self) -> Option<u16> {
        match self {
            ConnectorError::Server { status, .. } | ConnectorError::Rejected { status, .. } => Some(*status),
            ConnectorError::Throttled { status, .. }
            | ConnectorError::Auth { status, .. }
            | ConnectorError::Conflict { status, .. }
            | ConnectorError::InvalidResponse { status, .. } => *status,
            ConnectorError::Transport { .. } | ConnectorError::Timeout | ConnectorError::Held => None,
        }
    }
}

/// Why the configured connectors could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("connector `{name}`: {message}")]
    Invalid { name: String, message: String },
}

/// A connector with the limits and retry policy it runs under.
pub struct ConnectorHandle {
    pub name: String,
    pub connector: Arc<dyn Connector>,
    /// Circuit breaker, slow-down, rate limit and concurrency cap; passed per attempt,
    /// never held across backoff sleeps.
    pub gate: Arc<Gate>,
    pub retry: RetryPolicy,
}

/// Every configured connector, by name.
#[derive(Default, Clone)]
pub struct ConnectorSet {
    handles: BTreeMap<String, Arc<ConnectorHandle>>,
}

impl ConnectorSet {
    /// Builds every connector named in `settings.connectors`.
    pub fn from_settings(settings: &Settings, metrics: &Arc<Metrics>) -> Result<ConnectorSet, BuildError> {
        let mut set = ConnectorSet::default();
        for (name, connector_settings) in &settings.connectors {
            let delivery = connector_settings.delivery();
            let gate = Arc::new(Gate::new(name, delivery, Some(metrics.clone())));
            let connector = build_connector(name, connector_settings, metrics, &gate)?;
            set.insert_with_gate(name, connector, gate, delivery);
        }
        Ok(set)
    }

    /// Adds (or replaces) a connector. Tests use it to plug in doubles.
    pub fn insert(&mut self, name: &str, connector: Arc<dyn Connector>, delivery: &DeliverySettings) {
        let gate = Arc::new(Gate::new(name, delivery, None));
        self.insert_with_gate(name, connector, gate, delivery);
    }

    fn insert_with_gate(
        &mut self,
        name: &str,
        connector: Arc<dyn Connector>,
        gate: Arc<Gate>,
        delivery: &DeliverySettings,
    ) {
        self.handles.insert(
            name.to_string(),
            Arc::new(ConnectorHandle {
                name: name.to_string(),
                connector,
                gate,
                retry: RetryPolicy::from_settings(delivery),
            }),
        );
    }

    pub fn get(&self, name: &str) -> Option<&Arc<ConnectorHandle>> {
        self.handles.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.handles.keys().map(String::as_str)
    }
}

fn build_connector(
    name: &str,
    settings: &ConnectorSettings,
    metrics: &Arc<Metrics>,
    gate: &Arc<Gate>,
) -> Result<Arc<dyn Connector>, BuildError> {
    match settings {
        ConnectorSettings::Scim2(scim) => scim::build(name, scim),
        ConnectorSettings::Google(google) => google::build(name, google),
        ConnectorSettings::Salesforce(salesforce) => {
            salesforce::build(name, salesforce, metrics.clone(), Some(gate.clone()))
        }
    }
}
