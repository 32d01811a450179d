//! The worker runtime: registers with a coordinator, holds the `ReceiveTasks` stream, runs tasks
//! through a [`Handler`] (at most `max_concurrent` at once), heartbeats with the tasks it holds,
//! and reports each result with the attempt it was given.
//!
//! It survives the coordinator: on a dropped stream or a coordinator restart it reconnects with
//! exponential backoff and full jitter, registers again under the same id and carries on with
//! its running tasks; a result it could not deliver is retried until the coordinator accepts or
//! refuses it, so a finished proof is never thrown away. A stream that ends while heartbeats
//! still succeed is reopened. On shutdown it deregisters (drain), lets running tasks finish
//! within a grace period, reports them, and gives back what did not finish.

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use tokio::{sync::Semaphore, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};
use tracing::{Instrument as _, debug, error, info, warn};

use crate::{Error, proto};

/// How a worker connects and behaves.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// `http://host:9090` (or `https://` with TLS).
    pub endpoint: String,
    pub worker_id: String,
    pub max_concurrent: u32,
    /// Assignments to hold beyond `max_concurrent`, queued here and started as slots free, so
    /// a slot's next task is already here when it reports the last one. They are leased like
    /// any assignment and handed back, uncharged, when the worker drains; a queued task's
    /// deadline runs while it waits. For short tasks; leave 0 for long ones (provers).
    pub prefetch: u32,
    /// Task types this worker runs; empty means any.
    pub capabilities: Vec<String>,
    pub labels: HashMap<String, String>,
    /// Overrides the interval the coordinator asks for.
    pub heartbeat_interval: Option<Duration>,
    /// Reconnect backoff: full jitter over `base * 2^n`, capped at `max`.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// How long running tasks may take to finish after shutdown begins.
    pub drain_grace: Duration,
    /// gRPC message limit, both ways.
    pub max_message_size: usize,
    /// Token and TLS towards the coordinator.
    pub security: ClientSecurity,
    /// The machine's name, sent at registration (default: this host's). While a worker's
    /// session is live, the coordinator refuses its id to a registration from another host (and
    /// from another process of the same host while the first is connected).
    pub hostname: String,
}

impl WorkerOptions {
    pub fn new(endpoint: impl Into<String>, worker_id: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            worker_id: worker_id.into(),
            max_concurrent: 1,
            prefetch: 0,
            capabilities: Vec::new(),
            labels: HashMap::new(),
            heartbeat_interval: None,
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            drain_grace: Duration::from_secs(30),
            max_message_size: crate::client::DEFAULT_MAX_MESSAGE,
            security: ClientSecurity::default(),
            hostname: hostname(),
        }
    }
}

/// A task as the handler sees it.
#[derive(Debug, Clone)]
pub struct TaskContext {
    pub task_id: String,
    pub task_type: String,
    pub payload: Vec<u8>,
    pub attempt: u32,
    pub deadline: Option<SystemTime>,
    /// Cancelled when the coordinator cancels the task or it is revoked; handlers that run
    /// long should watch it (the worker also stops waiting for them).
    pub cancelled: CancellationToken,
    /// The results of the task's parents (its `depends_on`), in the order it named them.
    pub parents: Vec<ParentResult>,
}

/// A parent task's result, as the assignment carried it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentResult {
    pub task_id: String,
    /// `None` when the parents' results together were too large for one assignment: read this
    /// one with `GetTask`.
    pub result: Option<Vec<u8>>,
}

/// Why a task failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskFailure {
    pub message: String,
    /// Retriable failures go back to the queue (with backoff) while attempts remain.
    pub retriable: bool,
}

impl TaskFailure {
    pub fn retriable(message: impl Into<String>) -> Self {
        Self { message: message.into(), retriable: true }
    }

    pub fn permanent(message: impl Into<String>) -> Self {
        Self { message: message.into(), retriable: false }
    }
}

/// Runs tasks.
#[tonic::async_trait]
pub trait Handler: Send + Sync + 'static {
    async fn run(&self, task: TaskContext) -> Result<Vec<u8>, TaskFailure>;
}

/// A [`Handler`] from an async closure.
pub fn handler_fn<F, Fut>(f: F) -> Arc<dyn Handler>
where
    F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<u8>, TaskFailure>> + Send + 'static,
{
    struct FnHandler<F>(F);
    #[tonic::async_trait]
    impl<F, Fut> Handler for FnHandler<F>
    where
        F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<u8>, TaskFailure>> + Send + 'static,
    {
        async fn run(&self, task: TaskContext) -> Result<Vec<u8>, TaskFailure> {
            (self.0)(task).await
        }
    }
    Arc::new(FnHandler(f))
}

/// A coordinator that answered but refused the worker: a mistake in its settings, which a
/// retry alone does not fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// No token, or one the coordinator does not know.
    Unauthenticated,
    /// A token of another role (a client's), or one that names another worker.
    PermissionDenied,
    /// A client certificate issued to another worker id (mTLS).
    CertificateMismatch,
    /// The address is a plain HTTP server: the coordinator's HTTP port, not its gRPC port.
    NotGrpc,
    /// A live worker of another host, or another live process of this one, is registered
    /// under this worker id.
    IdInUse,
}

