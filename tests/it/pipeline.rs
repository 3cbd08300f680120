//! The at-least-once pipeline against a real broker, with target doubles.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use provisioner::connectors::ConnectorError;
use provisioner::result::{Operation, Outcome, ResultScope, Status};
use provisioner::settings::Settings;

use crate::support::app::{committed_offsets, producer, publish, record_count, Names, TestApp, TopicReader};
use crate::support::doubles::{event_json, user_key, RecordingConnector};

const WAIT: Duration = Duration::from_secs(60);

fn settings(names: &Names, rest: &str) -> Settings {
    Settings::from_toml_str(&format!("{}\n{rest}", names.kafka_toml())).expect("test settings are valid")
}

/// Two connectors (a blocking `directory`, a non-blocking `crm`) bound to tenant `acme`.
const TWO_CONNECTORS: &str = r#"
[pipeline]
max_in_flight = 64

[connectors.directory]
type = "scim2"
base_url = "http://127.0.0.1:9/unused"
[connectors.directory.delivery]
max_in_flight = 8
initial_backoff = "10ms"
max_backoff = "50ms"

[connectors.crm]
type = "scim2"
base_url = "http://127.0.0.1:9/unused"

[[tenants.acme.resident.bindings]]
connector = "directory"
blocking = true
jit_outbound = true

[[tenants.acme.service_providers.portal.bindings]]
connector = "directory"
blocking = true

