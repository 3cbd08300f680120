//! Checks that keep the deployment files honest without Docker or a cluster: the compose
//! file's references exist, the alert rules pass `promtool`, the dashboard parses, every
//! metric the dashboard and the alerts use exists in the real `/metrics` output after a
//! demo run, and the Kubernetes manifests have what an SRE relies on.

#[cfg(feature = "devtools")]
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The venv's Python (PyYAML), as scripts/test exports it; else the cached venv.
fn python() -> PathBuf {
    if let Ok(path) = std::env::var("PROVISIONER_PYTHON") {
        return PathBuf::from(path);
    }
    let cache = std::env::var_os("PROVISIONER_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/provisioner"));
    std::fs::read_dir(&cache)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok().map(|entry| entry.path().join("bin/python")))
        .find(|candidate| {
            Command::new(candidate)
                .args(["-c", "import yaml"])
                .status()
                .is_ok_and(|status| status.success())
        })
        .expect("a Python with PyYAML: run scripts/test, which creates it")
}

/// Every YAML document in `path`, as JSON.
fn yaml_documents(path: &Path) -> Vec<Value> {
    let output = Command::new(python())
        .arg(root().join("scripts/yaml2json.py"))
        .arg(path)
        .output()
        .expect("python runs");
    assert!(
        output.status.success(),
        "{} is not valid YAML: {}",
        path.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("JSON from yaml2json")
}

fn promtool() -> PathBuf {
    std::env::var("PROMTOOL")
        .ok()
        .filter(|path| !path.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            ["/usr/bin/promtool", "/usr/local/bin/promtool"]
                .into_iter()
                .map(PathBuf::from)
                .find(|path| path.exists())
        })
        .expect("promtool (Debian's prometheus package): run scripts/test, which installs it")
}

#[test]
fn the_compose_file_parses_and_everything_it_references_exists() {
    let documents = yaml_documents(&root().join("docker-compose.yml"));
    let services = documents[0]["services"].as_object().expect("services");
    for expected in ["kafka", "provisioner", "scim", "prometheus", "grafana"] {
        assert!(services.contains_key(expected), "compose lacks the {expected} service");
    }
    for (name, service) in services {
        assert!(
            service.get("image").is_some() || service.get("build").is_some(),
            "{name}: neither image nor build"
        );
        if let Some(build) = service.get("build") {
            let context = root().join(build["context"].as_str().unwrap_or("."));
            assert!(
                context.is_dir(),
                "{name}: build context {} is missing",
                context.display()
            );
            let dockerfile = context.join(build["dockerfile"].as_str().unwrap_or("Dockerfile"));
            assert!(dockerfile.is_file(), "{name}: {} is missing", dockerfile.display());
        }
        for volume in service["volumes"].as_array().into_iter().flatten() {
            let host = volume
                .as_str()
                .unwrap_or_default()
                .split(':')
                .next()
                .unwrap_or_default();
            if host.starts_with("./") || host.starts_with('/') {
                assert!(root().join(host).exists(), "{name}: volume source {host} is missing");
            }
        }
        for port in service["ports"].as_array().into_iter().flatten() {
            let port = port.as_str().unwrap_or_default();
            assert!(
                port.starts_with("127.0.0.1:"),
                "{name}: port {port} is not bound to 127.0.0.1"
            );
        }
    }
}

#[test]
fn the_alert_rules_and_prometheus_config_pass_promtool() {
    let rules = Command::new(promtool())
        .args(["check", "rules"])
        .arg(root().join("deploy/prometheus/alerts.yml"))
        .output()
        .unwrap();
    assert!(
        rules.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&rules.stdout),
        String::from_utf8_lossy(&rules.stderr)
    );
    let config = Command::new(promtool())
        .args(["check", "config", "prometheus.yml"])
        .current_dir(root().join("deploy/prometheus"))
        .output()
        .unwrap();
    assert!(
        config.status.success(),
        "promtool check config: {}{}",
        String::from_utf8_lossy(&config.stdout),
        String::from_utf8_lossy(&config.stderr)
    );
}

