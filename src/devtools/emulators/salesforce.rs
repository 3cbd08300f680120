//! An in-memory Salesforce: the OAuth token endpoint (client credentials, JWT bearer
//! with a signature check, username-password) and the REST resources a connector uses:
//! `sobjects/User`, `sobjects/PermissionSetAssignment`, the sObject Collections
//! (`composite/sobjects`) for batches of assignments, and `query`.
//!
//! It enforces what Salesforce enforces for users: the required fields
//! (`REQUIRED_FIELD_MISSING`), an email-shaped `Username` (`FIELD_INTEGRITY_EXCEPTION`),
//! globally unique Usernames (`DUPLICATE_USERNAME`, also for names "taken in another
//! org"), `Alias` of at most 8 characters, and expiring sessions (`INVALID_SESSION_ID`).
//! Users cannot be deleted, only deactivated, and deactivation keeps their permission set
//! assignments, as in Salesforce.
//!
//! Permission sets are set up by the test or the demo (`add_permission_set`). An
//! assignment refuses what Salesforce refuses: a second assignment of the same set to the
//! same user (`DUPLICATE_VALUE` "Duplicate PermissionSetAssignment"), an id that is no id
//! (`MALFORMED_ID`), an id of the wrong object (`FIELD_INTEGRITY_EXCEPTION`), a user or
//! set that does not exist (`INVALID_CROSS_REFERENCE_KEY`), and unknown or read-only
//! fields. Deleting an assignment twice answers `ENTITY_IS_DELETED`. Collections take at
//! most 200 records or ids (`EXCEEDED_ID_LIMIT`) and honour `allOrNone`.
//!
//! Queries are parsed strictly (`SELECT … FROM User|PermissionSet|PermissionSetAssignment
//! [WHERE Field = 'literal' | Field IN ('a', 'b') [AND …]]`), so an unescaped quote shows
//! up as `MALFORMED_QUERY`; an unknown object is `INVALID_TYPE` and an unknown
//! permission-set field `INVALID_FIELD`. Every response carries `Sforce-Limit-Info`.

