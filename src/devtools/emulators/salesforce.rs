//! An in-memory Salesforce: the OAuth token endpoint (client credentials, JWT bearer
//! with a signature check, username-password) and the REST `sobjects/User` and `query`
//! resources the connector uses.
//!
//! It enforces what Salesforce enforces for users: the required fields
//! (`REQUIRED_FIELD_MISSING`), an email-shaped `Username` (`FIELD_INTEGRITY_EXCEPTION`),
//! globally unique Usernames (`DUPLICATE_USERNAME`, also for names "taken in another
//! org"), `Alias` of at most 8 characters, and expiring sessions (`INVALID_SESSION_ID`).
//! Queries are parsed strictly (`SELECT … FROM User WHERE Field = 'literal'`), so an
//! unescaped quote shows up as `MALFORMED_QUERY`. Every response carries
//! `Sforce-Limit-Info`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use openssl::pkey::{PKey, Public};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::connectors::jwt;
use crate::devtools::emulators::{bearer_token, spawn, with_faults, Control, Dialect, Faults, TokenStore};

const REQUIRED_FIELDS: [&str; 9] = [
    "Username",
    "LastName",
    "Email",
    "Alias",
    "TimeZoneSidKey",
    "LocaleSidKey",
    "EmailEncodingKey",
    "ProfileId",
    "LanguageLocaleKey",
];
/// The org's daily API allocation, reported in `Sforce-Limit-Info`.
const DAILY_API_LIMIT: u64 = 15_000;

pub struct SalesforceEmulatorSettings {
    pub client_id: String,
    pub client_secret: String,
    /// For the password grant: the user, and the password with its security token appended.
    pub username: String,
    pub password_with_token: String,
    /// For the JWT-bearer grant: the certificate's public key.
    pub public_key: Option<PKey<Public>>,
    /// Sessions expire after this long.
    pub session_lifetime: Duration,
    /// Usernames "taken in another org": refused as duplicates, invisible to queries.
    pub foreign_usernames: Vec<String>,
    pub faults: Faults,
}

#[derive(Clone)]
struct SalesforceState {
    settings: Arc<SalesforceEmulatorSettings>,
    base_url: String,
    users: Arc<Mutex<HashMap<String, Map<String, Value>>>>,
    sessions: Arc<TokenStore>,
    api_calls: Arc<AtomicU64>,
    queries: Arc<Mutex<Vec<String>>>,
    next_id: Arc<AtomicU64>,
}

pub struct SalesforceEmulator {
    pub address: SocketAddr,
    pub control: Control,
    state: SalesforceState,
}

impl SalesforceEmulator {
    /// The login URL (also the instance URL it hands out).
    pub fn login_url(&self) -> String {
        self.state.base_url.clone()
    }

    pub fn users(&self) -> Vec<Map<String, Value>> {
        self.state.users.lock().expect("users lock").values().cloned().collect()
    }

    pub fn user_by_federation_id(&self, federation_id: &str) -> Option<Map<String, Value>> {
        self.users()
            .into_iter()
            .find(|user| user.get("FederationIdentifier").and_then(Value::as_str) == Some(federation_id))
    }

    /// Adds a user as an administrator would have; returns its Id.
    pub fn insert_directly(&self, mut fields: Map<String, Value>) -> String {
        let id = new_id(&self.state);
        fields.insert("Id".into(), json!(id));
        fields.entry("IsActive").or_insert(json!(true));
        self.state.users.lock().expect("users lock").insert(id.clone(), fields);
        id
    }

    /// Every SOQL query received, as sent.
    pub fn queries(&self) -> Vec<String> {
        self.state.queries.lock().expect("queries lock").clone()
    }

    pub fn tokens_issued(&self) -> u64 {
        self.state.sessions.issued()
    }

    /// Ends every session, as an idle timeout or a revocation would.
    pub fn expire_sessions(&self) {
        self.state.sessions.expire_all();
    }

    pub fn set_faults(&self, faults: Faults) {
        *self.control.faults.lock().expect("faults lock") = faults;
    }
}

