//! The Salesforce emulator's permission sets and their assignments, driven over HTTP as a
//! client would: SOQL to find them, single and batched (sObject Collections) assignment
//! and removal, and Salesforce's error codes.

use std::time::Duration;

use provisioner::devtools::emulators::salesforce::{
    self as salesforce_emulator, SalesforceEmulator, SalesforceEmulatorSettings,
};
use provisioner::devtools::emulators::Faults;
use reqwest::Method;
use serde_json::{json, Map, Value};
use tokio_util::sync::CancellationToken;

const CLIENT_ID: &str = "3MVG9emulator";
const CLIENT_SECRET: &str = "client-secret-5e1f";
const API_VERSION: &str = "v62.0";
/// A well-formed user id that no user has.
const UNKNOWN_USER_ID: &str = "005999999999999999";

struct Fixture {
    emulator: SalesforceEmulator,
    http: reqwest::Client,
    token: String,
    _shutdown: CancellationToken,
}

impl Fixture {
    async fn start() -> Fixture {
        let shutdown = CancellationToken::new();
        let emulator = salesforce_emulator::start(
            "127.0.0.1:0".parse().unwrap(),
            SalesforceEmulatorSettings {
                client_id: CLIENT_ID.into(),
                client_secret: CLIENT_SECRET.into(),
                username: "integration@crm.example.com".into(),
                password_with_token: "pa55wordTOKEN123".into(),
                public_key: None,
                session_lifetime: Duration::from_secs(7200),
                foreign_usernames: Vec::new(),
                faults: Faults::default(),
            },
            shutdown.clone(),
        )
        .await
        .unwrap();
        let http = reqwest::Client::new();
        let session: Value = http
            .post(format!("{}/services/oauth2/token", emulator.login_url()))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", CLIENT_ID),
                ("client_secret", CLIENT_SECRET),
            ])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        Fixture {
            token: session["access_token"].as_str().unwrap().to_string(),
            emulator,
            http,
            _shutdown: shutdown,
        }
    }

    /// A user added as an administrator would; returns its Id.
    fn user(&self, name: &str) -> String {
        let mut fields = Map::new();
        fields.insert("Username".into(), json!(format!("{name}@crm.example.com")));
        fields.insert("LastName".into(), json!(name));
        self.emulator.insert_directly(fields)
    }

    /// Calls `path` under `/services/data/v62.0`; returns the status and the JSON body
    /// (`Null` when there is none).
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let url = format!("{}/services/data/{API_VERSION}{path}", self.emulator.login_url());
        let mut request = self.http.request(method, url).bearer_auth(&self.token);
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

    async fn query(&self, soql: &str) -> (u16, Value) {
        let url = format!("{}/services/data/{API_VERSION}/query", self.emulator.login_url());
        let response = self
            .http
            .get(url)
            .query(&[("q", soql)])
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.json().await.unwrap())
    }

    /// The Ids of the records `soql` selects.
    async fn query_ids(&self, soql: &str) -> Vec<String> {
        let (status, body) = self.query(soql).await;
        assert_eq!(status, 200, "{soql}: {body}");
        body["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|record| record["Id"].as_str().unwrap().to_string())
            .collect()
    }

    async fn assign(&self, assignee_id: &str, permission_set_id: &str) -> (u16, Value) {
        self.call(
            Method::POST,
            "/sobjects/PermissionSetAssignment",
            Some(json!({"AssigneeId": assignee_id, "PermissionSetId": permission_set_id})),
        )
        .await
    }
}

/// Salesforce's error body for one error.
fn sf_error(code: &str, message: &str, fields: &[&str]) -> Value {
    json!([{"message": message, "errorCode": code, "fields": fields}])
}

/// A failed entry of an sObject Collections answer.
fn failed(code: &str, message: &str) -> Value {
    json!({"success": false, "errors": [{"statusCode": code, "message": message, "fields": []}]})
}