use std::collections::{BTreeMap, HashMap, HashSet};
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
/// Salesforce ids start with their object's key prefix.
const USER_KEY_PREFIX: &str = "005";
const PERMISSION_SET_KEY_PREFIX: &str = "0PS";
const PERMISSION_SET_ASSIGNMENT_KEY_PREFIX: &str = "0Pa";
const PERMISSION_SET_GROUP_KEY_PREFIX: &str = "0PG";
/// The most records or ids one sObject Collections request may carry.
const COLLECTION_LIMIT: usize = 200;
/// The fields of a PermissionSetAssignment a create may set.
const ASSIGNMENT_CREATE_FIELDS: [&str; 4] = [
    "AssigneeId",
    "PermissionSetId",
    "PermissionSetGroupId",
    "ExpirationDate",
];
/// Its fields Salesforce sets itself.
const ASSIGNMENT_READ_ONLY_FIELDS: [&str; 4] = ["Id", "IsActive", "IsRevoked", "SystemModstamp"];
/// The PermissionSet fields the emulator keeps, for queries.
const PERMISSION_SET_FIELDS: [&str; 4] = ["Id", "Name", "Label", "IsOwnedByProfile"];

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
    /// Whoever needs several of these locks takes them in this order: users, permission
    /// sets, assignments, deleted ids.
    users: Arc<Mutex<HashMap<String, Map<String, Value>>>>,
    permission_sets: Arc<Mutex<BTreeMap<String, Map<String, Value>>>>,
    assignments: Arc<Mutex<BTreeMap<String, Map<String, Value>>>>,
    /// Ids of deleted records: Salesforce tells "entity is deleted" from "does not exist".
    deleted_ids: Arc<Mutex<HashSet<String>>>,
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
        let id = new_id(&self.state, USER_KEY_PREFIX);
        fields.insert("Id".into(), json!(id));
        fields.entry("IsActive").or_insert(json!(true));
        self.state.users.lock().expect("users lock").insert(id.clone(), fields);
        id
    }

    /// Adds a permission set as an administrator would have (Salesforce's API cannot be
    /// used to create one with its permissions); returns its Id.
    pub fn add_permission_set(&self, name: &str, label: &str) -> String {
        let id = new_id(&self.state, PERMISSION_SET_KEY_PREFIX);
        let fields = json!({"Id": id, "Name": name, "Label": label, "IsOwnedByProfile": false});
        let Value::Object(fields) = fields else {
            unreachable!("an object literal")
        };
        self.state
            .permission_sets
            .lock()
            .expect("permission sets lock")
            .insert(id.clone(), fields);
        id
    }

    pub fn permission_sets(&self) -> Vec<Map<String, Value>> {
        let permission_sets = self.state.permission_sets.lock().expect("permission sets lock");
        permission_sets.values().cloned().collect()
    }

    /// Assigns a permission set as an administrator would have; returns the assignment's
    /// Id. Neither id is checked.
    pub fn assign_directly(&self, assignee_id: &str, permission_set_id: &str) -> String {
        let id = new_id(&self.state, PERMISSION_SET_ASSIGNMENT_KEY_PREFIX);
        self.state
            .assignments
            .lock()
            .expect("assignments lock")
            .insert(id.clone(), assignment_record(&id, assignee_id, permission_set_id));
        id
    }

    /// Every PermissionSetAssignment, each with `Id`, `AssigneeId` and `PermissionSetId`.
    pub fn assignments(&self) -> Vec<Map<String, Value>> {
        self.state
            .assignments
            .lock()
            .expect("assignments lock")
            .values()
            .cloned()
            .collect()
    }

    pub fn assignment_count(&self) -> usize {
        self.state.assignments.lock().expect("assignments lock").len()
    }

    pub fn assignments_of(&self, user_id: &str) -> Vec<Map<String, Value>> {
        self.assignments()
            .into_iter()
            .filter(|assignment| assignment["AssigneeId"] == user_id)
            .collect()
    }

    /// The Names of the permission sets assigned to `user_id`, sorted.
    pub fn permission_set_names_of(&self, user_id: &str) -> Vec<String> {
        let permission_sets = self.permission_sets();
        let mut names: Vec<String> = self
            .assignments_of(user_id)
            .iter()
            .filter_map(|assignment| {
                permission_sets
                    .iter()
                    .find(|set| set["Id"] == assignment["PermissionSetId"])
                    .and_then(|set| set["Name"].as_str().map(str::to_string))
            })
            .collect();
        names.sort();
        names
    }

    /// How many REST API calls the org has answered (the `api-usage` of
    /// `Sforce-Limit-Info`); token requests are not API calls.
    pub fn api_calls(&self) -> u64 {
        self.state.api_calls.load(Ordering::Relaxed)
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
        permission_sets: Arc::default(),
        assignments: Arc::default(),
        deleted_ids: Arc::default(),
        sessions: Arc::default(),
        api_calls: Arc::default(),
        queries: Arc::default(),
        next_id: Arc::new(AtomicU64::new(1)),
    };
    let api = Router::new()
        .route("/sobjects/User/", post(create_user))
        .route("/sobjects/User/{id}", get(get_user).patch(update_user))
        .route("/sobjects/PermissionSetAssignment", post(create_assignment))
        .route("/sobjects/PermissionSetAssignment/", post(create_assignment))
        .route(
            "/sobjects/PermissionSetAssignment/{id}",
            get(get_assignment).delete(delete_assignment),
        )
        .route("/composite/sobjects", post(create_collection).delete(delete_collection))
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

/// A new 18-character id for an object with `key_prefix`.
fn new_id(state: &SalesforceState, key_prefix: &str) -> String {
    format!("{key_prefix}{:015}", state.next_id.fetch_add(1, Ordering::Relaxed))
}

/// Whether `value` has the shape of a Salesforce id: 15 or 18 letters and digits.
fn is_id_shaped(value: &str) -> bool {
    matches!(value.len(), 15 | 18) && value.chars().all(|c| c.is_ascii_alphanumeric())
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
    let id = new_id(&state, USER_KEY_PREFIX);
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

// === Permission set assignments ===

/// One refusal of one record, as Salesforce words it. A single-record request answers it
/// as `[{message, errorCode, fields}]`; a collection as the record's
/// `{success: false, errors: [{statusCode, message, fields}]}`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RecordError {
    code: &'static str,
    message: String,
    fields: Vec<String>,
}

impl RecordError {
    fn new(code: &'static str, message: impl Into<String>, fields: &[&str]) -> RecordError {
        RecordError {
            code,
            message: message.into(),
            fields: fields.iter().map(|field| field.to_string()).collect(),
        }
    }

