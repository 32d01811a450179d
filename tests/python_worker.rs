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

/// `examples/python/worker.py` running against a coordinator, with the stubs it imports; its
/// stderr is collected until it exits.
struct PythonWorker {
    child: tokio::process::Child,
    log: tokio::task::JoinHandle<String>,
    _stubs: tempfile::TempDir,
}

impl PythonWorker {
    async fn start(endpoint: &str, id: &str, max_concurrent: u32) -> PythonWorker {
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
        assert!(
            out.status.success(),
            "generating the stubs failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut child = tokio::process::Command::new(&python)
            .arg(root.join("examples/python/worker.py"))
            .args([
                "--coordinator",
                endpoint,
                "--worker-id",
                id,
                "--max-concurrent",
                &max_concurrent.to_string(),
            ])
            .env("PYTHONPATH", stubs.path())
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start the Python worker");
        let mut stderr = child.stderr.take().expect("piped");
        let log = tokio::spawn(async move {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text).await;
            text
        });
        PythonWorker { child, log, _stubs: stubs }
    }

    /// SIGTERM, then its exit status (within 20 s) and its log.
    async fn terminate(mut self) -> (std::process::ExitStatus, String) {
        // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
        let pid = self.child.id().expect("worker running") as i32;
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let status = tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .expect("the Python worker exits within 20 s of SIGTERM")
            .expect("wait for the Python worker");
        (status, self.log.await.unwrap())
    }
}

#[tokio::test]
#[cfg_attr(not(test_python), ignore = "needs TEST_PYTHON: a python3 with grpcio")]
async fn python_worker_runs_py_upper_and_deregisters_on_sigterm() {
    // Heartbeat timeout 3 s: the coordinator asks for a heartbeat every second.
    let db = TestDb::sqlite().await;
    let tc = TestCoordinator::start(&db, |c| c.coordinator.heartbeat_timeout = Duration::from_secs(3)).await;
    let mut client = tc.client().await;
    let worker = PythonWorker::start(&tc.endpoint(), WORKER_ID, 2).await;

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

    let (status, log) = worker.terminate().await;
    assert!(status.success(), "the Python worker exited with {status}; its log:\n{log}");
    assert_eq!(
        worker_state(&mut client, WORKER_ID).await,
        proto::WorkerState::Draining,
        "the worker deregistered; its log:\n{log}"
    );

    tc.stop().await.unwrap();
}

/// The example worker under an id a live worker of another host holds: refused (it logs what to
/// fix), it sends no heartbeats and takes nothing from the holder, whose task stays at attempt 1;
/// once the holder goes quiet (SUSPECT after the 3 s heartbeat timeout), it registers, gets the
/// holder's task back (the holder's process is gone: charged) and completes it.
#[tokio::test]
#[cfg_attr(not(test_python), ignore = "needs TEST_PYTHON: a python3 with grpcio")]
async fn python_worker_waits_while_its_id_is_in_use() {
    let db = TestDb::sqlite().await;
    let tc = TestCoordinator::start(&db, |c| c.coordinator.heartbeat_timeout = Duration::from_secs(3)).await;
    let mut client = tc.client().await;
    let id = "py-shared";
    let mut holder = tc.client().await;
    holder
        .register_worker(proto::RegisterWorkerRequest {
            worker_id: id.into(),
            max_concurrent_tasks: 1,
            capabilities: vec!["py_upper".into()],
            hostname: "another-host".into(),
            instance_id: "holder".into(),
            ..Default::default()
        })
        .await
        .expect("the holder registers");
    let beats = keep_alive(holder.clone(), id, Duration::from_millis(200));
    let mut stream = holder
        .receive_tasks(proto::ReceiveTasksRequest { worker_id: id.into(), ..Default::default() })
        .await
        .expect("open task stream")
        .into_inner();
    wait_connected(&client, &[id]).await;
    let task_id = submit(&mut client, "py_upper", b"shared").await;
    let pushed = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("pushed")
        .expect("stream")
        .expect("an assignment");
    assert_eq!(pushed.task_id, task_id);

    let worker = PythonWorker::start(&tc.endpoint(), id, 1).await;
    // Refused, and refused again when it retries: the holder keeps its session and task.
    let refused = r#"grpc_server_handled_total{grpc_service="coordinator.CoordinatorService",grpc_method="RegisterWorker",grpc_type="unary",grpc_code="AlreadyExists"}"#;
    scrape_until(tc.http, "the Python worker is refused twice", |s| sample(s, refused) >= 2.0).await;
    let info = worker_info(&mut client, id).await.expect("listed");
    assert_eq!(info.hostname, "another-host", "still the holder's session: {info:?}");
    assert_eq!(proto::WorkerState::try_from(info.state).unwrap(), proto::WorkerState::Active);
    let task = get_task(&mut client, &task_id).await;
    assert_eq!((task.attempt, task.failures), (1, 0), "not taken back: {task:?}");
    assert_eq!(task.status(), proto::TaskStatus::Running, "{task:?}");

    // The holder goes away: the Python worker takes the id and runs the task again.
    beats.abort();
    drop(stream);
    // SUSPECT after 3 s, a refused registration tried again within 5 s, the task's retry
    // backoff: well within 30 s.
    wait_until("the Python worker completes the task", Duration::from_secs(30), || {
        let mut client = client.clone();
        let task_id = task_id.clone();
        async move { task_status(&mut client, &task_id).await == proto::TaskStatus::Completed }
    })
    .await;
    let task = get_task(&mut client, &task_id).await;
    assert_eq!((task.result.as_slice(), task.attempt), (&b"SHARED"[..], 2), "{task:?}");
    let info = worker_info(&mut client, id).await.expect("listed");
    assert_ne!(info.hostname, "another-host", "the Python worker's session: {info:?}");

    let (status, log) = worker.terminate().await;
    assert!(status.success(), "the Python worker exited with {status}; its log:\n{log}");
    assert!(
        log.contains("is in use by a live worker on host another-host")
            && log.contains("give each worker its own id"),
        "it said what to fix; its log:\n{log}"
    );
    tc.stop().await.unwrap();
}
