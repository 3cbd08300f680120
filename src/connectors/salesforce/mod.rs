//! Salesforce users through the REST API.
//!
//! OAuth 2.0 with the client-credentials (recommended), JWT-bearer or legacy password
//! grant; the token and its `instance_url` are cached, and a `401 INVALID_SESSION_ID`
//! renews them once. Users are linked by `FederationIdentifier` = the source user id.
//! Salesforce users cannot be deleted: deprovisioning deactivates them, optionally
//! renaming the globally unique `Username` so it can be used again. Groups are permission
//! sets (`permission_sets.rs`).

mod permission_sets;
pub mod settings;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use reqwest::header::HeaderMap;
use reqwest::{RequestBuilder, StatusCode};
use serde_json::{json, Map, Value};

use crate::connectors::gate::Gate;
use crate::connectors::http::{build_client, json_body, status_error};
use crate::connectors::jwt::RsaSigner;
use crate::connectors::naming::{account_name, bare_user_name};
use crate::connectors::oauth::{request_jwt_bearer_token, request_token, send_authorised, Target, Token, TokenCache};
use crate::connectors::salesforce::settings::{SalesforceAuth, SalesforceSettings};
use crate::connectors::{Applied, BuildError, Connector, ConnectorError};
use crate::domain::{GroupChange, MembersChange, Operation, Outcome, UserChange};
use crate::metrics::Metrics;

/// `REQUEST_LIMIT_EXCEEDED` carries no Retry-After; the allocation is per 24 hours or
/// per concurrent long call, so wait long before trying again.
const REQUEST_LIMIT_BACKOFF: Duration = Duration::from_secs(30);
/// Salesforce's `Alias` limit.
pub const MAX_ALIAS_CHARACTERS: usize = 8;
/// Salesforce's `Username` limit.
const MAX_USERNAME_CHARACTERS: usize = 80;

pub struct SalesforceConnector {
    name: String,
    http: reqwest::Client,
    token_url: String,
    settings: SalesforceSettings,
    signer: Option<RsaSigner>,
    tokens: TokenCache,
    metrics: Arc<Metrics>,
    /// Told about `Sforce-Limit-Info`, to pace calls near the daily allocation.
    gate: Option<Arc<Gate>>,
    /// Permission set Ids by API Name: a set's Id never changes, so one query each.
    permission_set_ids: Mutex<HashMap<String, String>>,
}

/// A user as the lookup query returns it.
struct RemoteUser {
    id: String,
    fields: Map<String, Value>,
}

impl SalesforceConnector {
    pub fn new(
        name: &str,
        settings: &SalesforceSettings,
        metrics: Arc<Metrics>,
        gate: Option<Arc<Gate>>,
    ) -> Result<SalesforceConnector, BuildError> {
        let invalid = |message: String| BuildError::Invalid {
            name: name.to_string(),
            message,
        };
        let signer = match &settings.auth {
            SalesforceAuth::JwtBearer { private_key, .. } => Some(
                RsaSigner::from_pem(private_key.expose())
                    .map_err(|error| invalid(format!("auth.private_key: {error}")))?,
            ),
            SalesforceAuth::ClientCredentials { .. } | SalesforceAuth::Password { .. } => None,
        };
        for field in settings.fields.keys() {
            if !is_field_name(field) {
                return Err(invalid(format!("fields.{field}: not a Salesforce field name")));
            }
        }
        let token_url = format!(
            "{}/services/oauth2/token",
            settings.login_url.as_str().trim_end_matches('/')
        );
        Ok(SalesforceConnector {
            name: name.to_string(),
            http: build_client(name, &settings.http)?,
            token_url,
            settings: settings.clone(),
            signer,
            tokens: TokenCache::default(),
            metrics,
            gate,
            permission_set_ids: Mutex::default(),
        })
    }

    async fn apply_change(&self, change: &UserChange<'_>) -> Result<Applied, ConnectorError> {
        match change.operation {
            Operation::Create => self.create(change).await,
            Operation::Update => match self.find(change).await? {
                Some(remote) => {
                    self.patch_changes(&remote, self.desired(change)).await?;
                    Ok(Applied {
                        outcome: Outcome::Updated,
                        remote_id: Some(remote.id),
                    })
                }
                None => self.create(change).await,
            },
            Operation::Delete => self.deactivate(change).await,
        }
    }

