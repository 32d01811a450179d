//! Test harness: a real coordinator on loopback port 0 over a real database (SQLite always,
//! Postgres when `TEST_DATABASE_URL` is set), raw gRPC workers whose every step the test
//! drives, and small helpers that wait for a condition with a deadline.
#![allow(dead_code)]

use std::{
    future::Future,
    net::SocketAddr,
    time::{Duration, Instant},
};

use coordinator::{
    app::App,
    config::{Config, LogFormat},
    proto,
    store::{Store, testing},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

pub use coordinator::store::testing::TestDb;

pub type Client = coordinator_worker::client::Client;

/// The `coordctl` binary of this build. It belongs to the workspace's `coordctl` crate, which
/// `cargo test` at the workspace root builds beside this package's binaries.
pub fn coordctl_bin() -> std::path::PathBuf {
    static CHECKED: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    CHECKED.get_or_init(checked_coordctl).clone()
}

fn checked_coordctl() -> std::path::PathBuf {
    let p = std::path::Path::new(env!("CARGO_BIN_EXE_coordinator"))
        .with_file_name(format!("coordctl{}", std::env::consts::EXE_SUFFIX));
    assert!(
        p.is_file(),
        "{} is missing: run the tests from the workspace root (`cargo test`), which builds coordctl too",
        p.display()
    );
    // `cargo test --test x` builds this package's targets only: a coordctl older than its
    // sources would be tested as it was.
    let built = std::fs::metadata(&p).and_then(|m| m.modified()).expect("coordctl's mtime");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for dir in ["crates/coordctl/src", "crates/worker/src", "crates/proto/src", "proto"] {
        if let Some(newer) = newer_than(&root.join(dir), built) {
            panic!(
                "{} is older than {}: build it first (`cargo build -p coordctl`, or `cargo test` with no target)",
                p.display(),
                newer.display()
            );
        }
    }
    p
}

/// A file under `dir` modified after `t`, if any.
fn newer_than(dir: &std::path::Path, t: std::time::SystemTime) -> Option<std::path::PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if let Some(p) = newer_than(&path, t) {
                return Some(p);
            }
        } else if entry.metadata().and_then(|m| m.modified()).is_ok_and(|m| m > t) {
            return Some(path);
        }
    }
    None
}

/// Runs `$name(&TestDb)` as two tests: `$name::sqlite` and `$name::postgres` (reported ignored
/// without `TEST_DATABASE_URL`).
#[allow(unused_macros)]
macro_rules! on_every_backend {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                let db = super::TestDb::sqlite().await;
                super::$name(&db).await;
                db.cleanup().await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            #[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
            async fn postgres() {
                let db = super::TestDb::postgres().await.expect("TEST_DATABASE_URL is set");
                super::$name(&db).await;
                db.cleanup().await;
            }
        }
    };
}

/// Short timings so time-based behaviour shows up in tests without long waits.
pub fn test_config(url: &str) -> Config {
    let mut c = Config::default();
    c.coordinator.id = "coordinator-test".into();
    c.coordinator.bind_address = [127, 0, 0, 1].into();
    c.coordinator.poll_interval = Duration::from_millis(200);
    // Raw workers in tests do not heartbeat unless told to: only the tests about liveness use
    // short heartbeat timeouts, so a slow machine cannot turn a quiet worker SUSPECT mid-test.
    c.coordinator.heartbeat_timeout = Duration::from_secs(30);
    c.coordinator.stale_task_timeout = Duration::from_secs(60);
    c.coordinator.cleanup_interval = Duration::from_millis(500);
    c.coordinator.shutdown_timeout = Duration::from_secs(5);
    c.database = testing::db_config(url);
    c.tasks.retry_backoff_base = Duration::from_millis(50);
    c.tasks.retry_backoff_max = Duration::from_millis(400);
    c.logging.level = std::env::var("TEST_LOG").unwrap_or_else(|_| "warn".into());
    c.logging.format = LogFormat::Text;
    c.auth.enabled = false;
    c
}

/// A coordinator running in this process.
pub struct TestCoordinator {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub store: Store,
    shutdown: CancellationToken,
    handle: JoinHandle<anyhow::Result<()>>,
}

impl TestCoordinator {
    pub async fn start(db: &TestDb, tweak: impl FnOnce(&mut Config)) -> TestCoordinator {
        Self::start_url(&db.url, tweak).await
    }

