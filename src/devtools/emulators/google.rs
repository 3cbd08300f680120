//! An in-memory Google Admin SDK Directory API (users, groups and group members) with its
//! OAuth token endpoint.
//!
//! The token endpoint verifies the JWT-bearer assertion the way Google does: RS256
//! signature against the service account's public key, `iss`, `sub`, `scope`, `aud` and
//! `exp` (at most one hour after `iat`). Domain-wide delegation is emulated as granting the
//! user, group and group-member scopes (and their read-only forms): a token asking for any
//! other scope is refused, and every API call needs a token with one of the scopes the
//! discovery document lists for its method (else 403 `insufficientPermissions`).
//!
//! The users endpoints enforce what Google enforces on insert: `primaryEmail` in the
//! domain, both names present and at most 60 characters, a password of 8 to 100
//! characters, and a unique `primaryEmail` (409 `duplicate` with Google's error body).
//!
//! The groups endpoints (`groups.insert/get/update/patch/delete/list`) and members
//! endpoints (`members.insert/get/update/patch/delete/list/hasMember`) answer as Google
//! does where a client relies on it: 409 `duplicate` for a taken group email ("Entity
//! already exists.") or a member already present ("Member already exists."), 404
//! `notFound` "Resource Not Found: groupKey" / "…: memberKey", 400 "Missing required
//! field: memberKey" for an address outside the domain, pages of at most 200. Users and
//! groups share one address space, a member is reported under its current email, and
//! deleting a user or a group takes it out of every group.
//!
//! Every request body is recorded (users and groups apart) and every call is counted per
//! discovery method id, so tests can check bodies against Google's discovery document.
//!
//! `members.insert` takes a member by `email` or by `id`, as the discovery document's
//! Member schema allows. Its text calls `email` required when adding, so a test can make
//! the emulator insist on it (`require_member_email`) to see how a client copes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::connectors::jwt;
use crate::devtools::emulators::{bearer_token, spawn, with_faults, Control, Dialect, Faults, TokenStore};

const USER_SCOPE: &str = "https://www.googleapis.com/auth/admin.directory.user";
const USER_READONLY_SCOPE: &str = "https://www.googleapis.com/auth/admin.directory.user.readonly";
const GROUP_SCOPE: &str = "https://www.googleapis.com/auth/admin.directory.group";
const GROUP_READONLY_SCOPE: &str = "https://www.googleapis.com/auth/admin.directory.group.readonly";
const GROUP_MEMBER_SCOPE: &str = "https://www.googleapis.com/auth/admin.directory.group.member";
const GROUP_MEMBER_READONLY_SCOPE: &str = "https://www.googleapis.com/auth/admin.directory.group.member.readonly";
/// What the emulated Workspace's domain-wide delegation grants the service account. Google
/// refuses a token for any scope the delegation does not list.
const DELEGATED_SCOPES: [&str; 6] = [
    USER_SCOPE,
    USER_READONLY_SCOPE,
    GROUP_SCOPE,
    GROUP_READONLY_SCOPE,
    GROUP_MEMBER_SCOPE,
    GROUP_MEMBER_READONLY_SCOPE,
];
/// `maxResults` of `groups.list` and `members.list`: the discovery document's range, and
/// Google's default when the parameter is absent.
const MAX_PAGE_SIZE: i64 = 200;
/// The roles a member can hold, `members.insert`'s default first.
const MEMBER_ROLES: [&str; 3] = ["MEMBER", "MANAGER", "OWNER"];
/// The discovery document's limit on a group's `description`.
const MAX_DESCRIPTION_CHARS: usize = 4096;

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

/// One request body the emulator received.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// The discovery document's id of the method called, e.g. `directory.members.insert`.
    pub method_id: &'static str,
    pub method: String,
    pub body: Value,
}

/// A group as the emulator keeps it.
#[derive(Clone)]
struct StoredGroup {
    /// The group resource without `directMembersCount`, which is counted when shown.
    resource: Value,
    /// Direct members in the order they were added, which is the order `members.list`
    /// pages through.
    members: Vec<Membership>,
}

#[derive(Clone)]
struct Membership {
    /// A user's or a group's id. Google shows a member under its current email, so a
    /// renamed user stays a member; the email is looked up when the member is shown.
    member_id: String,
    role: String,
    etag: String,
}

#[derive(Clone)]
struct GoogleState {
    settings: Arc<GoogleEmulatorSettings>,
    token_url: String,
    /// Users by id. Whoever needs both locks takes `users` before `groups`.
    users: Arc<Mutex<HashMap<String, Value>>>,
    /// Groups by id.
    groups: Arc<Mutex<BTreeMap<String, StoredGroup>>>,
    tokens: Arc<TokenStore>,
    /// The scopes each issued token carries.
    token_scopes: Arc<Mutex<HashMap<String, Vec<String>>>>,
    requests: Arc<Mutex<Vec<RecordedRequest>>>,
    group_requests: Arc<Mutex<Vec<RecordedRequest>>>,
    /// Calls that reached a method (past the token check), by discovery method id.
    calls: Arc<Mutex<BTreeMap<&'static str, u64>>>,
    next_id: Arc<AtomicU64>,
    next_group_id: Arc<AtomicU64>,
    /// Whether `members.insert` refuses a body without `email` (400 `required`).
    member_email_required: Arc<AtomicBool>,
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

