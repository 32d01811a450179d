//! The scheduler: a loop that wakes on a tick (`poll_interval`) and, far more often, on events
//! (task submitted, capacity freed, worker became schedulable). Each pass claims a batch of
//! runnable tasks the connected workers can take, places them ([`placement::place`], a pure
//! function), persists the assignments in one transaction, then pushes each into its worker's
//! stream. A push that fails puts its task back to pending at once.

pub mod at_submission;
pub mod placement;
pub mod refill;

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::{
    config::Strategy,
    domain::Wake,
    domain::{Assignment, Candidate, TaskId, WorkerId},
    events::Events,
    metrics,
    registry::Registry,
    store::{ClaimFilter, Held, Placement, Requeued, Shapes, Store, TypeFilter},
};

pub use at_submission::AtSubmission;
pub use refill::Refiller;

/// Placement's turn, and the round-robin position it keeps. A scheduler pass holds it from the
/// moment it looks at the workers until its pushes are done, and so does a submission that
/// places its own tasks ([`AtSubmission`]): a free slot counts only once it is pushed into, so
/// two placements at once could give the same slot twice.
#[derive(Debug, Clone, Default)]
pub struct Placing(Arc<tokio::sync::Mutex<usize>>);

/// The task types a submission should leave to the claims, as this replica last saw them.
///
/// Backlogged types: a pass left some of its candidates pending or came back full (there may be
/// more), or a placed submission had some refused by the insert's checks. The insert would
/// refuse such a task anyway (an older task of its type is pending), and holding placement's
/// turn meanwhile holds up the passes that work the backlog off. A pass that places every
/// candidate with room to spare clears the types it offered; a refill ([`Refiller`]) marks
/// but never clears (it saw its own batch's workers only).
///
/// Limited types: a pass found the type under a concurrency limit, or a placed submission had
/// some refused by the insert and the type has a limit. The insert never assigns such a task
/// (the limit is counted under its row lock, in the claim). A pass that sees a candidate of the
/// type without a limit clears it.
///
/// A submission of either kind is stored pending without taking placement's turn. Only a hint:
/// a type wrongly thought clear costs one placed insert that stores the task pending (and marks
/// the type), one wrongly thought backlogged or limited a claim.
#[derive(Debug, Clone, Default)]
pub struct Backlog(Arc<std::sync::Mutex<Hints>>);

#[derive(Debug, Default)]
struct Hints {
    backlogged: HashSet<String>,
    limited: HashSet<String>,
}

impl Backlog {
    /// std Mutex: held to read or change the sets, never across an await.
    fn hints(&self) -> std::sync::MutexGuard<'_, Hints> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops from `candidates` the tasks of backlogged or limited types.
    fn keep_clear(&self, candidates: &mut Vec<Candidate>) {
        let hints = self.hints();
        if !hints.backlogged.is_empty() || !hints.limited.is_empty() {
            candidates.retain(|c| {
                !hints.backlogged.contains(&c.task_type) && !hints.limited.contains(&c.task_type)
            });
        }
    }

