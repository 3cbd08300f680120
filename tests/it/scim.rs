//! The SCIM connector against a real SCIM server (scim2-server from PyPI) and against
//! the project's emulator (faults, OAuth), and end to end through Kafka.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use provisioner::connectors::scim::settings::Scim2Settings;
use provisioner::connectors::scim::ScimConnector;
use provisioner::connectors::{Connector, ConnectorError};
use provisioner::devtools::emulators::scim::{self as scim_emulator, ScimEmulator, ScimEmulatorSettings};
use provisioner::devtools::emulators::Faults;
use provisioner::event::{self, UserEvent};
use provisioner::result::{Operation, Outcome, Status};
use provisioner::retry::{run_with_retries, RetryPolicy};
use provisioner::settings::Settings;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::support::app::Names;
use crate::support::doubles::event_json;
use crate::support::scim2_server::Scim2Server;

pub(crate) fn scim_connector(settings: serde_json::Value) -> ScimConnector {
    let settings: Scim2Settings = serde_json::from_value(settings).expect("valid SCIM settings");
    ScimConnector::new("scim", &settings).expect("connector builds")
}

pub(crate) fn user_event(event_type: &str, user_id: &str, user: serde_json::Value) -> UserEvent {
    let mut extra = json!({"user": user});
    if extra["user"].get("userName").is_none() {
        extra["user"]["userName"] = json!(format!("user-{user_id}"));
    }
    let bytes = event_json(&format!("{event_type}-{user_id}"), event_type, "acme", user_id, extra);
    event::decode(Some(&bytes), &[], 1 << 20)
        .expect("valid event")
        .into_user()
        .expect("a user event")
}

async fn emulator(settings: ScimEmulatorSettings) -> (ScimEmulator, CancellationToken) {
    let shutdown = CancellationToken::new();
    let emulator = scim_emulator::start("127.0.0.1:0".parse().unwrap(), settings, shutdown.clone())
        .await
        .expect("emulator starts");
    (emulator, shutdown)
}

// --- against scim2-server ---------------------------------------------------------

#[tokio::test]
async fn create_update_and_delete_against_a_real_scim_server() {
    let server = Scim2Server::start().await;
    let connector = scim_connector(json!({"base_url": server.base_url}));
    let created = user_event(
        "user.created",
        "u-1",
        json!({"userName": "alice", "name": {"givenName": "Alice", "familyName": "Adams"}}),
    );
    let applied = connector.apply(created.change(Operation::Create)).await.unwrap();
    assert_eq!(applied.outcome, Outcome::Created);
    let remote = server.user_by_external_id("u-1").await.expect("created on the server");
    assert_eq!(applied.remote_id.as_deref(), remote["id"].as_str());
    assert_eq!(remote["userName"], "alice");
    assert_eq!(remote["name"]["familyName"], "Adams");
    assert_eq!(remote["emails"][0]["value"], "u-1@example.com");

    // An attribute set by someone else must survive our update (PUT wiped them in WSO2).
    let id = remote["id"].as_str().unwrap().to_string();
    let patched = reqwest::Client::new()
        .patch(format!("{}/Users/{id}", server.base_url))
        .header("content-type", "application/scim+json")
        .json(&json!({"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
                      "Operations": [{"op": "replace", "path": "nickName", "value": "Ali"}]}))
        .send()
        .await
        .unwrap();
    assert!(patched.status().is_success());
    let updated = user_event(
        "user.updated",
        "u-1",
        json!({"userName": "alice", "name": {"givenName": "Alice", "familyName": "Adams-Smith"}}),
    );
    let applied = connector.apply(updated.change(Operation::Update)).await.unwrap();
    assert_eq!(applied.outcome, Outcome::Updated);
    let remote = server.user_by_external_id("u-1").await.unwrap();
    assert_eq!(remote["name"]["familyName"], "Adams-Smith");
    assert_eq!(remote["nickName"], "Ali", "an attribute we do not manage was wiped");

    let deleted = user_event("user.deleted", "u-1", json!({"userName": "alice"}));
    let applied = connector.apply(deleted.change(Operation::Delete)).await.unwrap();
    assert_eq!(applied.outcome, Outcome::Deleted);
    assert!(server.user_by_external_id("u-1").await.is_none());
    let again = connector.apply(deleted.change(Operation::Delete)).await.unwrap();
    assert_eq!(again.outcome, Outcome::AlreadyAbsent, "delete is idempotent");
}

