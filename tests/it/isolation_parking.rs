//! Isolation and durable parking on Apache Kafka, with the SCIM emulator as targets: a
//! target that is down neither makes blocking callers wait for its retry time (they are
//! answered `queued` at `pipeline.reply_deadline`) nor stops the other targets (its work
//! is parked in its retry topic, the input moves on, and the parked work drains once
//! the target is back). Each test prints an `ISOLATION-REPORT` line with its figures.

// The SCIM emulator is a devtool.
#![cfg(feature = "devtools")]

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use provisioner::client::Client;
use provisioner::devtools::emulators::scim::{self as scim_emulator, ScimEmulator, ScimEmulatorSettings};
use provisioner::devtools::emulators::Faults;
use provisioner::result::{Outcome, ProvisioningResult, ResultScope, Status};
use provisioner::settings::Settings;
use rdkafka::producer::FutureRecord;
use rdkafka::util::Timeout;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::support::app::{
    committed_offsets, producer, publish, record_count, Names, OutputRecord, TestApp, TopicReader,
};
use crate::support::doubles::event_json;
use crate::support::eventually;

const PARTITIONS: i32 = 4;

async fn emulator() -> (ScimEmulator, CancellationToken) {
    let shutdown = CancellationToken::new();
    let emulator = scim_emulator::start(
        "127.0.0.1:0".parse().unwrap(),
        ScimEmulatorSettings::default(),
        shutdown.clone(),
    )
    .await
    .unwrap();
    (emulator, shutdown)
}

/// Every call answered with a server error.
fn failing() -> Faults {
    Faults {
        rate_500: 1.0,
        ..Faults::default()
    }
}

/// The delivery settings of a connector that is down: its circuit opens after a few
/// failures, and one operation may retry for five minutes.
const DOWN_DELIVERY: &str = r#"
        initial_backoff = "20ms"
        max_backoff = "500ms"
        max_elapsed = "5m"
        max_attempts = 1000
        circuit_breaker_failures = 3
        circuit_breaker_cooldown = "250ms"
"#;

/// Two non-blocking SCIM connectors of the resident provider, `down` (with
/// [`DOWN_DELIVERY`]) and `healthy`, with `parking` lines added to `[parking]`.
fn down_and_healthy(
    names: &Names,
    down: &ScimEmulator,
    healthy: &ScimEmulator,
    parking: &str,
    max_in_flight: usize,
    max_buffered_events: usize,
) -> Settings {
    let kafka = names
        .kafka_toml()
        .replace("[parking]", &format!("[parking]\n            {parking}"));
    let toml = format!(
        r#"{kafka}
        [pipeline]
        max_in_flight = {max_in_flight}
        max_buffered_events = {max_buffered_events}

        [connectors.down]
        type = "scim2"
        base_url = "{down_url}"
        [connectors.down.delivery]
        {DOWN_DELIVERY}

        [connectors.healthy]
        type = "scim2"
        base_url = "{healthy_url}"

        [[tenants.acme.resident.bindings]]
        connector = "down"
        blocking = false

        [[tenants.acme.resident.bindings]]
        connector = "healthy"
        blocking = false
        "#,
        down_url = down.base_url(),
        healthy_url = healthy.base_url(),
    );
    Settings::from_toml_str(&toml).expect("valid settings")
}

/// The source user ids (SCIM `externalId`) the emulator holds.
fn external_ids(emulator: &ScimEmulator) -> BTreeSet<String> {
    emulator
        .users()
        .iter()
        .filter_map(|user| user.get("externalId").and_then(Value::as_str).map(str::to_string))
        .collect()
}

/// Polls until `emulator` holds every one of `users`; returns how long that took.
async fn wait_for_users(emulator: &ScimEmulator, users: &[String], what: &str, timeout: Duration) -> Duration {
    let started = Instant::now();
    eventually(what, timeout, || async {
        if emulator.user_count() < users.len() {
            return None;
        }
        let held = external_ids(emulator);
        users.iter().all(|user| held.contains(user)).then_some(())
    })
    .await;
    started.elapsed()
}