    fn response(&self, status: StatusCode) -> Response {
        (
            status,
            Json(json!([{"message": self.message, "errorCode": self.code, "fields": self.fields}])),
        )
            .into_response()
    }

    fn save_result(&self) -> Value {
        json!({"success": false, "errors": [{"statusCode": self.code, "message": self.message, "fields": self.fields}]})
    }
}

fn rolled_back() -> Value {
    RecordError::new(
        "ALL_OR_NONE_OPERATION_ROLLED_BACK",
        "Record rolled back because not all records were valid and the request was using AllOrNone header",
        &[],
    )
    .save_result()
}

fn assignment_record(id: &str, assignee_id: &str, permission_set_id: &str) -> Map<String, Value> {
    let Value::Object(record) = json!({
        "Id": id,
        "AssigneeId": assignee_id,
        "PermissionSetId": permission_set_id,
        "PermissionSetGroupId": null,
        "IsActive": true,
    }) else {
        unreachable!("an object literal")
    };
    record
}

/// Refuses field names Salesforce would not take in a PermissionSetAssignment body. An
/// unknown field fails the whole request, as Salesforce fails it while reading the body.
fn check_assignment_field_names(record: &Map<String, Value>) -> Result<(), RecordError> {
    for field in record.keys() {
        let known = field == "attributes"
            || ASSIGNMENT_CREATE_FIELDS.contains(&field.as_str())
            || ASSIGNMENT_READ_ONLY_FIELDS.contains(&field.as_str());
        if !known {
            return Err(RecordError::new(
                "INVALID_FIELD",
                format!("No such column '{field}' on sobject of type PermissionSetAssignment"),
                &[],
            ));
        }
    }
    Ok(())
}

/// Checks a reference field of a new assignment: an id of the right object that exists.
fn check_reference(
    record: &Map<String, Value>,
    field: &'static str,
    label: &str,
    key_prefix: &str,
    exists: impl Fn(&str) -> bool,
) -> Result<String, RecordError> {
    let value = match record.get(field) {
        None | Some(Value::Null) => {
            return Err(RecordError::new(
                "REQUIRED_FIELD_MISSING",
                format!("Required fields are missing: [{field}]"),
                &[field],
            ))
        }
        Some(Value::String(value)) if value.is_empty() => {
            return Err(RecordError::new(
                "REQUIRED_FIELD_MISSING",
                format!("Required fields are missing: [{field}]"),
                &[field],
            ))
        }
        Some(Value::String(value)) => value.clone(),
        Some(other) => other.to_string(),
    };
    let incorrect_type = format!("{label}: id value of incorrect type: {value}");
    if !is_id_shaped(&value) {
        return Err(RecordError::new("MALFORMED_ID", incorrect_type, &[field]));
    }
    if !value.starts_with(key_prefix) {
        return Err(RecordError::new("FIELD_INTEGRITY_EXCEPTION", incorrect_type, &[field]));
    }
    if !exists(&value) {
        return Err(RecordError::new(
            "INVALID_CROSS_REFERENCE_KEY",
            "invalid cross reference id",
            &[],
        ));
    }
    Ok(value)
}

/// The org's records an assignment is checked against, locked for a whole request.
struct AssignmentContext<'a> {
    users: &'a HashMap<String, Map<String, Value>>,
    permission_sets: &'a BTreeMap<String, Map<String, Value>>,
    assignments: &'a BTreeMap<String, Map<String, Value>>,
}

