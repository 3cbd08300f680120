//! The Google Workspace connector against the Directory API emulator, request bodies
//! checked against Google's official discovery document, and end to end through Kafka.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use provisioner::connectors::google::GoogleConnector;
use provisioner::connectors::jwt::RsaSigner;
use provisioner::connectors::{Connector, ConnectorError};
use provisioner::devtools::emulators::Faults;
use provisioner::event;
use provisioner::result::{Operation, Outcome, Status};
use provisioner::retry::{run_with_retries, RetryPolicy};
use provisioner::settings::Settings;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::support::app::{producer, publish, Names, TopicReader};
use crate::support::doubles::event_json;
use crate::support::google_discovery::{check, discovery_document, required_for};
use crate::support::targets::{user_event, GoogleFixture, ADMIN};

#[tokio::test]
async fn create_update_suspend_and_delete() {
    let fixture = GoogleFixture::start().await;
    let connector = fixture.connector(json!({"org_unit_path": "/Staff", "change_password_at_next_login": true}));
    let created = user_event(
        "user.created",
        "u-1",
        json!({"userName": "PRIMARY/Alice", "name": {"givenName": "Alice", "familyName": "Adams"}}),
    );
    let applied = connector.apply(created.change(Operation::Create)).await.unwrap();
    assert_eq!(applied.outcome, Outcome::Created);
    let remote = fixture.emulator.user_by_email("alice@example.com").expect("created");
    assert_eq!(
        applied.remote_id.as_deref(),
        remote["id"].as_str(),
        "the immutable id is the remote id"
    );
    assert_eq!(remote["orgUnitPath"], "/Staff");
    assert_eq!(remote["externalIds"][0]["value"], "u-1");
    assert_eq!(remote["changePasswordAtNextLogin"], true);
    let insert = &fixture.emulator.requests()[0];
    let password = insert.body["password"].as_str().unwrap();
    assert!(password.len() >= 32, "a strong password");

    let updated = user_event(
        "user.updated",
        "u-1",
        json!({"userName": "PRIMARY/Alice", "name": {"givenName": "Alice", "familyName": "Adams-Smith"}}),
    );
    assert_eq!(
        connector
            .apply(updated.change(Operation::Update))
            .await
            .unwrap()
            .outcome,
        Outcome::Updated
    );
    let patch = fixture.emulator.requests().last().unwrap().clone();
    assert_eq!(patch.method, "PATCH");
    assert_eq!(
        patch.body,
        json!({"name": {"givenName": "Alice", "familyName": "Adams-Smith"}}),
        "only what changed, and never the password"
    );
    let unchanged = fixture.emulator.requests().len();
    connector.apply(updated.change(Operation::Update)).await.unwrap();
    assert_eq!(fixture.emulator.requests().len(), unchanged, "no change, no PATCH");

    let deleted = user_event("user.deleted", "u-1", json!({"userName": "PRIMARY/Alice"}));
    assert_eq!(
        connector
            .apply(deleted.change(Operation::Delete))
            .await
            .unwrap()
            .outcome,
        Outcome::Deleted
    );
    assert!(fixture.emulator.user_by_email("alice@example.com").is_none());
    assert_eq!(
        connector
            .apply(deleted.change(Operation::Delete))
            .await
            .unwrap()
            .outcome,
        Outcome::AlreadyAbsent
    );

    let suspending = fixture.connector(json!({"deprovision": "suspend"}));
    let bob = user_event("user.created", "u-2", json!({"userName": "bob"}));
    suspending.apply(bob.change(Operation::Create)).await.unwrap();
    let gone = user_event("user.deleted", "u-2", json!({"userName": "bob"}));
    assert_eq!(
        suspending.apply(gone.change(Operation::Delete)).await.unwrap().outcome,
        Outcome::Deactivated
    );
    assert_eq!(
        fixture.emulator.user_by_email("bob@example.com").unwrap()["suspended"],
        true
    );
}

