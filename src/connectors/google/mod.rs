//! Google Workspace users and groups through the Admin SDK Directory API.
//!
//! Auth is a service account with domain-wide delegation: an RS256 JWT assertion
//! (RFC 7523) signed with the key from Google's standard JSON key file, exchanged for a
//! token that is cached until 60 s before expiry and renewed once on a 401. Users and
//! groups have a token each (`Api`), so groups need no change to a delegation that
//! grants only the user scope until the first group event.
//!
//! Unlike WSO2's connector, users are keyed by Google's immutable `id` (found through
//! `externalIds`, which carry the source user id), updates PATCH only what changed and
//! never touch the password, and the key never touches the disk. Groups and their
//! members are in `groups.rs`.

mod groups;
pub mod settings;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use reqwest::header::HeaderMap;
use reqwest::{RequestBuilder, StatusCode};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use url::Url;

use crate::connectors::google::settings::{GoogleDeprovision, GoogleSettings};
use crate::connectors::http::{build_client, json_body, retry_after, status_error};
use crate::connectors::jwt::RsaSigner;
use crate::connectors::naming::{account_name, bare_user_name};
use crate::connectors::oauth::{request_jwt_bearer_token, send_authorised, Target, Token, TokenCache};
use crate::connectors::{deleted_or_absent, Applied, BuildError, Connector, ConnectorError};
use crate::domain::{GroupChange, MembersChange, Operation, Outcome, UserChange};
use crate::secret::Secret;

/// Google's limit for `name.givenName` and `name.familyName`.
pub const MAX_NAME_CHARACTERS: usize = 60;
/// The `externalIds` entry that carries our source user id.
const EXTERNAL_ID_TYPE: &str = "organization";
/// Google's backoff guidance starts at one second.
const MIN_RATE_LIMIT_BACKOFF: Duration = Duration::from_secs(1);

/// The fields of a service-account key file we use.
#[derive(Deserialize)]
struct ServiceAccountKey {
    client_email: String,
    private_key: String,
    #[serde(default)]
    token_uri: Option<String>,
}

pub struct GoogleConnector {
    http: reqwest::Client,
    users_url: Url,
    groups_url: Url,
    token_url: String,
    client_email: String,
    signer: RsaSigner,
    settings: GoogleSettings,
    /// The token for the users API (`settings.scopes`).
    tokens: TokenCache,
    /// The token for the groups and members APIs (`settings.group_scopes`).
    group_tokens: TokenCache,
    /// Whether `members.insert` is sent the member's user id. Cleared for good the first
    /// time Google asks for the email instead (see `groups.rs`).
    member_insert_by_id: AtomicBool,
}

/// Which part of the Directory API a call goes to, and so which token it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    Users,
    Groups,
}

/// A user as found in the directory.
struct RemoteUser {
    id: String,
    resource: Value,
}

impl GoogleConnector {
    pub fn new(name: &str, settings: &GoogleSettings) -> Result<GoogleConnector, BuildError> {
        let invalid = |message: String| BuildError::Invalid {
            name: name.to_string(),
            message,
        };
        let key: ServiceAccountKey = serde_json::from_str(settings.service_account_key.expose()).map_err(|error| {
            // serde's message names the missing field; it never quotes the key material.
            invalid(format!(
                "service_account_key is not a Google service-account key file: {error}"
            ))
        })?;
        let signer = RsaSigner::from_pem(&key.private_key)
            .map_err(|error| invalid(format!("service_account_key private_key: {error}")))?;
        let token_url = settings
            .token_url
            .as_ref()
            .map(Url::to_string)
            .or(key.token_uri)
            .ok_or_else(|| invalid("no token_url, and the key file has no token_uri".into()))?;
        let directory_url = |collection: &str| {
            let mut url = settings.api_base_url.clone();
            url.path_segments_mut()
                .map_err(|_| invalid("api_base_url cannot be a base URL".into()))?
                .pop_if_empty()
                .extend(["admin", "directory", "v1", collection]);
            Ok(url)
        };
        Ok(GoogleConnector {
            http: build_client(name, &settings.http)?,
            users_url: directory_url("users")?,
            groups_url: directory_url("groups")?,
            token_url,
            client_email: key.client_email,
            signer,
            settings: settings.clone(),
            tokens: TokenCache::default(),
            group_tokens: TokenCache::default(),
            member_insert_by_id: AtomicBool::new(true),
        })
    }

