//! Fault injection. Each test runs a workload with a known end state through the real
//! service and a real broker (Apache Kafka; librdkafka's mock cluster for the broker
//! outage, where the broker must stop answering without a clean shutdown), injects one fault, and checks the target's final state against
//! the oracle: no missing effect, no per-user reordering. Each prints a `FAULT-REPORT`
//! line with its figures (`cargo test -- --nocapture` shows them).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use provisioner::devtools::emulators::scim::{self as scim_emulator, ScimEmulator, ScimEmulatorSettings};
use provisioner::devtools::emulators::Faults;
use provisioner::settings::Settings;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::FutureProducer;
use rdkafka::ClientConfig;
use tokio_util::sync::CancellationToken;

use crate::support::app::{producer, publish, Names, TestApp, TopicReader};
use crate::support::doubles::event_json;
use crate::support::eventually;
use crate::support::service::ServiceProcess;
use crate::support::workload::{converge, Workload};

const CONVERGE: Duration = Duration::from_secs(120);

async fn emulator(latency_ms: u64, jitter_ms: u64) -> (ScimEmulator, CancellationToken) {
    let shutdown = CancellationToken::new();
    let emulator = scim_emulator::start(
        "127.0.0.1:0".parse().unwrap(),
        ScimEmulatorSettings {
            faults: Faults {
                latency: Duration::from_millis(latency_ms),
                jitter: Duration::from_millis(jitter_ms),
                ..Faults::default()
            },
            ..ScimEmulatorSettings::default()
        },
        shutdown.clone(),
    )
    .await
    .unwrap();
    (emulator, shutdown)
}

/// The service configuration for these tests: tenant `acme` → a SCIM directory.
fn service_toml(kafka_and_admin: &str, scim_url: &str) -> String {
    format!(
        r#"{kafka_and_admin}
        [pipeline]
        max_in_flight = 32
        shutdown_grace = "15s"

        [telemetry]
        format = "json"
        level = "info"

        [connectors.directory]
        type = "scim2"
        base_url = "{scim_url}"
        [connectors.directory.http]
        request_timeout = "700ms"
        [connectors.directory.delivery]
        max_in_flight = 16
        initial_backoff = "20ms"
        max_backoff = "500ms"
        max_elapsed = "90s"
        max_attempts = 1000
        circuit_breaker_failures = 8
        circuit_breaker_cooldown = "500ms"

        [[tenants.acme.resident.bindings]]
        connector = "directory"
        blocking = true
        "#
    )
}

async fn wait_for_requests(emulator: &ScimEmulator, at_least: u64) {
    eventually("target progress", Duration::from_secs(60), || async {
        (emulator.control.stats.report().requests >= at_least).then_some(())
    })
    .await;
}

/// 1. SIGKILL the service mid-stream, restart it: the run completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_then_restart_completes_the_run() {
    let names = Names::new("sigkill");
    names.create(4).await;
    let (emulator, _emulator_shutdown) = emulator(5, 15).await;
    let workload = Workload::new(60, "acme");
    workload.publish(&producer(), &names.events).await;
    let directory = tempfile::tempdir().unwrap();
    let config = directory.path().join("provisioner.toml");
    // Admin on port 0: each run of the service gets its own port from the OS.
    let kafka = names.kafka_toml();
    std::fs::write(&config, service_toml(&kafka, &emulator.base_url())).unwrap();
    let log = directory.path().join("service.log");

    let mut first = ServiceProcess::start(&config, log.clone());
    wait_for_requests(&emulator, 120).await;
    first.signal("KILL");
    let status = first.wait(Duration::from_secs(10)).await;
    assert!(!status.success(), "SIGKILL should not look like a clean exit");
    let requests_at_kill = emulator.control.stats.report().requests;

    let mut second = ServiceProcess::start(&config, log);
    converge(&emulator, &workload.expected(), CONVERGE).await;
    second.signal("TERM");
    assert!(second.wait(Duration::from_secs(60)).await.success());
    eprintln!(
        "FAULT-REPORT sigkill: {} events for {} users; killed after {requests_at_kill} target requests; restarted; final state matches, 0 lost",
        workload.events.len(),
        workload.users
    );
}

