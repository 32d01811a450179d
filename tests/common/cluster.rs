//! Real processes for the chaos suite: coordinator replicas and workers started from the built
//! binaries, a round-robin TCP proxy in front of the replicas (a Kubernetes Service in small),
//! a Postgres server of the test's own that it may stop and restart, and the checks that read
//! the outcome from the database itself.
//!
//! Every process is killed (SIGKILL) and reaped when its guard drops, on panic too.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use coordinator::proto;
use sqlx::{Connection, PgPool, postgres::PgPoolOptions};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::common::{Client, client, http_get};

fn ms(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// A child process that is killed and reaped when dropped.
pub struct Proc {
    pub name: String,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Proc {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("open log file");
        let err = out.try_clone().unwrap();
        cmd.stdout(Stdio::from(out)).stderr(Stdio::from(err)).stdin(Stdio::null());
        // The test's environment must not override the configuration files.
        for var in
            ["DATABASE_URL", "RUST_LOG", "COORDINATOR_ID", "WORKER_COORDINATOR", "WORKER_ID", "WORKER_TOKEN"]
        {
            cmd.env_remove(var);
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Proc { name: name.to_owned(), log, child: Some(child) }
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits up to `limit` for the process to exit: its exit status, or `None`
    /// when it still ran at `limit` (it is then killed).
    pub async fn terminate(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        // SAFETY: kill(2) on the pid of a child this guard owns and has not reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.kill9();
        None
    }

    /// The last `n` lines of its log.
    pub fn tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() && self.child.is_some() {
            eprintln!("--- last lines of {} ---\n{}", self.name, self.tail(10));
        }
        self.kill9();
    }
}

/// Timings of a replica; short so liveness shows within seconds.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    pub heartbeat_timeout: Duration,
    pub stale_task_timeout: Duration,
    pub cleanup_interval: Duration,
    pub poll_interval: Duration,
    /// `grpc.max_connection_age` and its grace; `None`: 30 minutes (never within a test).
    pub connection_age: Option<(Duration, Duration)>,
}

impl Default for Timings {
    fn default() -> Self {
        Timings {
            heartbeat_timeout: Duration::from_secs(1),
            stale_task_timeout: Duration::from_secs(4),
            cleanup_interval: Duration::from_millis(500),
            poll_interval: Duration::from_secs(1),
            connection_age: None,
        }
    }
}

/// One coordinator replica as a process of the `coordinator` binary, on fixed loopback ports
/// so it can be restarted where it was.
pub struct Replica {
    pub id: String,
    pub grpc: u16,
    pub http: u16,
    config: PathBuf,
    log: PathBuf,
    pub proc: Option<Proc>,
}

impl Replica {
    pub fn new(dir: &Path, id: &str, url: &str, t: Timings) -> Replica {
        Replica::with_yaml(dir, id, url, t, "")
    }

    /// As [`Replica::new`], with `extra` (whole top-level sections of YAML) appended to its
    /// configuration file.
    pub fn with_yaml(dir: &Path, id: &str, url: &str, t: Timings, extra: &str) -> Replica {
        let [grpc, http] = crate::common::free_ports();
        let (age, grace) = t.connection_age.unwrap_or((Duration::from_secs(1800), Duration::from_secs(60)));
        let yaml = format!(
            "coordinator:
  id: {id}
  bind_address: 127.0.0.1
  grpc_port: {grpc}
  http_port: {http}
  poll_interval: {poll}
  heartbeat_timeout: {hb}
  stale_task_timeout: {stale}
  cleanup_interval: {cleanup}
  shutdown_timeout: 5s
database:
  url: {url:?}
  max_open_conns: 8
  max_idle_conns: 1
  acquire_timeout: 2s
tasks:
  retry_backoff_base: 200ms
  retry_backoff_max: 1s
grpc:
  max_connection_age: {age}
  max_connection_age_grace: {grace}
logging:
  level: info,sqlx=warn,h2=warn,tonic=warn,hyper=warn
  format: json
auth:
  enabled: false
{extra}",
            poll = ms(t.poll_interval),
            hb = ms(t.heartbeat_timeout),
            stale = ms(t.stale_task_timeout),
            cleanup = ms(t.cleanup_interval),
            age = ms(age),
            grace = ms(grace),
        );
        let config = dir.join(format!("{id}.yaml"));
        std::fs::write(&config, yaml).unwrap();
        Replica { id: id.to_owned(), grpc, http, config, log: dir.join(format!("{id}.log")), proc: None }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc)
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        ([127, 0, 0, 1], self.grpc).into()
    }

    pub fn http_addr(&self) -> SocketAddr {
        ([127, 0, 0, 1], self.http).into()
    }

    /// Starts the process and waits until `/health` answers 200.
    pub async fn start(&mut self) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_coordinator"));
        cmd.arg("-config").arg(&self.config);
        self.proc = Some(Proc::spawn(&self.id, cmd, self.log.clone()));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.health().await == Some(200) {
                return;
            }
            let proc = self.proc.as_mut().unwrap();
            assert!(proc.alive(), "{} exited at start-up:\n{}", self.id, proc.tail(20));
            assert!(Instant::now() < deadline, "{} not healthy within 30s:\n{}", self.id, proc.tail(20));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The status of `GET /health`, `None` when it does not answer.
    pub async fn health(&self) -> Option<u16> {
        match tokio::time::timeout(Duration::from_secs(3), http_get(self.http_addr(), "/health")).await {
            Ok(Ok((code, _))) => Some(code),
            _ => None,
        }
    }

    /// The slot corrections this replica's reconciliation made (`superseded_session` left out:
    /// a worker moving away is normal), read off `/metrics`; `None` when it does not answer.
    pub async fn slot_corrections(&self) -> Option<u64> {
        let (_, body) = tokio::time::timeout(Duration::from_secs(3), http_get(self.http_addr(), "/metrics"))
            .await
            .ok()?
            .ok()?;
        Some(
            body.lines()
                .filter(|l| l.starts_with("coordinator_inflight_corrections_total{"))
                .filter(|l| !l.contains("superseded_session"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>() as u64,
        )
    }

    pub fn kill9(&mut self) {
        if let Some(p) = self.proc.as_mut() {
            p.kill9();
        }
        self.proc = None;
    }

    /// SIGTERM (a graceful stop, as Kubernetes sends before it replaces a pod) and the exit
    /// status within `limit` (see [`Proc::terminate`]).
    pub async fn terminate(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let status = self.proc.as_mut()?.terminate(limit).await;
        self.proc = None;
        status
    }
}

/// A worker process of the `worker` binary with the `sleep` and `noop` handlers.
pub fn spawn_worker(dir: &Path, id: &str, coordinator: &str, max_concurrent: u32) -> Proc {
    spawn_worker_with(dir, id, coordinator, max_concurrent, "")
}

/// As [`spawn_worker`], with `extra` (whole top-level sections of YAML, e.g. `labels:`)
/// appended to its configuration file.
pub fn spawn_worker_with(dir: &Path, id: &str, coordinator: &str, max_concurrent: u32, extra: &str) -> Proc {
    let config = dir.join(format!("{id}.yaml"));
    let yaml = format!(
        "coordinator: {coordinator:?}
worker_id: {id}
max_concurrent: {max_concurrent}
handlers: [sleep, noop]
drain_grace: 5s
backoff_base: 100ms
backoff_max: 1s
logging:
  level: info,h2=warn,tonic=warn,hyper=warn,coordinator_worker::resend=debug
  format: json
{extra}"
    );
    std::fs::write(&config, yaml).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_worker"));
    cmd.arg("-config").arg(&config);
    Proc::spawn(id, cmd, dir.join(format!("{id}.log")))
}

/// A TCP proxy on 127.0.0.1:0 in front of the replicas that hands each new connection to the
/// next backend in turn (round-robin, as a Kubernetes Service in IPVS `rr` mode), or to the one
/// after it when that backend refuses. The suite puts one in front of each worker, so every
/// reconnection of a worker lands on the other replica: each aged connection is a move. (One
/// proxy shared by all workers is no good: workers that reconnect in step, an even number per
/// round, land on the same replica every time.)
pub struct Proxy {
    pub addr: SocketAddr,
    /// Backend index of every connection relayed so far, in order. A std mutex: plain state,
    /// locked only to push or copy, never across an await.
    history: Arc<std::sync::Mutex<Vec<usize>>>,
    /// Cancelled on drop: ends the accept loop and every relayed connection.
    stop: CancellationToken,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// A proxy whose first connection goes to `backends[first % len]`.
    pub async fn start(backends: Vec<SocketAddr>, first: usize) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let history = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (stop2, history2) = (stop.clone(), history.clone());
        let accept = tokio::spawn(async move {
            let mut next = first;
            loop {
                let (mut inbound, _) = tokio::select! {
                    biased;
                    _ = stop2.cancelled() => return,
                    r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
                };
                let first = next;
                next += 1;
                let (backends, history, stop) = (backends.clone(), history2.clone(), stop2.clone());
                tokio::spawn(async move {
                    for k in 0..backends.len() {
                        let i = (first + k) % backends.len();
                        let connect = tokio::net::TcpStream::connect(backends[i]);
                        let Ok(Ok(mut outbound)) =
                            tokio::time::timeout(Duration::from_secs(1), connect).await
                        else {
                            continue;
                        };
                        let _ = outbound.set_nodelay(true);
                        let _ = inbound.set_nodelay(true);
                        history.lock().unwrap_or_else(|e| e.into_inner()).push(i);
                        tokio::select! {
                            _ = stop.cancelled() => {}
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        }
                        return;
                    }
                });
            }
        });
        Proxy { addr, history, stop, accept }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn history(&self) -> Vec<usize> {
        self.history.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Connections relayed to each of `n` backends.
    pub fn counts(&self, n: usize) -> Vec<usize> {
        let mut out = vec![0; n];
        for i in self.history() {
            out[i] += 1;
        }
        out
    }

    /// How many times a new connection went to another backend than the one before it.
    pub fn moves(&self) -> usize {
        self.history().windows(2).filter(|p| p[0] != p[1]).count()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.accept.abort();
    }
}

/// A Postgres server of the test's own (initdb into a temporary directory, its own port, trust
/// auth, loopback only), which the test may stop and start. Stopped when dropped.
pub struct OwnPostgres {
    pub port: u16,
    bin: PathBuf,
    data: PathBuf,
    dir: tempfile::TempDir,
}

impl OwnPostgres {
    /// The newest `/usr/lib/postgresql/<version>/bin` holding `pg_ctl`.
    pub fn bin_dir() -> Option<PathBuf> {
        let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let v: u32 = e.file_name().to_str()?.split('.').next()?.parse().ok()?;
                let bin = e.path().join("bin");
                bin.join("pg_ctl").exists().then_some((v, bin))
            })
            .collect();
        found.sort();
        found.pop().map(|(_, b)| b)
    }

    fn command(&self, program: &str) -> Command {
        let exe = self.bin.join(program);
        // initdb and postgres refuse to run as root: run them as the postgres OS user.
        if unsafe { libc::geteuid() } == 0 {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    fn run(&self, program: &str, args: &[&str]) {
        let out =
            self.command(program).args(args).stdin(Stdio::null()).output().expect("run a postgres tool");
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn init() -> OwnPostgres {
        let bin = Self::bin_dir().expect("postgres server binaries");
        let dir = tempfile::Builder::new().prefix("chaos-pg").tempdir().unwrap();
        let data = dir.path().join("data");
        if unsafe { libc::geteuid() } == 0 {
            let ok = Command::new("chown").arg("-R").arg("postgres:postgres").arg(dir.path()).status();
            assert!(ok.map(|s| s.success()).unwrap_or(false), "chown the postgres directory");
        }
        let [port] = crate::common::free_ports();
        let pg = OwnPostgres { port, bin, data, dir };
        pg.run(
            "initdb",
            &["-D", pg.data.to_str().unwrap(), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"],
        );
        pg.start();
        pg
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn start(&self) {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c fsync=off -c max_connections=100",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("postgres.log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                self.data.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-o",
                &opts,
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
    }

    pub fn stop(&self) {
        self.run("pg_ctl", &["-D", self.data.to_str().unwrap(), "-m", "fast", "-w", "-t", "60", "stop"]);
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .args(["-D", self.data.to_str().unwrap(), "-m", "immediate", "-w", "stop"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A fresh schema on the server of `base` and a URL whose connections use it.
pub async fn fresh_schema(base: &str) -> (String, String) {
    coordinator::store::testing::create_schema(base, "chaos").await
}

/// Drops its schema when it goes out of scope, on panic too (after the processes using it were
/// killed, when it is declared after them).
pub struct SchemaGuard {
    pub base: String,
    pub schema: String,
}

impl Drop for SchemaGuard {
    fn drop(&mut self) {
        let (base, schema) = (self.base.clone(), self.schema.clone());
        // A runtime of its own on a thread of its own: this may run inside the test's runtime.
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                rt.block_on(drop_schema(&base, &schema));
            }
        })
        .join();
    }
}

pub async fn drop_schema(base: &str, schema: &str) {
    if let Ok(mut conn) = sqlx::PgConnection::connect(base).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
            .execute(&mut conn)
            .await;
        conn.close().await.ok();
    }
}

/// A small pool for the checks; connections are made on demand so it survives a restart of the
/// server.
pub fn check_pool(url: &str) -> PgPool {
    PgPoolOptions::new()
        .max_connections(2)
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(3))
        .connect_lazy(url)
        .expect("a valid database URL")
}

/// What the database says about a run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub tasks: i64,
    pub completed: i64,
    pub failed: i64,
    /// Tasks neither completed nor failed.
    pub unfinished: i64,
    /// Sum of `tasks.failures`: attempts charged against `max_attempts`.
    pub failures: i64,
    /// `task_attempts` rows with a charged outcome: `lease_expired`, `worker_dead` or
    /// `worker_restarted`.
    pub taken_back: i64,
    /// Completed tasks whose completing attempt had also lost the task (an attempt row closes
    /// it: taken back, failed, cancelled): a second acceptance. A completion writes only the
    /// task's row.
    pub accepted_twice: i64,
    /// Attempts in all: the tasks' attempt counters summed (one per assignment).
    pub attempts: i64,
}

impl Tally {
    pub async fn read(pool: &PgPool) -> Result<Tally, sqlx::Error> {
        let (tasks, completed, failed, failures, attempts): (i64, i64, i64, i64, i64) = sqlx::query_as(
            "SELECT count(*),
                    count(*) FILTER (WHERE status = 'completed'),
                    count(*) FILTER (WHERE status = 'failed'),
                    COALESCE(sum(failures), 0)::bigint,
                    COALESCE(sum(attempt), 0)::bigint
             FROM tasks",
        )
        .fetch_one(pool)
        .await?;
        let (taken_back,): (i64,) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE outcome IN ('lease_expired', 'worker_dead', 'worker_restarted'))
             FROM task_attempts",
        )
        .fetch_one(pool)
        .await?;
        let (accepted_twice,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM tasks t JOIN task_attempts a ON a.task_id = t.id AND a.attempt = t.attempt
             WHERE t.status = 'completed'",
        )
        .fetch_one(pool)
        .await?;
        Ok(Tally {
            tasks,
            completed,
            failed,
            unfinished: tasks - completed - failed,
            failures,
            taken_back,
            accepted_twice,
            attempts,
        })
    }

    /// One line with the figures, for the log of the run.
    pub fn line(&self, scenario: &str, extra: &str) -> String {
        format!(
            "chaos {scenario}: tasks={} completed={} failed={} unfinished={} charged_attempts={} \
             taken_back_attempts={} accepted_twice={} attempts={} {extra}",
            self.tasks,
            self.completed,
            self.failed,
            self.unfinished,
            self.failures,
            self.taken_back,
            self.accepted_twice,
            self.attempts
        )
    }
}

/// Waits until `expected` tasks exist and none is pending, assigned or running (or `limit`
/// passes); returns the last tally read.
pub async fn wait_settled(pool: &PgPool, expected: i64, limit: Duration) -> Tally {
    let deadline = Instant::now() + limit;
    let mut last = Tally::default();
    loop {
        if let Ok(t) = Tally::read(pool).await {
            last = t;
            if t.tasks >= expected && t.unfinished == 0 {
                return t;
            }
        }
        if Instant::now() >= deadline {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `sleep` tasks, each with an idempotency key `<prefix>-<i>`.
pub fn sleep_tasks(
    prefix: &str,
    durations_ms: impl IntoIterator<Item = u64>,
) -> Vec<proto::SubmitTaskRequest> {
    durations_ms
        .into_iter()
        .enumerate()
        .map(|(i, ms)| proto::SubmitTaskRequest {
            task_type: "sleep".into(),
            payload: format!("{{\"ms\":{ms}}}").into_bytes(),
            idempotency_key: format!("{prefix}-{i}"),
            ..Default::default()
        })
        .collect()
}

fn retriable(status: &tonic::Status) -> bool {
    use tonic::Code::*;
    matches!(status.code(), Unavailable | Unknown | Cancelled | DeadlineExceeded | Internal | Aborted)
}

/// Submits `tasks` in batches of `batch`, alternating between the replicas; a batch that meets
/// an unavailable replica or a broken connection is sent again (same idempotency keys) to the
/// other one until `limit`. Returns the task ids in order.
pub async fn submit_all(
    clients: &[Client],
    tasks: Vec<proto::SubmitTaskRequest>,
    batch: usize,
    limit: Duration,
) -> Vec<String> {
    let deadline = Instant::now() + limit;
    let mut ids = Vec::with_capacity(tasks.len());
    for (n, chunk) in tasks.chunks(batch).enumerate() {
        let mut target = n;
        loop {
            let mut c = clients[target % clients.len()].clone();
            let req = proto::SubmitTasksRequest { tasks: chunk.to_vec() };
            match tokio::time::timeout(Duration::from_secs(10), c.submit_tasks(req)).await {
                Ok(Ok(resp)) => {
                    ids.extend(resp.into_inner().results.into_iter().map(|r| r.task_id));
                    break;
                }
                Ok(Err(s)) if !retriable(&s) => panic!("submission refused: {s:?}"),
                Ok(Err(_)) | Err(_) => {
                    assert!(Instant::now() < deadline, "submission did not get through within {limit:?}");
                    target += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    ids
}

/// Clients straight to each replica.
pub async fn clients(replicas: &[&Replica]) -> Vec<Client> {
    let mut out = Vec::new();
    for r in replicas {
        out.push(client(&r.endpoint()).await);
    }
    out
}

/// Percentile (0..=100) of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}
