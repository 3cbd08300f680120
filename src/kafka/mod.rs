//! Everything that knows rdkafka lives here.
//!
//! **Invariant:** an input offset is stored (and so, later, committed) only by
//! [`consumer::EventConsumer::store_offset`], which the pipeline calls only after every
//! earlier event in the partition is finished and its results are durable.

pub mod consumer;
pub mod dead_letters;
pub mod partitioners;
pub mod producer;
pub mod retry_topics;
pub mod settings;
pub mod state_topic;

use std::time::Instant;

use rdkafka::config::ClientConfig;
use rdkafka::message::{BorrowedMessage, Headers, Message};

use crate::kafka::settings::{KafkaSettings, SaslMechanism, SecurityProtocol};

/// An input record, detached from librdkafka's buffers so it can move between tasks.
#[derive(Debug, Clone)]
pub struct InboundRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// When the record was read, for the event-to-result latency.
    pub received_at: Instant,
}

impl InboundRecord {
    pub fn from_message(message: &BorrowedMessage<'_>) -> InboundRecord {
        let headers = message
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .map(|header| (header.key.to_string(), header.value.unwrap_or_default().to_vec()))
                    .collect()
            })
            .unwrap_or_default();
        InboundRecord {
            topic: message.topic().to_string(),
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            value: message.payload().map(<[u8]>::to_vec),
            headers,
            received_at: Instant::now(),
        }
    }

    pub fn key_text(&self) -> Option<String> {
        self.key.as_deref().map(|key| String::from_utf8_lossy(key).into_owned())
    }
}

/// Connection and security properties shared by the consumer and the producer.
pub fn base_client_config(settings: &KafkaSettings) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &settings.bootstrap_servers)
        .set("client.id", &settings.client_id);
    let security = &settings.security;
    config.set(
        "security.protocol",
        match security.protocol {
            SecurityProtocol::Plaintext => "plaintext",
            SecurityProtocol::Ssl => "ssl",
            SecurityProtocol::SaslPlaintext => "sasl_plaintext",
            SecurityProtocol::SaslSsl => "sasl_ssl",
        },
    );
    if let Some(mechanism) = security.sasl_mechanism {
        config.set(
            "sasl.mechanism",
            match mechanism {
                SaslMechanism::Plain => "PLAIN",
                SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
                SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
            },
        );
    }
    if let Some(username) = &security.sasl_username {
        config.set("sasl.username", username);
    }
    if let Some(password) = &security.sasl_password {
        config.set("sasl.password", password.expose());
    }
    if let Some(path) = &security.ssl_ca_file {
        config.set("ssl.ca.location", path.display().to_string());
    }
    if let Some(path) = &security.ssl_certificate_file {
        config.set("ssl.certificate.location", path.display().to_string());
    }
    if let Some(path) = &security.ssl_key_file {
        config.set("ssl.key.location", path.display().to_string());
    }
    if let Some(password) = &security.ssl_key_password {
        config.set("ssl.key.password", password.expose());
    }
    if !security.ssl_verify_hostname {
        tracing::warn!("Kafka broker host-name verification is off (kafka.security.ssl_verify_hostname = false).");
        config.set("ssl.endpoint.identification.algorithm", "none");
    }
    config
}

/// Applies `kafka.properties` last, so operators can tune what we did not pin.
/// Validation has already refused the properties that carry our guarantees.
fn apply_overrides(config: &mut ClientConfig, settings: &KafkaSettings) {
    for (name, value) in &settings.properties {
        config.set(name, value);
    }
}
