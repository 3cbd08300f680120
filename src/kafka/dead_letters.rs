//! `provisioner dlq replay`: re-publishing chosen dead letters to the event topic.
//!
//! The dead-letter topic is read from its start to the end it had when the command
//! began (so a replay that fails again cannot loop), without a consumer group. A chosen
//! record goes back with its original key, value and headers (the `x-provisioner-*`
//! diagnosis headers removed) to the topic **and partition** it came from, with its
//! original position in `x-provisioner-origin`: it is judged by when it first happened
//! (a replayed create older than the user's delete is `stale`), and the provisioning
//! state of its user is on that partition.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};

use crate::dead_letter::{
    format_origin, parse_origin, HEADER_PREFIX, ORIGIN_HEADER, REASON_HEADER, SOURCE_OFFSET_HEADER,
    SOURCE_PARTITION_HEADER, SOURCE_TOPIC_HEADER,
};
use crate::kafka::base_client_config;
use crate::kafka::settings::KafkaSettings;

/// Which dead letters to replay. Empty criteria select nothing: `all` must be explicit.
#[derive(Debug, Clone, Default)]
pub struct ReplaySelection {
    pub all: bool,
    /// Only dead letters with this reason code (e.g. `connector_failed`).
    pub reason: Option<String>,
    /// Only dead letters of these CloudEvents ids.
    pub event_ids: Vec<String>,
    /// Stop after this many.
    pub limit: Option<usize>,
}

impl ReplaySelection {
    fn is_empty(&self) -> bool {
        !self.all && self.reason.is_none() && self.event_ids.is_empty()
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReplayReport {
    pub scanned: usize,
    pub replayed: usize,
    /// The CloudEvents ids re-published, to follow their results.
    pub event_ids: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("choose what to replay: --all, --reason or --event-id")]
    NothingSelected,
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("reading the dead-letter topic failed: {0}")]
    Scan(String),
}

impl ReplayError {
    pub fn is_retryable(&self) -> bool {
        match self {
            ReplayError::NothingSelected => false,
            ReplayError::Kafka(_) | ReplayError::Scan(_) => true,
        }
    }
}

/// Replays the selected dead letters; with `dry_run`, only counts them.
pub async fn replay(
    settings: &KafkaSettings,
    selection: &ReplaySelection,
    dry_run: bool,
) -> Result<ReplayReport, ReplayError> {
    if selection.is_empty() {
        return Err(ReplayError::NothingSelected);
    }
    // The dead-letter topic is read with librdkafka's blocking poll, on a blocking
    // thread; chosen records come over a bounded channel and are produced here.
    let (chosen, mut to_replay) = tokio::sync::mpsc::channel::<Chosen>(256);
    let scan_settings = settings.clone();
    let scan_selection = selection.clone();
    let scanner = tokio::task::spawn_blocking(move || scan(&scan_settings, &scan_selection, &chosen));
    let producer: FutureProducer = base_client_config(settings)
        .set("enable.idempotence", "true")
        .create()?;
    let mut report = ReplayReport::default();
    while let Some(found) = to_replay.recv().await {
        report.replayed += 1;
        if dry_run {
            continue;
        }
        let headers = &found.headers;
        let source_topic = header(headers, SOURCE_TOPIC_HEADER)
            .filter(|source| settings.event_topics.contains(source))
            .unwrap_or_else(|| settings.event_topics[0].clone());
        // The event goes back to the partition it first came from, where its user's
        // provisioning state lives (the default partitioner of this client may hash its
        // key elsewhere), and carries that position, its version, with it.
        let source = header(headers, SOURCE_PARTITION_HEADER)
            .and_then(|partition| partition.parse::<i32>().ok())
            .zip(header(headers, SOURCE_OFFSET_HEADER).and_then(|offset| offset.parse::<i64>().ok()));
        let origin = headers
            .iter()
            .rev()
            .find(|(name, _)| name == ORIGIN_HEADER)
            .and_then(|(_, value)| parse_origin(value))
            .or(source);
        let origin_text = origin.map(|(partition, offset)| format_origin(partition, offset));
        let mut original_headers = headers
            .iter()
            .filter(|(name, _)| !name.starts_with(HEADER_PREFIX))
            .fold(OwnedHeaders::new(), |owned, (name, value)| {
                owned.insert(Header {
                    key: name,
                    value: Some(value),
                })
            });
        if let Some(origin_text) = &origin_text {
            original_headers = original_headers.insert(Header {
                key: ORIGIN_HEADER,
                value: Some(origin_text.as_bytes()),
            });
        }
        let mut record = FutureRecord::to(&source_topic)
            .payload(found.payload.as_deref().unwrap_or_default())
            .headers(original_headers);
        if let Some(key) = &found.key {
            record = record.key(key);
        }
        if let Some((partition, _)) = origin {
            record = record.partition(partition);
        }
        if let Some(event_id) = event_id(headers, found.payload.as_deref()) {
            report.event_ids.push(event_id);
        }
        producer
            .send(record, Timeout::After(Duration::from_secs(30)))
            .await
            .map_err(|(error, _)| ReplayError::Kafka(error))?;
    }
    report.scanned = scanner.await.map_err(|error| ReplayError::Scan(error.to_string()))??;
    Ok(report)
}

