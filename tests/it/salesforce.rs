//! The Salesforce connector against its emulator: the three grants, create, adopt,
//! foreign duplicates, update, deactivate, session expiry, limits, SOQL escaping, and
//! end to end through Kafka.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use provisioner::connectors::jwt::RsaSigner;
use provisioner::connectors::salesforce::SalesforceConnector;
use provisioner::connectors::{Connector, ConnectorError};
use provisioner::devtools::emulators::Faults;
use provisioner::result::{Operation, Outcome, Status};
use provisioner::retry::{run_with_retries, RetryPolicy};
use provisioner::settings::Settings;
use serde_json::{json, Map};
use tokio_util::sync::CancellationToken;

use crate::support::app::{producer, publish, Names, TopicReader};
use crate::support::doubles::event_json;
use crate::support::targets::{user_event, SalesforceFixture, API_USER, CLIENT_ID, CLIENT_SECRET};

#[tokio::test]
async fn all_three_grants_get_a_token() {
    let fixture = SalesforceFixture::start(Vec::new()).await;
    let grants = [
        fixture.client_credentials(),
        json!({"grant": "jwt_bearer", "client_id": CLIENT_ID, "username": API_USER, "private_key": fixture.key.private_key_pem()}),
        json!({"grant": "password", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "username": API_USER,
               "password": "pa55word", "security_token": "TOKEN123"}),
    ];
    for (index, auth) in grants.into_iter().enumerate() {
        let connector =
            SalesforceConnector::new("crm", &fixture.settings(auth, json!({})), fixture.metrics.clone(), None).unwrap();
        let event = user_event("user.created", &format!("u-grant-{index}"), json!({}));
        assert_eq!(
            connector.apply(event.change(Operation::Create)).await.unwrap().outcome,
            Outcome::Created
        );
    }
    assert_eq!(fixture.emulator.tokens_issued(), 3);

    let stranger = RsaSigner::generate();
    let wrong_key = json!({"grant": "jwt_bearer", "client_id": CLIENT_ID, "username": API_USER, "private_key": stranger.private_key_pem()});
    let wrong_password = json!({"grant": "password", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
                                "username": API_USER, "password": "pa55word"});
    for auth in [wrong_key, wrong_password] {
        let connector =
            SalesforceConnector::new("crm", &fixture.settings(auth, json!({})), fixture.metrics.clone(), None).unwrap();
        let error = connector
            .apply(user_event("user.created", "u-denied", json!({})).change(Operation::Create))
            .await
            .unwrap_err();
        assert!(
            matches!(error, ConnectorError::Auth { .. }) && !error.is_retryable(),
            "{error:?}"
        );
        assert!(!error.to_string().contains("pa55word"), "a secret leaked: {error}");
    }
}

#[tokio::test]
async fn create_update_and_deactivate_with_username_freeing() {
    let fixture = SalesforceFixture::start(Vec::new()).await;
    let connector =
        fixture.connector(json!({"free_username_on_deactivate": true, "fields": {"Title": "attributes.title"}}));
    let created = user_event(
        "user.created",
        "u-1",
        json!({"userName": "Alice", "name": {"givenName": "Alice", "familyName": "Adams-Smith"},
               "attributes": {"title": "AE"}}),
    );
    let applied = connector.apply(created.change(Operation::Create)).await.unwrap();
    assert_eq!(applied.outcome, Outcome::Created);
    let user = fixture.emulator.user_by_federation_id("u-1").expect("created");
    assert_eq!(applied.remote_id.as_deref(), user["Id"].as_str());
    assert_eq!(user["Username"], "alice@crm.example.com");
    assert_eq!(user["Alias"], "aadamssm");
    assert_eq!(user["Email"], "u-1@example.com");
    assert_eq!(user["Title"], "AE");
    assert_eq!(user["ProfileId"], "00e000000000001AAA");
    assert_eq!(user["TimeZoneSidKey"], "America/Los_Angeles");

    let updated = user_event(
        "user.updated",
        "u-1",
        json!({"userName": "Alice", "name": {"givenName": "Alice", "familyName": "Baker"}, "attributes": {"title": "AE"}}),
    );
    assert_eq!(
        connector
            .apply(updated.change(Operation::Update))
            .await
            .unwrap()
            .outcome,
        Outcome::Updated
    );
    assert_eq!(
        fixture.emulator.user_by_federation_id("u-1").unwrap()["LastName"],
        "Baker"
    );

    let deleted = user_event("user.deleted", "u-1", json!({"userName": "Alice"}));
    assert_eq!(
        connector
            .apply(deleted.change(Operation::Delete))
            .await
            .unwrap()
            .outcome,
        Outcome::Deactivated
    );
    let user = fixture.emulator.user_by_federation_id("u-1").unwrap();
    assert_eq!(user["IsActive"], false);
    let freed = user["Username"].as_str().unwrap();
    assert!(
        freed.starts_with("deactivated.") && freed.ends_with("@crm.example.com"),
        "{freed}"
    );
    assert_eq!(
        connector
            .apply(deleted.change(Operation::Delete))
            .await
            .unwrap()
            .outcome,
        Outcome::AlreadyAbsent,
        "already inactive"
    );
    let never = user_event("user.deleted", "u-never", json!({"userName": "nobody"}));
    assert_eq!(
        connector.apply(never.change(Operation::Delete)).await.unwrap().outcome,
        Outcome::AlreadyAbsent
    );
    let usage = fixture.metrics.salesforce_api_usage.with_label_values(&["crm"]).get();
    assert!(usage >= 5.0, "Sforce-Limit-Info exported: {usage}");
    assert_eq!(
        fixture.metrics.salesforce_api_limit.with_label_values(&["crm"]).get(),
        15000.0
    );
}

