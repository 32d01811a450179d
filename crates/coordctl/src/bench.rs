//! `coordctl bench`: a load generator. It starts W workers as real gRPC streams (in this
//! process, with a no-op handler) against a running coordinator, or against one it starts
//! in-process (`--embedded`, on SQLite or `--database-url`), then measures:
//!
//! - a trickle phase with idle workers: one task at a time, submit -> worker start latency;
//! - a bulk phase: N tasks submitted in jobs of `batch`, submit rate, end-to-end tasks/s (first
//!   submit to last accepted report), and submit -> worker start latency percentiles; as fast as
//!   the coordinator takes them (a backlog), or paced at `rate` tasks/s (a fleet that keeps up,
//!   where a task is assigned as it is stored);
//!
//! and checks that every task completed and was accepted exactly once.
//!
//! Its tasks are of a type of the run's own (`bench-noop-<run id>`) that only its workers
//! declare, so other workers of the coordinator (`coordinator dev` runs `noop`) never take them.
//! The workers deregister when the run ends, whether it succeeded or failed.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

#[cfg(feature = "embedded")]
use coordinator::store::Store;
use coordinator_worker::{
    Worker, WorkerCounters, WorkerOptions,
    client::{Client, ClientSecurity},
    handler_fn, proto,
};

/// Without the `embedded` feature there is no in-process coordinator, hence no database to
/// audit: no value of this type exists.
#[cfg(not(feature = "embedded"))]
enum Store {}

#[cfg(not(feature = "embedded"))]
impl Store {
    fn backend(&self) -> &'static str {
        match *self {}
    }

    async fn audit(&self) -> anyhow::Result<Audit> {
        match *self {}
    }
}

/// What the database says of a run (the `embedded` feature's store returns its own).
#[cfg(not(feature = "embedded"))]
struct Audit {
    tasks: u64,
    completed: u64,
    accepted_twice: u64,
}

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub tasks: usize,
    pub workers: usize,
    /// Tasks each worker runs at once.
    pub concurrency: u32,
    /// Assignments each worker queues beyond its slots.
    pub prefetch: u32,
    /// Tasks per submission (one job each, unless `no_jobs`).
    pub batch: usize,
    /// Submit the bulk phase with SubmitTasks, tasks outside any job.
    pub no_jobs: bool,
    /// Submit the bulk phase at this many tasks per second, its batches evenly spaced, each sent
    /// when due whether or not those before it were answered (one after the other, as fast as
    /// the coordinator answers, when absent).
    pub rate: Option<f64>,
    /// Tasks in the one-at-a-time latency phase.
    pub trickle: usize,
    /// A running coordinator (`http://host:9090`); ignored with `embedded`.
    pub endpoint: String,
    /// Start a coordinator in this process.
    pub embedded: bool,
    /// Database of the embedded coordinator (default: SQLite in a temporary directory).
    #[cfg_attr(not(feature = "embedded"), allow(dead_code))]
    pub database_url: Option<String>,
    /// Token and TLS towards a remote coordinator. The token needs the admin role (the
    /// benchmark submits, lists workers and runs workers); ignored with `embedded`.
    pub security: ClientSecurity,
    /// The remote coordinator's database, read only for its statistics (writes, commits, WAL
    /// and statements per task); the embedded coordinator's own database otherwise.
    #[cfg_attr(not(feature = "embedded"), allow(dead_code))]
    pub stats_database_url: Option<String>,
    /// The remote coordinator's process, for its CPU time per task (this process when embedded).
    pub coordinator_pid: Option<u32>,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    pub samples: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    pub fn of(mut v: Vec<Duration>) -> Percentiles {
        if v.is_empty() {
            return Percentiles::default();
        }
        v.sort();
        let at = |p: f64| {
            let i = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
            v[i].as_secs_f64() * 1000.0
        };
        Percentiles {
            samples: v.len(),
            p50_ms: at(0.50),
            p90_ms: at(0.90),
            p99_ms: at(0.99),
            max_ms: at(1.0),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub backend: String,
    pub tasks: usize,
    pub workers: usize,
    /// Slots per worker.
    pub concurrency: u32,
    /// Tasks the fleet runs at once: workers x slots.
    pub total_concurrency: u64,
    /// Assignments each worker queues beyond its slots.
    pub prefetch: u32,
    pub batch: usize,
    /// Whether each batch of the bulk phase was a job (else tasks outside any job).
    pub jobs: bool,
    /// The pace of the bulk phase's submissions, tasks/s (absent: as fast as answered).
    pub rate: Option<f64>,
    pub submit_seconds: f64,
    pub submit_per_second: f64,
    pub end_to_end_seconds: f64,
    pub end_to_end_per_second: f64,
    pub latency: Percentiles,
    pub trickle_latency: Percentiles,
    pub accepted: u64,
    pub duplicates: u64,
    pub refused: u64,
    /// Handler runs (a task may run twice if a lease was lost; it is accepted once).
    pub runs: u64,
    pub exactly_once: bool,
    pub verification: String,
    /// What the bulk phase cost, per task.
    pub cost: Cost,
}

/// What the bulk phase cost per task: in the database (from its statistics views) and in CPU
/// time. A figure that could not be read is absent, and `notes` says why.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Cost {
    pub rows_inserted_per_task: Option<f64>,
    pub rows_updated_per_task: Option<f64>,
    /// Updates that wrote no index entry (HOT), included in `rows_updated_per_task`.
    pub rows_hot_updated_per_task: Option<f64>,
    pub rows_deleted_per_task: Option<f64>,
    pub rows_written_per_task: Option<f64>,
    pub commits_per_task: Option<f64>,
    pub statements_per_task: Option<f64>,
    /// WAL of the whole Postgres cluster over the phase, per task.
    pub wal_bytes_per_task: Option<f64>,
    /// CPU milliseconds per task of the coordinator process (with `embedded`: this whole
    /// process, the benchmark's workers and client included).
    pub coordinator_cpu_ms_per_task: Option<f64>,
    /// CPU milliseconds per task of every `postgres` process on this machine.
    pub database_cpu_ms_per_task: Option<f64>,
    /// CPU milliseconds per task of this process (the benchmark's workers and client), against
    /// a separate coordinator; absent with `embedded`, where the coordinator's figure holds it.
    pub load_cpu_ms_per_task: Option<f64>,
    pub notes: Vec<String>,
}