/// Waits for the group to assign the partitions (input and retry topics together), so
/// that no caller's wait includes the service joining its group.
async fn wait_for_partitions(app: &TestApp) {
    eventually("the service to own its partitions", Duration::from_secs(60), || async {
        (app.metrics.assigned_partitions.get() >= PARTITIONS as i64).then_some(())
    })
    .await;
}

/// Reads `results` until each of `event_ids` has a complete result.
async fn read_complete_results(results: &mut TopicReader, event_ids: &HashSet<String>, timeout: Duration) {
    // Counted incrementally: the reader asks after every record.
    let progress = RefCell::new((0usize, event_ids.clone()));
    results
        .read_until(
            &format!("complete results of {} events", event_ids.len()),
            timeout,
            |records: &[OutputRecord]| {
                let mut progress = progress.borrow_mut();
                let (seen, missing) = &mut *progress;
                for record in &records[(*seen).min(records.len())..] {
                    let result = record.result();
                    if result.scope == ResultScope::Complete {
                        missing.remove(&result.event_id);
                    }
                }
                *seen = records.len();
                missing.is_empty()
            },
        )
        .await;
}

/// What the results topic holds, read to its end once the service has stopped.
struct Tally {
    complete: HashMap<String, Vec<ProvisioningResult>>,
    notices: Vec<ProvisioningResult>,
    other: Vec<ProvisioningResult>,
}

async fn read_whole_results_topic(results: &mut TopicReader, topic: &str) -> Tally {
    let total = record_count(topic, 1);
    results
        .read_until("the whole results topic", Duration::from_secs(60), |records| {
            records.len() as i64 >= total
        })
        .await;
    let mut tally = Tally {
        complete: HashMap::new(),
        notices: Vec::new(),
        other: Vec::new(),
    };
    for record in &results.records {
        let result = record.result();
        match result.scope {
            ResultScope::Complete => tally.complete.entry(result.event_id.clone()).or_default().push(result),
            ResultScope::Queued => tally.notices.push(result),
            ResultScope::Blocking => tally.other.push(result),
        }
    }
    tally
}