/// A dead letter chosen for replay, detached from librdkafka's buffers.
struct Chosen {
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    headers: Vec<(String, Vec<u8>)>,
}

/// Reads the dead-letter topic from its start to the end it had when the scan began,
/// handing over the chosen records (up to the selection's limit). Returns how many were
/// scanned. Blocking.
fn scan(
    settings: &KafkaSettings,
    selection: &ReplaySelection,
    chosen: &tokio::sync::mpsc::Sender<Chosen>,
) -> Result<usize, ReplayError> {
    let topic = settings.dead_letter_topic.clone();
    let consumer: BaseConsumer = base_client_config(settings)
        .set("group.id", format!("provisioner-dlq-replay-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
    let mut assignment = TopicPartitionList::new();
    let mut ends = Vec::new();
    for partition in metadata
        .topics()
        .iter()
        .filter(|found| found.name() == topic)
        .flat_map(|found| found.partitions().iter().map(|partition| partition.id()))
    {
        let (low, high) = consumer.fetch_watermarks(&topic, partition, Duration::from_secs(10))?;
        if high > low {
            assignment.add_partition_offset(&topic, partition, Offset::Offset(low))?;
            ends.push((partition, high));
        }
    }
    consumer.assign(&assignment)?;
    let mut scanned = 0;
    let mut handed_over = 0;
    let mut open_partitions = ends.clone();
    while !open_partitions.is_empty() {
        let Some(polled) = consumer.poll(Duration::from_secs(10)) else {
            break;
        };
        let message = polled?;
        if let Some(index) = open_partitions
            .iter()
            .position(|(partition, end)| *partition == message.partition() && message.offset() + 1 >= *end)
        {
            open_partitions.remove(index);
        }
        if ends
            .iter()
            .any(|(partition, end)| *partition == message.partition() && message.offset() >= *end)
        {
            continue;
        }
        scanned += 1;
        let headers: Vec<(String, Vec<u8>)> = message
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .map(|header| (header.key.to_string(), header.value.unwrap_or_default().to_vec()))
                    .collect()
            })
            .unwrap_or_default();
        if !selected(selection, &headers, message.payload()) {
            continue;
        }
        if selection.limit.is_some_and(|limit| handed_over >= limit) {
            break;
        }
        handed_over += 1;
        let found = Chosen {
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            headers,
        };
        if chosen.blocking_send(found).is_err() {
            // The producing side stopped (a produce failed): its error is the report.
            break;
        }
    }
    Ok(scanned)
}

