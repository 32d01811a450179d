//! `persistent`: long-lived prover processes that serve task after task, so a prover that loads
//! gigabytes of keys at start pays for it once instead of once per task (as [`crate::handlers::exec`]
//! does).
//!
//! The worker and each child speak the framed protocol of [`frame`] over the child's stdin and
//! stdout (spec: `docs/persistent-prover-protocol.md`); stderr is free-form logging, forwarded
//! to the worker's log at debug level, its last [`STDERR_TAIL`] bytes kept for failure messages.
//!
//! [`Persistent::start`] spawns [`PersistentConfig::processes`] children at once (eagerly, at
//! worker start, so their start-up overlaps); each must send `ready` within `start_timeout`.
//! One child serves one task at a time; a task waits for a free child (first come, first
//! served). Each child gets `PROVER_SLOT` (0, 1, ...) in its environment, to pin a GPU say.
//!
//! How a task ends, and what happens to the child:
//! - `result` / `failure` from the child: that is the outcome; the child serves the next task;
//! - the child dies (crash, exit, stdout closed) or sends a malformed frame: a retriable failure
//!   naming the exit status (or the problem) and the tail of stderr; the child is restarted;
//! - cancel or deadline: the child gets `cancel` and `cancel_grace` to answer; the task ends
//!   "cancelled" (not retriable) or "deadline exceeded" (retriable) either way, and a child that
//!   did not answer in time is killed and restarted;
//! - a `result` over `max_output` bytes: refused before it is read, the child is killed and
//!   restarted, a non-retriable failure "output exceeds N bytes";
//! - no frame at all for `progress_timeout` (when set) while a task runs: the child is
//!   considered hung, killed and restarted, a retriable failure;
//! - the handler's future is dropped (the worker gave up on the task): the child is killed and
//!   restarted, since it may still be working on that task; unless the task was cancelled or
//!   is past its deadline (the worker drops a task then too), which go as above.
//!
//! Restarts after a kill of ours are immediate; a child that died on its own, sent garbage or
//! failed to start is restarted after an exponential backoff (`restart_backoff_base`, doubling,
//! capped at `restart_backoff_max`; it starts over once a child has stayed up for
//! `restart_backoff_max`). Tasks given to a child that is restarting wait for it; if the start
//! fails, they fail retriably with the reason. [`Persistent::shutdown`] (or dropping the last
//! handle) sends `shutdown` and closes stdin, and kills what is left after `shutdown_grace`.
//! As in `exec`, each child leads a process group of its own and "killed" means SIGKILL to the
//! whole group.

