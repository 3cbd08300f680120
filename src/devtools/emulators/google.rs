//! An in-memory Google Admin SDK Directory API (users) with its OAuth token endpoint.
//!
//! The token endpoint verifies the JWT-bearer assertion the way Google does: RS256
//! signature against the service account's public key, `iss`, `sub`, `scope`, `aud` and
//! `exp` (at most one hour after `iat`). The users endpoints enforce what Google
//! enforces on insert: `primaryEmail` in the domain, both names present and at most 60
//! characters, a password of 8 to 100 characters, and a unique `primaryEmail` (409
//! `duplicate` with Google's error body). Every request body is recorded, so tests can
//! check them against Google's discovery document.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use openssl::pkey::{PKey, Public};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::connectors::jwt;
use crate::devtools::emulators::{bearer_token, spawn, with_faults, Control, Dialect, Faults, TokenStore};

const USER_SCOPE: &str = "https://www.googleapis.com/auth/admin.directory.user";

pub struct GoogleEmulatorSettings {
    pub domain: String,
    /// The service account allowed to ask for tokens, and its public key.
    pub client_email: String,
    pub public_key: PKey<Public>,
    /// The admin the service account may impersonate (`sub`).
    pub admin_email: String,
    pub token_lifetime: Duration,
    pub faults: Faults,
}

/// One request body the users endpoints received.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    pub body: Value,
}

#[derive(Clone)]
struct GoogleState {
    settings: Arc<GoogleEmulatorSettings>,
    token_url: String,
    users: Arc<Mutex<HashMap<String, Value>>>,
    tokens: Arc<TokenStore>,
    requests: Arc<Mutex<Vec<RecordedRequest>>>,
    next_id: Arc<AtomicU64>,
}

pub struct GoogleEmulator {
    pub address: SocketAddr,
    pub control: Control,
    state: GoogleState,
}

impl GoogleEmulator {
    /// The connector's `api_base_url`.
    pub fn api_base_url(&self) -> String {
        format!("http://{}", self.address)
    }

    pub fn token_url(&self) -> String {
        self.state.token_url.clone()
    }

    pub fn users(&self) -> Vec<Value> {
        self.state.users.lock().expect("users lock").values().cloned().collect()
    }

    pub fn user_by_email(&self, email: &str) -> Option<Value> {
        self.users().into_iter().find(|user| {
            user["primaryEmail"]
                .as_str()
                .is_some_and(|found| found.eq_ignore_ascii_case(email))
        })
    }

    /// Every JSON body sent to the users endpoints, in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state.requests.lock().expect("requests lock").clone()
    }

    pub fn tokens_issued(&self) -> u64 {
        self.state.tokens.issued()
    }

    /// Adds a user as an administrator would have; returns its id.
    pub fn insert_directly(&self, user: Value) -> String {
        let id = self.state.next_id.fetch_add(1, Ordering::Relaxed).to_string();
        let user = stored(&id, user);
        self.state.users.lock().expect("users lock").insert(id.clone(), user);
        id
    }

    pub fn expire_tokens(&self) {
        self.state.tokens.expire_all();
    }

    pub fn set_faults(&self, faults: Faults) {
        *self.control.faults.lock().expect("faults lock") = faults;
    }
}

pub async fn start(
    address: SocketAddr,
    settings: GoogleEmulatorSettings,
    shutdown: CancellationToken,
) -> std::io::Result<GoogleEmulator> {
    let listener = TcpListener::bind(address).await?;
    let address = listener.local_addr()?;
    let control = Control::new(settings.faults.clone(), Dialect::Google);
    let state = GoogleState {
        settings: Arc::new(settings),
        token_url: format!("http://{address}/token"),
        users: Arc::default(),
        tokens: Arc::default(),
        requests: Arc::default(),
        next_id: Arc::new(AtomicU64::new(100_000_000_000_000_000)),
    };
    let directory = Router::new()
        .route("/users", get(list_users).post(insert_user))
        .route(
            "/users/{user_key}",
            get(get_user).patch(patch_user).put(patch_user).delete(delete_user),
        )
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        .with_state(state.clone());
    let router = Router::new()
        .nest("/admin/directory/v1", with_faults(directory, &control))
        .route("/token", post(issue_token).with_state(state.clone()));
    spawn(listener, router, &control, shutdown);
    Ok(GoogleEmulator {
        address,
        control,
        state,
    })
}

/// Google's error body.
fn google_error(status: StatusCode, reason: &str, message: &str) -> Response {
    (
        status,
        Json(json!({"error": {"code": status.as_u16(), "message": message,
                     "errors": [{"domain": "global", "reason": reason, "message": message}]}})),
    )
        .into_response()
}

#[derive(Deserialize)]
struct TokenRequest {
    grant_type: String,
    assertion: Option<String>,
}

