//! An in-memory SCIM 2.0 server: Users with `eq` filters, PATCH, PUT, ETags,
//! uniqueness on `userName` and `externalId`, optional bearer or OAuth 2.0
//! client-credentials protection, and the shared latency and fault injection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::devtools::emulators::{bearer_token, spawn, with_faults, Control, Dialect, Faults, TokenStore};

const USER_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:User";
const ERROR_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:Error";
const LIST_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:ListResponse";

#[derive(Debug, Clone)]
pub struct ScimEmulatorSettings {
    pub faults: Faults,
    /// Accept only this static bearer token.
    pub bearer_token: Option<String>,
    /// Issue tokens at `/oauth2/token` to this client (id, secret), valid this long.
    pub oauth_client: Option<(String, String, Duration)>,
    pub patch: bool,
    pub etag: bool,
    /// What `/ServiceProviderConfig` says of filtering.
    pub filter_advertised: bool,
    /// Whether `filter` works. Several servers advertise no filtering while it works;
    /// others refuse it (400 `invalidFilter`) and only list, page by page.
    pub filter_works: bool,
}

impl Default for ScimEmulatorSettings {
    fn default() -> Self {
        ScimEmulatorSettings {
            faults: Faults::default(),
            bearer_token: None,
            oauth_client: None,
            patch: true,
            etag: true,
            filter_advertised: true,
            filter_works: true,
        }
    }
}

struct StoredUser {
    resource: Value,
    version: u64,
}

/// Users by id, with the unique attributes indexed so lookups and uniqueness checks
/// stay O(1) however many users a benchmark creates.
#[derive(Default)]
struct Directory {
    users: HashMap<String, StoredUser>,
    /// Lower-cased `userName` (case-insensitive, RFC 7643) → id.
    by_user_name: HashMap<String, String>,
    by_external_id: HashMap<String, String>,
}

impl Directory {
    fn index_keys(resource: &Value) -> (Option<String>, Option<String>) {
        (
            resource.get("userName").and_then(Value::as_str).map(str::to_lowercase),
            resource.get("externalId").and_then(Value::as_str).map(str::to_string),
        )
    }

    fn unindex(&mut self, id: &str) {
        if let Some(user) = self.users.get(id) {
            let (user_name, external_id) = Self::index_keys(&user.resource);
            if let Some(user_name) = user_name {
                self.by_user_name.remove(&user_name);
            }
            if let Some(external_id) = external_id {
                self.by_external_id.remove(&external_id);
            }
        }
    }

    fn put(&mut self, id: String, user: StoredUser) {
        self.unindex(&id);
        let (user_name, external_id) = Self::index_keys(&user.resource);
        if let Some(user_name) = user_name {
            self.by_user_name.insert(user_name, id.clone());
        }
        if let Some(external_id) = external_id {
            self.by_external_id.insert(external_id, id.clone());
        }
        self.users.insert(id, user);
    }

    fn remove(&mut self, id: &str) {
        self.unindex(id);
        self.users.remove(id);
    }

    /// Users matching `attribute eq value`.
    fn find(&self, attribute: &str, value: &str) -> Vec<&StoredUser> {
        let lower_case;
        let id = match attribute {
            "id" => Some(value),
            "userName" => {
                lower_case = value.to_lowercase();
                self.by_user_name.get(&lower_case).map(String::as_str)
            }
            "externalId" => self.by_external_id.get(value).map(String::as_str),
            _ => {
                return self
                    .users
                    .values()
                    .filter(|user| attribute_equals(&user.resource, attribute, value))
                    .collect()
            }
        };
        id.and_then(|id| self.users.get(id)).into_iter().collect()
    }
}

#[derive(Clone)]
struct ScimState {
    settings: Arc<ScimEmulatorSettings>,
    directory: Arc<Mutex<Directory>>,
    tokens: Arc<TokenStore>,
    next_id: Arc<AtomicU64>,
    base_url: String,
}

/// A running emulator.
pub struct ScimEmulator {
    pub address: SocketAddr,
    pub control: Control,
    state: ScimState,
}

impl ScimEmulator {
    /// The SCIM base URL, e.g. `http://127.0.0.1:PORT/scim/v2`.
    pub fn base_url(&self) -> String {
        self.state.base_url.clone()
    }

    pub fn token_url(&self) -> String {
        format!("http://{}/oauth2/token", self.address)
    }

    pub fn user_count(&self) -> usize {
        self.state.directory.lock().expect("directory lock").users.len()
    }

    /// Every stored user, as SCIM resources.
    pub fn users(&self) -> Vec<Value> {
        let directory = self.state.directory.lock().expect("directory lock");
        directory.users.values().map(|user| user.resource.clone()).collect()
    }

