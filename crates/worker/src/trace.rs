//! Trace context around a task. Each task runs in a `handle_task` span and is reported from a
//! `report_task` span under it. With the `otel` feature, the assignment's W3C `traceparent` is
//! the handler span's remote parent and each report carries the report span's `traceparent` as
//! gRPC metadata, so the coordinator's trace runs on through the worker and back. The
//! process that links the SDK installs the OpenTelemetry subscriber; without one (or without
//! the feature) the spans are plain `tracing` spans and no context travels.

use tracing::Span;

/// Makes the context in `traceparent` (empty: none) the parent of `span`.
pub(crate) fn continue_from(span: &Span, traceparent: &str) {
    #[cfg(feature = "otel")]
    if let Some(parent) = parse_traceparent(traceparent) {
        use opentelemetry::trace::TraceContextExt as _;
        use tracing_opentelemetry::OpenTelemetrySpanExt as _;
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(parent));
    }
    #[cfg(not(feature = "otel"))]
    let _ = (span, traceparent);
}

/// `message` as a request that carries `span`'s context in a `traceparent` header.
pub(crate) fn request<T>(span: &Span, message: T) -> tonic::Request<T> {
    #[allow(unused_mut)]
    let mut request = tonic::Request::new(message);
    #[cfg(feature = "otel")]
    if let Some(value) = traceparent(span).and_then(|v| v.parse().ok()) {
        request.metadata_mut().insert("traceparent", value);
    }
    #[cfg(not(feature = "otel"))]
    let _ = span;
    request
}

/// `span`'s context as a W3C `traceparent` value, or empty when it has none to send.
pub(crate) fn context_of(span: &Span) -> String {
    #[cfg(feature = "otel")]
    return traceparent(span).unwrap_or_default();
    #[cfg(not(feature = "otel"))]
    {
        let _ = span;
        String::new()
    }
}

#[cfg(feature = "otel")]
pub use otel::{parse_traceparent, traceparent};

#[cfg(feature = "otel")]
mod otel {
    use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState};
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;

    /// A W3C `traceparent` value as a remote span context; `None` when it is malformed or
    /// empty (the specification says to ignore it then).
    pub fn parse_traceparent(value: &str) -> Option<SpanContext> {
        let mut parts = value.trim().split('-');
        let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, n: usize| {
            s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if !hex(version, 2) || version == "ff" || !hex(trace, 32) || !hex(span, 16) || !hex(flags, 2) {
            return None;
        }
        if version == "00" && parts.next().is_some() {
            return None;
        }
        let flags = u8::from_str_radix(flags, 16).ok()?;
        let sc = SpanContext::new(
            TraceId::from_hex(trace).ok()?,
            SpanId::from_hex(span).ok()?,
            TraceFlags::new(flags & 1),
            true,
            TraceState::default(),
        );
        sc.is_valid().then_some(sc)
    }

    /// The W3C `traceparent` of `span` (`00-<trace id>-<span id>-<flags>`), when it has a valid
    /// OpenTelemetry context (a subscriber exports).
    pub fn traceparent(span: &tracing::Span) -> Option<String> {
        let cx = span.context();
        let sc = cx.span().span_context().clone();
        sc.is_valid()
            .then(|| format!("00-{}-{}-{:02x}", sc.trace_id(), sc.span_id(), sc.trace_flags().to_u8()))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn traceparents_parse_as_w3c_says() {
            let sc = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
            assert_eq!(sc.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
            assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
            assert!(sc.is_sampled());
            for bad in [
                "",
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ] {
                assert!(parse_traceparent(bad).is_none(), "{bad:?} was accepted");
            }
        }

        #[test]
        fn a_span_without_a_subscriber_has_no_context_to_send() {
            assert_eq!(traceparent(&tracing::Span::none()), None);
        }
    }
}
