//! The command line: `run`, `check-config`, `send`, `dlq replay` and `state show`; with the `devtools`
//! feature (on by default) also `demo`, `bench` and `emulate` (see `devtools/cli.rs`).

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
    /// Provisioning-state tools.
    State {
        #[command(subcommand)]
        command: StateCommand,
    },
    /// The developer tools: `demo`, `bench`, `emulate` (the `devtools` feature).
    #[cfg(feature = "devtools")]
    #[command(flatten)]
    Devtools(crate::devtools::cli::DevCommand),
}

#[derive(Debug, Subcommand)]
pub enum StateCommand {
    /// Print what each connector's target holds for a user (remote id, account state,
    /// the version and event that set it), read from the state topic.
    Show {
        #[arg(long, env = "PROVISIONER_CONFIG")]
        config: PathBuf,
        /// `tenant/user id`, the user's input key.
        user: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
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
        /// Then wait up to this long for the replayed events' results, and report how
        /// many were applied, stale (a newer event had been applied) or failed again.
        #[arg(long, value_parser = humantime::parse_duration)]
        wait: Option<Duration>,
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
                    wait,
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
            wait,
        ),
        Command::State {
            command: StateCommand::Show { config, user, json },
        } => show_state(config, &user, json),
        #[cfg(feature = "devtools")]
        Command::Devtools(command) => {
            let Some(runtime) = runtime() else {
                return ExitCode::FAILURE;
            };
            match crate::devtools::cli::run(command, &runtime) {
                Ok(()) => ExitCode::SUCCESS,
                Err(crate::devtools::cli::Failure::Usage) => ExitCode::from(EXIT_CONFIG),
                Err(crate::devtools::cli::Failure::Runtime) => ExitCode::FAILURE,
            }
        }
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

fn show_state(config: PathBuf, user: &str, json: bool) -> ExitCode {
    let settings = match load_or_report(&config) {
        Ok(settings) => settings,
        Err(code) => return code,
    };
    if !user.contains('/') {
        eprintln!("provisioner: the user must be given as tenant/user id, e.g. carbon.super/7d0c8c52");
        return ExitCode::from(EXIT_CONFIG);
    }
    let found = match crate::state::show::show(&settings.kafka, &settings.state.topic, user, Duration::from_secs(60)) {
        Ok(found) => found,
        Err(error) => {
            eprintln!("provisioner: {error}");
            return ExitCode::from(if error.is_retryable() {
                EXIT_UNAVAILABLE
            } else {
                EXIT_CONFIG
            });
        }
    };
    if json {
        let document: serde_json::Map<String, serde_json::Value> = found
            .iter()
            .map(|(connector, shown)| {
                let mut value = serde_json::to_value(&shown.record).expect("state records serialise");
                value["state_partition"] = shown.partition.into();
                value["state_offset"] = shown.offset.into();
                (connector.clone(), value)
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&document).expect("JSON"));
        return ExitCode::SUCCESS;
    }
    if found.is_empty() {
        println!("{user}: no provisioning state (never provisioned, or before the state existed)");
        return ExitCode::SUCCESS;
    }
    println!("{user}");
    for (connector, shown) in &found {
        let record = &shown.record;
        println!(
            "  {connector:<20} {:<12} remote id {:<40} {} (event {}, {})",
            record.account.as_str(),
            record.remote_id.as_deref().unwrap_or("-"),
            record.version,
            record.event_id,
            record.updated_at.to_rfc3339(),
        );
    }
    ExitCode::SUCCESS
}

fn replay_dead_letters(config: PathBuf, selection: ReplaySelection, dry_run: bool, wait: Option<Duration>) -> ExitCode {
    let settings = match load_or_report(&config) {
        Ok(settings) => settings,
        Err(code) => return code,
    };
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    let results_from = match wait.filter(|_| !dry_run) {
        Some(_) => match dead_letters::results_end(&settings.kafka) {
            Ok(ends) => Some(ends),
            Err(error) => {
                eprintln!("provisioner: cannot read the results topic: {error}");
                return ExitCode::from(EXIT_UNAVAILABLE);
            }
        },
        None => None,
    };
    match runtime.block_on(dead_letters::replay(&settings.kafka, &selection, dry_run)) {
        Ok(report) => {
            let verb = if dry_run { "would replay" } else { "replayed" };
            println!("scanned {} dead letters, {verb} {}", report.scanned, report.replayed);
            if let (Some(timeout), Some(from)) = (wait, results_from) {
                match dead_letters::await_outcomes(&settings.kafka, &from, &report.event_ids, timeout) {
                    Ok(outcomes) => {
                        println!(
                            "processed {} of {} replayed: {} stale (a newer event had been applied), {} failed again",
                            outcomes.processed,
                            report.event_ids.len(),
                            outcomes.stale,
                            outcomes.failed
                        );
                        if outcomes.processed < report.event_ids.len() {
                            return ExitCode::from(EXIT_UNAVAILABLE);
                        }
                    }
                    Err(error) => {
                        eprintln!("provisioner: cannot read the results topic: {error}");
                        return ExitCode::from(EXIT_UNAVAILABLE);
                    }
                }
            }
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
