//! A tower layer around the gRPC server that records `grpc_server_handled_total{grpc_method,
//! grpc_code}` and `grpc_server_handling_seconds{grpc_method}` for every call, streams included:
//! the code is read from the trailers when the response body ends (or from the headers of a
//! trailers-only error), and a stream the client dropped counts as `Canceled`.

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Instant,
};

use http_body::{Body, Frame, SizeHint};
use tower::{Layer, Service};

use crate::metrics;

#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcMetricsLayer;

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics { inner }
    }
}

#[derive(Debug, Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
}

impl<S, ReqBody> Service<http::Request<ReqBody>> for GrpcMetrics<S>
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
        let method = method_name(req.uri().path());
        let start = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            if let Some(code) = resp.headers().get("grpc-status") {
                // Trailers-only response: the call ended here.
                metrics::grpc_call(method, code_name(code.as_bytes()), start.elapsed());
                return Ok(resp);
            }
            let (parts, body) = resp.into_parts();
            let body = MeteredBody { inner: body, method, start, done: false };
            Ok(http::Response::from_parts(parts, tonic::body::Body::new(body)))
        })
    }
}

struct MeteredBody {
    inner: tonic::body::Body,
    method: &'static str,
    start: Instant,
    done: bool,
}

impl MeteredBody {
    fn record(&mut self, code: &'static str) {
        if !self.done {
            self.done = true;
            metrics::grpc_call(self.method, code, self.start.elapsed());
        }
    }
}

impl Body for MeteredBody {
    type Data = <tonic::body::Body as Body>::Data;
    type Error = <tonic::body::Body as Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    let code =
                        trailers.get("grpc-status").map(|v| code_name(v.as_bytes())).unwrap_or("Unknown");
                    self.record(code);
                }
            }
            Poll::Ready(Some(Err(_))) => self.record("Internal"),
            Poll::Ready(None) => self.record("OK"),
            Poll::Pending => {}
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

impl Drop for MeteredBody {
    fn drop(&mut self) {
        // The client went away before the call ended.
        self.record("Canceled");
    }
}

const METHODS: &[&str] = &[
    "RegisterWorker",
    "SendHeartbeat",
    "ReceiveTasks",
    "ReportCompletion",
    "ReportFailure",
    "Deregister",
    "SubmitTask",
    "SubmitTasks",
    "GetTask",
    "ListTasks",
    "CancelTask",
    "WatchTask",
    "SubmitJob",
    "GetJob",
    "ListWorkers",
    "GetWorkerStats",
    "Check",
    "Watch",
    "ServerReflectionInfo",
];

/// The method part of `/package.Service/Method`, from a fixed list so label values stay bounded.
fn method_name(path: &str) -> &'static str {
    let name = path.rsplit('/').next().unwrap_or_default();
    METHODS.iter().find(|m| **m == name).copied().unwrap_or("unknown")
}

fn code_name(v: &[u8]) -> &'static str {
    match v {
        b"0" => "OK",
        b"1" => "Canceled",
        b"2" => "Unknown",
        b"3" => "InvalidArgument",
        b"4" => "DeadlineExceeded",
        b"5" => "NotFound",
        b"6" => "AlreadyExists",
        b"7" => "PermissionDenied",
        b"8" => "ResourceExhausted",
        b"9" => "FailedPrecondition",
        b"10" => "Aborted",
        b"11" => "OutOfRange",
        b"12" => "Unimplemented",
        b"13" => "Internal",
        b"14" => "Unavailable",
        b"15" => "DataLoss",
        b"16" => "Unauthenticated",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_names_are_bounded() {
        assert_eq!(method_name("/coordinator.CoordinatorService/SubmitTask"), "SubmitTask");
        assert_eq!(method_name("/grpc.health.v1.Health/Check"), "Check");
        assert_eq!(method_name("/evil/$(random)"), "unknown");
    }

    #[test]
    fn codes_have_names() {
        assert_eq!(code_name(b"0"), "OK");
        assert_eq!(code_name(b"9"), "FailedPrecondition");
        assert_eq!(code_name(b"x"), "Unknown");
    }
}
