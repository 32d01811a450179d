//! The worker side: register, heartbeat, hold the task stream, report a completion or a
//! failure (or hand a task back), deregister.

use std::{
    collections::{BTreeMap, HashSet},
    future::Future,
    time::{Duration, Instant},
};

use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use uuid::Uuid;

use super::{
    Core, CoreError, Updates,
    client::task_not_found,
    effects::{Effects, Reported},
    stored_text,
};
use crate::{
    domain::{Attempt, TaskId, TaskState, WorkerId, WorkerState},
    registry::Push,
    store::{Completion, Failure, Held, Holding, ReportOutcome, WorkerRegistration},
};

/// A failure's error text is cut to this many bytes.
pub const MAX_ERROR_LEN: usize = 64 * 1024;
/// A deregistration's reason is cut to this many bytes (for the log).
const MAX_REASON_LEN: usize = 256;
/// Longer than this, a worker's `held_ms` is not believed.
const MAX_HELD: Duration = Duration::from_secs(30 * 24 * 3600);

/// A worker's registration, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    pub id: WorkerId,
    pub max_concurrent_tasks: u32,
    /// Assignments beyond `max_concurrent_tasks` the worker queues.
    pub prefetch: u32,
    /// Sorted, without repeats.
    pub capabilities: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub version: String,
    pub hostname: String,
    /// What the worker holds, when it says so.
    pub holding: Option<Holding>,
}

/// The answer to a registration.
#[derive(Debug, Clone, PartialEq)]
pub struct Joined {
    pub worker_id: WorkerId,
    pub session_id: Uuid,
    /// How often the worker should heartbeat: a third of `heartbeat_timeout`.
    pub heartbeat_interval: Duration,
    pub coordinator_id: String,
}

/// The answer to a heartbeat.
#[derive(Debug, Clone, PartialEq)]
pub struct Beat {
    pub state: WorkerState,
    /// Reported attempts the worker no longer holds: it should stop them.
    pub revoked: Vec<Held>,
}

/// The answer to a report that was accepted (the first one, or a repeat of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    /// A repeat of a report already recorded.
    pub duplicate: bool,
    /// The task's state now.
    pub state: TaskState,
}

impl Core {
    /// Opens a new session for a worker. Tasks the store had for it that it says it does not
    /// hold are given back.
    pub async fn register(&self, r: Registration) -> Result<Joined, CoreError> {
        self.refuse_if_closing()?;
        let id = r.id.clone();
        let max = r.max_concurrent_tasks;
        let reg = WorkerRegistration {
            id: r.id,
            max_concurrent_tasks: r.max_concurrent_tasks,
            prefetch: r.prefetch,
            capabilities: r.capabilities,
            labels: r.labels,
            version: r.version,
            hostname: r.hostname,
            session_id: Uuid::now_v7(),
            coordinator_id: self.inner.config.coordinator_id.clone(),
            holding: r.holding,
        };
        self.refuse_id_in_use(&reg).await?;
        // Detached: tasks given back by the registration get their effects whatever happens to
        // this request.
        let inner = self.inner.clone();
        let registered = Effects::detached(async move {
            let registered = inner.registry.register(reg).await?;
            inner.effects.requeued(&registered.requeued);
            Ok::<_, crate::store::StoreError>(registered)
        })
        .await??;
        self.inner.effects.registered(&id);
        if !registered.requeued.is_empty() {
            info!(worker_id = %id, count = registered.requeued.len(), reason = registered.requeued[0].reason.as_str(),
                  "gave back tasks the worker does not hold");
        }
        info!(worker_id = %id, session_id = %registered.session_id, max_concurrent_tasks = max,
              held = registered.held.len(), "worker registered");
        Ok(Joined {
            worker_id: id,
            session_id: registered.session_id,
            heartbeat_interval: self.inner.config.heartbeat_timeout / 3,
            coordinator_id: self.inner.config.coordinator_id.clone(),
        })
    }