/// CPU time of processes, read from `/proc`.
mod cpu {
    use std::time::Duration;

    /// Clock ticks per second of `/proc/*/stat` times.
    fn ticks_per_second() -> f64 {
        // SAFETY: sysconf has no preconditions.
        let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if t > 0 { t as f64 } else { 100.0 }
    }

    /// (command name, user + system CPU) of one process.
    fn read(pid: u32) -> Option<(String, Duration)> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // `pid (comm) state ...`: the name may hold spaces and parentheses; the fields after
        // its last `)` are fixed.
        let open = stat.find('(')?;
        let close = stat.rfind(')')?;
        let comm = stat[open + 1..close].to_owned();
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the line: 11 and 12 after the state.
        let utime: u64 = fields.get(11)?.parse().ok()?;
        let stime: u64 = fields.get(12)?.parse().ok()?;
        Some((comm, Duration::from_secs_f64((utime + stime) as f64 / ticks_per_second())))
    }

    /// CPU time of one process so far.
    pub fn of(pid: u32) -> Option<Duration> {
        read(pid).map(|(_, t)| t)
    }

    /// CPU time so far of every process named `name` (of those running now).
    pub fn of_named(name: &str) -> Option<Duration> {
        let dir = std::fs::read_dir("/proc").ok()?;
        let mut total = Duration::ZERO;
        let mut any = false;
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            if let Some((comm, t)) = read(pid)
                && comm == name
            {
                total += t;
                any = true;
            }
        }
        any.then_some(total)
    }
}

/// Readings taken at the start of the bulk phase.
struct CostStart {
    coordinator_cpu: Option<Duration>,
    database_cpu: Option<Duration>,
    load_cpu: Option<Duration>,
    #[cfg(feature = "embedded")]
    db: Option<coordinator::store::stats::DbCounters>,
}

/// Samples the costs of the bulk phase.
struct CostMeter {
    coordinator_pid: Option<u32>,
    /// This process, when it is not also the coordinator.
    load_pid: Option<u32>,
    /// Whether the database runs on this machine, so its processes' CPU is readable.
    local_database: bool,
    #[cfg(feature = "embedded")]
    db: Option<coordinator::store::stats::DbStats>,
    notes: Vec<String>,
}

