//! Security and hardening over real connections on loopback: TLS and mTLS (certificates made
//! here with rcgen), certificate rotation under an open task stream, the auth matrix on every
//! gRPC method and REST route, message limits, bad input, slow HTTP clients and connection
//! ageing. Auth and TLS do not depend on the backend, so these run on SQLite.

mod common;

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use common::*;
use coordinator::{
    auth::{Role, sha256_hex},
    config::{ByteSize, Config, TokenConfig},
    proto,
};
use coordinator_worker::{
    Worker, WorkerOptions,
    client::{self, Client, ClientSecurity},
    handler_fn,
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tonic::{Code, metadata::MetadataValue};

// ---- certificates ----

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        let cert = p.self_signed(&key).unwrap();
        Ca { pem: cert.pem(), issuer: Issuer::new(p, key) }
    }

    /// A leaf certificate and key (PEM): a server one for 127.0.0.1, or a client one named `cn`.
    fn leaf(&self, cn: &str, server: bool) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut p =
            CertificateParams::new(if server { vec!["localhost".to_owned()] } else { vec![] }).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        if server {
            p.subject_alt_names.push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        } else {
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// PEM files in a temp dir.
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Files {
        Files { dir: tempfile::tempdir().unwrap() }
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        // Write then rename, as cert-manager and kubelet do: readers never see half a file.
        let tmp = self.dir.path().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}

fn tls_on(cfg: &mut Config, files: &Files, client_ca: Option<&str>) {
    cfg.tls.enabled = true;
    cfg.tls.cert_file = files.path("server.pem");
    cfg.tls.key_file = files.path("server.key");
    cfg.tls.reload_interval = Duration::from_millis(200);
    if let Some(ca) = client_ca {
        cfg.tls.client_ca_file = files.path(ca);
        cfg.tls.require_client_cert = true;
    }
}

fn https(c: &TestCoordinator) -> String {
    format!("https://{}", c.grpc)
}

fn security(ca: Option<&Path>, client_cert: Option<(&Path, &Path)>) -> ClientSecurity {
    ClientSecurity {
        ca_file: ca.map(Path::to_owned),
        cert_file: client_cert.map(|c| c.0.to_owned()),
        key_file: client_cert.map(|c| c.1.to_owned()),
        ..ClientSecurity::default()
    }
}

/// coordctl against `url`, trusting `ca` (with `--ca-file`), run to its end.
async fn coordctl_with_ca(url: &str, ca: Option<&Path>, args: &[&str]) -> std::process::Output {
    let mut cmd = std::process::Command::new(common::coordctl_bin());
    cmd.args(["--coordinator", url]);
    if let Some(ca) = ca {
        cmd.arg("--ca-file").arg(ca);
    }
    cmd.args(args);
    tokio::task::spawn_blocking(move || cmd.output().unwrap()).await.unwrap()
}

/// One cheap call on a fresh connection: its code (`Ok` as `Code::Ok`).
async fn probe(url: &str, sec: &ClientSecurity) -> Code {
    let mut c = match client::connect(url, sec, client::DEFAULT_MAX_MESSAGE).await {
        Ok(c) => c,
        Err(_) => return Code::Unavailable,
    };
    match tokio::time::timeout(Duration::from_secs(10), c.list_tasks(proto::ListTasksRequest::default()))
        .await
    {
        Ok(Ok(_)) => Code::Ok,
        Ok(Err(s)) => s.code(),
        Err(_) => Code::DeadlineExceeded,
    }
}

fn echo_worker(endpoint: String, id: &str, sec: ClientSecurity) -> Worker {
    let mut o = WorkerOptions::new(endpoint, id);
    o.max_concurrent = 2;
    o.capabilities = vec!["echo".into()];
    o.backoff_base = Duration::from_millis(50);
    o.backoff_max = Duration::from_millis(300);
    o.security = sec;
    Worker::new(o, handler_fn(|ctx| async move { Ok(ctx.payload) })).unwrap()
}

/// Registers `id` (echo tasks, `max` slots) on `c` and opens its task stream there.
async fn open_stream(c: &mut Client, id: &str, max: u32) -> tonic::Streaming<proto::TaskAssignment> {
    c.register_worker(proto::RegisterWorkerRequest {
        worker_id: id.into(),
        max_concurrent_tasks: max,
        capabilities: vec!["echo".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    c.receive_tasks(proto::ReceiveTasksRequest { worker_id: id.into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
}

// ---- TLS ----

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_refuses_plaintext_and_unknown_cas_and_serves_worker_and_coordctl() {
    let db = TestDb::sqlite().await;
    let (ca, other_ca) = (Ca::new("fleet ca"), Ca::new("another ca"));
    let files = Files::new();
    let (cert, key) = ca.leaf("coordinator", true);
    files.write("server.pem", &cert);
    files.write("server.key", &key);
    let ca_file = files.write("ca.pem", &ca.pem);
    let other_file = files.write("other.pem", &other_ca.pem);
    let c = TestCoordinator::start(&db, |cfg| tls_on(cfg, &files, None)).await;

    assert_ne!(probe(&format!("http://{}", c.grpc), &ClientSecurity::default()).await, Code::Ok, "plaintext");
    assert_ne!(probe(&https(&c), &security(Some(&other_file), None)).await, Code::Ok, "another CA");
    assert_eq!(probe(&https(&c), &security(Some(&ca_file), None)).await, Code::Ok);

    // The worker library and coordctl, both verifying the server with the CA.
    let stop = CancellationToken::new();
    let worker = echo_worker(https(&c), "tls-worker", security(Some(&ca_file), None));
    let run = tokio::spawn(worker.run(stop.clone()));
    let out = coordctl_with_ca(
        &https(&c),
        Some(&ca_file),
        &["submit", "--type", "echo", "--payload", "over tls", "--wait"],
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "coordctl: {stdout} {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("over tls"), "{stdout}");
    // A plaintext URL to the TLS port, and a TLS URL to a plaintext server: the line says so.
    let out = coordctl_with_ca(&format!("http://{}", c.grpc), None, &["tasks"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("use an https:// URL"), "{stderr}");
    let plain_db = TestDb::sqlite().await;
    let plain = TestCoordinator::start(&plain_db, |_| {}).await;
    let out = coordctl_with_ca(&https(&plain), Some(&ca_file), &["tasks"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("does not speak TLS"), "{stderr}");
    plain.stop().await.unwrap();
    plain_db.cleanup().await;
    // Without the CA, coordctl refuses the server's certificate.
    let out = coordctl_with_ca(&https(&c), Some(&other_file), &["tasks"]).await;
    assert!(!out.status.success());
    // The worker binary with --ca-file connects and opens its task stream.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_worker"))
        .args([
            "--coordinator",
            &https(&c),
            "--worker-id",
            "tls-worker-bin",
            "--handlers",
            "echo",
            "--ca-file",
        ])
        .arg(&ca_file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let client = client::connect(&https(&c), &security(Some(&ca_file), None), client::DEFAULT_MAX_MESSAGE)
        .await
        .unwrap();
    wait_connected(&client, &["tls-worker-bin"]).await;
    let _ = child.kill();
    let _ = child.wait();
    stop.cancel();
    run.await.unwrap().unwrap();
    c.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mtls_refuses_no_certificate_and_one_worker_acting_for_another() {
    let db = TestDb::sqlite().await;
    let ca = Ca::new("fleet ca");
    let files = Files::new();
    let (cert, key) = ca.leaf("coordinator", true);
    files.write("server.pem", &cert);
    files.write("server.key", &key);
    let ca_file = files.write("ca.pem", &ca.pem);
    let (a_cert, a_key) = ca.leaf("worker-a", false);
    let a = (files.write("a.pem", &a_cert), files.write("a.key", &a_key));
    let c = TestCoordinator::start(&db, |cfg| tls_on(cfg, &files, Some("ca.pem"))).await;

    assert_ne!(probe(&https(&c), &security(Some(&ca_file), None)).await, Code::Ok, "no client certificate");
    // coordctl without a client certificate: exit 1 with a line on stderr every time, never a
    // silent death by SIGPIPE from a write to the socket the server closed.
    for _ in 0..6 {
        let out = coordctl_with_ca(&https(&c), Some(&ca_file), &["workers"]).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{:?}: {stderr}", out.status);
        assert!(stderr.starts_with("coordctl: ") && stderr.lines().count() == 1, "{stderr}");
        assert!(stderr.contains("--cert-file and --key-file"), "says what is missing: {stderr}");
    }
    let sec = security(Some(&ca_file), Some((&a.0, &a.1)));
    let mut w = client::connect(&https(&c), &sec, client::DEFAULT_MAX_MESSAGE).await.unwrap();
    let register = |id: &str| proto::RegisterWorkerRequest {
        worker_id: id.into(),
        max_concurrent_tasks: 1,
        capabilities: vec!["echo".into()],
        ..Default::default()
    };
    let mut stream = open_stream(&mut w, "worker-a", 1).await;
    let id = submit(&mut w, "echo", b"x").await;
    let assignment =
        tokio::time::timeout(Duration::from_secs(10), stream.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(assignment.task_id, id);

    // worker-a's certificate speaking for worker-b: refused, and nothing changes.
    let b = "worker-b".to_owned();
    let codes = [
        w.register_worker(register(&b)).await.map(|_| ()),
        w.send_heartbeat(proto::HeartbeatRequest { worker_id: b.clone(), ..Default::default() })
            .await
            .map(|_| ()),
        w.receive_tasks(proto::ReceiveTasksRequest { worker_id: b.clone(), ..Default::default() })
            .await
            .map(|_| ()),
        w.report_completion(proto::ReportCompletionRequest {
            worker_id: b.clone(),
            task_id: id.clone(),
            attempt: assignment.attempt,
            result: b"stolen".to_vec(),
            held_ms: 0,
        })
        .await
        .map(|_| ()),
        w.report_completions(proto::ReportCompletionsRequest {
            worker_id: b.clone(),
            completions: vec![proto::CompletionEntry {
                task_id: id.clone(),
                attempt: assignment.attempt,
                result: b"stolen".to_vec(),
                ..Default::default()
            }],
        })
        .await
        .map(|_| ()),
        w.report_failure(proto::ReportFailureRequest {
            worker_id: b.clone(),
            task_id: id.clone(),
            attempt: assignment.attempt,
            error: "x".into(),
            retriable: false,
            release: false,
            held_ms: 0,
        })
        .await
        .map(|_| ()),
        w.deregister(proto::DeregisterRequest {
            worker_id: "worker-a-2".into(),
            reason: String::new(),
            ..Default::default()
        })
        .await
        .map(|_| ()),
    ];
    for (i, r) in codes.into_iter().enumerate() {
        assert_eq!(r.unwrap_err().code(), Code::PermissionDenied, "call {i}");
    }
    let workers = w.list_workers(proto::ListWorkersRequest::default()).await.unwrap().into_inner().workers;
    assert_eq!(workers.iter().map(|w| w.worker_id.as_str()).collect::<Vec<_>>(), ["worker-a"]);
    let t = get_task(&mut w, &id).await;
    assert_eq!((t.worker_id.as_str(), t.result.is_empty()), ("worker-a", true));
    assert_ne!(t.status, proto::TaskStatus::Completed as i32);
    // Its own report goes through.
    w.report_completion(proto::ReportCompletionRequest {
        worker_id: "worker-a".into(),
        task_id: id.clone(),
        attempt: assignment.attempt,
        result: b"mine".to_vec(),
        held_ms: 0,
    })
    .await
    .unwrap();
    assert_eq!(get_task(&mut w, &id).await.result, b"mine");
    c.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotated_certificates_serve_new_connections_while_an_open_stream_keeps_receiving() {
    let db = TestDb::sqlite().await;
    let (old_ca, new_ca) = (Ca::new("old ca"), Ca::new("new ca"));
    let files = Files::new();
    let (cert, key) = old_ca.leaf("coordinator", true);
    files.write("server.pem", &cert);
    files.write("server.key", &key);
    let old_file = files.write("old.pem", &old_ca.pem);
    let new_file = files.write("new.pem", &new_ca.pem);
    let c = TestCoordinator::start(&db, |cfg| tls_on(cfg, &files, None)).await;

    let sec = security(Some(&old_file), None);
    let mut w = client::connect(&https(&c), &sec, client::DEFAULT_MAX_MESSAGE).await.unwrap();
    let mut stream = open_stream(&mut w, "steady", 4).await;
    submit(&mut w, "echo", b"before").await;
    assert_eq!(stream.message().await.unwrap().unwrap().payload, b"before");

    let (cert, key) = new_ca.leaf("coordinator", true);
    files.write("server.key", &key);
    files.write("server.pem", &cert);
    let new_sec = security(Some(&new_file), None);
    wait_until("a new connection is served with the new certificate", Duration::from_secs(10), || async {
        probe(&https(&c), &new_sec).await == Code::Ok
    })
    .await;
    assert_ne!(probe(&https(&c), &sec).await, Code::Ok, "new connections no longer get the old certificate");

    // The stream opened before the rotation still carries new work, and its connection still
    // takes calls.
    let mut fresh = client::connect(&https(&c), &new_sec, client::DEFAULT_MAX_MESSAGE).await.unwrap();
    let id = submit(&mut fresh, "echo", b"after").await;
    let a = tokio::time::timeout(Duration::from_secs(10), stream.message()).await.unwrap().unwrap().unwrap();
    assert_eq!((a.task_id.as_str(), a.payload.as_slice()), (id.as_str(), b"after".as_slice()));
    w.report_completion(proto::ReportCompletionRequest {
        worker_id: "steady".into(),
        task_id: id.clone(),
        attempt: a.attempt,
        result: b"ok".to_vec(),
        held_ms: 0,
    })
    .await
    .unwrap();
    c.stop().await.unwrap();
}

// ---- auth ----

const WORKER_TOKEN: &str = "worker-token-0123456789abcdef";
const CLIENT_TOKEN: &str = "client-token-0123456789abcdef";
const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef";
const BOUND_TOKEN: &str = "bound-token-0123456789abcdef";

fn auth_on(cfg: &mut Config) {
    let token = |name: &str, role, t: &str, worker_id: &str| TokenConfig {
        name: name.into(),
        role,
        sha256: sha256_hex(t),
        worker_id: worker_id.into(),
        ..TokenConfig::default()
    };
    cfg.auth.enabled = true;
    cfg.auth.tokens = vec![
        token("workers", Role::Worker, WORKER_TOKEN, ""),
        token("clients", Role::Client, CLIENT_TOKEN, ""),
        token("operators", Role::Admin, ADMIN_TOKEN, ""),
        token("worker-7", Role::Worker, BOUND_TOKEN, "worker-7"),
    ];
}

/// Who calls in the matrix.
#[derive(Debug, Clone, Copy, PartialEq)]
enum As {
    NoToken,
    BadToken,
    Worker,
    Client,
    Admin,
}

const EVERYONE: [As; 5] = [As::NoToken, As::BadToken, As::Worker, As::Client, As::Admin];

impl As {
    fn header(self) -> Option<String> {
        match self {
            As::NoToken => None,
            As::BadToken => Some("Bearer not-a-configured-token-at-all".into()),
            As::Worker => Some(format!("Bearer {WORKER_TOKEN}")),
            As::Client => Some(format!("Bearer {CLIENT_TOKEN}")),
            As::Admin => Some(format!("Bearer {ADMIN_TOKEN}")),
        }
    }

    /// The documented answer for a method that needs `role` (`None`: the call passes auth).
    fn expected(self, role: Role) -> Option<Code> {
        match (self, role) {
            (As::NoToken | As::BadToken, _) => Some(Code::Unauthenticated),
            (As::Admin, _) => None,
            (As::Worker, Role::Worker) | (As::Client, Role::Client) => None,
            _ => Some(Code::PermissionDenied),
        }
    }
}

fn req<T>(msg: T, who: As) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(h) = who.header() {
        r.metadata_mut().insert("authorization", MetadataValue::try_from(h).unwrap());
    }
    r
}

/// Every method of the service, with a message that passes validation where it can.
const METHODS: [(&str, Role); 29] = [
    ("RegisterWorker", Role::Worker),
    ("SendHeartbeat", Role::Worker),
    ("ReceiveTasks", Role::Worker),
    ("ReportCompletion", Role::Worker),
    ("ReportFailure", Role::Worker),
    ("ReportCompletions", Role::Worker),
    ("Deregister", Role::Worker),
    ("SubmitTask", Role::Client),
    ("SubmitTasks", Role::Client),
    ("GetTask", Role::Client),
    ("ListTasks", Role::Client),
    ("CancelTask", Role::Client),
    ("WatchTask", Role::Client),
    ("SubmitJob", Role::Client),
    ("GetJob", Role::Client),
    ("ListWorkers", Role::Admin),
    ("GetWorkerStats", Role::Admin),
    ("RetryTask", Role::Admin),
    ("RetryTasks", Role::Admin),
    ("ListJobs", Role::Client),
    ("CancelJob", Role::Client),
    ("WatchJob", Role::Client),
    ("GetFailureSummary", Role::Client),
    ("CreateSchedule", Role::Admin),
    ("ListSchedules", Role::Client),
    ("PauseSchedule", Role::Admin),
    ("DeleteSchedule", Role::Admin),
    ("SetTypeLimit", Role::Admin),
    ("ListTypeLimits", Role::Admin),
];

async fn call(c: &mut Client, method: &str, who: As) -> Code {
    let wid = || "matrix-worker".to_string();
    let tid = || "0190a0b0-0000-7000-8000-000000000001".to_string();
    let task = || proto::SubmitTaskRequest { task_type: "echo".into(), ..Default::default() };
    let r = match method {
        "RegisterWorker" => c
            .register_worker(req(
                proto::RegisterWorkerRequest {
                    worker_id: wid(),
                    max_concurrent_tasks: 1,
                    ..Default::default()
                },
                who,
            ))
            .await
            .map(|_| ()),
        "SendHeartbeat" => c
            .send_heartbeat(req(proto::HeartbeatRequest { worker_id: wid(), ..Default::default() }, who))
            .await
            .map(|_| ()),
        "ReceiveTasks" => c
            .receive_tasks(req(
                proto::ReceiveTasksRequest { worker_id: "never-registered".into(), ..Default::default() },
                who,
            ))
            .await
            .map(|_| ()),
        "ReportCompletion" => c
            .report_completion(req(
                proto::ReportCompletionRequest {
                    worker_id: wid(),
                    task_id: tid(),
                    attempt: 1,
                    result: vec![],
                    held_ms: 0,
                },
                who,
            ))
            .await
            .map(|_| ()),
        "ReportCompletions" => c
            .report_completions(req(
                proto::ReportCompletionsRequest {
                    worker_id: wid(),
                    completions: vec![proto::CompletionEntry {
                        task_id: tid(),
                        attempt: 1,
                        ..Default::default()
                    }],
                },
                who,
            ))
            .await
            .map(|_| ()),
        "ReportFailure" => c
            .report_failure(req(
                proto::ReportFailureRequest {
                    worker_id: wid(),
                    task_id: tid(),
                    attempt: 1,
                    ..Default::default()
                },
                who,
            ))
            .await
            .map(|_| ()),
        "Deregister" => c
            .deregister(req(
                proto::DeregisterRequest {
                    worker_id: "never-registered".into(),
                    reason: String::new(),
                    ..Default::default()
                },
                who,
            ))
            .await
            .map(|_| ()),
        "SubmitTask" => c.submit_task(req(task(), who)).await.map(|_| ()),
        "SubmitTasks" => {
            c.submit_tasks(req(proto::SubmitTasksRequest { tasks: vec![task()] }, who)).await.map(|_| ())
        }
        "GetTask" => c
            .get_task(req(proto::GetTaskRequest { task_id: tid(), ..Default::default() }, who))
            .await
            .map(|_| ()),
        "ListTasks" => c.list_tasks(req(proto::ListTasksRequest::default(), who)).await.map(|_| ()),
        "CancelTask" => c
            .cancel_task(req(proto::CancelTaskRequest { task_id: tid(), reason: String::new() }, who))
            .await
            .map(|_| ()),
        "WatchTask" => c.watch_task(req(proto::WatchTaskRequest { task_id: tid() }, who)).await.map(|_| ()),
        "SubmitJob" => c
            .submit_job(req(
                proto::SubmitJobRequest { name: "m".into(), tasks: vec![task()], ..Default::default() },
                who,
            ))
            .await
            .map(|_| ()),
        "GetJob" => c
            .get_job(req(proto::GetJobRequest { job_id: tid(), include_results: false }, who))
            .await
            .map(|_| ()),
        "ListWorkers" => c.list_workers(req(proto::ListWorkersRequest::default(), who)).await.map(|_| ()),
        "GetWorkerStats" => {
            c.get_worker_stats(req(proto::GetWorkerStatsRequest { worker_id: wid() }, who)).await.map(|_| ())
        }
        "RetryTask" => c.retry_task(req(proto::RetryTaskRequest { task_id: tid() }, who)).await.map(|_| ()),
        "RetryTasks" => c
            .retry_tasks(req(
                proto::RetryTasksRequest { task_type: "echo".into(), ..Default::default() },
                who,
            ))
            .await
            .map(|_| ()),
        "ListJobs" => c.list_jobs(req(proto::ListJobsRequest::default(), who)).await.map(|_| ()),
        "CancelJob" => c
            .cancel_job(req(proto::CancelJobRequest { job_id: tid(), reason: String::new() }, who))
            .await
            .map(|_| ()),
        "WatchJob" => c.watch_job(req(proto::WatchJobRequest { job_id: tid() }, who)).await.map(|_| ()),
        "GetFailureSummary" => {
            c.get_failure_summary(req(proto::GetFailureSummaryRequest::default(), who)).await.map(|_| ())
        }
        "CreateSchedule" => c
            .create_schedule(req(
                proto::CreateScheduleRequest {
                    name: "matrix".into(),
                    cron: "0 0 1 1 *".into(),
                    task: Some(task()),
                    ..Default::default()
                },
                who,
            ))
            .await
            .map(|_| ()),
        "ListSchedules" => c.list_schedules(req(proto::ListSchedulesRequest {}, who)).await.map(|_| ()),
        "PauseSchedule" => c
            .pause_schedule(req(proto::PauseScheduleRequest { schedule_id: tid(), paused: true }, who))
            .await
            .map(|_| ()),
        "DeleteSchedule" => {
            c.delete_schedule(req(proto::DeleteScheduleRequest { schedule_id: tid() }, who)).await.map(|_| ())
        }
        "SetTypeLimit" => c
            .set_type_limit(req(
                proto::SetTypeLimitRequest {
                    task_type: "matrix".into(),
                    max_in_flight: Some(2),
                    clear: false,
                },
                who,
            ))
            .await
            .map(|_| ()),
        "ListTypeLimits" => c.list_type_limits(req(proto::ListTypeLimitsRequest {}, who)).await.map(|_| ()),
        other => panic!("no call for {other}"),
    };
    match r {
        Ok(()) => Code::Ok,
        Err(s) => s.code(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn auth_matrix_covers_every_rpc_and_rest_route() {
    let db = TestDb::sqlite().await;
    let c = TestCoordinator::start(&db, auth_on).await;
    let mut client = c.client().await;
    // Every method of the service is in the matrix.
    let pool = prost_reflect::DescriptorPool::decode(proto::FILE_DESCRIPTOR_SET).unwrap();
    let service = pool.get_service_by_name("coordinator.CoordinatorService").unwrap();
    let declared: Vec<String> = service.methods().map(|m| m.name().to_owned()).collect();
    let listed: Vec<String> = METHODS.iter().map(|(m, _)| m.to_string()).collect();
    assert_eq!(declared, listed, "METHODS lists every RPC of the service, in order");
    let mut refused = 0;
    for (method, role) in METHODS {
        for who in EVERYONE {
            let code = call(&mut client, method, who).await;
            match who.expected(role) {
                Some(expected) => {
                    refused += 1;
                    assert_eq!(code, expected, "{method} as {who:?}");
                }
                None => assert!(
                    !matches!(code, Code::Unauthenticated | Code::PermissionDenied),
                    "{method} as {who:?} was refused: {code:?}"
                ),
            }
        }
    }
    // A malformed header is Unauthenticated too.
    let mut r = tonic::Request::new(proto::ListTasksRequest::default());
    r.metadata_mut().insert("authorization", MetadataValue::from_static("Token abc"));
    assert_eq!(client.list_tasks(r).await.unwrap_err().code(), Code::Unauthenticated);
    // A bound worker token acts for its worker only.
    let bound = |id: &str| {
        let mut r = tonic::Request::new(proto::RegisterWorkerRequest {
            worker_id: id.into(),
            max_concurrent_tasks: 1,
            ..Default::default()
        });
        r.metadata_mut()
            .insert("authorization", MetadataValue::try_from(format!("Bearer {BOUND_TOKEN}")).unwrap());
        r
    };
    assert_eq!(client.register_worker(bound("worker-8")).await.unwrap_err().code(), Code::PermissionDenied);
    client.register_worker(bound("worker-7")).await.unwrap();
    // Health checks need no token.
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        tonic::transport::Endpoint::from_shared(c.endpoint()).unwrap().connect().await.unwrap(),
    );
    health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap();

    // REST: the same roles.
    let routes: [(&str, &str, &str, Role); 22] = [
        ("POST", "/api/v1/tasks", r#"{"task_type":"echo"}"#, Role::Client),
        ("POST", "/api/v1/tasks/batch", r#"{"tasks":[{"task_type":"echo"}]}"#, Role::Client),
        ("GET", "/api/v1/tasks", "", Role::Client),
        ("GET", "/api/v1/tasks/0190a0b0-0000-7000-8000-000000000001", "", Role::Client),
        ("POST", "/api/v1/tasks/0190a0b0-0000-7000-8000-000000000001/cancel", "", Role::Client),
        ("POST", "/api/v1/jobs", r#"{"name":"j","tasks":[{"task_type":"echo"}]}"#, Role::Client),
        ("GET", "/api/v1/jobs/0190a0b0-0000-7000-8000-000000000001", "", Role::Client),
        ("GET", "/api/v1/workers", "", Role::Admin),
        ("GET", "/api/v1/workers/matrix-worker/stats", "", Role::Admin),
        ("POST", "/api/v1/tasks/0190a0b0-0000-7000-8000-000000000001/retry", "", Role::Admin),
        ("POST", "/api/v1/tasks/retry", r#"{"task_type":"echo"}"#, Role::Admin),
        ("GET", "/api/v1/jobs", "", Role::Client),
        ("POST", "/api/v1/jobs/0190a0b0-0000-7000-8000-000000000001/cancel", "", Role::Client),
        ("GET", "/api/v1/failures", "", Role::Client),
        (
            "POST",
            "/api/v1/schedules",
            r#"{"name":"r","cron":"0 0 1 1 *","task":{"task_type":"echo"}}"#,
            Role::Admin,
        ),
        ("GET", "/api/v1/schedules", "", Role::Client),
        ("POST", "/api/v1/schedules/0190a0b0-0000-7000-8000-000000000001/pause", "", Role::Admin),
        ("POST", "/api/v1/schedules/0190a0b0-0000-7000-8000-000000000001/resume", "", Role::Admin),
        ("DELETE", "/api/v1/schedules/0190a0b0-0000-7000-8000-000000000001", "", Role::Admin),
        ("GET", "/api/v1/limits", "", Role::Admin),
        ("PUT", "/api/v1/limits/matrix", r#"{"max_in_flight":2}"#, Role::Admin),
        ("DELETE", "/api/v1/limits/matrix", "", Role::Admin),
    ];
    for (method, path, body, role) in routes {
        for who in EVERYONE {
            let (code, text) = http(c.http, method, path, who.header().as_deref(), body).await;
            let expected = who.expected(role).map(|code| match code {
                Code::Unauthenticated => 401,
                _ => 403,
            });
            match expected {
                Some(e) => {
                    refused += 1;
                    assert_eq!(code, e, "{method} {path} as {who:?}: {text}");
                    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                    assert!(v["error"].is_string(), "{text}");
                }
                None => assert!(![401, 403].contains(&code), "{method} {path} as {who:?}: {code} {text}"),
            }
        }
    }
    // Probes and metrics stay open.
    for path in ["/health", "/health/live", "/metrics"] {
        assert_eq!(http(c.http, "GET", path, None, "").await.0, 200, "{path}");
    }
    let (_, metrics) = http(c.http, "GET", "/metrics", None, "").await;
    let failures: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("coordinator_auth_failures_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    // Every refusal above, plus the malformed header and the bound token's wrong worker.
    assert_eq!(failures as usize, refused + 2, "{metrics}");
    assert!(
        metrics.contains(
            r#"grpc_server_handled_total{grpc_service="coordinator.CoordinatorService",grpc_method="ListWorkers",grpc_type="unary",grpc_code="PermissionDenied"}"#
        )
    );
    c.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_can_be_put_behind_a_token() {
    let db = TestDb::sqlite().await;
    let c = TestCoordinator::start(&db, |cfg| {
        auth_on(cfg);
        cfg.auth.metrics_require_token = true;
    })
    .await;
    assert_eq!(http(c.http, "GET", "/metrics", None, "").await.0, 401);
    let bearer = format!("Bearer {WORKER_TOKEN}");
    assert_eq!(http(c.http, "GET", "/metrics", Some(&bearer), "").await.0, 200);
    assert_eq!(http(c.http, "GET", "/health", None, "").await.0, 200);
    c.stop().await.unwrap();
}

/// One HTTP/1.1 request on a fresh connection: (status, body).
async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: &str,
) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = auth.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    // A server may answer a body over its limit before it has read all of it, and close: the
    // rest of the write then fails (the peer reset the connection), and the answer is still
    // there to read, as a client such as curl reads it.
    let sent = async {
        s.write_all(head.as_bytes()).await?;
        s.write_all(body.as_bytes()).await
    };
    if let Err(e) = sent.await {
        let early = matches!(e.kind(), std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset);
        assert!(early, "{method} {path}: {e}");
    }
    let mut buf = Vec::new();
    match tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await.unwrap() {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && !buf.is_empty() => {}
        Err(e) => panic!("{method} {path}: {e}"),
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    let body = if text.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        body.split("\r\n").skip(1).step_by(2).collect::<Vec<_>>().join("")
    } else {
        body
    };
    (code, body)
}

// ---- limits and bad input ----

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_11_mib_submit_is_refused_and_the_connection_goes_on() {
    let db = TestDb::sqlite().await;
    let c = TestCoordinator::start(&db, |_| {}).await;
    // A client whose own limit would let it through: the server's 10 MiB is what refuses it.
    let mut client = client::connect(&c.endpoint(), &ClientSecurity::default(), 64 << 20).await.unwrap();
    // Another call open on the same connection: a task stream of a worker on this channel.
    let mut stream = open_stream(&mut client, "same-connection", 2).await;
    let big = proto::SubmitTaskRequest {
        task_type: "echo".into(),
        payload: vec![7u8; 11 * 1024 * 1024],
        ..Default::default()
    };
    let err = client.submit_task(big).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert_eq!(c.store.task_counts().await.unwrap().values().sum::<u64>(), 0, "nothing stored");
    // The same channel (one HTTP/2 connection) goes on.
    let small = client
        .submit_task(proto::SubmitTaskRequest {
            task_type: "echo".into(),
            payload: b"small".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();
    let small = small.into_inner();
    assert!(small.created);
    assert_eq!(c.store.task_counts().await.unwrap().values().sum::<u64>(), 1);
    // The stream opened before the refusal still delivers.
    let a = tokio::time::timeout(Duration::from_secs(10), stream.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(a.task_id, small.task_id);
    c.stop().await.unwrap();
}

/// The table of bad inputs in docs/security.md: each is refused with its code, naming its field, and
/// stores nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_bad_input_is_refused_with_its_code_and_stores_nothing() {
    let db = TestDb::sqlite().await;
    let c = TestCoordinator::start(&db, |cfg| cfg.tasks.max_payload_size = ByteSize(1024 * 1024)).await;
    let mut client = client::connect(&c.endpoint(), &ClientSecurity::default(), 64 << 20).await.unwrap();
    let uuid = "0190a0b0-0000-7000-8000-000000000001".to_string();
    let task = |f: &dyn Fn(&mut proto::SubmitTaskRequest)| {
        let mut t = proto::SubmitTaskRequest { task_type: "echo".into(), ..Default::default() };
        f(&mut t);
        t
    };
    let reg = |id: &str, max: u32| proto::RegisterWorkerRequest {
        worker_id: id.into(),
        max_concurrent_tasks: max,
        ..Default::default()
    };
    type Call = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), tonic::Status>> + Send>>;
    let mut cases: Vec<(&str, Code, &str, Call)> = Vec::new();
    macro_rules! case {
        ($name:expr, $code:expr, $field:expr, |$cl:ident| $call:expr) => {{
            let mut $cl = client.clone();
            let call: Call = Box::pin(async move { $call.await.map(|_| ()) });
            cases.push(($name, $code, $field, call));
        }};
    }
    let t = task(&|t| t.task_type = String::new());
    case!("empty task_type", Code::InvalidArgument, "task_type", |c| c.submit_task(t));
    let t = task(&|t| t.task_type = "x".repeat(129));
    case!("task_type over 128 bytes", Code::InvalidArgument, "task_type", |c| c.submit_task(t));
    let t = task(&|t| t.task_type = "prove block!".into());
    case!("task_type with a space or symbol", Code::InvalidArgument, "task_type", |c| c.submit_task(t));
    let t = task(&|t| t.priority = 1_000_001);
    case!("priority beyond ±1000000", Code::InvalidArgument, "priority", |c| c.submit_task(t));
    let t = task(&|t| t.max_attempts = 101);
    case!("max_attempts over 100", Code::InvalidArgument, "max_attempts", |c| c.submit_task(t));
    let t = task(&|t| t.timeout_ms = 8 * 24 * 3600 * 1000);
    case!("timeout_ms over 7 days", Code::InvalidArgument, "timeout_ms", |c| c.submit_task(t));
    let t = task(&|t| t.idempotency_key = "k".repeat(257));
    case!("idempotency_key over 256 bytes", Code::InvalidArgument, "idempotency_key", |c| c.submit_task(t));
    let t = task(&|t| t.idempotency_key = "k\u{0}".into());
    case!("idempotency_key with U+0000", Code::InvalidArgument, "idempotency_key", |c| c.submit_task(t));
    let t = task(&|t| t.payload = vec![0; 1024 * 1024 + 1]);
    case!("payload over tasks.max_payload_size", Code::OutOfRange, "payload", |c| c.submit_task(t));
    let t = task(&|t| t.payload = vec![0; 11 * 1024 * 1024]);
    case!("message over grpc.max_recv_msg_size", Code::OutOfRange, "message length too large", |c| c
        .submit_task(t));
    let batch =
        proto::SubmitTasksRequest { tasks: vec![task(&|_| {}), task(&|t| t.task_type = String::new())] };
    case!("one bad task in a batch", Code::InvalidArgument, "tasks[1].task_type", |c| c.submit_tasks(batch));
    let job = proto::SubmitJobRequest {
        name: "j".into(),
        tasks: vec![task(&|t| t.max_attempts = 1000)],
        ..Default::default()
    };
    case!("one bad task in a job", Code::InvalidArgument, "max_attempts", |c| c.submit_job(job));
    case!("empty task_id", Code::InvalidArgument, "task_id", |c| c
        .get_task(proto::GetTaskRequest { task_id: String::new(), ..Default::default() }));
    case!("task_id not a UUID", Code::InvalidArgument, "task_id", |c| c
        .get_task(proto::GetTaskRequest { task_id: "42; drop table tasks".into(), ..Default::default() }));
    case!("cancel: task_id not a UUID", Code::InvalidArgument, "task_id", |c| c
        .cancel_task(proto::CancelTaskRequest { task_id: "x".into(), reason: String::new() }));
    case!("job_id not a UUID", Code::InvalidArgument, "job_id", |c| c
        .get_job(proto::GetJobRequest { job_id: "x".into(), include_results: false }));
    case!("page_size over 1000", Code::InvalidArgument, "page_size", |c| c
        .list_tasks(proto::ListTasksRequest { page_size: 1001, ..Default::default() }));
    case!("page_token not from a response", Code::InvalidArgument, "page_token", |c| c
        .list_tasks(proto::ListTasksRequest { page_token: "zzz".into(), ..Default::default() }));
    case!("status not a known value", Code::InvalidArgument, "status", |c| c
        .list_tasks(proto::ListTasksRequest { status: 42, ..Default::default() }));
    let r = reg("", 1);
    case!("empty worker_id", Code::InvalidArgument, "worker_id", |c| c.register_worker(r));
    let r = reg(&"w".repeat(129), 1);
    case!("worker_id over 128 bytes", Code::InvalidArgument, "worker_id", |c| c.register_worker(r));
    let r = reg("w\u{0}1", 1);
    case!("worker_id with a control character", Code::InvalidArgument, "worker_id", |c| c.register_worker(r));
    let r = proto::RegisterWorkerRequest { hostname: "h\u{0}".into(), ..reg("w1", 1) };
    case!("hostname with a control character", Code::InvalidArgument, "hostname", |c| c.register_worker(r));
    let r = reg("w1", 10_001);
    case!("max_concurrent_tasks over 10000", Code::InvalidArgument, "max_concurrent_tasks", |c| c
        .register_worker(r));
    let r = proto::RegisterWorkerRequest { prefetch: 1025, ..reg("w1", 1) };
    case!("prefetch over 1024", Code::InvalidArgument, "prefetch", |c| c.register_worker(r));
    let hb = proto::HeartbeatRequest {
        worker_id: "w1".into(),
        running_tasks: vec![proto::RunningTask { task_id: "nope".into(), attempt: 1 }],
        ..Default::default()
    };
    case!("heartbeat with a bad running task id", Code::InvalidArgument, "running_tasks[0].task_id", |c| c
        .send_heartbeat(hb));
    let rep = proto::ReportCompletionRequest {
        worker_id: "w1".into(),
        task_id: uuid.clone(),
        attempt: 0,
        result: vec![],
        held_ms: 0,
    };
    case!("report with attempt 0", Code::InvalidArgument, "attempt", |c| c.report_completion(rep));

    let rows = cases.len();
    for (name, code, field, call) in cases {
        let err = call.await.expect_err(name);
        assert_eq!(err.code(), code, "{name}: {err:?}");
        assert!(err.message().contains(field), "{name}: message {:?} does not name {field}", err.message());
    }
    assert_eq!(c.store.task_counts().await.unwrap().values().sum::<u64>(), 0, "no task stored");
    let workers =
        client.list_workers(proto::ListWorkersRequest::default()).await.unwrap().into_inner().workers;
    assert!(workers.is_empty(), "no worker stored: {workers:?}");
    assert_eq!(rows, 27);

    // REST: bad JSON, unknown fields, wrong types, unknown routes, wrong methods, big bodies.
    let big = format!(r#"{{"task_type":"echo","payload":"{}"}}"#, "A".repeat(11 * 1024 * 1024));
    // Under grpc.max_recv_msg_size as a body, over tasks.max_payload_size (1 MiB) as a payload.
    let over_payload_limit =
        format!(r#"{{"task_type":"echo","payload":"{}"}}"#, "A".repeat(4 * (1024 * 1024 / 3 + 1)));
    for (method, path, body, code, error) in [
        ("POST", "/api/v1/tasks", "{not json", 400, "invalid_json"),
        ("POST", "/api/v1/tasks", r#"{"task_type":"echo","colour":"red"}"#, 400, "invalid_json"),
        ("POST", "/api/v1/tasks", r#"{"task_type":"echo","priority":"high"}"#, 400, "invalid_json"),
        ("POST", "/api/v1/tasks", r#"{"task_type":""}"#, 400, "invalid_argument"),
        ("POST", "/api/v1/tasks", r#"{"task_type":"echo","max_attempts":101}"#, 400, "invalid_argument"),
        (
            "POST",
            "/api/v1/tasks",
            r#"{"task_type":"echo","idempotency_key":"k\u0000"}"#,
            400,
            "invalid_argument",
        ),
        ("POST", "/api/v1/tasks", big.as_str(), 413, "payload_too_large"),
        ("POST", "/api/v1/tasks", over_payload_limit.as_str(), 413, "payload_too_large"),
        ("GET", "/api/v1/tasks/not-a-uuid", "", 400, "invalid_argument"),
        ("GET", "/api/v1/tasks?page_size=5000", "", 400, "invalid_argument"),
        ("GET", "/api/v1/tasks?status=bogus", "", 400, "invalid_json"),
        ("GET", "/api/v1/nothing-here", "", 404, "not_found"),
        ("DELETE", "/api/v1/tasks", "", 405, "method_not_allowed"),
        ("PUT", "/health", "", 405, "method_not_allowed"),
    ] {
        let (got, text) = http(c.http, method, path, None, body).await;
        assert_eq!(got, code, "{method} {path}: {text}");
        let v: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("{path}: not JSON: {text}"));
        assert_eq!(v["error"], error, "{method} {path}: {text}");
    }
    // A field of the wrong type or range is named: in a body by its path, in a query string as
    // the parameter (with no line and column of a JSON text the caller never wrote).
    for (method, path, body, names) in [
        (
            "POST",
            "/api/v1/tasks",
            r#"{"task_type":"echo","priority":"high"}"#,
            "request body, field priority: ",
        ),
        ("POST", "/api/v1/tasks", r#"{"task_type":"echo","priority":99999999999}"#, "field priority: "),
        (
            "POST",
            "/api/v1/jobs",
            r#"{"tasks":[{"task_type":"echo"},{"task_type":"echo","weight":-1}]}"#,
            "field tasks[1].weight: ",
        ),
        ("GET", "/api/v1/tasks?status=bogus", "", "query parameter status: "),
        ("GET", "/api/v1/tasks?page_size=-1", "", "query parameter page_size: "),
        ("GET", "/api/v1/jobs?page_size=many", "", "query parameter page_size: "),
    ] {
        let (got, text) = http(c.http, method, path, None, body).await;
        assert_eq!(got, 400, "{method} {path}: {text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let message = v["message"].as_str().unwrap_or_default();
        assert!(message.contains(names), "{method} {path} {body}: {message}");
        if path.contains('?') {
            assert!(!message.contains("line 1") && !message.contains("body"), "{path}: {message}");
        }
    }
    assert_eq!(c.store.task_counts().await.unwrap().values().sum::<u64>(), 0, "no task stored over REST");
    // And a good REST round trip.
    let (code, text) =
        http(c.http, "POST", "/api/v1/tasks", None, r#"{"task_type":"echo","payload":"aGk="}"#).await;
    assert_eq!(code, 201, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let id = v["task_id"].as_str().unwrap();
    let (code, text) = http(c.http, "GET", &format!("/api/v1/tasks/{id}"), None, "").await;
    assert_eq!(code, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!((v["payload"].as_str(), v["status"].as_str()), (Some("aGk="), Some("TASK_STATUS_PENDING")));
    c.stop().await.unwrap();
}

/// Sends hand-encoded protobuf bytes as they are, and takes the answer's bytes as they are.
#[derive(Debug, Default, Clone)]
struct RawCodec;

#[derive(Debug)]
struct RawBytes;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawBytes;
    type Decoder = RawBytes;

    fn encoder(&mut self) -> RawBytes {
        RawBytes
    }

    fn decoder(&mut self) -> RawBytes {
        RawBytes
    }
}

impl tonic::codec::Encoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, buf: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(buf, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, buf: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let n = bytes::Buf::remaining(buf);
        Ok(Some(bytes::Buf::copy_to_bytes(buf, n).to_vec()))
    }
}

/// A unary call of `method` with `body` as the encoded request.
async fn raw_unary(endpoint: &str, method: &str, body: Vec<u8>) -> Result<Vec<u8>, tonic::Status> {
    let channel =
        tonic::transport::Endpoint::from_shared(endpoint.to_owned()).unwrap().connect().await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path: http::uri::PathAndQuery = format!("/coordinator.CoordinatorService/{method}").parse().unwrap();
    grpc.unary(tonic::Request::new(body), path, RawCodec).await.map(|r| r.into_inner())
}

/// Bytes that are not UTF-8 in a string field are the client's mistake: `InvalidArgument`
/// naming the message and field, no decoder internals, nothing stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_string_field_that_is_not_utf8_is_refused_naming_the_field() {
    let db = TestDb::sqlite().await;
    let c = TestCoordinator::start(&db, |_| {}).await;
    // Field 1, length-delimited, two bytes that are not UTF-8.
    let bad_string = vec![0x0a, 0x02, 0xff, 0xfe];
    let mut nested = vec![0x0a, bad_string.len() as u8];
    nested.extend_from_slice(&bad_string);
    for (method, body, field) in [
        ("SubmitTask", bad_string.clone(), "SubmitTaskRequest.task_type"),
        ("SubmitTasks", nested, "SubmitTasksRequest.tasks.task_type"),
        ("RegisterWorker", bad_string.clone(), "RegisterWorkerRequest.worker_id"),
        ("SendHeartbeat", bad_string.clone(), "HeartbeatRequest.worker_id"),
    ] {
        let err = raw_unary(&c.endpoint(), method, body).await.expect_err(method);
        assert_eq!(err.code(), Code::InvalidArgument, "{method}: {err:?}");
        assert_eq!(err.message(), format!("invalid {field}: not valid UTF-8"), "{method}");
    }
    // A body that is not protobuf at all: still the client's mistake, still no internals.
    let err = raw_unary(&c.endpoint(), "SubmitTask", vec![0xff]).await.expect_err("garbage");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(!err.message().contains("Protobuf"), "{err:?}");
    // The same bytes made valid go through: the refusal was about the bytes, not the route.
    let ok = raw_unary(&c.endpoint(), "SubmitTask", b"\x0a\x04echo".to_vec()).await;
    assert!(ok.is_ok(), "{ok:?}");
    assert_eq!(c.store.task_counts().await.unwrap().values().sum::<u64>(), 1, "only the good task stored");
    let mut client = c.client().await;
    let workers =
        client.list_workers(proto::ListWorkersRequest::default()).await.unwrap().into_inner().workers;
    assert!(workers.is_empty(), "no worker stored: {workers:?}");
    c.stop().await.unwrap();
}

/// One HTTP/1.1 GET on a fresh connection: (status, head, body).
async fn http_get_with_head(addr: std::net::SocketAddr, path: &str) -> (u16, String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (code, head.to_ascii_lowercase(), body.to_owned())
}

/// The REST client routes are held to `grpc.client_rate_limit` per peer, as the gRPC client
/// RPCs are: 429 with `Retry-After` and a JSON body; the probes are not limited.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rest_client_routes_are_rate_limited_per_peer_with_retry_after() {
    let db = TestDb::sqlite().await;
    // One call a second, bursts of two: 20 calls in a row cannot all pass.
    let c = TestCoordinator::start(&db, |cfg| cfg.grpc.client_rate_limit = 1).await;
    let mut answers = Vec::new();
    let limited = loop {
        let (code, head, body) = http_get_with_head(c.http, "/api/v1/tasks").await;
        if code == 429 {
            break (head, body);
        }
        assert_eq!(code, 200, "{head} {body}");
        answers.push(code);
        assert!(answers.len() < 20, "20 requests at a limit of 1/s and none refused");
    };
    let (head, body) = limited;
    let retry_after = head
        .lines()
        .find_map(|l| l.strip_prefix("retry-after:"))
        .unwrap_or_else(|| panic!("no retry-after: {head}"));
    let secs: u64 = retry_after.trim().parse().unwrap_or_else(|_| panic!("retry-after {retry_after:?}"));
    assert!((1..=2).contains(&secs), "retry-after {secs}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("not JSON: {body}"));
    assert_eq!(v["error"], "resource_exhausted", "{body}");
    // Probes are not client calls.
    assert_eq!(http_get(c.http, "/health").await.unwrap().0, 200);
    assert_eq!(http_get(c.http, "/health/live").await.unwrap().0, 200);
    // gRPC client calls are held to the same limit.
    let mut client = c.client().await;
    let mut passed = 0;
    loop {
        match client.list_tasks(proto::ListTasksRequest::default()).await {
            Ok(_) => passed += 1,
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                break;
            }
        }
        assert!(passed < 20, "20 gRPC calls at a limit of 1/s and none refused");
    }
    c.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_result_over_the_message_limit_fails_the_task_for_good() {
    let db = TestDb::sqlite().await;
    let c = TestCoordinator::start(&db, |_| {}).await;
    let mut o = WorkerOptions::new(c.endpoint(), "big-results");
    o.capabilities = vec!["huge".into()];
    o.max_message_size = 256 * 1024;
    let worker = Worker::new(o, handler_fn(|_| async move { Ok(vec![1u8; 512 * 1024]) })).unwrap();
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    let mut client = c.client().await;
    let id = submit(&mut client, "huge", b"").await;
    wait_until("the task fails", Duration::from_secs(20), || {
        let mut client = client.clone();
        let id = id.clone();
        async move { task_status(&mut client, &id).await == proto::TaskStatus::Failed }
    })
    .await;
    let t = get_task(&mut client, &id).await;
    assert_eq!(t.attempt, 1, "not retried");
    assert!(t.error.contains("exceeds the message limit"), "{}", t.error);
    stop.cancel();
    run.await.unwrap().unwrap();
    c.stop().await.unwrap();
}

// ---- connections ----

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_http_client_is_cut_off_while_health_keeps_answering() {
    let db = TestDb::sqlite().await;
    let c = TestCoordinator::start(&db, |cfg| cfg.http.read_timeout = Duration::from_secs(2)).await;
    let addr = c.http;
    let slow = tokio::spawn(async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let start = Instant::now();
        for b in b"GET /health HTTP/1.1\r\nHost: slowloris\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
            if s.write_all(&[*b]).await.is_err() {
                return start.elapsed();
            }
            // A closed connection shows as EOF (or a reset) on read.
            let mut buf = [0u8; 256];
            match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return start.elapsed(),
                Ok(Ok(_)) => {
                    // A 408 or similar before closing: read on until EOF.
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                    }
                    return start.elapsed();
                }
                Err(_) => {}
            }
        }
        panic!("the slow client was never disconnected");
    });
    // Meanwhile others are served.
    let mut answered = 0;
    while !slow.is_finished() {
        let (code, _) = http_get(c.http, "/health").await.unwrap();
        assert_eq!(code, 200);
        answered += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let held = slow.await.unwrap();
    assert!(held < Duration::from_secs(10), "disconnected after {held:?} (header timeout 2 s)");
    assert!(held >= Duration::from_millis(1500), "disconnected after only {held:?}");
    assert!(answered >= 3, "/health answered {answered} times meanwhile");
    c.stop().await.unwrap();
}

/// Connections beyond `http.max_connections` wait to be accepted: with one slot held by a silent
/// client, a request is answered only once the header timeout frees the slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_connections_beyond_the_limit_wait_for_a_free_slot() {
    let db = TestDb::sqlite().await;
    let c = TestCoordinator::start(&db, |cfg| {
        cfg.http.max_connections = 1;
        cfg.http.read_timeout = Duration::from_secs(1);
    })
    .await;
    // The start-up probe's connection may still be closing: wait until a request goes through.
    wait_until("a free slot", Duration::from_secs(5), || async {
        http_get(c.http, "/health/live").await.is_ok_and(|(code, _)| code == 200)
    })
    .await;
    let silent = tokio::net::TcpStream::connect(c.http).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let start = Instant::now();
    let (code, _) = http_get(c.http, "/health/live").await.unwrap();
    let waited = start.elapsed();
    assert_eq!(code, 200);
    assert!(waited >= Duration::from_millis(500), "answered after {waited:?} while the only slot was held");
    drop(silent);
    c.stop().await.unwrap();
}

/// A connection with no request in flight for `http.idle_timeout` is closed even while HTTP/2
/// keepalive PINGs go back and forth, so idle clients cannot hold every slot and starve the
/// probes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_http2_and_http1_connections_are_closed_and_free_their_slots() {
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let db = TestDb::sqlite().await;
    let c = TestCoordinator::start(&db, |cfg| {
        cfg.http.idle_timeout = Duration::from_secs(1);
        cfg.http.max_connections = 3;
    })
    .await;
    let uri = |path: &str| format!("http://{}{path}", c.http);
    let get = |path: &str| {
        http::Request::get(uri(path)).header("host", "test").body(axum::body::Body::empty()).unwrap()
    };
    // The start-up probe's connection may still be closing: wait until a request goes through.
    wait_until("a free slot", Duration::from_secs(5), || async {
        http_get(c.http, "/health/live").await.is_ok_and(|(code, _)| code == 200)
    })
    .await;
    // Every slot: two HTTP/2 (prior knowledge) and one HTTP/1.1 keep-alive connection, each
    // making one request and then staying open with nothing to ask. The request senders stay
    // alive, so the clients never close on their own.
    let mut senders = Vec::new();
    let mut connections = Vec::new();
    for _ in 0..2 {
        let tcp = tokio::net::TcpStream::connect(c.http).await.unwrap();
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await.unwrap();
        connections.push(tokio::spawn(conn));
        let resp = send.send_request(get("/health/live")).await.unwrap();
        assert_eq!(resp.status(), 200);
        senders.push(Box::new(send) as Box<dyn std::any::Any + Send>);
    }
    let tcp = tokio::net::TcpStream::connect(c.http).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
    connections.push(tokio::spawn(conn));
    let resp = send.send_request(get("/health/live")).await.unwrap();
    assert_eq!(resp.status(), 200);
    drop(resp);
    senders.push(Box::new(send));

    // The server closes each of them (a few idle timeouts at most; never, before the fix).
    for (i, conn) in connections.into_iter().enumerate() {
        match tokio::time::timeout(Duration::from_secs(15), conn).await {
            Ok(joined) => joined.unwrap().unwrap_or_else(|e| panic!("connection {i} ended with {e}")),
            Err(_) => panic!("idle connection {i} is still open after 15 s (idle timeout 1 s)"),
        }
    }
    // The slots are free again: the readiness probe gets in.
    let (code, _) = http_get(c.http, "/health").await.unwrap();
    assert_eq!(code, 200);
    drop(senders);
    c.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn aged_connections_are_recycled_and_workers_lose_nothing() {
    let db = TestDb::sqlite().await;
    let c = TestCoordinator::start(&db, |cfg| {
        cfg.grpc.max_connection_age = Duration::from_millis(700);
        cfg.grpc.max_connection_age_grace = Duration::from_secs(2);
    })
    .await;
    let worker = echo_worker(c.endpoint(), "ageing", ClientSecurity::default());
    let counters = worker.counters();
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    let mut client = c.client().await;
    // A call racing the close of an aged connection can fail with a transport error, as with
    // any gRPC server that recycles connections (hyper answers `Cancelled` for a call it handed
    // to a connection in the instant it closed); clients retry, and the idempotency key makes a
    // retried submit safe.
    let n = 60;
    let mut ids = Vec::new();
    for i in 0..n {
        let req = proto::SubmitTaskRequest {
            task_type: "echo".into(),
            payload: format!("{i}").into_bytes(),
            idempotency_key: format!("ageing-{i}"),
            ..Default::default()
        };
        let mut tries = 0;
        let id = loop {
            match client.submit_task(req.clone()).await {
                Ok(r) => break r.into_inner().task_id,
                Err(s)
                    if tries < 5
                        && matches!(s.code(), Code::Unknown | Code::Unavailable | Code::Cancelled) =>
                {
                    tries += 1
                }
                Err(s) => panic!("submit {i}: {s:?}"),
            }
        };
        ids.push(id);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(c.store.task_counts().await.unwrap().values().sum::<u64>(), n as u64, "each task once");
    let finished = |client: Client, ids: Vec<String>| async move {
        let mut client = client;
        for id in &ids {
            match client.get_task(proto::GetTaskRequest { task_id: id.clone(), ..Default::default() }).await {
                Ok(t) if t.get_ref().status == proto::TaskStatus::Completed as i32 => {}
                _ => return false,
            }
        }
        true
    };
    wait_until("every task completes", Duration::from_secs(60), || finished(client.clone(), ids.clone()))
        .await;
    for (i, id) in ids.iter().enumerate() {
        let t = c.store.get_task(id.parse().unwrap()).await.unwrap().unwrap();
        assert_eq!(t.result.as_deref(), Some(format!("{i}").as_bytes()));
    }
    let sessions = counters.sessions.load(std::sync::atomic::Ordering::Relaxed);
    assert!(sessions >= 2, "the worker reopened its stream after the age limit ({sessions} sessions)");
    assert_eq!(counters.refused.load(std::sync::atomic::Ordering::Relaxed), 0);
    stop.cancel();
    run.await.unwrap().unwrap();
    c.stop().await.unwrap();
}
