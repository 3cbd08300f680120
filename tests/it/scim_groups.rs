//! The SCIM connector's groups against a real SCIM server (scim2-server from PyPI):
//! create and adopt, members in batches, renames with hostile names, delete, and a
//! group that is gone. Some tests put a recording proxy in front of the server, to
//! count requests and to answer one with a refusal a real server could give.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use provisioner::connectors::scim::ScimConnector;
use provisioner::connectors::{Connector, ConnectorError};
use provisioner::domain::{GroupChange, GroupRef, MemberAction, MemberRef, MembersChange};
use provisioner::result::{ErrorKind, Operation, Outcome};
use serde_json::{json, Value};

use crate::scim::{scim_connector, user_event};
use crate::support::scim2_server::Scim2Server;

const GROUP_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:Group";

fn group_change<'a>(
    operation: Operation,
    group_id: &'a str,
    display_name: &'a str,
    remote_id: Option<&'a str>,
) -> GroupChange<'a> {
    GroupChange {
        operation,
        event_id: "e-group",
        tenant: "acme",
        group_id,
        display_name,
        remote_id,
    }
}

fn members_change<'a>(action: MemberAction, group: GroupRef<'a>, members: &'a [MemberRef]) -> MembersChange<'a> {
    MembersChange {
        action,
        tenant: "acme",
        group,
        members,
    }
}

/// Users on the target, created through the connector as events would create them.
async fn create_users(connector: &ScimConnector, prefix: &str, count: usize) -> Vec<MemberRef> {
    let mut members = Vec::with_capacity(count);
    for index in 0..count {
        let user_id = format!("{prefix}-{index}");
        let event = user_event("user.created", &user_id, json!({}));
        let applied = connector.apply(event.change(Operation::Create)).await.unwrap();
        assert_eq!(applied.outcome, Outcome::Created);
        members.push(MemberRef {
            user_id,
            remote_id: applied.remote_id.expect("a remote id"),
        });
    }
    members
}

fn ids(members: &[MemberRef]) -> BTreeSet<String> {
    members.iter().map(|member| member.remote_id.clone()).collect()
}

/// The group as the server holds it, members included.
async fn read_group(base_url: &str, id: &str) -> Option<Value> {
    let response = reqwest::get(format!("{base_url}/Groups/{id}")).await.unwrap();
    if response.status() == reqwest::StatusCode::NOT_FOUND {
        return None;
    }
    assert!(response.status().is_success(), "{}", response.status());
    Some(response.json().await.unwrap())
}

fn member_ids(group: &Value) -> BTreeSet<String> {
    group["members"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|member| member["value"].as_str().expect("a member value").to_string())
        .collect()
}

async fn all_groups(base_url: &str) -> Vec<Value> {
    let list: Value = reqwest::get(format!("{base_url}/Groups"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    list["Resources"].as_array().cloned().unwrap_or_default()
}

/// Creates a group directly, as an admin or another system would have.
async fn create_group_directly(base_url: &str, group: Value) -> Value {
    let response = reqwest::Client::new()
        .post(format!("{base_url}/Groups"))
        .header("content-type", "application/scim+json")
        .json(&group)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 201);
    response.json().await.unwrap()
}

/// scim2-server with one of its built-in resources (`default-schemas.json`,
/// `default-service-provider-config.json`) changed by `change`, passed as `option`.
pub(crate) async fn scim2_server_with(option: &str, resource: &str, change: impl FnOnce(&mut Value)) -> Scim2Server {
    let mut document = Scim2Server::default_resource(resource);
    change(&mut document);
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join(resource);
    std::fs::write(&path, serde_json::to_vec(&document).unwrap()).unwrap();
    Scim2Server::start_with_args(&[OsStr::new(option), path.as_os_str()]).await
}

/// scim2-server with `displayName` unique (`uniqueness: server`) in its Group schema, as
/// Entra-facing apps and AWS have it.
pub(crate) async fn scim2_server_with_unique_group_names() -> Scim2Server {
    scim2_server_with("--schema", "default-schemas.json", |schemas| {
        let group = schemas
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|schema| schema["id"] == GROUP_SCHEMA)
            .expect("the Group schema");
        let display_name = group["attributes"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|attribute| attribute["name"] == "displayName")
            .expect("displayName");
        display_name["uniqueness"] = json!("server");
    })
    .await
}