    /// Marks `types` backlogged.
    fn mark<'a>(&self, types: impl IntoIterator<Item = &'a String>) {
        let set = &mut self.hints().backlogged;
        types.into_iter().for_each(|t| add(set, t));
    }

    /// Marks `types` limited (and no longer backlogged: the limit, not an older task, holds
    /// them back).
    fn mark_limited<'a>(&self, types: impl IntoIterator<Item = &'a String>) {
        let mut hints = self.hints();
        for t in types {
            hints.backlogged.remove(t);
            add(&mut hints.limited, t);
        }
    }

    /// After a pass that offered `offered` and placed candidates of the types `took`, leaving
    /// candidates of the types `left` pending; `limits` holds the concurrency limits the pass
    /// found for the types of its candidates. `offered` is `None` after a refill: it offered the
    /// slots of its own batch's workers only, so a claim that came back with room to spare says
    /// nothing of what the other workers could take, and clears nothing.
    fn after_pass(
        &self,
        offered: Option<&TypeFilter>,
        took: &[String],
        left: &[String],
        limits: &crate::store::Allowances,
        full: bool,
    ) {
        let mut hints = self.hints();
        for t in took.iter().chain(left) {
            if limits.contains_key(t) {
                add(&mut hints.limited, t);
            } else {
                hints.limited.remove(t);
            }
        }
        // Full: there may be more of every type it took. Otherwise the types offered are clear
        // but for those it left pending.
        let still = if full {
            took
        } else {
            match offered {
                Some(TypeFilter::Only(types)) => types.iter().for_each(|t| {
                    hints.backlogged.remove(t);
                }),
                Some(TypeFilter::Any | TypeFilter::AnyAnd(_)) => hints.backlogged.clear(),
                None => {}
            }
            &[]
        };
        still.iter().chain(left).for_each(|t| add(&mut hints.backlogged, t));
    }

    /// Whether any type is thought backlogged.
    fn any(&self) -> bool {
        !self.hints().backlogged.is_empty()
    }

    /// Whether a claim of `types` may find a backlogged type.
    fn offers(&self, types: &TypeFilter) -> bool {
        let hints = self.hints();
        match types {
            TypeFilter::Any | TypeFilter::AnyAnd(_) => !hints.backlogged.is_empty(),
            TypeFilter::Only(types) => types.iter().any(|t| hints.backlogged.contains(t)),
        }
    }

    #[cfg(test)]
    pub(crate) fn contains(&self, task_type: &str) -> bool {
        self.hints().backlogged.contains(task_type)
    }

    #[cfg(test)]
    pub(crate) fn limited(&self, task_type: &str) -> bool {
        self.hints().limited.contains(task_type)
    }
}

/// Adds `t` to `set`, copying it only when it is not there yet.
fn add(set: &mut HashSet<String>, t: &String) {
    if !set.contains(t) {
        set.insert(t.clone());
    }
}

/// The effects of tasks given back (free their slots, count them, tell watchers and the other
/// replicas, wake the scheduler). The core implements it; the scheduler and the sweeper sit
/// below the core and hold it as a trait object, so imports keep pointing down.
pub trait OnRequeue: Send + Sync + std::fmt::Debug {
    /// Runs after the commit that gave `requeued` back.
    fn requeued(&self, requeued: &[Requeued]);
}

/// Requeues with no effects, for the tests of placement.
#[cfg(test)]
#[derive(Debug)]
pub(crate) struct NoEffects;

#[cfg(test)]
impl OnRequeue for NoEffects {
    fn requeued(&self, _: &[Requeued]) {}
}

#[cfg(test)]
impl Scheduler {
    /// A scheduler for the unit tests over `store` and `registry`: round robin, batches of 100,
    /// a tick a minute apart, one-minute leases, no effects of requeues.
    pub(crate) fn for_tests(store: Store, registry: Registry) -> Self {
        let config = SchedulerConfig {
            strategy: Strategy::RoundRobin,
            batch_size: 100,
            poll_interval: Duration::from_secs(60),
            lease: Duration::from_secs(60),
        };
        let stats = Arc::new(SchedulerStats::default());
        Scheduler::new(config, store, registry, Wake::default(), Events::new(), Arc::new(NoEffects), stats)
    }
}

/// Counters shown on `/health`.
#[derive(Debug, Default)]
pub struct SchedulerStats {
    pub tasks_assigned: AtomicU64,
    pub assignments_failed: AtomicU64,
    pub poll_cycles: AtomicU64,
}

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub strategy: Strategy,
    pub batch_size: u32,
    pub poll_interval: Duration,
    /// The lease a new assignment gets (`stale_task_timeout`).
    pub lease: Duration,
}

