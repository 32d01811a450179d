//! What the live fleet can run, as every replica sees it: the live rows of the `workers` table
//! (ACTIVE or SUSPECT and heard from lately, whichever replica the worker is connected to), with
//! this replica's own sessions laid over them (they are in memory, so fresher). Submissions are
//! checked against it (a type no live worker declared is warned about, or refused), and a
//! pending task is told why it waits ([`FleetView::waiting`], a pure function).
//!
//! The database's part is read at most once per [`FRESH_FOR`] and shared by every caller. A
//! submission whose type is missing from that read reads again unless the read is younger than
//! [`RECHECK_AFTER`]: a worker that just registered on another replica is seen at once, and a
//! flood of submissions of a type nobody runs costs at most a few reads a second.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use chrono::{DateTime, SecondsFormat, Utc};
use uuid::Uuid;

use crate::{
    domain::{PendingReason, Task, TaskState, TypeLimit, Waiting, WorkerId, WorkerRecord, WorkerState},
    registry::{Registry, SessionInfo},
    store::{Store, StoreError},
};

/// How long one read of the live workers serves every caller: what another replica's worker
/// did (joined, left, filled its slots) shows within this.
pub const FRESH_FOR: Duration = Duration::from_secs(1);

/// A submission of a type missing from the last read reads again if that read is older.
pub const RECHECK_AFTER: Duration = Duration::from_millis(100);

/// Known types named in a message; the rest are counted.
const MAX_NAMED_TYPES: usize = 12;

/// One read of the database: the live workers and the types' concurrency limits.
#[derive(Debug, Default)]
struct Read {
    workers: Vec<WorkerRecord>,
    limits: Vec<TypeLimit>,
}

/// The fleet handle. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Fleet {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    store: Store,
    registry: Registry,
    /// A row whose heartbeat is older is not live: the worker's replica is gone (the same
    /// threshold that shows such a worker DEAD: 3x the heartbeat timeout).
    silence: Duration,
    /// The last read and when it was made. std Mutex: the value is swapped, never held across
    /// an `.await`.
    read: Mutex<Option<(Instant, Arc<Read>)>>,
    /// Held while reading the database, so callers that find the read stale at the same time
    /// share one read.
    reading: tokio::sync::Mutex<()>,
}

