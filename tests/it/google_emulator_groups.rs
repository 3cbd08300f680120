//! The Directory API emulator's groups and members, driven over HTTP as a client would:
//! Google's status codes and error bodies, scopes, paging, and every request body checked
//! against Google's discovery document.

use reqwest::Method;
use serde_json::{json, Value};

use crate::support::google_discovery::assert_group_bodies_fit_discovery_document;
use crate::support::targets::{GoogleFixture, ADMIN, SERVICE_ACCOUNT};

const USER_SCOPE: &str = "https://www.googleapis.com/auth/admin.directory.user";
const GROUP_SCOPE: &str = "https://www.googleapis.com/auth/admin.directory.group";
const GROUP_READONLY_SCOPE: &str = "https://www.googleapis.com/auth/admin.directory.group.readonly";
const GROUP_MEMBER_SCOPE: &str = "https://www.googleapis.com/auth/admin.directory.group.member";

/// The shared emulator fixture, and an HTTP client to drive it as a client would.
struct Fixture {
    target: GoogleFixture,
    http: reqwest::Client,
}

impl std::ops::Deref for Fixture {
    type Target = GoogleFixture;

    fn deref(&self) -> &GoogleFixture {
        &self.target
    }
}

/// A client of the emulator's Directory API holding one token.
struct Directory<'a> {
    fixture: &'a Fixture,
    token: String,
}

impl Fixture {
    async fn start() -> Fixture {
        Fixture {
            target: GoogleFixture::start().await,
            http: reqwest::Client::new(),
        }
    }

    /// The token endpoint's answer to a JWT-bearer grant for `scopes`.
    async fn token_response(&self, scopes: &[&str]) -> (u16, Value) {
        let now = chrono::Utc::now().timestamp();
        let claims = json!({
            "iss": SERVICE_ACCOUNT, "sub": ADMIN, "scope": scopes.join(" "),
            "aud": self.emulator.token_url(), "iat": now, "exp": now + 3600,
        });
        let assertion = self.key.sign(&claims).unwrap();
        let response = self
            .http
            .post(self.emulator.token_url())
            .form(&[
                ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                ("assertion", assertion.as_str()),
            ])
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.json().await.unwrap())
    }

    async fn directory(&self, scopes: &[&str]) -> Directory<'_> {
        let (status, body) = self.token_response(scopes).await;
        assert_eq!(status, 200, "{body}");
        Directory {
            fixture: self,
            token: body["access_token"].as_str().unwrap().to_string(),
        }
    }

    /// A user in the domain, added as an administrator would; returns its id.
    fn user(&self, local_part: &str) -> String {
        self.emulator.insert_directly(json!({
            "primaryEmail": format!("{local_part}@example.com"),
            "name": {"givenName": local_part, "familyName": "Tester"},
        }))
    }
}

impl Directory<'_> {
    /// Calls `path` under `/admin/directory/v1`; returns the status and the JSON body
    /// (`Null` when there is none).
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let url = format!("{}/admin/directory/v1{path}", self.fixture.emulator.api_base_url());
        let mut request = self.fixture.http.request(method, url).bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
        };
        (status, body)
    }

    async fn insert_group(&self, email: &str, name: &str) -> Value {
        let (status, group) = self
            .call(
                Method::POST,
                "/groups",
                Some(json!({"email": email, "name": name, "description": "A test group"})),
            )
            .await;
        assert_eq!(status, 200, "{group}");
        group
    }

    async fn insert_member(&self, group_key: &str, email: &str) -> (u16, Value) {
        self.call(
            Method::POST,
            &format!("/groups/{group_key}/members"),
            Some(json!({"email": email, "role": "MEMBER"})),
        )
        .await
    }
}

/// Google's error body for one error.
fn google_error(code: u16, reason: &str, message: &str) -> Value {
    json!({"error": {"code": code, "message": message,
                     "errors": [{"domain": "global", "reason": reason, "message": message}]}})
}

