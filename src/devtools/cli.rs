//! The developer-tool subcommands: `demo`, `bench` and `emulate`. `cli.rs` flattens
//! [`DevCommand`] into its own command list when the `devtools` feature is on.

use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;
use tokio::runtime::Runtime;

use crate::connectors::jwt::RsaSigner;
use crate::devtools::emulators::google::GoogleEmulatorSettings;
use crate::devtools::emulators::salesforce::SalesforceEmulatorSettings;
use crate::devtools::emulators::scim::ScimEmulatorSettings;
use crate::devtools::emulators::Faults;
use crate::devtools::{bench, demo, emulators, floor};
use crate::settings::{LogFormat, TelemetrySettings};
use crate::{shutdown, telemetry};

/// Why a developer tool stopped; it has already said so on stderr. `cli.rs` turns it
/// into the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Bad usage or input, such as a key file that is not a key (exit 2).
    Usage,
    /// It could not run (exit 1).
    Runtime,
}

#[derive(Debug, Subcommand)]
pub enum DevCommand {
    /// See it work: an embedded Kafka broker, target emulators, the service, and a
    /// realistic mix of events, ending with a summary.
    Demo {
        /// Users in the generated workload.
        #[arg(long, default_value_t = 40)]
        users: usize,
        /// Leave everything up after the summary, to publish your own events.
        #[arg(long)]
        keep_running: bool,
        /// Where to serve /metrics (a free port is used if this one is taken).
        #[arg(long, default_value = "127.0.0.1:9464")]
        metrics_listen: std::net::SocketAddr,
        /// Write the service's final /metrics output to this file.
        #[arg(long)]
        dump_metrics: Option<PathBuf>,
    },
    /// Measure throughput, latency, CPU and memory against a sequential baseline, on an
    /// embedded broker and the SCIM emulator (the service runs as a child process).
    Bench {
        /// Events in the throughput phase (half creates, half deletes); 0 skips it.
        #[arg(long, default_value_t = 100_000)]
        events: usize,
        #[arg(long, default_value_t = 8)]
        partitions: i32,
        /// Distinct users (default: events / 2).
        #[arg(long)]
        users: Option<usize>,
        /// The target's latency per call.
        #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
        latency: Duration,
        /// Events for the sequential baseline.
        #[arg(long, default_value_t = 2_000)]
        baseline_events: usize,
        /// Offered load for the latency phase, events per second.
        #[arg(long, default_value_t = 1_000)]
        rate: u64,
        /// Length of the latency phase.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Memory check: preload this many events against a 1 s target.
        #[arg(long)]
        backlog: Option<usize>,
        /// How long the memory check runs.
        #[arg(long, default_value_t = 30)]
        backlog_seconds: u64,
        #[arg(long)]
        skip_latency: bool,
        #[arg(long)]
        skip_baseline: bool,
        /// Print JSON instead of the table.
        #[arg(long)]
        json: bool,
        /// The service consumer's fetch.wait.max.ms on the embedded broker, which does
        /// not wake a waiting fetch when data arrives (Kafka does).
        #[arg(long, default_value = "1ms", value_parser = humantime::parse_duration)]
        fetch_wait: Duration,
        /// Also measure throughput with the provisioning state off (its cost).
        #[arg(long)]
        compare_state: bool,
        /// Restore phases: this many users' state records (comma-separated sizes).
        #[arg(long, value_delimiter = ',')]
        restore: Vec<usize>,
        /// Run against this Kafka (host:port, e.g. scripts/kafka/run's) instead of the
        /// embedded mock cluster, which keeps only about 5 MB per partition and does not
        /// long-poll.
        #[arg(long)]
        broker: Option<String>,
        /// Groups phase: one group.created with this many members (created first),
        /// applied in the members' lanes (A, the service) and resolved from the group's
        /// lane (B, measured against the emulator); 1000 when given without a number,
        /// 0 skips it.
        #[arg(long, num_args = 0..=1, default_missing_value = "1000")]
        groups: Option<usize>,
        /// Groups phase: the connector's delivery.max_in_flight (A) and B's requests at once.
        #[arg(long, default_value_t = 32)]
        groups_max_in_flight: usize,
        /// Also run the throughput and latency phases with the floor in place of the
        /// service: the same reads, target call and acknowledged writes per event, and no
        /// other work (what the parts cost on this machine).
        #[arg(long)]
        floor: bool,
    },
    /// The benchmark's floor process (started by `bench --floor`).
    #[command(hide = true)]
    BenchFloor {
        #[command(flatten)]
        options: floor::FloorOptions,
    },
    /// Run a target emulator on a local address (for demos, benchmarks, tests).
    Emulate {
        #[command(subcommand)]
        target: EmulateTarget,
    },
}

