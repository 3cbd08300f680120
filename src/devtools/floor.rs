//! The benchmark's floor: the input/output each event needs, and nothing else.
//!
//! `bench --floor` runs this in place of the service, on the same broker, topics,
//! emulator and client settings, to show how much of the service's CPU per event and
//! latency overhead is the price of the parts it is built from (librdkafka, tokio,
//! hyper/reqwest, loopback TCP on a shared machine) rather than of its own work. Per
//! event it does what any at-least-once provisioner must: read the record, one HTTP
//! call to the target, write a state record and wait for its acknowledgement, write
//! the result and wait for it, and store the input offset once everything below it is
//! done. It keeps no provisioning state, decides nothing (a delete is sent by the
//! user's id, which the emulator answers 404), and retries nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{mpsc, Semaphore};

use crate::event::EventType;
use crate::result::{ConnectorResult, Operation, Outcome, ProvisioningResult, ResultScope, Status};

/// Where the floor reads, calls and writes: what the bench also gives the service.
#[derive(Debug, Clone, clap::Args)]
pub struct FloorOptions {
    #[arg(long)]
    pub bootstrap: String,
    #[arg(long)]
    pub group_id: String,
    #[arg(long)]
    pub input_topic: String,
    #[arg(long)]
    pub state_topic: String,
    #[arg(long)]
    pub results_topic: String,
    /// The SCIM base URL (`…/scim/v2`).
    #[arg(long)]
    pub scim_url: String,
    #[arg(long, default_value = "1ms", value_parser = humantime::parse_duration)]
    pub fetch_wait: Duration,
    /// Events in flight at once (the service's `pipeline.max_in_flight`).
    #[arg(long, default_value_t = 1024)]
    pub max_in_flight: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum FloorError {
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("HTTP client: {0}")]
    Http(#[from] reqwest::Error),
}

/// The fields of an event the floor uses, borrowed from the payload.
#[derive(Deserialize)]
struct FloorEvent<'a> {
    #[serde(borrow)]
    id: std::borrow::Cow<'a, str>,
    #[serde(rename = "type", borrow)]
    event_type: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    data: FloorData<'a>,
}

#[derive(Deserialize)]
struct FloorData<'a> {
    #[serde(borrow)]
    tenant: std::borrow::Cow<'a, str>,
    user: serde_json::Value,
}

/// Runs until SIGTERM or Ctrl-C, then commits what is stored and returns.
pub async fn run(options: FloorOptions) -> Result<(), FloorError> {
    // The service's own client settings (kafka/consumer.rs, kafka/producer.rs,
    // connectors/http.rs), so that the difference is the service's work.
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &options.bootstrap)
        .set("group.id", &options.group_id)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("queued.max.messages.kbytes", "4096")
        .set("fetch.wait.max.ms", options.fetch_wait.as_millis().max(1).to_string())
        .create()?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &options.bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "0")
        .set("compression.type", "lz4")
        .create()?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_idle_timeout(Duration::from_secs(60))
        .tcp_nodelay(true)
        .redirect(reqwest::redirect::Policy::none())
        .retry(reqwest::retry::never())
        .build()?;
    consumer.subscribe(&[options.input_topic.as_str()])?;

    let permits = Arc::new(Semaphore::new(options.max_in_flight));
    let (done_sender, mut done_receiver) = mpsc::unbounded_channel::<(i32, i64)>();
    let mut watermarks = Watermarks::default();
    let context = Arc::new(FloorContext {
        http,
        producer,
        options: options.clone(),
    });
    let stop = crate::shutdown::on_signal();
    // A permit is taken before a record is read: at most `max_in_flight` events at once.
    let mut permit = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            Some((partition, offset)) = done_receiver.recv() => {
                if let Some(next) = watermarks.finished(partition, offset) {
                    let mut list = TopicPartitionList::new();
                    list.add_partition_offset(&options.input_topic, partition, Offset::Offset(next))?;
                    consumer.store_offsets(&list)?;
                }
            }
            acquired = permits.clone().acquire_owned(), if permit.is_none() => {
                permit = Some(acquired.expect("the semaphore is never closed"));
            }
            received = consumer.recv(), if permit.is_some() => {
                // librdkafka reports transient errors (a connection dropped) here and
                // recovers by itself, as the service treats them.
                let message = match received {
                    Ok(message) => message,
                    Err(error) => {
                        eprintln!("bench-floor: {error}");
                        continue;
                    }
                };
                let (partition, offset) = (message.partition(), message.offset());
                watermarks.read(partition, offset);
                let payload = message.payload().map(<[u8]>::to_vec).unwrap_or_default();
                let context = context.clone();
                let done = done_sender.clone();
                let permit = permit.take();
                tokio::spawn(async move {
                    context.process(&payload).await;
                    drop(permit);
                    let _ = done.send((partition, offset));
                });
            }
        }
    }
    let _ = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync);
    Ok(())
}