async fn issue_token(State(state): State<GoogleState>, Form(form): Form<TokenRequest>) -> Response {
    let refuse = |description: String| {
        (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_grant", "error_description": description})),
        )
            .into_response()
    };
    if form.grant_type != "urn:ietf:params:oauth:grant-type:jwt-bearer" {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "unsupported_grant_type"})),
        )
            .into_response();
    }
    let Some(assertion) = form.assertion else {
        return refuse("no assertion".into());
    };
    let claims = match jwt::verify(&assertion, &state.settings.public_key) {
        Ok(claims) => claims,
        Err(error) => return refuse(format!("Invalid JWT Signature: {error}")),
    };
    let text = |name: &str| claims.get(name).and_then(Value::as_str).unwrap_or_default().to_string();
    let now = chrono::Utc::now().timestamp();
    let issued_at = claims.get("iat").and_then(Value::as_i64).unwrap_or(0);
    let expires_at = claims.get("exp").and_then(Value::as_i64).unwrap_or(0);
    let problem = if text("iss") != state.settings.client_email {
        Some("unknown service account (iss)".to_string())
    } else if text("aud") != state.token_url {
        Some(format!("audience must be {}", state.token_url))
    } else if !text("scope").split(' ').any(|scope| scope == USER_SCOPE) {
        Some(format!("scope must include {USER_SCOPE}"))
    } else if text("sub") != state.settings.admin_email {
        Some("unauthorized_client: the service account may not impersonate this user (sub)".to_string())
    } else if expires_at <= now {
        Some("Invalid JWT: Token must be a short-lived token and in a reasonable timeframe (expired)".to_string())
    } else if expires_at - issued_at > 3600 {
        Some("Invalid JWT: exp may be at most one hour after iat".to_string())
    } else {
        None
    };
    if let Some(problem) = problem {
        return refuse(problem);
    }
    let token = state.tokens.issue("ya29.", state.settings.token_lifetime);
    Json(json!({"access_token": token, "token_type": "Bearer", "expires_in": state.settings.token_lifetime.as_secs()}))
        .into_response()
}

async fn require_token(State(state): State<GoogleState>, request: Request, next: Next) -> Response {
    if !bearer_token(request.headers()).is_some_and(|token| state.tokens.is_valid(token)) {
        return google_error(StatusCode::UNAUTHORIZED, "authError", "Invalid Credentials");
    }
    next.run(request).await
}

fn record(state: &GoogleState, method: Method, body: &Value) {
    state.requests.lock().expect("requests lock").push(RecordedRequest {
        method: method.to_string(),
        body: body.clone(),
    });
}

/// What Google checks on every write; `insert` also needs the required fields. The
/// error is Google's message for a 400 `invalid`.
fn validate(state: &GoogleState, user: &Value, insert: bool) -> Result<(), String> {
    let invalid = |message: &str| message.to_string();
    if let Some(email) = user.get("primaryEmail") {
        let email = email.as_str().unwrap_or_default().to_ascii_lowercase();
        let in_domain = email
            .rsplit_once('@')
            .is_some_and(|(local, domain)| !local.is_empty() && domain == state.settings.domain.to_ascii_lowercase());
        if !in_domain {
            return Err(invalid("Invalid Input: primary_user_email"));
        }
    } else if insert {
        return Err(invalid("Invalid Input: primary_user_email"));
    }
    for part in ["givenName", "familyName"] {
        match user.get("name").and_then(|name| name.get(part)) {
            Some(Value::String(value)) if !value.trim().is_empty() && value.chars().count() <= 60 => {}
            None if !insert => {}
            _ => {
                let label = if part == "givenName" { "GivenName" } else { "FamilyName" };
                return Err(invalid(&format!("Invalid Given/Family Name: {label}")));
            }
        }
    }
    match user.get("password") {
        Some(Value::String(password)) if (8..=100).contains(&password.chars().count()) => {}
        None if !insert => {}
        _ => return Err(invalid("Invalid Password")),
    }
    Ok(())
}

/// The stored form of a user: Google's read-only fields added, the password dropped.
fn stored(id: &str, mut user: Value) -> Value {
    if let Value::Object(object) = &mut user {
        object.remove("password");
        object.insert("kind".into(), json!("admin#directory#user"));
        object.insert("id".into(), json!(id));
        object.insert("isAdmin".into(), json!(false));
        object.insert("etag".into(), json!(format!("\"{}\"", uuid::Uuid::new_v4().simple())));
        object
            .entry("creationTime")
            .or_insert_with(|| json!(chrono::Utc::now().to_rfc3339()));
        object.entry("suspended").or_insert(json!(false));
        object.entry("orgUnitPath").or_insert(json!("/"));
    }
    let full_name = format!(
        "{} {}",
        user.pointer("/name/givenName")
            .and_then(Value::as_str)
            .unwrap_or_default(),
        user.pointer("/name/familyName")
            .and_then(Value::as_str)
            .unwrap_or_default()
    );
    if let Some(Value::Object(name)) = user.get_mut("name") {
        name.insert("fullName".into(), json!(full_name.trim()));
    }
    user
}

