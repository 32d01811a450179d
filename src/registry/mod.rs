//! The registry: live worker sessions in memory.
//!
//! `worker_id -> Session { session_id, sender, capabilities, max_concurrent_tasks, in_flight,
//! state, last_seen }`. `RegisterWorker` creates a session (a re-registration replaces it);
//! `ReceiveTasks` attaches a bounded channel whose receiver feeds the gRPC stream; a newer stream
//! replaces an older one, and the older one's cleanup cannot remove the newer.
//!
//! The heartbeat state machine runs here on a timer, in memory:
//! `ACTIVE --heartbeat_timeout--> SUSPECT --3x heartbeat_timeout--> DEAD`, and a heartbeat brings
//! SUSPECT back to ACTIVE. Its decisions are pure functions in the `liveness` submodule; this
//! module applies them and does the effects. The database hears of heartbeats in periodic batches
//! (one statement for all workers) and of every state change at once. DEAD sessions are reported to the sweeper
//! (which requeues their tasks while the session is still the worker's current one in the
//! database) and forgotten after `cleanup_interval`.
//!
//! Ownership is by session: a registration writes a new session and adopts the worker's held
//! tasks in one transaction, and installs the session here atomically with respect to pushes and
//! releases that raced it. A periodic reconciliation compares each session's in-memory slots with
//! the database, drops sessions another replica took over, and counts every correction.

mod liveness;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};
use uuid::Uuid;

use self::liveness::{Heartbeat, Observed, Timeouts, Transition};
pub use crate::domain::FleetCounts as Counts;
use crate::{
    domain::{Assignment, Attempt, TaskId, TaskState, Wake, WorkerId, WorkerSlot, WorkerState},
    metrics,
    store::{Held, HeldRow, Leaving, Registration, Requeued, Store, WorkerRegistration},
};

/// What goes down a worker's task stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Push {
    /// Run this task.
    Run(Assignment),
    /// Stop this attempt of this task: a client cancelled it, or the database no longer gives
    /// it to the worker (a worker that does not run that attempt ignores it).
    Cancel { task_id: TaskId, attempt: Attempt },
}

/// Why a push could not be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    #[error("worker is not registered")]
    UnknownWorker,
    #[error("worker has no open task stream")]
    NoStream,
    #[error("worker's task stream is full")]
    Full,
}

/// A registry error surfaced to callers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("worker {0} is not registered")]
    UnknownWorker(WorkerId),
    #[error("worker {0}'s session was opened by another process")]
    AnotherProcess(WorkerId),
}

/// Why a replica may not take its name.
#[derive(Debug, thiserror::Error)]
pub enum NameError {
    #[error(
        "coordinator.id {id:?} is in use by another running replica (its row in coordinators was \
         refreshed {seen_ms} ms ago, while this one waited): give each replica its own id"
    )]
    Taken { id: String, seen_ms: u64 },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// Timings of the heartbeat machine.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    pub coordinator_id: String,
    pub heartbeat_timeout: Duration,
    pub cleanup_interval: Duration,
    /// How often at most a worker's heartbeats reach the database ([`LIVENESS_WRITE_EVERY`]).
    pub liveness_write_every: Duration,
}

#[cfg(test)]
impl RegistryConfig {
    /// Unit tests' timings: a 30 s heartbeat timeout and cleanup interval, coordinator `c`.
    pub(crate) fn for_tests() -> Self {
        RegistryConfig {
            coordinator_id: "c".into(),
            heartbeat_timeout: Duration::from_secs(30),
            cleanup_interval: Duration::from_secs(30),
            liveness_write_every: LIVENESS_WRITE_EVERY,
        }
    }
}

impl RegistryConfig {
    /// The timings of the heartbeat machine.
    fn timeouts(&self) -> Timeouts {
        Timeouts { heartbeat: self.heartbeat_timeout, cleanup: self.cleanup_interval }
    }

    /// How often the monitor looks at sessions: fine enough to notice a timeout within a tenth
    /// of it, and never busier than every 10 ms.
    fn check_every(&self) -> Duration {
        (self.heartbeat_timeout / 10).clamp(Duration::from_millis(10), Duration::from_secs(1))
    }

    /// How often batched heartbeat times are written.
    fn flush_every(&self) -> Duration {
        (self.heartbeat_timeout / 2).clamp(Duration::from_millis(50), Duration::from_secs(5))
    }

    /// How often in-memory slots are reconciled with the database: a leaked slot costs a worker
    /// capacity for at most two of these.
    fn reconcile_every(&self) -> Duration {
        self.heartbeat_timeout.clamp(Duration::from_millis(500), Duration::from_secs(30))
    }

    /// Whether a flush writes a worker's latest heartbeat, `since` after it last did: once
    /// `liveness_write_every` has passed by half a flush period. Flushes tick at a fixed period,
    /// so a bare `>= liveness_write_every` would fall on the tick at exactly the interval (or,
    /// by the tick's jitter, on the next), and the replica's own row, written at every flush,
    /// would take the total over one row per worker a minute; the half period settles it on the
    /// first tick past the interval (65 s with the default 5 s flushes).
    fn liveness_due(&self, since: Duration) -> bool {
        since >= self.liveness_write_every + self.flush_every() / 2
    }
}

/// How often at most the database learns of a worker's heartbeats (it learns of every state
/// change at once); in practice at the first flush past it (`RegistryConfig::liveness_due`).
/// Other replicas judge a worker by its replica's liveness while that replica is seen, so this
/// bounds writes, not detection.
pub const LIVENESS_WRITE_EVERY: Duration = Duration::from_secs(60);

/// A difference between memory and database seen once, corrected when seen again.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Suspect {
    worker: WorkerId,
    task: TaskId,
    attempt: Attempt,
    kind: CorrectionKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum CorrectionKind {
    StaleSlot,
    MissingSlot,
    Orphan,
}

/// What one reconciliation corrected; all zero in a healthy coordinator.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Corrections {
    /// Slots held for attempts the database no longer gives the worker (freed).
    pub stale_slots: u64,
    /// Running tasks of the worker that held no slot (counted).
    pub missing_slots: u64,
    /// Assignments that never reached the worker (back to pending, uncharged).
    pub orphans: u64,
    /// Sessions another registration replaced (dropped).
    pub superseded: u64,
}

impl Corrections {
    fn record(&self) {
        metrics::inflight_corrections("stale_slot", self.stale_slots);
        metrics::inflight_corrections("missing_slot", self.missing_slots);
        metrics::inflight_corrections("orphan_assignment", self.orphans);
        metrics::inflight_corrections("superseded_session", self.superseded);
    }
}

/// The registry handle. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Registry {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    config: RegistryConfig,
    store: Store,
    /// Wakes the scheduler when a worker becomes schedulable or frees capacity.
    wake: Wake,
    /// std Mutex: every critical section is a few map operations and is never held across an
    /// `.await`; the guard is dropped before any send or I/O.
    state: Mutex<State>,
    /// The sweeper holds the receiver: DEAD sessions whose tasks must be requeued now.
    dead_tx: mpsc::UnboundedSender<DeadSession>,
    /// Wakes the reconciliation at once (after a claim or requeue whose outcome is unknown).
    reconcile_now: tokio::sync::Notify,
    /// This process, as written in this replica's row in `coordinators` at each refresh.
    instance: String,
    /// Set by the first refresh: the instance it replaced may be this replica's previous
    /// process; one replaced by a later refresh is another running process of the same name.
    refreshed: std::sync::atomic::AtomicBool,
    /// The other process found refreshing this replica's row, once one was.
    name_shared_with: Mutex<Option<String>>,
}

/// A session the heartbeat machine declared DEAD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadSession {
    pub worker_id: WorkerId,
    pub session_id: Uuid,
}

#[derive(Debug, Default)]
struct State {
    sessions: HashMap<WorkerId, Session>,
    next_stream_id: u64,
    /// Stamps in-flight entries and releases, so a registration or reconciliation that read the
    /// database can tell what changed while it waited.
    seq: u64,
    /// Registrations waiting on the database, per worker: releases made meanwhile.
    registering: HashMap<WorkerId, Window>,
}

#[derive(Debug, Default)]
struct Window {
    /// Registrations of this worker in progress.
    open: u32,
    /// Seq when the first of them began.
    since: u64,
    released: HashSet<(TaskId, Attempt)>,
}

impl State {
    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Frees `worker`'s slot for (task, attempt), if it holds one for that very attempt (a late
    /// release of an older attempt leaves a newer assignment of the same task alone). The
    /// release is noted for registrations and reconciliations in progress either way.
    fn free_slot(&mut self, worker: &WorkerId, task_id: TaskId, attempt: Attempt) -> Option<InFlight> {
        let seq = self.next_seq();
        if let Some(w) = self.registering.get_mut(worker) {
            w.released.insert((task_id, attempt));
        }
        let s = self.sessions.get_mut(worker)?;
        s.released_seq = seq;
        if s.in_flight.get(&task_id).is_some_and(|f| f.attempt == attempt) {
            s.in_flight.remove(&task_id)
        } else {
            None
        }
    }
}

#[derive(Debug)]
struct Session {
    session_id: Uuid,
    capabilities: Vec<String>,
    labels: BTreeMap<String, String>,
    max_concurrent_tasks: u32,
    /// Assignments the worker queues beyond its slots: placement fills `max_concurrent_tasks +
    /// prefetch`.
    prefetch: u32,
    /// Tasks pushed to this worker and not yet reported, requeued or cancelled.
    in_flight: HashMap<TaskId, InFlight>,
    state: WorkerState,
    last_seen: Instant,
    /// Wall-clock time of the last heartbeat, and whether the database has it yet.
    last_seen_at: DateTime<Utc>,
    heartbeat_dirty: bool,
    /// When the database last learned of a heartbeat of this session (its registration
    /// counts): heartbeats reach it at most every [`LIVENESS_WRITE_EVERY`].
    heartbeat_written: Instant,
    dead_since: Option<Instant>,
    stream: Option<StreamSlot>,
    /// Task streams opened in this session. The registration marks the worker's row connected
    /// for the first; each later one marks it again (a stream that closed cleared it).
    streams_opened: u32,
    /// `State::seq` of the latest release from this session's slots (for reconciliation).
    released_seq: u64,
    /// The worker process that registered it, when the worker names its process.
    instance: Option<String>,
}

#[derive(Debug, Clone)]
struct InFlight {
    attempt: Attempt,
    /// Slots it takes.
    weight: u32,
    /// When this replica last granted or renewed the attempt's lease (at most this late):
    /// absent when unknown (recovered after a restart or from another replica), so that the
    /// next heartbeat renews it in the database.
    lease_from: Option<Instant>,
    /// Known for tasks pushed by this process; absent for tasks recovered after a restart.
    task_type: Option<String>,
    since: Instant,
    /// When the worker's stream took the assignment: the start of the attempt. Absent until
    /// then, and for tasks recovered after a restart.
    delivered: Option<Instant>,
    /// `State::seq` when the entry was made.
    seq: u64,
}

