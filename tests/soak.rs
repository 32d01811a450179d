//! Retention soak benchmark: a coordinator process on Postgres with retention ages of a few
//! seconds, two `worker` processes, and a steady stream of jobs of no-op tasks for several
//! minutes. Every 10 seconds it prints the row counts of `tasks`, `task_attempts`, `jobs` and
//! `job_tasks` and the size of `tasks` on disk; at the end it checks that the second half of the
//! run never held more rows than the first half's peak allows (the tables stay bounded).
//!
//! Not a timed test: it runs only when asked, and needs `TEST_DATABASE_URL`:
//!
//! ```sh
//! TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test \
//!   cargo test --release --test soak -- --ignored --nocapture
//! ```
//!
//! `SOAK_SECONDS` (default 300) and `SOAK_RATE` (tasks per second, default 200) change the load.

#[path = "common/cluster.rs"]
#[allow(dead_code)]
mod cluster;
mod common;

use std::time::{Duration, Instant};

use cluster::*;
use coordinator::proto;
use sqlx::PgPool;

/// Retention ages of the run: every finished task goes `AGE` after it finished.
const AGE: &str = "5s";

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    tasks: i64,
    finished: i64,
    attempts: i64,
    jobs: i64,
    members: i64,
    tasks_bytes: i64,
}

impl Sample {
    async fn read(pool: &PgPool) -> Result<Sample, sqlx::Error> {
        let (tasks, finished, attempts, jobs, members, tasks_bytes): (i64, i64, i64, i64, i64, i64) =
            sqlx::query_as(
                "SELECT (SELECT count(*) FROM tasks),
                        (SELECT count(*) FROM tasks WHERE status IN ('completed', 'failed', 'cancelled')),
                        (SELECT count(*) FROM task_attempts),
                        (SELECT count(*) FROM jobs),
                        (SELECT count(*) FROM job_tasks),
                        pg_total_relation_size('tasks')",
            )
            .fetch_one(pool)
            .await?;
        Ok(Sample { tasks, finished, attempts, jobs, members, tasks_bytes })
    }
}

/// The `coordinator_pruned_rows_total{table="tasks"}` and `coordinator_tasks_completed_total`
/// of a replica.
async fn pruned_and_completed(r: &Replica) -> (u64, u64) {
    let Ok((_, text)) = common::http_get(r.http_addr(), "/metrics").await else { return (0, 0) };
    let value = |prefix: &str| {
        text.lines()
            .filter_map(|l| l.strip_prefix(prefix))
            .filter_map(|v| v.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    (value(r#"coordinator_pruned_rows_total{table="tasks"}"#), value("coordinator_tasks_completed_total"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: cargo test --release --test soak -- --ignored --nocapture"]
async fn bench_retention_keeps_tables_bounded() {
    let Some(base) = coordinator::store::testing::postgres_url() else {
        println!("soak: skipped, TEST_DATABASE_URL is not set");
        return;
    };
    let seconds = env_or("SOAK_SECONDS", 300);
    let rate = env_or("SOAK_RATE", 200).max(10);
    let (url, schema) = fresh_schema(&base).await;
    // Dropped last, after the processes are killed.
    let _schema = SchemaGuard { base: base.clone(), schema };
    let dir = tempfile::tempdir().unwrap();
    let retention = format!(
        "retention:\n  completed: {AGE}\n  failed: {AGE}\n  cancelled: {AGE}\n  workers: 1h\n  interval: 1s\n  batch_size: 1000\n"
    );
    let mut replica = Replica::with_yaml(dir.path(), "soak-a", &url, Timings::default(), &retention);
    replica.start().await;
    let _workers: Vec<Proc> =
        (0..2).map(|i| spawn_worker(dir.path(), &format!("soak-w{i}"), &replica.endpoint(), 16)).collect();
    let pool = check_pool(&url);
    let client = common::client(&replica.endpoint()).await;

    // Ten jobs a second of rate/10 tasks each, for `seconds`.
    let per_job = (rate / 10) as usize;
    let until = Instant::now() + Duration::from_secs(seconds);
    let submitter = tokio::spawn({
        let mut client = client.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let mut submitted = 0u64;
            while Instant::now() < until {
                tick.tick().await;
                let tasks = (0..per_job)
                    .map(|_| proto::SubmitTaskRequest {
                        task_type: "noop".into(),
                        payload: vec![0u8; 256],
                        ..Default::default()
                    })
                    .collect();
                let req = proto::SubmitJobRequest { name: "soak".into(), tasks, ..Default::default() };
                if client.submit_job(req).await.is_ok() {
                    submitted += per_job as u64;
                }
            }
            submitted
        }
    });

    // Deleted rows leave dead tuples that autovacuum reclaims; a server that runs without it
    // (a test server may) gets the same from a VACUUM every 30 s, so the size on disk means what
    // it would in production.
    let autovacuum: String = sqlx::query_scalar("SHOW autovacuum").fetch_one(&pool).await.unwrap();
    let vacuum = autovacuum == "off";
    println!(
        "soak: {seconds} s at {rate} tasks/s, retention {AGE}, pruner every 1s, autovacuum {autovacuum}{}",
        if vacuum { " (the benchmark runs VACUUM every 30 s instead)" } else { "" }
    );
    let start = Instant::now();
    let mut samples: Vec<(u64, Sample)> = Vec::new();
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_secs(10)).await;
        if vacuum && samples.len() % 3 == 2 {
            for table in ["tasks", "task_attempts", "job_tasks", "jobs"] {
                let _ = sqlx::query(sqlx::AssertSqlSafe(format!("VACUUM {table}"))).execute(&pool).await;
            }
        }
        let Ok(s) = Sample::read(&pool).await else { continue };
        let (pruned, completed) = pruned_and_completed(&replica).await;
        let t = start.elapsed().as_secs();
        println!(
            "soak t={t:>4}s completed={completed:>8} pruned={pruned:>8} tasks={:>6} (finished {:>6}) \
             task_attempts={:>6} jobs={:>4} job_tasks={:>6} tasks_on_disk={:.1}MiB",
            s.tasks,
            s.finished,
            s.attempts,
            s.jobs,
            s.members,
            s.tasks_bytes as f64 / 1048576.0
        );
        samples.push((t, s));
    }
    let submitted = submitter.await.unwrap();
    let (pruned, completed) = pruned_and_completed(&replica).await;
    println!("soak: submitted={submitted} completed={completed} pruned={pruned}");

    assert!(samples.len() >= 4, "a run of at least 40 s");
    let half = samples.len() / 2;
    let peak =
        |range: &[(u64, Sample)], f: fn(&Sample) -> i64| range.iter().map(|(_, s)| f(s)).max().unwrap();
    for (name, f) in [
        ("tasks", (|s: &Sample| s.tasks) as fn(&Sample) -> i64),
        ("task_attempts", |s| s.attempts),
        ("jobs", |s| s.jobs),
        ("job_tasks", |s| s.members),
    ] {
        let (first, second) = (peak(&samples[..half], f), peak(&samples[half..], f));
        println!("soak: {name} peak {first} in the first half, {second} in the second");
        assert!(second <= first * 3 / 2 + 100, "{name} grew: {first} then {second}");
    }
    assert!(completed >= submitted * 9 / 10, "the workers kept up: {completed} of {submitted}");
    assert!(pruned > 0, "the pruner deleted rows");
}
