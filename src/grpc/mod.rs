//! The gRPC service: thin handlers over the store, registry and scheduler. Validation and
//! wire conversions live in [`convert`], error mapping in [`status`], call metrics in [`layer`].

pub mod auth;
pub mod codec;
pub mod convert;
pub mod layer;
pub mod serve;
pub mod status;

use std::{collections::HashSet, pin::Pin, sync::Arc, time::Duration};

use chrono::Utc;
use futures::Stream;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::{
    batch::Batcher,
    domain::{Attempt, NewTask, Task, TaskState, Waiting, WorkerId, WorkerState},
    effects::{Effects, Reported},
    events::{ANY_TASK, Events},
    fleet::{Fleet, FleetView},
    proto::{self, coordinator_service_server::CoordinatorService},
    registry::{Push, Registry},
    store::{
        Completion, Failure, Held, Holding, ReportOutcome, RetryPolicy, Store, TaskFilter, WorkerRegistration,
    },
};
use convert::SubmitLimits;

/// Settings the handlers need.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub coordinator_id: String,
    pub heartbeat_timeout: Duration,
    pub retry: RetryPolicy,
    pub limits: SubmitLimits,
    /// How often a `WatchTask` stream re-reads its task when no local event arrives (changes
    /// made through another replica, and a new reason a pending task waits).
    pub watch_poll: Duration,
    /// Refuse a submission of a type no live worker declared (`tasks.reject_unknown_types`);
    /// otherwise it is accepted with a warning.
    pub reject_unknown_types: bool,
}

/// The batched store writes the handlers share; the app spawns their loops and waits for them
/// at shutdown.
#[derive(Debug, Clone)]
pub struct Batchers {
    /// Completions in, their outcomes out; the batch loop applies each one's effects after the
    /// commit, whatever became of the request that sent it.
    pub completions: Batcher<Completion, ReportOutcome>,
    /// One heartbeat's running tasks in, the ones still held out.
    pub renewals: Batcher<Vec<Held>, Vec<Held>>,
    /// Assignments that left on a stream, and when: assigned -> running, a little later.
    pub deliveries: Batcher<(Held, std::time::Instant), ()>,
}

/// The `CoordinatorService` implementation. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: ServiceConfig,
    store: Store,
    registry: Registry,
    effects: Effects,
    events: Events,
    batchers: Batchers,
    /// What the live workers run, across replicas.
    fleet: Fleet,
    /// Cancelled when shutdown begins: open streams end with `Unavailable` and new
    /// registrations and streams are refused.
    closing: CancellationToken,
}

impl Service {
    pub fn new(
        config: ServiceConfig,
        store: Store,
        registry: Registry,
        effects: Effects,
        events: Events,
        batchers: Batchers,
        closing: CancellationToken,
    ) -> Self {
        let fleet = Fleet::new(store.clone(), registry.clone(), config.heartbeat_timeout);
        Self { inner: Arc::new(Inner { config, store, registry, effects, events, batchers, fleet, closing }) }
    }

    /// When the reported attempt reached its worker: this replica's own record of the delivery,
    /// else the worker's word (`held_ms`), so a report through another replica before the
    /// delivering one's running mark lands still measures from the delivery.
    fn delivered(&self, held: &Held, held_ms: u64) -> Option<std::time::Instant> {
        self.inner
            .registry
            .delivered_at(&held.worker_id, held.task_id, held.attempt)
            .or_else(|| convert::held_since(held_ms))
    }

    /// Checks the types of a submission against the live fleet: the warnings to answer with
    /// (one per type no live worker declared), or FAILED_PRECONDITION naming those types when
    /// `reject_unknown_types` is on. Also returns the view, to say why the new tasks wait.
    async fn check_types(&self, tasks: &[NewTask]) -> Result<(Option<FleetView>, Vec<String>), Status> {
        let mut types: Vec<&str> = tasks.iter().map(|t| t.task_type.as_str()).collect();
        types.sort_unstable();
        types.dedup();
        let view = match self.inner.fleet.view_for(&types).await {
            Ok(view) => view,
            Err(e) if self.inner.config.reject_unknown_types => return Err(status::store(e)),
            // The submission itself says whether the database is there; a warning is advice.
            Err(error) => {
                warn!(%error, "cannot read the live workers; submission not checked against them");
                return Ok((None, Vec::new()));
            }
        };
        let unknown: Vec<&str> = types.into_iter().filter(|t| !view.runs(t)).collect();
        if unknown.is_empty() {
            return Ok((Some(view), Vec::new()));
        }
        if self.inner.config.reject_unknown_types {
            return Err(Status::failed_precondition(view.refusal(&unknown)));
        }
        info!(task_types = ?unknown, "task type submitted that no live worker runs; its tasks wait");
        let warnings = unknown.iter().map(|t| view.unknown_type_warning(t)).collect();
        Ok((Some(view), warnings))
    }