use std::{
    collections::{HashMap, VecDeque},
    process::{ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use tokio::{
    io::{AsyncWriteExt, BufReader},
    process::{Child, Command},
    sync::{Semaphore, mpsc, oneshot},
    task::{JoinHandle, JoinSet},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use crate::handlers::process::STDERR_TAIL;
use crate::{
    Error, Handler, TaskContext, TaskFailure,
    handlers::{
        cancelled,
        exec::DEFAULT_MAX_OUTPUT,
        process::{GroupKill, Tail, describe_status, read_some},
    },
};

pub mod frame;

use frame::{Frame, FrameError, FromChild, ToChild};

/// How long to wait for a child that closed its stdout to exit, to tell its exit status.
const EXIT_GRACE: Duration = Duration::from_millis(500);

/// Long-lived prover processes serving one task type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersistentConfig {
    /// The task type these processes serve.
    pub task_type: String,
    /// The program and its arguments (no shell).
    pub command: Vec<String>,
    /// Added to the environment the worker passes on.
    pub env: HashMap<String, String>,
    /// Children kept running, one task each at a time (the `worker` binary defaults this to
    /// its `max_concurrent`).
    pub processes: usize,
    /// Most bytes of a `result` accepted.
    pub max_output: usize,
    /// How long a child has to send `ready` after it is spawned.
    pub start_timeout: Duration,
    /// How long a child has to answer `cancel` before it is killed.
    pub cancel_grace: Duration,
    /// Restart backoff after a child died on its own: `base`, doubling per death in a row,
    /// capped at `max`; a child that stayed up for `max` resets it.
    pub restart_backoff_base: Duration,
    pub restart_backoff_max: Duration,
    /// When set, a child running a task that sends no frame (`progress`, `heartbeat`, ...) for
    /// this long is considered hung.
    pub progress_timeout: Option<Duration>,
    /// How long children have to exit after `shutdown` before they are killed.
    pub shutdown_grace: Duration,
}

impl PersistentConfig {
    /// One process, [`DEFAULT_MAX_OUTPUT`], 60 s to start, 2 s to answer a cancel, restart
    /// backoff from 1 s to 60 s, no progress timeout, 5 s to shut down.
    pub fn new(task_type: impl Into<String>, command: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            task_type: task_type.into(),
            command: command.into_iter().map(Into::into).collect(),
            env: HashMap::new(),
            processes: 1,
            max_output: DEFAULT_MAX_OUTPUT,
            start_timeout: Duration::from_secs(60),
            cancel_grace: Duration::from_secs(2),
            restart_backoff_base: Duration::from_secs(1),
            restart_backoff_max: Duration::from_secs(60),
            progress_timeout: None,
            shutdown_grace: Duration::from_secs(5),
        }
    }

    /// The delay before the next start after `deaths` unplanned ends in a row.
    fn restart_delay(&self, deaths: u32) -> Duration {
        if deaths == 0 {
            return Duration::ZERO;
        }
        self.restart_backoff_base.saturating_mul(1u32 << (deaths - 1).min(20)).min(self.restart_backoff_max)
    }
}

/// Serves [`PersistentConfig::task_type`] with long-lived children; cheap to clone. Dropping
/// the last clone shuts the children down in the background; [`Persistent::shutdown`] does it
/// and waits.
#[derive(Debug, Clone)]
pub struct Persistent {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    shared: Arc<Shared>,
    /// One supervisor per child slot; awaited by [`Persistent::shutdown`].
    /// std Mutex: taken once, never held across `.await`.
    supervisors: Mutex<Vec<JoinHandle<()>>>,
    /// Stops the supervisors; cancelled on shutdown or when the last handle goes.
    shutdown: CancellationToken,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.shared.free.close();
    }
}

/// What the handler and the supervisors share.
#[derive(Debug)]
struct Shared {
    config: PersistentConfig,
    /// `persistent prove (prover)`, for messages.
    name: String,
    /// One permit per entry of `idle`.
    free: Semaphore,
    /// Job inboxes of slots that take a task now (or as soon as their child is back). The
    /// supervisor of each slot holds the receiving end.
    /// std Mutex: push and pop only, never held across `.await`.
    idle: Mutex<VecDeque<mpsc::Sender<Job>>>,
}

/// A task handed to a slot; the handler awaits `reply`.
#[derive(Debug)]
struct Job {
    task: TaskContext,
    /// The handler's future holds the other end; closed when it is dropped.
    reply: oneshot::Sender<Result<Vec<u8>, TaskFailure>>,
}

impl Persistent {
    /// Spawns the children (they then load in the background and report `ready`). Fails
    /// with [`Error::Config`] on an empty command or zero processes, and with [`Error::Spawn`]
    /// when the program cannot be started. Must be called within a tokio runtime.
    pub fn start(config: PersistentConfig) -> Result<Self, Error> {
        let Some(program) = config.command.first() else {
            return Err(Error::Config(format!("persistent {}: no command configured", config.task_type)));
        };
        if config.processes == 0 {
            return Err(Error::Config(format!(
                "persistent {}: processes must be at least 1",
                config.task_type
            )));
        }
        let shared = Arc::new(Shared {
            name: format!("persistent {} ({program})", config.task_type),
            free: Semaphore::new(0),
            idle: Mutex::new(VecDeque::new()),
            config,
        });
        let mut first = Vec::new();
        for slot in 0..shared.config.processes {
            let child = Process::spawn(&shared, slot)
                .map_err(|source| Error::Spawn { command: shared.config.command.join(" "), source })?;
            first.push(child);
        }
        let shutdown = CancellationToken::new();
        let supervisors = first
            .into_iter()
            .enumerate()
            .map(|(slot, child)| tokio::spawn(supervise(shared.clone(), slot, child, shutdown.clone())))
            .collect();
        Ok(Self { inner: Arc::new(Inner { shared, supervisors: Mutex::new(supervisors), shutdown }) })
    }

    pub fn config(&self) -> &PersistentConfig {
        &self.inner.shared.config
    }

