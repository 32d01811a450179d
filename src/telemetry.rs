//! Logging: JSON lines in production, human-readable text on a terminal (`logging.format: auto`,
//! the default) or as configured. Every line has an ISO-8601 UTC timestamp with microseconds
//! (`2026-01-02T03:04:05.123456Z`), the level, the target (module path) and the event's fields
//! at the top level of the object. `RUST_LOG`, when set and valid, wins over `logging.level`.

use std::io::IsTerminal;

use tracing_subscriber::{EnvFilter, fmt::time::ChronoUtc};

use crate::config::{LogFormat, LoggingConfig};

/// ISO-8601 / RFC 3339 in UTC, microseconds.
const TIMESTAMP: &str = "%Y-%m-%dT%H:%M:%S%.6fZ";

/// Installs the global subscriber, writing to stdout. Safe to call more than once (later calls
/// do nothing).
pub fn init(cfg: &LoggingConfig) {
    init_to(cfg, false);
}

/// Like [`init`], writing to stderr (for command-line tools whose stdout is their output).
pub fn init_stderr(cfg: &LoggingConfig) {
    init_to(cfg, true);
}

fn init_to(cfg: &LoggingConfig, stderr: bool) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.is_empty())
        .and_then(|v| EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| EnvFilter::try_new(&cfg.level).unwrap_or_else(|_| EnvFilter::new("info")));
    let tty = if stderr { std::io::stderr().is_terminal() } else { std::io::stdout().is_terminal() };
    let json = match cfg.format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !tty,
    };
    let writer = tracing_subscriber::fmt::writer::BoxMakeWriter::new(move || -> Box<dyn std::io::Write> {
        if stderr { Box::new(std::io::stderr()) } else { Box::new(std::io::stdout()) }
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colours only on a terminal: text piped into a file or a log collector stays plain.
        .with_ansi(tty)
        .with_timer(ChronoUtc::new(TIMESTAMP.into()))
        .with_writer(writer);
    let _ = if json {
        builder.json().flatten_event(true).with_current_span(false).with_span_list(false).try_init()
    } else {
        builder.try_init()
    };
}
