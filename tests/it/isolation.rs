//! Isolation of targets: one target that is down holds up no other target and no
//! blocking caller; its work waits durably in its retry topic and is applied, in
//! per-user order, when it returns. Real Apache Kafka broker, SCIM emulators as targets.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use provisioner::client::Client;
use provisioner::devtools::emulators::scim::{self as scim_emulator, ScimEmulator, ScimEmulatorSettings};
use provisioner::devtools::emulators::Faults;
use provisioner::result::{Outcome, ProvisioningResult, ResultScope, Status};
use provisioner::settings::Settings;
use tokio_util::sync::CancellationToken;

use crate::support::app::{producer, publish, Names, TestApp, TopicReader};
use crate::support::doubles::event_json;
use crate::support::eventually;
use crate::support::service::{metric, ServiceProcess};
use crate::support::workload::{converge, differences, scim_state, Expected, Workload};

/// 667 users × 3 events: 2,001 blocking callers.
const USERS: usize = 667;
const PARTITIONS: i32 = 4;

async fn scim(faults: Faults) -> (ScimEmulator, CancellationToken) {
    let shutdown = CancellationToken::new();
    let emulator = scim_emulator::start(
        "127.0.0.1:0".parse().unwrap(),
        ScimEmulatorSettings {
            faults,
            ..ScimEmulatorSettings::default()
        },
        shutdown.clone(),
    )
    .await
    .unwrap();
    (emulator, shutdown)
}

fn settings(names: &Names, directory: &str, workspace: &str) -> Settings {
    Settings::from_toml_str(&settings_toml(names, directory, workspace)).expect("valid settings")
}

fn settings_toml(names: &Names, directory: &str, workspace: &str) -> String {
    format!(
        r#"{kafka}
        [pipeline]
        reply_deadline = "10s"

        [connectors.directory]
        type = "scim2"
        base_url = "{directory}"

        [connectors.workspace]
        type = "scim2"
        base_url = "{workspace}"
        [connectors.workspace.http]
        request_timeout = "2s"
        [connectors.workspace.delivery]
        max_elapsed = "3s"
        circuit_breaker_failures = 3
        circuit_breaker_cooldown = "500ms"

        [[tenants.acme.resident.bindings]]
        connector = "directory"
        blocking = true

        [[tenants.acme.resident.bindings]]
        connector = "workspace"
        blocking = false
        "#,
        // Names' [kafka] section has a [parking] table already (the retry topics' prefix).
        kafka = names
            .kafka_toml()
            .replace("[parking]", "[parking]\npark_after = \"1s\""),
    )
}

