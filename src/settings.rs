//! The configuration tree, how it is loaded, and how it is checked.
//!
//! Sources, later ones winning: the TOML file given with `--config`, then
//! environment variables `PROVISIONER__SECTION__KEY` (double underscores separate
//! levels, e.g. `PROVISIONER__KAFKA__BOOTSTRAP_SERVERS`).
//!
//! Any secret-bearing key (see [`SECRET_KEYS`]) may instead be given as
//! `<key>_env = "VAR"` (read from the environment) or `<key>_file = "/path"` (read
//! from a file, trailing newline trimmed). Those references are resolved on the raw
//! tree before deserialisation, so the typed tree below only ever sees values.
//!
//! Every struct denies unknown fields, so a typo is an error that names the key.
//! After deserialisation, [`Settings::validate`] checks the cross-references (a binding
//! must name a defined connector) and the rules serde cannot express, and reports
//! every problem at once.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use url::Url;

use crate::secret::Secret;

/// Keys whose values are credentials. Each accepts `<key>_env` and `<key>_file` forms.
pub const SECRET_KEYS: &[&str] = &[
    "password",
    "token",
    "client_secret",
    "api_key",
    "default_password",
    "private_key",
    "service_account_key",
    "security_token",
    "sasl_password",
    "ssl_key_password",
];

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
    /// Outbound targets, by name. The name is used in bindings, results and metric labels.
    #[serde(default)]
    pub connectors: BTreeMap<String, ConnectorSettings>,
    /// Tenants (WSO2 tenant domains), by name as it appears in events' `data.tenant`.
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantSettings>,
}

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
    /// `user`: one event per user at a time, users concurrently (the default).
    /// `partition`: one event per partition at a time, what a plain at-least-once
    /// consumer does; the benchmark's baseline.
    #[serde(default)]
    pub ordering: OrderingMode,
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

// --- Connectors ---

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ConnectorSettings {
    Scim2(Scim2Settings),
    Google(GoogleSettings),
    Salesforce(SalesforceSettings),
}

impl ConnectorSettings {
    pub fn kind(&self) -> &'static str {
        match self {
            ConnectorSettings::Scim2(_) => "scim2",
            ConnectorSettings::Google(_) => "google",
            ConnectorSettings::Salesforce(_) => "salesforce",
        }
    }

    pub fn delivery(&self) -> &DeliverySettings {
        match self {
            ConnectorSettings::Scim2(settings) => &settings.delivery,
            ConnectorSettings::Google(settings) => &settings.delivery,
            ConnectorSettings::Salesforce(settings) => &settings.delivery,
        }
    }

    pub fn http(&self) -> &HttpSettings {
        match self {
            ConnectorSettings::Scim2(settings) => &settings.http,
            ConnectorSettings::Google(settings) => &settings.http,
            ConnectorSettings::Salesforce(settings) => &settings.http,
        }
    }
}

/// How provisioner calls one target: concurrency, pacing and retries.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeliverySettings {
    /// Calls to this target in flight at once.
    #[serde(default = "default_connector_max_in_flight")]
    pub max_in_flight: usize,
    /// Steady request rate (token bucket); unlimited when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_per_second: Option<f64>,
    /// Attempts per operation, the first included.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Full-jitter exponential backoff: attempt n sleeps up to min(max, initial * 2^n).
    #[serde(default = "default_initial_backoff", with = "humantime_serde")]
    pub initial_backoff: Duration,
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Give up retrying once this much time has passed since the first attempt.
    #[serde(default = "default_max_elapsed", with = "humantime_serde")]
    pub max_elapsed: Duration,
    /// Consecutive transport/timeout/5xx failures that open the circuit (0: never).
    #[serde(default = "default_circuit_breaker_failures")]
    pub circuit_breaker_failures: u32,
    /// How long an open circuit holds calls before one probe; doubles (up to 5 min)
    /// while probes fail.
    #[serde(default = "default_circuit_breaker_cooldown", with = "humantime_serde")]
    pub circuit_breaker_cooldown: Duration,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        Self {
            max_in_flight: default_connector_max_in_flight(),
            rate_limit_per_second: None,
            max_attempts: default_max_attempts(),
            initial_backoff: default_initial_backoff(),
            max_backoff: default_max_backoff(),
            max_elapsed: default_max_elapsed(),
            circuit_breaker_failures: default_circuit_breaker_failures(),
            circuit_breaker_cooldown: default_circuit_breaker_cooldown(),
        }
    }
}