#[tokio::test]
async fn a_duplicate_is_adopted_and_found_by_id_after_a_rename() {
    let fixture = GoogleFixture::start().await;
    let existing_id = fixture.emulator.insert_directly(json!({
        "primaryEmail": "carol@example.com", "name": {"givenName": "C", "familyName": "Old"}
    }));
    let connector = fixture.connector(json!({}));
    let created = user_event(
        "user.created",
        "u-carol",
        json!({"userName": "carol", "name": {"givenName": "Carol", "familyName": "Cole"}}),
    );
    let applied = connector.apply(created.change(Operation::Create)).await.unwrap();
    assert_eq!(applied.outcome, Outcome::Adopted);
    assert_eq!(applied.remote_id.as_deref(), Some(existing_id.as_str()));
    let remote = fixture.emulator.user_by_email("carol@example.com").unwrap();
    assert_eq!(remote["name"]["familyName"], "Cole");
    assert_eq!(
        remote["externalIds"][0]["value"], "u-carol",
        "now linked to the source id"
    );

    // Renamed at the source: found through the link, not the old email, and renamed.
    let renamed = user_event("user.updated", "u-carol", json!({"userName": "carol.cole"}));
    let applied = connector.apply(renamed.change(Operation::Update)).await.unwrap();
    assert_eq!(applied.remote_id.as_deref(), Some(existing_id.as_str()));
    assert!(fixture.emulator.user_by_email("carol.cole@example.com").is_some());
    assert_eq!(fixture.emulator.users().len(), 1);
}

#[tokio::test]
async fn tokens_are_cached_renewed_on_401_and_checked() {
    let fixture = GoogleFixture::start().await;
    let connector = fixture.connector(json!({}));
    for index in 0..4 {
        let event = user_event("user.created", &format!("u-{index}"), json!({}));
        connector.apply(event.change(Operation::Create)).await.unwrap();
    }
    assert_eq!(fixture.emulator.tokens_issued(), 1);
    fixture.emulator.expire_tokens();
    let event = user_event("user.created", "u-after", json!({}));
    connector.apply(event.change(Operation::Create)).await.unwrap();
    assert_eq!(fixture.emulator.tokens_issued(), 2, "renewed once after the 401");

    // A key Google does not know, and an admin the account may not impersonate.
    let stranger = RsaSigner::generate();
    let mut wrong_key = fixture.settings(json!({}));
    wrong_key.service_account_key = provisioner::secret::Secret::new(fixture.key_json(&stranger));
    let error = GoogleConnector::new("g", &wrong_key)
        .unwrap()
        .apply(event.change(Operation::Create))
        .await
        .unwrap_err();
    assert!(matches!(error, ConnectorError::Auth { .. }), "{error:?}");
    assert!(error.to_string().contains("Signature"), "{error}");
    let wrong_admin = fixture.connector(json!({"admin_email": "someone@example.com"}));
    let error = wrong_admin.apply(event.change(Operation::Create)).await.unwrap_err();
    assert!(
        matches!(error, ConnectorError::Auth { .. }) && !error.is_retryable(),
        "{error:?}"
    );
    assert!(!error.to_string().contains("PRIVATE KEY"));
}

#[tokio::test]
async fn rate_limits_are_retried_after_at_least_a_second() {
    let fixture = GoogleFixture::start().await;
    let connector = fixture.connector(json!({}));
    let warm_up = user_event("user.deleted", "u-warm", json!({}));
    connector.apply(warm_up.change(Operation::Delete)).await.unwrap();
    fixture.emulator.set_faults(Faults {
        rate_429: 1.0,
        ..Faults::default()
    });
    let event = user_event("user.created", "u-limited", json!({}));
    let error = connector.apply(event.change(Operation::Create)).await.unwrap_err();
    assert!(error.is_retryable() && error.http_status() == Some(403), "{error:?}");
    assert!(error.to_string().contains("userRateLimitExceeded"));

    let started = Instant::now();
    let calls = AtomicU32::new(0);
    let outcome = run_with_retries(
        RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(5),
            max_elapsed: Duration::from_secs(30),
        },
        || async {
            let result = connector.apply(event.change(Operation::Create)).await;
            if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                fixture.emulator.set_faults(Faults::default());
            }
            result
        },
        |_, _, _| {},
    )
    .await;
    assert_eq!(outcome.result.unwrap().outcome, Outcome::Created);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Google asks for at least 1 s"
    );

    fixture.emulator.set_faults(Faults {
        rate_500: 1.0,
        ..Faults::default()
    });
    let error = connector
        .apply(user_event("user.created", "u-503", json!({})).change(Operation::Create))
        .await
        .unwrap_err();
    assert!(error.is_retryable() && error.http_status() == Some(503), "{error:?}");
}

