//! Checks that keep the deployment files honest without Docker or a cluster: the compose
//! file's references exist and its services are wired to each other, the alert rules and
//! the Prometheus configuration pass `promtool` (and the alerts their unit tests in
//! `alerts.test.yml`), the dashboard is well formed, every metric (and label) the
//! dashboard and the alerts use exists in the real `/metrics` output after a demo run,
//! and the Kubernetes manifests have what an SRE relies on and a configuration that
//! passes `check-config` with the Secret mounted where the Deployment mounts it.
//!
//! YAML is read with `scripts/yaml2json.py` and the PyYAML of the venv `scripts/test`
//! creates; `promtool` comes from Debian's `prometheus` package, which it also installs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use base64::Engine;
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn has_pyyaml(python: &Path) -> bool {
    Command::new(python)
        .args(["-c", "import yaml"])
        .output()
        .is_ok_and(|output| output.status.success())
}

/// A Python with PyYAML: `PROVISIONER_PYTHON` (scripts/test exports it), the Python next to
/// `SCIM2_SERVER_BIN`, or any venv scripts/test cached under `PROVISIONER_CACHE`.
fn python() -> PathBuf {
    if let Ok(path) = std::env::var("PROVISIONER_PYTHON") {
        return PathBuf::from(path);
    }
    let beside_scim2_server = std::env::var_os("SCIM2_SERVER_BIN")
        .map(PathBuf::from)
        .and_then(|binary| binary.parent().map(|bin| bin.join("python")));
    let cache = std::env::var_os("PROVISIONER_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/provisioner"));
    let cached = std::fs::read_dir(&cache)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok().map(|entry| entry.path().join("bin/python")));
    beside_scim2_server
        .into_iter()
        .chain(cached)
        .find(|candidate| has_pyyaml(candidate))
        .unwrap_or_else(|| {
            panic!(
                "no Python with PyYAML: run scripts/test (it creates a venv under {}) or set PROVISIONER_PYTHON",
                cache.display()
            )
        })
}

fn describe(output: &Output) -> String {
    format!(
        "exit {:?}\n{}{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Every YAML document in `path`, as JSON (empty documents left out).
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
        describe(&output)
    );
    let documents: Vec<Value> = serde_json::from_slice(&output.stdout).expect("JSON from yaml2json");
    documents.into_iter().filter(|document| !document.is_null()).collect()
}

/// The one YAML document in `path`.
fn yaml_document(path: &Path) -> Value {
    let mut documents = yaml_documents(path);
    assert_eq!(documents.len(), 1, "{}: one YAML document expected", path.display());
    documents.remove(0)
}

/// `PROMTOOL` (scripts/test exports it), else promtool where Debian's package puts it.
fn promtool() -> PathBuf {
    const MISSING: &str =
        "Debian's prometheus package provides it: run scripts/test, which installs it, or set PROMTOOL";
    if let Some(path) = std::env::var_os("PROMTOOL").filter(|path| !path.is_empty()) {
        let path = PathBuf::from(path);
        assert!(path.is_file(), "PROMTOOL={} does not exist; {MISSING}", path.display());
        return path;
    }
    ["/usr/bin/promtool", "/usr/local/bin/promtool"]
        .into_iter()
        .map(PathBuf::from)
        .find(|path| path.is_file())
        .unwrap_or_else(|| panic!("no promtool; {MISSING}"))
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

/// `provisioner check-config` on `config`: it must pass; returns the resolved configuration.
fn check_config(config: &Path) -> toml::Table {
    let output = Command::new(env!("CARGO_BIN_EXE_provisioner"))
        .args(["check-config", "--config"])
        .arg(config)
        .output()
        .expect("provisioner runs");
    assert!(
        output.status.success(),
        "check-config {}: {}",
        config.display(),
        describe(&output)
    );
    String::from_utf8_lossy(&output.stdout)
        .parse()
        .expect("check-config prints the resolved configuration as TOML")
}

/// The port of `admin.listen` and the drain (`pipeline.shutdown_grace`) of a resolved configuration.
fn admin_port_and_drain(resolved: &toml::Table) -> (u16, Duration) {
    let listen = resolved["admin"]["listen"].as_str().expect("admin.listen");
    let port = listen
        .rsplit(':')
        .next()
        .and_then(|port| port.parse().ok())
        .expect("a port");
    let drain = humantime::parse_duration(resolved["pipeline"]["shutdown_grace"].as_str().expect("shutdown_grace"))
        .expect("a duration");
    (port, drain)
}

// --- docker-compose.yml -------------------------------------------------------------

/// A compose service's bind mounts: (host path relative to the repository, container path).
fn compose_mounts(service: &Value) -> Vec<(String, String)> {
    service["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|volume| match volume {
            Value::String(short) => {
                let mut parts = short.split(':');
                Some((parts.next()?.to_string(), parts.next()?.to_string()))
            }
            long if long["type"] == "bind" => Some((
                long["source"].as_str()?.to_string(),
                long["target"].as_str()?.to_string(),
            )),
            _ => None,
        })
        .filter(|(host, _)| host.starts_with("./") || host.starts_with("../") || host.starts_with('/'))
        .collect()
}

/// The host file a container sees at `container_path`, through the service's bind mounts.
fn host_path(service: &Value, container_path: &str) -> Option<PathBuf> {
    compose_mounts(service).into_iter().find_map(|(host, target)| {
        let rest = Path::new(container_path).strip_prefix(&target).ok()?;
        let host = root().join(host.trim_start_matches("./"));
        Some(if rest.as_os_str().is_empty() {
            host
        } else {
            host.join(rest)
        })
    })
}