[[tenants.acme.service_providers.portal.bindings]]
connector = "crm"
blocking = false
jit_outbound = true
rule = "'sales' in roles"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_user_order_holds_under_concurrency_and_concurrency_is_bounded() {
    let names = Names::new("order");
    names.create(4).await;
    let directory = RecordingConnector::new().with_latency(Duration::from_millis(1), Duration::from_millis(25));
    let app = TestApp::spawn(settings(&names, TWO_CONNECTORS), vec![("directory", directory.clone())]).await;

    let producer = producer();
    let users = 60;
    // Creates and deletes interleaved across users; each user's delete follows its create.
    for round in ["user.created", "user.deleted"] {
        for user in 0..users {
            let user_id = format!("u{user}");
            let payload = event_json(
                &format!("{round}-{user}"),
                round,
                "acme",
                &user_id,
                serde_json::json!({}),
            );
            publish(
                &producer,
                &names.events,
                Some(&format!("acme/{user_id}")),
                &payload,
                &[],
            )
            .await;
        }
    }
    let mut results = TopicReader::new(&names.results, 1);
    results
        .read_until("every result", WAIT, |records| records.len() >= 2 * users)
        .await;

    let calls = directory.calls();
    let mut by_user: HashMap<String, Vec<_>> = HashMap::new();
    for call in &calls {
        by_user.entry(call.user_key.clone()).or_default().push(call.clone());
    }
    assert_eq!(by_user.len(), users);
    for (user, calls) in &by_user {
        let create = calls
            .iter()
            .find(|call| call.operation == Operation::Create)
            .expect("a create");
        let delete = calls
            .iter()
            .find(|call| call.operation == Operation::Delete)
            .expect("a delete");
        assert!(
            create.finished < delete.started,
            "{user}: delete started before its create finished"
        );
        assert_eq!(delete.outcome, Outcome::Deleted, "{user}: the delete found the account");
        assert!(!directory.has_account(user));
    }
    let most = directory.most_at_once();
    assert!(most > 1, "users ran one at a time (most at once = {most})");
    assert!(most <= 8, "connector limit of 8 exceeded: {most}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_reply_does_not_wait_for_non_blocking_bindings() {
    let names = Names::new("reply");
    names.create(1).await;
    let directory = RecordingConnector::new();
    let crm = RecordingConnector::new();
    let crm_gate = crm.gated();
    let app = TestApp::spawn(
        settings(&names, TWO_CONNECTORS),
        vec![("directory", directory.clone()), ("crm", crm.clone())],
    )
    .await;

    let payload = event_json(
        "e-reply",
        "user.self_signed_up",
        "acme",
        "u-reply",
        serde_json::json!({"service_provider": "portal", "user": {"roles": ["sales"]}}),
    );
    publish(
        &producer(),
        &names.events,
        Some("acme/u-reply"),
        &payload,
        &[("correlation_id", "corr-1"), ("reply_to", &names.replies)],
    )
    .await;

    // The crm call is held at its gate, yet the reply arrives.
    let mut replies = TopicReader::new(&names.replies, 1);
    replies
        .read_until("the reply", WAIT, |records| !records.is_empty())
        .await;
    let reply = replies.records[0].result();
    assert_eq!(replies.records[0].key.as_deref(), Some("corr-1"));
    assert_eq!(reply.correlation_id.as_deref(), Some("corr-1"));
    assert_eq!(reply.scope, ResultScope::Blocking);
    assert_eq!(reply.status, Status::Succeeded);
    assert_eq!(reply.results.len(), 1);
    assert_eq!(reply.results[0].connector, "directory");
    assert_eq!(reply.results[0].outcome, Outcome::Created);
    assert_eq!(reply.results[0].remote_id.as_deref(), Some("remote-u-reply"));
    assert_eq!(crm.attempts(), 0, "the non-blocking call is still held");

    crm_gate.add_permits(1);
    let mut results = TopicReader::new(&names.results, 1);
    results
        .read_until("the complete result", WAIT, |records| !records.is_empty())
        .await;
    let complete = results.records[0].result();
    assert_eq!(results.records[0].key.as_deref(), Some("acme/u-reply"));
    assert_eq!(complete.scope, ResultScope::Complete);
    let outcomes: BTreeMap<_, _> = complete
        .results
        .iter()
        .map(|result| (result.connector.as_str(), result.outcome))
        .collect();
    assert_eq!(
        outcomes,
        BTreeMap::from([("crm", Outcome::Created), ("directory", Outcome::Created)])
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jit_flag_resident_fallback_and_rules_are_honoured() {
    let names = Names::new("routing");
    names.create(1).await;
    let directory = RecordingConnector::new();
    let crm = RecordingConnector::new();
    let app = TestApp::spawn(
        settings(&names, TWO_CONNECTORS),
        vec![("directory", directory.clone()), ("crm", crm.clone())],
    )
    .await;
    let producer = producer();
    let cases = [
        // (event id, type, user, extra data)
        ("resident", "user.created", "u1", serde_json::json!({})),
        (
            "unknown-app",
            "user.created",
            "u2",
            serde_json::json!({"service_provider": "nope"}),
        ),
        (
            "rule-true",
            "user.created",
            "u3",
            serde_json::json!({"service_provider": "portal", "user": {"roles": ["sales"]}}),
        ),
        (
            "rule-false",
            "user.created",
            "u4",
            serde_json::json!({"service_provider": "portal", "user": {"roles": ["hr"]}}),
        ),
        (
            "jit-portal",
            "user.jit_provisioned",
            "u5",
            serde_json::json!({"service_provider": "portal", "identity_provider": "Partner", "user": {"roles": ["sales"]}}),
        ),
        (
            "jit-resident",
            "user.jit_provisioned",
            "u6",
            serde_json::json!({"identity_provider": "Partner"}),
        ),
        (
            "other-tenant",
            "user.created",
            "u7",
            serde_json::json!({"tenant": "globex"}),
        ),
    ];
    for (id, event_type, user, extra) in &cases {
        let payload = event_json(id, event_type, "acme", user, extra.clone());
        publish(&producer, &names.events, Some(&user_key(&payload)), &payload, &[]).await;
    }
    let mut results = TopicReader::new(&names.results, 1);
    results
        .read_until("every result", WAIT, |records| records.len() >= cases.len())
        .await;
    let by_event: HashMap<String, _> = results
        .records
        .iter()
        .map(|record| {
            let result = record.result();
            (result.event_id.clone(), result)
        })
        .collect();
    let outcome = |event: &str, connector: &str| {
        by_event[event]
            .results
            .iter()
            .find(|result| result.connector == connector)
            .map(|result| result.outcome)
    };
    assert_eq!(outcome("resident", "directory"), Some(Outcome::Created));
    assert_eq!(outcome("resident", "crm"), None, "crm is not a resident binding");
    assert_eq!(
        outcome("unknown-app", "directory"),
        Some(Outcome::Created),
        "unknown app falls back to resident"
    );
    assert_eq!(outcome("rule-true", "crm"), Some(Outcome::Created));
    assert_eq!(outcome("rule-false", "crm"), Some(Outcome::Skipped));
    assert_eq!(outcome("rule-false", "directory"), Some(Outcome::Created));
    assert_eq!(
        outcome("jit-portal", "crm"),
        Some(Outcome::Created),
        "crm has jit_outbound"
    );
    assert_eq!(
        outcome("jit-portal", "directory"),
        Some(Outcome::Skipped),
        "the portal's directory binding has no jit_outbound"
    );
    assert_eq!(
        outcome("jit-resident", "directory"),
        Some(Outcome::Created),
        "the resident binding has jit_outbound"
    );
    let other = &by_event["other-tenant"];
    assert_eq!(other.status, Status::Skipped);
    assert!(
        other.reason.as_deref().unwrap_or_default().contains("globex"),
        "{other:?}"
    );
    assert!(!crm.has_account("acme/u4"), "rule false means no call");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_is_dead_lettered_and_the_partition_moves_on() {
    let names = Names::new("dlq");
    names.create(1).await;
    let directory = RecordingConnector::new();
    let app = TestApp::spawn(settings(&names, TWO_CONNECTORS), vec![("directory", directory.clone())]).await;
    let producer = producer();
    publish(&producer, &names.events, Some("k-bad-json"), b"{not json", &[]).await;
    publish(
        &producer,
        &names.events,
        Some("k-bad-blocking"),
        br#"{"specversion":"1.0","id":"x","source":"s","type":"user.created","data":{"user":{"id":"u","userName":"n"}}}"#,
        &[("correlation_id", "corr-bad"), ("reply_to", &names.replies)],
    )
    .await;
    publish(&producer, &names.events, None, &[0xff, 0xfe, 0x00], &[]).await;
    let good = event_json("good", "user.created", "acme", "u-good", serde_json::json!({}));
    publish(&producer, &names.events, Some(&user_key(&good)), &good, &[]).await;

    let mut dead_letters = TopicReader::new(&names.dead_letters, 1);
    dead_letters
        .read_until("three dead letters", WAIT, |records| records.len() >= 3)
        .await;
    // Undecodable records have nothing to be ordered against, so they run concurrently
    // and their dead letters may be written in any order: compare them in input order.
    dead_letters
        .records
        .sort_by_key(|record| record.headers["x-provisioner-source-offset"].parse::<i64>().unwrap());
    let reasons: Vec<&str> = dead_letters
        .records
        .iter()
        .map(|record| record.headers["x-provisioner-reason"].as_str())
        .collect();
    assert_eq!(reasons, vec!["invalid_json", "missing_field", "invalid_utf8"]);
    let first = &dead_letters.records[0];
    assert_eq!(first.value, b"{not json");
    assert_eq!(first.key.as_deref(), Some("k-bad-json"));
    assert_eq!(first.headers["x-provisioner-source-topic"], names.events);
    assert_eq!(first.headers["x-provisioner-source-offset"], "0");
    assert_eq!(
        dead_letters.records[1].headers["correlation_id"], "corr-bad",
        "original headers kept"
    );

    // The blocking caller of the malformed event is told, not left waiting.
    let mut replies = TopicReader::new(&names.replies, 1);
    replies
        .read_until("the failure reply", WAIT, |records| !records.is_empty())
        .await;
    let reply = replies.records[0].result();
    assert_eq!(reply.status, Status::Failed);
    assert!(reply.reason.unwrap().contains("missing_field"));

    let mut results = TopicReader::new(&names.results, 1);
    results
        .read_until("the good event's result", WAIT, |records| !records.is_empty())
        .await;
    assert_eq!(results.records[0].result().event_id, "good");
    assert!(directory.has_account("acme/u-good"));
    let dead_letter_count = app.metrics.dead_letters.with_label_values(&["invalid_json"]).get();
    assert_eq!(dead_letter_count, 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_to_outside_the_allow_list_is_not_written() {
    let names = Names::new("allowlist");
    names.create(1).await;
    let forbidden = crate::support::unique_topic("forbidden");
    crate::support::broker::broker().create_topics(&[&forbidden], 1).await;
    let directory = RecordingConnector::new();
    let app = TestApp::spawn(settings(&names, TWO_CONNECTORS), vec![("directory", directory.clone())]).await;
    let producer = producer();
    let first = event_json("to-forbidden", "user.created", "acme", "u1", serde_json::json!({}));
    publish(
        &producer,
        &names.events,
        Some(&user_key(&first)),
        &first,
        &[("correlation_id", "c-forbidden"), ("reply_to", &forbidden)],
    )
    .await;
    let second = event_json("to-allowed", "user.updated", "acme", "u1", serde_json::json!({}));
    publish(
        &producer,
        &names.events,
        Some(&user_key(&second)),
        &second,
        &[("correlation_id", "c-allowed"), ("reply_to", &names.replies)],
    )
    .await;
    // Same user, so the allowed event runs strictly after the refused one: once its
    // reply is here, a reply to the forbidden topic would have been written already.
    let mut replies = TopicReader::new(&names.replies, 1);
    replies
        .read_until("the allowed reply", WAIT, |records| !records.is_empty())
        .await;
    let mut results = TopicReader::new(&names.results, 1);
    results
        .read_until("both results", WAIT, |records| records.len() >= 2)
        .await;
    assert_eq!(app.metrics.replies_refused.get(), 1);
    assert_eq!(
        record_count(&forbidden, 1),
        0,
        "something was written to the forbidden topic"
    );
    assert!(directory.has_account("acme/u1"), "the event itself was still processed");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_and_permanent_ones_dead_lettered() {
    let names = Names::new("retry");
    names.create(1).await;
    let directory = RecordingConnector::new();
    directory.fail_next(
        "acme/u-flaky",
        vec![
            ConnectorError::Server {
                status: 503,
                message: "busy".into(),
                retry_after: None,
            },
            ConnectorError::Timeout,
        ],
    );
    directory.fail_next(
        "acme/u-refused",
        vec![ConnectorError::Rejected {
            status: 400,
            message: "invalidValue: userName".into(),
        }],
    );
    let app = TestApp::spawn(settings(&names, TWO_CONNECTORS), vec![("directory", directory.clone())]).await;
    let producer = producer();
    for user in ["u-flaky", "u-refused"] {
        let payload = event_json(user, "user.created", "acme", user, serde_json::json!({}));
        publish(&producer, &names.events, Some(&user_key(&payload)), &payload, &[]).await;
    }
    let mut results = TopicReader::new(&names.results, 1);
    results
        .read_until("two results", WAIT, |records| records.len() >= 2)
        .await;
    let by_event: HashMap<String, _> = results
        .records
        .iter()
        .map(|record| (record.result().event_id.clone(), record.result()))
        .collect();
    let flaky = &by_event["u-flaky"].results[0];
    assert_eq!(flaky.outcome, Outcome::Created);
    assert_eq!(flaky.attempts, 3);
    let refused = &by_event["u-refused"];
    assert_eq!(refused.status, Status::Failed);
    assert_eq!(refused.results[0].attempts, 1, "permanent errors are not retried");
    let error = refused.results[0].error.as_ref().unwrap();
    assert_eq!(error.http_status, Some(400));
    assert!(!error.retryable);
    let mut dead_letters = TopicReader::new(&names.dead_letters, 1);
    dead_letters
        .read_until("the failed event", WAIT, |records| !records.is_empty())
        .await;
    assert_eq!(
        dead_letters.records[0].headers["x-provisioner-reason"],
        "connector_failed"
    );
    assert!(dead_letters.records[0].headers["x-provisioner-error"].contains("invalidValue"));
    app.stop().await;
}

/// Kill the service mid-stream, restart it: every event has its effect, and the
/// committed offset never passed an event without one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abrupt_stop_loses_nothing_and_offsets_never_pass_unfinished_work() {
    let names = Names::new("crash");
    let partitions = 2;
    names.create(partitions).await;
    let directory = RecordingConnector::new().with_latency(Duration::from_millis(5), Duration::from_millis(40));
    let config = settings(&names, TWO_CONNECTORS);
    let first = TestApp::spawn(config.clone(), vec![("directory", directory.clone())]).await;

    let producer = producer();
    let total = 200;
    for index in 0..total {
        let user = format!("u{}", index % 50);
        let payload = event_json(
            &format!("e{index}"),
            "user.updated",
            "acme",
            &user,
            serde_json::json!({}),
        );
        publish(&producer, &names.events, Some(&format!("acme/{user}")), &payload, &[]).await;
    }
    crate::support::eventually("some progress before the kill", WAIT, || async {
        (directory.calls().len() >= total / 4).then_some(())
    })
    .await;
    first.kill().await;

    // Offsets committed by the killed instance: every event below them has an effect.
    let committed = committed_offsets(&names.group, &names.events, partitions);
    let done_events: std::collections::HashSet<String> =
        directory.calls().into_iter().map(|call| call.event_id).collect();
    let mut reader = TopicReader::new(&names.events, partitions);
    reader
        .read_until("the input", WAIT, |records| records.len() >= total)
        .await;
    assert!(
        committed.iter().any(|offset| *offset > 0),
        "nothing committed before the kill: {committed:?}"
    );
    for record in &reader.records {
        let event: serde_json::Value = serde_json::from_slice(&record.value).unwrap();
        let event_id = event["id"].as_str().unwrap();
        if record.offset < committed[record.partition as usize] {
            assert!(
                done_events.contains(event_id),
                "partition {}: offset committed past {event_id} (offset {}), which had no effect",
                record.partition,
                record.offset
            );
        }
    }

    let second = TestApp::spawn(config, vec![("directory", directory.clone())]).await;
    crate::support::eventually("every event applied after the restart", WAIT, || async {
        let done: std::collections::HashSet<String> = directory.calls().into_iter().map(|call| call.event_id).collect();
        (done.len() == total).then_some(())
    })
    .await;
    second.stop().await;
}