    async fn create(&self, change: &UserChange<'_>) -> Result<Applied, ConnectorError> {
        let body = Value::Object(self.desired(change));
        let url = self.api_path("sobjects/User/");
        match self
            .send(|http, base| http.post(format!("{base}{url}")).json(&body))
            .await
        {
            Ok(created) => Ok(Applied {
                outcome: Outcome::Created,
                remote_id: Some(record_id(&created)?),
            }),
            Err(ConnectorError::Rejected { message, .. }) if message.starts_with("DUPLICATE_USERNAME") => {
                self.adopt(change).await
            }
            Err(error) => Err(error),
        }
    }

    /// The Username is taken. Ours (same FederationIdentifier): adopt and reactivate.
    /// Anyone else's, or another org's (Usernames are global): a permanent failure.
    async fn adopt(&self, change: &UserChange<'_>) -> Result<Applied, ConnectorError> {
        let username = self.username(change);
        let found = self
            .query_one(&format!(
                "SELECT Id, FederationIdentifier, IsActive FROM User WHERE Username = {}",
                soql_literal(&username)
            ))
            .await?;
        let Some(remote) = found else {
            return Err(ConnectorError::Conflict {
                status: Some(400),
                message: format!(
                    "Username {username} is taken, probably in another Salesforce org (Usernames are global)"
                ),
            });
        };
        let owner = remote
            .fields
            .get("FederationIdentifier")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if owner != change.user.id {
            return Err(ConnectorError::Conflict {
                status: Some(400),
                message: format!(
                    "Username {username} belongs to another user (FederationIdentifier `{owner}`), not to {}",
                    change.user.id
                ),
            });
        }
        // Converge everything we own; IsActive from the event reactivates it.
        let mut desired = self.desired(change);
        desired.remove("Username");
        self.write(&remote.id, Value::Object(desired)).await?;
        Ok(Applied {
            outcome: Outcome::Adopted,
            remote_id: Some(remote.id),
        })
    }

    async fn deactivate(&self, change: &UserChange<'_>) -> Result<Applied, ConnectorError> {
        let Some(remote) = self.find(change).await? else {
            return Ok(Applied {
                outcome: Outcome::AlreadyAbsent,
                remote_id: None,
            });
        };
        if remote.fields.get("IsActive") == Some(&Value::Bool(false)) {
            return Ok(Applied {
                outcome: Outcome::AlreadyAbsent,
                remote_id: Some(remote.id),
            });
        }
        let mut changes = json!({"IsActive": false});
        if self.settings.free_username_on_deactivate {
            if let Some(username) = remote.fields.get("Username").and_then(Value::as_str) {
                changes["Username"] = Value::String(freed_username(username));
            }
        }
        self.write(&remote.id, changes).await?;
        Ok(Applied {
            outcome: Outcome::Deactivated,
            remote_id: Some(remote.id),
        })
    }

    /// PATCHes only the fields whose value differs from Salesforce's.
    async fn patch_changes(&self, remote: &RemoteUser, desired: Map<String, Value>) -> Result<(), ConnectorError> {
        let changes: Map<String, Value> = desired
            .into_iter()
            .filter(|(field, value)| remote.fields.get(field) != Some(value))
            .collect();
        if changes.is_empty() {
            return Ok(());
        }
        self.write(&remote.id, Value::Object(changes)).await
    }

    async fn write(&self, id: &str, changes: Value) -> Result<(), ConnectorError> {
        let url = self.api_path(&format!("sobjects/User/{}", path_segment(id)));
        self.send(|http, base| http.patch(format!("{base}{url}")).json(&changes))
            .await
            .map(|_| ())
    }

    /// By the record Id the provisioning state remembers, else by FederationIdentifier
    /// (our user id).
    async fn find(&self, change: &UserChange<'_>) -> Result<Option<RemoteUser>, ConnectorError> {
        if let Some(id) = change.remote_id {
            let by_id = format!(
                "SELECT {} FROM User WHERE Id = {}",
                self.fields().join(", "),
                soql_literal(id)
            );
            if let Some(remote) = self.query_one(&by_id).await? {
                return Ok(Some(remote));
            }
            tracing::info!(connector = %self.name, remote_id = id, "The stored remote id is gone; searching.");
        }
        self.find_by_federation_id(&change.user.id).await
    }