    /// Every JSON body sent to the groups and members endpoints, in order.
    pub fn group_requests(&self) -> Vec<RecordedRequest> {
        self.state.group_requests.lock().expect("requests lock").clone()
    }

    /// How many calls reached `method_id` (e.g. `directory.members.insert`), whatever
    /// they were answered.
    pub fn call_count(&self, method_id: &str) -> u64 {
        self.state
            .calls
            .lock()
            .expect("calls lock")
            .get(method_id)
            .copied()
            .unwrap_or(0)
    }

    /// Calls per discovery method id.
    pub fn call_counts(&self) -> BTreeMap<String, u64> {
        let calls = self.state.calls.lock().expect("calls lock");
        calls
            .iter()
            .map(|(method, count)| (method.to_string(), *count))
            .collect()
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

    /// Adds a group as an administrator would have; returns its id.
    pub fn insert_group_directly(&self, email: &str, name: &str) -> String {
        let id = new_group_id(&self.state);
        let resource = stored_group(&id, json!({"email": email, "name": name}));
        let group = StoredGroup {
            resource,
            members: Vec::new(),
        };
        self.state.groups.lock().expect("groups lock").insert(id.clone(), group);
        id
    }

    pub fn group_count(&self) -> usize {
        self.state.groups.lock().expect("groups lock").len()
    }

    /// Every group as `groups.get` shows it.
    pub fn groups(&self) -> Vec<Value> {
        let groups = self.state.groups.lock().expect("groups lock");
        groups.values().map(group_resource).collect()
    }

    pub fn group_by_email(&self, email: &str) -> Option<Value> {
        let groups = self.state.groups.lock().expect("groups lock");
        find_group(&groups, email).map(|id| group_resource(&groups[&id]))
    }

    /// The direct members of the group `group_key` (id or email) as `members.list`
    /// shows them, or `None` if there is no such group.
    pub fn members_of(&self, group_key: &str) -> Option<Vec<Value>> {
        let users = self.state.users.lock().expect("users lock");
        let groups = self.state.groups.lock().expect("groups lock");
        let id = find_group(&groups, group_key)?;
        Some(
            groups[&id]
                .members
                .iter()
                .map(|membership| member_resource(&users, &groups, membership))
                .collect(),
        )
    }

    /// The emails of the direct members of the group `group_key`, lowercased and sorted.
    pub fn member_emails_of(&self, group_key: &str) -> Vec<String> {
        let mut emails: Vec<String> = self
            .members_of(group_key)
            .unwrap_or_default()
            .iter()
            .filter_map(|member| member["email"].as_str().map(str::to_ascii_lowercase))
            .collect();
        emails.sort();
        emails
    }

    pub fn expire_tokens(&self) {
        self.state.tokens.expire_all();
    }

    /// From now on, `members.insert` refuses a member named only by `id` with 400
    /// `required` "Missing required field: email".
    pub fn require_member_email(&self, required: bool) {
        self.state.member_email_required.store(required, Ordering::Relaxed);
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
        groups: Arc::default(),
        tokens: Arc::default(),
        token_scopes: Arc::default(),
        requests: Arc::default(),
        group_requests: Arc::default(),
        calls: Arc::default(),
        next_id: Arc::new(AtomicU64::new(100_000_000_000_000_000)),
        next_group_id: Arc::new(AtomicU64::new(1)),
        member_email_required: Arc::default(),
    };
    let directory = Router::new()
        .route("/users", get(list_users).post(insert_user))
        .route(
            "/users/{user_key}",
            get(get_user).patch(patch_user).put(patch_user).delete(delete_user),
        )
        .route("/groups", get(list_groups).post(insert_group))
        .route(
            "/groups/{group_key}",
            get(get_group)
                .patch(update_group)
                .put(update_group)
                .delete(delete_group),
        )
        .route("/groups/{group_key}/members", get(list_members).post(insert_member))
        .route(
            "/groups/{group_key}/members/{member_key}",
            get(get_member)
                .patch(update_member)
                .put(update_member)
                .delete(delete_member),
        )
        .route("/groups/{group_key}/hasMember/{member_key}", get(has_member))
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

/// A refusal in Google's words, answered with Google's error body. Small, so helpers can
/// return it in a `Result`.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    reason: &'static str,
    message: String,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        google_error(self.status, self.reason, &self.message)
    }
}

/// 404 `notFound` naming the path parameter (`userKey`, `groupKey`, `memberKey`) that
/// found nothing.
fn not_found(key: &str) -> Refusal {
    Refusal {
        status: StatusCode::NOT_FOUND,
        reason: "notFound",
        message: format!("Resource Not Found: {key}"),
    }
}

/// 400 `invalid` naming what was refused, as Google words it ("Invalid Input: query").
fn invalid_input(what: &str) -> Refusal {
    Refusal {
        status: StatusCode::BAD_REQUEST,
        reason: "invalid",
        message: format!("Invalid Input: {what}"),
    }
}

