//! The coordinator as a real process: killed with SIGKILL in the middle of a run and started
//! again on the same database, nothing is lost and nothing is accepted twice; stopped with
//! SIGTERM while worker streams are open, it drains within its deadline and exits 0.

mod common;

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use common::*;
use coordinator::{
    domain::{TaskId, TaskState},
    proto,
};
use coordinator_worker::{Worker, WorkerOptions, handler_fn};
use tokio_util::sync::CancellationToken;

fn write_config(dir: &Path, url: &str, grpc: u16, http: u16) -> std::path::PathBuf {
    let path = dir.join("coordinator.yaml");
    let yaml = format!(
        "coordinator:
  id: crash-test
  bind_address: 127.0.0.1
  grpc_port: {grpc}
  http_port: {http}
  poll_interval: 200ms
  heartbeat_timeout: 1s
  stale_task_timeout: 3s
  cleanup_interval: 500ms
  shutdown_timeout: 5s
database:
  url: {url:?}
  max_open_conns: 8
  max_idle_conns: 1
logging:
  level: warn
  format: json
auth:
  enabled: false
"
    );
    std::fs::write(&path, yaml).unwrap();
    path
}

/// Starts the coordinator binary and waits for its "coordinator ready" line.
fn spawn_coordinator(config: &Path) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .arg("-config")
        .arg(config)
        .env("RUST_LOG", "info,sqlx=warn,h2=warn,tonic=warn,hyper=warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn coordinator");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut ready = Some(tx);
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains("coordinator ready")
                && let Some(tx) = ready.take()
            {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30)).expect("coordinator logs ready");
    child
}

fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let start = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("coordinator did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn completed(db: &TestDb) -> u64 {
    db.store.task_counts().await.unwrap().get(&TaskState::Completed).copied().unwrap_or(0)
}

async fn kill_restart_and_drain(db: &TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let [grpc, http] = common::free_ports();
    let config = write_config(dir.path(), &db.url, grpc, http);
    let endpoint = format!("http://127.0.0.1:{grpc}");
    let mut coordinator = spawn_coordinator(&config);

    // Three workers that take a moment per task and count every run they report.
    let shutdown = CancellationToken::new();
    let runs = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut workers = Vec::new();
    for i in 0..3 {
        let mut opts = WorkerOptions::new(endpoint.clone(), format!("crash-w{i}"));
        opts.max_concurrent = 2;
        opts.backoff_base = Duration::from_millis(100);
        opts.backoff_max = Duration::from_secs(1);
        let runs = runs.clone();
        let handler = handler_fn(move |t| {
            let runs = runs.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(40)).await;
                runs.lock().unwrap().push(t.task_id.clone());
                Ok(t.payload)
            }
        });
        workers.push(tokio::spawn(Worker::new(opts, handler).unwrap().run(shutdown.clone())));
    }

    const N: usize = 60;
    let mut client = client(&endpoint).await;
    wait_connected(&client, &["crash-w0", "crash-w1", "crash-w2"]).await;
    let ids = submit_batch(&mut client, "prove", N, |i| format!("block-{i}").into_bytes()).await;

    // Kill it without warning part-way through.
    wait_until("a quarter of the tasks completed", Duration::from_secs(30), || async {
        completed(db).await >= (N / 4) as u64
    })
    .await;
    coordinator.kill().expect("SIGKILL");
    let _ = coordinator.wait();
    let at_kill = completed(db).await;
    assert!(at_kill < N as u64, "the kill must land mid-run ({at_kill} of {N} done)");

    // A new process on the same database: the workers find it on their own.
    let mut coordinator = spawn_coordinator(&config);
    wait_until("every task completed after the restart", Duration::from_secs(60), || async {
        completed(db).await == N as u64
    })
    .await;
    for id in &ids {
        let tid: TaskId = id.parse().unwrap();
        let task = db.store.get_task(tid).await.unwrap().unwrap();
        assert_eq!(task.state, TaskState::Completed);
        let i: usize = id_index(&ids, id);
        assert_eq!(task.result.as_deref(), Some(format!("block-{i}").as_bytes()));
        let attempts = db.store.attempts(tid).await.unwrap();
        let accepted = attempts.iter().filter(|a| a.outcome.as_deref() == Some("completed")).count();
        assert_eq!(accepted, 1, "task {id} accepted exactly once: {attempts:?}");
    }
    // Every task ran at least once; a re-run (lost lease during the outage) is allowed, a
    // second acceptance is not (checked above).
    let ran: std::collections::HashSet<String> = runs.lock().unwrap().iter().cloned().collect();
    assert_eq!(ran.len(), N);

    // SIGTERM with the worker streams open: drains within the deadline and exits 0.
    wait_connected(&client, &["crash-w0", "crash-w1", "crash-w2"]).await;
    let pid = coordinator.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = wait_exit(&mut coordinator, Duration::from_secs(15));
    assert!(status.success(), "graceful shutdown exits 0, got {status:?}");

    shutdown.cancel();
    for w in workers {
        w.await.unwrap().unwrap();
    }
    let _ = client.list_workers(proto::ListWorkersRequest::default()).await;
}

fn id_index(ids: &[String], id: &str) -> usize {
    ids.iter().position(|x| x == id).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_kill_restart_and_drain() {
    let db = TestDb::sqlite().await;
    kill_restart_and_drain(&db).await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
async fn postgres_kill_restart_and_drain() {
    let db = TestDb::postgres().await.expect("TEST_DATABASE_URL is set");
    kill_restart_and_drain(&db).await;
    db.cleanup().await;
}