pub async fn start(
    address: SocketAddr,
    settings: SalesforceEmulatorSettings,
    shutdown: CancellationToken,
) -> std::io::Result<SalesforceEmulator> {
    let listener = TcpListener::bind(address).await?;
    let address = listener.local_addr()?;
    let control = Control::new(settings.faults.clone(), Dialect::Salesforce);
    let state = SalesforceState {
        settings: Arc::new(settings),
        base_url: format!("http://{address}"),
        users: Arc::default(),
        sessions: Arc::default(),
        api_calls: Arc::default(),
        queries: Arc::default(),
        next_id: Arc::new(AtomicU64::new(1)),
    };
    let api = Router::new()
        .route("/sobjects/User/", post(create_user))
        .route("/sobjects/User/{id}", get(get_user).patch(update_user))
        .route("/query", get(query))
        .layer(middleware::from_fn_with_state(state.clone(), require_session))
        .with_state(state.clone());
    let api = with_faults(api, &control).layer(middleware::from_fn_with_state(state.clone(), limit_info));
    let router = Router::new()
        .nest("/services/data/{version}", api)
        .route("/services/oauth2/token", post(issue_token).with_state(state.clone()));
    spawn(listener, router, &control, shutdown);
    Ok(SalesforceEmulator {
        address,
        control,
        state,
    })
}

fn new_id(state: &SalesforceState) -> String {
    format!("005{:015}", state.next_id.fetch_add(1, Ordering::Relaxed))
}

fn sf_error(status: StatusCode, code: &str, message: &str, fields: &[&str]) -> Response {
    (
        status,
        Json(json!([{"message": message, "errorCode": code, "fields": fields}])),
    )
        .into_response()
}

#[derive(Deserialize)]
struct TokenRequest {
    grant_type: String,
    client_id: Option<String>,
    client_secret: Option<String>,
    username: Option<String>,
    password: Option<String>,
    assertion: Option<String>,
}

async fn issue_token(State(state): State<SalesforceState>, Form(form): Form<TokenRequest>) -> Response {
    let settings = &state.settings;
    let refuse = |error: &str, description: &str| {
        (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": error, "error_description": description})),
        )
            .into_response()
    };
    let client_ok = form.client_id.as_deref() == Some(settings.client_id.as_str())
        && form.client_secret.as_deref() == Some(settings.client_secret.as_str());
    match form.grant_type.as_str() {
        "client_credentials" if client_ok => {}
        "password" if client_ok => {
            if form.username.as_deref() != Some(settings.username.as_str())
                || form.password.as_deref() != Some(settings.password_with_token.as_str())
            {
                return refuse("invalid_grant", "authentication failure");
            }
        }
        "client_credentials" | "password" => return refuse("invalid_client", "invalid client credentials"),
        "urn:ietf:params:oauth:grant-type:jwt-bearer" => {
            let Some(public_key) = &settings.public_key else {
                return refuse("invalid_grant", "no certificate uploaded for this app");
            };
            let claims = match form
                .assertion
                .as_deref()
                .map(|assertion| jwt::verify(assertion, public_key))
            {
                Some(Ok(claims)) => claims,
                _ => return refuse("invalid_grant", "invalid assertion"),
            };
            let text = |name: &str| claims.get(name).and_then(Value::as_str).unwrap_or_default().to_string();
            let expires = claims.get("exp").and_then(Value::as_i64).unwrap_or(0);
            if text("iss") != settings.client_id {
                return refuse("invalid_client_id", "client identifier invalid");
            }
            if text("aud") != state.base_url {
                return refuse("invalid_grant", "audience is invalid");
            }
            if text("sub") != settings.username {
                return refuse("invalid_grant", "user hasn't approved this consumer");
            }
            if expires <= chrono::Utc::now().timestamp() {
                return refuse("invalid_grant", "expired authorization code");
            }
        }
        _ => return refuse("unsupported_grant_type", "grant type not supported"),
    }
    let token = state.sessions.issue("00D000000000001!", settings.session_lifetime);
    // Like Salesforce: no expires_in; the session lasts until idle timeout.
    Json(json!({
        "access_token": token,
        "instance_url": state.base_url,
        "id": format!("{}/id/00D000000000001/005000000000001", state.base_url),
        "token_type": "Bearer",
        "issued_at": chrono::Utc::now().timestamp_millis().to_string(),
    }))
    .into_response()
}

async fn require_session(State(state): State<SalesforceState>, request: Request, next: Next) -> Response {
    if !bearer_token(request.headers()).is_some_and(|token| state.sessions.is_valid(token)) {
        return sf_error(
            StatusCode::UNAUTHORIZED,
            "INVALID_SESSION_ID",
            "Session expired or invalid",
            &[],
        );
    }
    next.run(request).await
}

