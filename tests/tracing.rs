//! One trace from the submitter through the coordinator into the worker and back, exported over
//! OTLP to a receiver this test runs: real `coordinator` and `worker` processes with the
//! standard `OTEL_*` variables, a task submitted with a `traceparent` the test made up, and the
//! spans of that trace read back from the receiver with their parent links.

#[macro_use]
mod common;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::*;
use coordinator::proto;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value::Value,
    trace::v1::Span,
};
use tokio_stream::wrappers::TcpListenerStream;

/// A span as received, with the `service.name` of the process that sent it.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    span: Span,
}

/// An OTLP/gRPC trace receiver that keeps every span it is sent.
#[derive(Debug, Clone, Default)]
struct Receiver {
    /// Written by the export calls, read by the test.
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                .map(|v| match v {
                    Value::StringValue(s) => s.clone(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                spans.extend(ss.spans.into_iter().map(|span| Received { service: service.clone(), span }));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

impl Receiver {
    fn of_trace(&self, trace_id: &[u8]) -> Vec<Received> {
        self.spans.lock().unwrap().iter().filter(|r| r.span.trace_id == trace_id).cloned().collect()
    }
}

/// A child process killed when the test ends, whatever happens.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(bin: &str, args: &[&str], otlp: &str, log: &Path) -> Proc {
    let file = std::fs::File::create(log).unwrap();
    let child = Command::new(bin)
        .args(args)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", otlp)
        // Export each batch after 100 ms, so the spans arrive while the test waits.
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env_remove("OTEL_SERVICE_NAME")
        .env_remove("OTEL_SDK_DISABLED")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .env_remove("OTEL_TRACES_SAMPLER")
        .env("RUST_LOG", "info,sqlx=warn")
        .stdout(Stdio::from(file.try_clone().unwrap()))
        .stderr(Stdio::from(file))
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {bin}: {e}"));
    Proc { child, log: log.to_owned() }
}

async fn wait_log(p: &Proc, needle: &str) {
    let limit = Duration::from_secs(30);
    let start = Instant::now();
    while !p.log_text().contains(needle) {
        assert!(start.elapsed() < limit, "no {needle:?} within {limit:?}; log:\n{}", p.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn find<'a>(spans: &'a [Received], service: &str, name: &str) -> Option<&'a Span> {
    spans.iter().find(|r| r.service == service && r.span.name == name).map(|r| &r.span)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_runs_from_the_submitter_through_the_coordinator_and_the_worker() {
    // The OTLP receiver.
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );

    // A coordinator on SQLite and one worker, both exporting to it.
    let dir = tempfile::tempdir().unwrap();
    let [grpc, http] = common::free_ports();
    let config = dir.path().join("coordinator.yaml");
    std::fs::write(
        &config,
        format!(
            "coordinator:
  id: traced
  bind_address: 127.0.0.1
  grpc_port: {grpc}
  http_port: {http}
  poll_interval: 200ms
database:
  url: {:?}
logging:
  format: json
auth:
  enabled: false
",
            format!("sqlite://{}", dir.path().join("coordinator.db").display())
        ),
    )
    .unwrap();
    let coordinator = spawn(
        env!("CARGO_BIN_EXE_coordinator"),
        &["-config", config.to_str().unwrap()],
        &otlp,
        &dir.path().join("coordinator.log"),
    );
    wait_log(&coordinator, "coordinator ready").await;
    let endpoint = format!("http://127.0.0.1:{grpc}");
    let worker = spawn(
        env!("CARGO_BIN_EXE_worker"),
        &["--coordinator", &endpoint, "--worker-id", "traced-worker", "--handlers", "echo"],
        &otlp,
        &dir.path().join("worker.log"),
    );
    wait_log(&worker, "task stream open").await;

    // The submitter: a trace and a span of its own, sent as `traceparent` metadata.
    // Random ids with a non-zero first byte: all-zero ids are invalid.
    let mut trace_id: [u8; 16] = rand::random();
    let mut submitter_span: [u8; 8] = rand::random();
    trace_id[0] |= 1;
    submitter_span[0] |= 1;
    let traceparent = format!("00-{}-{}-01", hex(&trace_id), hex(&submitter_span));
    let mut client = client(&endpoint).await;
    let mut request = tonic::Request::new(proto::SubmitTaskRequest {
        task_type: "echo".into(),
        payload: b"traced".to_vec(),
        ..Default::default()
    });
    request.metadata_mut().insert("traceparent", traceparent.parse().unwrap());
    let task_id = client.submit_task(request).await.expect("submit").into_inner().task_id;
    wait_until("the task completes", Duration::from_secs(30), || {
        let mut client = client.clone();
        let task_id = task_id.clone();
        async move { get_task(&mut client, &task_id).await.status == proto::TaskStatus::Completed as i32 }
    })
    .await;

    // Every hop's span arrives, in the submitter's trace.
    let submit_name = "coordinator.CoordinatorService/SubmitTask";
    let report_name = "coordinator.CoordinatorService/ReportCompletion";
    let start = Instant::now();
    let spans = loop {
        let spans = receiver.of_trace(&trace_id);
        let have = |service: &str, name: &str| find(&spans, service, name).is_some();
        if have("coordinator", submit_name)
            && have("coordinator", "create_tasks")
            && have("worker", "handle_task")
            && have("worker", "report_task")
            && have("coordinator", report_name)
        {
            break spans;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the trace is incomplete after 30 s; spans of the trace: {:?}\nall spans: {:?}\ncoordinator log:\n{}\nworker log:\n{}",
            spans.iter().map(|r| (&r.service, &r.span.name)).collect::<Vec<_>>(),
            receiver
                .spans
                .lock()
                .unwrap()
                .iter()
                .map(|r| (r.service.clone(), r.span.name.clone()))
                .collect::<Vec<_>>(),
            coordinator.log_text(),
            worker.log_text(),
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // Parent links chain: submitter -> SubmitTask -> (create_tasks, handle_task) ->
    // report_task -> ReportCompletion.
    let submit = find(&spans, "coordinator", submit_name).unwrap();
    assert_eq!(submit.parent_span_id, submitter_span, "SubmitTask continues the submitter's span");
    let store = spans.iter().find(|r| {
        r.service == "coordinator" && r.span.name == "create_tasks" && r.span.parent_span_id == submit.span_id
    });
    assert!(store.is_some(), "the store call is a child of the SubmitTask call");
    let handler = find(&spans, "worker", "handle_task").unwrap();
    assert_eq!(
        handler.parent_span_id, submit.span_id,
        "the handler continues the context stored on the task"
    );
    let report = find(&spans, "worker", "report_task").unwrap();
    assert_eq!(report.parent_span_id, handler.span_id, "the report is sent from within the handler's span");
    let reported = find(&spans, "coordinator", report_name).unwrap();
    assert_eq!(
        reported.parent_span_id, report.span_id,
        "ReportCompletion continues the worker's report span"
    );

    // Results reported together: each entry's span continues the context the entry carries.
    let mut raw = RawWorker::connect(&endpoint, "traced-raw", 2, &["traced-raw"]).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        common::submit(&mut client, "traced-raw", b"").await;
        let a = raw.next(Duration::from_secs(10)).await;
        held.push((a.task_id, a.attempt));
    }
    let mut reports: Vec<([u8; 16], [u8; 8])> = Vec::new();
    let completions = held
        .iter()
        .map(|(task_id, attempt)| {
            let (mut trace, mut span): ([u8; 16], [u8; 8]) = (rand::random(), rand::random());
            (trace[0], span[0]) = (trace[0] | 1, span[0] | 1);
            reports.push((trace, span));
            proto::CompletionEntry {
                task_id: task_id.clone(),
                attempt: *attempt,
                traceparent: format!("00-{}-{}-01", hex(&trace), hex(&span)),
                ..Default::default()
            }
        })
        .collect();
    let verdicts = raw
        .client
        .report_completions(proto::ReportCompletionsRequest { worker_id: raw.id.clone(), completions })
        .await
        .unwrap()
        .into_inner()
        .verdicts;
    assert!(verdicts.iter().all(|v| v.code == 0), "{verdicts:?}");
    for (trace, span) in &reports {
        wait_until("the entry's span arrives in its own trace", Duration::from_secs(30), || async {
            let spans = receiver.of_trace(trace);
            find(&spans, "coordinator", "report_completion").is_some_and(|s| s.parent_span_id == span)
        })
        .await;
    }

    drop(worker);
    drop(coordinator);
    server.abort();
}

/// A submission's `traceparent` (gRPC metadata or HTTP header) travels with the task's
/// assignment; with trace export off it is passed on as given, and a malformed one is dropped.
async fn the_submitters_traceparent_rides_with_every_assignment(db: &TestDb) {
    let c = TestCoordinator::start(db, |_| {}).await;
    let mut client = c.client().await;
    let mut worker = RawWorker::connect(&c.endpoint(), "tp-worker", 10, &["echo"]).await;
    let grpc_tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let rest_tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    let mut request =
        tonic::Request::new(proto::SubmitTaskRequest { task_type: "echo".into(), ..Default::default() });
    request.metadata_mut().insert("traceparent", grpc_tp.parse().unwrap());
    let by_grpc = client.submit_task(request).await.expect("submit").into_inner().task_id;
    let a = worker.next(Duration::from_secs(10)).await;
    assert_eq!((a.task_id.as_str(), a.traceparent.as_str()), (by_grpc.as_str(), grpc_tp));

    let mut request =
        tonic::Request::new(proto::SubmitTaskRequest { task_type: "echo".into(), ..Default::default() });
    request.metadata_mut().insert("traceparent", "00-not-a-trace-context".parse().unwrap());
    let malformed = client.submit_task(request).await.expect("submit").into_inner().task_id;
    let a = worker.next(Duration::from_secs(10)).await;
    assert_eq!(
        (a.task_id.as_str(), a.traceparent.as_str()),
        (malformed.as_str(), ""),
        "a malformed one is ignored"
    );

    let (code, body) =
        post_with_traceparent(c.http, "/api/v1/tasks", r#"{"task_type":"echo"}"#, rest_tp).await;
    assert_eq!(code, 201, "{body}");
    let by_rest =
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["task_id"].as_str().unwrap().to_owned();
    let a = worker.next(Duration::from_secs(10)).await;
    assert_eq!((a.task_id.as_str(), a.traceparent.as_str()), (by_rest.as_str(), rest_tp));

    let job = r#"{"name":"traced","tasks":[{"task_type":"echo"},{"task_type":"echo"}]}"#;
    let (code, body) = post_with_traceparent(c.http, "/api/v1/jobs", job, rest_tp).await;
    assert_eq!(code, 201, "{body}");
    for _ in 0..2 {
        let a = worker.next(Duration::from_secs(10)).await;
        assert_eq!(a.traceparent, rest_tp, "every task of a job carries it");
    }
    c.stop().await.unwrap();
}
on_every_backend!(the_submitters_traceparent_rides_with_every_assignment);

/// A JSON POST with a `traceparent` header over a fresh HTTP/1.1 connection: (status, body).
async fn post_with_traceparent(
    addr: std::net::SocketAddr,
    path: &str,
    body: &str,
    tp: &str,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\ntraceparent: {tp}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("answer in time")
        .unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default())
}