impl Fleet {
    pub fn new(store: Store, registry: Registry, heartbeat_timeout: Duration) -> Self {
        Self {
            shared: Arc::new(Shared {
                store,
                registry,
                silence: heartbeat_timeout * 3,
                read: Mutex::new(None),
                reading: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// The live fleet now: a read of the database no older than [`FRESH_FOR`], with this
    /// replica's sessions as they are.
    pub async fn view(&self) -> Result<FleetView, StoreError> {
        let read = self.rows(FRESH_FOR).await?;
        Ok(FleetView::new(&read.workers, &self.shared.registry.sessions()).with_limits(&read.limits))
    }

    /// [`Fleet::view`] for a submission of `types`: when one of them is missing, the database
    /// is read again (unless the read is younger than [`RECHECK_AFTER`]).
    pub async fn view_for(&self, types: &[&str]) -> Result<FleetView, StoreError> {
        let view = self.view().await?;
        if types.iter().all(|t| view.runs(t)) {
            return Ok(view);
        }
        let read = self.rows(RECHECK_AFTER).await?;
        Ok(FleetView::new(&read.workers, &self.shared.registry.sessions()).with_limits(&read.limits))
    }

    /// The live rows, read again when the last read is older than `max_age`.
    async fn rows(&self, max_age: Duration) -> Result<Arc<Read>, StoreError> {
        if let Some(rows) = self.cached(max_age) {
            return Ok(rows);
        }
        let _reading = self.shared.reading.lock().await;
        // Another caller may have read while this one waited.
        if let Some(rows) = self.cached(max_age) {
            return Ok(rows);
        }
        let workers = self.shared.store.live_workers(self.shared.silence).await?;
        let limits = self.shared.store.type_limits().await?;
        let read = Arc::new(Read { workers, limits });
        *self.lock() = Some((Instant::now(), read.clone()));
        Ok(read)
    }

    fn cached(&self, max_age: Duration) -> Option<Arc<Read>> {
        match &*self.lock() {
            Some((at, rows)) if at.elapsed() < max_age => Some(rows.clone()),
            _ => None,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(Instant, Arc<Read>)>> {
        // A panic while holding this lock leaves a plain value behind; keep serving.
        self.shared.read.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A worker that may take work, as the view sees it.
#[derive(Debug, Clone, PartialEq)]
struct LiveWorker {
    session_id: Uuid,
    state: WorkerState,
    /// Empty: any type.
    capabilities: Vec<String>,
    max_concurrent_tasks: u32,
    in_flight: u32,
    labels: BTreeMap<String, String>,
    /// False for a session of this replica without an open task stream. (Another replica's
    /// worker is taken as connected: its row does not say.)
    connected: bool,
}

impl LiveWorker {
    fn runs(&self, task_type: &str) -> bool {
        self.capabilities.is_empty() || self.capabilities.iter().any(|c| c == task_type)
    }

    /// Placement would offer it a task of `weight` slots now.
    fn room_for(&self, weight: u32) -> bool {
        self.state == WorkerState::Active
            && self.connected
            && self.max_concurrent_tasks.saturating_sub(self.in_flight) >= weight.max(1)
    }
}

/// The live workers at one instant. Every decision made from it is a pure function.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FleetView {
    workers: BTreeMap<WorkerId, LiveWorker>,
    /// Types at their concurrency limit: (limit, assigned or running).
    at_limit: BTreeMap<String, (u32, u32)>,
}

impl FleetView {
    /// The database's live rows with this replica's sessions laid over them. A session wins over
    /// the row of the same session (it is fresher: a SUSPECT, draining or DEAD session is no
    /// longer live, whatever the row says yet); a row of a newer session wins over a session the
    /// worker has left (it registered again, here or on another replica).
    pub fn new(rows: &[WorkerRecord], sessions: &[SessionInfo]) -> Self {
        let mut workers: BTreeMap<WorkerId, LiveWorker> = rows
            .iter()
            .filter(|r| matches!(r.state, WorkerState::Active | WorkerState::Suspect))
            .map(|r| {
                let w = LiveWorker {
                    session_id: r.session_id,
                    state: r.state,
                    capabilities: r.capabilities.clone(),
                    max_concurrent_tasks: r.max_concurrent_tasks,
                    in_flight: r.in_flight,
                    labels: r.labels.clone(),
                    connected: true,
                };
                (r.id.clone(), w)
            })
            .collect();
        for s in sessions {
            if workers.get(&s.worker_id).is_some_and(|row| row.session_id != s.session_id) {
                continue;
            }
            if matches!(s.state, WorkerState::Active | WorkerState::Suspect) {
                let w = LiveWorker {
                    session_id: s.session_id,
                    state: s.state,
                    capabilities: s.capabilities.clone(),
                    max_concurrent_tasks: s.max_concurrent_tasks,
                    in_flight: s.in_flight,
                    labels: s.labels.clone(),
                    connected: s.connected,
                };
                workers.insert(s.worker_id.clone(), w);
            } else {
                workers.remove(&s.worker_id);
            }
        }
        Self { workers, at_limit: BTreeMap::new() }
    }

    /// The view, knowing the types' concurrency limits.
    pub fn with_limits(mut self, limits: &[TypeLimit]) -> Self {
        self.at_limit = limits
            .iter()
            .filter(|l| l.in_flight >= l.max_in_flight)
            .map(|l| (l.task_type.clone(), (l.max_in_flight, l.in_flight)))
            .collect();
        self
    }

    /// Some live worker declared `task_type` (or takes any type).
    pub fn runs(&self, task_type: &str) -> bool {
        self.workers.values().any(|w| w.runs(task_type))
    }

    /// The types live workers declared, sorted.
    pub fn known_types(&self) -> Vec<String> {
        let set: BTreeSet<&String> = self.workers.values().flat_map(|w| w.capabilities.iter()).collect();
        set.into_iter().cloned().collect()
    }

    /// `no connected worker runs type "x" (known types: a, b)`: the reason a task of a type no
    /// live worker declared waits, in one line.
    pub fn no_worker(&self, task_type: &str) -> String {
        format!("no connected worker runs type {task_type:?} ({})", self.known_list())
    }

    /// The warning a submission of `task_type` answers with when no live worker runs it.
    pub fn unknown_type_warning(&self, task_type: &str) -> String {
        format!("{}; the task waits until a worker that runs it registers", self.no_worker(task_type))
    }

    /// The one-line refusal of a submission whose `types` no live worker runs (with
    /// `tasks.reject_unknown_types` on).
    pub fn refusal(&self, types: &[&str]) -> String {
        let names: Vec<String> = types.iter().map(|t| format!("{t:?}")).collect();
        let (noun, verb) = if types.len() == 1 { ("type", "is") } else { ("types", "are") };
        format!(
            "task {noun} {} {verb} not run by any connected worker ({}); this coordinator refuses \
             unknown types (tasks.reject_unknown_types)",
            names.join(", "),
            self.known_list()
        )
    }

    fn known_list(&self) -> String {
        let known = self.known_types();
        if self.workers.is_empty() {
            return "no worker is connected".into();
        }
        if known.is_empty() {
            // Unreachable while a worker that takes any type is live; said plainly all the same.
            return "no types declared".into();
        }
        let mut list = known.iter().take(MAX_NAMED_TYPES).cloned().collect::<Vec<_>>().join(", ");
        if known.len() > MAX_NAMED_TYPES {
            list.push_str(&format!(", and {} more", known.len() - MAX_NAMED_TYPES));
        }
        format!("known types: {list}")
    }

    /// Why `task` is not moving, if it is pending, at `now`: no live worker runs its type;
    /// it waits for `run_after` (submitted to run later, or backing off after a failure); every worker that runs its type is busy; or it waits its
    /// turn. The first that applies, in that order: the one the operator can act on first.
    ///
    /// The detail names no counts that move with every assignment, so a watcher hears of a new
    /// reason, not of every change of load.
    pub fn waiting(&self, task: &Task, now: DateTime<Utc>) -> Option<Waiting> {
        if task.state != TaskState::Pending {
            return None;
        }
        let t = task.task_type.as_str();
        let (reason, detail) = if !self.runs(t) {
            (PendingReason::NoWorker, self.no_worker(t))
        } else if let Some(why) = self.unschedulable(task) {
            (PendingReason::Unschedulable, why)
        } else if task.run_after > now {
            (
                PendingReason::Delayed,
                format!(
                    "delayed until {} ({})",
                    task.run_after.to_rfc3339_opts(SecondsFormat::Millis, true),
                    if task.attempt == 0 {
                        "submitted to run then"
                    } else {
                        "backoff after a failed attempt"
                    }
                ),
            )
        } else if let Some((max, running)) = self.at_limit.get(t) {
            (
                PendingReason::TypeLimit,
                format!("type {t:?} is at its concurrency limit ({running} of {max} assigned or running)"),
            )
        } else if let Some(busy) = self.busy(task) {
            (PendingReason::WorkersBusy, busy)
        } else {
            (
                PendingReason::Queued,
                format!("queued behind other pending tasks (a worker that runs type {t:?} has room)"),
            )
        };
        Some(Waiting { reason, detail })
    }

    /// [`FleetView::waiting`] of many tasks; the fleet is looked at once per task type.
    pub fn waiting_each<'a>(
        &self,
        tasks: impl IntoIterator<Item = &'a Task>,
        now: DateTime<Utc>,
    ) -> Vec<Option<Waiting>> {
        let mut by_type: HashMap<&str, Option<Waiting>> = HashMap::new();
        tasks
            .into_iter()
            .map(|t| {
                if t.state != TaskState::Pending || t.run_after > now || t.needs.constrains() {
                    return self.waiting(t, now);
                }
                by_type.entry(t.task_type.as_str()).or_insert_with(|| self.waiting(t, now)).clone()
            })
            .collect()
    }

    /// `Some(detail)` when no live worker that runs the task's type could ever take it: none has
    /// the labels it requires, or none has as many slots as it weighs.
    fn unschedulable(&self, task: &Task) -> Option<String> {
        if !task.needs.constrains() {
            return None;
        }
        let t = task.task_type.as_str();
        let able: Vec<&LiveWorker> = self.workers.values().filter(|w| w.runs(t)).collect();
        if able.iter().any(|w| task.needs.fits(&w.labels, w.max_concurrent_tasks)) {
            return None;
        }
        let noun = if able.len() == 1 { "worker runs" } else { "workers run" };
        let labelled: Vec<&&LiveWorker> =
            able.iter().filter(|w| task.needs.requires.iter().all(|r| r.met_by(&w.labels))).collect();
        Some(if labelled.is_empty() {
            format!(
                "no live worker that runs type {t:?} has the labels it requires ({}; {} live {noun} it)",
                task.needs.requirements_text(),
                able.len()
            )
        } else {
            let largest = labelled.iter().map(|w| w.max_concurrent_tasks).max().unwrap_or(0);
            format!(
                "it weighs {} slots; the largest live worker that could run it has {largest}",
                task.needs.weight
            )
        })
    }

    /// `Some(detail)` when no worker that could run `task` can take it now.
    fn busy(&self, task: &Task) -> Option<String> {
        let task_type = task.task_type.as_str();
        let able: Vec<&LiveWorker> = self
            .workers
            .values()
            .filter(|w| w.runs(task_type) && task.needs.fits(&w.labels, w.max_concurrent_tasks))
            .collect();
        if able.iter().any(|w| w.room_for(task.needs.weight)) {
            return None;
        }
        let full: Vec<&&LiveWorker> =
            able.iter().filter(|w| w.state == WorkerState::Active && w.connected).collect();
        let mut parts = Vec::new();
        if !full.is_empty() {
            let slots: u32 = full.iter().map(|w| w.max_concurrent_tasks).sum();
            let noun = if full.len() == 1 { "worker" } else { "workers" };
            parts.push(format!("{} {noun}, all {slots} slots taken", full.len()));
        }
        if able.len() > full.len() {
            parts.push(format!("{} not heartbeating or not connected", able.len() - full.len()));
        }
        let detail = format!("no worker that runs type {task_type:?} has a free slot ({})", parts.join("; "));
        Some(detail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::TaskId;

    fn row(id: &str, state: WorkerState, caps: &[&str], max: u32, in_flight: u32) -> WorkerRecord {
        WorkerRecord {
            id: id.into(),
            state,
            max_concurrent_tasks: max,
            prefetch: 0,
            capabilities: caps.iter().map(|s| s.to_string()).collect(),
            labels: Default::default(),
            version: String::new(),
            hostname: String::new(),
            session_id: Uuid::now_v7(),
            coordinator_id: "other".into(),
            instance: None,
            connected: true,
            registered_at: Utc::now(),
            last_heartbeat_at: Utc::now(),
            owner_seen_at: Some(Utc::now()),
            in_flight,
        }
    }

    fn session(r: &WorkerRecord, state: WorkerState, in_flight: u32, connected: bool) -> SessionInfo {
        SessionInfo {
            worker_id: r.id.clone(),
            session_id: r.session_id,
            state,
            max_concurrent_tasks: r.max_concurrent_tasks,
            in_flight,
            connected,
            last_seen_at: Utc::now(),
            capabilities: r.capabilities.clone(),
            labels: r.labels.clone(),
        }
    }

    fn pending(task_type: &str) -> Task {
        let now = Utc::now();
        Task {
            id: TaskId::new(),
            task_type: task_type.into(),
            payload: Vec::new(),
            state: TaskState::Pending,
            priority: 0,
            attempt: 0,
            max_attempts: 3,
            failures: 0,
            timeout: Duration::from_secs(60),
            worker_id: None,
            job_id: None,
            idempotency_key: None,
            result: None,
            error: None,
            run_after: now - chrono::Duration::seconds(1),
            lease_expires_at: None,
            created_at: now,
            updated_at: now,
            assigned_at: None,
            started_at: None,
            finished_at: None,
            traceparent: None,
            needs: Default::default(),
        }
    }

    fn reason(view: &FleetView, task: &Task) -> Option<PendingReason> {
        view.waiting(task, Utc::now()).map(|w| w.reason)
    }

    #[test]
    fn a_type_nobody_declared_names_the_known_types() {
        let view = FleetView::new(
            &[
                row("a", WorkerState::Active, &["noop", "echo"], 2, 0),
                row("b", WorkerState::Suspect, &["prime_count"], 2, 0),
            ],
            &[],
        );
        assert!(view.runs("prime_count") && view.runs("echo") && !view.runs("prime"));
        let w = view.waiting(&pending("prime"), Utc::now()).unwrap();
        assert_eq!(w.reason, PendingReason::NoWorker);
        assert_eq!(
            w.detail,
            r#"no connected worker runs type "prime" (known types: echo, noop, prime_count)"#
        );
        assert_eq!(
            view.refusal(&["prime"]),
            r#"task type "prime" is not run by any connected worker (known types: echo, noop, prime_count); this coordinator refuses unknown types (tasks.reject_unknown_types)"#
        );
        let empty = FleetView::default();
        assert_eq!(empty.no_worker("x"), r#"no connected worker runs type "x" (no worker is connected)"#);
    }

    #[test]
    fn a_worker_without_capabilities_runs_every_type() {
        let view = FleetView::new(&[row("any", WorkerState::Active, &[], 1, 0)], &[]);
        assert!(view.runs("whatever"));
        assert_eq!(reason(&view, &pending("whatever")), Some(PendingReason::Queued));
    }

    #[test]
    fn a_long_list_of_known_types_is_cut() {
        let caps: Vec<String> = (0..20).map(|i| format!("t{i:02}")).collect();
        let caps: Vec<&str> = caps.iter().map(String::as_str).collect();
        let view = FleetView::new(&[row("a", WorkerState::Active, &caps, 1, 0)], &[]);
        let detail = view.no_worker("x");
        assert!(detail.ends_with("t11, and 8 more)"), "{detail}");
    }

    #[test]
    fn reasons_in_order_no_worker_then_delayed_then_busy_then_queued() {
        let view = FleetView::new(
            &[
                row("full", WorkerState::Active, &["noop"], 2, 2),
                row("free", WorkerState::Active, &["echo"], 2, 1),
            ],
            &[],
        );
        let now = Utc::now();
        let mut later = pending("nobody");
        later.run_after = now + chrono::Duration::seconds(30);
        assert_eq!(view.waiting(&later, now).unwrap().reason, PendingReason::NoWorker);
        later.task_type = "noop".into();
        let w = view.waiting(&later, now).unwrap();
        assert_eq!(w.reason, PendingReason::Delayed);
        assert!(
            w.detail.starts_with("delayed until ") && w.detail.ends_with("(submitted to run then)"),
            "{}",
            w.detail
        );
        later.attempt = 1;
        let w = view.waiting(&later, now).unwrap();
        assert!(w.detail.ends_with("(backoff after a failed attempt)"), "{}", w.detail);
        let w = view.waiting(&pending("noop"), now).unwrap();
        assert_eq!(w.reason, PendingReason::WorkersBusy);
        assert_eq!(
            w.detail,
            r#"no worker that runs type "noop" has a free slot (1 worker, all 2 slots taken)"#
        );
        assert_eq!(reason(&view, &pending("echo")), Some(PendingReason::Queued));
        let mut running = pending("echo");
        running.state = TaskState::Running;
        assert_eq!(view.waiting(&running, now), None);
    }

    #[test]
    fn a_worker_that_cannot_take_work_now_leaves_the_task_busy() {
        let suspect = row("s", WorkerState::Suspect, &["noop"], 4, 0);
        let view = FleetView::new(std::slice::from_ref(&suspect), &[]);
        let w = view.waiting(&pending("noop"), Utc::now()).unwrap();
        assert_eq!(w.reason, PendingReason::WorkersBusy);
        assert!(
            w.detail.ends_with(r#"type "noop" has a free slot (1 not heartbeating or not connected)"#),
            "{}",
            w.detail
        );
        // A session of this replica without its task stream takes no work either.
        let local = row("l", WorkerState::Active, &["noop"], 4, 0);
        let view = FleetView::new(&[], &[session(&local, WorkerState::Active, 0, false)]);
        assert_eq!(reason(&view, &pending("noop")), Some(PendingReason::WorkersBusy));
    }

    #[test]
    fn this_replicas_sessions_are_laid_over_the_rows() {
        let r = row("w", WorkerState::Active, &["noop"], 2, 0);
        // The session went DEAD or draining: no longer live, whatever the row says yet.
        for state in [WorkerState::Dead, WorkerState::Draining] {
            let view = FleetView::new(std::slice::from_ref(&r), &[session(&r, state, 0, true)]);
            assert!(!view.runs("noop"), "{state}");
        }
        // Its slots are as the session counts them.
        let view = FleetView::new(std::slice::from_ref(&r), &[session(&r, WorkerState::Active, 2, true)]);
        assert_eq!(reason(&view, &pending("noop")), Some(PendingReason::WorkersBusy));
        // A session the worker left (it registered again elsewhere) does not hide the new row.
        let mut old = session(&r, WorkerState::Dead, 0, false);
        old.session_id = Uuid::now_v7();
        let view = FleetView::new(std::slice::from_ref(&r), &[old]);
        assert!(view.runs("noop"));
        // A session with no live row (only this replica knows it yet) counts.
        let view = FleetView::new(&[], &[session(&r, WorkerState::Active, 0, true)]);
        assert!(view.runs("noop"));
        // Rows that are not live do not count.
        let view = FleetView::new(&[row("d", WorkerState::Draining, &["noop"], 1, 0)], &[]);
        assert!(!view.runs("noop"));
    }

    /// A task whose requirements no live worker of its type meets, or that weighs more slots
    /// than any of them has, is unschedulable, with the reason; once such a worker is live it is
    /// not.
    #[test]
    fn a_task_no_live_worker_could_ever_take_is_unschedulable() {
        let mut plain = row("cpu", WorkerState::Active, &["prove"], 4, 0);
        plain.labels.insert("gpu".into(), "a100".into());
        let view = FleetView::new(&[plain.clone()], &[]);
        let mut task = pending("prove");
        task.needs.requires = vec![crate::domain::Requirement::parse("gpu=h100").unwrap()];
        let w = view.waiting(&task, Utc::now()).unwrap();
        assert_eq!(w.reason, PendingReason::Unschedulable);
        assert!(w.detail.contains("gpu=h100"), "{}", w.detail);

        let mut heavy = pending("prove");
        heavy.needs.weight = 8;
        let w = view.waiting(&heavy, Utc::now()).unwrap();
        assert_eq!(w.reason, PendingReason::Unschedulable);
        assert!(w.detail.contains("weighs 8 slots") && w.detail.contains("has 4"), "{}", w.detail);

        let mut gpu = row("gpu", WorkerState::Active, &["prove"], 8, 0);
        gpu.labels.insert("gpu".into(), "h100".into());
        let view = FleetView::new(&[plain, gpu], &[]);
        assert_eq!(reason(&view, &task), Some(PendingReason::Queued));
        assert_eq!(reason(&view, &heavy), Some(PendingReason::Queued));
    }

    #[test]
    fn a_task_of_a_type_at_its_limit_says_so() {
        let view = FleetView::new(&[row("w", WorkerState::Active, &[], 4, 2)], &[]);
        let limit = |max, in_flight| TypeLimit {
            task_type: "licensed".into(),
            max_in_flight: max,
            source: "admin".into(),
            in_flight,
        };
        let at = view.clone().with_limits(&[limit(2, 2)]);
        let w = at.waiting(&pending("licensed"), Utc::now()).unwrap();
        assert_eq!(w.reason, PendingReason::TypeLimit);
        assert!(w.detail.contains("2 of 2"), "{}", w.detail);
        assert_eq!(reason(&at, &pending("other")), Some(PendingReason::Queued));
        assert_eq!(
            reason(&view.with_limits(&[limit(3, 2)]), &pending("licensed")),
            Some(PendingReason::Queued)
        );
    }
}