/// HTTP client settings shared by every connector type.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Extra PEM CA bundle to trust, on top of the built-in roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Skip TLS certificate verification. For labs only; logged at WARN on start.
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            connect_timeout: default_connect_timeout(),
            request_timeout: default_request_timeout(),
            ca_file: None,
            insecure_skip_verify: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scim2Settings {
    /// SCIM base URL; `/Users` and `/Groups` are appended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<Url>,
    /// Explicit Users endpoint (WSO2 `scim2-user-ep`); overrides `base_url` + `/Users`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users_url: Option<Url>,
    /// Explicit Groups endpoint (WSO2 `scim2-group-ep`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups_url: Option<Url>,
    #[serde(default)]
    pub auth: ScimAuth,
    /// `strip` sends `alice` for `PRIMARY/alice`; `keep` sends `PRIMARY/alice`.
    #[serde(default)]
    pub user_store_domain: UserStoreDomainHandling,
    #[serde(default)]
    pub password: PasswordProvisioning,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_password: Option<Secret>,
    #[serde(default)]
    pub deprovision: ScimDeprovision,
    /// SCIM attribute path → event path (e.g. `"title" = "attributes.title"`), added to
    /// or overriding the default mapping.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    #[serde(default)]
    pub http: HttpSettings,
    #[serde(default)]
    pub delivery: DeliverySettings,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum ScimAuth {
    #[default]
    None,
    Basic {
        username: String,
        password: Secret,
    },
    Bearer {
        token: Secret,
    },
    ApiKey {
        header: String,
        api_key: Secret,
    },
    /// OAuth 2.0 client credentials; the token is cached until shortly before expiry.
    Oauth2 {
        token_url: Url,
        client_id: String,
        client_secret: Secret,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        scope: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UserStoreDomainHandling {
    #[default]
    Strip,
    Keep,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PasswordProvisioning {
    #[default]
    None,
    Default,
    Random,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ScimDeprovision {
    #[default]
    Delete,
    Deactivate,
}

/// WSO2-compatible account-name pattern shared by Google and Salesforce.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AccountNamePattern {
    /// Tokens: `{UN}` user name, `{UD}` user-store domain, `{TD}` tenant, `{IDP}` IdP.
    #[serde(default = "default_pattern")]
    pub pattern: String,
    #[serde(default = "default_separator")]
    pub separator: String,
}

impl Default for AccountNamePattern {
    fn default() -> Self {
        Self {
            pattern: default_pattern(),
            separator: default_separator(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GoogleSettings {
    /// The Workspace primary domain; every `primaryEmail` ends with `@domain`.
    pub domain: String,
    /// Service-account key JSON (Google's format); usually `service_account_key_file`.
    pub service_account_key: Secret,
    /// Admin user the service account impersonates (the JWT `sub`).
    pub admin_email: String,
    #[serde(default = "default_google_scopes")]
    pub scopes: Vec<String>,
    #[serde(default = "default_google_api_base_url")]
    pub api_base_url: Url,
    /// Defaults to the key's `token_uri`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_url: Option<Url>,
    #[serde(default)]
    pub primary_email: AccountNamePattern,
    /// Used when the event has no given/family name (Google requires both);
    /// `{UN}` stands for the user name.
    #[serde(default = "default_name_fallback")]
    pub given_name_fallback: String,
    #[serde(default = "default_name_fallback")]
    pub family_name_fallback: String,
    #[serde(default = "default_org_unit_path")]
    pub org_unit_path: String,
    #[serde(default)]
    pub change_password_at_next_login: bool,
    #[serde(default)]
    pub deprovision: GoogleDeprovision,
    #[serde(default)]
    pub http: HttpSettings,
    #[serde(default)]
    pub delivery: DeliverySettings,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GoogleDeprovision {
    #[default]
    Delete,
    Suspend,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SalesforceSettings {
    /// `https://login.salesforce.com`, `https://test.salesforce.com` or a My Domain URL.
    #[serde(default = "default_salesforce_login_url")]
    pub login_url: Url,
    #[serde(default = "default_salesforce_api_version")]
    pub api_version: String,
    pub auth: SalesforceAuth,
    #[serde(default)]
    pub username: AccountNamePattern,
    /// Appended to usernames that do not already end with it (they must be email-shaped).
    pub provisioning_domain: String,
    pub profile_id: String,
    #[serde(default = "default_time_zone")]
    pub time_zone_sid_key: String,
    #[serde(default = "default_locale")]
    pub locale_sid_key: String,
    #[serde(default = "default_email_encoding")]
    pub email_encoding_key: String,
    #[serde(default = "default_locale")]
    pub language_locale_key: String,
    /// Salesforce field → event path, added to or overriding the defaults.
    #[serde(default)]
    pub fields: BTreeMap<String, String>,
    /// On deactivation also rename `Username` so it can be reused (as WSO2 does).
    #[serde(default)]
    pub free_username_on_deactivate: bool,
    #[serde(default)]
    pub http: HttpSettings,
    #[serde(default)]
    pub delivery: DeliverySettings,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "grant", rename_all = "snake_case", deny_unknown_fields)]
pub enum SalesforceAuth {
    /// Recommended: an External Client App with a run-as integration user.
    ClientCredentials { client_id: String, client_secret: Secret },
    /// RS256 assertion signed with the app's certificate key.
    JwtBearer {
        client_id: String,
        username: String,
        private_key: Secret,
    },
    /// Legacy, for WSO2 parity. Salesforce advises against it.
    Password {
        client_id: String,
        client_secret: Secret,
        username: String,
        password: Secret,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        security_token: Option<Secret>,
    },
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
        resolve_secret_references(&mut tree, "", base_directory, environment)?;
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

        let kafka = &self.kafka;
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

        for (name, connector) in &self.connectors {
            let key = format!("connectors.{name}");
            if !is_plain_name(name) {
                problem(
                    key.clone(),
                    "connector names may use only letters, digits, `_` and `-` (they become metric labels)".into(),
                );
            }
            check_delivery(&format!("{key}.delivery"), connector.delivery(), &mut problem);
            match connector {
                ConnectorSettings::Scim2(scim) => {
                    if scim.base_url.is_none() && scim.users_url.is_none() {
                        problem(format!("{key}.base_url"), "set base_url or users_url".into());
                    }
                    if scim.password == PasswordProvisioning::Default && scim.default_password.is_none() {
                        problem(
                            format!("{key}.default_password"),
                            "is required when password = \"default\"".into(),
                        );
                    }
                }
                ConnectorSettings::Google(google) => {
                    if google.domain.is_empty() || google.domain.contains('@') {
                        problem(
                            format!("{key}.domain"),
                            "must be a bare domain such as example.com".into(),
                        );
                    }
                    if !google.admin_email.contains('@') {
                        problem(format!("{key}.admin_email"), "must be an email address".into());
                    }
                    check_pattern(&format!("{key}.primary_email"), &google.primary_email, &mut problem);
                }
                ConnectorSettings::Salesforce(salesforce) => {
                    let version = salesforce.api_version.trim_start_matches('v');
                    if !salesforce.api_version.starts_with('v') || version.parse::<f32>().is_err() {
                        problem(format!("{key}.api_version"), "must look like v62.0".into());
                    }
                    if salesforce.provisioning_domain.is_empty() || salesforce.provisioning_domain.contains('@') {
                        problem(
                            format!("{key}.provisioning_domain"),
                            "must be a bare domain such as example.com".into(),
                        );
                    }
                    check_pattern(&format!("{key}.username"), &salesforce.username, &mut problem);
                }
            }
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

fn check_delivery(key: &str, delivery: &DeliverySettings, problem: &mut impl FnMut(String, String)) {
    if delivery.max_in_flight == 0 {
        problem(format!("{key}.max_in_flight"), "must be at least 1".into());
    }
    if delivery.max_attempts == 0 {
        problem(format!("{key}.max_attempts"), "must be at least 1".into());
    }
    if delivery.initial_backoff.is_zero() {
        problem(format!("{key}.initial_backoff"), "must be greater than zero".into());
    }
    if delivery.initial_backoff > delivery.max_backoff {
        problem(format!("{key}.initial_backoff"), "must not exceed max_backoff".into());
    }
    if delivery.circuit_breaker_failures > 0 && delivery.circuit_breaker_cooldown.is_zero() {
        problem(
            format!("{key}.circuit_breaker_cooldown"),
            "must be greater than zero".into(),
        );
    }
    if let Some(rate) = delivery.rate_limit_per_second {
        if !(rate.is_finite() && rate > 0.0) {
            problem(
                format!("{key}.rate_limit_per_second"),
                "must be a positive number".into(),
            );
        }
    }
}

fn check_pattern(key: &str, pattern: &AccountNamePattern, problem: &mut impl FnMut(String, String)) {
    if !pattern.pattern.contains("{UN}") {
        problem(format!("{key}.pattern"), "must contain {UN}".into());
    }
    let mut rest = pattern.pattern.as_str();
    while let Some(start) = rest.find('{') {
        let Some(end) = rest[start..].find('}') else {
            problem(format!("{key}.pattern"), "has an unclosed `{`".into());
            break;
        };
        let token = &rest[start..start + end + 1];
        if !["{UN}", "{UD}", "{TD}", "{IDP}"].contains(&token) {
            problem(
                format!("{key}.pattern"),
                format!("unknown token {token}; use {{UN}}, {{UD}}, {{TD}} or {{IDP}}"),
            );
        }
        rest = &rest[start + end + 1..];
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

/// Rewrites `<secret>_env` and `<secret>_file` keys into `<secret>` with the value read
/// from the environment or the file. Relative file paths are taken from the config
/// file's directory.
fn resolve_secret_references(
    node: &mut config::Value,
    path: &str,
    base_directory: Option<&Path>,
    environment: &BTreeMap<String, String>,
) -> Result<(), SettingsError> {
    match &mut node.kind {
        config::ValueKind::Table(table) => {
            let keys: Vec<String> = table.keys().cloned().collect();
            for key in keys {
                let child_path = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                let reference = SECRET_KEYS.iter().find_map(|secret| {
                    if key == format!("{secret}_env") {
                        Some((*secret, SecretReference::Environment))
                    } else if key == format!("{secret}_file") {
                        Some((*secret, SecretReference::File))
                    } else {
                        None
                    }
                });
                match reference {
                    Some((secret, kind)) => {
                        let target_path = if path.is_empty() {
                            secret.to_string()
                        } else {
                            format!("{path}.{secret}")
                        };
                        if table.contains_key(secret) {
                            return Err(SettingsError::Secret {
                                key: child_path,
                                message: format!("`{target_path}` is also set; give a secret one way only"),
                            });
                        }
                        let reference_value = table.remove(&key).expect("key listed above");
                        let reference_text = reference_value.into_string().map_err(|_| SettingsError::Secret {
                            key: child_path.clone(),
                            message: "must be a string".into(),
                        })?;
                        let resolved = match kind {
                            SecretReference::Environment => {
                                environment
                                    .get(&reference_text)
                                    .cloned()
                                    .ok_or_else(|| SettingsError::Secret {
                                        key: child_path.clone(),
                                        message: format!("environment variable `{reference_text}` is not set"),
                                    })?
                            }
                            SecretReference::File => {
                                let file = base_directory
                                    .map(|directory| directory.join(&reference_text))
                                    .unwrap_or_else(|| PathBuf::from(&reference_text));
                                let contents =
                                    std::fs::read_to_string(&file).map_err(|error| SettingsError::Secret {
                                        key: child_path.clone(),
                                        message: format!("cannot read `{}`: {error}", file.display()),
                                    })?;
                                contents.trim_end_matches(['\r', '\n']).to_string()
                            }
                        };
                        table.insert(
                            secret.to_string(),
                            config::Value::new(None, config::ValueKind::String(resolved)),
                        );
                    }
                    None => {
                        if let Some(child) = table.get_mut(&key) {
                            resolve_secret_references(child, &child_path, base_directory, environment)?;
                        }
                    }
                }
            }
        }
        config::ValueKind::Array(items) => {
            for (index, item) in items.iter_mut().enumerate() {
                resolve_secret_references(item, &format!("{path}[{index}]"), base_directory, environment)?;
            }
        }
        _ => {}
    }
    Ok(())
}

enum SecretReference {
    Environment,
    File,
}

// === Defaults ===

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
fn default_max_in_flight() -> usize {
    256
}
fn default_max_buffered_events() -> usize {
    4096
}
fn default_max_event_bytes() -> usize {
    1024 * 1024
}
fn default_shutdown_grace() -> Duration {
    Duration::from_secs(20)
}
fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}
fn default_log_level() -> String {
    "info".into()
}
fn default_connector_max_in_flight() -> usize {
    32
}
fn default_max_attempts() -> u32 {
    8
}
fn default_initial_backoff() -> Duration {
    Duration::from_millis(200)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(30)
}
fn default_max_elapsed() -> Duration {
    Duration::from_secs(300)
}
fn default_circuit_breaker_failures() -> u32 {
    5
}
fn default_circuit_breaker_cooldown() -> Duration {
    Duration::from_secs(10)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_pattern() -> String {
    "{UN}".into()
}
fn default_separator() -> String {
    "_".into()
}
fn default_google_scopes() -> Vec<String> {
    vec!["https://www.googleapis.com/auth/admin.directory.user".into()]
}
fn default_google_api_base_url() -> Url {
    Url::parse("https://admin.googleapis.com").expect("constant URL")
}
fn default_name_fallback() -> String {
    "{UN}".into()
}
fn default_org_unit_path() -> String {
    "/".into()
}
fn default_salesforce_login_url() -> Url {
    Url::parse("https://login.salesforce.com").expect("constant URL")
}
fn default_salesforce_api_version() -> String {
    "v62.0".into()
}
fn default_time_zone() -> String {
    "America/Los_Angeles".into()
}
fn default_locale() -> String {
    "en_US".into()
}
fn default_email_encoding() -> String {
    "UTF-8".into()
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

impl Default for PipelineSettings {
    fn default() -> Self {
        Self {
            max_in_flight: default_max_in_flight(),
            max_buffered_events: default_max_buffered_events(),
            max_event_bytes: default_max_event_bytes(),
            shutdown_grace: default_shutdown_grace(),
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