#[cfg(feature = "devtools")]
fn metric_names(expression: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expression;
    while let Some(start) = rest.find("provisioner_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name);
        names.insert(base.to_string());
        rest = &tail[end..];
    }
    names
}

/// Runs `provisioner demo` for a real `/metrics` output, so it needs the dev tools.
#[cfg(feature = "devtools")]
#[test]
fn every_metric_in_the_dashboard_and_alerts_is_exported() {
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("deploy/grafana/dashboards/provisioner.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let mut used = BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            used.extend(metric_names(target["expr"].as_str().unwrap_or_default()));
        }
    }
    let alerts = yaml_documents(&root().join("deploy/prometheus/alerts.yml"));
    let mut alert_count = 0;
    for group in alerts[0]["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            alert_count += 1;
            used.extend(metric_names(rule["expr"].as_str().unwrap_or_default()));
            assert!(
                rule["labels"]["severity"].is_string(),
                "{}: no severity label",
                rule["alert"]
            );
            for field in ["summary", "description", "runbook"] {
                assert!(rule["annotations"][field].is_string(), "{}: no {field}", rule["alert"]);
            }
        }
    }
    assert!(
        alert_count >= 10 && used.len() >= 15,
        "{alert_count} alerts, {} metrics",
        used.len()
    );

    let directory = tempfile::tempdir().unwrap();
    let dump = directory.path().join("metrics.txt");
    let output = Command::new(env!("CARGO_BIN_EXE_provisioner"))
        .args([
            "demo",
            "--users",
            "8",
            "--metrics-listen",
            "127.0.0.1:0",
            "--dump-metrics",
        ])
        .arg(&dump)
        .output()
        .expect("the demo runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let exported: BTreeSet<String> = std::fs::read_to_string(&dump)
        .unwrap()
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_string)
        .collect();
    let missing: Vec<&String> = used.iter().filter(|name| !exported.contains(*name)).collect();
    assert!(
        missing.is_empty(),
        "used by the dashboard or alerts but not exported: {missing:?}"
    );
}

#[test]
fn the_kubernetes_manifests_carry_probes_limits_and_a_valid_config() {
    let documents = yaml_documents(&root().join("deploy/kubernetes/provisioner.yaml"));
    let find = |kind: &str| {
        documents
            .iter()
            .find(|document| document["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind}"))
    };
    let deployment = find("Deployment");
    find("PodDisruptionBudget");
    find("Service");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert!(container["resources"]["limits"]["memory"].is_string());
    assert!(container["resources"]["requests"]["cpu"].is_string());
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();

    // The ConfigMap's configuration is valid with the Secret mounted beside it, and its
    // drain fits in the termination grace period.
    let directory = tempfile::tempdir().unwrap();
    let toml = find("ConfigMap")["data"]["provisioner.toml"].as_str().unwrap();
    std::fs::write(directory.path().join("provisioner.toml"), toml).unwrap();
    std::fs::create_dir(directory.path().join("secrets")).unwrap();
    for (name, value) in find("Secret")["stringData"].as_object().unwrap() {
        std::fs::write(directory.path().join("secrets").join(name), value.as_str().unwrap()).unwrap();
    }
    let output = Command::new(env!("CARGO_BIN_EXE_provisioner"))
        .args(["check-config", "--config"])
        .arg(directory.path().join("provisioner.toml"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let resolved = String::from_utf8_lossy(&output.stdout);
    let drain_seconds: u64 = resolved
        .lines()
        .find_map(|line| line.strip_prefix("shutdown_grace = \""))
        .and_then(|value| value.trim_end_matches('"').trim_end_matches('s').parse().ok())
        .expect("shutdown_grace in seconds");
    assert!(
        drain_seconds + 10 <= grace,
        "drain {drain_seconds}s does not fit the {grace}s grace period"
    );
}
