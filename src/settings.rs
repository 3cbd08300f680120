//! The configuration tree, how it is loaded, and how it is checked.
//!
//! Sources, later ones winning: the TOML file given with `--config`, then
//! environment variables `PROVISIONER__SECTION__KEY` (double underscores separate
//! levels, e.g. `PROVISIONER__KAFKA__BOOTSTRAP_SERVERS`).
//!
//! Any secret-bearing key (see [`crate::secret::SECRET_KEYS`]) may instead be given as
//! `<key>_env = "VAR"` (read from the environment) or `<key>_file = "/path"` (read
//! from a file, trailing newline trimmed). Those references are resolved on the raw
//! tree before deserialisation, so the typed tree below only ever sees values.
//!
//! Every struct denies unknown fields, so a typo is an error that names the key.
//! After deserialisation, [`Settings::validate`] checks the cross-references (a binding
//! must name a defined connector) and the rules serde cannot express, and reports
//! every problem at once, each with its full key.
//!
//! This file holds the top of the tree. Each section's own types, defaults and checks
//! live with the code they configure: `[kafka]` in `kafka/settings.rs`, a connector's
//! `[connectors.<name>]` in `connectors/<type>/settings.rs` (shared parts in
//! `connectors/delivery.rs` and `connectors/http.rs`). Dependencies run one way: this
//! file imports those types; they never import this file.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::connectors::settings::ConnectorSettings;
use crate::kafka::settings::KafkaSettings;
use crate::secret::{resolve_secret_references, SecretReferenceError};
use crate::state::settings::StateSettings;

// === Errors ===

/// Why the configuration could not be used. Never retryable: the process exits.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration key `{key}`: {message}")]
    Secret { key: String, message: String },
    #[error("configuration key `{key}`: {message}")]
    Shape { key: String, message: String },
    #[error("invalid configuration:\n{}", format_problems(.0))]
    Invalid(Vec<Problem>),
}

/// One thing wrong with an otherwise well-formed configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted path of the offending key, e.g. `tenants.acme.resident.bindings[0].connector`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "`{}`: {}", self.key, self.message)
    }
}

fn format_problems(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|problem| format!("  - {problem}"))
        .collect::<Vec<_>>()
        .join("\n")
}

// === The tree ===

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub kafka: KafkaSettings,
    #[serde(default)]
    pub pipeline: PipelineSettings,
    #[serde(default)]
    pub admin: AdminSettings,
    #[serde(default)]
    pub telemetry: TelemetrySettings,
    /// The provisioning state (what each target holds for each user).
    #[serde(default)]
    pub state: StateSettings,
    /// Durable parking of a connector's work while its target cannot keep up.
    #[serde(default)]
    pub parking: ParkingSettings,
    /// Groups and their members.
    #[serde(default)]
    pub groups: GroupsSettings,
    /// Outbound targets, by name. The name is used in bindings, results and metric labels.
    #[serde(default)]
    pub connectors: BTreeMap<String, ConnectorSettings>,
    /// Tenants (WSO2 tenant domains), by name as it appears in events' `data.tenant`.
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantSettings>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSettings {
    /// Events being worked on at once, across all users and partitions.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Events held in memory (in flight plus queued behind the same user). Fetching
    /// pauses at this bound, so memory stays flat whatever the backlog.
    #[serde(default = "default_max_buffered_events")]
    pub max_buffered_events: usize,
    /// Larger event values are dead-lettered unread.
    #[serde(default = "default_max_event_bytes")]
    pub max_event_bytes: usize,
    /// On SIGTERM, how long in-flight work may take to finish before the process exits
    /// anyway (unfinished events are redelivered to the next owner).
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// A blocking caller gets its reply by then at the latest: a blocking binding not
    /// finished by this time is reported `queued` (its event is durable in Kafka and is
    /// applied later), never waited on for the connector's whole `max_elapsed`.
    #[serde(default = "default_reply_deadline", with = "humantime_serde")]
    pub reply_deadline: Duration,
    /// A partition whose oldest unfinished offset has not moved for this long, while
    /// events of it wait, is wedged: it shows on metrics and fails `/readyz`. Set it
    /// above the connectors' `max_elapsed`, which one event may spend retrying.
    #[serde(default = "default_wedge_after", with = "humantime_serde")]
    pub wedge_after: Duration,
    /// `user`: one event per user at a time, users concurrently (the default).
    /// `partition`: one event per partition at a time, what a plain at-least-once
    /// consumer does; the benchmark's baseline.
    #[serde(default)]
    pub ordering: OrderingMode,
}