/// The container port a compose `ports` entry publishes.
fn published_container_port(port: &Value) -> Option<u16> {
    match port {
        Value::String(short) => short.rsplit(':').next()?.split('/').next()?.parse().ok(),
        long => long["target"].as_u64().and_then(|port| u16::try_from(port).ok()),
    }
}

#[test]
fn the_compose_file_parses_and_everything_it_references_exists() {
    let compose = yaml_document(&root().join("docker-compose.yml"));
    let services = compose["services"].as_object().expect("services");
    for expected in ["kafka", "provisioner", "scim", "prometheus", "grafana"] {
        assert!(services.contains_key(expected), "compose lacks the {expected} service");
    }
    for (name, service) in services {
        assert!(
            service.get("image").is_some() || service.get("build").is_some(),
            "{name}: neither image nor build"
        );
        if let Some(build) = service.get("build") {
            let (context, dockerfile) = match build {
                Value::String(context) => (context.as_str(), "Dockerfile"),
                build => (
                    build["context"].as_str().unwrap_or("."),
                    build["dockerfile"].as_str().unwrap_or("Dockerfile"),
                ),
            };
            let context = root().join(context);
            assert!(
                context.is_dir(),
                "{name}: build context {} is missing",
                context.display()
            );
            let dockerfile = context.join(dockerfile);
            assert!(dockerfile.is_file(), "{name}: {} is missing", dockerfile.display());
            // The default stage is the service alone; dev-tool commands need `devtools`.
            let stages: Vec<String> = std::fs::read_to_string(&dockerfile)
                .unwrap()
                .lines()
                .filter(|line| line.starts_with("FROM "))
                .filter_map(|line| line.split(" AS ").nth(1).map(|stage| stage.trim().to_string()))
                .collect();
            let target = build.get("target").and_then(Value::as_str);
            if let Some(target) = target {
                assert!(
                    stages.iter().any(|stage| stage == target),
                    "{name}: build target {target} is not a stage of {}",
                    dockerfile.display()
                );
            }
            let command = strings(&service["command"]).join(" ");
            if command.starts_with("emulate") {
                assert_eq!(
                    target,
                    Some("devtools"),
                    "{name}: `{command}` needs the image's devtools stage"
                );
            }
        }
        for (host, _) in compose_mounts(service) {
            assert!(root().join(&host).exists(), "{name}: volume source {host} is missing");
        }
        for port in service["ports"].as_array().into_iter().flatten() {
            let bound_to_loopback = match port {
                Value::String(short) => short.starts_with("127.0.0.1:"),
                long => long["host_ip"] == "127.0.0.1",
            };
            assert!(bound_to_loopback, "{name}: port {port} is not bound to 127.0.0.1");
        }
        let depends_on: Vec<&str> = match &service["depends_on"] {
            Value::Array(list) => list.iter().filter_map(Value::as_str).collect(),
            Value::Object(map) => map.keys().map(String::as_str).collect(),
            _ => Vec::new(),
        };
        for dependency in depends_on {
            assert!(
                services.contains_key(dependency),
                "{name}: depends on {dependency}, which is not a service"
            );
        }
    }
}