impl CostMeter {
    async fn new(opts: &BenchOptions, embedded_url: Option<&str>) -> CostMeter {
        let mut notes = Vec::new();
        let coordinator_pid = if opts.embedded { Some(std::process::id()) } else { opts.coordinator_pid };
        if coordinator_pid.is_none() {
            notes.push("coordinator CPU: not measured (pass --coordinator-pid)".to_owned());
        }
        let url = embedded_url.map(str::to_owned).or_else(|| opts.stats_database_url.clone());
        let local_database = url.as_deref().filter(|u| u.starts_with("postgres")).is_some_and(|u| {
            let host = u
                .split_once('@')
                .map(|(_, r)| r)
                .or_else(|| u.split_once("://").map(|(_, r)| r))
                .unwrap_or("");
            ["127.0.0.1", "localhost", "[::1]", "/"].iter().any(|h| host.starts_with(h))
        });
        if url.as_deref().is_some_and(|u| u.starts_with("postgres")) && !local_database {
            notes.push("database CPU: not measured (the database is not on this machine)".to_owned());
        }
        #[cfg(feature = "embedded")]
        let db = db_stats(url.as_deref(), &mut notes).await;
        #[cfg(feature = "embedded")]
        if let Some(s) = &db {
            if !s.counts_statements() {
                notes.push(
                    "statements: not counted (load pg_stat_statements: shared_preload_libraries and CREATE EXTENSION)"
                        .to_owned(),
                );
            }
            notes.push("WAL bytes: the whole cluster's, other databases' work included".to_owned());
        }
        #[cfg(not(feature = "embedded"))]
        if url.is_some() {
            notes.push(
                "database figures: not measured (this coordctl was built without the `embedded` feature)"
                    .to_owned(),
            );
        }
        CostMeter {
            coordinator_pid,
            load_pid: (!opts.embedded).then(std::process::id),
            local_database,
            #[cfg(feature = "embedded")]
            db,
            notes,
        }
    }

    /// The readings the bulk phase's costs are measured from. The database counters are read
    /// once Postgres has published what came before (the trickle phase's tasks, the workers'
    /// registrations): a backend publishes about 10 s after its last statement, or later when
    /// busy or when a counter was locked ([`settle`]), so a sample taken at once would leave
    /// some of it to be counted as the bulk phase's.
    async fn start(&mut self) -> CostStart {
        #[cfg(feature = "embedded")]
        if let Some(s) = &mut self.db {
            settle(s, "before", &mut self.notes).await;
        }
        CostStart {
            coordinator_cpu: self.coordinator_pid.and_then(cpu::of),
            database_cpu: if self.local_database { cpu::of_named("postgres") } else { None },
            load_cpu: self.load_pid.and_then(cpu::of),
            #[cfg(feature = "embedded")]
            db: match &mut self.db {
                Some(s) => s.sample().await.ok(),
                None => None,
            },
        }
    }

    /// The costs since `start`, per task; the database counters are read once Postgres has
    /// published them.
    async fn finish(&mut self, start: CostStart, tasks: usize) -> Cost {
        let per = |v: f64| v / tasks.max(1) as f64;
        let ms = |a: Option<Duration>, b: Option<Duration>| {
            a.zip(b).map(|(a, b)| per(b.saturating_sub(a).as_secs_f64() * 1000.0))
        };
        #[cfg_attr(not(feature = "embedded"), allow(unused_mut))]
        let mut cost = Cost {
            coordinator_cpu_ms_per_task: ms(start.coordinator_cpu, self.coordinator_pid.and_then(cpu::of)),
            database_cpu_ms_per_task: ms(
                start.database_cpu,
                if self.local_database { cpu::of_named("postgres") } else { None },
            ),
            load_cpu_ms_per_task: ms(start.load_cpu, self.load_pid.and_then(cpu::of)),
            notes: self.notes.clone(),
            ..Cost::default()
        };
        #[cfg(feature = "embedded")]
        if let (Some(s), Some(before)) = (&mut self.db, start.db) {
            settle(s, "after", &mut cost.notes).await;
            match s.sample().await {
                Ok(after) => {
                    let d = after.since(&before);
                    cost.rows_inserted_per_task = Some(per(d.rows_inserted as f64));
                    cost.rows_updated_per_task = Some(per(d.rows_updated as f64));
                    cost.rows_hot_updated_per_task = Some(per(d.rows_hot_updated as f64));
                    cost.rows_deleted_per_task = Some(per(d.rows_deleted as f64));
                    cost.rows_written_per_task = Some(per(d.rows_written() as f64));
                    cost.commits_per_task = Some(per(d.commits as f64));
                    cost.wal_bytes_per_task = Some(per(d.wal_bytes as f64));
                    cost.statements_per_task = d.statements.map(|n| per(n as f64));
                }
                Err(e) => cost.notes.push(format!("database figures: not measured ({e})")),
            }
        }
        cost
    }
}

