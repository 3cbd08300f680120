//! The provisioning state end to end, on Apache Kafka with the SCIM emulator: no stale
//! or replayed event rolls a target back or re-creates a deleted account, remote ids
//! are used, a target that cannot filter is still fully provisioned, a fresh instance
//! restores from the topic, and the key and topic rules are enforced.

use std::time::Duration;

use provisioner::app::{Application, StartupError};
use provisioner::connectors::ConnectorSet;
use provisioner::devtools::emulators::scim::{self as scim_emulator, ScimEmulator, ScimEmulatorSettings};
use provisioner::devtools::emulators::Faults;
use provisioner::kafka::dead_letters::{self, ReplaySelection};
use provisioner::kafka::partitioners::librdkafka_crc32;
use provisioner::result::{Outcome, ProvisioningResult, Status};
use provisioner::settings::Settings;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::support::app::{producer, publish, Names, TestApp, TopicReader};
use crate::support::broker::broker;
use crate::support::doubles::{event_json, user_key};

const WAIT: Duration = Duration::from_secs(60);
const PARTITIONS: i32 = 4;

async fn emulator(settings: ScimEmulatorSettings) -> (ScimEmulator, CancellationToken) {
    let shutdown = CancellationToken::new();
    let emulator = scim_emulator::start("127.0.0.1:0".parse().unwrap(), settings, shutdown.clone())
        .await
        .unwrap();
    (emulator, shutdown)
}

fn settings(names: &Names, scim_url: &str) -> Settings {
    Settings::from_toml_str(&format!(
        r#"{kafka}
        [connectors.directory]
        type = "scim2"
        base_url = "{scim_url}"
        [connectors.directory.delivery]
        initial_backoff = "20ms"
        max_backoff = "200ms"
        max_elapsed = "1s"
        circuit_breaker_failures = 1000

        [[tenants.acme.resident.bindings]]
        connector = "directory"
        blocking = true
        "#,
        kafka = names.kafka_toml(),
    ))
    .expect("valid settings")
}

/// Publishes to an explicit partition, as a producer with another partitioner would.
async fn publish_to(producer: &FutureProducer, topic: &str, partition: i32, payload: &[u8]) {
    let key = user_key(payload);
    producer
        .send(
            FutureRecord::to(topic)
                .key(&key)
                .payload(payload)
                .partition(partition)
                .headers(OwnedHeaders::new().insert(Header {
                    key: "content-type",
                    value: Some("application/cloudevents+json"),
                })),
            Timeout::After(Duration::from_secs(10)),
        )
        .await
        .map_err(|(error, _)| error)
        .expect("acknowledged");
}

fn user_event(id: &str, event_type: &str, user: &str, family: &str) -> Vec<u8> {
    event_json(
        id,
        event_type,
        "acme",
        user,
        json!({"user": {"userName": format!("user.{user}"), "name": {"givenName": "Test", "familyName": family}}}),
    )
}

fn searches(emulator: &ScimEmulator) -> usize {
    emulator
        .control
        .requests()
        .iter()
        .filter(|request| request.method == "GET" && request.path.ends_with("/Users"))
        .count()
}