    /// Refuses a registration under the id of a worker whose session is live, from another
    /// host or from another process of the same host: two processes sharing an id would
    /// otherwise replace each other's session in turn, each registration giving back the tasks
    /// the other runs. A restart (the previous process is gone), a reconnect of the same process,
    /// and an id whose session is suspect, dead, draining or gone register as before. Advisory,
    /// not a fence: two registrations at the same moment may both pass, and the next one of the
    /// replaced process is refused.
    ///
    /// - Another host: the row names another hostname and the session is live
    ///   ([`crate::registry::Registry::session_live`]).
    /// - Another process (the registration names its process): this replica streams tasks to
    ///   another process under the id ([`crate::registry::Registry::streamed_by_another_process`]),
    ///   or the row says another process is connected to another live replica (that replica
    ///   clears `connected` when the stream closes). A process that exits closes its connection,
    ///   so a restart finds the stream closed, or retries a moment later.
    async fn refuse_id_in_use(&self, reg: &WorkerRegistration) -> Result<(), CoreError> {
        let instance = reg.holding.as_ref().map(|h| h.instance.as_str());
        if reg.hostname.is_empty() && instance.is_none() {
            return Ok(());
        }
        let me = &self.inner.config.coordinator_id;
        let streamed_here =
            instance.is_some_and(|mine| self.inner.registry.streamed_by_another_process(&reg.id, mine));
        let Some(current) = self.inner.store.get_worker(&reg.id).await? else {
            return match instance {
                Some(mine) if streamed_here => Err(in_use_by_another_process(reg, mine, me)),
                _ => Ok(()),
            };
        };
        let another_host =
            !reg.hostname.is_empty() && !current.hostname.is_empty() && current.hostname != reg.hostname;
        let connected_elsewhere = instance.is_some_and(|mine| {
            current.connected_to_other_replica(me)
                && current.instance.as_deref().is_some_and(|theirs| theirs != mine)
        });
        let live = (another_host || connected_elsewhere) && {
            let active_by_row = self.derived_state(&current) == WorkerState::Active;
            self.inner.registry.session_live(&current, active_by_row)
        };
        match instance {
            _ if another_host && live => {
                warn!(worker_id = %reg.id, hostname = %reg.hostname, live_on = %current.hostname,
                      "refused a registration: the worker id is in use by a live worker on another host");
                Err(CoreError::AlreadyExists(format!(
                    "worker id {} is in use by a live worker on host {}: give each worker its own id",
                    reg.id, current.hostname
                )))
            }
            Some(mine) if streamed_here => Err(in_use_by_another_process(reg, mine, me)),
            Some(mine) if connected_elsewhere && live => {
                Err(in_use_by_another_process(reg, mine, &current.coordinator_id))
            }
            _ => Ok(()),
        }
    }

    /// Marks the worker alive and renews the leases of the attempts it runs; the ones it no
    /// longer holds come back revoked (attempt-exact: a stale attempt is revoked, the current
    /// attempt of the same task is not).
    pub async fn heartbeat(
        &self,
        worker: &WorkerId,
        instance: Option<&str>,
        running: Vec<(TaskId, Attempt)>,
    ) -> Result<Beat, CoreError> {
        let reported: Vec<Held> = running
            .into_iter()
            .map(|(task_id, attempt)| Held { task_id, worker_id: worker.clone(), attempt })
            .collect();
        let state = self.inner.registry.heartbeat(worker, instance).await?;
        // Only leases close to their end are renewed in the database (which also revokes what
        // the worker no longer holds); one this replica granted or renewed more recently has
        // at least a third of its term and three heartbeats left ([`CoreConfig::renew_after`]).
        let due = self.inner.registry.leases_due(worker, reported, self.inner.config.renew_after());
        let renewed: HashSet<Held> = if due.is_empty() {
            HashSet::new()
        } else {
            let asked = Instant::now();
            let renewed = self.inner.batchers.renewals.call(due.clone()).await?;
            self.inner.registry.leases_renewed(worker, &renewed, asked);
            renewed.into_iter().collect()
        };
        let revoked: Vec<Held> = due.into_iter().filter(|h| !renewed.contains(h)).collect();
        self.inner.registry.forget_revoked(worker, &revoked);
        if !revoked.is_empty() {
            debug!(worker_id = %worker, count = revoked.len(), "heartbeat reported tasks it no longer holds");
        }
        Ok(Beat { state, revoked })
    }

