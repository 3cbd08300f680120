//! One provisioning-state record: what one connector's target holds for one user.
//!
//! On the state topic a record is keyed `<connector>:<tenant>/<user id>` (connector names
//! cannot hold `:`, so the first `:` splits the key) and its value is JSON. Compaction
//! keeps the last record per key. A delete is a record whose `account` is `deleted`, not
//! a tombstone: compaction drops tombstones after `delete.retention.ms`, and a forgotten
//! delete would let a stale create bring the account back.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::domain::version::EventVersion;

/// Current layout of the record's JSON; older layouts are read, newer ones refused.
pub const STATE_SCHEMA_VERSION: u32 = 1;

/// The key of one (connector, user).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StateKey {
    pub connector: String,
    /// `tenant/user id`, the input record's key.
    pub user_key: String,
}

impl StateKey {
    pub fn new(connector: &str, user_key: &str) -> StateKey {
        StateKey {
            connector: connector.to_string(),
            user_key: user_key.to_string(),
        }
    }

    /// The state topic's record key.
    pub fn encode(&self) -> String {
        format!("{}:{}", self.connector, self.user_key)
    }

    /// The key of one (connector, group, member): the membership's own version lives
    /// here, on the member's partition. Identifiers hold no control characters, so the
    /// unit separator keeps it apart from every user's and every group's key.
    pub fn membership(connector: &str, tenant: &str, group_id: &str, user_id: &str) -> StateKey {
        StateKey {
            connector: connector.to_string(),
            user_key: format!("{tenant}/group:{group_id}\u{1f}{user_id}"),
        }
    }

    pub fn decode(key: &str) -> Option<StateKey> {
        let (connector, user_key) = key.split_once(':')?;
        (!connector.is_empty() && !user_key.is_empty()).then(|| StateKey::new(connector, user_key))
    }
}

impl std::fmt::Display for StateKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.encode())
    }
}

/// The account's state on the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccountState {
    /// Created or updated, and active.
    Present,
    /// Deactivated (SCIM `active: false`, Salesforce `IsActive: false`) or suspended
    /// (Google), on delete with `on_delete = "deactivate"`.
    Deactivated,
    /// Deleted, or found already absent when a delete came.
    Deleted,
    /// The last event failed for good (dead-lettered); what the target holds is unknown.
    Failed,
    /// Nothing applied yet: the lane's first operation is parked. The record exists to
    /// say that the lane is parked (`parked_until`); its version is the parked one's.
    NotApplied,
}

impl AccountState {
    pub fn as_str(self) -> &'static str {
        match self {
            AccountState::Present => "present",
            AccountState::Deactivated => "deactivated",
            AccountState::Deleted => "deleted",
            AccountState::Failed => "failed",
            AccountState::NotApplied => "not_applied",
        }
    }
}

/// What one connector's target holds for one user, as of one event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateRecord {
    pub schema: u32,
    /// The version of the last event applied (or found stale-proof: see `account`).
    pub version: EventVersion,
    pub account: AccountState,
    /// The target's own id for the account, used for updates, deletes and deactivation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_id: Option<String>,
    /// The event that set this record.
    pub event_id: String,
    pub updated_at: DateTime<Utc>,
    /// While set, this (connector, user) lane is parked: its operations up to this
    /// offset of the connector's retry topic (same partition number) wait there, and
    /// every newer operation joins them so that none overtakes. Cleared when the
    /// operation at (or past) this offset has been drained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parked_until: Option<i64>,
    /// A group's record: how many of this version's membership records are written to
    /// the membership topic, so that a redone event resumes instead of starting over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members_emitted: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("not a state record: {0}")]
    Json(#[from] serde_json::Error),
    #[error("state record layout {found} is newer than this version understands ({STATE_SCHEMA_VERSION})")]
    NewerSchema { found: u32 },
}

impl StateRecord {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a state record always serialises")
    }

    pub fn decode(bytes: &[u8]) -> Result<StateRecord, RecordError> {
        let record: StateRecord = serde_json::from_slice(bytes)?;
        if record.schema > STATE_SCHEMA_VERSION {
            return Err(RecordError::NewerSchema { found: record.schema });
        }
        Ok(record)
    }

    /// Whether a record from the topic should replace `self` on restore: the higher
    /// version wins, so that a late write from an old owner cannot replace a newer
    /// `deleted`; an equal version replaces (the later write of the same event).
    pub fn is_superseded_by(&self, other: &StateRecord) -> bool {
        use crate::domain::version::Relation;
        other.version.relation_to(&self.version) != Relation::Older
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(offset: i64, account: AccountState) -> StateRecord {
        StateRecord {
            schema: STATE_SCHEMA_VERSION,
            version: EventVersion {
                epoch: 0,
                partition: 1,
                offset,
                sequence: None,
            },
            account,
            remote_id: Some("2819c223".into()),
            event_id: format!("e{offset}"),
            updated_at: Utc::now(),
            parked_until: None,
            members_emitted: None,
        }
    }

    #[test]
    fn keys_split_at_the_first_colon() {
        let key = StateKey::new("directory", "acme/user:with:colons");
        assert_eq!(key.encode(), "directory:acme/user:with:colons");
        assert_eq!(StateKey::decode(&key.encode()), Some(key));
        assert_eq!(StateKey::decode("no-colon"), None);
        assert_eq!(StateKey::decode(":acme/u1"), None);
    }

    #[test]
    fn records_round_trip_and_newer_layouts_are_refused() {
        let original = record(7, AccountState::Deleted);
        assert_eq!(StateRecord::decode(&original.encode()).unwrap(), original);
        let mut newer = serde_json::to_value(&original).unwrap();
        newer["schema"] = serde_json::json!(STATE_SCHEMA_VERSION + 1);
        assert!(matches!(
            StateRecord::decode(newer.to_string().as_bytes()),
            Err(RecordError::NewerSchema { .. })
        ));
        assert!(StateRecord::decode(b"{not json").is_err());
    }

    #[test]
    fn a_late_older_write_does_not_replace_a_newer_delete() {
        let deleted = record(10, AccountState::Deleted);
        assert!(!deleted.is_superseded_by(&record(8, AccountState::Present)));
        assert!(deleted.is_superseded_by(&record(10, AccountState::Deleted)));
        assert!(deleted.is_superseded_by(&record(11, AccountState::Present)));
    }
}
