//! The one producer for replies, results and dead letters.
//!
//! Idempotent with `acks=all`, so a retried produce cannot duplicate or reorder within
//! a partition; `linger.ms=0` because every event awaits its records (state, then result).

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::util::Timeout;

use crate::kafka::settings::KafkaSettings;
use crate::kafka::{apply_overrides, base_client_config};

#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    #[error("cannot create the Kafka producer: {0}")]
    Create(#[source] KafkaError),
    #[error("producing to `{topic}` failed: {source}")]
    Delivery {
        topic: String,
        #[source]
        source: KafkaError,
    },
}

impl ProduceError {
    /// The record can never be written as it is: larger than the producer's
    /// `message.max.bytes` or the topic's `max.message.bytes`. Retrying cannot help.
    pub fn is_too_large(&self) -> bool {
        match self {
            ProduceError::Delivery { source, .. } => matches!(
                source.rdkafka_error_code(),
                Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize)
            ),
            ProduceError::Create(_) => false,
        }
    }

    /// Every delivery failure is worth retrying: librdkafka has already retried within
    /// `message.timeout.ms`, so a failure means the broker is unreachable or refusing,
    /// which an operator can fix. The input offset stays unstored meanwhile.
    pub fn is_retryable(&self) -> bool {
        match self {
            ProduceError::Create(_) => false,
            ProduceError::Delivery { .. } => true,
        }
    }
}

/// A record to produce. Borrowed, because the caller keeps the original bytes.
pub struct OutboundRecord<'a> {
    pub topic: &'a str,
    /// A partition of our choosing (state records go to their input record's number);
    /// `None` lets the partitioner pick by key.
    pub partition: Option<i32>,
    pub key: Option<&'a [u8]>,
    pub payload: &'a [u8],
    pub headers: Vec<(&'a str, &'a [u8])>,
}

/// The producer's configuration: ours, then `kafka.properties`.
fn producer_config(settings: &KafkaSettings) -> ClientConfig {
    let mut config = base_client_config(settings);
    config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        // No linger: every produce is awaited by an event's completion (state, result,
        // reply), so a linger is added to each event's latency, twice; under load records
        // batch anyway while earlier requests are in flight (measured: no CPU cost).
        .set("linger.ms", "0")
        .set("compression.type", "lz4")
        .set("message.timeout.ms", settings.produce_timeout.as_millis().to_string());
    apply_overrides(&mut config, settings);
    config
}

/// The largest record the producer sends (`message.max.bytes`), as librdkafka itself
/// reads the producer's configuration: its default (1,000,000) unless `kafka.properties`
/// sets it. `None` when librdkafka refuses the configuration (creating the producer
/// reports that) or answers something that is not a number.
pub fn message_max_bytes(settings: &KafkaSettings) -> Option<i64> {
    let native = producer_config(settings).create_native_config().ok()?;
    native.get("message.max.bytes").ok()?.trim().parse().ok()
}

#[derive(Clone)]
pub struct EventProducer {
    producer: FutureProducer,
    produce_timeout: Duration,
}

impl EventProducer {
    pub fn new(settings: &KafkaSettings) -> Result<EventProducer, ProduceError> {
        let producer = producer_config(settings).create().map_err(ProduceError::Create)?;
        Ok(EventProducer {
            producer,
            produce_timeout: settings.produce_timeout,
        })
    }

    /// Produces one record and waits until the broker has it (`acks=all`).
    pub async fn send(&self, record: OutboundRecord<'_>) -> Result<(), ProduceError> {
        self.send_for_offset(record).await.map(|_| ())
    }

    /// Produces a tombstone (no value) for `key` and waits until the broker has it.
    pub async fn send_tombstone(&self, topic: &str, partition: i32, key: &[u8]) -> Result<(), ProduceError> {
        let record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).key(key).partition(partition);
        self.producer
            .send(record, Timeout::After(self.produce_timeout))
            .await
            .map(|_| ())
            .map_err(|(source, _)| ProduceError::Delivery {
                topic: topic.to_string(),
                source,
            })
    }

    /// As [`send`](Self::send), answering the offset the record was written at.
    pub async fn send_for_offset(&self, record: OutboundRecord<'_>) -> Result<i64, ProduceError> {
        let headers = record.headers.iter().fold(
            OwnedHeaders::new_with_capacity(record.headers.len()),
            |headers, (key, value)| {
                headers.insert(Header {
                    key,
                    value: Some(*value),
                })
            },
        );
        let mut future_record = FutureRecord::to(record.topic).payload(record.payload).headers(headers);
        if let Some(key) = record.key {
            future_record = future_record.key(key);
        }
        if let Some(partition) = record.partition {
            future_record = future_record.partition(partition);
        }
        // The queue timeout turns a full local queue into back-pressure, not an error.
        self.producer
            .send(future_record, Timeout::After(self.produce_timeout))
            .await
            .map(|delivery| delivery.offset)
            .map_err(|(source, _)| ProduceError::Delivery {
                topic: record.topic.to_string(),
                source,
            })
    }

    /// Checks that a broker answers, by fetching cluster metadata. Blocking; call it from
    /// a blocking task.
    pub fn check_connection(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.producer.client().fetch_metadata(None, timeout).map(|_| ())
    }

    /// Waits for queued records. Dropping a producer purges its queue, so call this first.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.producer.flush(timeout)
    }

    pub fn in_flight_count(&self) -> i32 {
        self.producer.in_flight_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(extra: &str) -> KafkaSettings {
        toml::from_str(&format!("bootstrap_servers = \"127.0.0.1:9\"\n{extra}")).expect("kafka settings")
    }

    #[test]
    fn message_max_bytes_is_librdkafkas_default_unless_overridden() {
        assert_eq!(message_max_bytes(&settings("")), Some(1_000_000));
        assert_eq!(
            message_max_bytes(&settings("[properties]\n\"message.max.bytes\" = \"2000000\"")),
            Some(2_000_000)
        );
    }
}
