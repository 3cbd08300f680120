//! Groups through the whole pipeline on Apache Kafka, with a recording target double
//! (which, like a real server, refuses a member that is not an account): memberships
//! run in their member's lane, after the member's create, however the group's and the
//! member's partitions differ; a member whose create failed, who was deleted, or who
//! never comes gets a result that says so instead of a `null` member; members of one
//! group are batched into shared requests; an older delta changes nothing. Each test
//! prints a `GROUPS-REPORT` line.

use std::cell::RefCell;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use provisioner::connectors::ConnectorError;
use provisioner::domain::MemberAction;
use provisioner::kafka::partitioners::librdkafka_crc32;
use provisioner::result::{ErrorKind, Outcome, ProvisioningResult, ResultScope, Status};
use provisioner::settings::Settings;
use serde_json::json;

use crate::support::app::{producer, publish, Names, OutputRecord, TestApp, TopicReader};
use crate::support::doubles::{event_json, RecordingConnector};
use crate::support::eventually;

const PARTITIONS: i32 = 4;
const WAIT: Duration = Duration::from_secs(60);

fn settings(names: &Names, member_wait: &str) -> Settings {
    let kafka = names.kafka_toml().replace(
        "[groups]",
        &format!("[groups]\n            member_wait = \"{member_wait}\""),
    );
    Settings::from_toml_str(&format!(
        r#"{kafka}
        [connectors.directory]
        type = "scim2"
        base_url = "http://127.0.0.1:9/scim/v2"
        [connectors.directory.delivery]
        initial_backoff = "20ms"
        max_backoff = "100ms"
        max_elapsed = "2s"

        [[tenants.acme.resident.bindings]]
        connector = "directory"
        "#,
    ))
    .expect("valid settings")
}

async fn start(test: &str, member_wait: &str) -> (Names, Arc<RecordingConnector>, TestApp) {
    let names = Names::new(test);
    names.create(PARTITIONS).await;
    let directory = RecordingConnector::new();
    let app = TestApp::spawn(settings(&names, member_wait), vec![("directory", directory.clone())]).await;
    (names, directory, app)
}

fn partition_of(key: &str) -> i32 {
    librdkafka_crc32(key.as_bytes(), PARTITIONS)
}

fn group_event(id: &str, event_type: &str, group: serde_json::Value, sequence: Option<&str>) -> Vec<u8> {
    let mut document = json!({
        "specversion": "1.0",
        "id": id,
        "source": "/tests",
        "type": event_type,
        "data": {"tenant": "acme", "group": group},
    });
    if let Some(sequence) = sequence {
        document["sequence"] = sequence.into();
    }
    serde_json::to_vec(&document).unwrap()
}

async fn publish_group(names: &Names, group_id: &str, payload: &[u8]) {
    publish(
        &producer(),
        &names.events,
        Some(&format!("acme/group:{group_id}")),
        payload,
        &[],
    )
    .await;
}

async fn publish_user(names: &Names, event_id: &str, event_type: &str, user: &str) {
    let payload = event_json(event_id, event_type, "acme", user, json!({}));
    publish(&producer(), &names.events, Some(&format!("acme/{user}")), &payload, &[]).await;
}

/// Complete results on the results topic, as read so far.
fn complete(records: &[OutputRecord]) -> Vec<ProvisioningResult> {
    records
        .iter()
        .map(OutputRecord::result)
        .filter(|result| result.scope == ResultScope::Complete)
        .collect()
}

/// Reads until the group event `event_id`'s own result (not one of its memberships')
/// has arrived.
async fn group_result(results: &mut TopicReader, event_id: &str) -> ProvisioningResult {
    results
        .read_until(&format!("the group's result of {event_id}"), WAIT, |records| {
            complete(records)
                .iter()
                .any(|result| result.event_id == event_id && result.user_id.is_empty())
        })
        .await;
    complete(&results.records)
        .into_iter()
        .find(|result| result.event_id == event_id && result.user_id.is_empty())
        .expect("read until it arrived")
}