async fn limit_info(State(state): State<SalesforceState>, request: Request, next: Next) -> Response {
    let used = state.api_calls.fetch_add(1, Ordering::Relaxed) + 1;
    let mut response = next.run(request).await;
    if let Ok(value) = HeaderValue::from_str(&format!("api-usage={used}/{DAILY_API_LIMIT}")) {
        response.headers_mut().insert("sforce-limit-info", value);
    }
    response
}

fn is_email_shaped(value: &str) -> bool {
    value.split_once('@').is_some_and(|(local, domain)| {
        !local.is_empty() && domain.contains('.') && !domain.starts_with('.') && !value.contains(' ')
    })
}

/// Field checks shared by create and update; `None` when all is well.
fn check_fields(state: &SalesforceState, fields: &Map<String, Value>, except_id: Option<&str>) -> Option<Response> {
    if let Some(username) = fields.get("Username") {
        let username = username.as_str().unwrap_or_default();
        if !is_email_shaped(username) {
            return Some(sf_error(
                StatusCode::BAD_REQUEST,
                "FIELD_INTEGRITY_EXCEPTION",
                "Username: invalid email address",
                &["Username"],
            ));
        }
        let taken_here = state.users.lock().expect("users lock").iter().any(|(id, user)| {
            Some(id.as_str()) != except_id
                && user
                    .get("Username")
                    .and_then(Value::as_str)
                    .is_some_and(|other| other.eq_ignore_ascii_case(username))
        });
        let taken_elsewhere = state
            .settings
            .foreign_usernames
            .iter()
            .any(|other| other.eq_ignore_ascii_case(username));
        if taken_here || taken_elsewhere {
            return Some(sf_error(
                StatusCode::BAD_REQUEST,
                "DUPLICATE_USERNAME",
                "Duplicate Username.<br>The username already exists in this or another Salesforce organization.",
                &["Username"],
            ));
        }
    }
    if let Some(alias) = fields.get("Alias").and_then(Value::as_str) {
        if alias.chars().count() > 8 {
            return Some(sf_error(
                StatusCode::BAD_REQUEST,
                "STRING_TOO_LONG",
                "Alias: data value too large",
                &["Alias"],
            ));
        }
    }
    None
}

async fn create_user(State(state): State<SalesforceState>, Json(body): Json<Value>) -> Response {
    let Value::Object(mut fields) = body else {
        return sf_error(StatusCode::BAD_REQUEST, "JSON_PARSER_ERROR", "expected an object", &[]);
    };
    let missing: Vec<&str> = REQUIRED_FIELDS
        .iter()
        .copied()
        .filter(|field| fields.get(*field).and_then(Value::as_str).is_none_or(str::is_empty))
        .collect();
    if !missing.is_empty() {
        return sf_error(
            StatusCode::BAD_REQUEST,
            "REQUIRED_FIELD_MISSING",
            &format!("Required fields are missing: [{}]", missing.join(", ")),
            &missing,
        );
    }
    if let Some(response) = check_fields(&state, &fields, None) {
        return response;
    }
    let id = new_id(&state);
    fields.insert("Id".into(), json!(id));
    fields.entry("IsActive").or_insert(json!(true));
    state.users.lock().expect("users lock").insert(id.clone(), fields);
    (
        StatusCode::CREATED,
        Json(json!({"id": id, "success": true, "errors": []})),
    )
        .into_response()
}

async fn get_user(State(state): State<SalesforceState>, Path((_version, id)): Path<(String, String)>) -> Response {
    match state.users.lock().expect("users lock").get(&id) {
        Some(user) => Json(Value::Object(user.clone())).into_response(),
        None => sf_error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "The requested resource does not exist",
            &[],
        ),
    }
}

async fn update_user(
    State(state): State<SalesforceState>,
    Path((_version, id)): Path<(String, String)>,
    Json(body): Json<Value>,
) -> Response {
    let Value::Object(changes) = body else {
        return sf_error(StatusCode::BAD_REQUEST, "JSON_PARSER_ERROR", "expected an object", &[]);
    };
    if !state.users.lock().expect("users lock").contains_key(&id) {
        return sf_error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "The requested resource does not exist",
            &[],
        );
    }
    if let Some(response) = check_fields(&state, &changes, Some(&id)) {
        return response;
    }
    let mut users = state.users.lock().expect("users lock");
    let user = users.get_mut(&id).expect("checked above");
    for (field, value) in changes {
        if field != "Id" {
            user.insert(field, value);
        }
    }
    StatusCode::NO_CONTENT.into_response()
}

