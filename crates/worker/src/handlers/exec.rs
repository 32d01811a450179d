//! `exec`: runs a configured command for a task type (a prover CLI, say).
//!
//! The payload goes to the child's stdin and its stdout is the result. The child also gets
//! `TASK_ID`, `TASK_TYPE` and `TASK_ATTEMPT` in its environment (the configured `env` can
//! override them). stdin is written while stdout and stderr are read, all at once, so large
//! inputs and outputs never deadlock on full pipes.
//!
//! How it ends:
//! - exit 0: the result is stdout;
//! - exit N != 0: a failure carrying N and the last [`STDERR_TAIL`] bytes of stderr, retriable
//!   iff N is in `retriable_exit_codes`;
//! - killed by a signal it did not get from us (the OOM killer, say): a retriable failure;
//! - stdout over `max_output` bytes: the child is killed, a non-retriable failure "output
//!   exceeds N bytes";
//! - `task.deadline` passes: the child is killed, a retriable failure "deadline exceeded";
//! - `task.cancelled` fires: the child is killed, a failure saying "cancelled";
//! - the handler's future is dropped (the worker gave up on the task): the child is killed.
//!
//! On Unix the child leads a process group of its own, and "killed" means SIGKILL to the whole
//! group, so helpers it forked (`sh -c` pipelines, a prover's subprocesses) die with it; once
//! the child exits, whatever it left running in its group is killed as well. Should something
//! outside the group still hold its stdout or stderr open after it exits, the handler waits
//! [`PIPE_GRACE`] for the pipes to close and then finishes without them.

use std::{
    collections::HashMap,
    process::{ExitStatus, Stdio},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use tokio::{io::AsyncWriteExt, process::Command};

pub use super::process::STDERR_TAIL;
use super::{
    cancelled,
    process::{GroupKill, Tail, read_some},
};
use crate::{Handler, TaskContext, TaskFailure};

/// How long to wait for stdout and stderr to close once the child has exited.
pub const PIPE_GRACE: Duration = Duration::from_millis(500);
/// `max_output` of [`ExecConfig::new`]: 10 MiB, less room for the gRPC envelope.
pub const DEFAULT_MAX_OUTPUT: usize = 10 * 1024 * 1024 - 64 * 1024;

/// One external command, serving one task type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecConfig {
    /// The task type this command serves.
    pub task_type: String,
    /// The program and its arguments (no shell: use `["sh", "-c", "..."]` for one).
    pub command: Vec<String>,
    /// Non-zero exit codes that mean "try again" (e.g. 75, EX_TEMPFAIL); any other is final.
    pub retriable_exit_codes: Vec<i32>,
    /// Added to the environment the worker passes on.
    pub env: HashMap<String, String>,
    /// Most bytes of stdout accepted as a result.
    pub max_output: usize,
}

impl ExecConfig {
    /// A command with no retriable exit codes, no extra environment and [`DEFAULT_MAX_OUTPUT`].
    pub fn new(task_type: impl Into<String>, command: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            task_type: task_type.into(),
            command: command.into_iter().map(Into::into).collect(),
            retriable_exit_codes: Vec::new(),
            env: HashMap::new(),
            max_output: DEFAULT_MAX_OUTPUT,
        }
    }
}

/// Runs [`ExecConfig::command`] per task.
#[derive(Debug, Clone)]
pub struct Exec {
    config: Arc<ExecConfig>,
}

impl Exec {
    pub fn new(config: ExecConfig) -> Self {
        Self { config: Arc::new(config) }
    }

    pub fn config(&self) -> &ExecConfig {
        &self.config
    }
}

/// Why the handler stopped the child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Cancelled,
    Deadline,
    Overflow,
}