#[derive(Debug, Subcommand)]
pub enum EmulateTarget {
    /// An in-memory SCIM 2.0 server at http://LISTEN/scim/v2.
    Scim {
        #[command(flatten)]
        common: EmulatorArgs,
        /// Require this static bearer token.
        #[arg(long)]
        bearer_token: Option<String>,
        /// Issue client-credentials tokens at /oauth2/token to this client id...
        #[arg(long, requires = "oauth_client_secret")]
        oauth_client_id: Option<String>,
        /// ...with this secret.
        #[arg(long)]
        oauth_client_secret: Option<String>,
        /// Lifetime of issued tokens.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        token_lifetime: Duration,
        /// Do not advertise or accept PATCH.
        #[arg(long)]
        no_patch: bool,
        /// Do not advertise or check ETags.
        #[arg(long)]
        no_etag: bool,
        /// Say in /ServiceProviderConfig that filtering is unsupported (it still works,
        /// as on several real servers).
        #[arg(long)]
        no_filter_advertised: bool,
        /// Refuse `filter` with 400 invalidFilter: users can only be listed, page by page.
        #[arg(long)]
        no_filter: bool,
    },
    /// An in-memory Google Directory API at http://LISTEN/admin/directory/v1 with its
    /// token endpoint at http://LISTEN/token.
    Google {
        #[command(flatten)]
        common: EmulatorArgs,
        /// The Workspace domain every primaryEmail must end with.
        #[arg(long, default_value = "example.com")]
        domain: String,
        /// The admin the service account may impersonate.
        #[arg(long, default_value = "admin@example.com")]
        admin_email: String,
        /// A service-account key file (Google's JSON) whose key tokens must be signed
        /// with. Without it a key is generated and written to --write-key.
        #[arg(long, conflicts_with = "write_key")]
        service_account_key: Option<PathBuf>,
        /// Where to write a generated service-account key file for the connector.
        #[arg(long, default_value = "google-service-account.json")]
        write_key: PathBuf,
    },
    /// An in-memory Salesforce: login and instance URL http://LISTEN.
    Salesforce {
        #[command(flatten)]
        common: EmulatorArgs,
        /// The connected app's consumer key...
        #[arg(long, default_value = "provisioner-emulator")]
        client_id: String,
        /// ...and secret (client-credentials and password grants).
        #[arg(long, default_value = "emulator-secret")]
        client_secret: String,
        /// The API user (password and JWT-bearer grants).
        #[arg(long, default_value = "integration@example.com")]
        username: String,
        /// Its password with the security token appended.
        #[arg(long, default_value = "emulator-password")]
        password_with_token: String,
        /// A PEM private key whose public half verifies JWT-bearer assertions; without
        /// it a key is generated and written to --write-key.
        #[arg(long, conflicts_with = "write_key")]
        jwt_key: Option<PathBuf>,
        /// Where to write a generated JWT-bearer private key.
        #[arg(long, default_value = "salesforce-jwt-key.pem")]
        write_key: PathBuf,
        /// Sessions expire after this long (INVALID_SESSION_ID afterwards).
        #[arg(long, default_value = "2h", value_parser = humantime::parse_duration)]
        session_lifetime: Duration,
    },
}

/// Options every emulator takes.
#[derive(Debug, clap::Args)]
pub struct EmulatorArgs {
    /// Address to listen on (loopback by default).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: std::net::SocketAddr,
    /// Latency added to every request.
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    pub latency: Duration,
    /// Extra random latency, uniform in [0, jitter].
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    pub jitter: Duration,
    /// Fraction of requests answered 429 with Retry-After.
    #[arg(long, default_value_t = 0.0)]
    pub rate_429: f64,
    /// The Retry-After those 429s carry, in seconds.
    #[arg(long, default_value_t = 1)]
    pub retry_after: u64,
    /// Fraction of requests answered 500.
    #[arg(long, default_value_t = 0.0)]
    pub rate_500: f64,
    /// Fraction of requests never answered.
    #[arg(long, default_value_t = 0.0)]
    pub rate_hang: f64,
    /// Fraction of connections cut mid-response.
    #[arg(long, default_value_t = 0.0)]
    pub rate_reset: f64,
}