// --- a recording proxy ------------------------------------------------------------

/// Forwards every request to the server and records it; a scripted answer replaces
/// the next request of its method instead.
struct RecordingProxy {
    base_url: String,
    state: Arc<ProxyState>,
    task: tokio::task::JoinHandle<()>,
}

struct ProxyState {
    upstream: String,
    http: reqwest::Client,
    /// Method, path and query of every request.
    seen: Mutex<Vec<(Method, String, String)>>,
    scripted: Mutex<Vec<(Method, StatusCode, Value)>>,
}

impl Drop for RecordingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RecordingProxy {
    async fn start(upstream: &str) -> RecordingProxy {
        let state = Arc::new(ProxyState {
            upstream: upstream.to_string(),
            http: reqwest::Client::new(),
            seen: Mutex::new(Vec::new()),
            scripted: Mutex::new(Vec::new()),
        });
        let app = axum::Router::new().fallback(forward).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base_url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        RecordingProxy { base_url, state, task }
    }

    /// Answers the next `method` request with a SCIM error of `status` and `scim_type`.
    fn refuse_next(&self, method: Method, status: u16, scim_type: Option<&str>) {
        let mut error = json!({
            "schemas": ["urn:ietf:params:scim:api:messages:2.0:Error"],
            "status": status.to_string(),
            "detail": "scripted by the test",
        });
        if let Some(scim_type) = scim_type {
            error["scimType"] = json!(scim_type);
        }
        let status = StatusCode::from_u16(status).unwrap();
        self.state.scripted.lock().unwrap().push((method, status, error));
    }

    /// How many `method` requests for `path` were seen, scripted answers included.
    fn count(&self, method: Method, path: &str) -> usize {
        let seen = self.state.seen.lock().unwrap();
        seen.iter()
            .filter(|(seen_method, seen_path, _)| *seen_method == method && seen_path == path)
            .count()
    }

    /// The decoded queries of the `method` requests for `path`.
    fn queries(&self, method: Method, path: &str) -> Vec<String> {
        let seen = self.state.seen.lock().unwrap();
        seen.iter()
            .filter(|(seen_method, seen_path, _)| *seen_method == method && seen_path == path)
            .map(|(_, _, query)| {
                url::form_urlencoded::parse(query.as_bytes())
                    .map(|(name, value)| format!("{name}={value}"))
                    .collect::<Vec<_>>()
                    .join("&")
            })
            .collect()
    }
}

async fn forward(
    State(state): State<Arc<ProxyState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let query = uri.query().unwrap_or_default().to_string();
    state
        .seen
        .lock()
        .unwrap()
        .push((method.clone(), uri.path().to_string(), query));
    let scripted = {
        let mut scripted = state.scripted.lock().unwrap();
        let position = scripted
            .iter()
            .position(|(scripted_method, ..)| *scripted_method == method);
        position.map(|position| scripted.remove(position))
    };
    if let Some((_, status, error)) = scripted {
        return (
            status,
            [(header::CONTENT_TYPE, "application/scim+json")],
            error.to_string(),
        )
            .into_response();
    }
    let path_and_query = uri.path_and_query().map(|value| value.as_str()).unwrap_or("/");
    let mut request = state
        .http
        .request(method, format!("{}{path_and_query}", state.upstream))
        .body(body);
    for name in [header::CONTENT_TYPE, header::ACCEPT, header::IF_MATCH] {
        if let Some(value) = headers.get(&name) {
            request = request.header(name, value);
        }
    }
    let response = request.send().await.unwrap();
    let mut answer = Response::builder().status(response.status());
    for name in [header::CONTENT_TYPE, header::ETAG] {
        if let Some(value) = response.headers().get(&name) {
            answer = answer.header(name, value);
        }
    }
    answer
        .body(axum::body::Body::from(response.bytes().await.unwrap()))
        .unwrap()
}

// --- the tests --------------------------------------------------------------------