impl Refusal {
    fn of(status: &Status) -> Option<Self> {
        match status.code() {
            Code::Unauthenticated => Some(Self::Unauthenticated),
            Code::PermissionDenied if status.message().contains("client certificate") => {
                Some(Self::CertificateMismatch)
            }
            Code::PermissionDenied => Some(Self::PermissionDenied),
            Code::AlreadyExists => Some(Self::IdInUse),
            _ if crate::error::is_http_answer(status) => Some(Self::NotGrpc),
            _ => None,
        }
    }

    /// The ceiling of the reconnect backoff after `refusal` (`None`: not a refusal). A refused
    /// id frees the moment the other process exits: it is tried again often enough that a
    /// restart takes over within seconds of that.
    fn retry_max(refusal: Option<Self>, backoff_max: Duration) -> Duration {
        match refusal {
            Some(Self::IdInUse) => backoff_max.min(ID_IN_USE_RETRY_MAX),
            _ => backoff_max,
        }
    }

    fn what(self) -> &'static str {
        match self {
            Self::Unauthenticated => {
                "the coordinator refused the worker's token: set one of its worker tokens (WORKER_TOKEN or --token-file)"
            }
            Self::PermissionDenied => {
                "the coordinator refused the worker's token for this worker: it needs a token of the worker role that may act as this worker id"
            }
            Self::CertificateMismatch => {
                "the coordinator refused the worker's client certificate: it is issued to another name than this worker id (WORKER_ID or --worker-id)"
            }
            Self::NotGrpc => {
                "the coordinator address is not its gRPC port (coordinator.grpc_port, default 9090)"
            }
            Self::IdInUse => {
                "another live worker is registered under this worker id: give each worker its own id (WORKER_ID or --worker-id)"
            }
        }
    }
}

/// Full-jitter exponential backoff: a random delay in `[0, min(max, base * 2^n)]`.
pub fn backoff(base: Duration, max: Duration, n: u32) -> Duration {
    let ceiling = base.saturating_mul(1u32 << n.min(20)).min(max);
    ceiling.mul_f64(rand::random::<f64>())
}

/// The longest wait between registrations refused because another live process holds the
/// worker id ([`Refusal::IdInUse`]).
const ID_IN_USE_RETRY_MAX: Duration = Duration::from_secs(5);

/// A session that had its task stream open at least this long counts as a success: the failure
/// that ends it starts the backoff over. Long enough that a coordinator that crashes a few
/// seconds after each start is retried less and less often, like one that refuses.
const SESSION_HELD: Duration = Duration::from_secs(10);

/// Failed connection attempts in a row, the exponent of the reconnect [`backoff`]. A session
/// that registered and held its stream ends the run of failures, so a coordinator that goes
/// away after serving (a replica restarted in a rollout) is left for another at once, whatever
/// happened before; a coordinator that keeps refusing, or drops every stream at once, is
/// retried less and less often.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Failures(u32);

impl Failures {
    /// After a session that failed; `held`: how long its task stream was open (None: it never
    /// opened). Returns the number of failures in a row, the one just counted included.
    fn failed(&mut self, held: Option<Duration>) -> u32 {
        self.0 = if held.is_some_and(|d| d >= SESSION_HELD) { 1 } else { self.0.saturating_add(1) };
        self.0
    }

    /// After a session that ended cleanly.
    fn ended_cleanly(&mut self) {
        self.0 = 0;
    }
}

/// A session that ended in an error, and how long its task stream was open before it did.
#[derive(Debug)]
struct SessionError {
    status: Status,
    held: Option<Duration>,
}

impl From<Status> for SessionError {
    /// An error before the task stream opened.
    fn from(status: Status) -> Self {
        SessionError { status, held: None }
    }
}

use crate::{
    client::{Client, ClientSecurity},
    report::Reporter,
};

#[derive(Debug)]
struct Running {
    attempt: u32,
    /// Cancels the handler (client cancel, revoked by the coordinator).
    cancel: CancellationToken,
}

/// What a worker has done, for logs, benchmarks and tests.
#[derive(Debug, Default)]
pub struct WorkerCounters {
    /// Results the coordinator accepted for the first time.
    pub accepted: std::sync::atomic::AtomicU64,
    /// Results the coordinator had already accepted (a retry after a lost answer).
    pub duplicates: std::sync::atomic::AtomicU64,
    /// Results the coordinator refused (the attempt was no longer this worker's).
    pub refused: std::sync::atomic::AtomicU64,
    /// Sessions opened (registrations); more than one means it reconnected.
    pub sessions: std::sync::atomic::AtomicU64,
    /// Task streams that ended with an error (a cut connection, a protocol error, the
    /// coordinator shutting down) rather than cleanly.
    pub stream_errors: std::sync::atomic::AtomicU64,
    /// Connections the coordinator refused for a mistake in the worker's settings (a token it
    /// does not accept, an id another live worker holds); each is retried.
    pub refusals: std::sync::atomic::AtomicU64,
}