    pub fn user_by_external_id(&self, external_id: &str) -> Option<Value> {
        self.users()
            .into_iter()
            .find(|user| user.get("externalId").and_then(Value::as_str) == Some(external_id))
    }

    pub fn tokens_issued(&self) -> u64 {
        self.state.tokens.issued()
    }

    /// Forgets every issued token, as if they had expired.
    pub fn expire_tokens(&self) {
        self.state.tokens.expire_all();
    }

    pub fn set_faults(&self, faults: Faults) {
        *self.control.faults.lock().expect("faults lock") = faults;
    }
}

/// Binds `address` and serves until `shutdown` is cancelled.
pub async fn start(
    address: SocketAddr,
    settings: ScimEmulatorSettings,
    shutdown: CancellationToken,
) -> std::io::Result<ScimEmulator> {
    let listener = TcpListener::bind(address).await?;
    let address = listener.local_addr()?;
    let control = Control::new(settings.faults.clone(), Dialect::Scim);
    let state = ScimState {
        settings: Arc::new(settings),
        directory: Arc::default(),
        tokens: Arc::default(),
        next_id: Arc::new(AtomicU64::new(1)),
        base_url: format!("http://{address}/scim/v2"),
    };
    let scim = Router::new()
        .route("/ServiceProviderConfig", get(service_provider_config))
        .route("/Users", get(list_users).post(create_user))
        .route(
            "/Users/{id}",
            get(get_user).put(replace_user).patch(patch_user).delete(delete_user),
        )
        .layer(middleware::from_fn_with_state(state.clone(), require_auth))
        .with_state(state.clone());
    let router = Router::new()
        .nest("/scim/v2", with_faults(scim, &control))
        .route("/oauth2/token", post(issue_token).with_state(state.clone()));
    spawn(listener, router, &control, shutdown);
    Ok(ScimEmulator {
        address,
        control,
        state,
    })
}

fn scim_error(status: StatusCode, scim_type: Option<&str>, detail: &str) -> Response {
    let mut body = json!({"schemas": [ERROR_SCHEMA], "status": status.as_u16().to_string(), "detail": detail});
    if let Some(scim_type) = scim_type {
        body["scimType"] = json!(scim_type);
    }
    (status, [(header::CONTENT_TYPE, "application/scim+json")], Json(body)).into_response()
}

async fn require_auth(State(state): State<ScimState>, request: Request, next: Next) -> Response {
    let protected = state.settings.bearer_token.is_some() || state.settings.oauth_client.is_some();
    if !protected || request.uri().path().ends_with("/ServiceProviderConfig") {
        return next.run(request).await;
    }
    let valid = bearer_token(request.headers())
        .is_some_and(|token| state.settings.bearer_token.as_deref() == Some(token) || state.tokens.is_valid(token));
    if valid {
        next.run(request).await
    } else {
        scim_error(
            StatusCode::UNAUTHORIZED,
            None,
            "missing, invalid or expired bearer token",
        )
    }
}

#[derive(Deserialize)]
struct TokenRequest {
    grant_type: String,
    client_id: Option<String>,
    client_secret: Option<String>,
}

async fn issue_token(State(state): State<ScimState>, headers: HeaderMap, Form(form): Form<TokenRequest>) -> Response {
    let Some((client_id, client_secret, lifetime)) = state.settings.oauth_client.clone() else {
        return (StatusCode::NOT_FOUND, "no OAuth client configured").into_response();
    };
    let (presented_id, presented_secret) = basic_credentials(&headers).unwrap_or((
        form.client_id.unwrap_or_default(),
        form.client_secret.unwrap_or_default(),
    ));
    if form.grant_type != "client_credentials" {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "unsupported_grant_type"})),
        )
            .into_response();
    }
    if presented_id != client_id || presented_secret != client_secret {
        return (StatusCode::UNAUTHORIZED, Json(json!({"error": "invalid_client"}))).into_response();
    }
    let token = state.tokens.issue("", lifetime);
    Json(json!({"access_token": token, "token_type": "Bearer", "expires_in": lifetime.as_secs()})).into_response()
}

fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    use base64::Engine;
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (id, secret) = text.split_once(':')?;
    Some((id.to_string(), secret.to_string()))
}

async fn service_provider_config(State(state): State<ScimState>) -> Json<Value> {
    Json(json!({
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig"],
        "patch": {"supported": state.settings.patch},
        "bulk": {"supported": false, "maxOperations": 0, "maxPayloadSize": 0},
        "filter": {"supported": state.settings.filter_advertised, "maxResults": 200},
        "changePassword": {"supported": false},
        "sort": {"supported": false},
        "etag": {"supported": state.settings.etag},
        "authenticationSchemes": [],
    }))
}

#[derive(Deserialize)]
struct ListQuery {
    filter: Option<String>,
    #[serde(rename = "startIndex")]
    start_index: Option<usize>,
    count: Option<usize>,
}