impl EmulatorArgs {
    fn faults(&self) -> Faults {
        Faults {
            latency: self.latency,
            jitter: self.jitter,
            rate_429: self.rate_429,
            retry_after_seconds: self.retry_after,
            rate_500: self.rate_500,
            rate_hang: self.rate_hang,
            rate_reset: self.rate_reset,
        }
    }
}

/// Runs a developer-tool subcommand on `runtime`.
pub fn run(command: DevCommand, runtime: &Runtime) -> Result<(), Failure> {
    match command {
        DevCommand::Emulate { target } => emulate(target, runtime),
        DevCommand::Demo {
            users,
            keep_running,
            metrics_listen,
            dump_metrics,
        } => run_demo(
            demo::DemoOptions {
                users,
                keep_running,
                admin_listen: metrics_listen,
                dump_metrics,
            },
            runtime,
        ),
        DevCommand::Bench {
            events,
            partitions,
            users,
            latency,
            baseline_events,
            rate,
            duration,
            backlog,
            backlog_seconds,
            skip_latency,
            skip_baseline,
            json,
            fetch_wait,
            compare_state,
            restore,
            broker,
            groups,
            groups_max_in_flight,
            floor,
        } => run_bench(
            bench::BenchOptions {
                events,
                partitions,
                users,
                target_latency: latency,
                baseline_events,
                rate,
                duration,
                backlog,
                backlog_seconds,
                json,
                skip_latency,
                skip_baseline,
                fetch_wait,
                compare_state,
                restore_users: restore,
                broker,
                group_members: groups,
                groups_max_in_flight,
                floor,
            },
            runtime,
        ),
        DevCommand::BenchFloor { options } => runtime.block_on(floor::run(options)).map_err(|error| {
            eprintln!("provisioner bench-floor: {error}");
            Failure::Runtime
        }),
    }
}

fn emulate(target: EmulateTarget, runtime: &Runtime) -> Result<(), Failure> {
    telemetry::init(&TelemetrySettings {
        format: LogFormat::Pretty,
        level: "info".into(),
    });
    runtime.block_on(async move {
        let shutdown = shutdown::on_signal();
        match target {
            EmulateTarget::Google {
                common,
                domain,
                admin_email,
                service_account_key,
                write_key,
            } => emulate_google(common, domain, admin_email, service_account_key, write_key, shutdown).await,
            EmulateTarget::Salesforce {
                common,
                client_id,
                client_secret,
                username,
                password_with_token,
                jwt_key,
                write_key,
                session_lifetime,
            } => {
                let signer = match jwt_key {
                    Some(path) => match std::fs::read_to_string(&path)
                        .ok()
                        .and_then(|pem| RsaSigner::from_pem(&pem).ok())
                    {
                        Some(signer) => signer,
                        None => {
                            eprintln!("provisioner: {} is not a PEM RSA private key", path.display());
                            return Err(Failure::Usage);
                        }
                    },
                    None => {
                        let signer = RsaSigner::generate();
                        if let Err(error) = std::fs::write(&write_key, signer.private_key_pem()) {
                            eprintln!("provisioner: cannot write {}: {error}", write_key.display());
                            return Err(Failure::Runtime);
                        }
                        println!(
                            "wrote a JWT-bearer private key for this emulator to {}",
                            write_key.display()
                        );
                        signer
                    }
                };
                let settings = SalesforceEmulatorSettings {
                    client_id,
                    client_secret,
                    username,
                    password_with_token,
                    public_key: Some(signer.public_key()),
                    session_lifetime,
                    foreign_usernames: Vec::new(),
                    faults: common.faults(),
                };
                match emulators::salesforce::start(common.listen, settings, shutdown.clone()).await {
                    Ok(emulator) => {
                        println!("Salesforce emulator: login_url {}", emulator.login_url());
                        shutdown.cancelled().await;
                        Ok(())
                    }
                    Err(error) => {
                        eprintln!("provisioner: cannot listen on {}: {error}", common.listen);
                        Err(Failure::Runtime)
                    }
                }
            }
            EmulateTarget::Scim {
                common,
                bearer_token,
                oauth_client_id,
                oauth_client_secret,
                token_lifetime,
                no_patch,
                no_etag,
                no_filter_advertised,
                no_filter,
            } => {
                let settings = ScimEmulatorSettings {
                    faults: common.faults(),
                    bearer_token,
                    oauth_client: oauth_client_id
                        .zip(oauth_client_secret)
                        .map(|(id, secret)| (id, secret, token_lifetime)),
                    patch: !no_patch,
                    etag: !no_etag,
                    filter_advertised: !(no_filter_advertised || no_filter),
                    filter_works: !no_filter,
                    max_group_members_per_request: None,
                };
                match emulators::scim::start(common.listen, settings, shutdown.clone()).await {
                    Ok(emulator) => {
                        println!("SCIM emulator at {}", emulator.base_url());
                        println!("  token endpoint {}", emulator.token_url());
                        println!(
                            "  faults: POST http://{}/_emulator/faults, stats: GET http://{}/_emulator/stats",
                            emulator.address, emulator.address
                        );
                        shutdown.cancelled().await;
                        Ok(())
                    }
                    Err(error) => {
                        eprintln!("provisioner: cannot listen on {}: {error}", common.listen);
                        Err(Failure::Runtime)
                    }
                }
            }
        }
    })
}