    /// The fleet as now, to say why pending tasks wait; `None` (no reasons given) when the
    /// database cannot be read: reading a task does not fail for that.
    async fn fleet_view(&self) -> Option<FleetView> {
        match self.inner.fleet.view().await {
            Ok(view) => Some(view),
            Err(error) => {
                warn!(%error, "cannot read the live workers; pending tasks are shown without a reason");
                None
            }
        }
    }

    /// Tasks on the wire, each pending one with why it waits (one fleet read for all of them).
    async fn tasks_out(&self, tasks: Vec<Task>) -> Vec<proto::Task> {
        let view = match tasks.iter().any(|t| t.state == TaskState::Pending) {
            true => self.fleet_view().await,
            false => None,
        };
        let waiting = match view {
            Some(v) => v.waiting_each(&tasks, Utc::now()),
            None => vec![None; tasks.len()],
        };
        tasks.into_iter().zip(waiting).map(|(t, w)| convert::waiting_task(t, w)).collect()
    }

    fn refuse_if_closing(&self) -> Result<(), Status> {
        if self.inner.closing.is_cancelled() { Err(status::shutting_down()) } else { Ok(()) }
    }

    /// The state shown for a worker this replica has no session for, derived from its last
    /// heartbeat, so a worker whose coordinator died does not look ACTIVE forever.
    fn derived_state(&self, recorded: WorkerState, last_heartbeat: chrono::DateTime<Utc>) -> WorkerState {
        let silent = (Utc::now() - last_heartbeat).to_std().unwrap_or_default();
        let timeout = self.inner.config.heartbeat_timeout;
        if recorded == WorkerState::Dead || silent > timeout * 3 {
            WorkerState::Dead
        } else if silent > timeout && recorded != WorkerState::Draining {
            WorkerState::Suspect
        } else {
            recorded
        }
    }

    /// The answer to a report (its effects already ran): success for the first and for a
    /// repeat of it, otherwise the status saying why nothing changed.
    fn answer_report(held: &Held, outcome: ReportOutcome) -> Result<Response<proto::ReportResponse>, Status> {
        let (duplicate, state) = match outcome {
            ReportOutcome::Applied { state } => (false, state),
            ReportOutcome::Duplicate { state } => (true, state),
            ReportOutcome::Stale { state, attempt } => return Err(stale(held, state, attempt)),
            ReportOutcome::NotFound => {
                return Err(Status::not_found(format!("task {} not found", held.task_id)));
            }
        };
        Ok(Response::new(proto::ReportResponse { duplicate, status: convert::task_state(state) as i32 }))
    }
}

/// What a `WatchTask` stream last showed of its task: a new event goes out when this changes.
#[derive(Debug, Clone, PartialEq)]
struct Shown {
    state: TaskState,
    attempt: Attempt,
    worker: Option<WorkerId>,
    waiting: Option<Waiting>,
}

impl Shown {
    fn of(task: &Task, waiting: &Option<Waiting>) -> Self {
        Self {
            state: task.state,
            attempt: task.attempt,
            worker: task.worker_id.clone(),
            waiting: waiting.clone(),
        }
    }
}

impl Service {
    /// Why `task` waits, if it is pending.
    async fn waiting(&self, task: &Task) -> Option<Waiting> {
        if task.state != TaskState::Pending {
            return None;
        }
        self.fleet_view().await?.waiting(task, Utc::now())
    }

    /// The `running` event of `task`'s current attempt, when a watch that has not shown it is
    /// about to show the attempt's end (the task is terminal, or pending again) and the attempt
    /// did start on its worker: its history row has a start (the delivery mark, a lease
    /// renewal, or the worker's own report). A fast task goes assigned -> completed in the
    /// database before the batched running mark is written; its watchers still see it run. An
    /// attempt that never reached its worker (cancelled or requeued while assigned) has no
    /// start, and no running event.
    async fn missed_running(&self, task: &Task) -> Option<proto::TaskEvent> {
        let ended = task.state.is_terminal() || task.state == TaskState::Pending;
        if task.attempt == 0 || !ended {
            return None;
        }
        let attempts = match self.inner.store.attempts(task.id).await {
            Ok(a) => a,
            Err(error) => {
                warn!(%error, task_id = %task.id, "cannot read the attempts of a watched task");
                return None;
            }
        };
        let a = attempts.into_iter().find(|a| a.attempt == task.attempt)?;
        let started = a.started_at?;
        Some(proto::TaskEvent {
            task_id: task.id.to_string(),
            status: proto::TaskStatus::Running as i32,
            attempt: a.attempt,
            worker_id: a.worker_id.0,
            at: Some(convert::timestamp(started)),
            ..Default::default()
        })
    }
}

