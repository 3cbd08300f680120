//! An in-memory SCIM 2.0 server (RFC 7643, RFC 7644), faithful where clients rely on it:
//!
//! - **Users** (`/Users`) and **Groups** (`/Groups`): POST, GET, list (GET, or POST
//!   `.search`) with an `eq` filter, `startIndex`/`count` paging and
//!   `attributes`/`excludedAttributes`, PUT, PATCH and DELETE, with ETags (`meta.version`,
//!   `If-Match`). `userName` and a group's
//!   `displayName` are unique ignoring case, `externalId` exactly (409 `uniqueness`).
//! - A group's members must be existing users (400 `invalidValue` otherwise, as real servers
//!   refuse dangling or null member ids). PATCH adds and removes members idempotently, in
//!   the forms Entra ID, Okta and AWS send. Deleting a user takes it out of every group, and
//!   a user's read-only `groups` lists the groups it is in.
//! - Optionally at most N membership changes per group request, as AWS IAM Identity Center
//!   allows 100, with counters so a test can prove that a client chunks.
//! - Discovery (RFC 7644 §4): `/ServiceProviderConfig`, `/Schemas`, `/ResourceTypes`, open
//!   even when the rest needs a token.
//! - Every SCIM body, errors included, is `application/scim+json`.
//! - Optional bearer or OAuth 2.0 client-credentials protection, PATCH, ETags and filtering
//!   that can each be turned off, and the shared latency and fault injection.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::devtools::emulators::{bearer_token, spawn, with_faults, Control, Dialect, Faults, TokenStore, SCIM_JSON};

const USER_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:User";
const ENTERPRISE_USER_SCHEMA: &str = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User";
const GROUP_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:Group";
const SCHEMA_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:Schema";
const RESOURCE_TYPE_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:ResourceType";
const ERROR_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:Error";
const LIST_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:ListResponse";

#[derive(Debug, Clone)]
pub struct ScimEmulatorSettings {
    pub faults: Faults,
    /// Accept only this static bearer token.
    pub bearer_token: Option<String>,
    /// Issue tokens at `/oauth2/token` to this client (id, secret), valid this long.
    pub oauth_client: Option<(String, String, Duration)>,
    /// Whether PATCH works and `/ServiceProviderConfig` says so (Users and Groups alike):
    /// without it PATCH answers 501 and clients must read, modify and PUT.
    pub patch: bool,
    pub etag: bool,
    /// What `/ServiceProviderConfig` says of filtering.
    pub filter_advertised: bool,
    /// Whether `filter` works. Several servers advertise no filtering while it works;
    /// others refuse it (400 `invalidFilter`) and only list, page by page.
    pub filter_works: bool,
    /// At most this many membership changes in one group request: the members of a POST
    /// or PUT, the members one PATCH adds, removes or replaces (all its operations
    /// together). More is refused with 400. `None`: no limit. AWS IAM Identity Center
    /// allows 100.
    pub max_group_members_per_request: Option<usize>,
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
            max_group_members_per_request: None,
        }
    }
}

/// The two resource types the emulator serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    User,
    Group,
}

impl Kind {
    /// `meta.resourceType`, and the id under `/ResourceTypes`.
    fn resource_type(self) -> &'static str {
        match self {
            Kind::User => "User",
            Kind::Group => "Group",
        }
    }

    fn endpoint(self) -> &'static str {
        match self {
            Kind::User => "Users",
            Kind::Group => "Groups",
        }
    }

    fn noun(self) -> &'static str {
        match self {
            Kind::User => "user",
            Kind::Group => "group",
        }
    }

    fn schema(self) -> &'static str {
        match self {
            Kind::User => USER_SCHEMA,
            Kind::Group => GROUP_SCHEMA,
        }
    }

    /// The attribute a resource cannot go without.
    fn required_attribute(self) -> &'static str {
        match self {
            Kind::User => "userName",
            Kind::Group => "displayName",
        }
    }

    /// Attributes no two resources of this kind share. The required one compares ignoring
    /// case (`caseExact: false` in RFC 7643; AWS and Entra ID also refuse a group whose
    /// name differs only in case), `externalId` exactly (RFC 7643 §3.1).
    fn unique_attributes(self) -> [&'static str; 2] {
        [self.required_attribute(), "externalId"]
    }

    fn is_case_exact(self, attribute: &str) -> bool {
        !attribute.eq_ignore_ascii_case(self.required_attribute())
    }
}

struct Stored {
    resource: Value,
    version: u64,
}

/// The resources of one kind by id, with the unique attributes indexed so lookups and
/// uniqueness checks stay cheap however many resources a benchmark creates.
struct Collection {
    kind: Kind,
    /// Ordered by id (ids grow with creation) so that paging stays stable while
    /// resources come and go.
    resources: BTreeMap<String, Stored>,
    /// Per unique attribute, in `Kind::unique_attributes` order: value (lower-cased
    /// when it compares ignoring case) → id.
    unique: [HashMap<String, String>; 2],
}

impl Collection {
    fn new(kind: Kind) -> Collection {
        Collection {
            kind,
            resources: BTreeMap::new(),
            unique: Default::default(),
        }
    }

    fn index_key(&self, attribute: &str, value: &str) -> String {
        if self.kind.is_case_exact(attribute) {
            value.to_string()
        } else {
            value.to_lowercase()
        }
    }

    fn index_keys(&self, resource: &Value) -> [Option<String>; 2] {
        self.kind.unique_attributes().map(|attribute| {
            resource
                .get(attribute)
                .and_then(Value::as_str)
                .map(|value| self.index_key(attribute, value))
        })
    }

    fn unindex(&mut self, id: &str) {
        if let Some(stored) = self.resources.get(id) {
            let keys = self.index_keys(&stored.resource);
            for (index, key) in self.unique.iter_mut().zip(keys) {
                if let Some(key) = key {
                    index.remove(&key);
                }
            }
        }
    }

    fn put(&mut self, id: String, stored: Stored) {
        self.unindex(&id);
        let keys = self.index_keys(&stored.resource);
        for (index, key) in self.unique.iter_mut().zip(keys) {
            if let Some(key) = key {
                index.insert(key, id.clone());
            }
        }
        self.resources.insert(id, stored);
    }

    fn remove(&mut self, id: &str) -> Option<Stored> {
        self.unindex(id);
        self.resources.remove(id)
    }

    /// Resources matching `attribute eq value`; attribute names ignore case (RFC 7643 §2.1).
    fn find(&self, attribute: &str, value: &str) -> Vec<&Stored> {
        let id = if attribute.eq_ignore_ascii_case("id") {
            Some(value)
        } else if let Some(position) = self
            .kind
            .unique_attributes()
            .iter()
            .position(|unique| unique.eq_ignore_ascii_case(attribute))
        {
            let key = self.index_key(self.kind.unique_attributes()[position], value);
            self.unique[position].get(&key).map(String::as_str)
        } else {
            return self
                .resources
                .values()
                .filter(|stored| self.attribute_equals(&stored.resource, attribute, value))
                .collect();
        };
        id.and_then(|id| self.resources.get(id)).into_iter().collect()
    }

    fn attribute_equals(&self, resource: &Value, attribute: &str, expected: &str) -> bool {
        let found = resource.get(attribute).and_then(Value::as_str);
        if self.kind.is_case_exact(attribute) {
            found == Some(expected)
        } else {
            found.is_some_and(|value| value.to_lowercase() == expected.to_lowercase())
        }
    }

    /// Why `resource` may not be stored: it takes another resource's unique value.
    fn conflict(&self, resource: &Value, except_id: Option<&str>) -> Option<String> {
        for attribute in self.kind.unique_attributes() {
            if let Some(value) = resource.get(attribute).and_then(Value::as_str) {
                let taken = self
                    .find(attribute, value)
                    .into_iter()
                    .any(|stored| except_id != stored.resource.get("id").and_then(Value::as_str));
                if taken {
                    return Some(format!("{attribute} `{value}` is already taken"));
                }
            }
        }
        None
    }
}

/// Everything the server stores. Users and groups share one id sequence, so a group id
/// is never mistaken for a user's.
struct Directory {
    users: Collection,
    groups: Collection,
    /// User id → the groups it is a member of: renders a user's `groups` and takes a
    /// deleted user out of its groups without scanning every group.
    memberships: HashMap<String, BTreeSet<String>>,
}