/// A worker. [`Worker::run`] drives it until shutdown.
pub struct Worker {
    opts: WorkerOptions,
    handler: Arc<dyn Handler>,
    client: Client,
    /// Successful results on their way, batched while one is in flight.
    reporter: Arc<Reporter<Client>>,
    /// std Mutex: short map operations only, never held across `.await`.
    running: Arc<Mutex<HashMap<String, Running>>>,
    slots: Arc<Semaphore>,
    counters: Arc<WorkerCounters>,
    /// Set once the worker told the coordinator it is draining.
    deregistered: std::sync::atomic::AtomicBool,
    /// The coordinator refused this worker's id (another live worker holds it):
    /// heartbeats under that id would keep the other's session alive, so none go out until a
    /// registration succeeds.
    id_refused: std::sync::atomic::AtomicBool,
    /// A registration of this process was accepted once: from then on it heartbeats (between
    /// sessions too) and deregisters when it stops.
    registered: std::sync::atomic::AtomicBool,
    /// Fires when the drain begins: queued (prefetched) tasks that have not started are handed
    /// back rather than started.
    draining: CancellationToken,
    /// Names this process to the coordinator: a registration from the same instance that does
    /// not list a task means the task never arrived (given back uncharged).
    instance_id: String,
}

/// After deregistering, how long the worker reads what its task stream still sends.
const DRAIN_READ: Duration = Duration::from_secs(5);

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").field("opts", &self.opts).finish_non_exhaustive()
    }
}

/// How a session with the coordinator ended.
enum SessionEnd {
    Shutdown,
    /// Stream ended or the coordinator forgot us: reconnect.
    Reconnect,
}

impl Worker {
    /// A worker for `opts` (the channel connects on first use). Fails only on settings that
    /// cannot work: an address without a scheme, unreadable TLS files, a token that is not ASCII.
    pub fn new(opts: WorkerOptions, handler: Arc<dyn Handler>) -> Result<Self, Error> {
        let client = crate::client::connect_lazy(&opts.endpoint, &opts.security, opts.max_message_size)?;
        let slots = Arc::new(Semaphore::new(opts.max_concurrent.max(1) as usize));
        let reporter = Arc::new(Reporter::new(opts.worker_id.clone(), client.clone(), opts.max_message_size));
        Ok(Self {
            opts,
            handler,
            client,
            reporter,
            running: Arc::default(),
            slots,
            counters: Arc::default(),
            deregistered: Default::default(),
            id_refused: Default::default(),
            registered: Default::default(),
            draining: CancellationToken::new(),
            instance_id: uuid::Uuid::now_v7().to_string(),
        })
    }

    /// [`Worker::running`] as the wire names it.
    fn running_tasks(&self) -> Vec<proto::RunningTask> {
        self.running().into_iter().map(|(task_id, attempt)| proto::RunningTask { task_id, attempt }).collect()
    }

    /// Counters shared with the running worker.
    pub fn counters(&self) -> Arc<WorkerCounters> {
        self.counters.clone()
    }

    /// Ids and attempts of the tasks this worker holds (running or waiting to be reported).
    pub fn running(&self) -> Vec<(String, u32)> {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        running.iter().map(|(id, r)| (id.clone(), r.attempt)).collect()
    }

    /// Runs until `shutdown`, then drains. A coordinator that is down or restarting is not an
    /// error: the worker reconnects with backoff until it is back or `shutdown` fires.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let this = Arc::new(self);
        let mut tasks = JoinSet::new();
        // Until the coordinator says how often it wants heartbeats, send them every second.
        let heartbeat_interval =
            Arc::new(Mutex::new(this.opts.heartbeat_interval.unwrap_or(Duration::from_secs(1))));
        let reregister = Arc::new(tokio::sync::Notify::new());
        // Kicked after every registration: the first heartbeat of a session goes out at once,
        // renewing the leases of tasks carried over from before a reconnect.
        let kick = Arc::new(tokio::sync::Notify::new());
        // Heartbeats run for the whole life of the worker from its first registration (also
        // while draining) so leases of running tasks never lapse.
        let stop_heartbeats = CancellationToken::new();
        let hb = tokio::spawn(this.clone().heartbeats(
            heartbeat_interval.clone(),
            reregister.clone(),
            kick.clone(),
            stop_heartbeats.clone(),
        ));

