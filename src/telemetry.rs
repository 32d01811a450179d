//! Logging: JSON lines with ISO-8601 timestamps in production, human-readable text on a
//! terminal. `RUST_LOG` wins over `logging.level`.

use std::io::IsTerminal;

use tracing_subscriber::{EnvFilter, fmt::time::ChronoUtc};

use crate::config::{LogFormat, LoggingConfig};

/// Installs the global subscriber. Safe to call more than once (later calls do nothing).
pub fn init(cfg: &LoggingConfig) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.is_empty())
        .and_then(|v| EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| EnvFilter::try_new(&cfg.level).unwrap_or_else(|_| EnvFilter::new("info")));
    let json = match cfg.format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stdout().is_terminal(),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_timer(ChronoUtc::rfc_3339());
    let _ = if json {
        builder.json().flatten_event(true).with_current_span(false).with_span_list(false).try_init()
    } else {
        builder.try_init()
    };
}