#[tokio::test]
async fn a_group_is_created_filled_renamed_and_deleted_on_a_real_scim_server() {
    let server = Scim2Server::start().await;
    let base_url = server.base_url.as_str();
    let proxy = RecordingProxy::start(base_url).await;
    let connector = scim_connector(json!({"base_url": proxy.base_url}));
    assert_eq!(connector.max_members_per_request(), 100, "the default");
    let members = create_users(&connector, "u-eng", 250).await;

    let created = connector
        .apply_group(group_change(Operation::Create, "g-eng", "Engineering", None))
        .await
        .unwrap();
    assert_eq!(created.outcome, Outcome::Created);
    let remote_id = created.remote_id.clone().expect("a remote id");
    let remote = read_group(base_url, &remote_id).await.expect("created on the server");
    assert_eq!(remote["schemas"], json!([GROUP_SCHEMA]));
    assert_eq!(remote["displayName"], "Engineering");
    assert_eq!(remote["externalId"], "g-eng");
    assert!(member_ids(&remote).is_empty(), "created without members: {remote}");

    // scim2-server does not make displayName unique (RFC 7643 does not ask it to) and
    // would take a second POST as a second group: the create finds ours first.
    let again = connector
        .apply_group(group_change(Operation::Create, "g-eng", "Engineering", None))
        .await
        .unwrap();
    assert_eq!(again.outcome, Outcome::Adopted);
    assert_eq!(again.remote_id, created.remote_id);
    assert_eq!(all_groups(base_url).await.len(), 1, "no duplicate group");

    let group = GroupRef {
        group_id: "g-eng",
        display_name: "Engineering",
        remote_id: &remote_id,
    };
    let batches = members.chunks(connector.max_members_per_request());
    assert_eq!(batches.len(), 3);
    for batch in batches {
        connector
            .apply_members(members_change(MemberAction::Add, group, batch))
            .await
            .unwrap();
    }
    let remote = read_group(base_url, &remote_id).await.unwrap();
    assert_eq!(member_ids(&remote), ids(&members), "all 250 members");

    // A replay, all at once: the connector batches it itself, and nothing doubles.
    connector
        .apply_members(members_change(MemberAction::Add, group, &members))
        .await
        .unwrap();
    let remote = read_group(base_url, &remote_id).await.unwrap();
    assert_eq!(remote["members"].as_array().unwrap().len(), 250, "no member twice");

    // Every fifth member, and a user who never was a member.
    let outsider = create_users(&connector, "u-outsider", 1).await;
    let removed: Vec<MemberRef> = members.iter().step_by(5).cloned().chain(outsider).collect();
    let kept: Vec<MemberRef> = members
        .iter()
        .enumerate()
        .filter(|(index, _)| index % 5 != 0)
        .map(|(_, member)| member.clone())
        .collect();
    for _ in 0..2 {
        // The second pass removes members who are already gone: success.
        connector
            .apply_members(members_change(MemberAction::Remove, group, &removed))
            .await
            .unwrap();
        let remote = read_group(base_url, &remote_id).await.unwrap();
        assert_eq!(member_ids(&remote), ids(&kept), "200 left");
    }

    let hostile = r#"Ops "on call" \ night] [shift] — 東京 ü"#;
    let renamed = connector
        .apply_group(group_change(Operation::Update, "g-eng", hostile, Some(&remote_id)))
        .await
        .unwrap();
    assert_eq!(renamed.outcome, Outcome::Updated);
    assert_eq!(renamed.remote_id.as_deref(), Some(remote_id.as_str()));
    let remote = read_group(base_url, &remote_id).await.unwrap();
    assert_eq!(remote["displayName"], hostile);
    assert_eq!(member_ids(&remote), ids(&kept), "a rename keeps the members");

    // Another source group of that name finds ours by the hostile name, exactly, and
    // must not take it over.
    let error = connector
        .apply_group(group_change(Operation::Update, "g-other", hostile, None))
        .await
        .unwrap_err();
    assert!(matches!(error, ConnectorError::Conflict { .. }), "{error:?}");
    assert_eq!(error.kind(), ErrorKind::Conflict);
    assert!(!error.is_retryable());
    let not_ours = connector
        .apply_group(group_change(Operation::Delete, "g-other", hostile, None))
        .await
        .unwrap();
    assert_eq!(
        not_ours.outcome,
        Outcome::AlreadyAbsent,
        "someone else's group is not deleted"
    );
    assert!(read_group(base_url, &remote_id).await.is_some());

    // Unescaped, this name would turn the lookup into `displayName pr` and find ours.
    let widening = r#"x" or displayName pr or displayName eq "y"#;
    let separate = connector
        .apply_group(group_change(Operation::Update, "g-widening", widening, None))
        .await
        .unwrap();
    assert_eq!(
        separate.outcome,
        Outcome::Created,
        "an update of an unknown group creates it"
    );
    assert_ne!(separate.remote_id.as_deref(), Some(remote_id.as_str()));
    let separate_remote = read_group(base_url, separate.remote_id.as_deref().unwrap())
        .await
        .unwrap();
    assert_eq!(separate_remote["displayName"], widening);
    // The server took every lookup's filter, hostile names included: none fell back to
    // scanning the listing (which would hide a broken filter behind the exact match).
    let lookups = proxy.queries(Method::GET, "/Groups");
    assert!(
        lookups
            .iter()
            .any(|query| query.contains(&format!("filter=displayName eq {}", json!(widening)))),
        "{lookups:#?}"
    );
    for query in &lookups {
        assert!(
            query.starts_with("filter=") && query.ends_with("&excludedAttributes=members"),
            "{query}"
        );
    }

    let deleted = connector
        .apply_group(group_change(Operation::Delete, "g-eng", hostile, Some(&remote_id)))
        .await
        .unwrap();
    assert_eq!(deleted.outcome, Outcome::Deleted);
    assert_eq!(deleted.remote_id.as_deref(), Some(remote_id.as_str()));
    assert!(read_group(base_url, &remote_id).await.is_none());
    for known in [Some(remote_id.as_str()), None] {
        let again = connector
            .apply_group(group_change(Operation::Delete, "g-eng", hostile, known))
            .await
            .unwrap();
        assert_eq!(again.outcome, Outcome::AlreadyAbsent, "known id: {known:?}");
    }

    for action in [MemberAction::Add, MemberAction::Remove] {
        let error = connector
            .apply_members(members_change(action, group, &members[..2]))
            .await
            .unwrap_err();
        assert!(matches!(error, ConnectorError::GroupGone { .. }), "{error:?}");
        assert_eq!(error.kind(), ErrorKind::Dependency);
        assert!(!error.is_retryable());
    }
}