        let mut failures = Failures::default();
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            match this.session(&mut tasks, &heartbeat_interval, &reregister, &kick, &shutdown).await {
                Ok(SessionEnd::Shutdown) => break,
                Ok(SessionEnd::Reconnect) => failures.ended_cleanly(),
                Err(SessionError { status, held }) => {
                    let failures = failures.failed(held);
                    let refusal = Refusal::of(&status);
                    let max = Refusal::retry_max(refusal, this.opts.backoff_max);
                    let delay = backoff(this.opts.backoff_base, max, failures);
                    let (worker_id, delay_ms) = (&this.opts.worker_id, delay.as_millis() as u64);
                    match refusal {
                        // Retried all the same: a Secret mounted late or a coordinator restarted
                        // with new tokens heals it; meanwhile the line says what to fix.
                        Some(refusal) => {
                            this.counters.refusals.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            if refusal == Refusal::IdInUse {
                                this.id_refused.store(true, std::sync::atomic::Ordering::SeqCst);
                            }
                            error!(worker_id = %worker_id, code = ?status.code(), error = %crate::error::status_line(&status),
                                   attempt = failures, delay_ms, "{}; retrying", refusal.what())
                        }
                        // A replica that served this session and is shutting down (a rollout)
                        // says so: planned, and handled by reconnecting.
                        None if held.is_some()
                            && status.code() == tonic::Code::Unavailable
                            && status.message().contains("shutting down") =>
                        {
                            info!(worker_id = %worker_id, error = %status.message(), attempt = failures, delay_ms,
                                  "task stream ended by the coordinator; reconnecting")
                        }
                        // The error with its causes: tonic's message alone is "tcp connect
                        // error" or "transport error", whatever failed.
                        None => {
                            let line = crate::error::status_line(&status);
                            let hint = match crate::error::scheme_hint(
                                &line,
                                this.opts.endpoint.starts_with("https://"),
                            ) {
                                "" => crate::error::untrusted_hint(&line),
                                hint => hint,
                            };
                            warn!(worker_id = %worker_id, code = ?status.code(), error = %line,
                                      attempt = failures, delay_ms, "coordinator unreachable; reconnecting{hint}")
                        }
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    continue;
                }
            }
            // A clean end (stream closed): reconnect soon, with a little jitter.
            let delay = backoff(this.opts.backoff_base, this.opts.backoff_max, 1);
            info!(worker_id = %this.opts.worker_id, delay_ms = delay.as_millis() as u64, "task stream ended; reconnecting");
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        this.drain(&mut tasks).await;
        stop_heartbeats.cancel();
        let _ = hb.await;
        info!(worker_id = %this.opts.worker_id, "worker stopped");
        Ok(())
    }