#[test]
fn the_compose_services_are_wired_to_each_other() {
    let compose = yaml_document(&root().join("docker-compose.yml"));
    let services = compose["services"].as_object().expect("services");

    // provisioner: the mounted configuration is valid, serves /metrics on the published
    // port, and drains within the stop grace period.
    let provisioner = &services["provisioner"];
    let config = host_path(provisioner, "/etc/provisioner/provisioner.toml")
        .expect("provisioner: a configuration mounted at /etc/provisioner/provisioner.toml (the image's CMD)");
    let resolved = check_config(&config);
    let (admin_port, drain) = admin_port_and_drain(&resolved);
    assert!(
        resolved["admin"]["listen"].as_str().unwrap().starts_with("0.0.0.0:"),
        "{}: admin.listen must be 0.0.0.0 in a container",
        config.display()
    );
    assert!(
        provisioner["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|port| published_container_port(port) == Some(admin_port)),
        "provisioner: the admin port {admin_port} is not published"
    );
    let stop_grace = humantime::parse_duration(provisioner["stop_grace_period"].as_str().unwrap_or("10s")).unwrap();
    assert!(
        drain < stop_grace,
        "provisioner: the {drain:?} drain does not fit the {stop_grace:?} stop_grace_period"
    );

    // prometheus: its configuration and every rule file are mounted, and it scrapes
    // provisioner on the admin port.
    let prometheus = &services["prometheus"];
    let config_path = strings(&prometheus["command"])
        .into_iter()
        .find_map(|argument| argument.strip_prefix("--config.file="))
        .unwrap_or("/etc/prometheus/prometheus.yml")
        .to_string();
    let config_file = host_path(prometheus, &config_path).expect("prometheus: its configuration is mounted");
    let prometheus_config = yaml_document(&config_file);
    let config_directory = Path::new(&config_path).parent().unwrap();
    let rule_files = strings(&prometheus_config["rule_files"]);
    assert!(!rule_files.is_empty(), "prometheus.yml loads no rule files");
    for rule_file in rule_files {
        let in_container = config_directory.join(rule_file);
        let on_host = host_path(prometheus, in_container.to_str().unwrap())
            .unwrap_or_else(|| panic!("prometheus: rule file {} is not mounted", in_container.display()));
        assert!(on_host.is_file(), "prometheus: {} is missing", on_host.display());
    }
    let job = prometheus_config["scrape_configs"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|job| job["job_name"] == "provisioner")
        .expect("prometheus.yml: a provisioner job");
    let targets: Vec<&str> = job["static_configs"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|config| strings(&config["targets"]))
        .collect();
    assert_eq!(
        targets,
        [format!("provisioner:{admin_port}")],
        "prometheus.yml: scrape the provisioner service on its admin port"
    );

    // grafana: the datasource points at the prometheus service, and the dashboard provider
    // reads a mounted directory holding the dashboard.
    let grafana = &services["grafana"];
    let provisioning =
        host_path(grafana, "/etc/grafana/provisioning").expect("grafana: /etc/grafana/provisioning is mounted");
    let datasources = yaml_document(&provisioning.join("datasources/prometheus.yml"));
    let prometheus_port = prometheus["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(published_container_port)
        .unwrap_or(9090);
    assert!(
        datasources["datasources"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|source| source["type"] == "prometheus"
                && source["url"] == format!("http://prometheus:{prometheus_port}")),
        "grafana: no datasource for http://prometheus:{prometheus_port}"
    );
    let providers = yaml_document(&provisioning.join("dashboards/provisioner.yml"));
    for provider in providers["providers"].as_array().expect("providers") {
        let path = provider["options"]["path"].as_str().expect("a file provider path");
        let on_host = host_path(grafana, path)
            .unwrap_or_else(|| panic!("grafana: the dashboard directory {path} is not mounted"));
        assert!(
            on_host.join("provisioner.json").is_file(),
            "grafana: {} lacks provisioner.json",
            on_host.display()
        );
    }
}

// --- Prometheus ---------------------------------------------------------------------

#[test]
fn the_alert_rules_and_prometheus_config_pass_promtool() {
    let rules = Command::new(promtool())
        .args(["check", "rules"])
        .arg(root().join("deploy/prometheus/alerts.yml"))
        .output()
        .expect("promtool runs");
    assert!(rules.status.success(), "promtool check rules: {}", describe(&rules));
    // rule_files are relative to the configuration file; checking it also checks them.
    let config = Command::new(promtool())
        .args(["check", "config", "prometheus.yml"])
        .current_dir(root().join("deploy/prometheus"))
        .output()
        .expect("promtool runs");
    assert!(config.status.success(), "promtool check config: {}", describe(&config));
}

/// The alerts' own unit tests (`deploy/prometheus/alerts.test.yml`): series in, alerts
/// out, at given times.
#[test]
fn the_alert_rules_pass_their_promtool_unit_tests() {
    let tests = Command::new(promtool())
        .args(["test", "rules", "alerts.test.yml"])
        .current_dir(root().join("deploy/prometheus"))
        .output()
        .expect("promtool runs");
    assert!(tests.status.success(), "promtool test rules: {}", describe(&tests));
}

// --- A small PromQL scanner ---------------------------------------------------------

/// What a PromQL expression refers to. Enough of PromQL for the expressions here: string
/// literals, range and subquery brackets, numbers and durations are skipped; functions and
/// aggregations are words followed by `(`; `by (...)` and friends list labels.
#[derive(Debug, Default)]
struct Expression {
    selectors: Vec<Selector>,
    grouping: BTreeSet<String>,
}

#[derive(Debug)]
struct Selector {
    metric: String,
    /// (label, operator, value)
    matchers: Vec<(String, String, String)>,
}

const AGGREGATIONS_AND_KEYWORDS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
];
const GROUPING: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];

fn is_word(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// The end of the string literal starting at `start`.
fn skip_string(chars: &[char], start: usize) -> (String, usize) {
    let quote = chars[start];
    let mut value = String::new();
    let mut i = start + 1;
    while i < chars.len() {
        match chars[i] {
            '\\' if quote != '`' => {
                if let Some(&escaped) = chars.get(i + 1) {
                    value.push(escaped);
                }
                i += 2;
            }
            c if c == quote => return (value, i + 1),
            c => {
                value.push(c);
                i += 1;
            }
        }
    }
    (value, chars.len())
}

/// The label matchers of the `{...}` starting at `open`, and the position after the `}`.
/// Also reads the labels of exposition-format sample lines.
fn label_matchers(chars: &[char], open: usize) -> (Vec<(String, String, String)>, usize) {
    let mut matchers = Vec::new();
    let mut i = open + 1;
    loop {
        while i < chars.len() && (chars[i].is_whitespace() || chars[i] == ',') {
            i += 1;
        }
        if i >= chars.len() {
            return (matchers, i);
        }
        if chars[i] == '}' {
            return (matchers, i + 1);
        }
        let start = i;
        while i < chars.len() && is_word(chars[i]) {
            i += 1;
        }
        let label: String = chars[start..i].iter().collect();
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        let operator: String = match (chars.get(i), chars.get(i + 1)) {
            (Some(&first), Some(&second)) if matches!((first, second), ('=' | '!', '~') | ('!', '=')) => {
                [first, second].iter().collect()
            }
            (Some('='), _) => "=".to_string(),
            _ => return (matchers, chars.len()), // not a matcher list after all
        };
        i += operator.len();
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        if i >= chars.len() || !matches!(chars[i], '"' | '\'' | '`') {
            return (matchers, chars.len());
        }
        let (value, after) = skip_string(chars, i);
        matchers.push((label, operator, value));
        i = after;
    }
}

fn scan(expression: &str) -> Expression {
    let chars: Vec<char> = expression.chars().collect();
    let mut scanned = Expression::default();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if matches!(c, '"' | '\'' | '`') {
            i = skip_string(&chars, i).1;
        } else if c == '[' {
            i = chars[i..]
                .iter()
                .position(|&c| c == ']')
                .map_or(chars.len(), |end| i + end + 1);
        } else if c == '{' {
            i = label_matchers(&chars, i).1; // a selector without a metric name
        } else if c.is_ascii_digit() || c == '.' {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1; // a number or a duration
            }
        } else if is_word(c) {
            let start = i;
            while i < chars.len() && is_word(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let opens = chars.get(next) == Some(&'(');
            if GROUPING.contains(&word.as_str()) {
                if opens {
                    let close = chars[next..]
                        .iter()
                        .position(|&c| c == ')')
                        .map_or(chars.len(), |end| next + end);
                    let labels: String = chars[next + 1..close].iter().collect();
                    scanned.grouping.extend(
                        labels
                            .split(',')
                            .map(str::trim)
                            .filter(|label| !label.is_empty())
                            .map(str::to_string),
                    );
                    i = close + 1;
                }
            } else if !opens && !AGGREGATIONS_AND_KEYWORDS.contains(&word.to_ascii_lowercase().as_str()) {
                let matchers = if chars.get(next) == Some(&'{') {
                    let (matchers, after) = label_matchers(&chars, next);
                    i = after;
                    matchers
                } else {
                    Vec::new()
                };
                scanned.selectors.push(Selector { metric: word, matchers });
            }
        } else {
            i += 1;
        }
    }
    scanned
}