impl InFlight {
    fn recovered(attempt: Attempt, weight: u32, seq: u64) -> Self {
        Self {
            attempt,
            weight,
            lease_from: None,
            task_type: None,
            since: Instant::now(),
            delivered: None,
            seq,
        }
    }
}

/// A task released from a worker's slot: what the duration metric needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Released {
    pub task_type: Option<String>,
    pub elapsed: std::time::Duration,
}

#[derive(Debug)]
struct StreamSlot {
    id: u64,
    /// The gRPC stream of this worker holds the receiver. `None` once the worker deregistered:
    /// the stream sends what is queued, then ends cleanly.
    tx: Option<mpsc::Sender<Push>>,
}

impl StreamSlot {
    fn open(&self) -> Option<&mpsc::Sender<Push>> {
        self.tx.as_ref().filter(|tx| !tx.is_closed())
    }
}

impl Session {
    /// `Err` when `instance` names another process than the one that opened this session: a
    /// process whose session was replaced, or that was refused and goes on, acts for nobody.
    /// Not checked when either side names no process (older clients).
    fn opened_by(&self, worker: &WorkerId, instance: Option<&str>) -> Result<(), RegistryError> {
        match (instance, self.instance.as_deref()) {
            (Some(theirs), Some(mine)) if theirs != mine => {
                Err(RegistryError::AnotherProcess(worker.clone()))
            }
            _ => Ok(()),
        }
    }

    /// Assignments the worker takes at most: its slots and its queue.
    fn capacity(&self) -> u32 {
        self.max_concurrent_tasks.saturating_add(self.prefetch)
    }

    /// Slots its tasks take (each as many as it weighs).
    fn used(&self) -> u32 {
        self.in_flight.values().map(|f| f.weight).sum()
    }

    fn schedulable(&self) -> bool {
        self.state == WorkerState::Active && self.stream.as_ref().is_some_and(|s| s.open().is_some())
    }

    /// Whether the batch of its completions claims its next tasks ([`Registry::refillable`]).
    fn refilled_by_completions(&self) -> bool {
        self.prefetch == 0 && self.schedulable()
    }

    /// This worker as placement sees it. It offers its free slots only while it wants work: any
    /// free slot, or for a worker with a prefetch queue, once half of the queue is free. Its
    /// queue still holds work meanwhile, and the refill then travels in one claim instead of
    /// one per finished task.
    fn slot(&self, id: &WorkerId) -> WorkerSlot {
        let used = self.used();
        let free = self.capacity().saturating_sub(used);
        let wants_work = free > 0 && free >= self.prefetch.div_ceil(2);
        WorkerSlot {
            id: id.clone(),
            capabilities: self.capabilities.clone(),
            free: if wants_work { free } else { 0 },
            in_flight: used,
            max: self.capacity(),
            slots: self.max_concurrent_tasks,
            labels: self.labels.clone(),
        }
    }

    fn info(&self, id: &WorkerId) -> SessionInfo {
        SessionInfo {
            worker_id: id.clone(),
            session_id: self.session_id,
            state: self.state,
            max_concurrent_tasks: self.max_concurrent_tasks,
            in_flight: self.used(),
            connected: self.stream.as_ref().is_some_and(|slot| slot.open().is_some()),
            last_seen_at: self.last_seen_at,
            capabilities: self.capabilities.clone(),
            labels: self.labels.clone(),
        }
    }
}

/// A live worker as listed by the registry.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionInfo {
    pub worker_id: WorkerId,
    pub session_id: Uuid,
    pub state: WorkerState,
    pub max_concurrent_tasks: u32,
    /// Slots its tasks take.
    pub in_flight: u32,
    pub connected: bool,
    pub last_seen_at: DateTime<Utc>,
    /// Task types it runs; empty means any.
    pub capabilities: Vec<String>,
    pub labels: BTreeMap<String, String>,
}

/// A newly registered session.
#[derive(Debug, Clone)]
pub struct Registered {
    pub session_id: Uuid,
    /// Tasks the store says this worker holds: they count against its capacity.
    pub held: Vec<Held>,
    /// Tasks the store had for the worker that it says it does not hold, given back.
    pub requeued: Vec<Requeued>,
}

impl Registry {
    /// Creates the registry and the receiver of DEAD notifications (for the sweeper).
    pub fn new(
        config: RegistryConfig,
        store: Store,
        wake: Wake,
    ) -> (Registry, mpsc::UnboundedReceiver<DeadSession>) {
        let (dead_tx, dead_rx) = mpsc::unbounded_channel();
        let shared = Shared {
            config,
            store,
            wake,
            state: Mutex::new(State::default()),
            dead_tx,
            reconcile_now: tokio::sync::Notify::new(),
            instance: Uuid::now_v7().to_string(),
            refreshed: std::sync::atomic::AtomicBool::new(false),
            name_shared_with: Mutex::new(None),
        };
        (Registry { shared: Arc::new(shared) }, dead_rx)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain maps behind; keep serving.
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn config(&self) -> &RegistryConfig {
        &self.shared.config
    }

    /// Registers a worker (or re-registers it after a restart): a new session, state ACTIVE,
    /// persisted at once together with the adoption of the tasks the worker still holds; those
    /// count against its capacity. The previous session's stream is retired (its queued pushes
    /// go back to pending): the worker opens a new one.
    ///
    /// The session is installed atomically with respect to pushes and releases that happen while
    /// the database call runs: a task released meanwhile is not counted, a task pushed meanwhile
    /// is.
    pub async fn register(&self, reg: WorkerRegistration) -> crate::store::Result<Registered> {
        {
            let mut state = self.lock();
            let seq = state.seq;
            let w = state.registering.entry(reg.id.clone()).or_default();
            if w.open == 0 {
                w.since = seq;
                w.released.clear();
            }
            w.open += 1;
        }
        let held = self.shared.store.register_worker(&reg).await;
        let mut state = self.lock();
        let window = match state.registering.get_mut(&reg.id) {
            Some(w) if w.open > 1 => {
                w.open -= 1;
                Window { open: 0, since: w.since, released: w.released.clone() }
            }
            _ => state.registering.remove(&reg.id).unwrap_or_default(),
        };
        let Registration { held, requeued, weights } = held?;
        let given_back: HashSet<(TaskId, Attempt)> =
            requeued.iter().map(|r| (r.task_id, r.attempt)).collect();
        let seq = state.next_seq();
        let previous = state.sessions.remove(&reg.id);
        let mut in_flight: HashMap<TaskId, InFlight> = held
            .iter()
            .filter(|h| !window.released.contains(&(h.task_id, h.attempt)))
            .map(|h| {
                let weight = weights.get(&h.task_id).copied().unwrap_or(1);
                (h.task_id, InFlight::recovered(h.attempt, weight, seq))
            })
            .collect();
        // Pushed to the previous session while the registration ran: still on their way.
        if let Some(p) = &previous {
            for (task_id, f) in &p.in_flight {
                if f.seq > window.since
                    && !window.released.contains(&(*task_id, f.attempt))
                    && !given_back.contains(&(*task_id, f.attempt))
                {
                    in_flight.insert(*task_id, f.clone());
                }
            }
        }
        let session = Session {
            session_id: reg.session_id,
            capabilities: reg.capabilities.clone(),
            labels: reg.labels.clone(),
            max_concurrent_tasks: reg.max_concurrent_tasks,
            prefetch: reg.prefetch,
            in_flight,
            state: WorkerState::Active,
            last_seen: Instant::now(),
            last_seen_at: Utc::now(),
            heartbeat_dirty: false,
            heartbeat_written: Instant::now(),
            dead_since: None,
            released_seq: seq,
            instance: reg.holding.as_ref().map(|h| h.instance.clone()),
            // The previous session's stream (dropped with `previous`) ends; the worker opens a
            // new one after registering, and pushes never go down a connection it gave up.
            stream: None,
            streams_opened: 0,
        };
        state.sessions.insert(reg.id.clone(), session);
        drop(state);
        drop(previous);
        // Its types are label values from now on, not from the next gauge refresh.
        crate::metrics::task_types::declare(&reg.capabilities);
        self.shared.wake.wake();
        Ok(Registered { session_id: reg.session_id, held, requeued })
    }

    /// Records a heartbeat of process `instance` (when it says). `Err` when the worker is
    /// unknown or already DEAD, or its session was opened by another process (it must register
    /// again). Brings a SUSPECT worker back to ACTIVE.
    pub async fn heartbeat(
        &self,
        worker: &WorkerId,
        instance: Option<&str>,
    ) -> Result<WorkerState, RegistryError> {
        let revived = {
            let mut state = self.lock();
            let Some(s) = state.sessions.get_mut(worker) else {
                return Err(RegistryError::UnknownWorker(worker.clone()));
            };
            // Only the process that opened the session keeps it alive: a heartbeat of another
            // one (its session was replaced, or it was refused and ignores it) says nothing of
            // the session's process.
            s.opened_by(worker, instance)?;
            let beat = liveness::on_heartbeat(s.state);
            let Some(next) = beat.state_after(s.state) else {
                return Err(RegistryError::UnknownWorker(worker.clone()));
            };
            s.last_seen = Instant::now();
            s.last_seen_at = Utc::now();
            s.heartbeat_dirty = true;
            s.state = next;
            ((beat == Heartbeat::Revived).then_some(s.session_id), s.state)
        };
        metrics::heartbeat();
        if let (Some(session), _) = revived {
            info!(worker_id = %worker, "worker is active again");
            metrics::worker_transition(WorkerState::Suspect, WorkerState::Active);
            self.persist_state(worker, session, WorkerState::Active).await;
            self.shared.wake.wake();
        }
        Ok(revived.1)
    }

    /// Drops attempts the store says the worker no longer holds from its in-flight set. Only
    /// the very attempt is dropped: a newer attempt of the same task keeps its slot.
    ///
    /// Nothing is added here: every held task entered the set when it was pushed, or when the
    /// worker registered (from the store). Adding the heartbeat's list back would race a report
    /// that released the task between the lease renewal and this call, and leak the slot.
    pub fn forget_revoked(&self, worker: &WorkerId, revoked: &[Held]) {
        if revoked.is_empty() {
            return;
        }
        let mut state = self.lock();
        for h in revoked {
            state.free_slot(worker, h.task_id, h.attempt);
        }
        drop(state);
        self.shared.wake.wake();
    }

    /// Of the attempts a heartbeat says `worker` runs, those to renew in the database (which
    /// renews the ones still held and revokes the rest): all but the ones whose lease this
    /// replica granted or renewed less than `fresh_for` ago, as its memory says (same session,
    /// same attempt).
    pub fn leases_due(&self, worker: &WorkerId, reported: Vec<Held>, fresh_for: Duration) -> Vec<Held> {
        let state = self.lock();
        let in_flight = state.sessions.get(worker).map(|s| &s.in_flight);
        reported
            .into_iter()
            .filter(|h| {
                in_flight
                    .and_then(|f| f.get(&h.task_id))
                    .filter(|f| f.attempt == h.attempt)
                    .and_then(|f| f.lease_from)
                    .is_none_or(|at| at.elapsed() >= fresh_for)
            })
            .collect()
    }

    /// Notes that the leases of `renewed` were renewed no earlier than `at`.
    pub fn leases_renewed(&self, worker: &WorkerId, renewed: &[Held], at: Instant) {
        let mut state = self.lock();
        let Some(s) = state.sessions.get_mut(worker) else { return };
        for h in renewed {
            if let Some(f) = s.in_flight.get_mut(&h.task_id).filter(|f| f.attempt == h.attempt) {
                f.lease_from = Some(at);
            }
        }
    }

    /// True while `stream_id` is the worker's current task stream.
    pub fn is_current_stream(&self, worker: &WorkerId, stream_id: u64) -> bool {
        let state = self.lock();
        state.sessions.get(worker).and_then(|s| s.stream.as_ref()).is_some_and(|slot| slot.id == stream_id)
    }

    /// Drain: the worker takes no new work; it may still report what it runs. Its task stream
    /// sends what is already queued, then ends cleanly.
    /// `instance`: the process asking, when it says; another one than the session's drains
    /// nothing.
    pub async fn deregister(&self, worker: &WorkerId, instance: Option<&str>) -> Result<u32, RegistryError> {
        let (session, in_flight, from) = {
            let mut state = self.lock();
            let Some(s) = state.sessions.get_mut(worker) else {
                return Err(RegistryError::UnknownWorker(worker.clone()));
            };
            s.opened_by(worker, instance)?;
            let from = s.state;
            s.state = WorkerState::Draining;
            if let Some(slot) = &mut s.stream {
                slot.tx = None;
            }
            (s.session_id, s.used(), from)
        };
        if from != WorkerState::Draining {
            metrics::worker_transition(from, WorkerState::Draining);
            info!(worker_id = %worker, in_flight, "worker is draining");
            self.persist_state(worker, session, WorkerState::Draining).await;
        }
        Ok(in_flight)
    }

    /// Attaches a task stream opened by process `instance` (when it says); a previous stream of
    /// this worker is replaced (its sender dropped, so it ends). Another process than the
    /// session's replaces nothing. Returns the stream's id, for [`Registry::detach`].
    pub fn attach(
        &self,
        worker: &WorkerId,
        instance: Option<&str>,
    ) -> Result<(u64, mpsc::Receiver<Push>), RegistryError> {
        let mut state = self.lock();
        state.next_stream_id += 1;
        let id = state.next_stream_id;
        let Some(s) = state.sessions.get_mut(worker) else {
            return Err(RegistryError::UnknownWorker(worker.clone()));
        };
        if s.state == WorkerState::Dead {
            return Err(RegistryError::UnknownWorker(worker.clone()));
        }
        s.opened_by(worker, instance)?;
        // Assignments never exceed the capacity in flight. A cancel frees its attempt's slot
        // before the worker reads it, and that slot may take an assignment at once: room for as
        // many cancels again, so a cancel waiting here never turns an assignment away.
        let (tx, rx) = mpsc::channel(2 * s.capacity().max(1) as usize);
        s.stream = Some(StreamSlot { id, tx: Some(tx) });
        s.streams_opened = s.streams_opened.saturating_add(1);
        drop(state);
        self.shared.wake.wake();
        Ok((id, rx))
    }

    /// Calls `mark` with the session whose stream `stream_id` is, when it is the worker's
    /// current stream and not the session's first: its row's connected mark is to be set again
    /// (the registration set it for the first, and a stream that closed since may have cleared
    /// it). `mark` runs under the registry's lock, as [`Registry::detach`]'s `closed`: a close
    /// and a reopening of one session are queued in the order they happened here.
    pub fn reopened(&self, worker: &WorkerId, stream_id: u64, mark: impl FnOnce(Uuid)) {
        let state = self.lock();
        let Some(s) = state.sessions.get(worker) else { return };
        if s.streams_opened > 1 && s.stream.as_ref().is_some_and(|slot| slot.id == stream_id) {
            mark(s.session_id);
        }
    }

    /// Detaches stream `stream_id` if it is still the worker's current one (a newer stream is
    /// left alone); if it was, calls `closed` with the session whose stream it was, under the
    /// registry's lock (see [`Registry::reopened`]).
    pub fn detach(&self, worker: &WorkerId, stream_id: u64, closed: impl FnOnce(Uuid)) {
        let mut state = self.lock();
        let Some(s) = state.sessions.get_mut(worker) else { return };
        if s.stream.take_if(|slot| slot.id == stream_id).is_some() {
            closed(s.session_id);
        }
    }

    /// Workers that may take work (ACTIVE, stream open), each with the slots it offers now
    /// (none while it does not want work, see `Session::slot`), and the session each assignment
    /// to them is fenced by. Full workers are listed too: affinity prefers a worker among all
    /// that could run a task, room or not, so that a key keeps its worker.
    pub fn schedulable(&self) -> (Vec<WorkerSlot>, HashMap<WorkerId, Uuid>) {
        let state = self.lock();
        let mut sessions = HashMap::new();
        let mut slots = Vec::new();
        for (id, s) in state.sessions.iter().filter(|(_, s)| s.schedulable()) {
            sessions.insert(id.clone(), s.session_id);
            slots.push(s.slot(id));
        }
        // A stable order makes round-robin fair across passes.
        slots.sort_by(|a, b| a.id.cmp(&b.id));
        (slots, sessions)
    }

    /// Whether a batch of completions by `workers` may refill one of them (see
    /// [`Self::refillable`]): one is schedulable here and has no prefetch queue.
    pub fn refills_any<'a>(&self, mut workers: impl Iterator<Item = &'a WorkerId>) -> bool {
        let state = self.lock();
        workers.any(|w| state.sessions.get(w).is_some_and(|s| s.refilled_by_completions()))
    }

