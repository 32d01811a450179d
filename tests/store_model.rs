//! Model-based test of the store: random sequences of operations (submit, claim for one of a few
//! workers, deliver, report completion or failure with the right or a stale attempt, cancel,
//! lease expiry, a dead worker, a worker registering again, release, undelivered) applied to the
//! store and to a small in-memory reference model. After every step each operation's answer and
//! the observable state of every task (status, attempt, worker, attempts used) must match the
//! model.
//!
//! `model::sqlite` runs SQLite against the model. `model::postgres` runs Postgres and SQLite in
//! lockstep against the model, so the two backends also agree with each other; without
//! `TEST_DATABASE_URL` it is reported ignored. Each case gets fresh databases (a fresh Postgres
//! schema), cleaned up whether it passes or fails.

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use coordinator::{
    domain::{Candidate, NewTask, RequeueReason, TaskId, TaskState, WorkerId},
    store::{
        ClaimFilter, Completion, Failure, Held, Holding, Placement, ReportOutcome, Requeued, RetryPolicy,
        Store, TaskFilter, TypeFilter, WorkerRegistration, testing::TestDb,
    },
};
use proptest::{
    prelude::*,
    test_runner::{Config, TestCaseError, TestRunner},
};
use uuid::Uuid;

const WORKERS: [&str; 3] = ["w0", "w1", "w2"];
const TASK_TYPE: &str = "model";
/// Long enough never to lapse within a case.
const LONG_LEASE: Duration = Duration::from_secs(600);
/// Lapsed by the time [`Op::ExpireLeases`] looks.
const SHORT_LEASE: Duration = Duration::from_millis(1);
/// A retried task waits an hour: it stays pending, and no claim in the case may take it.
const RETRY: RetryPolicy = RetryPolicy { base: Duration::from_secs(3600), max: Duration::from_secs(3600) };

/// How a registering worker accounts for its process.
#[derive(Debug, Clone, Copy)]
enum Instance {
    /// Lists nothing: every task the store has for it is adopted.
    Unlisted,
    /// The process that registered last time (tasks it does not list never arrived).
    Same,
    /// A new process (tasks it does not list died with the old one).
    New,
}

#[derive(Debug, Clone)]
enum Op {
    Submit {
        max_attempts: u32,
    },
    /// Claims one task for a worker; under a session that is not the worker's when `stale_session`.
    Claim {
        task: usize,
        worker: usize,
        short_lease: bool,
        stale_session: bool,
    },
    /// Marks the holder's assignment running.
    Deliver {
        task: usize,
    },
    Complete {
        task: usize,
        stale: bool,
    },
    Fail {
        task: usize,
        stale: bool,
        retriable: bool,
    },
    Cancel {
        task: usize,
    },
    /// Waits for short leases to lapse, then requeues expired leases.
    ExpireLeases,
    /// The worker went DEAD under its current session (or, when `stale_session`, another one).
    WorkerDead {
        worker: usize,
        stale_session: bool,
    },
    /// The worker registers again; when it lists its tasks, it keeps those whose bit is set in `keep`.
    Register {
        worker: usize,
        instance: Instance,
        keep: u8,
    },
    Release {
        task: usize,
        stale: bool,
    },
    Undelivered {
        task: usize,
        stale: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let task = 0usize..8;
    let worker = 0usize..WORKERS.len();
    prop_oneof![
        3 => (1u32..=3).prop_map(|max_attempts| Op::Submit { max_attempts }),
        4 => (task.clone(), worker.clone(), any::<bool>(), prop::bool::weighted(0.15)).prop_map(
            |(task, worker, short_lease, stale_session)| Op::Claim { task, worker, short_lease, stale_session }
        ),
        2 => task.clone().prop_map(|task| Op::Deliver { task }),
        3 => (task.clone(), prop::bool::weighted(0.3)).prop_map(|(task, stale)| Op::Complete { task, stale }),
        3 => (task.clone(), prop::bool::weighted(0.3), any::<bool>())
            .prop_map(|(task, stale, retriable)| Op::Fail { task, stale, retriable }),
        1 => task.clone().prop_map(|task| Op::Cancel { task }),
        1 => Just(Op::ExpireLeases),
        1 => (worker.clone(), prop::bool::weighted(0.3))
            .prop_map(|(worker, stale_session)| Op::WorkerDead { worker, stale_session }),
        2 => (
            worker,
            prop_oneof![Just(Instance::Unlisted), Just(Instance::Same), Just(Instance::New)],
            any::<u8>()
        )
            .prop_map(|(worker, instance, keep)| Op::Register { worker, instance, keep }),
        1 => (task.clone(), prop::bool::weighted(0.3)).prop_map(|(task, stale)| Op::Release { task, stale }),
        1 => (task, prop::bool::weighted(0.3)).prop_map(|(task, stale)| Op::Undelivered { task, stale }),
    ]
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(op(), 30)
}

fn w(i: usize) -> WorkerId {
    WorkerId::from(WORKERS[i])
}

// ---- the reference model ----

/// What the test observes of a task.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    state: TaskState,
    attempt: u32,
    worker: Option<WorkerId>,
    failures: u32,
}