/// Waits until the database has published what was written so far ([`DbStats::settle`]);
/// `notes` says so when it had not by the end of the wait (`when`: before or after the bulk
/// phase), as the rows would then be counted in the wrong phase.
///
/// [`DbStats::settle`]: coordinator::store::stats::DbStats::settle
#[cfg(feature = "embedded")]
async fn settle(s: &mut coordinator::store::stats::DbStats, when: &str, notes: &mut Vec<String>) {
    let limit = coordinator::store::stats::STATS_SETTLE_MAX.as_secs();
    match s.settle().await {
        Ok(true) => {}
        Ok(false) => notes.push(format!(
            "database figures: rows written {when} the bulk phase were still unpublished after {limit} s"
        )),
        Err(e) => notes.push(format!(
            "database figures: could not check they were published {when} the bulk phase ({e})"
        )),
    }
}

/// A connection that samples the coordinator's database's statistics views, when `url` names a
/// Postgres database that answers; otherwise `None`, and `notes` says why.
#[cfg(feature = "embedded")]
pub async fn db_stats(
    url: Option<&str>,
    notes: &mut Vec<String>,
) -> Option<coordinator::store::stats::DbStats> {
    let why = match url {
        None => "pass --database-url".to_owned(),
        Some(u) => match coordinator::store::stats::DbStats::connect(u).await {
            Ok(Some(s)) => return Some(s),
            Ok(None) => "only Postgres has statistics views".to_owned(),
            Err(e) => e.to_string(),
        },
    };
    notes.push(format!("database figures: not measured ({why})"));
    None
}

/// A measured figure with `digits` decimals, or `-` when it was not measured.
pub fn figure(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(v) => format!("{v:.digits$}"),
        None => "-".to_owned(),
    }
}

/// Notes after a report, one per line, aligned with its figures.
pub fn render_notes(notes: &[String]) -> String {
    notes.iter().map(|n| format!("note              {n}\n")).collect()
}

impl Cost {
    fn render(&self) -> String {
        let f = figure;
        let mut out = format!(
            "per task          rows written {} (inserted {}, updated {} of which HOT {}, deleted {}), \
             commits {}, statements {}, WAL {} bytes\n\
             cpu per task      coordinator {} ms, database {} ms, load generator {} ms\n",
            f(self.rows_written_per_task, 2),
            f(self.rows_inserted_per_task, 2),
            f(self.rows_updated_per_task, 2),
            f(self.rows_hot_updated_per_task, 2),
            f(self.rows_deleted_per_task, 2),
            f(self.commits_per_task, 3),
            f(self.statements_per_task, 3),
            f(self.wal_bytes_per_task, 0),
            f(self.coordinator_cpu_ms_per_task, 3),
            f(self.database_cpu_ms_per_task, 3),
            f(self.load_cpu_ms_per_task, 3),
        );
        out.push_str(&render_notes(&self.notes));
        out
    }
}

struct Probe {
    /// First time a worker started each task.
    started: Mutex<HashMap<String, Instant>>,
    runs: AtomicU64,
    notify: tokio::sync::Notify,
}

pub async fn run(opts: BenchOptions) -> anyhow::Result<BenchReport> {
    if opts.tasks == 0 || opts.workers == 0 || opts.batch == 0 {
        bail!("--tasks, --workers and --batch must be at least 1");
    }
    if let Some(rate) = opts.rate {
        if !(rate.is_finite() && rate > 0.0) {
            bail!("--rate must be a number of tasks per second above 0");
        }
        if opts.tasks as f64 / rate > MAX_PACED.as_secs_f64() {
            bail!("--rate {rate} would take more than a day to submit {} tasks", opts.tasks);
        }
    }
    if !opts.embedded {
        let meter = CostMeter::new(&opts, None).await;
        return with_workers(&opts, &opts.endpoint, &opts.security, None, meter).await;
    }
    embedded(opts).await
}

#[cfg(not(feature = "embedded"))]
async fn embedded(_: BenchOptions) -> anyhow::Result<BenchReport> {
    bail!(
        "this coordctl was built without the `embedded` feature: drop --embedded and point --coordinator at a running coordinator"
    )
}