    /// The worker's task stream: assignments and cancellations as they come. It ends when a
    /// newer stream replaces it or the worker is declared dead, cleanly when `draining` fires
    /// (the connection reached its maximum age), and with `Unavailable` when shutdown begins.
    /// Assignments that never left go back to pending when it ends.
    ///
    /// `instance`: the process opening it, when it says; another one than the one that
    /// registered the session is refused and the session's stream stays.
    pub fn receive(
        &self,
        worker: WorkerId,
        instance: Option<&str>,
        draining: impl Future<Output = ()> + Send + 'static,
    ) -> Result<Updates<Push>, CoreError> {
        self.refuse_if_closing()?;
        let (stream_id, rx) = self.inner.registry.attach(&worker, instance)?;
        // Best effort, as the mark a closed stream clears, and after it in the same queue.
        let streams = &self.inner.batchers.streams;
        self.inner.registry.reopened(&worker, stream_id, |session| {
            streams.try_send((worker.clone(), session, true));
        });
        info!(worker_id = %worker, stream_id, "task stream opened");
        let mut guard = StreamGuard { core: self.clone(), worker, stream_id, rx, replaced: Vec::new() };
        let closing = self.inner.closing.clone();
        let stream = async_stream::stream! {
            let mut draining = Box::pin(draining);
            loop {
                let push = tokio::select! {
                    biased;
                    _ = closing.cancelled() => {
                        yield Err(CoreError::shutting_down());
                        break;
                    }
                    _ = &mut draining => {
                        debug!(worker_id = %guard.worker, "task stream ends: its connection reached its maximum age");
                        break;
                    }
                    push = guard.rx.recv() => push,
                };
                // None: a newer stream replaced this one, or the worker was declared dead.
                let Some(push) = push else { break };
                let inner = &guard.core.inner;
                // Replaced while this push waited: it goes back to the queue (in the guard's
                // drop) rather than down a stream the worker has given up on.
                if !inner.registry.is_current_stream(&guard.worker, guard.stream_id) {
                    guard.replaced.push(push);
                    break;
                }
                if let Push::Run(a) = &push {
                    let held = Held { task_id: a.task_id, worker_id: a.worker_id.clone(), attempt: a.attempt };
                    // Best effort: when the queue is full the task shows `running` from its
                    // first heartbeat instead; the stream never waits on bookkeeping.
                    let at = inner.registry.delivered(&a.worker_id, a.task_id, a.attempt);
                    inner.batchers.deliveries.try_send((held, at));
                }
                yield Ok(push);
            }
        };
        Ok(Box::pin(stream))
    }

    /// Records a result. The first report of the attempt wins; a repeat of it is accepted as a
    /// duplicate; one for an attempt the worker no longer holds changes nothing.
    pub async fn complete(&self, held: Held, result: Vec<u8>, held_ms: u64) -> Result<Accepted, CoreError> {
        let delivered = self.delivered(&held, held_ms);
        let outcome = self
            .inner
            .batchers
            .completions
            .call(Completion { delivered, held: held.clone(), result })
            .await?;
        if matches!(outcome, ReportOutcome::Applied { .. }) {
            debug!(task_id = %held.task_id, worker_id = %held.worker_id, attempt = held.attempt, "task completed");
        }
        accepted(&held, outcome)
    }

