//! A tower layer around the gRPC server that records, in the go-grpc-middleware shape,
//! `grpc_server_started_total`, `grpc_server_handled_total` (with `grpc_code`) and
//! `grpc_server_handling_seconds`, labelled `grpc_service`, `grpc_method` and `grpc_type`, for
//! every call, streams included: the code is read from the trailers when the response body ends
//! (or from the headers of a trailers-only error), and a stream the client dropped counts as
//! `Canceled`. A stream's handling time is its whole life, so latency queries leave streams out
//! by `grpc_type="unary"`.

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Instant,
};

use http_body::{Body, Frame, SizeHint};
use tower::{Layer, Service};

use crate::metrics::{self, GrpcMethod};

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
        let method = method_of(req.uri().path());
        metrics::grpc_started(method);
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
    method: GrpcMethod,
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

const UNARY: &str = "unary";
const SERVER_STREAM: &str = "server_stream";
const BIDI_STREAM: &str = "bidi_stream";

const COORDINATOR: &str = "coordinator.CoordinatorService";
const HEALTH: &str = "grpc.health.v1.Health";
const REFLECTION_V1: &str = "grpc.reflection.v1.ServerReflection";
const REFLECTION_V1ALPHA: &str = "grpc.reflection.v1alpha.ServerReflection";

/// Every method served, with its service and kind (as the proto files declare them).
const METHODS: &[(&str, &str, &str)] = &[
    (COORDINATOR, "RegisterWorker", UNARY),
    (COORDINATOR, "SendHeartbeat", UNARY),
    (COORDINATOR, "ReceiveTasks", SERVER_STREAM),
    (COORDINATOR, "ReportCompletion", UNARY),
    (COORDINATOR, "ReportFailure", UNARY),
    (COORDINATOR, "ReportCompletions", UNARY),
    (COORDINATOR, "Deregister", UNARY),
    (COORDINATOR, "SubmitTask", UNARY),
    (COORDINATOR, "SubmitTasks", UNARY),
    (COORDINATOR, "GetTask", UNARY),
    (COORDINATOR, "ListTasks", UNARY),
    (COORDINATOR, "CancelTask", UNARY),
    (COORDINATOR, "WatchTask", SERVER_STREAM),
    (COORDINATOR, "SubmitJob", UNARY),
    (COORDINATOR, "GetJob", UNARY),
    (COORDINATOR, "ListWorkers", UNARY),
    (COORDINATOR, "GetWorkerStats", UNARY),
    (COORDINATOR, "RetryTask", UNARY),
    (COORDINATOR, "RetryTasks", UNARY),
    (COORDINATOR, "ListJobs", UNARY),
    (COORDINATOR, "CancelJob", UNARY),
    (COORDINATOR, "WatchJob", SERVER_STREAM),
    (COORDINATOR, "GetFailureSummary", UNARY),
    (COORDINATOR, "CreateSchedule", UNARY),
    (COORDINATOR, "ListSchedules", UNARY),
    (COORDINATOR, "PauseSchedule", UNARY),
    (COORDINATOR, "DeleteSchedule", UNARY),
    (COORDINATOR, "SetTypeLimit", UNARY),
    (COORDINATOR, "ListTypeLimits", UNARY),
    (HEALTH, "Check", UNARY),
    (HEALTH, "Watch", SERVER_STREAM),
    (REFLECTION_V1, "ServerReflectionInfo", BIDI_STREAM),
    (REFLECTION_V1ALPHA, "ServerReflectionInfo", BIDI_STREAM),
];

/// The method of `/package.Service/Method`, from [`METHODS`] so label values stay bounded: any
/// other path is `unknown` (its kind too).
fn method_of(path: &str) -> GrpcMethod {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let (service, method) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    METHODS
        .iter()
        .find(|(s, m, _)| *s == service && *m == method)
        .map(|&(service, method, kind)| GrpcMethod { service, method, kind })
        .unwrap_or(GrpcMethod { service: "unknown", method: "unknown", kind: "unknown" })
}

fn code_name(v: &[u8]) -> &'static str {
    std::str::from_utf8(v).ok().and_then(|s| s.parse().ok()).map_or("Unknown", code_label)
}

/// A gRPC status code as the `grpc_code` label names it.
pub fn code_label(code: i32) -> &'static str {
    match code {
        0 => "OK",
        1 => "Canceled",
        2 => "Unknown",
        3 => "InvalidArgument",
        4 => "DeadlineExceeded",
        5 => "NotFound",
        6 => "AlreadyExists",
        7 => "PermissionDenied",
        8 => "ResourceExhausted",
        9 => "FailedPrecondition",
        10 => "Aborted",
        11 => "OutOfRange",
        12 => "Unimplemented",
        13 => "Internal",
        14 => "Unavailable",
        15 => "DataLoss",
        16 => "Unauthenticated",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_are_named_with_their_service_and_kind() {
        let m = method_of("/coordinator.CoordinatorService/SubmitTask");
        assert_eq!(m, GrpcMethod { service: COORDINATOR, method: "SubmitTask", kind: "unary" });
        assert_eq!(method_of("/coordinator.CoordinatorService/ReceiveTasks").kind, "server_stream");
        assert_eq!(method_of("/coordinator.CoordinatorService/WatchTask").kind, "server_stream");
        assert_eq!(method_of("/grpc.health.v1.Health/Check").kind, "unary");
        assert_eq!(method_of("/grpc.health.v1.Health/Watch").kind, "server_stream");
        let r = method_of("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo");
        assert_eq!((r.service, r.kind), (REFLECTION_V1ALPHA, "bidi_stream"));
    }

    #[test]
    fn unknown_paths_are_one_bounded_label_set() {
        let unknown = GrpcMethod { service: "unknown", method: "unknown", kind: "unknown" };
        assert_eq!(method_of("/evil/$(random)"), unknown);
        assert_eq!(method_of("/grpc.health.v1.Health/SubmitTask"), unknown);
        assert_eq!(method_of(""), unknown);
    }

    /// Every RPC of the proto file is in the table, with the kind the proto declares (a new RPC
    /// missing from it would be counted as `unknown`).
    #[test]
    fn the_table_matches_the_proto_file() {
        let proto = include_str!("../../proto/coordinator.proto");
        let mut n = 0;
        for line in proto.lines().map(str::trim).filter(|l| l.starts_with("rpc ")) {
            let name = line["rpc ".len()..].split('(').next().unwrap().trim();
            let streams = line.split("returns").nth(1).unwrap().contains("stream ");
            let m = method_of(&format!("/{COORDINATOR}/{name}"));
            assert_eq!(m.method, name, "{line}");
            assert_eq!(m.kind, if streams { "server_stream" } else { "unary" }, "{line}");
            n += 1;
        }
        assert!(n >= 16, "{n} RPCs read from the proto file");
    }

    #[test]
    fn codes_have_names() {
        assert_eq!(code_name(b"0"), "OK");
        assert_eq!(code_name(b"9"), "FailedPrecondition");
        assert_eq!(code_name(b"x"), "Unknown");
    }
}