/// Validates one new assignment against the org and the assignments `pending` in the same
/// request; returns the record to store.
fn new_assignment(
    state: &SalesforceState,
    org: &AssignmentContext,
    record: &Map<String, Value>,
    pending: &[Map<String, Value>],
) -> Result<Map<String, Value>, RecordError> {
    if let Some(field) = ASSIGNMENT_READ_ONLY_FIELDS
        .iter()
        .find(|field| record.contains_key(**field))
    {
        return Err(RecordError::new(
            "INVALID_FIELD_FOR_INSERT_UPDATE",
            format!("Unable to create/update fields: {field}. Please check the security settings of this field and verify that it is read/write for your profile or permission set."),
            &[field],
        ));
    }
    let assignee_id = check_reference(record, "AssigneeId", "Assignee ID", USER_KEY_PREFIX, |id| {
        org.users.contains_key(id)
    })?;
    if record.get("PermissionSetGroupId").is_some_and(|value| !value.is_null()) {
        // The emulator has no permission set groups, so any reference to one is dangling.
        check_reference(
            record,
            "PermissionSetGroupId",
            "Permission Set Group ID",
            PERMISSION_SET_GROUP_KEY_PREFIX,
            |_| false,
        )?;
    }
    let permission_set_id = check_reference(
        record,
        "PermissionSetId",
        "Permission Set ID",
        PERMISSION_SET_KEY_PREFIX,
        |id| org.permission_sets.contains_key(id),
    )?;
    let taken = org
        .assignments
        .values()
        .chain(pending)
        .any(|existing| existing["AssigneeId"] == assignee_id && existing["PermissionSetId"] == permission_set_id);
    if taken {
        return Err(RecordError::new(
            "DUPLICATE_VALUE",
            "Duplicate PermissionSetAssignment",
            &[],
        ));
    }
    let id = new_id(state, PERMISSION_SET_ASSIGNMENT_KEY_PREFIX);
    let mut stored = assignment_record(&id, &assignee_id, &permission_set_id);
    if let Some(expiration) = record.get("ExpirationDate") {
        stored.insert("ExpirationDate".into(), expiration.clone());
    }
    Ok(stored)
}

/// Creates the assignments `records` describe, each on its own or, with `all_or_none`,
/// none if one fails. Returns each record's new Id or refusal, in order, and whether the
/// successes were rolled back.
fn create_assignments(
    state: &SalesforceState,
    records: &[Map<String, Value>],
    all_or_none: bool,
) -> (Vec<Result<String, RecordError>>, bool) {
    // Held for the whole request, so two requests cannot both create the same assignment.
    let users = state.users.lock().expect("users lock");
    let permission_sets = state.permission_sets.lock().expect("permission sets lock");
    let mut assignments = state.assignments.lock().expect("assignments lock");
    let org = AssignmentContext {
        users: &users,
        permission_sets: &permission_sets,
        assignments: &assignments,
    };
    let mut created: Vec<Map<String, Value>> = Vec::new();
    let outcomes: Vec<Result<String, RecordError>> = records
        .iter()
        .map(|record| {
            let new = new_assignment(state, &org, record, &created)?;
            let id = new["Id"].as_str().unwrap_or_default().to_string();
            created.push(new);
            Ok(id)
        })
        .collect();
    let rolled_back = all_or_none && outcomes.iter().any(Result::is_err);
    if !rolled_back {
        for record in created {
            let id = record["Id"].as_str().unwrap_or_default().to_string();
            assignments.insert(id, record);
        }
    }
    (outcomes, rolled_back)
}

async fn create_assignment(State(state): State<SalesforceState>, Json(body): Json<Value>) -> Response {
    let Value::Object(record) = body else {
        return sf_error(StatusCode::BAD_REQUEST, "JSON_PARSER_ERROR", "expected an object", &[]);
    };
    if let Err(error) = check_assignment_field_names(&record) {
        return error.response(StatusCode::BAD_REQUEST);
    }
    let (mut outcomes, _) = create_assignments(&state, &[record], false);
    match outcomes.remove(0) {
        Ok(id) => (
            StatusCode::CREATED,
            Json(json!({"id": id, "success": true, "errors": []})),
        )
            .into_response(),
        Err(error) => error.response(StatusCode::BAD_REQUEST),
    }
}

/// The answer for a record id in a URL that names nothing: Salesforce reads a segment
/// that is no id as an external id, and tells a deleted record from one that never was.
fn missing_record(state: &SalesforceState, id: &str) -> Response {
    if !is_id_shaped(id) {
        return sf_error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            &format!("Provided external ID field does not exist or is not accessible: {id}"),
            &[],
        );
    }
    if state.deleted_ids.lock().expect("deleted ids lock").contains(id) {
        return sf_error(StatusCode::NOT_FOUND, "ENTITY_IS_DELETED", "entity is deleted", &[]);
    }
    sf_error(
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
        "The requested resource does not exist",
        &[],
    )
}

