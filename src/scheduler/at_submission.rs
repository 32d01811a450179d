//! Placement at submission: a task submitted (alone, in a batch or in a job) while one of this
//! replica's workers has a free slot for it is inserted already assigned to that worker and pushed as soon as the insert
//! commits, without waiting for a scheduler pass to claim it. The insert, its session fence and
//! its other checks are the store's ([`Store::create_tasks_placed`]); here the workers are
//! picked, under placement's turn ([`Placing`]), and the assignments pushed.
//!
//! A submission takes the turn only when it is free or frees soon ([`TURN_WAIT`]): under load
//! the scheduler holds it for its passes, and the tasks are inserted pending for those passes
//! to claim, as they would be without this path.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    time::Duration,
};

use chrono::Utc;

use super::{Placing, Shared, placement};
use crate::{
    domain::{Assignment, Candidate, Job, JobId, NewTask, TaskId},
    metrics,
    store::{self, Created, Placement, Store},
};

/// How long a submission waits for placement's turn before it leaves its tasks to the
/// scheduler: about one empty pass.
pub const TURN_WAIT: Duration = Duration::from_millis(1);

/// Places submissions on the workers of this replica ([`super::Scheduler::at_submission`]).
/// Cheap to clone.
#[derive(Debug, Clone)]
pub struct AtSubmission {
    pub(super) shared: Shared,
    pub(super) placing: Placing,
}

impl AtSubmission {
    /// Creates `tasks`; those a free worker of this replica can take now are created assigned
    /// to it and pushed. What each submission got, as [`Store::create_tasks`] answers it.
    pub async fn create(&self, tasks: &[NewTask]) -> store::Result<Vec<Created>> {
        self.place(tasks, Tasks).await
    }

    /// Creates a job of `tasks` as [`Store::create_job`] does, those a free worker of this
    /// replica can take now assigned to it and pushed, as [`Self::create`] places them.
    pub async fn create_job(
        &self,
        name: &str,
        key: Option<&str>,
        mut tasks: Vec<NewTask>,
    ) -> store::Result<(Job, Vec<Created>)> {
        let id = store::new_job(&mut tasks);
        self.place(&tasks, JobOf { id, name, key }).await
    }

    /// Picks free workers of this replica for `tasks` under placement's turn, stores them with
    /// `insert` (given an empty placement when none is picked or the turn is not free soon), and
    /// pushes what the insert assigned.
    async fn place<I: Insert>(&self, tasks: &[NewTask], insert: I) -> store::Result<I::Out> {
        let unplaced = async || {
            let (out, _) = insert
                .insert(&self.shared.store, tasks, &Placement::default(), self.shared.config.lease)
                .await?;
            Ok(out)
        };
        let now = Utc::now();
        let mut candidates: Vec<Candidate> = tasks
            .iter()
            .filter(|t| t.depends_on.is_empty() && t.run_after.is_none_or(|at| at <= now))
            .map(|t| Candidate {
                id: t.id,
                task_type: t.task_type.clone(),
                priority: t.priority,
                needs: t.needs.clone(),
            })
            .collect();
        self.shared.backlog.keep_clear(&mut candidates);
        if candidates.is_empty() || !self.shared.store.assigns_at_submission() {
            return unplaced().await;
        }
        let mut turn = match self.placing.0.try_lock() {
            Ok(turn) => turn,
            Err(_) => match tokio::time::timeout(TURN_WAIT, self.placing.0.lock()).await {
                Ok(turn) => turn,
                Err(_) => return unplaced().await,
            },
        };
        let (workers, sessions) = self.shared.registry.schedulable();
        let mut cursor = *turn;
        let placed = placement::place(
            self.shared.config.strategy,
            &candidates,
            &workers,
            &mut cursor,
            &HashMap::new(),
        );
        if placed.placed.is_empty() {
            drop(turn);
            return unplaced().await;
        }
        if (placed.affinity_hits, placed.affinity_misses) != (0, 0) {
            metrics::affinity_placements(placed.affinity_hits, placed.affinity_misses);
        }
        let placement = Placement { placed: placed.placed, sessions: sessions.clone() };
        let (out, assigned) =
            match insert.insert(&self.shared.store, tasks, &placement, self.shared.config.lease).await {
                Ok(out) => out,
                // Another submission's job has the key: this one rolled back, certainly.
                Err(e @ store::StoreError::JobExists(_)) => return Err(e),
                Err(e) => {
                    // The commit's outcome may be unknown: the reconciliation returns whatever was
                    // assigned to workers that never heard of it.
                    self.shared.registry.request_reconcile();
                    return Err(e);
                }
            };
        if !assigned.is_empty() {
            *turn = cursor;
        }
        // Each refused type once (a batch may hold many tasks of one type).
        let mut refused_types: BTreeSet<&String> = BTreeSet::new();
        if assigned.len() < placement.placed.len() {
            // Refused by the insert's checks: most often an older pending task of the type (or
            // a concurrency limit, or the worker's session replaced; the next pass with room to
            // spare clears the type again).
            let given: HashSet<TaskId> = assigned.iter().map(|a| a.task_id).collect();
            let refused: HashSet<TaskId> =
                placement.placed.iter().map(|(t, _)| *t).filter(|t| !given.contains(t)).collect();
            refused_types.extend(candidates.iter().filter(|c| refused.contains(&c.id)).map(|c| &c.task_type));
            self.shared.backlog.mark(refused_types.iter().copied());
        }
        let undelivered = self.shared.deliver(assigned, &sessions, &[]);
        // Pushed: the slots are counted. The give-back's round trip is not placement's.
        drop(turn);
        if !refused_types.is_empty() {
            self.mark_limited(&refused_types).await;
        }
        if !undelivered.is_empty() {
            // The tasks are stored: the submission succeeded whatever happens to their delivery.
            // A failed give-back is the reconciliation's (requested by `give_back`).
            let _ = self.shared.give_back(&undelivered).await;
        }
        Ok(out)
    }

