//! The provisioning-state topic: reading a partition back for a restore, and checking at
//! start-up that the topic can be the source of truth (compacted, partitioned like the
//! input). Blocking calls: run them from a blocking task. [`describe_topic`] also serves
//! the start-up check of the dead-letter topic's `max.message.bytes` (`app.rs`).

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::kafka::base_client_config;
use crate::kafka::settings::KafkaSettings;

const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// A state-topic operation failed. The broker may come back: always retryable.
#[derive(Debug, thiserror::Error)]
#[error("Kafka: {0}")]
pub struct StateTopicError(#[from] KafkaError);

impl StateTopicError {
    pub fn is_retryable(&self) -> bool {
        true
    }
}

/// A topic's partition count and the configs that matter for the state and for the
/// size of dead letters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicFacts {
    pub partitions: usize,
    pub cleanup_policy: Option<String>,
    pub retention_ms: Option<i64>,
    pub max_message_bytes: Option<i64>,
}

/// Partition count and (with `configs`) the configs of `topic`; `Ok(None)` when it
/// does not exist.
pub async fn describe_topic(
    settings: &KafkaSettings,
    topic: &str,
    configs: bool,
) -> Result<Option<TopicFacts>, StateTopicError> {
    let admin: AdminClient<DefaultClientContext> = base_client_config(settings).create()?;
    let partitions = {
        let name = topic.to_string();
        let consumer: BaseConsumer = base_client_config(settings).create()?;
        tokio::task::spawn_blocking(move || -> Result<usize, KafkaError> {
            let metadata = consumer.fetch_metadata(Some(&name), METADATA_TIMEOUT)?;
            Ok(metadata
                .topics()
                .iter()
                .find(|found| found.name() == name && found.error().is_none())
                .map(|found| found.partitions().len())
                .unwrap_or(0))
        })
        .await
        .expect("metadata task")?
    };
    if partitions == 0 {
        return Ok(None);
    }
    if !configs {
        return Ok(Some(TopicFacts {
            partitions,
            cleanup_policy: None,
            retention_ms: None,
            max_message_bytes: None,
        }));
    }
    // A broker that cannot describe configs (librdkafka's mock cluster) leaves them
    // unknown; the caller decides what unknown means.
    let asked = std::time::Instant::now();
    let described = admin
        .describe_configs(
            &[ResourceSpecifier::Topic(topic)],
            &AdminOptions::new().request_timeout(Some(METADATA_TIMEOUT)),
        )
        .await
        .unwrap_or_else(|error| {
            tracing::debug!(topic, error = %error, elapsed_ms = asked.elapsed().as_millis() as u64, "DescribeConfigs failed.");
            Vec::new()
        });
    tracing::debug!(
        topic,
        elapsed_ms = asked.elapsed().as_millis() as u64,
        "DescribeConfigs answered."
    );
    let mut facts = TopicFacts {
        partitions,
        cleanup_policy: None,
        retention_ms: None,
        max_message_bytes: None,
    };
    if let Some(Ok(resource)) = described.into_iter().next() {
        let value = |name: &str| resource.get(name).and_then(|entry| entry.value.clone());
        facts.cleanup_policy = value("cleanup.policy");
        facts.retention_ms = value("retention.ms").and_then(|value| value.parse().ok());
        facts.max_message_bytes = value("max.message.bytes").and_then(|value| value.parse().ok());
    }
    Ok(Some(facts))
}

/// How many partitions `topic` has (0 when it does not exist). Blocking.
pub fn partition_count(settings: &KafkaSettings, topic: &str) -> Result<i32, StateTopicError> {
    let consumer: BaseConsumer = base_client_config(settings).create()?;
    let metadata = consumer.fetch_metadata(Some(topic), METADATA_TIMEOUT)?;
    Ok(metadata
        .topics()
        .iter()
        .find(|found| found.name() == topic && found.error().is_none())
        .map(|found| found.partitions().len() as i32)
        .unwrap_or(0))
}

/// The restore reader's client context: reaching the end of a partition is how a
/// restore knows it is done, not an error worth logging (librdkafka reports it through
/// the client's error callback as well).
struct RestoreContext;

impl rdkafka::ClientContext for RestoreContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if !matches!(error, KafkaError::PartitionEOF(_)) {
            tracing::warn!(error = %error, reason, "State topic reader error.");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for RestoreContext {}

/// One record read back from the state topic.
pub struct StateTopicRecord {
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
}

/// What a partition read found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadEnd {
    /// The partition's high watermark when the read began: the next restore starts here.
    pub next_offset: i64,
    /// The partition's low watermark.
    pub low: i64,
    pub records: u64,
}

/// The watermarks of one partition of `topic`.
pub fn watermarks(settings: &KafkaSettings, topic: &str, partition: i32) -> Result<(i64, i64), StateTopicError> {
    let consumer: BaseConsumer = base_client_config(settings).create()?;
    Ok(consumer.fetch_watermarks(topic, partition, METADATA_TIMEOUT)?)
}

/// Reads `partition` of `topic` from `from` (clamped to the low watermark) to the high
/// watermark it had when the read began, handing records over in batches. Blocking.
pub fn read_partition(
    settings: &KafkaSettings,
    topic: &str,
    partition: i32,
    from: i64,
    timeout: Duration,
    mut on_batch: impl FnMut(Vec<StateTopicRecord>),
) -> Result<ReadEnd, StateTopicError> {
    let consumer: BaseConsumer<RestoreContext> = base_client_config(settings)
        .set("group.id", "provisioner-state-restore")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        // Small prefetch: several partitions restore at once, and librdkafka's default
        // (64 MiB queued per consumer) would be most of the memory budget.
        .set("queued.max.messages.kbytes", "4096")
        .set("fetch.max.bytes", "2097152")
        .set("max.partition.fetch.bytes", "2097152")
        .set("fetch.wait.max.ms", "10")
        .create_with_context(RestoreContext)?;
    let (low, high) = consumer.fetch_watermarks(topic, partition, METADATA_TIMEOUT)?;
    let start = from.max(low);
    let mut end = ReadEnd {
        next_offset: high,
        low,
        records: 0,
    };
    if start >= high {
        return Ok(end);
    }
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, partition, Offset::Offset(start))?;
    consumer.assign(&assignment)?;
    let deadline = Instant::now() + timeout;
    let mut batch = Vec::with_capacity(1024);
    loop {
        if Instant::now() > deadline {
            return Err(KafkaError::MessageConsumption(RDKafkaErrorCode::OperationTimedOut).into());
        }
        let Some(polled) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = match polled {
            Ok(message) => message,
            // The end is where the fetch position reaches the high watermark taken at the
            // start. An end-of-partition event before that (some brokers report one per
            // fetch that comes back empty) does not end the read.
            Err(KafkaError::PartitionEOF(_)) => {
                let position = consumer
                    .position()?
                    .find_partition(topic, partition)
                    .and_then(|element| match element.offset() {
                        Offset::Offset(offset) => Some(offset),
                        _ => None,
                    });
                if position.is_some_and(|position| position >= high) {
                    break;
                }
                continue;
            }
            Err(error) => return Err(error.into()),
        };
        let offset = message.offset();
        if offset >= high {
            break;
        }
        batch.push(StateTopicRecord {
            offset,
            key: message.key().map(<[u8]>::to_vec),
            value: message.payload().map(<[u8]>::to_vec),
        });
        end.records += 1;
        if batch.len() >= 1024 {
            on_batch(std::mem::take(&mut batch));
        }
        if offset + 1 >= high {
            break;
        }
    }
    if !batch.is_empty() {
        on_batch(batch);
    }
    Ok(end)
}