#[tokio::test]
async fn an_update_by_a_stale_id_searches_and_an_unknown_group_is_created() {
    let server = Scim2Server::start().await;
    let connector = scim_connector(json!({"base_url": server.base_url}));
    let created = connector
        .apply_group(group_change(Operation::Update, "g-new", "New", Some("no-such-id")))
        .await
        .unwrap();
    assert_eq!(created.outcome, Outcome::Created);
    let remote_id = created.remote_id.unwrap();

    let renamed = connector
        .apply_group(group_change(Operation::Update, "g-new", "Newer", Some("no-such-id")))
        .await
        .unwrap();
    assert_eq!(renamed.outcome, Outcome::Updated);
    assert_eq!(
        renamed.remote_id.as_deref(),
        Some(remote_id.as_str()),
        "found by externalId"
    );
    let remote = read_group(&server.base_url, &remote_id).await.unwrap();
    assert_eq!(remote["displayName"], "Newer");
    assert_eq!(all_groups(&server.base_url).await.len(), 1);

    let deleted = connector
        .apply_group(group_change(Operation::Delete, "g-new", "Newer", Some("no-such-id")))
        .await
        .unwrap();
    assert_eq!(deleted.outcome, Outcome::Deleted, "found by externalId");
    assert_eq!(deleted.remote_id.as_deref(), Some(remote_id.as_str()));
}

