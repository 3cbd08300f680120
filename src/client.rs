//! The blocking caller's side: publish an event with a fresh correlation id and wait
//! for the matching reply.
//!
//! One [`Client`] serves many concurrent waits (a sign-up flow handling several users at
//! once): a background task reads the reply topic and hands each reply to the waiter
//! registered for its correlation id. Reading starts at the reply topic's end as it was
//! when the client was created, so a reply cannot be missed between publish and wait.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::oneshot;

use crate::event::{self, DecodeError, Event, CORRELATION_ID_HEADER, REPLY_TO_HEADER};
use crate::kafka::base_client_config;
use crate::kafka::settings::KafkaSettings;
use crate::result::ProvisioningResult;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the event is invalid: {0}")]
    InvalidEvent(#[from] DecodeError),
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("no reply for correlation id {correlation_id} within {waited:?}")]
    Timeout { correlation_id: String, waited: Duration },
    #[error("the reply reader stopped")]
    ReaderStopped,
}

impl ClientError {
    /// A timeout or a Kafka hiccup may succeed if tried again; a bad event will not.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Kafka(_) | ClientError::Timeout { .. } | ClientError::ReaderStopped => true,
            ClientError::InvalidEvent(_) => false,
        }
    }
}

type Waiters = Arc<Mutex<HashMap<String, oneshot::Sender<ProvisioningResult>>>>;

pub struct Client {
    producer: FutureProducer,
    event_topic: String,
    reply_topic: String,
    max_event_bytes: usize,
    waiters: Waiters,
    reader: tokio::task::JoinHandle<()>,
}

impl Client {
    /// Connects to the cluster in `settings`, publishing to its first event topic and
    /// waiting on its reply topic.
    pub async fn connect(settings: &KafkaSettings) -> Result<Client, ClientError> {
        let producer: FutureProducer = base_client_config(settings)
            .set("enable.idempotence", "true")
            .set("linger.ms", "0")
            // The Java client's partitioner (murmur2), as identity platforms on the JVM
            // use and as `groups.user_partitioner` assumes by default: a user's events
            // and memberships meet on one partition.
            .set("partitioner", "murmur2_random")
            .create()?;
        let reply_topic = settings.reply_topic.clone();
        let consumer: StreamConsumer = base_client_config(settings)
            .set("group.id", format!("provisioner-client-{}", uuid::Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "10")
            .create()?;
        let start = {
            let topic = reply_topic.clone();
            let probe: BaseConsumer = base_client_config(settings).create()?;
            tokio::task::spawn_blocking(move || reply_topic_end(&probe, &topic))
                .await
                .map_err(|_| ClientError::ReaderStopped)??
        };
        consumer.assign(&start)?;
        let waiters: Waiters = Arc::default();
        let reader = tokio::spawn(read_replies(consumer, waiters.clone()));
        Ok(Client {
            producer,
            event_topic: settings.event_topics.first().cloned().unwrap_or_default(),
            reply_topic,
            max_event_bytes: 1024 * 1024,
            waiters,
            reader,
        })
    }

    /// Validates and publishes `event_json` (a structured CloudEvent) as a blocking
    /// caller, and waits up to `timeout` for the reply.
    pub async fn send_and_wait(&self, event_json: &[u8], timeout: Duration) -> Result<ProvisioningResult, ClientError> {
        self.publish_for_reply(event_json).await?.wait(timeout).await
    }

    /// Publishes as a blocking caller and returns once the broker has the event; the
    /// reply is awaited separately, so a caller can keep publishing in order meanwhile.
    pub async fn publish_for_reply(&self, event_json: &[u8]) -> Result<PendingReply, ClientError> {
        let event = event::decode(Some(event_json), &[], self.max_event_bytes)?;
        let correlation_id = uuid::Uuid::new_v4().to_string();
        let (sender, receiver) = oneshot::channel();
        self.waiters
            .lock()
            .expect("waiters lock")
            .insert(correlation_id.clone(), sender);
        if let Err(error) = self.publish(&event, event_json, Some(&correlation_id)).await {
            self.waiters.lock().expect("waiters lock").remove(&correlation_id);
            return Err(error);
        }
        Ok(PendingReply {
            correlation_id,
            receiver,
            waiters: self.waiters.clone(),
        })
    }

    /// Validates and publishes `event_json` without waiting. Returns the event id.
    pub async fn send(&self, event_json: &[u8]) -> Result<String, ClientError> {
        let event = event::decode(Some(event_json), &[], self.max_event_bytes)?;
        self.publish(&event, event_json, None).await?;
        Ok(event.id().to_string())
    }

    async fn publish(&self, event: &Event, event_json: &[u8], correlation_id: Option<&str>) -> Result<(), ClientError> {
        let mut headers = OwnedHeaders::new().insert(Header {
            key: "content-type",
            value: Some("application/cloudevents+json"),
        });
        if let Some(correlation_id) = correlation_id {
            headers = headers
                .insert(Header {
                    key: CORRELATION_ID_HEADER,
                    value: Some(correlation_id),
                })
                .insert(Header {
                    key: REPLY_TO_HEADER,
                    value: Some(self.reply_topic.as_str()),
                });
        }
        let key = event.key();
        self.producer
            .send(
                FutureRecord::to(&self.event_topic)
                    .key(&key)
                    .payload(event_json)
                    .headers(headers),
                Timeout::After(Duration::from_secs(30)),
            )
            .await
            .map(|_| ())
            .map_err(|(error, _)| ClientError::Kafka(error))
    }
}

/// A published blocking event whose reply has not been awaited yet.
pub struct PendingReply {
    pub correlation_id: String,
    receiver: oneshot::Receiver<ProvisioningResult>,
    waiters: Waiters,
}

impl Client {
    /// Callers waiting for a reply now (for tests and diagnostics).
    pub fn waiting(&self) -> usize {
        self.waiters.lock().expect("waiters lock").len()
    }
}

impl PendingReply {
    /// Waits up to `timeout` for the reply. However the wait ends (a reply, a timeout,
    /// or the caller dropping this future), the waiter is removed: see `Drop`.
    pub async fn wait(mut self, timeout: Duration) -> Result<ProvisioningResult, ClientError> {
        match tokio::time::timeout(timeout, &mut self.receiver).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(ClientError::ReaderStopped),
            Err(_) => Err(ClientError::Timeout {
                correlation_id: self.correlation_id.clone(),
                waited: timeout,
            }),
        }
    }
}

