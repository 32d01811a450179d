//! `coordctl bench-fleet`: what a large idle fleet costs a running coordinator. It registers N
//! workers over a few HTTP/2 connections (many workers per connection, as a host running many
//! provers would), opens each one's task stream and heartbeats each at the interval the
//! coordinator asks for; then, over a measured window, reports the coordinator's resident
//! memory, the time to connect the fleet, `ListWorkers` times, heartbeat round trips, and the
//! database rows written per worker per minute. The workers declare a task type of the run's
//! own, so they never take work, and deregister at the end.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::bench::{Percentiles, figure, render_notes};
use coordinator_worker::{
    client::{self, Client, ClientSecurity},
    proto,
};

#[derive(Debug, Clone)]
pub struct FleetOptions {
    pub workers: usize,
    pub per_connection: usize,
    /// How long the idle fleet is watched once connected.
    pub window: Duration,
    pub endpoint: String,
    pub security: ClientSecurity,
    /// The coordinator's process, for its resident memory.
    pub coordinator_pid: Option<u32>,
    /// The coordinator's database, read only for its statistics.
    #[cfg_attr(not(feature = "embedded"), allow(dead_code))]
    pub database_url: Option<String>,
    /// The coordinator's `/metrics` (`http://host:8090/metrics`), for the time the server spent
    /// on each heartbeat.
    pub metrics_url: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FleetReport {
    pub workers: usize,
    pub connections: usize,
    /// From the first registration to the last worker's stream open.
    pub connect_seconds: f64,
    /// The coordinator's resident memory with the fleet connected.
    pub coordinator_rss_mib: Option<f64>,
    pub coordinator_rss_kib_per_worker: Option<f64>,
    /// `ListWorkers`, first page (100 workers), timed 20 times.
    pub list_workers_first_page: Percentiles,
    /// Every page of `ListWorkers`, 1,000 at a time: the whole fleet listed once.
    pub list_workers_all_seconds: f64,
    /// Heartbeat round trips during the window (client side, over loopback: an upper bound of
    /// the time the server spends).
    pub heartbeat: Percentiles,
    /// The server's own time per heartbeat during the window, from its
    /// `grpc_server_handling_seconds` histogram: bucket bounds, so "at most".
    pub server_heartbeat: Option<ServerHeartbeat>,
    pub heartbeat_interval_ms: u64,
    pub window_seconds: f64,
    /// Rows the database wrote during the window, per worker per minute.
    pub db_rows_per_worker_minute: Option<f64>,
    /// Of those, the rows of the `workers` table (the workers' own: heartbeat times, state
    /// changes); the rest is the replica's own row and anything else the coordinator wrote.
    pub db_worker_rows_per_worker_minute: Option<f64>,
    pub db_commits_per_second: Option<f64>,
    pub notes: Vec<String>,
}

/// Heartbeats as the server timed them: the histogram bucket bounds that hold half, and 99 %,
/// of the window's heartbeats, and the share handled within 10 ms.
#[derive(Debug, Clone, Serialize)]
pub struct ServerHeartbeat {
    pub count: f64,
    pub p50_at_most_ms: f64,
    pub p99_at_most_ms: f64,
    pub within_10ms: f64,
}

/// Cumulative `SendHeartbeat` counts per bucket bound (seconds), summed over label sets.
type Buckets = std::collections::BTreeMap<u64, f64>;

/// Reads the coordinator's `/metrics` over plain HTTP (loopback benchmarks), with the bearer
/// token when one is set.
async fn heartbeat_buckets(url: &str, token: Option<&str>) -> anyhow::Result<Buckets> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").context("--metrics-url must be an http:// URL")?;
    let (host, path) = rest.split_once('/').map_or((rest, "/"), |(h, p)| (h, p));
    let path = if path == "/" { "/".to_owned() } else { format!("/{path}") };
    let mut conn =
        tokio::net::TcpStream::connect(host).await.with_context(|| format!("cannot reach {url}"))?;
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    conn.write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n{auth}\r\n").as_bytes()).await?;
    let mut body = String::new();
    conn.read_to_string(&mut body).await?;
    parse_buckets(&body)
}

/// The `SendHeartbeat` buckets of a Prometheus text exposition.
fn parse_buckets(body: &str) -> anyhow::Result<Buckets> {
    let mut buckets = Buckets::new();
    for line in body.lines() {
        if !(line.starts_with("grpc_server_handling_seconds_bucket{")
            && line.contains("grpc_method=\"SendHeartbeat\""))
        {
            continue;
        }
        let Some(le) = line.split("le=\"").nth(1).and_then(|r| r.split('"').next()) else { continue };
        let Some(count) = line.rsplit(' ').next().and_then(|c| c.parse::<f64>().ok()) else { continue };
        // Bounds as nanoseconds for an exact key; +Inf last.
        let key = if le == "+Inf" { u64::MAX } else { (le.parse::<f64>()? * 1e9).round() as u64 };
        *buckets.entry(key).or_default() += count;
    }
    Ok(buckets)
}