fn header(headers: &[(String, Vec<u8>)], name: &str) -> Option<String> {
    headers
        .iter()
        .rev()
        .find(|(header, _)| header == name)
        .map(|(_, value)| String::from_utf8_lossy(value).into_owned())
}

fn selected(selection: &ReplaySelection, headers: &[(String, Vec<u8>)], payload: Option<&[u8]>) -> bool {
    if let Some(reason) = &selection.reason {
        if header(headers, REASON_HEADER).as_deref() != Some(reason.as_str()) {
            return false;
        }
    }
    if !selection.event_ids.is_empty()
        && !event_id(headers, payload).is_some_and(|id| selection.event_ids.contains(&id))
    {
        return false;
    }
    true
}

/// The CloudEvents id: the `ce_id` header (binary mode) or the payload's `id`.
fn event_id(headers: &[(String, Vec<u8>)], payload: Option<&[u8]>) -> Option<String> {
    header(headers, "ce_id").or_else(|| {
        payload
            .and_then(|payload| serde_json::from_slice::<serde_json::Value>(payload).ok())
            .and_then(|document| document.get("id").and_then(|id| id.as_str()).map(str::to_string))
    })
}

/// What became of replayed events, read from the results topic.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReplayOutcomes {
    /// Replayed events whose complete result arrived.
    pub processed: usize,
    /// Of those, events that some connector found stale (a newer event had been applied).
    pub stale: usize,
    /// Of those, events some connector failed on again.
    pub failed: usize,
}

/// The results topic's end offsets now: where a later [`await_outcomes`] starts reading.
pub fn results_end(settings: &KafkaSettings) -> Result<Vec<(i32, i64)>, KafkaError> {
    let consumer: BaseConsumer = base_client_config(settings).create()?;
    let topic = &settings.results_topic;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut ends = Vec::new();
    for partition in metadata
        .topics()
        .iter()
        .filter(|found| found.name() == topic.as_str())
        .flat_map(|found| found.partitions().iter().map(|partition| partition.id()))
    {
        let (_, high) = consumer.fetch_watermarks(topic, partition, Duration::from_secs(10))?;
        ends.push((partition, high));
    }
    Ok(ends)
}

/// Reads the results topic from `from` until every id in `event_ids` has a complete
/// result, or `timeout` passes. Blocking.
pub fn await_outcomes(
    settings: &KafkaSettings,
    from: &[(i32, i64)],
    event_ids: &[String],
    timeout: Duration,
) -> Result<ReplayOutcomes, KafkaError> {
    let mut outcomes = ReplayOutcomes::default();
    if event_ids.is_empty() || from.is_empty() {
        return Ok(outcomes);
    }
    let consumer: BaseConsumer = base_client_config(settings)
        .set("group.id", format!("provisioner-dlq-replay-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .create()?;
    let mut assignment = TopicPartitionList::new();
    for (partition, offset) in from {
        assignment.add_partition_offset(&settings.results_topic, *partition, Offset::Offset(*offset))?;
    }
    consumer.assign(&assignment)?;
    let mut waiting: std::collections::HashSet<&str> = event_ids.iter().map(String::as_str).collect();
    let deadline = std::time::Instant::now() + timeout;
    while !waiting.is_empty() && std::time::Instant::now() < deadline {
        let Some(polled) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = polled?;
        let Some(result) = message
            .payload()
            .and_then(|payload| serde_json::from_slice::<serde_json::Value>(payload).ok())
        else {
            continue;
        };
        let Some(id) = result.get("event_id").and_then(|id| id.as_str()) else {
            continue;
        };
        if !waiting.remove(id) {
            continue;
        }
        outcomes.processed += 1;
        let outcomes_of = |wanted: &str| {
            result["results"]
                .as_array()
                .is_some_and(|results| results.iter().any(|entry| entry["outcome"] == wanted))
        };
        if outcomes_of("stale") {
            outcomes.stale += 1;
        }
        if outcomes_of("failed") {
            outcomes.failed += 1;
        }
    }
    Ok(outcomes)
}