#[tokio::test]
async fn permission_sets_are_found_by_soql() {
    let fixture = Fixture::start().await;
    let engineering = fixture.emulator.add_permission_set("Engineering", "Engineering Access");
    let sales = fixture.emulator.add_permission_set("Sales", "Sales Access");
    let quoted = fixture.emulator.add_permission_set("O'Brien_Team", "O'Brien's team");
    assert!(
        engineering.starts_with("0PS") && engineering.len() == 18,
        "{engineering}"
    );

    let (status, body) = fixture
        .query("SELECT Id, Name FROM PermissionSet WHERE Name = 'Engineering'")
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"totalSize": 1, "done": true, "records": [{
            "attributes": {"type": "PermissionSet", "url": format!("/services/data/{API_VERSION}/sobjects/PermissionSet/{engineering}")},
            "Id": engineering, "Name": "Engineering"}]})
    );
    assert_eq!(
        fixture
            .query_ids("SELECT Id FROM PermissionSet WHERE Name = 'engineering'")
            .await,
        [engineering.as_str()],
        "SOQL's = ignores case on text"
    );
    let mut both = fixture
        .query_ids("SELECT Id FROM PermissionSet WHERE Name IN ('Engineering', 'Sales', 'Nobody')")
        .await;
    both.sort();
    assert_eq!(both, [engineering.clone(), sales]);
    assert_eq!(
        fixture
            .query_ids(r"SELECT Id FROM PermissionSet WHERE Name = 'O\'Brien_Team'")
            .await,
        [quoted],
        "a quote escaped with a backslash"
    );

    let (status, body) = fixture
        .query("SELECT Id FROM PermissionSet WHERE Name = 'O'Brien_Team'")
        .await;
    assert_eq!((status, &body[0]["errorCode"]), (400, &json!("MALFORMED_QUERY")));
    let (status, body) = fixture.query("SELECT Id, Colour FROM PermissionSet").await;
    assert_eq!((status, &body[0]["errorCode"]), (400, &json!("INVALID_FIELD")));
    assert!(body[0]["message"]
        .as_str()
        .unwrap()
        .starts_with("No such column 'Colour' on entity 'PermissionSet'."));
    let (status, body) = fixture.query("SELECT Id FROM PermissionSets").await;
    assert_eq!((status, &body[0]["errorCode"]), (400, &json!("INVALID_TYPE")));
}