#[tokio::test]
async fn our_duplicate_is_adopted_and_reactivated_but_a_foreign_one_fails() {
    let fixture = SalesforceFixture::start(vec!["taken@crm.example.com".into()]).await;
    let mut ours = Map::new();
    for (field, value) in [
        ("Username", "bob@crm.example.com"),
        ("LastName", "Old"),
        ("Email", "bob@example.com"),
        ("Alias", "bob"),
        ("FederationIdentifier", "u-bob"),
    ] {
        ours.insert(field.into(), json!(value));
    }
    ours.insert("IsActive".into(), json!(false));
    let existing = fixture.emulator.insert_directly(ours);
    let connector = fixture.connector(json!({}));
    let bob = user_event(
        "user.created",
        "u-bob",
        json!({"userName": "bob", "name": {"familyName": "Builder"}}),
    );
    let applied = connector.apply(bob.change(Operation::Create)).await.unwrap();
    assert_eq!(applied.outcome, Outcome::Adopted);
    assert_eq!(applied.remote_id.as_deref(), Some(existing.as_str()));
    let user = fixture.emulator.user_by_federation_id("u-bob").unwrap();
    assert_eq!(user["IsActive"], true, "reactivated");
    assert_eq!(user["LastName"], "Builder");

    let mut someone_else = Map::new();
    for (field, value) in [
        ("Username", "carol@crm.example.com"),
        ("FederationIdentifier", "u-other"),
    ] {
        someone_else.insert(field.into(), json!(value));
    }
    fixture.emulator.insert_directly(someone_else);
    let carol = user_event("user.created", "u-carol", json!({"userName": "carol"}));
    let error = connector.apply(carol.change(Operation::Create)).await.unwrap_err();
    assert!(
        matches!(error, ConnectorError::Conflict { .. }) && !error.is_retryable(),
        "{error:?}"
    );
    assert!(error.to_string().contains("belongs to another user"), "{error}");

    let taken = user_event("user.created", "u-taken", json!({"userName": "taken"}));
    let error = connector.apply(taken.change(Operation::Create)).await.unwrap_err();
    assert!(error.to_string().contains("another Salesforce org"), "{error}");
}

#[tokio::test]
async fn an_expired_session_is_renewed_once() {
    let fixture = SalesforceFixture::start(Vec::new()).await;
    let connector = fixture.connector(json!({}));
    connector
        .apply(user_event("user.created", "u-a", json!({})).change(Operation::Create))
        .await
        .unwrap();
    connector
        .apply(user_event("user.created", "u-b", json!({})).change(Operation::Create))
        .await
        .unwrap();
    assert_eq!(
        fixture.emulator.tokens_issued(),
        1,
        "cached, unlike WSO2's token per call"
    );
    fixture.emulator.expire_sessions();
    connector
        .apply(user_event("user.created", "u-c", json!({})).change(Operation::Create))
        .await
        .unwrap();
    assert_eq!(fixture.emulator.tokens_issued(), 2);
}