    /// Records a failed attempt: retried after a backoff while attempts are left and it is
    /// retriable, failed otherwise.
    pub async fn fail(
        &self,
        held: Held,
        error: String,
        retriable: bool,
        held_ms: u64,
    ) -> Result<Accepted, CoreError> {
        let failure = Failure {
            delivered: self.delivered(&held, held_ms),
            held: held.clone(),
            error: stored_text(error, MAX_ERROR_LEN),
            retriable,
        };
        let retry = self.inner.config.retry;
        let inner = self.inner.clone();
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
        .await??;
        accepted(&held, outcome)
    }

    /// Takes back a task a draining worker hands back unfinished: not charged. Answers the
    /// task's state now.
    pub async fn release(&self, held: Held) -> Result<TaskState, CoreError> {
        let inner = self.inner.clone();
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
        .await??;
        let Some(first) = requeued.first() else {
            return match self.inner.store.get_task(held.task_id).await? {
                None => Err(task_not_found(held.task_id)),
                Some(t) => Err(stale(&held, t.state, t.attempt)),
            };
        };
        info!(task_id = %held.task_id, worker_id = %held.worker_id, attempt = held.attempt, "task handed back by a draining worker");
        Ok(first.state)
    }

    /// The worker drains: it gets no new work, and answers how many tasks it still runs.
    pub async fn deregister(
        &self,
        worker: &WorkerId,
        instance: Option<&str>,
        reason: String,
    ) -> Result<u32, CoreError> {
        let in_flight = self.inner.registry.deregister(worker, instance).await?;
        info!(worker_id = %worker, in_flight, reason = %stored_text(reason, MAX_REASON_LEN), "worker deregistered");
        Ok(in_flight)
    }

    /// When the reported attempt reached its worker: this replica's own record of the delivery,
    /// else the worker's word (`held_ms`), so a report through another replica before the
    /// delivering one's running mark lands still measures from the delivery.
    fn delivered(&self, held: &Held, held_ms: u64) -> Option<Instant> {
        self.inner
            .registry
            .delivered_at(&held.worker_id, held.task_id, held.attempt)
            .or_else(|| held_since(held_ms))
    }
}

/// The moment a worker received an attempt it says it held for `held_ms`; `None` when it did not
/// say (0) or says more than [`MAX_HELD`].
fn held_since(held_ms: u64) -> Option<Instant> {
    let held = Duration::from_millis(held_ms);
    if held_ms == 0 || held > MAX_HELD {
        return None;
    }
    Instant::now().checked_sub(held)
}

/// The answer to a report (its effects already ran): accepted for the first and for a repeat
/// of it, otherwise the error saying why nothing changed.
fn accepted(held: &Held, outcome: ReportOutcome) -> Result<Accepted, CoreError> {
    match outcome {
        ReportOutcome::Applied { state } => Ok(Accepted { duplicate: false, state }),
        ReportOutcome::Duplicate { state } => Ok(Accepted { duplicate: true, state }),
        ReportOutcome::Stale { state, attempt } => Err(stale(held, state, attempt)),
        ReportOutcome::NotFound => Err(task_not_found(held.task_id)),
    }
}

fn stale(h: &Held, state: TaskState, current: Attempt) -> CoreError {
    CoreError::FailedPrecondition(format!(
        "task {} attempt {} is not held by worker {} (the task is {state} at attempt {current}); \
         the result was not recorded",
        h.task_id, h.attempt, h.worker_id
    ))
}

/// The refusal of a registration naming process `instance` while another process of the same
/// host streams under the id from replica `on`.
fn in_use_by_another_process(reg: &WorkerRegistration, instance: &str, on: &str) -> CoreError {
    warn!(worker_id = %reg.id, hostname = %reg.hostname, instance, connected_to = on,
          "refused a registration: the worker id is in use by another live process");
    let host = if reg.hostname.is_empty() { String::new() } else { format!(" on host {}", reg.hostname) };
    CoreError::AlreadyExists(format!(
        "worker id {} is in use by another live process{host}: give each worker its own id",
        reg.id
    ))
}

