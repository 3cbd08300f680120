//! Event versions: the order of one user's events, so that a replayed or late event can
//! be recognised as older than what a target already holds.
//!
//! The contract (README, "Event versions"):
//! - An operator-set **epoch** comes first: a higher epoch is newer, whatever else the
//!   versions say. Bump it (`state.version_epoch`) after re-creating or mirroring the input
//!   topic, whose offsets then start again.
//! - Within an epoch, when both events carry the CloudEvents `sequence` extension and come
//!   from the same `source`, the sequences decide. The CloudEvents spec compares them as
//!   strings; sequences made only of ASCII digits are compared as numbers, so that both
//!   zero-padded and unpadded counters order correctly.
//! - Otherwise (no sequence on either or one of them, or different sources), the position
//!   where the event was first published decides: its input partition and offset. A
//!   user's events all live on one partition (the input is keyed `tenant/user id`), and a
//!   replayed dead letter keeps its original position in a header.
//! - Equal versions are the same event delivered again: it is applied again, idempotently,
//!   never called stale.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

/// Where an event stands in its user's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventVersion {
    /// Bumped by an operator when input offsets restart.
    pub epoch: u32,
    /// The input partition the event was first published to.
    pub partition: i32,
    /// Its offset there.
    pub offset: i64,
    /// The producer's own order, when it sent the `sequence` extension.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<Sequence>,
}

/// The CloudEvents `sequence` extension, meaningful only between events of one `source`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sequence {
    pub source: String,
    pub value: String,
}

/// How an incoming event relates to the version a target last had applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relation {
    /// Apply it.
    Newer,
    /// The same event again: apply it idempotently.
    Same,
    /// A later event has been applied already: make no call.
    Older,
}

impl EventVersion {
    /// How `self` (an incoming event) relates to `applied` (the last one applied).
    pub fn relation_to(&self, applied: &EventVersion) -> Relation {
        let ordering = self.epoch.cmp(&applied.epoch).then_with(|| self.within_epoch(applied));
        match ordering {
            Ordering::Greater => Relation::Newer,
            Ordering::Equal => Relation::Same,
            Ordering::Less => Relation::Older,
        }
    }

    fn within_epoch(&self, applied: &EventVersion) -> Ordering {
        if let (Some(mine), Some(theirs)) = (&self.sequence, &applied.sequence) {
            if mine.source == theirs.source {
                return compare_sequences(&mine.value, &theirs.value);
            }
        }
        if self.partition != applied.partition {
            // Only possible if the input's partitioning changed, which start-up refuses;
            // nothing can be said, so the event is applied.
            return Ordering::Greater;
        }
        self.offset.cmp(&applied.offset)
    }
}

impl std::fmt::Display for EventVersion {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            formatter,
            "epoch {} partition {} offset {}",
            self.epoch, self.partition, self.offset
        )?;
        if let Some(sequence) = &self.sequence {
            write!(formatter, " sequence {} of {}", sequence.value, sequence.source)?;
        }
        Ok(())
    }
}

fn compare_sequences(left: &str, right: &str) -> Ordering {
    let is_number = |value: &str| !value.is_empty() && value.bytes().all(|byte| byte.is_ascii_digit());
    if is_number(left) && is_number(right) {
        let left = left.trim_start_matches('0');
        let right = right.trim_start_matches('0');
        left.len().cmp(&right.len()).then_with(|| left.cmp(right))
    } else {
        left.cmp(right)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(offset: i64) -> EventVersion {
        EventVersion {
            epoch: 0,
            partition: 2,
            offset,
            sequence: None,
        }
    }

    fn sequenced(offset: i64, source: &str, value: &str) -> EventVersion {
        EventVersion {
            sequence: Some(Sequence {
                source: source.into(),
                value: value.into(),
            }),
            ..at(offset)
        }
    }

    #[test]
    fn offsets_order_events_without_a_sequence() {
        assert_eq!(at(5).relation_to(&at(4)), Relation::Newer);
        assert_eq!(at(5).relation_to(&at(5)), Relation::Same);
        assert_eq!(at(4).relation_to(&at(5)), Relation::Older);
    }

    #[test]
    fn the_epoch_outranks_everything_else() {
        let bumped = EventVersion { epoch: 1, ..at(0) };
        assert_eq!(bumped.relation_to(&at(1_000)), Relation::Newer);
        assert_eq!(at(1_000).relation_to(&bumped), Relation::Older);
    }

    #[test]
    fn sequences_of_one_source_outrank_offsets() {
        // Published out of order: the later offset carries the earlier sequence.
        let late = sequenced(9, "/wso2", "0000000002");
        let early = sequenced(3, "/wso2", "0000000003");
        assert_eq!(late.relation_to(&early), Relation::Older);
        assert_eq!(early.relation_to(&late), Relation::Newer);
        // The same sequence at another offset is the same event, re-published.
        assert_eq!(
            sequenced(12, "/wso2", "7").relation_to(&sequenced(4, "/wso2", "7")),
            Relation::Same
        );
    }

    #[test]
    fn numeric_sequences_compare_as_numbers_padded_or_not() {
        assert_eq!(
            sequenced(1, "/s", "10").relation_to(&sequenced(2, "/s", "9")),
            Relation::Newer
        );
        assert_eq!(
            sequenced(1, "/s", "0010").relation_to(&sequenced(2, "/s", "9")),
            Relation::Newer
        );
        assert_eq!(
            sequenced(1, "/s", "b").relation_to(&sequenced(2, "/s", "a")),
            Relation::Newer
        );
    }

    #[test]
    fn other_sources_or_a_missing_sequence_fall_back_to_offsets() {
        assert_eq!(
            sequenced(5, "/a", "1").relation_to(&sequenced(4, "/b", "9")),
            Relation::Newer
        );
        assert_eq!(at(5).relation_to(&sequenced(6, "/a", "1")), Relation::Older);
        assert_eq!(sequenced(7, "/a", "1").relation_to(&at(6)), Relation::Newer);
    }

    #[test]
    fn round_trips_as_json() {
        let version = sequenced(42, "/wso2", "00042");
        let json = serde_json::to_string(&version).unwrap();
        assert_eq!(serde_json::from_str::<EventVersion>(&json).unwrap(), version);
        assert!(!serde_json::to_string(&at(1)).unwrap().contains("sequence"));
    }
}