    async fn find_by_federation_id(&self, federation_id: &str) -> Result<Option<RemoteUser>, ConnectorError> {
        self.query_one(&format!(
            "SELECT {} FROM User WHERE FederationIdentifier = {}",
            self.fields().join(", "),
            soql_literal(federation_id)
        ))
        .await
    }

    /// The User fields read for a comparison: ours and the configured extra ones.
    fn fields(&self) -> Vec<&str> {
        let mut fields: Vec<&str> = vec![
            "Id",
            "Username",
            "LastName",
            "FirstName",
            "Email",
            "Alias",
            "IsActive",
            "FederationIdentifier",
            "TimeZoneSidKey",
            "LocaleSidKey",
            "EmailEncodingKey",
            "LanguageLocaleKey",
            "ProfileId",
        ];
        for field in self.settings.fields.keys() {
            if !fields.contains(&field.as_str()) {
                fields.push(field);
            }
        }
        fields
    }

    async fn query_one(&self, soql: &str) -> Result<Option<RemoteUser>, ConnectorError> {
        let records = self.query_records(soql).await?;
        let Some(record) = records.first() else {
            return Ok(None);
        };
        let mut fields = record.as_object().cloned().unwrap_or_default();
        fields.remove("attributes");
        Ok(Some(RemoteUser {
            id: record_id(record)?,
            fields,
        }))
    }

    /// The records of the first batch a query answers (2,000 unless the org says less,
    /// never under 200): our queries ask for fewer.
    async fn query_records(&self, soql: &str) -> Result<Vec<Value>, ConnectorError> {
        let url = self.api_path("query");
        let mut result = self
            .send(|http, base| http.get(format!("{base}{url}")).query(&[("q", soql)]))
            .await?;
        match result.get_mut("records").map(Value::take) {
            Some(Value::Array(records)) => Ok(records),
            _ => Ok(Vec::new()),
        }
    }

    /// The User fields we own.
    fn desired(&self, change: &UserChange<'_>) -> Map<String, Value> {
        let user = &change.user;
        let settings = &self.settings;
        let bare_name = bare_user_name(&user.user_name);
        let given_name = user.name.as_ref().and_then(|name| name.given_name.clone());
        let family_name = user
            .name
            .as_ref()
            .and_then(|name| name.family_name.clone())
            .filter(|name| !name.trim().is_empty())
            .unwrap_or_else(|| bare_name.to_string());
        let username = self.username(change);
        let email = user
            .primary_email()
            .map(str::to_string)
            .unwrap_or_else(|| username.clone());
        let mut fields = Map::new();
        let mut set = |field: &str, value: Value| {
            fields.insert(field.to_string(), value);
        };
        set("Username", json!(username));
        set("LastName", json!(family_name));
        if let Some(given_name) = &given_name {
            set("FirstName", json!(given_name));
        }
        set("Email", json!(email));
        set("Alias", json!(alias(given_name.as_deref(), &family_name, bare_name)));
        set("FederationIdentifier", json!(user.id));
        set("IsActive", json!(user.active.unwrap_or(true)));
        set("TimeZoneSidKey", json!(settings.time_zone_sid_key));
        set("LocaleSidKey", json!(settings.locale_sid_key));
        set("EmailEncodingKey", json!(settings.email_encoding_key));
        set("LanguageLocaleKey", json!(settings.language_locale_key));
        set("ProfileId", json!(settings.profile_id));
        if !settings.fields.is_empty() {
            let source = serde_json::to_value(user).unwrap_or(Value::Null);
            for (field, path) in &settings.fields {
                let found = path.split('.').try_fold(&source, |node, segment| node.get(segment));
                if let Some(value) = found.filter(|value| !value.is_null()) {
                    set(field, value.clone());
                }
            }
        }
        fields
    }

    fn username(&self, change: &UserChange<'_>) -> String {
        account_name(&self.settings.username, change, &self.settings.provisioning_domain)
    }

    /// `/services/data/vNN.0/{path}`; the host comes from the token's `instance_url`.
    fn api_path(&self, path: &str) -> String {
        format!("/services/data/{}/{path}", self.settings.api_version)
    }

