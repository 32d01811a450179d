//! The client side: submit tasks (one, a batch, a job), read and list them, cancel them, watch
//! one until it ends, read a job, list the workers and their statistics.

use chrono::{DateTime, Utc};
use tokio::sync::broadcast;
use tracing::{info, warn};

use super::{Core, CoreError, Updates, effects::Effects, stored_text};
use crate::{
    domain::{
        Attempt, AttemptRecord, Job, JobId, NewJob, NewTask, Task, TaskId, TaskState, Waiting, WorkerId,
        WorkerRecord, WorkerState, WorkerStats,
    },
    events::ANY_TASK,
    fleet::FleetView,
    store::{Cancelled, TaskFilter},
};

/// Cancellation reasons are cut to this many bytes.
const MAX_REASON_LEN: usize = 1024;

/// A task as shown to clients: pending ones say why they wait.
#[derive(Debug, Clone, PartialEq)]
pub struct Shown {
    pub task: Task,
    pub waiting: Option<Waiting>,
    /// Every attempt, oldest first, when they were asked for; else empty.
    pub attempts: Vec<AttemptRecord>,
    /// Its parents in the order it named them, each with its state (`None`: pruned); read for
    /// one task ([`Client::get_task`]), else empty.
    pub parents: Vec<(TaskId, Option<TaskState>)>,
}

/// One submitted task.
#[derive(Debug, Clone, PartialEq)]
pub struct SubmittedTask {
    pub task: Task,
    /// False when an existing task with the same idempotency key was returned.
    pub created: bool,
    pub waiting: Option<Waiting>,
}

/// The answer to a submission.
#[derive(Debug, Clone, PartialEq)]
pub struct Submitted {
    /// In the order submitted.
    pub tasks: Vec<SubmittedTask>,
    /// One per type no live worker declared.
    pub warnings: Vec<String>,
}

/// The answer to a job submission.
#[derive(Debug, Clone, PartialEq)]
pub struct SubmittedJob {
    pub job: Job,
    /// In the order submitted.
    pub task_ids: Vec<TaskId>,
    pub warnings: Vec<String>,
    /// The idempotency key named a job made earlier (returned as it is now): nothing was created.
    pub existing: bool,
}

/// A change a `WatchTask` stream shows.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskUpdate {
    /// The task as it is now.
    Changed(Box<Shown>),
    /// The current attempt started on its worker: shown late, when the watch would otherwise
    /// go from assigned to the attempt's end.
    Started { task_id: TaskId, attempt: Attempt, worker_id: WorkerId, at: DateTime<Utc> },
}

/// A worker as listed: its record, and its state as this replica sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ListedWorker {
    pub record: WorkerRecord,
    pub state: WorkerState,
    /// It has a task stream open to this replica.
    pub connected: bool,
    /// Its process is connected to another replica, by its row (ACTIVE there).
    pub connected_elsewhere: bool,
    pub last_seen: DateTime<Utc>,
}

/// What a `WatchTask` stream last showed of its task: a new event goes out when this changes.
#[derive(Debug, Clone, PartialEq)]
struct Last {
    state: TaskState,
    attempt: Attempt,
    worker: Option<WorkerId>,
    waiting: Option<Waiting>,
}

impl Last {
    fn of(task: &Task, waiting: &Option<Waiting>) -> Self {
        Self {
            state: task.state,
            attempt: task.attempt,
            worker: task.worker_id.clone(),
            waiting: waiting.clone(),
        }
    }
}

impl Core {
    /// Stores new tasks (a task whose idempotency key is known answers the task it made) and
    /// wakes the scheduler.
    pub async fn submit(&self, tasks: Vec<NewTask>) -> Result<Submitted, CoreError> {
        let (view, warnings) = self.check_types(&tasks).await?;
        let inner = self.inner.clone();
        // Detached: a task assigned as it is stored is pushed (or given back) and the scheduler
        // woken for the others whatever happens to this request.
        let created = Effects::detached(async move {
            let created = match inner.at_submission.get() {
                Some(placer) => placer.create(&tasks).await?,
                None => inner.store.create_tasks(&tasks).await?,
            };
            inner.effects.stored(&created);
            Ok::<_, crate::store::StoreError>(created)
        })
        .await??;
        let waiting = match &view {
            Some(v) => v.waiting_each(created.iter().map(|c| &c.task), Utc::now()),
            None => vec![None; created.len()],
        };
        let tasks = created
            .into_iter()
            .zip(waiting)
            .map(|(c, waiting)| SubmittedTask { task: c.task, created: c.created, waiting })
            .collect();
        Ok(Submitted { tasks, warnings })
    }