#[tokio::test]
async fn assignments_are_made_refused_found_and_removed() {
    let fixture = Fixture::start().await;
    let engineering = fixture.emulator.add_permission_set("Engineering", "Engineering");
    let alice = fixture.user("alice");

    let (status, created) = fixture.assign(&alice, &engineering).await;
    assert_eq!(status, 201, "{created}");
    let assignment_id = created["id"].as_str().unwrap().to_string();
    assert!(assignment_id.starts_with("0Pa") && assignment_id.len() == 18);
    assert_eq!(created, json!({"id": assignment_id, "success": true, "errors": []}));
    assert_eq!(fixture.emulator.permission_set_names_of(&alice), ["Engineering"]);

    let refusals = [
        (
            json!({"AssigneeId": alice, "PermissionSetId": engineering}),
            sf_error("DUPLICATE_VALUE", "Duplicate PermissionSetAssignment", &[]),
        ),
        (
            json!({"AssigneeId": UNKNOWN_USER_ID, "PermissionSetId": engineering}),
            sf_error("INVALID_CROSS_REFERENCE_KEY", "invalid cross reference id", &[]),
        ),
        (
            json!({"AssigneeId": alice, "PermissionSetId": "0PS999999999999999"}),
            sf_error("INVALID_CROSS_REFERENCE_KEY", "invalid cross reference id", &[]),
        ),
        (
            json!({"AssigneeId": "NotReal", "PermissionSetId": engineering}),
            sf_error(
                "MALFORMED_ID",
                "Assignee ID: id value of incorrect type: NotReal",
                &["AssigneeId"],
            ),
        ),
        (
            json!({"AssigneeId": engineering, "PermissionSetId": engineering}),
            sf_error(
                "FIELD_INTEGRITY_EXCEPTION",
                &format!("Assignee ID: id value of incorrect type: {engineering}"),
                &["AssigneeId"],
            ),
        ),
        (
            json!({"AssigneeId": alice}),
            sf_error(
                "REQUIRED_FIELD_MISSING",
                "Required fields are missing: [PermissionSetId]",
                &["PermissionSetId"],
            ),
        ),
        (
            json!({"AssigneeId": alice, "PermissionSetId": engineering, "Role": "x"}),
            sf_error(
                "INVALID_FIELD",
                "No such column 'Role' on sobject of type PermissionSetAssignment",
                &[],
            ),
        ),
    ];
    for (body, expected) in refusals {
        let (status, refusal) = fixture
            .call(Method::POST, "/sobjects/PermissionSetAssignment/", Some(body.clone()))
            .await;
        assert_eq!((status, refusal), (400, expected), "{body}");
    }
    let (status, refusal) = fixture
        .call(
            Method::POST,
            "/sobjects/PermissionSetAssignment",
            Some(json!({"Id": assignment_id, "AssigneeId": alice, "PermissionSetId": engineering})),
        )
        .await;
    assert_eq!(
        (status, &refusal[0]["errorCode"]),
        (400, &json!("INVALID_FIELD_FOR_INSERT_UPDATE"))
    );
    assert_eq!(fixture.emulator.assignment_count(), 1);

    // A client finds the assignment to remove by its user and set, then deletes it by Id.
    let found = fixture
        .query_ids(&format!(
            "SELECT Id FROM PermissionSetAssignment WHERE AssigneeId = '{alice}' AND PermissionSetId = '{engineering}'"
        ))
        .await;
    assert_eq!(found, [assignment_id.as_str()]);
    let (status, record) = fixture
        .call(
            Method::GET,
            &format!("/sobjects/PermissionSetAssignment/{assignment_id}"),
            None,
        )
        .await;
    assert_eq!((status, &record["AssigneeId"]), (200, &json!(alice)));
    let path = format!("/sobjects/PermissionSetAssignment/{assignment_id}");
    assert_eq!(fixture.call(Method::DELETE, &path, None).await, (204, Value::Null));
    assert_eq!(
        fixture.call(Method::DELETE, &path, None).await,
        (404, sf_error("ENTITY_IS_DELETED", "entity is deleted", &[]))
    );
    assert_eq!(
        fixture
            .call(
                Method::DELETE,
                "/sobjects/PermissionSetAssignment/0Pa999999999999999",
                None
            )
            .await,
        (404, sf_error("NOT_FOUND", "The requested resource does not exist", &[]))
    );
    assert!(fixture.emulator.assignments_of(&alice).is_empty());
    let (status, _) = fixture.assign(&alice, &engineering).await;
    assert_eq!(status, 201, "assignable again once removed");
}

#[tokio::test]
async fn deactivating_a_user_keeps_its_assignments() {
    let fixture = Fixture::start().await;
    let engineering = fixture.emulator.add_permission_set("Engineering", "Engineering");
    let sales = fixture.emulator.add_permission_set("Sales", "Sales");
    let bob = fixture.user("bob");
    fixture.assign(&bob, &engineering).await;
    fixture.assign(&bob, &sales).await;

    let (status, _) = fixture
        .call(
            Method::PATCH,
            &format!("/sobjects/User/{bob}"),
            Some(json!({"IsActive": false})),
        )
        .await;
    assert_eq!(status, 204);
    assert_eq!(
        fixture.emulator.permission_set_names_of(&bob),
        ["Engineering", "Sales"],
        "Salesforce keeps a deactivated user's assignments"
    );
    let found = fixture
        .query_ids(&format!(
            "SELECT Id, PermissionSetId FROM PermissionSetAssignment WHERE AssigneeId = '{bob}'"
        ))
        .await;
    assert_eq!(found.len(), 2);
}

