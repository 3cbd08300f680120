//! The SCIM emulator as a SCIM 2.0 server (RFC 7643, RFC 7644), over HTTP: Groups and
//! their members, discovery, and the `application/scim+json` media type. Other tests trust
//! it to behave like a real server, so these hold it to that.

use std::path::PathBuf;
use std::time::Duration;

use provisioner::devtools::emulators::scim::{self as scim_emulator, ScimEmulator, ScimEmulatorSettings};
use provisioner::devtools::emulators::Faults;
use reqwest::Method;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

const GROUP_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:Group";
const USER_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:User";
const ENTERPRISE_USER_SCHEMA: &str = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User";
const PATCH_OP: &str = "urn:ietf:params:scim:api:messages:2.0:PatchOp";
const ERROR_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:Error";

/// A plain HTTP client for the emulator, with its bearer token if it needs one.
#[derive(Clone)]
struct Client {
    base_url: String,
    token: Option<String>,
    http: reqwest::Client,
}

/// One answer: status, media type, ETag and body (`Null` when there is none).
#[derive(Debug)]
struct Answer {
    status: u16,
    content_type: Option<String>,
    etag: Option<String>,
    body: Value,
}

impl Answer {
    fn scim_type(&self) -> Option<&str> {
        self.body["scimType"].as_str()
    }

    fn id(&self) -> String {
        self.body["id"].as_str().expect("a resource id").to_string()
    }

    fn member_ids(&self) -> Vec<String> {
        self.body["members"]
            .as_array()
            .map(|members| {
                members
                    .iter()
                    .map(|member| member["value"].as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }
}

async fn start(settings: ScimEmulatorSettings) -> (ScimEmulator, Client, CancellationToken) {
    let token = settings.bearer_token.clone();
    let shutdown = CancellationToken::new();
    let emulator = scim_emulator::start("127.0.0.1:0".parse().unwrap(), settings, shutdown.clone())
        .await
        .expect("emulator starts");
    let client = Client {
        base_url: emulator.base_url(),
        token,
        http: reqwest::Client::new(),
    };
    (emulator, client, shutdown)
}

impl Client {
    /// The same client without a token.
    fn anonymous(&self) -> Client {
        Client {
            token: None,
            ..self.clone()
        }
    }

    async fn send(&self, method: Method, path: &str, body: Option<Value>) -> Answer {
        self.send_with(method, path, body, &[]).await
    }

    async fn send_with(&self, method: Method, path: &str, body: Option<Value>, headers: &[(&str, &str)]) -> Answer {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base_url))
            .header("accept", "application/scim+json");
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(body) = body {
            request = request
                .header("content-type", "application/scim+json")
                .body(body.to_string());
        }
        let response = request.send().await.expect("the emulator answers");
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .map(|value| value.to_str().unwrap().to_string())
        };
        let (status, content_type, etag) = (response.status().as_u16(), header("content-type"), header("etag"));
        let text = response.text().await.unwrap();
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("a JSON body, not {text:?}"))
        };
        Answer {
            status,
            content_type,
            etag,
            body,
        }
    }

    async fn get(&self, path: &str) -> Answer {
        self.send(Method::GET, path, None).await
    }

    async fn create_user(&self, user_name: &str) -> String {
        let answer = self
            .send(
                Method::POST,
                "/Users",
                Some(json!({"schemas": [USER_SCHEMA], "userName": user_name})),
            )
            .await;
        assert_eq!(answer.status, 201, "{answer:?}");
        answer.id()
    }

    async fn create_group(&self, group: Value) -> Answer {
        self.send(Method::POST, "/Groups", Some(group)).await
    }

    async fn patch_group(&self, id: &str, operations: Value) -> Answer {
        self.send(
            Method::PATCH,
            &format!("/Groups/{id}"),
            Some(json!({"schemas": [PATCH_OP], "Operations": operations})),
        )
        .await
    }

    /// Groups whose `displayName` equals `name`, asked with a properly escaped filter.
    async fn groups_named(&self, name: &str) -> Answer {
        let filter = format!("displayName eq {}", serde_json::to_string(name).unwrap());
        self.get(&format!("/Groups?filter={}", encode(&filter))).await
    }
}