async fn get_assignment(State(state): State<SalesforceState>, Path((version, id)): Path<(String, String)>) -> Response {
    let found = state.assignments.lock().expect("assignments lock").get(&id).cloned();
    match found {
        Some(record) => {
            let mut record = record;
            record.insert(
                "attributes".into(),
                attributes(&version, "PermissionSetAssignment", &id),
            );
            Json(Value::Object(record)).into_response()
        }
        None => missing_record(&state, &id),
    }
}

async fn delete_assignment(
    State(state): State<SalesforceState>,
    Path((_version, id)): Path<(String, String)>,
) -> Response {
    let removed = state.assignments.lock().expect("assignments lock").remove(&id);
    match removed {
        Some(_) => {
            state.deleted_ids.lock().expect("deleted ids lock").insert(id);
            StatusCode::NO_CONTENT.into_response()
        }
        None => missing_record(&state, &id),
    }
}

fn exceeded_collection_limit() -> Response {
    sf_error(
        StatusCode::BAD_REQUEST,
        "EXCEEDED_ID_LIMIT",
        &format!("record limit reached. cannot submit more than {COLLECTION_LIMIT} records into this call"),
        &[],
    )
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CollectionCreate {
    #[serde(default)]
    all_or_none: bool,
    records: Vec<Map<String, Value>>,
}

/// `POST composite/sobjects`: creates PermissionSetAssignments, one SaveResult per
/// record in order. With `allOrNone`, one failure rolls back the others.
async fn create_collection(State(state): State<SalesforceState>, Json(body): Json<Value>) -> Response {
    let request: CollectionCreate = match serde_json::from_value(body) {
        Ok(request) => request,
        Err(error) => return sf_error(StatusCode::BAD_REQUEST, "JSON_PARSER_ERROR", &error.to_string(), &[]),
    };
    if request.records.len() > COLLECTION_LIMIT {
        return exceeded_collection_limit();
    }
    for record in &request.records {
        match record_type(record) {
            Some("PermissionSetAssignment") => {}
            Some(other) => {
                return sf_error(
                    StatusCode::BAD_REQUEST,
                    "INVALID_TYPE",
                    &format!("sObject type '{other}' is not supported by this emulator's collections"),
                    &[],
                )
            }
            None => {
                return sf_error(
                    StatusCode::BAD_REQUEST,
                    "INVALID_TYPE",
                    "Each record needs an attributes map with a type",
                    &[],
                )
            }
        }
        if let Err(error) = check_assignment_field_names(record) {
            return error.response(StatusCode::BAD_REQUEST);
        }
    }
    let (outcomes, roll_back) = create_assignments(&state, &request.records, request.all_or_none);
    let results: Vec<Value> = outcomes
        .iter()
        .map(|outcome| match outcome {
            Ok(_) if roll_back => rolled_back(),
            Ok(id) => json!({"id": id, "success": true, "errors": []}),
            Err(error) => error.save_result(),
        })
        .collect();
    Json(results).into_response()
}

/// `attributes.type` of an sObject Collections record.
fn record_type(record: &Map<String, Value>) -> Option<&str> {
    record.get("attributes")?.get("type")?.as_str()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CollectionDelete {
    ids: Option<String>,
    #[serde(default)]
    all_or_none: bool,
}

/// `DELETE composite/sobjects?ids=…`: deletes PermissionSetAssignments, one DeleteResult
/// per id in order. With `allOrNone`, one failure rolls back the others.
async fn delete_collection(State(state): State<SalesforceState>, Query(request): Query<CollectionDelete>) -> Response {
    let Some(ids) = request.ids.filter(|ids| !ids.is_empty()) else {
        return sf_error(
            StatusCode::BAD_REQUEST,
            "MISSING_ARGUMENT",
            "ids: required parameter",
            &[],
        );
    };
    let ids: Vec<&str> = ids.split(',').collect();
    if ids.len() > COLLECTION_LIMIT {
        return exceeded_collection_limit();
    }
    let users = state.users.lock().expect("users lock");
    let permission_sets = state.permission_sets.lock().expect("permission sets lock");
    let mut assignments = state.assignments.lock().expect("assignments lock");
    let mut deleted_ids = state.deleted_ids.lock().expect("deleted ids lock");
    let mut removed: Vec<String> = Vec::new();
    let outcomes: Vec<Result<&str, RecordError>> = ids
        .iter()
        .map(|id| {
            if !is_id_shaped(id) {
                return Err(RecordError::new("MALFORMED_ID", format!("malformed id {id}"), &[]));
            }
            if deleted_ids.contains(*id) || removed.iter().any(|gone| gone == id) {
                return Err(RecordError::new("ENTITY_IS_DELETED", "entity is deleted", &[]));
            }
            if assignments.contains_key(*id) {
                removed.push(id.to_string());
                return Ok(*id);
            }
            if users.contains_key(*id) || permission_sets.contains_key(*id) {
                // Users cannot be deleted, and the emulator keeps its permission sets.
                return Err(RecordError::new(
                    "INSUFFICIENT_ACCESS_OR_READONLY",
                    "insufficient access rights on object id",
                    &[],
                ));
            }
            Err(RecordError::new(
                "INVALID_CROSS_REFERENCE_KEY",
                "invalid cross reference id",
                &[],
            ))
        })
        .collect();
    let roll_back = request.all_or_none && outcomes.iter().any(Result::is_err);
    if !roll_back {
        for id in removed {
            assignments.remove(&id);
            deleted_ids.insert(id);
        }
    }
    let results: Vec<Value> = outcomes
        .iter()
        .map(|outcome| match outcome {
            Ok(_) if roll_back => rolled_back(),
            Ok(id) => json!({"id": id, "success": true, "errors": []}),
            Err(error) => error.save_result(),
        })
        .collect();
    Json(results).into_response()
}

// === Queries ===

/// What a query reads: the object's name, its records, and its fields when the emulator
/// knows them all.
type QueriedObject<'a> = (&'a str, Vec<Map<String, Value>>, Option<&'a [&'a str]>);