/// `[parking]`: when a connector cannot make progress, its operations are written to
/// its retry topic (`<topic_prefix><connector>`) and the input moves on; they are
/// drained, in per-(user, connector) order, once the target is back. Needs `[state]`,
/// which records which lanes are parked; with the state off, parking is off.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ParkingSettings {
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Retry topics are named this plus the connector's name.
    #[serde(default = "default_retry_topic_prefix")]
    pub topic_prefix: String,
    /// A connector whose circuit has been open this long parks its work.
    #[serde(default = "default_park_after", with = "humantime_serde")]
    pub park_after: Duration,
    /// A connector holding more operations than this in memory (queued in its lanes or
    /// running) parks its new work. Must be below `pipeline.max_buffered_events`, so that
    /// parking starts before back-pressure pauses everyone; half of it when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_held_operations: Option<usize>,
    /// Parked work older than this fails for good (dead-lettered). Each retry topic's
    /// `retention.ms` must be longer; start-up checks it.
    #[serde(default = "default_max_parked_time", with = "humantime_serde")]
    pub max_parked_time: Duration,
    /// Create a missing retry topic (partitioned like the input, retention twice
    /// `max_parked_time`); when false, a missing one stops start-up.
    #[serde(default = "default_true")]
    pub create_topics: bool,
}

impl Default for ParkingSettings {
    fn default() -> Self {
        ParkingSettings {
            enabled: true,
            topic_prefix: default_retry_topic_prefix(),
            park_after: default_park_after(),
            max_held_operations: None,
            max_parked_time: default_max_parked_time(),
            create_topics: true,
        }
    }
}

impl ParkingSettings {
    /// The bound on operations one connector holds before it parks.
    pub fn held_bound(&self, max_buffered_events: usize) -> usize {
        self.max_held_operations.unwrap_or((max_buffered_events / 2).max(1))
    }

    /// The retry topic of `connector`.
    pub fn retry_topic(&self, connector: &str) -> String {
        format!("{}{connector}", self.topic_prefix)
    }
}

/// `[groups]`: group events create, rename and delete groups in their own lanes; each
/// member added or removed becomes a membership record on the membership topic, on the
/// member's partition, applied in the member's (user, connector) lane after the
/// member's create. Needs `[state]` (members' remote ids and memberships' versions).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GroupsSettings {
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Where group events write their membership records: partitioned like the input,
    /// partition p read by the owner of input partition p.
    #[serde(default = "default_membership_topic")]
    pub membership_topic: String,
    /// How the identity platform's producer picks a user's partition from the key, so
    /// that a membership reaches the member's partition: `murmur2` (the Java client's
    /// default, and Kafka Streams') or `crc32` (librdkafka's default,
    /// `consistent_random`). A user event found on another partition is counted
    /// (`provisioner_partitioner_mismatches_total`) and logged.
    #[serde(default)]
    pub user_partitioner: UserPartitioner,
    /// A membership whose member has no account on the connector yet waits this long
    /// (from its group event) for the member's create, then is skipped with the reason.
    #[serde(default = "default_member_wait", with = "humantime_serde")]
    pub member_wait: Duration,
    /// Memberships waiting for their member in memory; above it the membership topic is
    /// paused (the input goes on, so the creates they wait for still come). Half of
    /// `pipeline.max_buffered_events` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_waiting_memberships: Option<usize>,
    /// Membership records a group event writes between two saves of its progress: a
    /// large group redone after a crash resumes at the last save.
    #[serde(default = "default_membership_chunk")]
    pub chunk: usize,
    /// Create a missing membership topic (partitioned like the input); when false, a
    /// missing one stops start-up.
    #[serde(default = "default_true")]
    pub create_topics: bool,
}

impl Default for GroupsSettings {
    fn default() -> Self {
        GroupsSettings {
            enabled: true,
            membership_topic: default_membership_topic(),
            user_partitioner: UserPartitioner::default(),
            member_wait: default_member_wait(),
            max_waiting_memberships: None,
            chunk: default_membership_chunk(),
            create_topics: true,
        }
    }
}

