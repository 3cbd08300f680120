//! Secrets never leak, and hostile values are escaped or refused.
//!
//! Known secrets are planted in the configuration (inline, `*_env` and `*_file`), every
//! connector is made to fail authentication so errors are produced, and every output is
//! searched: the service's logs at debug level, `/metrics`, the results and
//! dead-letter topics (values and headers), and `check-config`.

use std::time::Duration;

use provisioner::connectors::jwt::RsaSigner;
use provisioner::devtools::emulators::google::{self as google_emulator, GoogleEmulatorSettings};
use provisioner::devtools::emulators::salesforce::{self as salesforce_emulator, SalesforceEmulatorSettings};
use provisioner::devtools::emulators::scim::{self as scim_emulator, ScimEmulatorSettings};
use provisioner::devtools::emulators::Faults;
use tokio_util::sync::CancellationToken;

use crate::support::app::{producer, publish, Names, TopicReader};
use crate::support::doubles::{event_json, user_key};
use crate::support::service::ServiceProcess;

const OAUTH_SECRET: &str = "PLANTED-oauth-secret-7f3a21";
const BASIC_PASSWORD: &str = "PLANTED-basic-password-19d2c8";
const API_KEY: &str = "PLANTED-api-key-55ab09";
const BEARER_TOKEN: &str = "PLANTED-bearer-token-e1e1e1";
const SALESFORCE_SECRET: &str = "PLANTED-sf-secret-0e77aa";
const SALESFORCE_PASSWORD: &str = "PLANTED-sf-password-6c6c";
const SASL_PASSWORD: &str = "PLANTED-sasl-password-a1b2";
const KEY_PASSWORD: &str = "PLANTED-ssl-key-password-3d3d";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_secrets_appear_in_no_output() {
    let shutdown = CancellationToken::new();
    let loopback = "127.0.0.1:0".parse().unwrap();
    let scim = scim_emulator::start(
        loopback,
        ScimEmulatorSettings {
            oauth_client: Some((
                "provisioner".into(),
                "the-real-secret".into(),
                Duration::from_secs(3600),
            )),
            ..ScimEmulatorSettings::default()
        },
        shutdown.clone(),
    )
    .await
    .unwrap();
    let google_key = RsaSigner::generate();
    let google = google_emulator::start(
        loopback,
        GoogleEmulatorSettings {
            domain: "example.com".into(),
            client_email: "sa@example.iam.gserviceaccount.com".into(),
            // Google knows another key: our assertion is refused.
            public_key: RsaSigner::generate().public_key(),
            admin_email: "admin@example.com".into(),
            token_lifetime: Duration::from_secs(3600),
            faults: Faults::default(),
        },
        shutdown.clone(),
    )
    .await
    .unwrap();
    let salesforce = salesforce_emulator::start(
        loopback,
        SalesforceEmulatorSettings {
            client_id: "app".into(),
            client_secret: "the-real-sf-secret".into(),
            username: "api@crm.example.com".into(),
            password_with_token: "x".into(),
            public_key: None,
            session_lifetime: Duration::from_secs(3600),
            foreign_usernames: Vec::new(),
            faults: Faults::default(),
        },
        shutdown.clone(),
    )
    .await
    .unwrap();

    let names = Names::new("secrets");
    names.create(1).await;
    let directory = tempfile::tempdir().unwrap();
    let key_json = serde_json::json!({
        "type": "service_account",
        "client_email": "sa@example.iam.gserviceaccount.com",
        "private_key": google_key.private_key_pem(),
        "token_uri": google.token_url(),
    })
    .to_string();
    std::fs::write(directory.path().join("google.json"), &key_json).unwrap();
    std::fs::write(directory.path().join("basic-password"), format!("{BASIC_PASSWORD}\n")).unwrap();
    // A distinctive slice of the private key's base64 body.
    let key_fragment: String = google_key
        .private_key_pem()
        .lines()
        .nth(5)
        .expect("a PEM body line")
        .to_string();

    let kafka = names.kafka_toml();
    let connectors = format!(
        r#"
        [telemetry]
        format = "json"
        level = "debug"

        [connectors.oauth_scim]
        type = "scim2"
        base_url = "{scim_url}"
        [connectors.oauth_scim.auth]
        mode = "oauth2"
        token_url = "{token_url}"
        client_id = "provisioner"
        client_secret = "{OAUTH_SECRET}"
        [connectors.oauth_scim.delivery]
        max_attempts = 2
        initial_backoff = "10ms"

        [connectors.basic_scim]
        type = "scim2"
        base_url = "{scim_url}"
        password = "default"
        default_password = "{BASIC_PASSWORD}-default"
        [connectors.basic_scim.auth]
        mode = "basic"
        username = "svc"
        password_file = "basic-password"
        [connectors.basic_scim.delivery]
        max_attempts = 2
        initial_backoff = "10ms"

        [connectors.key_scim]
        type = "scim2"
        base_url = "{scim_url}"
        [connectors.key_scim.auth]
        mode = "api_key"
        header = "X-API-Key"
        api_key_env = "PLANTED_API_KEY"
        [connectors.key_scim.delivery]
        max_attempts = 2
        initial_backoff = "10ms"

        [connectors.bearer_scim]
        type = "scim2"
        base_url = "{scim_url}"
        [connectors.bearer_scim.auth]
        mode = "bearer"
        token = "{BEARER_TOKEN}"
        [connectors.bearer_scim.delivery]
        max_attempts = 2
        initial_backoff = "10ms"

        [connectors.workspace]
        type = "google"
        domain = "example.com"
        admin_email = "admin@example.com"
        service_account_key_file = "google.json"
        api_base_url = "{google_url}"
        [connectors.workspace.delivery]
        max_attempts = 2
        initial_backoff = "10ms"

        [connectors.crm]
        type = "salesforce"
        login_url = "{salesforce_url}"
        provisioning_domain = "crm.example.com"
        profile_id = "00e"
        [connectors.crm.auth]
        grant = "password"
        client_id = "app"
        client_secret = "{SALESFORCE_SECRET}"
        username = "api@crm.example.com"
        password = "{SALESFORCE_PASSWORD}"
        [connectors.crm.delivery]
        max_attempts = 2
        initial_backoff = "10ms"

        [tenants.acme.resident]
        bindings = [
            {{ connector = "oauth_scim", blocking = true }},
            {{ connector = "basic_scim" }},
            {{ connector = "key_scim" }},
            {{ connector = "bearer_scim" }},
            {{ connector = "workspace" }},
            {{ connector = "crm" }},
        ]
        "#,
        scim_url = scim.base_url(),
        token_url = scim.token_url(),
        google_url = google.api_base_url(),
        salesforce_url = salesforce.login_url(),
    );
    let config = directory.path().join("provisioner.toml");
    std::fs::write(&config, format!("{kafka}\n{connectors}")).unwrap();
    let mut service = ServiceProcess::start_with_environment(
        &config,
        directory.path().join("service.log"),
        &[("PLANTED_API_KEY", API_KEY)],
    );
    let producer = producer();
    for user in ["u1", "u2"] {
        let event = event_json(user, "user.created", "acme", user, serde_json::json!({}));
        publish(
            &producer,
            &names.events,
            Some(&user_key(&event)),
            &event,
            &[("correlation_id", user), ("reply_to", &names.replies)],
        )
        .await;
    }
    let mut results = TopicReader::new(&names.results, 1);
    results
        .read_until("both results", Duration::from_secs(60), |records| records.len() >= 2)
        .await;
    let mut dead_letters = TopicReader::new(&names.dead_letters, 1);
    dead_letters
        .read_until("both dead letters", Duration::from_secs(60), |records| {
            records.len() >= 2
        })
        .await;
    let mut replies = TopicReader::new(&names.replies, 1);
    replies
        .read_until("both replies", Duration::from_secs(60), |records| records.len() >= 2)
        .await;
    let admin = service.admin_address().await;
    let metrics = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    service.signal("TERM");
    assert!(service.wait(Duration::from_secs(60)).await.success());

    // check-config, with SASL and TLS key secrets on top.
    let sasl_config = directory.path().join("sasl.toml");
    std::fs::write(
        &sasl_config,
        format!(
            "{}\n{connectors}",
            kafka.replace(
                "[admin]",
                &format!(
                    "[kafka.security]\nprotocol = \"sasl_ssl\"\nsasl_mechanism = \"SCRAM-SHA-512\"\nsasl_username = \"svc\"\nsasl_password = \"{SASL_PASSWORD}\"\nssl_key_password = \"{KEY_PASSWORD}\"\n\n[admin]"
                )
            )
        ),
    )
    .unwrap();
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_provisioner"))
        .args(["check-config", "--config"])
        .arg(&sasl_config)
        .env("PLANTED_API_KEY", API_KEY)
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));

    let mut outputs: Vec<(String, String)> = vec![
        ("service log".into(), service.log_text()),
        ("metrics".into(), metrics),
        (
            "check-config stdout".into(),
            String::from_utf8_lossy(&check.stdout).into_owned(),
        ),
        (
            "check-config stderr".into(),
            String::from_utf8_lossy(&check.stderr).into_owned(),
        ),
    ];
    for (topic, reader) in [
        ("results", &results),
        ("dead letters", &dead_letters),
        ("replies", &replies),
    ] {
        for record in &reader.records {
            outputs.push((
                format!("{topic} value"),
                String::from_utf8_lossy(&record.value).into_owned(),
            ));
            outputs.push((format!("{topic} headers"), format!("{:?}", record.headers)));
        }
    }
    // The outputs are real: errors were produced and logged.
    let log = &outputs[0].1;
    assert!(log.contains("Connector failed"), "no connector errors were logged");
    assert!(
        outputs.iter().any(|(_, text)| text.contains("invalid_client")),
        "the OAuth failure is reported"
    );
    let failed = results.records[0].result();
    assert!(failed.results.iter().all(|result| result.error.is_some()), "{failed:?}");

    let secrets = [
        OAUTH_SECRET,
        BASIC_PASSWORD,
        API_KEY,
        BEARER_TOKEN,
        SALESFORCE_SECRET,
        SALESFORCE_PASSWORD,
        SASL_PASSWORD,
        KEY_PASSWORD,
        key_fragment.as_str(),
    ];
    let mut leaks = Vec::new();
    for (place, text) in &outputs {
        for secret in secrets {
            if text.contains(secret) {
                leaks.push(format!("{secret} in {place}"));
            }
        }
    }
    assert!(leaks.is_empty(), "secrets leaked: {leaks:?}");
    let scanned: usize = outputs.iter().map(|(_, text)| text.len()).sum();
    eprintln!(
        "FAULT-REPORT secrets: {} planted secrets (inline, _env, _file; OAuth, basic, API key, bearer, Google key, Salesforce, SASL, TLS key) searched in {scanned} bytes of logs (debug level), metrics, results, replies, dead letters and check-config: 0 found",
        secrets.len()
    );
    shutdown.cancel();
}