#[derive(Deserialize)]
struct QueryParameters {
    q: String,
}

/// A record's `attributes`, as every REST answer carries them.
fn attributes(version: &str, object: &str, id: &str) -> Value {
    json!({"type": object, "url": format!("/services/data/{version}/sobjects/{object}/{id}")})
}

fn no_such_column(field: &str, object: &str) -> Response {
    sf_error(
        StatusCode::BAD_REQUEST,
        "INVALID_FIELD",
        &format!("No such column '{field}' on entity '{object}'. If you are attempting to use a custom field, be sure to append the '__c' after the custom field name. Please reference your WSDL or the describe call for the appropriate names."),
        &[],
    )
}

async fn query(
    State(state): State<SalesforceState>,
    Path(version): Path<String>,
    Query(parameters): Query<QueryParameters>,
) -> Response {
    state.queries.lock().expect("queries lock").push(parameters.q.clone());
    let parsed = match parse_soql(&parameters.q) {
        Ok(parsed) => parsed,
        Err(message) => return sf_error(StatusCode::BAD_REQUEST, "MALFORMED_QUERY", &message, &[]),
    };
    let (object, records, known_fields): QueriedObject = match parsed.object.to_ascii_lowercase().as_str() {
            "user" => (
                "User",
                state.users.lock().expect("users lock").values().cloned().collect(),
                None,
            ),
            "permissionset" => (
                "PermissionSet",
                state.permission_sets.lock().expect("permission sets lock").values().cloned().collect(),
                Some(&PERMISSION_SET_FIELDS),
            ),
            "permissionsetassignment" => (
                "PermissionSetAssignment",
                state.assignments.lock().expect("assignments lock").values().cloned().collect(),
                Some(&["Id", "AssigneeId", "PermissionSetId", "PermissionSetGroupId", "IsActive", "ExpirationDate"]),
            ),
            _ => {
                return sf_error(
                    StatusCode::BAD_REQUEST,
                    "INVALID_TYPE",
                    &format!("sObject type '{}' is not supported. If you are attempting to use a custom object, be sure to append the '__c' after the entity name. Please reference your WSDL or the describe call for the appropriate names.", parsed.object),
                    &[],
                )
            }
        };
    // The emulator keeps whatever fields a user was created with, so it cannot tell an
    // unknown User field; for the other objects it can.
    if let Some(known_fields) = known_fields {
        let used = parsed
            .fields
            .iter()
            .chain(parsed.conditions.iter().map(|condition| &condition.field));
        for field in used {
            if !known_fields.iter().any(|known| known.eq_ignore_ascii_case(field)) {
                return no_such_column(field, object);
            }
        }
    }
    let matching: Vec<Value> = records
        .iter()
        .filter(|record| {
            parsed.conditions.iter().all(|condition| {
                let stored = record_field(record, &condition.field).and_then(Value::as_str);
                condition
                    .values
                    .iter()
                    .any(|literal| stored.is_some_and(|stored| soql_equals(object, &condition.field, stored, literal)))
            })
        })
        .map(|record| {
            let id = record["Id"].as_str().unwrap_or_default();
            let mut shown = Map::new();
            shown.insert("attributes".into(), attributes(&version, object, id));
            for field in &parsed.fields {
                shown.insert(
                    field.clone(),
                    record_field(record, field).cloned().unwrap_or(Value::Null),
                );
            }
            Value::Object(shown)
        })
        .collect();
    Json(json!({"totalSize": matching.len(), "done": true, "records": matching})).into_response()
}