/// 400 `required`. Google also answers this for a member outside the domain.
fn missing_required(what: &str) -> Refusal {
    Refusal {
        status: StatusCode::BAD_REQUEST,
        reason: "required",
        message: format!("Missing required field: {what}"),
    }
}

fn entity_exists() -> Response {
    google_error(StatusCode::CONFLICT, "duplicate", "Entity already exists.")
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
    let scope = text("scope");
    let scopes: Vec<String> = scope.split_whitespace().map(str::to_string).collect();
    let problem = if text("iss") != state.settings.client_email {
        Some("unknown service account (iss)".to_string())
    } else if text("aud") != state.token_url {
        Some(format!("audience must be {}", state.token_url))
    } else if scopes.is_empty() {
        Some(format!("scope must include {USER_SCOPE} or {GROUP_SCOPE}"))
    } else if scopes.iter().any(|scope| !DELEGATED_SCOPES.contains(&scope.as_str())) {
        Some("unauthorized_client: Client is unauthorized to retrieve access tokens using this method, or client not authorized for any of the scopes requested.".to_string())
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
    state
        .token_scopes
        .lock()
        .expect("token scopes lock")
        .insert(token.clone(), scopes);
    Json(json!({"access_token": token, "token_type": "Bearer", "expires_in": state.settings.token_lifetime.as_secs()}))
        .into_response()
}

/// The scopes the discovery document lists for the method behind `method` and `path`
/// (relative to `/admin/directory/v1`): any one of them will do.
fn accepted_scopes(method: &Method, path: &str) -> &'static [&'static str] {
    let read = method == Method::GET;
    if path.starts_with("/users") {
        if read {
            &[USER_SCOPE, USER_READONLY_SCOPE]
        } else {
            &[USER_SCOPE]
        }
    } else if path.contains("/members") || path.contains("/hasMember/") {
        if read {
            &[
                GROUP_SCOPE,
                GROUP_MEMBER_SCOPE,
                GROUP_MEMBER_READONLY_SCOPE,
                GROUP_READONLY_SCOPE,
            ]
        } else {
            &[GROUP_SCOPE, GROUP_MEMBER_SCOPE]
        }
    } else if read {
        &[GROUP_SCOPE, GROUP_READONLY_SCOPE]
    } else {
        &[GROUP_SCOPE]
    }
}

async fn require_token(State(state): State<GoogleState>, request: Request, next: Next) -> Response {
    let granted = bearer_token(request.headers())
        .filter(|token| state.tokens.is_valid(token))
        .and_then(|token| {
            state
                .token_scopes
                .lock()
                .expect("token scopes lock")
                .get(token)
                .cloned()
        });
    let Some(granted) = granted else {
        return google_error(StatusCode::UNAUTHORIZED, "authError", "Invalid Credentials");
    };
    let accepted = accepted_scopes(request.method(), request.uri().path());
    if !granted.iter().any(|scope| accepted.contains(&scope.as_str())) {
        return (
            StatusCode::FORBIDDEN,
            Json(json!({"error": {"code": 403, "message": "Request had insufficient authentication scopes.",
                "errors": [{"message": "Insufficient Permission", "domain": "global", "reason": "insufficientPermissions"}],
                "status": "PERMISSION_DENIED"}})),
        )
            .into_response();
    }
    next.run(request).await
}

/// Counts a call to `method_id`.
fn count(state: &GoogleState, method_id: &'static str) {
    *state.calls.lock().expect("calls lock").entry(method_id).or_insert(0) += 1;
}

/// Counts a call to `method_id` and records its body.
fn record(state: &GoogleState, method_id: &'static str, method: Method, body: &Value) {
    count(state, method_id);
    let log = if method_id.starts_with("directory.users.") {
        &state.requests
    } else {
        &state.group_requests
    };
    log.lock().expect("requests lock").push(RecordedRequest {
        method_id,
        method: method.to_string(),
        body: body.clone(),
    });
}

/// Whether `email` is an address in the Workspace's domain.
fn in_domain(state: &GoogleState, email: &str) -> bool {
    email
        .rsplit_once('@')
        .is_some_and(|(local, domain)| !local.is_empty() && domain.eq_ignore_ascii_case(&state.settings.domain))
}

/// Whether a resource with `id` and `email` is the one a request names by `key`: Google
/// takes the immutable id or the email address, the latter in any case.
fn key_matches(id: &str, email: Option<&str>, key: &str) -> bool {
    id == key || email.is_some_and(|email| email.eq_ignore_ascii_case(key))
}