impl Default for Directory {
    fn default() -> Self {
        Directory {
            users: Collection::new(Kind::User),
            groups: Collection::new(Kind::Group),
            memberships: HashMap::new(),
        }
    }
}

impl Directory {
    fn collection(&self, kind: Kind) -> &Collection {
        match kind {
            Kind::User => &self.users,
            Kind::Group => &self.groups,
        }
    }

    fn put(&mut self, kind: Kind, id: String, stored: Stored) {
        if kind == Kind::Group {
            let before = self.groups.resources.get(&id).map(|old| member_ids(&old.resource));
            for user_id in before.unwrap_or_default() {
                self.leave(&user_id, &id);
            }
            for user_id in member_ids(&stored.resource) {
                self.memberships.entry(user_id).or_default().insert(id.clone());
            }
        }
        match kind {
            Kind::User => self.users.put(id, stored),
            Kind::Group => self.groups.put(id, stored),
        }
    }

    /// Removes a resource. A deleted user leaves every group it was in, as on real
    /// servers; those groups get a new version.
    fn remove(&mut self, kind: Kind, id: &str) {
        match kind {
            Kind::User => {
                self.users.remove(id);
                for group_id in self.memberships.remove(id).unwrap_or_default() {
                    if let Some(group) = self.groups.resources.get_mut(&group_id) {
                        let mut members = members_of(&group.resource);
                        members.retain(|member| member.get("value").and_then(Value::as_str) != Some(id));
                        set_members(&mut group.resource, members);
                        touch(group);
                    }
                }
            }
            Kind::Group => {
                if let Some(group) = self.groups.remove(id) {
                    for user_id in member_ids(&group.resource) {
                        self.leave(&user_id, id);
                    }
                }
            }
        }
    }

    fn leave(&mut self, user_id: &str, group_id: &str) {
        if let Some(groups) = self.memberships.get_mut(user_id) {
            groups.remove(group_id);
            if groups.is_empty() {
                self.memberships.remove(user_id);
            }
        }
    }

    /// A user's `groups` attribute (read-only, RFC 7643 §4.1.2), from the groups it is in.
    fn groups_of(&self, base_url: &str, user_id: &str) -> Vec<Value> {
        let Some(group_ids) = self.memberships.get(user_id) else {
            return Vec::new();
        };
        group_ids
            .iter()
            .filter_map(|group_id| self.groups.resources.get(group_id))
            .map(|group| {
                let id = group.resource["id"].as_str().unwrap_or_default();
                json!({
                    "value": id,
                    "$ref": format!("{base_url}/Groups/{id}"),
                    "display": group.resource.get("displayName").cloned().unwrap_or(Value::Null),
                    "type": "direct",
                })
            })
            .collect()
    }
}

/// A new version of a resource changed in place (a member taken out of a group).
fn touch(stored: &mut Stored) {
    stored.version += 1;
    stored.resource["meta"]["version"] = json!(format!("W/\"{}\"", stored.version));
    stored.resource["meta"]["lastModified"] = json!(chrono::Utc::now().to_rfc3339());
}

fn members_of(group: &Value) -> Vec<Value> {
    group
        .get("members")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

fn member_ids(group: &Value) -> Vec<String> {
    members_of(group)
        .iter()
        .filter_map(|member| member.get("value").and_then(Value::as_str).map(str::to_string))
        .collect()
}

/// Sets `members`, leaving the attribute out when there are none (RFC 7643 §2.4: an empty
/// multi-valued attribute is unassigned).
fn set_members(group: &mut Value, members: Vec<Value>) {
    let Value::Object(object) = group else {
        return;
    };
    if members.is_empty() {
        object.remove("members");
    } else {
        object.insert("members".to_string(), Value::Array(members));
    }
}

/// Counters for tests that check how a client writes groups.
#[derive(Default)]
struct GroupCounters {
    patch_requests: AtomicU64,
    /// The most membership changes one group request carried (refused ones included).
    largest_membership_change: AtomicUsize,
}

#[derive(Clone)]
struct ScimState {
    settings: Arc<ScimEmulatorSettings>,
    directory: Arc<Mutex<Directory>>,
    tokens: Arc<TokenStore>,
    next_id: Arc<AtomicU64>,
    group_counters: Arc<GroupCounters>,
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

    fn directory(&self) -> std::sync::MutexGuard<'_, Directory> {
        self.state.directory.lock().expect("directory lock")
    }

    pub fn user_count(&self) -> usize {
        self.directory().users.resources.len()
    }

    /// Every stored user, as SCIM resources (without the computed `groups`).
    pub fn users(&self) -> Vec<Value> {
        let directory = self.directory();
        directory
            .users
            .resources
            .values()
            .map(|user| user.resource.clone())
            .collect()
    }

    pub fn user_by_external_id(&self, external_id: &str) -> Option<Value> {
        let directory = self.directory();
        let found = directory.users.find("externalId", external_id);
        found.first().map(|user| user.resource.clone())
    }

    pub fn group_count(&self) -> usize {
        self.directory().groups.resources.len()
    }

    /// Every stored group, as SCIM resources.
    pub fn groups(&self) -> Vec<Value> {
        let directory = self.directory();
        directory
            .groups
            .resources
            .values()
            .map(|group| group.resource.clone())
            .collect()
    }

    /// The group with this `displayName`, ignoring case as the server does.
    pub fn group_by_display_name(&self, display_name: &str) -> Option<Value> {
        let directory = self.directory();
        let found = directory.groups.find("displayName", display_name);
        found.first().map(|group| group.resource.clone())
    }

    /// The user ids that are members of group `group_id`, or `None` if there is no such group.
    pub fn group_member_ids(&self, group_id: &str) -> Option<Vec<String>> {
        let directory = self.directory();
        directory
            .groups
            .resources
            .get(group_id)
            .map(|group| member_ids(&group.resource))
    }

    /// How many PATCH requests reached `/Groups/{id}`, answered or refused.
    pub fn group_patch_requests(&self) -> u64 {
        self.state.group_counters.patch_requests.load(Ordering::Relaxed)
    }

    /// The most membership changes one group request (POST, PUT or PATCH) carried.
    pub fn largest_group_membership_change(&self) -> usize {
        self.state
            .group_counters
            .largest_membership_change
            .load(Ordering::Relaxed)
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
        group_counters: Arc::default(),
        base_url: format!("http://{address}/scim/v2"),
    };
    let scim = Router::new()
        .route("/ServiceProviderConfig", get(service_provider_config))
        .route("/Schemas", get(list_schemas))
        .route("/Schemas/{id}", get(get_schema))
        .route("/ResourceTypes", get(list_resource_types))
        .route("/ResourceTypes/{name}", get(get_resource_type))
        .route("/.search", post(search_everything))
        .route("/Users", get(list_users).post(create_user))
        .route("/Users/.search", post(search_users))
        .route(
            "/Users/{id}",
            get(get_user).put(replace_user).patch(patch_user).delete(delete_user),
        )
        .route("/Groups", get(list_groups).post(create_group))
        .route("/Groups/.search", post(search_groups))
        .route(
            "/Groups/{id}",
            get(get_group)
                .put(replace_group)
                .patch(patch_group)
                .delete(delete_group),
        )
        .fallback(unknown_endpoint)
        .method_not_allowed_fallback(method_not_allowed)
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

// --- responses and request bodies ------------------------------------------------------

fn scim_json(status: StatusCode, body: Value) -> Response {
    (status, [(header::CONTENT_TYPE, SCIM_JSON)], Json(body)).into_response()
}

/// An RFC 7644 §3.12 error, answered as a SCIM error body.
#[derive(Debug)]
struct ScimError {
    status: StatusCode,
    scim_type: Option<&'static str>,
    detail: String,
}

impl ScimError {
    fn new(status: StatusCode, scim_type: Option<&'static str>, detail: impl Into<String>) -> ScimError {
        ScimError {
            status,
            scim_type,
            detail: detail.into(),
        }
    }

    fn bad_request(scim_type: &'static str, detail: impl Into<String>) -> ScimError {
        ScimError::new(StatusCode::BAD_REQUEST, Some(scim_type), detail)
    }

    fn not_found(what: &str) -> ScimError {
        ScimError::new(StatusCode::NOT_FOUND, None, format!("no {what}"))
    }
}

impl IntoResponse for ScimError {
    fn into_response(self) -> Response {
        let mut body =
            json!({"schemas": [ERROR_SCHEMA], "status": self.status.as_u16().to_string(), "detail": self.detail});
        if let Some(scim_type) = self.scim_type {
            body["scimType"] = json!(scim_type);
        }
        scim_json(self.status, body)
    }
}

fn list_response(total: usize, start_index: usize, page: Vec<Value>) -> Response {
    scim_json(
        StatusCode::OK,
        json!({
            "schemas": [LIST_SCHEMA],
            "totalResults": total,
            "startIndex": start_index,
            "itemsPerPage": page.len(),
            "Resources": page,
        }),
    )
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
            (header::CONTENT_TYPE, SCIM_JSON.to_string()),
            (header::ETAG, version),
            (header::LOCATION, location),
        ],
        Json(resource.clone()),
    )
        .into_response()
}

