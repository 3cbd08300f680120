//! Complete results waiting for parked work.
//!
//! When some of an event's operations are parked, its input offset moves on, but its
//! complete result can only be written once every connector has a final outcome. Until
//! then the result so far waits on the state topic (same partition number as the input
//! record), keyed `~pending:<origin partition>/<origin offset>`, next to the lane
//! records. Each drained operation fills in its connector's outcome; the last one writes
//! the complete result and a tombstone. Keeping it on the topic, not in memory, is what
//! lets the last operation be drained by another instance, or after a restart.

use serde::{Deserialize, Serialize};

use crate::result::ProvisioningResult;

/// Current layout of a pending result's JSON; newer ones are refused.
pub const PENDING_SCHEMA_VERSION: u32 = 1;

/// Keys of pending results start with this; connector names cannot hold `~`.
pub const PENDING_KEY_PREFIX: &str = "~pending:";

/// The key of the pending result of the event first published at this position.
pub fn pending_key(origin_partition: i32, origin_offset: i64) -> String {
    format!("{PENDING_KEY_PREFIX}{origin_partition}/{origin_offset}")
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingResult {
    pub schema: u32,
    /// The complete result so far: outstanding connectors show `queued`.
    pub result: ProvisioningResult,
    /// Connectors whose parked operation has not been drained yet.
    pub outstanding: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PendingError {
    #[error("not a pending result: {0}")]
    Json(#[from] serde_json::Error),
    #[error("pending result layout {found} is newer than this version understands ({PENDING_SCHEMA_VERSION})")]
    NewerSchema { found: u32 },
}

impl PendingResult {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a pending result always serialises")
    }

    pub fn decode(bytes: &[u8]) -> Result<PendingResult, PendingError> {
        let pending: PendingResult = serde_json::from_slice(bytes)?;
        if pending.schema > PENDING_SCHEMA_VERSION {
            return Err(PendingError::NewerSchema { found: pending.schema });
        }
        Ok(pending)
    }
}