/// The run against a coordinator of its own, in this process.
#[cfg(feature = "embedded")]
async fn embedded(opts: BenchOptions) -> anyhow::Result<BenchReport> {
    use coordinator::{
        app::App,
        config::{Config, LogFormat},
    };
    // An embedded coordinator on loopback, stopped when the run ends, however it ends.
    let dir = tempfile::tempdir()?;
    let url = opts
        .database_url
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", dir.path().join("bench.db").display()));
    let mut config = Config::default();
    config.coordinator.id = "coordinator-bench".into();
    let config_url = url.clone();
    config.database.url = url;
    config.database.max_open_conns = 16;
    config.database.max_idle_conns = 4;
    config.scheduler.batch_size = 1000;
    config.logging.format = LogFormat::Text;
    // On loopback, for this process's own load generator only.
    config.auth.enabled = false;
    config.validate()?;
    let app = App::connect(config).await.context("embedded coordinator")?;
    let store = app.store().clone();
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", grpc.local_addr()?);
    let stop = CancellationToken::new();
    let server = tokio::spawn(app.serve(grpc, http, stop.clone()));
    let meter = CostMeter::new(&opts, Some(&config_url)).await;
    let report = with_workers(&opts, &endpoint, &ClientSecurity::default(), Some(&store), meter).await;
    stop.cancel();
    let served = server.await.context("embedded coordinator").and_then(|r| r);
    drop(dir);
    let report = report?;
    served?;
    Ok(report)
}

/// Starts the bench's workers, runs the phases, and stops the workers (they deregister) when
/// the phases end, however they end. The workers declare a task type of this run's own, so
/// other workers of the coordinator (`coordinator dev` runs `noop` too) never take its tasks.
async fn with_workers(
    opts: &BenchOptions,
    endpoint: &str,
    security: &ClientSecurity,
    store: Option<&Store>,
    meter: CostMeter,
) -> anyhow::Result<BenchReport> {
    let mut client = coordinator_worker::client::connect(endpoint, security, 64 << 20).await?;
    let run_id = format!("{:08x}", rand::random::<u32>());
    let task_type = format!("bench-noop-{run_id}");
    // Workers: real gRPC streams, a no-op handler that notes when each task starts.
    let probe =
        Arc::new(Probe { started: Mutex::default(), runs: AtomicU64::new(0), notify: Default::default() });
    let stop_workers = CancellationToken::new();
    let mut counters: Vec<Arc<WorkerCounters>> = Vec::new();
    let mut worker_tasks = Vec::new();
    let mut ids = Vec::new();
    for i in 0..opts.workers {
        let id = format!("bench-{run_id}-{i}");
        let mut o = WorkerOptions::new(endpoint.to_owned(), id.clone());
        o.max_concurrent = opts.concurrency;
        o.prefetch = opts.prefetch;
        o.capabilities = vec![task_type.clone()];
        o.security = security.clone();
        let probe = probe.clone();
        let handler = handler_fn(move |t| {
            let probe = probe.clone();
            async move {
                let now = Instant::now();
                probe.runs.fetch_add(1, Ordering::Relaxed);
                probe.started.lock().unwrap_or_else(|e| e.into_inner()).entry(t.task_id).or_insert(now);
                probe.notify.notify_waiters();
                Ok(Vec::new())
            }
        });
        match Worker::new(o, handler) {
            Ok(w) => {
                counters.push(w.counters());
                worker_tasks.push(tokio::spawn(w.run(stop_workers.clone())));
                ids.push(id);
            }
            Err(e) => {
                stop_workers.cancel();
                for w in worker_tasks {
                    let _ = w.await;
                }
                return Err(e.into());
            }
        }
    }
    let run = Run {
        opts,
        client: &mut client,
        task_type: &task_type,
        run_id: &run_id,
        probe: &probe,
        counters: &counters,
    };
    let report = run.phases(&ids, store, meter).await;
    stop_workers.cancel();
    for w in worker_tasks {
        let _ = w.await;
    }
    let mut report = report?;
    report.runs = probe.runs.load(Ordering::Relaxed);
    Ok(report)
}

/// One run of the phases with the bench's workers.
struct Run<'a> {
    opts: &'a BenchOptions,
    client: &'a mut Client,
    /// The type only this run's workers declare.
    task_type: &'a str,
    run_id: &'a str,
    probe: &'a Probe,
    counters: &'a [Arc<WorkerCounters>],
}

