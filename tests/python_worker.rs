//! The example Python worker (`examples/python/worker.py`) against a real coordinator on SQLite:
//! it registers with its task type, heartbeats on the interval the coordinator gives, runs a
//! `py_upper` task and reports the result with its attempt, reports a payload it cannot run as
//! a non-retriable failure, and on SIGTERM deregisters and exits 0.
//!
//! Needs a python3 with grpcio and grpcio-tools, named by `TEST_PYTHON` (`.ci/run` makes one in a
//! virtual environment); without it the test is reported as ignored. The stubs are generated
//! from `proto/coordinator.proto` with the command docs/writing-a-worker.md gives.

mod common;

use std::{
    path::Path,
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::*;
use coordinator::proto;
use tokio::io::AsyncReadExt;

const WORKER_ID: &str = "py-worker-1";

async fn worker_info(client: &mut Client, id: &str) -> Option<proto::WorkerInfo> {
    let workers = client.list_workers(proto::ListWorkersRequest::default()).await.ok()?.into_inner().workers;
    workers.into_iter().find(|w| w.worker_id == id)
}

fn last_heartbeat(w: &proto::WorkerInfo) -> (i64, i32) {
    w.last_heartbeat.as_ref().map(|t| (t.seconds, t.nanos)).unwrap_or_default()
}

/// Waits until the worker's last heartbeat is later than `after`; returns the new one.
async fn next_heartbeat(client: &Client, after: (i64, i32)) -> (i64, i32) {
    let seen = Arc::new(Mutex::new(after));
    wait_until("the Python worker heartbeats", Duration::from_secs(10), || {
        let mut client = client.clone();
        let seen = seen.clone();
        async move {
            let Some(w) = worker_info(&mut client, WORKER_ID).await else { return false };
            let at = last_heartbeat(&w);
            *seen.lock().unwrap() = at;
            at > after
        }
    })
    .await;
    *seen.lock().unwrap()
}

async fn wait_status(client: &Client, id: &str, want: proto::TaskStatus) -> proto::Task {
    wait_until(&format!("task {id} is {want:?}"), Duration::from_secs(15), || {
        let mut client = client.clone();
        let id = id.to_owned();
        async move { task_status(&mut client, &id).await == want }
    })
    .await;
    get_task(&mut client.clone(), id).await
}

#[tokio::test]
#[cfg_attr(not(test_python), ignore = "needs TEST_PYTHON: a python3 with grpcio")]
async fn python_worker_runs_py_upper_and_deregisters_on_sigterm() {
    let python = std::env::var("TEST_PYTHON")
        .ok()
        .filter(|p| !p.is_empty())
        .or(option_env!("TEST_PYTHON").map(str::to_owned))
        .expect("TEST_PYTHON names a python3 with grpcio and grpcio-tools");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));

    // The stubs, generated as docs/writing-a-worker.md says (into a directory of the test's own).
    let stubs = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new(&python)
        .current_dir(root)
        .args(["-m", "grpc_tools.protoc", "-I", "proto"])
        .arg(format!("--python_out={}", stubs.path().display()))
        .arg(format!("--grpc_python_out={}", stubs.path().display()))
        .arg("proto/coordinator.proto")
        .output()
        .await
        .expect("run grpc_tools.protoc");
    assert!(out.status.success(), "generating the stubs failed: {}", String::from_utf8_lossy(&out.stderr));

    // Heartbeat timeout 3 s: the coordinator asks for a heartbeat every second.
    let db = TestDb::sqlite().await;
    let tc = TestCoordinator::start(&db, |c| c.coordinator.heartbeat_timeout = Duration::from_secs(3)).await;
    let mut client = tc.client().await;

    let mut worker = tokio::process::Command::new(&python)
        .arg(root.join("examples/python/worker.py"))
        .args(["--coordinator", &tc.endpoint(), "--worker-id", WORKER_ID, "--max-concurrent", "2"])
        .env("PYTHONPATH", stubs.path())
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the Python worker");
    let mut stderr = worker.stderr.take().expect("piped");
    let log = tokio::spawn(async move {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text).await;
        text
    });

    wait_connected(&client, &[WORKER_ID]).await;
    let info = worker_info(&mut client, WORKER_ID).await.expect("worker listed");
    assert_eq!(info.capabilities, ["py_upper"]);
    assert_eq!(info.max_concurrent_tasks, 2);
    assert_eq!(proto::WorkerState::try_from(info.state).unwrap(), proto::WorkerState::Active);
    // Two heartbeats after registering: it keeps heartbeating on the interval.
    let first = next_heartbeat(&client, last_heartbeat(&info)).await;
    next_heartbeat(&client, first).await;

    let id = submit(&mut client, "py_upper", b"hello, world").await;
    let task = wait_status(&client, &id, proto::TaskStatus::Completed).await;
    assert_eq!(task.result, b"HELLO, WORLD");
    assert_eq!(task.worker_id, WORKER_ID);
    assert_eq!(task.attempt, 1);

    // A payload that can never succeed fails at once, not retried.
    let bad = submit(&mut client, "py_upper", &[0xff, 0xfe]).await;
    let task = wait_status(&client, &bad, proto::TaskStatus::Failed).await;
    assert!(task.error.contains("not UTF-8"), "error: {}", task.error);
    assert_eq!(task.attempt, 1);

    // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
    let pid = worker.id().expect("worker running") as i32;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = tokio::time::timeout(Duration::from_secs(20), worker.wait())
        .await
        .expect("the Python worker exits within 20 s of SIGTERM")
        .expect("wait for the Python worker");
    let log = log.await.unwrap();
    assert!(status.success(), "the Python worker exited with {status}; its log:\n{log}");
    assert_eq!(
        worker_state(&mut client, WORKER_ID).await,
        proto::WorkerState::Draining,
        "the worker deregistered; its log:\n{log}"
    );

    tc.stop().await.unwrap();
}