    async fn apply_change(&self, change: &UserChange<'_>) -> Result<Applied, ConnectorError> {
        match change.operation {
            Operation::Create => self.create(change).await,
            Operation::Update => match self.find(change).await? {
                Some(remote) => self.patch_changes(&remote, change).await.map(|()| Applied {
                    outcome: Outcome::Updated,
                    remote_id: Some(remote.id),
                }),
                None => self.create(change).await,
            },
            Operation::Delete => self.delete(change).await,
        }
    }

    async fn create(&self, change: &UserChange<'_>) -> Result<Applied, ConnectorError> {
        let mut body = self.desired(change);
        // A fresh strong password per user, never reused, never logged. Users sign in
        // through the identity platform (SSO) or reset it.
        body["password"] = Value::String(random_password().expose().to_string());
        body["changePasswordAtNextLogin"] = Value::Bool(self.settings.change_password_at_next_login);
        let url = self.users_url.clone();
        match self.send(Api::Users, |http| http.post(url.clone()).json(&body)).await {
            Ok(created) => Ok(Applied {
                outcome: Outcome::Created,
                remote_id: Some(resource_id(&created, "user")?),
            }),
            Err(ConnectorError::Rejected { status: 409, .. }) => {
                // `duplicate`: the account exists. Take it over.
                let primary_email = self.primary_email(change);
                let remote = self
                    .get(&primary_email)
                    .await?
                    .ok_or_else(|| ConnectorError::Conflict {
                        status: Some(409),
                        message: format!("Google reports {primary_email} exists, but it cannot be read"),
                    })?;
                self.patch_changes(&remote, change).await?;
                Ok(Applied {
                    outcome: Outcome::Adopted,
                    remote_id: Some(remote.id),
                })
            }
            Err(error) => Err(error),
        }
    }

    async fn delete(&self, change: &UserChange<'_>) -> Result<Applied, ConnectorError> {
        let Some(remote) = self.find(change).await? else {
            return Ok(Applied {
                outcome: Outcome::AlreadyAbsent,
                remote_id: None,
            });
        };
        let url = self.user_url(&remote.id);
        match self.settings.deprovision {
            GoogleDeprovision::Delete => {
                deleted_or_absent(self.send(Api::Users, |http| http.delete(url.clone())).await, remote.id)
            }
            GoogleDeprovision::Suspend => {
                let body = json!({"suspended": true});
                self.send(Api::Users, |http| http.patch(url.clone()).json(&body))
                    .await?;
                Ok(Applied {
                    outcome: Outcome::Deactivated,
                    remote_id: Some(remote.id),
                })
            }
        }
    }

    /// PATCHes the fields whose desired value differs from the directory's. Never the
    /// password (WSO2 reset it on every update).
    async fn patch_changes(&self, remote: &RemoteUser, change: &UserChange<'_>) -> Result<(), ConnectorError> {
        let desired = self.desired(change);
        let mut changes = Map::new();
        if let Value::Object(fields) = &desired {
            for (field, value) in fields {
                let current = remote.resource.get(field);
                let differs = match (field.as_str(), current) {
                    // Google adds fields (fullName) to `name`: compare only ours.
                    ("name", Some(current)) => ["givenName", "familyName"]
                        .iter()
                        .any(|part| current.get(part) != value.get(part)),
                    ("externalIds", Some(current)) => !current.as_array().is_some_and(|ids| {
                        value
                            .as_array()
                            .is_some_and(|wanted| wanted.iter().all(|id| ids.contains(id)))
                    }),
                    (_, current) => current != Some(value),
                };
                if differs {
                    changes.insert(field.clone(), value.clone());
                }
            }
        }
        if changes.is_empty() {
            return Ok(());
        }
        let url = self.user_url(&remote.id);
        let body = Value::Object(changes);
        self.send(Api::Users, |http| http.patch(url.clone()).json(&body))
            .await
            .map(|_| ())
    }

    /// By the stored remote id, then the immutable link (`externalIds` holds our user
    /// id), then the primary email the pattern gives.
    async fn find(&self, change: &UserChange<'_>) -> Result<Option<RemoteUser>, ConnectorError> {
        // The id the provisioning state remembers: one read, and it survives renames.
        if let Some(id) = change.remote_id {
            if let Some(remote) = self.get(id).await? {
                return Ok(Some(remote));
            }
            tracing::info!(remote_id = id, "The stored remote id is gone; searching.");
        }
        let url = self.users_url.clone();
        let query = format!("externalId:{}", search_literal(&change.user.id));
        let list = self
            .send(Api::Users, |http| {
                http.get(url.clone()).query(&[
                    ("customer", "my_customer"),
                    ("query", query.as_str()),
                    ("maxResults", "2"),
                ])
            })
            .await?;
        if let Some(found) = list
            .get("users")
            .and_then(Value::as_array)
            .and_then(|users| users.first())
        {
            return Ok(Some(RemoteUser {
                id: resource_id(found, "user")?,
                resource: found.clone(),
            }));
        }
        self.get(&self.primary_email(change)).await
    }