    /// Sends every child `shutdown`, closes its stdin, kills it after `shutdown_grace`, and
    /// waits for all that. Call it once the worker has stopped: a task still running keeps
    /// its child until it ends; tasks waiting for a child fail retriably.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        self.inner.shared.free.close();
        let supervisors =
            std::mem::take(&mut *self.inner.supervisors.lock().unwrap_or_else(|e| e.into_inner()));
        for s in supervisors {
            let _ = s.await;
        }
    }
}

#[tonic::async_trait]
impl Handler for Persistent {
    async fn run(&self, task: TaskContext) -> Result<Vec<u8>, TaskFailure> {
        let shared = &self.inner.shared;
        let name = &shared.name;
        if task.cancelled.is_cancelled() {
            return Err(cancelled(&format!("{name}: the task was not sent")));
        }
        let deadline = task.deadline.map(instant_of);
        let until_deadline = sleep_until(deadline);
        let free = tokio::select! {
            biased;
            _ = task.cancelled.cancelled() => return Err(cancelled(&format!("{name}: the task was not sent"))),
            _ = until_deadline => return Err(TaskFailure::retriable(format!(
                "deadline exceeded: {name}: no prover process became free"))),
            free = shared.free.acquire() => free,
        };
        let shutting_down =
            || TaskFailure::retriable(format!("{name}: the prover processes are shutting down"));
        free.map_err(|_| shutting_down())?.forget();
        let inbox = shared.idle.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
        let (reply, answer) = oneshot::channel();
        // An inbox in `idle` is empty and its slot takes exactly this one job.
        if inbox.is_none_or(|inbox| inbox.try_send(Job { task, reply }).is_err()) {
            return Err(shutting_down());
        }
        answer.await.unwrap_or_else(|_| Err(shutting_down()))
    }
}

/// Why a child's service ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// We killed it (cancel not answered, oversize, the task was dropped): restart at once.
    Killed,
    /// It died on its own, hung or spoke garbage: restart with backoff.
    Died,
    /// The handler is shutting down.
    Shutdown,
}

/// Owns one slot: starts its child, feeds it tasks from the slot's inbox, restarts it.
async fn supervise(shared: Arc<Shared>, slot: usize, first: Process, shutdown: CancellationToken) {
    let cfg = &shared.config;
    let (inbox, mut jobs) = mpsc::channel::<Job>(1);
    let mut listed = false;
    let mut deaths = 0u32;
    let mut next = Some(first);
    loop {
        // Offered while its child starts: the task waits for `ready`, or fails with the reason.
        list(&shared, &inbox, &mut listed);
        let mut child = match next.take() {
            Some(child) => child,
            None => {
                let delay = cfg.restart_delay(deaths);
                if !delay.is_zero() {
                    let delay_ms = delay.as_millis() as u64;
                    debug!(task_type = %cfg.task_type, slot, delay_ms, "prover process restarts after a backoff");
                }
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                match Process::spawn(&shared, slot) {
                    Ok(child) => child,
                    Err(e) => {
                        deaths += 1;
                        start_failed(&shared, slot, &mut jobs, &mut listed, format!("cannot start: {e}"));
                        continue;
                    }
                }
            }
        };
        match child.wait_ready(cfg.start_timeout, &shutdown).await {
            Ok(version) => info!(task_type = %cfg.task_type, slot, pid = child.pid,
                                 startup_ms = child.started.elapsed().as_millis() as u64,
                                 version = version.as_deref().unwrap_or(""), "prover process ready"),
            Err(None) => return child.shut_down(cfg.shutdown_grace).await,
            Err(Some(problem)) => {
                child.kill().await;
                deaths += 1;
                start_failed(&shared, slot, &mut jobs, &mut listed, problem);
                continue;
            }
        }
        let end = serve(&shared, &mut child, &inbox, &mut jobs, &mut listed, &shutdown).await;
        match end {
            End::Shutdown => return child.shut_down(cfg.shutdown_grace).await,
            End::Killed => child.kill().await,
            End::Died => {
                child.kill().await;
                deaths = if child.started.elapsed() >= cfg.restart_backoff_max { 1 } else { deaths + 1 };
            }
        }
    }
}