    /// Register, open the stream, run what arrives until the stream ends.
    async fn session(
        self: &Arc<Self>,
        tasks: &mut JoinSet<()>,
        heartbeat_interval: &Arc<Mutex<Duration>>,
        reregister: &Arc<tokio::sync::Notify>,
        kick: &Arc<tokio::sync::Notify>,
        shutdown: &CancellationToken,
    ) -> Result<SessionEnd, SessionError> {
        let mut client = self.client.clone();
        let resp = client
            .register_worker(proto::RegisterWorkerRequest {
                worker_id: self.opts.worker_id.clone(),
                max_concurrent_tasks: self.opts.max_concurrent,
                prefetch: self.opts.prefetch,
                capabilities: self.opts.capabilities.clone(),
                labels: self.opts.labels.clone(),
                version: env!("CARGO_PKG_VERSION").into(),
                hostname: self.opts.hostname.clone(),
                // Everything received on earlier streams has been dispatched by now (a session
                // reads its stream to the end before the next registers), so this list is
                // complete: what the coordinator has beyond it never arrived.
                instance_id: self.instance_id.clone(),
                running_tasks: self.running_tasks(),
            })
            .await?
            .into_inner();
        if self.opts.heartbeat_interval.is_none() && resp.heartbeat_interval_ms > 0 {
            *heartbeat_interval.lock().unwrap_or_else(|e| e.into_inner()) =
                Duration::from_millis(resp.heartbeat_interval_ms);
        }
        self.id_refused.store(false, std::sync::atomic::Ordering::SeqCst);
        self.registered.store(true, std::sync::atomic::Ordering::SeqCst);
        let mut stream = client
            .receive_tasks(proto::ReceiveTasksRequest {
                worker_id: self.opts.worker_id.clone(),
                instance_id: self.instance_id.clone(),
            })
            .await?
            .into_inner();
        info!(worker_id = %self.opts.worker_id, coordinator_id = %resp.coordinator_id,
              session_id = %resp.session_id, "registered; task stream open");
        let opened = std::time::Instant::now();
        kick.notify_one();
        self.reporter.registered();
        self.counters.sessions.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        // A heartbeat that reached the coordinator before this registration and was answered
        // "unknown worker" asked for one: it is answered by this registration.
        let _ = futures::FutureExt::now_or_never(reregister.notified());
        loop {
            // Reap finished task runners so the set does not grow.
            while tasks.try_join_next().is_some() {}
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    // Deregister first: no new work. The stream then sends what was already on
                    // its way and ends; read it to the end, so nothing assigned is lost in
                    // transit (those tasks run within the drain's grace period).
                    self.deregister().await;
                    let rest = async {
                        while let Ok(Some(a)) = stream.message().await {
                            self.dispatch(a, tasks);
                        }
                    };
                    if tokio::time::timeout(DRAIN_READ, rest).await.is_err() {
                        debug!(worker_id = %self.opts.worker_id, "task stream did not end after deregistering");
                    }
                    return Ok(SessionEnd::Shutdown);
                }
                _ = reregister.notified() => {
                    info!(worker_id = %self.opts.worker_id, "coordinator does not know this worker; registering again");
                    return Ok(SessionEnd::Reconnect);
                }
                msg = stream.message() => match msg {
                    Ok(Some(a)) => self.dispatch(a, tasks),
                    Ok(None) => return Ok(SessionEnd::Reconnect),
                    Err(status) => {
                        self.counters.stream_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        return Err(SessionError { status, held: Some(opened.elapsed()) });
                    }
                },
            }
        }
    }

    fn dispatch(self: &Arc<Self>, a: proto::TaskAssignment, tasks: &mut JoinSet<()>) {
        let kind = proto::AssignmentKind::try_from(a.kind).unwrap_or(proto::AssignmentKind::Unspecified);
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        match kind {
            proto::AssignmentKind::Cancel => {
                if let Some(r) = running.get(&a.task_id).filter(|r| r.attempt == a.attempt) {
                    info!(worker_id = %self.opts.worker_id, task_id = %a.task_id, attempt = a.attempt, "task cancelled by the coordinator");
                    r.cancel.cancel();
                }
            }
            proto::AssignmentKind::Run => {
                if running.get(&a.task_id).is_some_and(|r| r.attempt >= a.attempt) {
                    debug!(worker_id = %self.opts.worker_id, task_id = %a.task_id, attempt = a.attempt, "duplicate assignment ignored");
                    return;
                }
                if let Some(old) = running.remove(&a.task_id) {
                    old.cancel.cancel();
                }
                let cancel = CancellationToken::new();
                running.insert(a.task_id.clone(), Running { attempt: a.attempt, cancel: cancel.clone() });
                drop(running);
                tasks.spawn(self.clone().execute(a, cancel, std::time::Instant::now()));
            }
            proto::AssignmentKind::Unspecified => {
                warn!(worker_id = %self.opts.worker_id, task_id = %a.task_id, attempt = a.attempt, "assignment of unknown kind ignored")
            }
        }
    }

    /// Runs one task and delivers its result.
    async fn execute(
        self: Arc<Self>,
        a: proto::TaskAssignment,
        cancel: CancellationToken,
        received: std::time::Instant,
    ) {
        // A free slot, or wait in the queue (prefetched) until one frees; a queued task that has
        // not started when the drain begins is handed back at once.
        let permit = match self.slots.clone().try_acquire_owned() {
            Ok(p) => Ok(p),
            Err(_) => tokio::select! {
                biased;
                _ = cancel.cancelled() => {
                    self.forget(&a.task_id, a.attempt);
                    return;
                }
                _ = self.draining.cancelled() => {
                    self.release(&a.task_id, a.attempt, "worker drained before the task started").await;
                    self.forget(&a.task_id, a.attempt);
                    return;
                }
                p = self.slots.clone().acquire_owned() => p,
            },
        };
        let Ok(permit) = permit else { return };
        let deadline = a.deadline.as_ref().and_then(|t| {
            SystemTime::UNIX_EPOCH.checked_add(Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32))
        });
        let ctx = TaskContext {
            task_id: a.task_id.clone(),
            task_type: a.task_type.clone(),
            payload: a.payload,
            attempt: a.attempt,
            deadline,
            cancelled: cancel.clone(),
            parents: a
                .parents
                .into_iter()
                .map(|p| ParentResult { task_id: p.task_id, result: p.included.then_some(p.result) })
                .collect(),
        };
        let time_left = deadline
            .map(|d| d.duration_since(SystemTime::now()).unwrap_or_default())
            .unwrap_or(Duration::from_secs(365 * 24 * 3600));
        let span = tracing::info_span!(
            "handle_task",
            otel.kind = "consumer",
            worker_id = %self.opts.worker_id,
            task_id = %a.task_id,
            task_type = %a.task_type,
            attempt = a.attempt,
        );
        crate::trace::continue_from(&span, &a.traceparent);
        debug!(worker_id = %self.opts.worker_id, task_id = %a.task_id, attempt = a.attempt, task_type = %a.task_type, "task started");
        // Cancellation first: a handler that returns because it was cancelled (revoked,
        // cancelled by a client, or handed back by a drain) must not report that as a result.
        let outcome = tokio::select! {
            biased;
            _ = cancel.cancelled() => {
                self.forget(&a.task_id, a.attempt);
                return;
            }
            r = self.handler.run(ctx).instrument(span.clone()) => r,
            _ = tokio::time::sleep(time_left) => Err(TaskFailure::retriable(format!(
                "deadline exceeded: the task ran past its deadline ({} ms)", time_left.as_millis()))),
        };
        // The slot is free once the handler is done: a queued task starts while this report
        // travels (the coordinator still counts the task until the report lands).
        drop(permit);
        let held_ms = received.elapsed().as_millis() as u64;
        let report =
            tracing::info_span!(parent: &span, "report_task", otel.kind = "client", ok = outcome.is_ok());
        self.deliver(&a.task_id, a.attempt, outcome, held_ms, &cancel).instrument(report).await;
        self.forget(&a.task_id, a.attempt);
    }

    fn forget(&self, task_id: &str, attempt: u32) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if running.get(task_id).is_some_and(|r| r.attempt == attempt) {
            running.remove(task_id);
        }
    }

    /// Sends a result until the coordinator accepts or refuses it.
    async fn deliver(
        &self,
        task_id: &str,
        attempt: u32,
        outcome: Result<Vec<u8>, TaskFailure>,
        held_ms: u64,
        cancel: &CancellationToken,
    ) {
        let mut outcome = oversize_as_failure(outcome, self.opts.max_message_size);
        let mut tries = 0u32;
        loop {
            let sent = match &outcome {
                Ok(result) => self.reporter.complete(task_id, attempt, result.clone(), held_ms).await,
                Err(f) => {
                    let mut client = self.client.clone();
                    client
                        .report_failure(crate::trace::request(
                            &tracing::Span::current(),
                            proto::ReportFailureRequest {
                                worker_id: self.opts.worker_id.clone(),
                                task_id: task_id.to_owned(),
                                attempt,
                                error: f.message.clone(),
                                retriable: f.retriable,
                                release: false,
                                held_ms,
                            },
                        ))
                        .await
                        .map(|resp| resp.into_inner().duplicate)
                }
            };
            match sent {
                Ok(duplicate) => {
                    let counter = if duplicate { &self.counters.duplicates } else { &self.counters.accepted };
                    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    debug!(worker_id = %self.opts.worker_id, task_id, attempt, ok = outcome.is_ok(), duplicate, "result accepted");
                    return;
                }
                // The coordinator's limit is lower than ours: the result can never arrive, so
                // the task fails for good instead of staying held until its lease ends.
                Err(s)
                    if outcome.is_ok() && matches!(s.code(), Code::OutOfRange | Code::ResourceExhausted) =>
                {
                    let size = outcome.as_ref().map(Vec::len).unwrap_or_default();
                    warn!(worker_id = %self.opts.worker_id, task_id, attempt, size, error = %s.message(), "result refused as too large; reporting a failure");
                    outcome = Err(TaskFailure::permanent(format!(
                        "result of {size} bytes refused by the coordinator: {}",
                        s.message()
                    )));
                }
                Err(s) if refused(&s) => {
                    self.counters.refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    warn!(worker_id = %self.opts.worker_id, task_id, attempt, code = ?s.code(), error = %s.message(), "result refused by the coordinator");
                    return;
                }
                Err(s) => {
                    if cancel.is_cancelled() {
                        return;
                    }
                    tries += 1;
                    let delay = backoff(
                        self.opts.backoff_base,
                        self.opts.backoff_max.min(Duration::from_secs(5)),
                        tries,
                    );
                    warn!(worker_id = %self.opts.worker_id, task_id, attempt, code = ?s.code(), error = %s.message(), retry_in_ms = delay.as_millis() as u64,
                          "could not deliver result; keeping it and retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    async fn heartbeats(
        self: Arc<Self>,
        interval: Arc<Mutex<Duration>>,
        reregister: Arc<tokio::sync::Notify>,
        kick: Arc<tokio::sync::Notify>,
        stop: CancellationToken,
    ) {
        loop {
            let every = *interval.lock().unwrap_or_else(|e| e.into_inner());
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
                _ = kick.notified() => {}
            }
            if self.id_refused.load(std::sync::atomic::Ordering::SeqCst) {
                continue;
            }
            // Never registered: no task of this process holds a lease to renew, and the
            // coordinator would only refuse the heartbeat (it knows no such worker, or not the
            // credentials its registration was refused for). After a first session, heartbeats
            // go on between sessions too: they renew the leases of tasks still running.
            if !self.registered.load(std::sync::atomic::Ordering::SeqCst) {
                continue;
            }
            let running_tasks = self.running_tasks();
            let mut client = self.client.clone();
            let req = proto::HeartbeatRequest {
                worker_id: self.opts.worker_id.clone(),
                running_tasks,
                instance_id: self.instance_id.clone(),
            };
            // The registration this heartbeat speaks for: an "unknown worker" answer to it means
            // nothing once the worker has registered again meanwhile.
            let session = self.counters.sessions.load(std::sync::atomic::Ordering::SeqCst);
            match tokio::time::timeout(every.max(Duration::from_secs(1)), client.send_heartbeat(req)).await {
                Ok(Ok(resp)) => {
                    let resp = resp.into_inner();
                    // Attempt-exact: only the attempt named is stopped. A coordinator that
                    // names task ids only is older; what it revokes is what was reported.
                    let revoked: Vec<(String, Option<u32>)> = if resp.revoked.is_empty() {
                        resp.revoked_task_ids.into_iter().map(|id| (id, None)).collect()
                    } else {
                        resp.revoked.into_iter().map(|t| (t.task_id, Some(t.attempt))).collect()
                    };
                    if !revoked.is_empty() {
                        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
                        for (id, attempt) in &revoked {
                            if let Some(r) =
                                running.get(id).filter(|r| attempt.is_none_or(|a| a == r.attempt))
                            {
                                warn!(worker_id = %self.opts.worker_id, task_id = %id, attempt = r.attempt, "task revoked by the coordinator; stopping it");
                                r.cancel.cancel();
                            }
                        }
                    }
                }
                Ok(Err(s)) if s.code() == Code::NotFound => {
                    if self.counters.sessions.load(std::sync::atomic::Ordering::SeqCst) == session {
                        reregister.notify_one();
                    }
                }
                Ok(Err(s)) => debug!(code = ?s.code(), error = %s.message(), "heartbeat failed"),
                Err(_) => debug!("heartbeat timed out"),
            }
        }
    }

    /// Tells the coordinator this worker takes no new work (once).
    async fn deregister(&self) {
        if self.deregistered.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        // Refused its id: the session under it is another worker's (a coordinator that checks
        // the process would refuse the call; an older one would drain that session). Never
        // registered: there is no session of this process to end.
        if self.id_refused.load(std::sync::atomic::Ordering::SeqCst)
            || !self.registered.load(std::sync::atomic::Ordering::SeqCst)
        {
            return;
        }
        let mut client = self.client.clone();
        let req = proto::DeregisterRequest {
            worker_id: self.opts.worker_id.clone(),
            reason: "shutdown".into(),
            instance_id: self.instance_id.clone(),
        };
        match tokio::time::timeout(Duration::from_secs(5), client.deregister(req)).await {
            Ok(Ok(_)) => {}
            Ok(Err(s)) => {
                debug!(worker_id = %self.opts.worker_id, code = ?s.code(), error = %s.message(), "deregister failed")
            }
            Err(_) => debug!(worker_id = %self.opts.worker_id, "deregister timed out"),
        }
    }

    /// Deregisters, lets running tasks finish within the grace period (their results are
    /// delivered), and gives back whatever did not finish.
    async fn drain(&self, tasks: &mut JoinSet<()>) {
        let in_flight = self.running().len();
        info!(worker_id = %self.opts.worker_id, in_flight, "draining");
        self.draining.cancel();
        self.deregister().await;
        let finished =
            tokio::time::timeout(self.opts.drain_grace, async { while tasks.join_next().await.is_some() {} })
                .await;
        if finished.is_ok() {
            return;
        }
        // Out of time: stop what is left and hand it back so another worker takes it now.
        let left: Vec<(String, u32, CancellationToken)> = {
            let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            running.iter().map(|(id, r)| (id.clone(), r.attempt, r.cancel.clone())).collect()
        };
        warn!(worker_id = %self.opts.worker_id, count = left.len(), "grace period over; handing unfinished tasks back");
        for (id, attempt, cancel) in left {
            cancel.cancel();
            self.release(&id, attempt, "worker shut down before the task finished").await;
        }
        tasks.abort_all();
    }

    /// Hands a task back: released, not failed, so the attempt is not charged and the task
    /// runs elsewhere now. Best effort: unanswered, its lease runs out.
    async fn release(&self, task_id: &str, attempt: u32, why: &str) {
        let mut client = self.client.clone();
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            client.report_failure(proto::ReportFailureRequest {
                worker_id: self.opts.worker_id.clone(),
                task_id: task_id.to_owned(),
                attempt,
                error: why.to_owned(),
                retriable: true,
                release: true,
                held_ms: 0,
            }),
        )
        .await;
    }
}

/// Room for the report's other fields and the gRPC framing around a result.
const REPORT_ENVELOPE: usize = 4 * 1024;

/// A result too large to fit in one message becomes a non-retriable failure that says so (a
/// retry would produce the same result).
fn oversize_as_failure(
    outcome: Result<Vec<u8>, TaskFailure>,
    max_message: usize,
) -> Result<Vec<u8>, TaskFailure> {
    match outcome {
        Ok(result) if result.len() + REPORT_ENVELOPE > max_message => Err(TaskFailure::permanent(format!(
            "result of {} bytes exceeds the message limit of {max_message} bytes",
            result.len()
        ))),
        other => other,
    }
}

/// Codes that mean the coordinator will never accept this report: stop retrying.
fn refused(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::FailedPrecondition
            | Code::NotFound
            | Code::InvalidArgument
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::OutOfRange
            | Code::ResourceExhausted
    )
}