async fn list_users(State(state): State<ScimState>, Query(query): Query<ListQuery>) -> Response {
    if query.filter.is_some() && !state.settings.filter_works {
        return scim_error(
            StatusCode::BAD_REQUEST,
            Some("invalidFilter"),
            "filtering is not supported",
        );
    }
    let condition = match query.filter.as_deref().map(parse_eq_filter) {
        None => None,
        Some(Ok(condition)) => Some(condition),
        Some(Err(message)) => return scim_error(StatusCode::BAD_REQUEST, Some("invalidFilter"), &message),
    };
    let directory = state.directory.lock().expect("directory lock");
    let found: Vec<&Value> = match &condition {
        None => directory.users.values().map(|user| &user.resource).collect(),
        Some((attribute, value)) => directory
            .find(attribute, value)
            .into_iter()
            .map(|user| &user.resource)
            .collect(),
    };
    // RFC 7644 §3.4.2.4: 1-based startIndex, count per page.
    let start_index = query.start_index.unwrap_or(1).max(1);
    let page: Vec<Value> = found
        .iter()
        .skip(start_index - 1)
        .take(query.count.unwrap_or(usize::MAX))
        .map(|resource| (*resource).clone())
        .collect();
    Json(json!({
        "schemas": [LIST_SCHEMA],
        "totalResults": found.len(),
        "startIndex": start_index,
        "itemsPerPage": page.len(),
        "Resources": page,
    }))
    .into_response()
}

/// `attribute eq "value"`, the value a JSON string literal.
fn parse_eq_filter(filter: &str) -> Result<(String, String), String> {
    let (attribute, rest) = filter
        .trim()
        .split_once(' ')
        .ok_or_else(|| format!("unsupported filter: {filter}"))?;
    let literal = rest
        .trim_start()
        .strip_prefix("eq ")
        .or_else(|| rest.trim_start().strip_prefix("Eq "))
        .ok_or_else(|| "only `eq` is supported".to_string())?;
    let value: String = serde_json::from_str(literal.trim()).map_err(|_| format!("bad string literal: {literal}"))?;
    Ok((attribute.to_string(), value))
}

fn attribute_equals(resource: &Value, attribute: &str, expected: &str) -> bool {
    let found = resource.get(attribute).and_then(Value::as_str);
    match attribute {
        // userName is case-insensitive (RFC 7643 §4.1.1).
        "userName" => found.is_some_and(|value| value.eq_ignore_ascii_case(expected)),
        _ => found == Some(expected),
    }
}

fn conflict(directory: &Directory, resource: &Value, except_id: Option<&str>) -> Option<String> {
    for attribute in ["userName", "externalId"] {
        if let Some(value) = resource.get(attribute).and_then(Value::as_str) {
            let taken = directory
                .find(attribute, value)
                .into_iter()
                .any(|user| except_id != user.resource.get("id").and_then(Value::as_str));
            if taken {
                return Some(format!("{attribute} `{value}` is already taken"));
            }
        }
    }
    None
}

fn with_meta(state: &ScimState, id: &str, mut resource: Value, version: u64, created: Option<Value>) -> Value {
    let now = chrono::Utc::now().to_rfc3339();
    resource["id"] = json!(id);
    resource.as_object_mut().map(|object| object.remove("password"));
    let created = created.unwrap_or_else(|| json!(now));
    resource["meta"] = json!({
        "resourceType": "User",
        "created": created,
        "lastModified": now,
        "location": format!("{}/Users/{id}", state.base_url),
        "version": format!("W/\"{version}\""),
    });
    if resource.get("schemas").is_none() {
        resource["schemas"] = json!([USER_SCHEMA]);
    }
    resource
}

fn resource_response(status: StatusCode, resource: &Value) -> Response {
    let version = resource
        .pointer("/meta/version")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let location = resource
        .pointer("/meta/location")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    (
        status,
        [
            (header::CONTENT_TYPE, "application/scim+json".to_string()),
            (header::ETAG, version),
            (header::LOCATION, location),
        ],
        Json(resource.clone()),
    )
        .into_response()
}

async fn create_user(State(state): State<ScimState>, Json(resource): Json<Value>) -> Response {
    if resource
        .get("userName")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        return scim_error(StatusCode::BAD_REQUEST, Some("invalidValue"), "userName is required");
    }
    let mut directory = state.directory.lock().expect("directory lock");
    if let Some(message) = conflict(&directory, &resource, None) {
        return scim_error(StatusCode::CONFLICT, Some("uniqueness"), &message);
    }
    let id = format!("{:08x}-emu", state.next_id.fetch_add(1, Ordering::Relaxed));
    let stored = with_meta(&state, &id, resource, 1, None);
    directory.put(
        id,
        StoredUser {
            resource: stored.clone(),
            version: 1,
        },
    );
    resource_response(StatusCode::CREATED, &stored)
}

