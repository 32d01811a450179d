//! Chaos suite: two coordinator replicas (real processes of the `coordinator` binary) on one
//! Postgres database, real `worker` processes, and real failures: connections aged every few
//! seconds so workers move between replicas, a rolling restart of both replicas (SIGTERM),
//! `kill -9` of a replica and of workers, a Postgres restart and a Postgres outage longer than
//! the lease. The outcome is read from the database itself: every task completed, none
//! accepted twice, no attempt taken from a live worker.
//!
//! Runs only with `TEST_DATABASE_URL`, and is reported ignored without it (each scenario gets a
//! fresh schema there; the Postgres restart and outage run on a server of the test's own,
//! initdb'd into a temporary directory).
//! The scenarios run one at a time. Each prints one `chaos ...:` line with its figures, also
//! appended to `<target>/tmp/chaos-figures.txt`.
//!
//! `cargo test --test chaos -- --ignored --nocapture` runs the cross-replica dispatch benchmark.

#[path = "common/cluster.rs"]
mod cluster;
mod common;

use std::{
    collections::{HashMap, HashSet},
    io::Write as _,
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use cluster::*;
use common::Client;
use coordinator::proto;
use sqlx::PgPool;

/// One scenario at a time: two replicas and a handful of workers each already fill two cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Every scenario stops by itself within this.
const SCENARIO_LIMIT: Duration = Duration::from_secs(180);

/// The lock and `TEST_DATABASE_URL`. A scenario is compiled ignored ("needs
/// TEST_DATABASE_URL") when the variable was not set at build time.
async fn serial() -> (tokio::sync::MutexGuard<'static, ()>, String) {
    let base = coordinator::store::testing::postgres_url().expect("TEST_DATABASE_URL is set");
    (SERIAL.lock().await, base)
}

/// Prints a figures line and appends it to the figures file beside the build.
fn report(line: &str) {
    println!("{line}");
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("chaos-figures.txt");
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
        let _ = writeln!(f, "{} {line}", Utc::now().format("%Y-%m-%dT%H:%M:%SZ"));
    }
}

async fn bounded(what: &str, f: impl std::future::Future<Output = ()>) {
    if tokio::time::timeout(SCENARIO_LIMIT, f).await.is_err() {
        panic!("{what} did not finish within {SCENARIO_LIMIT:?}");
    }
}

/// Two replicas on one database; each worker reaches them through a round-robin proxy of its
/// own, so each of its reconnections moves it to the other replica.
struct Cluster {
    pool: PgPool,
    a: Replica,
    b: Replica,
    /// One per worker, in front of both replicas.
    proxies: Vec<Proxy>,
    /// Worker id -> its process.
    workers: HashMap<String, Proc>,
    clients: Vec<Client>,
    /// The schema on the shared server, dropped after the processes above are killed.
    schema: Option<SchemaGuard>,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// Replica A, then B (so migrations run once), and `workers` worker processes of
    /// `max_concurrent` slots, each connected through its proxy.
    async fn start(url: &str, t: Timings, workers: usize, max_concurrent: u32) -> Cluster {
        let dir = tempfile::Builder::new().prefix("chaos").tempdir().unwrap();
        let mut a = Replica::new(dir.path(), "replica-a", url, t);
        let mut b = Replica::new(dir.path(), "replica-b", url, t);
        a.start().await;
        b.start().await;
        let clients = clients(&[&a, &b]).await;
        let mut cluster = Cluster {
            pool: check_pool(url),
            a,
            b,
            proxies: Vec::new(),
            workers: HashMap::new(),
            clients,
            schema: None,
            dir,
        };
        cluster.add_workers(workers, max_concurrent).await;
        cluster
    }