/// This machine's name (empty when it cannot be read), sent at registration.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Refusals a retry alone cannot fix are told apart from a coordinator out of reach, each
    /// with what to fix.
    #[test]
    fn refusals_say_what_to_fix() {
        let of = |s: Status| Refusal::of(&s);
        assert_eq!(
            of(Status::unauthenticated("missing authorization header")),
            Some(Refusal::Unauthenticated)
        );
        assert_eq!(of(Status::permission_denied("wrong role")), Some(Refusal::PermissionDenied));
        assert_eq!(
            of(Status::permission_denied("the client certificate is for another worker id")),
            Some(Refusal::CertificateMismatch)
        );
        assert!(Refusal::CertificateMismatch.what().contains("certificate"));
        // What tonic answers when the address is the coordinator's HTTP port.
        let http = Status::internal(
            "protocol error: received message with invalid compression flag: 123 (valid flags are 0 and 1) \
             while receiving response with status: 404 Not Found",
        );
        assert_eq!(of(http), Some(Refusal::NotGrpc));
        assert_eq!(
            of(Status::already_exists("worker id w-1 is in use by a live worker on host gpu-1")),
            Some(Refusal::IdInUse)
        );
        assert!(Refusal::IdInUse.what().contains("WORKER_ID"));
        for transient in [
            Status::unavailable("tcp connect error: Connection refused"),
            Status::internal("h2 protocol error"),
            Status::not_found("unknown worker"),
        ] {
            assert_eq!(of(transient.clone()), None, "{transient:?}");
        }
        assert!(Refusal::Unauthenticated.what().contains("WORKER_TOKEN"));
        assert!(Refusal::PermissionDenied.what().contains("worker role"));
        assert!(Refusal::NotGrpc.what().contains("grpc_port"));
    }

    /// A refused id is tried again within seconds however long it has been refused; other
    /// refusals and outages back off to `backoff_max`.
    #[test]
    fn a_refused_id_is_retried_within_seconds() {
        let max = Duration::from_secs(30);
        assert_eq!(Refusal::retry_max(Some(Refusal::IdInUse), max), ID_IN_USE_RETRY_MAX);
        assert!(ID_IN_USE_RETRY_MAX <= Duration::from_secs(5));
        let short = Duration::from_secs(1);
        assert_eq!(Refusal::retry_max(Some(Refusal::IdInUse), short), short);
        assert_eq!(Refusal::retry_max(Some(Refusal::Unauthenticated), max), max);
        assert_eq!(Refusal::retry_max(None, max), max);
        for n in 0..30 {
            let delay =
                backoff(Duration::from_millis(200), Refusal::retry_max(Some(Refusal::IdInUse), max), n);
            assert!(delay <= ID_IN_USE_RETRY_MAX, "{n}: {delay:?}");
        }
    }

    #[test]
    fn a_session_that_held_its_stream_starts_the_backoff_over() {
        let mut f = Failures::default();
        // Refused or unreachable: each attempt waits longer.
        assert_eq!([f.failed(None), f.failed(None), f.failed(None)], [1, 2, 3]);
        // A stream dropped soon is no success (a coordinator that fails every stream, or
        // crashes a few seconds after each start).
        assert_eq!(f.failed(Some(Duration::from_millis(10))), 4);
        assert_eq!(f.failed(Some(SESSION_HELD - Duration::from_millis(1))), 5);
        // A session that served, then broke (its replica restarted): the next attempt waits as
        // little as the first, whatever came before.
        for _ in 0..10 {
            f.failed(None);
        }
        assert_eq!(f.failed(Some(SESSION_HELD)), 1);
        assert_eq!(f.failed(None), 2);
        f.ended_cleanly();
        assert_eq!(f.failed(None), 1);
    }

    #[test]
    fn backoff_is_jittered_and_capped() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(2);
        for n in 0..30 {
            let d = backoff(base, max, n);
            assert!(d <= max);
            assert!(d <= base * (1 << n.min(20)));
        }
        // Full jitter spreads retries: many draws are not all the same.
        let draws: std::collections::HashSet<u128> =
            (0..50).map(|_| backoff(base, max, 5).as_micros()).collect();
        assert!(draws.len() > 10);
    }

    #[test]
    fn an_oversize_result_becomes_a_permanent_failure() {
        let max = 64 * 1024;
        assert_eq!(oversize_as_failure(Ok(vec![1; 1000]), max).unwrap().len(), 1000);
        let f = oversize_as_failure(Ok(vec![0; max]), max).unwrap_err();
        assert!(!f.retriable);
        assert!(f.message.contains(&format!("exceeds the message limit of {max} bytes")), "{}", f.message);
        let kept = oversize_as_failure(Err(TaskFailure::retriable("x")), max).unwrap_err();
        assert!(kept.retriable);
    }

    #[test]
    fn refusals_stop_retries_and_outages_do_not() {
        assert!(refused(&Status::failed_precondition("stale")));
        assert!(refused(&Status::not_found("gone")));
        assert!(!refused(&Status::unavailable("down")));
        assert!(!refused(&Status::unknown("transport")));
    }
}