async fn unknown_endpoint() -> ScimError {
    ScimError::not_found("such SCIM endpoint")
}

async fn method_not_allowed() -> ScimError {
    ScimError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        None,
        "method not supported on this endpoint",
    )
}

/// A JSON request body (`application/scim+json` or `application/json`); anything
/// unreadable is a SCIM error, not axum's plain-text rejection.
struct ScimBody(Value);

impl<S: Send + Sync> FromRequest<S> for ScimBody {
    type Rejection = ScimError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<Value>::from_request(request, state).await {
            Ok(Json(value)) => Ok(ScimBody(value)),
            Err(rejection) if rejection.status() == StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                Err(ScimError::new(rejection.status(), None, rejection.body_text()))
            }
            Err(rejection) => Err(ScimError::bad_request("invalidSyntax", rejection.body_text())),
        }
    }
}

/// Query parameters; unreadable ones are a SCIM error.
struct ScimQuery<T>(T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ScimQuery<T> {
    type Rejection = ScimError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(query)) => Ok(ScimQuery(query)),
            Err(rejection) => Err(ScimError::bad_request("invalidValue", rejection.body_text())),
        }
    }
}

// --- authentication --------------------------------------------------------------------

/// Discovery is open: a client reads it before (or to learn how) it authenticates, and
/// RFC 7644 §4 leaves it to the provider whether these endpoints need credentials.
fn is_discovery(path: &str) -> bool {
    let path = path.strip_prefix("/scim/v2").unwrap_or(path);
    matches!(
        path.trim_start_matches('/').split('/').next(),
        Some("ServiceProviderConfig" | "Schemas" | "ResourceTypes")
    )
}

async fn require_auth(State(state): State<ScimState>, request: Request, next: Next) -> Response {
    let protected = state.settings.bearer_token.is_some() || state.settings.oauth_client.is_some();
    if !protected || is_discovery(request.uri().path()) {
        return next.run(request).await;
    }
    let valid = bearer_token(request.headers())
        .is_some_and(|token| state.settings.bearer_token.as_deref() == Some(token) || state.tokens.is_valid(token));
    if valid {
        next.run(request).await
    } else {
        ScimError::new(
            StatusCode::UNAUTHORIZED,
            None,
            "missing, invalid or expired bearer token",
        )
        .into_response()
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

// --- discovery -------------------------------------------------------------------------

async fn service_provider_config(State(state): State<ScimState>) -> Response {
    let protected = state.settings.bearer_token.is_some() || state.settings.oauth_client.is_some();
    let authentication_schemes = if protected {
        json!([{"type": "oauthbearertoken", "name": "OAuth Bearer Token",
                "description": "Authentication with a bearer token"}])
    } else {
        json!([])
    };
    scim_json(
        StatusCode::OK,
        json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig"],
            "patch": {"supported": state.settings.patch},
            "bulk": {"supported": false, "maxOperations": 0, "maxPayloadSize": 0},
            "filter": {"supported": state.settings.filter_advertised, "maxResults": 200},
            "changePassword": {"supported": false},
            "sort": {"supported": false},
            "etag": {"supported": state.settings.etag},
            "authenticationSchemes": authentication_schemes,
            "meta": {
                "resourceType": "ServiceProviderConfig",
                "location": format!("{}/ServiceProviderConfig", state.base_url),
            },
        }),
    )
}

/// One attribute definition (RFC 7643 §7) with the RFC's defaults, and `overrides`.
fn attribute(name: &str, kind: &str, overrides: Value) -> Value {
    let mut definition = json!({
        "name": name,
        "type": kind,
        "multiValued": false,
        "required": false,
        "caseExact": false,
        "mutability": "readWrite",
        "returned": "default",
        "uniqueness": "none",
    });
    if let Value::Object(overrides) = overrides {
        for (key, value) in overrides {
            definition[key] = value;
        }
    }
    definition
}

fn complex(name: &str, multi_valued: bool, sub_attributes: Vec<Value>) -> Value {
    attribute(
        name,
        "complex",
        json!({"multiValued": multi_valued, "subAttributes": sub_attributes}),
    )
}

/// `emails`, `phoneNumbers`: multi-valued `value`/`display`/`type`/`primary`.
fn typed_values(name: &str, types: &[&str]) -> Value {
    complex(
        name,
        true,
        vec![
            attribute("value", "string", json!({})),
            attribute("display", "string", json!({})),
            attribute("type", "string", json!({"canonicalValues": types})),
            attribute("primary", "boolean", json!({})),
        ],
    )
}

/// The User schema (RFC 7643 §4.1), the attributes clients provision; `id`,
/// `externalId` and `meta` are common attributes and not listed (RFC 7643 §3.1).
fn user_schema_attributes() -> Vec<Value> {
    let string = |name: &str| attribute(name, "string", json!({}));
    vec![
        attribute("userName", "string", json!({"required": true, "uniqueness": "server"})),
        complex(
            "name",
            false,
            [
                "formatted",
                "familyName",
                "givenName",
                "middleName",
                "honorificPrefix",
                "honorificSuffix",
            ]
            .map(string)
            .to_vec(),
        ),
        string("displayName"),
        string("nickName"),
        attribute("profileUrl", "reference", json!({"referenceTypes": ["external"]})),
        string("title"),
        string("userType"),
        string("preferredLanguage"),
        string("locale"),
        string("timezone"),
        attribute("active", "boolean", json!({})),
        attribute(
            "password",
            "string",
            json!({"mutability": "writeOnly", "returned": "never"}),
        ),
        typed_values("emails", &["work", "home", "other"]),
        typed_values("phoneNumbers", &["work", "home", "mobile", "fax", "pager", "other"]),
        attribute(
            "groups",
            "complex",
            json!({
                "multiValued": true,
                "mutability": "readOnly",
                "subAttributes": [
                    attribute("value", "string", json!({"mutability": "readOnly"})),
                    attribute("$ref", "reference", json!({"referenceTypes": ["Group"], "mutability": "readOnly"})),
                    attribute("display", "string", json!({"mutability": "readOnly"})),
                    attribute("type", "string", json!({"canonicalValues": ["direct", "indirect"], "mutability": "readOnly"})),
                ],
            }),
        ),
    ]
}

/// The Enterprise User extension (RFC 7643 §4.3).
fn enterprise_user_schema_attributes() -> Vec<Value> {
    let string = |name: &str| attribute(name, "string", json!({}));
    vec![
        string("employeeNumber"),
        string("costCenter"),
        string("organization"),
        string("division"),
        string("department"),
        complex(
            "manager",
            false,
            vec![
                string("value"),
                attribute("$ref", "reference", json!({"referenceTypes": ["User"]})),
                attribute("displayName", "string", json!({"mutability": "readOnly"})),
            ],
        ),
    ]
}

/// The Group schema (RFC 7643 §4.2) as this server enforces it: `displayName` required
/// and unique, members users only.
fn group_schema_attributes() -> Vec<Value> {
    vec![
        attribute(
            "displayName",
            "string",
            json!({"required": true, "uniqueness": "server"}),
        ),
        complex(
            "members",
            true,
            vec![
                attribute("value", "string", json!({"mutability": "immutable"})),
                attribute(
                    "$ref",
                    "reference",
                    json!({"referenceTypes": ["User"], "mutability": "immutable"}),
                ),
                attribute("display", "string", json!({"mutability": "immutable"})),
                attribute(
                    "type",
                    "string",
                    json!({"canonicalValues": ["User"], "mutability": "immutable"}),
                ),
            ],
        ),
    ]
}

