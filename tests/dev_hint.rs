//! `coordinator dev` prints commands to try: each coordctl line must work when pasted, as
//! printed, into a shell in the directory the coordinator was started from (the repository
//! root, or anywhere else), on whatever ports it listens.
//!
//! Each case starts the real binary on free ports (`--grpc-port 0 --http-port 0`) with one
//! local worker, reads the hint from its stdout, runs printed coordctl lines with `sh -c` in the
//! same directory, and stops the coordinator with SIGTERM.

mod common;

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Output, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

const COORDINATOR: &str = env!("CARGO_BIN_EXE_coordinator");
/// Longest the coordinator may take to print its hint, and to exit after SIGTERM.
const DEADLINE: Duration = Duration::from_secs(30);
/// A PATH without cargo's bin directory, so no installed coordctl answers instead.
const PLAIN_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// A child process killed (and reaped) when dropped, so a failing test leaves none behind.
struct Dev {
    child: Child,
    hint: Vec<String>,
}

impl Drop for Dev {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts `coordinator dev` in `dir` and returns it with the lines of its hint.
fn start_dev(dir: &Path) -> Dev {
    let mut child = Command::new(COORDINATOR)
        .args(["dev", "--ephemeral", "--grpc-port", "0", "--http-port", "0", "--workers", "1"])
        .current_dir(dir)
        .env_clear()
        .env("PATH", PLAIN_PATH)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start coordinator dev");
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut dev = Dev { child, hint: Vec::new() };
    let end = Instant::now() + DEADLINE;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains("Ctrl-C stops it") => return dev,
            Ok(line) => dev.hint.push(line),
            Err(_) => panic!("no complete hint within {DEADLINE:?}; got:\n{}", dev.hint.join("\n")),
        }
    }
}

impl Dev {
    /// The printed line that runs coordctl with `args`.
    fn coordctl_line(&self, args: &str) -> String {
        self.hint
            .iter()
            .map(|l| l.trim())
            .find(|l| l.contains("coordctl") && l.ends_with(args))
            .unwrap_or_else(|| {
                panic!("no coordctl line ending in {args:?} in the hint:\n{}", self.hint.join("\n"))
            })
            .to_owned()
    }

    fn stop(mut self) {
        // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) }, 0);
        let end = Instant::now() + DEADLINE;
        loop {
            match self.child.try_wait().expect("wait for coordinator dev") {
                Some(status) => {
                    assert!(status.success(), "coordinator dev exited with {status} after SIGTERM");
                    return;
                }
                None if Instant::now() > end => panic!("coordinator dev did not stop within {DEADLINE:?}"),
                None => thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// Runs `line` as a user would paste it: `sh -c LINE` in `dir`.
fn run_in_shell(dir: &Path, line: &str) -> Output {
    Command::new("sh")
        .args(["-c", line])
        .current_dir(dir)
        .env_clear()
        .env("PATH", PLAIN_PATH)
        .stdin(Stdio::null())
        .output()
        .expect("run sh")
}

fn assert_runs(dir: &Path, dev: &Dev, args: &str, stdout_has: &str) {
    let line = dev.coordctl_line(args);
    let out = run_in_shell(dir, &line);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "`{line}` in {} failed ({}):\nstdout: {stdout}\nstderr: {stderr}",
        dir.display(),
        out.status
    );
    assert!(
        stdout.contains(stdout_has),
        "`{line}` printed {stdout:?}, expected it to contain {stdout_has:?}"
    );
}

/// The coordctl program as the hint should show it when started in `dir`: relative when the
/// binary lies under `dir`, absolute otherwise.
fn expected_program(dir: &Path) -> String {
    let coordctl = common::coordctl_bin().canonicalize().unwrap();
    match coordctl.strip_prefix(dir.canonicalize().unwrap()) {
        Ok(rel) => rel.display().to_string(),
        Err(_) => coordctl.display().to_string(),
    }
}

#[test]
fn hint_commands_run_as_printed_from_the_repository_root() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dev = start_dev(root);
    let workers =
        dev.hint.iter().find(|l| l.trim_start().starts_with("workers")).cloned().unwrap_or_default();
    assert!(workers.contains("1 local (dev-worker-1), handlers: "), "{workers:?}");
    assert_runs(root, &dev, "submit --type echo --payload hello --wait", "hello");
    assert_runs(root, &dev, "workers", "dev-worker-1");
    let line = dev.coordctl_line("workers");
    assert!(
        line.starts_with(&format!("{} --coordinator http://127.0.0.1:", expected_program(root))),
        "hint line {line:?}"
    );
    dev.stop();
}

#[test]
fn hint_commands_run_as_printed_from_another_directory() {
    let dir = tempfile::tempdir().unwrap();
    let dev = start_dev(dir.path());
    assert_runs(dir.path(), &dev, "is-prime 17 18 19", "17 is prime: true");
    assert_runs(dir.path(), &dev, "submit --type echo --payload hello --wait", "hello");
    let line = dev.coordctl_line("is-prime 17 18 19");
    assert!(line.starts_with(&expected_program(dir.path())), "hint line {line:?}");
    dev.stop();
}
