//! `provisioner demo`: the whole service on one machine with nothing installed.
//!
//! An in-process Kafka broker (librdkafka's mock cluster), the target emulators, the
//! real service with an example configuration, and a realistic mix of lifecycle
//! events, some sent by a blocking caller. It ends with a summary and exits 0 only when
//! every event got its result.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::app::Application;
use crate::client::Client;
use crate::connectors::jwt::RsaSigner;
use crate::devtools::emulators::google::{self as google_emulator, GoogleEmulatorSettings};
use crate::devtools::emulators::salesforce::{self as salesforce_emulator, SalesforceEmulatorSettings};
use crate::devtools::emulators::scim::{self as scim_emulator, ScimEmulatorSettings};
use crate::devtools::emulators::Faults;
use crate::result::{Outcome, ProvisioningResult};
use crate::settings::Settings;

const EVENT_TOPIC: &str = "identity.user-events";
const STATE_TOPIC: &str = "provisioner.state";
const RESULTS_TOPIC: &str = "provisioner.results";
const REPLY_TOPIC: &str = "provisioner.replies";
const DEAD_LETTER_TOPIC: &str = "provisioner.dead-letters";
const TENANT: &str = "carbon.super";
const GOOGLE_SERVICE_ACCOUNT: &str = "provisioner@demo-project.iam.gserviceaccount.com";