    /// Marks those of `refused` (types the insert refused to assign) that have a concurrency
    /// limit as limited. The insert refuses every task of such a type, and a pass never marks
    /// a type at its limit (the claim finds no candidate of it, and a pass that offered the type
    /// and came back with room clears it as backlogged): without this, every submission of it
    /// would take placement's turn for an insert that assigns nothing. A hint like the rest: on
    /// an error nothing is marked, and a pass that sees a candidate of the type without a limit
    /// clears it.
    async fn mark_limited(&self, refused: &BTreeSet<&String>) {
        let types: Vec<String> = refused.iter().map(|t| (*t).clone()).collect();
        if let Ok(limited) = self.shared.store.limited_types(&types).await {
            self.shared.backlog.mark_limited(limited.iter());
        }
    }
}

/// How a submission is stored: its tasks alone ([`Tasks`]) or as a job ([`JobOf`]), those of
/// `placement` assigned where the store's checks let them be.
trait Insert {
    type Out;

    fn insert(
        &self,
        store: &Store,
        tasks: &[NewTask],
        placement: &Placement,
        lease: Duration,
    ) -> impl Future<Output = store::Result<(Self::Out, Vec<Assignment>)>> + Send;
}

/// Tasks outside any job: [`Store::create_tasks_placed`].
struct Tasks;

impl Insert for Tasks {
    type Out = Vec<Created>;

    async fn insert(
        &self,
        store: &Store,
        tasks: &[NewTask],
        placement: &Placement,
        lease: Duration,
    ) -> store::Result<(Vec<Created>, Vec<Assignment>)> {
        store.create_tasks_placed(tasks, placement, lease).await
    }
}

/// The tasks of job `id`: [`Store::create_job_placed`].
struct JobOf<'a> {
    id: JobId,
    name: &'a str,
    key: Option<&'a str>,
}