fn held(worker_id: &str, task_id: &str, attempt: u32) -> Result<Held, Status> {
    Ok(Held {
        worker_id: convert::worker_id("worker_id", worker_id)?,
        task_id: convert::task_id("task_id", task_id)?,
        attempt: convert::attempt("attempt", attempt)?,
    })
}

fn stale(h: &Held, state: TaskState, current: Attempt) -> Status {
    Status::failed_precondition(format!(
        "task {} attempt {} is not held by worker {} (the task is {state} at attempt {current}); \
         the result was not recorded",
        h.task_id, h.attempt, h.worker_id
    ))
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Owns a task stream's receiver. When the stream goes away (worker gone, replaced, shutdown),
/// it detaches from the registry and puts assignments that never left back to pending.
struct StreamGuard {
    service: Service,
    worker: WorkerId,
    stream_id: u64,
    /// The registry's session holds the sender.
    rx: mpsc::Receiver<Push>,
    /// Assignments taken off the channel after this stream was replaced: requeued on drop.
    replaced: Vec<Held>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let inner = &self.service.inner;
        inner.registry.detach(&self.worker, self.stream_id);
        self.rx.close();
        let mut undelivered = std::mem::take(&mut self.replaced);
        while let Ok(push) = self.rx.try_recv() {
            if let Push::Run(a) = push {
                inner.registry.release(&a.worker_id, a.task_id, a.attempt);
                undelivered.push(Held { task_id: a.task_id, worker_id: a.worker_id, attempt: a.attempt });
            }
        }
        info!(worker_id = %self.worker, undelivered = undelivered.len(), "task stream closed");
        if undelivered.is_empty() {
            return;
        }
        let service = self.service.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let inner = &service.inner;
                match inner.store.requeue_undelivered(&undelivered).await {
                    Ok(requeued) => inner.effects.requeued(&requeued),
                    // The reconciliation finds them and tries again.
                    Err(error) => {
                        warn!(%error, "failed to requeue undelivered assignments");
                        inner.registry.request_reconcile();
                    }
                }
            });
        }
    }
}

#[tonic::async_trait]
impl CoordinatorService for Service {
    async fn register_worker(
        &self,
        request: Request<proto::RegisterWorkerRequest>,
    ) -> Result<Response<proto::RegisterWorkerResponse>, Status> {
        self.refuse_if_closing()?;
        auth::caller(&request).may_act_for(&request.get_ref().worker_id)?;
        let req = request.into_inner();
        let id = convert::worker_id("worker_id", &req.worker_id)?;
        let max = match req.max_concurrent_tasks {
            0 => 1,
            n if n > convert::MAX_CONCURRENT_TASKS => {
                return Err(status::invalid(
                    "max_concurrent_tasks",
                    format!("must be at most {}", convert::MAX_CONCURRENT_TASKS),
                ));
            }
            n => n,
        };
        if req.capabilities.len() > convert::MAX_CAPABILITIES {
            return Err(status::invalid("capabilities", format!("more than {}", convert::MAX_CAPABILITIES)));
        }
        let mut capabilities = Vec::with_capacity(req.capabilities.len());
        for (i, c) in req.capabilities.iter().enumerate() {
            capabilities.push(convert::task_type(&format!("capabilities[{i}]"), c)?);
        }
        capabilities.sort();
        capabilities.dedup();
        if req.labels.len() > convert::MAX_LABELS
            || req
                .labels
                .iter()
                .any(|(k, v)| k.len() > convert::MAX_LABEL_LEN || v.len() > convert::MAX_LABEL_LEN)
        {
            return Err(status::invalid(
                "labels",
                format!(
                    "at most {} labels of at most {} bytes each",
                    convert::MAX_LABELS,
                    convert::MAX_LABEL_LEN
                ),
            ));
        }
        if req.version.len() > convert::MAX_LABEL_LEN || req.hostname.len() > convert::MAX_LABEL_LEN {
            return Err(status::invalid("version", "version and hostname are at most 256 bytes"));
        }
        if req.instance_id.len() > convert::MAX_LABEL_LEN {
            return Err(status::invalid("instance_id", "is at most 256 bytes"));
        }
        let holding = if req.instance_id.is_empty() {
            None
        } else {
            Some(Holding {
                instance: req.instance_id,
                running: convert::running_tasks("running_tasks", &req.running_tasks)?,
            })
        };
        let reg = WorkerRegistration {
            id: id.clone(),
            max_concurrent_tasks: max,
            capabilities,
            labels: req.labels.into_iter().collect(),
            version: req.version,
            hostname: req.hostname,
            session_id: Uuid::now_v7(),
            coordinator_id: self.inner.config.coordinator_id.clone(),
            holding,
        };
        // Detached: tasks given back by the registration get their effects whatever happens to
        // this request.
        let inner = self.inner.clone();
        let registered = Effects::detached(async move {
            let registered = inner.registry.register(reg).await?;
            inner.effects.requeued(&registered.requeued);
            Ok::<_, crate::store::StoreError>(registered)
        })
        .await
        .map_err(|_| status::internal_error())?
        .map_err(status::store)?;
        if !registered.requeued.is_empty() {
            info!(worker_id = %id, count = registered.requeued.len(), reason = registered.requeued[0].reason.as_str(),
                  "gave back tasks the worker does not hold");
        }
        info!(worker_id = %id, session_id = %registered.session_id, max_concurrent_tasks = max,
              held = registered.held.len(), "worker registered");
        Ok(Response::new(proto::RegisterWorkerResponse {
            worker_id: id.0,
            session_id: registered.session_id.to_string(),
            heartbeat_interval_ms: (self.inner.config.heartbeat_timeout / 3).as_millis() as u64,
            coordinator_id: self.inner.config.coordinator_id.clone(),
        }))
    }

