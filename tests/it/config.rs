//! `check-config` and configuration loading, as a user meets them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use provisioner::connectors::scim::settings::ScimAuth;
use provisioner::connectors::settings::ConnectorSettings;
use provisioner::settings::{Settings, SettingsError};

const MINIMAL: &str = r#"
[kafka]
bootstrap_servers = "127.0.0.1:9092"

[connectors.directory]
type = "scim2"
base_url = "http://127.0.0.1:8080/scim/v2"

[[tenants.acme.resident.bindings]]
connector = "directory"
blocking = true
"#;

fn example_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/config/provisioner.toml")
}

fn write_config(directory: &Path, contents: &str) -> PathBuf {
    let path = directory.join("provisioner.toml");
    std::fs::write(&path, contents).unwrap();
    path
}

/// Runs `provisioner check-config` and returns (exit code, stdout, stderr).
fn check_config(path: &Path, environment: &[(&str, &str)]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_provisioner"))
        .args(["check-config", "--config"])
        .arg(path)
        .env_remove("PROVISIONER_CONFIG")
        .envs(environment.iter().copied())
        .output()
        .expect("the binary runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn the_shipped_example_is_valid_and_printed_redacted() {
    let (code, stdout, stderr) = check_config(&example_path(), &[]);
    assert_eq!(code, 0, "stderr: {stderr}");
    assert!(stdout.contains("client_secret = \"[redacted]\""), "{stdout}");
    assert!(stdout.contains("service_account_key = \"[redacted]\""), "{stdout}");
    for secret_file in ["corp-directory-client-secret", "salesforce-client-secret"] {
        let secret =
            std::fs::read_to_string(example_path().parent().unwrap().join("secrets").join(secret_file)).unwrap();
        assert!(
            !stdout.contains(secret.trim()) && !stderr.contains(secret.trim()),
            "{secret_file} leaked"
        );
    }
    assert!(!stdout.contains("PRIVATE KEY"), "the Google key leaked");
}

#[test]
fn an_unknown_key_is_rejected_by_name() {
    let directory = tempfile::tempdir().unwrap();
    let config = MINIMAL.replace("base_url =", "bas_url = \"x\"\nbase_url =");
    let (code, _, stderr) = check_config(&write_config(directory.path(), &config), &[]);
    assert_eq!(code, 2);
    assert!(stderr.contains("bas_url"), "{stderr}");
    assert!(stderr.contains("connectors.directory"), "{stderr}");
}

#[test]
fn an_unknown_section_is_rejected_by_name() {
    let directory = tempfile::tempdir().unwrap();
    let config = format!("{MINIMAL}\n[pipelin]\nmax_in_flight = 3\n");
    let (code, _, stderr) = check_config(&write_config(directory.path(), &config), &[]);
    assert_eq!(code, 2);
    assert!(stderr.contains("pipelin"), "{stderr}");
}

#[test]
fn a_binding_to_a_missing_connector_names_both() {
    let directory = tempfile::tempdir().unwrap();
    let config = MINIMAL.replace("connector = \"directory\"", "connector = \"payroll\"");
    let (code, _, stderr) = check_config(&write_config(directory.path(), &config), &[]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("tenants.acme.resident.bindings[0].connector"),
        "{stderr}"
    );
    assert!(stderr.contains("`payroll`"), "{stderr}");
    assert!(
        stderr.contains("`directory`"),
        "should list the defined connectors: {stderr}"
    );
}

#[test]
fn an_unparseable_duration_names_the_key() {
    let directory = tempfile::tempdir().unwrap();
    let config = MINIMAL.replace(
        "bootstrap_servers = \"127.0.0.1:9092\"",
        "bootstrap_servers = \"127.0.0.1:9092\"\ncommit_interval = \"5 parsecs\"",
    );
    let (code, _, stderr) = check_config(&write_config(directory.path(), &config), &[]);
    assert_eq!(code, 2);
    assert!(stderr.contains("kafka.commit_interval"), "{stderr}");
}

#[test]
fn an_invalid_rule_names_the_binding() {
    let directory = tempfile::tempdir().unwrap();
    let config = MINIMAL.replace("blocking = true", "blocking = true\nrule = \"roles.exists(r,\"");
    let (code, _, stderr) = check_config(&write_config(directory.path(), &config), &[]);
    assert_eq!(code, 2);
    assert!(stderr.contains("tenants.acme.resident.bindings[0].rule"), "{stderr}");
}

#[test]
fn a_missing_file_is_a_clear_error() {
    let (code, _, stderr) = check_config(Path::new("/nonexistent/provisioner.toml"), &[]);
    assert_eq!(code, 2);
    assert!(stderr.contains("/nonexistent/provisioner.toml"), "{stderr}");
}

#[test]
fn environment_overrides_win_over_the_file() {
    let directory = tempfile::tempdir().unwrap();
    let path = write_config(directory.path(), MINIMAL);
    let environment = BTreeMap::from([
        (
            "PROVISIONER__KAFKA__BOOTSTRAP_SERVERS".to_string(),
            "127.0.0.1:19092".to_string(),
        ),
        ("PROVISIONER__PIPELINE__MAX_IN_FLIGHT".to_string(), "7".to_string()),
        // Two input topics need the provisioning state off (it follows one topic).
        ("PROVISIONER__STATE__ENABLED".to_string(), "false".to_string()),
        (
            "PROVISIONER__KAFKA__EVENT_TOPICS".to_string(),
            "a.events,b.events".to_string(),
        ),
        ("UNRELATED".to_string(), "ignored".to_string()),
    ]);
    let settings = Settings::load_with_environment(&path, &environment).unwrap();
    assert_eq!(settings.kafka.bootstrap_servers, "127.0.0.1:19092");
    assert_eq!(settings.pipeline.max_in_flight, 7);
    assert_eq!(settings.kafka.event_topics, vec!["a.events", "b.events"]);
    assert!(!settings.state.enabled);
}

#[test]
fn an_environment_override_with_a_bad_value_names_the_key() {
    let directory = tempfile::tempdir().unwrap();
    let path = write_config(directory.path(), MINIMAL);
    let (code, _, stderr) = check_config(&path, &[("PROVISIONER__PIPELINE__MAX_IN_FLIGHT", "lots")]);
    assert_eq!(code, 2);
    assert!(stderr.contains("pipeline.max_in_flight"), "{stderr}");
}

#[test]
fn secrets_resolve_from_environment_and_files_and_never_print() {
    let directory = tempfile::tempdir().unwrap();
    std::fs::write(directory.path().join("token.txt"), "file-token-4f9a\n").unwrap();
    let config = format!(
        "{MINIMAL}\n[connectors.directory.auth]\nmode = \"bearer\"\ntoken_file = \"token.txt\"\n\n\
         [connectors.hr]\ntype = \"scim2\"\nbase_url = \"http://127.0.0.1:9/scim\"\n\
         [connectors.hr.auth]\nmode = \"basic\"\nusername = \"svc\"\npassword_env = \"HR_PASSWORD\"\n"
    );
    let path = write_config(directory.path(), &config);
    let environment = BTreeMap::from([("HR_PASSWORD".to_string(), "env-password-77c1".to_string())]);
    let settings = Settings::load_with_environment(&path, &environment).unwrap();
    let ConnectorSettings::Scim2(directory_settings) = &settings.connectors["directory"] else {
        panic!("scim2 expected")
    };
    assert!(matches!(&directory_settings.auth, ScimAuth::Bearer { token } if token.expose() == "file-token-4f9a"));
    let ConnectorSettings::Scim2(hr) = &settings.connectors["hr"] else {
        panic!("scim2 expected")
    };
    assert!(matches!(&hr.auth, ScimAuth::Basic { password, .. } if password.expose() == "env-password-77c1"));
    let printed = format!("{}{settings:?}", settings.to_redacted_toml());
    assert!(!printed.contains("file-token-4f9a") && !printed.contains("env-password-77c1"));

    let (code, stdout, stderr) = check_config(&path, &[("HR_PASSWORD", "env-password-77c1")]);
    assert_eq!(code, 0, "{stderr}");
    assert!(!stdout.contains("env-password-77c1") && !stdout.contains("file-token-4f9a"));
}

#[test]
fn a_missing_secret_reference_names_key_and_variable() {
    let directory = tempfile::tempdir().unwrap();
    let config =
        format!("{MINIMAL}\n[connectors.directory.auth]\nmode = \"bearer\"\ntoken_env = \"NOT_SET_ANYWHERE\"\n");
    let error = Settings::load_with_environment(&write_config(directory.path(), &config), &BTreeMap::new())
        .unwrap_err()
        .to_string();
    assert!(error.contains("connectors.directory.auth.token_env"), "{error}");
    assert!(error.contains("NOT_SET_ANYWHERE"), "{error}");
}

#[test]
fn a_secret_given_twice_is_refused() {
    let directory = tempfile::tempdir().unwrap();
    let config =
        format!("{MINIMAL}\n[connectors.directory.auth]\nmode = \"bearer\"\ntoken = \"a\"\ntoken_env = \"B\"\n");
    let error = Settings::load_with_environment(
        &write_config(directory.path(), &config),
        &BTreeMap::from([("B".into(), "b".into())]),
    )
    .unwrap_err();
    assert!(matches!(error, SettingsError::Secret { .. }), "{error}");
}

#[test]
fn several_problems_are_reported_together() {
    let directory = tempfile::tempdir().unwrap();
    let config = MINIMAL
        .replace("connector = \"directory\"", "connector = \"payroll\"")
        .replace(
            "bootstrap_servers = \"127.0.0.1:9092\"",
            "bootstrap_servers = \"127.0.0.1:9092\"\nresults_topic = \"bad topic!\"",
        );
    let (code, _, stderr) = check_config(&write_config(directory.path(), &config), &[]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("kafka.results_topic") && stderr.contains("payroll"),
        "{stderr}"
    );
}

#[test]
fn tls_verification_is_on_unless_switched_off() {
    let settings = Settings::from_toml_str(MINIMAL).unwrap();
    assert!(
        settings.kafka.security.ssl_verify_hostname,
        "Kafka host-name verification off by default"
    );
    let ConnectorSettings::Scim2(scim) = &settings.connectors["directory"] else {
        panic!("scim2 expected")
    };
    assert!(
        !scim.http.insecure_skip_verify,
        "connector TLS verification off by default"
    );
    let with_section = MINIMAL.replace(
        "bootstrap_servers = \"127.0.0.1:9092\"",
        "bootstrap_servers = \"127.0.0.1:9092\"\n[kafka.security]\nprotocol = \"ssl\"",
    );
    let settings = Settings::from_toml_str(&with_section).unwrap();
    assert!(settings.kafka.security.ssl_verify_hostname);
}

#[test]
fn wedge_after_defaults_to_five_minutes_and_must_be_greater_than_zero() {
    let settings = Settings::from_toml_str(MINIMAL).unwrap();
    assert_eq!(settings.pipeline.wedge_after, std::time::Duration::from_secs(300));
    let short = Settings::from_toml_str(&format!("{MINIMAL}\n[pipeline]\nwedge_after = \"2s\"\n")).unwrap();
    assert_eq!(short.pipeline.wedge_after, std::time::Duration::from_secs(2));
    let Err(SettingsError::Invalid(problems)) =
        Settings::from_toml_str(&format!("{MINIMAL}\n[pipeline]\nwedge_after = \"0s\"\n"))
    else {
        panic!("a zero wedge_after must be refused")
    };
    assert!(
        problems.iter().any(|problem| problem.key == "pipeline.wedge_after"),
        "{problems:?}"
    );
}