/// Every `provisioner_*` token, as the names a `# TYPE` line would carry (histogram
/// `_bucket`, `_sum` and `_count` series stripped to their base name).
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

/// The service's `/metrics` text: metric families by type, and for every series name its
/// labels with the values seen.
#[derive(Debug, Default)]
struct Exposition {
    types: BTreeMap<String, String>,
    series: BTreeMap<String, BTreeMap<String, BTreeSet<String>>>,
}

impl Exposition {
    fn parse(text: &str) -> Exposition {
        let mut exposition = Exposition::default();
        for line in text.lines() {
            if let Some(declaration) = line.strip_prefix("# TYPE ") {
                let mut parts = declaration.split_whitespace();
                if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                    exposition.types.insert(name.to_string(), kind.to_string());
                }
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let chars: Vec<char> = line.chars().collect();
            let end = chars.iter().position(|&c| !is_word(c)).unwrap_or(chars.len());
            let name: String = chars[..end].iter().collect();
            let labels = exposition.series.entry(name).or_default();
            if chars.get(end) == Some(&'{') {
                for (label, _, value) in label_matchers(&chars, end).0 {
                    labels.entry(label).or_default().insert(value);
                }
            }
        }
        exposition
    }

    /// A `# TYPE` name, a sample's name, or a histogram's base name.
    fn exports(&self, name: &str) -> bool {
        self.types.contains_key(name)
            || self.series.contains_key(name)
            || ["_bucket", "_sum", "_count"].iter().any(|suffix| {
                name.strip_suffix(suffix)
                    .and_then(|base| self.types.get(base))
                    .is_some_and(|kind| kind == "histogram" || kind == "summary")
            })
    }
}

/// Problems with the labels and non-service metrics `expression` uses: labels the service
/// does not export, label values it never produces, and metrics other than Prometheus'
/// own `up{job="<job>"}`.
fn expression_problems(place: &str, expression: &str, exposition: &Exposition, job: &str) -> Vec<String> {
    let scanned = scan(expression);
    let mut problems = Vec::new();
    let mut labels_in_scope: BTreeSet<&str> = ["instance", "job"].into();
    for selector in &scanned.selectors {
        if selector.metric == "up" {
            if !selector
                .matchers
                .iter()
                .any(|(label, operator, value)| label == "job" && operator == "=" && value == job)
            {
                problems.push(format!("{place}: up without job=\"{job}\""));
            }
            continue;
        }
        if !selector.metric.starts_with("provisioner_") {
            problems.push(format!(
                "{place}: {} is neither the service's metric nor Prometheus' up",
                selector.metric
            ));
            continue;
        }
        let Some(labels) = exposition.series.get(&selector.metric) else {
            problems.push(format!("{place}: {} has no samples", selector.metric));
            continue;
        };
        labels_in_scope.extend(labels.keys().map(String::as_str));
        for (label, operator, value) in &selector.matchers {
            match labels.get(label) {
                None => problems.push(format!("{place}: {} has no label {label}", selector.metric)),
                Some(values) if (operator == "=" || operator == "!=") && !values.contains(value) => problems.push(
                    format!("{place}: {}{{{label}{operator}\"{value}\"}}: the service never sets {label}=\"{value}\" (it sets {values:?})", selector.metric),
                ),
                Some(_) => {}
            }
        }
    }
    for label in &scanned.grouping {
        if !labels_in_scope.contains(label.as_str()) {
            problems.push(format!("{place}: groups by {label}, which none of its metrics has"));
        }
    }
    problems
}

fn dashboard() -> Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("deploy/grafana/dashboards/provisioner.json")).unwrap())
        .expect("the dashboard is JSON")
}

