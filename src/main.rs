use std::process::ExitCode;

use clap::Parser;

/// mimalloc: the profile of the event path was a quarter glibc malloc/free (many small,
/// short-lived JSON values); mimalloc's thread-local free lists cut that cost.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    provisioner::cli::run(provisioner::cli::Cli::parse())
}
