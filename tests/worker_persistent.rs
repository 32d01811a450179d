//! The `worker` binary with a `persistent:` section, end to end: a coordinator in this process,
//! the real `worker` binary running the reference prover `examples/persistent/prover.py`
//! (python3 from PATH), and tasks submitted with coordctl.

mod common;

use std::{
    collections::BTreeSet,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use sha2::{Digest, Sha256};

const PROVER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/persistent/prover.py");

/// The worker process, killed if the test fails half-way.
struct WorkerProc(Child);

impl Drop for WorkerProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < limit, "no {what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(target_os = "linux")]
fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start()).unwrap_or("");
        !state.starts_with('Z') && !state.starts_with('X')
    })
}

#[cfg(not(target_os = "linux"))]
fn alive(_pid: u64) -> bool {
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_worker_binary_serves_tasks_with_persistent_prover_processes() {
    let db = TestDb::sqlite().await;
    let tc = TestCoordinator::start(&db, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let key: Vec<u8> = (0..1024 * 1024u32).map(|i| (i % 253) as u8).collect();
    let key_file = dir.path().join("key.bin");
    std::fs::write(&key_file, &key).unwrap();
    let config = dir.path().join("worker.yaml");
    std::fs::write(
        &config,
        format!(
            "coordinator: {}\nworker_id: persistent-1\nmax_concurrent: 2\nhandlers: []\n\
             persistent:\n  - task_type: prove\n    command: [python3, {PROVER:?}, {:?}]\n    start_timeout: 30s\n\
             logging:\n  level: info\n  format: json\n",
            tc.endpoint(),
            key_file.display().to_string(),
        ),
    )
    .unwrap();
    let log = dir.path().join("worker.log");
    let file = std::fs::File::create(&log).unwrap();
    let worker = WorkerProc(
        Command::new(env!("CARGO_BIN_EXE_worker"))
            .args(["-config", config.to_str().unwrap()])
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .spawn()
            .unwrap(),
    );
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    // One prover process per slot, ready before work arrives.
    wait_for("two ready prover processes", Duration::from_secs(30), || {
        log_text().matches("prover process ready").count() == 2 && log_text().contains("task stream open")
    });

    let mut pids = BTreeSet::new();
    let mut served = 0;
    for i in 0..4 {
        let payload = format!("witness {i}");
        let out = Command::new(coordctl_bin())
            .args(["--coordinator", &tc.endpoint(), "--json", "submit", "--type", "prove"])
            .args(["--payload", &payload, "--wait"])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
        let task: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(task["status"], "completed", "{stdout}");
        let result = &task["result"];
        let key_digest = Sha256::digest(&key);
        let expected = hex::encode(Sha256::digest([&key_digest[..], payload.as_bytes()].concat()));
        assert_eq!(result["sha256"], expected.as_str(), "{stdout}");
        pids.insert(result["pid"].as_u64().unwrap());
        served += result["served"].as_u64().unwrap();
    }
    // The same long-lived processes served every task: none was started per task.
    assert!(pids.len() <= 2, "{pids:?}");
    // Each process counts its tasks: 1 + 1 + 2 + 2 over two processes (a process per task
    // would count 1 + 1 + 1 + 1).
    assert!(served >= 6, "tasks counted by long-lived processes: {served}");

    // SIGTERM: the worker drains, stops its prover processes and exits 0.
    let mut worker = worker;
    let ok = Command::new("kill").args(["-TERM", &worker.0.id().to_string()]).status().unwrap().success();
    assert!(ok);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = worker.0.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "worker did not exit; log:\n{}", log_text());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}; log:\n{}", log_text());
    for pid in pids {
        wait_for("the prover process to exit", Duration::from_secs(5), || !alive(pid));
    }
    db.cleanup().await;
}
