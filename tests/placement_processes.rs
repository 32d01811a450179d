//! Placement with real processes of the `coordinator` and `worker` binaries on Postgres: a task
//! that requires `gpu=h100` waits, unschedulable and saying why, while the plain tasks behind it
//! run, then runs on the one worker that has the label once it joins; and a type limit of 2,
//! configured on two replicas, holds under load (sampled from the database all along), then
//! holds at 3 once an admin raises it with `coordctl limits set`.
//!
//! Postgres only: without `TEST_DATABASE_URL` each test is reported ignored.

#[path = "common/cluster.rs"]
#[allow(dead_code)]
mod cluster;
mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, Ordering},
    },
    time::Duration,
};

use cluster::*;
use common::{Client, coordctl_command, wait_connected, wait_until};
use coordinator::proto;

fn base_url() -> String {
    coordinator::store::testing::postgres_url().expect("TEST_DATABASE_URL is set")
}

async fn get(c: &Client, id: &str) -> proto::Task {
    let mut c = c.clone();
    c.get_task(proto::GetTaskRequest { task_id: id.into(), include_attempts: false })
        .await
        .expect("get task")
        .into_inner()
}

async fn wait_completed(c: &Client, ids: &[String], limit: Duration) {
    wait_until("the tasks completed", limit, || {
        let (c, ids) = (c.clone(), ids.to_vec());
        async move {
            for id in &ids {
                if get(&c, id).await.status != proto::TaskStatus::Completed as i32 {
                    return false;
                }
            }
            true
        }
    })
    .await;
}