fn schemas(base_url: &str) -> Vec<Value> {
    [
        (USER_SCHEMA, "User", "User Account", user_schema_attributes()),
        (
            ENTERPRISE_USER_SCHEMA,
            "EnterpriseUser",
            "Enterprise User",
            enterprise_user_schema_attributes(),
        ),
        (GROUP_SCHEMA, "Group", "Group", group_schema_attributes()),
    ]
    .into_iter()
    .map(|(id, name, description, attributes)| {
        json!({
            "schemas": [SCHEMA_SCHEMA],
            "id": id,
            "name": name,
            "description": description,
            "attributes": attributes,
            "meta": {"resourceType": "Schema", "location": format!("{base_url}/Schemas/{id}")},
        })
    })
    .collect()
}

fn resource_types(base_url: &str) -> Vec<Value> {
    [Kind::User, Kind::Group]
        .into_iter()
        .map(|kind| {
            let name = kind.resource_type();
            let mut resource_type = json!({
                "schemas": [RESOURCE_TYPE_SCHEMA],
                "id": name,
                "name": name,
                "endpoint": format!("/{}", kind.endpoint()),
                "description": name,
                "schema": kind.schema(),
                "meta": {"resourceType": "ResourceType", "location": format!("{base_url}/ResourceTypes/{name}")},
            });
            if kind == Kind::User {
                resource_type["schemaExtensions"] = json!([{"schema": ENTERPRISE_USER_SCHEMA, "required": false}]);
            }
            resource_type
        })
        .collect()
}

/// Discovery lists ignore filtering, sorting and paging (RFC 7644 §4): all of it, always.
async fn list_schemas(State(state): State<ScimState>) -> Response {
    let all = schemas(&state.base_url);
    list_response(all.len(), 1, all)
}

async fn get_schema(State(state): State<ScimState>, Path(id): Path<String>) -> Response {
    match schemas(&state.base_url).into_iter().find(|schema| schema["id"] == id) {
        Some(schema) => scim_json(StatusCode::OK, schema),
        None => ScimError::not_found(&format!("schema {id}")).into_response(),
    }
}

async fn list_resource_types(State(state): State<ScimState>) -> Response {
    let all = resource_types(&state.base_url);
    list_response(all.len(), 1, all)
}

async fn get_resource_type(State(state): State<ScimState>, Path(name): Path<String>) -> Response {
    match resource_types(&state.base_url)
        .into_iter()
        .find(|kind| kind["id"] == name)
    {
        Some(resource_type) => scim_json(StatusCode::OK, resource_type),
        None => ScimError::not_found(&format!("resource type {name}")).into_response(),
    }
}

// --- reading: filters, paging, projection ------------------------------------------------

#[derive(Deserialize)]
struct ListQuery {
    filter: Option<String>,
    /// Signed: RFC 7644 §3.4.2.4 reads values below 1 as 1, and a negative count as 0.
    #[serde(rename = "startIndex")]
    start_index: Option<i64>,
    count: Option<i64>,
    attributes: Option<String>,
    #[serde(rename = "excludedAttributes")]
    excluded_attributes: Option<String>,
}

#[derive(Deserialize)]
struct ProjectionQuery {
    attributes: Option<String>,
    #[serde(rename = "excludedAttributes")]
    excluded_attributes: Option<String>,
}

/// `attributes` / `excludedAttributes` (RFC 7644 §3.9): which attributes a response
/// carries. Paths are `name`, `name.sub` or URN-qualified; `schemas` and `id` always stay.
#[derive(Default)]
struct Projection {
    only: Option<Vec<String>>,
    excluded: Vec<String>,
}

impl Projection {
    fn new(attributes: Option<&str>, excluded: Option<&str>) -> Projection {
        let split = |list: &str| -> Vec<String> {
            list.split(',')
                .map(str::trim)
                .filter(|path| !path.is_empty())
                .map(str::to_string)
                .collect()
        };
        Projection {
            only: attributes.map(split),
            excluded: excluded.map(split).unwrap_or_default(),
        }
    }

    fn apply(&self, kind: Kind, resource: Value) -> Value {
        let Value::Object(mut object) = resource else {
            return resource;
        };
        if let Some(only) = &self.only {
            let mut kept = Map::new();
            for always in ["schemas", "id"] {
                if let Some(value) = object.get(always) {
                    kept.insert(always.to_string(), value.clone());
                }
            }
            for path in only {
                let Some((key, sub)) = resolve_path(&object, kind, path) else {
                    continue;
                };
                match (&object[&key], sub) {
                    (value, None) => {
                        kept.insert(key, value.clone());
                    }
                    (Value::Object(inner), Some(sub)) => {
                        if let Some((sub_key, value)) = find_key(inner, &sub) {
                            let entry = kept.entry(key).or_insert_with(|| json!({}));
                            entry[sub_key] = value.clone();
                        }
                    }
                    (Value::Array(items), Some(sub)) => {
                        let narrowed = items
                            .iter()
                            .filter_map(Value::as_object)
                            .map(|item| {
                                let kept: Map<String, Value> = find_key(item, &sub)
                                    .map(|(sub_key, value)| (sub_key.to_string(), value.clone()))
                                    .into_iter()
                                    .collect();
                                Value::Object(kept)
                            })
                            .collect();
                        kept.insert(key, Value::Array(narrowed));
                    }
                    _ => {}
                }
            }
            object = kept;
        }
        for path in &self.excluded {
            let Some((key, sub)) = resolve_path(&object, kind, path) else {
                continue;
            };
            if key == "schemas" || key == "id" {
                continue;
            }
            match sub {
                None => {
                    object.remove(&key);
                }
                Some(sub) => match object.get_mut(&key) {
                    Some(Value::Object(inner)) => {
                        if let Some((sub_key, _)) = find_key(inner, &sub) {
                            let sub_key = sub_key.to_string();
                            inner.remove(&sub_key);
                        }
                    }
                    Some(Value::Array(items)) => {
                        for item in items.iter_mut().filter_map(Value::as_object_mut) {
                            if let Some((sub_key, _)) = find_key(item, &sub) {
                                let sub_key = sub_key.to_string();
                                item.remove(&sub_key);
                            }
                        }
                    }
                    _ => {}
                },
            }
        }
        Value::Object(object)
    }
}

/// The key (as stored, ignoring case) and sub-attribute a projection path names.
fn resolve_path(object: &Map<String, Value>, kind: Kind, path: &str) -> Option<(String, Option<String>)> {
    // An extension's attributes live under its URN: `urn:…:enterprise:2.0:User:department`.
    for key in object.keys().filter(|key| key.starts_with("urn:")) {
        if path.eq_ignore_ascii_case(key) {
            return Some((key.clone(), None));
        }
        if let Some(rest) = strip_prefix_ignoring_case(path, key).and_then(|rest| rest.strip_prefix(':')) {
            return Some((key.clone(), Some(rest.split('.').next().unwrap_or(rest).to_string())));
        }
    }
    let path = core_relative(kind, path);
    let (name, sub) = match path.split_once('.') {
        Some((name, sub)) => (name, Some(sub.to_string())),
        None => (path, None),
    };
    find_key(object, name).map(|(key, _)| (key.to_string(), sub))
}

/// Attribute names ignore case (RFC 7643 §2.1).
fn find_key<'a>(object: &'a Map<String, Value>, name: &str) -> Option<(&'a str, &'a Value)> {
    object
        .iter()
        .find(|(key, _)| key.eq_ignore_ascii_case(name))
        .map(|(key, value)| (key.as_str(), value))
}

/// The resource as the server shows it: a user with its read-only `groups`.
fn render(state: &ScimState, directory: &Directory, kind: Kind, resource: &Value) -> Value {
    let mut rendered = resource.clone();
    if kind == Kind::User {
        let id = resource["id"].as_str().unwrap_or_default();
        let groups = directory.groups_of(&state.base_url, id);
        if !groups.is_empty() {
            rendered["groups"] = Value::Array(groups);
        }
    }
    rendered
}

