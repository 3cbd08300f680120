//! The command line: `run`, `check-config`, `send`, `dlq replay`, `demo`, `bench` and `emulate`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::app::Application;
use crate::client::{Client, ClientError};
use crate::kafka::dead_letters::{self, ReplaySelection};
use crate::pipeline::router::Router;
use crate::result::Status;
use crate::settings::{Settings, SettingsError, TelemetrySettings};
use crate::{shutdown, telemetry};

/// Exit code for bad configuration, usage or input; runtime failures exit 1.
pub const EXIT_CONFIG: u8 = 2;
/// Exit code of `send` when no reply came in time or Kafka could not be reached.
pub const EXIT_UNAVAILABLE: u8 = 3;

#[derive(Debug, Parser)]
#[command(
    name = "provisioner",
    version,
    about = "Outbound user provisioning from Kafka lifecycle events"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service.
    Run {
        /// TOML configuration file.
        #[arg(long, env = "PROVISIONER_CONFIG")]
        config: PathBuf,
    },
    /// Validate a configuration and print it resolved, secrets redacted.
    CheckConfig {
        #[arg(long, env = "PROVISIONER_CONFIG")]
        config: PathBuf,
    },
    /// Publish an event (a structured CloudEvent JSON file); with --wait, act as a
    /// blocking caller and print the reply. Exit code: 0 succeeded, 1 failed, partial or
    /// skipped, 2 bad input or configuration, 3 no reply in time or Kafka unreachable.
    Send {
        #[arg(long, env = "PROVISIONER_CONFIG")]
        config: PathBuf,
        /// Wait for the reply on the configured reply topic.
        #[arg(long)]
        wait: bool,
        /// How long to wait for the reply.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// The event file.
        event: PathBuf,
    },
    /// Dead-letter topic tools.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
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
        /// Events in the throughput phase (half creates, half deletes).
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
        #[arg(long, default_value = "5ms", value_parser = humantime::parse_duration)]
        fetch_wait: Duration,
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
    fn faults(&self) -> crate::emulators::Faults {
        crate::emulators::Faults {
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

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Re-publish chosen dead letters to the topic they came from.
    Replay {
        #[arg(long, env = "PROVISIONER_CONFIG")]
        config: PathBuf,
        /// Every dead letter.
        #[arg(long)]
        all: bool,
        /// Only dead letters with this reason code (e.g. connector_failed).
        #[arg(long)]
        reason: Option<String>,
        /// Only these CloudEvents ids (repeatable).
        #[arg(long = "event-id")]
        event_ids: Vec<String>,
        /// At most this many.
        #[arg(long)]
        limit: Option<usize>,
        /// Count what would be replayed, publish nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Runs a parsed command line; `main` is only this.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Run { config } => run_service(config),
        Command::CheckConfig { config } => check_config(config),
        Command::Send {
            config,
            wait,
            timeout,
            event,
        } => send(config, wait, timeout, event),
        Command::Dlq {
            command:
                DlqCommand::Replay {
                    config,
                    all,
                    reason,
                    event_ids,
                    limit,
                    dry_run,
                },
        } => replay_dead_letters(
            config,
            ReplaySelection {
                all,
                reason,
                event_ids,
                limit,
            },
            dry_run,
        ),
        Command::Emulate { target } => emulate(target),
        Command::Demo {
            users,
            keep_running,
            metrics_listen,
            dump_metrics,
        } => demo(crate::demo::DemoOptions {
            users,
            keep_running,
            admin_listen: metrics_listen,
            dump_metrics,
        }),
        Command::Bench {
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
        } => bench(crate::bench::BenchOptions {
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
        }),
    }
}

/// Loads and fully validates a configuration, rules included.
pub fn load_settings(path: &std::path::Path) -> Result<Settings, SettingsError> {
    let settings = Settings::load(path)?;
    Router::new(&settings).map_err(SettingsError::Invalid)?;
    Ok(settings)
}

fn check_config(path: PathBuf) -> ExitCode {
    match load_settings(&path) {
        Ok(settings) => {
            print!("{}", settings.to_redacted_toml());
            eprintln!("provisioner: {} is valid", path.display());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("provisioner: {}: {error}", path.display());
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

fn run_service(path: PathBuf) -> ExitCode {
    let settings = match load_settings(&path) {
        Ok(settings) => settings,
        Err(error) => {
            telemetry::init(&TelemetrySettings::default());
            tracing::error!(config = %path.display(), error = %error, "Invalid configuration.");
            eprintln!("provisioner: {}: {error}", path.display());
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    telemetry::init(&settings.telemetry);
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    runtime.block_on(async move {
        let shutdown = shutdown::on_signal();
        let application = match Application::build(settings).await {
            Ok(application) => application,
            Err(error) => {
                tracing::error!(error = %error, "Cannot start.");
                eprintln!("provisioner: {error}");
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        tracing::info!(admin = %application.admin_address(), "Started.");
        match application.run_until_stopped(shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                tracing::error!(error = %error, "Stopped with an error.");
                ExitCode::FAILURE
            }
        }
    })
}

fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Runtime::new() {
        Ok(runtime) => Some(runtime),
        Err(error) => {
            eprintln!("provisioner: cannot start the async runtime: {error}");
            None
        }
    }
}

fn load_or_report(path: &std::path::Path) -> Result<Settings, ExitCode> {
    load_settings(path).map_err(|error| {
        eprintln!("provisioner: {}: {error}", path.display());
        ExitCode::from(EXIT_CONFIG)
    })
}

fn send(config: PathBuf, wait: bool, timeout: Duration, event_path: PathBuf) -> ExitCode {
    let settings = match load_or_report(&config) {
        Ok(settings) => settings,
        Err(code) => return code,
    };
    telemetry::init(&TelemetrySettings {
        level: "warn".into(),
        ..settings.telemetry.clone()
    });
    let event_json = match std::fs::read(&event_path) {
        Ok(bytes) => bytes,
        Err(error) => {
            eprintln!("provisioner: cannot read {}: {error}", event_path.display());
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    runtime.block_on(async move {
        let client = match Client::connect(&settings.kafka).await {
            Ok(client) => client,
            Err(error) => {
                eprintln!("provisioner: {error}");
                return ExitCode::from(EXIT_UNAVAILABLE);
            }
        };
        if !wait {
            return match client.send(&event_json).await {
                Ok(event_id) => {
                    println!("published {event_id}");
                    ExitCode::SUCCESS
                }
                Err(error) => send_error(error),
            };
        }
        match client.send_and_wait(&event_json, timeout).await {
            Ok(reply) => {
                println!("{}", serde_json::to_string_pretty(&reply).expect("results serialise"));
                if reply.status == Status::Succeeded {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(error) => send_error(error),
        }
    })
}

fn send_error(error: ClientError) -> ExitCode {
    eprintln!("provisioner: {error}");
    match error {
        ClientError::InvalidEvent(_) => ExitCode::from(EXIT_CONFIG),
        ClientError::Kafka(_) | ClientError::Timeout { .. } | ClientError::ReaderStopped => {
            ExitCode::from(EXIT_UNAVAILABLE)
        }
    }
}

fn replay_dead_letters(config: PathBuf, selection: ReplaySelection, dry_run: bool) -> ExitCode {
    let settings = match load_or_report(&config) {
        Ok(settings) => settings,
        Err(code) => return code,
    };
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    match runtime.block_on(dead_letters::replay(&settings.kafka, &selection, dry_run)) {
        Ok(report) => {
            let verb = if dry_run { "would replay" } else { "replayed" };
            println!("scanned {} dead letters, {verb} {}", report.scanned, report.replayed);
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("provisioner: {error}");
            if error.is_retryable() {
                ExitCode::from(EXIT_UNAVAILABLE)
            } else {
                ExitCode::from(EXIT_CONFIG)
            }
        }
    }
}

fn emulate(target: EmulateTarget) -> ExitCode {
    telemetry::init(&TelemetrySettings {
        format: crate::settings::LogFormat::Pretty,
        level: "info".into(),
    });
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
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
                use crate::connectors::jwt::RsaSigner;
                let signer = match jwt_key {
                    Some(path) => match std::fs::read_to_string(&path)
                        .ok()
                        .and_then(|pem| RsaSigner::from_pem(&pem).ok())
                    {
                        Some(signer) => signer,
                        None => {
                            eprintln!("provisioner: {} is not a PEM RSA private key", path.display());
                            return ExitCode::from(EXIT_CONFIG);
                        }
                    },
                    None => {
                        let signer = RsaSigner::generate();
                        if let Err(error) = std::fs::write(&write_key, signer.private_key_pem()) {
                            eprintln!("provisioner: cannot write {}: {error}", write_key.display());
                            return ExitCode::FAILURE;
                        }
                        println!(
                            "wrote a JWT-bearer private key for this emulator to {}",
                            write_key.display()
                        );
                        signer
                    }
                };
                let settings = crate::emulators::salesforce::SalesforceEmulatorSettings {
                    client_id,
                    client_secret,
                    username,
                    password_with_token,
                    public_key: Some(signer.public_key()),
                    session_lifetime,
                    foreign_usernames: Vec::new(),
                    faults: common.faults(),
                };
                match crate::emulators::salesforce::start(common.listen, settings, shutdown.clone()).await {
                    Ok(emulator) => {
                        println!("Salesforce emulator: login_url {}", emulator.login_url());
                        shutdown.cancelled().await;
                        ExitCode::SUCCESS
                    }
                    Err(error) => {
                        eprintln!("provisioner: cannot listen on {}: {error}", common.listen);
                        ExitCode::FAILURE
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
            } => {
                let settings = crate::emulators::scim::ScimEmulatorSettings {
                    faults: common.faults(),
                    bearer_token,
                    oauth_client: oauth_client_id
                        .zip(oauth_client_secret)
                        .map(|(id, secret)| (id, secret, token_lifetime)),
                    patch: !no_patch,
                    etag: !no_etag,
                };
                match crate::emulators::scim::start(common.listen, settings, shutdown.clone()).await {
                    Ok(emulator) => {
                        println!("SCIM emulator at {}", emulator.base_url());
                        println!("  token endpoint {}", emulator.token_url());
                        println!(
                            "  faults: POST http://{}/_emulator/faults, stats: GET http://{}/_emulator/stats",
                            emulator.address, emulator.address
                        );
                        shutdown.cancelled().await;
                        ExitCode::SUCCESS
                    }
                    Err(error) => {
                        eprintln!("provisioner: cannot listen on {}: {error}", common.listen);
                        ExitCode::FAILURE
                    }
                }
            }
        }
    })
}

fn demo(options: crate::demo::DemoOptions) -> ExitCode {
    // Quiet by default: the demo prints its own progress and summary.
    telemetry::init(&TelemetrySettings {
        format: crate::settings::LogFormat::Pretty,
        level: "error".into(),
    });
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    match runtime.block_on(crate::demo::run(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("provisioner demo: {error}");
            ExitCode::FAILURE
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
) -> ExitCode {
    use crate::connectors::jwt::RsaSigner;
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
                    return ExitCode::from(EXIT_CONFIG);
                }
            }
        }
        None => (
            RsaSigner::generate(),
            "provisioner@emulator.iam.gserviceaccount.com".to_string(),
            true,
        ),
    };
    let settings = crate::emulators::google::GoogleEmulatorSettings {
        domain,
        client_email: client_email.clone(),
        public_key: signer.public_key(),
        admin_email,
        token_lifetime: Duration::from_secs(3600),
        faults: common.faults(),
    };
    let emulator = match crate::emulators::google::start(listen, settings, shutdown.clone()).await {
        Ok(emulator) => emulator,
        Err(error) => {
            eprintln!("provisioner: cannot listen on {listen}: {error}");
            return ExitCode::FAILURE;
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
            return ExitCode::FAILURE;
        }
        println!(
            "wrote a service-account key for this emulator to {}",
            write_key.display()
        );
    }
    println!("Google Directory emulator: api_base_url {}", emulator.api_base_url());
    println!("  token endpoint {}", emulator.token_url());
    shutdown.cancelled().await;
    ExitCode::SUCCESS
}

fn bench(options: crate::bench::BenchOptions) -> ExitCode {
    telemetry::init(&TelemetrySettings {
        format: crate::settings::LogFormat::Pretty,
        level: "error".into(),
    });
    let json = options.json;
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    match runtime.block_on(crate::bench::run(options)) {
        Ok(report) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&report).expect("report serialises"));
            } else {
                print!("{}", crate::bench::render(&report));
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("provisioner bench: {error}");
            ExitCode::FAILURE
        }
    }
}