#[tokio::test]
async fn an_existing_account_is_adopted_on_conflict() {
    let server = Scim2Server::start().await;
    let existing = server
        .create_directly(json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
                                "userName": "bob", "title": "Engineer"}))
        .await;
    let connector = scim_connector(json!({"base_url": server.base_url}));
    let event = user_event(
        "user.created",
        "u-bob",
        json!({"userName": "bob", "name": {"givenName": "Bob", "familyName": "Baker"}}),
    );
    let applied = connector.apply(event.change(Operation::Create)).await.unwrap();
    assert_eq!(applied.outcome, Outcome::Adopted);
    assert_eq!(applied.remote_id.as_deref(), existing["id"].as_str());
    let remote = server.user_by_external_id("u-bob").await.expect("externalId now set");
    assert_eq!(remote["name"]["givenName"], "Bob", "adopted account converged");
    assert_eq!(remote["title"], "Engineer", "and kept what we do not manage");
    assert_eq!(server.users().await.len(), 1, "no duplicate was created");

    // A replayed create finds the account again and changes nothing else.
    let replayed = connector.apply(event.change(Operation::Create)).await.unwrap();
    assert_eq!(replayed.outcome, Outcome::Adopted);
    assert_eq!(server.users().await.len(), 1);
}

#[tokio::test]
async fn deactivate_mode_keeps_the_account_and_turns_it_off() {
    let server = Scim2Server::start().await;
    let connector = scim_connector(json!({"base_url": server.base_url, "deprovision": "deactivate"}));
    let created = user_event("user.created", "u-carol", json!({"userName": "carol"}));
    connector.apply(created.change(Operation::Create)).await.unwrap();
    let deleted = user_event("user.deleted", "u-carol", json!({"userName": "carol"}));
    let applied = connector.apply(deleted.change(Operation::Delete)).await.unwrap();
    assert_eq!(applied.outcome, Outcome::Deactivated);
    let remote = server.user_by_external_id("u-carol").await.expect("still there");
    assert_eq!(remote["active"], false);

    let never_seen = user_event("user.deleted", "u-nobody", json!({"userName": "nobody"}));
    let applied = connector.apply(never_seen.change(Operation::Delete)).await.unwrap();
    assert_eq!(applied.outcome, Outcome::AlreadyAbsent);
}