    /// Stores a job and its tasks, those a free worker can take now assigned as they are
    /// stored (as [`Core::submit`] does), and wakes the scheduler for the others.
    ///
    /// A job with an idempotency key already used is not made again: the job that key made is
    /// returned (`existing`), whatever the tasks given now. Two submissions with one key at
    /// once, on one replica or two, make one job: the unique key decides in the database, and
    /// the other's transaction, its tasks with it, rolls back.
    pub async fn submit_job(&self, job: NewJob) -> Result<SubmittedJob, CoreError> {
        let NewJob { name, idempotency_key: key, tasks } = job;
        // Before the types are checked: the job made earlier stands, whatever runs now.
        if let Some(key) = &key
            && let Some(id) = self.inner.store.job_by_key(key).await?
        {
            return self.made_earlier(id).await;
        }
        let (_, warnings) = self.check_types(&tasks).await?;
        let inner = self.inner.clone();
        // Detached, as a submission of tasks is.
        let made = Effects::detached(async move {
            let (job, created) = match inner.at_submission.get() {
                Some(placer) => placer.create_job(&name, key.as_deref(), tasks).await?,
                None => inner.store.create_job_keyed(&name, key.as_deref(), tasks).await?,
            };
            inner.effects.stored(&created);
            Ok::<_, crate::store::StoreError>((job, created))
        })
        .await?;
        match made {
            Ok((job, created)) => {
                let task_ids = created.iter().map(|c| c.task.id).collect();
                Ok(SubmittedJob { job, task_ids, warnings, existing: false })
            }
            Err(crate::store::StoreError::JobExists(id)) => self.made_earlier(id).await,
            Err(e) => Err(e.into()),
        }
    }

    /// The answer to a job submission whose idempotency key made job `id` earlier: its tasks in
    /// their order, and no warnings (those were the first answer's).
    async fn made_earlier(&self, id: JobId) -> Result<SubmittedJob, CoreError> {
        // A job is pruned as a whole, with its key; read between the two, it answers as gone.
        let job = self.inner.store.get_job(id).await?.ok_or_else(|| {
            CoreError::Unavailable(format!("job {id} of this idempotency key was just pruned; submit again"))
        })?;
        let task_ids = self.inner.store.job_task_ids(id).await?;
        Ok(SubmittedJob { job, task_ids, warnings: Vec::new(), existing: true })
    }

    /// A task, with its attempt history when `with_attempts`.
    pub async fn get_task(&self, id: TaskId, with_attempts: bool) -> Result<Shown, CoreError> {
        let Some(task) = self.inner.store.get_task(id).await? else {
            return Err(task_not_found(id));
        };
        let mut shown = self.shown(vec![task]).await.remove(0);
        if with_attempts {
            shown.attempts = self.inner.store.attempts(id).await?;
        }
        shown.parents = self.inner.store.parents(id).await?;
        Ok(shown)
    }

    pub async fn list_tasks(&self, filter: &TaskFilter) -> Result<Vec<Shown>, CoreError> {
        let tasks = self.inner.store.list_tasks(filter).await?;
        Ok(self.shown(tasks).await)
    }

