//! The provisioning state under faults, on Apache Kafka with the SCIM emulator: a
//! SIGKILL between the target call and the state write, a rebalance while a slow
//! target holds users mid-lifecycle, `provisioner state show`, and undecodable state
//! records. Fault tests print a `FAULT-REPORT` line (`-- --nocapture` shows it).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use provisioner::devtools::emulators::scim::{self as scim_emulator, ScimEmulator, ScimEmulatorSettings};
use provisioner::devtools::emulators::Faults;
use provisioner::kafka::partitioners::{java_murmur2, librdkafka_crc32};
use provisioner::metrics::Metrics;
use provisioner::result::{Outcome, ProvisioningResult, Status};
use provisioner::settings::Settings;
use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::support::app::{producer, publish, record_count, Names, TestApp, TopicReader};
use crate::support::broker::broker;
use crate::support::doubles::{event_json, user_key};
use crate::support::eventually;
use crate::support::service::ServiceProcess;

const WAIT: Duration = Duration::from_secs(90);
const PARTITIONS: i32 = 4;
const SCIM_USER: &str = "urn:ietf:params:scim:schemas:core:2.0:User";

async fn emulator(settings: ScimEmulatorSettings) -> (ScimEmulator, CancellationToken) {
    let shutdown = CancellationToken::new();
    let emulator = scim_emulator::start("127.0.0.1:0".parse().unwrap(), settings, shutdown.clone())
        .await
        .unwrap();
    (emulator, shutdown)
}

/// Tenant `acme` → the SCIM directory at `scim_url`, JSON logs, and a short session
/// timeout so that a SIGKILLed member leaves the group quickly.
fn service_toml(names: &Names, scim_url: &str, request_timeout: &str) -> String {
    format!(
        r#"{kafka}
        [kafka.properties]
        "session.timeout.ms" = "6000"

        [pipeline]
        max_in_flight = 16

        [telemetry]
        format = "json"
        level = "info"

        [connectors.directory]
        type = "scim2"
        base_url = "{scim_url}"
        [connectors.directory.http]
        request_timeout = "{request_timeout}"
        [connectors.directory.delivery]
        max_in_flight = 8
        initial_backoff = "20ms"
        max_backoff = "500ms"
        max_elapsed = "60s"
        max_attempts = 1000
        circuit_breaker_failures = 1000

        [[tenants.acme.resident.bindings]]
        connector = "directory"
        blocking = true
        "#,
        kafka = names.kafka_toml(),
    )
}

/// Writes the configuration for a service process (or `state show`) to `directory`.
fn write_config(directory: &Path, toml: &str) -> std::path::PathBuf {
    let config = directory.join("provisioner.toml");
    std::fs::write(&config, toml).unwrap();
    config
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

async fn publish_event(producer: &rdkafka::producer::FutureProducer, topic: &str, event: &[u8]) {
    publish(producer, topic, Some(&user_key(event)), event, &[]).await;
}

/// Searches and listings: every `GET …/Users` (by id is `GET …/Users/{id}`).
fn searches(emulator: &ScimEmulator) -> usize {
    emulator
        .control
        .requests()
        .iter()
        .filter(|request| request.method == "GET" && request.path.ends_with("/Users"))
        .count()
}

/// Accounts the emulator holds for `user` (by `externalId`).
fn accounts_of(emulator: &ScimEmulator, user: &str) -> Vec<Value> {
    emulator
        .users()
        .into_iter()
        .filter(|account| account["externalId"] == user)
        .collect()
}

/// Creates `count` accounts that are not ours, straight on the emulator, so that a
/// listing has pages to read past.
async fn someone_elses_accounts(emulator: &ScimEmulator, count: usize) {
    let http = reqwest::Client::new();
    for index in 0..count {
        let body = json!({"schemas": [SCIM_USER], "userName": format!("other{index}")});
        let response = http
            .post(format!("{}/Users", emulator.base_url()))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success(), "{}", response.status());
    }
}

