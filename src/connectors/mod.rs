//! Outbound targets behind one [`Connector`] trait, one folder per target type, each
//! owning its settings (`<type>/settings.rs`).
//!
//! A connector turns one operation on one user, one group, or one batch of a group's
//! members into calls to its target and says how it went. It classifies its own errors ([`ConnectorError::is_retryable`]); the
//! retrying itself happens once, in `retry.rs`, driven by the pipeline.
//!
//! **Invariant:** connector calls are idempotent. Create on an existing account adopts
//! it; delete of a missing account is `already_absent`. Redelivery is therefore harmless.

pub mod delivery;
pub mod gate;
pub mod google;
pub mod http;
pub mod jwt;
pub mod members;
pub mod naming;
pub mod oauth;
pub mod salesforce;
pub mod scim;
pub mod set;
pub mod settings;

use std::time::Duration;

use futures::future::BoxFuture;

use crate::domain::{GroupChange, MembersChange, Outcome, UserChange};
use crate::result::ErrorKind;
use crate::retry::RetryClass;

// Re-exported: what the rest of the service names when it builds or calls connectors.
pub use set::{ConnectorHandle, ConnectorSet};

/// What a successful operation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub outcome: Outcome,
    /// The target's id for the account, when it has one.
    pub remote_id: Option<String>,
}

pub trait Connector: Send + Sync + 'static {
    /// Applies the change's operation to its user. Called again on retryable errors, so
    /// it must converge rather than assume where a previous attempt stopped.
    fn apply<'a>(&'a self, change: UserChange<'a>) -> BoxFuture<'a, Result<Applied, ConnectorError>>;

    /// Creates (adopting one that exists), renames or deletes a group. Idempotent like
    /// [`Connector::apply`]. A target without groups answers
    /// [`ConnectorError::Unsupported`] (the result is `skipped` with the reason).
    fn apply_group<'a>(&'a self, change: GroupChange<'a>) -> BoxFuture<'a, Result<Applied, ConnectorError>> {
        let _ = change;
        Box::pin(async { Err(ConnectorError::unsupported_groups()) })
    }

    /// Adds or removes `change.members` (at most [`Connector::max_members_per_request`])
    /// in as few requests as the target allows. Adding a member who is already there,
    /// or removing one who is not, is success; so is a retry of a partial batch. A
    /// group the target no longer has is [`ConnectorError::GroupGone`].
    fn apply_members<'a>(&'a self, change: MembersChange<'a>) -> BoxFuture<'a, Result<(), ConnectorError>> {
        let _ = change;
        Box::pin(async { Err(ConnectorError::unsupported_groups()) })
    }

    /// The most members one [`Connector::apply_members`] call takes.
    fn max_members_per_request(&self) -> usize {
        1
    }
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
    /// The call was never made: the event's input partition was revoked, and its new
    /// owner applies the event.
    #[error("the input partition was revoked; the new owner applies the event")]
    Revoked,
    /// The target (or this connector's configuration) has no place for it, e.g. a
    /// Salesforce group with no permission set mapped: the operation is `skipped`.
    #[error("{message}")]
    Unsupported { message: String },
    /// A membership call found no such group on the target (deleted meanwhile).
    #[error("the group is gone from the target: {message}")]
    GroupGone { message: String },
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
            | ConnectorError::InvalidResponse { .. }
            | ConnectorError::Revoked
            | ConnectorError::Unsupported { .. }
            | ConnectorError::GroupGone { .. } => false,
        }
    }

    fn unsupported_groups() -> ConnectorError {
        ConnectorError::Unsupported {
            message: "this connector does not provision groups".into(),
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
            | ConnectorError::Held
            | ConnectorError::Revoked
            | ConnectorError::Unsupported { .. }
            | ConnectorError::GroupGone { .. } => None,
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
            ConnectorError::Revoked => ErrorKind::Revoked,
            ConnectorError::Unsupported { .. } => ErrorKind::Rejected,
            ConnectorError::GroupGone { .. } => ErrorKind::Dependency,
        }
    }

    pub fn http_status(&self) -> Option<u16> {
        match self {
            ConnectorError::Server { status, .. } | ConnectorError::Rejected { status, .. } => Some(*status),
            ConnectorError::Throttled { status, .. }
            | ConnectorError::Auth { status, .. }
            | ConnectorError::Conflict { status, .. }
            | ConnectorError::InvalidResponse { status, .. } => *status,
            ConnectorError::Transport { .. }
            | ConnectorError::Timeout
            | ConnectorError::Held
            | ConnectorError::Revoked
            | ConnectorError::Unsupported { .. }
            | ConnectorError::GroupGone { .. } => None,
        }
    }
}

impl RetryClass for ConnectorError {
    fn is_retryable(&self) -> bool {
        ConnectorError::is_retryable(self)
    }

    fn retry_after(&self) -> Option<Duration> {
        ConnectorError::retry_after(self)
    }
}

/// The outcome of a delete call for the account `remote_id`: a 404 means the account
/// was already gone (deleted by someone else since we found it), which is success.
pub fn deleted_or_absent<T>(result: Result<T, ConnectorError>, remote_id: String) -> Result<Applied, ConnectorError> {
    match result {
        Ok(_) => Ok(Applied {
            outcome: Outcome::Deleted,
            remote_id: Some(remote_id),
        }),
        Err(ConnectorError::Rejected { status: 404, .. }) => Ok(Applied {
            outcome: Outcome::AlreadyAbsent,
            remote_id: Some(remote_id),
        }),
        Err(error) => Err(error),
    }
}

/// Why the configured connectors could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("connector `{name}`: {message}")]
    Invalid { name: String, message: String },
}