#[derive(Debug)]
pub struct Scheduler {
    shared: Shared,
    wake: Wake,
    placing: Placing,
}

/// What the passes, placement at submission ([`AtSubmission`]) and refills ([`Refiller`])
/// share: the settings, the store they claim from, the workers they push to, where the
/// outcomes go, and the backlog hints. Cheap to clone.
#[derive(Debug, Clone)]
struct Shared {
    config: SchedulerConfig,
    store: Store,
    registry: Registry,
    events: Events,
    effects: Arc<dyn OnRequeue>,
    stats: Arc<SchedulerStats>,
    backlog: Backlog,
}

impl Scheduler {
    pub fn new(
        config: SchedulerConfig,
        store: Store,
        registry: Registry,
        wake: Wake,
        events: Events,
        effects: Arc<dyn OnRequeue>,
        stats: Arc<SchedulerStats>,
    ) -> Self {
        let backlog = Backlog::default();
        let shared = Shared { config, store, registry, events, effects, stats, backlog };
        Self { shared, wake, placing: Placing::default() }
    }

    /// What places submissions on this replica's free workers as they are stored, taking
    /// placement's turn with this scheduler's passes.
    pub fn at_submission(&self) -> AtSubmission {
        AtSubmission { shared: self.shared.clone(), placing: self.placing.clone() }
    }

    /// What completes batches of reports and refills the slots they free, beside this
    /// scheduler's passes.
    pub fn refiller(&self) -> Refiller {
        Refiller { shared: self.shared.clone() }
    }

    /// Runs passes on every tick and wake-up until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(self.shared.config.poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
                _ = self.wake.notified() => {}
            }
            // Keep going while passes come back full: there may be more runnable work.
            loop {
                if shutdown.is_cancelled() {
                    break;
                }
                match self.pass().await {
                    Ok(Pass::Full) => continue,
                    Ok(Pass::Done) => break,
                    Err(error) => {
                        warn!(%error, "scheduler pass failed");
                        // The database is down or busy: wait for the next tick rather than spin.
                        break;
                    }
                }
            }
        }
        debug!("scheduler stopped");
        Ok(())
    }

    /// One pass: claim, place, persist, push.
    pub async fn pass(&mut self) -> crate::store::Result<Pass> {
        self.shared.stats.poll_cycles.fetch_add(1, Ordering::Relaxed);
        metrics::poll_cycle();
        // How much to claim, and of which types. Placement looks at the workers again once the
        // candidates are locked (see below).
        let (workers, _) = self.shared.registry.schedulable();
        let offering: Vec<&placement::WorkerSlot> = workers.iter().filter(|w| w.free > 0).collect();
        let free: u32 = offering.iter().map(|w| w.free).sum();
        if free == 0 {
            return Ok(Pass::Done);
        }
        let filter = ClaimFilter { types: offered_types(&offering), shapes: Shapes::of(&workers) };
        let limit = free.min(self.shared.config.batch_size);
        let strategy = self.shared.config.strategy;
        let mut sessions = HashMap::new();
        let mut tally = Tally::default();
        // Placement's turn, taken once there are candidates to place and held until their
        // pushes are done. A submission placing its own tasks holds it for one insert: then
        // this pass places nothing, waits for it and goes again.
        let mut turn = None;
        let mut busy = false;
        let (registry, placing) = (&self.shared.registry, &self.placing);
        let assignments = match self
            .shared
            .store
            .claim_fenced(limit, &filter, self.shared.config.lease, |candidates, allowances| {
                let Ok(mut held) = placing.0.clone().try_lock_owned() else {
                    busy = true;
                    return Placement::default();
                };
                // The workers as they are now, not as they were when the pass began: the wait for
                // the database can be long, and a task submitted meanwhile was submitted to the
                // workers connected since, not only to those connected before.
                let (workers, fence) = registry.schedulable();
                sessions.clone_from(&fence);
                let placed = placement::place(strategy, candidates, &workers, &mut held, allowances);
                tally = Tally::of(candidates, &placed, allowances);
                turn = Some(held);
                Placement { placed: placed.placed, sessions: fence }
            })
            .await
        {
            Ok(a) => a,
            Err(e) => {
                // The commit's outcome may be unknown: tasks may be assigned to workers that
                // will never hear of them. The reconciliation finds and returns them.
                self.shared.registry.request_reconcile();
                return Err(e);
            }
        };
        if busy {
            drop(self.placing.0.lock().await);
            return Ok(Pass::Full);
        }
        let full = tally.after(&self.shared.backlog, Some(&filter.types), assignments.len(), limit);
        let undelivered = self.shared.deliver(assignments, &sessions, &[]);
        drop(turn);
        if !undelivered.is_empty() {
            self.shared.give_back(&undelivered).await?;
            return Ok(Pass::Done);
        }
        Ok(if full { Pass::Full } else { Pass::Done })
    }
}

