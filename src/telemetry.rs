//! Logging: JSON lines in production, human-readable text on a terminal (`logging.format: auto`,
//! the default) or as configured. Every line has an ISO-8601 UTC timestamp with microseconds
//! (`2026-01-02T03:04:05.123456Z`), the level, the target (module path) and the event's fields
//! at the top level of the object. `RUST_LOG`, when set and valid, wins over `logging.level`.
//!
//! Traces: every gRPC call and every store call is a `tracing` span. [`init_with_traces`] adds,
//! beside the log layer, an OpenTelemetry layer that exports this crate's and the worker SDK's
//! spans over OTLP/gRPC when the standard variables ask for it (`OTEL_EXPORTER_OTLP_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` set, `OTEL_SDK_DISABLED` not `true`); off otherwise.
//! [`traceparent`] and [`parse_traceparent`] carry a W3C trace context in and out of a span.

use std::{io::IsTerminal, sync::Mutex, time::Duration};

use opentelemetry::{
    Context,
    trace::{SpanContext, TraceContextExt as _, TracerProvider as _},
};
use opentelemetry_otlp::WithTonicConfig as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::{
    EnvFilter, Layer as _, filter::Targets, fmt::time::ChronoUtc, layer::SubscriberExt as _,
    util::SubscriberInitExt as _,
};

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
    let filter = log_filter(cfg);
    let (json, tty, writer) = log_output(cfg, stderr);
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

/// Why trace export could not start.
#[derive(Debug, thiserror::Error)]
#[error("trace export: {0}")]
pub struct TraceExportError(String);

/// The tracer provider while export is on; [`shutdown`] takes it out and flushes it.
/// A std mutex: it is only touched at start and at shutdown, never across an `.await`.
static PROVIDER: Mutex<Option<SdkTracerProvider>> = Mutex::new(None);

/// Whether the standard variables turn trace export on: an OTLP endpoint is set (for all
/// signals or for traces) and the SDK is not disabled.
pub fn export_wanted(env: impl Fn(&str) -> Option<String>) -> bool {
    let set = |k: &str| env(k).is_some_and(|v| !v.trim().is_empty());
    let disabled = env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// Like [`init`], and exports spans over OTLP/gRPC when [`export_wanted`] says so, as
/// `OTEL_SERVICE_NAME` or else `service`. The exporter starts connecting at once, so this runs
/// inside a tokio runtime (`runtime.enter()`). Returns whether export is on.
pub fn init_with_traces(cfg: &LoggingConfig, service: &str) -> Result<bool, TraceExportError> {
    if !export_wanted(|k| std::env::var(k).ok()) {
        init(cfg);
        return Ok(false);
    }
    let endpoint = ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.trim().is_empty()))
        .unwrap_or_default();
    let mut builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
    if endpoint.trim_start().to_ascii_lowercase().starts_with("https://") {
        // A collector behind TLS with a certificate from a public authority.
        builder = builder.with_tls_config(tonic::transport::ClientTlsConfig::new().with_webpki_roots());
    }
    let exporter = builder.build().map_err(|e| TraceExportError(e.to_string()))?;
    let name = std::env::var("OTEL_SERVICE_NAME").ok().filter(|v| !v.trim().is_empty());
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(name.unwrap_or_else(|| service.to_owned()))
        .build();
    // The sampler comes from OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG (the SDK reads them).
    let provider = SdkTracerProvider::builder().with_resource(resource).with_batch_exporter(exporter).build();
    let tracer = provider.tracer("coordinator");
    // Only the project's own spans: the exporter's transport (tonic, h2) and the database
    // driver would otherwise trace themselves, the exporter included.
    let ours = Targets::new()
        .with_target("coordinator", tracing::Level::INFO)
        .with_target("coordinator_worker", tracing::Level::INFO)
        .with_target("worker", tracing::Level::INFO);
    let otel = tracing_opentelemetry::layer().with_tracer(tracer).with_filter(ours);
    let (json, tty, writer) = log_output(cfg, false);
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(tty)
        .with_timer(ChronoUtc::new(TIMESTAMP.into()))
        .with_writer(writer);
    let fmt = if json {
        fmt.json().flatten_event(true).with_current_span(false).with_span_list(false).boxed()
    } else {
        fmt.boxed()
    };
    let installed =
        tracing_subscriber::registry().with(otel).with(fmt.with_filter(log_filter(cfg))).try_init().is_ok();
    if installed {
        *PROVIDER.lock().unwrap_or_else(|e| e.into_inner()) = Some(provider);
    }
    Ok(installed)
}