/// The leaver scenario: a create fails for good while the target is down and is
/// dead-lettered; the user is then deleted (`already_absent`); `dlq replay` re-publishes
/// the old create. It must be judged by when it first happened: stale, no call, and the
/// account stays absent. The events are published to a partition that librdkafka's
/// partitioner would not pick for the key (as a Java producer's murmur2 may), so the
/// replay must go back to the original partition, where the user's state is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_create_older_than_the_delete_is_stale_and_the_leaver_stays_deleted() {
    let names = Names::new("leaver");
    names.create(PARTITIONS).await;
    let (emulator, _shutdown) = emulator(ScimEmulatorSettings::default()).await;
    let settings = settings(&names, &emulator.base_url());
    let app = TestApp::spawn_configured(settings.clone()).await;
    let producer = producer();
    let mut results = TopicReader::new(&names.results, 1);

    let create = user_event("e-create", "user.created", "u-leaver", "v1");
    let key = user_key(&create);
    let partition = (librdkafka_crc32(key.as_bytes(), PARTITIONS) + 1) % PARTITIONS;

    emulator.set_faults(Faults {
        rate_500: 1.0,
        ..Faults::default()
    });
    publish_to(&producer, &names.events, partition, &create).await;
    let failed = results.result_of("e-create", WAIT).await;
    assert_eq!(failed.status, Status::Failed, "{failed:?}");
    emulator.set_faults(Faults::default());

    let delete = user_event("e-delete", "user.deleted", "u-leaver", "v1");
    publish_to(&producer, &names.events, partition, &delete).await;
    let deleted = results.result_of("e-delete", WAIT).await;
    assert_eq!(deleted.results[0].outcome, Outcome::AlreadyAbsent, "{deleted:?}");

    let from = dead_letters::results_end(&settings.kafka).unwrap();
    let selection = ReplaySelection {
        reason: Some("connector_failed".into()),
        ..ReplaySelection::default()
    };
    let report = dead_letters::replay(&settings.kafka, &selection, false).await.unwrap();
    assert_eq!(report.replayed, 1);
    let kafka = settings.kafka.clone();
    let event_ids = report.event_ids.clone();
    let outcomes = tokio::task::spawn_blocking(move || dead_letters::await_outcomes(&kafka, &from, &event_ids, WAIT))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((outcomes.processed, outcomes.stale), (1, 1), "{outcomes:?}");

    results
        .read_until("the replayed create's result", WAIT, |records| {
            records
                .iter()
                .filter(|record| record.result().event_id == "e-create")
                .count()
                >= 2
        })
        .await;
    let replayed: Vec<ProvisioningResult> = results
        .records
        .iter()
        .map(|record| record.result())
        .filter(|result| result.event_id == "e-create")
        .collect();
    let stale = replayed.last().unwrap();
    assert_eq!(stale.results[0].outcome, Outcome::Stale, "{stale:?}");
    let superseded = stale.results[0].superseded_by.as_ref().expect("superseded_by");
    assert_eq!(superseded.event_id, "e-delete");
    assert_eq!(stale.version.as_ref().unwrap().partition, partition);
    assert!(
        emulator.users().is_empty(),
        "the leaver's account came back: {:?}",
        emulator.users()
    );
    assert_eq!(app.metrics.stale_events.with_label_values(&["directory"]).get(), 1);
    app.stop().await;
}

/// A user created, renamed twice and updated is changed in place by the id the state
/// remembers: one account, and no search after the create.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_renamed_twice_is_updated_in_place_by_remote_id() {
    let names = Names::new("rename");
    names.create(PARTITIONS).await;
    let (emulator, _shutdown) = emulator(ScimEmulatorSettings {
        etag: false,
        ..ScimEmulatorSettings::default()
    })
    .await;
    let app = TestApp::spawn_configured(settings(&names, &emulator.base_url())).await;
    let producer = producer();
    let mut results = TopicReader::new(&names.results, 1);
    let create = user_event("r-0", "user.created", "u-renamed", "Original");
    publish(&producer, &names.events, Some(&user_key(&create)), &create, &[]).await;
    let created = results.result_of("r-0", WAIT).await;
    let remote_id = created.results[0].remote_id.clone().expect("a remote id");
    let searches_after_create = searches(&emulator);
    for (index, user_name) in ["renamed.once", "renamed.twice"].iter().enumerate() {
        let id = format!("r-{}", index + 1);
        let rename = event_json(
            &id,
            "user.updated",
            "acme",
            "u-renamed",
            json!({"user": {"userName": user_name, "name": {"givenName": "Test", "familyName": "Renamed"}}}),
        );
        publish(&producer, &names.events, Some(&user_key(&rename)), &rename, &[]).await;
        let updated = results.result_of(&id, WAIT).await;
        assert_eq!(updated.results[0].outcome, Outcome::Updated, "{updated:?}");
        assert_eq!(updated.results[0].remote_id.as_deref(), Some(remote_id.as_str()));
    }
    let users = emulator.users();
    assert_eq!(users.len(), 1, "one account, renamed in place: {users:?}");
    assert_eq!(users[0]["userName"], "renamed.twice");
    assert_eq!(
        searches(&emulator),
        searches_after_create,
        "updates went by remote id, without a search"
    );
    app.stop().await;
}