/// A field of a stored record; SOQL field names are case-insensitive.
fn record_field<'a>(record: &'a Map<String, Value>, field: &str) -> Option<&'a Value> {
    record.get(field).or_else(|| {
        record
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(field))
            .map(|(_, value)| value)
    })
}

/// SOQL's `=` on a text field ignores case. The User emulation keeps its older, stricter
/// rule (only `Username` ignores case), which the connector tests rely on. An id matches
/// its 15-character form too.
fn soql_equals(object: &str, field: &str, stored: &str, literal: &str) -> bool {
    let is_id_field = field.to_ascii_lowercase().ends_with("id");
    if is_id_field && literal.len() == 15 && stored.len() == 18 {
        return stored.starts_with(literal);
    }
    if object == "User" && !field.eq_ignore_ascii_case("Username") {
        return stored == literal;
    }
    stored.eq_ignore_ascii_case(literal)
}

#[derive(Debug, PartialEq, Eq)]
struct Soql {
    fields: Vec<String>,
    object: String,
    /// Joined by AND; no conditions selects every record.
    conditions: Vec<Condition>,
}

/// `Field = 'a'` (one value) or `Field IN ('a', 'b')`.
#[derive(Debug, PartialEq, Eq)]
struct Condition {
    field: String,
    values: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Word(String),
    Literal(String),
    Comma,
    Equals,
    Open,
    Close,
}

/// Splits a query into words, quoted literals (with SOQL's backslash escapes) and
/// punctuation. Anything else, `OR` and `!=` among them, is refused later or here.
fn tokenize(query: &str) -> Result<Vec<Token>, String> {
    let mut tokens = Vec::new();
    let mut characters = query.chars().peekable();
    while let Some(&character) = characters.peek() {
        match character {
            c if c.is_whitespace() => {
                characters.next();
            }
            ',' | '=' | '(' | ')' => {
                characters.next();
                tokens.push(match character {
                    ',' => Token::Comma,
                    '=' => Token::Equals,
                    '(' => Token::Open,
                    _ => Token::Close,
                });
            }
            '\'' => {
                characters.next();
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
                tokens.push(Token::Literal(literal));
            }
            c if c.is_ascii_alphanumeric() || c == '_' => {
                let mut word = String::new();
                while let Some(&c) = characters.peek() {
                    if !(c.is_ascii_alphanumeric() || c == '_') {
                        break;
                    }
                    word.push(c);
                    characters.next();
                }
                tokens.push(Token::Word(word));
            }
            other => return Err(format!("unexpected token: {other}")),
        }
    }
    Ok(tokens)
}

type Tokens = std::iter::Peekable<std::vec::IntoIter<Token>>;

fn keyword(tokens: &mut Tokens, wanted: &str) -> Result<(), String> {
    match tokens.next() {
        Some(Token::Word(word)) if word.eq_ignore_ascii_case(wanted) => Ok(()),
        _ => Err(format!("expected {wanted}")),
    }
}

fn word(tokens: &mut Tokens, what: &str) -> Result<String, String> {
    match tokens.next() {
        Some(Token::Word(word)) => Ok(word),
        _ => Err(format!("expected {what}")),
    }
}