async fn get_user(State(state): State<ScimState>, Path(id): Path<String>) -> Response {
    let directory = state.directory.lock().expect("directory lock");
    match directory.users.get(&id) {
        Some(user) => resource_response(StatusCode::OK, &user.resource),
        None => scim_error(StatusCode::NOT_FOUND, None, &format!("no user {id}")),
    }
}

/// Whether `If-Match` (when ETags are on and one was sent) matches the stored version.
fn precondition_holds(state: &ScimState, headers: &HeaderMap, user: &StoredUser) -> bool {
    let Some(expected) = headers.get(header::IF_MATCH).and_then(|value| value.to_str().ok()) else {
        return true;
    };
    !state.settings.etag || expected == "*" || expected == format!("W/\"{}\"", user.version)
}

fn stale_version() -> Response {
    scim_error(
        StatusCode::PRECONDITION_FAILED,
        None,
        "the resource changed since it was read",
    )
}

async fn replace_user(
    State(state): State<ScimState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(resource): Json<Value>,
) -> Response {
    let mut directory = state.directory.lock().expect("directory lock");
    let Some(user) = directory.users.get(&id) else {
        return scim_error(StatusCode::NOT_FOUND, None, &format!("no user {id}"));
    };
    if !precondition_holds(&state, &headers, user) {
        return stale_version();
    }
    store_replacement(&state, &mut directory, id, resource)
}

/// Stores `resource` as the new state of existing user `id` (PUT, or PATCH applied):
/// refused if it takes another user's unique values; the version moves on.
fn store_replacement(state: &ScimState, directory: &mut Directory, id: String, resource: Value) -> Response {
    if let Some(message) = conflict(directory, &resource, Some(&id)) {
        return scim_error(StatusCode::CONFLICT, Some("uniqueness"), &message);
    }
    let user = directory.users.get(&id).expect("the caller found the user");
    let created = user.resource.pointer("/meta/created").cloned();
    let version = user.version + 1;
    let resource = with_meta(state, &id, resource, version, created);
    let response = resource_response(StatusCode::OK, &resource);
    directory.put(id, StoredUser { resource, version });
    response
}

async fn patch_user(
    State(state): State<ScimState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(patch): Json<Value>,
) -> Response {
    if !state.settings.patch {
        return scim_error(StatusCode::NOT_IMPLEMENTED, None, "PATCH is not supported");
    }
    let mut directory = state.directory.lock().expect("directory lock");
    let Some(user) = directory.users.get(&id) else {
        return scim_error(StatusCode::NOT_FOUND, None, &format!("no user {id}"));
    };
    if !precondition_holds(&state, &headers, user) {
        return stale_version();
    }
    let mut resource = user.resource.clone();
    let Some(operations) = patch.get("Operations").and_then(Value::as_array) else {
        return scim_error(StatusCode::BAD_REQUEST, Some("invalidSyntax"), "no Operations");
    };
    for operation in operations {
        let op = operation
            .get("op")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_ascii_lowercase();
        let path = operation.get("path").and_then(Value::as_str);
        let value = operation.get("value").cloned().unwrap_or(Value::Null);
        match (op.as_str(), path) {
            ("replace" | "add", Some(path)) => {
                crate::connectors::scim::overlay(&mut resource, &[(path.to_string(), value)]);
            }
            ("replace" | "add", None) => {
                if let Value::Object(values) = value {
                    let pairs: Vec<(String, Value)> = values.into_iter().collect();
                    crate::connectors::scim::overlay(&mut resource, &pairs);
                }
            }
            ("remove", Some(path)) => {
                if let Value::Object(object) = &mut resource {
                    object.remove(path);
                }
            }
            _ => {
                return scim_error(
                    StatusCode::BAD_REQUEST,
                    Some("invalidSyntax"),
                    &format!("unsupported operation {operation}"),
                )
            }
        }
    }
    store_replacement(&state, &mut directory, id, resource)
}

async fn delete_user(State(state): State<ScimState>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    let mut directory = state.directory.lock().expect("directory lock");
    let Some(user) = directory.users.get(&id) else {
        return scim_error(StatusCode::NOT_FOUND, None, &format!("no user {id}"));
    };
    if !precondition_holds(&state, &headers, user) {
        return stale_version();
    }
    directory.remove(&id);
    StatusCode::NO_CONTENT.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eq_filters_parse_json_string_literals() {
        assert_eq!(
            parse_eq_filter(r#"userName eq "a\"b""#).unwrap(),
            ("userName".to_string(), "a\"b".to_string())
        );
        assert!(parse_eq_filter("userName co \"x\"").is_err());
        assert!(parse_eq_filter("userName eq x").is_err());
    }
}