#[tokio::test]
async fn hostile_user_names_are_escaped_in_filters() {
    let server = Scim2Server::start().await;
    let connector = scim_connector(json!({"base_url": server.base_url}));
    // Without escaping, this userName would turn the lookup into `userName pr`,
    // matching (and then deleting) some other user.
    let victim = user_event("user.created", "u-victim", json!({"userName": "victim"}));
    connector.apply(victim.change(Operation::Create)).await.unwrap();
    let hostile_name = r#"x" or userName pr or userName eq "y"#;
    let hostile = user_event("user.deleted", "u-hostile", json!({"userName": hostile_name}));
    let applied = connector.apply(hostile.change(Operation::Delete)).await.unwrap();
    assert_eq!(applied.outcome, Outcome::AlreadyAbsent);
    assert!(
        server.user_by_external_id("u-victim").await.is_some(),
        "the victim was deleted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_on_kafka_becomes_a_user_on_the_scim_server_and_a_reply() {
    let server = Scim2Server::start().await;
    let names = Names::new("scim-e2e");
    names.create(1).await;
    let settings = Settings::from_toml_str(&format!(
        r#"{}
        [connectors.directory]
        type = "scim2"
        base_url = "{}"

        [[tenants.acme.resident.bindings]]
        connector = "directory"
        blocking = true
        "#,
        names.kafka_toml(),
        server.base_url
    ))
    .unwrap();
    let connectors = provisioner::connectors::ConnectorSet::from_settings(
        &settings.connectors,
        &std::sync::Arc::new(provisioner::metrics::Metrics::new()),
    )
    .unwrap();
    let application = provisioner::app::Application::build_with_connectors(settings.clone(), connectors)
        .await
        .unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(application.run_until_stopped(shutdown.clone()));

    let client = provisioner::client::Client::connect(&settings.kafka).await.unwrap();
    let event = event_json(
        "e2e-1",
        "user.self_signed_up",
        "acme",
        "u-e2e",
        json!({"user": {"userName": "dana", "name": {"givenName": "Dana", "familyName": "Diaz"}}}),
    );
    let reply = client.send_and_wait(&event, Duration::from_secs(60)).await.unwrap();
    assert_eq!(reply.status, Status::Succeeded, "{reply:?}");
    let remote = server.user_by_external_id("u-e2e").await.expect("user on the server");
    assert_eq!(reply.results[0].remote_id.as_deref(), remote["id"].as_str());
    assert_eq!(remote["userName"], "dana");
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

// --- against the emulator ---------------------------------------------------------

#[tokio::test]
async fn throttling_carries_retry_after_and_is_retryable() {
    let (emulator, _shutdown) = emulator(ScimEmulatorSettings {
        faults: Faults {
            rate_429: 1.0,
            retry_after_seconds: 3,
            ..Faults::default()
        },
        ..ScimEmulatorSettings::default()
    })
    .await;
    let connector = scim_connector(json!({"base_url": emulator.base_url()}));
    let error = connector
        .apply(user_event("user.created", "u", json!({})).change(Operation::Create))
        .await
        .unwrap_err();
    assert!(error.is_retryable(), "{error:?}");
    assert_eq!(error.retry_after(), Some(Duration::from_secs(3)));
    assert_eq!(error.http_status(), Some(429));
}

#[tokio::test]
async fn a_429_is_waited_out_for_at_least_its_retry_after() {
    let (emulator, _shutdown) = emulator(ScimEmulatorSettings::default()).await;
    let connector = scim_connector(json!({"base_url": emulator.base_url()}));
    let event = user_event("user.created", "u-wait", json!({}));
    // Discovery first, so the 429 below hits the create itself.
    connector.apply(event.change(Operation::Delete)).await.unwrap();
    emulator.set_faults(Faults {
        rate_429: 1.0,
        retry_after_seconds: 1,
        ..Faults::default()
    });
    let started = Instant::now();
    let calls = AtomicU32::new(0);
    let outcome = run_with_retries(
        RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(2),
            max_elapsed: Duration::from_secs(30),
        },
        || async {
            let result = connector.apply(event.change(Operation::Create)).await;
            if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                emulator.set_faults(Faults::default());
            }
            result
        },
        |_, _, _| {},
    )
    .await;
    assert_eq!(outcome.result.unwrap().outcome, Outcome::Created);
    assert_eq!(outcome.attempts, 2);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "retried before Retry-After"
    );
}

#[tokio::test]
async fn a_500_then_success_is_retried_to_success() {
    let (emulator, _shutdown) = emulator(ScimEmulatorSettings::default()).await;
    let connector = scim_connector(json!({"base_url": emulator.base_url()}));
    let event = user_event("user.created", "u-500", json!({}));
    connector.apply(event.change(Operation::Delete)).await.unwrap();
    emulator.set_faults(Faults {
        rate_500: 1.0,
        ..Faults::default()
    });
    let calls = AtomicU32::new(0);
    let outcome = run_with_retries(
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(20),
            max_elapsed: Duration::from_secs(30),
        },
        || async {
            let result = connector.apply(event.change(Operation::Create)).await;
            if calls.fetch_add(1, Ordering::SeqCst) == 1 {
                emulator.set_faults(Faults::default());
            }
            result
        },
        |error, _, _| assert_eq!(error.http_status(), Some(500)),
    )
    .await;
    assert_eq!(outcome.result.unwrap().outcome, Outcome::Created);
    assert_eq!(outcome.attempts, 3);
    assert_eq!(emulator.user_count(), 1);
}

#[tokio::test]
async fn a_hanging_target_times_out_and_a_reset_is_a_transport_error() {
    let (emulator, _shutdown) = emulator(ScimEmulatorSettings::default()).await;
    let connector = scim_connector(json!({"base_url": emulator.base_url(), "http": {"request_timeout": "300ms"}}));
    let event = user_event("user.created", "u-hang", json!({}));
    connector.apply(event.change(Operation::Delete)).await.unwrap();
    emulator.set_faults(Faults {
        rate_hang: 1.0,
        ..Faults::default()
    });
    let error = connector.apply(event.change(Operation::Create)).await.unwrap_err();
    assert_eq!(error, ConnectorError::Timeout);
    assert!(error.is_retryable());
    emulator.set_faults(Faults {
        rate_reset: 1.0,
        ..Faults::default()
    });
    let error = connector.apply(event.change(Operation::Create)).await.unwrap_err();
    assert!(matches!(error, ConnectorError::Transport { .. }), "{error:?}");
    assert!(error.is_retryable());
}