/// Reads until the membership of `user` in the group event `event_id` has its result.
async fn membership_result(results: &mut TopicReader, event_id: &str, user: &str) -> ProvisioningResult {
    results
        .read_until(&format!("the membership of {user} from {event_id}"), WAIT, |records| {
            complete(records)
                .iter()
                .any(|result| result.event_id == event_id && result.user_id == user)
        })
        .await;
    complete(&results.records)
        .into_iter()
        .find(|result| result.event_id == event_id && result.user_id == user)
        .expect("read until it arrived")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_membership_that_arrives_before_its_members_create_is_applied_after_it() {
    let (names, directory, app) = start("groups-causal", "60s").await;
    // The member's partition differs from the group's: the membership travels.
    let group_partition = partition_of("acme/group:engineering");
    let member = (0..)
        .map(|index| format!("early-{index}"))
        .find(|user| partition_of(&format!("acme/{user}")) != group_partition)
        .unwrap();
    publish_group(
        &names,
        "engineering",
        &group_event(
            "g-created",
            "group.created",
            json!({"id": "engineering", "displayName": "Engineering", "members": [member]}),
            None,
        ),
    )
    .await;
    let mut results = TopicReader::new(&names.results, 1);
    let group_result = group_result(&mut results, "g-created").await;
    assert_eq!(group_result.group_id.as_deref(), Some("engineering"));
    assert_eq!(group_result.results[0].outcome, Outcome::Created, "{group_result:?}");
    assert_eq!(group_result.results[0].members_added, Some(1), "{group_result:?}");
    // The membership is in its member's lane, waiting: the member has no account yet.
    eventually("the membership to wait for its member", WAIT, || async {
        (app.metrics.memberships_waiting.get() == 1).then_some(())
    })
    .await;
    assert!(directory.group("engineering").unwrap().members.is_empty());

    let waited_from = Instant::now();
    publish_user(&names, "u-created", "user.created", &member).await;
    let membership = membership_result(&mut results, "g-created", &member).await;
    let after_create = waited_from.elapsed();
    assert_eq!(membership.status, Status::Succeeded, "{membership:?}");
    assert_eq!(membership.group_id.as_deref(), Some("engineering"));
    assert_eq!(membership.results[0].outcome, Outcome::MembersAdded, "{membership:?}");
    assert_eq!(membership.results[0].members_added, Some(1));
    let members = directory.group("engineering").unwrap().members;
    assert_eq!(members, [format!("remote-{member}")].into_iter().collect());
    assert!(
        directory.membership_requests().iter().all(|(_, size)| *size > 0),
        "no empty membership request"
    );
    app.stop().await;
    eprintln!(
        "GROUPS-REPORT causal: group on partition {group_partition}, member on partition {}; the membership waited for the member's create and was applied {after_create:?} after it was published",
        partition_of(&format!("acme/{member}"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memberships_of_members_that_failed_were_deleted_or_never_came_say_why() {
    let (names, directory, app) = start("groups-why", "2s").await;
    let mut results = TopicReader::new(&names.results, 1);
    // `failed`'s create fails for good; `leaver` is created, then deleted.
    directory.fail_next(
        "acme/failed",
        vec![ConnectorError::Rejected {
            status: 400,
            message: "userName is invalid".into(),
        }],
    );
    publish_user(&names, "failed-create", "user.created", "failed").await;
    publish_user(&names, "leaver-create", "user.created", "leaver").await;
    publish_user(&names, "leaver-delete", "user.deleted", "leaver").await;
    for event in ["failed-create", "leaver-create", "leaver-delete"] {
        results.result_of(event, WAIT).await;
    }
    let started = Instant::now();
    publish_group(
        &names,
        "sales",
        &group_event(
            "sales-created",
            "group.created",
            json!({"id": "sales", "displayName": "Sales", "members": ["failed", "leaver", "never"]}),
            None,
        ),
    )
    .await;
    let failed = membership_result(&mut results, "sales-created", "failed").await;
    assert_eq!(failed.status, Status::Failed, "{failed:?}");
    let error = failed.results[0].error.as_ref().expect("an error");
    assert_eq!(error.kind, ErrorKind::Dependency, "{failed:?}");
    assert!(error.message.contains("failed for good"), "{}", error.message);

    let leaver = membership_result(&mut results, "sales-created", "leaver").await;
    assert_eq!(leaver.results[0].outcome, Outcome::Skipped, "{leaver:?}");
    assert!(
        leaver.results[0]
            .reason
            .as_deref()
            .unwrap_or_default()
            .contains("deleted"),
        "{leaver:?}"
    );

    let never = membership_result(&mut results, "sales-created", "never").await;
    let never_took = started.elapsed();
    assert_eq!(never.results[0].outcome, Outcome::Skipped, "{never:?}");
    let reason = never.results[0].reason.clone().unwrap_or_default();
    assert!(reason.contains("no account"), "{reason}");
    assert!(
        never_took >= Duration::from_secs(2),
        "skipped before member_wait: {never_took:?}"
    );
    // No request ever named a member the target does not have.
    assert!(directory.group("sales").unwrap().members.is_empty());
    assert!(
        directory.membership_requests().is_empty(),
        "memberships sent: {:?}",
        directory.membership_requests()
    );
    app.stop().await;
    eprintln!(
        "GROUPS-REPORT why: failed create → failed ({}), deleted → skipped, never created → skipped after {never_took:?} (member_wait 2 s); 0 membership requests sent",
        error.kind.as_str()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_groups_members_are_batched_and_an_older_delta_changes_nothing() {
    const MEMBERS: usize = 250;
    let (names, directory, app) = start("groups-batch", "60s").await;
    let mut results = TopicReader::new(&names.results, 1);
    let users: Vec<String> = (0..MEMBERS).map(|index| format!("m{index:03}")).collect();
    for user in &users {
        publish_user(&names, &format!("create-{user}"), "user.created", user).await;
    }
    let created = RefCell::new(HashSet::new());
    results
        .read_until("every member's create", WAIT, |records| {
            let mut created = created.borrow_mut();
            for result in complete(records) {
                if result.event_id.starts_with("create-") {
                    created.insert(result.event_id);
                }
            }
            created.len() == MEMBERS
        })
        .await;

    let started = Instant::now();
    publish_group(
        &names,
        "everyone",
        &group_event(
            "everyone-created",
            "group.created",
            json!({"id": "everyone", "displayName": "Everyone", "members": users, }),
            Some("10"),
        ),
    )
    .await;
    let applied = RefCell::new(HashSet::new());
    results
        .read_until("every membership", WAIT, |records| {
            let mut applied = applied.borrow_mut();
            for result in complete(records) {
                if result.event_id == "everyone-created" && !result.user_id.is_empty() {
                    assert_eq!(result.results[0].outcome, Outcome::MembersAdded, "{result:?}");
                    applied.insert(result.user_id);
                }
            }
            applied.len() == MEMBERS
        })
        .await;
    let took = started.elapsed();
    assert_eq!(directory.group("everyone").unwrap().members.len(), MEMBERS);
    let requests = directory.membership_requests();
    let largest = requests.iter().map(|(_, size)| *size).max().unwrap_or(0);
    assert!(
        largest <= 100,
        "a request carried {largest} members, over the connector's 100"
    );
    assert!(
        requests.len() < MEMBERS / 2,
        "{} requests for {MEMBERS} members: not batched",
        requests.len()
    );

    // An older delta (sequence 5 < 10) removing a member, published later: stale, and
    // the member stays.
    publish_group(
        &names,
        "everyone",
        &group_event(
            "everyone-older",
            "group.updated",
            json!({"id": "everyone", "displayName": "Everyone", "removed": ["m007"]}),
            Some("5"),
        ),
    )
    .await;
    let older = group_result(&mut results, "everyone-older").await;
    assert_eq!(older.results[0].outcome, Outcome::Stale, "{older:?}");
    // A newer one (sequence 11) removes another: applied.
    publish_group(
        &names,
        "everyone",
        &group_event(
            "everyone-newer",
            "group.updated",
            json!({"id": "everyone", "displayName": "Everyone", "removed": ["m008"]}),
            Some("11"),
        ),
    )
    .await;
    let removal = membership_result(&mut results, "everyone-newer", "m008").await;
    assert_eq!(removal.results[0].outcome, Outcome::MembersRemoved, "{removal:?}");
    let members = directory.group("everyone").unwrap().members;
    assert!(members.contains("remote-m007"), "the older delta removed m007");
    assert!(!members.contains("remote-m008"));
    let removes = directory
        .membership_requests()
        .iter()
        .filter(|(action, _)| *action == MemberAction::Remove)
        .count();
    assert_eq!(removes, 1, "only the newer delta made a remove request");
    app.stop().await;
    eprintln!(
        "GROUPS-REPORT batch: {MEMBERS} members applied in {} requests (largest {largest}) in {took:?} from the group's event; an older delta was stale (no request), a newer one removed its member",
        requests.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_list_near_the_event_size_limit_is_written_in_chunks_and_every_member_answered() {
    // UUID-like ids, as WSO2 gives: about 20,000 fill most of max_event_bytes.
    const MEMBERS: usize = 20_000;
    let (names, directory, app) = start("groups-huge", "1s").await;
    let members: Vec<String> = (0..MEMBERS)
        .map(|index| format!("{index:08x}-7d1c-4f44-9b0e-2a5e0c3e9f10"))
        .collect();
    let payload = group_event(
        "huge-created",
        "group.created",
        json!({"id": "huge", "displayName": "Everyone, really", "members": members}),
        None,
    );
    let limit = provisioner::settings::PipelineSettings::default().max_event_bytes;
    assert!(
        payload.len() > limit * 3 / 4 && payload.len() < limit,
        "the event is {} bytes, limit {limit}",
        payload.len()
    );
    let started = Instant::now();
    publish_group(&names, "huge", &payload).await;
    let mut results = TopicReader::new(&names.results, 1);
    let group_result = group_result(&mut results, "huge-created").await;
    assert_eq!(group_result.results[0].outcome, Outcome::Created, "{group_result:?}");
    assert_eq!(group_result.results[0].members_added, Some(MEMBERS as u64));
    let written_in = started.elapsed();
    // None of them is a user on the target: each is answered `skipped` after the
    // 1 s member_wait, none is sent.
    let answered = RefCell::new(0usize);
    let seen = RefCell::new(0usize);
    results
        .read_until("every member answered", Duration::from_secs(240), |records| {
            let mut answered = answered.borrow_mut();
            let mut seen = seen.borrow_mut();
            for record in &records[(*seen).min(records.len())..] {
                let result = record.result();
                if result.event_id == "huge-created" && !result.user_id.is_empty() {
                    assert_eq!(result.results[0].outcome, Outcome::Skipped, "{result:?}");
                    *answered += 1;
                }
            }
            *seen = records.len();
            *answered == MEMBERS
        })
        .await;
    let answered_in = started.elapsed();
    assert!(directory.membership_requests().is_empty());
    let emitted = app
        .metrics
        .memberships_emitted
        .with_label_values(&["directory", "add"])
        .get();
    assert_eq!(emitted, MEMBERS as u64, "each membership written once");
    app.stop().await;
    eprintln!(
        "GROUPS-REPORT huge: a {}-byte group event with {MEMBERS} members: its memberships written in {written_in:?} (chunks of 500, progress saved), every member answered (skipped: not a user) in {answered_in:?}; 0 requests",
        payload.len()
    );
}
