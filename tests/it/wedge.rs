//! A wedged partition, as an operator meets it: an event that does not finish holds its
//! partition's offset; after `pipeline.wedge_after` the partition shows as wedged on
//! `/metrics` and `/readyz` fails (`/healthz` does not), and both recover once the event
//! finishes. Against Apache Kafka and the SCIM emulator, which fails every call until it
//! is told to recover. Prints a `WEDGE-REPORT` line with its timings.

use std::time::{Duration, Instant};

use provisioner::devtools::emulators::scim::{self as scim_emulator, ScimEmulatorSettings};
use provisioner::devtools::emulators::Faults;
use provisioner::result::Status;
use provisioner::settings::Settings;
use tokio_util::sync::CancellationToken;

use crate::support::app::{producer, publish, Names, TestApp, TopicReader};
use crate::support::doubles::{event_json, user_key};
use crate::support::eventually;

async fn get(url: &str) -> Option<(u16, String)> {
    let response = reqwest::get(url).await.ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.ok()?))
}

/// The value of `metric{partition, topic}` in a `/metrics` text (the labels in any order).
fn partition_gauge(text: &str, metric: &str, topic: &str, partition: i32) -> Option<f64> {
    let topic_label = format!("topic=\"{topic}\"");
    let partition_label = format!("partition=\"{partition}\"");
    text.lines()
        .filter(|line| line.starts_with(&format!("{metric}{{")))
        .find(|line| line.contains(&topic_label) && line.contains(&partition_label))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_stuck_on_a_failing_target_is_wedged_until_the_event_finishes() {
    let names = Names::new("wedge");
    names.create(1).await;
    let emulator_shutdown = CancellationToken::new();
    let emulator = scim_emulator::start(
        "127.0.0.1:0".parse().unwrap(),
        ScimEmulatorSettings {
            faults: Faults {
                rate_500: 1.0,
                ..Faults::default()
            },
            ..ScimEmulatorSettings::default()
        },
        emulator_shutdown.clone(),
    )
    .await
    .unwrap();
    // The event retries for up to ten minutes, so only the target's recovery ends its
    // wait; no circuit breaker, so it retries at once when the target is back.
    let toml = format!(
        r#"{kafka}
        [pipeline]
        wedge_after = "2s"

        [connectors.directory]
        type = "scim2"
        base_url = "{scim_url}"
        [connectors.directory.delivery]
        initial_backoff = "20ms"
        max_backoff = "200ms"
        max_elapsed = "10m"
        max_attempts = 100000
        circuit_breaker_failures = 0

        [[tenants.acme.resident.bindings]]
        connector = "directory"
        "#,
        kafka = names.kafka_toml(),
        scim_url = emulator.base_url(),
    );
    let app = TestApp::spawn_configured(Settings::from_toml_str(&toml).unwrap()).await;
    let base = format!("http://{}", app.admin_address);
    let readyz = format!("{base}/readyz");
    let metrics = format!("{base}/metrics");
    let wedged = |text: &str| partition_gauge(text, "provisioner_partition_wedged", &names.events, 0);

    // Ready, and not wedged, before there is any work: an idle partition never wedges.
    eventually("/readyz to turn ready", Duration::from_secs(60), || async {
        get(&readyz).await.filter(|(status, _)| *status == 200)
    })
    .await;
    let text = eventually("the idle partition's gauge", Duration::from_secs(30), || async {
        get(&metrics)
            .await
            .map(|(_, text)| text)
            .filter(|text| wedged(text).is_some())
    })
    .await;
    assert_eq!(wedged(&text), Some(0.0), "{text}");

    let event = event_json("wedge-1", "user.created", "acme", "u1", serde_json::json!({}));
    // Taken before the publish, so the service cannot have read the event before it.
    let published = Instant::now();
    publish(&producer(), &names.events, Some(&user_key(&event)), &event, &[]).await;

    let text = eventually("the partition to show as wedged", Duration::from_secs(30), || async {
        get(&metrics)
            .await
            .map(|(_, text)| text)
            .filter(|text| wedged(text) == Some(1.0))
    })
    .await;
    let wedged_after = published.elapsed();
    assert!(
        wedged_after >= Duration::from_secs(2),
        "wedged after {wedged_after:?}, before wedge_after"
    );
    assert!(text.contains("provisioner_partitions_wedged 1"), "{text}");
    let age = partition_gauge(
        &text,
        "provisioner_partition_oldest_unfinished_age_seconds",
        &names.events,
        0,
    )
    .expect("the age gauge");
    assert!(age >= 2.0, "age {age}");
    let (status, body) = eventually("/readyz to fail", Duration::from_secs(10), || async {
        get(&readyz).await.filter(|(status, _)| *status == 503)
    })
    .await;
    assert!(body.contains("1 wedged partition"), "{status}: {body}");
    let (status, _) = get(&format!("{base}/healthz")).await.expect("/healthz answers");
    assert_eq!(status, 200, "a wedge must not fail liveness");
    assert!(
        emulator.control.stats.report().requests > 1,
        "the event was retried meanwhile"
    );

    emulator.set_faults(Faults::default());
    let recovering = Instant::now();
    eventually("/readyz to recover", Duration::from_secs(30), || async {
        get(&readyz).await.filter(|(status, _)| *status == 200)
    })
    .await;
    let ready_again_after = recovering.elapsed();
    let text = eventually("the wedged gauge to return to 0", Duration::from_secs(10), || async {
        get(&metrics)
            .await
            .map(|(_, text)| text)
            .filter(|text| wedged(text) == Some(0.0))
    })
    .await;
    assert!(text.contains("provisioner_partitions_wedged 0"), "{text}");
    let mut results = TopicReader::new(&names.results, 1);
    let result = results.result_of("wedge-1", Duration::from_secs(30)).await;
    assert_eq!(result.status, Status::Succeeded, "{result:?}");
    app.stop().await;
    emulator_shutdown.cancel();
    eprintln!(
        "WEDGE-REPORT wedge_after 2 s: wedged {:.1} s after the event was published; ready again {:.1} s after the target recovered",
        wedged_after.as_secs_f64(),
        ready_again_after.as_secs_f64()
    );
}