/// With `displayName` unique (`uniqueness: server` in the Group schema), a create of a
/// name that is taken gets a 409, and the group holding it is adopted if it is nobody's.
#[tokio::test]
async fn where_names_are_unique_a_409_adopts_an_unowned_group_but_not_someone_elses() {
    let server = scim2_server_with_unique_group_names().await;
    let base_url = server.base_url.as_str();
    let connector = scim_connector(json!({"base_url": base_url}));
    let unowned = create_group_directly(
        base_url,
        json!({"schemas": [GROUP_SCHEMA], "displayName": "sales", "members": [{"value": "someone"}]}),
    )
    .await;
    let adopted = connector
        .apply_group(group_change(Operation::Create, "g-sales", "Sales", None))
        .await
        .unwrap();
    assert_eq!(adopted.outcome, Outcome::Adopted);
    assert_eq!(adopted.remote_id.as_deref(), unowned["id"].as_str());
    let remote = read_group(base_url, unowned["id"].as_str().unwrap()).await.unwrap();
    assert_eq!(remote["externalId"], "g-sales", "now ours");
    assert_eq!(
        remote["displayName"], "Sales",
        "the name converged (names compare without case)"
    );
    assert_eq!(
        member_ids(&remote),
        BTreeSet::from(["someone".to_string()]),
        "members kept"
    );
    assert_eq!(all_groups(base_url).await.len(), 1);

    let foreign = create_group_directly(
        base_url,
        json!({"schemas": [GROUP_SCHEMA], "displayName": "Legal", "externalId": "other-system-7"}),
    )
    .await;
    let error = connector
        .apply_group(group_change(Operation::Create, "g-legal", "Legal", None))
        .await
        .unwrap_err();
    assert!(matches!(error, ConnectorError::Conflict { .. }), "{error:?}");
    assert!(error.to_string().contains("other-system-7"), "{error}");
    let remote = read_group(base_url, foreign["id"].as_str().unwrap()).await.unwrap();
    assert_eq!(remote["externalId"], "other-system-7", "left alone");

    // Renaming ours onto the taken name is a conflict too, not a bad request.
    let error = connector
        .apply_group(group_change(
            Operation::Update,
            "g-sales",
            "Legal",
            adopted.remote_id.as_deref(),
        ))
        .await
        .unwrap_err();
    assert!(
        matches!(error, ConnectorError::Conflict { status: Some(409), .. }),
        "{error:?}"
    );
}

#[tokio::test]
async fn membership_batches_are_capped_and_a_batch_refused_as_partly_done_goes_member_by_member() {
    let server = Scim2Server::start().await;
    let proxy = RecordingProxy::start(&server.base_url).await;
    let connector = scim_connector(json!({"base_url": proxy.base_url, "max_members_per_request": 10}));
    assert_eq!(connector.max_members_per_request(), 10);
    let members = create_users(&connector, "u-batch", 25).await;
    let created = connector
        .apply_group(group_change(Operation::Create, "g-batch", "Batch", None))
        .await
        .unwrap();
    let remote_id = created.remote_id.unwrap();
    let group_path = format!("/Groups/{remote_id}");
    let group = GroupRef {
        group_id: "g-batch",
        display_name: "Batch",
        remote_id: &remote_id,
    };

    // More than the limit in one call: batches of 10, 10 and 5.
    connector
        .apply_members(members_change(MemberAction::Add, group, &members))
        .await
        .unwrap();
    assert_eq!(proxy.count(Method::PATCH, &group_path), 3);
    let remote = read_group(&server.base_url, &remote_id).await.unwrap();
    assert_eq!(member_ids(&remote), ids(&members));

    // A server that answers `noTarget` for a batch removing someone already gone: the
    // batch is sent again member by member.
    proxy.refuse_next(Method::PATCH, 400, Some("noTarget"));
    connector
        .apply_members(members_change(MemberAction::Remove, group, &members[..5]))
        .await
        .unwrap();
    assert_eq!(proxy.count(Method::PATCH, &group_path), 3 + 1 + 5);
    let remote = read_group(&server.base_url, &remote_id).await.unwrap();
    assert_eq!(member_ids(&remote), ids(&members[5..]));

    // Likewise a server that refuses a batch adding someone already there.
    proxy.refuse_next(Method::PATCH, 409, Some("uniqueness"));
    connector
        .apply_members(members_change(MemberAction::Add, group, &members[..3]))
        .await
        .unwrap();
    assert_eq!(proxy.count(Method::PATCH, &group_path), 9 + 1 + 3);
    let remote = read_group(&server.base_url, &remote_id).await.unwrap();
    assert_eq!(
        member_ids(&remote),
        ids(&members[..3]).union(&ids(&members[5..])).cloned().collect()
    );

    // Any other refusal fails the batch.
    proxy.refuse_next(Method::PATCH, 400, Some("invalidValue"));
    let error = connector
        .apply_members(members_change(MemberAction::Add, group, &members[3..5]))
        .await
        .unwrap_err();
    assert!(
        matches!(error, ConnectorError::Rejected { status: 400, .. }),
        "{error:?}"
    );
}