    /// Sends with the cached token against its `instance_url`; `INVALID_SESSION_ID`
    /// renews the token once and retries.
    async fn send(&self, build: impl Fn(&reqwest::Client, &str) -> RequestBuilder) -> Result<Value, ConnectorError> {
        let token = || async { self.token().await.map(Some) };
        let request = |token: Option<&Token>| {
            let instance = token
                .and_then(|token| token.instance_url.as_deref())
                .unwrap_or_default();
            build(&self.http, instance.trim_end_matches('/'))
        };
        let response = send_authorised(&self.tokens, token, request, self).await?;
        json_body(response).await
    }

    /// `Sforce-Limit-Info: api-usage=25/15000` → gauges, to pace by and alert on.
    fn record_limit_info(&self, headers: &HeaderMap) {
        let Some(info) = headers.get("sforce-limit-info").and_then(|value| value.to_str().ok()) else {
            return;
        };
        if let Some((used, limit)) = parse_limit_info(info) {
            self.metrics
                .salesforce_api_usage
                .with_label_values(&[self.name.as_str()])
                .set(used as f64);
            self.metrics
                .salesforce_api_limit
                .with_label_values(&[self.name.as_str()])
                .set(limit as f64);
            if let Some(gate) = &self.gate {
                gate.report_quota(used, limit);
            }
        }
    }

    async fn token(&self) -> Result<Token, ConnectorError> {
        self.tokens
            .get(|| async {
                let token = match &self.settings.auth {
                    SalesforceAuth::ClientCredentials {
                        client_id,
                        client_secret,
                    } => {
                        request_token(
                            &self.http,
                            &self.token_url,
                            &[
                                ("grant_type", "client_credentials"),
                                ("client_id", client_id.as_str()),
                                ("client_secret", client_secret.expose()),
                            ],
                            None,
                        )
                        .await?
                    }
                    SalesforceAuth::JwtBearer {
                        client_id, username, ..
                    } => {
                        let now = chrono::Utc::now().timestamp();
                        let claims = json!({
                            "iss": client_id,
                            "sub": username,
                            "aud": self.settings.login_url.as_str().trim_end_matches('/'),
                            "exp": now + 180,
                        });
                        let signer = self.signer.as_ref().expect("a JWT-bearer connector has a signer");
                        request_jwt_bearer_token(&self.http, &self.token_url, signer, &claims).await?
                    }
                    SalesforceAuth::Password {
                        client_id,
                        client_secret,
                        username,
                        password,
                        security_token,
                    } => {
                        // Salesforce wants the security token appended to the password.
                        let password_with_token = format!(
                            "{}{}",
                            password.expose(),
                            security_token.as_ref().map(|token| token.expose()).unwrap_or_default()
                        );
                        request_token(
                            &self.http,
                            &self.token_url,
                            &[
                                ("grant_type", "password"),
                                ("client_id", client_id.as_str()),
                                ("client_secret", client_secret.expose()),
                                ("username", username.as_str()),
                                ("password", password_with_token.as_str()),
                            ],
                            None,
                        )
                        .await?
                    }
                };
                if token.instance_url.is_none() {
                    return Err(ConnectorError::InvalidResponse {
                        status: None,
                        message: "the token response has no instance_url".into(),
                    });
                }
                Ok(token)
            })
            .await
    }
}

impl Target for SalesforceConnector {
    /// Salesforce's session-expired signal is `401 INVALID_SESSION_ID`; another 401 is
    /// not cured by a new token, so it is not renewed for.
    fn session_expired(&self, status: StatusCode, body: &str) -> bool {
        status == StatusCode::UNAUTHORIZED && error_code(body).as_deref() == Some("INVALID_SESSION_ID")
    }

    fn observe(&self, headers: &HeaderMap) {
        self.record_limit_info(headers);
    }

    fn classify(&self, status: StatusCode, headers: &HeaderMap, body: &str) -> ConnectorError {
        classify(status, headers, body)
    }
}

impl Connector for SalesforceConnector {
    fn apply<'a>(&'a self, change: UserChange<'a>) -> BoxFuture<'a, Result<Applied, ConnectorError>> {
        Box::pin(async move { self.apply_change(&change).await })
    }