/// 6. SIGTERM mid-stream: the service drains and commits, and the restart redoes
/// nothing that was already acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_a_restart_redoes_nothing() {
    let names = Names::new("sigterm");
    names.create(4).await;
    let (emulator, _emulator_shutdown) = emulator(20, 10).await;
    let workload = Workload::new(50, "acme");
    workload.publish(&producer(), &names.events).await;
    let directory = tempfile::tempdir().unwrap();
    let config = directory.path().join("provisioner.toml");
    // Admin on port 0: each run of the service gets its own port from the OS.
    let kafka = names.kafka_toml();
    std::fs::write(&config, service_toml(&kafka, &emulator.base_url())).unwrap();
    let log = directory.path().join("service.log");

    let mut first = ServiceProcess::start(&config, log.clone());
    wait_for_requests(&emulator, 80).await;
    first.signal("TERM");
    let status = first.wait(Duration::from_secs(60)).await;
    assert!(status.success(), "SIGTERM exit: {status:?}\n{}", first.log_text());
    assert!(first.log_text().contains("Shutdown signal received"));

    let mut second = ServiceProcess::start(&config, log);
    converge(&emulator, &workload.expected(), CONVERGE).await;
    // A sentinel, published after convergence, is the last result: once it is read,
    // every earlier result has been read too (one results partition).
    let sentinel = event_json("sentinel", "user.created", "acme", "sentinel", serde_json::json!({}));
    publish(&producer(), &names.events, Some("acme/sentinel"), &sentinel, &[]).await;
    let mut results = TopicReader::new(&names.results, 1);
    results
        .read_until("the sentinel's result", CONVERGE, |records| {
            records.iter().any(|record| record.result().event_id == "sentinel")
        })
        .await;
    second.signal("TERM");
    assert!(second.wait(Duration::from_secs(60)).await.success());

    let mut per_event: HashMap<String, usize> = HashMap::new();
    for record in &results.records {
        *per_event.entry(record.result().event_id).or_default() += 1;
    }
    let redone: Vec<_> = per_event.iter().filter(|(_, count)| **count > 1).collect();
    assert_eq!(per_event.len(), workload.events.len() + 1, "every event has a result");
    assert!(
        redone.is_empty(),
        "acknowledged events were redone after the drain: {redone:?}"
    );
    eprintln!(
        "FAULT-REPORT sigterm: {} events; drained and committed on SIGTERM; restart redid 0; final state matches, 0 lost",
        workload.events.len()
    );
}

/// 2. Stop the broker and bring it back. This uses librdkafka's mock cluster, whose
/// `broker_down` drops connections at once, mid-request, as a crashed broker or a network
/// partition would. `kafka_broker::the_service_rides_out_a_restart_of_the_broker_process`
/// stops and restarts a real Apache Kafka process instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_goes_down_and_comes_back() {
    let cluster = MockCluster::new(1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    // The mock cluster cannot set topic configs (or describe them): the state topic
    // is created plain, and the service checks only its partition count here.
    for (topic, partitions) in [
        ("events", 4),
        ("state", 4),
        ("results", 1),
        ("replies", 1),
        ("dead-letters", 1),
        // The connector's retry topic (parking): the mock cluster cannot create topics
        // through the admin API, so the service could not create it itself.
        ("provisioner.retry.directory", 4),
        // The membership topic (groups), for the same reason.
        ("provisioner.memberships", 4),
    ] {
        cluster.create_topic(topic, partitions, 1).unwrap();
    }
    let state_dir = tempfile::tempdir().unwrap();
    let (emulator, _emulator_shutdown) = emulator(10, 10).await;
    let kafka = format!(
        r#"
        [kafka]
        bootstrap_servers = "{bootstrap}"
        group_id = "broker-outage"
        event_topics = ["events"]
        results_topic = "results"
        reply_topic = "replies"
        dead_letter_topic = "dead-letters"
        commit_interval = "100ms"
        produce_timeout = "5s"
        [state]
        topic = "state"
        dir = "{state_dir}"
        [admin]
        listen = "127.0.0.1:0"
        "#,
        state_dir = state_dir.path().display(),
    );
    let settings = Settings::from_toml_str(&service_toml(&kafka, &emulator.base_url())).unwrap();
    let app = TestApp::spawn_configured(settings).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("message.timeout.ms", "60000")
        .create()
        .unwrap();
    let workload = Workload::new(60, "acme");
    workload.publish(&producer, "events").await;
    wait_for_requests(&emulator, 60).await;

    cluster.broker_down(1).unwrap();
    let outage = Duration::from_secs(3);
    let before = emulator.control.stats.report().requests;
    tokio::time::sleep(outage).await; // the fault itself: a three-second outage
    cluster.broker_up(1).unwrap();
    converge(&emulator, &workload.expected(), CONVERGE).await;
    let produce_failures: u64 = ["reply", "result", "dead_letter"]
        .iter()
        .map(|destination| app.metrics.produce_failures.with_label_values(&[destination]).get())
        .sum();
    app.stop().await;
    drop(producer);
    drop(cluster);
    eprintln!(
        "FAULT-REPORT broker-outage: {} events; broker down {outage:?} after {before} target requests; {produce_failures} produces retried; final state matches, 0 lost",
        workload.events.len()
    );
}