/// (where, PromQL) for every query of the dashboard's panels.
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            queries.push((
                format!(
                    "panel {:?} target {}",
                    panel["title"].as_str().unwrap_or_default(),
                    target["refId"]
                ),
                target["expr"].as_str().unwrap_or_default().to_string(),
            ));
        }
    }
    queries
}

/// (alert name, rule) for every alerting rule.
fn alert_rules() -> Vec<(String, Value)> {
    let alerts = yaml_document(&root().join("deploy/prometheus/alerts.yml"));
    let mut rules = Vec::new();
    for group in alerts["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            rules.push((
                rule["alert"].as_str().expect("alerting rules only").to_string(),
                rule.clone(),
            ));
        }
    }
    rules
}

#[test]
fn every_alert_has_a_severity_a_summary_a_description_and_a_runbook_hint() {
    let rules = alert_rules();
    let mut names = BTreeSet::new();
    for (alert, rule) in &rules {
        assert!(names.insert(alert), "{alert}: defined twice");
        assert!(
            matches!(
                rule["labels"]["severity"].as_str(),
                Some("critical" | "warning" | "info")
            ),
            "{alert}: severity must be critical, warning or info"
        );
        for field in ["summary", "description", "runbook"] {
            assert!(
                rule["annotations"][field]
                    .as_str()
                    .is_some_and(|text| !text.trim().is_empty()),
                "{alert}: no {field} annotation"
            );
        }
    }
    // What the alerts must cover, by the metric each watches.
    let expressions: String = rules
        .iter()
        .map(|(_, rule)| format!("{}\n", rule["expr"].as_str().unwrap_or_default()))
        .collect();
    for watched in [
        r#"up{job="provisioner"}"#,
        "absent(up",
        "provisioner_consumer_lag",
        "deriv(provisioner_consumer_lag",
        "provisioner_dead_letters_total",
        r#"provisioner_connector_results_total{outcome="failed"}"#,
        "provisioner_connector_retries_total",
        "provisioner_connector_attempts_total",
        "provisioner_reply_duration_seconds_bucket",
        "provisioner_reply_publish_failures_total",
        "provisioner_produce_failures_total",
        "provisioner_consumer_paused",
        "provisioner_partition_wedged",
        "provisioner_salesforce_api_usage / provisioner_salesforce_api_limit",
    ] {
        assert!(expressions.contains(watched), "no alert uses {watched}");
    }
}

#[test]
fn the_dashboard_is_well_formed_and_covers_the_service() {
    let dashboard = dashboard();
    assert!(dashboard["uid"].as_str().is_some_and(|uid| !uid.is_empty()), "no uid");
    assert!(
        dashboard["title"].as_str().is_some_and(|title| !title.is_empty()),
        "no title"
    );
    assert!(
        dashboard["schemaVersion"].as_u64().is_some_and(|version| version >= 36),
        "schemaVersion"
    );

    // Panels query a templated Prometheus datasource (or the provisioned one, by uid).
    let variables: BTreeSet<String> = dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|variable| variable["type"] == "datasource" && variable["query"] == "prometheus")
        .filter_map(|variable| variable["name"].as_str().map(str::to_string))
        .collect();
    let provisioned = yaml_document(&root().join("deploy/grafana/provisioning/datasources/prometheus.yml"));
    let provisioned: BTreeSet<&str> = provisioned["datasources"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|source| source["uid"].as_str())
        .collect();
    let datasource_ok = |datasource: &Value| {
        let uid = datasource["uid"].as_str().unwrap_or_default();
        let variable = uid
            .strip_prefix("${")
            .and_then(|uid| uid.strip_suffix('}'))
            .or(uid.strip_prefix('$'));
        datasource["type"] == "prometheus"
            && (variable.is_some_and(|name| variables.contains(name)) || provisioned.contains(uid))
    };

    let mut ids = BTreeSet::new();
    let mut areas: Vec<(String, [u64; 4])> = Vec::new();
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(!panels.is_empty(), "no panels");
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or_default().to_string();
        assert!(!title.is_empty(), "a panel without a title: {panel}");
        assert!(
            panel["id"].as_u64().is_some_and(|id| ids.insert(id)),
            "{title}: no id, or a duplicate"
        );
        assert!(
            datasource_ok(&panel["datasource"]),
            "{title}: datasource {}",
            panel["datasource"]
        );
        let grid = &panel["gridPos"];
        let area =
            ["x", "y", "w", "h"].map(|key| grid[key].as_u64().unwrap_or_else(|| panic!("{title}: gridPos.{key}")));
        assert!(
            area[0] + area[2] <= 24 && area[2] > 0 && area[3] > 0,
            "{title}: gridPos {grid}"
        );
        for (other, other_area) in &areas {
            let overlap = area[0] < other_area[0] + other_area[2]
                && other_area[0] < area[0] + area[2]
                && area[1] < other_area[1] + other_area[3]
                && other_area[1] < area[1] + area[3];
            assert!(!overlap, "{title} overlaps {other}");
        }
        areas.push((title.clone(), area));
        let targets = panel["targets"].as_array().map(Vec::as_slice).unwrap_or_default();
        assert!(!targets.is_empty(), "{title}: no queries");
        let mut references = BTreeSet::new();
        for target in targets {
            assert!(
                target["refId"]
                    .as_str()
                    .is_some_and(|reference| references.insert(reference)),
                "{title}: refId missing or repeated"
            );
            assert!(
                target["expr"].as_str().is_some_and(|expr| !expr.trim().is_empty()),
                "{title}: an empty query"
            );
            assert!(
                target.get("datasource").is_none_or(datasource_ok),
                "{title}: target datasource {}",
                target["datasource"]
            );
        }
    }

    // What the dashboard must show, by the metric each panel queries.
    let used: BTreeSet<String> = dashboard_queries(&dashboard)
        .iter()
        .flat_map(|(_, expr)| scan(expr).selectors.into_iter().map(|selector| selector.metric))
        .collect();
    for shown in [
        "provisioner_events_consumed_total",
        "provisioner_events_completed_total",
        "provisioner_connector_results_total",
        "provisioner_connector_request_duration_seconds_bucket",
        "provisioner_event_duration_seconds_bucket",
        "provisioner_reply_duration_seconds_bucket",
        "provisioner_connector_retries_total",
        "provisioner_dead_letters_total",
        "provisioner_consumer_lag",
        "provisioner_events_in_flight",
        "provisioner_events_buffered",
        "provisioner_consumer_paused",
        "provisioner_assigned_partitions",
        "provisioner_offset_commits_total",
        "provisioner_salesforce_api_usage",
    ] {
        assert!(used.contains(shown), "no panel shows {shown}");
    }
}