/// Exports the spans still buffered and stops export, waiting at most `timeout`. Does nothing
/// when export is off.
pub async fn shutdown(timeout: Duration) {
    let Some(provider) = PROVIDER.lock().unwrap_or_else(|e| e.into_inner()).take() else {
        return;
    };
    // The SDK blocks while it flushes; the exporter's connection runs on this runtime.
    let flushed = tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(timeout)).await;
    match flushed {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::warn!(%error, "trace export did not flush"),
        Err(error) => tracing::warn!(%error, "trace export did not flush"),
    }
}

/// The W3C `traceparent` codec, one for the coordinator and its workers.
pub use coordinator_worker::trace::{parse_traceparent, traceparent};

/// Makes the remote context `parent` the parent of `span` (no effect when export is off).
pub fn set_remote_parent(span: &tracing::Span, parent: SpanContext) {
    let _ = span.set_parent(Context::new().with_remote_span_context(parent));
}

/// The `traceparent` a submission stores on its tasks: the current span's context when export
/// is on (the call's span, itself a child of the submitter's context when one came), else the
/// submitter's header as given when it is well formed.
pub fn submission_traceparent(header: Option<&str>) -> Option<String> {
    traceparent(&tracing::Span::current())
        .or_else(|| header.filter(|h| parse_traceparent(h).is_some()).map(|h| h.trim().to_owned()))
}

fn log_filter(cfg: &LoggingConfig) -> EnvFilter {
    let from_env = std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty());
    if let Some(v) = &from_env {
        match crate::config::level_spec_error(v) {
            None => return EnvFilter::new(v),
            Some(e) => eprintln!("RUST_LOG ignored, logging.level used instead: {e}"),
        }
    }
    EnvFilter::try_new(&cfg.level).unwrap_or_else(|_| EnvFilter::new("info"))
}

fn log_output(
    cfg: &LoggingConfig,
    stderr: bool,
) -> (bool, bool, tracing_subscriber::fmt::writer::BoxMakeWriter) {
    let tty = if stderr { std::io::stderr().is_terminal() } else { std::io::stdout().is_terminal() };
    let json = match cfg.format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !tty,
    };
    let writer = tracing_subscriber::fmt::writer::BoxMakeWriter::new(move || -> Box<dyn std::io::Write> {
        if stderr {
            Box::new(PipeClosedIsQuiet(std::io::stderr()))
        } else {
            Box::new(PipeClosedIsQuiet(std::io::stdout()))
        }
    });
    (json, tty, writer)
}

/// A log stream whose reader went away (a closed pipe: a log collector restarted, `| head`)
/// takes the lines and drops them: the process goes on without its log. Left to the
/// formatter, the error is reported on stderr, and a process whose stderr is that same closed
/// pipe panicked doing so.
struct PipeClosedIsQuiet<W>(W);

impl<W: std::io::Write> std::io::Write for PipeClosedIsQuiet<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.0.write(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(buf.len()),
            other => other,
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self.0.flush() {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> =
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn export_is_off_unless_an_endpoint_is_set() {
        assert!(!export_wanted(env(&[])));
        assert!(!export_wanted(env(&[("OTEL_SERVICE_NAME", "x")])));
        assert!(export_wanted(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")])));
        assert!(export_wanted(env(&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://127.0.0.1:4317")])));
        assert!(!export_wanted(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317"),
            ("OTEL_SDK_DISABLED", "TRUE")
        ])));
        assert!(export_wanted(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317"),
            ("OTEL_SDK_DISABLED", "false")
        ])));
        assert!(!export_wanted(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")])));
    }

    #[test]
    fn without_export_a_submission_keeps_the_submitters_header() {
        let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(submission_traceparent(Some(header)).as_deref(), Some(header));
        assert_eq!(submission_traceparent(Some("nonsense")), None);
        assert_eq!(submission_traceparent(None), None);
    }
}
