use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    provisioner::cli::run(provisioner::cli::Cli::parse())
}