/// 3. The target returns 500s, hangs and resets connections for a while, then a full
/// outage opens the circuit, then it recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_target_recovers_and_the_circuit_holds_work_meanwhile() {
    let names = Names::new("flaky");
    names.create(4).await;
    let (emulator, _emulator_shutdown) = emulator(5, 5).await;
    emulator.set_faults(Faults {
        latency: Duration::from_millis(5),
        rate_500: 0.2,
        rate_hang: 0.05,
        rate_reset: 0.05,
        ..Faults::default()
    });
    let settings = Settings::from_toml_str(&service_toml(&names.kafka_toml(), &emulator.base_url())).unwrap();
    let app = TestApp::spawn_configured(settings).await;
    let workload = Workload::new(60, "acme");
    workload.publish(&producer(), &names.events).await;
    wait_for_requests(&emulator, 100).await;

    // Full outage: the circuit opens and calls are held rather than retried.
    emulator.set_faults(Faults {
        rate_500: 1.0,
        ..Faults::default()
    });
    eventually("the circuit to open", Duration::from_secs(30), || async {
        (app.metrics.circuit_state.with_label_values(&["directory"]).get() == 1).then_some(())
    })
    .await;
    // Calls admitted just before the circuit opened may still be arriving (a loaded
    // machine delays them): count from half a second after the open.
    let settled_at = Instant::now() + Duration::from_millis(500);
    eventually(
        "the calls admitted before the open to arrive",
        Duration::from_secs(5),
        || async { (Instant::now() >= settled_at).then_some(()) },
    )
    .await;
    let opened_at = Instant::now();
    let requests_at_open = emulator.control.stats.report().requests;
    eventually("two seconds of outage", Duration::from_secs(10), || async {
        (opened_at.elapsed() >= Duration::from_secs(2)).then_some(())
    })
    .await;
    let requests_while_open = emulator.control.stats.report().requests - requests_at_open;
    // 16 concurrent calls retrying every ≤ 500 ms would make dozens; probes make a few.
    assert!(
        requests_while_open <= 8,
        "the open circuit let {requests_while_open} calls through in 2 s"
    );
    emulator.set_faults(Faults::default());
    converge(&emulator, &workload.expected(), CONVERGE).await;
    eventually("the circuit to close", Duration::from_secs(30), || async {
        (app.metrics.circuit_state.with_label_values(&["directory"]).get() == 0).then_some(())
    })
    .await;
    let stats = emulator.control.stats.report();
    app.stop().await;
    eprintln!(
        "FAULT-REPORT flaky-target: {} events; {} injected faults (500s, hangs, resets); outage held {} calls in 2 s with the circuit open; final state matches, 0 lost",
        workload.events.len(),
        stats.injected_faults,
        requests_while_open
    );
}

/// 4. 429 with Retry-After: the service waits at least that long before calling again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_pauses_calls_for_at_least_its_retry_after() {
    let names = Names::new("throttle");
    names.create(2).await;
    let (emulator, _emulator_shutdown) = emulator(2, 2).await;
    emulator.set_faults(Faults {
        rate_429: 1.0,
        retry_after_seconds: 2,
        ..Faults::default()
    });
    let settings = Settings::from_toml_str(&service_toml(&names.kafka_toml(), &emulator.base_url())).unwrap();
    let app = TestApp::spawn_configured(settings).await;
    let workload = Workload::new(20, "acme");
    workload.publish(&producer(), &names.events).await;
    let first_429 = eventually("a 429", Duration::from_secs(30), || async {
        emulator
            .control
            .requests()
            .into_iter()
            .find(|request| request.status == 429)
    })
    .await;
    // The throttle lasts a second. Calls the service had already sent when the first 429
    // came back (other users run concurrently) land within milliseconds and are
    // throttled too, instead of succeeding and looking like calls that ignored it.
    eventually("a second of throttling", Duration::from_secs(10), || async {
        (first_429.at.elapsed() >= Duration::from_secs(1)).then_some(())
    })
    .await;
    emulator.set_faults(Faults::default());
    converge(&emulator, &workload.expected(), CONVERGE).await;
    let log = emulator.control.requests();
    // Calls already in flight when the last 429 was sent may land just after it; the
    // first call *started* after the throttle must wait out Retry-After.
    let last_429 = log
        .iter()
        .filter(|request| request.status == 429)
        .map(|request| request.at)
        .max()
        .unwrap();
    let next = log
        .iter()
        .filter(|request| request.status != 429 && request.at > last_429)
        .map(|request| request.at)
        .min()
        .expect("calls after the throttle");
    let waited = next.duration_since(last_429);
    assert!(
        next.duration_since(first_429.at) >= Duration::from_secs(2),
        "called again {:?} after the first 429 (Retry-After: 2)",
        next.duration_since(first_429.at)
    );
    let throttled = log.iter().filter(|request| request.status == 429).count();
    app.stop().await;
    eprintln!(
        "FAULT-REPORT retry-after: {throttled} calls got 429 (Retry-After 2 s); the next call came {:.2} s after the first 429 and {:.2} s after the last; final state matches, 0 lost",
        next.duration_since(first_429.at).as_secs_f64(),
        waited.as_secs_f64()
    );
}