/// The resources of `kinds` that `query` asks for, one page of them.
fn list(state: &ScimState, kinds: &[Kind], query: &ListQuery) -> Result<Response, ScimError> {
    if query.filter.is_some() && !state.settings.filter_works {
        return Err(ScimError::bad_request("invalidFilter", "filtering is not supported"));
    }
    let condition = match query.filter.as_deref().map(parse_eq_filter) {
        None => None,
        Some(Ok(condition)) => Some(condition),
        Some(Err(message)) => return Err(ScimError::bad_request("invalidFilter", message)),
    };
    let projection = Projection::new(query.attributes.as_deref(), query.excluded_attributes.as_deref());
    let directory = state.directory.lock().expect("directory lock");
    let found: Vec<(Kind, &Stored)> = kinds
        .iter()
        .flat_map(|&kind| {
            let collection = directory.collection(kind);
            let found: Vec<&Stored> = match &condition {
                None => collection.resources.values().collect(),
                Some((attribute, value)) => collection.find(attribute, value),
            };
            found.into_iter().map(move |stored| (kind, stored))
        })
        .collect();
    // RFC 7644 §3.4.2.4: 1-based startIndex, count per page.
    let start_index = query.start_index.unwrap_or(1).max(1) as usize;
    let count = query.count.map_or(usize::MAX, |count| count.max(0) as usize);
    let page: Vec<Value> = found
        .iter()
        .skip(start_index - 1)
        .take(count)
        .map(|(kind, stored)| projection.apply(*kind, render(state, &directory, *kind, &stored.resource)))
        .collect();
    Ok(list_response(found.len(), start_index, page))
}

/// A query sent as a `POST …/.search` body (RFC 7644 §3.4.3), where the attribute lists
/// are arrays.
#[derive(Deserialize)]
struct SearchRequest {
    filter: Option<String>,
    #[serde(rename = "startIndex")]
    start_index: Option<i64>,
    count: Option<i64>,
    attributes: Option<Vec<String>>,
    #[serde(rename = "excludedAttributes")]
    excluded_attributes: Option<Vec<String>>,
}

/// `POST /Users/.search`, `POST /Groups/.search`, and `POST /.search` across both: a
/// list, asked in the body.
fn search(state: &ScimState, kinds: &[Kind], body: Value) -> Result<Response, ScimError> {
    let request: SearchRequest =
        serde_json::from_value(body).map_err(|error| ScimError::bad_request("invalidSyntax", error.to_string()))?;
    let query = ListQuery {
        filter: request.filter,
        start_index: request.start_index,
        count: request.count,
        attributes: request.attributes.map(|names| names.join(",")),
        excluded_attributes: request.excluded_attributes.map(|names| names.join(",")),
    };
    list(state, kinds, &query)
}

async fn search_everything(State(state): State<ScimState>, ScimBody(body): ScimBody) -> Result<Response, ScimError> {
    search(&state, &[Kind::User, Kind::Group], body)
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

fn read(state: &ScimState, kind: Kind, id: &str, query: &ProjectionQuery) -> Result<Response, ScimError> {
    let directory = state.directory.lock().expect("directory lock");
    let stored = directory
        .collection(kind)
        .resources
        .get(id)
        .ok_or_else(|| ScimError::not_found(&format!("{} {id}", kind.noun())))?;
    let projection = Projection::new(query.attributes.as_deref(), query.excluded_attributes.as_deref());
    let rendered = projection.apply(kind, render(state, &directory, kind, &stored.resource));
    Ok(resource_response(StatusCode::OK, &rendered))
}

// --- writing -----------------------------------------------------------------------------

/// The stored form of a resource: `id` and `meta` are the server's, and what the server
/// never keeps or computes itself (a user's `password`, `groups`) is dropped.
fn with_meta(
    state: &ScimState,
    kind: Kind,
    id: &str,
    mut resource: Value,
    version: u64,
    created: Option<Value>,
) -> Value {
    let now = chrono::Utc::now().to_rfc3339();
    resource["id"] = json!(id);
    if let (Kind::User, Value::Object(object)) = (kind, &mut resource) {
        object.remove("password");
        object.remove("groups");
    }
    let created = created.unwrap_or_else(|| json!(now));
    resource["meta"] = json!({
        "resourceType": kind.resource_type(),
        "created": created,
        "lastModified": now,
        "location": format!("{}/{}/{id}", state.base_url, kind.endpoint()),
        "version": format!("W/\"{version}\""),
    });
    if resource.get("schemas").is_none() {
        resource["schemas"] = json!([kind.schema()]);
    }
    resource
}

/// Refuses a resource that cannot be stored as sent, whatever else is stored.
fn check_shape(kind: Kind, resource: &Value) -> Result<(), ScimError> {
    if !resource.is_object() {
        return Err(ScimError::bad_request(
            "invalidSyntax",
            "the body must be a JSON object",
        ));
    }
    let required = kind.required_attribute();
    if resource.get(required).and_then(Value::as_str).is_none_or(str::is_empty) {
        return Err(ScimError::bad_request(
            "invalidValue",
            format!("{required} is required"),
        ));
    }
    // Attribute types are checked as real servers do (RFC 7643 §4.1: `active` is a
    // boolean), so that a client sending the wrong type learns it.
    if kind == Kind::User && resource.get("active").is_some_and(|active| !active.is_boolean()) {
        return Err(ScimError::bad_request("invalidValue", "active must be a boolean"));
    }
    Ok(())
}

fn uniqueness_conflict(message: String) -> ScimError {
    ScimError::new(StatusCode::CONFLICT, Some("uniqueness"), message)
}

fn create(state: &ScimState, directory: &mut Directory, kind: Kind, resource: Value) -> Result<Response, ScimError> {
    check_shape(kind, &resource)?;
    if let Some(message) = directory.collection(kind).conflict(&resource, None) {
        return Err(uniqueness_conflict(message));
    }
    let id = format!("{:08x}-emu", state.next_id.fetch_add(1, Ordering::Relaxed));
    let stored = with_meta(state, kind, &id, resource, 1, None);
    let rendered = render(state, directory, kind, &stored);
    directory.put(
        kind,
        id,
        Stored {
            resource: stored,
            version: 1,
        },
    );
    Ok(resource_response(StatusCode::CREATED, &rendered))
}

/// Whether `If-Match` (when ETags are on and one was sent) matches the stored version.
fn precondition_holds(state: &ScimState, headers: &HeaderMap, stored: &Stored) -> bool {
    let Some(expected) = headers.get(header::IF_MATCH).and_then(|value| value.to_str().ok()) else {
        return true;
    };
    !state.settings.etag || expected == "*" || expected == format!("W/\"{}\"", stored.version)
}

/// The resource a write addresses: 404 if there is none, 412 if `If-Match` is stale.
fn existing<'a>(
    state: &ScimState,
    directory: &'a Directory,
    kind: Kind,
    id: &str,
    headers: &HeaderMap,
) -> Result<&'a Stored, ScimError> {
    let stored = directory
        .collection(kind)
        .resources
        .get(id)
        .ok_or_else(|| ScimError::not_found(&format!("{} {id}", kind.noun())))?;
    if !precondition_holds(state, headers, stored) {
        return Err(ScimError::new(
            StatusCode::PRECONDITION_FAILED,
            None,
            "the resource changed since it was read",
        ));
    }
    Ok(stored)
}

/// Stores `resource` as the new state of existing resource `id` (PUT, or PATCH applied):
/// refused if it lacks what is required or takes another's unique values; the version
/// moves on.
fn store_replacement(
    state: &ScimState,
    directory: &mut Directory,
    kind: Kind,
    id: String,
    resource: Value,
) -> Result<Response, ScimError> {
    check_shape(kind, &resource)?;
    if let Some(message) = directory.collection(kind).conflict(&resource, Some(&id)) {
        return Err(uniqueness_conflict(message));
    }
    let stored = directory
        .collection(kind)
        .resources
        .get(&id)
        .expect("the caller found it");
    let created = stored.resource.pointer("/meta/created").cloned();
    let version = stored.version + 1;
    let resource = with_meta(state, kind, &id, resource, version, created);
    directory.put(
        kind,
        id,
        Stored {
            resource: resource.clone(),
            version,
        },
    );
    Ok(resource_response(
        StatusCode::OK,
        &render(state, directory, kind, &resource),
    ))
}

fn delete(state: &ScimState, kind: Kind, id: &str, headers: &HeaderMap) -> Result<Response, ScimError> {
    let mut directory = state.directory.lock().expect("directory lock");
    existing(state, &directory, kind, id, headers)?;
    directory.remove(kind, id);
    Ok(StatusCode::NO_CONTENT.into_response())
}