    async fn send_heartbeat(
        &self,
        request: Request<proto::HeartbeatRequest>,
    ) -> Result<Response<proto::HeartbeatResponse>, Status> {
        auth::caller(&request).may_act_for(&request.get_ref().worker_id)?;
        let req = request.into_inner();
        let worker = convert::worker_id("worker_id", &req.worker_id)?;
        let reported: Vec<Held> = convert::running_tasks("running_tasks", &req.running_tasks)?
            .into_iter()
            .map(|(task_id, attempt)| Held { task_id, worker_id: worker.clone(), attempt })
            .collect();
        let state = self.inner.registry.heartbeat(&worker).await.map_err(status::registry)?;
        let renewed: HashSet<Held> = if reported.is_empty() {
            HashSet::new()
        } else {
            self.inner
                .batchers
                .renewals
                .call(reported.clone())
                .await
                .map_err(status::batch)?
                .into_iter()
                .collect()
        };
        // Attempt-exact: a stale attempt is revoked, the current attempt of the same task is not.
        let revoked: Vec<Held> = reported.into_iter().filter(|h| !renewed.contains(h)).collect();
        self.inner.registry.forget_revoked(&worker, &revoked);
        if !revoked.is_empty() {
            debug!(worker_id = %worker, count = revoked.len(), "heartbeat reported tasks it no longer holds");
        }
        Ok(Response::new(proto::HeartbeatResponse {
            state: convert::worker_state(state) as i32,
            revoked_task_ids: revoked.iter().map(|h| h.task_id.to_string()).collect(),
            revoked: revoked
                .iter()
                .map(|h| proto::RunningTask { task_id: h.task_id.to_string(), attempt: h.attempt })
                .collect(),
        }))
    }

    type ReceiveTasksStream = BoxStream<proto::TaskAssignment>;