/// Offers the slot to the next task, unless it is offered already.
fn list(shared: &Shared, inbox: &mpsc::Sender<Job>, listed: &mut bool) {
    if !*listed {
        shared.idle.lock().unwrap_or_else(|e| e.into_inner()).push_back(inbox.clone());
        shared.free.add_permits(1);
        *listed = true;
    }
}

/// A start failed: say so, and fail the task that waits for this slot (if any).
fn start_failed(
    shared: &Shared,
    slot: usize,
    jobs: &mut mpsc::Receiver<Job>,
    listed: &mut bool,
    problem: String,
) {
    warn!(task_type = %shared.config.task_type, slot, problem = %problem, "prover process failed to start");
    if let Ok(job) = jobs.try_recv() {
        *listed = false;
        let _ = job.reply.send(Err(TaskFailure::retriable(format!(
            "{}: the prover process could not start: {problem}",
            shared.name
        ))));
    }
}

/// Serves tasks with a ready child until it must be restarted or the handler shuts down.
async fn serve(
    shared: &Shared,
    child: &mut Process,
    inbox: &mpsc::Sender<Job>,
    jobs: &mut mpsc::Receiver<Job>,
    listed: &mut bool,
    shutdown: &CancellationToken,
) -> End {
    loop {
        list(shared, inbox, listed);
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return End::Shutdown,
            job = jobs.recv() => {
                *listed = false;
                let Some(job) = job else { return End::Shutdown };
                match run_task(shared, child, job).await {
                    None => continue,
                    Some(end) => return end,
                }
            }
            frame = child.frames.recv() => match frame {
                Some(Ok(Frame { header: FromChild::Heartbeat { .. } | FromChild::Progress { .. }, .. })) => {}
                Some(Ok(frame)) => {
                    child.warn(&format!("sent {} with no task running", frame.header.kind()));
                    return End::Died;
                }
                Some(Err(e)) => {
                    child.warn(&e.to_string());
                    return End::Died;
                }
                None => {
                    let ended = child.describe_end().await;
                    child.warn(&ended);
                    return End::Died;
                }
            },
        }
    }
}

/// Why the handler asked the child to stop the task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Cancelled,
    Deadline,
}

/// Runs one task on a ready child. `None`: the child serves on; `Some(end)`: it must go.
async fn run_task(shared: &Shared, child: &mut Process, job: Job) -> Option<End> {
    let Job { task, mut reply } = job;
    let cfg = &shared.config;
    let name = &shared.name;
    if reply.is_closed() {
        return None;
    }
    if task.cancelled.is_cancelled() {
        let _ = reply.send(Err(cancelled(&format!("{name}: the task was not sent"))));
        return None;
    }
    let deadline = task.deadline.map(instant_of);
    let now = tokio::time::Instant::now();
    if deadline.is_some_and(|d| d <= now) {
        let _ = reply
            .send(Err(TaskFailure::retriable(format!("deadline exceeded: {name}: the task was not sent"))));
        return None;
    }
    let started = Instant::now();
    let header = ToChild::Task {
        id: task.task_id.clone(),
        task_type: task.task_type.clone(),
        attempt: task.attempt,
        deadline_ms: deadline.map(|d| d.duration_since(now).as_millis() as u64),
        len: task.payload.len() as u64,
    };
    child.send(header.encode());
    child.send(task.payload);

    let until_deadline = sleep_until(deadline);
    tokio::pin!(until_deadline);
    let grace = tokio::time::sleep(Duration::MAX);
    tokio::pin!(grace);
    let silence = cfg.progress_timeout;
    let quiet = tokio::time::sleep(silence.unwrap_or_default());
    tokio::pin!(quiet);
    let mut stop: Option<Stop> = None;
    let (result, end): Outcome = loop {
        let asked = tokio::select! {
            biased;
            _ = task.cancelled.cancelled(), if stop.is_none() => Stop::Cancelled,
            _ = &mut until_deadline, if stop.is_none() => Stop::Deadline,
            _ = reply.closed(), if stop.is_none() => {
                // The worker dropped the task: at its deadline or on a cancel, ask the child as
                // for those; otherwise the child may still be at it, so it goes.
                if task.cancelled.is_cancelled() {
                    Stop::Cancelled
                } else if deadline.is_some_and(|d| d <= tokio::time::Instant::now()) {
                    Stop::Deadline
                } else {
                    child.kill().await;
                    return Some(End::Killed);
                }
            }
            _ = &mut grace, if stop.is_some() => {
                let how = format!(
                    "the prover process did not answer cancel within {:?}; killed and restarted",
                    cfg.cancel_grace
                );
                break (Err(stopped(name, stop, &how, started)), Some(End::Killed));
            }
            _ = &mut quiet, if silence.is_some() => {
                let problem = format!(
                    "sent nothing for {:?} (progress_timeout); it was killed and restarted",
                    silence.unwrap_or_default()
                );
                child.warn(&problem);
                let message = format!("{name}: the prover process {problem}{}", child.tail());
                break (Err(TaskFailure::retriable(message)), Some(End::Died));
            }
            frame = child.frames.recv() => {
                if let Some(silence) = silence {
                    quiet.as_mut().reset(tokio::time::Instant::now() + silence);
                }
                match on_frame(name, child, &task.task_id, frame, stop, started).await {
                    Some(outcome) => break outcome,
                    None => continue,
                }
            }
        };
        // A cancel or the deadline: ask the child, give it the grace.
        stop = Some(asked);
        child.send(ToChild::Cancel { id: task.task_id.clone() }.encode());
        grace.as_mut().reset(tokio::time::Instant::now() + cfg.cancel_grace);
    };
    let _ = reply.send(result);
    end
}

