//! Refill at completion: while tasks wait, a batch of completions claims the next tasks for the
//! slots it frees in its own transaction ([`Store::complete_and_claim`]), and pushes them as
//! soon as it commits. A worker's next task is then on its way when its last result is
//! recorded, without a scheduler pass and its claim between the two.
//!
//! A batch places only into the slots its own completions free ([`Registry::refillable`]), so
//! it needs no placement turn and runs beside the scheduler's passes: those slots stay counted
//! taken until the completed attempts are released, after their successors are pushed, and a
//! push checks that its task fits once they are ([`Registry::push_freeing`]). When nothing waits
//! (no type backlogged, see [`Backlog`]), or the worker drains or has a prefetch queue (its
//! queue hides the wait for a pass, which refills it in bulk), the batch completes alone and
//! the released slots wake the scheduler, as before.

use std::collections::HashMap;

use tracing::warn;
use uuid::Uuid;

use super::{Shared, Tally, offered_types, placement};
use crate::{
    domain::{Candidate, WorkerId, WorkerSlot},
    store::{self, Allowances, ClaimFilter, Completion, Held, Placement, Refill, ReportOutcome, Shapes},
};

/// Completes batches of reports, refilling the slots they free ([`super::Scheduler::refiller`]).
/// Cheap to clone.
#[derive(Debug, Clone)]
pub struct Refiller {
    pub(super) shared: Shared,
}

impl Refiller {
    /// Completes `reports` (one outcome each, in order), pushes what the batch claimed for the
    /// slots they free, then runs `reported` on the outcomes (it releases the completed
    /// attempts' slots).
    pub async fn complete(
        &self,
        reports: &[Completion],
        reported: impl FnOnce(&[ReportOutcome]),
    ) -> store::Result<Vec<ReportOutcome>> {
        if !self.shared.backlog.any()
            || !self.shared.registry.refills_any(reports.iter().map(|c| &c.held.worker_id))
        {
            let outcomes = self.shared.store.complete(reports).await?;
            reported(&outcomes);
            return Ok(outcomes);
        }
        let mut plan = Plan::new(&self.shared);
        let (outcomes, assignments) =
            match self.shared.store.complete_and_claim(reports, self.shared.config.lease, &mut plan).await {
                Ok(done) => done,
                Err(e) => {
                    if plan.asked.is_some() {
                        // The commit's outcome may be unknown: tasks may be assigned to workers that
                        // will never hear of them. The reconciliation finds and returns them.
                        self.shared.registry.request_reconcile();
                    }
                    return Err(e);
                }
            };
        let Some(limit) = plan.asked else {
            reported(&outcomes);
            return Ok(outcomes);
        };
        plan.tally.after(&self.shared.backlog, None, assignments.len(), limit);
        // The successors first, then the completed attempts' slots are released: until then
        // those slots count as taken, so no other placement gives them away meanwhile.
        let undelivered = self.shared.deliver(assignments, &plan.sessions, &plan.completed);
        reported(&outcomes);
        if !undelivered.is_empty() {
            // The results are recorded whatever happens to the successors' delivery; a failed
            // give-back is the reconciliation's (requested by `give_back`).
            let _ = self.shared.give_back(&undelivered).await;
        }
        Ok(outcomes)
    }
}

/// One batch's refill, asked by the store inside the transaction.
struct Plan<'a> {
    shared: &'a Shared,
    /// The attempts that completed, whose slots the refill fills.
    completed: Vec<Held>,
    /// The completing workers, each offering the slots its completed attempts free.
    workers: Vec<WorkerSlot>,
    sessions: HashMap<WorkerId, Uuid>,
    /// How many were claimed at most; `None` when nothing was claimed.
    asked: Option<u32>,
    tally: Tally,
}

impl<'a> Plan<'a> {
    fn new(shared: &'a Shared) -> Self {
        Plan {
            shared,
            completed: Vec::new(),
            workers: Vec::new(),
            sessions: HashMap::new(),
            asked: None,
            tally: Tally::default(),
        }
    }
}