/// 5. A second instance joins and the first leaves, mid-stream (two rebalances).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_joining_and_leaving_mid_stream_lose_nothing() {
    let names = Names::new("rebalance");
    names.create(4).await;
    let (emulator, _emulator_shutdown) = emulator(40, 20).await;
    // Few calls at once, so the stream is still flowing when the second instance joins.
    let toml =
        service_toml(&names.kafka_toml(), &emulator.base_url()).replace("max_in_flight = 16", "max_in_flight = 3");
    let settings = Settings::from_toml_str(&toml).unwrap();
    let first = TestApp::spawn_configured(settings.clone()).await;
    let workload = Workload::new(90, "acme");
    workload.publish(&producer(), &names.events).await;
    wait_for_requests(&emulator, 60).await;

    let second = TestApp::spawn_configured(settings).await;
    eventually(
        "the second instance to get partitions",
        Duration::from_secs(60),
        || async { (second.metrics.assigned_partitions.get() > 0).then_some(()) },
    )
    .await;
    let shared = second.metrics.assigned_partitions.get();
    let progress = emulator.control.stats.report().requests;
    wait_for_requests(&emulator, progress + 60).await;
    first.stop().await;
    converge(&emulator, &workload.expected(), CONVERGE).await;
    let second_did: u64 = ["succeeded", "failed", "partial", "skipped"]
        .iter()
        .map(|status| second.metrics.events_completed.with_label_values(&[status]).get())
        .sum();
    assert!(second_did > 0, "the second instance did no work");
    second.stop().await;
    eprintln!(
        "FAULT-REPORT rebalance: {} events; a second instance joined (took {shared} of 4 partitions) and the first left mid-stream; the second finished {second_did} events; final state matches, 0 lost",
        workload.events.len()
    );
}

/// A target down for longer than an event's `max_elapsed`: the circuit holds the work,
/// then the events fail for good with a final `failed` result and a dead letter, and
/// the partition moves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_the_retry_time_fails_events_for_good() {
    let names = Names::new("long-outage");
    names.create(1).await;
    let (emulator, _emulator_shutdown) = emulator(1, 1).await;
    emulator.set_faults(Faults {
        rate_500: 1.0,
        ..Faults::default()
    });
    let toml = service_toml(&names.kafka_toml(), &emulator.base_url())
        .replace("max_elapsed = \"90s\"", "max_elapsed = \"2s\"");
    let app = TestApp::spawn_configured(Settings::from_toml_str(&toml).unwrap()).await;
    let producer = producer();
    for user in ["u1", "u2", "u3"] {
        let event = event_json(user, "user.created", "acme", user, serde_json::json!({}));
        publish(&producer, &names.events, Some(&format!("acme/{user}")), &event, &[]).await;
    }
    let mut dead_letters = TopicReader::new(&names.dead_letters, 1);
    dead_letters
        .read_until("three dead letters", Duration::from_secs(60), |records| {
            records.len() >= 3
        })
        .await;
    assert!(dead_letters
        .records
        .iter()
        .all(|record| record.headers["x-provisioner-reason"] == "connector_failed"));
    let mut results = TopicReader::new(&names.results, 1);
    results
        .read_until("three results", Duration::from_secs(60), |records| records.len() >= 3)
        .await;
    for record in &results.records {
        let result = record.result();
        assert_eq!(result.status, provisioner::result::Status::Failed, "{result:?}");
        let error = result.results[0].error.as_ref().unwrap();
        assert_eq!(error.kind, provisioner::result::ErrorKind::Exhausted, "{error:?}");
    }
    // The partition moved on: once the target is back, a new event succeeds.
    emulator.set_faults(Faults::default());
    let after = event_json("after", "user.created", "acme", "u4", serde_json::json!({}));
    publish(&producer, &names.events, Some("acme/u4"), &after, &[]).await;
    results
        .read_until("the result after the outage", Duration::from_secs(60), |records| {
            records.iter().any(|record| record.result().event_id == "after")
        })
        .await;
    let calls = emulator.control.stats.report().requests;
    app.stop().await;
    eprintln!(
        "FAULT-REPORT long-outage: 3 events against a target down longer than max_elapsed (2 s): {calls} target calls in all, each event failed for good with a dead letter; the next event after recovery succeeded"
    );
}