#[derive(Debug)]
struct ModelTask {
    id: TaskId,
    max_attempts: u32,
    seen: Seen,
    /// False while a retry waits out its backoff.
    runnable: bool,
    short_lease: bool,
    /// Per attempt (1-based: attempt n is `history[n - 1]`): who held it and how it ended.
    history: Vec<(WorkerId, Option<&'static str>)>,
}

#[derive(Debug, Default)]
struct ModelWorker {
    session: Option<Uuid>,
    /// The process named at the last registration (`None` when it listed nothing).
    instance: Option<String>,
}

#[derive(Debug, Default)]
struct Model {
    tasks: Vec<ModelTask>,
    workers: [ModelWorker; 3],
}

impl Model {
    fn held(&self, i: usize) -> Option<Held> {
        let t = &self.tasks[i];
        match (&t.seen.state, &t.seen.worker) {
            (TaskState::Assigned | TaskState::Running, Some(worker)) => {
                Some(Held { task_id: t.id, worker_id: worker.clone(), attempt: t.seen.attempt })
            }
            _ => None,
        }
    }

    /// The (worker, attempt) a report names: the current holder's, or when `stale` (or nobody
    /// holds the task) an earlier attempt's, from the worker that had it.
    fn fence(&self, i: usize, stale: bool) -> Held {
        if !stale && let Some(h) = self.held(i) {
            return h;
        }
        let t = &self.tasks[i];
        let attempt = if stale { t.seen.attempt.saturating_sub(1) } else { t.seen.attempt };
        let worker_id = match attempt {
            0 => w(0),
            n => t.history[n as usize - 1].0.clone(),
        };
        Held { task_id: t.id, worker_id, attempt }
    }

    /// The answer to a report that matched no held row.
    fn unapplied(&self, i: usize, h: &Held, reported: &str) -> ReportOutcome {
        let t = &self.tasks[i];
        let prior = (h.attempt >= 1).then(|| t.history.get(h.attempt as usize - 1)).flatten();
        match prior {
            Some((worker, Some(outcome))) if *worker == h.worker_id && *outcome == reported => {
                ReportOutcome::Duplicate { state: t.seen.state }
            }
            _ => ReportOutcome::Stale { state: t.seen.state, attempt: t.seen.attempt },
        }
    }

    fn close(&mut self, i: usize, outcome: &'static str) {
        let t = &mut self.tasks[i];
        let entry = &mut t.history[t.seen.attempt as usize - 1];
        if entry.1.is_none() {
            entry.1 = Some(outcome);
        }
    }

    /// A held attempt lost without a report.
    fn lose(&mut self, i: usize, reason: RequeueReason) -> Requeued {
        let held = self.held(i).expect("only held tasks are lost");
        self.close(i, reason.as_str());
        let t = &mut self.tasks[i];
        let charged = matches!(
            reason,
            RequeueReason::LeaseExpired | RequeueReason::WorkerDead | RequeueReason::WorkerRestarted
        );
        t.seen.failures += u32::from(charged);
        t.seen.worker = None;
        t.seen.state = if t.seen.failures >= t.max_attempts { TaskState::Failed } else { TaskState::Pending };
        t.runnable = true;
        Requeued {
            task_id: t.id,
            task_type: TASK_TYPE.into(),
            worker_id: held.worker_id,
            attempt: held.attempt,
            state: t.seen.state,
            reason,
        }
    }

