//! End to end with the real binaries: a coordinator process, three worker processes and
//! coordctl, on SQLite (and on Postgres when `TEST_DATABASE_URL` is set).

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use common::*;
use coordinator::domain::{TaskId, TaskState};
use sha2::{Digest, Sha256};

struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([sig, &self.child.id().to_string()]).status().unwrap().success();
        assert!(ok, "kill {sig}");
    }

    fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                panic!("process did not exit within {limit:?}; log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Fleet {
    dir: tempfile::TempDir,
    config: PathBuf,
    endpoint: String,
    coordinator: Option<Proc>,
    workers: Vec<(String, Proc)>,
}

/// Tokens of the three roles: the coordinator reads the worker one from its environment, the
/// client one from a file and knows the admin one by its SHA-256; the worker binary takes
/// `WORKER_TOKEN` and coordctl `--token-file`.
const WORKER_TOKEN: &str = "e2e-worker-token-0123456789";
const CLIENT_TOKEN: &str = "e2e-client-token-0123456789";
const ADMIN_TOKEN: &str = "e2e-admin-token-0123456789";

fn spawn_logged(bin: &str, args: &[&str], log: &Path) -> Child {
    spawn_logged_as(bin, args, log, WORKER_TOKEN)
}

/// [`spawn_logged`] with `worker_token` as `WORKER_TOKEN` (empty: none).
fn spawn_logged_as(bin: &str, args: &[&str], log: &Path, worker_token: &str) -> Child {
    let file = std::fs::File::create(log).unwrap();
    Command::new(bin)
        .args(args)
        .env("E2E_WORKER_TOKEN", WORKER_TOKEN)
        .env("WORKER_TOKEN", worker_token)
        .env("RUST_LOG", "info,sqlx=warn,h2=warn,tonic=warn,hyper=warn,tower=warn")
        .stdout(Stdio::from(file.try_clone().unwrap()))
        .stderr(Stdio::from(file))
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {bin}: {e}"))
}

