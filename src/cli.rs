//! The command line: `run`, `check-config`, and the names reserved for later commands.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::app::Application;
use crate::pipeline::router::Router;
use crate::settings::{Settings, SettingsError, TelemetrySettings};
use crate::{shutdown, telemetry};

/// Exit code for bad configuration or usage; runtime failures exit 1.
pub const EXIT_CONFIG: u8 = 2;

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
    /// Publish an event as a blocking caller and wait for the reply (reserved).
    #[command(hide = true)]
    Send,
    /// Run everything in-process on an embedded broker (reserved).
    #[command(hide = true)]
    Demo,
    /// Measure throughput and latency (reserved).
    #[command(hide = true)]
    Bench,
    /// Run a target emulator (reserved).
    #[command(hide = true)]
    Emulate,
}

/// Runs a parsed command line; `main` is only this.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Run { config } => run_service(config),
        Command::CheckConfig { config } => check_config(config),
        Command::Send | Command::Demo | Command::Bench | Command::Emulate => {
            eprintln!("provisioner: this command is reserved and not available in this build");
            ExitCode::from(EXIT_CONFIG)
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
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("provisioner: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
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
