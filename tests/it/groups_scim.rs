//! Groups end to end on Apache Kafka against SCIM targets: the project's emulator (which
//! refuses more than 100 membership changes per request, as AWS does, and members that
//! are not users) and scim2-server, a real SCIM server. A group of 250 whose event comes
//! before its members' creates; a rename with a hostile name, members added and
//! removed; a deleted member; an existing group adopted; the group deleted. The end state
//! is checked after a sentinel event. Each test prints a `GROUPS-REPORT` line.

// The SCIM emulator is a devtool.
#![cfg(feature = "devtools")]

use std::cell::RefCell;
use std::collections::{BTreeSet, HashSet};
use std::time::{Duration, Instant};

use provisioner::devtools::emulators::scim::{self as scim_emulator, ScimEmulator, ScimEmulatorSettings};
use provisioner::result::{Outcome, ResultScope};
use provisioner::settings::Settings;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::scim_groups::scim2_server_with_unique_group_names;
use crate::support::app::{producer, publish, Names, OutputRecord, TestApp, TopicReader};
use crate::support::doubles::event_json;

const PARTITIONS: i32 = 4;
const WAIT: Duration = Duration::from_secs(120);

fn settings(names: &Names, base_url: &str) -> Settings {
    let kafka = names
        .kafka_toml()
        .replace("[groups]", "[groups]\n            member_wait = \"2m\"");
    Settings::from_toml_str(&format!(
        r#"{kafka}
        [connectors.directory]
        type = "scim2"
        base_url = "{base_url}"
        max_members_per_request = 100
        # `active` from a claim (when a user has it), so that one user can carry a
        # value the target refuses.
        attributes = {{ "active" = "attributes.active" }}
        [connectors.directory.delivery]
        initial_backoff = "20ms"
        max_backoff = "200ms"
        max_elapsed = "10s"

        [[tenants.acme.resident.bindings]]
        connector = "directory"
        "#,
    ))
    .expect("valid settings")
}

fn group_event(id: &str, event_type: &str, group: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "specversion": "1.0", "id": id, "source": "/tests", "type": event_type,
        "data": {"tenant": "acme", "group": group},
    }))
    .unwrap()
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

async fn publish_user(names: &Names, event_id: impl AsRef<str>, event_type: &str, user: &str) {
    let payload = event_json(event_id.as_ref(), event_type, "acme", user, json!({}));
    publish(&producer(), &names.events, Some(&format!("acme/{user}")), &payload, &[]).await;
}

/// Reads complete results until `done` holds for the set of (event id, user id) seen.
async fn read_results(
    results: &mut TopicReader,
    what: &str,
    done: impl Fn(&HashSet<(String, String)>) -> bool,
) -> HashSet<(String, String)> {
    let seen = RefCell::new((0usize, HashSet::new()));
    results
        .read_until(what, WAIT, |records: &[OutputRecord]| {
            let mut seen = seen.borrow_mut();
            let (count, set) = &mut *seen;
            for record in &records[(*count).min(records.len())..] {
                let result = record.result();
                if result.scope == ResultScope::Complete {
                    set.insert((result.event_id.clone(), result.user_id.clone()));
                }
            }
            *count = records.len();
            done(set)
        })
        .await;
    seen.into_inner().1
}

/// The source user ids (SCIM externalId) of a group's members on a target, by the
/// remote ids it lists.
fn member_sources(members: &[String], users: &[Value]) -> BTreeSet<String> {
    users
        .iter()
        .filter(|user| {
            user["id"]
                .as_str()
                .is_some_and(|id| members.iter().any(|member| member == id))
        })
        .filter_map(|user| user["externalId"].as_str().map(str::to_string))
        .collect()
}

/// What a SCIM target holds, read over HTTP (works for the emulator and scim2-server).
struct ScimReader {
    base_url: String,
    http: reqwest::Client,
}

impl ScimReader {
    async fn list(&self, resource: &str, filter: Option<String>) -> Vec<Value> {
        let mut query = vec![("count".to_string(), "1000".to_string())];
        if let Some(filter) = filter {
            query.push(("filter".into(), filter));
        }
        let body: Value = self
            .http
            .get(format!("{}/{resource}", self.base_url))
            .query(&query)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        body["Resources"].as_array().cloned().unwrap_or_default()
    }