    /// The workers of `completed` (attempts whose completion is about to commit), each offering
    /// the slots those attempts free and nothing more, and their sessions: what a batch of
    /// completions refills ([`crate::store::Refill`]). Only attempts this process holds free
    /// anything; a worker that is not schedulable (draining, suspect, no stream) is left out,
    /// and so is one with a prefetch queue: passes refill it in bulk once half its queue is
    /// free, and its queue hides the wait for them.
    ///
    /// The slots offered are never free for anyone else: they are counted taken until the
    /// attempts are released, and their successors are pushed first ([`Self::push_freeing`]).
    pub fn refillable(&self, completed: &[Held]) -> (Vec<WorkerSlot>, HashMap<WorkerId, Uuid>) {
        let state = self.lock();
        let mut freed: BTreeMap<&WorkerId, u32> = BTreeMap::new();
        for h in completed {
            let Some(s) = state.sessions.get(&h.worker_id) else { continue };
            let weight =
                s.in_flight.get(&h.task_id).filter(|f| f.attempt == h.attempt).map_or(0, |f| f.weight);
            *freed.entry(&h.worker_id).or_default() += weight;
        }
        let mut sessions = HashMap::new();
        let mut slots = Vec::new();
        for (id, freed) in freed {
            let Some(s) = state.sessions.get(id).filter(|s| s.refilled_by_completions()) else { continue };
            sessions.insert(id.clone(), s.session_id);
            let mut slot = s.slot(id);
            slot.free = freed;
            slot.in_flight = slot.in_flight.saturating_sub(freed);
            slots.push(slot);
        }
        (slots, sessions)
    }

    /// Task types some registered (not DEAD) worker can run; `None` means any type.
    pub fn known_types(&self) -> Option<HashSet<String>> {
        let state = self.lock();
        let mut types = HashSet::new();
        for s in state.sessions.values().filter(|s| s.state != WorkerState::Dead) {
            if s.capabilities.is_empty() {
                return None;
            }
            types.extend(s.capabilities.iter().cloned());
        }
        Some(types)
    }

    /// Pushes an assignment down its worker's stream and counts it in flight. `session` is the
    /// session the assignment was made under: a push for a session that has been replaced since
    /// is refused (its task goes back to pending).
    ///
    /// Refused (`Full`) when the task does not fit the worker's slots and queue: placement
    /// counted the slot, but a slot freed and filled again between a placement and its push (a
    /// refill beside a pass, see [`Self::refillable`]) must not take the worker past them.
    pub fn push(&self, a: Assignment, session: Uuid) -> Result<(), PushError> {
        self.push_freeing(a, session, [])
    }