/// The outcome of a task, and what becomes of its child (`None`: it serves on).
type Outcome = (Result<Vec<u8>, TaskFailure>, Option<End>);

/// What a frame (or the end of stdout) means for the task in flight: `None` to wait on.
async fn on_frame(
    name: &str,
    child: &mut Process,
    task_id: &str,
    frame: Option<Result<Frame, FrameError>>,
    stop: Option<Stop>,
    started: Instant,
) -> Option<Outcome> {
    let restarted = "it was killed and restarted";
    let frame = match frame {
        Some(Ok(frame)) => frame,
        Some(Err(FrameError::Oversize { len, max })) => {
            child.warn(&format!("sent a result of {len} bytes"));
            let message = format!(
                "{name}: output exceeds {max} bytes (max_output): the prover process announced a result \
                 of {len} bytes; {restarted}"
            );
            return Some((Err(TaskFailure::permanent(message)), Some(End::Killed)));
        }
        Some(Err(e @ FrameError::Malformed(_))) => {
            child.warn(&e.to_string());
            let message = format!("{name}: the prover process sent a {e}; {restarted}{}", child.tail());
            return Some((Err(TaskFailure::retriable(message)), Some(End::Died)));
        }
        Some(Err(FrameError::Truncated(_))) | None => {
            let ended = child.describe_end().await;
            child.warn(&ended);
            let how = format!("the prover process {ended} while running the task{}", child.tail());
            let failure = match stop {
                None => TaskFailure::retriable(format!("{name}: {how}")),
                Some(_) => stopped(name, stop, &how, started),
            };
            return Some((Err(failure), Some(End::Died)));
        }
    };
    let problem = match frame.header {
        FromChild::Heartbeat { .. } | FromChild::Progress { .. } => return None,
        FromChild::Result { id, .. } if id == task_id => {
            let result =
                if stop.is_some() { Err(stopped(name, stop, "stopped", started)) } else { Ok(frame.body) };
            return Some((result, None));
        }
        FromChild::Failure { id, message, retriable } if id == task_id => {
            let failure = match stop {
                None => TaskFailure { message, retriable },
                Some(_) => stopped(name, stop, "stopped", started),
            };
            return Some((Err(failure), None));
        }
        ref other @ (FromChild::Result { ref id, .. } | FromChild::Failure { ref id, .. }) => {
            format!("sent {} for task {id:?} while running task {task_id:?}", other.kind())
        }
        ref other => format!("sent {} while running a task", other.kind()),
    };
    child.warn(&problem);
    let message = format!("{name}: protocol error: the prover process {problem}; {restarted}");
    Some((Err(TaskFailure::retriable(message)), Some(End::Died)))
}

