//! The outbound contract: what happened to one event, per connector.
//!
//! The same shape is written to a blocking caller's reply topic (scope `blocking`:
//! only the blocking bindings, as soon as they have finished) and to the results topic
//! (scope `complete`: every binding). `schemas/result.schema.json` describes it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::event::EventType;
// The domain words the results carry.
pub use crate::domain::version::EventVersion;
pub use crate::domain::{Operation, Outcome};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProvisioningResult {
    /// The caller's correlation id, when it sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// Empty (and `event_type` absent) when the event could not be decoded.
    pub event_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_type: Option<EventType>,
    pub tenant: String,
    /// The user; for a membership, the member; empty for a group's own event and for
    /// an event that could not be decoded.
    pub user_id: String,
    /// The group, for a group's event and for a membership.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    pub status: Status,
    pub scope: ResultScope,
    /// Why the event was skipped or failed as a whole (e.g. unknown tenant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub results: Vec<ConnectorResult>,
    /// The event's version (its place in the user's history), when the provisioning
    /// state is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<EventVersion>,
    pub received_at: DateTime<Utc>,
    pub completed_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Succeeded,
    Failed,
    Partial,
    Skipped,
    /// Nothing failed and at least one binding is queued (accepted durably, applied
    /// later). Only in replies and queued notices.
    Queued,
}

impl Status {
    /// `skipped` when nothing applied (every binding skipped or stale), `failed` when
    /// everything that applied failed, `partial` when some failed, `queued` when none
    /// failed and some are queued, `succeeded` otherwise.
    pub fn from_results(results: &[ConnectorResult]) -> Status {
        let applied: Vec<_> = results
            .iter()
            .filter(|result| !matches!(result.outcome, Outcome::Skipped | Outcome::Stale))
            .collect();
        let failed = applied
            .iter()
            .filter(|result| result.outcome == Outcome::Failed)
            .count();
        if applied.is_empty() {
            Status::Skipped
        } else if failed == applied.len() {
            Status::Failed
        } else if failed > 0 {
            Status::Partial
        } else if applied.iter().any(|result| result.outcome == Outcome::Queued) {
            Status::Queued
        } else {
            Status::Succeeded
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Partial => "partial",
            Status::Skipped => "skipped",
            Status::Queued => "queued",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResultScope {
    /// A reply to a blocking caller: the blocking bindings only.
    Blocking,
    /// Every binding, blocking or not, each with a final outcome: exactly one per event.
    Complete,
    /// One connector's work for the event was parked (or outlived the reply deadline)
    /// and will be applied later: one record per connector, before the complete result.
    Queued,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectorResult {
    pub connector: String,
    pub operation: Operation,
    pub outcome: Outcome,
    pub blocking: bool,
    /// The target's id for the account (SCIM `id`, Google `id`, Salesforce `Id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_id: Option<String>,
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ResultError>,
    /// For `stale`: the newer event already applied on this connector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub superseded_by: Option<Superseded>,
    /// For `skipped`: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Group events: members queued for adding (each applied in its user's lane, with a
    /// result of its own); memberships: members added by the call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members_added: Option<u64>,
    /// The same for members removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members_removed: Option<u64>,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
}

impl ConnectorResult {
    /// A result whose call was not made (or not yet): no remote id, no attempts, no
    /// error, started and finished now. Fill the rest with struct update syntax.
    pub fn without_call(connector: &str, operation: Operation, outcome: Outcome, blocking: bool) -> ConnectorResult {
        let now = Utc::now();
        ConnectorResult {
            connector: connector.to_string(),
            operation,
            outcome,
            blocking,
            remote_id: None,
            attempts: 0,
            error: None,
            superseded_by: None,
            reason: None,
            members_added: None,
            members_removed: None,
            started_at: now,
            finished_at: now,
        }
    }
}

/// The event that made another one stale.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Superseded {
    pub event_id: String,
    pub version: EventVersion,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultError {
    pub kind: ErrorKind,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    pub retryable: bool,
}

/// Closed set of failure classes, safe as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Could not connect, or the connection broke.
    Transport,
    /// No answer within the request timeout.
    Timeout,
    /// The target asked us to slow down (429, Google 403 rate reasons, Salesforce limits).
    Throttled,
    /// 5xx from the target.
    Server,
    /// The target refused the request as invalid (4xx).
    Rejected,
    /// Credentials were refused, or a token could not be obtained.
    Auth,
    /// The account exists and belongs to someone else.
    Conflict,
    /// The target answered with something we could not understand.
    InvalidResponse,
    /// The binding's rule could not be evaluated.
    Rule,
    /// Retries ran out of time or attempts.
    Exhausted,
    /// Our side could not do it (e.g. the result could not be produced).
    Internal,
    /// The event's partition was revoked before the call; its new owner applies it.
    Revoked,
    /// A membership's user or group is not there to be linked: the user's create failed
    /// for good or has not come within `groups.member_wait`, or the group is gone.
    Dependency,
}

impl ErrorKind {
    /// The kinds a retry can be caused by.
    pub const RETRYABLE: [ErrorKind; 4] = [
        ErrorKind::Transport,
        ErrorKind::Timeout,
        ErrorKind::Throttled,
        ErrorKind::Server,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Transport => "transport",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Throttled => "throttled",
            ErrorKind::Server => "server",
            ErrorKind::Rejected => "rejected",
            ErrorKind::Auth => "auth",
            ErrorKind::Conflict => "conflict",
            ErrorKind::InvalidResponse => "invalid_response",
            ErrorKind::Rule => "rule",
            ErrorKind::Exhausted => "exhausted",
            ErrorKind::Internal => "internal",
            ErrorKind::Revoked => "revoked",
            ErrorKind::Dependency => "dependency",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(outcome: Outcome) -> ConnectorResult {
        ConnectorResult {
            attempts: 1,
            ..ConnectorResult::without_call("c", Operation::Create, outcome, false)
        }
    }

    #[test]
    fn status_summarises_outcomes() {
        assert_eq!(Status::from_results(&[]), Status::Skipped);
        assert_eq!(Status::from_results(&[result(Outcome::Skipped)]), Status::Skipped);
        assert_eq!(
            Status::from_results(&[result(Outcome::Created), result(Outcome::Skipped)]),
            Status::Succeeded
        );
        assert_eq!(
            Status::from_results(&[result(Outcome::Created), result(Outcome::Failed)]),
            Status::Partial
        );
        assert_eq!(
            Status::from_results(&[result(Outcome::Failed), result(Outcome::Skipped)]),
            Status::Failed
        );
        assert_eq!(
            Status::from_results(&[result(Outcome::Created), result(Outcome::Queued)]),
            Status::Queued
        );
        assert_eq!(
            Status::from_results(&[result(Outcome::Failed), result(Outcome::Queued)]),
            Status::Partial
        );
    }

    #[test]
    fn labels_match_serde_names() {
        for outcome in Outcome::ALL {
            assert_eq!(serde_json::to_value(outcome).unwrap(), outcome.as_str());
        }
    }
}