impl Drop for PendingReply {
    /// A caller that stops waiting (timeout, cancellation) leaves no waiter behind, so a
    /// long-lived client does not grow one entry per abandoned request.
    fn drop(&mut self) {
        self.waiters.lock().expect("waiters lock").remove(&self.correlation_id);
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Every partition of the reply topic at its current end.
fn reply_topic_end(consumer: &BaseConsumer, topic: &str) -> Result<TopicPartitionList, ClientError> {
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|found| found.name() == topic)
        .flat_map(|found| found.partitions().iter().map(|partition| partition.id()))
        .collect();
    let mut list = TopicPartitionList::new();
    for partition in partitions {
        let (_, high) = consumer.fetch_watermarks(topic, partition, Duration::from_secs(10))?;
        list.add_partition_offset(topic, partition, Offset::Offset(high))?;
    }
    Ok(list)
}

async fn read_replies(consumer: StreamConsumer, waiters: Waiters) {
    loop {
        let message = match consumer.recv().await {
            Ok(message) => message,
            Err(error) => {
                tracing::warn!(error = %error, "Reply reader error.");
                continue;
            }
        };
        let correlation_id = message.headers().and_then(|headers| {
            headers
                .iter()
                .find(|header| header.key == CORRELATION_ID_HEADER)
                .and_then(|header| header.value)
                .map(|value| String::from_utf8_lossy(value).into_owned())
        });
        let Some(correlation_id) = correlation_id else {
            continue;
        };
        let Some(waiter) = waiters.lock().expect("waiters lock").remove(&correlation_id) else {
            continue;
        };
        match message.payload().map(serde_json::from_slice::<ProvisioningResult>) {
            Some(Ok(reply)) => {
                let _ = waiter.send(reply);
            }
            _ => tracing::warn!(correlation_id = %correlation_id, "Unreadable reply ignored."),
        }
    }
}
