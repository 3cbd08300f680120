//! Blocking callers (`provisioner::client`, `provisioner send`) and `dlq replay`.

use std::process::Command;
use std::time::Duration;

use provisioner::client::{Client, ClientError};
use provisioner::connectors::ConnectorError;
use provisioner::kafka::dead_letters::{self, ReplaySelection};
use provisioner::result::{Outcome, Status};
use provisioner::settings::Settings;

use crate::support::app::{Names, TestApp, TopicReader};
use crate::support::doubles::{event_json, RecordingConnector};

const CONFIG: &str = r#"
[connectors.directory]
type = "scim2"
base_url = "http://127.0.0.1:9/unused"
[connectors.directory.delivery]
max_attempts = 1

[[tenants.acme.resident.bindings]]
connector = "directory"
blocking = true
"#;

fn write_config(directory: &std::path::Path, names: &Names) -> std::path::PathBuf {
    let path = directory.join("provisioner.toml");
    std::fs::write(&path, format!("{}\n{CONFIG}", names.kafka_toml())).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_gets_each_concurrent_caller_its_own_reply() {
    let names = Names::new("client");
    names.create(2).await;
    let settings = Settings::from_toml_str(&format!("{}\n{CONFIG}", names.kafka_toml())).unwrap();
    let directory = RecordingConnector::new().with_latency(Duration::from_millis(1), Duration::from_millis(30));
    directory.fail_next(
        "acme/u-refused",
        vec![ConnectorError::Rejected {
            status: 400,
            message: "uniqueness".into(),
        }],
    );
    let app = TestApp::spawn(settings.clone(), vec![("directory", directory.clone())]).await;
    let client = Client::connect(&settings.kafka).await.unwrap();

    let users = ["u-a", "u-b", "u-c", "u-refused", "u-d"];
    let replies = futures::future::join_all(users.iter().map(|user| {
        let event = event_json(user, "user.self_signed_up", "acme", user, serde_json::json!({}));
        let client = &client;
        async move { client.send_and_wait(&event, Duration::from_secs(60)).await }
    }))
    .await;
    for (user, reply) in users.iter().zip(replies) {
        let reply = reply.unwrap_or_else(|error| panic!("{user}: {error}"));
        assert_eq!(reply.user_id, *user, "a caller got someone else's reply");
        if *user == "u-refused" {
            assert_eq!(reply.status, Status::Failed);
        } else {
            assert_eq!(reply.status, Status::Succeeded);
            assert_eq!(reply.results[0].outcome, Outcome::Created);
        }
    }

    let invalid = client.send_and_wait(b"{}", Duration::from_secs(1)).await;
    assert!(matches!(invalid, Err(ClientError::InvalidEvent(_))), "{invalid:?}");

    // A caller that gives up (its future dropped mid-wait) leaves no waiter behind.
    directory.gated();
    let slow = event_json("u-slow", "user.self_signed_up", "acme", "u-slow", serde_json::json!({}));
    let pending = client.publish_for_reply(&slow).await.unwrap();
    assert_eq!(client.waiting(), 1);
    let abandoned = tokio::time::timeout(Duration::from_millis(200), pending.wait(Duration::from_secs(60))).await;
    assert!(abandoned.is_err(), "the gated target cannot have answered");
    assert_eq!(client.waiting(), 0, "the cancelled wait left its waiter");
    app.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioner_send_exits_by_outcome() {
    let names = Names::new("send");
    names.create(1).await;
    let directory = tempfile::tempdir().unwrap();
    let config = write_config(directory.path(), &names);
    let config_for_send = config.clone();
    let send = move |event_file: &std::path::Path, timeout: &str| {
        let config = &config_for_send;
        Command::new(env!("CARGO_BIN_EXE_provisioner"))
            .args(["send", "--wait", "--timeout", timeout, "--config"])
            .arg(config)
            .arg(event_file)
            .output()
            .expect("send runs")
    };
    let good = directory.path().join("good.json");
    std::fs::write(
        &good,
        event_json("e-good", "user.created", "acme", "u-good", serde_json::json!({})),
    )
    .unwrap();
    let refused = directory.path().join("refused.json");
    std::fs::write(
        &refused,
        event_json("e-refused", "user.created", "acme", "u-refused", serde_json::json!({})),
    )
    .unwrap();
    let invalid = directory.path().join("invalid.json");
    std::fs::write(
        &invalid,
        br#"{"specversion":"1.0","id":"x","source":"s","type":"user.created","data":{}}"#,
    )
    .unwrap();

    // Nobody is serving yet: the reply cannot come.
    let output = send(&good, "2s");
    assert_eq!(
        output.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stderr).contains("no reply"));

    let settings = Settings::load(&config).unwrap();
    let double = RecordingConnector::new();
    double.fail_next(
        "acme/u-refused",
        vec![ConnectorError::Rejected {
            status: 400,
            message: "invalidValue".into(),
        }],
    );
    let app = TestApp::spawn(settings, vec![("directory", double.clone())]).await;
    let output = tokio::task::spawn_blocking(move || {
        let good_output = send(&good, "60s");
        let refused_output = send(&refused, "60s");
        let invalid_output = send(&invalid, "60s");
        (good_output, refused_output, invalid_output)
    })
    .await
    .unwrap();
    let (good_output, refused_output, invalid_output) = output;
    let stdout = String::from_utf8_lossy(&good_output.stdout);
    assert_eq!(good_output.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("\"status\": \"succeeded\""), "{stdout}");
    assert_eq!(refused_output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused_output.stdout).contains("\"status\": \"failed\""));
    assert_eq!(invalid_output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&invalid_output.stderr).contains("data.tenant"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_can_be_replayed_after_the_cause_is_fixed() {
    let names = Names::new("replay");
    names.create(1).await;
    let settings = Settings::from_toml_str(&format!("{}\n{CONFIG}", names.kafka_toml())).unwrap();
    let directory = RecordingConnector::new();
    directory.fail_next(
        "acme/u-outage",
        vec![ConnectorError::Server {
            status: 503,
            message: "down".into(),
            retry_after: None,
        }],
    );
    let app = TestApp::spawn(settings.clone(), vec![("directory", directory.clone())]).await;
    let producer = crate::support::app::producer();
    let failing = event_json("e-outage", "user.created", "acme", "u-outage", serde_json::json!({}));
    // One at a time, so that the first dead letter is known to be the failed create.
    let mut dead_letters = TopicReader::new(&names.dead_letters, 1);
    crate::support::app::publish(&producer, &names.events, Some("acme/u-outage"), &failing, &[]).await;
    dead_letters
        .read_until("the first dead letter", Duration::from_secs(60), |records| {
            !records.is_empty()
        })
        .await;
    crate::support::app::publish(&producer, &names.events, None, b"garbage", &[]).await;
    dead_letters
        .read_until("two dead letters", Duration::from_secs(60), |records| {
            records.len() >= 2
        })
        .await;
    assert!(!directory.has_account("acme/u-outage"));

    let nothing = dead_letters::replay(&settings.kafka, &ReplaySelection::default(), false).await;
    assert!(nothing.is_err(), "an empty selection must be refused");
    let selection = ReplaySelection {
        reason: Some("connector_failed".into()),
        ..ReplaySelection::default()
    };
    let dry = dead_letters::replay(&settings.kafka, &selection, true).await.unwrap();
    assert_eq!((dry.scanned, dry.replayed), (2, 1));
    let report = dead_letters::replay(&settings.kafka, &selection, false).await.unwrap();
    assert_eq!(report.replayed, 1);
    crate::support::eventually("the replayed event to apply", Duration::from_secs(60), || async {
        directory.has_account("acme/u-outage").then_some(())
    })
    .await;
    app.stop().await;
}