    async fn group_by_external_id(&self, external_id: &str) -> Option<Value> {
        let groups = self
            .list("Groups", Some(format!("externalId eq {}", json!(external_id))))
            .await;
        let id = groups.first()?["id"].as_str()?.to_string();
        // Members are read from the resource itself (some servers leave them out of lists).
        Some(
            self.http
                .get(format!("{}/Groups/{id}", self.base_url))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap(),
        )
    }

    async fn members_of(&self, external_id: &str) -> BTreeSet<String> {
        let Some(group) = self.group_by_external_id(external_id).await else {
            return BTreeSet::new();
        };
        let members: Vec<String> = group["members"]
            .as_array()
            .map(|members| {
                members
                    .iter()
                    .filter_map(|member| member["value"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        member_sources(&members, &self.list("Users", None).await)
    }
}

/// The whole scenario against one SCIM target; returns what it measured.
async fn run_scenario(test: &str, base_url: &str, members: usize) -> String {
    let names = Names::new(test);
    names.create(PARTITIONS).await;
    let app = TestApp::spawn_configured(settings(&names, base_url)).await;
    let reader = ScimReader {
        base_url: base_url.to_string(),
        http: reqwest::Client::new(),
    };
    let mut results = TopicReader::new(&names.results, 1);
    let users: Vec<String> = (0..members + 10).map(|index| format!("u{index:03}")).collect();
    let (initial, extra) = users.split_at(members);
    // `victim`'s create fails for good: it carries a value the target refuses
    // (`active` mapped from a claim that is not a boolean: 400 invalidValue).
    let victim = "victim".to_string();
    let group_members: Vec<String> = initial.iter().cloned().chain([victim.clone()]).collect();

    // The group's event comes first: its memberships wait for the creates.
    let started = Instant::now();
    publish_group(
        &names,
        "eng",
        &group_event(
            "eng-created",
            "group.created",
            json!({"id": "eng", "displayName": "Engineering", "members": group_members}),
        ),
    )
    .await;
    futures::future::join_all(
        users
            .iter()
            .map(|user| publish_user(&names, format!("create-{user}"), "user.created", user)),
    )
    .await;
    let refused = event_json(
        "create-victim",
        "user.created",
        "acme",
        &victim,
        json!({"user": {"attributes": {"active": "maybe"}}}),
    );
    publish(
        &producer(),
        &names.events,
        Some(&format!("acme/{victim}")),
        &refused,
        &[],
    )
    .await;
    let group_ids: HashSet<String> = group_members.iter().cloned().collect();
    read_results(&mut results, "every membership of the created group", |seen| {
        group_ids
            .iter()
            .all(|user| seen.contains(&("eng-created".to_string(), user.clone())))
    })
    .await;
    let created_in = started.elapsed();
    // The victim's create failed for good: its membership fails, saying why.
    let victim_membership = results
        .records
        .iter()
        .map(OutputRecord::result)
        .find(|result| result.event_id == "eng-created" && result.user_id == victim)
        .expect("read above");
    assert_eq!(
        victim_membership.results[0].outcome,
        Outcome::Failed,
        "{victim_membership:?}"
    );
    let error = victim_membership.results[0].error.clone().expect("an error");
    assert_eq!(error.kind, provisioner::result::ErrorKind::Dependency, "{error:?}");
    assert!(error.message.contains("failed for good"), "{}", error.message);
    assert_eq!(
        reader.members_of("eng").await,
        initial.iter().cloned().collect::<BTreeSet<_>>(),
        "the target's group after the create"
    );

    // A rename with a hostile name; ten added, ten removed; one member deleted.
    let hostile = "Eng \"core\" \\ ops ] (ünïcode)";
    let removed: Vec<String> = initial[..10].to_vec();
    publish_group(
        &names,
        "eng",
        &group_event(
            "eng-updated",
            "group.updated",
            json!({"id": "eng", "displayName": hostile, "added": extra, "removed": removed}),
        ),
    )
    .await;
    let leaver = initial[20].clone();
    publish_user(&names, "leaver-deleted", "user.deleted", &leaver).await;
    // An existing group is adopted.
    let created = reader
        .http
        .post(format!("{base_url}/Groups"))
        .json(&json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"], "displayName": "Legacy"}))
        .send()
        .await
        .unwrap();
    assert!(created.status().is_success(), "{}", created.status());
    publish_group(
        &names,
        "legacy",
        &group_event(
            "legacy-created",
            "group.created",
            json!({"id": "legacy", "displayName": "Legacy", "members": [initial[30]]}),
        ),
    )
    .await;
    // Sentinel: a group event after all of the above, in the same group's lane.
    let sentinel_members = [initial[40].clone()];
    publish_group(
        &names,
        "eng",
        &group_event(
            "eng-sentinel",
            "group.updated",
            json!({"id": "eng", "displayName": hostile, "removed": sentinel_members}),
        ),
    )
    .await;
    let expected_updates: HashSet<(String, String)> = extra
        .iter()
        .chain(&removed)
        .map(|user| ("eng-updated".to_string(), user.clone()))
        .chain([
            ("leaver-deleted".to_string(), leaver.clone()),
            ("legacy-created".to_string(), String::new()),
            ("legacy-created".to_string(), initial[30].clone()),
            ("eng-sentinel".to_string(), initial[40].clone()),
        ])
        .collect();
    read_results(&mut results, "the updates, the adoption and the sentinel", |seen| {
        expected_updates.is_subset(seen)
    })
    .await;
    let legacy = results.result_of("legacy-created", WAIT).await;
    let legacy_group_result = results
        .records
        .iter()
        .map(OutputRecord::result)
        .find(|result| result.event_id == "legacy-created" && result.user_id.is_empty())
        .expect("the group's own result");
    assert_eq!(
        legacy_group_result.results[0].outcome,
        Outcome::Adopted,
        "{legacy_group_result:?} {legacy:?}"
    );

    let mut expected: BTreeSet<String> = initial.iter().chain(extra).cloned().collect();
    for user in removed.iter().chain(&sentinel_members) {
        expected.remove(user);
    }
    // The deleted member's membership went with its account.
    expected.remove(&leaver);
    let held = reader.members_of("eng").await;
    assert_eq!(held, expected, "the target's group at the end");
    let group = reader.group_by_external_id("eng").await.expect("the group");
    assert_eq!(group["displayName"], hostile);
    assert_eq!(
        reader.members_of("legacy").await,
        [initial[30].clone()].into_iter().collect()
    );

    // Deleted: gone from the target.
    publish_group(
        &names,
        "eng",
        &group_event(
            "eng-deleted",
            "group.deleted",
            json!({"id": "eng", "displayName": hostile}),
        ),
    )
    .await;
    let deleted = results.result_of("eng-deleted", WAIT).await;
    assert_eq!(deleted.results[0].outcome, Outcome::Deleted, "{deleted:?}");
    assert!(
        reader.group_by_external_id("eng").await.is_none(),
        "the group is deleted"
    );
    let requests = app
        .metrics
        .membership_requests
        .with_label_values(&["directory", "add"])
        .get()
        + app
            .metrics
            .membership_requests
            .with_label_values(&["directory", "remove"])
            .get();
    app.stop().await;
    format!(
        "{members} members whose group came first were all applied {created_in:?} after it, after their creates (a member whose create failed for good: its membership failed, `dependency`); a hostile rename, 10 added, 10 removed, a deleted member gone, an existing group adopted, the group deleted; {requests} membership requests in all; the end state matched after a sentinel"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_lives_its_whole_life_on_the_scim_emulator() {
    let shutdown = CancellationToken::new();
    let emulator: ScimEmulator = scim_emulator::start(
        "127.0.0.1:0".parse().unwrap(),
        ScimEmulatorSettings {
            max_group_members_per_request: Some(100),
            ..ScimEmulatorSettings::default()
        },
        shutdown.clone(),
    )
    .await
    .unwrap();
    let report = run_scenario("groups-emulator", &emulator.base_url(), 250).await;
    assert!(
        emulator.largest_group_membership_change() <= 100,
        "a request changed {} memberships",
        emulator.largest_group_membership_change()
    );
    eprintln!(
        "GROUPS-REPORT scim emulator: {report}; {} group PATCH requests, largest membership change {}",
        emulator.group_patch_requests(),
        emulator.largest_group_membership_change()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_lives_its_whole_life_on_a_real_scim_server() {
    // Group names unique, so that an existing group is found by the 409 and adopted.
    let server = scim2_server_with_unique_group_names().await;
    let report = run_scenario("groups-scim2-server", &server.base_url, 120).await;
    eprintln!("GROUPS-REPORT scim2-server: {report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_group_killed_mid_way_resumes_its_memberships_where_it_stopped() {
    use crate::support::app::record_count;
    use crate::support::service::{metric, ServiceProcess};

    const MEMBERS: usize = 20_000;
    const CHUNK: usize = 100;
    let names = Names::new("groups-resume");
    names.create(PARTITIONS).await;
    let shutdown = CancellationToken::new();
    let emulator = scim_emulator::start(
        "127.0.0.1:0".parse().unwrap(),
        ScimEmulatorSettings::default(),
        shutdown.clone(),
    )
    .await
    .unwrap();
    let folder = tempfile::tempdir().unwrap();
    let config = folder.path().join("provisioner.toml");
    let kafka = names.kafka_toml().replace(
        "[groups]",
        &format!("[groups]\n            chunk = {CHUNK}\n            member_wait = \"1h\""),
    );
    std::fs::write(
        &config,
        format!(
            r#"{kafka}
            # The memberships wait for members that never come: stopping abandons them.
            [pipeline]
            shutdown_grace = "1s"

            [connectors.directory]
            type = "scim2"
            base_url = "{}"

            [[tenants.acme.resident.bindings]]
            connector = "directory"
            "#,
            emulator.base_url()
        ),
    )
    .unwrap();
    // No member is a user: the memberships wait; only their writing is measured here.
    let members: Vec<String> = (0..MEMBERS).map(|index| format!("r{index:05}")).collect();
    publish_group(
        &names,
        "big",
        &group_event(
            "big-created",
            "group.created",
            json!({"id": "big", "displayName": "Big", "members": members}),
        ),
    )
    .await;

    let emitted_series = "provisioner_memberships_emitted_total{action=\"add\",connector=\"directory\"}";
    let mut first = ServiceProcess::start(&config, folder.path().join("first.log"));
    let first_admin = first.admin_address().await;
    let mut emitted_at_kill = 0.0;
    let deadline = Instant::now() + WAIT;
    while emitted_at_kill < 2_000.0 {
        assert!(
            Instant::now() < deadline,
            "no memberships written in {WAIT:?}: {}",
            first.log_text()
        );
        emitted_at_kill = metric(first_admin, emitted_series).await.unwrap_or(0.0);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.signal("KILL");
    assert!(!first.wait(Duration::from_secs(10)).await.success());
    let written_at_kill = record_count(&names.memberships, PARTITIONS);
    assert!(
        (written_at_kill as usize) < MEMBERS,
        "the group's memberships were all written before the kill ({written_at_kill}); nothing to resume"
    );

    let mut second = ServiceProcess::start(&config, folder.path().join("second.log"));
    let second_admin = second.admin_address().await;
    let mut results = TopicReader::new(&names.results, 1);
    read_results(&mut results, "the group's own result", |seen| {
        seen.contains(&("big-created".to_string(), String::new()))
    })
    .await;
    let group_result = results
        .records
        .iter()
        .map(OutputRecord::result)
        .find(|result| result.event_id == "big-created" && result.user_id.is_empty())
        .expect("read above");
    assert_eq!(
        group_result.results[0].members_added,
        Some(MEMBERS as u64),
        "{group_result:?}"
    );
    let emitted_by_second = metric(second_admin, emitted_series).await.unwrap_or(0.0) as usize;
    let written = record_count(&names.memberships, PARTITIONS) as usize;
    second.signal("TERM");
    assert!(
        second.wait(Duration::from_secs(60)).await.success(),
        "{}",
        second.log_text()
    );
    // Resumed at the last saved chunk, not from the start.
    assert!(
        emitted_by_second + written_at_kill as usize <= MEMBERS + CHUNK,
        "the second process wrote {emitted_by_second} after {written_at_kill} were written: it started over"
    );
    assert!(
        written >= MEMBERS,
        "only {written} membership records for {MEMBERS} members"
    );
    assert!(
        written <= MEMBERS + CHUNK,
        "{written} records: more than one chunk written twice"
    );
    eprintln!(
        "GROUPS-REPORT resume: {MEMBERS} members, chunks of {CHUNK}; killed (-9) after {emitted_at_kill} memberships were written ({written_at_kill} on the topic); the restarted process wrote {emitted_by_second} more (resumed, not restarted); {written} records in all ({} written twice)",
        written - MEMBERS
    );
}
