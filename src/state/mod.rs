//! The provisioning state: what each connector's target holds for each user, so that no
//! stale or replayed event rolls a target back or re-creates a deleted account, and so
//! that updates and deletes go by the target's own id instead of a search.
//!
//! One record per (user, connector), keyed `<connector>:<tenant>/<user id>`: each
//! connector's work writes its own record, so connectors never contend for one record
//! and one connector's history does not grow another's. The records live on a compacted
//! Kafka topic partitioned like the input, each written to the partition number of the
//! input record it belongs to (the source of truth), and in an embedded local store
//! (a cache, restored from the topic when a partition is assigned), as Kafka Streams
//! does with its changelog-backed stores.
//!
//! Order of writes for one event and connector: the target call, then the state record
//! on the topic (acknowledged), then the local store, then the result; the input offset
//! is stored only after all of them.

pub mod pending;
pub mod record;
pub mod settings;
pub mod show;
pub mod store;

/// Event versions live with the domain words (results carry them too).
pub use crate::domain::version;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::kafka::settings::KafkaSettings;
use crate::kafka::state_topic::{self, TopicFacts};
use crate::metrics::Metrics;
use crate::state::pending::PendingResult;
use crate::state::record::{StateKey, StateRecord};
use crate::state::settings::StateSettings;
use crate::state::store::{LocalStore, StoreError};
use crate::state::version::{EventVersion, Sequence};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Kafka(#[from] crate::kafka::state_topic::StateTopicError),
    #[error("the state topic `{topic}` does not exist: create it with cleanup.policy=compact and {partitions} partitions (as many as the input topic `{input}`)")]
    TopicMissing {
        topic: String,
        input: String,
        partitions: usize,
    },
    #[error("the input topic `{input}` does not exist")]
    InputMissing { input: String },
    #[error("the state topic `{topic}` has {found} partitions but the input topic `{input}` has {expected}: they must match, partition for partition")]
    PartitionMismatch {
        topic: String,
        input: String,
        found: usize,
        expected: usize,
    },
    #[error("the state topic `{topic}` has cleanup.policy={policy}; it must include `compact` (old records are otherwise deleted, and deletes forgotten)")]
    NotCompacted { topic: String, policy: String },
    #[error("the state topic `{topic}` deletes records after retention.ms={retention_ms} but the dead-letter topic `{dead_letters}` keeps them for {dead_letter_retention_ms} ms: a dead letter replayed after its user's delete was forgotten would re-create the account")]
    RetentionTooShort {
        topic: String,
        retention_ms: i64,
        dead_letters: String,
        dead_letter_retention_ms: i64,
    },
}

impl StateError {
    /// Start-up problems an operator must fix, or a broker that is not there yet.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StateError::Kafka(_))
    }
}

/// The local store's writer: takes records as they come, writes each batch in one
/// transaction, and makes them durable every few thousand writes (the topic has them
/// anyway; durability only shortens the next restore). A record leaves `pending` once
/// the store holds it, unless a newer one for the key arrived meanwhile.
fn write_behind(
    store: &LocalStore,
    pending: &Mutex<HashMap<(i32, String), StateRecord>>,
    writes: &std::sync::mpsc::Receiver<(i32, String, StateRecord)>,
) {
    const MAX_BATCH: usize = 1024;
    // A commit costs about as much as a few dozen inserts: gather what arrives in the
    // next few milliseconds into it. Lookups read the records from `pending` meanwhile.
    const GATHER: Duration = Duration::from_millis(5);
    while let Ok(first) = writes.recv() {
        let mut batch = vec![first];
        let gather_until = Instant::now() + GATHER;
        while batch.len() < MAX_BATCH {
            let remaining = gather_until.saturating_duration_since(Instant::now());
            match writes.recv_timeout(remaining) {
                Ok(write) => batch.push(write),
                Err(_) => break,
            }
        }
        let durable = store.wants_durable_commit(batch.len() as u64);
        if let Err(error) = store.put_batch(&batch, durable) {
            tracing::warn!(records = batch.len(), error = %error, "Local state store write failed; the state topic has the records, a restore brings them back.");
        }
        let mut pending = pending.lock().expect("pending lock");
        for (partition, key, record) in batch {
            let entry = (partition, key);
            if pending.get(&entry) == Some(&record) {
                pending.remove(&entry);
            }
        }
    }
}