/// `SELECT a, b FROM Object [WHERE Field = 'x' [AND Field IN ('y', 'z')] …]` and nothing
/// more: the emulator refuses what it would not answer faithfully.
fn parse_soql(query: &str) -> Result<Soql, String> {
    let mut tokens = tokenize(query)?.into_iter().peekable();
    keyword(&mut tokens, "SELECT")?;
    let mut fields = vec![word(&mut tokens, "a field")?];
    while tokens.peek() == Some(&Token::Comma) {
        tokens.next();
        fields.push(word(&mut tokens, "a field")?);
    }
    keyword(&mut tokens, "FROM")?;
    let object = word(&mut tokens, "an object")?;
    let mut conditions = Vec::new();
    if tokens.peek().is_some() {
        keyword(&mut tokens, "WHERE")?;
        loop {
            let field = word(&mut tokens, "a condition field")?;
            let values = match tokens.next() {
                Some(Token::Equals) => match tokens.next() {
                    Some(Token::Literal(literal)) => vec![literal],
                    _ => return Err("expected a quoted literal".into()),
                },
                Some(Token::Word(word)) if word.eq_ignore_ascii_case("IN") => {
                    if tokens.next() != Some(Token::Open) {
                        return Err("expected (".into());
                    }
                    let mut values = Vec::new();
                    loop {
                        match tokens.next() {
                            Some(Token::Literal(literal)) => values.push(literal),
                            _ => return Err("expected a quoted literal".into()),
                        }
                        match tokens.next() {
                            Some(Token::Comma) => {}
                            Some(Token::Close) => break,
                            _ => return Err("expected , or )".into()),
                        }
                    }
                    values
                }
                _ => return Err("expected = or IN".into()),
            };
            conditions.push(Condition { field, values });
            match tokens.next() {
                None => break,
                Some(Token::Word(word)) if word.eq_ignore_ascii_case("AND") => {}
                Some(other) => return Err(format!("unexpected token: {other:?}")),
            }
        }
    }
    Ok(Soql {
        fields,
        object,
        conditions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soql_parsing_is_strict() {
        let parsed = parse_soql(r"SELECT Id, IsActive FROM User WHERE Username = 'a\'b@x.com'").unwrap();
        assert_eq!(parsed.fields, vec!["Id", "IsActive"]);
        assert_eq!(parsed.object, "User");
        assert_eq!(
            parsed.conditions,
            vec![Condition {
                field: "Username".into(),
                values: vec!["a'b@x.com".into()]
            }]
        );
        assert!(parse_soql("SELECT Id FROM User WHERE Username = 'x' OR Username != 'y'").is_err());
        assert!(parse_soql("SELECT Id FROM User WHERE Username = 'unterminated").is_err());
        assert!(parse_soql("DELETE FROM User").is_err());
        assert!(parse_soql("SELECT Id FROM User WHERE").is_err());
        assert!(parse_soql("SELECT Id FROM User WHERE Username = 'x' AND").is_err());
        assert!(parse_soql("SELECT Id FROM User WHERE Username = 'x' LIMIT 1").is_err());
    }

    #[test]
    fn soql_takes_in_lists_and_and() {
        let parsed = parse_soql(
            r"select Id from PermissionSetAssignment where AssigneeId = '005000000000000001' and PermissionSetId in ('0PS1', 'it\'s')",
        )
        .unwrap();
        assert_eq!(parsed.object, "PermissionSetAssignment");
        assert_eq!(parsed.conditions.len(), 2);
        assert_eq!(parsed.conditions[1].values, vec!["0PS1", "it's"]);
        assert!(parse_soql("SELECT Id FROM PermissionSet WHERE Name IN ()").is_err());
        assert!(parse_soql("SELECT Id FROM PermissionSet WHERE Name IN ('a',)").is_err());
        assert!(parse_soql("SELECT Id FROM PermissionSet WHERE Name IN ('a' 'b')").is_err());
        let every = parse_soql("SELECT Id, Name FROM PermissionSet").unwrap();
        assert!(every.conditions.is_empty());
    }

    #[test]
    fn ids_are_told_apart_by_shape_and_prefix() {
        assert!(is_id_shaped("005000000000000001"));
        assert!(is_id_shaped("005000000000000"));
        assert!(!is_id_shaped("NotReal"));
        assert!(!is_id_shaped("005-00000000000001"));
        assert!(soql_equals(
            "PermissionSet",
            "Id",
            "0PS000000000000001",
            "0PS000000000000"
        ));
        assert!(soql_equals("PermissionSet", "Name", "Engineering", "engineering"));
        assert!(!soql_equals("User", "Email", "A@x.com", "a@x.com"));
    }
}