impl Run<'_> {
    fn accepted(&self) -> u64 {
        self.counters.iter().map(|c| c.accepted.load(Ordering::Relaxed)).sum::<u64>()
    }

    /// How many of the bulk phase's tasks (submitted outside jobs) are completed, one GetTask
    /// each, 32 at a time.
    async fn completed_outside_jobs(&self, submitted: &[(Vec<String>, Instant)]) -> anyhow::Result<u64> {
        use futures::{StreamExt, TryStreamExt};
        let ids = submitted.iter().flat_map(|(ids, _)| ids.iter().cloned());
        let states: Vec<i32> = futures::stream::iter(ids)
            .map(|task_id| {
                let mut client = self.client.clone();
                async move {
                    let req = proto::GetTaskRequest { task_id, include_attempts: false };
                    let task = client.get_task(req).await?.into_inner();
                    anyhow::Ok(task.status)
                }
            })
            .buffer_unordered(32)
            .try_collect()
            .await?;
        Ok(states.iter().filter(|s| **s == proto::TaskStatus::Completed as i32).count() as u64)
    }

    fn task(&self) -> proto::SubmitTaskRequest {
        proto::SubmitTaskRequest { task_type: self.task_type.to_owned(), ..Default::default() }
    }

    async fn phases(
        self,
        ids: &[String],
        store: Option<&Store>,
        mut meter: CostMeter,
    ) -> anyhow::Result<BenchReport> {
        let opts = self.opts;
        wait_connected(self.client, ids).await?;
        let backend = match store {
            Some(store) => format!("embedded {}", store.backend()),
            None => format!("remote {}", opts.endpoint),
        };

        // Trickle: one task at a time into idle workers.
        let mut trickle = Vec::with_capacity(opts.trickle);
        for _ in 0..opts.trickle {
            let t0 = Instant::now();
            let id = self.client.submit_task(self.task()).await?.into_inner().task_id;
            let started = wait_started(self.probe, &id, Duration::from_secs(30)).await?;
            trickle.push(started - t0);
            // Wait for its report too, so the next one finds the workers idle.
            let target = trickle.len() as u64;
            wait_for(Duration::from_secs(30), || self.accepted() >= target).await?;
        }
        let before_bulk = self.accepted();

        // Bulk: N tasks in jobs of `batch` (or batches outside any job).
        let cost_start = meter.start().await;
        let t0 = Instant::now();
        let mut submitted_at: Vec<(Vec<String>, Instant)> = Vec::new();
        let mut jobs = Vec::new();
        let job_name = (!opts.no_jobs).then(|| format!("bench-{}", self.run_id));
        let sent = send_all(t0, opts.tasks, opts.batch, opts.rate, |n| {
            let tasks = (0..n).map(|_| self.task()).collect();
            submit(self.client.clone(), job_name.clone(), tasks)
        })
        .await?;
        for ((ids, job), at) in sent {
            jobs.extend(job);
            submitted_at.push((ids, at));
        }
        let submit = t0.elapsed();
        let target = before_bulk + opts.tasks as u64;
        wait_for(Duration::from_secs(600), || self.accepted() >= target)
            .await
            .context("waiting for every report")?;
        let end_to_end = t0.elapsed();
        let cost = meter.finish(cost_start, opts.tasks).await;

        let latency = {
            let started = self.probe.started.lock().unwrap_or_else(|e| e.into_inner());
            let mut v = Vec::with_capacity(opts.tasks);
            for (ids, at) in &submitted_at {
                for id in ids {
                    if let Some(s) = started.get(id) {
                        v.push(s.saturating_duration_since(*at));
                    }
                }
            }
            Percentiles::of(v)
        };

        // Verification: every task of the run completed; nothing accepted twice.
        let mut completed = 0u64;
        for job in &jobs {
            let j = self
                .client
                .get_job(proto::GetJobRequest { job_id: job.clone(), include_results: false })
                .await?
                .into_inner();
            completed += u64::from(j.completed);
        }
        if opts.no_jobs {
            completed = self.completed_outside_jobs(&submitted_at).await?;
        }
        let duplicates: u64 = self.counters.iter().map(|c| c.duplicates.load(Ordering::Relaxed)).sum();
        let refused: u64 = self.counters.iter().map(|c| c.refused.load(Ordering::Relaxed)).sum();
        let total_accepted = self.accepted();
        let mut exactly_once =
            completed == opts.tasks as u64 && total_accepted == (opts.tasks + opts.trickle) as u64;
        let mut verification = format!(
            "{completed}/{} bulk tasks completed; {total_accepted} reports accepted for {} tasks",
            opts.tasks,
            opts.tasks + opts.trickle
        );
        if let Some(store) = store {
            let audit = store.audit().await?;
            exactly_once &= audit.accepted_twice == 0 && audit.completed == audit.tasks;
            verification.push_str(&format!(
                "; database: {} of {} tasks completed, {} accepted more than once",
                audit.completed, audit.tasks, audit.accepted_twice
            ));
        }

        Ok(BenchReport {
            backend,
            tasks: opts.tasks,
            workers: opts.workers,
            concurrency: opts.concurrency,
            total_concurrency: opts.workers as u64 * u64::from(opts.concurrency),
            prefetch: opts.prefetch,
            batch: opts.batch,
            jobs: !opts.no_jobs,
            rate: opts.rate,
            submit_seconds: submit.as_secs_f64(),
            submit_per_second: opts.tasks as f64 / submit.as_secs_f64(),
            end_to_end_seconds: end_to_end.as_secs_f64(),
            end_to_end_per_second: opts.tasks as f64 / end_to_end.as_secs_f64(),
            latency,
            trickle_latency: Percentiles::of(trickle),
            accepted: total_accepted,
            duplicates,
            refused,
            // Counted once the workers have stopped.
            runs: 0,
            exactly_once,
            verification,
            cost,
        })
    }
}