    async fn get(&self, user_key: &str) -> Result<Option<RemoteUser>, ConnectorError> {
        let url = self.user_url(user_key);
        match self.send(Api::Users, |http| http.get(url.clone())).await {
            Ok(resource) => Ok(Some(RemoteUser {
                id: resource_id(&resource, "user")?,
                resource,
            })),
            Err(ConnectorError::Rejected { status: 404, .. }) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// The fields we own, as a Directory API User body (no password).
    fn desired(&self, change: &UserChange<'_>) -> Value {
        let user = &change.user;
        let bare_name = bare_user_name(&user.user_name);
        let pick = |value: Option<&String>, fallback: &str| {
            let chosen = value
                .map(String::as_str)
                .filter(|value| !value.trim().is_empty())
                .map(str::to_string)
                .unwrap_or_else(|| fallback.replace("{UN}", bare_name));
            truncate_characters(&chosen, MAX_NAME_CHARACTERS)
        };
        let name = user.name.as_ref();
        json!({
            "primaryEmail": self.primary_email(change),
            "name": {
                "givenName": pick(name.and_then(|name| name.given_name.as_ref()), &self.settings.given_name_fallback),
                "familyName": pick(name.and_then(|name| name.family_name.as_ref()), &self.settings.family_name_fallback),
            },
            "suspended": !user.active.unwrap_or(true),
            "orgUnitPath": self.settings.org_unit_path,
            "externalIds": [{"type": EXTERNAL_ID_TYPE, "value": user.id}],
        })
    }

    fn primary_email(&self, change: &UserChange<'_>) -> String {
        account_name(&self.settings.primary_email, change, &self.settings.domain)
    }

    fn user_url(&self, user_key: &str) -> Url {
        let mut url = self.users_url.clone();
        url.path_segments_mut()
            .expect("users URL is hierarchical")
            .push(user_key);
        url
    }

    /// Sends with the bearer token for `api`; a 401 renews the token once and retries.
    async fn send(
        &self,
        api: Api,
        build: impl Fn(&reqwest::Client) -> RequestBuilder,
    ) -> Result<Value, ConnectorError> {
        let token = || async { self.token(api).await.map(Some) };
        let response = send_authorised(self.token_cache(api), token, |_| build(&self.http), self).await?;
        json_body(response).await
    }

    fn token_cache(&self, api: Api) -> &TokenCache {
        match api {
            Api::Users => &self.tokens,
            Api::Groups => &self.group_tokens,
        }
    }

    async fn token(&self, api: Api) -> Result<Token, ConnectorError> {
        let scopes = match api {
            Api::Users => &self.settings.scopes,
            Api::Groups => &self.settings.group_scopes,
        };
        self.token_cache(api)
            .get(|| {
                let now = chrono::Utc::now().timestamp();
                let claims = json!({
                    "iss": self.client_email,
                    "sub": self.settings.admin_email,
                    "scope": scopes.join(" "),
                    "aud": self.token_url,
                    "iat": now,
                    "exp": now + 3600,
                });
                async move { request_jwt_bearer_token(&self.http, &self.token_url, &self.signer, &claims).await }
            })
            .await
    }
}

impl Target for GoogleConnector {
    fn classify(&self, status: StatusCode, headers: &HeaderMap, body: &str) -> ConnectorError {
        classify(status, headers, body)
    }
}

impl Connector for GoogleConnector {
    fn apply<'a>(&'a self, change: UserChange<'a>) -> BoxFuture<'a, Result<Applied, ConnectorError>> {
        Box::pin(async move { self.apply_change(&change).await })
    }

    fn apply_group<'a>(&'a self, change: GroupChange<'a>) -> BoxFuture<'a, Result<Applied, ConnectorError>> {
        Box::pin(async move { self.apply_group_change(&change).await })
    }

    fn apply_members<'a>(&'a self, change: MembersChange<'a>) -> BoxFuture<'a, Result<(), ConnectorError>> {
        Box::pin(async move { self.apply_members_change(&change).await })
    }

    /// Google has no call that adds or removes several members, so a request is one
    /// member. One member per call also keeps the gate's rate limit (Google's quota is
    /// per request) and concurrency cap counting real requests.
    fn max_members_per_request(&self) -> usize {
        1
    }
}

pub fn build(name: &str, settings: &GoogleSettings) -> Result<Arc<dyn Connector>, BuildError> {
    Ok(Arc::new(GoogleConnector::new(name, settings)?))
}

/// Google's error body: `{"error": {"code", "message", "errors": [{"reason", …}]}}`.
/// Rate limits arrive as 403 with a reason, so the status alone would misclassify them.
fn classify(status: StatusCode, headers: &HeaderMap, body: &str) -> ConnectorError {
    let parsed: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let reason = parsed
        .pointer("/error/errors/0/reason")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let message = parsed
        .pointer("/error/message")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| format!("HTTP {}", status.as_u16()));
    let described = if reason.is_empty() {
        message
    } else {
        format!("{reason}: {message}")
    };
    match reason.as_str() {
        "userRateLimitExceeded" | "quotaExceeded" | "rateLimitExceeded" => ConnectorError::Throttled {
            status: Some(status.as_u16()),
            message: described,
            retry_after: Some(
                retry_after(headers)
                    .unwrap_or(MIN_RATE_LIMIT_BACKOFF)
                    .max(MIN_RATE_LIMIT_BACKOFF),
            ),
        },
        "backendError" => ConnectorError::Server {
            status: status.as_u16(),
            message: described,
            retry_after: retry_after(headers),
        },
        _ => status_error(status, headers, described),
    }
}

/// A value for the Directory API's search syntax: single-quoted, with `\` and `'`
/// escaped, so a hostile id cannot add search terms.
fn search_literal(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// The immutable `id` of a user or group resource (`kind` names which, for the error).
fn resource_id(resource: &Value, kind: &str) -> Result<String, ConnectorError> {
    resource
        .get("id")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| ConnectorError::InvalidResponse {
            status: None,
            message: format!("the Google {kind} has no id"),
        })
}

fn truncate_characters(value: &str, limit: usize) -> String {
    value.chars().take(limit).collect()
}

fn random_password() -> Secret {
    use rand::distr::{Alphanumeric, SampleString};
    // 32 alphanumerics: ~190 bits. Google requires 8 to 100 characters.
    Secret::new(Alphanumeric.sample_string(&mut rand::rng(), 32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn google_rate_limits_are_retryable_with_a_one_second_floor() {
        let body = r#"{"error":{"code":403,"message":"Rate Limit Exceeded","errors":[{"domain":"usageLimits","reason":"userRateLimitExceeded","message":"Rate Limit Exceeded"}]}}"#;
        let error = classify(StatusCode::FORBIDDEN, &HeaderMap::new(), body);
        assert!(error.is_retryable(), "{error:?}");
        assert_eq!(error.retry_after(), Some(Duration::from_secs(1)));
        let forbidden = r#"{"error":{"code":403,"message":"Not Authorized to access this resource/api","errors":[{"reason":"forbidden"}]}}"#;
        let error = classify(StatusCode::FORBIDDEN, &HeaderMap::new(), forbidden);
        assert!(!error.is_retryable());
        assert!(error.to_string().contains("forbidden"), "{error}");
        let backend = r#"{"error":{"code":503,"message":"Backend Error","errors":[{"reason":"backendError"}]}}"#;
        assert!(classify(StatusCode::SERVICE_UNAVAILABLE, &HeaderMap::new(), backend).is_retryable());
        let invalid = r#"{"error":{"code":400,"message":"Invalid Given/Family Name","errors":[{"reason":"invalid"}]}}"#;
        let error = classify(StatusCode::BAD_REQUEST, &HeaderMap::new(), invalid);
        assert!(!error.is_retryable());
        assert!(
            error.to_string().contains("invalid: Invalid Given/Family Name"),
            "{error}"
        );
    }

    #[test]
    fn search_literals_are_quoted_and_escaped() {
        assert_eq!(search_literal("abc"), "'abc'");
        assert_eq!(search_literal("a' orgUnitPath='/"), r"'a\' orgUnitPath=\'/'");
    }

    #[test]
    fn names_are_cut_at_sixty_characters_not_bytes() {
        let long: String = "é".repeat(70);
        assert_eq!(truncate_characters(&long, MAX_NAME_CHARACTERS).chars().count(), 60);
    }
}
