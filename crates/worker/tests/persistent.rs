//! The `persistent` handler against real prover processes: the reference child
//! `examples/persistent/prover.py`, run with `python3` from PATH.

use std::{
    process::Command,
    time::{Duration, Instant, SystemTime},
};

use coordinator_worker::{
    CancellationToken, Handler, Persistent, PersistentConfig, TaskContext, TaskFailure,
};
use sha2::{Digest, Sha256};

const PROVER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/persistent/prover.py");

/// The reference prover with `args`, quick timeouts for tests.
fn config(args: &[&str]) -> PersistentConfig {
    let python_works = Command::new("python3").arg("--version").output().is_ok_and(|o| o.status.success());
    assert!(python_works, "these tests run examples/persistent/prover.py with python3 from PATH");
    let mut cfg = PersistentConfig::new("prove", ["python3", PROVER].into_iter().chain(args.iter().copied()));
    cfg.start_timeout = Duration::from_secs(20);
    cfg.cancel_grace = Duration::from_millis(300);
    cfg.restart_backoff_base = Duration::from_millis(50);
    cfg.restart_backoff_max = Duration::from_secs(1);
    cfg.shutdown_grace = Duration::from_secs(2);
    cfg
}

fn task(id: &str, payload: &str) -> TaskContext {
    TaskContext {
        task_id: id.into(),
        task_type: "prove".into(),
        payload: payload.as_bytes().to_vec(),
        attempt: 1,
        deadline: None,
        cancelled: CancellationToken::new(),
        parents: Vec::new(),
    }
}

/// Every test is bounded in time.
async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(60), f).await.expect("test timed out")
}

/// The prover's answer: `{"sha256", "pid", "served", "slot"}`.
#[derive(Debug, serde::Deserialize)]
struct Answer {
    sha256: String,
    pid: u32,
    served: u64,
    slot: String,
}

async fn prove(h: &Persistent, id: &str, payload: &str) -> Answer {
    let r = h.run(task(id, payload)).await.unwrap_or_else(|e| panic!("task {id}: {e:?}"));
    serde_json::from_slice(&r).expect("the prover answers JSON")
}

async fn fail(h: &Persistent, t: TaskContext) -> TaskFailure {
    let id = t.task_id.clone();
    match h.run(t).await {
        Ok(r) => panic!("task {id} succeeded: {}", String::from_utf8_lossy(&r)),
        Err(e) => e,
    }
}

/// A payload that works for 20 s (ignoring cancel when `ignore_cancel`) and creates a file in
/// `dir` once the process has begun it; and that file.
fn long_task(dir: &tempfile::TempDir, ignore_cancel: bool) -> (String, std::path::PathBuf) {
    let marker = dir.path().join("started");
    let payload = serde_json::json!({"sleep_ms": 20000, "ignore_cancel": ignore_cancel, "started": marker});
    (payload.to_string(), marker)
}

/// Waits until the process has begun the task that creates `marker`.
async fn wait_started(marker: &std::path::Path) {
    let until = Instant::now() + Duration::from_secs(10);
    while !marker.exists() {
        assert!(Instant::now() < until, "the process never began the task");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Cancels `t` once the process has begun it.
fn cancel_when_started(t: &TaskContext, marker: std::path::PathBuf) {
    let token = t.cancelled.clone();
    tokio::spawn(async move {
        wait_started(&marker).await;
        token.cancel();
    });
}

/// Whether a process runs (a zombie does not count).
#[cfg(target_os = "linux")]
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start()).unwrap_or("");
            !state.starts_with('Z') && !state.starts_with('X')
        }
        Err(_) => false,
    }
}

#[cfg(not(target_os = "linux"))]
fn alive(_pid: u32) -> bool {
    false
}

async fn wait_dead(pid: u32) -> bool {
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        if !alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test]
async fn one_process_serves_task_after_task_with_its_key_loaded_once() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("key.bin");
        let key: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&key_file, &key).unwrap();
        let h = Persistent::start(config(&[key_file.to_str().unwrap()])).unwrap();
        let mut pids = Vec::new();
        for (i, payload) in ["witness one", "witness two", ""].iter().enumerate() {
            let a = prove(&h, &format!("t-{i}"), payload).await;
            let key_digest = Sha256::digest(&key);
            let expected = hex::encode(Sha256::digest([&key_digest[..], payload.as_bytes()].concat()));
            assert_eq!(a.sha256, expected);
            // Not restarted between tasks: one process, counting.
            assert_eq!(a.served, i as u64 + 1, "{a:?}");
            assert_eq!(a.slot, "0");
            pids.push(a.pid);
        }
        assert!(pids.iter().all(|p| *p == pids[0]), "{pids:?}");
        h.shutdown().await;
        assert!(wait_dead(pids[0]).await, "the process outlived shutdown");
        // After shutdown, a task fails retriably.
        let e = fail(&h, task("late", "")).await;
        assert!(e.retriable && e.message.contains("shutting down"), "{e:?}");
    })
    .await
}