#[tokio::test]
async fn a_permanent_error_carries_googles_reason() {
    let fixture = GoogleFixture::start().await;
    // The connector's domain is not the Workspace's: Google refuses the address.
    let connector = fixture.connector(json!({"domain": "not-ours.example"}));
    let error = connector
        .apply(user_event("user.created", "u-x", json!({})).change(Operation::Create))
        .await
        .unwrap_err();
    assert!(!error.is_retryable(), "{error:?}");
    assert_eq!(error.http_status(), Some(400));
    assert!(
        error.to_string().contains("invalid: Invalid Input: primary_user_email"),
        "{error}"
    );
}

#[tokio::test]
async fn every_request_body_fits_googles_discovery_document() {
    let document = discovery_document();
    let user_schema = document["schemas"]["User"].clone();
    assert!(user_schema.is_object(), "the discovery document has a User schema");
    let fixture = GoogleFixture::start().await;
    let connector = fixture.connector(json!({"org_unit_path": "/Eng", "deprovision": "suspend"}));
    let scenarios = [
        (
            "user.created",
            "u-1",
            json!({"userName": "one", "name": {"givenName": "One", "familyName": "First"}}),
        ),
        ("user.created", "u-2", json!({"userName": "two"})),
        (
            "user.updated",
            "u-1",
            json!({"userName": "one", "active": false, "name": {"givenName": "Uno", "familyName": "First"}}),
        ),
        ("user.updated", "u-3", json!({"userName": "three"})),
        ("user.deleted", "u-2", json!({"userName": "two"})),
    ];
    for (event_type, user, data) in scenarios {
        let operation = event::EventType::parse(event_type).unwrap().operation();
        connector
            .apply(user_event(event_type, user, data).change(operation))
            .await
            .unwrap();
    }
    let requests = fixture.emulator.requests();
    assert!(requests.len() >= 5, "{requests:?}");
    let mut problems = Vec::new();
    for (index, request) in requests.iter().enumerate() {
        check(
            &document,
            &user_schema,
            &request.body,
            &format!("request {index} ({})", request.method),
            &mut problems,
        );
        if request.method == "POST" {
            required_for(
                &document,
                "directory.users.insert",
                &user_schema,
                &request.body,
                &format!("request {index}"),
                &mut problems,
            );
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");

    // The checker itself can fail.
    let mut self_check = Vec::new();
    check(
        &document,
        &user_schema,
        &json!({"primaryEmail": 5, "nickname": "x"}),
        "bad",
        &mut self_check,
    );
    required_for(
        &document,
        "directory.users.insert",
        &user_schema,
        &json!({"name": {"givenName": "a"}}),
        "bad",
        &mut self_check,
    );
    assert_eq!(self_check.len(), 5, "{self_check:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_on_kafka_becomes_a_workspace_user() {
    let fixture = GoogleFixture::start().await;
    let names = Names::new("google-e2e");
    names.create(1).await;
    let settings = Settings::from_toml_str(&format!(
        r#"{}
        [connectors.workspace]
        type = "google"
        domain = "example.com"
        admin_email = "{ADMIN}"
        service_account_key = '''{}'''
        api_base_url = "{}"

        [[tenants.acme.resident.bindings]]
        connector = "workspace"
        jit_outbound = true
        "#,
        names.kafka_toml(),
        fixture.key_json(&fixture.key),
        fixture.emulator.api_base_url(),
    ))
    .unwrap();
    let connectors = provisioner::connectors::ConnectorSet::from_settings(
        &settings.connectors,
        &std::sync::Arc::new(provisioner::metrics::Metrics::new()),
    )
    .unwrap();
    let application = provisioner::app::Application::build_with_connectors(settings, connectors)
        .await
        .unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(application.run_until_stopped(shutdown.clone()));
    let event = event_json(
        "jit-1",
        "user.jit_provisioned",
        "acme",
        "u-jit",
        json!({"identity_provider": "Partner", "user": {"userName": "erin", "name": {"givenName": "Erin", "familyName": "Eve"}}}),
    );
    publish(&producer(), &names.events, Some("acme/u-jit"), &event, &[]).await;
    let mut results = TopicReader::new(&names.results, 1);
    results
        .read_until("the result", Duration::from_secs(60), |records| !records.is_empty())
        .await;
    let result = results.records[0].result();
    assert_eq!(result.status, Status::Succeeded, "{result:?}");
    let remote = fixture
        .emulator
        .user_by_email("erin@example.com")
        .expect("user in Workspace");
    assert_eq!(result.results[0].remote_id.as_deref(), remote["id"].as_str());
    shutdown.cancel();
    task.await.unwrap().unwrap();
}