/// What a claim for `offering` (workers with free slots) asks for: every type when one of them
/// takes any, with the types of those that take only some (copied once each: a fleet has many
/// workers and few types).
fn offered_types(offering: &[&placement::WorkerSlot]) -> TypeFilter {
    let mut specialized: Vec<&String> = offering.iter().flat_map(|w| w.capabilities.iter()).collect();
    specialized.sort_unstable();
    specialized.dedup();
    let specialized: Vec<String> = specialized.into_iter().cloned().collect();
    match (offering.iter().any(|w| w.capabilities.is_empty()), specialized.is_empty()) {
        (true, true) => TypeFilter::Any,
        (true, false) => TypeFilter::AnyAnd(specialized),
        (false, _) => TypeFilter::Only(specialized),
    }
}

/// What one placement of claimed candidates saw, for the backlog hints ([`Backlog::after_pass`]).
#[derive(Debug, Default)]
struct Tally {
    /// The types of the candidates placed, and of those left pending.
    took: Vec<String>,
    left: Vec<String>,
    /// The concurrency limits of the candidates' types, as the claim found them.
    limits: crate::store::Allowances,
    affinity: (u32, u32),
}

impl Tally {
    fn of(
        candidates: &[Candidate],
        placed: &placement::Placed,
        allowances: &crate::store::Allowances,
    ) -> Self {
        let mut tally = Tally {
            limits: allowances.clone(),
            affinity: (placed.affinity_hits, placed.affinity_misses),
            ..Tally::default()
        };
        let placed_ids: HashSet<TaskId> = placed.placed.iter().map(|(t, _)| *t).collect();
        for c in candidates {
            let side = if placed_ids.contains(&c.id) { &mut tally.took } else { &mut tally.left };
            if !side.contains(&c.task_type) {
                side.push(c.task_type.clone());
            }
        }
        tally
    }

    /// Counts the affinity placements and updates the backlog hints after a claim of `limit`
    /// that assigned `claimed`; answers whether it came back full (there may be more).
    ///
    /// `offered`: the types the claim asked for, `None` for a refill ([`Backlog::after_pass`]).
    fn after(&self, backlog: &Backlog, offered: Option<&TypeFilter>, claimed: usize, limit: u32) -> bool {
        if self.affinity != (0, 0) {
            metrics::affinity_placements(self.affinity.0, self.affinity.1);
        }
        let full = claimed as u32 >= limit && claimed > 0;
        backlog.after_pass(offered, &self.took, &self.left, &self.limits, full);
        full
    }
}