#[tokio::test]
async fn groups_are_created_read_changed_listed_and_deleted() {
    let fixture = Fixture::start().await;
    let directory = fixture.directory(&[USER_SCOPE, GROUP_SCOPE]).await;
    fixture.user("alice");

    let group = directory.insert_group("engineering@example.com", "Engineering").await;
    assert_eq!(group["kind"], "admin#directory#group");
    assert_eq!(group["email"], "engineering@example.com");
    assert_eq!(group["name"], "Engineering");
    assert_eq!(group["description"], "A test group");
    assert_eq!(group["adminCreated"], true);
    assert_eq!(group["directMembersCount"], "0", "an int64 travels as a string");
    let id = group["id"].as_str().unwrap().to_string();
    assert_eq!(fixture.emulator.group_count(), 1);

    for key in [id.as_str(), "engineering@example.com", "Engineering@Example.com"] {
        let (status, found) = directory.call(Method::GET, &format!("/groups/{key}"), None).await;
        assert_eq!((status, &found["id"]), (200, &json!(id)), "by {key}");
    }

    // Group and user addresses are one namespace, and taken ones are refused as Google does.
    for taken in ["ENGINEERING@example.com", "alice@example.com"] {
        let (status, body) = directory
            .call(Method::POST, "/groups", Some(json!({"email": taken, "name": "Again"})))
            .await;
        assert_eq!(status, 409, "{taken}");
        assert_eq!(body, google_error(409, "duplicate", "Entity already exists."));
    }
    let (status, body) = directory
        .call(Method::POST, "/groups", Some(json!({"email": "eng@elsewhere.org"})))
        .await;
    assert_eq!(
        (status, body),
        (400, google_error(400, "invalid", "Invalid Input: groupKey"))
    );

    let (status, renamed) = directory
        .call(
            Method::PATCH,
            &format!("/groups/{id}"),
            Some(json!({"name": "Engineering Team"})),
        )
        .await;
    assert_eq!((status, &renamed["name"]), (200, &json!("Engineering Team")));
    assert_eq!(
        renamed["description"], "A test group",
        "PATCH keeps what it does not send"
    );
    let (status, updated) = directory
        .call(
            Method::PUT,
            "/groups/engineering@example.com",
            Some(json!({"email": "eng@example.com", "name": "Eng"})),
        )
        .await;
    assert_eq!((status, &updated["email"]), (200, &json!("eng@example.com")));
    assert_eq!(updated["id"], json!(id), "the id never changes");
    assert!(fixture.emulator.group_by_email("eng@example.com").is_some());
    let (status, _) = directory
        .call(
            Method::PATCH,
            &format!("/groups/{id}"),
            Some(json!({"email": "alice@example.com"})),
        )
        .await;
    assert_eq!(status, 409, "renamed onto a user's address");

    // A user endpoint named with a group's address is "not supported", not "not found".
    let (status, body) = directory.call(Method::GET, "/users/eng@example.com", None).await;
    assert_eq!(
        (status, body),
        (400, google_error(400, "badRequest", "Type not supported: userKey"))
    );

    directory.insert_group("sales@example.com", "Sales").await;
    directory.insert_group("support@example.com", "Support").await;
    let (status, page) = directory
        .call(Method::GET, "/groups?customer=my_customer&maxResults=2", None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(page["kind"], "admin#directory#groups");
    let emails: Vec<&str> = page["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|group| group["email"].as_str().unwrap())
        .collect();
    assert_eq!(emails, ["eng@example.com", "sales@example.com"], "sorted by email");
    let token = page["nextPageToken"].as_str().unwrap();
    let (_, last) = directory
        .call(
            Method::GET,
            &format!("/groups?customer=my_customer&maxResults=2&pageToken={token}"),
            None,
        )
        .await;
    assert_eq!(last["groups"][0]["email"], "support@example.com");
    assert!(last.get("nextPageToken").is_none(), "the last page has no token");
    let (_, found) = directory
        .call(
            Method::GET,
            "/groups?domain=example.com&query=email:'sales@example.com'",
            None,
        )
        .await;
    assert_eq!(found["groups"].as_array().unwrap().len(), 1);
    let (_, none) = directory
        .call(
            Method::GET,
            "/groups?domain=example.com&query=email:nobody@example.com",
            None,
        )
        .await;
    assert!(none.get("groups").is_none(), "Google leaves out an empty list: {none}");
    let (status, body) = directory.call(Method::GET, "/groups", None).await;
    assert_eq!(
        (status, body),
        (400, google_error(400, "badRequest", "Bad Request")),
        "neither customer nor domain"
    );
    let (status, body) = directory.call(Method::GET, "/groups?domain=other.org", None).await;
    assert_eq!(
        (status, body),
        (404, google_error(404, "notFound", "Domain not found."))
    );

    let (status, body) = directory.call(Method::DELETE, &format!("/groups/{id}"), None).await;
    assert_eq!((status, body), (204, Value::Null));
    for method in [Method::GET, Method::DELETE] {
        let (status, body) = directory.call(method, &format!("/groups/{id}"), None).await;
        assert_eq!(
            (status, body),
            (404, google_error(404, "notFound", "Resource Not Found: groupKey"))
        );
    }
    assert_eq!(fixture.emulator.group_count(), 2);
    assert_eq!(fixture.emulator.call_count("directory.groups.insert"), 6);
    assert_eq!(fixture.emulator.call_count("directory.groups.delete"), 2);
    assert_group_bodies_fit_discovery_document(&fixture.emulator, true);
}

#[tokio::test]
async fn members_are_added_found_changed_and_removed() {
    let fixture = Fixture::start().await;
    let directory = fixture.directory(&[USER_SCOPE, GROUP_SCOPE]).await;
    let alice = fixture.user("alice");
    fixture.user("bob");
    directory.insert_group("eng@example.com", "Engineering").await;

    let (status, member) = directory.insert_member("eng@example.com", "Alice@example.com").await;
    assert_eq!(status, 200, "{member}");
    assert_eq!(member["kind"], "admin#directory#member");
    assert_eq!(member["id"], json!(alice), "a member's id is the user's id");
    assert_eq!(
        member["email"], "alice@example.com",
        "shown under the user's own address"
    );
    assert_eq!(member["role"], "MEMBER");
    assert_eq!(member["type"], "USER");
    assert_eq!(member["status"], "ACTIVE");
    assert!(member["etag"].is_string());

    let (status, body) = directory.insert_member("eng@example.com", "alice@example.com").await;
    assert_eq!(
        (status, body),
        (409, google_error(409, "duplicate", "Member already exists."))
    );
    let (status, body) = directory.insert_member("eng@example.com", "nobody@example.com").await;
    assert_eq!(
        (status, body),
        (404, google_error(404, "notFound", "Resource Not Found: memberKey"))
    );
    let (status, body) = directory.insert_member("eng@example.com", "friend@gmail.com").await;
    assert_eq!(
        (status, body),
        (400, google_error(400, "required", "Missing required field: memberKey")),
        "an address outside the domain"
    );
    let (status, body) = directory.insert_member("nope@example.com", "bob@example.com").await;
    assert_eq!(
        (status, body),
        (404, google_error(404, "notFound", "Resource Not Found: groupKey"))
    );

    for key in ["alice@example.com", alice.as_str()] {
        let (status, found) = directory
            .call(Method::GET, &format!("/groups/eng@example.com/members/{key}"), None)
            .await;
        assert_eq!((status, &found["email"]), (200, &json!("alice@example.com")));
    }
    let (status, body) = directory
        .call(Method::GET, "/groups/eng@example.com/members/bob@example.com", None)
        .await;
    assert_eq!(
        (status, body),
        (404, google_error(404, "notFound", "Resource Not Found: memberKey"))
    );

    let (status, changed) = directory
        .call(
            Method::PATCH,
            "/groups/eng@example.com/members/alice@example.com",
            Some(json!({"role": "MANAGER"})),
        )
        .await;
    assert_eq!((status, &changed["role"]), (200, &json!("MANAGER")));
    let (_, managers) = directory
        .call(Method::GET, "/groups/eng@example.com/members?roles=MANAGER,OWNER", None)
        .await;
    assert_eq!(managers["members"].as_array().unwrap().len(), 1);

    // A renamed user stays a member under its new address; a suspended one shows it.
    let (status, _) = directory
        .call(
            Method::PATCH,
            "/users/alice@example.com",
            Some(json!({"primaryEmail": "alice.adams@example.com", "suspended": true})),
        )
        .await;
    assert_eq!(status, 200);
    let members = fixture.emulator.members_of("eng@example.com").unwrap();
    assert_eq!(members[0]["email"], "alice.adams@example.com");
    assert_eq!(members[0]["status"], "SUSPENDED");
    assert_eq!(
        fixture.emulator.group_by_email("eng@example.com").unwrap()["directMembersCount"],
        "1"
    );

    let (status, body) = directory
        .call(
            Method::DELETE,
            "/groups/eng@example.com/members/alice.adams@example.com",
            None,
        )
        .await;
    assert_eq!((status, body), (204, Value::Null));
    let (status, body) = directory
        .call(
            Method::DELETE,
            &format!("/groups/eng@example.com/members/{alice}"),
            None,
        )
        .await;
    assert_eq!(
        (status, body),
        (404, google_error(404, "notFound", "Resource Not Found: memberKey")),
        "already gone"
    );
    let (status, body) = directory
        .call(Method::DELETE, "/groups/eng@example.com/members/friend@gmail.com", None)
        .await;
    assert_eq!(
        (status, body),
        (400, google_error(400, "required", "Missing required field: memberKey"))
    );

    // Deleting a user takes it out of its groups.
    directory.insert_member("eng@example.com", "bob@example.com").await;
    assert_eq!(
        fixture.emulator.member_emails_of("eng@example.com"),
        ["bob@example.com"]
    );
    let (status, _) = directory.call(Method::DELETE, "/users/bob@example.com", None).await;
    assert_eq!(status, 204);
    assert!(fixture.emulator.member_emails_of("eng@example.com").is_empty());
    let (_, empty) = directory
        .call(Method::GET, "/groups/eng@example.com/members", None)
        .await;
    assert!(empty.get("members").is_none(), "{empty}");

    assert_eq!(fixture.emulator.call_count("directory.members.insert"), 6);
    assert_eq!(fixture.emulator.call_count("directory.members.delete"), 3);
    assert_eq!(fixture.emulator.call_count("directory.members.get"), 3);
}

#[tokio::test]
async fn nested_groups_count_for_has_member_and_cannot_loop() {
    let fixture = Fixture::start().await;
    let directory = fixture.directory(&[GROUP_SCOPE]).await;
    fixture.user("carol");
    fixture.user("dave");
    directory.insert_group("all@example.com", "Everyone").await;
    directory.insert_group("eng@example.com", "Engineering").await;
    let (status, nested) = directory.insert_member("all@example.com", "eng@example.com").await;
    assert_eq!((status, &nested["type"]), (200, &json!("GROUP")));
    directory.insert_member("eng@example.com", "carol@example.com").await;

    let has_member = |member: &'static str| {
        let directory = &directory;
        async move {
            directory
                .call(
                    Method::GET,
                    &format!("/groups/all@example.com/hasMember/{member}"),
                    None,
                )
                .await
        }
    };
    assert_eq!(has_member("carol@example.com").await, (200, json!({"isMember": true})));
    assert_eq!(has_member("dave@example.com").await, (200, json!({"isMember": false})));
    assert_eq!(
        has_member("friend@gmail.com").await,
        (400, google_error(400, "invalid", "Invalid Input: memberKey")),
        "Google will not say whether an outside address is a member"
    );

    let (status, _) = directory.insert_member("eng@example.com", "all@example.com").await;
    assert_eq!(status, 400, "a group cannot contain itself through another");
    let (status, _) = directory.insert_member("eng@example.com", "eng@example.com").await;
    assert_eq!(status, 400, "nor directly");

    let (status, _) = directory.call(Method::DELETE, "/groups/eng@example.com", None).await;
    assert_eq!(status, 204);
    assert!(
        fixture.emulator.member_emails_of("all@example.com").is_empty(),
        "a deleted group leaves the groups it was in"
    );
    assert_group_bodies_fit_discovery_document(&fixture.emulator, true);
}

#[tokio::test]
async fn members_come_in_pages_of_at_most_200() {
    let fixture = Fixture::start().await;
    let directory = fixture.directory(&[GROUP_MEMBER_SCOPE, GROUP_SCOPE]).await;
    directory.insert_group("big@example.com", "Big").await;
    let mut expected = Vec::new();
    for index in 0..250 {
        let local_part = format!("user{index:03}");
        fixture.user(&local_part);
        let (status, _) = directory
            .insert_member("big@example.com", &format!("{local_part}@example.com"))
            .await;
        assert_eq!(status, 200);
        expected.push(format!("{local_part}@example.com"));
    }

    let mut seen = Vec::new();
    let mut page_sizes = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let path = match &token {
            None => "/groups/big@example.com/members".to_string(),
            Some(token) => format!("/groups/big@example.com/members?pageToken={token}"),
        };
        let (status, page) = directory.call(Method::GET, &path, None).await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(page["kind"], "admin#directory#members");
        let members = page["members"].as_array().unwrap();
        page_sizes.push(members.len());
        seen.extend(
            members
                .iter()
                .map(|member| member["email"].as_str().unwrap().to_string()),
        );
        match page["nextPageToken"].as_str() {
            Some(next) => token = Some(next.to_string()),
            None => break,
        }
    }
    assert_eq!(page_sizes, [200, 50], "200 by default, the most Google sends");
    assert_eq!(seen, expected, "every member once, in the order added");

    let (status, page) = directory
        .call(Method::GET, "/groups/big@example.com/members?maxResults=100", None)
        .await;
    assert_eq!((status, page["members"].as_array().unwrap().len()), (200, 100));
    let (status, body) = directory
        .call(Method::GET, "/groups/big@example.com/members?maxResults=201", None)
        .await;
    assert_eq!(
        (status, body),
        (
            400,
            google_error(
                400,
                "invalid",
                "Invalid value '201'. Values must be within the range: [1, 200]"
            )
        )
    );
    assert_eq!(fixture.emulator.members_of("big@example.com").unwrap().len(), 250);
    assert_eq!(fixture.emulator.call_count("directory.members.list"), 4);
    assert_group_bodies_fit_discovery_document(&fixture.emulator, true);
}