#[tokio::test]
async fn a_400_with_scim_type_is_permanent_and_explained() {
    let server = Scim2Server::start().await;
    // scim2-server validates attribute types: a mapping that sends a string where a
    // boolean goes is refused with 400 invalidValue.
    let event = user_event("user.created", "u-bad", json!({"userName": "erin"}));
    let mut bad = event.clone();
    bad.data.user.attributes.insert("active".into(), json!("maybe"));
    let connector_with_bad_mapping = scim_connector(json!({
        "base_url": server.base_url,
        "attributes": {"active": "attributes.active"}
    }));
    let error = connector_with_bad_mapping
        .apply(bad.change(Operation::Create))
        .await
        .unwrap_err();
    assert!(!error.is_retryable(), "{error:?}");
    assert_eq!(error.http_status(), Some(400), "{error:?}");
    assert!(error.to_string().contains("scimType invalidValue"), "{error}");
}

#[tokio::test]
async fn oauth_tokens_are_cached_and_renewed_once_on_401() {
    let (emulator, _shutdown) = emulator(ScimEmulatorSettings {
        oauth_client: Some(("provisioner".into(), "s3cret-value".into(), Duration::from_secs(3600))),
        ..ScimEmulatorSettings::default()
    })
    .await;
    let connector = scim_connector(json!({
        "base_url": emulator.base_url(),
        "auth": {"mode": "oauth2", "token_url": emulator.token_url(), "client_id": "provisioner", "client_secret": "s3cret-value"}
    }));
    for index in 0..5 {
        let event = user_event("user.created", &format!("u-oauth-{index}"), json!({}));
        connector.apply(event.change(Operation::Create)).await.unwrap();
    }
    assert_eq!(emulator.tokens_issued(), 1, "one token for many calls");
    emulator.expire_tokens();
    let event = user_event("user.created", "u-oauth-after", json!({}));
    assert_eq!(
        connector.apply(event.change(Operation::Create)).await.unwrap().outcome,
        Outcome::Created
    );
    assert_eq!(emulator.tokens_issued(), 2, "renewed exactly once after the 401");

    let wrong = scim_connector(json!({
        "base_url": emulator.base_url(),
        "auth": {"mode": "oauth2", "token_url": emulator.token_url(), "client_id": "provisioner", "client_secret": "wrong"}
    }));
    let error = wrong.apply(event.change(Operation::Create)).await.unwrap_err();
    assert!(matches!(error, ConnectorError::Auth { .. }), "{error:?}");
    assert!(!error.is_retryable());
    assert!(!error.to_string().contains("wrong"), "the secret leaked into the error");
}

#[tokio::test]
async fn without_patch_updates_read_modify_write_and_keep_other_attributes() {
    let (emulator, _shutdown) = emulator(ScimEmulatorSettings {
        patch: false,
        ..ScimEmulatorSettings::default()
    })
    .await;
    let connector = scim_connector(json!({"base_url": emulator.base_url()}));
    let created = user_event(
        "user.created",
        "u-put",
        json!({"name": {"givenName": "Fay", "familyName": "Fox"}}),
    );
    connector.apply(created.change(Operation::Create)).await.unwrap();
    let updated = user_event(
        "user.updated",
        "u-put",
        json!({"name": {"givenName": "Fay", "familyName": "Fox-Hill"}, "active": false}),
    );
    assert_eq!(
        connector
            .apply(updated.change(Operation::Update))
            .await
            .unwrap()
            .outcome,
        Outcome::Updated
    );
    let remote = emulator.user_by_external_id("u-put").unwrap();
    assert_eq!(remote["name"]["familyName"], "Fox-Hill");
    assert_eq!(remote["active"], false, "active=false deactivates");
    assert_eq!(remote["emails"][0]["value"], "u-put@example.com");
}