    fn held_by(&self, worker: &WorkerId) -> Vec<usize> {
        (0..self.tasks.len()).filter(|&i| self.held(i).is_some_and(|h| h.worker_id == *worker)).collect()
    }

    fn index(&self, id: TaskId) -> usize {
        self.tasks.iter().position(|t| t.id == id).expect("a task of the model")
    }
}

/// An operation's answer, as comparable values.
#[derive(Debug, Clone, PartialEq)]
enum Answer {
    Nothing,
    Created(bool),
    Assigned(Vec<(TaskId, WorkerId, u32)>),
    Count(u64),
    Report(ReportOutcome),
    Cancelled { applied: bool, held_by: Option<Held>, state: TaskState },
    Requeued(Vec<Requeued>),
    Registered { held: Vec<Held>, requeued: Vec<Requeued> },
}

fn sorted(mut r: Vec<Requeued>) -> Vec<Requeued> {
    r.sort_by_key(|r| r.task_id);
    r
}

/// One operation made concrete for this step: ids, sessions and registrations are chosen once
/// and applied alike to the model and to every backend.
#[derive(Debug, Clone)]
enum Step {
    Nothing,
    Submit(NewTask),
    Claim { id: TaskId, worker: WorkerId, lease: Duration, sessions: HashMap<WorkerId, Uuid> },
    Deliver(Held),
    Complete(Held),
    Fail(Held, bool),
    Cancel(TaskId),
    ExpireLeases,
    WorkerDead(WorkerId, Uuid),
    Register(WorkerRegistration),
    Release(Held),
    Undelivered(Held),
}

impl Model {
    /// Makes `op` concrete for the current state ([`Step::Nothing`] when it names a task and
    /// there is none).
    fn step(&self, op: &Op) -> Step {
        let n = self.tasks.len();
        let task = |t: usize| t % n;
        if n == 0
            && !matches!(
                op,
                Op::Submit { .. } | Op::ExpireLeases | Op::WorkerDead { .. } | Op::Register { .. }
            )
        {
            return Step::Nothing;
        }
        match *op {
            Op::Submit { max_attempts } => Step::Submit(NewTask {
                id: TaskId::new(),
                task_type: TASK_TYPE.into(),
                payload: Vec::new(),
                priority: 0,
                max_attempts,
                timeout: Duration::from_secs(60),
                idempotency_key: None,
                job_id: None,
                run_after: None,
                traceparent: None,
                depends_on: Vec::new(),
                on_parent_failure: Default::default(),
                needs: Default::default(),
            }),
            Op::Claim { task: t, worker, short_lease, stale_session } => {
                let worker = w(worker);
                let current = self.workers[WORKERS.iter().position(|n| *n == worker.0).unwrap()].session;
                let sessions = match (current, stale_session) {
                    (_, true) => HashMap::from([(worker.clone(), Uuid::now_v7())]),
                    (Some(s), false) => HashMap::from([(worker.clone(), s)]),
                    (None, false) => HashMap::new(),
                };
                Step::Claim {
                    id: self.tasks[task(t)].id,
                    worker,
                    lease: if short_lease { SHORT_LEASE } else { LONG_LEASE },
                    sessions,
                }
            }
            Op::Deliver { task: t } => Step::Deliver(self.fence(task(t), false)),
            Op::Complete { task: t, stale } => Step::Complete(self.fence(task(t), stale)),
            Op::Fail { task: t, stale, retriable } => Step::Fail(self.fence(task(t), stale), retriable),
            Op::Cancel { task: t } => Step::Cancel(self.tasks[task(t)].id),
            Op::ExpireLeases => Step::ExpireLeases,
            Op::WorkerDead { worker, stale_session } => {
                let session = match self.workers[worker].session {
                    Some(s) if !stale_session => s,
                    _ => Uuid::now_v7(),
                };
                Step::WorkerDead(w(worker), session)
            }
            Op::Register { worker, instance, keep } => {
                let id = w(worker);
                let running = || {
                    self.held_by(&id)
                        .into_iter()
                        .filter(|&i| keep & (1 << (i % 8)) != 0)
                        .map(|i| (self.tasks[i].id, self.tasks[i].seen.attempt))
                        .collect()
                };
                let holding = match instance {
                    Instance::Unlisted => None,
                    Instance::Same => Some(Holding {
                        instance: self.workers[worker].instance.clone().unwrap_or_else(|| "first".into()),
                        running: running(),
                    }),
                    Instance::New => {
                        Some(Holding { instance: Uuid::now_v7().to_string(), running: running() })
                    }
                };
                Step::Register(WorkerRegistration {
                    id,
                    max_concurrent_tasks: 4,
                    prefetch: 0,
                    capabilities: Vec::new(),
                    labels: BTreeMap::new(),
                    version: String::new(),
                    hostname: String::new(),
                    session_id: Uuid::now_v7(),
                    coordinator_id: "model".into(),
                    holding,
                })
            }
            Op::Release { task: t, stale } => Step::Release(self.fence(task(t), stale)),
            Op::Undelivered { task: t, stale } => Step::Undelivered(self.fence(task(t), stale)),
        }
    }