/// Per partition, the offsets read and not yet below the watermark, and which of them
/// are finished: an offset is stored only when everything before it is done.
#[derive(Default)]
struct Watermarks {
    partitions: BTreeMap<i32, (BTreeSet<i64>, BTreeSet<i64>)>,
}

impl Watermarks {
    fn read(&mut self, partition: i32, offset: i64) {
        self.partitions.entry(partition).or_default().0.insert(offset);
    }

    /// Marks `offset` done; returns the offset to store when the watermark moved.
    fn finished(&mut self, partition: i32, offset: i64) -> Option<i64> {
        let (read, finished) = self.partitions.entry(partition).or_default();
        finished.insert(offset);
        let mut watermark = None;
        while let (Some(&oldest), Some(&first_done)) = (read.first(), finished.first()) {
            if oldest != first_done {
                break;
            }
            read.pop_first();
            finished.pop_first();
            watermark = Some(oldest + 1);
        }
        watermark
    }
}

struct FloorContext {
    http: reqwest::Client,
    producer: FutureProducer,
    options: FloorOptions,
}

impl FloorContext {
    /// One event: the call, the state record, the result. A failure is written as a
    /// failed result: the floor measures cost, not correctness.
    async fn process(&self, payload: &[u8]) {
        let received_at = Utc::now();
        let Ok(event) = serde_json::from_slice::<FloorEvent<'_>>(payload) else {
            return;
        };
        let user_id = event.data.user["id"].as_str().unwrap_or_default().to_string();
        let user_name = event.data.user["userName"].as_str().unwrap_or_default().to_string();
        let (event_type, operation) = match event.event_type.as_ref() {
            "user.deleted" => (EventType::UserDeleted, Operation::Delete),
            _ => (EventType::UserCreated, Operation::Create),
        };
        let started_at = Utc::now();
        let users = format!("{}/Users", self.options.scim_url.trim_end_matches('/'));
        let request = match operation {
            Operation::Delete => self.http.delete(format!("{users}/{user_id}")),
            _ => self.http.post(users).json(&json!({
                "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
                "userName": user_name,
                "externalId": user_id,
                "name": event.data.user["name"],
                "emails": event.data.user["emails"],
            })),
        };
        let (outcome, remote_id) = match request.send().await {
            Ok(response) if response.status().is_success() => {
                let body: serde_json::Value = response.json().await.unwrap_or_default();
                let outcome = match operation {
                    Operation::Delete => Outcome::Deleted,
                    _ => Outcome::Created,
                };
                (outcome, body["id"].as_str().map(str::to_string))
            }
            // What the emulator says to a delete by the user's id (the floor keeps no
            // remote ids): the same round trip.
            Ok(response) if response.status() == reqwest::StatusCode::NOT_FOUND => (Outcome::AlreadyAbsent, None),
            Ok(_) | Err(_) => (Outcome::Failed, None),
        };
        let finished_at = Utc::now();
        let key = format!("{}/{user_id}/directory", event.data.tenant);
        let state = json!({
            "schema": 1, "version": {"offset": 0, "event_id": event.id}, "account": "active",
            "remote_id": remote_id, "event_id": event.id, "updated_at": finished_at,
        });
        let state = serde_json::to_vec(&state).expect("JSON");
        if self
            .producer
            .send(
                FutureRecord::to(&self.options.state_topic).key(&key).payload(&state),
                Timeout::After(Duration::from_secs(30)),
            )
            .await
            .is_err()
        {
            return;
        }
        let results = vec![ConnectorResult {
            remote_id,
            attempts: 1,
            started_at,
            finished_at,
            ..ConnectorResult::without_call("directory", operation, outcome, true)
        }];
        let result = ProvisioningResult {
            correlation_id: None,
            event_id: event.id.to_string(),
            event_type: Some(event_type),
            tenant: event.data.tenant.to_string(),
            user_id: user_id.clone(),
            group_id: None,
            status: Status::from_results(&results),
            scope: ResultScope::Complete,
            reason: None,
            results,
            version: None,
            received_at,
            completed_at: Utc::now(),
        };
        let result = serde_json::to_vec(&result).expect("JSON");
        let _ = self
            .producer
            .send(
                FutureRecord::to(&self.options.results_topic)
                    .key(&format!("{}/{user_id}", event.data.tenant))
                    .payload(&result),
                Timeout::After(Duration::from_secs(30)),
            )
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::Watermarks;

    #[test]
    fn the_watermark_waits_for_the_oldest_unfinished_offset() {
        let mut watermarks = Watermarks::default();
        for offset in 10..14 {
            watermarks.read(0, offset);
        }
        watermarks.read(1, 5);
        assert_eq!(watermarks.finished(0, 12), None);
        assert_eq!(watermarks.finished(0, 11), None);
        assert_eq!(watermarks.finished(1, 5), Some(6));
        assert_eq!(watermarks.finished(0, 10), Some(13));
        assert_eq!(watermarks.finished(0, 13), Some(14));
    }
}