fn run_demo(options: demo::DemoOptions, runtime: &Runtime) -> Result<(), Failure> {
    // Quiet by default: the demo prints its own progress and summary.
    telemetry::init(&TelemetrySettings {
        format: LogFormat::Pretty,
        level: "error".into(),
    });
    match runtime.block_on(demo::run(options)) {
        Ok(()) => Ok(()),
        Err(error) => {
            eprintln!("provisioner demo: {error}");
            Err(Failure::Runtime)
        }
    }
}

async fn emulate_google(
    common: EmulatorArgs,
    domain: String,
    admin_email: String,
    service_account_key: Option<PathBuf>,
    write_key: PathBuf,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), Failure> {
    let listen = common.listen;
    let (signer, client_email, generated) = match service_account_key {
        Some(path) => {
            let key = std::fs::read_to_string(&path)
                .ok()
                .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok());
            let parsed = key.as_ref().and_then(|key| {
                let signer = RsaSigner::from_pem(key.get("private_key")?.as_str()?).ok()?;
                Some((signer, key.get("client_email")?.as_str()?.to_string()))
            });
            match parsed {
                Some((signer, email)) => (signer, email, false),
                None => {
                    eprintln!("provisioner: {} is not a service-account key file", path.display());
                    return Err(Failure::Usage);
                }
            }
        }
        None => (
            RsaSigner::generate(),
            "provisioner@emulator.iam.gserviceaccount.com".to_string(),
            true,
        ),
    };
    let settings = GoogleEmulatorSettings {
        domain,
        client_email: client_email.clone(),
        public_key: signer.public_key(),
        admin_email,
        token_lifetime: Duration::from_secs(3600),
        faults: common.faults(),
    };
    let emulator = match emulators::google::start(listen, settings, shutdown.clone()).await {
        Ok(emulator) => emulator,
        Err(error) => {
            eprintln!("provisioner: cannot listen on {listen}: {error}");
            return Err(Failure::Runtime);
        }
    };
    if generated {
        let key = serde_json::json!({
            "type": "service_account",
            "client_email": client_email,
            "private_key": signer.private_key_pem(),
            "token_uri": emulator.token_url(),
        });
        if let Err(error) = std::fs::write(&write_key, serde_json::to_string_pretty(&key).expect("JSON")) {
            eprintln!("provisioner: cannot write {}: {error}", write_key.display());
            return Err(Failure::Runtime);
        }
        println!(
            "wrote a service-account key for this emulator to {}",
            write_key.display()
        );
    }
    println!("Google Directory emulator: api_base_url {}", emulator.api_base_url());
    println!("  token endpoint {}", emulator.token_url());
    shutdown.cancelled().await;
    Ok(())
}

fn run_bench(options: bench::BenchOptions, runtime: &Runtime) -> Result<(), Failure> {
    telemetry::init(&TelemetrySettings {
        format: LogFormat::Pretty,
        level: "error".into(),
    });
    let json = options.json;
    match runtime.block_on(bench::run(options)) {
        Ok(report) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&report).expect("report serialises"));
            } else {
                print!("{}", bench::render(&report));
            }
            Ok(())
        }
        Err(error) => {
            eprintln!("provisioner bench: {error}");
            Err(Failure::Runtime)
        }
    }
}