/// A SCIM server whose `/ServiceProviderConfig` says `filter.supported: false`: with
/// filtering that works anyway, and with filtering refused outright (then a paged
/// listing finds the account). Create (adopting an account made by someone else),
/// update and delete all succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_does_not_advertise_filtering_is_fully_provisioned() {
    for filter_works in [true, false] {
        let names = Names::new("nofilter");
        names.create(PARTITIONS).await;
        let (emulator, _shutdown) = emulator(ScimEmulatorSettings {
            filter_advertised: false,
            filter_works,
            ..ScimEmulatorSettings::default()
        })
        .await;
        // Someone else's accounts first, so a listing has pages to read, and the user's
        // own account made by an admin, so the create must find it to adopt it.
        let http = reqwest::Client::new();
        for index in 0..150 {
            let body =
                json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": format!("other{index}")});
            http.post(format!("{}/Users", emulator.base_url()))
                .json(&body)
                .send()
                .await
                .unwrap();
        }
        let admin_made = json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": "user.u-existing", "externalId": "u-existing"});
        let response = http
            .post(format!("{}/Users", emulator.base_url()))
            .json(&admin_made)
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success());

        let app = TestApp::spawn_configured(settings(&names, &emulator.base_url())).await;
        let producer = producer();
        let mut results = TopicReader::new(&names.results, 1);
        let steps = [
            ("f-create", "user.created", "v1", Outcome::Adopted),
            ("f-update", "user.updated", "v2", Outcome::Updated),
            ("f-delete", "user.deleted", "v2", Outcome::Deleted),
        ];
        for (id, event_type, family, expected) in steps {
            let event = user_event(id, event_type, "u-existing", family);
            publish(&producer, &names.events, Some(&user_key(&event)), &event, &[]).await;
            let result = results.result_of(id, WAIT).await;
            assert_eq!(
                result.results[0].outcome, expected,
                "filter works: {filter_works}; {result:?}"
            );
        }
        let left: Vec<_> = emulator
            .users()
            .into_iter()
            .filter(|user| user["externalId"] == "u-existing")
            .collect();
        assert!(left.is_empty(), "the account is still there: {left:?}");
        assert_eq!(emulator.users().len(), 150, "only our user was touched");
        app.stop().await;
    }
}

/// A fresh instance with an empty local store restores the state from the topic before
/// processing, and applies the next event by remote id, without a search.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_instance_restores_from_the_topic_and_updates_by_remote_id() {
    let names = Names::new("restore");
    names.create(PARTITIONS).await;
    let (emulator, _shutdown) = emulator(ScimEmulatorSettings {
        etag: false,
        ..ScimEmulatorSettings::default()
    })
    .await;
    let settings = settings(&names, &emulator.base_url());
    let producer = producer();
    let mut results = TopicReader::new(&names.results, 1);
    let first = TestApp::spawn_configured(settings.clone()).await;
    for user in 0..10 {
        let create = user_event(&format!("c-{user}"), "user.created", &format!("u{user}"), "v1");
        publish(&producer, &names.events, Some(&user_key(&create)), &create, &[]).await;
    }
    for user in 0..10 {
        results.result_of(&format!("c-{user}"), WAIT).await;
    }
    first.stop().await;

    // A new instance: a local store of its own, empty.
    let second = TestApp::spawn_configured(settings).await;
    let searches_before = searches(&emulator);
    let update = user_event("u-3-update", "user.updated", "u3", "v2");
    publish(&producer, &names.events, Some(&user_key(&update)), &update, &[]).await;
    let updated = results.result_of("u-3-update", WAIT).await;
    assert_eq!(updated.results[0].outcome, Outcome::Updated);
    assert_eq!(
        searches(&emulator),
        searches_before,
        "the update went by the restored remote id"
    );
    assert!(
        second.metrics.state_records_restored.get() >= 1,
        "the state was restored"
    );
    assert_eq!(emulator.users().len(), 10);
    second.stop().await;
}