/// What one partition's restore did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestoreReport {
    pub partition: i32,
    pub from_offset: i64,
    pub next_offset: i64,
    pub records: u64,
    pub ignored: u64,
    pub elapsed: Duration,
    /// The local store was discarded for this partition (no checkpoint, or the topic no
    /// longer holds the offsets it remembered).
    pub full: bool,
}

pub struct ProvisioningState {
    store: Arc<LocalStore>,
    /// Records acknowledged on the topic but not yet in the local store: lookups see
    /// them first, so the next event of a user reads what the last one wrote.
    pending: Arc<Mutex<HashMap<(i32, String), StateRecord>>>,
    /// The local store's writer thread (write-behind: batches, and the occasional
    /// durable commit's fsync, never block the pipeline's tasks).
    writer: Mutex<std::sync::mpsc::Sender<(i32, String, StateRecord)>>,
    /// Held while a restore reads the topic.
    read_slot: Mutex<()>,
    kafka: KafkaSettings,
    topic: String,
    epoch: u32,
    restore_timeout: Duration,
    metrics: Arc<Metrics>,
}

impl ProvisioningState {
    /// Opens the local store. Its identity is the state topic and the brokers, so a
    /// store left from another topic or cluster is discarded.
    pub fn open(
        settings: &StateSettings,
        kafka: &KafkaSettings,
        metrics: Arc<Metrics>,
    ) -> Result<ProvisioningState, StateError> {
        let identity = format!("{}@{}", settings.topic, kafka.bootstrap_servers);
        let store = Arc::new(LocalStore::open(&settings.dir, &identity)?);
        let pending = Arc::new(Mutex::new(HashMap::new()));
        let (writer, writes) = std::sync::mpsc::channel();
        let thread_store = store.clone();
        let thread_pending = pending.clone();
        std::thread::Builder::new()
            .name("state-writer".into())
            .spawn(move || write_behind(&thread_store, &thread_pending, &writes))
            .map_err(|error| StoreError::Storage(format!("cannot start the state writer: {error}")))?;
        let state = ProvisioningState {
            store,
            pending,
            writer: Mutex::new(writer),
            read_slot: Mutex::new(()),
            kafka: kafka.clone(),
            topic: settings.topic.clone(),
            epoch: settings.version_epoch,
            restore_timeout: settings.restore_timeout,
            metrics,
        };
        state.update_size_metrics();
        Ok(state)
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Refuses to run unless the state topic exists with as many partitions as the
    /// input. Fast (metadata only): done before the consumer subscribes.
    pub async fn check_partitions(&self, input: &str) -> Result<(), StateError> {
        let input_facts = state_topic::describe_topic(&self.kafka, input, false)
            .await?
            .ok_or_else(|| StateError::InputMissing { input: input.into() })?;
        let Some(facts) = state_topic::describe_topic(&self.kafka, &self.topic, false).await? else {
            return Err(StateError::TopicMissing {
                topic: self.topic.clone(),
                input: input.into(),
                partitions: input_facts.partitions,
            });
        };
        if facts.partitions != input_facts.partitions {
            return Err(StateError::PartitionMismatch {
                topic: self.topic.clone(),
                input: input.into(),
                found: facts.partitions,
                expected: input_facts.partitions,
            });
        }
        Ok(())
    }

    /// Refuses to run unless the state topic keeps its records: compacted, and with
    /// `compact,delete` a retention at least the dead-letter topic's. A broker that
    /// cannot describe topic configs (librdkafka's mock cluster) leaves this unchecked,
    /// with a warning.
    pub async fn check_configs(&self, dead_letters: &str) -> Result<(), StateError> {
        let Some(facts) = state_topic::describe_topic(&self.kafka, &self.topic, true).await? else {
            // `check_partitions` reports a missing topic, with what to create.
            return Ok(());
        };
        let TopicFacts {
            cleanup_policy,
            retention_ms,
            ..
        } = facts;
        match cleanup_policy {
            None => {
                tracing::warn!(topic = %self.topic, "The broker did not describe the state topic's configuration; cannot check that it is compacted.")
            }
            Some(policy) if !policy.split(',').any(|part| part.trim() == "compact") => {
                return Err(StateError::NotCompacted {
                    topic: self.topic.clone(),
                    policy,
                });
            }
            Some(policy) if policy.contains("delete") => {
                let dead_letter_retention = state_topic::describe_topic(&self.kafka, dead_letters, true)
                    .await?
                    .and_then(|facts| facts.retention_ms);
                if let (Some(retention_ms), Some(dead_letter_retention_ms)) = (retention_ms, dead_letter_retention) {
                    let forever = |value: i64| value < 0;
                    if !forever(retention_ms)
                        && (forever(dead_letter_retention_ms) || retention_ms < dead_letter_retention_ms)
                    {
                        return Err(StateError::RetentionTooShort {
                            topic: self.topic.clone(),
                            retention_ms,
                            dead_letters: dead_letters.into(),
                            dead_letter_retention_ms,
                        });
                    }
                }
            }
            Some(_) => {}
        }
        Ok(())
    }

    /// The version of an event read at `partition`/`offset`: its original position
    /// when it carries one (a replayed dead letter, `dead_letter::ORIGIN_HEADER`), and
    /// its `sequence` when it has one.
    pub fn event_version(
        &self,
        partition: i32,
        offset: i64,
        headers: &[(String, Vec<u8>)],
        source: &str,
        sequence: Option<&str>,
    ) -> EventVersion {
        let (partition, offset) = crate::dead_letter::origin_of(headers, partition, offset);
        EventVersion {
            epoch: self.epoch,
            partition,
            offset,
            sequence: sequence.map(|value| Sequence {
                source: source.to_string(),
                value: value.to_string(),
            }),
        }
    }

    /// The record for `key` in input partition `partition`. A store error is logged
    /// and reads as "no record" (the connector then searches the target).
    pub fn lookup(&self, partition: i32, key: &StateKey) -> Option<StateRecord> {
        let encoded = key.encode();
        if let Some(record) = self
            .pending
            .lock()
            .expect("pending lock")
            .get(&(partition, encoded.clone()))
        {
            return Some(record.clone());
        }
        match self.store.get(partition, &encoded) {
            Ok(record) => record,
            Err(error) => {
                tracing::warn!(key = %key, partition, error = %error, "Local state store lookup failed; searching the target instead.");
                None
            }
        }
    }

    /// The pending complete result stored under `key` (see [`pending`]).
    pub fn pending_result(&self, partition: i32, key: &str) -> Option<PendingResult> {
        match self.store.get_pending(partition, key) {
            Ok(Some(bytes)) => match PendingResult::decode(&bytes) {
                Ok(pending) => Some(pending),
                Err(error) => {
                    tracing::warn!(key, partition, error = %error, "Ignoring an undecodable pending result.");
                    None
                }
            },
            Ok(None) => None,
            Err(error) => {
                tracing::error!(key, partition, error = %error, "Local state store read of a pending result failed.");
                None
            }
        }
    }

    /// Stores (or, with `None`, removes) a pending result the pipeline has written to
    /// the state topic and seen acknowledged.
    pub fn remember_pending(&self, partition: i32, key: &str, pending: Option<&PendingResult>) {
        let entry = (key.to_string(), pending.map(PendingResult::encode));
        if let Err(error) = self.store.put_pending(partition, &[entry]) {
            tracing::error!(key, partition, error = %error, "Local state store write of a pending result failed; the state topic has it.");
        }
    }

    /// Stores a record the pipeline has written to the state topic and seen
    /// acknowledged. A local failure is logged: the topic has the record, and the next
    /// restore brings it back.
    pub fn remember(&self, partition: i32, key: &StateKey, record: &StateRecord) {
        self.metrics.state_writes.inc();
        // The size gauges are cheap to read (redb keeps the count) but not free: refresh
        // them every thousand writes.
        if self.metrics.state_writes.get().is_multiple_of(1000) {
            self.update_size_metrics();
        }
        let encoded = key.encode();
        self.pending
            .lock()
            .expect("pending lock")
            .insert((partition, encoded.clone()), record.clone());
        if self
            .writer
            .lock()
            .expect("writer lock")
            .send((partition, encoded, record.clone()))
            .is_err()
        {
            tracing::warn!(key = %key, partition, "The local state writer stopped; the state topic has the record.");
        }
    }

    /// Brings the local store up to date with the state topic's `partition`, from the
    /// store's checkpoint (or from the start). Blocking: run it on a blocking task.
    pub fn restore(&self, partition: i32) -> Result<RestoreReport, StateError> {
        let started = Instant::now();
        let result = self.restore_inner(partition, started);
        let label = if result.is_ok() { "ok" } else { "error" };
        self.metrics
            .state_restore_duration
            .with_label_values(&[label])
            .observe(started.elapsed().as_secs_f64());
        self.update_size_metrics();
        result
    }

    fn restore_inner(&self, partition: i32, started: Instant) -> Result<RestoreReport, StateError> {
        let (low, high) = state_topic::watermarks(&self.kafka, &self.topic, partition)?;
        let checkpoint = self.store.checkpoint(partition)?;
        // A checkpoint past the end means the topic was re-created: start over. One
        // before the low watermark reads from the low watermark (records were deleted
        // by retention, which the start-up check allows only beyond the DLQ's).
        let full = !matches!(checkpoint, Some(offset) if offset <= high);
        if full {
            self.store.clear_partition(partition)?;
        }
        let from = if full { low } else { checkpoint.unwrap_or(low) };
        if from >= high {
            // Nothing new on the topic: no reader, no wait for the read slot.
            self.store.set_checkpoint(partition, high)?;
            return Ok(RestoreReport {
                partition,
                from_offset: from,
                next_offset: high,
                records: 0,
                ignored: 0,
                elapsed: started.elapsed(),
                full,
            });
        }
        // One partition is read at a time: each reader holds fetch buffers, and they all
        // write to the one local store, so more at once add memory, not speed.
        let _slot = self.read_slot.lock().expect("restore read slot");
        let mut ignored = 0;
        let mut failure = None;
        let end = state_topic::read_partition(
            &self.kafka,
            &self.topic,
            partition,
            from,
            self.restore_timeout,
            |batch| {
                if failure.is_some() {
                    return;
                }
                let mut records = Vec::with_capacity(batch.len());
                let mut pending = Vec::new();
                for entry in batch {
                    let key = entry.key.as_deref().map(String::from_utf8_lossy).unwrap_or_default();
                    if key.starts_with(pending::PENDING_KEY_PREFIX) {
                        // Pending results: the last write wins; a tombstone removes one.
                        pending.push((key.into_owned(), entry.value.clone()));
                        continue;
                    }
                    let decoded = entry
                        .value
                        .as_deref()
                        .ok_or_else(|| "no value (a tombstone)".to_string())
                        .and_then(|value| StateRecord::decode(value).map_err(|error| error.to_string()));
                    match (StateKey::decode(&key), decoded) {
                        (Some(_), Ok(record)) => records.push((key.into_owned(), record)),
                        (_, result) => {
                            ignored += 1;
                            let reason = result
                                .err()
                                .unwrap_or_else(|| "the key is not <connector>:<tenant>/<user>".into());
                            tracing::warn!(key = %key, partition, offset = entry.offset, reason = %reason, "Ignoring an undecodable state record.");
                        }
                    }
                }
                if let Err(error) = self
                    .store
                    .restore_batch(partition, &records)
                    .and_then(|()| self.store.put_pending(partition, &pending))
                {
                    failure = Some(error);
                }
            },
        )?;
        if let Some(error) = failure {
            return Err(error.into());
        }
        self.store.set_checkpoint(partition, end.next_offset)?;
        self.metrics.state_records_restored.inc_by(end.records);
        self.metrics.state_records_ignored.inc_by(ignored);
        Ok(RestoreReport {
            partition,
            from_offset: from,
            next_offset: end.next_offset,
            records: end.records,
            ignored,
            elapsed: started.elapsed(),
            full,
        })
    }

    fn update_size_metrics(&self) {
        if let Ok(records) = self.store.len() {
            self.metrics.state_store_records.set(records as i64);
        }
        self.metrics.state_store_bytes.set(self.store.file_bytes() as i64);
    }
}
