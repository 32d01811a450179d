//! A tower layer around the gRPC server that runs every call in a `tracing` span named after
//! its method (`coordinator.CoordinatorService/SubmitTask`), with `grpc.method` and, when the
//! call ends, `rpc.grpc.status_code`. A `traceparent` in the request's metadata becomes the
//! span's remote parent, so the call joins the caller's trace when export is on. A stream's
//! span lasts until its body ends or the client goes away.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use http_body::{Body, Frame, SizeHint};
use tower::{Layer, Service};
use tracing::{Instrument as _, Span, field::Empty};

use crate::telemetry;

#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcTraceLayer;

impl<S> Layer<S> for GrpcTraceLayer {
    type Service = GrpcTrace<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcTrace { inner }
    }
}

#[derive(Debug, Clone)]
pub struct GrpcTrace<S> {
    inner: S,
}

impl<S, ReqBody> Service<http::Request<ReqBody>> for GrpcTrace<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let span = call_span(req.uri().path());
        if let Some(parent) = req
            .headers()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(telemetry::parse_traceparent)
        {
            telemetry::set_remote_parent(&span, parent);
        }
        let fut = span.in_scope(|| self.inner.call(req));
        Box::pin(async move {
            let resp = fut.instrument(span.clone()).await?;
            if let Some(code) = resp.headers().get("grpc-status") {
                // Trailers-only response: the call ended here.
                record_code(&span, code.as_bytes());
                return Ok(resp);
            }
            let (parts, body) = resp.into_parts();
            let body = TracedBody { inner: body, span };
            Ok(http::Response::from_parts(parts, tonic::body::Body::new(body)))
        })
    }
}

/// The span of one call: `/package.Service/Method` names it (without the leading slash).
fn call_span(path: &str) -> Span {
    let name = path.trim_start_matches('/');
    let method = name.rsplit('/').next().unwrap_or_default();
    tracing::info_span!(
        "grpc",
        otel.name = name,
        otel.kind = "server",
        rpc.system = "grpc",
        grpc.method = method,
        rpc.grpc.status_code = Empty,
    )
}

fn record_code(span: &Span, code: &[u8]) {
    let code = std::str::from_utf8(code).ok().and_then(|c| c.parse::<i64>().ok()).unwrap_or(2);
    span.record("rpc.grpc.status_code", code);
}

/// A response body that records the call's status code on its span from the trailers, and
/// keeps the span open until the body ends.
struct TracedBody {
    inner: tonic::body::Body,
    span: Span,
}

impl Body for TracedBody {
    type Data = <tonic::body::Body as Body>::Data;
    type Error = <tonic::body::Body as Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = this.span.in_scope(|| Pin::new(&mut this.inner).poll_frame(cx));
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(code) = frame.trailers_ref().and_then(|t| t.get("grpc-status"))
        {
            record_code(&this.span, code.as_bytes());
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_span_is_named_after_its_method() {
        let span = call_span("/coordinator.CoordinatorService/SubmitTask");
        // No subscriber here: the span is disabled, and building it must not panic.
        assert!(span.is_disabled());
    }
}