#[tonic::async_trait]
impl Handler for Exec {
    async fn run(&self, task: TaskContext) -> Result<Vec<u8>, TaskFailure> {
        let cfg = &*self.config;
        let Some((program, args)) = cfg.command.split_first() else {
            return Err(TaskFailure::permanent(format!("exec {}: no command configured", cfg.task_type)));
        };
        let name = format!("exec {} ({program})", cfg.task_type);
        if task.cancelled.is_cancelled() {
            return Err(cancelled(&format!("{name} was not started")));
        }
        let deadline = task
            .deadline
            .map(|d| tokio::time::Instant::now() + d.duration_since(SystemTime::now()).unwrap_or_default());
        if deadline.is_some_and(|d| d <= tokio::time::Instant::now()) {
            return Err(TaskFailure::retriable(format!("deadline exceeded: {name} was not started")));
        }

        let mut cmd = Command::new(program);
        cmd.args(args)
            .env("TASK_ID", &task.task_id)
            .env("TASK_TYPE", &task.task_type)
            .env("TASK_ATTEMPT", task.attempt.to_string())
            .envs(&cfg.env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        #[cfg(unix)]
        cmd.process_group(0);
        let started = Instant::now();
        let mut child = cmd.spawn().map_err(|e| {
            let message = format!("{name}: cannot start: {e}");
            match e.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => {
                    TaskFailure::permanent(message)
                }
                // Out of processes or file descriptors: another try (or worker) may do.
                _ => TaskFailure::retriable(message),
            }
        })?;
        // Kills the group if this future is dropped before the child is dealt with.
        let mut group = GroupKill::new(&child);

        let stdin = child.stdin.take();
        let mut stdout = child.stdout.take();
        let mut stderr = child.stderr.take();
        let payload = task.payload;
        let write_stdin = async move {
            if let Some(mut stdin) = stdin {
                // The child may exit without reading it all (a broken pipe); its exit status
                // tells what happened, so write errors are not failures of their own.
                let _ = stdin.write_all(&payload).await;
                let _ = stdin.shutdown().await;
            }
        };
        tokio::pin!(write_stdin);
        let until_deadline = async move {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(until_deadline);
        let grace = tokio::time::sleep(Duration::MAX);
        tokio::pin!(grace);

        let mut out = Vec::new();
        let mut out_buf = vec![0u8; 64 * 1024];
        let mut tail = Tail::default();
        let mut err_buf = vec![0u8; 8 * 1024];
        let mut stdin_done = false;
        let mut status: Option<ExitStatus> = None;
        let stop = loop {
            if status.is_some() && stdout.is_none() && stderr.is_none() {
                break None;
            }
            tokio::select! {
                biased;
                _ = task.cancelled.cancelled() => break Some(Stop::Cancelled),
                _ = &mut until_deadline => break Some(Stop::Deadline),
                read = read_some(&mut stdout, &mut out_buf) => match read {
                    Some(n) if out.len() + n > cfg.max_output => break Some(Stop::Overflow),
                    Some(n) => out.extend_from_slice(&out_buf[..n]),
                    None => stdout = None,
                },
                read = read_some(&mut stderr, &mut err_buf) => match read {
                    Some(n) => tail.push(&err_buf[..n]),
                    None => stderr = None,
                },
                _ = &mut write_stdin, if !stdin_done => stdin_done = true,
                exited = child.wait(), if status.is_none() => match exited {
                    Ok(s) => {
                        status = Some(s);
                        grace.as_mut().reset(tokio::time::Instant::now() + PIPE_GRACE);
                    }
                    Err(e) => {
                        group.kill(&mut child);
                        return Err(TaskFailure::retriable(format!("{name}: cannot wait for the child: {e}")));
                    }
                },
                // Exited, but something still holds its pipes open: stop waiting for them.
                _ = &mut grace, if status.is_some() => break None,
            }
        };
        let elapsed = started.elapsed().as_millis();
        let Some(stop) = stop else {
            // The child exited on its own.
            let status = status.expect("the loop ends on its own only after the child exited");
            // Whatever it left running in its group (holding the pipes or not) goes too.
            group.kill(&mut child);
            return finish(&name, cfg, status, out, &tail);
        };
        group.kill(&mut child);
        // Reap it (SIGKILL cannot be ignored; the timeout is only a guard).
        let _ = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
        Err(match stop {
            Stop::Cancelled => cancelled(&format!("{name} was killed after {elapsed} ms")),
            Stop::Deadline => TaskFailure::retriable(format!(
                "deadline exceeded: {name} was killed after {elapsed} ms{}",
                tail.describe()
            )),
            Stop::Overflow => TaskFailure::permanent(format!(
                "{name}: output exceeds {} bytes (max_output); the command was killed",
                cfg.max_output
            )),
        })
    }
}

fn finish(
    name: &str,
    cfg: &ExecConfig,
    status: ExitStatus,
    out: Vec<u8>,
    tail: &Tail,
) -> Result<Vec<u8>, TaskFailure> {
    if status.success() {
        return Ok(out);
    }
    if let Some(code) = status.code() {
        let retriable = cfg.retriable_exit_codes.contains(&code);
        let message = format!("{name} exited with code {code}{}", tail.describe());
        return Err(TaskFailure { message, retriable });
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = status.signal() {
            return Err(TaskFailure::retriable(format!(
                "{name} was killed by signal {signal}{}",
                tail.describe()
            )));
        }
    }
    Err(TaskFailure::retriable(format!("{name} failed: {status}{}", tail.describe())))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::handlers::test_support::*;

    fn exec(command: &[&str]) -> Exec {
        Exec::new(ExecConfig::new("prove", command.iter().copied()))
    }

    fn sh(script: &str) -> Exec {
        exec(&["sh", "-c", script])
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

    #[cfg(target_os = "linux")]
    async fn wait_dead(pid: u32) -> bool {
        for _ in 0..100 {
            if !alive(pid) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    #[tokio::test]
    async fn stdin_in_stdout_out() {
        bounded(async {
            let r = sh("tr a-z A-Z").run(task("prove", "hello, prover")).await.unwrap();
            assert_eq!(r, b"HELLO, PROVER");
            // No shell: arguments as given; an empty payload closes stdin at once.
            let r = exec(&["printf", "%s|%s", "a b", "c"]).run(task("prove", "")).await.unwrap();
            assert_eq!(r, b"a b|c");
            assert_eq!(exec(&["cat"]).run(task("prove", "")).await.unwrap(), b"");
        })
        .await
    }

    #[tokio::test]
    async fn environment_reaches_the_child() {
        bounded(async {
            let mut cfg = ExecConfig::new(
                "prove",
                [
                    "sh",
                    "-c",
                    r#"printf '%s %s %s %s' "$PROVER_MODE" "$TASK_ID" "$TASK_TYPE" "$TASK_ATTEMPT""#,
                ],
            );
            cfg.env.insert("PROVER_MODE".into(), "fast".into());
            let r = Exec::new(cfg).run(task("prove", "")).await.unwrap();
            assert_eq!(String::from_utf8(r).unwrap(), "fast t-1 prove 1");
        })
        .await
    }

    #[tokio::test]
    async fn a_non_zero_exit_carries_the_code_and_stderr_and_splits_on_retriable_codes() {
        bounded(async {
            let mut cfg = ExecConfig::new(
                "prove",
                ["sh", "-c", "echo partial; echo 'bad witness' >&2; exit \"$1\"", "sh"],
            );
            cfg.retriable_exit_codes = vec![75];
            let e = Exec::new(ExecConfig {
                command: [cfg.command.clone(), vec!["3".into()]].concat(),
                ..cfg.clone()
            })
            .run(task("prove", ""))
            .await
            .unwrap_err();
            assert!(!e.retriable, "{e:?}");
            assert!(e.message.contains("exited with code 3"), "{}", e.message);
            assert!(e.message.ends_with("; stderr: bad witness"), "{}", e.message);
            let e =
                Exec::new(ExecConfig { command: [cfg.command.clone(), vec!["75".into()]].concat(), ..cfg })
                    .run(task("prove", ""))
                    .await
                    .unwrap_err();
            assert!(e.retriable, "{e:?}");
            assert!(e.message.contains("exited with code 75"), "{}", e.message);
        })
        .await
    }

    #[tokio::test]
    async fn only_the_tail_of_a_long_stderr_is_kept() {
        bounded(async {
            // 200 KB of noise, then the line that matters.
            let e = sh("head -c 200000 /dev/zero | tr '\\0' x >&2; echo ' THE END' >&2; exit 1")
                .run(task("prove", ""))
                .await
                .unwrap_err();
            assert!(e.message.ends_with("x THE END"), "{:.200}", e.message);
            assert!(e.message.contains(&format!("(last {STDERR_TAIL} bytes)")), "{:.200}", e.message);
            assert!(e.message.len() < STDERR_TAIL + 200, "{}", e.message.len());
        })
        .await
    }

    #[tokio::test]
    async fn the_deadline_kills_the_command() {
        bounded(async {
            let t = with_deadline(task("prove", ""), Duration::from_millis(300));
            let started = Instant::now();
            let e = exec(&["sleep", "30"]).run(t).await.unwrap_err();
            assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
            assert!(e.retriable, "{e:?}");
            assert!(e.message.starts_with("deadline exceeded"), "{}", e.message);
            // A deadline already past: the command is not even started.
            let t = with_deadline(task("prove", ""), Duration::ZERO);
            let e = exec(&["sleep", "30"]).run(t).await.unwrap_err();
            assert!(e.retriable && e.message.starts_with("deadline exceeded"), "{e:?}");
        })
        .await
    }

    #[tokio::test]
    async fn a_cancel_kills_the_command() {
        bounded(async {
            let t = task("prove", "");
            let token = t.cancelled.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                token.cancel();
            });
            let started = Instant::now();
            let e = sh("sleep 30; echo never").run(t).await.unwrap_err();
            assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
            assert!(e.message.starts_with("cancelled"), "{}", e.message);
        })
        .await
    }

    #[tokio::test]
    async fn oversized_output_is_a_permanent_failure() {
        bounded(async {
            let mut cfg = ExecConfig::new("prove", ["sh", "-c", "head -c 100000 /dev/zero"]);
            cfg.max_output = 1000;
            let e = Exec::new(cfg.clone()).run(task("prove", "")).await.unwrap_err();
            assert!(!e.retriable, "{e:?}");
            assert!(e.message.contains("output exceeds 1000 bytes"), "{}", e.message);
            // An endless writer is stopped too.
            cfg.command = vec!["sh".into(), "-c".into(), "yes".into()];
            let e = Exec::new(cfg.clone()).run(task("prove", "")).await.unwrap_err();
            assert!(e.message.contains("output exceeds 1000 bytes"), "{}", e.message);
            // Exactly the limit is fine.
            cfg.command = vec!["sh".into(), "-c".into(), "head -c 1000 /dev/zero".into()];
            assert_eq!(Exec::new(cfg).run(task("prove", "")).await.unwrap().len(), 1000);
        })
        .await
    }

    #[tokio::test]
    async fn a_large_stdin_is_piped_through() {
        bounded(async {
            let payload: Vec<u8> = (0..1024 * 1024u32).map(|i| (i * 7 + i / 251) as u8).collect();
            let r = exec(&["cat"]).run(task("prove", payload.clone())).await.unwrap();
            assert_eq!(r.len(), payload.len());
            assert!(r == payload);
            // A child that never reads its stdin does not hang the task.
            let r = sh("echo done").run(task("prove", payload)).await.unwrap();
            assert_eq!(r, b"done\n");
        })
        .await
    }

    #[tokio::test]
    async fn a_missing_program_is_a_permanent_failure() {
        bounded(async {
            let e = exec(&["/nonexistent/prover", "--stdin"]).run(task("prove", "")).await.unwrap_err();
            assert!(!e.retriable, "{e:?}");
            assert!(e.message.contains("cannot start"), "{}", e.message);
            let e = Exec::new(ExecConfig::new("prove", Vec::<String>::new()))
                .run(task("prove", ""))
                .await
                .unwrap_err();
            assert!(!e.retriable && e.message.contains("no command configured"), "{e:?}");
        })
        .await
    }

    #[tokio::test]
    async fn a_signal_death_is_retriable() {
        bounded(async {
            let e = sh("kill -9 $$").run(task("prove", "")).await.unwrap_err();
            assert!(e.retriable, "{e:?}");
            assert!(e.message.contains("killed by signal 9"), "{}", e.message);
        })
        .await
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn the_whole_process_group_dies_on_deadline_and_on_drop() {
        bounded(async {
            let dir = tempfile::tempdir().unwrap();
            let pid_file = dir.path().join("pid");
            // A grandchild that holds the pipes, behind a shell that waits for it.
            let script = format!("sleep 30 & echo $! > {}; wait", pid_file.display());
            let t = with_deadline(task("prove", ""), Duration::from_millis(300));
            let started = Instant::now();
            let e = sh(&script).run(t).await.unwrap_err();
            assert!(e.message.starts_with("deadline exceeded"), "{}", e.message);
            assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
            let pid: u32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
            assert!(wait_dead(pid).await, "grandchild {pid} still runs");

            // The worker drops the handler's future (its own deadline, a revoke): same result.
            std::fs::remove_file(&pid_file).unwrap();
            let run = tokio::spawn(async move { sh(&script).run(task("prove", "")).await });
            let mut pid = None;
            for _ in 0..100 {
                if let Some(p) =
                    std::fs::read_to_string(&pid_file).ok().and_then(|s| s.trim().parse::<u32>().ok())
                {
                    pid = Some(p);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let pid = pid.expect("the script started");
            assert!(alive(pid));
            run.abort();
            let _ = run.await;
            assert!(wait_dead(pid).await, "grandchild {pid} still runs after the drop");
        })
        .await
    }

    #[tokio::test]
    async fn a_leftover_process_holding_the_pipes_does_not_hang_the_task() {
        bounded(async {
            // The child exits at once; a detached grandchild keeps stdout open.
            let started = Instant::now();
            let r = sh("setsid sleep 5 & echo quick").run(task("prove", "")).await.unwrap();
            assert_eq!(r, b"quick\n");
            assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
        })
        .await
    }
}
