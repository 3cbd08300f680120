//! The `provisioner run` binary as an operator meets it: probes, metrics, SIGTERM.

use std::time::Duration;

use crate::support::app::{producer, publish, Names, TopicReader};
use crate::support::doubles::{event_json, user_key};
use crate::support::eventually;
use crate::support::service::ServiceProcess;

async fn get(url: String) -> Option<(u16, String)> {
    let response = reqwest::get(&url).await.ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.ok()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_probes_processes_events_and_stops_cleanly_on_sigterm() {
    let names = Names::new("binary");
    names.create(1).await;
    let directory = tempfile::tempdir().unwrap();
    let config = directory.path().join("provisioner.toml");
    // Admin on port 0: the OS picks it, the service logs it, the test reads it back.
    let kafka = names.kafka_toml();
    std::fs::write(
        &config,
        // 1 MiB events: more than the default, so that the start-up size check speaks.
        format!(
            "{kafka}\n[pipeline]\nmax_event_bytes = 1048576\n[telemetry]\nformat = \"json\"\n[tenants.acme.resident]\n"
        ),
    )
    .unwrap();

    let mut service = ServiceProcess::start(&config, directory.path().join("service.log"));
    let base = format!("http://{}", service.admin_address().await);

    let (status, _) = eventually("/healthz", Duration::from_secs(30), || get(format!("{base}/healthz"))).await;
    assert_eq!(status, 200);
    eventually("/readyz to turn ready", Duration::from_secs(60), || async {
        get(format!("{base}/readyz")).await.filter(|(status, _)| *status == 200)
    })
    .await;

    let payload = event_json("binary-1", "user.created", "acme", "u1", serde_json::json!({}));
    publish(&producer(), &names.events, Some(&user_key(&payload)), &payload, &[]).await;
    let mut results = TopicReader::new(&names.results, 1);
    results
        .read_until("a result", Duration::from_secs(60), |records| !records.is_empty())
        .await;
    assert_eq!(results.records[0].result().event_id, "binary-1");

    let (_, metrics) = get(format!("{base}/metrics")).await.expect("metrics answer");
    assert!(
        metrics.contains("provisioner_events_consumed_total{type=\"user.created\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("provisioner_events_completed_total{status=\"skipped\"} 1"),
        "{metrics}"
    );

    // The start-up size check: 1 MiB events with librdkafka's 1,000,000-byte producer
    // limit and Kafka's 1,048,588-byte topic limit leave no room for a dead letter of
    // the largest event, and the log says so, naming both sides.
    let size_warning = eventually("the dead-letter size warnings", Duration::from_secs(30), || async {
        let log = service.log_text();
        let warnings: Vec<String> = log
            .lines()
            .filter(|line| line.contains("pipeline.max_event_bytes = 1048576"))
            .map(str::to_string)
            .collect();
        (warnings.len() == 2).then_some(warnings.join("\n"))
    })
    .await;
    assert!(
        size_warning.contains("message.max.bytes = 1000000 of the producer")
            && size_warning.contains(&format!(
                "max.message.bytes = 1048588 of the dead-letter topic `{}`",
                names.dead_letters
            ))
            && size_warning.contains("\"level\":\"WARN\""),
        "{size_warning}"
    );

    service.signal("TERM");
    let status = service.wait(Duration::from_secs(60)).await;
    assert!(status.success(), "exit status after SIGTERM: {status:?}");
    let stderr = service.log_text();
    assert!(stderr.contains("Shutdown signal received"), "{stderr}");
    assert!(
        stderr
            .lines()
            .all(|line| line.trim().is_empty() || line.starts_with('{')),
        "JSON logs only: {stderr}"
    );
}