fn wait_log(p: &Proc, needle: &str, limit: Duration) {
    let start = Instant::now();
    while !p.log_text().contains(needle) {
        assert!(start.elapsed() < limit, "no {needle:?} within {limit:?}; log:\n{}", p.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Fleet {
    fn start(db: &TestDb) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let [grpc, http] = common::free_ports();
        let config = dir.path().join("coordinator.yaml");
        std::fs::write(
            &config,
            format!(
                "coordinator:
  id: e2e
  bind_address: 127.0.0.1
  grpc_port: {grpc}
  http_port: {http}
  poll_interval: 200ms
  heartbeat_timeout: 1s
  stale_task_timeout: 5s
  cleanup_interval: 500ms
  shutdown_timeout: 5s
database:
  url: {:?}
  max_open_conns: 8
  max_idle_conns: 1
logging:
  format: json
auth:
  tokens:
    - name: fleet
      role: worker
      env: E2E_WORKER_TOKEN
    - name: cli
      role: client
      file: {:?}
    - name: ops
      role: admin
      sha256: {}
",
                db.url,
                dir.path().join("client.token").display().to_string(),
                coordinator::auth::sha256_hex(ADMIN_TOKEN),
            ),
        )
        .unwrap();
        std::fs::write(dir.path().join("client.token"), format!("{CLIENT_TOKEN}\n")).unwrap();
        let mut fleet = Fleet {
            dir,
            config,
            endpoint: format!("http://127.0.0.1:{grpc}"),
            coordinator: None,
            workers: vec![],
        };
        fleet.start_coordinator();
        for i in 1..=3 {
            fleet.start_worker(&format!("worker-{i}"));
        }
        fleet
    }

    fn start_coordinator(&mut self) {
        let log = self.dir.path().join(format!("coordinator-{}.log", Instant::now().elapsed().as_nanos()));
        let child = spawn_logged(
            env!("CARGO_BIN_EXE_coordinator"),
            &["-config", self.config.to_str().unwrap()],
            &log,
        );
        let p = Proc { child, log };
        wait_log(&p, "coordinator ready", Duration::from_secs(30));
        self.coordinator = Some(p);
    }

    fn start_worker(&mut self, id: &str) {
        let log = self.dir.path().join(format!("{id}.log"));
        let child = spawn_logged(
            env!("CARGO_BIN_EXE_worker"),
            &["--coordinator", &self.endpoint, "--worker-id", id, "--max-concurrent", "2"],
            &log,
        );
        let p = Proc { child, log };
        wait_log(&p, "task stream open", Duration::from_secs(30));
        self.workers.push((id.to_owned(), p));
    }

    fn worker(&mut self, id: &str) -> &mut Proc {
        &mut self.workers.iter_mut().find(|(w, _)| w == id).unwrap().1
    }

    fn coordctl(&self, args: &[&str]) -> Output {
        Command::new(common::coordctl_bin())
            .arg("--coordinator")
            .arg(&self.endpoint)
            .arg("--token-file")
            .arg(self.dir.path().join("client.token"))
            .args(args)
            .output()
            .unwrap()
    }

    fn coordctl_ok(&self, args: &[&str]) -> String {
        let out = self.coordctl(args);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "coordctl {args:?} failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }
}

async fn wait_task_state(
    db: &TestDb,
    id: &str,
    state: TaskState,
    limit: Duration,
) -> coordinator::domain::Task {
    let tid: TaskId = id.parse().unwrap();
    let start = Instant::now();
    loop {
        let t = db.store.get_task(tid).await.unwrap().unwrap();
        if t.state == state {
            return t;
        }
        assert!(start.elapsed() < limit, "task {id} not {state} within {limit:?}: {t:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn accepted_once(db: &TestDb, id: &str) {
    let attempts = db.store.attempts(id.parse().unwrap()).await.unwrap();
    let n = attempts.iter().filter(|a| a.outcome.as_deref() == Some("completed")).count();
    assert_eq!(n, 1, "task {id} accepted once: {attempts:?}");
}

fn hex_decode(s: &str) -> Vec<u8> {
    let s = s.trim_start_matches("0x");
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

async fn fleet_end_to_end(db: &TestDb) {
    let mut fleet = Fleet::start(db);

    // Roles: without a token coordctl is refused; the client token may not list workers; the
    // admin token (from COORDCTL_TOKEN) may.
    let coordctl = |token: Option<&str>, args: &[&str]| {
        let mut cmd = Command::new(common::coordctl_bin());
        cmd.arg("--coordinator").arg(&fleet.endpoint).args(args).env_remove("COORDCTL_TOKEN");
        if let Some(t) = token {
            cmd.env("COORDCTL_TOKEN", t);
        }
        cmd.output().unwrap()
    };
    let out = coordctl(None, &["tasks"]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("Unauthenticated"),
        "{out:?}"
    );
    let out = fleet.coordctl(&["workers"]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("PermissionDenied"),
        "{out:?}"
    );
    let out = coordctl(Some(ADMIN_TOKEN), &["workers"]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("worker-1"), "{out:?}");

    // A worker without a token, and one with a client's, say which token to fix (not that the
    // coordinator is out of reach) and keep trying.
    for (id, token, says) in [
        ("tokenless", "", "the coordinator refused the worker's token: set one of its worker tokens"),
        ("client-token", CLIENT_TOKEN, "it needs a token of the worker role"),
    ] {
        let log = fleet.dir.path().join(format!("{id}.log"));
        let args = ["--coordinator", fleet.endpoint.as_str(), "--worker-id", id];
        let mut p = Proc { child: spawn_logged_as(env!("CARGO_BIN_EXE_worker"), &args, &log, token), log };
        wait_log(&p, says, Duration::from_secs(30));
        assert!(!p.log_text().contains("coordinator unreachable"), "{}", p.log_text());
        p.signal("-TERM");
        assert!(p.wait(Duration::from_secs(20)).success(), "{}", p.log_text());
    }

    // primes: 9592 below 100000, fanned out over the workers.
    let out = fleet.coordctl_ok(&["primes", "--low", "0", "--high", "100000", "--slices", "8"]);
    assert!(out.contains("9592 primes in [0, 100000)"), "{out}");
    let used: std::collections::HashSet<&str> =
        ["worker-1", "worker-2", "worker-3"].into_iter().filter(|w| out.contains(w)).collect();
    assert!(used.len() >= 2, "slices ran on several workers: {out}");

    // The same count summed on a worker: one sum_counts task depends on the eight slices and
    // receives their results; coordctl only waits for the job.
    let out =
        fleet.coordctl_ok(&["primes", "--low", "0", "--high", "100000", "--slices", "8", "--server-side"]);
    assert!(out.contains("9592 primes in [0, 100000) (summed on a worker)"), "{out}");

    // Parents that do not exist, and tasks that wait for each other, are refused.
    let ghost = uuid::Uuid::now_v7().to_string();
    let out = fleet.coordctl(&["submit", "--type", "noop", "--depends-on", &ghost]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("InvalidArgument") && err.contains(&ghost), "{err}");
    let cycle = fleet.dir.path().join("cycle.jsonl");
    std::fs::write(
        &cycle,
        "{\"type\":\"noop\",\"depends_on\":[\"#1\"]}\n{\"type\":\"noop\",\"depends_on\":[\"#0\"]}\n",
    )
    .unwrap();
    let out = fleet.coordctl(&["job", "submit", cycle.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("InvalidArgument") && err.contains("cycle"), "{err}");
    // A key of the wrong type is refused before anything is submitted, naming line and key.
    let typo = fleet.dir.path().join("typo.jsonl");
    std::fs::write(&typo, "{\"type\":\"noop\"}\n{\"type\":\"noop\",\"depends_on\":\"#0\"}\n").unwrap();
    let out = fleet.coordctl(&["job", "submit", typo.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("typo.jsonl line 2: \"depends_on\" must be an array of strings"), "{err}");
    // `job submit` prints the job id alone, for `$(...)`; `job watch` exits as its worst task.
    let mixed = fleet.dir.path().join("mixed.jsonl");
    std::fs::write(
        &mixed,
        "{\"type\":\"echo\",\"payload\":\"ok\"}\n{\"type\":\"is_prime\",\"payload\":\"not json\",\"max_attempts\":1}\n",
    )
    .unwrap();
    let job_id = fleet.coordctl_ok(&["job", "submit", mixed.to_str().unwrap()]).trim().to_owned();
    uuid::Uuid::parse_str(&job_id).unwrap_or_else(|e| panic!("{job_id:?}: {e}"));
    let out = fleet.coordctl(&["job", "watch", &job_id]);
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stdout));
    // A list cut at its limit says so; a limit of 0 is a usage error.
    let out = fleet.coordctl(&["tasks", "--limit", "2"]);
    let (shown, told) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && shown.lines().count() == 3, "{shown}{told}");
    assert!(told.contains("more tasks match than the 2 shown"), "{told}");
    assert_eq!(fleet.coordctl(&["tasks", "--limit", "0"]).status.code(), Some(2));
    // A second submission with the same idempotency key gets the first task, and is told so.
    let key = ["--idempotency-key", "e2e-once"];
    let first = fleet.coordctl_ok(&[&["submit", "--type", "echo", "--payload", "one"][..], &key].concat());
    let out = fleet.coordctl(&[&["submit", "--type", "echo", "--payload", "two"][..], &key].concat());
    let told = String::from_utf8_lossy(&out.stderr);
    assert_eq!(String::from_utf8_lossy(&out.stdout), first, "{told}");
    assert!(told.contains("the idempotency key names a task submitted before"), "{told}");
    assert!(!fleet.coordctl(&["submit", "--type", "echo"]).stderr.starts_with(b"coordctl: the idempotency"));

    // is-prime, with the worker that answered.
    let out = fleet.coordctl_ok(&["is-prime", "17", "18", "19"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines[0].starts_with("17 is prime: true (processed by worker-"), "{out}");
    assert!(lines[1].starts_with("18 is prime: false (processed by worker-"), "{out}");
    assert!(lines[2].starts_with("19 is prime: true (processed by worker-"), "{out}");

    // A Merkle proof from a worker verifies independently.
    let leaves: Vec<String> = (0..5u8).map(|i| format!("0x{:02x}{:02x}", i, i * 3)).collect();
    let payload = serde_json::json!({"leaves": leaves, "leaf_index": 3}).to_string();
    let out =
        fleet.coordctl_ok(&["--json", "submit", "--type", "merkle_proof", "--payload", &payload, "--wait"]);
    let task: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(task["status"], "completed", "{out}");
    let proof = &task["result"];
    let mut node: Vec<u8> = Sha256::digest(hex_decode(&leaves[3])).to_vec();
    for step in proof["proof"].as_array().unwrap() {
        let sibling = hex_decode(step["hash"].as_str().unwrap());
        let mut h = Sha256::new();
        if step["position"] == "left" {
            h.update(&sibling);
            h.update(&node);
        } else {
            h.update(&node);
            h.update(&sibling);
        }
        node = h.finalize().to_vec();
    }
    assert_eq!(hex_decode(proof["root"].as_str().unwrap()), node, "proof verifies to the root");
    // And the root is the root of those leaves.
    let mut level: Vec<Vec<u8>> = leaves.iter().map(|l| Sha256::digest(hex_decode(l)).to_vec()).collect();
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|p| {
                let r = p.get(1).unwrap_or(&p[0]);
                Sha256::digest([p[0].as_slice(), r.as_slice()].concat()).to_vec()
            })
            .collect();
    }
    assert_eq!(level[0], node);

    // kill -9 of a worker in the middle of a task: it completes on another worker, once.
    let id =
        fleet.coordctl_ok(&["submit", "--type", "sleep", "--payload", r#"{"ms":1500}"#]).trim().to_owned();
    let running = wait_task_state(db, &id, TaskState::Running, Duration::from_secs(10)).await;
    let victim = running.worker_id.clone().unwrap().0;
    fleet.worker(&victim).signal("-KILL");
    let done = wait_task_state(db, &id, TaskState::Completed, Duration::from_secs(30)).await;
    assert_ne!(done.worker_id.unwrap().0, victim, "completed on another worker");
    assert_eq!(done.attempt, 2);
    accepted_once(db, &id).await;
    fleet.workers.retain(|(w, _)| *w != victim);
    fleet.start_worker(&victim);

    // SIGTERM of a worker: its running tasks finish and are accepted, none requeued, exit 0.
    let ids: Vec<String> = (0..6)
        .map(|_| {
            fleet.coordctl_ok(&["submit", "--type", "sleep", "--payload", r#"{"ms":800}"#]).trim().to_owned()
        })
        .collect();
    let mut draining = None;
    for id in &ids {
        let t = wait_task_state(db, id, TaskState::Running, Duration::from_secs(10)).await;
        draining.get_or_insert(t.worker_id.unwrap().0);
    }
    let draining = draining.unwrap();
    let held: Vec<String> = {
        let mut v = Vec::new();
        for id in &ids {
            let t = db.store.get_task(id.parse().unwrap()).await.unwrap().unwrap();
            if t.worker_id.as_ref().map(|w| w.0.as_str()) == Some(draining.as_str()) && t.state.is_held() {
                v.push(id.clone());
            }
        }
        v
    };
    assert!(!held.is_empty());
    // The same SIGTERM twice at once (a supervisor signalling the process and its group) is one
    // request: the worker drains rather than exiting at once as on a second signal.
    let pid = fleet.worker(&draining).child.id() as i32;
    for pause in [Duration::from_millis(20), Duration::ZERO] {
        // SAFETY: signals the worker process this test started.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        std::thread::sleep(pause);
    }
    let status = fleet.worker(&draining).wait(Duration::from_secs(20));
    assert!(status.success(), "drained worker exits 0: {status:?}");
    for id in &held {
        let t = wait_task_state(db, id, TaskState::Completed, Duration::from_secs(10)).await;
        assert_eq!(t.attempt, 1, "finished by the draining worker, not requeued");
        assert_eq!(t.worker_id.unwrap().0, draining);
    }
    for id in &ids {
        wait_task_state(db, id, TaskState::Completed, Duration::from_secs(20)).await;
        accepted_once(db, id).await;
    }
    fleet.workers.retain(|(w, _)| *w != draining);
    fleet.start_worker(&draining);

    // Coordinator killed while workers hold tasks: they reconnect with backoff, their buffered
    // results are accepted, nothing lost or doubled.
    let ids: Vec<String> = (0..6)
        .map(|_| {
            fleet.coordctl_ok(&["submit", "--type", "sleep", "--payload", r#"{"ms":700}"#]).trim().to_owned()
        })
        .collect();
    for id in &ids {
        wait_task_state(db, id, TaskState::Running, Duration::from_secs(10)).await;
    }
    let mut old = fleet.coordinator.take().unwrap();
    old.signal("-KILL");
    old.wait(Duration::from_secs(10));
    // The tasks finish while the coordinator is down; the workers keep the results.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    fleet.start_coordinator();
    for id in &ids {
        let t = wait_task_state(db, id, TaskState::Completed, Duration::from_secs(30)).await;
        assert_eq!(t.attempt, 1, "the result from before the restart was accepted");
        accepted_once(db, id).await;
    }
    let logs: String = fleet.workers.iter().map(|(_, p)| p.log_text()).collect();
    assert!(logs.contains("coordinator unreachable; reconnecting"), "workers logged their reconnects");
    assert!(logs.contains("delay_ms"), "with their backoff delays");
    // A heartbeat that reached the restarted coordinator before the worker registered again was
    // answered "unknown worker": that registration answers it; no second one follows.
    assert!(!logs.contains("coordinator does not know this worker"), "registered twice:\n{logs}");
    let audit = db.store.audit().await.unwrap();
    assert_eq!(audit.accepted_twice, 0);

    // Graceful stop of everything.
    for (_, w) in &mut fleet.workers {
        w.signal("-TERM");
        assert!(w.wait(Duration::from_secs(20)).success());
    }
    let c = fleet.coordinator.as_mut().unwrap();
    c.signal("-TERM");
    assert!(c.wait(Duration::from_secs(20)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_fleet_end_to_end() {
    let db = TestDb::sqlite().await;
    fleet_end_to_end(&db).await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
async fn postgres_fleet_end_to_end() {
    let db = TestDb::postgres().await.expect("TEST_DATABASE_URL is set");
    fleet_end_to_end(&db).await;
    db.cleanup().await;
}