impl Insert for JobOf<'_> {
    type Out = (Job, Vec<Created>);

    async fn insert(
        &self,
        store: &Store,
        tasks: &[NewTask],
        placement: &Placement,
        lease: Duration,
    ) -> store::Result<((Job, Vec<Created>), Vec<Assignment>)> {
        let (job, created, assigned) =
            store.create_job_placed(self.id, self.name, self.key, tasks, placement, lease).await?;
        Ok(((job, created), assigned))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        domain::{TaskState, Wake, WorkerId},
        registry::{Push, Registry, RegistryConfig},
        store::testing,
    };

    /// A Postgres test database, a registry with worker `w` (`slots` slots) connected, and the
    /// placer; `None` without `TEST_DATABASE_URL`.
    async fn setup(
        slots: u32,
    ) -> Option<(testing::TestDb, AtSubmission, tokio::sync::mpsc::Receiver<Push>, Placing)> {
        let db = testing::TestDb::postgres().await?;
        let (registry, _dead) = Registry::new(RegistryConfig::for_tests(), db.store.clone(), Wake::default());
        registry.register(testing::registration("w", slots)).await.expect("register");
        let (_, stream) = registry.attach(&WorkerId::from("w"), None).expect("attach");
        let placer = super::super::Scheduler::for_tests(db.store.clone(), registry).at_submission();
        let placing = placer.placing.clone();
        Some((db, placer, stream, placing))
    }

    /// A scheduler (its tick a minute apart) over a registry with worker `w` (`slots` slots)
    /// connected, and that worker's stream.
    async fn scheduler_with_worker(
        db: &testing::TestDb,
        slots: u32,
    ) -> (super::super::Scheduler, tokio::sync::mpsc::Receiver<Push>) {
        let (registry, _dead) = Registry::new(RegistryConfig::for_tests(), db.store.clone(), Wake::default());
        registry.register(testing::registration("w", slots)).await.expect("register");
        let (_, stream) = registry.attach(&WorkerId::from("w"), None).expect("attach");
        (super::super::Scheduler::for_tests(db.store.clone(), registry), stream)
    }

    /// Submits one new task of `task_type` through `placer`: its id and the state it was stored
    /// in.
    async fn submit_one(placer: &AtSubmission, task_type: &str) -> (crate::domain::TaskId, TaskState) {
        let task = testing::new_task(task_type);
        let created = placer.create(std::slice::from_ref(&task)).await.expect("create");
        (task.id, created[0].task.state)
    }

    fn pushed(stream: &mut tokio::sync::mpsc::Receiver<Push>) -> Vec<crate::domain::TaskId> {
        let mut out = Vec::new();
        while let Ok(Push::Run(a)) = stream.try_recv() {
            out.push(a.task_id);
        }
        out
    }

    /// A task submitted while a worker has a free slot is stored assigned to it (first attempt,
    /// under its session, with a lease) and pushed at once, with no claim; a second one finds
    /// the slot taken and waits pending for a claim.
    #[tokio::test]
    #[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
    async fn a_submission_is_assigned_to_a_free_worker_as_it_is_stored() {
        let Some((db, placer, mut stream, _)) = setup(1).await else { panic!("TEST_DATABASE_URL") };
        let first = testing::new_task("prove");
        let created = placer.create(std::slice::from_ref(&first)).await.expect("create");
        assert_eq!(created[0].task.state, TaskState::Assigned);
        assert_eq!(pushed(&mut stream), vec![first.id]);
        let stored = db.store.get_task(first.id).await.unwrap().expect("stored");
        assert_eq!((stored.state, stored.attempt), (TaskState::Assigned, 1));
        assert_eq!(stored.worker_id, Some(WorkerId::from("w")));
        assert!(stored.lease_expires_at.is_some());
        let held = db.store.held_by(&WorkerId::from("w")).await.unwrap();
        assert_eq!(held.iter().map(|h| (h.task_id, h.attempt)).collect::<Vec<_>>(), vec![(first.id, 1)]);

        let second = testing::new_task("prove");
        let created = placer.create(std::slice::from_ref(&second)).await.expect("create");
        assert_eq!(created[0].task.state, TaskState::Pending, "the worker's one slot is taken");
        assert!(pushed(&mut stream).is_empty());
        db.cleanup().await;
    }

    /// A job submitted while its worker has free slots is stored with as many of its tasks
    /// assigned to it (first attempt, its session, a lease) and pushed as the slots allow, the
    /// rest pending for a claim; its counts and its members say so.
    #[tokio::test]
    #[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
    async fn a_job_is_assigned_to_free_workers_as_it_is_stored() {
        let Some((db, placer, mut stream, _)) = setup(2).await else { panic!("TEST_DATABASE_URL") };
        let tasks: Vec<_> = (0..3).map(|_| testing::new_task("prove")).collect();
        let (job, created) = placer.create_job("j", None, tasks.clone()).await.expect("create job");
        let states: Vec<TaskState> = created.iter().map(|c| c.task.state).collect();
        assert_eq!(states, vec![TaskState::Assigned, TaskState::Assigned, TaskState::Pending]);
        assert!(created.iter().all(|c| c.created && c.task.job_id == Some(job.id)));
        assert_eq!(pushed(&mut stream), vec![tasks[0].id, tasks[1].id]);
        let counts = |job: &crate::domain::Job| {
            (job.counts.get(&TaskState::Assigned).copied(), job.counts.get(&TaskState::Pending).copied())
        };
        assert_eq!(counts(&job), (Some(2), Some(1)));
        let stored = db.store.get_job(job.id).await.unwrap().expect("the job");
        assert_eq!((stored.total, counts(&stored)), (3, (Some(2), Some(1))));
        let held = db.store.held_by(&WorkerId::from("w")).await.unwrap();
        let mut held: Vec<_> = held.iter().map(|h| (h.task_id, h.attempt)).collect();
        held.sort();
        let mut expected = vec![(tasks[0].id, 1), (tasks[1].id, 1)];
        expected.sort();
        assert_eq!(held, expected);
        let members: Vec<_> = db.store.job_tasks(job.id).await.unwrap().iter().map(|t| t.id).collect();
        assert_eq!(members, tasks.iter().map(|t| t.id).collect::<Vec<_>>());
        db.cleanup().await;
    }

    /// The worker registered again elsewhere (a new session in its row, another replica's now)
    /// after this replica looked at it: the insert's fence sees the new session, and the task
    /// (or a job's) is stored pending, never assigned to the old session.
    #[tokio::test]
    #[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
    async fn a_submission_is_not_assigned_to_a_session_the_database_replaced() {
        let Some((db, placer, mut stream, _)) = setup(4).await else { panic!("TEST_DATABASE_URL") };
        let crate::store::Store::Postgres(pg) = &db.store else { unreachable!() };
        sqlx::query("UPDATE workers SET session_id = $1 WHERE id = 'w'")
            .bind(uuid::Uuid::now_v7())
            .execute(pg.pool())
            .await
            .unwrap();
        let task = testing::new_task("prove");
        let created = placer.create(std::slice::from_ref(&task)).await.expect("create");
        assert_eq!(created[0].task.state, TaskState::Pending);
        let stored = db.store.get_task(task.id).await.unwrap().expect("stored");
        assert_eq!((stored.state, stored.attempt, stored.worker_id), (TaskState::Pending, 0, None));
        assert!(pushed(&mut stream).is_empty());
        // A job meets the same fence.
        let tasks: Vec<_> = (0..2).map(|_| testing::new_task("prove")).collect();
        let (job, created) = placer.create_job("j", None, tasks).await.expect("create job");
        assert!(created.iter().all(|c| c.task.state == TaskState::Pending), "{created:?}");
        assert_eq!(job.counts.get(&TaskState::Pending), Some(&2));
        assert!(pushed(&mut stream).is_empty());
        assert!(db.store.held_by(&WorkerId::from("w")).await.unwrap().is_empty());
        db.cleanup().await;
    }

    /// What a claim would hold back is not assigned at submission either: an older pending
    /// task of the type at the same priority goes first, a type under a concurrency limit is
    /// counted by claims only, a task with parents waits for them and one due later waits for
    /// its time. A task of higher priority than the pending ones is assigned.
    #[tokio::test]
    #[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
    async fn a_submission_is_assigned_only_where_a_claim_would_take_it() {
        let Some((db, placer, mut stream, _)) = setup(10).await else { panic!("TEST_DATABASE_URL") };
        // Older and pending (stored without placement): a new task of its type waits behind it.
        db.store.create_tasks(&[testing::new_task("prove")]).await.unwrap();
        let behind = testing::new_task("prove");
        let mut urgent = testing::new_task("prove");
        urgent.priority = 5;
        db.store.set_type_limit("limited", Some(100)).await.unwrap();
        let limited = testing::new_task("limited");
        let parent = testing::new_task("other");
        let mut child = testing::new_task("other");
        child.depends_on = vec![parent.id];
        let mut later = testing::new_task("other");
        later.run_after = Some(Utc::now() + chrono::Duration::hours(1));
        let tasks = [behind, urgent.clone(), limited, parent.clone(), child, later];
        let created = placer.create(&tasks).await.expect("create");
        let states: Vec<TaskState> = created.iter().map(|c| c.task.state).collect();
        use TaskState::{Assigned, Blocked, Pending};
        assert_eq!(states, vec![Pending, Assigned, Pending, Assigned, Blocked, Pending]);
        let mut sent = pushed(&mut stream);
        sent.sort();
        let mut expected = vec![urgent.id, parent.id];
        expected.sort();
        assert_eq!(sent, expected);
        db.cleanup().await;
    }

    /// A pass that finds candidates while a submission holds placement's turn places none of
    /// them (a free slot counts only once pushed into: both could give the same one) and waits
    /// for the turn; the pass after it places them.
    #[tokio::test]
    #[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
    async fn a_pass_places_nothing_while_a_submission_holds_the_turn() {
        let db = testing::TestDb::postgres().await.expect("TEST_DATABASE_URL");
        let (mut scheduler, mut stream) = scheduler_with_worker(&db, 3).await;
        let backlog: Vec<_> = (0..5).map(|_| testing::new_task("prove")).collect();
        db.store.create_tasks(&backlog).await.unwrap();
        let placer = scheduler.at_submission();
        let Store::Postgres(pg) = &db.store else { unreachable!("a Postgres test database") };
        let index_scans = || async {
            sqlx::query_scalar::<_, i64>(
                "SELECT COALESCE(sum(idx_scan), 0)::bigint FROM pg_stat_user_indexes
                 WHERE relid = 'tasks'::regclass",
            )
            .fetch_one(pg.pool())
            .await
            .unwrap()
        };
        let before = index_scans().await;
        let turn = placer.placing.0.clone().lock_owned().await;
        let pass = tokio::spawn(async move {
            let first = scheduler.pass().await.expect("pass");
            (scheduler, first)
        });
        // The pass has read its candidates once the statistics show its index scan: from then
        // on it either places them or waits for the turn.
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while index_scans().await == before {
            assert!(std::time::Instant::now() < deadline, "the pass never read its candidates");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!pass.is_finished(), "the pass waits for the turn");
        assert!(pushed(&mut stream).is_empty(), "nothing placed while the turn is held");
        assert!(db.store.held_by(&WorkerId::from("w")).await.unwrap().is_empty());
        drop(turn);
        let (mut scheduler, first) = pass.await.expect("pass task");
        assert_eq!(first, super::super::Pass::Full, "it goes again");
        assert!(pushed(&mut stream).is_empty());
        scheduler.pass().await.expect("pass");
        assert_eq!(pushed(&mut stream).len(), 3);
        assert_eq!(db.store.held_by(&WorkerId::from("w")).await.unwrap().len(), 3);
        db.cleanup().await;
    }

    /// A type a placed submission found backlogged (an older task of it pending) is left to the
    /// claims by the submissions after it, without placement's turn, even once nothing of it is
    /// pending; the pass that claims its tasks with room to spare clears it, and the next
    /// submission is placed again. A pass that comes back full marks the type again.
    #[tokio::test]
    #[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
    async fn a_backlogged_type_is_left_to_the_claims_until_a_pass_clears_it() {
        let db = testing::TestDb::postgres().await.expect("TEST_DATABASE_URL");
        let (mut scheduler, mut stream) = scheduler_with_worker(&db, 4).await;
        let placer = scheduler.at_submission();
        let older = testing::new_task("prove");
        db.store.create_tasks(std::slice::from_ref(&older)).await.unwrap();
        let (first, state) = submit_one(&placer, "prove").await;
        assert_eq!(state, TaskState::Pending, "behind the older one");
        assert!(placer.shared.backlog.contains("prove"));

        // Nothing of the type is pending now: the insert's check would let a task through, the
        // hint keeps it for the claims.
        for id in [older.id, first] {
            db.store.cancel(id, "gone").await.unwrap().expect("cancelled");
        }
        let (second, state) = submit_one(&placer, "prove").await;
        assert_eq!(state, TaskState::Pending);
        assert!(pushed(&mut stream).is_empty());

        // The pass claims it with room to spare and clears the type.
        assert_eq!(scheduler.pass().await.expect("pass"), super::super::Pass::Done);
        assert_eq!(pushed(&mut stream), vec![second]);
        assert!(!placer.shared.backlog.contains("prove"));
        let (third, state) = submit_one(&placer, "prove").await;
        assert_eq!(state, TaskState::Assigned);
        assert_eq!(pushed(&mut stream), vec![third]);

        // Two slots left and three pending: the pass fills both and marks the type.
        let backlog: Vec<_> = (0..3).map(|_| testing::new_task("prove")).collect();
        db.store.create_tasks(&backlog).await.unwrap();
        assert_eq!(scheduler.pass().await.expect("pass"), super::super::Pass::Full);
        assert_eq!(pushed(&mut stream).len(), 2);
        assert!(placer.shared.backlog.contains("prove"));
        db.cleanup().await;
    }

    /// A type under a concurrency limit is never assigned by the insert. The first submission
    /// of it that the insert refuses marks it limited (the type has a limit), and the
    /// submissions after it go to the claims without trying placement. A pass that finds the
    /// type at its limit (no candidate of it) leaves it marked: it used to clear it as no longer
    /// backlogged, so every submission of a type at its limit tried the insert again. A pass
    /// that finds the limit gone clears it, and the next submission is placed again.
    #[tokio::test]
    #[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
    async fn a_limited_type_is_left_to_the_claims_until_a_pass_finds_its_limit_gone() {
        let db = testing::TestDb::postgres().await.expect("TEST_DATABASE_URL");
        let (mut scheduler, mut stream) = scheduler_with_worker(&db, 4).await;
        let placer = scheduler.at_submission();
        db.store.set_type_limit("limited", Some(1)).await.unwrap();
        let (first, state) = submit_one(&placer, "limited").await;
        assert_eq!(state, TaskState::Pending, "the insert refuses a limited type");
        assert!(placer.shared.backlog.limited("limited"), "refused, and the type has a limit");
        assert!(!placer.shared.backlog.contains("limited"), "the limit holds it back, not an older task");

        // The pass claims it under the limit: the type is at its limit now.
        assert_eq!(scheduler.pass().await.expect("pass"), super::super::Pass::Done);
        assert_eq!(pushed(&mut stream), vec![first]);
        assert!(placer.shared.backlog.limited("limited"));

        // At its limit: the next task waits, and a pass that offers the type finds no candidate
        // of it and leaves it marked.
        let (second, state) = submit_one(&placer, "limited").await;
        assert_eq!(state, TaskState::Pending);
        assert_eq!(scheduler.pass().await.expect("pass"), super::super::Pass::Done);
        assert!(pushed(&mut stream).is_empty());
        assert!(placer.shared.backlog.limited("limited"), "a pass that saw no candidate of it keeps it");
        assert!(!placer.shared.backlog.contains("limited"));

        // The limit removed: the next pass's candidate shows it, and placement resumes.
        db.store.set_type_limit("limited", None).await.unwrap();
        assert_eq!(scheduler.pass().await.expect("pass"), super::super::Pass::Done);
        assert_eq!(pushed(&mut stream), vec![second]);
        assert!(!placer.shared.backlog.limited("limited"));
        let (third, state) = submit_one(&placer, "limited").await;
        assert_eq!(state, TaskState::Assigned);
        assert_eq!(pushed(&mut stream), vec![third]);
        db.cleanup().await;
    }

    /// While a scheduler pass holds placement's turn, a submission does not wait for it beyond
    /// [`TURN_WAIT`]: its tasks are stored pending for the claims.
    #[tokio::test]
    #[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
    async fn a_submission_leaves_its_tasks_to_the_claims_while_a_pass_places() {
        let Some((db, placer, mut stream, placing)) = setup(4).await else { panic!("TEST_DATABASE_URL") };
        let turn = placing.0.lock().await;
        let task = testing::new_task("prove");
        let created = placer.create(std::slice::from_ref(&task)).await.expect("create");
        assert_eq!(created[0].task.state, TaskState::Pending);
        assert!(pushed(&mut stream).is_empty());
        drop(turn);
        db.cleanup().await;
    }
}