/// A submission's task ids and, for a job, the job's.
type Submitted = (Vec<String>, Option<String>);

/// Submits `tasks` as a job named `job_name`, or outside any job without one.
async fn submit(
    mut client: Client,
    job_name: Option<String>,
    tasks: Vec<proto::SubmitTaskRequest>,
) -> anyhow::Result<Submitted> {
    Ok(match job_name {
        None => {
            let resp = client.submit_tasks(proto::SubmitTasksRequest { tasks }).await?.into_inner();
            (resp.results.into_iter().map(|r| r.task_id).collect(), None)
        }
        Some(name) => {
            let resp = client
                .submit_job(proto::SubmitJobRequest { name, tasks, ..Default::default() })
                .await?
                .into_inner();
            (resp.task_ids, Some(resp.job_id))
        }
    })
}

/// Sends `tasks` tasks from `t0` in submissions of at most `batch` (`send(n)` makes one of `n`):
/// one after the other as fast as they are answered or, at `rate` tasks/s, each when it is due
/// whether or not those before it were answered (a fleet's clients do not wait for each other).
/// Returns each submission's answer and when it was sent; the first failure ends the phase.
async fn send_all<T, F, Fut>(
    t0: Instant,
    tasks: usize,
    batch: usize,
    rate: Option<f64>,
    mut send: F,
) -> anyhow::Result<Vec<(T, Instant)>>
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<T>> + Send + 'static,
    T: Send + 'static,
{
    let mut inflight = tokio::task::JoinSet::new();
    let mut sent = Vec::new();
    let mut record = |done: Result<(anyhow::Result<T>, Instant), tokio::task::JoinError>| {
        let (answer, at) = done.context("a submission")?;
        sent.push((answer?, at));
        anyhow::Ok(())
    };
    let mut left = tasks;
    while left > 0 {
        if let Some(rate) = rate {
            tokio::time::sleep_until(due(t0, tasks - left, rate).into()).await;
        }
        let n = left.min(batch);
        left -= n;
        let at = Instant::now();
        let submission = send(n);
        inflight.spawn(async move { (submission.await, at) });
        if rate.is_none()
            && let Some(done) = inflight.join_next().await
        {
            record(done)?;
        }
        while let Some(done) = inflight.try_join_next() {
            record(done)?;
        }
    }
    while let Some(done) = inflight.join_next().await {
        record(done)?;
    }
    Ok(sent)
}

/// The longest a paced bulk phase may take to submit.
const MAX_PACED: Duration = Duration::from_secs(24 * 3600);

/// When the submission that follows the first `sent` tasks is due, at `rate` tasks/s from `t0`.
fn due(t0: Instant, sent: usize, rate: f64) -> Instant {
    t0 + Duration::from_secs_f64(sent as f64 / rate)
}

