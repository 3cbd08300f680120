//! Developer tools, apart from the service: target emulators, the demo, the benchmark
//! and the `demo`, `bench` and `emulate` subcommands that run them.
//!
//! Built only with the `devtools` cargo feature, which is on by default (so
//! `cargo run --release -- demo` works on a fresh clone); the service image is built
//! with `--no-default-features` and carries none of this. Nothing outside this module
//! imports it, except `cli.rs`, which adds its subcommands.

pub mod bench;
pub mod cli;
pub mod demo;
pub mod emulators;
pub mod floor;