fn encode(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

fn members(ids: &[&str]) -> Value {
    Value::Array(ids.iter().map(|id| json!({"value": id})).collect())
}

fn group(display_name: &str, member_ids: &[&str]) -> Value {
    json!({"schemas": [GROUP_SCHEMA], "displayName": display_name, "members": members(member_ids)})
}

#[tokio::test]
async fn a_group_is_created_read_back_and_unique_by_name_ignoring_case() {
    let (emulator, scim, _shutdown) = start(ScimEmulatorSettings::default()).await;
    let alice = scim.create_user("alice").await;
    let bob = scim.create_user("bob").await;

    let created = scim
        .create_group(
            json!({"schemas": [GROUP_SCHEMA], "displayName": "Engineering", "externalId": "g-eng",
                             "members": [{"value": alice}, {"value": bob, "display": "Bobby"}, {"value": alice}]}),
        )
        .await;
    assert_eq!(created.status, 201, "{created:?}");
    let id = created.id();
    assert_eq!(created.body["meta"]["resourceType"], "Group");
    assert_eq!(
        created.body["meta"]["location"],
        format!("{}/Groups/{id}", emulator.base_url())
    );
    assert_eq!(created.etag.as_deref(), created.body["meta"]["version"].as_str());
    assert_eq!(
        created.member_ids(),
        [alice.as_str(), bob.as_str()],
        "a repeated member counts once"
    );
    assert_eq!(
        created.body["members"][0]["$ref"],
        format!("{}/Users/{alice}", emulator.base_url())
    );
    assert_eq!(created.body["members"][0]["type"], "User");
    assert_eq!(
        created.body["members"][0].get("display"),
        None,
        "display is kept as sent, not made up"
    );
    assert_eq!(created.body["members"][1]["display"], "Bobby");

    let read = scim.get(&format!("/Groups/{id}")).await;
    assert_eq!(read.status, 200);
    assert_eq!(read.body, created.body);
    // The user side shows the membership as its read-only `groups`.
    let alice_read = scim.get(&format!("/Users/{alice}")).await;
    assert_eq!(
        alice_read.body["groups"],
        json!([{"value": id, "$ref": format!("{}/Groups/{id}", emulator.base_url()), "display": "Engineering", "type": "direct"}])
    );

    let same_name = scim.create_group(group("ENGINEERING", &[])).await;
    assert_eq!(
        (same_name.status, same_name.scim_type()),
        (409, Some("uniqueness")),
        "{same_name:?}"
    );
    let same_external_id = scim
        .create_group(json!({"displayName": "Other", "externalId": "g-eng"}))
        .await;
    assert_eq!(
        (same_external_id.status, same_external_id.scim_type()),
        (409, Some("uniqueness"))
    );
    let unnamed = scim
        .create_group(json!({"schemas": [GROUP_SCHEMA], "members": []}))
        .await;
    assert_eq!((unnamed.status, unnamed.scim_type()), (400, Some("invalidValue")));

    assert_eq!(emulator.group_count(), 1);
    assert_eq!(
        emulator.group_by_display_name("engineering").unwrap()["id"],
        id.as_str()
    );
    assert_eq!(emulator.group_member_ids(&id).unwrap(), [alice, bob]);
    assert_eq!(scim.get("/Groups/nope").await.status, 404);
}

#[tokio::test]
async fn filters_find_groups_with_hostile_names_exactly_and_lists_page() {
    let (_emulator, scim, _shutdown) = start(ScimEmulatorSettings::default()).await;
    let hostile = [
        r#"quote " inside"#,
        r#"back\slash"#,
        r#"x" or displayName pr or displayName eq "y"#,
        r#"\"escaped\" and \\ doubled"#,
    ];
    for (index, name) in hostile.iter().enumerate() {
        let created = scim
            .create_group(json!({"displayName": name, "externalId": format!("ext \"{index}\"")}))
            .await;
        assert_eq!(created.status, 201, "{name}: {created:?}");
    }
    scim.create_group(group("victim", &[])).await;

    for name in hostile {
        let found = scim.groups_named(name).await;
        assert_eq!(found.status, 200, "{found:?}");
        assert_eq!(found.body["totalResults"], 1, "{name}: {found:?}");
        assert_eq!(found.body["Resources"][0]["displayName"], name);
    }
    // Case-insensitive, as displayName is (RFC 7643 §4.2: caseExact false).
    assert_eq!(scim.groups_named("VICTIM").await.body["totalResults"], 1);
    assert_eq!(scim.groups_named("nobody").await.body["totalResults"], 0);
    // An unescaped hostile name is not a filter this server guesses at.
    let unescaped = scim
        .get(&format!(
            "/Groups?filter={}",
            encode(&format!("displayName eq \"{}\"", hostile[2]))
        ))
        .await;
    assert_eq!((unescaped.status, unescaped.scim_type()), (400, Some("invalidFilter")));

    let by_external_id = scim
        .get(&format!("/Groups?filter={}", encode(r#"externalId eq "ext \"3\"""#)))
        .await;
    assert_eq!(by_external_id.body["Resources"][0]["displayName"], hostile[3]);

    let all = scim.get("/Groups").await;
    assert_eq!(all.body["totalResults"], 5);
    let page = scim.get("/Groups?startIndex=2&count=2").await;
    assert_eq!(page.body["totalResults"], 5);
    assert_eq!(page.body["startIndex"], 2);
    assert_eq!(page.body["itemsPerPage"], 2);
    assert_eq!(
        page.body["Resources"][0], all.body["Resources"][1],
        "pages follow the list order"
    );
    assert_eq!(page.body["Resources"][1], all.body["Resources"][2]);
    let beyond = scim.get("/Groups?startIndex=9&count=2").await;
    assert_eq!(beyond.body["itemsPerPage"], 0);
}

#[tokio::test]
async fn attributes_and_excluded_attributes_shape_group_responses() {
    let (_emulator, scim, _shutdown) = start(ScimEmulatorSettings::default()).await;
    let alice = scim.create_user("alice").await;
    let id = scim.create_group(group("Ops", &[&alice])).await.id();

    let without_members = scim.get(&format!("/Groups/{id}?excludedAttributes=members")).await;
    assert_eq!(without_members.body.get("members"), None);
    assert_eq!(without_members.body["displayName"], "Ops");
    let listed = scim.get("/Groups?excludedAttributes=members").await;
    assert_eq!(listed.body["Resources"][0].get("members"), None);
    let only_name = scim.get("/Groups?attributes=displayName").await;
    assert_eq!(
        only_name.body["Resources"][0],
        json!({"schemas": [GROUP_SCHEMA], "id": id, "displayName": "Ops"})
    );
}

#[tokio::test]
async fn patch_adds_and_removes_members_idempotently() {
    let (emulator, scim, _shutdown) = start(ScimEmulatorSettings::default()).await;
    let [alice, bob, carol] = [
        scim.create_user("alice").await,
        scim.create_user("bob").await,
        scim.create_user("carol").await,
    ];
    let id = scim.create_group(group("Team", &[])).await.id();
    scim.create_group(group("Taken", &[])).await;

    let added = scim
        .patch_group(
            &id,
            json!([{"op": "add", "path": "members", "value": members(&[&alice, &bob])}]),
        )
        .await;
    assert_eq!(added.status, 200, "{added:?}");
    assert_eq!(added.member_ids(), [alice.as_str(), bob.as_str()]);
    // Entra ID capitalises its ops; adding a member twice changes nothing.
    let again = scim
        .patch_group(
            &id,
            json!([{"op": "Add", "path": "members", "value": members(&[&alice])}]),
        )
        .await;
    assert_eq!(again.status, 200);
    assert_eq!(again.member_ids(), [alice.as_str(), bob.as_str()]);

    let filter_path = format!("members[value eq {}]", serde_json::to_string(&bob).unwrap());
    let removed = scim
        .patch_group(&id, json!([{"op": "Remove", "path": filter_path}]))
        .await;
    assert_eq!(removed.member_ids(), [alice.as_str()]);
    let removed_again = scim
        .patch_group(&id, json!([{"op": "remove", "path": filter_path}]))
        .await;
    assert_eq!(
        removed_again.status, 200,
        "removing an absent member is a no-op: {removed_again:?}"
    );
    assert_eq!(removed_again.member_ids(), [alice.as_str()]);

    // Entra ID and AWS remove with a value list on the `members` path.
    scim.patch_group(
        &id,
        json!([{"op": "add", "path": "members", "value": members(&[&bob, &carol])}]),
    )
    .await;
    let value_list_removal = scim
        .patch_group(
            &id,
            json!([{"op": "remove", "path": "members", "value": members(&[&alice, &carol, "never-a-member"])}]),
        )
        .await;
    assert_eq!(value_list_removal.status, 200, "{value_list_removal:?}");
    assert_eq!(value_list_removal.member_ids(), [bob.as_str()]);

    let renamed = scim
        .patch_group(
            &id,
            json!([{"op": "replace", "path": "displayName", "value": "Team Two"}]),
        )
        .await;
    assert_eq!(renamed.body["displayName"], "Team Two");
    let clash = scim
        .patch_group(&id, json!([{"op": "replace", "path": "displayName", "value": "TAKEN"}]))
        .await;
    assert_eq!((clash.status, clash.scim_type()), (409, Some("uniqueness")));
    let whole = scim
        .patch_group(
            &id,
            json!([{"op": "replace", "value": {"displayName": "Team Three", "externalId": "t3", "members": members(&[&carol])}}]),
        )
        .await;
    assert_eq!(whole.body["displayName"], "Team Three");
    assert_eq!(whole.body["externalId"], "t3");
    assert_eq!(whole.member_ids(), [carol.as_str()]);
    let no_target = scim.patch_group(&id, json!([{"op": "remove"}])).await;
    assert_eq!((no_target.status, no_target.scim_type()), (400, Some("noTarget")));

    assert_eq!(emulator.group_patch_requests(), 10);
    assert_eq!(emulator.group_member_ids(&id).unwrap(), [carol]);
}

#[tokio::test]
async fn dangling_and_null_member_ids_are_refused() {
    let (emulator, scim, _shutdown) = start(ScimEmulatorSettings::default()).await;
    let alice = scim.create_user("alice").await;
    let dangling = scim.create_group(group("Ghosts", &[&alice, "no-such-user"])).await;
    assert_eq!(
        (dangling.status, dangling.scim_type()),
        (400, Some("invalidValue")),
        "{dangling:?}"
    );
    assert_eq!(emulator.group_count(), 0, "nothing was created");

    let id = scim.create_group(group("Real", &[&alice])).await.id();
    let null_member = scim
        .patch_group(
            &id,
            json!([{"op": "add", "path": "members", "value": [{"value": null}]}]),
        )
        .await;
    assert_eq!(
        (null_member.status, null_member.scim_type()),
        (400, Some("invalidValue"))
    );
    let unknown_member = scim
        .patch_group(
            &id,
            json!([{"op": "add", "path": "members", "value": [{"value": "no-such-user"}]}]),
        )
        .await;
    assert_eq!(
        (unknown_member.status, unknown_member.scim_type()),
        (400, Some("invalidValue"))
    );
    // A group is no user: groups do not nest here.
    let nested = scim
        .patch_group(
            &id,
            json!([{"op": "add", "path": "members", "value": [{"value": id, "type": "Group"}]}]),
        )
        .await;
    assert_eq!(nested.status, 400);
    assert_eq!(
        emulator.group_member_ids(&id).unwrap(),
        [alice],
        "refused patches changed nothing"
    );
}

#[tokio::test]
async fn deleting_a_user_takes_it_out_of_every_group() {
    let (_emulator, scim, _shutdown) = start(ScimEmulatorSettings::default()).await;
    let alice = scim.create_user("alice").await;
    let bob = scim.create_user("bob").await;
    let first = scim.create_group(group("First", &[&alice, &bob])).await;
    let second = scim.create_group(group("Second", &[&alice])).await;

    let deleted = scim.send(Method::DELETE, &format!("/Users/{alice}"), None).await;
    assert_eq!(deleted.status, 204);
    let first_after = scim.get(&format!("/Groups/{}", first.id())).await;
    assert_eq!(first_after.member_ids(), [bob.as_str()]);
    assert_ne!(first_after.etag, first.etag, "the group's version moved on");
    let second_after = scim.get(&format!("/Groups/{}", second.id())).await;
    assert_eq!(
        second_after.body.get("members"),
        None,
        "an empty member list is left out"
    );
    assert_eq!(
        scim.get(&format!("/Users/{bob}")).await.body["groups"][0]["value"],
        first.id().as_str()
    );
}

#[tokio::test]
async fn membership_changes_past_the_limit_are_refused_per_request() {
    let (emulator, scim, _shutdown) = start(ScimEmulatorSettings {
        max_group_members_per_request: Some(100),
        ..ScimEmulatorSettings::default()
    })
    .await;
    let mut users = Vec::new();
    for index in 0..150 {
        users.push(scim.create_user(&format!("user-{index}")).await);
    }
    let ids: Vec<&str> = users.iter().map(String::as_str).collect();

    let too_many = scim.create_group(group("Big", &ids[..101])).await;
    assert_eq!(too_many.status, 400, "{too_many:?}");
    assert!(too_many.body["detail"].as_str().unwrap().contains("at most 100"));
    let id = scim.create_group(group("Big", &ids[..100])).await.id();
    // The limit counts every operation of one request together.
    let split_but_too_many = scim
        .patch_group(
            &id,
            json!([
                {"op": "add", "path": "members", "value": members(&ids[100..])},
                {"op": "remove", "path": "members", "value": members(&ids[..51])},
            ]),
        )
        .await;
    assert_eq!(split_but_too_many.status, 400);
    assert_eq!(emulator.group_member_ids(&id).unwrap().len(), 100);
    assert_eq!(
        emulator.largest_group_membership_change(),
        101,
        "refused requests are counted too"
    );

    // A client that chunks stays within the limit, whatever the total.
    let (chunking_emulator, chunking, _shutdown) = start(ScimEmulatorSettings {
        max_group_members_per_request: Some(100),
        ..ScimEmulatorSettings::default()
    })
    .await;
    let mut users = Vec::new();
    for index in 0..250 {
        users.push(chunking.create_user(&format!("user-{index}")).await);
    }
    let id = chunking.create_group(group("Everyone", &[])).await.id();
    for chunk in users.chunks(100) {
        let ids: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let answer = chunking
            .patch_group(&id, json!([{"op": "add", "path": "members", "value": members(&ids)}]))
            .await;
        assert_eq!(answer.status, 200);
    }
    assert_eq!(chunking_emulator.group_member_ids(&id).unwrap().len(), 250);
    assert_eq!(chunking_emulator.group_patch_requests(), 3);
    assert_eq!(chunking_emulator.largest_group_membership_change(), 100);
}

#[tokio::test]
async fn put_replaces_a_group_and_honours_if_match() {
    let (_emulator, scim, _shutdown) = start(ScimEmulatorSettings::default()).await;
    let alice = scim.create_user("alice").await;
    let bob = scim.create_user("bob").await;
    let created = scim.create_group(group("Before", &[&alice])).await;
    let id = created.id();

    let replaced = scim
        .send(Method::PUT, &format!("/Groups/{id}"), Some(group("After", &[&bob])))
        .await;
    assert_eq!(replaced.status, 200, "{replaced:?}");
    assert_eq!(replaced.body["displayName"], "After");
    assert_eq!(replaced.member_ids(), [bob.as_str()]);
    assert_eq!(replaced.body["meta"]["created"], created.body["meta"]["created"]);
    assert_ne!(replaced.etag, created.etag);
    assert_eq!(scim.get(&format!("/Users/{alice}")).await.body.get("groups"), None);

    let stale = scim
        .send_with(
            Method::PUT,
            &format!("/Groups/{id}"),
            Some(group("Stale", &[])),
            &[("if-match", created.etag.as_deref().unwrap())],
        )
        .await;
    assert_eq!(stale.status, 412);
    let current = scim
        .send_with(
            Method::PUT,
            &format!("/Groups/{id}"),
            Some(group("Current", &[])),
            &[("if-match", replaced.etag.as_deref().unwrap())],
        )
        .await;
    assert_eq!(current.status, 200);
    let dangling = scim
        .send(
            Method::PUT,
            &format!("/Groups/{id}"),
            Some(group("Current", &["nobody"])),
        )
        .await;
    assert_eq!((dangling.status, dangling.scim_type()), (400, Some("invalidValue")));
    let missing = scim.send(Method::PUT, "/Groups/nope", Some(group("X", &[]))).await;
    assert_eq!(missing.status, 404);
}

#[tokio::test]
async fn delete_removes_a_group_once() {
    let (emulator, scim, _shutdown) = start(ScimEmulatorSettings::default()).await;
    let alice = scim.create_user("alice").await;
    let id = scim.create_group(group("Doomed", &[&alice])).await.id();

    assert_eq!(
        scim.send(Method::DELETE, &format!("/Groups/{id}"), None).await.status,
        204
    );
    assert_eq!(scim.get(&format!("/Groups/{id}")).await.status, 404);
    let again = scim.send(Method::DELETE, &format!("/Groups/{id}"), None).await;
    assert_eq!(again.status, 404);
    assert_eq!(again.body["schemas"], json!([ERROR_SCHEMA]));
    assert_eq!(scim.get(&format!("/Users/{alice}")).await.body.get("groups"), None);
    assert_eq!(emulator.group_count(), 0);
    assert_eq!(emulator.user_count(), 1, "the member stays");
}

#[tokio::test]
async fn without_patch_a_group_is_read_modified_and_put() {
    let (emulator, scim, _shutdown) = start(ScimEmulatorSettings {
        patch: false,
        ..ScimEmulatorSettings::default()
    })
    .await;
    let config = scim.get("/ServiceProviderConfig").await;
    assert_eq!(config.body["patch"]["supported"], false);
    let alice = scim.create_user("alice").await;
    let bob = scim.create_user("bob").await;
    let id = scim.create_group(group("Readers", &[&alice])).await.id();

    let refused = scim
        .patch_group(
            &id,
            json!([{"op": "add", "path": "members", "value": members(&[&bob])}]),
        )
        .await;
    assert_eq!(refused.status, 501);
    assert_eq!(emulator.group_patch_requests(), 1);

    let mut current = scim.get(&format!("/Groups/{id}")).await.body;
    current["members"].as_array_mut().unwrap().push(json!({"value": bob}));
    let written = scim.send(Method::PUT, &format!("/Groups/{id}"), Some(current)).await;
    assert_eq!(written.status, 200, "{written:?}");
    assert_eq!(emulator.group_member_ids(&id).unwrap(), [alice, bob]);
}

/// Every attribute definition carries the RFC 7643 §7 characteristics.
fn assert_complete_definitions(attributes: &Value, schema: &str) {
    for attribute in attributes.as_array().expect("attributes") {
        for characteristic in [
            "name",
            "type",
            "multiValued",
            "required",
            "caseExact",
            "mutability",
            "returned",
            "uniqueness",
        ] {
            assert!(
                attribute.get(characteristic).is_some(),
                "{schema}: {} lacks {characteristic}",
                attribute["name"]
            );
        }
        if attribute["type"] == "complex" {
            assert_complete_definitions(&attribute["subAttributes"], schema);
        }
    }
}

fn attribute<'a>(schema: &'a Value, name: &str) -> &'a Value {
    schema["attributes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|attribute| attribute["name"] == name)
        .unwrap_or_else(|| panic!("{} has no {name}", schema["id"]))
}

#[tokio::test]
async fn discovery_describes_users_groups_and_the_enterprise_extension_without_a_token() {
    let (_emulator, scim, _shutdown) = start(ScimEmulatorSettings {
        bearer_token: Some("s3cret".into()),
        ..ScimEmulatorSettings::default()
    })
    .await;
    let anonymous = scim.anonymous();
    assert_eq!(
        anonymous.get("/Groups").await.status,
        401,
        "the resources need the token"
    );

    let schemas = anonymous.get("/Schemas").await;
    assert_eq!(schemas.status, 200, "discovery is open: {schemas:?}");
    assert_eq!(schemas.body["totalResults"], 3);
    let ids: Vec<&str> = schemas.body["Resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|schema| schema["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [USER_SCHEMA, ENTERPRISE_USER_SCHEMA, GROUP_SCHEMA]);
    for schema in schemas.body["Resources"].as_array().unwrap() {
        assert_eq!(
            schema["schemas"],
            json!(["urn:ietf:params:scim:schemas:core:2.0:Schema"])
        );
        assert_eq!(schema["meta"]["resourceType"], "Schema");
        assert_complete_definitions(&schema["attributes"], schema["id"].as_str().unwrap());
    }
    let user = &schemas.body["Resources"][0];
    assert_eq!(attribute(user, "userName")["required"], true);
    assert_eq!(attribute(user, "userName")["uniqueness"], "server");
    assert_eq!(attribute(user, "password")["returned"], "never");
    assert_eq!(attribute(user, "groups")["mutability"], "readOnly");
    assert_eq!(attribute(user, "emails")["multiValued"], true);

    let group = anonymous.get(&format!("/Schemas/{GROUP_SCHEMA}")).await;
    assert_eq!(group.status, 200);
    assert_eq!(group.body, schemas.body["Resources"][2]);
    assert_eq!(attribute(&group.body, "displayName")["required"], true);
    let members = attribute(&group.body, "members");
    assert_eq!(members["multiValued"], true);
    let sub_attributes: Vec<&str> = members["subAttributes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|sub| sub["name"].as_str().unwrap())
        .collect();
    assert_eq!(sub_attributes, ["value", "$ref", "display", "type"]);
    let unknown = anonymous.get("/Schemas/urn:example:nothing").await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.body["schemas"], json!([ERROR_SCHEMA]));

    let types = anonymous.get("/ResourceTypes").await;
    assert_eq!(types.status, 200);
    assert_eq!(types.body["totalResults"], 2);
    let user_type = &types.body["Resources"][0];
    assert_eq!(user_type["id"], "User");
    assert_eq!(user_type["endpoint"], "/Users");
    assert_eq!(user_type["schema"], USER_SCHEMA);
    assert_eq!(
        user_type["schemaExtensions"],
        json!([{"schema": ENTERPRISE_USER_SCHEMA, "required": false}])
    );
    let group_type = anonymous.get("/ResourceTypes/Group").await;
    assert_eq!(group_type.body["endpoint"], "/Groups");
    assert_eq!(group_type.body["schema"], GROUP_SCHEMA);
    assert_eq!(group_type.body["meta"]["resourceType"], "ResourceType");
    assert_eq!(anonymous.get("/ResourceTypes/Device").await.status, 404);
}

#[tokio::test]
async fn every_scim_answer_is_scim_json_errors_and_injected_faults_included() {
    let (emulator, scim, _shutdown) = start(ScimEmulatorSettings {
        bearer_token: Some("s3cret".into()),
        ..ScimEmulatorSettings::default()
    })
    .await;
    let alice = scim.create_user("alice").await;
    let created = scim.create_group(group("Media", &[&alice])).await;
    let id = created.id();
    let mut answers = vec![
        ("created group", created),
        ("duplicate group", scim.create_group(group("media", &[])).await),
        ("config", scim.get("/ServiceProviderConfig").await),
        ("schemas", scim.get("/Schemas").await),
        ("resource types", scim.get("/ResourceTypes").await),
        ("user list", scim.get("/Users").await),
        ("group", scim.get(&format!("/Groups/{id}")).await),
        (
            "patched group",
            scim.patch_group(
                &id,
                json!([{"op": "replace", "path": "displayName", "value": "Media 2"}]),
            )
            .await,
        ),
        ("unknown group", scim.get("/Groups/nope").await),
        ("unknown endpoint", scim.get("/Devices").await),
        ("wrong method", scim.send(Method::DELETE, "/Groups", None).await),
        (
            "bad filter",
            scim.get("/Groups?filter=displayName%20co%20%22x%22").await,
        ),
        ("bad paging", scim.get("/Groups?count=many").await),
    ];
    let unreadable = scim
        .http
        .post(format!("{}/Groups", emulator.base_url()))
        .bearer_auth("s3cret")
        .header("content-type", "application/scim+json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(unreadable.status(), 400);
    assert_eq!(unreadable.headers()["content-type"], "application/scim+json");
    let anonymous = scim.anonymous();
    answers.push(("no token", anonymous.get("/Groups").await));
    emulator.set_faults(Faults {
        rate_429: 1.0,
        retry_after_seconds: 1,
        ..Faults::default()
    });
    answers.push(("injected 429", anonymous.get("/ServiceProviderConfig").await));
    emulator.set_faults(Faults {
        rate_500: 1.0,
        ..Faults::default()
    });
    answers.push(("injected 500", anonymous.get("/ServiceProviderConfig").await));
    emulator.set_faults(Faults::default());

    for (what, answer) in &answers {
        assert_eq!(
            answer.content_type.as_deref(),
            Some("application/scim+json"),
            "{what}: {answer:?}"
        );
        if answer.status >= 400 {
            assert_eq!(answer.body["schemas"], json!([ERROR_SCHEMA]), "{what}: {answer:?}");
            assert_eq!(answer.body["status"], answer.status.to_string(), "{what}");
        }
    }
    let statuses: Vec<u16> = answers.iter().map(|(_, answer)| answer.status).collect();
    assert_eq!(
        statuses,
        [201, 409, 200, 200, 200, 200, 200, 200, 404, 404, 405, 400, 400, 401, 429, 500]
    );
    // A DELETE answers 204 with no body, hence no media type to speak of.
    let deleted = anonymous
        .send_with(
            Method::DELETE,
            &format!("/Groups/{id}"),
            None,
            &[("authorization", "Bearer s3cret")],
        )
        .await;
    assert_eq!((deleted.status, deleted.body.clone()), (204, Value::Null));
}

// --- scim2-tester ---------------------------------------------------------------------

/// Runs scim2-tester (PyPI, by the authors of scim2-server) against the SCIM base URL in
/// `argv[1]`: it reads the discovery endpoints, then creates, reads, queries, replaces,
/// patches and deletes every resource type they describe, filled with random values.
/// Prints each check's status, title and reason as JSON.
const SCIM2_TESTER: &str = r#"
import json, sys
from httpx2 import Client
from scim2_client.engines.httpx2 import SyncSCIMClient
from scim2_tester import check_server
results = check_server(SyncSCIMClient(Client(base_url=sys.argv[1], timeout=30)))
print(json.dumps([{"status": r.status.name, "title": r.title, "reason": r.reason,
                   "resource_type": getattr(r, "resource_type", None)} for r in results]))
"#;

fn has_scim2_tester(python: &PathBuf) -> bool {
    std::process::Command::new(python)
        .args(["-c", "import scim2_tester, httpx2"])
        .output()
        .is_ok_and(|output| output.status.success())
}

/// A Python with scim2-tester: `PROVISIONER_PYTHON` (scripts/test exports it), the Python
/// next to `SCIM2_SERVER_BIN`, or any venv scripts/test cached under `PROVISIONER_CACHE`.
fn scim2_tester_python() -> PathBuf {
    let cache = std::env::var_os("PROVISIONER_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/provisioner"));
    let given = std::env::var_os("PROVISIONER_PYTHON").map(PathBuf::from);
    let beside_scim2_server = std::env::var_os("SCIM2_SERVER_BIN")
        .map(PathBuf::from)
        .and_then(|binary| binary.parent().map(|bin| bin.join("python")));
    let cached = std::fs::read_dir(&cache)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok().map(|entry| entry.path().join("bin/python")));
    given
        .into_iter()
        .chain(beside_scim2_server)
        .chain(cached)
        .find(has_scim2_tester)
        .unwrap_or_else(|| {
            panic!(
                "no Python with scim2-tester: run scripts/test (it creates a venv under {}) or set PROVISIONER_PYTHON",
                cache.display()
            )
        })
}

#[tokio::test]
async fn scim2_tester_finds_no_rfc_violation_with_or_without_patch() {
    let python = scim2_tester_python();
    let with_patch = ScimEmulatorSettings::default();
    let without_patch = ScimEmulatorSettings {
        patch: false,
        etag: false,
        ..ScimEmulatorSettings::default()
    };
    for settings in [with_patch, without_patch] {
        let described = format!("patch {}, etag {}", settings.patch, settings.etag);
        let (_emulator, scim, _shutdown) = start(settings).await;
        // Async, so that the emulator on this test's runtime keeps answering meanwhile.
        let run = tokio::process::Command::new(&python)
            .args(["-c", SCIM2_TESTER, &scim.base_url])
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(Duration::from_secs(120), run)
            .await
            .expect("scim2-tester finished within 120 s")
            .expect("scim2-tester runs");
        assert!(
            output.status.success(),
            "{described}: scim2-tester failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let results: Vec<Value> = serde_json::from_slice(&output.stdout).expect("the results as JSON");
        let failed: Vec<&Value> = results
            .iter()
            .filter(|result| {
                !matches!(
                    result["status"].as_str(),
                    Some("SUCCESS" | "COMPLIANT" | "ACCEPTABLE" | "SKIPPED")
                )
            })
            .collect();
        assert!(failed.is_empty(), "{described}: {failed:#?}");
        let succeeded = results.iter().filter(|result| result["status"] == "SUCCESS").count();
        assert!(
            succeeded >= 40,
            "{described}: only {succeeded} checks ran: {results:#?}"
        );
    }
}