fn find_key(users: &HashMap<String, Value>, user_key: &str) -> Option<String> {
    if users.contains_key(user_key) {
        return Some(user_key.to_string());
    }
    users
        .iter()
        .find(|(_, user)| {
            user["primaryEmail"]
                .as_str()
                .is_some_and(|email| email.eq_ignore_ascii_case(user_key))
        })
        .map(|(id, _)| id.clone())
}

async fn insert_user(State(state): State<GoogleState>, Json(user): Json<Value>) -> Response {
    record(&state, Method::POST, &user);
    if let Err(message) = validate(&state, &user, true) {
        return google_error(StatusCode::BAD_REQUEST, "invalid", &message);
    }
    let mut users = state.users.lock().expect("users lock");
    let email = user["primaryEmail"].as_str().unwrap_or_default().to_string();
    if find_key(&users, &email).is_some() {
        return google_error(StatusCode::CONFLICT, "duplicate", "Entity already exists.");
    }
    let id = state.next_id.fetch_add(1, Ordering::Relaxed).to_string();
    let stored = stored(&id, user);
    users.insert(id, stored.clone());
    Json(stored).into_response()
}

async fn get_user(State(state): State<GoogleState>, Path(user_key): Path<String>) -> Response {
    let users = state.users.lock().expect("users lock");
    match find_key(&users, &user_key) {
        Some(id) => Json(users[&id].clone()).into_response(),
        None => google_error(StatusCode::NOT_FOUND, "notFound", "Resource Not Found: userKey"),
    }
}

#[derive(Deserialize)]
struct ListQuery {
    query: Option<String>,
}

/// Supports the one search the connector makes: `externalId:'value'`.
async fn list_users(State(state): State<GoogleState>, Query(list): Query<ListQuery>) -> Response {
    let wanted = match list.query.as_deref().map(parse_external_id_query) {
        None => None,
        Some(Some(value)) => Some(value),
        Some(None) => return google_error(StatusCode::BAD_REQUEST, "invalid", "Invalid Input: query"),
    };
    let users = state.users.lock().expect("users lock");
    let found: Vec<Value> = users
        .values()
        .filter(|user| match &wanted {
            None => true,
            Some(wanted) => user.get("externalIds").and_then(Value::as_array).is_some_and(|ids| {
                ids.iter()
                    .any(|id| id.get("value").and_then(Value::as_str) == Some(wanted))
            }),
        })
        .cloned()
        .collect();
    let mut body = json!({"kind": "admin#directory#users"});
    if !found.is_empty() {
        body["users"] = Value::Array(found);
    }
    Json(body).into_response()
}

fn parse_external_id_query(query: &str) -> Option<String> {
    let quoted = query.strip_prefix("externalId:")?;
    let inner = quoted.strip_prefix('\'')?.strip_suffix('\'')?;
    let mut value = String::new();
    let mut characters = inner.chars();
    while let Some(character) = characters.next() {
        match character {
            '\\' => value.push(characters.next()?),
            '\'' => return None,
            other => value.push(other),
        }
    }
    Some(value)
}

async fn patch_user(
    State(state): State<GoogleState>,
    method: Method,
    Path(user_key): Path<String>,
    Json(changes): Json<Value>,
) -> Response {
    record(&state, method, &changes);
    if let Err(message) = validate(&state, &changes, false) {
        return google_error(StatusCode::BAD_REQUEST, "invalid", &message);
    }
    let mut users = state.users.lock().expect("users lock");
    let Some(id) = find_key(&users, &user_key) else {
        return google_error(StatusCode::NOT_FOUND, "notFound", "Resource Not Found: userKey");
    };
    if let Some(email) = changes.get("primaryEmail").and_then(Value::as_str) {
        if find_key(&users, email).is_some_and(|other| other != id) {
            return google_error(StatusCode::CONFLICT, "duplicate", "Entity already exists.");
        }
    }
    let mut user = users[&id].clone();
    if let (Value::Object(user_fields), Value::Object(change_fields)) = (&mut user, changes) {
        for (field, value) in change_fields {
            match (user_fields.get_mut(&field), value) {
                (Some(Value::Object(existing)), Value::Object(update)) if field == "name" => existing.extend(update),
                (_, value) => {
                    user_fields.insert(field, value);
                }
            }
        }
    }
    let updated = stored(&id, user);
    users.insert(id, updated.clone());
    Json(updated).into_response()
}

async fn delete_user(State(state): State<GoogleState>, Path(user_key): Path<String>) -> Response {
    let mut users = state.users.lock().expect("users lock");
    match find_key(&users, &user_key) {
        Some(id) => {
            users.remove(&id);
            StatusCode::NO_CONTENT.into_response()
        }
        None => google_error(StatusCode::NOT_FOUND, "notFound", "Resource Not Found: userKey"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn external_id_queries_unescape() {
        assert_eq!(parse_external_id_query("externalId:'abc'").as_deref(), Some("abc"));
        assert_eq!(parse_external_id_query(r"externalId:'a\'b'").as_deref(), Some("a'b"));
        assert_eq!(parse_external_id_query("externalId:'a' or 'b'"), None);
        assert_eq!(parse_external_id_query("name:'x'"), None);
    }
}
