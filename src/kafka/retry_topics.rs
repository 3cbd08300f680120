//! Retry topics (one per connector, `parking.topic_prefix` + name): finding them,
//! creating a missing one partitioned like the input, and reading what start-up checks.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::kafka::base_client_config;
use crate::kafka::settings::KafkaSettings;

const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum RetryTopicError {
    /// The broker may come back: retryable.
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// The broker refused to create the topic (ACLs, policy): not retryable.
    #[error("cannot create retry topic `{topic}`: {message}")]
    Create { topic: String, message: String },
}

impl RetryTopicError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, RetryTopicError::Kafka(_))
    }
}

/// Every existing topic whose name starts with `prefix`. Blocking.
pub fn topics_with_prefix(settings: &KafkaSettings, prefix: &str) -> Result<Vec<String>, RetryTopicError> {
    let consumer: BaseConsumer = base_client_config(settings).create()?;
    let metadata = consumer.fetch_metadata(None, METADATA_TIMEOUT)?;
    Ok(metadata
        .topics()
        .iter()
        .filter(|topic| topic.error().is_none() && topic.name().starts_with(prefix))
        .map(|topic| topic.name().to_string())
        .collect())
}

/// Creates `topic` with `partitions` partitions, the broker's replication factor,
/// `cleanup.policy=delete` and `retention.ms`.
pub async fn create_topic(
    settings: &KafkaSettings,
    topic: &str,
    partitions: i32,
    retention: Duration,
) -> Result<(), RetryTopicError> {
    let admin: AdminClient<DefaultClientContext> = base_client_config(settings).create()?;
    let retention_ms = retention.as_millis().to_string();
    // The broker's default replication factor (-1, Kafka 2.4+); a broker that does not
    // take -1 (librdkafka's mock cluster) gets min(3, brokers).
    let mut replication = -1;
    loop {
        let new_topic = NewTopic::new(topic, partitions, TopicReplication::Fixed(replication))
            .set("cleanup.policy", "delete")
            .set("retention.ms", &retention_ms);
        let answers = admin
            .create_topics(
                &[new_topic],
                &AdminOptions::new().operation_timeout(Some(METADATA_TIMEOUT)),
            )
            .await?;
        match answers.into_iter().next() {
            None | Some(Ok(_)) => return Ok(()),
            // Another instance created it meanwhile.
            Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => return Ok(()),
            Some(Err((_, RDKafkaErrorCode::InvalidReplicationFactor))) if replication == -1 => {
                let settings = settings.clone();
                let brokers = tokio::task::spawn_blocking(move || -> Result<usize, KafkaError> {
                    let consumer: BaseConsumer = base_client_config(&settings).create()?;
                    Ok(consumer.fetch_metadata(None, METADATA_TIMEOUT)?.brokers().len())
                })
                .await
                .expect("metadata task")?;
                replication = brokers.clamp(1, 3) as i32;
            }
            Some(Err((_, code))) => {
                return Err(RetryTopicError::Create {
                    topic: topic.to_string(),
                    message: code.to_string(),
                })
            }
        }
    }
}