#[tokio::test]
async fn bad_member_bodies_are_refused_as_google_refuses_them() {
    let fixture = Fixture::start().await;
    let directory = fixture.directory(&[GROUP_SCOPE]).await;
    fixture.user("erin");
    directory.insert_group("ops@example.com", "Ops").await;
    let (status, body) = directory
        .call(
            Method::POST,
            "/groups/ops@example.com/members",
            Some(json!({"role": "MEMBER"})),
        )
        .await;
    assert_eq!(
        (status, body),
        (400, google_error(400, "required", "Missing required field: member"))
    );
    let (status, body) = directory
        .call(
            Method::POST,
            "/groups/ops@example.com/members",
            Some(json!({"email": "erin@example.com", "role": "BOSS"})),
        )
        .await;
    assert_eq!(
        (status, body),
        (400, google_error(400, "invalid", "Invalid Input: role"))
    );
    let (status, body) = directory
        .call(Method::POST, "/groups", Some(json!({"name": "No address"})))
        .await;
    assert_eq!(
        (status, body),
        (400, google_error(400, "required", "Missing required field: email"))
    );
    assert!(fixture.emulator.members_of("ops@example.com").unwrap().is_empty());
    // Refused, yet each body is still of the shapes the discovery document describes.
    assert_group_bodies_fit_discovery_document(&fixture.emulator, false);
}