    pub async fn start_url(url: &str, tweak: impl FnOnce(&mut Config)) -> TestCoordinator {
        Self::start_at(url, "127.0.0.1:0", tweak).await
    }

    /// A coordinator whose gRPC server listens on `grpc` (a replica started again where another
    /// stopped, as behind a Service).
    pub async fn start_at(url: &str, grpc: &str, tweak: impl FnOnce(&mut Config)) -> TestCoordinator {
        let mut config = test_config(url);
        tweak(&mut config);
        config.validate().expect("test config is valid");
        if std::env::var("TEST_LOG").is_ok() {
            coordinator::telemetry::init(&config.logging);
        }
        let app = App::connect(config).await.expect("coordinator connects");
        let store = app.store().clone();
        let grpc_listener = TcpListener::bind(grpc).await.unwrap();
        let http_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc = grpc_listener.local_addr().unwrap();
        let http = http_listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(app.serve(grpc_listener, http_listener, shutdown.clone()));
        let tc = TestCoordinator { grpc, http, store, shutdown, handle };
        wait_until("coordinator answers /health/live", Duration::from_secs(10), || async {
            http_get(tc.http, "/health/live").await.map(|(code, _)| code == 200).unwrap_or(false)
        })
        .await;
        tc
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.grpc)
    }

    pub async fn client(&self) -> Client {
        client(&self.endpoint()).await
    }

    /// Begins a graceful shutdown without waiting for it; [`TestCoordinator::stop`] waits.
    pub fn begin_stop(&self) {
        self.shutdown.cancel();
    }

    /// Graceful shutdown; returns what `serve` returned.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.handle.await.expect("serve task")
    }
}

pub async fn client(endpoint: &str) -> Client {
    let security = coordinator_worker::client::ClientSecurity::default();
    coordinator_worker::client::connect_lazy(
        endpoint,
        &security,
        coordinator_worker::client::DEFAULT_MAX_MESSAGE,
    )
    .unwrap()
}

/// Waits until `check` is true, polling every 20 ms; panics naming `what` after `limit`.
pub async fn wait_until<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return;
        }
        if start.elapsed() > limit {
            panic!("timed out after {limit:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// coordctl against `endpoint` with `args`, no token from the environment, no stdin.
pub fn coordctl_command(endpoint: &str, args: &[&str]) -> std::process::Command {
    let mut c = std::process::Command::new(coordctl_bin());
    c.arg("--coordinator")
        .arg(endpoint)
        .args(args)
        .env_remove("COORDCTL_TOKEN")
        .env_remove("COORDCTL_TOKEN_FILE")
        .stdin(std::process::Stdio::null());
    c
}

pub fn coordctl(endpoint: &str, args: &[&str]) -> std::process::Output {
    coordctl_command(endpoint, args).output().expect("run coordctl")
}

/// Runs coordctl off the test's runtime threads.
pub async fn coordctl_async(endpoint: &str, args: &[&str]) -> std::process::Output {
    let endpoint = endpoint.to_owned();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        coordctl(&endpoint, &args)
    })
    .await
    .unwrap()
}

/// A command's exit code and output, for an assertion message.
pub fn text(out: &std::process::Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// One HTTP/1.1 request with a JSON body on a fresh connection: (status, body).
pub async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    http_request(addr, method, path, body).await.expect("an HTTP answer")
}

