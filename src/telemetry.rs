//! Logging setup: JSON lines for production, pretty output for people.
//!
//! House style for log lines: fields first, then a capitalised message ending in a
//! period, e.g. `warn!(connector, attempt, error = %error, "Retrying connector call.")`.
//! WARN means something was retried or refused and the service carried on; ERROR means
//! an operation was given up.

use tracing_subscriber::EnvFilter;

use crate::settings::{LogFormat, TelemetrySettings};

/// Installs the global subscriber. `RUST_LOG` overrides the configured level. Calling it
/// twice is harmless (the second call is ignored), which keeps tests simple.
pub fn init(settings: &TelemetrySettings) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match settings.format {
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .flatten_event(true)
            .try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
}