#[tokio::test]
async fn every_call_needs_a_scope_its_method_accepts() {
    let fixture = Fixture::start().await;
    let insufficient = json!({"error": {"code": 403, "message": "Request had insufficient authentication scopes.",
        "errors": [{"message": "Insufficient Permission", "domain": "global", "reason": "insufficientPermissions"}],
        "status": "PERMISSION_DENIED"}});

    let users_only = fixture.directory(&[USER_SCOPE]).await;
    let (status, body) = users_only
        .call(Method::POST, "/groups", Some(json!({"email": "x@example.com"})))
        .await;
    assert_eq!((status, body), (403, insufficient.clone()));
    assert_eq!(fixture.emulator.group_count(), 0);

    let admin = fixture.directory(&[GROUP_SCOPE]).await;
    admin.insert_group("team@example.com", "Team").await;
    let (status, body) = admin.call(Method::GET, "/users/someone@example.com", None).await;
    assert_eq!((status, body), (403, insufficient.clone()), "users need a user scope");

    let reader = fixture.directory(&[GROUP_READONLY_SCOPE]).await;
    let (status, _) = reader.call(Method::GET, "/groups/team@example.com", None).await;
    assert_eq!(status, 200);
    let (status, _) = reader.call(Method::GET, "/groups/team@example.com/members", None).await;
    assert_eq!(status, 200);
    let (status, body) = reader.call(Method::DELETE, "/groups/team@example.com", None).await;
    assert_eq!((status, body), (403, insufficient.clone()));

    fixture.user("frank");
    let member_admin = fixture.directory(&[GROUP_MEMBER_SCOPE]).await;
    let (status, _) = member_admin
        .insert_member("team@example.com", "frank@example.com")
        .await;
    assert_eq!(status, 200, "the member scope is enough for members");
    let (status, _) = member_admin
        .call(
            Method::PATCH,
            "/groups/team@example.com",
            Some(json!({"name": "Renamed"})),
        )
        .await;
    assert_eq!(status, 403, "but not for the group itself");

    // Domain-wide delegation grants the directory's user and group scopes, nothing else.
    let (status, body) = fixture
        .token_response(&[GROUP_SCOPE, "https://www.googleapis.com/auth/cloud-platform"])
        .await;
    assert_eq!((status, &body["error"]), (400, &json!("invalid_grant")));
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .starts_with("unauthorized_client"),
        "{body}"
    );
    assert_eq!(
        fixture.emulator.call_count("directory.groups.insert"),
        1,
        "a refused token reaches no method"
    );
}