// --- PATCH, users and groups alike ------------------------------------------------------

fn check_patch_supported(state: &ScimState) -> Result<(), ScimError> {
    if state.settings.patch {
        Ok(())
    } else {
        Err(ScimError::new(
            StatusCode::NOT_IMPLEMENTED,
            None,
            "PATCH is not supported",
        ))
    }
}

fn operations(patch: &Value) -> Result<&Vec<Value>, ScimError> {
    patch
        .get("Operations")
        .and_then(Value::as_array)
        .ok_or_else(|| ScimError::bad_request("invalidSyntax", "no Operations"))
}

/// An operation's `op`, lower-cased: Entra ID sends `Add`, `Replace`, `Remove`.
fn op_name(operation: &Value) -> String {
    operation
        .get("op")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_ascii_lowercase()
}

/// `text` after `prefix`, compared ignoring ASCII case as URNs and attribute names are.
fn strip_prefix_ignoring_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &text[prefix.len()..])
}

/// The path relative to the resource's core schema: `urn:…:core:2.0:User:userName` is
/// `userName`.
fn core_relative(kind: Kind, path: &str) -> &str {
    strip_prefix_ignoring_case(path, kind.schema())
        .and_then(|rest| rest.strip_prefix(':'))
        .filter(|rest| !rest.is_empty())
        .unwrap_or(path)
}

/// The extension a path names whole (`urn:…:enterprise:2.0:User`), spelled as stored.
fn extension_named(resource: &Value, path: &str) -> Option<String> {
    if path.eq_ignore_ascii_case(ENTERPRISE_USER_SCHEMA) {
        return Some(ENTERPRISE_USER_SCHEMA.to_string());
    }
    let object = resource.as_object()?;
    object
        .keys()
        .find(|key| key.starts_with("urn:") && key.eq_ignore_ascii_case(path))
        .cloned()
}

fn list_schema(resource: &mut Value, urn: &str) {
    if !resource["schemas"].is_array() {
        resource["schemas"] = json!([]);
    }
    if let Some(schemas) = resource["schemas"].as_array_mut() {
        if !schemas.iter().any(|listed| listed == urn) {
            schemas.push(json!(urn));
        }
    }
}

fn unlist_schema(resource: &mut Value, urn: &str) {
    if let Some(schemas) = resource["schemas"].as_array_mut() {
        schemas.retain(|listed| listed != urn);
    }
}

/// A path's attribute as the resource already spells it: attribute names ignore case
/// (RFC 7643 §2.1), so `displayname` replaces `displayName` instead of adding a second one.
fn canonical_attribute(resource: &Value, kind: Kind, path: &str) -> String {
    if path.starts_with("urn:") {
        return path.to_string();
    }
    let (name, rest) = match path.find(['.', '[']) {
        Some(end) => path.split_at(end),
        None => (path, ""),
    };
    let existing = resource.as_object().and_then(|object| find_key(object, name));
    let canonical = match existing {
        Some((key, _)) => key,
        None => kind
            .unique_attributes()
            .into_iter()
            .find(|known| known.eq_ignore_ascii_case(name))
            .unwrap_or(name),
    };
    format!("{canonical}{rest}")
}

/// Sets what an `add` or `replace` path names (or one entry of a path-less value). A
/// whole extension takes the sub-attributes given and keeps the others (RFC 7644
/// §3.5.2.3); any other path, `a.b` or `urn:…:User:attribute`, goes through the
/// connector's attribute overlay, as the user side always has.
fn set_attribute(resource: &mut Value, kind: Kind, path: &str, value: Value) -> Result<(), ScimError> {
    if let Some(urn) = extension_named(resource, path) {
        let Value::Object(mut values) = value else {
            return Err(ScimError::bad_request("invalidValue", format!("{urn} takes an object")));
        };
        values.remove("schemas");
        if !resource[&urn].is_object() {
            resource[&urn] = json!({});
        }
        for (name, value) in values {
            resource[&urn][name] = value;
        }
        list_schema(resource, &urn);
        return Ok(());
    }
    let path = canonical_attribute(resource, kind, core_relative(kind, path));
    crate::connectors::scim::overlay(resource, &[(path, value)]);
    Ok(())
}

/// Removes what a `remove` path names: an attribute, `a.b`, a whole extension or one of
/// its attributes. Nothing there is nothing to do.
fn remove_attribute(resource: &mut Value, kind: Kind, path: &str) {
    if let Some(urn) = extension_named(resource, path) {
        if let Value::Object(object) = resource {
            object.remove(&urn);
        }
        unlist_schema(resource, &urn);
        return;
    }
    let relative = core_relative(kind, path);
    if relative.starts_with("urn:") {
        let Some((urn, attribute)) = relative.rsplit_once(':') else {
            return;
        };
        let Some(urn) = extension_named(resource, urn) else {
            return;
        };
        if let Some(Value::Object(extension)) = resource.get_mut(&urn) {
            remove_key_path(extension, attribute);
            if extension.is_empty() {
                if let Value::Object(object) = resource {
                    object.remove(&urn);
                }
                unlist_schema(resource, &urn);
            }
        }
    } else if let Value::Object(object) = resource {
        remove_key_path(object, relative);
    }
}

/// Removes `name` or `name.sub` from `object`, names ignoring case.
fn remove_key_path(object: &mut Map<String, Value>, path: &str) {
    let (name, sub) = match path.split_once('.') {
        Some((name, sub)) => (name, Some(sub)),
        None => (path, None),
    };
    let Some(key) = find_key(object, name).map(|(key, _)| key.to_string()) else {
        return;
    };
    match sub {
        None => {
            object.remove(&key);
        }
        Some(sub) => {
            if let Some(Value::Object(inner)) = object.get_mut(&key) {
                if let Some(sub_key) = find_key(inner, sub).map(|(sub_key, _)| sub_key.to_string()) {
                    inner.remove(&sub_key);
                }
            }
        }
    }
}

// --- users -------------------------------------------------------------------------------

async fn list_users(
    State(state): State<ScimState>,
    ScimQuery(query): ScimQuery<ListQuery>,
) -> Result<Response, ScimError> {
    list(&state, &[Kind::User], &query)
}

async fn search_users(State(state): State<ScimState>, ScimBody(body): ScimBody) -> Result<Response, ScimError> {
    search(&state, &[Kind::User], body)
}

async fn get_user(
    State(state): State<ScimState>,
    Path(id): Path<String>,
    ScimQuery(query): ScimQuery<ProjectionQuery>,
) -> Result<Response, ScimError> {
    read(&state, Kind::User, &id, &query)
}

async fn create_user(State(state): State<ScimState>, ScimBody(user): ScimBody) -> Result<Response, ScimError> {
    let mut directory = state.directory.lock().expect("directory lock");
    create(&state, &mut directory, Kind::User, user)
}

async fn replace_user(
    State(state): State<ScimState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    ScimBody(user): ScimBody,
) -> Result<Response, ScimError> {
    let mut directory = state.directory.lock().expect("directory lock");
    existing(&state, &directory, Kind::User, &id, &headers)?;
    store_replacement(&state, &mut directory, Kind::User, id, user)
}

async fn patch_user(
    State(state): State<ScimState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    ScimBody(patch): ScimBody,
) -> Result<Response, ScimError> {
    check_patch_supported(&state)?;
    let mut directory = state.directory.lock().expect("directory lock");
    let mut resource = existing(&state, &directory, Kind::User, &id, &headers)?
        .resource
        .clone();
    for operation in operations(&patch)? {
        let path = operation.get("path").and_then(Value::as_str);
        let value = operation.get("value").cloned().unwrap_or(Value::Null);
        match (op_name(operation).as_str(), path) {
            ("replace" | "add", Some(path)) => set_attribute(&mut resource, Kind::User, path, value)?,
            ("replace" | "add", None) => {
                let Value::Object(values) = value else {
                    return Err(ScimError::bad_request(
                        "invalidValue",
                        "an operation without a path needs an object value",
                    ));
                };
                for (path, value) in values {
                    set_attribute(&mut resource, Kind::User, &path, value)?;
                }
            }
            ("remove", Some(path)) => remove_attribute(&mut resource, Kind::User, path),
            // RFC 7644 §3.5.2.2: a remove without a path has no target.
            ("remove", None) => return Err(ScimError::bad_request("noTarget", "remove needs a path")),
            _ => {
                return Err(ScimError::bad_request(
                    "invalidSyntax",
                    format!("unsupported operation {operation}"),
                ))
            }
        }
    }
    store_replacement(&state, &mut directory, Kind::User, id, resource)
}