/// A record whose key is not its event's `tenant/user id` is dead-lettered `wrong_key`;
/// the partition moves on to the next event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_with_the_wrong_key_is_dead_lettered() {
    let names = Names::new("wrongkey");
    names.create(1).await;
    let (emulator, _shutdown) = emulator(ScimEmulatorSettings::default()).await;
    let app = TestApp::spawn_configured(settings(&names, &emulator.base_url())).await;
    let producer = producer();
    let misfiled = user_event("k-wrong", "user.created", "u-wrong", "v1");
    publish(&producer, &names.events, Some("acme/someone-else"), &misfiled, &[]).await;
    publish(&producer, &names.events, None, &misfiled, &[]).await;
    let good = user_event("k-good", "user.created", "u-good", "v1");
    publish(&producer, &names.events, Some(&user_key(&good)), &good, &[]).await;
    let mut results = TopicReader::new(&names.results, 1);
    let applied = results.result_of("k-good", WAIT).await;
    assert_eq!(applied.status, Status::Succeeded);
    let mut dead_letters = TopicReader::new(&names.dead_letters, 1);
    dead_letters
        .read_until("two dead letters", WAIT, |records| records.len() >= 2)
        .await;
    for record in &dead_letters.records[..2] {
        assert_eq!(record.headers["x-provisioner-reason"], "wrong_key");
        assert!(record.headers["x-provisioner-error"].contains("acme/u-wrong"));
    }
    assert!(!emulator.users().iter().any(|user| user["externalId"] == "u-wrong"));
    app.stop().await;
}

/// A state topic that cannot be the source of truth stops start-up with a clear error:
/// missing, the wrong partition count, or not compacted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_topic_that_cannot_hold_the_state_stops_start_up() {
    /// (case, the state topic's partitions and cleanup.policy if it exists, the error)
    type Case<'a> = (&'a str, Option<(i32, &'a str)>, &'a str);
    let cases: [Case; 3] = [
        ("missing", None, "does not exist"),
        (
            "partitions",
            Some((2, "compact")),
            "has 2 partitions but the input topic",
        ),
        ("policy", Some((PARTITIONS, "delete")), "cleanup.policy=delete"),
    ];
    for (case, topic, expected) in cases {
        let names = Names::new(&format!("badstate-{case}"));
        broker().create_topics(&[&names.events], PARTITIONS).await;
        broker()
            .create_topics(&[&names.results, &names.replies, &names.dead_letters], 1)
            .await;
        if let Some((partitions, policy)) = topic {
            broker()
                .create_topics_with(&[&names.state], partitions, &[("cleanup.policy", policy)])
                .await;
        }
        let settings = settings(&names, "http://127.0.0.1:9/unused");
        let application = Application::build_with_connectors(settings, ConnectorSet::default())
            .await
            .expect("builds");
        let outcome = tokio::time::timeout(WAIT, application.run_until_stopped(CancellationToken::new()))
            .await
            .expect("start-up gives up rather than waiting");
        let error = outcome.expect_err("start-up must refuse this state topic");
        assert!(
            matches!(error, StartupError::State(ref state) if !state.is_retryable()),
            "{error}"
        );
        let message = error.to_string();
        assert!(message.contains(expected), "{case}: {message}");
        assert!(
            message.contains(&names.state),
            "{case}: the message names the topic: {message}"
        );
    }
}