/// A server that does not advertise PATCH (scim2-server told so refuses it with 501):
/// members are read, changed and PUT back with `If-Match`, keeping everyone else.
#[tokio::test]
async fn without_patch_members_and_renames_read_and_put_back_the_group() {
    let server = scim2_server_with(
        "--service-provider-config",
        "default-service-provider-config.json",
        |config| config["patch"]["supported"] = json!(false),
    )
    .await;
    let proxy = RecordingProxy::start(&server.base_url).await;
    let connector = scim_connector(json!({"base_url": proxy.base_url, "max_members_per_request": 7}));
    let members = create_users(&connector, "u-put", 30).await;
    let existing = create_group_directly(
        &server.base_url,
        json!({"schemas": [GROUP_SCHEMA], "displayName": "Platform", "externalId": "g-put",
               "members": [{"value": "kept-1", "display": "Someone else"}]}),
    )
    .await;
    let adopted = connector
        .apply_group(group_change(Operation::Create, "g-put", "Platform", None))
        .await
        .unwrap();
    assert_eq!(adopted.outcome, Outcome::Adopted, "found by externalId");
    let remote_id = adopted.remote_id.unwrap();
    assert_eq!(Some(remote_id.as_str()), existing["id"].as_str());
    let group_path = format!("/Groups/{remote_id}");
    let group = GroupRef {
        group_id: "g-put",
        display_name: "Platform",
        remote_id: &remote_id,
    };
    let someone_else = BTreeSet::from(["kept-1".to_string()]);

    // One read and one write for the whole change: a PUT carries every member anyway.
    connector
        .apply_members(members_change(MemberAction::Add, group, &members))
        .await
        .unwrap();
    assert_eq!(proxy.count(Method::PUT, &group_path), 1);
    assert_eq!(proxy.count(Method::PATCH, &group_path), 0);
    let remote = read_group(&server.base_url, &remote_id).await.unwrap();
    assert_eq!(
        member_ids(&remote),
        ids(&members).union(&someone_else).cloned().collect()
    );
    let version = remote["meta"]["version"].clone();

    // Nothing to change: no write at all.
    connector
        .apply_members(members_change(MemberAction::Add, group, &members[..10]))
        .await
        .unwrap();
    assert_eq!(proxy.count(Method::PUT, &group_path), 1);
    let remote = read_group(&server.base_url, &remote_id).await.unwrap();
    assert_eq!(remote["meta"]["version"], version);

    // A stale ETag (someone wrote in between) is read again once.
    proxy.refuse_next(Method::PUT, 412, None);
    connector
        .apply_members(members_change(MemberAction::Remove, group, &members[..10]))
        .await
        .unwrap();
    assert_eq!(proxy.count(Method::PUT, &group_path), 3);
    let remote = read_group(&server.base_url, &remote_id).await.unwrap();
    assert_eq!(
        member_ids(&remote),
        ids(&members[10..]).union(&someone_else).cloned().collect()
    );
    assert_eq!(
        remote["members"][0]["display"], "Someone else",
        "untouched members kept as they were"
    );

    // Twice stale: someone keeps writing it; retried later rather than failed for good.
    proxy.refuse_next(Method::PUT, 412, None);
    proxy.refuse_next(Method::PUT, 412, None);
    let error = connector
        .apply_members(members_change(MemberAction::Remove, group, &members[10..12]))
        .await
        .unwrap_err();
    assert!(error.is_retryable(), "{error:?}");
    assert_eq!(error.http_status(), Some(412));

    let renamed = connector
        .apply_group(group_change(
            Operation::Update,
            "g-put",
            "Platform Team",
            Some(&remote_id),
        ))
        .await
        .unwrap();
    assert_eq!(renamed.outcome, Outcome::Updated);
    let remote = read_group(&server.base_url, &remote_id).await.unwrap();
    assert_eq!(remote["displayName"], "Platform Team");
    assert_eq!(
        member_ids(&remote),
        ids(&members[10..]).union(&someone_else).cloned().collect(),
        "a rename by PUT keeps the members"
    );

    let deleted = connector
        .apply_group(group_change(
            Operation::Delete,
            "g-put",
            "Platform Team",
            Some(&remote_id),
        ))
        .await
        .unwrap();
    assert_eq!(deleted.outcome, Outcome::Deleted);
    let error = connector
        .apply_members(members_change(MemberAction::Add, group, &members[..1]))
        .await
        .unwrap_err();
    assert!(matches!(error, ConnectorError::GroupGone { .. }), "{error:?}");
}