#[tokio::test]
async fn a_crash_fails_the_task_in_flight_retriably_and_the_next_runs_on_a_restarted_process() {
    bounded(async {
        let h = Persistent::start(config(&[])).unwrap();
        let before = prove(&h, "t-1", "a").await;
        let e = fail(&h, task("t-2", r#"{"crash": true}"#)).await;
        assert!(e.retriable, "{e:?}");
        assert!(e.message.contains("exited with code 3 while running the task"), "{}", e.message);
        assert!(e.message.ends_with("stderr: prover: crashing on request"), "{}", e.message);
        let after = prove(&h, "t-3", "b").await;
        assert_ne!(after.pid, before.pid);
        assert_eq!(after.served, 1, "a new process: {after:?}");
        // A second crash in a row restarts after the backoff, and still serves.
        let e = fail(&h, task("t-4", r#"{"crash": true}"#)).await;
        assert!(e.retriable, "{e:?}");
        assert_ne!(prove(&h, "t-5", "c").await.pid, after.pid);
        h.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn a_failure_from_the_process_is_passed_on_and_the_process_serves_on() {
    bounded(async {
        let h = Persistent::start(config(&[])).unwrap();
        let pid = prove(&h, "t-1", "a").await.pid;
        let e = fail(&h, task("t-2", r#"{"fail": "bad witness", "retriable": true}"#)).await;
        assert_eq!(e, TaskFailure::retriable("bad witness"));
        let e = fail(&h, task("t-3", r#"{"fail": "never provable"}"#)).await;
        assert_eq!(e, TaskFailure::permanent("never provable"));
        assert_eq!(prove(&h, "t-4", "b").await.pid, pid);
        h.shutdown().await;
    })
    .await
}

/// Sends a 20 s task (one that ignores cancel when `ignores`) and cancels it once the process
/// began it: the failure says "cancelled", so the task was stopped rather than run to its end.
async fn cancel_a_long_task(h: &Persistent, ignores: bool) -> TaskFailure {
    let dir = tempfile::tempdir().unwrap();
    let (payload, marker) = long_task(&dir, ignores);
    let t = task("t-2", &payload);
    cancel_when_started(&t, marker);
    let e = fail(h, t).await;
    assert!(!e.retriable && e.message.starts_with("cancelled"), "{e:?}");
    e
}

#[tokio::test]
async fn a_cancel_is_answered_by_the_process_which_serves_on() {
    bounded(async {
        let h = Persistent::start(config(&[])).unwrap();
        let pid = prove(&h, "t-1", "a").await.pid;
        let e = cancel_a_long_task(&h, false).await;
        assert!(e.message.contains("stopped after"), "{}", e.message);
        let a = prove(&h, "t-3", "b").await;
        assert_eq!((a.pid, a.served), (pid, 2), "the process answered the cancel and was kept");
        h.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn a_process_that_ignores_cancel_is_killed_and_restarted() {
    bounded(async {
        let h = Persistent::start(config(&[])).unwrap();
        let pid = prove(&h, "t-1", "a").await.pid;
        let e = cancel_a_long_task(&h, true).await;
        assert!(e.message.contains("did not answer cancel within 300ms"), "{}", e.message);
        assert!(wait_dead(pid).await, "the process that ignored cancel still runs");
        let a = prove(&h, "t-3", "b").await;
        assert_ne!(a.pid, pid);
        h.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn the_deadline_stops_the_task_retriably() {
    bounded(async {
        let h = Persistent::start(config(&[])).unwrap();
        let pid = prove(&h, "t-1", "a").await.pid;
        let with_deadline = |id: &str, payload: &str| {
            let mut t = task(id, payload);
            t.deadline = Some(SystemTime::now() + Duration::from_millis(400));
            t
        };
        // A 20 s task that ends "deadline exceeded" was stopped, not waited for.
        let e = fail(&h, with_deadline("t-2", r#"{"sleep_ms": 20000}"#)).await;
        assert!(e.retriable && e.message.starts_with("deadline exceeded"), "{e:?}");
        // It answered the cancel: kept.
        assert_eq!(prove(&h, "t-3", "b").await.pid, pid);
        // One that does not answer is replaced.
        let e = fail(&h, with_deadline("t-4", r#"{"sleep_ms": 20000, "ignore_cancel": true}"#)).await;
        assert!(e.retriable && e.message.starts_with("deadline exceeded"), "{e:?}");
        assert!(e.message.contains("killed and restarted"), "{}", e.message);
        assert_ne!(prove(&h, "t-5", "c").await.pid, pid);
        // A deadline already past: nothing is sent.
        let mut t = task("t-6", "d");
        t.deadline = Some(SystemTime::now() - Duration::from_secs(1));
        let e = fail(&h, t).await;
        assert!(e.retriable && e.message.starts_with("deadline exceeded"), "{e:?}");
        h.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn oversize_output_is_a_permanent_failure_and_restarts_the_process() {
    bounded(async {
        let mut cfg = config(&[]);
        cfg.max_output = 1000;
        let h = Persistent::start(cfg).unwrap();
        // Exactly the limit is fine.
        let r = h.run(task("t-1", r#"{"big": 1000}"#)).await.unwrap();
        assert_eq!(r.len(), 1000);
        let pid = prove(&h, "t-2", "a").await.pid;
        let e = fail(&h, task("t-3", r#"{"big": 100000}"#)).await;
        assert!(!e.retriable, "{e:?}");
        assert!(e.message.contains("output exceeds 1000 bytes"), "{}", e.message);
        assert!(wait_dead(pid).await);
        assert_ne!(prove(&h, "t-4", "b").await.pid, pid);
        h.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn a_malformed_frame_is_a_retriable_failure_and_restarts_the_process() {
    bounded(async {
        let h = Persistent::start(config(&[])).unwrap();
        let pid = prove(&h, "t-1", "a").await.pid;
        let e = fail(&h, task("t-2", r#"{"garbage": true}"#)).await;
        assert!(e.retriable, "{e:?}");
        assert!(e.message.contains("malformed frame"), "{}", e.message);
        assert!(e.message.contains("this is not a frame"), "{}", e.message);
        assert_ne!(prove(&h, "t-3", "b").await.pid, pid);
        h.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn a_process_that_never_says_ready_fails_its_task_after_the_start_timeout() {
    bounded(async {
        let mut cfg = config(&["--no-ready"]);
        cfg.start_timeout = Duration::from_millis(500);
        let h = Persistent::start(cfg).unwrap();
        let e = fail(&h, task("t-1", "a")).await;
        assert!(e.retriable, "{e:?}");
        assert!(e.message.contains("could not start: sent no ready within 500ms"), "{}", e.message);
        h.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn two_processes_run_two_tasks_at_once() {
    bounded(async {
        let mut cfg = config(&[]);
        cfg.processes = 2;
        let h = Persistent::start(cfg).unwrap();
        // Both ready (a first task each, in parallel).
        let (a, b) = tokio::join!(prove(&h, "w-1", "x"), prove(&h, "w-2", "y"));
        assert_ne!(a.pid, b.pid);
        let started = Instant::now();
        let slow = r#"{"sleep_ms": 1500}"#;
        let (a, b) = tokio::join!(prove(&h, "t-1", slow), prove(&h, "t-2", slow));
        let elapsed = started.elapsed();
        assert!(elapsed < Duration::from_millis(2800), "ran one after the other: {elapsed:?}");
        assert_ne!(a.pid, b.pid);
        let mut slots = [a.slot, b.slot];
        slots.sort();
        assert_eq!(slots, ["0", "1"]);
        // A third task waits for a free process instead of failing.
        let (a, b, c) = tokio::join!(prove(&h, "t-3", slow), prove(&h, "t-4", slow), prove(&h, "t-5", "z"));
        assert_eq!(a.served + b.served + c.served, 3 + 3 + 4, "{a:?} {b:?} {c:?}");
        h.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn a_dropped_task_kills_and_restarts_the_process() {
    bounded(async {
        let h = Persistent::start(config(&[])).unwrap();
        let pid = prove(&h, "t-1", "a").await.pid;
        let h2 = h.clone();
        let dir = tempfile::tempdir().unwrap();
        let (payload, marker) = long_task(&dir, false);
        let run = tokio::spawn(async move { h2.run(task("t-2", &payload)).await });
        wait_started(&marker).await;
        run.abort();
        let _ = run.await;
        assert!(wait_dead(pid).await, "the process still works on a task nobody waits for");
        assert_ne!(prove(&h, "t-3", "b").await.pid, pid);
        h.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn a_silent_process_is_considered_hung_after_the_progress_timeout() {
    bounded(async {
        let mut cfg = config(&[]);
        // The prover sends progress every 500 ms while it works.
        cfg.progress_timeout = Some(Duration::from_millis(1500));
        let h = Persistent::start(cfg.clone()).unwrap();
        let a = prove(&h, "t-1", r#"{"sleep_ms": 2500}"#).await;
        assert_eq!(a.served, 1);
        h.shutdown().await;
        cfg.progress_timeout = Some(Duration::from_millis(300));
        let h = Persistent::start(cfg).unwrap();
        let e = fail(&h, task("t-2", r#"{"sleep_ms": 2500}"#)).await;
        assert!(e.retriable && e.message.contains("sent nothing for 300ms"), "{e:?}");
        h.shutdown().await;
    })
    .await
}