/// `provisioner demo --users 8 --dump-metrics`, left running: the dumped `/metrics` text,
/// or, if it lacks something `complete` wants, the live `/metrics` once it has it (up to
/// 30 s). Consumer lag comes from librdkafka's statistics, once a second, which a short
/// demo on a busy machine can finish before. Needs the dev tools, like its one caller.
#[cfg(feature = "devtools")]
fn demo_metrics(complete: impl Fn(&Exposition) -> bool) -> Exposition {
    struct Running(std::process::Child);
    impl Drop for Running {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    let directory = tempfile::tempdir().unwrap();
    let dump = directory.path().join("metrics.txt");
    let mut child = Command::new(env!("CARGO_BIN_EXE_provisioner"))
        .args([
            "demo",
            "--users",
            "8",
            "--metrics-listen",
            "127.0.0.1:0",
            "--keep-running",
            "--dump-metrics",
        ])
        .arg(&dump)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the demo starts");
    let (stdout, stderr) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let mut demo = Running(child);
    let logs = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let (lines, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });

    // The summary names the metrics address; "Still running" follows the dump.
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    let mut address = None;
    let mut output = String::new();
    loop {
        let remaining = deadline.saturating_duration_since(std::time::Instant::now());
        match received.recv_timeout(remaining) {
            Ok(line) => {
                output.push_str(&line);
                output.push('\n');
                if let Some(url) = line.trim().strip_prefix("metrics: http://") {
                    address = url.strip_suffix("/metrics").map(str::to_string);
                }
                if line.starts_with("Still running") {
                    break;
                }
            }
            Err(_) => {
                let status = demo.0.try_wait().ok().flatten();
                if status.is_some() {
                    drop(demo);
                }
                panic!(
                    "the demo stopped or hung before its summary ({status:?}):\n{output}\n{}",
                    if status.is_some() {
                        logs.join().unwrap_or_default()
                    } else {
                        String::new()
                    }
                );
            }
        }
    }
    let address = address.unwrap_or_else(|| panic!("no metrics address in the demo's output:\n{output}"));
    let mut exposition = Exposition::parse(&std::fs::read_to_string(&dump).expect("the demo wrote its metrics"));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !complete(&exposition) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        if let Some(text) = scrape(&address) {
            exposition = Exposition::parse(&text);
        }
    }
    exposition
}

/// `GET /metrics` from `address` (host:port), the body.
#[cfg(feature = "devtools")]
fn scrape(address: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {address}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    (head.split_whitespace().nth(1) == Some("200")).then(|| body.to_string())
}