    /// Applies `step` to the model and returns the answer the store must give.
    fn apply(&mut self, step: &Step) -> Answer {
        match step {
            Step::Nothing => Answer::Nothing,
            Step::Submit(t) => {
                self.tasks.push(ModelTask {
                    id: t.id,
                    max_attempts: t.max_attempts,
                    seen: Seen { state: TaskState::Pending, attempt: 0, worker: None, failures: 0 },
                    runnable: true,
                    short_lease: false,
                    history: Vec::new(),
                });
                Answer::Created(true)
            }
            Step::Claim { id, worker, lease, sessions } => {
                let i = self.index(*id);
                let current = self.workers[WORKERS.iter().position(|n| *n == worker.0).unwrap()].session;
                let fenced_out = sessions.get(worker).is_some_and(|s| Some(*s) != current);
                let t = &mut self.tasks[i];
                if t.seen.state != TaskState::Pending || !t.runnable || fenced_out {
                    return Answer::Assigned(Vec::new());
                }
                t.seen.state = TaskState::Assigned;
                t.seen.attempt += 1;
                t.seen.worker = Some(worker.clone());
                t.short_lease = *lease == SHORT_LEASE;
                t.history.push((worker.clone(), None));
                Answer::Assigned(vec![(*id, worker.clone(), t.seen.attempt)])
            }
            Step::Deliver(h) => {
                let i = self.index(h.task_id);
                if self.held(i).as_ref() == Some(h) && self.tasks[i].seen.state == TaskState::Assigned {
                    self.tasks[i].seen.state = TaskState::Running;
                    Answer::Count(1)
                } else {
                    Answer::Count(0)
                }
            }
            Step::Complete(h) => {
                let i = self.index(h.task_id);
                if self.held(i).as_ref() != Some(h) {
                    return Answer::Report(self.unapplied(i, h, "completed"));
                }
                self.close(i, "completed");
                self.tasks[i].seen.state = TaskState::Completed;
                Answer::Report(ReportOutcome::Applied { state: TaskState::Completed })
            }
            Step::Fail(h, retriable) => {
                let i = self.index(h.task_id);
                if self.held(i).as_ref() != Some(h) {
                    return Answer::Report(self.unapplied(i, h, "failed"));
                }
                self.close(i, "failed");
                let t = &mut self.tasks[i];
                t.seen.failures += 1;
                if *retriable && t.seen.failures < t.max_attempts {
                    t.seen.state = TaskState::Pending;
                    t.seen.worker = None;
                    t.runnable = false;
                } else {
                    t.seen.state = TaskState::Failed;
                }
                Answer::Report(ReportOutcome::Applied { state: t.seen.state })
            }
            Step::Cancel(id) => {
                let i = self.index(*id);
                if self.tasks[i].seen.state.is_terminal() {
                    return Answer::Cancelled {
                        applied: false,
                        held_by: None,
                        state: self.tasks[i].seen.state,
                    };
                }
                let held_by = self.held(i);
                if held_by.is_some() {
                    self.close(i, "cancelled");
                }
                self.tasks[i].seen.state = TaskState::Cancelled;
                Answer::Cancelled { applied: true, held_by, state: TaskState::Cancelled }
            }
            Step::ExpireLeases => {
                let lapsed: Vec<usize> = (0..self.tasks.len())
                    .filter(|&i| self.held(i).is_some() && self.tasks[i].short_lease)
                    .collect();
                Answer::Requeued(sorted(
                    lapsed.into_iter().map(|i| self.lose(i, RequeueReason::LeaseExpired)).collect(),
                ))
            }
            Step::WorkerDead(worker, session) => {
                let k = WORKERS.iter().position(|n| *n == worker.0).unwrap();
                if self.workers[k].session != Some(*session) {
                    return Answer::Requeued(Vec::new());
                }
                let held = self.held_by(worker);
                Answer::Requeued(sorted(
                    held.into_iter().map(|i| self.lose(i, RequeueReason::WorkerDead)).collect(),
                ))
            }
            Step::Register(reg) => {
                let k = WORKERS.iter().position(|n| *n == reg.id.0).unwrap();
                let previous = self.workers[k].instance.take();
                self.workers[k] = ModelWorker {
                    session: Some(reg.session_id),
                    instance: reg.holding.as_ref().map(|h| h.instance.clone()),
                };
                let mut held = Vec::new();
                let mut requeued = Vec::new();
                for i in self.held_by(&reg.id) {
                    let h = self.held(i).expect("held");
                    match &reg.holding {
                        Some(holding) if !holding.running.contains(&(h.task_id, h.attempt)) => {
                            let reason = if previous.as_deref() == Some(holding.instance.as_str()) {
                                RequeueReason::NotReceived
                            } else {
                                RequeueReason::WorkerRestarted
                            };
                            requeued.push(self.lose(i, reason));
                        }
                        _ => held.push(h),
                    }
                }
                held.sort_by_key(|h| h.task_id);
                Answer::Registered { held, requeued: sorted(requeued) }
            }
            Step::Release(h) | Step::Undelivered(h) => {
                let i = self.index(h.task_id);
                let undelivered = matches!(step, Step::Undelivered(_));
                let takes = self.held(i).as_ref() == Some(h)
                    && (!undelivered || self.tasks[i].seen.state == TaskState::Assigned);
                if !takes {
                    return Answer::Requeued(Vec::new());
                }
                let reason = if undelivered { RequeueReason::Undelivered } else { RequeueReason::Released };
                Answer::Requeued(vec![self.lose(i, reason)])
            }
        }
    }