impl Shared {
    /// Pushes each assignment into its worker's stream under the session it was made for; the
    /// attempts that could not be pushed (the worker went, or its session changed) come back, to
    /// be given back to pending.
    ///
    /// `freeing`: the assignments fill slots that these attempts free ([`Registry::push_freeing`]).
    fn deliver(
        &self,
        assignments: Vec<Assignment>,
        sessions: &HashMap<WorkerId, uuid::Uuid>,
        freeing: &[Held],
    ) -> Vec<Held> {
        let Shared { registry, events, stats, .. } = self;
        let mut undelivered = Vec::new();
        let now = Utc::now();
        // Each push counts only its worker's attempts: looked up, not scanned for each push.
        let mut theirs: HashMap<&WorkerId, Vec<&Held>> = HashMap::new();
        for h in freeing {
            theirs.entry(&h.worker_id).or_default().push(h);
        }
        for a in assignments {
            let latency = (now - a.created_at).to_std().unwrap_or_default();
            let task_id = a.task_id;
            let held = Held { task_id, worker_id: a.worker_id.clone(), attempt: a.attempt };
            let Some(session) = sessions.get(&a.worker_id).copied() else {
                undelivered.push(held);
                continue;
            };
            let freeing = theirs.get(&a.worker_id).into_iter().flatten().copied();
            match registry.push_freeing(a, session, freeing) {
                Ok(()) => {
                    stats.tasks_assigned.fetch_add(1, Ordering::Relaxed);
                    metrics::task_assigned(latency);
                    events.changed(task_id);
                }
                Err(error) => {
                    stats.assignments_failed.fetch_add(1, Ordering::Relaxed);
                    debug!(task_id = %held.task_id, worker_id = %held.worker_id, attempt = held.attempt, %error, "push failed; requeueing");
                    undelivered.push(held);
                }
            }
        }
        undelivered
    }

    /// Gives the attempts [`Self::deliver`] could not push back to pending.
    async fn give_back(&self, undelivered: &[Held]) -> crate::store::Result<()> {
        match self.store.requeue_undelivered(undelivered).await {
            Ok(requeued) => self.effects.requeued(&requeued),
            Err(e) => {
                // Still assigned to workers that never heard of them: the reconciliation returns them.
                self.registry.request_reconcile();
                return Err(e);
            }
        }
        warn!(count = undelivered.len(), "assignments could not be pushed and went back to pending");
        Ok(())
    }
}

/// How a pass ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// It claimed as many as it could take: run another.
    Full,
    Done,
}

#[cfg(test)]
mod tests {
    use std::any::Any;

    use super::*;
    use crate::{
        domain::WorkerId,
        registry::RegistryConfig,
        store::{
            WorkerRegistration,
            testing::{self, TestDb},
        },
    };

    /// Takes the only connection of `store`'s pool (the writer's, on SQLite) until dropped.
    async fn hold_only_connection(store: &Store) -> Box<dyn Any + Send> {
        match store {
            Store::Postgres(s) => Box::new(s.pool().acquire().await.expect("acquire")),
            Store::Sqlite(s) => Box::new(s.pool().acquire().await.expect("acquire")),
        }
    }

    /// A pass that begins while one worker is connected and waits for the database while two
    /// more connect and a batch is submitted places the batch on all three: placement sees the
    /// workers as they are once the candidates are locked, not as they were when it began.
    async fn a_pass_places_on_the_workers_connected_when_it_claims(db: TestDb) {
        let (registry, _dead) = Registry::new(RegistryConfig::for_tests(), db.store.clone(), Wake::default());
        let mut streams = Vec::new();
        let connect = |id: &'static str| {
            let registry = registry.clone();
            async move {
                registry.register(testing::registration(id, 10)).await.expect("register");
                registry.attach(&WorkerId::from(id), None).expect("attach").1
            }
        };
        streams.push(connect("a").await);

        // The scheduler's own pool has one connection, held here: its pass waits for it.
        let mut cfg = testing::db_config(&db.url);
        cfg.max_open_conns = 1;
        let store = Store::connect(&cfg).await.expect("connect");
        let held = hold_only_connection(&store).await;
        let mut scheduler = Scheduler::for_tests(store.clone(), registry.clone());
        let stats = scheduler.shared.stats.clone();
        let pass = tokio::spawn(async move { scheduler.pass().await });
        // One thread: once the pass has counted itself it has looked at the workers and waits.
        while stats.poll_cycles.load(Ordering::Relaxed) == 0 {
            tokio::task::yield_now().await;
        }