async fn delete_user(
    State(state): State<ScimState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ScimError> {
    delete(&state, Kind::User, &id, &headers)
}

// --- groups ------------------------------------------------------------------------------

async fn list_groups(
    State(state): State<ScimState>,
    ScimQuery(query): ScimQuery<ListQuery>,
) -> Result<Response, ScimError> {
    list(&state, &[Kind::Group], &query)
}

async fn search_groups(State(state): State<ScimState>, ScimBody(body): ScimBody) -> Result<Response, ScimError> {
    search(&state, &[Kind::Group], body)
}

async fn get_group(
    State(state): State<ScimState>,
    Path(id): Path<String>,
    ScimQuery(query): ScimQuery<ProjectionQuery>,
) -> Result<Response, ScimError> {
    read(&state, Kind::Group, &id, &query)
}

async fn create_group(State(state): State<ScimState>, ScimBody(mut group): ScimBody) -> Result<Response, ScimError> {
    count_membership_changes(&state, members_of(&group).len())?;
    let mut directory = state.directory.lock().expect("directory lock");
    normalize_group_members(&state, &directory, &mut group)?;
    create(&state, &mut directory, Kind::Group, group)
}

async fn replace_group(
    State(state): State<ScimState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    ScimBody(mut group): ScimBody,
) -> Result<Response, ScimError> {
    let mut directory = state.directory.lock().expect("directory lock");
    existing(&state, &directory, Kind::Group, &id, &headers)?;
    count_membership_changes(&state, members_of(&group).len())?;
    normalize_group_members(&state, &directory, &mut group)?;
    store_replacement(&state, &mut directory, Kind::Group, id, group)
}

async fn delete_group(
    State(state): State<ScimState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ScimError> {
    delete(&state, Kind::Group, &id, &headers)
}

/// Records how many membership changes a group request carries, and refuses it past
/// `max_group_members_per_request`.
///
/// The refusal is a plain 400, as AWS IAM Identity Center answers (a `ValidationException`)
/// past its 100: RFC 7644 has no code for it, its 413 being for bulk payloads and its
/// `tooMany` for filters that match too much (§3.12).
fn count_membership_changes(state: &ScimState, changes: usize) -> Result<(), ScimError> {
    state
        .group_counters
        .largest_membership_change
        .fetch_max(changes, Ordering::Relaxed);
    match state.settings.max_group_members_per_request {
        Some(limit) if changes > limit => Err(ScimError::new(
            StatusCode::BAD_REQUEST,
            None,
            format!("at most {limit} membership changes per request; this one has {changes}"),
        )),
        _ => Ok(()),
    }
}

/// A member as stored: `value` an existing user's id, with the `$ref` and `type` the
/// server knows, and `display` if the client gave one. A missing, null or unknown id is refused (400
/// `invalidValue`), as real servers refuse dangling members; groups cannot nest here.
fn normalize_member(state: &ScimState, directory: &Directory, member: &Value) -> Result<Value, ScimError> {
    let Some(id) = member.get("value").and_then(Value::as_str).filter(|id| !id.is_empty()) else {
        return Err(ScimError::bad_request(
            "invalidValue",
            format!("a member needs a user id as its value: {member}"),
        ));
    };
    let Some(user) = directory.users.resources.get(id) else {
        return Err(ScimError::bad_request(
            "invalidValue",
            format!("member {id} is not a user of this server"),
        ));
    };
    let mut stored = json!({
        "value": user.resource["id"],
        "$ref": format!("{}/Users/{id}", state.base_url),
        "type": "User",
    });
    if let Some(display) = member.get("display").filter(|display| !display.is_null()) {
        stored["display"] = display.clone();
    }
    Ok(stored)
}

/// Adds `additions` to `members`; one already there is left as it is.
fn add_members(
    state: &ScimState,
    directory: &Directory,
    members: &mut Vec<Value>,
    additions: &[Value],
) -> Result<(), ScimError> {
    for addition in additions {
        let member = normalize_member(state, directory, addition)?;
        if !members.iter().any(|present| present["value"] == member["value"]) {
            members.push(member);
        }
    }
    Ok(())
}

/// Checks a POSTed or PUT group's `members` and stores them normalized, duplicates once.
fn normalize_group_members(state: &ScimState, directory: &Directory, group: &mut Value) -> Result<(), ScimError> {
    let listed = match group.get("members") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(listed)) => listed.clone(),
        Some(_) => return Err(ScimError::bad_request("invalidValue", "members must be an array")),
    };
    let mut members = Vec::new();
    add_members(state, directory, &mut members, &listed)?;
    set_members(group, members);
    Ok(())
}

/// What one PATCH operation on a group does.
#[derive(Debug)]
enum GroupEdit {
    AddMembers(Vec<Value>),
    ReplaceMembers(Vec<Value>),
    /// Remove these user ids: `members[value eq "…"]`, or `members` with a value list as
    /// Entra ID and AWS send it.
    RemoveMembers(Vec<String>),
    RemoveAllMembers,
    Set(String, Value),
    Unset(String),
}

impl GroupEdit {
    fn membership_changes(&self) -> usize {
        match self {
            GroupEdit::AddMembers(members) | GroupEdit::ReplaceMembers(members) => members.len(),
            GroupEdit::RemoveMembers(ids) => ids.len(),
            GroupEdit::RemoveAllMembers | GroupEdit::Set(..) | GroupEdit::Unset(_) => 0,
        }
    }
}

/// Where an operation's `path` points in a group.
#[derive(Debug)]
enum GroupPath {
    Members,
    /// `members[value eq "id"]`.
    Member(String),
    Attribute(String),
}

fn invalid_path(path: &str) -> ScimError {
    ScimError::bad_request("invalidPath", format!("unsupported path {path}"))
}

fn parse_group_path(path: &str) -> Result<GroupPath, ScimError> {
    let relative = core_relative(Kind::Group, path);
    if relative.eq_ignore_ascii_case("members") {
        return Ok(GroupPath::Members);
    }
    if let Some((name, rest)) = relative.split_once('[') {
        let filter = rest.strip_suffix(']').ok_or_else(|| invalid_path(path))?;
        if !name.eq_ignore_ascii_case("members") {
            return Err(invalid_path(path));
        }
        let (attribute, value) =
            parse_eq_filter(filter).map_err(|message| ScimError::bad_request("invalidFilter", message))?;
        if !attribute.eq_ignore_ascii_case("value") {
            return Err(invalid_path(path));
        }
        return Ok(GroupPath::Member(value));
    }
    Ok(GroupPath::Attribute(relative.to_string()))
}

/// A PATCH value that should list members: an array, or one member on its own.
fn member_list(value: &Value) -> Result<Vec<Value>, ScimError> {
    match value {
        Value::Array(members) => Ok(members.clone()),
        Value::Object(_) => Ok(vec![value.clone()]),
        _ => Err(ScimError::bad_request(
            "invalidValue",
            format!("members must be a list of {{\"value\": id}}, not {value}"),
        )),
    }
}

fn member_ids_to_remove(value: &Value) -> Result<Vec<String>, ScimError> {
    member_list(value)?
        .iter()
        .map(|member| member.get("value").and_then(Value::as_str).map(str::to_string))
        .collect::<Option<Vec<String>>>()
        .ok_or_else(|| ScimError::bad_request("invalidValue", "a member to remove needs its id as value"))
}