/// Owns a task stream's receiver. When the stream goes away (worker gone, replaced, shutdown),
/// it detaches from the registry and puts assignments that never left back to pending.
struct StreamGuard {
    core: Core,
    worker: WorkerId,
    stream_id: u64,
    /// The registry's session holds the sender.
    rx: mpsc::Receiver<Push>,
    /// What was taken off the channel after this stream was replaced: handled on drop with
    /// what is still queued.
    replaced: Vec<Push>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let inner = &self.core.inner;
        // Best effort (the queue may be full): the row says the process is connected until
        // it registers again, is declared suspect, or this replica stops; meanwhile another
        // replica refuses a new process under the id, which retries.
        let streams = &inner.batchers.streams;
        inner.registry.detach(&self.worker, self.stream_id, |session| {
            streams.try_send((self.worker.clone(), session, false));
        });
        self.rx.close();
        let mut left = std::mem::take(&mut self.replaced);
        while let Ok(push) = self.rx.try_recv() {
            left.push(push);
        }
        let runtime = tokio::runtime::Handle::try_current();
        let mut undelivered = Vec::new();
        for push in left {
            match push {
                Push::Run(a) => {
                    inner.registry.release(&a.worker_id, a.task_id, a.attempt);
                    undelivered.push(Held { task_id: a.task_id, worker_id: a.worker_id, attempt: a.attempt });
                }
                // A cancel the worker never read goes down the stream that replaced this one,
                // when there is one here: the worker hears of it now, not at its next
                // heartbeat's answer.
                Push::Cancel { task_id, attempt } if runtime.is_ok() => {
                    inner.registry.push_cancel(&self.worker, task_id, attempt);
                }
                Push::Cancel { .. } => {}
            }
        }
        info!(worker_id = %self.worker, undelivered = undelivered.len(), "task stream closed");
        if undelivered.is_empty() {
            return;
        }
        let core = self.core.clone();
        if let Ok(rt) = runtime {
            rt.spawn(async move {
                let inner = &core.inner;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        core::{CoreConfig, SubmitLimits, batches},
        domain::Wake,
        events::Events,
        registry::{Registry, RegistryConfig},
        store::{
            RetryPolicy,
            testing::{self, TestDb},
        },
        wakeups::Notifier,
    };
    use futures::StreamExt as _;
    use tokio_util::sync::CancellationToken;

    /// A heartbeat timeout of 30 s and a lease of 60 s.
    fn config() -> CoreConfig {
        CoreConfig {
            coordinator_id: "c".into(),
            heartbeat_timeout: Duration::from_secs(30),
            lease: Duration::from_secs(60),
            retry: RetryPolicy { base: Duration::from_secs(1), max: Duration::from_secs(10) },
            limits: SubmitLimits {
                default_max_attempts: 3,
                default_timeout: Duration::from_secs(60),
                max_payload_size: 1024,
            },
            watch_poll: Duration::from_secs(1),
            reject_unknown_types: false,
        }
    }

    /// A lease is renewed with a third of it left, or a heartbeat timeout (three heartbeats)
    /// when that is longer; a lease as short as the heartbeat timeout at every heartbeat.
    #[test]
    fn leases_are_renewed_with_a_third_or_three_heartbeats_left() {
        let renew_after = |lease: u64, heartbeat_timeout: u64| {
            let config = CoreConfig {
                heartbeat_timeout: Duration::from_secs(heartbeat_timeout),
                lease: Duration::from_secs(lease),
                ..config()
            };
            config.renew_after().as_secs()
        };
        assert_eq!(renew_after(300, 30), 200, "the defaults: a third of the lease left");
        assert_eq!(renew_after(60, 30), 30, "three heartbeats left, more than a third");
        assert_eq!(renew_after(30, 30), 0, "as short as the heartbeat timeout: every heartbeat");
        assert_eq!(renew_after(3600, 30), 2400);
    }

    /// A core on `store` (its registry, batchers and effects), and worker `w1` of one slot
    /// registered on it.
    async fn core_with_a_worker(store: &crate::store::Store) -> (Core, Registry, WorkerId, Joined) {
        let wake = Wake::default();
        let (registry, _dead) = Registry::new(RegistryConfig::for_tests(), store.clone(), wake.clone());
        let effects = Effects::new(registry.clone(), wake, Events::new(), Notifier::disabled());
        let (batchers, _handles) = batches::spawn(store, Duration::from_secs(60), &effects, None);
        let core = Core::new(
            config(),
            store.clone(),
            registry.clone(),
            effects,
            Events::new(),
            batchers,
            CancellationToken::new(),
        );
        let worker = WorkerId::from("w1");
        let joined = core
            .register(Registration {
                id: worker.clone(),
                max_concurrent_tasks: 1,
                prefetch: 0,
                capabilities: vec!["prove".into()],
                labels: BTreeMap::new(),
                version: String::new(),
                hostname: String::new(),
                holding: None,
            })
            .await
            .unwrap();
        (core, registry, worker, joined)
    }

    /// A cancel still queued on a task stream when the worker opens a new one goes down the new
    /// one: before, it was dropped with the old stream, and the worker ran the cancelled task
    /// on until its next heartbeat's answer revoked it.
    #[tokio::test]
    async fn a_cancel_queued_on_a_replaced_stream_goes_down_the_new_one() {
        let db = TestDb::sqlite().await;
        let (core, registry, worker, _) = core_with_a_worker(&db.store).await;
        let first = core.receive(worker.clone(), None, std::future::pending()).unwrap();
        let task = TaskId::new();
        assert!(registry.push_cancel(&worker, task, 3), "queued on the first stream");
        let mut second = core.receive(worker.clone(), None, std::future::pending()).unwrap();
        drop(first);
        let next = tokio::time::timeout(Duration::from_secs(2), second.next()).await;
        match next {
            Ok(Some(Ok(Push::Cancel { task_id, attempt }))) => assert_eq!((task_id, attempt), (task, 3)),
            other => panic!("the cancel on the new stream: {other:?}"),
        }
        db.cleanup().await;
    }

    /// Acceptance is exactly-once, straight through the core: the first report of the attempt
    /// wins, a repeat is a duplicate, and a report for an attempt the worker does not hold
    /// changes nothing and says why.
    #[tokio::test]
    async fn the_first_report_wins_a_repeat_is_a_duplicate_and_a_stale_one_is_refused() {
        let db = TestDb::sqlite().await;
        let store = db.store.clone();
        let (core, _registry, worker, joined) = core_with_a_worker(&store).await;
        assert_eq!(joined.heartbeat_interval, Duration::from_secs(10));
        let submitted = core.submit(vec![testing::new_task("prove")]).await.unwrap();
        assert!(submitted.tasks[0].created && submitted.warnings.is_empty());
        let a = testing::claim_one(&store, &worker).await.remove(0);
        let held = Held { task_id: a.task_id, worker_id: worker.clone(), attempt: a.attempt };

        let stale = Held { attempt: held.attempt + 1, ..held.clone() };
        let e = core.complete(stale, b"early".to_vec(), 0).await.unwrap_err();
        assert!(matches!(e, CoreError::FailedPrecondition(_)), "{e:?}");
        let first = core.complete(held.clone(), b"ok".to_vec(), 0).await.unwrap();
        assert_eq!(first, Accepted { duplicate: false, state: TaskState::Completed });
        let again = core.complete(held.clone(), b"ok".to_vec(), 0).await.unwrap();
        assert_eq!(again, Accepted { duplicate: true, state: TaskState::Completed });
        assert_eq!(
            core.get_task(held.task_id, false).await.unwrap().task.result.as_deref(),
            Some(&b"ok"[..])
        );
        db.cleanup().await;
    }
}