/// Runs `provisioner demo`, so it needs the dev tools.
#[cfg(feature = "devtools")]
#[test]
fn every_metric_and_label_in_the_dashboard_and_alerts_is_exported() {
    let mut queries = dashboard_queries(&dashboard());
    queries.extend(alert_rules().into_iter().map(|(alert, rule)| {
        (
            format!("alert {alert}"),
            rule["expr"].as_str().unwrap_or_default().to_string(),
        )
    }));
    let used: BTreeSet<String> = queries.iter().flat_map(|(_, expr)| metric_names(expr)).collect();
    assert!(used.len() >= 15, "only {} metrics used: {used:?}", used.len());

    let exposition = demo_metrics(|exposition| used.iter().all(|name| exposition.exports(name)));

    let missing: Vec<&String> = used.iter().filter(|name| !exposition.exports(name)).collect();
    assert!(
        missing.is_empty(),
        "used by the dashboard or the alerts but not in the service's /metrics: {missing:?}\n(exported: {:?})",
        exposition.types.keys().collect::<Vec<_>>()
    );

    // `up` comes from Prometheus, for the job prometheus.yml scrapes; the service must not
    // export a metric of that name.
    assert!(
        !exposition.exports("up"),
        "the service exports `up`, which Prometheus generates"
    );
    let prometheus = yaml_document(&root().join("deploy/prometheus/prometheus.yml"));
    let job = prometheus["scrape_configs"][0]["job_name"]
        .as_str()
        .expect("a scrape job");
    let problems: Vec<String> = queries
        .iter()
        .flat_map(|(place, expr)| expression_problems(place, expr, &exposition, job))
        .collect();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_promql_scanner_finds_selectors_matchers_and_grouping() {
    let scanned = scan(
        r#"sum by (connector) (rate(provisioner_connector_results_total{outcome="failed"}[10m])) / on(connector) group_left sum(rate(x_total{a!="b",c=~"d|e"}[5m] offset 1h)) > 0.05 and absent(up{job="provisioner"})"#,
    );
    let selectors: Vec<(&str, usize)> = scanned
        .selectors
        .iter()
        .map(|selector| (selector.metric.as_str(), selector.matchers.len()))
        .collect();
    assert_eq!(
        selectors,
        [("provisioner_connector_results_total", 1), ("x_total", 2), ("up", 1)]
    );
    assert_eq!(
        scanned.selectors[1].matchers[1],
        ("c".to_string(), "=~".to_string(), "d|e".to_string())
    );
    assert_eq!(scanned.grouping, BTreeSet::from(["connector".to_string()]));
    let exposition = Exposition::parse(
        "# TYPE provisioner_x_seconds histogram\nprovisioner_x_seconds_bucket{le=\"0.5\",connector=\"crm\"} 1\n",
    );
    assert!(exposition.exports("provisioner_x_seconds_count"));
    assert!(!exposition.exports("provisioner_y_total"));
    let problems = expression_problems(
        "test",
        "sum by (le, conector) (rate(provisioner_x_seconds_bucket{connector=\"crn\"}[5m])) + up",
        &exposition,
        "provisioner",
    );
    assert_eq!(problems.len(), 3, "{problems:#?}");
}

// --- Kubernetes -----------------------------------------------------------------------

/// Resolves a probe's or a Service's port (a number or a container port name) to a number.
fn container_port(container: &Value, port: &Value) -> Option<u64> {
    port.as_u64().or_else(|| {
        container["ports"]
            .as_array()?
            .iter()
            .find(|candidate| candidate["name"] == *port)?["containerPort"]
            .as_u64()
    })
}

fn selects(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|selector| !selector.is_empty() && selector.iter().all(|(key, value)| labels[key] == *value))
}