fn parse_group_patch(patch: &Value) -> Result<Vec<GroupEdit>, ScimError> {
    let mut edits = Vec::new();
    for operation in operations(patch)? {
        let op = op_name(operation);
        let value = operation.get("value").cloned().unwrap_or(Value::Null);
        let path = operation.get("path").and_then(Value::as_str);
        match (op.as_str(), path.map(parse_group_path).transpose()?) {
            ("add", Some(GroupPath::Members)) => edits.push(GroupEdit::AddMembers(member_list(&value)?)),
            ("replace", Some(GroupPath::Members)) => edits.push(GroupEdit::ReplaceMembers(member_list(&value)?)),
            ("remove", Some(GroupPath::Members)) if value.is_null() => edits.push(GroupEdit::RemoveAllMembers),
            ("remove", Some(GroupPath::Members)) => edits.push(GroupEdit::RemoveMembers(member_ids_to_remove(&value)?)),
            ("remove", Some(GroupPath::Member(id))) => edits.push(GroupEdit::RemoveMembers(vec![id])),
            ("add" | "replace", Some(GroupPath::Member(_))) => return Err(invalid_path(path.unwrap_or_default())),
            ("add" | "replace", Some(GroupPath::Attribute(name))) => edits.push(GroupEdit::Set(name, value)),
            ("remove", Some(GroupPath::Attribute(name))) => edits.push(GroupEdit::Unset(name)),
            ("add" | "replace", None) => {
                let Value::Object(values) = value else {
                    return Err(ScimError::bad_request(
                        "invalidValue",
                        "an operation without a path needs an object value",
                    ));
                };
                for (name, value) in values {
                    if name.eq_ignore_ascii_case("members") {
                        let members = member_list(&value)?;
                        edits.push(if op == "add" {
                            GroupEdit::AddMembers(members)
                        } else {
                            GroupEdit::ReplaceMembers(members)
                        });
                    } else {
                        edits.push(GroupEdit::Set(name, value));
                    }
                }
            }
            // RFC 7644 §3.5.2.2: a remove without a path has no target.
            ("remove", None) => return Err(ScimError::bad_request("noTarget", "remove needs a path")),
            _ => {
                return Err(ScimError::bad_request(
                    "invalidSyntax",
                    format!("unsupported operation {operation}"),
                ))
            }
        }
    }
    Ok(edits)
}

/// Applies the edits to a copy of the group; nothing is stored unless all of them apply.
///
/// Adding a member already there and removing one that is not are no-ops: RFC 7644 would
/// allow 400 `noTarget` for the latter, but identity providers replay membership changes
/// and the servers they talk to (Entra ID's and AWS's targets among them) accept that.
fn apply_group_edits(
    state: &ScimState,
    directory: &Directory,
    mut group: Value,
    edits: Vec<GroupEdit>,
) -> Result<Value, ScimError> {
    let mut members = members_of(&group);
    for edit in edits {
        match edit {
            GroupEdit::AddMembers(additions) => add_members(state, directory, &mut members, &additions)?,
            GroupEdit::ReplaceMembers(replacements) => {
                members.clear();
                add_members(state, directory, &mut members, &replacements)?;
            }
            GroupEdit::RemoveMembers(ids) => {
                members.retain(|member| !ids.iter().any(|id| member["value"] == id.as_str()));
            }
            GroupEdit::RemoveAllMembers => members.clear(),
            GroupEdit::Set(path, value) => set_attribute(&mut group, Kind::Group, &path, value)?,
            GroupEdit::Unset(path) => remove_attribute(&mut group, Kind::Group, &path),
        }
    }
    set_members(&mut group, members);
    Ok(group)
}

async fn patch_group(
    State(state): State<ScimState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    ScimBody(patch): ScimBody,
) -> Result<Response, ScimError> {
    state.group_counters.patch_requests.fetch_add(1, Ordering::Relaxed);
    check_patch_supported(&state)?;
    let edits = parse_group_patch(&patch)?;
    count_membership_changes(&state, edits.iter().map(GroupEdit::membership_changes).sum())?;
    let mut directory = state.directory.lock().expect("directory lock");
    let group = existing(&state, &directory, Kind::Group, &id, &headers)?
        .resource
        .clone();
    let group = apply_group_edits(&state, &directory, group, edits)?;
    store_replacement(&state, &mut directory, Kind::Group, id, group)
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

    #[test]
    fn member_paths_name_one_member_by_its_json_string_id() {
        assert!(matches!(parse_group_path("members"), Ok(GroupPath::Members)));
        assert!(matches!(parse_group_path("Members"), Ok(GroupPath::Members)));
        match parse_group_path(r#"members[value eq "a\"]b"]"#) {
            Ok(GroupPath::Member(id)) => assert_eq!(id, "a\"]b"),
            _ => panic!("a member filter"),
        }
        assert!(matches!(
            parse_group_path("urn:ietf:params:scim:schemas:core:2.0:Group:displayName"),
            Ok(GroupPath::Attribute(name)) if name == "displayName"
        ));
        assert!(parse_group_path(r#"members[display eq "x"]"#).is_err());
        assert!(parse_group_path(r#"emails[value eq "x"]"#).is_err());
    }

    #[test]
    fn membership_changes_count_every_member_an_operation_touches() {
        let patch = json!({"Operations": [
            {"op": "Add", "path": "members", "value": [{"value": "a"}, {"value": "b"}]},
            {"op": "Remove", "path": "members[value eq \"c\"]"},
            {"op": "remove", "path": "members", "value": [{"value": "d"}]},
            {"op": "replace", "value": {"displayName": "x", "members": [{"value": "e"}]}},
        ]});
        let edits = parse_group_patch(&patch).unwrap();
        assert_eq!(edits.iter().map(GroupEdit::membership_changes).sum::<usize>(), 5);
    }

    #[test]
    fn projection_keeps_or_drops_attributes_ignoring_case() {
        let group = json!({"schemas": [GROUP_SCHEMA], "id": "1", "displayName": "x",
                           "members": [{"value": "u", "display": "U"}], "meta": {"version": "W/\"1\""}});
        let without_members = Projection::new(None, Some("Members")).apply(Kind::Group, group.clone());
        assert_eq!(without_members.get("members"), None);
        assert_eq!(without_members["displayName"], "x");
        let only_names = Projection::new(Some("displayname,members.value"), None).apply(Kind::Group, group);
        assert_eq!(
            only_names,
            json!({"schemas": [GROUP_SCHEMA], "id": "1", "displayName": "x", "members": [{"value": "u"}]})
        );
        // Paths are client input: multi-byte ones must not split a character.
        let long = "ü".repeat(40);
        assert_eq!(core_relative(Kind::Group, &long), long);
        assert!(Projection::new(Some(&long), Some(&long))
            .apply(Kind::Group, json!({"urn:x": {}}))
            .is_object());
    }

    #[test]
    fn patch_paths_reach_whole_extensions_their_attributes_and_sub_attributes() {
        let mut user =
            json!({"schemas": [USER_SCHEMA], "userName": "a", "name": {"givenName": "A", "familyName": "B"}});
        let department = format!("{ENTERPRISE_USER_SCHEMA}:department");
        set_attribute(
            &mut user,
            Kind::User,
            ENTERPRISE_USER_SCHEMA,
            json!({"schemas": [ENTERPRISE_USER_SCHEMA], "employeeNumber": "7"}),
        )
        .unwrap();
        set_attribute(&mut user, Kind::User, &department, json!("R&D")).unwrap();
        set_attribute(&mut user, Kind::User, &format!("{USER_SCHEMA}:USERNAME"), json!("b")).unwrap();
        assert_eq!(user["userName"], "b", "attribute names ignore case");
        assert_eq!(user.get("USERNAME"), None);
        assert_eq!(
            user[ENTERPRISE_USER_SCHEMA],
            json!({"employeeNumber": "7", "department": "R&D"})
        );
        assert_eq!(user["schemas"], json!([USER_SCHEMA, ENTERPRISE_USER_SCHEMA]));

        remove_attribute(&mut user, Kind::User, "name.givenName");
        assert_eq!(user["name"], json!({"familyName": "B"}));
        remove_attribute(&mut user, Kind::User, &department);
        assert_eq!(user[ENTERPRISE_USER_SCHEMA], json!({"employeeNumber": "7"}));
        remove_attribute(
            &mut user,
            Kind::User,
            &format!("{ENTERPRISE_USER_SCHEMA}:employeeNumber"),
        );
        assert_eq!(user.get(ENTERPRISE_USER_SCHEMA), None, "an empty extension goes");
        assert_eq!(user["schemas"], json!([USER_SCHEMA]));
    }

    #[test]
    fn discovery_paths_are_recognised_with_or_without_the_prefix() {
        assert!(is_discovery("/scim/v2/ServiceProviderConfig"));
        assert!(is_discovery("/Schemas/urn:ietf:params:scim:schemas:core:2.0:User"));
        assert!(is_discovery("/ResourceTypes"));
        assert!(!is_discovery("/Users/ServiceProviderConfig"));
        assert!(!is_discovery("/Groups"));
    }
}