    fn apply_group<'a>(&'a self, change: GroupChange<'a>) -> BoxFuture<'a, Result<Applied, ConnectorError>> {
        Box::pin(async move { self.apply_group_change(&change).await })
    }

    fn apply_members<'a>(&'a self, change: MembersChange<'a>) -> BoxFuture<'a, Result<(), ConnectorError>> {
        Box::pin(async move { self.apply_members_change(&change).await })
    }

    /// sObject Collections take 200 records (or ids) a request.
    fn max_members_per_request(&self) -> usize {
        permission_sets::COLLECTION_LIMIT
    }
}

pub fn build(
    name: &str,
    settings: &SalesforceSettings,
    metrics: Arc<Metrics>,
    gate: Option<Arc<Gate>>,
) -> Result<Arc<dyn Connector>, BuildError> {
    Ok(Arc::new(SalesforceConnector::new(name, settings, metrics, gate)?))
}

/// The first `errorCode` of Salesforce's error array, when the body is one.
fn error_code(body: &str) -> Option<String> {
    let parsed: Value = serde_json::from_str(body).ok()?;
    parsed
        .pointer("/0/errorCode")
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// Salesforce's error array: `[{"message", "errorCode", "fields"}]`.
fn classify(status: StatusCode, headers: &HeaderMap, body: &str) -> ConnectorError {
    let parsed: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let first = parsed.as_array().and_then(|errors| errors.first());
    let error_code = first
        .and_then(|error| error.get("errorCode"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let message = first
        .and_then(|error| error.get("message"))
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| format!("HTTP {}", status.as_u16()));
    let fields = first
        .and_then(|error| error.get("fields"))
        .and_then(Value::as_array)
        .filter(|fields| !fields.is_empty())
        .map(|fields| {
            format!(
                " (fields: {})",
                fields.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", ")
            )
        })
        .unwrap_or_default();
    let described = if error_code.is_empty() {
        message
    } else {
        format!("{error_code}: {message}{fields}")
    };
    match error_code.as_str() {
        "REQUEST_LIMIT_EXCEEDED" => ConnectorError::Throttled {
            status: Some(status.as_u16()),
            message: described,
            retry_after: Some(REQUEST_LIMIT_BACKOFF),
        },
        _ => status_error(status, headers, described),
    }
}

/// A SOQL string literal: quoted, with Salesforce's escape sequences, so a hostile value
/// can never end the literal and add conditions.
pub fn soql_literal(value: &str) -> String {
    let mut literal = String::with_capacity(value.len() + 2);
    literal.push('\'');
    for character in value.chars() {
        match character {
            '\\' => literal.push_str("\\\\"),
            '\'' => literal.push_str("\\'"),
            '"' => literal.push_str("\\\""),
            '\n' => literal.push_str("\\n"),
            '\r' => literal.push_str("\\r"),
            '\t' => literal.push_str("\\t"),
            '\u{8}' => literal.push_str("\\b"),
            '\u{c}' => literal.push_str("\\f"),
            other => literal.push(other),
        }
    }
    literal.push('\'');
    literal
}

/// An `Alias` of at most 8 characters: first initial and family name, else the user name.
fn alias(given_name: Option<&str>, family_name: &str, user_name: &str) -> String {
    let cleaned = |text: &str| {
        text.chars()
            .filter(|c| c.is_alphanumeric())
            .collect::<String>()
            .to_lowercase()
    };
    let initial = given_name.map(cleaned).and_then(|name| name.chars().next());
    let mut alias: String = initial
        .into_iter()
        .chain(cleaned(family_name).chars())
        .take(MAX_ALIAS_CHARACTERS)
        .collect();
    if alias.is_empty() {
        alias = cleaned(user_name).chars().take(MAX_ALIAS_CHARACTERS).collect();
    }
    if alias.is_empty() {
        alias = "user".into();
    }
    alias
}

/// Renames a Username so it can be reused (WSO2 does this on delete), staying
/// email-shaped and within 80 characters.
fn freed_username(username: &str) -> String {
    let tag = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let renamed = format!("deactivated.{tag}.{username}");
    if renamed.chars().count() <= MAX_USERNAME_CHARACTERS {
        return renamed;
    }
    let (local, domain) = username.rsplit_once('@').unwrap_or((username, "invalid"));
    let room = MAX_USERNAME_CHARACTERS.saturating_sub(domain.len() + 22);
    format!(
        "deactivated.{tag}.{}@{domain}",
        local.chars().take(room).collect::<String>()
    )
}

fn parse_limit_info(info: &str) -> Option<(u64, u64)> {
    let usage = info
        .split(',')
        .map(str::trim)
        .find_map(|part| part.strip_prefix("api-usage="))?;
    let (used, limit) = usage.split_once('/')?;
    Some((used.trim().parse().ok()?, limit.trim().parse().ok()?))
}

fn is_field_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn path_segment(id: &str) -> String {
    url::form_urlencoded::byte_serialize(id.as_bytes()).collect()
}

fn record_id(record: &Value) -> Result<String, ConnectorError> {
    record
        .get("id")
        .or_else(|| record.get("Id"))
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| ConnectorError::InvalidResponse {
            status: None,
            message: "the Salesforce record has no Id".into(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soql_literals_cannot_be_escaped() {
        assert_eq!(soql_literal("alice@example.com"), "'alice@example.com'");
        assert_eq!(soql_literal("x' OR Username != 'y"), r"'x\' OR Username != \'y'");
        assert_eq!(soql_literal(r"back\slash"), r"'back\\slash'");
        assert_eq!(soql_literal("line\nbreak"), r"'line\nbreak'");
    }

    #[test]
    fn aliases_fit_eight_characters() {
        assert_eq!(alias(Some("Alice"), "Adams-Smith", "alice"), "aadamssm");
        assert_eq!(alias(None, "Ng", "x"), "ng");
        assert_eq!(alias(None, "", "bob.builder"), "bobbuild");
        assert_eq!(alias(Some("Élodie"), "Ünal", "e"), "éünal");
        assert!(alias(Some("A"), "verylongfamilyname", "u").chars().count() <= 8);
    }

    #[test]
    fn record_ids_stay_one_path_segment() {
        assert_eq!(path_segment("005000000000001AAA"), "005000000000001AAA");
        assert_eq!(
            path_segment("../../sobjects/Account/x?y"),
            "..%2F..%2Fsobjects%2FAccount%2Fx%3Fy"
        );
    }

    #[test]
    fn freed_usernames_stay_valid() {
        let freed = freed_username("alice@crm.example.com");
        assert!(
            freed.starts_with("deactivated.") && freed.ends_with(".alice@crm.example.com"),
            "{freed}"
        );
        let long = format!("{}@crm.example.com", "a".repeat(75));
        let freed = freed_username(&long);
        assert!(
            freed.chars().count() <= 80 && freed.ends_with("@crm.example.com"),
            "{freed}"
        );
    }

    #[test]
    fn errors_are_classified() {
        let limit = r#"[{"message":"TotalRequests Limit exceeded.","errorCode":"REQUEST_LIMIT_EXCEEDED"}]"#;
        let error = classify(StatusCode::FORBIDDEN, &HeaderMap::new(), limit);
        assert!(error.is_retryable());
        assert_eq!(error.retry_after(), Some(REQUEST_LIMIT_BACKOFF));
        let missing = r#"[{"message":"Required fields are missing: [LastName]","errorCode":"REQUIRED_FIELD_MISSING","fields":["LastName"]}]"#;
        let error = classify(StatusCode::BAD_REQUEST, &HeaderMap::new(), missing);
        assert!(!error.is_retryable());
        assert_eq!(
            error.to_string(),
            "the target rejected the call with HTTP 400: REQUIRED_FIELD_MISSING: Required fields are missing: [LastName] (fields: LastName)"
        );
        let expired = r#"[{"message":"Session expired or invalid","errorCode":"INVALID_SESSION_ID"}]"#;
        assert_eq!(error_code(expired).as_deref(), Some("INVALID_SESSION_ID"));
        assert_eq!(error_code("not json"), None);
        assert_eq!(parse_limit_info("api-usage=25/15000"), Some((25, 15000)));
        assert_eq!(
            parse_limit_info("per-app-api-usage=1/10, api-usage=7/100"),
            Some((7, 100))
        );
    }
}