    /// Starts workers `chaos-w<i>`, each behind a proxy of its own, and waits until each has a
    /// task stream open on one of the replicas.
    async fn add_workers(&mut self, n: usize, max_concurrent: u32) {
        let first = self.workers.len();
        for i in first..first + n {
            let id = format!("chaos-w{i}");
            // Even workers start on A, odd ones on B.
            let proxy = Proxy::start(vec![self.a.grpc_addr(), self.b.grpc_addr()], i).await;
            let proc = spawn_worker(self.dir.path(), &id, &proxy.endpoint(), max_concurrent);
            self.proxies.push(proxy);
            self.workers.insert(id, proc);
        }
        let ids: Vec<String> = self.workers.keys().cloned().collect();
        let limit = Duration::from_secs(30);
        let deadline = Instant::now() + limit;
        loop {
            let connected = self.connected().await;
            if ids.iter().all(|id| connected.contains(id)) {
                return;
            }
            assert!(Instant::now() < deadline, "workers not connected within {limit:?}: {connected:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Workers with a task stream open on either replica.
    async fn connected(&self) -> HashSet<String> {
        let mut out = HashSet::new();
        for c in &self.clients {
            let mut c = c.clone();
            if let Ok(Ok(r)) = tokio::time::timeout(
                Duration::from_secs(3),
                c.list_workers(proto::ListWorkersRequest::default()),
            )
            .await
            {
                out.extend(r.into_inner().workers.into_iter().filter(|w| w.connected).map(|w| w.worker_id));
            }
        }
        out
    }

    /// Worker connections that went to another replica than the worker's previous one.
    fn moves(&self) -> usize {
        self.proxies.iter().map(Proxy::moves).sum()
    }

    /// Worker connections relayed to replica A and to B.
    fn proxied(&self) -> Vec<usize> {
        self.proxies
            .iter()
            .fold(vec![0, 0], |acc, p| acc.iter().zip(p.counts(2)).map(|(x, y)| x + y).collect())
    }

    async fn completed(&self) -> i64 {
        Tally::read(&self.pool).await.map(|t| t.completed).unwrap_or(0)
    }

    /// Waits until at least `n` tasks are completed.
    async fn wait_completed(&self, n: i64, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.completed().await < n {
            assert!(Instant::now() < deadline, "fewer than {n} tasks completed within {limit:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `n` tasks are `running`.
    async fn wait_running(&self, n: i64, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let running: Result<(i64,), _> =
                sqlx::query_as("SELECT count(*) FROM tasks WHERE status = 'running'")
                    .fetch_one(&self.pool)
                    .await;
            if matches!(running, Ok((r,)) if r >= n) {
                return;
            }
            assert!(Instant::now() < deadline, "fewer than {n} tasks running within {limit:?}: {running:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Lines of the workers' logs that contain `needle`.
    fn worker_log_lines(&self, needle: &str) -> usize {
        self.workers
            .values()
            .filter_map(|w| std::fs::read_to_string(&w.log).ok())
            .map(|log| log.lines().filter(|l| l.contains(needle)).count())
            .sum()
    }

    /// Slot corrections made by both replicas' reconciliation (see `Replica::slot_corrections`).
    async fn slot_corrections(&self) -> u64 {
        self.a.slot_corrections().await.unwrap_or(0) + self.b.slot_corrections().await.unwrap_or(0)
    }

    /// Waits until `completed` tasks completed, then kills replica A (`kill -9`) and starts it
    /// again on its ports 2 s later; returns the tasks completed at the kill and how long after
    /// it A was up again, in ms.
    async fn restart_a_killed_after(&mut self, completed: i64) -> (i64, u128) {
        self.wait_completed(completed, Duration::from_secs(60)).await;
        self.a.kill9();
        let killed_at = Instant::now();
        let completed_at_kill = self.completed().await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        self.a.start().await;
        (completed_at_kill, killed_at.elapsed().as_millis())
    }

    /// Stops every process it started and drops the schema (dropping it does the same).
    async fn finish(mut self) {
        for w in self.workers.values_mut() {
            w.kill9();
        }
        self.a.kill9();
        self.b.kill9();
        self.pool.close().await;
    }
}

/// A cluster on a fresh schema of the shared `TEST_DATABASE_URL` server.
async fn shared_cluster(base: &str, t: Timings, workers: usize, max_concurrent: u32) -> Cluster {
    let (url, schema) = fresh_schema(base).await;
    let guard = SchemaGuard { base: base.to_owned(), schema };
    let mut c = Cluster::start(&url, t, workers, max_concurrent).await;
    c.schema = Some(guard);
    c
}

fn aged() -> Timings {
    Timings {
        stale_task_timeout: Duration::from_secs(5),
        connection_age: Some((Duration::from_secs(3), Duration::from_secs(2))),
        ..Timings::default()
    }
}

/// Asserts the figures every scenario promises: all `n` tasks completed, none failed, none
/// accepted twice.
fn assert_all_completed_once(t: &Tally, n: i64) {
    assert_eq!(t.tasks, n, "tasks in the database (none lost, none made twice): {t:?}");
    assert_eq!(t.completed, n, "every task completed: {t:?}");
    assert_eq!(t.failed, 0, "no task failed: {t:?}");
    assert_eq!(t.accepted_twice, 0, "no task accepted twice: {t:?}");
}

/// Asserts that no attempt was taken from a worker (they are all alive) and none was charged.
fn assert_nothing_taken_back(t: &Tally) {
    assert_eq!(t.taken_back, 0, "attempts taken from live workers (lease_expired/worker_dead): {t:?}");
    assert_eq!(t.failures, 0, "attempts charged (sum of tasks.failures): {t:?}");
}

/// What both ageing scenarios require once their tasks settled: the workers moved, every task
/// completed once with nothing taken back, both replicas' slot corrections stayed 0, and no
/// worker logged a protocol error.
async fn check_aged(c: Cluster, t: &Tally, n: i64, name: &str, started: Instant) {
    let corrections = c.slot_corrections().await;
    let protocol_errors = c.worker_log_lines("protocol error");
    let unreachable = c.worker_log_lines("coordinator unreachable");
    report(&t.line(
        name,
        &format!(
            "elapsed_ms={} resends={} proxied_connections={:?} worker_moves={} slot_corrections={corrections} \
             worker_protocol_errors={protocol_errors} worker_unreachable_lines={unreachable}",
            started.elapsed().as_millis(), c.worker_log_lines("sending it again"),
            c.proxied(),
            c.moves()
        ),
    ));
    assert!(c.moves() > 0, "the workers moved between the replicas");
    assert_eq!(corrections, 0, "in-memory slots and the database agreed throughout");
    assert_eq!(protocol_errors, 0, "no task stream or call ended with a protocol error in the workers' logs");
    assert_all_completed_once(t, n);
    assert_nothing_taken_back(t);
    c.finish().await;
}

/// 1. Connections aged every ~3 s while 8 tasks of 15-20 s run on 4 workers behind proxies:
/// workers move between the replicas again and again, and no task is taken from them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
async fn aged_connections_long_tasks_are_never_taken_from_live_workers() {
    let (_serial, base) = serial().await;
    bounded("aged connections, long tasks", async {
        let c = shared_cluster(&base, aged(), 4, 2).await;
        let n = 8;
        let started = Instant::now();
        let tasks = sleep_tasks("aged-long", (0..n).map(|i| 15_000 + i * 700));
        submit_all(&c.clients, tasks, 1, Duration::from_secs(30)).await;
        let t = wait_settled(&c.pool, n as i64, Duration::from_secs(75)).await;
        check_aged(c, &t, n as i64, "aged_connections_long_tasks", started).await;
    })
    .await;
}

/// 2. The same ageing with several hundred short tasks submitted over ~10 s: each completes
/// exactly once and no attempt is charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
async fn aged_connections_short_tasks_complete_exactly_once() {
    let (_serial, base) = serial().await;
    bounded("aged connections, short tasks", async {
        let c = shared_cluster(&base, aged(), 4, 4).await;
        let n = 400;
        let started = Instant::now();
        // Spread over ~10 s, so the connections age several times while tasks flow.
        let tasks = sleep_tasks("aged-short", (0..n).map(|i| 2 + i % 7));
        let submitted = submit_in_background(c.clients.clone(), tasks, 20, Duration::from_millis(500));
        assert_eq!(submitted.await.expect("submitter"), n as usize);
        let t = wait_settled(&c.pool, n as i64, Duration::from_secs(90)).await;
        check_aged(c, &t, n as i64, "aged_connections_short_tasks", started).await;
    })
    .await;
}

/// 8. A rolling restart, as `kubectl rollout restart` makes one: SIGTERM to replica A while long
/// and short tasks run, A started again once it has exited, then the same for B. Each replica
/// exits 0 within its `shutdown_timeout` (5 s); its workers move to the other replica with the
/// tasks they run; every task completes exactly once and no attempt is taken back or charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
async fn a_rolling_restart_takes_nothing_from_the_workers() {
    let (_serial, base) = serial().await;
    bounded("rolling restart", async {
        let mut c = shared_cluster(&base, Timings::default(), 4, 4).await;
        let long: u64 = 8;
        let short: u64 = 300;
        let started = Instant::now();
        let long_tasks = sleep_tasks("rolling-long", (0..long).map(|i| 6_000 + i * 250));
        submit_all(&c.clients, long_tasks, 1, Duration::from_secs(30)).await;
        c.wait_running(long as i64, Duration::from_secs(20)).await;
        let submitter = submit_in_background(
            c.clients.clone(),
            sleep_tasks("rolling-short", (0..short).map(|i| 20 + i % 40)),
            10,
            Duration::from_millis(100),
        );
        let mut stops = Vec::new();
        for replica in [&mut c.a, &mut c.b] {
            let stop = Instant::now();
            let status = replica.terminate(Duration::from_secs(10)).await;
            let stopped_ms = stop.elapsed().as_millis();
            assert!(
                status.is_some_and(|s| s.success()),
                "{} exits 0 within 10 s of SIGTERM: {status:?}",
                replica.id
            );
            replica.start().await;
            stops.push((stopped_ms, stop.elapsed().as_millis()));
            // As a rollout waits for the new pod to be ready: work flows through both again.
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        assert_eq!(submitter.await.expect("submitter"), short as usize);
        let n = (long + short) as i64;
        let t = wait_settled(&c.pool, n, Duration::from_secs(90)).await;
        let protocol_errors = c.worker_log_lines("protocol error");
        report(&t.line(
            "rolling_restart",
            &format!(
                "stopped_and_up_again_ms={stops:?} elapsed_ms={} proxied_connections={:?} worker_moves={} \
                 worker_protocol_errors={protocol_errors}",
                started.elapsed().as_millis(),
                c.proxied(),
                c.moves()
            ),
        ));
        assert!(c.moves() > 0, "the workers moved between the replicas");
        assert_eq!(
            protocol_errors, 0,
            "no task stream or call ended with a protocol error in the workers' logs"
        );
        assert_all_completed_once(&t, n);
        assert_nothing_taken_back(&t);
        c.finish().await;
    })
    .await;
}

/// Submits `tasks` in the background, `batch` at a time with `pause` between batches,
/// alternating replicas and retrying through an outage.
fn submit_in_background(
    clients: Vec<Client>,
    tasks: Vec<proto::SubmitTaskRequest>,
    batch: usize,
    pause: Duration,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut ids = 0;
        for (i, chunk) in tasks.chunks(batch).enumerate() {
            // Rotate which replica gets the batch first.
            let mut rotated = clients.clone();
            rotated.rotate_left(i % clients.len());
            ids += submit_all(&rotated, chunk.to_vec(), batch, Duration::from_secs(60)).await.len();
            tokio::time::sleep(pause).await;
        }
        ids
    })
}

/// 3. `kill -9` of replica A under load (several hundred tasks of 200 ms, submissions still
/// arriving), restarted on the same ports 2 s later: nothing lost, nothing accepted twice, and
/// no attempt charged: the workers register again on B listing what they hold, so B adopts
/// their running tasks and gives back at once, uncharged, any push that A made but that never
/// arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
async fn replica_killed_under_load_loses_nothing() {
    let (_serial, base) = serial().await;
    bounded("replica kill", async {
        let mut c = shared_cluster(&base, Timings::default(), 4, 4).await;
        let n = 400;
        let started = Instant::now();
        let submitter = submit_in_background(
            c.clients.clone(),
            sleep_tasks("replica-kill", (0..n).map(|_| 200)),
            20,
            Duration::from_millis(150),
        );
        let (completed_at_kill, restarted_ms) = c.restart_a_killed_after(n as i64 / 4).await;
        let submitted = submitter.await.expect("submitter");
        assert_eq!(submitted, n as usize);
        let t = wait_settled(&c.pool, n as i64, Duration::from_secs(90)).await;
        report(&t.line(
            "replica_kill",
            &format!(
                "completed_at_kill={completed_at_kill} restarted_after_ms={restarted_ms} elapsed_ms={} \
                 proxied_connections={:?}",
                started.elapsed().as_millis(),
                c.proxied()
            ),
        ));
        assert!(completed_at_kill < n as i64, "the kill landed mid-run");
        assert_all_completed_once(&t, n as i64);
        assert_nothing_taken_back(&t);
        c.finish().await;
    })
    .await;
}

/// 4. `kill -9` of two worker processes holding tasks: each of their tasks gets a new attempt
/// within 3x heartbeat_timeout plus one sweep (plus 2 s of slack for a shared machine), and
/// nothing is taken from the workers still alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
async fn killed_workers_tasks_are_reassigned_in_time() {
    let (_serial, base) = serial().await;
    bounded("worker kill", async {
        let timings = Timings::default();
        let mut c = shared_cluster(&base, timings, 4, 4).await;
        let n = 8;
        submit_all(&c.clients, sleep_tasks("worker-kill", (0..n).map(|_| 6_000)), 4, Duration::from_secs(30)).await;
        c.wait_running(n as i64, Duration::from_secs(30)).await;

        // The two workers holding the most tasks, and what they hold.
        let held: Vec<(uuid::Uuid, String, i32)> =
            sqlx::query_as("SELECT id, worker_id, attempt FROM tasks WHERE status IN ('assigned', 'running')")
                .fetch_all(&c.pool)
                .await
                .unwrap();
        let mut per_worker: HashMap<String, usize> = HashMap::new();
        for (_, w, _) in &held {
            *per_worker.entry(w.clone()).or_default() += 1;
        }
        let mut ranked: Vec<(String, usize)> = per_worker.into_iter().collect();
        ranked.sort_by(|x, y| y.1.cmp(&x.1).then(x.0.cmp(&y.0)));
        let victims: Vec<String> = ranked.iter().take(2).map(|(w, _)| w.clone()).collect();
        let orphans: Vec<(uuid::Uuid, i32)> =
            held.iter().filter(|(_, w, _)| victims.contains(w)).map(|(id, _, a)| (*id, *a)).collect();
        for v in &victims {
            c.workers.get_mut(v).unwrap().kill9();
        }
        let killed_at: DateTime<Utc> = Utc::now();

        // Each orphan's next attempt: measured from the kill to its assigned_at.
        let bound = timings.heartbeat_timeout * 3 + timings.cleanup_interval + Duration::from_secs(2);
        let deadline = Instant::now() + bound + Duration::from_secs(20);
        let mut delays_ms: Vec<f64> = Vec::new();
        for (id, attempt) in &orphans {
            loop {
                let next: Option<(DateTime<Utc>,)> = sqlx::query_as(
                    "SELECT min(at) FROM (
                         SELECT assigned_at AS at FROM task_attempts WHERE task_id = $1 AND attempt > $2
                         UNION ALL
                         SELECT assigned_at FROM tasks WHERE id = $1 AND attempt > $2 AND assigned_at IS NOT NULL
                     ) AS later HAVING count(*) > 0",
                )
                .bind(id)
                .bind(attempt)
                .fetch_optional(&c.pool)
                .await
                .unwrap();
                if let Some((at,)) = next {
                    delays_ms.push((at - killed_at).num_milliseconds() as f64);
                    break;
                }
                assert!(Instant::now() < deadline, "task {id} of a killed worker got no new attempt");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let t = wait_settled(&c.pool, n as i64, Duration::from_secs(60)).await;
        let (taken_from_live,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM task_attempts
             WHERE outcome IN ('lease_expired', 'worker_dead') AND NOT (worker_id = ANY($1))",
        )
        .bind(&victims)
        .fetch_one(&c.pool)
        .await
        .unwrap();
        delays_ms.sort_by(f64::total_cmp);
        let worst = delays_ms.last().copied().unwrap_or(0.0);
        report(&t.line(
            "worker_kill",
            &format!(
                "killed={victims:?} orphaned_tasks={} reassigned_after_ms={delays_ms:?} worst_ms={worst} \
                 bound_ms={} taken_from_live_workers={taken_from_live}",
                orphans.len(),
                bound.as_millis()
            ),
        ));
        assert!(!orphans.is_empty(), "the killed workers held tasks");
        assert!(
            worst <= bound.as_millis() as f64,
            "a task of a killed worker waited {worst} ms for a new attempt (bound {} ms)",
            bound.as_millis()
        );
        assert_eq!(taken_from_live, 0, "attempts taken from workers still alive: {t:?}");
        assert_all_completed_once(&t, n as i64);
        c.finish().await;
    })
    .await;
}

/// One pipeline job: `chunks` sleep tasks, two batches each depending on half of them (`#N`
/// references), and a bundle depending on both batches; idempotency keys `<prefix>-<role>`, and
/// `<prefix>-job` for the job itself.
fn pipeline_job(prefix: &str, chunks: usize) -> proto::SubmitJobRequest {
    let sleep = |key: String, ms: u64, parents: Vec<String>| proto::SubmitTaskRequest {
        task_type: "sleep".into(),
        payload: format!("{{\"ms\":{ms}}}").into_bytes(),
        idempotency_key: key,
        depends_on: parents,
        ..Default::default()
    };
    let mut tasks: Vec<proto::SubmitTaskRequest> = (0..chunks)
        .map(|i| sleep(format!("{prefix}-chunk-{i}"), 150 + 50 * (i as u64 % 5), vec![]))
        .collect();
    let half = chunks / 2;
    tasks.push(sleep(format!("{prefix}-batch-0"), 200, (0..half).map(|i| format!("#{i}")).collect()));
    tasks.push(sleep(format!("{prefix}-batch-1"), 200, (half..chunks).map(|i| format!("#{i}")).collect()));
    tasks.push(sleep(
        format!("{prefix}-bundle"),
        100,
        vec![format!("#{chunks}"), format!("#{}", chunks + 1)],
    ));
    proto::SubmitJobRequest { name: prefix.to_owned(), tasks, idempotency_key: format!("{prefix}-job") }
}

/// Submits `jobs` one at a time, alternating replicas; a job that meets an unavailable replica
/// or a broken connection is sent again to the other one (its idempotency key returns the job
/// an earlier try made). Returns each job's id.
async fn submit_jobs(
    clients: Vec<Client>,
    jobs: Vec<proto::SubmitJobRequest>,
    pause: Duration,
) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut ids = Vec::new();
    for (n, job) in jobs.into_iter().enumerate() {
        let mut target = n;
        loop {
            let mut c = clients[target % clients.len()].clone();
            match tokio::time::timeout(Duration::from_secs(10), c.submit_job(job.clone())).await {
                Ok(Ok(r)) => {
                    ids.push(r.into_inner().job_id);
                    break;
                }
                Ok(Err(s)) if s.code() == tonic::Code::InvalidArgument => panic!("job refused: {s:?}"),
                Ok(Err(_)) | Err(_) => {
                    assert!(Instant::now() < deadline, "a job did not get through within 60 s");
                    target += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        tokio::time::sleep(pause).await;
    }
    ids
}

/// 7. Pipeline jobs (chunks -> two batches -> a bundle) on workers whose connections age every
/// ~3 s, with `kill -9` of replica A mid-run (restarted 2 s later) while jobs are still being
/// submitted: every task completes exactly once, none is taken from a live worker, no task is
/// assigned before its last parent finished, and both replicas count every job done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
async fn pipelines_survive_a_replica_kill_and_ageing() {
    let (_serial, base) = serial().await;
    bounded("pipelines, replica kill", async {
        let mut c = shared_cluster(&base, aged(), 4, 3).await;
        let (jobs, chunks) = (24, 6);
        let n = (jobs * (chunks + 3)) as i64;
        let started = Instant::now();
        let submitter = tokio::spawn(submit_jobs(
            c.clients.clone(),
            (0..jobs).map(|j| pipeline_job(&format!("pipe-{j}"), chunks)).collect(),
            Duration::from_millis(400),
        ));
        let (completed_at_kill, restarted_ms) = c.restart_a_killed_after(n / 4).await;
        let job_ids = submitter.await.expect("submitter");
        assert_eq!(job_ids.len(), jobs);
        let t = wait_settled(&c.pool, n, Duration::from_secs(90)).await;

        // Every child assigned (each of its attempts) after its last parent finished; 20 ms of
        // slack for the two transactions' clocks (parents sleep 150 ms or more).
        let (children, early): (i64, i64) = sqlx::query_as(
            "WITH ends AS (
                 SELECT p.child, max(t.finished_at) AS last_parent_end
                 FROM task_parents p JOIN tasks t ON t.id = p.parent GROUP BY p.child),
             starts AS (
                 SELECT task_id AS id, assigned_at FROM task_attempts
                 UNION ALL SELECT id, assigned_at FROM tasks WHERE assigned_at IS NOT NULL)
             SELECT (SELECT count(*) FROM ends),
                    count(*) FILTER (WHERE s.assigned_at < e.last_parent_end - interval '20 milliseconds')
             FROM ends e JOIN starts s ON s.id = e.child",
        )
        .fetch_one(&c.pool)
        .await
        .unwrap();
        // Each replica's view of each job.
        let mut not_done = Vec::new();
        for client in &c.clients {
            for id in &job_ids {
                let req = proto::GetJobRequest { job_id: id.clone(), include_results: false };
                let j = client.clone().get_job(req).await.expect("GetJob").into_inner();
                if !(j.done && j.completed == j.total && j.total == (chunks + 3) as u32) {
                    not_done.push(j);
                }
            }
        }
        report(&t.line(
            "pipelines_replica_kill",
            &format!(
                "jobs={jobs} children={children} assigned_before_parents_ended={early} \
                 completed_at_kill={completed_at_kill} restarted_after_ms={restarted_ms} worker_moves={} elapsed_ms={}",
                c.moves(),
                started.elapsed().as_millis()
            ),
        ));
        assert!(completed_at_kill < n, "the kill landed mid-run");
        assert_eq!(children, (jobs * 3) as i64, "every batch and bundle names its parents");
        assert_eq!(early, 0, "no task was assigned before its last parent finished");
        assert!(not_done.is_empty(), "jobs not counted done by a replica: {not_done:?}");
        assert_all_completed_once(&t, n);
        assert_nothing_taken_back(&t);
        c.finish().await;
    })
    .await;
}

/// The test's own Postgres server, or `None` (after saying so) when its binaries are missing.
fn own_postgres() -> Option<OwnPostgres> {
    if OwnPostgres::bin_dir().is_none() {
        println!("skipped: no PostgreSQL server binaries under /usr/lib/postgresql/<version>/bin");
        return None;
    }
    Some(OwnPostgres::init())
}

/// 5. A Postgres restart under load with two replicas: both come back to a healthy `/health`,
/// and every task completes exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
async fn postgres_restart_under_load_completes_everything_once() {
    let (_serial, _base) = serial().await;
    let Some(pg) = own_postgres() else { return };
    bounded("postgres restart", async {
        let c = Cluster::start(&pg.url(), Timings::default(), 4, 4).await;
        let n = 300;
        let started = Instant::now();
        let submitter = submit_in_background(
            c.clients.clone(),
            sleep_tasks("pg-restart", (0..n).map(|_| 200)),
            20,
            Duration::from_millis(150),
        );
        c.wait_completed(n as i64 / 4, Duration::from_secs(60)).await;
        let down_at = Instant::now();
        pg.stop();
        let stopped_ms = down_at.elapsed().as_millis();
        pg.start();
        let up_ms = down_at.elapsed().as_millis();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if c.a.health().await == Some(200) && c.b.health().await == Some(200) {
                break;
            }
            assert!(Instant::now() < deadline, "replicas not healthy within 30 s of the restart");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let healthy_ms = down_at.elapsed().as_millis();
        let submitted = submitter.await.expect("submitter");
        assert_eq!(submitted, n as usize);
        let t = wait_settled(&c.pool, n as i64, Duration::from_secs(90)).await;
        report(&t.line(
            "postgres_restart",
            &format!(
                "stop_ms={stopped_ms} back_up_ms={up_ms} both_healthy_ms={healthy_ms} elapsed_ms={}",
                started.elapsed().as_millis()
            ),
        ));
        assert_all_completed_once(&t, n as i64);
        c.finish().await;
    })
    .await;
    drop(pg);
}

/// 6. A Postgres outage of 1.5x the lease while long tasks run: when it is back, none of the
/// tasks is charged or taken back, and all complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
async fn postgres_outage_longer_than_the_lease_charges_nothing() {
    let (_serial, _base) = serial().await;
    let Some(pg) = own_postgres() else { return };
    bounded("postgres outage", async {
        let timings = Timings::default();
        let c = Cluster::start(&pg.url(), timings, 3, 2).await;
        let n = 6;
        let started = Instant::now();
        submit_all(&c.clients, sleep_tasks("pg-outage", (0..n).map(|_| 20_000)), 2, Duration::from_secs(30))
            .await;
        c.wait_running(n as i64, Duration::from_secs(30)).await;
        let outage = timings.stale_task_timeout * 3 / 2;
        pg.stop();
        tokio::time::sleep(outage).await;
        pg.start();
        let t = wait_settled(&c.pool, n as i64, Duration::from_secs(75)).await;
        report(&t.line(
            "postgres_outage",
            &format!(
                "outage_ms={} lease_ms={} elapsed_ms={}",
                outage.as_millis(),
                timings.stale_task_timeout.as_millis(),
                started.elapsed().as_millis()
            ),
        ));
        assert_all_completed_once(&t, n as i64);
        assert_nothing_taken_back(&t);
        c.finish().await;
    })
    .await;
    drop(pg);
}

/// Cross-replica dispatch, idle: every worker is connected to replica B, tasks are submitted to
/// replica A one at a time. Reports submit -> assignment (the first attempt's assigned_at) p50/p99
/// over 200 `noop` tasks (and over 50 submitted to B itself, for comparison), and how long
/// `WatchTask` on A takes to see a completion made on B (event received - tasks.finished_at).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: cargo test --test chaos -- --ignored --nocapture"]
async fn bench_cross_replica_dispatch() {
    let (_serial, base) = serial().await;
    cross_replica_dispatch(&base, "bench_cross_replica").await;
}

/// The same on a Postgres server of the benchmark's own with `fsync` off: what is left of the
/// tail once the disk's commit stalls are taken out (the coordinator's own share of it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: cargo test --test chaos -- --ignored --nocapture"]
async fn bench_cross_replica_dispatch_without_fsync() {
    let (_serial, _base) = serial().await;
    let Some(pg) = own_postgres() else { return };
    cross_replica_dispatch(&pg.url(), "bench_cross_replica_fsync_off").await;
    drop(pg);
}

async fn cross_replica_dispatch(base: &str, name: &str) {
    let (url, schema) = fresh_schema(base).await;
    let _schema = SchemaGuard { base: base.to_owned(), schema };
    let dir = tempfile::Builder::new().prefix("chaos-bench").tempdir().unwrap();
    let t = Timings::default();
    let mut a = Replica::new(dir.path(), "replica-a", &url, t);
    let mut b = Replica::new(dir.path(), "replica-b", &url, t);
    a.start().await;
    b.start().await;
    let mut workers: Vec<Proc> =
        (0..4).map(|i| spawn_worker(dir.path(), &format!("bench-w{i}"), &b.endpoint(), 4)).collect();
    let clients = clients(&[&a, &b]).await;
    let ids: Vec<String> = (0..4).map(|i| format!("bench-w{i}")).collect();
    common::wait_connected(&clients[1], &ids.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let pool = check_pool(&url);

    // Arrivals at random moments (an idle gap uniform in [0, poll_interval) before each), so
    // the submissions do not fall in step with a replica's scheduler tick.
    let dispatch_ms = dispatch_latencies(&clients[0], &pool, "bench-ab", 200, t.poll_interval).await;
    // The same path within one replica, for comparison: submitted to B, where the workers are.
    let same_ms = dispatch_latencies(&clients[1], &pool, "bench-bb", 50, t.poll_interval).await;

    let mut watch_ms = Vec::new();
    for i in 0..20 {
        let req = proto::SubmitTaskRequest {
            task_type: "sleep".into(),
            payload: br#"{"ms":300}"#.to_vec(),
            idempotency_key: format!("bench-watch-{i}"),
            ..Default::default()
        };
        let id = clients[0].clone().submit_task(req).await.expect("submit").into_inner().task_id;
        let mut events = clients[0]
            .clone()
            .watch_task(proto::WatchTaskRequest { task_id: id.clone() })
            .await
            .expect("watch")
            .into_inner();
        let seen = loop {
            let ev = tokio::time::timeout(Duration::from_secs(30), events.message())
                .await
                .expect("a watch event within 30 s")
                .expect("watch stream")
                .expect("the stream ends after the terminal state");
            if ev.status == proto::TaskStatus::Completed as i32 {
                break Utc::now();
            }
        };
        let (finished,): (DateTime<Utc>,) = sqlx::query_as("SELECT finished_at FROM tasks WHERE id = $1")
            .bind(id.parse::<uuid::Uuid>().unwrap())
            .fetch_one(&pool)
            .await
            .unwrap();
        watch_ms.push((seen - finished).num_microseconds().unwrap_or(0) as f64 / 1000.0);
    }
    watch_ms.sort_by(f64::total_cmp);

    report(&format!(
        "chaos {name}: submit_on_a_to_assigned_on_b tasks={} p50_ms={:.1} p99_ms={:.1} max_ms={:.1}; \
         same_replica tasks={} p50_ms={:.1} p99_ms={:.1}; \
         watch_on_a_of_completion_on_b tasks={} p50_ms={:.1} p99_ms={:.1} max_ms={:.1}",
        dispatch_ms.len(),
        percentile(&dispatch_ms, 50.0),
        percentile(&dispatch_ms, 99.0),
        dispatch_ms.last().copied().unwrap_or(0.0),
        same_ms.len(),
        percentile(&same_ms, 50.0),
        percentile(&same_ms, 99.0),
        watch_ms.len(),
        percentile(&watch_ms, 50.0),
        percentile(&watch_ms, 99.0),
        watch_ms.last().copied().unwrap_or(0.0),
    ));
    for w in &mut workers {
        w.kill9();
    }
    a.kill9();
    b.kill9();
    pool.close().await;
}

/// Submits `n` `noop` tasks one at a time through `client`, each after a random idle gap below
/// `max_gap` and once the previous one completed; returns submit -> `assigned_at` of each, in
/// milliseconds, sorted.
async fn dispatch_latencies(
    client: &Client,
    pool: &PgPool,
    prefix: &str,
    n: usize,
    max_gap: Duration,
) -> Vec<f64> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let gap = rand::random::<u64>() % max_gap.as_millis().max(1) as u64;
        tokio::time::sleep(Duration::from_millis(gap)).await;
        let req = proto::SubmitTaskRequest {
            task_type: "noop".into(),
            idempotency_key: format!("{prefix}-{i}"),
            ..Default::default()
        };
        let sent = Utc::now();
        let id = client.clone().submit_task(req).await.expect("submit").into_inner().task_id;
        let id: uuid::Uuid = id.parse().unwrap();
        let limit = Instant::now() + Duration::from_secs(30);
        loop {
            let done: Option<(DateTime<Utc>,)> = sqlx::query_as(
                "SELECT COALESCE(a.assigned_at, t.assigned_at) FROM tasks t
                 LEFT JOIN task_attempts a ON a.task_id = t.id AND a.attempt = 1
                 WHERE t.id = $1 AND t.status = 'completed'",
            )
            .bind(id)
            .fetch_optional(pool)
            .await
            .unwrap();
            if let Some((at,)) = done {
                out.push((at - sent).num_microseconds().unwrap_or(0) as f64 / 1000.0);
                break;
            }
            assert!(Instant::now() < limit, "task {id} not completed within 30 s");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    out.sort_by(f64::total_cmp);
    out
}
