//! `provisioner state show TENANT/USER`: what each connector's target holds for a user,
//! read straight from the state topic (the source of truth), not from a local store.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::kafka::partitioners::{java_murmur2, librdkafka_crc32};
use crate::kafka::settings::KafkaSettings;
use crate::kafka::state_topic;
use crate::state::record::{StateKey, StateRecord};
use crate::state::StateError;

/// One connector's record for the user, and where it was found.
#[derive(Debug, Clone)]
pub struct Shown {
    pub partition: i32,
    pub offset: i64,
    pub record: StateRecord,
}

/// Finds the partition from the key: the input record's key `tenant/user id` goes where
/// the producer's partitioner put it, the Java client's (murmur2) or librdkafka's
/// (CRC32). Both candidates are read to their end; per connector, the record with the
/// highest version wins, as on restore.
pub fn show(
    kafka: &KafkaSettings,
    state_topic_name: &str,
    user_key: &str,
    timeout: Duration,
) -> Result<BTreeMap<String, Shown>, StateError> {
    let partitions = state_topic::partition_count(kafka, state_topic_name)?;
    if partitions == 0 {
        return Err(StateError::TopicMissing {
            topic: state_topic_name.to_string(),
            input: kafka.event_topics.first().cloned().unwrap_or_default(),
            partitions: 0,
        });
    }
    let mut candidates = vec![
        java_murmur2(user_key.as_bytes(), partitions),
        librdkafka_crc32(user_key.as_bytes(), partitions),
    ];
    candidates.dedup();
    let mut found: BTreeMap<String, Shown> = BTreeMap::new();
    for partition in candidates {
        state_topic::read_partition(kafka, state_topic_name, partition, 0, timeout, |batch| {
            for entry in batch {
                let Some(key) = entry.key.as_deref().and_then(|key| std::str::from_utf8(key).ok()) else {
                    continue;
                };
                let Some(state_key) = StateKey::decode(key).filter(|state_key| state_key.user_key == user_key) else {
                    continue;
                };
                let Some(record) = entry.value.as_deref().and_then(|value| StateRecord::decode(value).ok()) else {
                    continue;
                };
                let newer = found
                    .get(&state_key.connector)
                    .is_none_or(|shown| shown.record.is_superseded_by(&record));
                if newer {
                    found.insert(
                        state_key.connector,
                        Shown {
                            partition,
                            offset: entry.offset,
                            record,
                        },
                    );
                }
            }
        })?;
    }
    Ok(found)
}