/// The failure of a task the worker asked the child to stop.
fn stopped(name: &str, stop: Option<Stop>, how: &str, started: Instant) -> TaskFailure {
    let ms = started.elapsed().as_millis();
    match stop {
        Some(Stop::Deadline) => {
            TaskFailure::retriable(format!("deadline exceeded: {name}: {how} after {ms} ms"))
        }
        Some(Stop::Cancelled) | None => cancelled(&format!("{name}: {how} after {ms} ms")),
    }
}

/// A running child and the tasks that move its bytes.
#[derive(Debug)]
struct Process {
    child: Child,
    /// Kills the child's process group (also when dropped while armed).
    group: GroupKill,
    pid: u32,
    slot: usize,
    started: Instant,
    task_type: String,
    /// Bytes for the child's stdin; the writer task holds the other end. Dropped: stdin closes.
    to_child: Option<mpsc::UnboundedSender<Vec<u8>>>,
    /// Frames read from the child's stdout; the reader task holds the other end and ends it
    /// with the first error.
    frames: mpsc::Receiver<Result<Frame, FrameError>>,
    /// The end of stderr; the stderr task writes it. std Mutex: short pushes and reads only.
    stderr: Arc<Mutex<Tail>>,
    /// Writer, reader and stderr tasks; aborted when the process is dropped.
    io: JoinSet<()>,
}

impl Process {
    fn spawn(shared: &Shared, slot: usize) -> std::io::Result<Process> {
        let cfg = &shared.config;
        let (program, args) = cfg.command.split_first().expect("checked by Persistent::start");
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env("PROVER_SLOT", slot.to_string())
            .envs(&cfg.env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        #[cfg(unix)]
        cmd.process_group(0);
        let mut child = cmd.spawn()?;
        let group = GroupKill::new(&child);
        let pid = child.id().unwrap_or_default();
        let mut io = JoinSet::new();

        let (to_child, mut outgoing) = mpsc::unbounded_channel::<Vec<u8>>();
        let mut stdin = child.stdin.take().expect("stdin is piped");
        io.spawn(async move {
            while let Some(bytes) = outgoing.recv().await {
                // A child that stopped reading has died or will be killed: its end tells.
                if stdin.write_all(&bytes).await.is_err() || stdin.flush().await.is_err() {
                    return;
                }
            }
        });

        let (frames_tx, frames) = mpsc::channel(16);
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout is piped"));
        let max_output = cfg.max_output;
        io.spawn(async move {
            loop {
                let frame = frame::read_frame(&mut stdout, max_output).await;
                let last = !matches!(frame, Ok(Some(_)));
                let Some(frame) = frame.transpose() else { return };
                if frames_tx.send(frame).await.is_err() || last {
                    return;
                }
            }
        });

        let stderr = Arc::new(Mutex::new(Tail::default()));
        let tail = stderr.clone();
        let mut pipe = child.stderr.take();
        let task_type = cfg.task_type.clone();
        io.spawn(async move {
            let mut buf = vec![0u8; 8 * 1024];
            while let Some(n) = read_some(&mut pipe, &mut buf).await {
                tail.lock().unwrap_or_else(|e| e.into_inner()).push(&buf[..n]);
                for line in String::from_utf8_lossy(&buf[..n]).lines().filter(|l| !l.trim().is_empty()) {
                    debug!(task_type = %task_type, slot, pid, "prover stderr: {line}");
                }
            }
        });
        debug!(task_type = %cfg.task_type, slot, pid, "prover process spawned");
        Ok(Process {
            child,
            group,
            pid,
            slot,
            started: Instant::now(),
            task_type: cfg.task_type.clone(),
            to_child: Some(to_child),
            frames,
            stderr,
            io,
        })
    }

    /// Queues bytes for stdin.
    fn send(&self, bytes: Vec<u8>) {
        if let Some(to_child) = &self.to_child {
            let _ = to_child.send(bytes);
        }
    }

    /// Waits for `ready`: `Ok(version)`, `Err(Some(problem))`, or `Err(None)` on shutdown.
    async fn wait_ready(
        &mut self,
        timeout: Duration,
        shutdown: &CancellationToken,
    ) -> Result<Option<String>, Option<String>> {
        let until = tokio::time::sleep(timeout);
        tokio::pin!(until);
        loop {
            let frame = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Err(None),
                _ = &mut until => {
                    return Err(Some(format!("sent no ready within {timeout:?} (start_timeout){}", self.tail())));
                }
                frame = self.frames.recv() => frame,
            };
            return match frame {
                Some(Ok(Frame { header: FromChild::Ready { protocol, version }, .. })) => {
                    if protocol == frame::PROTOCOL {
                        Ok(version)
                    } else {
                        Err(Some(format!(
                            "speaks protocol {protocol}; this worker speaks {}",
                            frame::PROTOCOL
                        )))
                    }
                }
                // Loading can take a while; a child may say it is alive meanwhile.
                Some(Ok(Frame {
                    header: FromChild::Heartbeat { .. } | FromChild::Progress { .. }, ..
                })) => continue,
                Some(Ok(frame)) => Err(Some(format!("sent {} before ready", frame.header.kind()))),
                Some(Err(FrameError::Truncated(_))) | None => {
                    Err(Some(format!("{} before ready{}", self.describe_end().await, self.tail())))
                }
                Some(Err(e)) => Err(Some(format!("sent a {e}{}", self.tail()))),
            };
        }
    }