    /// Cancels a task; the worker holding it is told to stop. An empty reason says "cancelled
    /// by client".
    pub async fn cancel(&self, id: TaskId, reason: String) -> Result<Cancelled, CoreError> {
        let reason = match stored_text(reason, MAX_REASON_LEN) {
            r if r.is_empty() => "cancelled by client".to_owned(),
            r => r,
        };
        let inner = self.inner.clone();
        // Detached: the effects run whatever happens to this request.
        let cancelled = Effects::detached(async move {
            let r = inner.store.cancel(id, &reason).await;
            if let Ok(Some(c)) = &r {
                inner.effects.cancelled(c);
            }
            r
        })
        .await??;
        cancelled.ok_or_else(|| task_not_found(id))
    }

    /// The task now, then each change until it is terminal (or shutdown begins: the stream
    /// ends with `Unavailable`).
    pub async fn watch(&self, id: TaskId) -> Result<Updates<TaskUpdate>, CoreError> {
        self.refuse_if_closing()?;
        // Subscribe before the first read so no change between the two is missed.
        let mut events = self.inner.events.subscribe();
        let first = self.inner.store.get_task(id).await?.ok_or_else(|| task_not_found(id))?;
        let core = self.clone();
        let stream = async_stream::stream! {
            let inner = &core.inner;
            let waiting = core.waiting(&first).await;
            let mut last = Last::of(&first, &waiting);
            // The attempt whose running state needs no event from this watch: shown, or over
            // before the watch began. `None` while the first attempt seen is still assigned.
            let mut ran = (first.state != TaskState::Assigned).then_some(first.attempt);
            let terminal = first.state.is_terminal();
            yield Ok(TaskUpdate::Changed(Box::new(Shown { task: first, waiting, attempts: Vec::new(), parents: Vec::new() })));
            if terminal {
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
                        yield Err(CoreError::shutting_down());
                        return;
                    }
                    _ = wait => {}
                    _ = tokio::time::sleep(inner.config.watch_poll) => {}
                }
                let task = match inner.store.get_task(id).await {
                    Ok(Some(t)) => t,
                    Ok(None) => {
                        yield Err(task_not_found(id));
                        return;
                    }
                    Err(e) => {
                        yield Err(CoreError::from(e));
                        return;
                    }
                };
                let waiting = core.waiting(&task).await;
                let now = Last::of(&task, &waiting);
                let terminal = task.state.is_terminal();
                if now != last {
                    if ran != Some(task.attempt)
                        && let Some(started) = core.missed_start(&task).await
                    {
                        yield Ok(started);
                    }
                    if ran != Some(task.attempt) && task.state != TaskState::Assigned {
                        ran = Some(task.attempt);
                    }
                    yield Ok(TaskUpdate::Changed(Box::new(Shown { task, waiting, attempts: Vec::new(), parents: Vec::new() })));
                    last = now;
                }
                if terminal {
                    return;
                }
            }
        };
        Ok(Box::pin(stream))
    }

    /// A job, and its tasks when `with_tasks`.
    pub async fn get_job(&self, id: JobId, with_tasks: bool) -> Result<(Job, Vec<Task>), CoreError> {
        let Some(job) = self.inner.store.get_job(id).await? else {
            return Err(CoreError::NotFound(format!("job {id} not found")));
        };
        let tasks = if with_tasks { self.inner.store.job_tasks(id).await? } else { Vec::new() };
        Ok((job, tasks))
    }

    /// Every worker the store knows, with its live state where this replica holds its session.
    pub async fn list_workers(
        &self,
        after: Option<&WorkerId>,
        limit: u32,
    ) -> Result<Vec<ListedWorker>, CoreError> {
        let records = self.inner.store.list_workers(after, limit).await?;
        Ok(records
            .into_iter()
            .map(|w| {
                let live = self.inner.registry.session(&w.id).filter(|s| s.session_id == w.session_id);
                let (state, connected, last_seen) = match &live {
                    Some(s) => (s.state, s.connected, s.last_seen_at),
                    None => (self.derived_state(&w), false, w.last_heartbeat_at),
                };
                let connected_elsewhere = live.is_none()
                    && state == WorkerState::Active
                    && w.connected_to_other_replica(&self.inner.config.coordinator_id);
                ListedWorker { record: w, state, connected, connected_elsewhere, last_seen }
            })
            .collect())
    }

    /// A worker's statistics and state.
    pub async fn worker_stats(&self, id: &WorkerId) -> Result<(WorkerStats, WorkerState), CoreError> {
        let not_found = || CoreError::NotFound(format!("worker {id} not found"));
        let record = self.inner.store.get_worker(id).await?.ok_or_else(not_found)?;
        let stats = self.inner.store.worker_stats(id).await?.ok_or_else(not_found)?;
        let state = match self.inner.registry.session(id).filter(|s| s.session_id == record.session_id) {
            Some(s) => s.state,
            None => self.derived_state(&record),
        };
        Ok((stats, state))
    }

    /// Checks the types of a submission against the live fleet: the warnings to answer with
    /// (one per type no live worker declared), or FAILED_PRECONDITION naming those types when
    /// `reject_unknown_types` is on. Also returns the view, to say why the new tasks wait.
    async fn check_types(&self, tasks: &[NewTask]) -> Result<(Option<FleetView>, Vec<String>), CoreError> {
        let mut types: Vec<&str> = tasks.iter().map(|t| t.task_type.as_str()).collect();
        types.sort_unstable();
        types.dedup();
        let view = match self.inner.fleet.view_for(&types).await {
            Ok(view) => view,
            Err(e) if self.inner.config.reject_unknown_types => return Err(e.into()),
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
            return Err(CoreError::FailedPrecondition(view.refusal(&unknown)));
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

    /// Tasks as shown, each pending one with why it waits (one fleet read for all of them).
    async fn shown(&self, tasks: Vec<Task>) -> Vec<Shown> {
        let view = match tasks.iter().any(|t| t.state == TaskState::Pending) {
            true => self.fleet_view().await,
            false => None,
        };
        let waiting = match view {
            Some(v) => v.waiting_each(&tasks, Utc::now()),
            None => vec![None; tasks.len()],
        };
        tasks
            .into_iter()
            .zip(waiting)
            .map(|(task, waiting)| Shown { task, waiting, attempts: Vec::new(), parents: Vec::new() })
            .collect()
    }

    /// Why `task` waits, if it is pending.
    async fn waiting(&self, task: &Task) -> Option<Waiting> {
        if task.state != TaskState::Pending {
            return None;
        }
        self.fleet_view().await?.waiting(task, Utc::now())
    }

    /// The start of `task`'s current attempt, when a watch that has not shown it is about to
    /// show the attempt's end (the task is terminal, or pending again) and the attempt did start
    /// on its worker: its history row has a start (the delivery mark, a lease renewal, or the
    /// worker's own report). A fast task goes assigned -> completed in the database before the
    /// batched running mark is written; its watchers still see it run. An attempt that never
    /// reached its worker (cancelled or requeued while assigned) has no start, and no event.
    async fn missed_start(&self, task: &Task) -> Option<TaskUpdate> {
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
        let at = a.started_at?;
        Some(TaskUpdate::Started { task_id: task.id, attempt: a.attempt, worker_id: a.worker_id, at })
    }

    /// The state shown for a worker this replica has no session for: its row's while its
    /// replica is seen, else derived from its last heartbeat, so a worker whose coordinator
    /// died does not look ACTIVE forever.
    pub(super) fn derived_state(&self, w: &WorkerRecord) -> WorkerState {
        let timeout = self.inner.config.heartbeat_timeout;
        let ago = |t: DateTime<Utc>| (Utc::now() - t).to_std().unwrap_or_default();
        // While its replica is seen, the row is current: that replica writes each state change
        // (heartbeats themselves reach the database about once a minute).
        if w.state == WorkerState::Dead || w.owner_seen_at.is_some_and(|t| ago(t) <= timeout * 3) {
            return w.state;
        }
        let silent = ago(w.last_heartbeat_at);
        if silent > timeout * 3 {
            WorkerState::Dead
        } else if silent > timeout && w.state != WorkerState::Draining {
            WorkerState::Suspect
        } else {
            w.state
        }
    }
}

pub(super) fn task_not_found(id: TaskId) -> CoreError {
    CoreError::NotFound(format!("task {id} not found"))
}
