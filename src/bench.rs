//! `coordctl bench`: a load generator. It starts W workers as real gRPC streams (in this
//! process, with a no-op handler) against a running coordinator, or against one it starts
//! in-process (`--embedded`, on SQLite or `--database-url`), then measures:
//!
//! - a trickle phase with idle workers: one task at a time, submit -> worker start latency;
//! - a bulk phase: N tasks submitted in jobs of `batch`, submit rate, end-to-end tasks/s (first
//!   submit to last accepted report), and submit -> worker start latency percentiles;
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

use crate::{
    app::App,
    client::{Client, ClientSecurity},
    config::{Config, LogFormat},
    proto,
    store::Store,
    worker::{Worker, WorkerCounters, WorkerOptions, handler_fn},
};

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub tasks: usize,
    pub workers: usize,
    /// Tasks each worker runs at once.
    pub concurrency: u32,
    /// Tasks per submission (one job each).
    pub batch: usize,
    /// Tasks in the one-at-a-time latency phase.
    pub trickle: usize,
    /// A running coordinator (`http://host:9090`); ignored with `embedded`.
    pub endpoint: String,
    /// Start a coordinator in this process.
    pub embedded: bool,
    /// Database of the embedded coordinator (default: SQLite in a temporary directory).
    pub database_url: Option<String>,
    /// Token and TLS towards a remote coordinator. The token needs the admin role (the
    /// benchmark submits, lists workers and runs workers); ignored with `embedded`.
    pub security: ClientSecurity,
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
    pub concurrency: u32,
    pub batch: usize,
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
    if !opts.embedded {
        return with_workers(&opts, &opts.endpoint, &opts.security, None).await;
    }
    // An embedded coordinator on loopback, stopped when the run ends, however it ends.
    let dir = tempfile::tempdir()?;
    let url = opts
        .database_url
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", dir.path().join("bench.db").display()));
    let mut config = Config::default();
    config.coordinator.id = "coordinator-bench".into();
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
    let report = with_workers(&opts, &endpoint, &ClientSecurity::default(), Some(&store)).await;
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
) -> anyhow::Result<BenchReport> {
    let mut client = crate::client::connect(endpoint, security, 64 << 20).await?;
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
                return Err(e);
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
    let report = run.phases(&ids, store).await;
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

    fn task(&self) -> proto::SubmitTaskRequest {
        proto::SubmitTaskRequest { task_type: self.task_type.to_owned(), ..Default::default() }
    }

    async fn phases(self, ids: &[String], store: Option<&Store>) -> anyhow::Result<BenchReport> {
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

        // Bulk: N tasks in jobs of `batch`.
        let t0 = Instant::now();
        let mut submitted_at: Vec<(Vec<String>, Instant)> = Vec::new();
        let mut jobs = Vec::new();
        let mut left = opts.tasks;
        while left > 0 {
            let n = left.min(opts.batch);
            left -= n;
            let at = Instant::now();
            let tasks = (0..n).map(|_| self.task()).collect();
            let resp = self
                .client
                .submit_job(proto::SubmitJobRequest { name: format!("bench-{}", self.run_id), tasks })
                .await?
                .into_inner();
            jobs.push(resp.job_id);
            submitted_at.push((resp.task_ids, at));
        }
        let submit = t0.elapsed();
        let target = before_bulk + opts.tasks as u64;
        wait_for(Duration::from_secs(600), || self.accepted() >= target)
            .await
            .context("waiting for every report")?;
        let end_to_end = t0.elapsed();

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
            batch: opts.batch,
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
        })
    }
}

async fn wait_connected(client: &mut Client, ids: &[String]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let workers = client.list_workers(proto::ListWorkersRequest {}).await?.into_inner().workers;
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
             tasks             {} ({} workers x {} slots, jobs of {})\n\
             submit            {:.0} tasks/s ({:.2} s)\n\
             end to end        {:.0} tasks/s ({:.2} s, first submit to last accepted report)\n\
             latency (bulk)    p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms  (submit -> worker start)\n\
             latency (trickle) p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms  ({} tasks one at a time)\n\
             reports           {} accepted, {} duplicate, {} refused; {} handler runs\n\
             exactly once      {} ({})\n",
            self.backend,
            self.tasks,
            self.workers,
            self.concurrency,
            self.batch,
            self.submit_per_second,
            self.submit_seconds,
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
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let p = Percentiles::of(v);
        assert_eq!((p.p50_ms, p.p90_ms, p.p99_ms, p.max_ms), (50.0, 90.0, 99.0, 100.0));
        assert_eq!(Percentiles::of(vec![]).samples, 0);
        assert_eq!(Percentiles::of(vec![Duration::from_millis(7)]).p99_ms, 7.0);
    }
}