    /// What became of a child whose stdout ended: its exit status if it exits shortly.
    async fn describe_end(&mut self) -> String {
        match tokio::time::timeout(EXIT_GRACE, self.child.wait()).await {
            Ok(Ok(status)) => describe_status(status),
            _ => "closed its stdout".to_owned(),
        }
    }

    /// `; stderr: ...`, the end of what the child wrote there.
    fn tail(&self) -> String {
        self.stderr.lock().unwrap_or_else(|e| e.into_inner()).describe()
    }

    fn warn(&self, problem: &str) {
        warn!(task_type = %self.task_type, slot = self.slot, pid = self.pid, problem, "prover process restarts");
    }

    /// SIGKILL to the group, and reap the child.
    async fn kill(&mut self) {
        self.group.kill(&mut self.child);
        // SIGKILL cannot be ignored; the timeout is only a guard.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.child.wait()).await;
        self.io.abort_all();
    }

    /// `shutdown`, EOF on stdin, `grace` to exit, then SIGKILL to what is left of the group.
    async fn shut_down(mut self, grace: Duration) {
        self.send(ToChild::Shutdown.encode());
        self.to_child = None;
        let status: Option<ExitStatus> =
            tokio::time::timeout(grace, self.child.wait()).await.ok().and_then(Result::ok);
        match status {
            Some(status) => debug!(task_type = %self.task_type, slot = self.slot, pid = self.pid,
                                   status = %describe_status(status), "prover process stopped"),
            None => warn!(task_type = %self.task_type, slot = self.slot, pid = self.pid,
                          grace_ms = grace.as_millis() as u64, "prover process did not exit after shutdown; killed"),
        }
        self.kill().await;
    }
}

/// `deadline` as a tokio instant.
fn instant_of(deadline: SystemTime) -> tokio::time::Instant {
    tokio::time::Instant::now() + deadline.duration_since(SystemTime::now()).unwrap_or_default()
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_backoff_doubles_and_is_capped() {
        let mut cfg = PersistentConfig::new("prove", ["prover"]);
        cfg.restart_backoff_base = Duration::from_millis(100);
        cfg.restart_backoff_max = Duration::from_secs(1);
        let delays: Vec<u128> = (0..7).map(|n| cfg.restart_delay(n).as_millis()).collect();
        assert_eq!(delays, [0, 100, 200, 400, 800, 1000, 1000]);
        assert_eq!(cfg.restart_delay(u32::MAX), Duration::from_secs(1));
    }

    #[tokio::test]
    async fn a_config_that_cannot_work_is_refused() {
        let e = Persistent::start(PersistentConfig::new("prove", Vec::<String>::new())).unwrap_err();
        assert!(matches!(e, Error::Config(ref m) if m.contains("no command")), "{e:?}");
        let mut cfg = PersistentConfig::new("prove", ["cat"]);
        cfg.processes = 0;
        let e = Persistent::start(cfg).unwrap_err();
        assert!(matches!(e, Error::Config(ref m) if m.contains("at least 1")), "{e:?}");
        let e = Persistent::start(PersistentConfig::new("prove", ["/nonexistent/prover"])).unwrap_err();
        assert!(matches!(e, Error::Spawn { .. }), "{e:?}");
        assert!(e.to_string().starts_with("prover process /nonexistent/prover: "), "{e}");
    }
}