impl Refill for Plan<'_> {
    fn wanted(&mut self, completed: &[Held]) -> Option<(u32, ClaimFilter)> {
        // Asked again when the transaction is retried: start over.
        self.asked = None;
        self.tally = Tally::default();
        let (workers, sessions) = self.shared.registry.refillable(completed);
        let offering: Vec<&WorkerSlot> = workers.iter().filter(|w| w.free > 0).collect();
        let free: u32 = offering.iter().map(|w| w.free).sum();
        let types = offered_types(&offering);
        if free == 0 || !self.shared.backlog.offers(&types) {
            return None;
        }
        let limit = free.min(self.shared.config.batch_size);
        let filter = ClaimFilter { types, shapes: Shapes::of(&workers) };
        self.asked = Some(limit);
        self.completed = completed.to_vec();
        self.workers = workers;
        self.sessions = sessions;
        Some((limit, filter))
    }

    fn place(&mut self, candidates: &[Candidate], allowances: &Allowances) -> Placement {
        // A task with an affinity key goes to the worker its key prefers among all of them,
        // which only a pass sees: it stays pending for the pass the released slots wake.
        // Copied only when there is one (most batches have none).
        let keyed = |c: &Candidate| c.needs.affinity_key.is_some();
        let unkeyed: std::borrow::Cow<'_, [Candidate]> = if candidates.iter().any(keyed) {
            candidates.iter().filter(|c| !keyed(c)).cloned().collect::<Vec<_>>().into()
        } else {
            candidates.into()
        };
        // Round-robin over this batch's workers only: the scheduler's position is its own.
        let mut cursor = 0;
        let placed =
            placement::place(self.shared.config.strategy, &unkeyed, &self.workers, &mut cursor, allowances);
        self.tally = Tally::of(candidates, &placed, allowances);
        Placement { placed: placed.placed, sessions: self.sessions.clone() }
    }

    fn claim_failed(&mut self, error: &store::StoreError) {
        // Nothing was claimed: the hints stay as they were, the passes refill the slots.
        warn!(%error, "claim with completed results failed; the results are recorded and the scheduler refills");
        self.asked = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        domain::{Wake, WorkerId},
        registry::{Push, Registry, RegistryConfig},
        store::testing::{self, TestDb},
    };

    /// A scheduler over a registry with worker `w` (one slot, a queue of `prefetch`) connected,
    /// its stream, and `n` pending `prove` tasks (oldest first).
    async fn one_slot_worker(
        db: &TestDb,
        n: usize,
        prefetch: u32,
    ) -> (super::super::Scheduler, Registry, tokio::sync::mpsc::Receiver<Push>, Vec<crate::domain::TaskId>)
    {
        let (registry, _dead) = Registry::new(RegistryConfig::for_tests(), db.store.clone(), Wake::default());
        let registration = crate::store::WorkerRegistration { prefetch, ..testing::registration("w", 1) };
        registry.register(registration).await.expect("register");
        let (_, stream) = registry.attach(&WorkerId::from("w"), None).expect("attach");
        let tasks: Vec<_> = (0..n).map(|_| testing::new_task("prove")).collect();
        let ids = tasks.iter().map(|t| t.id).collect();
        db.store.create_tasks(&tasks).await.expect("submit");
        (super::super::Scheduler::for_tests(db.store.clone(), registry.clone()), registry, stream, ids)
    }

    /// The next task the stream carries.
    fn pushed(stream: &mut tokio::sync::mpsc::Receiver<Push>) -> Option<crate::domain::Assignment> {
        match stream.try_recv() {
            Ok(Push::Run(a)) => Some(a),
            _ => None,
        }
    }

    /// Completes `a` through `refiller`, freeing its slot after the commit as the effects do.
    async fn complete(
        refiller: &Refiller,
        registry: &Registry,
        a: &crate::domain::Assignment,
    ) -> ReportOutcome {
        let held = Held { task_id: a.task_id, worker_id: a.worker_id.clone(), attempt: a.attempt };
        let reports = [Completion { held: held.clone(), result: b"ok".to_vec(), delivered: None }];
        let outcomes = refiller
            .complete(&reports, |outcomes| {
                if matches!(outcomes[0], ReportOutcome::Applied { .. }) {
                    registry.release(&held.worker_id, held.task_id, held.attempt);
                }
            })
            .await
            .expect("complete");
        outcomes[0].clone()
    }

    /// With tasks waiting, the batch that completes a worker's task pushes its next one: the
    /// worker holds one task throughout, and no scheduler pass runs between the two. Once
    /// nothing waits, a completion frees the slot, and the pass it wakes finds the type no
    /// longer backlogged.
    async fn a_batch_pushes_the_next_task_into_the_slot_it_frees(db: TestDb) {
        let (mut scheduler, registry, mut stream, ids) = one_slot_worker(&db, 3, 0).await;
        let refiller = scheduler.refiller();
        scheduler.pass().await.expect("pass");
        let mut running = pushed(&mut stream).expect("the first task");
        assert_eq!(running.task_id, ids[0]);
        assert!(refiller.shared.backlog.contains("prove"), "a full pass leaves the type backlogged");
        let worker = WorkerId::from("w");
        for next in &ids[1..] {
            assert!(matches!(complete(&refiller, &registry, &running).await, ReportOutcome::Applied { .. }));
            running = pushed(&mut stream).expect("the next task, pushed by the batch");
            assert_eq!(running.task_id, *next);
            assert_eq!(registry.session(&worker).unwrap().in_flight, 1, "one slot, one task");
            let held: Vec<_> =
                db.store.held_by(&worker).await.expect("held_by").iter().map(|h| h.task_id).collect();
            assert_eq!(held, vec![*next]);
        }
        assert!(matches!(complete(&refiller, &registry, &running).await, ReportOutcome::Applied { .. }));
        assert!(pushed(&mut stream).is_none(), "nothing left");
        assert_eq!(registry.session(&worker).unwrap().in_flight, 0);
        assert!(
            refiller.shared.backlog.contains("prove"),
            "a refill clears nothing: it saw its worker alone"
        );
        scheduler.pass().await.expect("pass");
        assert!(!refiller.shared.backlog.contains("prove"), "the pass the freed slot wakes clears it");
        db.cleanup().await;
    }

    /// A worker with a prefetch queue is refilled by the passes, in bulk: a batch completes its
    /// task and claims nothing.
    async fn a_batch_leaves_a_prefetching_worker_to_the_passes(db: TestDb) {
        let (mut scheduler, registry, mut stream, ids) = one_slot_worker(&db, 3, 1).await;
        let refiller = scheduler.refiller();
        scheduler.pass().await.expect("pass");
        let (first, second) =
            (pushed(&mut stream).expect("a task"), pushed(&mut stream).expect("a queued task"));
        assert_eq!((first.task_id, second.task_id), (ids[0], ids[1]));
        assert!(matches!(complete(&refiller, &registry, &first).await, ReportOutcome::Applied { .. }));
        assert!(pushed(&mut stream).is_none(), "the batch claims nothing for it");
        assert_eq!(
            db.store.get_task(ids[2]).await.unwrap().unwrap().state,
            crate::domain::TaskState::Pending
        );
        assert_eq!(registry.session(&WorkerId::from("w")).unwrap().in_flight, 1);
        db.cleanup().await;
    }

    /// A task with an affinity key is left to the pass: only a pass sees every worker its key
    /// could prefer.
    async fn a_batch_leaves_a_keyed_task_to_the_passes(db: TestDb) {
        let (mut scheduler, registry, mut stream, _) = one_slot_worker(&db, 1, 0).await;
        let refiller = scheduler.refiller();
        scheduler.pass().await.expect("pass");
        let first = pushed(&mut stream).expect("the first task");
        assert!(refiller.shared.backlog.contains("prove"));
        let mut keyed = testing::new_task("prove");
        keyed.needs.affinity_key = Some("circuit-7".into());
        let id = keyed.id;
        db.store.create_tasks(&[keyed]).await.expect("submit");
        assert!(matches!(complete(&refiller, &registry, &first).await, ReportOutcome::Applied { .. }));
        assert!(pushed(&mut stream).is_none(), "the batch claims nothing for it");
        let task = db.store.get_task(id).await.unwrap().unwrap();
        assert_eq!((task.state, task.attempt), (crate::domain::TaskState::Pending, 0));
        db.cleanup().await;
    }

    /// A batch refills only workers that want work: a draining worker is not refilled, and
    /// its task waits.
    async fn a_batch_never_refills_a_draining_worker(db: TestDb) {
        let (mut scheduler, registry, mut stream, ids) = one_slot_worker(&db, 3, 0).await;
        let refiller = scheduler.refiller();
        scheduler.pass().await.expect("pass");
        let second = pushed(&mut stream).expect("the first task");
        let worker = WorkerId::from("w");
        assert_eq!(second.task_id, ids[0]);
        registry.deregister(&worker, None).await.expect("drain");
        assert!(matches!(complete(&refiller, &registry, &second).await, ReportOutcome::Applied { .. }));
        assert!(pushed(&mut stream).is_none(), "a draining worker gets nothing");
        let next = db.store.get_task(ids[1]).await.unwrap().unwrap();
        assert_eq!((next.state, next.attempt), (crate::domain::TaskState::Pending, 0), "never assigned");
        db.cleanup().await;
    }

    /// A refill sees only its own batch's workers: one that finds nothing its worker can take
    /// leaves the backlog hints as they were, so the next completion of a worker that can take
    /// the waiting task still refills it, without a pass.
    async fn a_refill_that_finds_nothing_for_its_workers_keeps_the_hints(db: TestDb) {
        let (mut scheduler, registry, mut plain, _) = one_slot_worker(&db, 1, 0).await;
        let labels = [("gpu".to_string(), "a100".to_string())].into();
        let gpu = crate::store::WorkerRegistration { labels, ..testing::registration("g", 1) };
        registry.register(gpu).await.expect("register");
        let (_, mut on_gpu) = registry.attach(&WorkerId::from("g"), None).expect("attach");
        db.store.create_tasks(&[testing::new_task("prove")]).await.expect("submit");
        let refiller = scheduler.refiller();
        scheduler.pass().await.expect("pass");
        let (first, second) =
            (pushed(&mut plain).expect("a task for w"), pushed(&mut on_gpu).expect("a task for g"));
        assert!(refiller.shared.backlog.contains("prove"), "a full pass leaves the type backlogged");
        let mut needs_gpu = testing::new_task("prove");
        needs_gpu.needs.requires =
            vec![crate::domain::Requirement::Equals { key: "gpu".into(), value: "a100".into() }];
        let id = needs_gpu.id;
        db.store.create_tasks(&[needs_gpu]).await.expect("submit");

        assert!(matches!(complete(&refiller, &registry, &first).await, ReportOutcome::Applied { .. }));
        assert!(pushed(&mut plain).is_none(), "w cannot take it");
        assert!(refiller.shared.backlog.contains("prove"), "w's refill saw w alone");
        assert!(matches!(complete(&refiller, &registry, &second).await, ReportOutcome::Applied { .. }));
        assert_eq!(pushed(&mut on_gpu).map(|a| a.task_id), Some(id), "g's refill pushed it");
        db.cleanup().await;
    }

    #[tokio::test]
    async fn a_refill_that_finds_nothing_for_its_workers_keeps_the_hints_sqlite() {
        a_refill_that_finds_nothing_for_its_workers_keeps_the_hints(TestDb::sqlite().await).await;
    }

    #[tokio::test]
    #[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
    async fn a_refill_that_finds_nothing_for_its_workers_keeps_the_hints_postgres() {
        let db = TestDb::postgres().await.expect("TEST_DATABASE_URL");
        a_refill_that_finds_nothing_for_its_workers_keeps_the_hints(db).await;
    }

    #[tokio::test]
    async fn a_batch_pushes_the_next_task_into_the_slot_it_frees_sqlite() {
        a_batch_pushes_the_next_task_into_the_slot_it_frees(TestDb::sqlite().await).await;
    }

    #[tokio::test]
    #[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
    async fn a_batch_pushes_the_next_task_into_the_slot_it_frees_postgres() {
        let db = TestDb::postgres().await.expect("TEST_DATABASE_URL");
        a_batch_pushes_the_next_task_into_the_slot_it_frees(db).await;
    }

    #[tokio::test]
    async fn a_batch_never_refills_a_draining_worker_sqlite() {
        a_batch_never_refills_a_draining_worker(TestDb::sqlite().await).await;
    }

    #[tokio::test]
    #[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
    async fn a_batch_never_refills_a_draining_worker_postgres() {
        let db = TestDb::postgres().await.expect("TEST_DATABASE_URL");
        a_batch_never_refills_a_draining_worker(db).await;
    }

    #[tokio::test]
    async fn a_batch_leaves_a_prefetching_worker_to_the_passes_sqlite() {
        a_batch_leaves_a_prefetching_worker_to_the_passes(TestDb::sqlite().await).await;
    }

    #[tokio::test]
    #[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
    async fn a_batch_leaves_a_prefetching_worker_to_the_passes_postgres() {
        let db = TestDb::postgres().await.expect("TEST_DATABASE_URL");
        a_batch_leaves_a_prefetching_worker_to_the_passes(db).await;
    }

    #[tokio::test]
    async fn a_batch_leaves_a_keyed_task_to_the_passes_sqlite() {
        a_batch_leaves_a_keyed_task_to_the_passes(TestDb::sqlite().await).await;
    }

    #[tokio::test]
    #[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
    async fn a_batch_leaves_a_keyed_task_to_the_passes_postgres() {
        let db = TestDb::postgres().await.expect("TEST_DATABASE_URL");
        a_batch_leaves_a_keyed_task_to_the_passes(db).await;
    }
}