/// What Google checks on every write; `insert` also needs the required fields. The
/// error is Google's message for a 400 `invalid`.
fn validate(state: &GoogleState, user: &Value, insert: bool) -> Result<(), String> {
    let invalid = |message: &str| message.to_string();
    if let Some(email) = user.get("primaryEmail") {
        if !in_domain(state, email.as_str().unwrap_or_default()) {
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
        object.insert("etag".into(), json!(new_etag()));
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

fn new_etag() -> String {
    format!("\"{}\"", uuid::Uuid::new_v4().simple())
}

fn find_key(users: &HashMap<String, Value>, user_key: &str) -> Option<String> {
    users
        .iter()
        .find(|(id, user)| key_matches(id, user["primaryEmail"].as_str(), user_key))
        .map(|(id, _)| id.clone())
}

/// Users and groups share one address space: an email taken by either is taken.
fn email_taken(
    users: &HashMap<String, Value>,
    groups: &BTreeMap<String, StoredGroup>,
    email: &str,
    except_id: &str,
) -> bool {
    find_key(users, email).is_some_and(|id| id != except_id)
        || find_group(groups, email).is_some_and(|id| id != except_id)
}

/// The answer when no user has `user_key`: a group's address is "not supported" rather
/// than "not found", as Google answers it.
fn user_not_found(state: &GoogleState, user_key: &str) -> Response {
    let groups = state.groups.lock().expect("groups lock");
    if find_group(&groups, user_key).is_some() {
        return google_error(StatusCode::BAD_REQUEST, "badRequest", "Type not supported: userKey");
    }
    not_found("userKey").into_response()
}

async fn insert_user(State(state): State<GoogleState>, Json(user): Json<Value>) -> Response {
    record(&state, "directory.users.insert", Method::POST, &user);
    if let Err(message) = validate(&state, &user, true) {
        return google_error(StatusCode::BAD_REQUEST, "invalid", &message);
    }
    let mut users = state.users.lock().expect("users lock");
    let email = user["primaryEmail"].as_str().unwrap_or_default().to_string();
    if email_taken(&users, &state.groups.lock().expect("groups lock"), &email, "") {
        return entity_exists();
    }
    let id = state.next_id.fetch_add(1, Ordering::Relaxed).to_string();
    let stored = stored(&id, user);
    users.insert(id, stored.clone());
    Json(stored).into_response()
}

async fn get_user(State(state): State<GoogleState>, Path(user_key): Path<String>) -> Response {
    count(&state, "directory.users.get");
    let users = state.users.lock().expect("users lock");
    match find_key(&users, &user_key) {
        Some(id) => Json(users[&id].clone()).into_response(),
        None => user_not_found(&state, &user_key),
    }
}

#[derive(Deserialize)]
struct ListQuery {
    query: Option<String>,
}

/// Supports the one search the connector makes: `externalId:'value'`.
async fn list_users(State(state): State<GoogleState>, Query(list): Query<ListQuery>) -> Response {
    count(&state, "directory.users.list");
    let wanted = match list
        .query
        .as_deref()
        .map(|query| query.strip_prefix("externalId:").and_then(parse_query_value))
    {
        None => None,
        Some(Some(QueryValue::Exact(value))) => Some(value),
        Some(_) => return invalid_input("query").into_response(),
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

/// The value of a search term such as `externalId:'a\'b'` or `email:sales*`.
#[derive(Debug, PartialEq, Eq)]
enum QueryValue {
    Exact(String),
    /// `value*`: Google's prefix match.
    Prefix(String),
}

/// Parses what follows `field:` in a Directory API search: a single-quoted value with
/// backslash escapes, or a bare word that may end in `*`.
fn parse_query_value(text: &str) -> Option<QueryValue> {
    let Some(inner) = text.strip_prefix('\'') else {
        if text.is_empty() || text.contains([' ', '\'', '\\']) {
            return None;
        }
        return Some(match text.strip_suffix('*') {
            Some(prefix) => QueryValue::Prefix(prefix.to_string()),
            None => QueryValue::Exact(text.to_string()),
        });
    };
    let inner = inner.strip_suffix('\'')?;
    let mut value = String::new();
    let mut characters = inner.chars();
    while let Some(character) = characters.next() {
        match character {
            '\\' => value.push(characters.next()?),
            '\'' => return None,
            other => value.push(other),
        }
    }
    Some(QueryValue::Exact(value))
}

async fn patch_user(
    State(state): State<GoogleState>,
    method: Method,
    Path(user_key): Path<String>,
    Json(changes): Json<Value>,
) -> Response {
    let method_id = if method == Method::PUT {
        "directory.users.update"
    } else {
        "directory.users.patch"
    };
    record(&state, method_id, method, &changes);
    if let Err(message) = validate(&state, &changes, false) {
        return google_error(StatusCode::BAD_REQUEST, "invalid", &message);
    }
    let mut users = state.users.lock().expect("users lock");
    let Some(id) = find_key(&users, &user_key) else {
        return user_not_found(&state, &user_key);
    };
    if let Some(email) = changes.get("primaryEmail").and_then(Value::as_str) {
        if email_taken(&users, &state.groups.lock().expect("groups lock"), email, &id) {
            return entity_exists();
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
    count(&state, "directory.users.delete");
    let mut users = state.users.lock().expect("users lock");
    let Some(id) = find_key(&users, &user_key) else {
        return user_not_found(&state, &user_key);
    };
    users.remove(&id);
    // A deleted user leaves every group it was in.
    remove_from_all_groups(&mut state.groups.lock().expect("groups lock"), &id);
    StatusCode::NO_CONTENT.into_response()
}

// === Groups ===

fn new_group_id(state: &GoogleState) -> String {
    // Google's group ids are 15 characters of lowercase letters and digits.
    format!("00{:013x}", state.next_group_id.fetch_add(1, Ordering::Relaxed))
}

fn find_group(groups: &BTreeMap<String, StoredGroup>, group_key: &str) -> Option<String> {
    groups
        .iter()
        .find(|(id, group)| key_matches(id, group.resource["email"].as_str(), group_key))
        .map(|(id, _)| id.clone())
}

/// The stored form of a group: only the fields a client may write, plus Google's
/// read-only ones. Read-only fields in a request (`id`, `aliases` …) are ignored, as
/// Google ignores them.
fn stored_group(id: &str, group: Value) -> Value {
    let text = |field: &str| group.get(field).and_then(Value::as_str).unwrap_or_default().to_string();
    json!({
        "kind": "admin#directory#group",
        "id": id,
        "etag": new_etag(),
        "email": text("email"),
        "name": text("name"),
        "description": text("description"),
        "adminCreated": true,
    })
}

/// A group as Google shows it, with its member count.
fn group_resource(group: &StoredGroup) -> Value {
    let mut resource = group.resource.clone();
    resource["directMembersCount"] = json!(group.members.len().to_string());
    resource
}

/// Checks a group body; `insert` also needs the email. `None` when all is well.
fn check_group(state: &GoogleState, group: &Value, insert: bool) -> Option<Refusal> {
    let Some(fields) = group.as_object() else {
        return Some(Refusal {
            status: StatusCode::BAD_REQUEST,
            reason: "badRequest",
            message: "Bad Request".into(),
        });
    };
    match fields.get("email") {
        Some(Value::String(email)) if in_domain(state, email) => {}
        None if !insert => {}
        None => return Some(missing_required("email")),
        Some(_) => return Some(invalid_input("groupKey")),
    }
    for field in ["name", "description"] {
        if fields.get(field).is_some_and(|value| !value.is_string()) {
            return Some(invalid_input(field));
        }
    }
    let description = fields.get("description").and_then(Value::as_str).unwrap_or_default();
    if description.chars().count() > MAX_DESCRIPTION_CHARS {
        return Some(invalid_input("description"));
    }
    None
}

async fn insert_group(State(state): State<GoogleState>, Json(group): Json<Value>) -> Response {
    record(&state, "directory.groups.insert", Method::POST, &group);
    if let Some(refusal) = check_group(&state, &group, true) {
        return refusal.into_response();
    }
    let users = state.users.lock().expect("users lock");
    let mut groups = state.groups.lock().expect("groups lock");
    let email = group["email"].as_str().unwrap_or_default();
    if email_taken(&users, &groups, email, "") {
        return entity_exists();
    }
    let id = new_group_id(&state);
    let stored = StoredGroup {
        resource: stored_group(&id, group),
        members: Vec::new(),
    };
    let shown = group_resource(&stored);
    groups.insert(id, stored);
    Json(shown).into_response()
}

async fn get_group(State(state): State<GoogleState>, Path(group_key): Path<String>) -> Response {
    count(&state, "directory.groups.get");
    let groups = state.groups.lock().expect("groups lock");
    match find_group(&groups, &group_key) {
        Some(id) => Json(group_resource(&groups[&id])).into_response(),
        None => not_found("groupKey").into_response(),
    }
}

/// `groups.update` (PUT) and `groups.patch` (PATCH): both change only the fields sent.
async fn update_group(
    State(state): State<GoogleState>,
    method: Method,
    Path(group_key): Path<String>,
    Json(changes): Json<Value>,
) -> Response {
    let method_id = if method == Method::PUT {
        "directory.groups.update"
    } else {
        "directory.groups.patch"
    };
    record(&state, method_id, method, &changes);
    let users = state.users.lock().expect("users lock");
    let mut groups = state.groups.lock().expect("groups lock");
    let Some(id) = find_group(&groups, &group_key) else {
        return not_found("groupKey").into_response();
    };
    if let Some(refusal) = check_group(&state, &changes, false) {
        return refusal.into_response();
    }
    if let Some(email) = changes.get("email").and_then(Value::as_str) {
        if email_taken(&users, &groups, email, &id) {
            return entity_exists();
        }
    }
    let group = groups.get_mut(&id).expect("found above");
    let mut fields = group.resource.clone();
    for field in ["email", "name", "description"] {
        if let Some(value) = changes.get(field) {
            fields[field] = value.clone();
        }
    }
    group.resource = stored_group(&id, fields);
    Json(group_resource(group)).into_response()
}

async fn delete_group(State(state): State<GoogleState>, Path(group_key): Path<String>) -> Response {
    count(&state, "directory.groups.delete");
    let mut groups = state.groups.lock().expect("groups lock");
    let Some(id) = find_group(&groups, &group_key) else {
        return not_found("groupKey").into_response();
    };
    groups.remove(&id);
    // A group nested in others leaves them too.
    remove_from_all_groups(&mut groups, &id);
    StatusCode::NO_CONTENT.into_response()
}

fn remove_from_all_groups(groups: &mut BTreeMap<String, StoredGroup>, member_id: &str) {
    for group in groups.values_mut() {
        group.members.retain(|membership| membership.member_id != member_id);
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GroupListQuery {
    customer: Option<String>,
    domain: Option<String>,
    max_results: Option<i64>,
    page_token: Option<String>,
    query: Option<String>,
    user_key: Option<String>,
}

/// `groups.list` for the account (`customer`) or the domain, optionally only the groups
/// `userKey` is a direct member of, or those whose email matches `query`
/// (`email:value`, `email:'value'` or `email:prefix*`). Sorted by email.
async fn list_groups(State(state): State<GoogleState>, Query(list): Query<GroupListQuery>) -> Response {
    count(&state, "directory.groups.list");
    match (&list.customer, &list.domain) {
        (None, None) => return google_error(StatusCode::BAD_REQUEST, "badRequest", "Bad Request"),
        (_, Some(domain)) if !domain.eq_ignore_ascii_case(&state.settings.domain) => {
            return google_error(StatusCode::NOT_FOUND, "notFound", "Domain not found.")
        }
        _ => {}
    }
    let wanted = match list
        .query
        .as_deref()
        .map(|query| query.strip_prefix("email:").and_then(parse_query_value))
    {
        None => None,
        Some(Some(value)) => Some(value),
        Some(None) => return invalid_input("query").into_response(),
    };
    let users = state.users.lock().expect("users lock");
    let groups = state.groups.lock().expect("groups lock");
    let member_id = list
        .user_key
        .as_deref()
        .map(|key| find_key(&users, key).or_else(|| find_group(&groups, key)));
    let mut found: Vec<Value> = groups
        .values()
        .filter(|group| {
            let email = group.resource["email"]
                .as_str()
                .unwrap_or_default()
                .to_ascii_lowercase();
            let email_matches = match &wanted {
                None => true,
                Some(QueryValue::Exact(value)) => email == value.to_ascii_lowercase(),
                Some(QueryValue::Prefix(prefix)) => email.starts_with(&prefix.to_ascii_lowercase()),
            };
            let member_matches = match &member_id {
                None => true,
                Some(None) => false,
                Some(Some(member_id)) => group
                    .members
                    .iter()
                    .any(|membership| &membership.member_id == member_id),
            };
            email_matches && member_matches
        })
        .map(group_resource)
        .collect();
    found.sort_by_key(|group| group["email"].as_str().unwrap_or_default().to_ascii_lowercase());
    let (page, next_page_token) = match page_of(found, list.max_results, list.page_token.as_deref()) {
        Ok(page) => page,
        Err(refusal) => return refusal.into_response(),
    };
    list_body("admin#directory#groups", "groups", page, next_page_token)
}

/// One page of `items`. The page token is the offset of the page's first item: opaque to
/// clients, as Google's are.
fn page_of(
    items: Vec<Value>,
    max_results: Option<i64>,
    page_token: Option<&str>,
) -> Result<(Vec<Value>, Option<String>), Refusal> {
    let size = max_results.unwrap_or(MAX_PAGE_SIZE);
    if !(1..=MAX_PAGE_SIZE).contains(&size) {
        return Err(Refusal {
            status: StatusCode::BAD_REQUEST,
            reason: "invalid",
            message: format!("Invalid value '{size}'. Values must be within the range: [1, {MAX_PAGE_SIZE}]"),
        });
    }
    let start = match page_token {
        None | Some("") => 0,
        Some(token) => match token.parse::<usize>() {
            Ok(start) if start <= items.len() => start,
            _ => return Err(invalid_input("pageToken")),
        },
    };
    let end = items.len().min(start + size as usize);
    let next_page_token = (end < items.len()).then(|| end.to_string());
    Ok((items[start..end].to_vec(), next_page_token))
}

/// A list response: Google leaves out an empty list and, on the last page, the token.
fn list_body(kind: &str, field: &str, items: Vec<Value>, next_page_token: Option<String>) -> Response {
    let mut body = Map::new();
    body.insert("kind".into(), json!(kind));
    body.insert("etag".into(), json!(new_etag()));
    if !items.is_empty() {
        body.insert(field.into(), Value::Array(items));
    }
    if let Some(token) = next_page_token {
        body.insert("nextPageToken".into(), json!(token));
    }
    Json(Value::Object(body)).into_response()
}

// === Members ===

/// A member as Google shows it: under the user's or group's current email.
fn member_resource(
    users: &HashMap<String, Value>,
    groups: &BTreeMap<String, StoredGroup>,
    membership: &Membership,
) -> Value {
    let (email, member_type, status) = match users.get(&membership.member_id) {
        Some(user) => {
            let status = if user["suspended"] == true {
                "SUSPENDED"
            } else {
                "ACTIVE"
            };
            (user["primaryEmail"].clone(), "USER", status)
        }
        None => {
            let email = groups
                .get(&membership.member_id)
                .map(|group| group.resource["email"].clone())
                .unwrap_or(Value::Null);
            (email, "GROUP", "ACTIVE")
        }
    };
    json!({
        "kind": "admin#directory#member",
        "etag": membership.etag,
        "id": membership.member_id,
        "email": email,
        "role": membership.role,
        "type": member_type,
        "status": status,
    })
}

/// The user or group `member_key` (id or email) names, or the answer Google gives when
/// there is none: an address outside the domain is "missing", one inside it "not found".
fn resolve_member(
    state: &GoogleState,
    users: &HashMap<String, Value>,
    groups: &BTreeMap<String, StoredGroup>,
    member_key: &str,
) -> Result<String, Refusal> {
    if let Some(id) = find_key(users, member_key).or_else(|| find_group(groups, member_key)) {
        return Ok(id);
    }
    if member_key.contains('@') && !in_domain(state, member_key) {
        return Err(missing_required("memberKey"));
    }
    Err(not_found("memberKey"))
}

/// Whether `wanted_id` is a member of `group_id`, directly or through nested groups.
fn contains_transitively(groups: &BTreeMap<String, StoredGroup>, group_id: &str, wanted_id: &str) -> bool {
    let mut seen = HashSet::new();
    let mut pending = vec![group_id.to_string()];
    while let Some(current) = pending.pop() {
        if !seen.insert(current.clone()) {
            continue;
        }
        let Some(group) = groups.get(&current) else {
            continue;
        };
        for membership in &group.members {
            if membership.member_id == wanted_id {
                return true;
            }
            pending.push(membership.member_id.clone());
        }
    }
    false
}

/// The `role` of a member body: absent means `MEMBER`, as on Google.
fn role_of(member: &Value) -> Result<Option<String>, Refusal> {
    match member.get("role") {
        None => Ok(None),
        Some(Value::String(role)) if MEMBER_ROLES.contains(&role.as_str()) => Ok(Some(role.clone())),
        Some(_) => Err(invalid_input("role")),
    }
}

async fn insert_member(
    State(state): State<GoogleState>,
    Path(group_key): Path<String>,
    Json(member): Json<Value>,
) -> Response {
    record(&state, "directory.members.insert", Method::POST, &member);
    let users = state.users.lock().expect("users lock");
    let mut groups = state.groups.lock().expect("groups lock");
    let Some(group_id) = find_group(&groups, &group_key) else {
        return not_found("groupKey").into_response();
    };
    let member_key = member
        .get("email")
        .or_else(|| member.get("id"))
        .and_then(Value::as_str)
        .filter(|key| !key.is_empty());
    let Some(member_key) = member_key else {
        return missing_required("member").into_response();
    };
    if state.member_email_required.load(Ordering::Relaxed) && member.get("email").is_none() {
        return missing_required("email").into_response();
    }
    let role = match role_of(&member) {
        Ok(role) => role.unwrap_or_else(|| MEMBER_ROLES[0].to_string()),
        Err(refusal) => return refusal.into_response(),
    };
    let member_id = match resolve_member(&state, &users, &groups, member_key) {
        Ok(id) => id,
        Err(refusal) => return refusal.into_response(),
    };
    if groups[&group_id]
        .members
        .iter()
        .any(|membership| membership.member_id == member_id)
    {
        return google_error(StatusCode::CONFLICT, "duplicate", "Member already exists.");
    }
    // Google refuses cycles: a group cannot contain itself, even through other groups.
    if member_id == group_id || contains_transitively(&groups, &member_id, &group_id) {
        return invalid_input("memberKey").into_response();
    }
    let membership = Membership {
        member_id,
        role,
        etag: new_etag(),
    };
    let shown = member_resource(&users, &groups, &membership);
    groups.get_mut(&group_id).expect("found above").members.push(membership);
    Json(shown).into_response()
}

/// The group and the position of the member in it, or Google's answer when either is
/// missing.
fn find_membership(
    state: &GoogleState,
    users: &HashMap<String, Value>,
    groups: &BTreeMap<String, StoredGroup>,
    group_key: &str,
    member_key: &str,
) -> Result<(String, usize), Refusal> {
    let group_id = find_group(groups, group_key).ok_or_else(|| not_found("groupKey"))?;
    let member_id = resolve_member(state, users, groups, member_key)?;
    let position = groups[&group_id]
        .members
        .iter()
        .position(|membership| membership.member_id == member_id)
        .ok_or_else(|| not_found("memberKey"))?;
    Ok((group_id, position))
}

async fn get_member(
    State(state): State<GoogleState>,
    Path((group_key, member_key)): Path<(String, String)>,
) -> Response {
    count(&state, "directory.members.get");
    let users = state.users.lock().expect("users lock");
    let groups = state.groups.lock().expect("groups lock");
    match find_membership(&state, &users, &groups, &group_key, &member_key) {
        Ok((group_id, position)) => {
            Json(member_resource(&users, &groups, &groups[&group_id].members[position])).into_response()
        }
        // Google does not tell an outside address from an absent member here.
        Err(_) if find_group(&groups, &group_key).is_some() => not_found("memberKey").into_response(),
        Err(refusal) => refusal.into_response(),
    }
}

/// `members.update` (PUT) and `members.patch` (PATCH): the role is all that changes.
async fn update_member(
    State(state): State<GoogleState>,
    method: Method,
    Path((group_key, member_key)): Path<(String, String)>,
    Json(changes): Json<Value>,
) -> Response {
    let method_id = if method == Method::PUT {
        "directory.members.update"
    } else {
        "directory.members.patch"
    };
    record(&state, method_id, method, &changes);
    let users = state.users.lock().expect("users lock");
    let mut groups = state.groups.lock().expect("groups lock");
    let (group_id, position) = match find_membership(&state, &users, &groups, &group_key, &member_key) {
        Ok(found) => found,
        Err(refusal) => return refusal.into_response(),
    };
    let role = match role_of(&changes) {
        Ok(role) => role,
        Err(refusal) => return refusal.into_response(),
    };
    let membership = &mut groups.get_mut(&group_id).expect("found above").members[position];
    if let Some(role) = role {
        membership.role = role;
        membership.etag = new_etag();
    }
    let membership = membership.clone();
    Json(member_resource(&users, &groups, &membership)).into_response()
}

async fn delete_member(
    State(state): State<GoogleState>,
    Path((group_key, member_key)): Path<(String, String)>,
) -> Response {
    count(&state, "directory.members.delete");
    let users = state.users.lock().expect("users lock");
    let mut groups = state.groups.lock().expect("groups lock");
    match find_membership(&state, &users, &groups, &group_key, &member_key) {
        Ok((group_id, position)) => {
            groups.get_mut(&group_id).expect("found above").members.remove(position);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(refusal) => refusal.into_response(),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MemberListQuery {
    max_results: Option<i64>,
    page_token: Option<String>,
    /// Comma-separated roles, e.g. `OWNER,MANAGER`.
    roles: Option<String>,
}

async fn list_members(
    State(state): State<GoogleState>,
    Path(group_key): Path<String>,
    Query(list): Query<MemberListQuery>,
) -> Response {
    count(&state, "directory.members.list");
    let users = state.users.lock().expect("users lock");
    let groups = state.groups.lock().expect("groups lock");
    let Some(group_id) = find_group(&groups, &group_key) else {
        return not_found("groupKey").into_response();
    };
    let roles: Option<Vec<String>> = list
        .roles
        .as_deref()
        .map(|roles| roles.split(',').map(|role| role.trim().to_ascii_uppercase()).collect());
    let members: Vec<Value> = groups[&group_id]
        .members
        .iter()
        .filter(|membership| roles.as_ref().is_none_or(|roles| roles.contains(&membership.role)))
        .map(|membership| member_resource(&users, &groups, membership))
        .collect();
    match page_of(members, list.max_results, list.page_token.as_deref()) {
        Ok((page, next_page_token)) => list_body("admin#directory#members", "members", page, next_page_token),
        Err(refusal) => refusal.into_response(),
    }
}

/// `members.hasMember`: direct or nested membership. Google refuses an address outside
/// the domain here ("Invalid Input: memberKey") even when it is a member.
async fn has_member(
    State(state): State<GoogleState>,
    Path((group_key, member_key)): Path<(String, String)>,
) -> Response {
    count(&state, "directory.members.hasMember");
    let users = state.users.lock().expect("users lock");
    let groups = state.groups.lock().expect("groups lock");
    let Some(group_id) = find_group(&groups, &group_key) else {
        return not_found("groupKey").into_response();
    };
    if member_key.contains('@') && !in_domain(&state, &member_key) {
        return invalid_input("memberKey").into_response();
    }
    let member_id = match resolve_member(&state, &users, &groups, &member_key) {
        Ok(id) => id,
        Err(refusal) => return refusal.into_response(),
    };
    Json(json!({"isMember": contains_transitively(&groups, &group_id, &member_id)})).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_unescape() {
        let exact = |value: &str| Some(QueryValue::Exact(value.to_string()));
        assert_eq!(parse_query_value("'abc'"), exact("abc"));
        assert_eq!(parse_query_value(r"'a\'b'"), exact("a'b"));
        assert_eq!(parse_query_value("'a' or 'b'"), None);
        assert_eq!(parse_query_value("sales@example.com"), exact("sales@example.com"));
        assert_eq!(
            parse_query_value("sales*"),
            Some(QueryValue::Prefix("sales".to_string()))
        );
        assert_eq!(parse_query_value("a b"), None);
        assert_eq!(parse_query_value(""), None);
    }

    #[test]
    fn pages_follow_their_tokens_to_the_end() {
        let items: Vec<Value> = (0..5).map(|index| json!(index)).collect();
        let (first, token) = page_of(items.clone(), Some(2), None).unwrap();
        assert_eq!(first, vec![json!(0), json!(1)]);
        let (second, token) = page_of(items.clone(), Some(2), token.as_deref()).unwrap();
        assert_eq!(second, vec![json!(2), json!(3)]);
        let (last, token) = page_of(items.clone(), Some(2), token.as_deref()).unwrap();
        assert_eq!((last, token), (vec![json!(4)], None));
        assert!(page_of(items.clone(), Some(201), None).is_err());
        assert!(page_of(items.clone(), Some(0), None).is_err());
        assert!(page_of(items, None, Some("not-a-token")).is_err());
    }

    #[test]
    fn scopes_follow_the_discovery_document() {
        let members_get = accepted_scopes(&Method::GET, "/groups/g@example.com/members/u@example.com");
        assert!(members_get.contains(&GROUP_MEMBER_READONLY_SCOPE));
        let members_insert = accepted_scopes(&Method::POST, "/groups/g@example.com/members");
        assert_eq!(members_insert, &[GROUP_SCOPE, GROUP_MEMBER_SCOPE]);
        assert_eq!(accepted_scopes(&Method::DELETE, "/groups/g"), &[GROUP_SCOPE]);
        assert_eq!(accepted_scopes(&Method::POST, "/users"), &[USER_SCOPE]);
    }
}