    async fn receive_tasks(
        &self,
        request: Request<proto::ReceiveTasksRequest>,
    ) -> Result<Response<Self::ReceiveTasksStream>, Status> {
        self.refuse_if_closing()?;
        auth::caller(&request).may_act_for(&request.get_ref().worker_id)?;
        let worker = convert::worker_id("worker_id", &request.get_ref().worker_id)?;
        let (stream_id, rx) = self.inner.registry.attach(&worker).map_err(status::registry)?;
        info!(worker_id = %worker, stream_id, "task stream opened");
        let mut guard = StreamGuard { service: self.clone(), worker, stream_id, rx, replaced: Vec::new() };
        let closing = self.inner.closing.clone();
        // The connection reached its maximum age and was sent GOAWAY: the stream ends cleanly
        // (status OK) and the worker opens a new one on a new connection, so connections
        // rebalance across replicas without cutting a push in half.
        let draining = serve::ConnectionDraining::of(&request);
        let stream = async_stream::stream! {
            loop {
                let push = tokio::select! {
                    biased;
                    _ = closing.cancelled() => {
                        yield Err(status::shutting_down());
                        break;
                    }
                    _ = draining.cancelled() => {
                        debug!(worker_id = %guard.worker, "task stream ends: its connection reached its maximum age");
                        break;
                    }
                    push = guard.rx.recv() => push,
                };
                // None: a newer stream replaced this one, or the worker was declared dead.
                let Some(push) = push else { break };
                // Replaced while this push waited: it goes back to the queue (in the guard's
                // drop) rather than down a stream the worker has given up on.
                if !guard.service.inner.registry.is_current_stream(&guard.worker, guard.stream_id) {
                    if let Push::Run(a) = push {
                        guard.service.inner.registry.release(&a.worker_id, a.task_id, a.attempt);
                        guard.replaced.push(Held { task_id: a.task_id, worker_id: a.worker_id, attempt: a.attempt });
                    }
                    break;
                }
                if let Push::Run(a) = &push {
                    let held = Held { task_id: a.task_id, worker_id: a.worker_id.clone(), attempt: a.attempt };
                    // Best effort: when the queue is full the task shows `running` from its
                    // first heartbeat instead; the stream never waits on bookkeeping.
                    let at = guard.service.inner.registry.delivered(&a.worker_id, a.task_id, a.attempt);
                    guard.service.inner.batchers.deliveries.try_send((held, at));
                }
                yield Ok(proto::TaskAssignment::from(push));
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }

    async fn report_completion(
        &self,
        request: Request<proto::ReportCompletionRequest>,
    ) -> Result<Response<proto::ReportResponse>, Status> {
        auth::caller(&request).may_act_for(&request.get_ref().worker_id)?;
        let req = request.into_inner();
        let held = held(&req.worker_id, &req.task_id, req.attempt)?;
        let outcome = self
            .inner
            .batchers
            .completions
            .call(Completion {
                delivered: self.delivered(&held, req.held_ms),
                held: held.clone(),
                result: req.result,
            })
            .await
            .map_err(status::batch)?;
        if matches!(outcome, ReportOutcome::Applied { .. }) {
            debug!(task_id = %held.task_id, worker_id = %held.worker_id, attempt = held.attempt, "task completed");
        }
        Self::answer_report(&held, outcome)
    }

    async fn report_failure(
        &self,
        request: Request<proto::ReportFailureRequest>,
    ) -> Result<Response<proto::ReportResponse>, Status> {
        auth::caller(&request).may_act_for(&request.get_ref().worker_id)?;
        let req = request.into_inner();
        let held = held(&req.worker_id, &req.task_id, req.attempt)?;
        let inner = self.inner.clone();
        if req.release {
            // Handed back unfinished by a draining worker: not charged.
            let h = held.clone();
            let requeued = Effects::detached(async move {
                let r = inner.store.requeue_released(std::slice::from_ref(&h)).await;
                match &r {
                    Ok(requeued) if requeued.is_empty() => inner.effects.not_held(&h),
                    Ok(requeued) => inner.effects.requeued(requeued),
                    Err(_) => {}
                }
                r
            })
            .await
            .map_err(|_| status::internal_error())?
            .map_err(status::store)?;
            if requeued.is_empty() {
                let task = self.inner.store.get_task(held.task_id).await.map_err(status::store)?;
                return match task {
                    None => Err(Status::not_found(format!("task {} not found", held.task_id))),
                    Some(t) => Err(stale(&held, t.state, t.attempt)),
                };
            }
            info!(task_id = %held.task_id, worker_id = %held.worker_id, attempt = held.attempt, "task handed back by a draining worker");
            return Ok(Response::new(proto::ReportResponse {
                duplicate: false,
                status: convert::task_state(requeued[0].state) as i32,
            }));
        }
        let failure = Failure {
            held: held.clone(),
            error: truncate(req.error, convert::MAX_ERROR_LEN),
            retriable: req.retriable,
            delivered: self.delivered(&held, req.held_ms),
        };
        let retry = self.inner.config.retry;
        let outcome = Effects::detached(async move {
            let r = inner.store.fail(&failure, retry).await;
            if let Ok(outcome) = &r {
                inner.effects.reported(&failure.held, outcome, Reported::Failed);
                if let ReportOutcome::Applied { state } = outcome {
                    info!(task_id = %failure.held.task_id, worker_id = %failure.held.worker_id,
                          attempt = failure.held.attempt, retriable = failure.retriable, next = %state,
                          error = %failure.error, "task attempt failed");
                }
            }
            r
        })
        .await
        .map_err(|_| status::internal_error())?
        .map_err(status::store)?;
        Self::answer_report(&held, outcome)
    }

    async fn deregister(
        &self,
        request: Request<proto::DeregisterRequest>,
    ) -> Result<Response<proto::DeregisterResponse>, Status> {
        auth::caller(&request).may_act_for(&request.get_ref().worker_id)?;
        let req = request.into_inner();
        let worker = convert::worker_id("worker_id", &req.worker_id)?;
        let in_flight = self.inner.registry.deregister(&worker).await.map_err(status::registry)?;
        info!(worker_id = %worker, in_flight, reason = %truncate(req.reason, 256), "worker deregistered");
        Ok(Response::new(proto::DeregisterResponse { in_flight }))
    }

    async fn submit_task(
        &self,
        request: Request<proto::SubmitTaskRequest>,
    ) -> Result<Response<proto::SubmitTaskResponse>, Status> {
        let task = convert::new_task("", request.into_inner(), &self.inner.config.limits)?;
        let (view, warnings) = self.check_types(std::slice::from_ref(&task)).await?;
        let created = self.inner.store.create_tasks(&[task]).await.map_err(status::store)?;
        let c = created.into_iter().next().ok_or_else(status::internal_error)?;
        self.inner.effects.submitted(usize::from(c.created));
        let waiting = view.as_ref().and_then(|v| v.waiting(&c.task, Utc::now()));
        Ok(Response::new(proto::SubmitTaskResponse {
            task_id: c.task.id.to_string(),
            created: c.created,
            task: Some(convert::waiting_task(c.task, waiting)),
            warnings,
        }))
    }

    async fn submit_tasks(
        &self,
        request: Request<proto::SubmitTasksRequest>,
    ) -> Result<Response<proto::SubmitTasksResponse>, Status> {
        let req = request.into_inner();
        if req.tasks.is_empty() || req.tasks.len() > convert::MAX_BATCH {
            return Err(status::invalid("tasks", format!("must hold 1 to {} tasks", convert::MAX_BATCH)));
        }
        let tasks = req
            .tasks
            .into_iter()
            .enumerate()
            .map(|(i, t)| convert::new_task(&format!("tasks[{i}]."), t, &self.inner.config.limits))
            .collect::<Result<Vec<_>, _>>()?;
        let (view, warnings) = self.check_types(&tasks).await?;
        let created = self.inner.store.create_tasks(&tasks).await.map_err(status::store)?;
        self.inner.effects.submitted(created.iter().filter(|c| c.created).count());
        let waiting = match &view {
            Some(v) => v.waiting_each(created.iter().map(|c| &c.task), Utc::now()),
            None => vec![None; created.len()],
        };
        Ok(Response::new(proto::SubmitTasksResponse {
            results: created
                .into_iter()
                .zip(waiting)
                .map(|(c, waiting)| proto::SubmitTaskResponse {
                    task_id: c.task.id.to_string(),
                    created: c.created,
                    task: Some(convert::waiting_task(c.task, waiting)),
                    warnings: Vec::new(),
                })
                .collect(),
            warnings,
        }))
    }

    async fn get_task(
        &self,
        request: Request<proto::GetTaskRequest>,
    ) -> Result<Response<proto::Task>, Status> {
        let id = convert::task_id("task_id", &request.get_ref().task_id)?;
        match self.inner.store.get_task(id).await.map_err(status::store)? {
            Some(t) => Ok(Response::new(self.tasks_out(vec![t]).await.remove(0))),
            None => Err(Status::not_found(format!("task {id} not found"))),
        }
    }

    async fn list_tasks(
        &self,
        request: Request<proto::ListTasksRequest>,
    ) -> Result<Response<proto::ListTasksResponse>, Status> {
        let req = request.into_inner();
        let limit = match req.page_size {
            0 => convert::DEFAULT_PAGE_SIZE,
            n if n > convert::MAX_PAGE_SIZE => {
                return Err(status::invalid(
                    "page_size",
                    format!("must be at most {}", convert::MAX_PAGE_SIZE),
                ));
            }
            n => n,
        };
        let filter = TaskFilter {
            state: convert::task_state_filter("status", req.status)?,
            task_type: (!req.task_type.is_empty())
                .then(|| convert::task_type("task_type", &req.task_type))
                .transpose()?,
            job_id: (!req.job_id.is_empty()).then(|| convert::job_id("job_id", &req.job_id)).transpose()?,
            worker_id: (!req.worker_id.is_empty())
                .then(|| convert::worker_id("worker_id", &req.worker_id))
                .transpose()?,
            after: (!req.page_token.is_empty())
                .then(|| convert::task_id("page_token", &req.page_token))
                .transpose()?,
            limit,
        };
        let tasks = self.inner.store.list_tasks(&filter).await.map_err(status::store)?;
        let next_page_token = if tasks.len() as u32 == limit {
            tasks.last().map(|t| t.id.to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(proto::ListTasksResponse { tasks: self.tasks_out(tasks).await, next_page_token }))
    }

    async fn cancel_task(
        &self,
        request: Request<proto::CancelTaskRequest>,
    ) -> Result<Response<proto::CancelTaskResponse>, Status> {
        let req = request.into_inner();
        let id = convert::task_id("task_id", &req.task_id)?;
        let reason = match truncate(req.reason, 1024) {
            r if r.is_empty() => "cancelled by client".to_owned(),
            r => r,
        };
        let inner = self.inner.clone();
        let cancelled = Effects::detached(async move {
            let r = inner.store.cancel(id, &reason).await;
            if let Ok(Some(c)) = &r {
                inner.effects.cancelled(c);
            }
            r
        })
        .await
        .map_err(|_| status::internal_error())?;
        let Some(c) = cancelled.map_err(status::store)? else {
            return Err(Status::not_found(format!("task {id} not found")));
        };
        Ok(Response::new(proto::CancelTaskResponse { cancelled: c.applied, task: Some(c.task.into()) }))
    }

    type WatchTaskStream = BoxStream<proto::TaskEvent>;

    async fn watch_task(
        &self,
        request: Request<proto::WatchTaskRequest>,
    ) -> Result<Response<Self::WatchTaskStream>, Status> {
        self.refuse_if_closing()?;
        let id = convert::task_id("task_id", &request.get_ref().task_id)?;
        // Subscribe before the first read so no change between the two is missed.
        let mut events = self.inner.events.subscribe();
        let first = self.inner.store.get_task(id).await.map_err(status::store)?;
        let Some(first) = first else {
            return Err(Status::not_found(format!("task {id} not found")));
        };
        let service = self.clone();
        let stream = async_stream::stream! {
            let inner = &service.inner;
            let waiting = service.waiting(&first).await;
            let mut last = Shown::of(&first, &waiting);
            // The attempt whose running state needs no event from this watch: shown, or over
            // before the watch began. `None` while the first attempt seen is still assigned.
            let mut ran = (first.state != TaskState::Assigned).then_some(first.attempt);
            yield Ok(convert::waiting_event(&first, waiting.as_ref()));
            if first.state.is_terminal() {
                return;
            }
            loop {
                let wait = async {
                    loop {
                        match events.recv().await {
                            Ok(changed) if changed == id || changed == ANY_TASK => return,
                            Ok(_) => continue,
                            // Missed some: re-read to be safe.
                            Err(broadcast::error::RecvError::Lagged(_)) => return,
                            Err(broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
                        }
                    }
                };
                tokio::select! {
                    biased;
                    _ = inner.closing.cancelled() => {
                        yield Err(status::shutting_down());
                        return;
                    }
                    _ = wait => {}
                    _ = tokio::time::sleep(inner.config.watch_poll) => {}
                }
                let task = match inner.store.get_task(id).await {
                    Ok(Some(t)) => t,
                    Ok(None) => {
                        yield Err(Status::not_found(format!("task {id} not found")));
                        return;
                    }
                    Err(e) => {
                        yield Err(status::store(e));
                        return;
                    }
                };
                let waiting = service.waiting(&task).await;
                let now = Shown::of(&task, &waiting);
                if now != last {
                    if ran != Some(task.attempt)
                        && let Some(running) = service.missed_running(&task).await
                    {
                        yield Ok(running);
                    }
                    if ran != Some(task.attempt) && task.state != TaskState::Assigned {
                        ran = Some(task.attempt);
                    }
                    yield Ok(convert::waiting_event(&task, waiting.as_ref()));
                    last = now;
                }
                if task.state.is_terminal() {
                    return;
                }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }

    async fn submit_job(
        &self,
        request: Request<proto::SubmitJobRequest>,
    ) -> Result<Response<proto::SubmitJobResponse>, Status> {
        let req = request.into_inner();
        if req.tasks.is_empty() || req.tasks.len() > convert::MAX_BATCH {
            return Err(status::invalid("tasks", format!("must hold 1 to {} tasks", convert::MAX_BATCH)));
        }
        if req.name.len() > convert::MAX_LABEL_LEN {
            return Err(status::invalid("name", format!("longer than {} bytes", convert::MAX_LABEL_LEN)));
        }
        let tasks = req
            .tasks
            .into_iter()
            .enumerate()
            .map(|(i, t)| convert::new_task(&format!("tasks[{i}]."), t, &self.inner.config.limits))
            .collect::<Result<Vec<_>, _>>()?;
        let (_, warnings) = self.check_types(&tasks).await?;
        let (job, created) = self.inner.store.create_job(&req.name, tasks).await.map_err(status::store)?;
        self.inner.effects.submitted(created.iter().filter(|c| c.created).count());
        Ok(Response::new(proto::SubmitJobResponse {
            job_id: job.id.to_string(),
            task_ids: created.iter().map(|c| c.task.id.to_string()).collect(),
            warnings,
        }))
    }

    async fn get_job(&self, request: Request<proto::GetJobRequest>) -> Result<Response<proto::Job>, Status> {
        let req = request.into_inner();
        let id = convert::job_id("job_id", &req.job_id)?;
        let Some(job) = self.inner.store.get_job(id).await.map_err(status::store)? else {
            return Err(Status::not_found(format!("job {id} not found")));
        };
        let results = if req.include_results {
            self.inner
                .store
                .job_tasks(id)
                .await
                .map_err(status::store)?
                .into_iter()
                .map(|t| proto::JobTaskResult {
                    task_id: t.id.to_string(),
                    status: convert::task_state(t.state) as i32,
                    duration_ms: match (t.started_at.or(t.assigned_at), t.finished_at) {
                        (Some(s), Some(f)) => (f - s).num_milliseconds().max(0) as u64,
                        _ => 0,
                    },
                    result: t.result.unwrap_or_default(),
                    error: t.error.unwrap_or_default(),
                    worker_id: t.worker_id.map(|w| w.0).unwrap_or_default(),
                })
                .collect()
        } else {
            Vec::new()
        };
        Ok(Response::new(proto::Job {
            job_id: job.id.to_string(),
            name: job.name.clone(),
            total: job.total,
            pending: job.count(TaskState::Pending),
            assigned: job.count(TaskState::Assigned),
            running: job.count(TaskState::Running),
            completed: job.count(TaskState::Completed),
            failed: job.count(TaskState::Failed),
            cancelled: job.count(TaskState::Cancelled),
            done: job.done(),
            created_at: Some(convert::timestamp(job.created_at)),
            results,
        }))
    }

    async fn list_workers(
        &self,
        _request: Request<proto::ListWorkersRequest>,
    ) -> Result<Response<proto::ListWorkersResponse>, Status> {
        let records = self.inner.store.list_workers().await.map_err(status::store)?;
        let workers = records
            .into_iter()
            .map(|w| {
                let live = self.inner.registry.session(&w.id).filter(|s| s.session_id == w.session_id);
                let (state, connected, last) = match &live {
                    Some(s) => (s.state, s.connected, s.last_seen_at),
                    None => (self.derived_state(w.state, w.last_heartbeat_at), false, w.last_heartbeat_at),
                };
                proto::WorkerInfo {
                    worker_id: w.id.0,
                    state: convert::worker_state(state) as i32,
                    max_concurrent_tasks: w.max_concurrent_tasks,
                    in_flight: w.in_flight,
                    capabilities: w.capabilities,
                    labels: w.labels.into_iter().collect(),
                    version: w.version,
                    hostname: w.hostname,
                    last_heartbeat: Some(convert::timestamp(last)),
                    registered_at: Some(convert::timestamp(w.registered_at)),
                    connected,
                }
            })
            .collect();
        Ok(Response::new(proto::ListWorkersResponse { workers }))
    }

    async fn get_worker_stats(
        &self,
        request: Request<proto::GetWorkerStatsRequest>,
    ) -> Result<Response<proto::WorkerStats>, Status> {
        let id = convert::worker_id("worker_id", &request.get_ref().worker_id)?;
        let Some(record) = self.inner.store.get_worker(&id).await.map_err(status::store)? else {
            return Err(Status::not_found(format!("worker {id} not found")));
        };
        let stats = self
            .inner
            .store
            .worker_stats(&id)
            .await
            .map_err(status::store)?
            .ok_or_else(|| Status::not_found(format!("worker {id} not found")))?;
        let state = match self.inner.registry.session(&id).filter(|s| s.session_id == record.session_id) {
            Some(s) => s.state,
            None => self.derived_state(record.state, record.last_heartbeat_at),
        };
        Ok(Response::new(proto::WorkerStats {
            worker_id: id.0,
            tasks_completed: stats.tasks_completed,
            tasks_failed: stats.tasks_failed,
            total_duration_ms: stats.total_duration.as_millis() as u64,
            mean_duration_ms: stats.mean_duration().as_millis() as u64,
            in_flight: stats.in_flight,
            state: convert::worker_state(state) as i32,
        }))
    }
}