#[test]
fn the_kubernetes_manifests_carry_probes_limits_and_a_valid_config() {
    let documents = yaml_documents(&root().join("deploy/kubernetes/provisioner.yaml"));
    for document in &documents {
        assert!(
            document["apiVersion"].is_string() && document["metadata"]["name"].is_string(),
            "a manifest without apiVersion or name: {document}"
        );
        assert!(
            document["kind"] != "Namespace" && document["metadata"].get("namespace").is_none(),
            "{} {}: the manifests are namespace-less (kubectl apply -n ...)",
            document["kind"],
            document["metadata"]["name"]
        );
    }
    let find = |kind: &str| {
        documents
            .iter()
            .find(|document| document["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind}"))
    };
    let find_named = |kind: &str, name: &Value| {
        documents
            .iter()
            .find(|document| document["kind"] == kind && document["metadata"]["name"] == *name)
            .unwrap_or_else(|| panic!("no {kind} named {name}"))
    };

    let deployment = find("Deployment");
    let template = &deployment["spec"]["template"];
    let pod_labels = &template["metadata"]["labels"];
    let pod = &template["spec"];
    let containers = pod["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1, "one container");
    let container = &containers[0];
    assert!(
        deployment["spec"]["replicas"]
            .as_u64()
            .is_some_and(|replicas| replicas >= 2),
        "replicas"
    );
    assert!(
        selects(&deployment["spec"]["selector"]["matchLabels"], pod_labels),
        "the Deployment's selector does not match its pods"
    );
    assert!(
        container["image"].as_str().is_some_and(|image| !image.is_empty()),
        "no image"
    );

    // Probes on the admin port, which the configuration serves on all interfaces.
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    let liveness_port = container_port(container, &container["livenessProbe"]["httpGet"]["port"]);
    let readiness_port = container_port(container, &container["readinessProbe"]["httpGet"]["port"]);

    // Requests and limits.
    for section in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                container["resources"][section][resource].is_string(),
                "no {section}.{resource}"
            );
        }
    }

    // Non-root (the image's uid), no privileges, read-only root.
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let uid = pod["securityContext"]["runAsUser"]
        .as_u64()
        .or(container["securityContext"]["runAsUser"].as_u64())
        .expect("runAsUser");
    assert_ne!(uid, 0, "runAsUser 0");
    let dockerfile = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    let image_user = dockerfile
        .lines()
        .filter_map(|line| line.trim().strip_prefix("USER "))
        .next_back()
        .expect("the Dockerfile sets USER");
    assert_eq!(image_user.trim(), uid.to_string(), "runAsUser is not the image's user");
    let security = &container["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert!(
        strings(&security["capabilities"]["drop"]).contains(&"ALL"),
        "capabilities are not all dropped"
    );

    // The pod as the Deployment mounts it: the ConfigMap and the Secret, written to a
    // directory laid out like the container's filesystem.
    let filesystem = tempfile::tempdir().unwrap();
    let secret_names: Vec<&Value> = pod["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|volume| volume.get("secret").map(|secret| &secret["secretName"]))
        .collect();
    let mut writable_mounts = Vec::new();
    for mount in container["volumeMounts"].as_array().expect("volumeMounts") {
        let volume = pod["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|volume| volume["name"] == mount["name"])
            .unwrap_or_else(|| panic!("no volume {}", mount["name"]));
        let mut files = BTreeMap::new();
        if let Some(config_map) = volume.get("configMap") {
            for (key, value) in find_named("ConfigMap", &config_map["name"])["data"]
                .as_object()
                .expect("data")
            {
                files.insert(key.clone(), value.as_str().unwrap().to_string());
            }
        } else if let Some(secret) = volume.get("secret") {
            let secret = find_named("Secret", &secret["secretName"]);
            for (key, value) in secret["stringData"].as_object().into_iter().flatten() {
                files.insert(key.clone(), value.as_str().unwrap().to_string());
            }
            for (key, value) in secret["data"].as_object().into_iter().flatten() {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(value.as_str().unwrap())
                    .expect("Secret data is base64");
                files.insert(key.clone(), String::from_utf8(decoded).unwrap());
            }
        } else if volume.get("emptyDir").is_some() || volume.get("persistentVolumeClaim").is_some() {
            // A writable directory (the state's local store): laid out empty.
            writable_mounts.push(mount["mountPath"].as_str().unwrap().to_string());
            assert_ne!(mount["readOnly"], true, "volume {} must be writable", volume["name"]);
        } else {
            panic!(
                "volume {}: only configMap, secret, emptyDir and persistentVolumeClaim volumes are laid out",
                volume["name"]
            );
        }
        let target = filesystem
            .path()
            .join(mount["mountPath"].as_str().unwrap().trim_start_matches('/'));
        if let Some(key) = mount["subPath"].as_str() {
            std::fs::create_dir_all(target.parent().unwrap()).unwrap();
            std::fs::write(&target, &files[key]).unwrap();
        } else {
            std::fs::create_dir_all(&target).unwrap();
            for (key, value) in &files {
                std::fs::write(target.join(key), value).unwrap();
            }
        }
    }
    let arguments = strings(&container["args"]);
    let config = arguments
        .windows(2)
        .find(|pair| pair[0] == "--config")
        .map(|pair| pair[1])
        .expect("args: --config <path>");
    assert_eq!(arguments.first(), Some(&"run"), "args: run --config <path>");
    let config_on_disk = filesystem.path().join(config.trim_start_matches('/'));
    let text = std::fs::read_to_string(&config_on_disk)
        .unwrap_or_else(|_| panic!("{config} (from args) is not where the ConfigMap is mounted"));
    // Absolute *_file paths into the mounts point into the laid-out directory instead.
    let mut relocated = text.clone();
    for mount in container["volumeMounts"].as_array().unwrap() {
        let path = mount["mountPath"].as_str().unwrap();
        relocated = relocated.replace(
            &format!("\"{path}"),
            &format!("\"{}{path}", filesystem.path().display()),
        );
    }
    std::fs::write(&config_on_disk, relocated).unwrap();
    let resolved = check_config(&config_on_disk);
    let (admin_port, drain) = admin_port_and_drain(&resolved);
    assert!(
        resolved["admin"]["listen"].as_str().unwrap().starts_with("0.0.0.0:"),
        "admin.listen must be 0.0.0.0 for the probes and scraping to reach it"
    );
    assert_eq!(liveness_port, Some(u64::from(admin_port)), "the liveness probe's port");
    assert_eq!(
        readiness_port,
        Some(u64::from(admin_port)),
        "the readiness probe's port"
    );

    // The root filesystem is read-only: the state's local store must be on a writable
    // volume.
    if resolved["state"]["enabled"].as_bool() != Some(false) {
        let state_dir = resolved["state"]["dir"].as_str().expect("state.dir").to_string();
        let in_pod = state_dir.replace(&filesystem.path().display().to_string(), "");
        assert!(
            writable_mounts.iter().any(|mount| in_pod.starts_with(mount.as_str())),
            "state.dir {in_pod} is not on a writable volume (mounts: {writable_mounts:?})"
        );
    }

    // Every Secret key is a placeholder the configuration uses.
    for name in secret_names {
        let secret = find_named("Secret", name);
        for (key, value) in secret["stringData"].as_object().into_iter().flatten() {
            assert!(
                value.as_str().is_some_and(|value| value.contains("REPLACE")),
                "Secret {name} {key}: not a REPLACE placeholder"
            );
            assert!(
                text.contains(key.as_str()),
                "Secret {name} {key}: the configuration does not use it"
            );
        }
    }

    // The drain fits in the termination grace period, with room for the exit.
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        grace > 20,
        "terminationGracePeriodSeconds {grace} is not above the default 20 s drain"
    );
    assert!(
        drain.as_secs() + 10 <= grace,
        "the {drain:?} drain does not fit the {grace} s grace period"
    );

    // Scraping: pod annotations and a Service for the metrics port.
    let annotations = &template["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], admin_port.to_string());
    let service = find("Service");
    assert!(
        selects(&service["spec"]["selector"], pod_labels),
        "the Service does not select the pods"
    );
    assert!(
        service["spec"]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|port| container_port(container, &port["targetPort"]) == Some(u64::from(admin_port))),
        "the Service does not expose the metrics port"
    );

    // Voluntary disruptions keep one pod.
    let budget = find("PodDisruptionBudget");
    assert!(
        selects(&budget["spec"]["selector"]["matchLabels"], pod_labels),
        "the PodDisruptionBudget does not select the pods"
    );
    assert!(
        budget["spec"]["minAvailable"]
            .as_u64()
            .is_some_and(|minimum| minimum >= 1 && minimum < deployment["spec"]["replicas"].as_u64().unwrap()),
        "PodDisruptionBudget minAvailable must be at least 1 and below replicas"
    );
}
