//! The `provisioner run` binary as an operator meets it: probes, metrics, SIGTERM.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::support::app::{producer, publish, Names, TopicReader};
use crate::support::doubles::event_json;
use crate::support::eventually;

struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn get(url: String) -> Option<(u16, String)> {
    let response = reqwest::get(&url).await.ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.ok()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_probes_processes_events_and_stops_cleanly_on_sigterm() {
    let names = Names::new("binary");
    names.create(1).await;
    let admin_port = free_port();
    let directory = tempfile::tempdir().unwrap();
    let config = directory.path().join("provisioner.toml");
    let kafka = names
        .kafka_toml()
        .replace("127.0.0.1:0", &format!("127.0.0.1:{admin_port}"));
    std::fs::write(
        &config,
        format!("{kafka}\n[telemetry]\nformat = \"json\"\n[tenants.acme.resident]\n"),
    )
    .unwrap();

    let child = Command::new(env!("CARGO_BIN_EXE_provisioner"))
        .args(["run", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let mut service = Service(child);
    let base = format!("http://127.0.0.1:{admin_port}");

    let (status, _) = eventually("/healthz", Duration::from_secs(30), || get(format!("{base}/healthz"))).await;
    assert_eq!(status, 200);
    eventually("/readyz to turn ready", Duration::from_secs(60), || async {
        get(format!("{base}/readyz")).await.filter(|(status, _)| *status == 200)
    })
    .await;

    let payload = event_json("binary-1", "user.created", "acme", "u1", serde_json::json!({}));
    publish(&producer(), &names.events, None, &payload, &[]).await;
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

    let pid = service.0.id().to_string();
    let signalled = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(signalled.success());
    let status = eventually("the process to exit after SIGTERM", Duration::from_secs(60), || {
        let exited = service.0.try_wait().unwrap();
        async move { exited }
    })
    .await;
    assert!(status.success(), "exit status after SIGTERM: {status:?}");
    let mut stderr = String::new();
    std::io::Read::read_to_string(service.0.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("Shutdown signal received"), "{stderr}");
    assert!(
        stderr
            .lines()
            .all(|line| line.trim().is_empty() || line.starts_with('{')),
        "JSON logs only: {stderr}"
    );
}