/// What one run measured.
struct Run {
    replies: Vec<Duration>,
    parked: u64,
    drained: u64,
    peak_rss_mib: u64,
    drain_time: Duration,
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    sorted[((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn rss_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmRSS:"))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<u64>().ok())
        })
        .unwrap_or(0)
        / 1024
}

/// Sends the workload as blocking callers, round by round (a user's events in order),
/// with `workspace` down when `outage` is set; brings it back; waits for a sentinel's
/// complete result and for both targets to match the oracle; checks that every event
/// has exactly one complete result.
async fn run(test: &str, outage: bool) -> Run {
    let names = Names::new(test);
    names.create(PARTITIONS).await;
    let latency = Faults {
        latency: Duration::from_millis(5),
        jitter: Duration::from_millis(10),
        ..Faults::default()
    };
    let (directory, _directory_shutdown) = scim(latency.clone()).await;
    let (workspace, _workspace_shutdown) = scim(latency.clone()).await;
    if outage {
        workspace.set_faults(Faults {
            rate_500: 1.0,
            ..latency.clone()
        });
    }
    let settings = settings(&names, &directory.base_url(), &workspace.base_url());
    let app = TestApp::spawn_configured(settings.clone()).await;
    let client = Client::connect(&settings.kafka).await.unwrap();
    let workload = Workload::new(USERS, "acme");

    let mut replies: Vec<Duration> = Vec::with_capacity(workload.events.len());
    let mut peak_rss_mib = rss_mib();
    for round in workload.events.chunks(USERS) {
        let answers = futures::future::join_all(round.iter().map(|(_, payload)| {
            let client = &client;
            async move {
                let sent = Instant::now();
                let reply = client.send_and_wait(payload, Duration::from_secs(60)).await;
                (sent.elapsed(), reply)
            }
        }))
        .await;
        for (waited, reply) in answers {
            let reply: ProvisioningResult = reply.expect("every blocking caller gets a reply");
            assert_eq!(reply.scope, ResultScope::Blocking);
            assert_eq!(reply.status, Status::Succeeded, "{reply:?}");
            assert!(
                reply.results.iter().all(|result| result.connector == "directory"),
                "a reply carries the blocking bindings only: {reply:?}"
            );
            replies.push(waited);
        }
        peak_rss_mib = peak_rss_mib.max(rss_mib());
    }
    // The healthy target has everything while the other is still down.
    converge(&directory, &workload.expected(), Duration::from_secs(60)).await;
    if outage {
        assert!(
            workspace.users().is_empty(),
            "the down target accepted {} users",
            workspace.users().len()
        );
        eventually("work to be parked", Duration::from_secs(60), || async {
            (app.metrics.operations_parked.with_label_values(&["workspace"]).get() > 0).then_some(())
        })
        .await;
    }

    // The target returns; a sentinel published after everything else marks the end.
    let recovered_at = Instant::now();
    workspace.set_faults(latency);
    let sentinel = event_json("sentinel", "user.created", "acme", "sentinel", serde_json::json!({}));
    let reply = client.send_and_wait(&sentinel, Duration::from_secs(60)).await.unwrap();
    assert_eq!(reply.status, Status::Succeeded);
    let mut results = TopicReader::new(&names.results, 1);
    results
        .read_until("the sentinel's complete result", Duration::from_secs(180), |records| {
            records.iter().any(|record| {
                let result = record.result();
                result.event_id == "sentinel" && result.scope == ResultScope::Complete
            })
        })
        .await;
    // Everything parked is applied in per-user order: the final state is the oracle's
    // (a reordered update or delete would leave v2, or bring a deleted user back).
    let expected = workload.expected();
    converge_without(&workspace, &expected, "sentinel", Duration::from_secs(180)).await;
    converge_without(&directory, &expected, "sentinel", Duration::from_secs(60)).await;
    let drain_time = recovered_at.elapsed();

    // Exactly one complete result per event (read to the sentinel's, which comes last
    // for its partition but not necessarily for the topic: keep reading until every
    // event has one).
    let event_ids: Vec<String> = workload
        .events
        .iter()
        .map(|(_, payload)| {
            serde_json::from_slice::<serde_json::Value>(payload).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let complete_per_event = |records: &[crate::support::app::OutputRecord]| {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for record in records {
            let result = record.result();
            if result.scope == ResultScope::Complete {
                *counts.entry(result.event_id).or_default() += 1;
            }
        }
        counts
    };
    results
        .read_until(
            "a complete result for every event",
            Duration::from_secs(180),
            |records| {
                let counts = complete_per_event(records);
                event_ids.iter().all(|id| counts.contains_key(id))
            },
        )
        .await;
    let counts = complete_per_event(&results.records);
    for id in &event_ids {
        assert_eq!(counts.get(id), Some(&1), "event {id}: complete results");
    }
    let parked = app.metrics.operations_parked.with_label_values(&["workspace"]).get();
    let drained = app
        .metrics
        .operations_drained
        .with_label_values(&["workspace", "applied"])
        .get()
        + app
            .metrics
            .operations_drained
            .with_label_values(&["workspace", "stale"])
            .get();
    let notices = results
        .records
        .iter()
        .filter(|record| record.result().scope == ResultScope::Queued)
        .count() as u64;
    assert_eq!(notices, parked, "one queued notice per parked operation");
    assert_eq!(drained, parked, "every parked operation drained and applied");
    if outage {
        // The complete results say what finally happened on the returned target.
        for record in &results.records {
            let result = record.result();
            if result.scope == ResultScope::Complete && result.event_id != "sentinel" {
                let workspace_result = result.results.iter().find(|result| result.connector == "workspace");
                assert!(
                    workspace_result
                        .is_some_and(|result| result.outcome != Outcome::Queued && result.outcome != Outcome::Failed),
                    "{result:?}"
                );
            }
        }
    }
    app.stop().await;
    Run {
        replies,
        parked,
        drained,
        peak_rss_mib,
        drain_time,
    }
}

/// [`converge`] on every user but `skip`.
async fn converge_without(emulator: &ScimEmulator, expected: &Expected, skip: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let mut state = scim_state(emulator);
        state.remove(skip);
        let problems = differences(expected, &state);
        if problems.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the target did not converge within {timeout:?}; {} differences, first: {:?}",
            problems.len(),
            &problems[..problems.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_blocking_target_that_is_down_holds_up_no_blocking_caller_and_its_work_is_applied_in_order_when_it_returns(
) {
    let healthy = run("isolation-healthy", false).await;
    let outage = run("isolation-outage", true).await;
    let mut healthy_replies = healthy.replies.clone();
    healthy_replies.sort();
    let mut outage_replies = outage.replies.clone();
    outage_replies.sort();
    let (healthy_p50, healthy_p99) = (percentile(&healthy_replies, 0.5), percentile(&healthy_replies, 0.99));
    let (outage_p50, outage_p99) = (percentile(&outage_replies, 0.5), percentile(&outage_replies, 0.99));
    eprintln!(
        "ISOLATION-REPORT {} blocking callers per run; all targets up: reply p50 {healthy_p50:?} p99 {healthy_p99:?}, test-process peak RSS {} MiB; \
         non-blocking target down (past its max_elapsed): reply p50 {outage_p50:?} p99 {outage_p99:?}, peak RSS {} MiB, \
         {} operations parked, {} drained and applied in order {:?} after the target returned",
        outage.replies.len(),
        healthy.peak_rss_mib,
        outage.peak_rss_mib,
        outage.parked,
        outage.drained,
        outage.drain_time,
    );
    assert_eq!(healthy.parked, 0, "nothing parks while every target is up");
    assert!(outage.parked > 0, "the down target's work was parked");
    // Within 2× of the healthy run (plus 50 ms of slack for a timer tick on a busy machine).
    assert!(
        outage_p99 <= healthy_p99 * 2 + Duration::from_millis(50),
        "reply p99 {outage_p99:?} with the outage vs {healthy_p99:?} without"
    );
    // Peak RSS is reported, not asserted: it is the whole test process, shared with
    // whichever other tests run beside this one.
}

/// A healthy `directory` and a `workspace` failing every call (a 500), both with a
/// small latency (`latency`, which brings `workspace` back).
struct Targets {
    directory: ScimEmulator,
    workspace: ScimEmulator,
    latency: Faults,
    _shutdown: [CancellationToken; 2],
}

async fn targets_with_workspace_down() -> Targets {
    let latency = Faults {
        latency: Duration::from_millis(5),
        jitter: Duration::from_millis(5),
        ..Faults::default()
    };
    let (directory, directory_shutdown) = scim(latency.clone()).await;
    let (workspace, workspace_shutdown) = scim(Faults {
        rate_500: 1.0,
        ..latency.clone()
    })
    .await;
    Targets {
        directory,
        workspace,
        latency,
        _shutdown: [directory_shutdown, workspace_shutdown],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_while_work_is_parked_loses_nothing_and_keeps_per_user_order() {
    let names = Names::new("parked-kill");
    names.create(PARTITIONS).await;
    let Targets {
        directory,
        workspace,
        latency,
        _shutdown,
    } = targets_with_workspace_down().await;
    let folder = tempfile::tempdir().unwrap();
    let config = folder.path().join("provisioner.toml");
    std::fs::write(
        &config,
        settings_toml(&names, &directory.base_url(), &workspace.base_url()),
    )
    .unwrap();
    let log = folder.path().join("service.log");
    let workload = Workload::new(60, "acme");
    workload.publish(&producer(), &names.events).await;

    let mut first = ServiceProcess::start(&config, log.clone());
    let admin = first.admin_address().await;
    let parked_series = "provisioner_operations_parked_total{connector=\"workspace\"}";
    let parked_at_kill = eventually("work to be parked", Duration::from_secs(90), || async {
        metric(admin, parked_series).await.filter(|parked| *parked >= 60.0)
    })
    .await;
    first.signal("KILL");
    assert!(!first.wait(Duration::from_secs(10)).await.success());

    // The target returns; a new process takes over from what Kafka holds: the parked
    // work in the retry topic, the lanes' marks in the state topic.
    workspace.set_faults(latency);
    let mut second = ServiceProcess::start(&config, log);
    let sentinel = event_json("sentinel", "user.created", "acme", "sentinel", serde_json::json!({}));
    publish(&producer(), &names.events, Some("acme/sentinel"), &sentinel, &[]).await;
    eventually(
        "the sentinel on the returned target",
        Duration::from_secs(180),
        || async { scim_state(&workspace).contains_key("sentinel").then_some(()) },
    )
    .await;
    let expected = workload.expected();
    converge_without(&workspace, &expected, "sentinel", Duration::from_secs(180)).await;
    converge_without(&directory, &expected, "sentinel", Duration::from_secs(60)).await;
    second.signal("TERM");
    assert!(
        second.wait(Duration::from_secs(60)).await.success(),
        "{}",
        second.log_text()
    );
    eprintln!(
        "ISOLATION-REPORT kill -9 while parked: {} events for {} users; {parked_at_kill} operations parked when the first process was killed; the second drained them with the target back; both targets match the oracle (per-user order kept), 0 lost",
        workload.events.len(),
        workload.users
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_joining_while_work_is_parked_takes_its_share_and_drains_it_in_order() {
    let names = Names::new("parked-join");
    names.create(PARTITIONS).await;
    let Targets {
        directory,
        workspace,
        latency,
        _shutdown,
    } = targets_with_workspace_down().await;
    let folder = tempfile::tempdir().unwrap();
    let toml = settings_toml(&names, &directory.base_url(), &workspace.base_url());
    let first_config = folder.path().join("first.toml");
    std::fs::write(&first_config, &toml).unwrap();
    // The second instance: same group and topics, a local store of its own.
    let second_store = folder.path().join("second-state");
    let second_config = folder.path().join("second.toml");
    std::fs::write(
        &second_config,
        toml.replace(
            &names.state_dir.path().display().to_string(),
            &second_store.display().to_string(),
        ),
    )
    .unwrap();
    let workload = Workload::new(60, "acme");
    workload.publish(&producer(), &names.events).await;

    let mut first = ServiceProcess::start(&first_config, folder.path().join("first.log"));
    let first_admin = first.admin_address().await;
    let parked_series = "provisioner_operations_parked_total{connector=\"workspace\"}";
    eventually("work to be parked", Duration::from_secs(90), || async {
        metric(first_admin, parked_series)
            .await
            .filter(|parked| *parked >= 60.0)
    })
    .await;

    // A second instance joins during the outage: partitions (with their retry
    // partitions) move to it; then the target returns.
    let mut second = ServiceProcess::start(&second_config, folder.path().join("second.log"));
    let second_admin = second.admin_address().await;
    let assigned = "provisioner_assigned_partitions";
    eventually(
        "the second instance to take partitions",
        Duration::from_secs(90),
        || async {
            metric(second_admin, assigned)
                .await
                .filter(|partitions| *partitions > 0.0)
        },
    )
    .await;
    // The first instance stopped its drains of the partitions it lost, at once and with
    // no further attempt (they wait off the wire on the open circuit).
    let revoked_series = "provisioner_operations_revoked_total{connector=\"workspace\"}";
    let revoked = eventually(
        "the first instance to stop its drains of revoked partitions",
        Duration::from_secs(30),
        || async {
            metric(first_admin, revoked_series)
                .await
                .filter(|revoked| *revoked > 0.0)
        },
    )
    .await;
    let parked_before_return = metric(first_admin, parked_series).await.unwrap_or(0.0);
    // The target returns, slow: each call takes 300 ms, so drains are on the wire for
    // a while.
    workspace.set_faults(Faults {
        latency: Duration::from_millis(300),
        ..latency
    });
    let sentinel = event_json("sentinel", "user.created", "acme", "sentinel", serde_json::json!({}));
    publish(&producer(), &names.events, Some("acme/sentinel"), &sentinel, &[]).await;
    eventually(
        "the sentinel on the returned target",
        Duration::from_secs(180),
        || async { scim_state(&workspace).contains_key("sentinel").then_some(()) },
    )
    .await;
    let expected = workload.expected();
    converge_without(&workspace, &expected, "sentinel", Duration::from_secs(180)).await;
    converge_without(&directory, &expected, "sentinel", Duration::from_secs(60)).await;
    let mut parked_by = Vec::new();
    for admin in [first_admin, second_admin] {
        parked_by.push(metric(admin, parked_series).await.unwrap_or(0.0));
    }
    let drained_series =
        |result: &str| format!("provisioner_operations_drained_total{{connector=\"workspace\",result=\"{result}\"}}");
    let mut drained_by = Vec::new();
    for admin in [first_admin, second_admin] {
        let mut drained = 0.0;
        for result in ["applied", "stale"] {
            drained += metric(admin, &drained_series(result)).await.unwrap_or(0.0);
        }
        drained_by.push(drained);
    }
    // Each parked operation was drained exactly once: the first instance applied none
    // of those it had stopped for the second.
    assert_eq!(
        drained_by[0] + drained_by[1],
        parked_by[0] + parked_by[1],
        "drained (first, second) {drained_by:?} against parked {parked_by:?}"
    );
    first.signal("TERM");
    second.signal("TERM");
    assert!(
        first.wait(Duration::from_secs(60)).await.success(),
        "{}",
        first.log_text()
    );
    assert!(
        second.wait(Duration::from_secs(60)).await.success(),
        "{}",
        second.log_text()
    );
    eprintln!(
        "ISOLATION-REPORT second instance joining while parked: {} events for {} users; {parked_before_return} operations parked before the join; the first instance stopped {revoked} waiting drains when their partitions moved; the target returned slow (300 ms a call); parked (first, second) {parked_by:?}, drained {drained_by:?}: each once; both targets match the oracle (per-user order kept), 0 lost",
        workload.events.len(),
        workload.users,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_work_of_a_connector_removed_from_the_configuration_is_dead_lettered_with_the_reason() {
    let names = Names::new("parked-removed");
    names.create(PARTITIONS).await;
    let Targets {
        directory,
        workspace,
        latency: _,
        _shutdown,
    } = targets_with_workspace_down().await;
    let toml = settings_toml(&names, &directory.base_url(), &workspace.base_url());
    let app = TestApp::spawn_configured(Settings::from_toml_str(&toml).unwrap()).await;
    let workload = Workload::new(10, "acme");
    workload.publish(&producer(), &names.events).await;
    eventually("every workspace operation parked", Duration::from_secs(90), || async {
        (app.metrics.operations_parked.with_label_values(&["workspace"]).get() >= workload.events.len() as u64)
            .then_some(())
    })
    .await;
    let parked = app.metrics.operations_parked.with_label_values(&["workspace"]).get();
    app.stop().await;

    // The operator removes the connector (and its binding) while work is parked for it.
    // Everything before `[connectors.workspace]` (the Kafka, pipeline and directory
    // sections), and the directory's binding alone.
    let without_workspace = format!(
        "{}\n[[tenants.acme.resident.bindings]]\nconnector = \"directory\"\nblocking = true\n",
        toml.split("[connectors.workspace]").next().unwrap()
    );
    let app = TestApp::spawn_configured(Settings::from_toml_str(&without_workspace).unwrap()).await;
    let mut dead_letters = TopicReader::new(&names.dead_letters, 1);
    dead_letters
        .read_until(
            "a dead letter per parked operation",
            Duration::from_secs(90),
            |records| {
                records
                    .iter()
                    .filter(|record| {
                        record.headers.get("x-provisioner-reason").map(String::as_str) == Some("connector_removed")
                    })
                    .count() as u64
                    >= parked
            },
        )
        .await;
    // Each event's complete result is written once its parked operation has failed for good.
    let mut results = TopicReader::new(&names.results, 1);
    results
        .read_until("a complete result per event", Duration::from_secs(90), |records| {
            records
                .iter()
                .filter(|record| record.result().scope == ResultScope::Complete)
                .count()
                >= workload.events.len()
        })
        .await;
    for record in &results.records {
        let result = record.result();
        if result.scope != ResultScope::Complete {
            continue;
        }
        let workspace_result = result
            .results
            .iter()
            .find(|result| result.connector == "workspace")
            .unwrap_or_else(|| panic!("{result:?}"));
        assert_eq!(workspace_result.outcome, Outcome::Failed, "{result:?}");
        assert_eq!(result.status, Status::Partial, "{result:?}");
    }
    app.stop().await;
    eprintln!(
        "ISOLATION-REPORT removed connector: {parked} parked operations of a connector removed from the configuration, each dead-lettered `connector_removed` by the next run; every event's complete result says `failed` for it"
    );
}