    /// [`Self::push`] into slots that attempts about to be released free (`freeing`, see
    /// [`Self::refillable`]): the task must fit once those of them the worker still counts are
    /// released. Only `freeing`'s attempts of the assignment's worker count: callers pushing a
    /// batch pass each worker its own (the work is per attempt passed, per push).
    pub fn push_freeing<'h>(
        &self,
        a: Assignment,
        session: Uuid,
        freeing: impl IntoIterator<Item = &'h Held>,
    ) -> Result<(), PushError> {
        let mut state = self.lock();
        let seq = state.next_seq();
        let Some(s) = state.sessions.get_mut(&a.worker_id) else {
            return Err(PushError::UnknownWorker);
        };
        if s.session_id != session {
            return Err(PushError::UnknownWorker);
        }
        let leaving: u32 = freeing
            .into_iter()
            .filter(|h| h.worker_id == a.worker_id)
            .filter_map(|h| s.in_flight.get(&h.task_id).filter(|f| f.attempt == h.attempt))
            .map(|f| f.weight)
            .sum();
        if s.used().saturating_sub(leaving).saturating_add(a.weight) > s.capacity() {
            return Err(PushError::Full);
        }
        let Some(tx) = s.stream.as_ref().and_then(|slot| slot.tx.as_ref()) else {
            return Err(PushError::NoStream);
        };
        let (task_id, attempt, task_type, weight) = (a.task_id, a.attempt, a.task_type.clone(), a.weight);
        match tx.try_send(Push::Run(a)) {
            Ok(()) => {
                s.in_flight.insert(
                    task_id,
                    InFlight {
                        attempt,
                        weight,
                        // The claim granted the lease just before this push (milliseconds
                        // at most, against renewals due with a third of the lease left).
                        lease_from: Some(Instant::now()),
                        task_type: Some(task_type),
                        since: Instant::now(),
                        delivered: None,
                        seq,
                    },
                );
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(_)) => Err(PushError::Full),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(PushError::NoStream),
        }
    }

    /// Notes that `worker`'s stream took (task, attempt) now, and returns that instant: the
    /// start of the attempt, for its `running` mark and for a report that lands before it.
    pub fn delivered(&self, worker: &WorkerId, task_id: TaskId, attempt: Attempt) -> Instant {
        let now = Instant::now();
        let mut state = self.lock();
        if let Some(f) = state.sessions.get_mut(worker).and_then(|s| s.in_flight.get_mut(&task_id))
            && f.attempt == attempt
        {
            f.delivered = Some(now);
        }
        now
    }

    /// Whether the session a worker row describes is live, as far as this replica can tell:
    /// its own sessions by memory (the row's session, ACTIVE here; a row this replica's id left
    /// ACTIVE before a restart has no session here), another replica's by the row: ACTIVE, and a
    /// heartbeat written within a liveness write, a flush and a `heartbeat_timeout` (a live
    /// worker's heartbeats reach its row at least that often; a row a replica left behind stops
    /// looking live at most that long after its last write). `active_by_row`: the row's state as
    /// the caller derives it from the row and its replica's liveness.
    pub fn session_live(&self, row: &crate::domain::WorkerRecord, active_by_row: bool) -> bool {
        let config = &self.shared.config;
        if row.coordinator_id == config.coordinator_id {
            let state = self.lock();
            return state
                .sessions
                .get(&row.id)
                .is_some_and(|s| s.session_id == row.session_id && s.state == WorkerState::Active);
        }
        let fresh = config.liveness_write_every + config.flush_every() + config.heartbeat_timeout;
        active_by_row && (Utc::now() - row.last_heartbeat_at).to_std().is_ok_and(|ago| ago <= fresh)
    }

    /// Whether `worker`'s session here is ACTIVE with its task stream open, registered by a
    /// process other than `instance`: a second process under the id, or (for the few
    /// milliseconds until the connection's end reaches this replica) a restart of the first.
    pub fn streamed_by_another_process(&self, worker: &WorkerId, instance: &str) -> bool {
        let state = self.lock();
        state.sessions.get(worker).is_some_and(|s| {
            s.state == WorkerState::Active
                && s.stream.as_ref().is_some_and(|slot| slot.open().is_some())
                && s.instance.as_deref().is_some_and(|other| other != instance)
        })
    }

    /// Drops from `delivered` the attempts this registry knows are over: their worker's session
    /// here no longer holds them (reported, cancelled, requeued, or freed by a reconciliation:
    /// none is still `assigned` under that attempt, or it is about to stop being so). Attempts
    /// of workers without a session here (they moved to another replica, or left) stay: this
    /// replica cannot tell.
    pub fn retain_held(&self, delivered: &mut Vec<(Held, Instant)>) {
        let state = self.lock();
        delivered.retain(|(h, _)| match state.sessions.get(&h.worker_id) {
            Some(s) => s.in_flight.get(&h.task_id).is_some_and(|f| f.attempt == h.attempt),
            None => true,
        });
    }

    /// When `worker`'s stream took (task, attempt), if this process delivered it.
    pub fn delivered_at(&self, worker: &WorkerId, task_id: TaskId, attempt: Attempt) -> Option<Instant> {
        let state = self.lock();
        let f = state.sessions.get(worker)?.in_flight.get(&task_id)?;
        if f.attempt == attempt { f.delivered } else { None }
    }

    /// Tells a worker to stop a task and frees the slot of that attempt, if its session is here
    /// (best effort: a worker that misses it learns from the heartbeat that renews the
    /// attempt's lease, whose answer lists it as revoked).
    pub fn push_cancel(&self, worker: &WorkerId, task_id: TaskId, attempt: Attempt) -> bool {
        let tx = {
            let mut state = self.lock();
            state.free_slot(worker, task_id, attempt);
            let Some(s) = state.sessions.get(worker) else { return false };
            s.stream.as_ref().and_then(|slot| slot.tx.clone())
        };
        self.shared.wake.wake();
        let Some(tx) = tx else { return false };
        match tx.try_send(Push::Cancel { task_id, attempt }) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(push)) => {
                // The stream is busy; deliver the cancellation as soon as there is room.
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_secs(10), tx.send(push)).await;
                });
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Frees a worker's slot for a task (reported, requeued or cancelled) and wakes the
    /// scheduler.
    /// Only the slot of that very attempt is freed: a late release of an older attempt leaves a
    /// newer assignment of the same task alone.
    pub fn release(&self, worker: &WorkerId, task_id: TaskId, attempt: Attempt) -> Option<Released> {
        let freed = self.lock().free_slot(worker, task_id, attempt)?;
        self.shared.wake.wake();
        Some(Released { task_type: freed.task_type, elapsed: freed.since.elapsed() })
    }

    /// The live sessions, ordered by worker id: one pass over the map and one sort,
    /// O(n log n) for n sessions.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        let state = self.lock();
        let mut out: Vec<SessionInfo> = state.sessions.iter().map(|(id, s)| s.info(id)).collect();
        out.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
        out
    }

    /// One worker's session: a single map lookup, O(1) whatever the size of the fleet, so a
    /// caller that looks up each of n workers (`ListWorkers`) does O(n) work, not O(n^2).
    /// It builds nothing for the other sessions.
    pub fn session(&self, worker: &WorkerId) -> Option<SessionInfo> {
        self.lock().sessions.get(worker).map(|s| s.info(worker))
    }

    /// Counts by state and capacity, for `/health` and gauges. DEAD workers have no capacity.
    pub fn counts(&self) -> Counts {
        let state = self.lock();
        let mut c = Counts::default();
        for s in state.sessions.values() {
            c.total += 1;
            match s.state {
                WorkerState::Active => c.active += 1,
                WorkerState::Suspect => c.suspect += 1,
                WorkerState::Dead => c.dead += 1,
                WorkerState::Draining => c.draining += 1,
            }
            if s.stream.is_some() {
                c.streams_open += 1;
            }
            if s.state == WorkerState::Active {
                c.capacity_total += s.max_concurrent_tasks;
                c.capacity_used += s.used().min(s.max_concurrent_tasks);
            }
        }
        c
    }

    /// Closes every open task stream (their senders are dropped). Used at shutdown after the
    /// streams were told to end.
    pub fn close_streams(&self) {
        let mut state = self.lock();
        for s in state.sessions.values_mut() {
            s.stream = None;
        }
    }

    /// Makes sure no other running process goes by this replica's name before it serves. A row
    /// of this name refreshed within three refresh periods belongs to a replica of the same
    /// name still running, or to this replica's previous process, killed moments ago: this
    /// waits a period and a half, and a row refreshed again meanwhile is the other replica's.
    /// (A replica stopped cleanly has removed its row, and one gone longer is not waited for.)
    ///
    /// Once the name is this replica's, the workers' rows that say their process is connected to
    /// it are cleared: a replica that has just started has no connection yet, and a previous
    /// process of this name that was killed left them set (another replica would otherwise
    /// take a restarted worker for a second process under its id).
    pub async fn claim_name(&self) -> Result<(), NameError> {
        self.name_free().await?;
        self.shared.store.disconnect_replica(&self.shared.config.coordinator_id).await?;
        Ok(())
    }

    async fn name_free(&self) -> Result<(), NameError> {
        let (id, every) = (&self.shared.config.coordinator_id, self.shared.config.flush_every());
        let store = &self.shared.store;
        let Some(first) = store.coordinator_row(id).await? else { return Ok(()) };
        if first.seen_ago > every * 3 {
            return Ok(());
        }
        info!(coordinator_id = %id, seen_ms = first.seen_ago.as_millis() as u64,
              "this replica's name was in use moments ago; waiting to see whether that replica still runs");
        tokio::time::sleep(every * 3 / 2).await;
        match store.coordinator_row(id).await? {
            Some(now) if now.last_seen_at > first.last_seen_at => {
                Err(NameError::Taken { id: id.clone(), seen_ms: now.seen_ago.as_millis() as u64 })
            }
            _ => Ok(()),
        }
    }

    /// The other process found writing this replica's row in `coordinators` while it runs: a
    /// second replica given the same `coordinator.id`.
    pub fn name_shared_with(&self) -> Option<String> {
        self.shared.name_shared_with.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Notes in the store that this replica is alive, then writes the heartbeat times it has
    /// not written for `liveness_write_every`, in one statement for all those workers. (While
    /// this replica is seen, its workers' rows are current: it writes every state change.)
    pub async fn flush_heartbeats(&self) -> crate::store::Result<()> {
        let (id, instance) = (&self.shared.config.coordinator_id, &self.shared.instance);
        let replaced = self.shared.store.touch_coordinator(id, instance).await?;
        let first = !self.shared.refreshed.swap(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(other) = replaced.filter(|other| other != instance && !first) {
            error!(coordinator_id = %id, other_instance = %other,
                   "another running replica goes by this replica's coordinator.id: give each replica its own id");
            *self.shared.name_shared_with.lock().unwrap_or_else(|e| e.into_inner()) = Some(other);
        }
        let config = &self.shared.config;
        let now = Instant::now();
        let beats: Vec<(WorkerId, DateTime<Utc>)> = {
            let mut state = self.lock();
            state
                .sessions
                .iter_mut()
                .filter(|(_, s)| {
                    s.heartbeat_dirty && config.liveness_due(now.duration_since(s.heartbeat_written))
                })
                .map(|(id, s)| {
                    s.heartbeat_dirty = false;
                    s.heartbeat_written = now;
                    (id.clone(), s.last_seen_at)
                })
                .collect()
        };
        if let Err(e) = self.shared.store.flush_heartbeats(&beats).await {
            // Put them back so the next flush carries them.
            let mut state = self.lock();
            for (id, _) in &beats {
                if let Some(s) = state.sessions.get_mut(id) {
                    s.heartbeat_dirty = true;
                    s.heartbeat_written =
                        now.checked_sub(config.liveness_write_every + config.flush_every()).unwrap_or(now);
                }
            }
            return Err(e);
        }
        Ok(())
    }

    /// Asks the reconciliation to run now (a claim or requeue whose outcome is unknown).
    pub fn request_reconcile(&self) {
        self.shared.reconcile_now.notify_one();
    }

    /// Drops the sessions of `workers` that a newer registration replaced, as the database says
    /// (another replica announced the registration): the worker moved, and this replica stops
    /// counting it at once rather than at its next reconciliation. As there, a session whose
    /// worker is registering here, or that the database still names, is kept, and its tasks are
    /// not touched: they belong to the newer session.
    pub async fn drop_superseded(&self, workers: Vec<WorkerId>) {
        let mine: Vec<(WorkerId, Uuid)> = {
            let state = self.lock();
            workers
                .into_iter()
                .filter_map(|id| state.sessions.get(&id).map(|s| s.session_id).map(|s| (id, s)))
                .collect()
        };
        if mine.is_empty() {
            return;
        }
        let ids: Vec<WorkerId> = mine.iter().map(|(id, _)| id.clone()).collect();
        let own = match self.shared.store.ownership(&ids).await {
            Ok(own) => own,
            // The reconciliation drops them later.
            Err(error) => return debug!(%error, "could not check sessions replaced elsewhere"),
        };
        let mut state = self.lock();
        for (id, session_id) in mine {
            let replaced = own.sessions.get(&id).is_some_and(|db| *db != session_id);
            if !replaced
                || state.registering.contains_key(&id)
                || state.sessions.get(&id).is_none_or(|s| s.session_id != session_id)
            {
                continue;
            }
            state.sessions.remove(&id);
            info!(worker_id = %id, "worker registered a newer session elsewhere; dropped this one");
        }
    }

    /// Compares each live session's in-memory slots with what the database says the worker
    /// holds. A difference must be seen by two passes in a row (`suspects` carries the first
    /// sighting) before it is corrected, so a report or push in progress is never mistaken for
    /// one: a slot whose attempt the database no longer holds is freed; a running task the
    /// database gives the session takes a slot; an assignment that never reached the worker
    /// goes back to pending, uncharged. A freed slot's attempt is also cancelled on the worker's
    /// stream: it may still run it (a cancel whose announcement was lost), and would otherwise
    /// stop at the answer to its next heartbeat, which renews (and so revokes) an attempt this
    /// replica no longer counts. A session the database says another registration
    /// replaced (the worker moved to another replica) is dropped without touching its tasks.
    pub async fn reconcile(&self, suspects: &mut HashSet<Suspect>) -> crate::store::Result<Corrections> {
        let (workers, seq0) = {
            let state = self.lock();
            let w: Vec<(WorkerId, Uuid)> = state
                .sessions
                .iter()
                .filter(|(_, s)| s.state != WorkerState::Dead)
                .map(|(id, s)| (id.clone(), s.session_id))
                .collect();
            (w, state.seq)
        };
        let mut c = Corrections::default();
        if workers.is_empty() {
            suspects.clear();
            return Ok(c);
        }
        let ids: Vec<WorkerId> = workers.iter().map(|(w, _)| w.clone()).collect();
        let own = self.shared.store.ownership(&ids).await?;
        let mut db_held: HashMap<&WorkerId, HashMap<TaskId, &HeldRow>> = HashMap::new();
        for r in &own.held {
            db_held.entry(&r.held.worker_id).or_default().insert(r.held.task_id, r);
        }
        let mut seen: HashSet<Suspect> = HashSet::new();
        let mut orphans = Vec::new();
        let mut superseded = Vec::new();
        let mut freed = Vec::new();
        {
            let mut state = self.lock();
            let seq = state.next_seq();
            for (id, session_id) in &workers {
                if state.registering.contains_key(id) {
                    continue;
                }
                let Some(s) = state.sessions.get_mut(id).filter(|s| s.session_id == *session_id) else {
                    continue;
                };
                let released_since = s.released_seq > seq0;
                if own.sessions.get(id).is_some_and(|db| db != session_id) {
                    superseded.push(id.clone());
                    continue;
                }
                let empty = HashMap::new();
                let held = db_held.get(id).unwrap_or(&empty);
                let stale: Vec<(TaskId, Attempt)> = s
                    .in_flight
                    .iter()
                    .filter(|(t, f)| f.seq <= seq0 && held.get(t).is_none_or(|r| r.held.attempt != f.attempt))
                    .map(|(t, f)| (*t, f.attempt))
                    .collect();
                for (t, attempt) in stale {
                    let key =
                        Suspect { worker: id.clone(), task: t, attempt, kind: CorrectionKind::StaleSlot };
                    if suspects.contains(&key) {
                        s.in_flight.remove(&t);
                        c.stale_slots += 1;
                        freed.push((id.clone(), t, attempt));
                        warn!(worker_id = %id, task_id = %t, attempt, "reconciliation freed a slot the database no longer holds");
                    } else {
                        seen.insert(key);
                    }
                }
                if released_since {
                    continue;
                }
                for (t, r) in held {
                    if s.in_flight.get(t).is_some_and(|f| f.attempt == r.held.attempt) {
                        continue;
                    }
                    let kind = match r.state {
                        TaskState::Running => CorrectionKind::MissingSlot,
                        _ => CorrectionKind::Orphan,
                    };
                    let key = Suspect { worker: id.clone(), task: *t, attempt: r.held.attempt, kind };
                    if !suspects.contains(&key) {
                        seen.insert(key);
                    } else if kind == CorrectionKind::MissingSlot {
                        s.in_flight.insert(*t, InFlight::recovered(r.held.attempt, r.weight, seq));
                        c.missing_slots += 1;
                        warn!(worker_id = %id, task_id = %t, attempt = r.held.attempt, "reconciliation counted a running task the worker holds");
                    } else {
                        orphans.push(r.held.clone());
                    }
                }
            }
            for id in &superseded {
                state.sessions.remove(id);
            }
        }
        *suspects = seen;
        for (id, t, attempt) in &freed {
            self.push_cancel(id, *t, *attempt);
        }
        for id in &superseded {
            c.superseded += 1;
            info!(worker_id = %id, "worker registered a newer session elsewhere; dropped this one");
        }
        if !orphans.is_empty() {
            let requeued = self.shared.store.requeue_undelivered(&orphans).await?;
            c.orphans += requeued.len() as u64;
            for r in &requeued {
                warn!(task_id = %r.task_id, worker_id = %r.worker_id, attempt = r.attempt,
                      "reconciliation returned an assignment that never reached its worker");
                metrics::task_requeued(r.reason);
            }
            if !requeued.is_empty() {
                self.shared.wake.wake();
            }
        }
        c.record();
        Ok(c)
    }

    /// Runs the heartbeat machine, the batched heartbeat flush and the reconciliation until
    /// `shutdown`; flushes once more on the way out.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut check = tokio::time::interval(self.shared.config.check_every());
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut flush = tokio::time::interval(self.shared.config.flush_every());
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reconcile = tokio::time::interval(self.shared.config.reconcile_every());
        reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut suspects = HashSet::new();
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = check.tick() => self.check_liveness().await,
                _ = flush.tick() => {
                    if let Err(error) = self.flush_heartbeats().await {
                        warn!(%error, "failed to flush heartbeats");
                    }
                }
                _ = reconcile.tick() => {
                    if let Err(error) = self.reconcile(&mut suspects).await {
                        warn!(%error, "failed to reconcile worker slots");
                    }
                }
                _ = self.shared.reconcile_now.notified() => {
                    // Two passes: a difference is corrected only when the second sees it too.
                    for _ in 0..2 {
                        tokio::time::sleep(self.shared.config.check_every()).await;
                        if let Err(error) = self.reconcile(&mut suspects).await {
                            warn!(%error, "failed to reconcile worker slots");
                            break;
                        }
                    }
                }
            }
        }
        if let Err(error) = self.flush_heartbeats().await {
            warn!(%error, "failed to flush heartbeats at shutdown");
        }
        // Stopped cleanly: other replicas judge this one's workers by their own heartbeats
        // until they register elsewhere.
        if let Err(error) = self.shared.store.forget_coordinator(&self.shared.config.coordinator_id).await {
            warn!(%error, "failed to remove this replica's row");
        }
        Ok(())
    }

    /// One pass of the state machine over every session.
    pub async fn check_liveness(&self) {
        self.check_liveness_at(Instant::now()).await
    }

    /// One pass of the state machine as of `now`: the decisions come from
    /// [`liveness::next_state`]; this applies them under the lock, then logs, counts, persists
    /// each change and hands DEAD sessions to the sweeper.
    async fn check_liveness_at(&self, now: Instant) {
        let timeouts = self.shared.config.timeouts();
        let mut changes = Vec::new();
        let mut removed = Vec::new();
        {
            let mut state = self.lock();
            state.sessions.retain(|id, s| {
                let observed = Observed {
                    state: s.state,
                    last_heartbeat: s.last_seen,
                    dead_since: s.dead_since,
                    idle: s.in_flight.is_empty() && s.stream.is_none(),
                };
                let transition = liveness::next_state(&observed, now, &timeouts);
                if transition == Transition::Forget {
                    removed.push(id.clone());
                    return false;
                }
                if let Some(next) = transition.to() {
                    changes.push((id.clone(), s.session_id, s.state, next, transition));
                    s.state = next;
                    if next == WorkerState::Dead {
                        s.dead_since = Some(now);
                        s.stream = None;
                        s.in_flight.clear();
                    }
                }
                true
            });
        }
        for id in removed {
            info!(worker_id = %id, "forgot dead worker");
        }
        for (id, session, from, to, transition) in changes {
            if transition == Transition::Left && self.forget_left(&id, session, from).await {
                continue;
            }
            metrics::worker_transition(from, to);
            match transition {
                Transition::Left => {}
                Transition::Dead => {
                    warn!(worker_id = %id, "worker is dead: no heartbeat for 3x heartbeat_timeout")
                }
                _ => warn!(worker_id = %id, from = %from, to = %to, "worker missed its heartbeat"),
            }
            self.persist_state(&id, session, to).await;
            if to == WorkerState::Dead {
                let _ = self.shared.dead_tx.send(DeadSession { worker_id: id, session_id: session });
            }
        }
    }

    /// A drained worker that went quiet leaves: its row is removed and its session forgotten,
    /// so a rollout leaves no DEAD workers behind; a session another registration replaced is
    /// forgotten too. False when the row stays because a task is still charged to that session,
    /// or the database could not be reached: then it is DEAD like any silent worker, and the
    /// sweeper takes back what it holds.
    async fn forget_left(&self, worker: &WorkerId, session: Uuid, from: WorkerState) -> bool {
        let superseded = match self.shared.store.forget_left_worker(worker, session).await {
            Ok(Leaving::Removed) => false,
            Ok(Leaving::Superseded) => true,
            Ok(Leaving::Charged) => {
                info!(worker_id = %worker, "worker left: drained and gone quiet; listed dead while a task is still charged to it");
                return false;
            }
            Err(error) => {
                warn!(%error, worker_id = %worker, "failed to remove a drained worker's row; listing it dead");
                return false;
            }
        };
        let mut state = self.lock();
        if state.sessions.get(worker).is_some_and(|s| s.session_id == session) {
            state.sessions.remove(worker);
        }
        drop(state);
        metrics::worker_left(from);
        if superseded {
            info!(worker_id = %worker, "worker left: drained and gone quiet; it has registered again since");
        } else {
            info!(worker_id = %worker, "worker left: drained and gone quiet");
        }
        true
    }

    async fn persist_state(&self, worker: &WorkerId, session: Uuid, to: WorkerState) {
        let last_seen = self.lock().sessions.get(worker).map_or_else(Utc::now, |s| s.last_seen_at);
        if let Err(error) = self.shared.store.set_worker_state(worker, session, to, last_seen).await {
            warn!(%error, worker_id = %worker, state = %to, "failed to record worker state");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::{
        TypeFilter,
        testing::{self, TestDb},
    };

    fn config() -> RegistryConfig {
        RegistryConfig::for_tests()
    }

    fn registration(id: &str) -> WorkerRegistration {
        testing::registration(id, 4)
    }

    /// Creates a task and assigns it to `worker` in the store (no push).
    async fn assign(store: &Store, worker: &WorkerId) -> Assignment {
        let task = testing::new_task("prove");
        let id = task.id;
        store.create_tasks(&[task]).await.unwrap();
        let w = worker.clone();
        store
            .claim(10, &TypeFilter::Any, Duration::from_secs(60), move |c| {
                c.iter().filter(|c| c.id == id).map(|c| (c.id, w.clone())).collect()
            })
            .await
            .unwrap()
            .remove(0)
    }

    fn in_flight(r: &Registry, w: &WorkerId) -> u32 {
        r.session(w).map(|s| s.in_flight).unwrap_or_default()
    }

    /// The connected mark's changes, as a session's streams come and go: none for the first
    /// stream (its registration set the mark), closed when the current stream detaches, opened
    /// for each later stream; a replaced stream's detach changes nothing, and a new
    /// registration's first stream is again its first.
    #[tokio::test]
    async fn a_sessions_streams_mark_it_closed_and_reopened_in_order() {
        let db = TestDb::sqlite().await;
        let (r, _dead) = Registry::new(config(), db.store.clone(), Wake::default());
        let w = WorkerId::from("w1");
        let session = r.register(registration("w1")).await.unwrap().session_id;
        let marks = std::cell::RefCell::new(Vec::new());
        let open = |r: &Registry| {
            let (id, rx) = r.attach(&w, None).unwrap();
            r.reopened(&w, id, |s| marks.borrow_mut().push((s, true)));
            (id, rx)
        };
        let close = |r: &Registry, id| r.detach(&w, id, |s| marks.borrow_mut().push((s, false)));
        let (first, _rx) = open(&r);
        assert!(marks.borrow().is_empty(), "the registration marked the first");
        close(&r, first);
        let (second, _rx2) = open(&r);
        let (third, _rx3) = open(&r);
        close(&r, second);
        assert_eq!(*marks.borrow(), [(session, false), (session, true), (session, true)]);
        close(&r, third);
        assert_eq!(marks.borrow().last(), Some(&(session, false)));

        let again = r.register(registration("w1")).await.unwrap().session_id;
        marks.borrow_mut().clear();
        let (_, _rx4) = open(&r);
        assert!(marks.borrow().is_empty(), "a new session's first stream: {again}");
    }

    /// Told that workers registered elsewhere, a replica drops only its sessions the database
    /// says a newer registration replaced; one the database still names (the announcement
    /// was older than its own registration) and an unknown worker are left alone, and the
    /// moved worker's task stays where the database has it.
    #[tokio::test]
    async fn only_sessions_replaced_in_the_database_are_dropped() {
        let db = TestDb::sqlite().await;
        let (r, _dead) = Registry::new(config(), db.store.clone(), Wake::default());
        let mut other_cfg = config();
        other_cfg.coordinator_id = "other-replica".into();
        let (other, _other_dead) = Registry::new(other_cfg, db.store.clone(), Wake::default());
        let (moved, stayed) = (WorkerId::from("moved"), WorkerId::from("stayed"));
        r.register(registration("moved")).await.unwrap();
        let task = assign(&db.store, &moved).await;
        // The other replica registered "stayed" first; it registered here since.
        other.register(registration("stayed")).await.unwrap();
        let here = r.register(registration("stayed")).await.unwrap().session_id;
        let elsewhere = other.register(registration("moved")).await.unwrap().session_id;

        r.drop_superseded(vec![moved.clone(), stayed.clone(), WorkerId::from("nobody")]).await;
        assert!(r.session(&moved).is_none(), "replaced in the database: dropped");
        assert_eq!(r.session(&stayed).map(|s| s.session_id), Some(here), "still the database's: kept");
        let t = db.store.get_task(task.task_id).await.unwrap().unwrap();
        assert_eq!((t.attempt, t.worker_id.as_ref()), (1, Some(&moved)), "its task untouched");
        assert_eq!(db.store.get_worker(&moved).await.unwrap().unwrap().session_id, elsewhere);
        db.cleanup().await;
    }

    /// Before their `running` mark, deliveries this registry knows are over are dropped: a
    /// reported attempt and an older attempt of a task; a held one and one of a worker with no
    /// session here stay.
    #[tokio::test]
    async fn deliveries_over_here_are_not_marked_running() {
        let db = TestDb::sqlite().await;
        let r = Registry::new(config(), db.store.clone(), Wake::default()).0;
        let w = WorkerId::from("one");
        let session = r.register(testing::registration("one", 2)).await.unwrap().session_id;
        let (_, _stream) = r.attach(&w, None).unwrap();
        let (a, b) = (assign(&db.store, &w).await, assign(&db.store, &w).await);
        let held = |a: &Assignment| Held { task_id: a.task_id, worker_id: w.clone(), attempt: a.attempt };
        let (held_a, held_b) = (held(&a), held(&b));
        r.push(a, session).unwrap();
        r.push(b, session).unwrap();
        r.release(&w, held_b.task_id, held_b.attempt);
        let elsewhere = Held { worker_id: WorkerId::from("elsewhere"), ..held_b.clone() };
        let older = Held { attempt: held_a.attempt - 1, ..held_a.clone() };
        let now = Instant::now();
        let mut delivered: Vec<_> =
            [&held_a, &held_b, &elsewhere, &older].into_iter().map(|h| (h.clone(), now)).collect();
        r.retain_held(&mut delivered);
        let kept: Vec<Held> = delivered.into_iter().map(|(h, _)| h).collect();
        assert_eq!(kept, vec![held_a, elsewhere]);
        db.cleanup().await;
    }

    /// A refill's push fits only the slots its completed attempts free: with one slot held by
    /// A, a successor freeing A fits and a second does not; once A's slot was released early
    /// (a duplicate report elsewhere) and a pass filled it, the successor no longer fits.
    #[tokio::test]
    async fn a_refill_push_fits_only_the_slots_its_completions_free() {
        let db = TestDb::sqlite().await;
        let r = Registry::new(config(), db.store.clone(), Wake::default()).0;
        let w = WorkerId::from("one");
        let session = r.register(testing::registration("one", 1)).await.unwrap().session_id;
        // The stream is read as the worker would: a push waiting in it counts against the queue.
        let (_, mut stream) = r.attach(&w, None).unwrap();
        let a = assign(&db.store, &w).await;
        let held_a = Held { task_id: a.task_id, worker_id: w.clone(), attempt: a.attempt };
        r.push(a, session).unwrap();
        stream.try_recv().unwrap();
        let freeing = [held_a.clone()];
        let (b, c) = (assign(&db.store, &w).await, assign(&db.store, &w).await);
        r.push_freeing(b.clone(), session, &freeing).expect("B takes A's slot");
        stream.try_recv().unwrap();
        assert!(matches!(r.push_freeing(c.clone(), session, &freeing), Err(PushError::Full)));
        r.release(&w, held_a.task_id, held_a.attempt);
        assert_eq!(in_flight(&r, &w), 1, "B alone");

        // A's slot released before its successor's push, and taken by a placement meanwhile.
        let held_b = Held { task_id: b.task_id, worker_id: w.clone(), attempt: b.attempt };
        r.release(&w, b.task_id, b.attempt);
        let held_c = Held { task_id: c.task_id, worker_id: w.clone(), attempt: c.attempt };
        r.push(c, session).unwrap();
        stream.try_recv().unwrap();
        let d = assign(&db.store, &w).await;
        assert!(matches!(r.push_freeing(d, session, &[held_b]), Err(PushError::Full)));
        assert_eq!(in_flight(&r, &w), 1);

        // The other order: the successor was pushed into the slot released early, and a pass
        // that counted that slot free pushes after it: refused, the worker keeps one task.
        r.release(&w, held_c.task_id, held_c.attempt);
        let (e, f) = (assign(&db.store, &w).await, assign(&db.store, &w).await);
        r.push_freeing(e, session, &[held_c]).expect("the successor fits the free slot");
        stream.try_recv().unwrap();
        assert!(matches!(r.push(f, session), Err(PushError::Full)));
        assert_eq!(in_flight(&r, &w), 1);
        db.cleanup().await;
    }

    /// A worker that deregistered and holds nothing is gone after one heartbeat_timeout of
    /// silence, not three (it is not listed as draining, then dead, for a minute after a clean
    /// stop); a draining worker that still holds a task keeps the usual 3x.
    async fn a_drained_worker_that_went_quiet_leaves_after_one_heartbeat_timeout(db: TestDb) {
        let mut cfg = config();
        cfg.heartbeat_timeout = Duration::from_secs(1);
        let (r, _dead) = Registry::new(cfg, db.store.clone(), Wake::default());
        let (gone, busy) = (WorkerId::from("gone"), WorkerId::from("busy"));
        r.register(registration("gone")).await.unwrap();
        assign(&db.store, &busy).await;
        r.register(registration("busy")).await.unwrap();
        assert_eq!(in_flight(&r, &busy), 1, "it holds its task");
        // A third drains here and registers again at another replica before it goes quiet here.
        let moved = WorkerId::from("moved");
        r.register(registration("moved")).await.unwrap();
        r.deregister(&gone, None).await.unwrap();
        r.deregister(&busy, None).await.unwrap();
        r.deregister(&moved, None).await.unwrap();
        let mut other_cfg = config();
        other_cfg.coordinator_id = "other-replica".into();
        let (other, _other_dead) = Registry::new(other_cfg, db.store.clone(), Wake::default());
        let elsewhere = other.register(registration("moved")).await.unwrap().session_id;
        r.check_liveness_at(Instant::now() + Duration::from_millis(1200)).await;
        let state = |w: &WorkerId| r.session(w).map(|s| s.state);
        assert_eq!(state(&gone), None, "left after one timeout: forgotten, not dead");
        assert!(db.store.get_worker(&gone).await.unwrap().is_none(), "and its row removed");
        assert_eq!(state(&busy), Some(WorkerState::Draining), "still holds a task: 3x the timeout");
        assert!(db.store.get_worker(&busy).await.unwrap().is_some());
        assert_eq!(state(&moved), None, "forgotten here");
        let row = db.store.get_worker(&moved).await.unwrap().expect("its new session's row stays");
        assert_eq!((row.session_id, row.state), (elsewhere, WorkerState::Active));
        db.cleanup().await;
    }

    #[tokio::test]
    async fn a_drained_worker_that_went_quiet_leaves_after_one_heartbeat_timeout_sqlite() {
        a_drained_worker_that_went_quiet_leaves_after_one_heartbeat_timeout(TestDb::sqlite().await).await;
    }

    #[tokio::test]
    #[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
    async fn a_drained_worker_that_went_quiet_leaves_after_one_heartbeat_timeout_postgres() {
        a_drained_worker_that_went_quiet_leaves_after_one_heartbeat_timeout(
            TestDb::postgres().await.expect("TEST_DATABASE_URL"),
        )
        .await;
    }

    /// A drained worker whose session is idle here but still has a task charged to it in the
    /// store (an assignment this replica never pushed) is not forgotten: it is DEAD, and its
    /// session goes to the sweeper, which takes the task back.
    async fn a_drained_worker_still_charged_with_a_task_is_dead_not_forgotten(db: TestDb) {
        let mut cfg = config();
        cfg.heartbeat_timeout = Duration::from_secs(1);
        let (r, mut dead) = Registry::new(cfg, db.store.clone(), Wake::default());
        let w = WorkerId::from("charged");
        let session = r.register(registration("charged")).await.unwrap().session_id;
        // Charged to the session in the store, never pushed: the registry holds nothing.
        let charged = assign(&db.store, &w).await;
        r.deregister(&w, None).await.unwrap();
        assert_eq!(in_flight(&r, &w), 0);
        r.check_liveness_at(Instant::now() + Duration::from_millis(1200)).await;
        assert_eq!(r.session(&w).map(|s| s.state), Some(WorkerState::Dead));
        assert_eq!(db.store.get_worker(&w).await.unwrap().map(|w| w.state), Some(WorkerState::Dead));
        let handed = dead.try_recv().expect("its session goes to the sweeper");
        assert_eq!((handed.worker_id, handed.session_id), (w, session));
        let task = db.store.get_task(charged.task_id).await.unwrap().unwrap();
        assert!(task.state.is_held(), "still charged until the sweeper takes it back");
        db.cleanup().await;
    }

    #[tokio::test]
    async fn a_drained_worker_still_charged_with_a_task_is_dead_not_forgotten_sqlite() {
        a_drained_worker_still_charged_with_a_task_is_dead_not_forgotten(TestDb::sqlite().await).await;
    }

    #[tokio::test]
    #[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
    async fn a_drained_worker_still_charged_with_a_task_is_dead_not_forgotten_postgres() {
        a_drained_worker_still_charged_with_a_task_is_dead_not_forgotten(
            TestDb::postgres().await.expect("TEST_DATABASE_URL"),
        )
        .await;
    }

    /// The effects of the heartbeat machine, driven by explicit instants: a silent worker is
    /// SUSPECT (recorded, offered no work), then DEAD (recorded, its slots and stream dropped,
    /// its session handed to the sweeper, its heartbeats refused), then forgotten.
    async fn a_silent_worker_turns_suspect_then_dead_then_is_forgotten(db: TestDb) {
        let (r, mut dead) = Registry::new(config(), db.store.clone(), Wake::default());
        let w = WorkerId::from("w1");
        let session = r.register(registration("w1")).await.unwrap().session_id;
        let (_, mut stream) = r.attach(&w, None).unwrap();
        r.push(assign(&db.store, &w).await, session).unwrap();
        let t0 = Instant::now();
        let state = |r: &Registry| r.session(&w).map(|s| s.state);
        let stored = || async { db.store.get_worker(&w).await.unwrap().map(|w| w.state) };

        r.check_liveness_at(t0 + Duration::from_secs(29)).await;
        assert_eq!(state(&r), Some(WorkerState::Active), "within one heartbeat_timeout");
        r.check_liveness_at(t0 + Duration::from_secs(31)).await;
        assert_eq!(state(&r), Some(WorkerState::Suspect));
        assert_eq!(stored().await, Some(WorkerState::Suspect), "the change is recorded at once");
        assert!(r.schedulable().0.is_empty(), "a suspect worker is offered no work");
        assert_eq!(in_flight(&r, &w), 1, "a suspect worker keeps its tasks");
        assert!(dead.try_recv().is_err(), "nothing for the sweeper yet");

        r.check_liveness_at(t0 + Duration::from_secs(91)).await;
        assert_eq!(state(&r), Some(WorkerState::Dead));
        assert_eq!(stored().await, Some(WorkerState::Dead));
        assert_eq!(dead.try_recv().unwrap(), DeadSession { worker_id: w.clone(), session_id: session });
        assert_eq!(in_flight(&r, &w), 0, "a dead worker holds no slots");
        assert!(matches!(stream.recv().await, Some(Push::Run(_))), "what was queued");
        assert!(stream.recv().await.is_none(), "then its stream ends");
        assert_eq!(
            r.heartbeat(&w, None).await,
            Err(RegistryError::UnknownWorker(w.clone())),
            "it must register again"
        );

        r.check_liveness_at(t0 + Duration::from_secs(91 + 29)).await;
        assert_eq!(state(&r), Some(WorkerState::Dead), "listed for cleanup_interval");
        r.check_liveness_at(t0 + Duration::from_secs(91 + 31)).await;
        assert!(r.session(&w).is_none(), "then forgotten");
        assert!(dead.try_recv().is_err(), "handed to the sweeper once");
        db.cleanup().await;
    }

    #[tokio::test]
    async fn a_silent_worker_turns_suspect_then_dead_then_is_forgotten_sqlite() {
        a_silent_worker_turns_suspect_then_dead_then_is_forgotten(TestDb::sqlite().await).await;
    }

    #[tokio::test]
    #[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
    async fn a_silent_worker_turns_suspect_then_dead_then_is_forgotten_postgres() {
        let db = TestDb::postgres().await.expect("TEST_DATABASE_URL");
        a_silent_worker_turns_suspect_then_dead_then_is_forgotten(db).await;
    }

    /// A heartbeat brings a SUSPECT worker back to ACTIVE, records it and offers it work again.
    #[tokio::test]
    async fn a_heartbeat_brings_a_suspect_worker_back() {
        let db = TestDb::sqlite().await;
        let (r, _dead) = Registry::new(config(), db.store.clone(), Wake::default());
        let w = WorkerId::from("w1");
        r.register(registration("w1")).await.unwrap();
        let (_, _stream) = r.attach(&w, None).unwrap();
        r.check_liveness_at(Instant::now() + Duration::from_secs(31)).await;
        assert_eq!(r.session(&w).unwrap().state, WorkerState::Suspect);
        assert_eq!(r.heartbeat(&w, None).await, Ok(WorkerState::Active));
        assert_eq!(r.session(&w).unwrap().state, WorkerState::Active);
        let stored = db.store.get_worker(&w).await.unwrap().unwrap().state;
        assert_eq!(stored, WorkerState::Active, "the return is recorded");
        assert_eq!(r.schedulable().0.iter().map(|s| &s.id).collect::<Vec<_>>(), vec![&w]);
        db.cleanup().await;
    }

    /// The first refresh of the replica's row may replace its previous process; a process that
    /// writes the row after that is another replica of the same name, and is named.
    #[tokio::test]
    async fn another_process_refreshing_the_replica_s_row_is_named() {
        let db = TestDb::sqlite().await;
        let (r, _dead) = Registry::new(config(), db.store.clone(), Wake::default());
        db.store.touch_coordinator("c", "previous-process").await.unwrap();
        r.flush_heartbeats().await.unwrap();
        assert_eq!(r.name_shared_with(), None, "the first refresh takes the name over");
        r.flush_heartbeats().await.unwrap();
        assert_eq!(r.name_shared_with(), None, "its own refresh");
        db.store.touch_coordinator("c", "twin").await.unwrap();
        r.flush_heartbeats().await.unwrap();
        assert_eq!(r.name_shared_with().as_deref(), Some("twin"));
        db.cleanup().await;
    }

    /// A name last refreshed moments ago by a process that is gone (killed) is taken after a
    /// period and a half; one refreshed meanwhile is refused; an absent row is taken.
    #[tokio::test]
    async fn a_name_is_taken_unless_another_process_keeps_refreshing_it() {
        let db = TestDb::sqlite().await;
        let mut c = config();
        c.heartbeat_timeout = Duration::from_millis(400); // refreshes every 200 ms
        let (r, _dead) = Registry::new(c, db.store.clone(), Wake::default());
        r.claim_name().await.expect("no row");

        db.store.touch_coordinator("c", "killed").await.unwrap();
        let started = Instant::now();
        r.claim_name().await.expect("a row nobody refreshes any more");
        assert!(started.elapsed() >= Duration::from_millis(300), "waited a period and a half");

        let store = db.store.clone();
        let twin = tokio::spawn(async move {
            loop {
                store.touch_coordinator("c", "twin").await.unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let refused = r.claim_name().await.expect_err("a row another process keeps refreshing");
        assert!(matches!(&refused, NameError::Taken { id, .. } if id == "c"), "{refused}");
        twin.abort();
        db.cleanup().await;
    }

    /// Heartbeats are answered in memory: the database learns of a worker's heartbeat at most
    /// once per `liveness_write_every`, while every flush notes that the replica is alive.
    #[tokio::test]
    async fn heartbeats_reach_the_database_at_most_once_per_write_interval() {
        let db = TestDb::sqlite().await;
        let mut c = config();
        c.liveness_write_every = Duration::from_millis(1500);
        // Flushes every 100 ms: a heartbeat is due 50 ms past the interval.
        c.heartbeat_timeout = Duration::from_millis(200);
        let (r, _dead) = Registry::new(c, db.store.clone(), Wake::default());
        let w = WorkerId::from("w1");
        r.register(registration("w1")).await.unwrap();
        let stored = || async { db.store.get_worker(&w).await.unwrap().unwrap() };
        let registered = stored().await.last_heartbeat_at;
        tokio::time::sleep(Duration::from_millis(5)).await;
        for _ in 0..5 {
            r.heartbeat(&w, None).await.unwrap();
            r.flush_heartbeats().await.unwrap();
        }
        let row = stored().await;
        assert_eq!(row.last_heartbeat_at, registered, "within the interval of the registration: not written");
        assert!(row.owner_seen_at.is_some(), "the replica's row was written");
        tokio::time::sleep(Duration::from_millis(1600)).await;
        r.heartbeat(&w, None).await.unwrap();
        r.flush_heartbeats().await.unwrap();
        let written = stored().await.last_heartbeat_at;
        assert!(written > registered, "once the interval passed, the latest heartbeat is written");
        r.heartbeat(&w, None).await.unwrap();
        r.flush_heartbeats().await.unwrap();
        assert_eq!(stored().await.last_heartbeat_at, written, "then not again within the interval");
        db.cleanup().await;
    }

    /// A worker's heartbeat is written at the first flush past the interval, not at the flush
    /// that falls on it: with the replica's own row written at every flush, a write on the
    /// interval itself took the total over one row per worker a minute.
    #[test]
    fn liveness_is_written_at_the_first_flush_past_the_interval() {
        let c = config();
        let (every, flush) = (c.liveness_write_every, c.flush_every());
        assert_eq!((every, flush), (Duration::from_secs(60), Duration::from_secs(5)));
        assert!(!c.liveness_due(every - flush), "a flush before the interval");
        assert!(!c.liveness_due(every), "the flush on the interval");
        assert!(!c.liveness_due(every + Duration::from_millis(20)), "that flush, a little late");
        assert!(c.liveness_due(every + flush), "the next flush");
        assert!(c.liveness_due(every + flush - Duration::from_millis(20)), "that flush, a little early");
    }

    /// A heartbeat's attempts need a database renewal only when this replica did not grant or
    /// renew their lease lately, or does not hold them as reported.
    #[tokio::test]
    async fn leases_granted_lately_need_no_renewal() {
        let db = TestDb::sqlite().await;
        let (r, _dead) = Registry::new(config(), db.store.clone(), Wake::default());
        let w = WorkerId::from("w1");
        let session = r.register(registration("w1")).await.unwrap().session_id;
        let (_, _stream) = r.attach(&w, None).unwrap();
        let a = assign(&db.store, &w).await;
        let held = Held { task_id: a.task_id, worker_id: w.clone(), attempt: a.attempt };
        r.push(a, session).unwrap();
        let stale = Held { attempt: held.attempt + 1, ..held.clone() };
        let unknown = Held { task_id: TaskId::new(), ..held.clone() };
        let due =
            r.leases_due(&w, vec![held.clone(), stale.clone(), unknown.clone()], Duration::from_secs(10));
        assert_eq!(
            due,
            vec![stale, unknown],
            "just pushed: not due; not held as reported: the database decides"
        );
        let due = r.leases_due(&w, vec![held.clone()], Duration::ZERO);
        assert_eq!(due, vec![held.clone()], "its renewal is due");
        r.leases_renewed(&w, std::slice::from_ref(&held), Instant::now());
        assert!(r.leases_due(&w, vec![held.clone()], Duration::from_secs(10)).is_empty(), "just renewed");
        // Taken over by a new session (a reconnect): unknown age, renewed at once.
        r.register(registration("w1")).await.unwrap();
        let due = r.leases_due(&w, vec![held.clone()], Duration::from_secs(10));
        assert_eq!(due, vec![held], "recovered from the store: renew");
        db.cleanup().await;
    }

    /// A worker with a prefetch queue is offered work up to its slots plus its queue, and once
    /// full, again only when half of its queue is free: refills travel in batches.
    #[tokio::test]
    async fn a_prefetching_worker_is_refilled_when_half_its_queue_is_free() {
        let db = TestDb::sqlite().await;
        let (r, _dead) = Registry::new(config(), db.store.clone(), Wake::default());
        let w = WorkerId::from("w1");
        let mut reg = testing::registration("w1", 1);
        reg.prefetch = 4;
        let session = r.register(reg).await.unwrap().session_id;
        let (_, _stream) = r.attach(&w, None).unwrap();
        let free = || r.schedulable().0.first().map(|s| s.free);
        assert_eq!(free(), Some(5), "one slot and a queue of four");
        let mut held = Vec::new();
        for _ in 0..5 {
            let a = assign(&db.store, &w).await;
            held.push((a.task_id, a.attempt));
            r.push(a, session).unwrap();
        }
        // Listed all the same (affinity looks at full workers too), offering nothing.
        assert_eq!(free(), Some(0), "full");
        r.release(&w, held[0].0, held[0].1);
        assert_eq!(free(), Some(0), "one free of a queue of four: not yet");
        r.release(&w, held[1].0, held[1].1);
        assert_eq!(free(), Some(2), "half the queue free: refilled in one go");
        db.cleanup().await;
    }

    /// `sessions()` and `session()` give the same view of every worker, whatever its state;
    /// `session()` of an unknown worker is `None`.
    #[tokio::test]
    async fn sessions_and_session_agree() {
        let db = TestDb::sqlite().await;
        let (r, _dead) = Registry::new(config(), db.store.clone(), Wake::default());
        for id in ["w3", "w1", "w4", "w2", "w0"] {
            r.register(registration(id)).await.unwrap();
        }
        let (_, _stream) = r.attach(&WorkerId::from("w1"), None).unwrap();
        let held = assign(&db.store, &WorkerId::from("w4")).await;
        r.register(registration("w4")).await.unwrap();
        r.check_liveness_at(Instant::now() + Duration::from_secs(31)).await;
        r.heartbeat(&WorkerId::from("w3"), None).await.unwrap();
        r.deregister(&WorkerId::from("w2"), None).await.unwrap();

        let all = r.sessions();
        let ids: Vec<&str> = all.iter().map(|s| s.worker_id.0.as_str()).collect();
        assert_eq!(ids, ["w0", "w1", "w2", "w3", "w4"], "ordered by worker id");
        for s in &all {
            assert_eq!(r.session(&s.worker_id).as_ref(), Some(s));
        }
        let by_id = |id: &str| all.iter().find(|s| s.worker_id.0 == id).unwrap();
        assert!(by_id("w1").connected);
        assert_eq!(by_id("w2").state, WorkerState::Draining);
        assert_eq!(by_id("w3").state, WorkerState::Active);
        assert_eq!(by_id("w0").state, WorkerState::Suspect);
        assert_eq!(by_id("w4").in_flight, 1, "holds {}", held.task_id);
        assert_eq!(r.counts().total as usize, all.len());
        assert!(r.session(&WorkerId::from("nobody")).is_none());
        db.cleanup().await;
    }

    /// A report's release that lands while a registration of the same worker waits on the
    /// database must not be undone by the held set the registration read.
    #[tokio::test]
    async fn a_release_during_a_registration_is_not_counted_back() {
        let db = TestDb::sqlite().await;
        let (r, _dead) = Registry::new(config(), db.store.clone(), Wake::default());
        let w = WorkerId::from("w1");
        r.register(registration("w1")).await.unwrap();
        let a = assign(&db.store, &w).await;
        let Store::Sqlite(sqlite) = &db.store else { unreachable!() };
        // Hold the only writer connection: the registration below waits on it.
        let blocker = sqlite.writer_pool().acquire().await.unwrap();
        let mut register = Box::pin(r.register(registration("w1")));
        assert!(futures::poll!(&mut register).is_pending(), "waiting for the writer");
        // The report of the task commits and frees its slot meanwhile.
        r.release(&w, a.task_id, a.attempt);
        drop(blocker);
        let held = register.await.unwrap().held;
        assert_eq!(held.len(), 1, "the database still said held when the registration read it");
        assert_eq!(in_flight(&r, &w), 0, "the released slot stays free");
        db.cleanup().await;
    }

    #[tokio::test]
    async fn a_registration_retires_the_previous_stream() {
        let db = TestDb::sqlite().await;
        let (r, _dead) = Registry::new(config(), db.store.clone(), Wake::default());
        r.register(registration("w1")).await.unwrap();
        let (_, mut old) = r.attach(&WorkerId::from("w1"), None).unwrap();
        r.register(registration("w1")).await.unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(5), old.recv()).await;
        assert!(matches!(ended, Ok(None)), "the old stream ends: {ended:?}");
        db.cleanup().await;
    }

    /// Reconciliation: a slot the database no longer holds is freed, and an assignment that
    /// never reached the worker goes back to pending uncharged, each only when two passes in a
    /// row see it; a session another registration replaced is dropped without touching tasks.
    #[tokio::test]
    async fn reconciliation_corrects_what_two_passes_see_and_drops_replaced_sessions() {
        let db = TestDb::sqlite().await;
        let (r, _dead) = Registry::new(config(), db.store.clone(), Wake::default());
        let w = WorkerId::from("w1");
        let session = r.register(registration("w1")).await.unwrap().session_id;
        let (_, mut rx) = r.attach(&w, None).unwrap();
        // A pushed task whose completion the database has but whose release never ran.
        let leaked = assign(&db.store, &w).await;
        let (leaked_id, leaked_attempt) = (leaked.task_id, leaked.attempt);
        let leaked_held = Held { task_id: leaked.task_id, worker_id: w.clone(), attempt: leaked.attempt };
        r.push(leaked, session).unwrap();
        db.store
            .complete(&[crate::store::Completion { held: leaked_held, result: Vec::new(), delivered: None }])
            .await
            .unwrap();
        // An assignment in the database that was never pushed (a claim whose outcome was lost).
        let orphan = assign(&db.store, &w).await;
        assert_eq!(in_flight(&r, &w), 1);

        assert!(matches!(rx.try_recv(), Ok(Push::Run(a)) if a.task_id == leaked_id));
        let mut suspects = HashSet::new();
        let first = r.reconcile(&mut suspects).await.unwrap();
        assert_eq!(first, Corrections::default(), "one sighting corrects nothing");
        assert_eq!(in_flight(&r, &w), 1);
        assert!(rx.try_recv().is_err(), "nor tells the worker anything");
        let second = r.reconcile(&mut suspects).await.unwrap();
        assert_eq!((second.stale_slots, second.orphans), (1, 1), "{second:?}");
        assert_eq!(in_flight(&r, &w), 0);
        // The freed attempt is cancelled on the worker's stream, once.
        match rx.try_recv() {
            Ok(Push::Cancel { task_id, attempt }) => {
                assert_eq!((task_id, attempt), (leaked_id, leaked_attempt))
            }
            other => panic!("a cancel of the freed attempt: {other:?}"),
        }
        assert!(rx.try_recv().is_err(), "one cancel");
        let t = db.store.get_task(orphan.task_id).await.unwrap().unwrap();
        assert_eq!((t.state, t.failures), (TaskState::Pending, 0), "back to pending, uncharged");
        assert_eq!(r.reconcile(&mut suspects).await.unwrap(), Corrections::default(), "nothing left");

        // The worker registers on another replica (a new session in the database).
        let moved = assign(&db.store, &w).await;
        let mut elsewhere = registration("w1");
        elsewhere.session_id = Uuid::now_v7();
        db.store.register_worker(&elsewhere).await.unwrap();
        let third = r.reconcile(&mut suspects).await.unwrap();
        assert_eq!(third.superseded, 1);
        assert!(r.session(&w).is_none(), "this replica forgot its old session");
        let t = db.store.get_task(moved.task_id).await.unwrap().unwrap();
        assert_eq!((t.state, t.failures), (TaskState::Assigned, 0), "its tasks untouched");
        db.cleanup().await;
    }
}