async fn wait_connected(client: &mut Client, ids: &[String]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let workers = client.list_workers(proto::ListWorkersRequest::default()).await?.into_inner().workers;
        if ids.iter().all(|id| workers.iter().any(|w| &w.worker_id == id && w.connected)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("workers did not connect within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_started(probe: &Probe, id: &str, limit: Duration) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + limit;
    loop {
        let notified = probe.notify.notified();
        if let Some(at) = probe.started.lock().unwrap_or_else(|e| e.into_inner()).get(id) {
            return Ok(*at);
        }
        if Instant::now() > deadline {
            bail!("task {id} did not start within {limit:?}");
        }
        let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
    }
}

async fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() > deadline {
            bail!("not done within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

impl BenchReport {
    /// The human summary.
    pub fn render(&self) -> String {
        let l = &self.latency;
        let t = &self.trickle_latency;
        format!(
            "backend           {}\n\
             tasks             {} ({} workers x {} slots = {} at once, prefetch {}, {} of {})\n\
             submit            {:.0} tasks/s ({:.2} s{})\n\
             end to end        {:.0} tasks/s ({:.2} s, first submit to last accepted report)\n\
             latency (bulk)    p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms  (submit -> worker start)\n\
             latency (trickle) p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms  ({} tasks one at a time)\n\
             reports           {} accepted, {} duplicate, {} refused; {} handler runs\n\
             exactly once      {} ({})\n{}",
            self.backend,
            self.tasks,
            self.workers,
            self.concurrency,
            self.total_concurrency,
            self.prefetch,
            if self.jobs { "jobs" } else { "batches outside jobs" },
            self.batch,
            self.submit_per_second,
            self.submit_seconds,
            match self.rate {
                Some(r) => format!(", paced at {r:.0} tasks/s"),
                None => String::new(),
            },
            self.end_to_end_per_second,
            self.end_to_end_seconds,
            l.p50_ms,
            l.p90_ms,
            l.p99_ms,
            l.max_ms,
            t.p50_ms,
            t.p90_ms,
            t.p99_ms,
            t.max_ms,
            t.samples,
            self.accepted,
            self.duplicates,
            self.refused,
            self.runs,
            if self.exactly_once { "yes" } else { "NO" },
            self.verification,
            self.cost.render(),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Sends that each take 300 ms to be answered, `send_all` paced at 2,500 tasks/s in
    /// submissions of 50 (one due every 20 ms): each goes out when it is due, the last long
    /// before the first is answered. Unpaced, each waits for the answer before it. (Tokio's
    /// clock is paused, so the times are exact.)
    #[tokio::test(start_paused = true)]
    async fn paced_submissions_go_out_when_due_without_waiting_for_answers() {
        for (rate, gap) in [(Some(2_500.0), 20), (None, 300)] {
            let starts = Arc::new(Mutex::new(Vec::new()));
            let sent = send_all(Instant::now(), 500, 50, rate, |n| {
                let starts = starts.clone();
                async move {
                    starts.lock().unwrap().push(tokio::time::Instant::now());
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    anyhow::Ok(n)
                }
            })
            .await
            .unwrap();
            assert_eq!(sent.iter().map(|(n, _)| n).sum::<usize>(), 500, "{rate:?}");
            let starts = starts.lock().unwrap().clone();
            assert_eq!(starts.len(), 10);
            for (i, at) in starts.iter().enumerate() {
                let since = (*at - starts[0]).as_millis() as u64;
                let want = gap * i as u64;
                assert!(
                    since.abs_diff(want) <= 2,
                    "{rate:?}: submission {i} went out at {since} ms, not {want}"
                );
            }
        }
    }

    /// A failed submission ends the phase with its error.
    #[tokio::test(start_paused = true)]
    async fn a_failed_submission_ends_the_phase() {
        let calls = Arc::new(Mutex::new(0));
        let failed = send_all(Instant::now(), 500, 50, Some(2_500.0), |_| {
            let calls = calls.clone();
            async move {
                let n = {
                    let mut c = calls.lock().unwrap();
                    *c += 1;
                    *c
                };
                if n == 3 {
                    anyhow::bail!("refused");
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                anyhow::Ok(())
            }
        })
        .await
        .unwrap_err();
        assert!(failed.to_string().contains("refused"), "{failed:#}");
        assert!(*calls.lock().unwrap() < 10, "the phase stopped at the failure");
    }

    #[test]
    fn percentiles_pick_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let p = Percentiles::of(v);
        assert_eq!((p.p50_ms, p.p90_ms, p.p99_ms, p.max_ms), (50.0, 90.0, 99.0, 100.0));
        assert_eq!(Percentiles::of(vec![]).samples, 0);
        assert_eq!(Percentiles::of(vec![Duration::from_millis(7)]).p99_ms, 7.0);
    }

    #[test]
    fn paced_submissions_are_due_evenly_from_the_start() {
        let t0 = Instant::now();
        assert_eq!(due(t0, 0, 500.0), t0);
        assert_eq!(due(t0, 1000, 500.0), t0 + Duration::from_secs(2));
        assert_eq!(due(t0, 250, 1000.0) - t0, Duration::from_millis(250));
    }
}