    fn seen(&self) -> BTreeMap<TaskId, Seen> {
        self.tasks.iter().map(|t| (t.id, t.seen.clone())).collect()
    }
}

// ---- the store under test ----

async fn apply(s: &Store, step: &Step) -> coordinator::store::Result<Answer> {
    Ok(match step {
        Step::Nothing => Answer::Nothing,
        Step::Submit(t) => {
            let mut created = s.create_tasks(std::slice::from_ref(t)).await?;
            Answer::Created(created.remove(0).created)
        }
        Step::Claim { id, worker, lease, sessions } => {
            let (id, to) = (*id, worker.clone());
            let assigned = s
                .claim_fenced(
                    1000,
                    &ClaimFilter::types(TypeFilter::Any),
                    *lease,
                    move |c: &[Candidate], _| Placement {
                        placed: c.iter().filter(|c| c.id == id).map(|c| (c.id, to.clone())).collect(),
                        sessions: sessions.clone(),
                    },
                )
                .await?;
            Answer::Assigned(assigned.into_iter().map(|a| (a.task_id, a.worker_id, a.attempt)).collect())
        }
        Step::Deliver(h) => Answer::Count(s.mark_running(std::slice::from_ref(h)).await?),
        Step::Complete(h) => {
            let report = Completion { held: h.clone(), result: b"done".to_vec(), delivered: None };
            Answer::Report(s.complete(&[report]).await?.remove(0))
        }
        Step::Fail(h, retriable) => {
            let report =
                Failure { held: h.clone(), error: "boom".into(), retriable: *retriable, delivered: None };
            Answer::Report(s.fail(&report, RETRY).await?)
        }
        Step::Cancel(id) => {
            let c = s.cancel(*id, "cancelled by the model").await?.expect("the task exists");
            Answer::Cancelled { applied: c.applied, held_by: c.held_by, state: c.task.state }
        }
        Step::ExpireLeases => {
            // The short leases ran out a millisecond after their claim.
            tokio::time::sleep(SHORT_LEASE * 5).await;
            Answer::Requeued(sorted(s.requeue_expired(1000).await?))
        }
        Step::WorkerDead(worker, session) => {
            Answer::Requeued(sorted(s.requeue_worker(worker, *session).await?))
        }
        Step::Register(reg) => {
            let r = s.register_worker(reg).await?;
            Answer::Registered { held: r.held, requeued: sorted(r.requeued) }
        }
        Step::Release(h) => Answer::Requeued(sorted(s.requeue_released(std::slice::from_ref(h)).await?)),
        Step::Undelivered(h) => {
            Answer::Requeued(sorted(s.requeue_undelivered(std::slice::from_ref(h)).await?))
        }
    })
}

async fn seen(s: &Store) -> coordinator::store::Result<BTreeMap<TaskId, Seen>> {
    let tasks = s.list_tasks(&TaskFilter { limit: 10_000, ..TaskFilter::default() }).await?;
    Ok(tasks
        .into_iter()
        .map(|t| {
            let seen = Seen { state: t.state, attempt: t.attempt, worker: t.worker_id, failures: t.failures };
            (t.id, seen)
        })
        .collect())
}

/// Runs `ops` on every backend and the model in lockstep; the first disagreement, with the
/// steps that led to it.
async fn run_ops(stores: &[Store], ops: &[Op]) -> Result<(), String> {
    let mut model = Model::default();
    for (n, op) in ops.iter().enumerate() {
        let step = model.step(op);
        let want = model.apply(&step);
        let want_seen = model.seen();
        for s in stores {
            let b = s.backend();
            let got = apply(s, &step).await.map_err(|e| format!("step {n} {step:?}: {b}: {e}"))?;
            if got != want {
                return Err(format!("step {n} {step:?}: {b} answered\n  {got:?}\nthe model\n  {want:?}"));
            }
            let got_seen = seen(s).await.map_err(|e| format!("step {n}: {b}: list_tasks: {e}"))?;
            if got_seen != want_seen {
                return Err(format!(
                    "after step {n} {step:?}: {b} holds\n  {got_seen:?}\nthe model\n  {want_seen:?}"
                ));
            }
        }
    }
    Ok(())
}

/// Runs the model test: 24 cases of 30 steps, each on fresh databases from `open`.
fn check<F, Fut>(open: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Vec<TestDb>>,
{
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let config = Config { cases: 24, max_shrink_iters: 64, failure_persistence: None, ..Config::default() };
    let mut runner = TestRunner::new(config);
    let result = runner.run(&ops(), |ops| {
        rt.block_on(async {
            let dbs = open().await;
            let stores: Vec<Store> = dbs.iter().map(|db| db.store.clone()).collect();
            let outcome = run_ops(&stores, &ops).await;
            for db in dbs {
                db.cleanup().await;
            }
            outcome.map_err(TestCaseError::fail)
        })
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

mod model {
    use super::*;

    #[test]
    fn sqlite() {
        check(|| async { vec![TestDb::sqlite().await] });
    }

    #[test]
    #[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
    fn postgres() {
        check(|| async {
            let pg = TestDb::postgres().await.expect("TEST_DATABASE_URL is set");
            vec![pg, TestDb::sqlite().await]
        });
    }
}