impl GroupsSettings {
    pub fn waiting_bound(&self, max_buffered_events: usize) -> usize {
        self.max_waiting_memberships.unwrap_or((max_buffered_events / 2).max(1))
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UserPartitioner {
    #[default]
    Murmur2,
    Crc32,
}

impl UserPartitioner {
    /// The partition this partitioner gives `key` among `partitions`.
    pub fn partition(self, key: &[u8], partitions: i32) -> i32 {
        match self {
            UserPartitioner::Murmur2 => crate::kafka::partitioners::java_murmur2(key, partitions),
            UserPartitioner::Crc32 => crate::kafka::partitioners::librdkafka_crc32(key, partitions),
        }
    }
}

fn default_membership_topic() -> String {
    "provisioner.memberships".into()
}
fn default_member_wait() -> Duration {
    Duration::from_secs(300)
}
fn default_membership_chunk() -> usize {
    500
}

fn default_true() -> bool {
    true
}
fn default_retry_topic_prefix() -> String {
    "provisioner.retry.".into()
}
fn default_park_after() -> Duration {
    Duration::from_secs(30)
}
fn default_max_parked_time() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderingMode {
    #[default]
    User,
    Partition,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSettings {
    /// Address of the `/metrics`, `/healthz` and `/readyz` server.
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    #[serde(default)]
    pub format: LogFormat,
    /// A tracing `EnvFilter` directive; `RUST_LOG` wins when set.
    #[serde(default = "default_log_level")]
    pub level: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Json,
    Pretty,
}

// --- Tenants, providers and bindings ---

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSettings {
    /// The organisation-level ("resident") provider: used for events with no
    /// `service_provider`, or one not configured below.
    #[serde(default)]
    pub resident: ResidentSettings,
    /// Applications, by name as it appears in events' `data.service_provider`.
    #[serde(default)]
    pub service_providers: BTreeMap<String, ServiceProviderSettings>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ResidentSettings {
    #[serde(default)]
    pub bindings: Vec<BindingSettings>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceProviderSettings {
    /// Also apply the resident provider's bindings (WSO2 applies only the app's own).
    #[serde(default)]
    pub inherit_resident: bool,
    #[serde(default)]
    pub bindings: Vec<BindingSettings>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BindingSettings {
    /// Name of a connector under `[connectors]`.
    pub connector: String,
    /// A blocking caller's reply waits for this binding.
    #[serde(default)]
    pub blocking: bool,
    /// Also provision users created by federated (JIT) login.
    #[serde(default)]
    pub jit_outbound: bool,
    /// A CEL expression over the event; the binding applies only when it is true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
}

// === Loading ===

impl Settings {
    /// Reads `path`, applies `PROVISIONER__…` overrides from the process environment,
    /// resolves secret references, deserialises and validates.
    pub fn load(path: &Path) -> Result<Settings, SettingsError> {
        let environment: BTreeMap<String, String> = std::env::vars().collect();
        Self::load_with_environment(path, &environment)
    }

    /// [`Settings::load`] with an explicit environment, so tests need not touch the
    /// process environment.
    pub fn load_with_environment(
        path: &Path,
        environment: &BTreeMap<String, String>,
    ) -> Result<Settings, SettingsError> {
        let overrides: config::Map<String, String> = environment
            .iter()
            .filter(|(name, _)| name.starts_with("PROVISIONER__"))
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect();
        let raw = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix("PROVISIONER")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true)
                    .list_separator(",")
                    .with_list_parse_key("kafka.event_topics")
                    .with_list_parse_key("kafka.reply_topic_allow_list")
                    .with_list_parse_key("connectors.*.scopes")
                    .source(Some(overrides)),
            )
            .build()?;
        Self::from_config(raw, path.parent(), environment)
    }

    /// Parses a TOML document with no environment overrides (embedded defaults, tests).
    pub fn from_toml_str(document: &str) -> Result<Settings, SettingsError> {
        let raw = config::Config::builder()
            .add_source(config::File::from_str(document, config::FileFormat::Toml))
            .build()?;
        Self::from_config(raw, None, &BTreeMap::new())
    }

    fn from_config(
        raw: config::Config,
        base_directory: Option<&Path>,
        environment: &BTreeMap<String, String>,
    ) -> Result<Settings, SettingsError> {
        let mut tree: config::Value = raw.try_deserialize()?;
        resolve_secret_references(&mut tree, "", base_directory, environment)
            .map_err(|SecretReferenceError { key, message }| SettingsError::Secret { key, message })?;
        let settings: Settings = serde_path_to_error::deserialize(tree).map_err(|error| {
            let key = error.path().to_string();
            SettingsError::Shape {
                key: if key == "." { "(root)".into() } else { key },
                message: error.into_inner().to_string(),
            }
        })?;
        settings.validate().map_err(SettingsError::Invalid)?;
        Ok(settings)
    }

    /// The resolved configuration as TOML, with every secret shown as `[redacted]`.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|error| format!("# cannot render: {error}\n"))
    }

    /// Reply topics the service may write to.
    /// The topics named outright: the input, results, replies, dead letters and state.
    /// A retry or membership topic may be none of them.
    fn fixed_topics(&self) -> Vec<&String> {
        [
            &self.kafka.results_topic,
            &self.kafka.reply_topic,
            &self.kafka.dead_letter_topic,
            &self.state.topic,
        ]
        .into_iter()
        .chain(&self.kafka.event_topics)
        .collect()
    }

    pub fn reply_topic_allow_list(&self) -> Vec<String> {
        if self.kafka.reply_topic_allow_list.is_empty() {
            vec![self.kafka.reply_topic.clone()]
        } else {
            self.kafka.reply_topic_allow_list.clone()
        }
    }

    /// Every problem serde cannot see, reported together.
    pub fn validate(&self) -> Result<(), Vec<Problem>> {
        let mut problems = Vec::new();
        let mut problem = |key: String, message: String| problems.push(Problem { key, message });

        self.kafka.check(&mut problem);
        self.state.check(&mut problem);
        if self.state.enabled {
            // The state topic is partitioned exactly like the input, partition for
            // partition, so it can follow one input topic only.
            if self.kafka.event_topics.len() != 1 {
                problem(
                    "kafka.event_topics".into(),
                    format!(
                        "with [state] enabled there must be exactly one input topic (found {}): the state topic `{}` is partitioned like it; run one instance group per input topic, or set state.enabled = false",
                        self.kafka.event_topics.len(),
                        self.state.topic
                    ),
                );
            }
            let others = [
                &self.kafka.results_topic,
                &self.kafka.reply_topic,
                &self.kafka.dead_letter_topic,
            ];
            if self.kafka.event_topics.contains(&self.state.topic) || others.contains(&&self.state.topic) {
                problem(
                    "state.topic".into(),
                    format!("`{}` is already used for another purpose", self.state.topic),
                );
            }
        }

        let pipeline = &self.pipeline;
        if pipeline.max_in_flight == 0 {
            problem("pipeline.max_in_flight".into(), "must be at least 1".into());
        }
        if pipeline.max_buffered_events < pipeline.max_in_flight {
            problem(
                "pipeline.max_buffered_events".into(),
                format!("must be at least pipeline.max_in_flight ({})", pipeline.max_in_flight),
            );
        }
        if pipeline.max_event_bytes < 1024 {
            problem("pipeline.max_event_bytes".into(), "must be at least 1024".into());
        }
        if pipeline.reply_deadline.is_zero() {
            problem("pipeline.reply_deadline".into(), "must be greater than zero".into());
        }
        let parking = &self.parking;
        if parking.enabled {
            let held_bound = parking.held_bound(pipeline.max_buffered_events);
            if held_bound == 0 || held_bound >= pipeline.max_buffered_events {
                problem(
                    "parking.max_held_operations".into(),
                    format!(
                        "must be at least 1 and below pipeline.max_buffered_events ({}): parking must start before back-pressure pauses every connector",
                        pipeline.max_buffered_events
                    ),
                );
            }
            if parking.park_after.is_zero() {
                problem("parking.park_after".into(), "must be greater than zero".into());
            }
            if parking.max_parked_time.is_zero() {
                problem("parking.max_parked_time".into(), "must be greater than zero".into());
            }
            if parking.topic_prefix.is_empty()
                || !parking
                    .topic_prefix
                    .chars()
                    .all(|character| character.is_ascii_alphanumeric() || matches!(character, '.' | '_' | '-'))
            {
                problem(
                    "parking.topic_prefix".into(),
                    "must be a non-empty Kafka topic name prefix (letters, digits, `.`, `_`, `-`)".into(),
                );
            }
            let topics = self.fixed_topics();
            for name in self.connectors.keys() {
                let retry_topic = parking.retry_topic(name);
                if topics.contains(&&retry_topic) {
                    problem(
                        "parking.topic_prefix".into(),
                        format!("connector `{name}`'s retry topic `{retry_topic}` is already used for another purpose"),
                    );
                }
            }
        }
        if pipeline.wedge_after.is_zero() {
            problem("pipeline.wedge_after".into(), "must be greater than zero".into());
        }
        let groups = &self.groups;
        if groups.enabled && self.state.enabled {
            if groups.member_wait.is_zero() {
                problem("groups.member_wait".into(), "must be greater than zero".into());
            }
            if groups.chunk == 0 {
                problem("groups.chunk".into(), "must be at least 1".into());
            }
            if groups.max_waiting_memberships == Some(0) {
                problem("groups.max_waiting_memberships".into(), "must be at least 1".into());
            }
            let taken = self.fixed_topics().contains(&&groups.membership_topic)
                || (self.parking.enabled && groups.membership_topic.starts_with(&self.parking.topic_prefix));
            if groups.membership_topic.is_empty() || taken {
                problem(
                    "groups.membership_topic".into(),
                    format!(
                        "`{}` must be a topic of its own (not an input, output, state or retry topic)",
                        groups.membership_topic
                    ),
                );
            }
        }

        for (name, connector) in &self.connectors {
            let key = format!("connectors.{name}");
            if !is_plain_name(name) {
                problem(
                    key.clone(),
                    "connector names may use only letters, digits, `_` and `-` (they become metric labels)".into(),
                );
            }
            connector.check(&key, &mut problem);
        }

        for (tenant_name, tenant) in &self.tenants {
            let tenant_key = format!("tenants.{tenant_name}");
            let providers = std::iter::once((format!("{tenant_key}.resident"), &tenant.resident.bindings)).chain(
                tenant
                    .service_providers
                    .iter()
                    .map(|(name, provider)| (format!("{tenant_key}.service_providers.{name}"), &provider.bindings)),
            );
            for (provider_key, bindings) in providers {
                let mut seen = Vec::new();
                for (index, binding) in bindings.iter().enumerate() {
                    let key = format!("{provider_key}.bindings[{index}].connector");
                    if !self.connectors.contains_key(&binding.connector) {
                        problem(
                            key.clone(),
                            format!(
                                "binding names connector `{}`, which is not defined under [connectors] (defined: {})",
                                binding.connector,
                                defined_names(&self.connectors)
                            ),
                        );
                    }
                    if seen.contains(&&binding.connector) {
                        problem(key, format!("connector `{}` is bound twice here", binding.connector));
                    }
                    seen.push(&binding.connector);
                    if let Some(rule) = &binding.rule {
                        if rule.trim().is_empty() {
                            problem(
                                format!("{provider_key}.bindings[{index}].rule"),
                                "must not be empty".into(),
                            );
                        }
                    }
                }
            }
        }

        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|character| character.is_ascii_alphanumeric() || matches!(character, '_' | '-'))
}

fn defined_names<V>(map: &BTreeMap<String, V>) -> String {
    if map.is_empty() {
        "none".into()
    } else {
        map.keys()
            .map(|name| format!("`{name}`"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

// === Defaults ===

fn default_max_in_flight() -> usize {
    256
}
fn default_max_buffered_events() -> usize {
    4096
}
/// Librdkafka's default `message.max.bytes` (1,000,000) less 16 KiB of dead-letter
/// headers: the largest event whose dead letter fits whole with default limits.
fn default_max_event_bytes() -> usize {
    983_616
}
fn default_reply_deadline() -> Duration {
    Duration::from_secs(10)
}
fn default_shutdown_grace() -> Duration {
    Duration::from_secs(20)
}
fn default_wedge_after() -> Duration {
    Duration::from_secs(5 * 60)
}
fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}
fn default_log_level() -> String {
    "info".into()
}

impl Default for PipelineSettings {
    fn default() -> Self {
        Self {
            max_in_flight: default_max_in_flight(),
            max_buffered_events: default_max_buffered_events(),
            max_event_bytes: default_max_event_bytes(),
            shutdown_grace: default_shutdown_grace(),
            reply_deadline: default_reply_deadline(),
            wedge_after: default_wedge_after(),
            ordering: OrderingMode::default(),
        }
    }
}

impl Default for AdminSettings {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
        }
    }
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            format: LogFormat::default(),
            level: default_log_level(),
        }
    }
}