/// Every event in `event_ids` has exactly one complete result, succeeded on every
/// connector with one of `outcomes`; there is no complete result of another event.
fn assert_one_complete_result_each(
    tally: &Tally,
    event_ids: &HashSet<String>,
    connectors: &[&str],
    outcomes: &[Outcome],
) {
    assert!(
        tally.other.is_empty(),
        "the results topic holds records of scope blocking: {:?}",
        &tally.other[..tally.other.len().min(3)]
    );
    let missing: Vec<&String> = event_ids
        .iter()
        .filter(|id| !tally.complete.contains_key(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} events have no complete result, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    let unexpected: Vec<&String> = tally.complete.keys().filter(|id| !event_ids.contains(*id)).collect();
    assert!(
        unexpected.is_empty(),
        "complete results of unknown events: {unexpected:?}"
    );
    let duplicated: Vec<(&String, usize)> = tally
        .complete
        .iter()
        .filter(|(_, results)| results.len() != 1)
        .map(|(id, results)| (id, results.len()))
        .collect();
    assert!(
        duplicated.is_empty(),
        "{} events have more than one complete result, e.g. {:?}",
        duplicated.len(),
        &duplicated[..duplicated.len().min(5)]
    );
    for result in tally.complete.values().flatten() {
        assert_eq!(result.status, Status::Succeeded, "{result:?}");
        let mut seen: Vec<&str> = result.results.iter().map(|slot| slot.connector.as_str()).collect();
        seen.sort_unstable();
        assert_eq!(seen, connectors, "{result:?}");
        for slot in &result.results {
            assert!(outcomes.contains(&slot.outcome), "{}: {slot:?}", result.event_id);
        }
    }
}

/// Queued notices: each with status `queued` and one result `queued`, at most one per
/// event and connector. Returns how many each connector has.
fn count_notices(tally: &Tally) -> HashMap<String, u64> {
    let mut per_connector: HashMap<String, u64> = HashMap::new();
    let mut distinct = HashSet::new();
    for notice in &tally.notices {
        assert_eq!(notice.status, Status::Queued, "{notice:?}");
        assert_eq!(notice.results.len(), 1, "{notice:?}");
        assert_eq!(notice.results[0].outcome, Outcome::Queued, "{notice:?}");
        let connector = notice.results[0].connector.clone();
        assert!(
            distinct.insert((notice.event_id.clone(), connector.clone())),
            "two queued notices for one event and connector: {notice:?}"
        );
        *per_connector.entry(connector).or_default() += 1;
    }
    per_connector
}

/// Per connector: operations parked, and parked operations drained and applied.
fn parking_figures(app: &TestApp, connectors: &[&str]) -> HashMap<String, (u64, u64)> {
    connectors
        .iter()
        .map(|connector| {
            let parked = app.metrics.operations_parked.with_label_values(&[connector]).get();
            let drained = app
                .metrics
                .operations_drained
                .with_label_values(&[connector, "applied"])
                .get();
            (connector.to_string(), (parked, drained))
        })
        .collect()
}

/// One queued notice per parked operation, and every parked operation drained and
/// applied, for each connector.
fn assert_parked_work_accounted(tally: &Tally, figures: &HashMap<String, (u64, u64)>) {
    let notices = count_notices(tally);
    for connector in notices.keys() {
        assert!(figures.contains_key(connector), "a queued notice of `{connector}`");
    }
    for (connector, (parked, drained)) in figures {
        assert_eq!(
            notices.get(connector).copied().unwrap_or(0),
            *parked,
            "`{connector}`: one queued notice per parked operation"
        );
        assert_eq!(
            drained, parked,
            "`{connector}`: every parked operation drained and applied"
        );
    }
}

/// A user's create: a new account, or one adopted.
const CREATED: &[Outcome] = &[Outcome::Created, Outcome::Adopted];

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    let index = ((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_connector_that_is_down_answers_queued_within_the_reply_deadline() {
    const CALLERS: usize = 50;
    const REPLY_DEADLINE: Duration = Duration::from_secs(2);
    // From the caller's side: publish, fetch, the deadline itself, the reply's produce
    // and fetch. Far below the connector's five minutes of retry time.
    const MARGIN: Duration = Duration::from_secs(3);

    let names = Names::new("isolation-reply");
    names.create(PARTITIONS).await;
    let (directory, _directory_shutdown) = emulator().await;
    let (other, _other_shutdown) = emulator().await;
    directory.set_faults(failing());
    // The directory parks its work once its circuit has been open for 3 s, so that the
    // drain after recovery (a blocking binding whose caller has its answer) is covered.
    let kafka = names
        .kafka_toml()
        .replace("[parking]", "[parking]\n            park_after = \"3s\"");
    let toml = format!(
        r#"{kafka}
        [pipeline]
        reply_deadline = "2s"

        [connectors.directory]
        type = "scim2"
        base_url = "{directory_url}"
        [connectors.directory.delivery]
        {DOWN_DELIVERY}

        [connectors.other]
        type = "scim2"
        base_url = "{other_url}"

        [[tenants.acme.resident.bindings]]
        connector = "directory"
        blocking = true

        [[tenants.acme.resident.bindings]]
        connector = "other"
        blocking = false
        "#,
        directory_url = directory.base_url(),
        other_url = other.base_url(),
    );
    let settings = Settings::from_toml_str(&toml).expect("valid settings");
    assert_eq!(settings.pipeline.reply_deadline, REPLY_DEADLINE);
    assert_eq!(settings.parking.park_after, Duration::from_secs(3));
    let app = TestApp::spawn_configured(settings.clone()).await;
    wait_for_partitions(&app).await;
    let client = Client::connect(&settings.kafka).await.expect("client connects");

    let users: Vec<String> = (0..CALLERS).map(|index| format!("r{index:03}")).collect();
    let replies = futures::future::join_all(users.iter().enumerate().map(|(index, user)| {
        let event = event_json(
            &format!("reply-{index:03}"),
            "user.created",
            "acme",
            user,
            serde_json::json!({}),
        );
        let client = &client;
        async move {
            let started = Instant::now();
            // Bounded well above the margin, so that a late reply is measured, not lost.
            let reply = client.send_and_wait(&event, Duration::from_secs(60)).await;
            (reply, started.elapsed())
        }
    }))
    .await;

    let mut latencies = Vec::with_capacity(CALLERS);
    let mut statuses: HashMap<&'static str, usize> = HashMap::new();
    for (user, (reply, waited)) in users.iter().zip(replies) {
        let reply = reply.unwrap_or_else(|error| panic!("{user}: no reply after {waited:?}: {error}"));
        assert_eq!(&reply.user_id, user, "a caller got someone else's reply");
        assert_eq!(reply.scope, ResultScope::Blocking, "{reply:?}");
        assert!(
            matches!(reply.status, Status::Queued | Status::Failed),
            "{user}: the directory is down, yet the reply says {:?}: {reply:?}",
            reply.status
        );
        assert_eq!(reply.results.len(), 1, "only the blocking binding: {reply:?}");
        assert_eq!(reply.results[0].connector, "directory", "{reply:?}");
        assert!(
            matches!(reply.results[0].outcome, Outcome::Queued | Outcome::Failed),
            "{reply:?}"
        );
        *statuses.entry(reply.status.as_str()).or_default() += 1;
        latencies.push(waited);
    }
    latencies.sort_unstable();
    let (p50, p99, max) = (
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        *latencies.last().unwrap(),
    );
    assert!(
        max <= REPLY_DEADLINE + MARGIN,
        "a reply took {max:?} (p50 {p50:?}, p99 {p99:?}), over the reply deadline {REPLY_DEADLINE:?} + {MARGIN:?}"
    );
    let past_deadline = app.metrics.replies_past_deadline.get();

    // The healthy, non-blocking target got every user meanwhile.
    let other_took = wait_for_users(&other, &users, "`other` to hold every user", Duration::from_secs(60)).await;
    assert_eq!(directory.user_count(), 0, "the directory is down");

    // Its circuit open for longer than park_after, the directory parks its work.
    let parked_wait = Instant::now();
    eventually(
        "every directory operation to be parked",
        Duration::from_secs(60),
        || async {
            let parked = app.metrics.operations_parked.with_label_values(&["directory"]).get();
            (parked >= CALLERS as u64).then_some(())
        },
    )
    .await;
    let parked_after = parked_wait.elapsed();

    // The directory is back: its parked work drains.
    directory.set_faults(Faults::default());
    let drain_took = wait_for_users(
        &directory,
        &users,
        "the directory to hold every user after it is back",
        Duration::from_secs(180),
    )
    .await;
    let sentinel = event_json(
        "reply-sentinel",
        "user.created",
        "acme",
        "sentinel",
        serde_json::json!({}),
    );
    publish(&producer(), &names.events, Some("acme/sentinel"), &sentinel, &[]).await;
    let mut event_ids: HashSet<String> = (0..CALLERS).map(|index| format!("reply-{index:03}")).collect();
    event_ids.insert("reply-sentinel".into());
    let mut results = TopicReader::new(&names.results, 1);
    read_complete_results(&mut results, &event_ids, Duration::from_secs(120)).await;
    let figures = parking_figures(&app, &["directory", "other"]);
    app.stop().await;

    let tally = read_whole_results_topic(&mut results, &names.results).await;
    assert_one_complete_result_each(&tally, &event_ids, &["directory", "other"], CREATED);
    assert_parked_work_accounted(&tally, &figures);
    let (parked, drained) = figures["directory"];
    eprintln!(
        "ISOLATION-REPORT reply-deadline: {CALLERS} blocking callers, blocking connector down (max_elapsed 5m), reply_deadline {REPLY_DEADLINE:?}: replies p50 {p50:?}, p99 {p99:?}, max {max:?} (min {:?}); statuses {statuses:?}; {past_deadline} replies past the deadline; `other` held every user {other_took:?} after the replies; {parked} operations parked ({parked_after:?} after that), {drained} drained, every user on the directory {drain_took:?} after it was back; {} queued notices; one complete result for each of {} events",
        latencies[0],
        tally.notices.len(),
        event_ids.len(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connector_down_with_a_buffer_smaller_than_the_events_does_not_stop_the_others() {
    const EVENTS: usize = 1_000;
    const BUFFER: usize = 200;
    const MAX_HELD: usize = 50;

    let names = Names::new("isolation-park");
    names.create(PARTITIONS).await;
    let (down, _down_shutdown) = emulator().await;
    let (healthy, _healthy_shutdown) = emulator().await;
    down.set_faults(failing());
    let settings = down_and_healthy(
        &names,
        &down,
        &healthy,
        &format!("max_held_operations = {MAX_HELD}"),
        64,
        BUFFER,
    );
    assert_eq!(settings.parking.max_held_operations, Some(MAX_HELD));
    let app = TestApp::spawn_configured(settings).await;
    wait_for_partitions(&app).await;

    let users: Vec<String> = (0..EVENTS).map(|index| format!("p{index:04}")).collect();
    let producer = producer();
    let started = Instant::now();
    let sends = users.iter().enumerate().map(|(index, user)| {
        let payload = event_json(
            &format!("park-{index:04}"),
            "user.created",
            "acme",
            user,
            serde_json::json!({}),
        );
        let key = format!("acme/{user}");
        let producer = producer.clone();
        let topic = names.events.clone();
        async move {
            producer
                .send(
                    FutureRecord::to(&topic).key(&key).payload(&payload),
                    Timeout::After(Duration::from_secs(60)),
                )
                .await
                .map_err(|(error, _)| error)
                .expect("event acknowledged")
        }
    });
    futures::future::join_all(sends).await;
    let published_in = started.elapsed();

    // The healthy target gets every user while the other is down: that needs the down
    // connector's work parked, since its held operations alone would fill the buffer.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut most_held = 0;
    let mut paused_seen = false;
    loop {
        let metrics = &app.metrics;
        let held = metrics.connector_held_operations.with_label_values(&["down"]).get();
        most_held = most_held.max(held);
        paused_seen |= metrics.consumer_paused.get() == 1;
        if healthy.user_count() >= EVENTS {
            let held_users = external_ids(&healthy);
            if users.iter().all(|user| held_users.contains(user)) {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "`healthy` holds {} of {EVENTS} users after 120 s while `down` is down; parked: down {}, healthy {}; drained (applied): healthy {}; held: down {held}, healthy {}; {} events buffered (bound {BUFFER}), fetching paused: {}; {} of {EVENTS} input events committed",
            healthy.user_count(),
            metrics.operations_parked.with_label_values(&["down"]).get(),
            metrics.operations_parked.with_label_values(&["healthy"]).get(),
            metrics.operations_drained.with_label_values(&["healthy", "applied"]).get(),
            metrics.connector_held_operations.with_label_values(&["healthy"]).get(),
            metrics.events_buffered.get(),
            metrics.consumer_paused.get(),
            committed_offsets(&names.group, &names.events, PARTITIONS)
                .iter()
                .map(|offset| (*offset).max(0))
                .sum::<i64>(),
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let healthy_took = started.elapsed();
    let parked_while_down = app.metrics.operations_parked.with_label_values(&["down"]).get();
    assert!(parked_while_down > 0, "`down` parked nothing");
    assert_eq!(down.user_count(), 0, "`down` is down");

    // `down` is back: its parked work drains.
    down.set_faults(Faults::default());
    let drain_took = wait_for_users(
        &down,
        &users,
        "`down` to hold every user after it is back",
        Duration::from_secs(300),
    )
    .await;
    let sentinel = event_json(
        "park-sentinel",
        "user.created",
        "acme",
        "sentinel",
        serde_json::json!({}),
    );
    publish(&producer, &names.events, Some("acme/sentinel"), &sentinel, &[]).await;
    let mut event_ids: HashSet<String> = (0..EVENTS).map(|index| format!("park-{index:04}")).collect();
    event_ids.insert("park-sentinel".into());
    let mut results = TopicReader::new(&names.results, 1);
    read_complete_results(&mut results, &event_ids, Duration::from_secs(180)).await;
    let figures = parking_figures(&app, &["down", "healthy"]);
    app.stop().await;

    let tally = read_whole_results_topic(&mut results, &names.results).await;
    assert_one_complete_result_each(&tally, &event_ids, &["down", "healthy"], CREATED);
    assert_parked_work_accounted(&tally, &figures);
    let (parked, drained) = figures["down"];
    let (healthy_parked, healthy_drained) = figures["healthy"];
    eprintln!(
        "ISOLATION-REPORT parking: {EVENTS} events, buffer {BUFFER}, max_held_operations {MAX_HELD}, one connector down: published in {published_in:?}; `healthy` held every user {healthy_took:?} after the first publish; `down` held at most {most_held} operations (sampled), fetching paused at some point: {paused_seen}; `down` parked {parked_while_down} operations by then, {parked} in all, {drained} drained; `healthy` parked {healthy_parked} (for holding over {MAX_HELD}), {healthy_drained} drained; {} queued notices in all; every user on `down` {drain_took:?} after it was back; one complete result for each of {} events",
        tally.notices.len(),
        event_ids.len(),
    );
}

/// The given name of each user the emulator holds, by source user id.
fn given_names(emulator: &ScimEmulator) -> HashMap<String, String> {
    emulator
        .users()
        .iter()
        .filter_map(|user| {
            let external_id = user.get("externalId")?.as_str()?;
            let given_name = user.pointer("/name/givenName")?.as_str()?;
            Some((external_id.to_string(), given_name.to_string()))
        })
        .collect()
}

/// Polls until `emulator` holds every one of `users` with the given name `expected`.
async fn wait_for_given_names(
    emulator: &ScimEmulator,
    users: &[String],
    expected: &str,
    what: &str,
    timeout: Duration,
) {
    eventually(what, timeout, || async {
        let held = given_names(emulator);
        users
            .iter()
            .all(|user| held.get(user).map(String::as_str) == Some(expected))
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_work_for_users_whose_parked_work_waits_on_a_dead_target_is_parked_not_held() {
    const USERS: usize = 100;
    const UPDATES: usize = 5;
    const BUFFER: usize = 200;
    const MAX_HELD: usize = 50;
    const MAX_IN_FLIGHT: usize = 4;

    let names = Names::new("isolation-drain");
    names.create(PARTITIONS).await;
    let (down, _down_shutdown) = emulator().await;
    let (healthy, _healthy_shutdown) = emulator().await;
    down.set_faults(failing());
    let settings = down_and_healthy(
        &names,
        &down,
        &healthy,
        &format!("max_held_operations = {MAX_HELD}\n            park_after = \"1s\""),
        MAX_IN_FLIGHT,
        BUFFER,
    );
    assert_eq!(settings.pipeline.max_in_flight, MAX_IN_FLIGHT);
    let app = TestApp::spawn_configured(settings).await;
    wait_for_partitions(&app).await;

    let users: Vec<String> = (0..USERS).map(|index| format!("d{index:03}")).collect();
    let producer = producer();
    let mut event_ids = HashSet::new();
    let user_event = |event_id: String, event_type: &str, user: &str, given_name: &str| {
        let payload = event_json(
            &event_id,
            event_type,
            "acme",
            user,
            serde_json::json!({"user": {"name": {"givenName": given_name, "familyName": "Drain"}}}),
        );
        (event_id, format!("acme/{user}"), payload)
    };
    for user in &users {
        let (id, key, payload) = user_event(format!("create-{user}"), "user.created", user, "v0");
        publish(&producer, &names.events, Some(&key), &payload, &[]).await;
        event_ids.insert(id);
    }

    // Every create is parked, and read back: the drained operations wait on the dead
    // target, filling `down`'s drain slots and its bound of operations held.
    eventually(
        "every create parked and the drain at its bound",
        Duration::from_secs(60),
        || async {
            let metrics = &app.metrics;
            let parked = metrics.operations_parked.with_label_values(&["down"]).get();
            let held = metrics.connector_held_operations.with_label_values(&["down"]).get();
            (parked >= USERS as u64 && held >= MAX_HELD as i64).then_some(())
        },
    )
    .await;

    // New work for the same users (and so for lanes held by a waiting drain):
    // UPDATES per user, more than the buffer holds.
    let started = Instant::now();
    for round in 1..=UPDATES {
        for user in &users {
            let (id, key, payload) = user_event(
                format!("update-{round}-{user}"),
                "user.updated",
                user,
                &format!("v{round}"),
            );
            publish(&producer, &names.events, Some(&key), &payload, &[]).await;
            event_ids.insert(id);
        }
    }
    let latest = format!("v{UPDATES}");
    wait_for_given_names(
        &healthy,
        &users,
        &latest,
        "`healthy` to hold every user's latest update while `down` is down",
        Duration::from_secs(120),
    )
    .await;
    let healthy_took = started.elapsed();
    let total_events = (USERS * (UPDATES + 1)) as i64;
    eventually(
        "every input event committed while `down` is down",
        Duration::from_secs(60),
        || async {
            let committed: i64 = committed_offsets(&names.group, &names.events, PARTITIONS)
                .iter()
                .map(|offset| (*offset).max(0))
                .sum();
            (committed >= total_events).then_some(())
        },
    )
    .await;
    let committed_took = started.elapsed();
    let parked_while_down = app.metrics.operations_parked.with_label_values(&["down"]).get();
    assert_eq!(
        parked_while_down, total_events as u64,
        "every operation for `down` parked while it is down"
    );
    assert_eq!(down.user_count(), 0, "`down` is down");

    // `down` is back: everything drains, in each user's order.
    down.set_faults(Faults::default());
    let recovered = Instant::now();
    wait_for_given_names(
        &down,
        &users,
        &latest,
        "`down` to hold every user's latest update after it is back",
        Duration::from_secs(300),
    )
    .await;
    let drain_took = recovered.elapsed();
    let (sentinel_id, sentinel_key, sentinel) = user_event("drain-sentinel".into(), "user.created", "sentinel", "s");
    publish(&producer, &names.events, Some(&sentinel_key), &sentinel, &[]).await;
    event_ids.insert(sentinel_id);
    let mut results = TopicReader::new(&names.results, 1);
    read_complete_results(&mut results, &event_ids, Duration::from_secs(180)).await;
    let figures = parking_figures(&app, &["down", "healthy"]);
    let stale = app.metrics.stale_events.with_label_values(&["down"]).get();
    app.stop().await;

    let tally = read_whole_results_topic(&mut results, &names.results).await;
    assert_one_complete_result_each(
        &tally,
        &event_ids,
        &["down", "healthy"],
        &[Outcome::Created, Outcome::Adopted, Outcome::Updated],
    );
    assert_parked_work_accounted(&tally, &figures);
    assert_eq!(stale, 0, "drained in order, no update is older than one applied");
    let (parked, drained) = figures["down"];
    eprintln!(
        "ISOLATION-REPORT drain-lanes: {USERS} users parked on a dead target, then {} updates for the same users (buffer {BUFFER}, max_in_flight {MAX_IN_FLIGHT}, max_held_operations {MAX_HELD}): `healthy` held every latest update {healthy_took:?} and every input event was committed {committed_took:?} after the first update; `down` parked {parked_while_down} while down, {parked} in all, {drained} drained in order (0 stale), every latest update on `down` {drain_took:?} after it was back; {} queued notices; one complete result for each of {} events",
        USERS * UPDATES,
        tally.notices.len(),
        event_ids.len(),
    );
}