#[derive(Deserialize)]
struct QueryParameters {
    q: String,
}

async fn query(State(state): State<SalesforceState>, Query(parameters): Query<QueryParameters>) -> Response {
    state.queries.lock().expect("queries lock").push(parameters.q.clone());
    let parsed = match parse_soql(&parameters.q) {
        Ok(parsed) => parsed,
        Err(message) => return sf_error(StatusCode::BAD_REQUEST, "MALFORMED_QUERY", &message, &[]),
    };
    let users = state.users.lock().expect("users lock");
    let records: Vec<Value> = users
        .values()
        .filter(|user| {
            let value = user.get(&parsed.field).and_then(Value::as_str);
            match parsed.field.as_str() {
                "Username" => value.is_some_and(|value| value.eq_ignore_ascii_case(&parsed.literal)),
                _ => value == Some(parsed.literal.as_str()),
            }
        })
        .map(|user| {
            let mut record = Map::new();
            record.insert(
                "attributes".into(),
                json!({"type": "User", "url": format!("/services/data/v62.0/sobjects/User/{}", user["Id"].as_str().unwrap_or_default())}),
            );
            for field in &parsed.fields {
                record.insert(field.clone(), user.get(field).cloned().unwrap_or(Value::Null));
            }
            Value::Object(record)
        })
        .collect();
    Json(json!({"totalSize": records.len(), "done": true, "records": records})).into_response()
}

struct Soql {
    fields: Vec<String>,
    field: String,
    literal: String,
}

/// `SELECT a, b FROM User WHERE Field = 'literal'` and nothing more.
fn parse_soql(query: &str) -> Result<Soql, String> {
    let rest = query.trim();
    let rest = strip_keyword(rest, "SELECT")?;
    let from = rest.to_ascii_uppercase().find(" FROM ").ok_or("expected FROM")?;
    let fields: Vec<String> = rest[..from].split(',').map(|field| field.trim().to_string()).collect();
    if fields
        .iter()
        .any(|field| field.is_empty() || !field.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
    {
        return Err("bad field list".into());
    }
    let rest = rest[from + 6..].trim_start();
    let rest = strip_keyword(rest, "User")?;
    let rest = strip_keyword(rest, "WHERE")?;
    let (field, rest) = rest.split_once('=').ok_or("expected =")?;
    let field = field.trim().to_string();
    if field.is_empty() || !field.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err("bad condition field".into());
    }
    let rest = rest.trim_start();
    let mut characters = rest.strip_prefix('\'').ok_or("expected a quoted literal")?.chars();
    let mut literal = String::new();
    loop {
        match characters.next().ok_or("unterminated literal")? {
            '\\' => literal.push(match characters.next().ok_or("dangling escape")? {
                'n' => '\n',
                'r' => '\r',
                't' => '\t',
                'b' => '\u{8}',
                'f' => '\u{c}',
                other @ ('\\' | '\'' | '"') => other,
                other => return Err(format!("invalid escape \\{other}")),
            }),
            '\'' => break,
            other => literal.push(other),
        }
    }
    let trailing: String = characters.collect();
    if !trailing.trim().is_empty() {
        return Err(format!("unexpected token: {}", trailing.trim()));
    }
    Ok(Soql { fields, field, literal })
}

fn strip_keyword<'a>(text: &'a str, keyword: &str) -> Result<&'a str, String> {
    let head = text.get(..keyword.len()).ok_or(format!("expected {keyword}"))?;
    if !head.eq_ignore_ascii_case(keyword) {
        return Err(format!("expected {keyword}"));
    }
    Ok(text[keyword.len()..].trim_start())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soql_parsing_is_strict() {
        let parsed = parse_soql(r"SELECT Id, IsActive FROM User WHERE Username = 'a\'b@x.com'").unwrap();
        assert_eq!(parsed.fields, vec!["Id", "IsActive"]);
        assert_eq!(parsed.literal, "a'b@x.com");
        assert!(parse_soql("SELECT Id FROM User WHERE Username = 'x' OR Username != 'y'").is_err());
        assert!(parse_soql("SELECT Id FROM User WHERE Username = 'unterminated").is_err());
        assert!(parse_soql("DELETE FROM User").is_err());
    }
}