#[tokio::test]
async fn collections_assign_and_remove_up_to_200_at_once() {
    let fixture = Fixture::start().await;
    let engineering = fixture.emulator.add_permission_set("Engineering", "Engineering");
    let users: Vec<String> = (0..199).map(|index| fixture.user(&format!("user{index}"))).collect();
    let record = |assignee_id: &str| json!({"attributes": {"type": "PermissionSetAssignment"}, "AssigneeId": assignee_id, "PermissionSetId": engineering});

    // 199 new assignments and a repeat of the first, without allOrNone: each on its own.
    let mut records: Vec<Value> = users.iter().map(|user| record(user)).collect();
    records.push(record(&users[0]));
    let (status, results) = fixture
        .call(
            Method::POST,
            "/composite/sobjects",
            Some(json!({"allOrNone": false, "records": records})),
        )
        .await;
    assert_eq!(status, 200);
    let results = results.as_array().unwrap();
    assert_eq!(results.len(), 200, "one result per record, in order");
    assert!(results[..199].iter().all(|result| result["success"] == true));
    assert_eq!(
        results[199],
        failed("DUPLICATE_VALUE", "Duplicate PermissionSetAssignment")
    );
    assert_eq!(fixture.emulator.assignment_count(), 199);

    let too_many: Vec<Value> = (0..201).map(|_| record(&users[0])).collect();
    let (status, body) = fixture
        .call(Method::POST, "/composite/sobjects", Some(json!({"records": too_many})))
        .await;
    assert_eq!(
        (status, body),
        (
            400,
            sf_error(
                "EXCEEDED_ID_LIMIT",
                "record limit reached. cannot submit more than 200 records into this call",
                &[]
            )
        )
    );

    // With allOrNone, one bad record rolls back the good ones.
    let late = fixture.user("late");
    let (status, results) = fixture
        .call(
            Method::POST,
            "/composite/sobjects",
            Some(json!({"allOrNone": true, "records": [record(&late), record(UNKNOWN_USER_ID)]})),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        results,
        json!([
            failed(
                "ALL_OR_NONE_OPERATION_ROLLED_BACK",
                "Record rolled back because not all records were valid and the request was using AllOrNone header"
            ),
            failed("INVALID_CROSS_REFERENCE_KEY", "invalid cross reference id"),
        ])
    );
    assert!(fixture.emulator.assignments_of(&late).is_empty());

    // Removal: found by SOQL in batches, deleted 200 ids at a time.
    let ids: Vec<String> = fixture
        .emulator
        .assignments()
        .iter()
        .map(|assignment| assignment["Id"].as_str().unwrap().to_string())
        .collect();
    let in_list = ids[..3]
        .iter()
        .map(|id| format!("'{id}'"))
        .collect::<Vec<_>>()
        .join(", ");
    assert_eq!(
        fixture
            .query_ids(&format!(
                "SELECT Id FROM PermissionSetAssignment WHERE Id IN ({in_list})"
            ))
            .await
            .len(),
        3
    );
    let first_batch = ids[..100].join(",");
    let (status, results) = fixture
        .call(
            Method::DELETE,
            &format!("/composite/sobjects?ids={first_batch}&allOrNone=false"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert!(results
        .as_array()
        .unwrap()
        .iter()
        .zip(&ids[..100])
        .all(|(result, id)| *result == json!({"id": id, "success": true, "errors": []})));
    assert_eq!(fixture.emulator.assignment_count(), 99);

    let rest = ids[100..].join(",");
    let (_, results) = fixture
        .call(
            Method::DELETE,
            &format!("/composite/sobjects?ids={rest},{},NotAnId&allOrNone=true", ids[0]),
            None,
        )
        .await;
    let results = results.as_array().unwrap();
    assert_eq!(results.len(), 101);
    assert_eq!(
        results[0],
        failed(
            "ALL_OR_NONE_OPERATION_ROLLED_BACK",
            "Record rolled back because not all records were valid and the request was using AllOrNone header"
        )
    );
    assert_eq!(results[99], failed("ENTITY_IS_DELETED", "entity is deleted"));
    assert_eq!(results[100], failed("MALFORMED_ID", "malformed id NotAnId"));
    assert_eq!(fixture.emulator.assignment_count(), 99, "all or none: none");

    let (_, results) = fixture
        .call(
            Method::DELETE,
            &format!("/composite/sobjects?ids={rest}&allOrNone=false"),
            None,
        )
        .await;
    assert!(results
        .as_array()
        .unwrap()
        .iter()
        .all(|result| result["success"] == true));
    assert_eq!(fixture.emulator.assignment_count(), 0);

    let too_many = vec![ids[0].as_str(); 201].join(",");
    let (status, body) = fixture
        .call(Method::DELETE, &format!("/composite/sobjects?ids={too_many}"), None)
        .await;
    assert_eq!((status, &body[0]["errorCode"]), (400, &json!("EXCEEDED_ID_LIMIT")));
}