#[tokio::test]
async fn request_limits_are_retried_with_a_long_backoff() {
    let fixture = SalesforceFixture::start(Vec::new()).await;
    let connector = fixture.connector(json!({}));
    connector
        .apply(user_event("user.deleted", "u-warm", json!({})).change(Operation::Delete))
        .await
        .unwrap();
    fixture.emulator.set_faults(Faults {
        rate_429: 1.0,
        ..Faults::default()
    });
    let event = user_event("user.created", "u-limit", json!({}));
    let error = connector.apply(event.change(Operation::Create)).await.unwrap_err();
    assert!(error.is_retryable(), "{error:?}");
    assert!(
        error.retry_after().unwrap() >= Duration::from_secs(30),
        "a long backoff"
    );
    assert!(error.to_string().contains("REQUEST_LIMIT_EXCEEDED"));

    // Retried to success (the policy's elapsed budget allows the 30 s hint; the test
    // clears the fault at once, and we check the hint rather than sleeping 30 s).
    let calls = AtomicU32::new(0);
    let started = Instant::now();
    fixture.emulator.set_faults(Faults::default());
    let outcome = run_with_retries(
        RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(5),
            max_elapsed: Duration::from_secs(60),
        },
        || async {
            calls.fetch_add(1, Ordering::SeqCst);
            connector.apply(event.change(Operation::Create)).await
        },
        |_, _, _| {},
    )
    .await;
    assert_eq!(outcome.result.unwrap().outcome, Outcome::Created);
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[tokio::test]
async fn hostile_usernames_are_escaped_in_soql() {
    let fixture = SalesforceFixture::start(Vec::new()).await;
    let connector = fixture.connector(json!({}));
    let victim = user_event("user.created", "u-victim", json!({"userName": "victim"}));
    connector.apply(victim.change(Operation::Create)).await.unwrap();
    // Ids land in SOQL literals: a quote must not end the literal.
    for hostile in [r"x' OR Username != 'y", r"back\slash'", "double\"quote"] {
        let event = user_event("user.deleted", hostile, json!({"userName": "h"}));
        let applied = connector.apply(event.change(Operation::Delete)).await.unwrap();
        assert_eq!(applied.outcome, Outcome::AlreadyAbsent, "{hostile}");
    }
    assert_eq!(
        fixture.emulator.user_by_federation_id("u-victim").unwrap()["IsActive"],
        true
    );
    assert!(fixture
        .emulator
        .queries()
        .iter()
        .any(|query| query.contains(r"x\' OR Username != \'y")));
}

#[tokio::test]
async fn a_missing_required_field_is_a_permanent_error() {
    let fixture = SalesforceFixture::start(Vec::new()).await;
    let connector = fixture.connector(json!({"profile_id": ""}));
    let error = connector
        .apply(user_event("user.created", "u-x", json!({})).change(Operation::Create))
        .await
        .unwrap_err();
    assert!(!error.is_retryable());
    assert!(error.to_string().contains("REQUIRED_FIELD_MISSING"), "{error}");
    assert!(error.to_string().contains("ProfileId"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_on_kafka_becomes_a_salesforce_user() {
    let fixture = SalesforceFixture::start(Vec::new()).await;
    let names = Names::new("salesforce-e2e");
    names.create(1).await;
    let settings = Settings::from_toml_str(&format!(
        r#"{}
        [connectors.crm]
        type = "salesforce"
        login_url = "{}"
        provisioning_domain = "crm.example.com"
        profile_id = "00e000000000001AAA"
        [connectors.crm.auth]
        grant = "client_credentials"
        client_id = "{CLIENT_ID}"
        client_secret = "{CLIENT_SECRET}"

        [[tenants.acme.resident.bindings]]
        connector = "crm"
        rule = "'sales' in roles"
        "#,
        names.kafka_toml(),
        fixture.emulator.login_url(),
    ))
    .unwrap();
    let application = provisioner::app::Application::build(settings).await.unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(application.run_until_stopped(shutdown.clone()));
    let event = event_json(
        "sf-1",
        "user.created",
        "acme",
        "u-sf",
        json!({"user": {"userName": "dan", "roles": ["sales"]}}),
    );
    publish(&producer(), &names.events, Some("acme/u-sf"), &event, &[]).await;
    let mut results = TopicReader::new(&names.results, 1);
    results
        .read_until("the result", Duration::from_secs(60), |records| !records.is_empty())
        .await;
    let result = results.records[0].result();
    assert_eq!(result.status, Status::Succeeded, "{result:?}");
    let user = fixture
        .emulator
        .user_by_federation_id("u-sf")
        .expect("user in Salesforce");
    assert_eq!(result.results[0].remote_id.as_deref(), user["Id"].as_str());
    shutdown.cancel();
    task.await.unwrap().unwrap();
}