        streams.push(connect("b").await);
        streams.push(connect("c").await);
        let tasks: Vec<_> = (0..9).map(|_| testing::new_task("prove")).collect();
        db.store.create_tasks(&tasks).await.expect("submit");
        drop(held);
        pass.await.expect("pass task").expect("pass");

        for (id, stream) in ["a", "b", "c"].into_iter().zip(&mut streams) {
            let mut pushed = 0;
            while stream.try_recv().is_ok() {
                pushed += 1;
            }
            let held = db.store.held_by(&WorkerId::from(id)).await.expect("held_by").len();
            assert_eq!((pushed, held), (3, 3), "worker {id}: pushed and held, of 9 over 3 workers");
        }
        store.close().await;
        db.cleanup().await;
    }

    /// A worker that takes any type and one that takes only `b`, one slot each; five `a` tasks
    /// are older than the one `b`. One pass runs an `a` on the first and the `b` on the second:
    /// the older `a` tasks do not fill the candidates and leave the `b` worker idle.
    async fn a_pass_offers_a_specialized_worker_its_type_behind_older_tasks_of_others(db: TestDb) {
        let (registry, _dead) = Registry::new(RegistryConfig::for_tests(), db.store.clone(), Wake::default());
        let mut streams = Vec::new();
        for (id, caps) in [("any", vec![]), ("only-b", vec!["b".to_owned()])] {
            let registration = WorkerRegistration { capabilities: caps, ..testing::registration(id, 1) };
            registry.register(registration).await.expect("register");
            streams.push(registry.attach(&WorkerId::from(id), None).expect("attach").1);
        }
        let older: Vec<_> = (0..5).map(|_| testing::new_task("a")).collect();
        db.store.create_tasks(&older).await.expect("submit");
        let b = testing::new_task("b");
        db.store.create_tasks(std::slice::from_ref(&b)).await.expect("submit");

        let mut scheduler = Scheduler::for_tests(db.store.clone(), registry.clone());
        scheduler.pass().await.expect("pass");

        let held = |id: &'static str| {
            let store = db.store.clone();
            async move {
                let held = store.held_by(&WorkerId::from(id)).await.expect("held_by");
                held.iter().map(|h| h.task_id).collect::<Vec<_>>()
            }
        };
        assert_eq!(held("any").await, vec![older[0].id], "the first task goes to the worker of any type");
        assert_eq!(held("only-b").await, vec![b.id], "the b task goes to the b worker in the same pass");
        drop(streams);
        db.cleanup().await;
    }

    #[tokio::test]
    async fn a_pass_offers_a_specialized_worker_its_type_behind_older_tasks_of_others_sqlite() {
        a_pass_offers_a_specialized_worker_its_type_behind_older_tasks_of_others(TestDb::sqlite().await)
            .await;
    }

    #[tokio::test]
    #[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
    async fn a_pass_offers_a_specialized_worker_its_type_behind_older_tasks_of_others_postgres() {
        let db = TestDb::postgres().await.expect("TEST_DATABASE_URL");
        a_pass_offers_a_specialized_worker_its_type_behind_older_tasks_of_others(db).await;
    }

    #[tokio::test]
    async fn a_pass_places_on_the_workers_connected_when_it_claims_sqlite() {
        a_pass_places_on_the_workers_connected_when_it_claims(TestDb::sqlite().await).await;
    }

    #[tokio::test]
    #[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
    async fn a_pass_places_on_the_workers_connected_when_it_claims_postgres() {
        let db = TestDb::postgres().await.expect("TEST_DATABASE_URL");
        a_pass_places_on_the_workers_connected_when_it_claims(db).await;
    }
}
