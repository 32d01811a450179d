//! The coordinator binary's start-up: every configuration mistake prints exactly one line
//! `coordinator: ...` on stderr naming the file, key, variable or value at fault and exits
//! non-zero (no panic, no backtrace); a good configuration starts, logs `coordinator ready`
//! with its ports, and stops with exit code 0 on SIGTERM. A worker whose log pipes close goes on
//! and stops the same way.
//!
//! Each case runs the real binary in a fresh temporary directory with an environment cleared
//! of everything but `PATH`, under a deadline: a process that overruns it is killed and the test
//! fails.

use std::{
    collections::{BTreeSet, HashMap},
    io::{BufRead, BufReader, Read},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use coordinator::config::{self, Config};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_coordinator");
const WORKER: &str = env!("CARGO_BIN_EXE_worker");
/// Longest any single run of the binary may take.
const DEADLINE: Duration = Duration::from_secs(20);

/// A child process killed (and reaped) when dropped, so a failing test never leaves one behind.
struct Running {
    child: Child,
}

impl Running {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the exit until `deadline`; kills the process and fails the test on overrun.
    fn wait_until(&mut self, deadline: Instant, what: &str) -> ExitStatus {
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    panic!("{what}: the coordinator did not exit within {DEADLINE:?}; killed it");
                }
                Ok(None) => thread::sleep(Duration::from_millis(20)),
                Err(e) => panic!("{what}: waiting for the coordinator: {e}"),
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The binary with a cleared environment (only `PATH` kept), run in `dir`.
fn command(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    command_of(BIN, dir, args, env)
}

/// [`command`] for the binary `bin`.
fn command_of(bin: &str, dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn spawn(cmd: &mut Command) -> Running {
    Running { child: cmd.spawn().unwrap_or_else(|e| panic!("cannot start {:?}: {e}", cmd.get_program())) }
}

/// Reads a pipe to its end on its own thread, so the child never blocks on a full pipe.
fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> JoinHandle<String> {
    let mut pipe = pipe.expect("piped");
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

struct Outcome {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs the binary to its exit (within [`DEADLINE`]).
fn run(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Outcome {
    let mut running = spawn(&mut command(dir, args, env));
    let stdout = drain(running.child.stdout.take());
    let stderr = drain(running.child.stderr.take());
    let status = running.wait_until(Instant::now() + DEADLINE, &format!("coordinator {args:?}"));
    Outcome {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

/// Asserts a start-up failure: non-zero exit, and stderr exactly one non-empty line
/// `coordinator: ...` containing every `needle`, none of `secrets`, no panic and no backtrace.
/// Returns the line.
fn assert_one_line_failure(out: &Outcome, needles: &[&str], secrets: &[&str]) -> String {
    let context = format!("status: {}\nstderr:\n{}\nstdout:\n{}", out.status, out.stderr, out.stdout);
    assert!(!out.status.success(), "expected a non-zero exit\n{context}");
    assert!(out.status.code().is_some_and(|c| c != 0), "expected an exit code, not a signal\n{context}");
    let line = out.stderr.strip_suffix('\n').unwrap_or(&out.stderr);
    assert!(!line.trim().is_empty(), "stderr is empty\n{context}");
    assert!(!line.contains('\n'), "stderr has more than one line\n{context}");
    assert!(line.starts_with("coordinator: "), "line does not start with `coordinator: `\n{context}");
    for needle in needles {
        assert!(line.contains(needle), "line does not name {needle:?}\n{context}");
    }
    for secret in secrets {
        assert!(!out.stderr.contains(secret), "stderr shows {secret:?}\n{context}");
        assert!(!out.stdout.contains(secret), "stdout shows {secret:?}\n{context}");
    }
    let lower = out.stderr.to_lowercase();
    assert!(!lower.contains("panicked"), "the coordinator panicked\n{context}");
    assert!(!lower.contains("backtrace"), "stderr mentions a backtrace\n{context}");
    line.to_owned()
}

/// Writes `name` with `text` into `dir` and returns its path as a string.
fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write config");
    path.to_str().expect("utf-8 temp path").to_owned()
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

/// A configuration that starts: SQLite under `dir/data/`, loopback, ports chosen by the OS.
fn good_config(dir: &Path) -> String {
    format!(
        "coordinator:\n  id: cli-test\n  bind_address: 127.0.0.1\n  grpc_port: 0\n  http_port: 0\n  \
         shutdown_timeout: 5s\ndatabase:\n  url: sqlite://{}/data/c.db\nlogging:\n  level: info\n  format: json\n\
         auth:\n  enabled: false\n",
        dir.display()
    )
}

// ---- the shipped configuration files ----

fn manifest_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

#[test]
fn shipped_configs_load_and_validate() {
    for rel in ["configs/coordinator.yaml", "configs/dev.yaml"] {
        let path = manifest_path(rel);
        let config = Config::load(&path, &HashMap::new()).unwrap_or_else(|e| panic!("{rel}: {e}"));
        config.validate().unwrap_or_else(|e| panic!("{rel}: {e}"));
    }
    let prod = Config::load(&manifest_path("configs/coordinator.yaml"), &HashMap::new()).unwrap();
    assert!(prod.is_postgres(), "configs/coordinator.yaml is the Postgres configuration");
    assert_eq!(prod.database.url, "postgres://coordinator@127.0.0.1:5432/coordinator");
    assert!(prod.auth.enabled);
    assert_eq!(
        prod.auth.tokens.iter().map(|t| t.role.as_str()).collect::<Vec<_>>(),
        ["worker", "client", "admin"]
    );
    let dev = Config::load(&manifest_path("configs/dev.yaml"), &HashMap::new()).unwrap();
    assert!(!dev.is_postgres(), "configs/dev.yaml is the SQLite configuration");
}

/// The configurations shipped for Kubernetes (the ConfigMap) and for compose load and validate
/// with the environment those deployments give them.
#[test]
fn deploy_configs_load_and_validate() {
    use coordinator::worker_config::WorkerConfig;
    let dir = tempdir();
    let cm: serde_norway::Value =
        serde_norway::from_str(&std::fs::read_to_string(manifest_path("deploy/k8s/configmap.yaml")).unwrap())
            .unwrap();
    let coordinator_yaml =
        cm["data"]["coordinator.yaml"].as_str().expect("coordinator.yaml in the ConfigMap");
    let worker_yaml = cm["data"]["worker.yaml"].as_str().expect("worker.yaml in the ConfigMap");
    let env: HashMap<String, String> = [
        ("COORDINATOR_ID", "coordinator-7f9c-0"),
        ("DATABASE_URL", "postgres://coordinator:secret@postgres:5432/coordinator"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    for (name, text) in [
        ("k8s", coordinator_yaml.to_owned()),
        ("compose", std::fs::read_to_string(manifest_path("deploy/compose/coordinator.yaml")).unwrap()),
    ] {
        let path = write(dir.path(), &format!("{name}.yaml"), &text);
        let c = Config::load(Path::new(&path), &env).unwrap_or_else(|e| panic!("{name}: {e}"));
        c.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(c.is_postgres() && c.auth.enabled && c.auth.tokens.len() == 3, "{name}");
    }
    for (name, text) in [
        ("k8s", worker_yaml.to_owned()),
        ("compose", std::fs::read_to_string(manifest_path("deploy/compose/worker.yaml")).unwrap()),
    ] {
        let w: WorkerConfig = serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{name} worker: {e}"));
        w.validate().unwrap_or_else(|e| panic!("{name} worker: {e}"));
    }
}

/// Every key of the schema is written out in `configs/coordinator.yaml` with its variable.
#[test]
fn production_config_lists_every_key_and_its_variable() {
    fn leaves(v: &serde_norway::Value, prefix: &str, out: &mut BTreeSet<String>) {
        match v {
            serde_norway::Value::Mapping(m) => {
                for (k, child) in m {
                    let k = k.as_str().expect("string keys");
                    let path = if prefix.is_empty() { k.to_owned() } else { format!("{prefix}.{k}") };
                    leaves(child, &path, out);
                }
            }
            _ => {
                out.insert(prefix.to_owned());
            }
        }
    }
    let text = std::fs::read_to_string(manifest_path("configs/coordinator.yaml")).unwrap();
    let mut in_file = BTreeSet::new();
    leaves(&serde_norway::from_str(&text).unwrap(), "", &mut in_file);
    let mut in_schema = BTreeSet::new();
    leaves(&serde_norway::to_value(Config::default()).unwrap(), "", &mut in_schema);
    assert_eq!(in_file, in_schema, "keys of configs/coordinator.yaml vs the schema");
    for (var, key) in config::env_overrides() {
        assert!(text.contains(&format!("# Env: {var}\n")), "no `# Env: {var}` comment for {key}");
    }
}

// ---- start-up failures ----

#[test]
fn unknown_key_names_the_key_and_its_line() {
    let dir = tempdir();
    let cfg = write(dir.path(), "c.yaml", "coordinator:\n  id: x\n  grpc_prot: 9090\n");
    let out = run(dir.path(), &["-config", &cfg], &[]);
    assert_one_line_failure(&out, &[&cfg, "grpc_prot", "line 3"], &[]);
}

#[test]
fn bad_duration_names_the_key() {
    let dir = tempdir();
    let cfg = write(dir.path(), "c.yaml", "coordinator:\n  poll_interval: soon\n");
    let out = run(dir.path(), &["-config", &cfg], &[]);
    assert_one_line_failure(&out, &[&cfg, "coordinator.poll_interval", "soon", "line 2"], &[]);
}

#[test]
fn bad_size_names_the_value() {
    let dir = tempdir();
    let cfg =
        write(dir.path(), "c.yaml", "grpc:\n  max_send_msg_size: 10MiB\n  max_recv_msg_size: 10 parsecs\n");
    let out = run(dir.path(), &["-config", &cfg], &[]);
    // Names the file, the section and the value. Not the key itself, and the line number is the
    // section's first key (line 2) rather than the bad value's (line 3): `ByteSize` deserializes
    // through a buffered untagged enum, which loses serde_norway's path and position.
    assert_one_line_failure(&out, &[&cfg, "grpc", "10 parsecs"], &[]);
}

#[test]
fn missing_config_file_names_the_path() {
    let dir = tempdir();
    let missing = dir.path().join("nowhere").join("coordinator.yaml");
    let missing = missing.to_str().unwrap();
    let out = run(dir.path(), &["--config", missing], &[]);
    assert_one_line_failure(&out, &[missing, "No such file"], &[]);
}

#[test]
fn missing_default_config_file_names_the_default_path() {
    let dir = tempdir();
    let out = run(dir.path(), &[], &[]);
    assert_one_line_failure(&out, &[config::DEFAULT_CONFIG_PATH], &[]);
}

#[test]
fn invalid_value_names_the_key() {
    let dir = tempdir();
    let cfg =
        write(dir.path(), "c.yaml", "coordinator:\n  heartbeat_timeout: 30s\n  stale_task_timeout: 10s\n");
    let out = run(dir.path(), &["-config", &cfg], &[]);
    assert_one_line_failure(&out, &["coordinator.stale_task_timeout", "coordinator.heartbeat_timeout"], &[]);
}

#[test]
fn bad_environment_override_names_the_variable() {
    let dir = tempdir();
    let cfg = write(dir.path(), "c.yaml", &good_config(dir.path()));
    let out = run(dir.path(), &["-config", &cfg], &[("COORDINATOR_GRPC_PORT", "ninety")]);
    assert_one_line_failure(&out, &["COORDINATOR_GRPC_PORT", "ninety"], &[]);
}

#[test]
fn misspelt_environment_override_is_refused_naming_the_nearest_key() {
    let dir = tempdir();
    let cfg = write(dir.path(), "c.yaml", &good_config(dir.path()));
    let out = run(dir.path(), &["-config", &cfg], &[("COORDINATOR_GRPC_PROT", "1")]);
    assert_one_line_failure(&out, &["COORDINATOR_GRPC_PROT", "COORDINATOR_GRPC_PORT"], &[]);
}

#[test]
fn every_documented_environment_name_is_accepted() {
    let dir = tempdir();
    let cfg = write(dir.path(), "c.yaml", &good_config(dir.path()));
    // Each documented variable set to the value the file already has: nothing changes and the
    // start-up gets past the environment check to a clean start (then stops on SIGTERM).
    let config = Config::load(Path::new(&cfg), &HashMap::new()).expect("the good config loads");
    let tree = serde_norway::to_value(&config).expect("config serializes");
    let mut env = Vec::new();
    for (var, key) in config::env_overrides() {
        let mut node = &tree;
        for part in key.split('.') {
            node = &node[part];
        }
        let value = match node {
            serde_norway::Value::String(s) => s.clone(),
            serde_norway::Value::Bool(b) => b.to_string(),
            serde_norway::Value::Number(n) => n.to_string(),
            _ => continue,
        };
        env.push((var, value));
    }
    assert!(env.len() > 20, "{env:?}");
    let env: HashMap<String, String> = env.into_iter().collect();
    Config::load(Path::new(&cfg), &env).unwrap_or_else(|e| panic!("documented names refused: {e}"));
}

#[test]
fn other_programs_variables_with_our_prefixes_are_left_alone() {
    let dir = tempdir();
    let cfg = write(dir.path(), "c.yaml", &good_config(dir.path()));
    // Kubernetes service links of a Service named `coordinator`, a proxy, gRPC core's tracing.
    let env: HashMap<String, String> = [
        ("COORDINATOR_SERVICE_HOST", "10.0.0.1"),
        ("COORDINATOR_SERVICE_PORT", "9090"),
        ("COORDINATOR_SERVICE_PORT_GRPC", "9090"),
        ("COORDINATOR_PORT", "tcp://10.0.0.1:9090"),
        ("COORDINATOR_PORT_9090_TCP_ADDR", "10.0.0.1"),
        ("HTTP_PROXY", "http://proxy:3128"),
        ("GRPC_TRACE", "all"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    Config::load(Path::new(&cfg), &env).unwrap_or_else(|e| panic!("a foreign variable was refused: {e}"));
}

#[test]
fn unsupported_database_scheme_is_refused_without_the_password() {
    let dir = tempdir();
    let cfg = write(dir.path(), "c.yaml", &good_config(dir.path()));
    let out = run(dir.path(), &["-config", &cfg], &[("DATABASE_URL", "mysql://root:hunter2@db.internal/x")]);
    assert_one_line_failure(&out, &["database.url", "mysql://"], &["hunter2"]);
}

fn unreachable_postgres_config(dir: &Path) -> String {
    // Port 1 on loopback: nothing listens. A short acquire timeout keeps the test quick.
    write(
        dir,
        "c.yaml",
        "coordinator:\n  bind_address: 127.0.0.1\n  grpc_port: 0\n  http_port: 0\ndatabase:\n  \
         url: postgres://coordinator@127.0.0.1:1/none\n  acquire_timeout: 2s\nauth:\n  enabled: false\n",
    )
}

#[test]
fn unreachable_postgres_names_the_database() {
    let dir = tempdir();
    let cfg = unreachable_postgres_config(dir.path());
    let out = run(dir.path(), &["-config", &cfg], &[]);
    assert_one_line_failure(&out, &["database", "postgres://coordinator@127.0.0.1:1/none"], &[]);
}

#[test]
fn unreachable_postgres_does_not_print_the_password() {
    let dir = tempdir();
    let cfg = unreachable_postgres_config(dir.path());
    let out = run(dir.path(), &["-config", &cfg], &[("DATABASE_URL", "postgres://u:secret@127.0.0.1:1/x")]);
    assert_one_line_failure(&out, &["database", "127.0.0.1:1/x"], &["secret"]);
}

#[test]
fn grpc_port_in_use_names_the_key_and_address() {
    let dir = tempdir();
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let port = taken.local_addr().unwrap().port();
    let cfg = write(
        dir.path(),
        "c.yaml",
        &good_config(dir.path()).replace("grpc_port: 0", &format!("grpc_port: {port}")),
    );
    let out = run(dir.path(), &["-config", &cfg], &[]);
    assert_one_line_failure(&out, &["coordinator.grpc_port", &format!("127.0.0.1:{port}")], &[]);
    drop(taken);
}

/// A missing token file and a port in use are named before the database is touched: with an
/// unreachable database as well, the line is about the file or the port, and nothing was
/// migrated meanwhile.
#[test]
fn files_and_ports_are_checked_before_the_database() {
    let dir = tempdir();
    let missing = dir.path().join("tokens").join("worker");
    let tokens = format!(
        "auth:\n  enabled: true\n  tokens:\n    - name: workers\n      role: worker\n      file: {}\n",
        missing.display()
    );
    let cfg = write(
        dir.path(),
        "c.yaml",
        &std::fs::read_to_string(unreachable_postgres_config(dir.path()))
            .unwrap()
            .replace("auth:\n  enabled: false\n", &tokens),
    );
    let out = run(dir.path(), &["-config", &cfg], &[]);
    let line = assert_one_line_failure(&out, &["token", &missing.display().to_string()], &[]);
    assert!(!line.contains("127.0.0.1:1"), "the database was tried first: {line}");

    let taken = TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let port = taken.local_addr().unwrap().port();
    let cfg = write(
        dir.path(),
        "c.yaml",
        &std::fs::read_to_string(unreachable_postgres_config(dir.path()))
            .unwrap()
            .replace("grpc_port: 0", &format!("grpc_port: {port}")),
    );
    let out = run(dir.path(), &["-config", &cfg], &[]);
    let line = assert_one_line_failure(&out, &["coordinator.grpc_port", &format!("127.0.0.1:{port}")], &[]);
    assert!(!line.contains("127.0.0.1:1"), "the database was tried first: {line}");
    drop(taken);
}

// ---- a good configuration starts and stops ----

fn message(line: &Value) -> Option<&str> {
    line.get("message").and_then(Value::as_str)
}

/// Starts the binary with `flag FILE`, waits for `coordinator ready`, sends SIGTERM, and checks
/// the exit code and the `coordinator stopped` line.
fn starts_and_stops_on_sigterm(flag: &str) {
    let dir = tempdir();
    let cfg = write(dir.path(), "c.yaml", &good_config(dir.path()));
    let deadline = Instant::now() + DEADLINE;
    let mut running = spawn(&mut command(dir.path(), &[flag, &cfg], &[]));
    let stderr = drain(running.child.stderr.take());
    let stdout = BufReader::new(running.child.stdout.take().expect("piped"));
    let (tx, rx) = mpsc::channel::<String>();
    let reader = thread::spawn(move || {
        for line in stdout.lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let mut seen = Vec::new();
    let ready = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                seen.push(line.clone());
                if let Ok(json) = serde_json::from_str::<Value>(&line)
                    && message(&json) == Some("coordinator ready")
                {
                    break json;
                }
            }
            Err(e) => {
                drop(running);
                panic!(
                    "no `coordinator ready` line within {DEADLINE:?} ({e}); stdout:\n{}\nstderr:\n{}",
                    seen.join("\n"),
                    stderr.join().unwrap_or_default()
                );
            }
        }
    };
    for field in ["grpc_port", "http_port"] {
        let port = ready.get(field).and_then(Value::as_u64).unwrap_or(0);
        assert!(port > 0 && port <= u64::from(u16::MAX), "{field} in {ready}");
    }
    let http_port = ready["http_port"].as_u64().unwrap() as u16;
    std::net::TcpStream::connect(("127.0.0.1", http_port)).expect("the HTTP port accepts connections");
    let db = dir.path().join("data").join("c.db");
    assert!(db.is_file(), "{} was not created", db.display());

    let kill = Command::new("kill").arg("-TERM").arg(running.pid().to_string()).status().expect("run kill");
    assert!(kill.success(), "kill -TERM failed: {kill}");
    let status = running.wait_until(deadline, "coordinator after SIGTERM");
    reader.join().expect("stdout reader");
    seen.extend(rx.try_iter());
    let stderr = stderr.join().expect("stderr reader");
    let context = format!("status: {status}\nstdout:\n{}\nstderr:\n{stderr}", seen.join("\n"));
    assert_eq!(status.code(), Some(0), "exit after SIGTERM\n{context}");
    let stopped = seen
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .any(|json| message(&json) == Some("coordinator stopped"));
    assert!(stopped, "no `coordinator stopped` line\n{context}");
    let lower = stderr.to_lowercase();
    assert!(!lower.contains("panicked") && !lower.contains("backtrace"), "{context}");
}

#[test]
fn starts_with_go_style_single_dash_config_and_stops_on_sigterm() {
    starts_and_stops_on_sigterm("-config");
}

#[test]
fn starts_with_double_dash_config_and_stops_on_sigterm() {
    starts_and_stops_on_sigterm("--config");
}

// ---- one process per SQLite file ----

/// Starts `coordinator dev` (no workers, ports chosen by the OS) in `dir` and waits for its
/// banner. Stdout and stderr are drained on their own threads until the process exits.
fn start_dev(dir: &Path) -> Running {
    let args = ["dev", "--workers", "0", "--grpc-port", "0", "--http-port", "0"];
    let mut running = spawn(&mut command(dir, &args, &[]));
    let _stderr = drain(running.child.stderr.take());
    let stdout = BufReader::new(running.child.stdout.take().expect("piped"));
    let (tx, rx) = mpsc::channel::<String>();
    thread::spawn(move || {
        for line in stdout.lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + DEADLINE;
    let mut seen = Vec::new();
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) if line.contains("coordinator dev is running") => return running,
            Ok(line) => seen.push(line),
            Err(e) => panic!(
                "no `coordinator dev is running` within {DEADLINE:?} ({e}); stdout:\n{}",
                seen.join("\n")
            ),
        }
    }
}

#[test]
fn a_second_process_on_the_same_sqlite_file_is_refused_until_the_first_is_gone() {
    let dir = tempdir();
    let mut first = start_dev(dir.path());

    let args = ["dev", "--workers", "0", "--grpc-port", "0", "--http-port", "0"];
    let out = run(dir.path(), &args, &[]);
    assert_one_line_failure(&out, &["data/coordinator.db", "in use", "--ephemeral"], &[]);

    // The first process is still serving, alone.
    assert!(first.child.try_wait().expect("try_wait").is_none(), "the first coordinator exited");

    // kill -9 leaves no stale lock: the operating system released it with the process.
    let kill = Command::new("kill").arg("-KILL").arg(first.pid().to_string()).status().expect("run kill");
    assert!(kill.success(), "kill -KILL failed: {kill}");
    first.wait_until(Instant::now() + DEADLINE, "coordinator after SIGKILL");
    let _third = start_dev(dir.path());
}

#[test]
fn a_second_process_on_the_database_url_of_a_running_one_is_refused() {
    let dir = tempdir();
    let cfg = write(dir.path(), "c.yaml", &good_config(dir.path()));
    let _first = start_with_config(dir.path(), &cfg);
    let out = run(dir.path(), &["-config", &cfg], &[]);
    assert_one_line_failure(&out, &["data/c.db", "in use", "database.url"], &[]);
}

/// Starts the binary on `cfg` and waits for its `coordinator ready` log line.
fn start_with_config(dir: &Path, cfg: &str) -> Running {
    let mut running = spawn(&mut command(dir, &["-config", cfg], &[]));
    let _stderr = drain(running.child.stderr.take());
    let stdout = BufReader::new(running.child.stdout.take().expect("piped"));
    let (tx, rx) = mpsc::channel::<String>();
    thread::spawn(move || {
        for line in stdout.lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + DEADLINE;
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) if line.contains("coordinator ready") => return running,
            Ok(_) => {}
            Err(e) => panic!("no `coordinator ready` within {DEADLINE:?} ({e})"),
        }
    }
}

/// A worker whose log pipes close (its log collector restarted; `worker 2>&1 | head -1`) goes on
/// without its log and still stops cleanly on SIGTERM. Before, a log line that met the closed
/// pipe was reported on stderr, the same closed pipe, and the process panicked (exit 101).
#[test]
fn a_worker_whose_log_pipes_close_goes_on_and_stops_cleanly() {
    let dir = tempdir();
    let port = TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().unwrap().port();
    let address = format!("http://127.0.0.1:{port}");
    let mut running = spawn(&mut command_of(WORKER, dir.path(), &["--coordinator", &address], &[]));
    drop(running.child.stdout.take());
    drop(running.child.stderr.take());
    // Nothing listens on the port: the worker logs each attempt to connect, into closed pipes.
    thread::sleep(Duration::from_secs(3));
    assert!(
        running.child.try_wait().expect("try_wait").is_none(),
        "the worker exited: {:?}",
        running.child.wait()
    );
    let kill = Command::new("kill").arg("-TERM").arg(running.pid().to_string()).status().expect("run kill");
    assert!(kill.success(), "kill -TERM failed: {kill}");
    let status = running.wait_until(Instant::now() + DEADLINE, "worker after SIGTERM");
    assert_eq!(status.code(), Some(0), "exit after SIGTERM: {status}");
}