/// Scrapes `/metrics` until `done` holds of the text (within a minute), and returns it.
pub async fn scrape_until(addr: std::net::SocketAddr, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (code, body) = http_get(addr, "/metrics").await.unwrap();
        assert_eq!(code, 200);
        if done(&body) {
            return body;
        }
        assert!(std::time::Instant::now() < deadline, "timed out waiting until {what}\n{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A GET over a fresh HTTP/1.1 connection: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, "GET", path, "").await
}

/// A request with a JSON body (none when empty) over a fresh HTTP/1.1 connection: (status,
/// body).
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let head = if body.is_empty() {
        String::new()
    } else {
        format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len())
    };
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{head}\r\n{body}").as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .map_err(|_| std::io::Error::other("http read timed out"))??;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    // Undo chunked transfer encoding if present.
    let body =
        if text.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(&body) } else { body };
    Ok((code, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A worker driven step by step by the test: it registers, holds a task stream, and does
/// nothing else (no heartbeats, no reports) unless the test says so.
pub struct RawWorker {
    pub id: String,
    pub client: Client,
    rx: tokio::sync::mpsc::UnboundedReceiver<Result<proto::TaskAssignment, tonic::Status>>,
    reader: JoinHandle<()>,
}

impl RawWorker {
    pub async fn connect(endpoint: &str, id: &str, max: u32, capabilities: &[&str]) -> RawWorker {
        let mut client = client(endpoint).await;
        client
            .register_worker(proto::RegisterWorkerRequest {
                worker_id: id.into(),
                max_concurrent_tasks: max,
                capabilities: capabilities.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            })
            .await
            .expect("register");
        let mut stream = client
            .receive_tasks(proto::ReceiveTasksRequest { worker_id: id.into(), ..Default::default() })
            .await
            .expect("open task stream")
            .into_inner();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            loop {
                match stream.message().await {
                    Ok(Some(m)) => {
                        if tx.send(Ok(m)).is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(s) => {
                        let _ = tx.send(Err(s));
                        return;
                    }
                }
            }
        });
        RawWorker { id: id.into(), client, rx, reader }
    }

    /// The next message on the stream, or `None` if none arrives within `limit`.
    pub async fn next_within(
        &mut self,
        limit: Duration,
    ) -> Option<Result<proto::TaskAssignment, tonic::Status>> {
        tokio::time::timeout(limit, self.rx.recv()).await.ok().flatten()
    }

    /// The next assignment; panics if none arrives within `limit`.
    pub async fn next(&mut self, limit: Duration) -> proto::TaskAssignment {
        match self.next_within(limit).await {
            Some(Ok(a)) => a,
            Some(Err(s)) => panic!("{}: stream error {s:?}", self.id),
            None => panic!("{}: no assignment within {limit:?}", self.id),
        }
    }

    pub async fn heartbeat(
        &mut self,
        running: &[(&str, u32)],
    ) -> Result<proto::HeartbeatResponse, tonic::Status> {
        self.client
            .send_heartbeat(proto::HeartbeatRequest {
                worker_id: self.id.clone(),
                running_tasks: running
                    .iter()
                    .map(|(t, a)| proto::RunningTask { task_id: t.to_string(), attempt: *a })
                    .collect(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
    }

    pub async fn complete(
        &mut self,
        task_id: &str,
        attempt: u32,
        result: &[u8],
    ) -> Result<proto::ReportResponse, tonic::Status> {
        self.complete_held(task_id, attempt, result, 0).await
    }

    /// [`RawWorker::complete`], saying how long the worker held the attempt.
    pub async fn complete_held(
        &mut self,
        task_id: &str,
        attempt: u32,
        result: &[u8],
        held_ms: u64,
    ) -> Result<proto::ReportResponse, tonic::Status> {
        self.client
            .report_completion(proto::ReportCompletionRequest {
                worker_id: self.id.clone(),
                task_id: task_id.into(),
                attempt,
                result: result.to_vec(),
                held_ms,
            })
            .await
            .map(|r| r.into_inner())
    }

    pub async fn fail(
        &mut self,
        task_id: &str,
        attempt: u32,
        retriable: bool,
    ) -> Result<proto::ReportResponse, tonic::Status> {
        self.client
            .report_failure(proto::ReportFailureRequest {
                worker_id: self.id.clone(),
                task_id: task_id.into(),
                attempt,
                error: "boom".into(),
                retriable,
                release: false,
                held_ms: 0,
            })
            .await
            .map(|r| r.into_inner())
    }

    /// Heartbeats (with no running tasks) every `every` in the background, so the worker stays
    /// ACTIVE under short heartbeat timeouts. Stops when the handle is aborted or dropped with
    /// the test's runtime.
    pub fn keep_alive(&self, every: Duration) -> JoinHandle<()> {
        keep_alive(self.client.clone(), &self.id, every)
    }

    /// Drops the stream (as a crashed worker would).
    pub fn disconnect(self) {
        self.reader.abort();
    }
}

/// Heartbeats worker `id` (with no running tasks) through `client` every `every` in the
/// background, the first at once; stops when the handle is aborted or dropped with the test's
/// runtime.
pub fn keep_alive(mut client: Client, id: &str, every: Duration) -> JoinHandle<()> {
    let id = id.to_owned();
    tokio::spawn(async move {
        loop {
            let _ = client
                .send_heartbeat(proto::HeartbeatRequest { worker_id: id.clone(), ..Default::default() })
                .await;
            tokio::time::sleep(every).await;
        }
    })
}

pub async fn submit(client: &mut Client, task_type: &str, payload: &[u8]) -> String {
    client
        .submit_task(proto::SubmitTaskRequest {
            task_type: task_type.into(),
            payload: payload.to_vec(),
            ..Default::default()
        })
        .await
        .expect("submit")
        .into_inner()
        .task_id
}

/// Submits a task of `task_type` that must end within `timeout_ms` of its assignment; its id.
pub async fn submit_with_timeout(client: &mut Client, task_type: &str, timeout_ms: u64) -> String {
    let req = proto::SubmitTaskRequest { task_type: task_type.into(), timeout_ms, ..Default::default() };
    client.submit_task(req).await.expect("submit").into_inner().task_id
}

/// Submits `n` tasks of `task_type` in one batch, the i-th with `payload(i)`; their ids, in order.
pub async fn submit_batch(
    client: &mut Client,
    task_type: &str,
    n: usize,
    payload: impl Fn(usize) -> Vec<u8>,
) -> Vec<String> {
    let tasks = (0..n)
        .map(|i| proto::SubmitTaskRequest {
            task_type: task_type.into(),
            payload: payload(i),
            ..Default::default()
        })
        .collect();
    client
        .submit_tasks(proto::SubmitTasksRequest { tasks })
        .await
        .expect("submit a batch")
        .into_inner()
        .results
        .into_iter()
        .map(|r| r.task_id)
        .collect()
}

/// The value of one series, e.g. `grpc_server_handled_total{grpc_method="SubmitTask",grpc_code="OK"}`
/// (labels in the order the exporter writes them); 0 when absent.
pub fn sample(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

pub async fn get_task(client: &mut Client, id: &str) -> proto::Task {
    client
        .get_task(proto::GetTaskRequest { task_id: id.into(), ..Default::default() })
        .await
        .expect("get task")
        .into_inner()
}

pub async fn task_status(client: &mut Client, id: &str) -> proto::TaskStatus {
    proto::TaskStatus::try_from(get_task(client, id).await.status).unwrap()
}

/// Waits until the worker has an open stream on the coordinator (so pushes reach it).
pub async fn wait_connected(client: &Client, ids: &[&str]) {
    let ids: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
    wait_until("workers are connected", Duration::from_secs(10), || {
        let mut client = client.clone();
        let ids = ids.clone();
        async move {
            let Ok(resp) = client.list_workers(proto::ListWorkersRequest::default()).await else {
                return false;
            };
            let workers = resp.into_inner().workers;
            ids.iter().all(|id| workers.iter().any(|w| &w.worker_id == id && w.connected))
        }
    })
    .await;
}

pub async fn worker_state(client: &mut Client, id: &str) -> proto::WorkerState {
    let workers = client
        .list_workers(proto::ListWorkersRequest::default())
        .await
        .expect("list workers")
        .into_inner()
        .workers;
    let w = workers.into_iter().find(|w| w.worker_id == id).expect("worker listed");
    proto::WorkerState::try_from(w.state).unwrap()
}

/// `N` distinct loopback ports that are free now, for a child process to bind. They are picked
/// below the kernel's ephemeral range (`net.ipv4.ip_local_port_range`), where no outgoing
/// connection is given a local port: a port from that range (what binding port 0 hands out)
/// could be taken by some connection between the pick and the child's bind, which made a
/// replica fail to start with "Address already in use". A port is handed out once per test
/// process; the probing listeners are held until every port is picked.
pub fn free_ports<const N: usize>() -> [u16; N] {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let ephemeral_from = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = (20_000u16, ephemeral_from.min(32_768));
    assert!(high > low + 1_000, "no room for test ports below the ephemeral range ({ephemeral_from})");
    let span = u32::from(high - low);
    // Each process starts somewhere else in the range: test processes running side by side
    // rarely probe the same ports at the same moment.
    let seed = std::process::id().wrapping_mul(2_654_435_761)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let mut held = Vec::with_capacity(N);
    for i in 0..span {
        if held.len() == N {
            break;
        }
        let port = low + ((seed.wrapping_add(i)) % span) as u16;
        if given.contains(&port) {
            continue;
        }
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            held.push(l);
            given.push(port);
        }
    }
    assert_eq!(held.len(), N, "no {N} free ports in {low}..{high}");
    std::array::from_fn(|i| held[i].local_addr().expect("a bound port").port())
}