/// What the server's histogram says of the heartbeats between two readings.
fn server_heartbeat(before: &Buckets, after: &Buckets) -> Option<ServerHeartbeat> {
    let delta: Vec<(u64, f64)> =
        after.iter().map(|(le, n)| (*le, n - before.get(le).copied().unwrap_or(0.0))).collect();
    let count = delta.last()?.1;
    if count <= 0.0 {
        return None;
    }
    let bound = |q: f64| {
        delta.iter().find(|(_, n)| *n >= q * count).map_or(f64::INFINITY, |(le, _)| *le as f64 / 1e6)
    };
    let within = delta.iter().find(|(le, _)| *le == 10_000_000).map_or(0.0, |(_, n)| n / count);
    Some(ServerHeartbeat {
        count,
        p50_at_most_ms: bound(0.5),
        p99_at_most_ms: bound(0.99),
        within_10ms: within,
    })
}

/// One connected worker of the fleet.
struct Member {
    id: String,
    client: Client,
}

pub async fn run(opts: FleetOptions) -> anyhow::Result<FleetReport> {
    if opts.workers == 0 || opts.per_connection == 0 {
        bail!("--workers and --per-connection must be at least 1");
    }
    let mut notes = Vec::new();
    let run_id = format!("{:08x}", rand::random::<u32>());
    let task_type = format!("bench-idle-{run_id}");
    let connections = opts.workers.div_ceil(opts.per_connection);
    let mut clients = Vec::with_capacity(connections);
    for _ in 0..connections {
        let channel = client::endpoint(&opts.endpoint, &opts.security)?
            .connect()
            .await
            .with_context(|| format!("cannot reach the coordinator at {}", opts.endpoint))?;
        clients.push(client::client(channel, &opts.security, 4 << 20)?);
    }

    // Register and open every stream, a connection's workers concurrently.
    let stop = CancellationToken::new();
    let t0 = Instant::now();
    let mut joins = Vec::new();
    for (c, base) in clients.iter().enumerate() {
        let ids: Vec<String> = (c * opts.per_connection..((c + 1) * opts.per_connection).min(opts.workers))
            .map(|i| format!("idle-{run_id}-{i}"))
            .collect();
        let base = base.clone();
        let task_type = task_type.clone();
        let stop = stop.clone();
        joins.push(tokio::spawn(async move {
            let mut members = Vec::with_capacity(ids.len());
            let mut interval = 0;
            // As a worker sends it: the coordinator checks a registration's id against the
            // live workers of other hosts.
            let host = coordinator_worker::hostname();
            for id in ids {
                let mut client = base.clone();
                let r = client
                    .register_worker(proto::RegisterWorkerRequest {
                        worker_id: id.clone(),
                        max_concurrent_tasks: 1,
                        capabilities: vec![task_type.clone()],
                        hostname: host.clone(),
                        // Each simulated worker is a process of its own, named by its id.
                        instance_id: id.clone(),
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                interval = r.heartbeat_interval_ms;
                let mut stream = client
                    .receive_tasks(proto::ReceiveTasksRequest {
                        worker_id: id.clone(),
                        instance_id: id.clone(),
                    })
                    .await?
                    .into_inner();
                let stop = stop.clone();
                // Hold the stream open until the run ends (nothing comes: no task has our type).
                tokio::spawn(async move {
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = async { while let Ok(Some(_)) = stream.message().await {} } => {}
                    }
                });
                members.push(Member { id, client });
            }
            Ok::<_, anyhow::Error>((members, interval))
        }));
    }
    let mut members = Vec::with_capacity(opts.workers);
    let mut interval_ms = 0;
    for j in joins {
        let (m, i) = j.await??;
        members.extend(m);
        interval_ms = interval_ms.max(i);
    }
    let connect = t0.elapsed();
    let interval = Duration::from_millis(interval_ms.max(100));

    // Heartbeats: each worker at the asked interval, starting at a random offset.
    let latencies: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let measuring = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut beats = Vec::with_capacity(members.len());
    for m in &members {
        let (mut client, id) = (m.client.clone(), m.id.clone());
        let (stop, latencies, measuring) = (stop.clone(), latencies.clone(), measuring.clone());
        let offset = interval.mul_f64(rand::random::<f64>());
        beats.push(tokio::spawn(async move {
            tokio::time::sleep(offset).await;
            let mut tick = tokio::time::interval(interval);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let t = Instant::now();
                let ok = client
                    .send_heartbeat(proto::HeartbeatRequest {
                        worker_id: id.clone(),
                        instance_id: id.clone(),
                        ..Default::default()
                    })
                    .await
                    .is_ok();
                if ok && measuring.load(std::sync::atomic::Ordering::Relaxed) {
                    latencies.lock().unwrap_or_else(|e| e.into_inner()).push(t.elapsed());
                }
            }
        }));
    }

    // The window: database counters and memory around it, reads timed within it.
    let mut meter = DbMeter::new(opts.database_url.as_deref(), &mut notes).await;
    // Once the registrations' writes are published: they are not the idle fleet's.
    let before = meter.settle_and_sample().await;
    let bearer = opts.security.token.as_deref();
    let server_before = match &opts.metrics_url {
        Some(url) => Some(heartbeat_buckets(url, bearer).await?),
        None => {
            notes.push("server heartbeat time: not measured (pass --metrics-url)".to_owned());
            None
        }
    };
    measuring.store(true, std::sync::atomic::Ordering::Relaxed);
    let window_start = Instant::now();
    let mut admin = clients[0].clone();
    let mut first_page = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        admin.list_workers(proto::ListWorkersRequest { page_size: 100, page_token: String::new() }).await?;
        first_page.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t = Instant::now();
    let mut token = String::new();
    loop {
        let page = admin
            .list_workers(proto::ListWorkersRequest { page_size: 1000, page_token: token })
            .await?
            .into_inner();
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let list_all = t.elapsed();
    let rss_kib = opts.coordinator_pid.and_then(rss_kib);
    if opts.coordinator_pid.is_none() {
        notes.push("coordinator memory: not measured (pass --coordinator-pid)".to_owned());
    }
    tokio::time::sleep(opts.window.saturating_sub(window_start.elapsed())).await;
    measuring.store(false, std::sync::atomic::Ordering::Relaxed);
    let window = window_start.elapsed();
    let server = match (&opts.metrics_url, &server_before) {
        (Some(url), Some(b)) => server_heartbeat(b, &heartbeat_buckets(url, bearer).await?),
        _ => None,
    };
    let after = meter.settle_and_sample().await;

    stop.cancel();
    for b in beats {
        let _ = b.await;
    }
    for m in &mut members {
        let _ = m
            .client
            .deregister(proto::DeregisterRequest {
                worker_id: m.id.clone(),
                reason: "benchmark ended".into(),
                instance_id: m.id.clone(),
            })
            .await;
    }

    let minutes = window.as_secs_f64() / 60.0;
    let delta = before.zip(after).map(|(b, a)| a.since(&b));
    let per_worker_minute = |rows: i64| rows as f64 / opts.workers as f64 / minutes;
    let heartbeat =
        Percentiles::of(std::mem::take(&mut *latencies.lock().unwrap_or_else(|e| e.into_inner())));
    Ok(FleetReport {
        workers: opts.workers,
        connections,
        connect_seconds: connect.as_secs_f64(),
        coordinator_rss_mib: rss_kib.map(|k| k as f64 / 1024.0),
        coordinator_rss_kib_per_worker: rss_kib.map(|k| k as f64 / opts.workers as f64),
        list_workers_first_page: Percentiles::of(first_page),
        list_workers_all_seconds: list_all.as_secs_f64(),
        heartbeat,
        server_heartbeat: server,
        heartbeat_interval_ms: interval.as_millis() as u64,
        window_seconds: window.as_secs_f64(),
        db_rows_per_worker_minute: delta.map(|d| per_worker_minute(d.rows)),
        db_worker_rows_per_worker_minute: delta.map(|d| per_worker_minute(d.worker_rows)),
        db_commits_per_second: delta.map(|d| d.commits as f64 / window.as_secs_f64()),
        notes,
    })
}

/// Resident memory of a process in KiB (`VmRSS` in `/proc/<pid>/status`).
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Cumulative writes of the coordinator's database: rows (of which in `workers`) and commits.
#[derive(Debug, Clone, Copy)]
struct Written {
    rows: i64,
    worker_rows: i64,
    commits: i64,
}

impl Written {
    fn since(&self, earlier: &Written) -> Written {
        Written {
            rows: self.rows - earlier.rows,
            worker_rows: self.worker_rows - earlier.worker_rows,
            commits: self.commits - earlier.commits,
        }
    }
}

/// The coordinator's database's counters, when they can be read.
struct DbMeter {
    #[cfg(feature = "embedded")]
    stats: Option<coordinator::store::stats::DbStats>,
}

impl DbMeter {
    async fn new(url: Option<&str>, notes: &mut Vec<String>) -> DbMeter {
        #[cfg(feature = "embedded")]
        {
            DbMeter { stats: crate::bench::db_stats(url, notes).await }
        }
        #[cfg(not(feature = "embedded"))]
        {
            let _ = url;
            notes.push("database writes: not measured (built without the `embedded` feature)".to_owned());
            DbMeter {}
        }
    }

    async fn sample(&mut self) -> Option<Written> {
        #[cfg(feature = "embedded")]
        if let Some(s) = &mut self.stats {
            return s.sample().await.ok().map(|c| Written {
                rows: c.rows_written(),
                worker_rows: c.worker_rows,
                commits: c.commits,
            });
        }
        None
    }

    /// A sample once Postgres has published what its backends did.
    async fn settle_and_sample(&mut self) -> Option<Written> {
        #[cfg(feature = "embedded")]
        if self.stats.is_some() {
            tokio::time::sleep(coordinator::store::stats::STATS_SETTLE).await;
        }
        self.sample().await
    }
}

impl FleetReport {
    pub fn render(&self) -> String {
        let f = figure;
        let l = &self.list_workers_first_page;
        let h = &self.heartbeat;
        let mut out = format!(
            "fleet             {} idle workers over {} connections, heartbeat every {} ms\n\
             connect           {:.2} s (register and open every task stream)\n\
             coordinator RSS   {} MiB ({} KiB per worker)\n\
             ListWorkers       first page p50 {:.2} ms p99 {:.2} ms; all pages {:.2} s\n\
             heartbeat         p50 {:.2} ms p90 {:.2} ms p99 {:.2} ms max {:.2} ms ({} round trips, client side)\n\
             heartbeat server  {}\n\
             database          {} rows written per worker-minute ({} in workers), {} commits/s ({:.0} s window)\n",
            self.workers,
            self.connections,
            self.heartbeat_interval_ms,
            self.connect_seconds,
            f(self.coordinator_rss_mib, 1),
            f(self.coordinator_rss_kib_per_worker, 1),
            l.p50_ms,
            l.p99_ms,
            self.list_workers_all_seconds,
            h.p50_ms,
            h.p90_ms,
            h.p99_ms,
            h.max_ms,
            h.samples,
            self.server_heartbeat.as_ref().map_or_else(
                || "-".to_owned(),
                |s| format!(
                    "p50 <= {} ms, p99 <= {} ms, {:.2} % within 10 ms ({:.0} heartbeats)",
                    s.p50_at_most_ms,
                    s.p99_at_most_ms,
                    s.within_10ms * 100.0,
                    s.count
                )
            ),
            f(self.db_rows_per_worker_minute, 3),
            f(self.db_worker_rows_per_worker_minute, 3),
            f(self.db_commits_per_second, 2),
            self.window_seconds,
        );
        out.push_str(&render_notes(&self.notes));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "# TYPE grpc_server_handling_seconds histogram
grpc_server_handling_seconds_bucket{grpc_service=\"coordinator.v1.CoordinatorService\",grpc_method=\"SendHeartbeat\",grpc_type=\"unary\",le=\"0.001\"} 10
grpc_server_handling_seconds_bucket{grpc_service=\"coordinator.v1.CoordinatorService\",grpc_method=\"SendHeartbeat\",grpc_type=\"unary\",le=\"0.01\"} 10
grpc_server_handling_seconds_bucket{grpc_service=\"coordinator.v1.CoordinatorService\",grpc_method=\"SendHeartbeat\",grpc_type=\"unary\",le=\"+Inf\"} 10
grpc_server_handling_seconds_bucket{grpc_service=\"coordinator.v1.CoordinatorService\",grpc_method=\"ListWorkers\",grpc_type=\"unary\",le=\"+Inf\"} 99
";

    /// Deltas between two readings, summed over label sets; bounds are the buckets that hold
    /// half and 99 % of the heartbeats between them.
    #[test]
    fn server_time_comes_from_the_histogram_between_two_readings() {
        let after = BEFORE
            .replace("le=\"0.001\"} 10", "le=\"0.001\"} 960")
            .replace("le=\"0.01\"} 10", "le=\"0.01\"} 1005")
            .replace("le=\"+Inf\"} 10", "le=\"+Inf\"} 1010");
        let (b, a) = (parse_buckets(BEFORE).unwrap(), parse_buckets(&after).unwrap());
        assert_eq!(b.values().copied().collect::<Vec<_>>(), vec![10.0, 10.0, 10.0], "other methods left out");
        let s = server_heartbeat(&b, &a).unwrap();
        assert_eq!(s.count, 1000.0);
        assert_eq!((s.p50_at_most_ms, s.p99_at_most_ms), (1.0, 10.0));
        assert!((s.within_10ms - 0.995).abs() < 1e-9, "{}", s.within_10ms);
        assert!(server_heartbeat(&b, &b).is_none(), "no heartbeat between the readings");
    }
}