fn sleep_task(ms: u64) -> proto::SubmitTaskRequest {
    proto::SubmitTaskRequest {
        task_type: "sleep".into(),
        payload: format!("{{\"ms\":{ms}}}").into_bytes(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
async fn a_gpu_task_waits_for_then_runs_on_the_one_worker_with_the_label() {
    let base = base_url();
    let (url, schema) = fresh_schema(&base).await;
    let _schema = SchemaGuard { base, schema };
    let dir = tempfile::tempdir().unwrap();
    let mut coordinator = Replica::new(dir.path(), "c1", &url, Timings::default());
    coordinator.start().await;
    let c = common::client(&coordinator.endpoint()).await;
    let _cpu = spawn_worker_with(dir.path(), "cpu-1", &coordinator.endpoint(), 2, "labels:\n  gpu: a100\n");
    wait_connected(&c, &["cpu-1"]).await;

    // Submitted with coordctl, as an operator would.
    let out = coordctl_command(
        &coordinator.endpoint(),
        &["submit", "--type", "sleep", "--payload", r#"{"ms":10}"#, "--requires", "gpu=h100"],
    )
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let gpu_id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let mut ids = Vec::new();
    let mut submit = c.clone();
    for _ in 0..6 {
        ids.push(submit.submit_task(sleep_task(10)).await.expect("submit").into_inner().task_id);
    }
    // The plain tasks submitted after it run on the worker without the label.
    wait_completed(&c, &ids, Duration::from_secs(20)).await;
    let waiting = get(&c, &gpu_id).await;
    assert_eq!(waiting.status, proto::TaskStatus::Pending as i32, "{waiting:?}");
    assert_eq!(waiting.pending_reason, proto::PendingReason::Unschedulable as i32, "{waiting:?}");
    assert!(waiting.pending_detail.contains("gpu=h100"), "{}", waiting.pending_detail);
    assert_eq!(waiting.requires, ["gpu=h100"]);
    let shown = coordctl_command(&coordinator.endpoint(), &["get", &gpu_id]).output().unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout).to_string();
    assert!(shown.contains("requires  gpu=h100") && shown.contains("waiting   no live worker"), "{shown}");

    let _gpu = spawn_worker_with(dir.path(), "gpu-1", &coordinator.endpoint(), 1, "labels:\n  gpu: h100\n");
    wait_completed(&c, std::slice::from_ref(&gpu_id), Duration::from_secs(20)).await;
    let done = get(&c, &gpu_id).await;
    assert_eq!(done.worker_id, "gpu-1", "{done:?}");
    assert_eq!(done.attempt, 1, "{done:?}");
    for id in &ids {
        assert_eq!(get(&c, id).await.worker_id, "cpu-1");
    }
    // The labels a task's `requires` is matched against are listed with each worker.
    let listed = coordctl_command(&coordinator.endpoint(), &["workers"]).output().unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout).to_string();
    let row = |id: &str| listed.lines().find(|l| l.starts_with(id)).unwrap_or_default().to_owned();
    assert!(row("gpu-1").ends_with("gpu=h100") && row("cpu-1").ends_with("gpu=a100"), "{listed}");
    let listed = coordctl_command(&coordinator.endpoint(), &["--json", "workers"]).output().unwrap();
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).expect("workers as JSON");
    let gpu = listed.as_array().unwrap().iter().find(|w| w["worker_id"] == "gpu-1").expect("gpu-1 listed");
    assert_eq!(gpu["labels"], serde_json::json!({"gpu": "h100"}), "{listed}");

    // The README's chunk -> batch -> bundle pipeline is a job coordctl submits as written: the
    // chunks wait for a worker of their type, the batches and the bundle for their parents.
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme.find("```jsonl\n").expect("the README shows a pipeline") + "```jsonl\n".len();
    let pipeline = &readme[start..start + readme[start..].find("```").unwrap()];
    let file = dir.path().join("rollup.jsonl");
    std::fs::write(&file, pipeline).unwrap();
    let out = coordctl_command(&coordinator.endpoint(), &["job", "submit", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let told = String::from_utf8_lossy(&out.stderr);
    assert!(told.trim_end().ends_with("\n7 tasks") || told.trim() == "7 tasks", "{told}");
    let job_id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let out = coordctl_command(&coordinator.endpoint(), &["--json", "job", "get", &job_id]).output().unwrap();
    let job: serde_json::Value = serde_json::from_slice(&out.stdout).expect("job as JSON");
    assert_eq!((job["pending"].as_u64(), job["blocked"].as_u64()), (Some(4), Some(3)), "{job}");
    // The jobs table adds up: its blocked tasks have a column of their own.
    let out = coordctl_command(&coordinator.endpoint(), &["jobs"]).output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    let header: Vec<&str> = table.lines().next().unwrap_or_default().split_whitespace().collect();
    let row: Vec<&str> =
        table.lines().find(|l| l.starts_with(&job_id)).unwrap_or_default().split_whitespace().collect();
    let at = |name: &str| header.iter().position(|h| *h == name).unwrap_or_else(|| panic!("{name}: {table}"));
    assert_eq!((row[at("TOTAL")], row[at("BLOCKED")], row[at("PENDING")]), ("7", "3", "4"), "{table}");
}

/// Tasks of `task_type` assigned or running, sampled as fast as the database answers until
/// `stop`: the most seen before and after `raised` turned true.
struct Sampler {
    stop: Arc<AtomicBool>,
    raised: Arc<AtomicBool>,
    before: Arc<AtomicI64>,
    after: Arc<AtomicI64>,
    samples: tokio::task::JoinHandle<u64>,
}

impl Sampler {
    fn start(pool: sqlx::PgPool, task_type: &'static str) -> Sampler {
        let (stop, raised) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let (before, after) = (Arc::new(AtomicI64::new(0)), Arc::new(AtomicI64::new(0)));
        let samples = {
            let (stop, raised, before, after) = (stop.clone(), raised.clone(), before.clone(), after.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    // Read the flag first: a sample taken after it counts against the new limit.
                    let late = raised.load(Ordering::Relaxed);
                    let Ok(count) = sqlx::query_scalar::<_, i64>(
                        "SELECT count(*) FROM tasks WHERE task_type = $1 AND status IN ('assigned', 'running')",
                    )
                    .bind(task_type)
                    .fetch_one(&pool)
                    .await
                    else {
                        continue;
                    };
                    if late { &after } else { &before }.fetch_max(count, Ordering::Relaxed);
                    n += 1;
                }
                n
            })
        };
        Sampler { stop, raised, before, after, samples }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
async fn a_type_limit_holds_across_two_replicas_under_load_and_changes_at_runtime() {
    const TASKS: usize = 120;
    let base = base_url();
    let (url, schema) = fresh_schema(&base).await;
    let _schema = SchemaGuard { base, schema };
    let dir = tempfile::tempdir().unwrap();
    let limits = "scheduler:\n  type_limits:\n    sleep: 2\n";
    let mut a = Replica::with_yaml(dir.path(), "replica-a", &url, Timings::default(), limits);
    let mut b = Replica::with_yaml(dir.path(), "replica-b", &url, Timings::default(), limits);
    a.start().await;
    b.start().await;
    let clients = clients(&[&a, &b]).await;
    let mut workers = Vec::new();
    for i in 0..4 {
        let to = if i % 2 == 0 { a.endpoint() } else { b.endpoint() };
        workers.push(spawn_worker(dir.path(), &format!("w{i}"), &to, 4));
    }
    wait_connected(&clients[0], &["w0", "w2"]).await;
    wait_connected(&clients[1], &["w1", "w3"]).await;

    let pool = check_pool(&url);
    let sampler = Sampler::start(pool.clone(), "sleep");
    let tasks = sleep_tasks("limited", std::iter::repeat_n(15, TASKS));
    let ids = submit_all(&clients, tasks, 10, Duration::from_secs(20)).await;
    // A third of the way through, an admin raises the limit on replica B.
    let completed = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM tasks WHERE status = 'completed'")
            .fetch_one(&pool)
            .await
            .unwrap_or(0)
    };
    wait_until("a third of the tasks completed", Duration::from_secs(60), || async {
        completed().await >= (TASKS / 3) as i64
    })
    .await;
    // Samples from here on may see the new limit.
    sampler.raised.store(true, Ordering::Relaxed);
    let out = coordctl_command(&b.endpoint(), &["limits", "set", "sleep", "3"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let shown = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(shown.contains("sleep") && shown.contains("of 3") && shown.contains("admin"), "{shown}");

    wait_completed(&clients[0], &ids, Duration::from_secs(60)).await;
    sampler.stop.store(true, Ordering::Relaxed);
    let samples = sampler.samples.await.unwrap();
    let (before, after) = (sampler.before.load(Ordering::Relaxed), sampler.after.load(Ordering::Relaxed));
    let tally = Tally::read(&pool).await.unwrap();
    println!(
        "type limit over two replicas: {TASKS} tasks, {samples} samples, at most {before} in flight under \
         the limit of 2, {after} under 3; {tally:?}"
    );
    assert!(before <= 2, "{before} in flight under a limit of 2");
    assert!(after <= 3, "{after} in flight under a limit of 3");
    assert_eq!((before, after), (2, 3), "the load reached each limit (or the test shows nothing)");
    assert_eq!(tally.accepted_twice, 0, "{tally:?}");
    assert_eq!(tally.completed, TASKS as i64, "{tally:?}");
    let listed = coordctl_command(&a.endpoint(), &["limits", "list"]).output().unwrap();
    assert!(String::from_utf8_lossy(&listed.stdout).contains("of 3"), "{listed:?}");
    // A limit is cleared; a type with no limit is not reported cleared.
    let cleared = coordctl_command(&a.endpoint(), &["limits", "clear", "sleep"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&cleared.stdout).trim(), "cleared the limit of sleep");
    let none = coordctl_command(&a.endpoint(), &["limits", "clear", "nosuch"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&none.stdout).trim(), "nosuch had no limit to clear");
    drop(workers);
    pool.close().await;
}