#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Users in the generated workload (each gets several events).
    pub users: usize,
    /// Leave everything running after the summary, until Ctrl-C.
    pub keep_running: bool,
    /// Where to serve `/metrics`; port 0 picks a free one.
    pub admin_listen: SocketAddr,
    /// Write the final `/metrics` text here (the deployment checks read it).
    pub dump_metrics: Option<std::path::PathBuf>,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            users: 40,
            keep_running: false,
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            dump_metrics: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("embedded Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("cannot start an emulator: {0}")]
    Emulator(#[from] std::io::Error),
    #[error(transparent)]
    Startup(#[from] crate::app::StartupError),
    #[error("blocking caller: {0}")]
    Client(#[from] crate::client::ClientError),
    #[error("the service did not become ready within 60 s")]
    NotReady,
    #[error("only {received} of {expected} results arrived within {waited:?}")]
    Incomplete {
        received: usize,
        expected: usize,
        waited: Duration,
    },
}

/// Where the demo's targets listen.
struct DemoTargets {
    directory_url: String,
    google_api_url: String,
    google_key_json: String,
    salesforce_login_url: String,
}

/// The demo configuration, pointed at the embedded broker and emulators: the resident
/// provider and two applications; a blocking SCIM binding, a non-blocking Google
/// binding with `jit_outbound`, and a Salesforce binding with a rule.
fn demo_settings(bootstrap: &str, targets: &DemoTargets, admin: SocketAddr, state_dir: &Path) -> Settings {
    let state_dir = state_dir.display();
    let DemoTargets {
        directory_url,
        google_api_url,
        google_key_json,
        salesforce_login_url,
    } = targets;
    Settings::from_toml_str(&format!(
        r#"
        [kafka]
        bootstrap_servers = "{bootstrap}"
        group_id = "provisioner-demo"
        event_topics = ["{EVENT_TOPIC}"]
        results_topic = "{RESULTS_TOPIC}"
        reply_topic = "{REPLY_TOPIC}"
        dead_letter_topic = "{DEAD_LETTER_TOPIC}"
        commit_interval = "200ms"
        [kafka.properties]
        "statistics.interval.ms" = "1000"

        [state]
        topic = "{STATE_TOPIC}"
        dir = "{state_dir}"

        [admin]
        listen = "{admin}"

        [pipeline]
        max_in_flight = 64

        # The corporate directory every user goes to; sign-up flows wait for it.
        [connectors.corp_directory]
        type = "scim2"
        base_url = "{directory_url}"
        [connectors.corp_directory.delivery]
        max_in_flight = 16
        initial_backoff = "50ms"
        max_backoff = "2s"

        # Google Workspace accounts for the portals' users, off the critical path.
        [connectors.workspace]
        type = "google"
        domain = "example.com"
        admin_email = "admin@example.com"
        service_account_key = '''{google_key_json}'''
        api_base_url = "{google_api_url}"
        deprovision = "suspend"
        [connectors.workspace.delivery]
        max_in_flight = 8
        initial_backoff = "50ms"
        max_backoff = "2s"

        # Salesforce, for sales people only (a rule).
        [connectors.crm]
        type = "salesforce"
        login_url = "{salesforce_login_url}"
        provisioning_domain = "crm.example.com"
        profile_id = "00e000000000001AAA"
        # Group "Sales" grants the Sales_Access permission set.
        permission_sets = {{ "Sales" = "{SALES_PERMISSION_SET}" }}
        [connectors.crm.auth]
        grant = "client_credentials"
        client_id = "demo-app"
        client_secret = "demo-secret"
        [connectors.crm.delivery]
        max_in_flight = 25
        initial_backoff = "50ms"
        max_backoff = "2s"

        [[tenants."{TENANT}".resident.bindings]]
        connector = "corp_directory"
        blocking = true
        jit_outbound = true

        [tenants."{TENANT}".service_providers.sales_portal]
        inherit_resident = true
        [[tenants."{TENANT}".service_providers.sales_portal.bindings]]
        connector = "workspace"
        blocking = false
        jit_outbound = true
        [[tenants."{TENANT}".service_providers.sales_portal.bindings]]
        connector = "crm"
        blocking = false
        rule = "'sales' in groups || group.displayName == 'Sales'"

        [tenants."{TENANT}".service_providers.partner_portal]
        [[tenants."{TENANT}".service_providers.partner_portal.bindings]]
        connector = "corp_directory"
        blocking = true
        jit_outbound = true
        [[tenants."{TENANT}".service_providers.partner_portal.bindings]]
        connector = "workspace"
        blocking = false
        jit_outbound = true
        "#
    ))
    .expect("the demo configuration is valid")
}

/// The Salesforce permission set the "Sales" group maps to.
const SALES_PERMISSION_SET: &str = "Sales_Access";
/// The demo's group: its id, and its members' indexes (users on all three targets).
const SALES_GROUP_ID: &str = "5a1e5000-demo";

/// Users in the sales group who are provisioned to every target: created through the
/// sales portal (`user % 4` is 0 or 1), in `sales` (`user % 3 == 0`, the CRM rule), and
/// not deleted by the workload (`user % 5 != 0`).
fn sales_group_members(users: usize) -> Vec<usize> {
    (0..users)
        .filter(|user| user % 4 <= 1 && user.is_multiple_of(3) && !user.is_multiple_of(5))
        .collect()
}

fn demo_user_id(user: usize) -> String {
    format!("7d0c{user:04}-demo")
}

/// One generated event: its id, whether a blocking caller sends it, and its JSON.
struct DemoEvent {
    key: String,
    blocking: bool,
    json: Vec<u8>,
}

fn workload(users: usize) -> Vec<DemoEvent> {
    let mut events = Vec::new();
    let mut push = |event_type: &str, user: usize, blocking: bool, extra: serde_json::Value| {
        let user_id = demo_user_id(user);
        let id = format!("{}-{user}-{}", event_type.trim_start_matches("user."), events.len());
        let mut data = json!({
            "tenant": TENANT,
            "user": {
                "id": user_id,
                "userName": format!("user{user:03}"),
                "userStoreDomain": "PRIMARY",
                "name": {"givenName": format!("Given{user}"), "familyName": format!("Family{user}")},
                "emails": [{"value": format!("user{user:03}@example.com"), "primary": true}],
                "groups": if user.is_multiple_of(3) { json!(["sales"]) } else { json!(["engineering"]) },
            }
        });
        if let serde_json::Value::Object(extra) = extra {
            for (key, value) in extra {
                data[key] = value;
            }
        }
        let event = json!({
            "specversion": "1.0", "id": id, "source": "/wso2is/carbon.super", "type": event_type,
            "time": chrono::Utc::now().to_rfc3339(), "data": data,
        });
        events.push(DemoEvent {
            key: format!("{TENANT}/{user_id}"),
            blocking,
            json: serde_json::to_vec(&event).expect("JSON"),
        });
    };
    for user in 0..users {
        match user % 4 {
            // Created by an admin or over the API, through one of the apps.
            0 | 1 => push("user.created", user, false, json!({"service_provider": "sales_portal"})),
            // Self sign-up: the sign-up flow waits for the reply.
            2 => push("user.self_signed_up", user, true, json!({})),
            // Federated login with just-in-time provisioning.
            _ => push(
                "user.jit_provisioned",
                user,
                false,
                json!({"service_provider": "partner_portal", "identity_provider": "PartnerAzureAD"}),
            ),
        }
    }
    for user in (0..users).step_by(2) {
        push("user.updated", user, false, json!({"service_provider": "sales_portal"}));
    }
    for user in (0..users).step_by(5) {
        push("user.deleted", user, false, json!({"service_provider": "sales_portal"}));
    }
    // The sales team as a group, provisioned to all three targets with its members.
    let members: Vec<String> = sales_group_members(users).into_iter().map(demo_user_id).collect();
    let event = json!({
        "specversion": "1.0", "id": "group-sales-created", "source": "/wso2is/carbon.super",
        "type": "group.created", "time": chrono::Utc::now().to_rfc3339(),
        "data": {
            "tenant": TENANT,
            "service_provider": "sales_portal",
            "group": {"id": SALES_GROUP_ID, "displayName": "Sales", "members": members},
        }
    });
    events.push(DemoEvent {
        key: format!("{TENANT}/group:{SALES_GROUP_ID}"),
        blocking: false,
        json: serde_json::to_vec(&event).expect("JSON"),
    });
    events
}

/// Runs the demo and prints its summary.
pub async fn run(options: DemoOptions) -> Result<(), DemoError> {
    let started = Instant::now();
    println!(
        "provisioner demo: an embedded Kafka broker, SCIM, Google Workspace and Salesforce emulators, the service, and {} users.\n",
        options.users
    );

    let cluster = MockCluster::new(1)?;
    let bootstrap = cluster.bootstrap_servers();
    cluster.create_topic(EVENT_TOPIC, 4, 1)?;
    // The provisioning state's topic, partitioned like the input. (The mock cluster
    // cannot make it compacted; a real one must be.)
    cluster.create_topic(STATE_TOPIC, 4, 1)?;
    // Each connector's retry topic (parking), partitioned like the input too.
    for connector in ["corp_directory", "workspace", "crm"] {
        cluster.create_topic(&format!("provisioner.retry.{connector}"), 4, 1)?;
    }
    // The membership topic (groups), partitioned like the input.
    cluster.create_topic("provisioner.memberships", 4, 1)?;
    for topic in [RESULTS_TOPIC, REPLY_TOPIC, DEAD_LETTER_TOPIC] {
        cluster.create_topic(topic, 1, 1)?;
    }
    let shutdown = CancellationToken::new();
    let loopback: SocketAddr = "127.0.0.1:0".parse().expect("address");
    // Realistic targets: some latency, an occasional 429 or 500, so retries show.
    let directory = scim_emulator::start(
        loopback,
        ScimEmulatorSettings {
            faults: Faults {
                latency: Duration::from_millis(15),
                jitter: Duration::from_millis(20),
                rate_429: 0.03,
                retry_after_seconds: 1,
                rate_500: 0.03,
                ..Faults::default()
            },
            ..ScimEmulatorSettings::default()
        },
        shutdown.clone(),
    )
    .await?;
    let google_key = RsaSigner::generate();
    let google = google_emulator::start(
        loopback,
        GoogleEmulatorSettings {
            domain: "example.com".into(),
            client_email: GOOGLE_SERVICE_ACCOUNT.into(),
            public_key: google_key.public_key(),
            admin_email: "admin@example.com".into(),
            token_lifetime: Duration::from_secs(3600),
            faults: Faults {
                latency: Duration::from_millis(40),
                jitter: Duration::from_millis(40),
                rate_429: 0.03,
                ..Faults::default()
            },
        },
        shutdown.clone(),
    )
    .await?;
    let salesforce = salesforce_emulator::start(
        loopback,
        SalesforceEmulatorSettings {
            client_id: "demo-app".into(),
            client_secret: "demo-secret".into(),
            username: "integration@crm.example.com".into(),
            password_with_token: String::new(),
            public_key: None,
            session_lifetime: Duration::from_secs(7200),
            foreign_usernames: Vec::new(),
            faults: Faults {
                latency: Duration::from_millis(60),
                jitter: Duration::from_millis(60),
                ..Faults::default()
            },
        },
        shutdown.clone(),
    )
    .await?;
    salesforce.add_permission_set(SALES_PERMISSION_SET, "Sales access");
    let targets = DemoTargets {
        directory_url: directory.base_url(),
        google_api_url: google.api_base_url(),
        google_key_json: json!({
            "type": "service_account",
            "client_email": GOOGLE_SERVICE_ACCOUNT,
            "private_key": google_key.private_key_pem(),
            "token_uri": google.token_url(),
        })
        .to_string(),
        salesforce_login_url: salesforce.login_url(),
    };

    let admin = match std::net::TcpListener::bind(options.admin_listen) {
        Ok(listener) => listener.local_addr()?,
        Err(_) => loopback,
    };
    // The local state store lives only as long as the demo: its topic is in memory too.
    let state_dir = std::env::temp_dir().join(format!("provisioner-demo-state-{}", std::process::id()));
    let settings = demo_settings(&bootstrap, &targets, admin, &state_dir);
    let application = Application::build(settings.clone()).await?;
    let metrics = application.metrics();
    let readiness = application.readiness();
    let admin_address = application.admin_address();
    let service_shutdown = CancellationToken::new();
    let service = tokio::spawn(application.run_until_stopped(service_shutdown.clone()));
    // Joining the consumer group takes a few seconds; publish once the service is ready,
    // so the round trip below measures provisioning, not start-up.
    let ready_deadline = Instant::now() + Duration::from_secs(60);
    while !readiness.is_ready() {
        if Instant::now() > ready_deadline {
            return Err(DemoError::NotReady);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "  service ready after {:.1} s (consumer group joined, producer connected)",
        started.elapsed().as_secs_f64()
    );

    // Watch the results topic from the start.
    let results_reader: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", "provisioner-demo-reader")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(RESULTS_TOPIC, 0, Offset::Beginning)?;
    results_reader.assign(&assignment)?;

    let events = workload(options.users);
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("linger.ms", "5")
        // As a JVM identity platform partitions (`groups.user_partitioner` = murmur2).
        .set("partitioner", "murmur2_random")
        .create()?;
    let client = Client::connect(&settings.kafka).await?;
    let mut blocking_round_trip = None;
    let mut blocking_waits = Vec::new();
    for event in &events {
        if event.blocking {
            if blocking_round_trip.is_none() {
                let sent_at = Instant::now();
                let reply = client.send_and_wait(&event.json, Duration::from_secs(30)).await?;
                blocking_round_trip = Some((event.json.clone(), reply, sent_at.elapsed()));
            } else {
                // Published now, in order; the reply is awaited at the end.
                blocking_waits.push(
                    client
                        .publish_for_reply(&event.json)
                        .await?
                        .wait(Duration::from_secs(60)),
                );
            }
        } else {
            producer
                .send(
                    FutureRecord::to(EVENT_TOPIC)
                        .key(&event.key)
                        .payload(&event.json)
                        .headers(rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
                            key: "content-type",
                            value: Some("application/cloudevents+json"),
                        })),
                    Timeout::After(Duration::from_secs(10)),
                )
                .await
                .map_err(|(error, _)| error)?;
        }
    }
    // One malformed event, to show the dead-letter path.
    producer
        .send(
            FutureRecord::to(EVENT_TOPIC)
                .key("garbage")
                .payload("{\"specversion\": \"1.0\", oops"),
            Timeout::After(Duration::from_secs(10)),
        )
        .await
        .map_err(|(error, _)| error)?;
    let blocking_replies = futures::future::join_all(blocking_waits).await;
    let blocking_failures = blocking_replies.iter().filter(|reply| reply.is_err()).count();

    // Collect every result, showing progress: one per event, and one per membership a
    // group's event wrote (known once that event's result is in).
    let mut expected = events.len();
    let mut memberships_counted = false;
    let mut results: HashMap<(String, String, Option<String>), ProvisioningResult> = HashMap::new();
    let deadline = Duration::from_secs(120);
    let mut last_progress = Instant::now();
    while results.len() < expected {
        let remaining = deadline.saturating_sub(started.elapsed());
        match tokio::time::timeout(remaining.min(Duration::from_millis(500)), results_reader.recv()).await {
            Ok(Ok(message)) => {
                if let Some(Ok(result)) = message.payload().map(serde_json::from_slice::<ProvisioningResult>) {
                    if result.scope != crate::result::ResultScope::Complete {
                        continue;
                    }
                    if result.group_id.is_some() && result.user_id.is_empty() && !memberships_counted {
                        memberships_counted = true;
                        expected += result
                            .results
                            .iter()
                            .map(|slot| slot.members_added.unwrap_or(0) + slot.members_removed.unwrap_or(0))
                            .sum::<u64>() as usize;
                    }
                    // A membership has one result per connector, with the same event and user.
                    let membership_of = match (&result.group_id, result.user_id.is_empty()) {
                        (Some(_), false) => result.results.first().map(|slot| slot.connector.clone()),
                        _ => None,
                    };
                    results.insert((result.event_id.clone(), result.user_id.clone(), membership_of), result);
                }
            }
            Ok(Err(error)) => tracing::warn!(error = %error, "Results reader error."),
            Err(_) if remaining.is_zero() => {
                return Err(DemoError::Incomplete {
                    received: results.len(),
                    expected,
                    waited: deadline,
                })
            }
            Err(_) => {}
        }
        if last_progress.elapsed() >= Duration::from_millis(500) || results.len() == expected {
            println!(
                "  progress: {:>4}/{expected} events and memberships have their complete result",
                results.len()
            );
            last_progress = Instant::now();
        }
    }

    print_summary(
        &results,
        &metrics,
        blocking_round_trip.as_ref(),
        admin_address,
        started.elapsed(),
    );
    print_group_summary(&results, &directory, &google, &salesforce, options.users);
    if blocking_failures > 0 {
        println!("  {blocking_failures} blocking callers got no reply in time");
    }
    if let Some(path) = &options.dump_metrics {
        let scraped = reqwest::get(format!("http://{admin_address}/metrics"))
            .await
            .map_err(|error| std::io::Error::other(error.to_string()))?
            .text()
            .await
            .map_err(|error| std::io::Error::other(error.to_string()))?;
        std::fs::write(path, scraped)?;
    }

    if options.keep_running {
        println!("\nStill running (Ctrl-C to stop):");
        println!("  Kafka bootstrap    {bootstrap}   (topics: {EVENT_TOPIC}, {RESULTS_TOPIC}, {REPLY_TOPIC}, {DEAD_LETTER_TOPIC})");
        println!("  SCIM corp_directory {}", directory.base_url());
        println!(
            "  Google workspace    {} (token endpoint {})",
            google.api_base_url(),
            google.token_url()
        );
        println!("  Salesforce crm      {}", salesforce.login_url());
        println!("  metrics            http://{admin_address}/metrics");
        crate::shutdown::on_signal().cancelled().await;
    }
    service_shutdown.cancel();
    let _ = service.await;
    shutdown.cancel();
    // Every client goes before the broker, or they log its disappearance.
    drop(client);
    drop(results_reader);
    drop(producer);
    drop(cluster);
    let _ = std::fs::remove_dir_all(&state_dir);
    Ok(())
}

/// The group: each target's outcome, its memberships' outcomes, and what each target
/// holds for it now.
fn print_group_summary(
    results: &HashMap<(String, String, Option<String>), ProvisioningResult>,
    directory: &scim_emulator::ScimEmulator,
    google: &google_emulator::GoogleEmulator,
    salesforce: &salesforce_emulator::SalesforceEmulator,
    users: usize,
) {
    let Some(group) = results
        .values()
        .find(|result| result.group_id.is_some() && result.user_id.is_empty())
    else {
        return;
    };
    let members = sales_group_members(users).len();
    println!("\nGroup \"Sales\" ({members} member(s) on every target, one group.created event):");
    let mut slots: Vec<_> = group.results.iter().collect();
    slots.sort_by(|left, right| left.connector.cmp(&right.connector));
    for slot in slots {
        let mut memberships: BTreeMap<&'static str, usize> = BTreeMap::new();
        for result in results
            .values()
            .filter(|result| result.event_id == group.event_id && !result.user_id.is_empty())
        {
            for membership in result
                .results
                .iter()
                .filter(|membership| membership.connector == slot.connector)
            {
                *memberships.entry(membership.outcome.as_str()).or_default() += 1;
            }
        }
        let memberships_text = memberships
            .iter()
            .map(|(outcome, count)| format!("{outcome}={count}"))
            .collect::<Vec<_>>()
            .join(" ");
        println!(
            "  {:<16} group {:<8} memberships {}",
            slot.connector,
            slot.outcome.as_str(),
            if memberships_text.is_empty() {
                "-".to_string()
            } else {
                memberships_text
            }
        );
    }
    let scim_members = directory
        .group_by_display_name("Sales")
        .and_then(|group| group["id"].as_str().map(str::to_string))
        .and_then(|id| directory.group_member_ids(&id))
        .map_or(0, |ids| ids.len());
    let google_members = google
        .groups()
        .iter()
        .find(|group| group["name"] == "Sales")
        .and_then(|group| group["email"].as_str().map(str::to_string))
        .and_then(|email| google.members_of(&email))
        .map_or(0, |members| members.len());
    let salesforce_assignments = salesforce
        .assignments()
        .iter()
        .filter(|assignment| assignment["PermissionSetId"].as_str().is_some())
        .count();
    println!(
        "  targets now hold: SCIM group members {scim_members}, Google group members {google_members}, Salesforce {SALES_PERMISSION_SET} assignments {salesforce_assignments}"
    );
}

fn print_summary(
    results: &HashMap<(String, String, Option<String>), ProvisioningResult>,
    metrics: &crate::metrics::Metrics,
    round_trip: Option<&(Vec<u8>, ProvisioningResult, Duration)>,
    admin: SocketAddr,
    elapsed: Duration,
) {
    let mut outcomes: BTreeMap<String, BTreeMap<&'static str, usize>> = BTreeMap::new();
    let mut latencies: BTreeMap<String, Vec<Duration>> = BTreeMap::new();
    // Users' events here; the group and its memberships have their own section.
    for result in results.values().filter(|result| result.group_id.is_none()) {
        for connector in &result.results {
            *outcomes
                .entry(connector.connector.clone())
                .or_default()
                .entry(connector.outcome.as_str())
                .or_default() += 1;
            if connector.outcome != Outcome::Skipped {
                let took = (connector.finished_at - connector.started_at)
                    .to_std()
                    .unwrap_or_default();
                latencies.entry(connector.connector.clone()).or_default().push(took);
            }
        }
    }
    println!(
        "\nSummary ({} events in {:.1} s)\n",
        results.len(),
        elapsed.as_secs_f64()
    );
    println!(
        "  {:<16} {:<64} {:>7} {:>9} {:>9}",
        "connector", "outcomes", "retries", "p50", "p99"
    );
    for (connector, counts) in &outcomes {
        let counts_text = counts
            .iter()
            .map(|(outcome, count)| format!("{outcome}={count}"))
            .collect::<Vec<_>>()
            .join(" ");
        let retries = retries_for(metrics, connector);
        let mut took = latencies.get(connector).cloned().unwrap_or_default();
        took.sort();
        println!(
            "  {:<16} {:<64} {:>7} {:>9} {:>9}",
            connector,
            counts_text,
            retries,
            format_duration(percentile(&took, 0.50)),
            format_duration(percentile(&took, 0.99)),
        );
    }
    let dead_letters: f64 = prometheus::core::Collector::collect(&metrics.dead_letters)
        .iter()
        .flat_map(|family| {
            family
                .get_metric()
                .iter()
                .map(|metric| metric.get_counter().get_value())
        })
        .sum();
    println!("\n  dead letters: {dead_letters} (the malformed event, with its reason in x-provisioner-reason)");
    if let Some((request, reply, took)) = round_trip {
        let request: serde_json::Value = serde_json::from_slice(request).unwrap_or_default();
        println!("\nOne blocking round trip ({} ms):", took.as_millis());
        println!(
            "  request (headers correlation_id, reply_to = {REPLY_TOPIC}):\n{}",
            indent(&serde_json::to_string_pretty(&request).unwrap_or_default())
        );
        println!(
            "  reply:\n{}",
            indent(&serde_json::to_string_pretty(reply).unwrap_or_default())
        );
    }
    println!("\n  metrics: http://{admin}/metrics");
}

fn retries_for(metrics: &crate::metrics::Metrics, connector: &str) -> u64 {
    crate::result::ErrorKind::RETRYABLE
        .iter()
        .map(|kind| {
            metrics
                .connector_retries
                .with_label_values(&[connector, kind.as_str()])
                .get()
        })
        .sum()
}

fn percentile(sorted: &[Duration], quantile: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 * quantile).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index]
}

fn format_duration(duration: Duration) -> String {
    format!("{:.1} ms", duration.as_secs_f64() * 1000.0)
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|line| format!("    {line}"))
        .collect::<Vec<_>>()
        .join("\n")
}
