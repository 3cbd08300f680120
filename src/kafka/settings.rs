//! `[kafka]`: brokers, topics, commit pacing and security, with their defaults and checks.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::secret::Secret;

/// librdkafka properties that `kafka.properties` may not override: they carry the
/// at-least-once guarantee or a secret that would then be printed by `check-config`.
const PROTECTED_KAFKA_PROPERTIES: &[&str] = &[
    "enable.auto.offset.store",
    "enable.auto.commit",
    "enable.idempotence",
    "acks",
    "group.id",
    "bootstrap.servers",
    "sasl.password",
    "ssl.key.password",
    "ssl.keystore.password",
    "sasl.oauthbearer.client.secret",
];

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSettings {
    /// Comma-separated `host:port` list.
    pub bootstrap_servers: String,
    #[serde(default = "default_group_id")]
    pub group_id: String,
    #[serde(default = "default_client_id")]
    pub client_id: String,
    /// Topics carrying user lifecycle events.
    #[serde(default = "default_event_topics")]
    pub event_topics: Vec<String>,
    /// Every event's complete result, keyed by `tenant/user id`: the audit trail.
    #[serde(default = "default_results_topic")]
    pub results_topic: String,
    /// Default reply topic for blocking callers.
    #[serde(default = "default_reply_topic")]
    pub reply_topic: String,
    /// Topics an event's `reply_to` header may name. Empty means only `reply_topic`.
    #[serde(default)]
    pub reply_topic_allow_list: Vec<String>,
    /// Undecodable events and permanent failures, with the reason in headers.
    #[serde(default = "default_dead_letter_topic")]
    pub dead_letter_topic: String,
    /// How often stored offsets are committed. Also the replay window after a crash.
    #[serde(default = "default_commit_interval", with = "humantime_serde")]
    pub commit_interval: Duration,
    /// How long a produce (reply, result, dead letter) may take before it counts as failed.
    #[serde(default = "default_produce_timeout", with = "humantime_serde")]
    pub produce_timeout: Duration,
    #[serde(default)]
    pub security: KafkaSecurity,
    /// Extra librdkafka properties for both consumer and producer (tuning, `client.rack`, …).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSecurity {
    #[serde(default)]
    pub protocol: SecurityProtocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl_mechanism: Option<SaslMechanism>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl_username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl_password: Option<Secret>,
    /// PEM bundle of CAs to trust for the brokers; the system store when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssl_ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssl_certificate_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssl_key_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssl_key_password: Option<Secret>,
    /// Check the broker certificate's host name. Turning it off is logged at WARN.
    #[serde(default = "default_true")]
    pub ssl_verify_hostname: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SecurityProtocol {
    #[default]
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum SaslMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl KafkaSettings {
    /// Every problem serde cannot see under `[kafka]`, each with its full key.
    pub fn check(&self, problem: &mut impl FnMut(String, String)) {
        let kafka = self;
        if kafka.bootstrap_servers.trim().is_empty() {
            problem("kafka.bootstrap_servers".into(), "must not be empty".into());
        }
        if kafka.event_topics.is_empty() {
            problem("kafka.event_topics".into(), "name at least one topic".into());
        }
        let named_topics = kafka
            .event_topics
            .iter()
            .enumerate()
            .map(|(index, topic)| (format!("kafka.event_topics[{index}]"), topic))
            .chain([
                ("kafka.results_topic".to_string(), &kafka.results_topic),
                ("kafka.reply_topic".to_string(), &kafka.reply_topic),
                ("kafka.dead_letter_topic".to_string(), &kafka.dead_letter_topic),
            ])
            .chain(
                kafka
                    .reply_topic_allow_list
                    .iter()
                    .enumerate()
                    .map(|(index, topic)| (format!("kafka.reply_topic_allow_list[{index}]"), topic)),
            );
        for (key, topic) in named_topics {
            if let Err(message) = check_topic_name(topic) {
                problem(key, message);
            }
        }
        for output in [&kafka.results_topic, &kafka.dead_letter_topic] {
            if kafka.event_topics.contains(output) {
                problem(
                    "kafka.event_topics".into(),
                    format!("`{output}` is also an output topic; the service would consume its own output"),
                );
            }
        }
        if kafka.commit_interval.is_zero() {
            problem("kafka.commit_interval".into(), "must be greater than zero".into());
        }
        for name in kafka.properties.keys() {
            if PROTECTED_KAFKA_PROPERTIES.contains(&name.as_str()) {
                problem(
                    format!("kafka.properties.{name}"),
                    "is set by provisioner itself (delivery guarantees or secrets); use the dedicated key".into(),
                );
            }
        }
        let security = &kafka.security;
        let uses_sasl = matches!(
            security.protocol,
            SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
        );
        if uses_sasl {
            if security.sasl_mechanism.is_none() {
                problem(
                    "kafka.security.sasl_mechanism".into(),
                    "is required with a SASL protocol".into(),
                );
            }
            if security.sasl_username.is_none() {
                problem(
                    "kafka.security.sasl_username".into(),
                    "is required with a SASL protocol".into(),
                );
            }
            if security.sasl_password.is_none() {
                problem(
                    "kafka.security.sasl_password".into(),
                    "is required with a SASL protocol".into(),
                );
            }
        }
        if security.ssl_certificate_file.is_some() != security.ssl_key_file.is_some() {
            problem(
                "kafka.security.ssl_key_file".into(),
                "ssl_certificate_file and ssl_key_file go together".into(),
            );
        }
    }
}

fn check_topic_name(topic: &str) -> Result<(), String> {
    let valid = !topic.is_empty()
        && topic.len() <= 249
        && topic != "."
        && topic != ".."
        && topic
            .chars()
            .all(|character| character.is_ascii_alphanumeric() || matches!(character, '.' | '_' | '-'));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "`{topic}` is not a valid Kafka topic name (1-249 of [a-zA-Z0-9._-])"
        ))
    }
}

fn default_true() -> bool {
    true
}
fn default_group_id() -> String {
    "provisioner".into()
}
fn default_client_id() -> String {
    "provisioner".into()
}
fn default_event_topics() -> Vec<String> {
    vec!["identity.user-events".into()]
}
fn default_results_topic() -> String {
    "provisioner.results".into()
}
fn default_reply_topic() -> String {
    "provisioner.replies".into()
}
fn default_dead_letter_topic() -> String {
    "provisioner.dead-letters".into()
}
fn default_commit_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_produce_timeout() -> Duration {
    Duration::from_secs(30)
}

impl Default for KafkaSecurity {
    fn default() -> Self {
        Self {
            protocol: SecurityProtocol::default(),
            sasl_mechanism: None,
            sasl_username: None,
            sasl_password: None,
            ssl_ca_file: None,
            ssl_certificate_file: None,
            ssl_key_file: None,
            ssl_key_password: None,
            // Verification is on unless switched off explicitly.
            ssl_verify_hostname: true,
        }
    }
}