/// `provisioner state show --config <config> <user> [--json]`, the built binary.
async fn state_show(config: &Path, user: &str, json: bool) -> Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_provisioner"));
    command.args(["state", "show", "--config"]).arg(config).arg(user);
    if json {
        command.arg("--json");
    }
    let output = tokio::time::timeout(WAIT, command.env_remove("RUST_LOG").output())
        .await
        .expect("state show answers")
        .expect("state show runs");
    output
}

/// `state show --json`: the connector `directory`'s record for `user`, if any.
async fn shown_state(config: &Path, user: &str) -> Option<Value> {
    let output = state_show(config, user, true).await;
    assert!(
        output.status.success(),
        "state show failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let document: Value = serde_json::from_slice(&output.stdout).expect("state show prints JSON");
    document.get("directory").cloned()
}

/// The service's JSON log lines with this `message`.
fn log_entries(service: &ServiceProcess, message: &str) -> Vec<Value> {
    service
        .log_text()
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|entry| entry["message"] == message)
        .collect()
}

fn admin() -> AdminClient<DefaultClientContext> {
    broker().client_config().create().expect("admin client")
}

/// Sets the state topic's configuration (AlterConfigs replaces the whole set, so the
/// compaction policy is given every time).
async fn set_state_topic_max_message_bytes(topic: &str, bytes: &str) {
    let mut config = AlterConfig::new(ResourceSpecifier::Topic(topic));
    config = config.set("cleanup.policy", "compact").set("max.message.bytes", bytes);
    let results = admin()
        .alter_configs(
            [&config],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("AlterConfigs answered");
    for result in results {
        result.expect("the state topic's configuration changed");
    }
}

// ---------------------------------------------------------------------------------------
// 1. SIGKILL between the target call and the state write.
// ---------------------------------------------------------------------------------------

/// The state topic refuses every record (`max.message.bytes` smaller than any record
/// batch: the broker answers `MESSAGE_TOO_LARGE`, which the service's state write
/// retries forever), so the service stops exactly after the target call and before the
/// state write. It is SIGKILLed there, the topic is fixed, and a new process redoes the
/// events: the create finds the account (a search, or with `can_filter = false` a paged
/// listing past 150 other accounts), adopts it and writes the link. One account per
/// user; the next update goes by the restored link, without a search.
async fn kill_between_the_target_call_and_the_state_write(can_filter: bool) {
    let case = if can_filter { "filter" } else { "nofilter" };
    let names = Names::new(&format!("kill-state-{case}"));
    broker().create_topics(&[&names.events], PARTITIONS).await;
    broker()
        .create_topics_with(
            &[&names.state],
            PARTITIONS,
            &[("cleanup.policy", "compact"), ("max.message.bytes", "16")],
        )
        .await;
    broker()
        .create_topics(&[&names.results, &names.replies, &names.dead_letters], 1)
        .await;
    let (emulator, _shutdown) = emulator(ScimEmulatorSettings {
        filter_advertised: can_filter,
        filter_works: can_filter,
        ..ScimEmulatorSettings::default()
    })
    .await;
    let others = if can_filter { 0 } else { 150 };
    someone_elses_accounts(&emulator, others).await;
    let directory = tempfile::tempdir().unwrap();
    let config = write_config(directory.path(), &service_toml(&names, &emulator.base_url(), "2s"));

    let users: Vec<String> = (0..3).map(|index| format!("u-kill-{index}")).collect();
    let producer = producer();
    for user in &users {
        publish_event(
            &producer,
            &names.events,
            &user_event(&format!("create-{user}"), "user.created", user, "v1"),
        )
        .await;
    }

    let mut first = ServiceProcess::start(&config, directory.path().join("first.log"));
    eventually(
        "every account on the target and the state write refused",
        WAIT,
        || async {
            let created = users.iter().all(|user| accounts_of(&emulator, user).len() == 1);
            let refused = log_entries(&first, "Produce failed; retrying.")
                .iter()
                .any(|entry| entry["destination"] == "state");
            (created && refused).then_some(())
        },
    )
    .await;
    assert_eq!(
        record_count(&names.state, PARTITIONS),
        0,
        "the state topic took a record"
    );
    assert_eq!(
        record_count(&names.results, 1),
        0,
        "a result came before its state write"
    );
    first.signal("KILL");
    assert!(!first.wait(Duration::from_secs(10)).await.success());
    let killed_at = Instant::now();
    let refusals: Vec<Value> = log_entries(&first, "Produce failed; retrying.")
        .into_iter()
        .filter(|entry| entry["destination"] == "state")
        .collect();
    let refusal = refusals[0]["error"].as_str().unwrap_or_default().to_string();
    assert!(
        refusal.contains("too large"),
        "the state write was refused for another reason: {refusal}"
    );

    set_state_topic_max_message_bytes(&names.state, "1048588").await;
    let mut second = ServiceProcess::start(&config, directory.path().join("second.log"));
    let mut results = TopicReader::new(&names.results, 1);
    let mut remote_ids = BTreeMap::new();
    for user in &users {
        let result = results.result_of(&format!("create-{user}"), WAIT).await;
        assert_eq!(result.status, Status::Succeeded, "{case}: {result:?}");
        assert_eq!(
            result.results[0].outcome,
            Outcome::Adopted,
            "{case}: the redone create found the account: {result:?}"
        );
        let account = accounts_of(&emulator, user);
        assert_eq!(account.len(), 1, "{case}: {user} has one account: {account:?}");
        let remote_id = result.results[0].remote_id.clone().expect("a remote id");
        assert_eq!(
            account[0]["id"],
            remote_id.as_str(),
            "{case}: the link is the account's id"
        );
        remote_ids.insert(user.clone(), remote_id);
    }
    // How the restarted service found the accounts: filtered searches, or (the filter
    // refused) a listing read page by page.
    let lookups_after_kill: Vec<u16> = emulator
        .control
        .requests()
        .iter()
        .filter(|request| request.method == "GET" && request.path.ends_with("/Users") && request.at > killed_at)
        .map(|request| request.status)
        .collect();
    let refused_filters = lookups_after_kill.iter().filter(|status| **status == 400).count();
    let pages_or_searches = lookups_after_kill.iter().filter(|status| **status == 200).count();
    if can_filter {
        assert_eq!(refused_filters, 0, "{lookups_after_kill:?}");
        assert!(pages_or_searches >= users.len(), "{lookups_after_kill:?}");
    } else {
        assert!(refused_filters >= users.len(), "{lookups_after_kill:?}");
        assert!(
            pages_or_searches >= users.len(),
            "the listing was read: {lookups_after_kill:?}"
        );
    }
    let searches_before_sentinels = searches(&emulator);

    // Sentinels, published after the adopts' results: an update per user, applied by
    // the link the restarted service wrote.
    for user in &users {
        publish_event(
            &producer,
            &names.events,
            &user_event(&format!("sentinel-{user}"), "user.updated", user, "v2"),
        )
        .await;
    }
    for user in &users {
        let result = results.result_of(&format!("sentinel-{user}"), WAIT).await;
        assert_eq!(result.results[0].outcome, Outcome::Updated, "{case}: {result:?}");
        assert_eq!(result.results[0].remote_id.as_ref(), remote_ids.get(user));
    }
    assert_eq!(
        searches(&emulator),
        searches_before_sentinels,
        "{case}: the updates went by the restored link, without a search"
    );

    for user in &users {
        let account = accounts_of(&emulator, user);
        assert_eq!(account.len(), 1, "{case}: {user} has one account: {account:?}");
        assert_eq!(account[0]["name"]["familyName"], "v2");
        let shown = shown_state(&config, &format!("acme/{user}")).await.expect("a state");
        assert_eq!(shown["account"], "present", "{case}: {shown}");
        assert_eq!(shown["remote_id"], remote_ids[user].as_str(), "{case}: {shown}");
    }
    assert_eq!(
        emulator.users().len(),
        others + users.len(),
        "{case}: nothing else was created"
    );
    let created_after_kill = emulator
        .control
        .requests()
        .iter()
        .filter(|request| request.method == "POST" && request.status == 201 && request.at > killed_at)
        .count();
    assert_eq!(created_after_kill, 0, "{case}: the restart created accounts again");

    second.signal("TERM");
    assert!(second.wait(Duration::from_secs(60)).await.success());
    eprintln!(
        "FAULT-REPORT kill-before-state-write ({case}): {} creates reached the target, {} state writes refused ({refusal}), SIGKILL; after restart {} adopted (0 new accounts) after {refused_filters} refused filters and {pages_or_searches} searches or listing pages, link restored, {} sentinel updates by remote id with 0 searches; {} accounts, one per user",
        users.len(),
        refusals.len(),
        users.len(),
        users.len(),
        emulator.users().len() - others,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_between_the_target_call_and_the_state_write_converges_on_a_target_that_filters() {
    kill_between_the_target_call_and_the_state_write(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_between_the_target_call_and_the_state_write_converges_on_a_target_that_cannot_filter() {
    kill_between_the_target_call_and_the_state_write(false).await;
}

// ---------------------------------------------------------------------------------------
// 2. Revoked-partition race.
// ---------------------------------------------------------------------------------------

/// A slow target, users each created, updated and deleted; a second instance joins
/// mid-way (cooperative rebalance: some partitions are revoked from the first while
/// their users are mid-lifecycle) and then the first leaves. After every event has a
/// result and a sentinel published last on every partition has its result, every user
/// is absent and the target holds no account.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_mid_lifecycle_leaves_every_deleted_user_absent() {
    let names = Names::new("revoked-race");
    names.create(PARTITIONS).await;
    let latency = Duration::from_millis(300);
    let (emulator, _shutdown) = emulator(ScimEmulatorSettings {
        faults: Faults {
            latency,
            jitter: Duration::from_millis(100),
            ..Faults::default()
        },
        ..ScimEmulatorSettings::default()
    })
    .await;
    let settings = Settings::from_toml_str(
        &service_toml(&names, &emulator.base_url(), "3s").replace("max_in_flight = 8", "max_in_flight = 4"),
    )
    .unwrap();
    let users: Vec<String> = (0..16).map(|index| format!("u-race-{index}")).collect();
    let mut event_ids = Vec::new();
    let first = TestApp::spawn_configured(settings.clone()).await;
    let producer = producer();
    for (step, event_type) in ["user.created", "user.updated", "user.deleted"].iter().enumerate() {
        for user in &users {
            let id = format!("{step}-{user}");
            publish_event(
                &producer,
                &names.events,
                &user_event(&id, event_type, user, &format!("v{step}")),
            )
            .await;
            event_ids.push(id);
        }
    }
    let started = Instant::now();
    // Mid-way: some users created, none finished.
    eventually("the first creates", WAIT, || async {
        (emulator.user_count() >= 4).then_some(())
    })
    .await;
    let accounts_at_join = emulator.user_count();
    let second = TestApp::spawn_configured(settings).await;
    eventually("the second instance to get partitions", WAIT, || async {
        (second.metrics.assigned_partitions.get() > 0).then_some(())
    })
    .await;
    let taken = second.metrics.assigned_partitions.get();
    let requests_at_join = emulator.control.stats.report().requests;
    // Still mid-way: let the second instance work a little, then the first leaves.
    eventually("progress after the join", WAIT, || async {
        (emulator.control.stats.report().requests >= requests_at_join + 8).then_some(())
    })
    .await;
    let first_metrics = first.metrics.clone();
    first.stop().await;
    let first_did = completed(&first_metrics);
    // Events the first instance started but left unfinished to the new owner: its
    // work in flight on the partitions revoked from it.
    let interrupted = consumed(&first_metrics) - first_did;

    // A sentinel per partition, published last: the delete of a user no one created
    // (no account either way). The producer's partitioner is librdkafka's CRC32.
    let mut sentinels = BTreeMap::new();
    for candidate in 0..1000 {
        let user = format!("sentinel-{candidate}");
        let partition = librdkafka_crc32(format!("acme/{user}").as_bytes(), PARTITIONS);
        sentinels.entry(partition).or_insert(user);
        if sentinels.len() == PARTITIONS as usize {
            break;
        }
    }
    assert_eq!(
        sentinels.len(),
        PARTITIONS as usize,
        "a sentinel user for every partition"
    );
    for user in sentinels.values() {
        publish_event(
            &producer,
            &names.events,
            &user_event(&format!("s-{user}"), "user.deleted", user, "s"),
        )
        .await;
    }
    let mut expected: BTreeSet<String> = event_ids.iter().cloned().collect();
    expected.extend(sentinels.values().map(|user| format!("s-{user}")));
    let mut results = TopicReader::new(&names.results, 1);
    results
        .read_until("every event's result and every sentinel's", WAIT, |records| {
            let seen: BTreeSet<String> = records.iter().map(|record| record.result().event_id).collect();
            expected.is_subset(&seen)
        })
        .await;
    let elapsed = started.elapsed();

    let left: Vec<Value> = emulator.users();
    assert!(left.is_empty(), "accounts left after every delete: {left:#?}");
    let all: Vec<ProvisioningResult> = results.records.iter().map(|record| record.result()).collect();
    let failed: Vec<&ProvisioningResult> = all.iter().filter(|result| result.status == Status::Failed).collect();
    assert!(failed.is_empty(), "failed events: {failed:#?}");
    for user in &users {
        let delete = all
            .iter()
            .rfind(|result| result.event_id == format!("2-{user}"))
            .unwrap();
        assert!(
            matches!(delete.results[0].outcome, Outcome::Deleted | Outcome::AlreadyAbsent),
            "{delete:?}"
        );
    }
    assert!(
        interrupted > 0,
        "no event was in flight on a revoked partition: the race was not run"
    );
    let redone = all.len() - expected.len();
    let second_did = completed(&second.metrics);
    let stale = second.metrics.stale_events.with_label_values(&["directory"]).get();
    second.stop().await;
    eprintln!(
        "FAULT-REPORT revoked-race: {} users × create/update/delete ({} events) against a target with {:?} latency (+≤100 ms jitter); a second instance joined after {} accounts existed and took {taken} of {PARTITIONS} partitions, then the first left (it had completed {first_did} events and left {interrupted} in flight on revoked partitions to the new owner, which completed {second_did}); {} target requests; {redone} results repeated by a new owner; {stale} stale; all {} results and {} sentinels in {:.1} s; 0 accounts left",
        users.len(),
        event_ids.len(),
        latency,
        accounts_at_join,
        emulator.control.stats.report().requests,
        event_ids.len(),
        sentinels.len(),
        elapsed.as_secs_f64(),
    );
}

fn consumed(metrics: &Metrics) -> u64 {
    ["user.created", "user.updated", "user.deleted"]
        .iter()
        .map(|event_type| metrics.events_consumed.with_label_values(&[event_type]).get())
        .sum()
}

fn completed(metrics: &Metrics) -> u64 {
    ["succeeded", "failed", "partial", "skipped"]
        .iter()
        .map(|status| metrics.events_completed.with_label_values(&[status]).get())
        .sum()
}

// ---------------------------------------------------------------------------------------
// 3. `provisioner state show`.
// ---------------------------------------------------------------------------------------

/// A user id (`{prefix}-N`) whose key the Java client (murmur2) and librdkafka (CRC32)
/// partition differently, so that `state show` must pick the right candidate.
fn user_partitioned_apart(prefix: &str) -> String {
    (0..1000)
        .map(|index| format!("{prefix}-{index}"))
        .find(|user| {
            let key = format!("acme/{user}");
            java_murmur2(key.as_bytes(), PARTITIONS) != librdkafka_crc32(key.as_bytes(), PARTITIONS)
        })
        .expect("a key the two partitioners place apart")
}

/// The built binary reads the state topic: after a create it shows `present` with the
/// remote id (JSON, and plain text naming the connector), after a delete `deleted`; a
/// user never provisioned has no state (exit 0); a malformed user exits 2. The users'
/// keys go to different partitions under the two default partitioners: one is published
/// by librdkafka's, the other where a Java producer's would put it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_show_prints_what_the_target_holds_for_a_user() {
    let names = Names::new("state-show");
    names.create(PARTITIONS).await;
    let (emulator, _shutdown) = emulator(ScimEmulatorSettings::default()).await;
    let toml = service_toml(&names, &emulator.base_url(), "2s");
    let directory = tempfile::tempdir().unwrap();
    let config = write_config(directory.path(), &toml);
    let app = TestApp::spawn_configured(Settings::from_toml_str(&toml).unwrap()).await;
    let producer = producer();
    let mut results = TopicReader::new(&names.results, 1);
    let user = user_partitioned_apart("u-show");
    let key = format!("acme/{user}");

    publish_event(
        &producer,
        &names.events,
        &user_event("show-create", "user.created", &user, "v1"),
    )
    .await;
    let created = results.result_of("show-create", WAIT).await;
    assert_eq!(created.results[0].outcome, Outcome::Created, "{created:?}");
    assert_eq!(
        created.version.as_ref().unwrap().partition,
        librdkafka_crc32(key.as_bytes(), PARTITIONS)
    );
    let remote_id = created.results[0].remote_id.clone().expect("a remote id");

    let shown = shown_state(&config, &key).await.expect("a state for the directory");
    assert_eq!(shown["account"], "present", "{shown}");
    assert_eq!(shown["remote_id"], remote_id.as_str(), "{shown}");
    assert_eq!(shown["event_id"], "show-create", "{shown}");
    let plain = state_show(&config, &key, false).await;
    assert!(plain.status.success(), "{plain:?}");
    let text = String::from_utf8_lossy(&plain.stdout);
    assert!(text.contains(&key), "{text}");
    let line = text
        .lines()
        .find(|line| line.trim_start().starts_with("directory"))
        .unwrap_or_else(|| panic!("no line names the connector: {text}"));
    assert!(line.contains("present") && line.contains(&remote_id), "{text}");

    publish_event(
        &producer,
        &names.events,
        &user_event("show-delete", "user.deleted", &user, "v1"),
    )
    .await;
    let deleted = results.result_of("show-delete", WAIT).await;
    assert_eq!(deleted.results[0].outcome, Outcome::Deleted, "{deleted:?}");
    let shown = shown_state(&config, &key).await.expect("a state for the directory");
    assert_eq!(shown["account"], "deleted", "{shown}");
    assert_eq!(shown["event_id"], "show-delete", "{shown}");
    let plain = state_show(&config, &key, false).await;
    let text = String::from_utf8_lossy(&plain.stdout);
    assert!(
        text.lines()
            .any(|line| line.trim_start().starts_with("directory") && line.contains("deleted")),
        "{text}"
    );

    // Where a Java producer would have put the key.
    let java_user = user_partitioned_apart("u-java");
    let java_key = format!("acme/{java_user}");
    let java_partition = java_murmur2(java_key.as_bytes(), PARTITIONS);
    producer
        .send(
            rdkafka::producer::FutureRecord::to(&names.events)
                .key(&java_key)
                .payload(&user_event("java-create", "user.created", &java_user, "v1"))
                .partition(java_partition),
            rdkafka::util::Timeout::After(Duration::from_secs(10)),
        )
        .await
        .map_err(|(error, _)| error)
        .expect("acknowledged");
    let created = results.result_of("java-create", WAIT).await;
    assert_eq!(created.version.as_ref().unwrap().partition, java_partition);
    let shown = shown_state(&config, &java_key)
        .await
        .expect("a state for the directory");
    assert_eq!(shown["account"], "present", "{shown}");
    assert_eq!(shown["state_partition"], java_partition, "{shown}");
    assert_eq!(
        shown["remote_id"],
        created.results[0].remote_id.as_deref().unwrap(),
        "{shown}"
    );

    let never = state_show(&config, "acme/u-never", false).await;
    assert_eq!(never.status.code(), Some(0), "{never:?}");
    let text = String::from_utf8_lossy(&never.stdout);
    assert!(
        text.contains("acme/u-never") && text.contains("no provisioning state"),
        "{text}"
    );
    assert_eq!(shown_state(&config, "acme/u-never").await, None);

    let malformed = state_show(&config, "no-tenant-here", false).await;
    assert_eq!(malformed.status.code(), Some(2), "{malformed:?}");
    assert!(
        String::from_utf8_lossy(&malformed.stderr).contains("tenant/user"),
        "{malformed:?}"
    );
    app.stop().await;
}

// ---------------------------------------------------------------------------------------
// 4. Undecodable state records.
// ---------------------------------------------------------------------------------------

/// Garbage on the state topic for a user's key (not JSON, and a record of a newer
/// layout that would say "deleted at a very late version" if it were trusted): the
/// instance restores, logs each with its key, counts them, keeps running, and the
/// user's next event is applied by a search.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_state_records_are_logged_with_their_key_and_ignored() {
    let names = Names::new("state-garbage");
    names.create(PARTITIONS).await;
    let (emulator, _shutdown) = emulator(ScimEmulatorSettings::default()).await;
    // The user's account exists already (made before the state existed).
    let response = reqwest::Client::new()
        .post(format!("{}/Users", emulator.base_url()))
        .json(&json!({"schemas": [SCIM_USER], "userName": "user.u-garbage", "externalId": "u-garbage"}))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());
    let existing_id = accounts_of(&emulator, "u-garbage")[0]["id"]
        .as_str()
        .unwrap()
        .to_string();

    let state_key = "directory:acme/u-garbage";
    let partition = librdkafka_crc32(b"acme/u-garbage", PARTITIONS);
    let newer = json!({
        "schema": 99,
        "version": {"epoch": 4_000_000_000u32, "partition": partition, "offset": 1_000_000_000},
        "account": "deleted",
        "event_id": "from-the-future",
        "updated_at": "2030-01-01T00:00:00Z",
    })
    .to_string();
    let producer = producer();
    for value in [b"{this is not json".as_slice(), newer.as_bytes()] {
        producer
            .send(
                rdkafka::producer::FutureRecord::to(&names.state)
                    .key(state_key)
                    .payload(value)
                    .partition(partition),
                rdkafka::util::Timeout::After(Duration::from_secs(10)),
            )
            .await
            .map_err(|(error, _)| error)
            .expect("acknowledged");
    }

    let directory = tempfile::tempdir().unwrap();
    let config = write_config(directory.path(), &service_toml(&names, &emulator.base_url(), "2s"));
    let mut service = ServiceProcess::start(&config, directory.path().join("service.log"));
    let admin = service.admin_address().await;
    let searches_before = searches(&emulator);
    let update = user_event("garbage-update", "user.updated", "u-garbage", "v2");
    publish_event(&producer, &names.events, &update).await;
    let mut results = TopicReader::new(&names.results, 1);
    let updated = results.result_of("garbage-update", WAIT).await;
    assert_eq!(updated.results[0].outcome, Outcome::Updated, "{updated:?}");
    assert_eq!(updated.results[0].remote_id.as_deref(), Some(existing_id.as_str()));
    assert!(
        searches(&emulator) > searches_before,
        "the account was found by a search"
    );
    assert_eq!(accounts_of(&emulator, "u-garbage").len(), 1);

    let ignored = log_entries(&service, "Ignoring an undecodable state record.");
    assert_eq!(ignored.len(), 2, "{ignored:#?}");
    for entry in &ignored {
        assert_eq!(entry["key"], state_key, "{entry}");
        assert_eq!(entry["partition"], partition, "{entry}");
    }
    assert!(ignored[1]["reason"].as_str().unwrap().contains("newer"), "{ignored:#?}");
    let metrics = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let counted = metrics
        .lines()
        .find(|line| line.starts_with("provisioner_state_records_ignored_total"))
        .unwrap_or_else(|| panic!("no ignored-records metric:\n{metrics}"));
    assert_eq!(counted.split_whitespace().last(), Some("2"), "{counted}");
    assert!(service.is_running(), "the service crashed:\n{}", service.log_text());
    service.signal("TERM");
    assert!(service.wait(Duration::from_secs(60)).await.success());
}
