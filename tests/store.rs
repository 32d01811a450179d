//! The store's contract, run against every backend: SQLite always, and Postgres (a fresh schema per
//! test) when `TEST_DATABASE_URL` is set.
//!
//! Each case is an `async fn(&Store)` in [`cases`]; `store_tests!` makes two `#[tokio::test]`s per
//! case, `<case>::sqlite` and `<case>::postgres`, each with a fresh database; without
//! `TEST_DATABASE_URL` the Postgres ones are reported ignored. Assertion messages start with the
//! backend's name.
//!
//! Waits never hope: where a test needs time to pass (a 1 ms lease, a backoff) it polls the clock
//! against the stored timestamp, with a deadline.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::{DateTime, TimeDelta, Timelike, Utc};
use coordinator::{
    cron::CronSpec,
    domain::{
        Assignment, AttemptRecord, Candidate, MissedRuns, NewSchedule, NewTask, RequeueReason, ScheduleId,
        Task, TaskId, TaskState, TaskTemplate, WorkerId, WorkerState,
    },
    store::{
        ClaimFilter, Completion, Failure, FailureGroup, Fired, Held, Holding, Placement, Pruned,
        ReportOutcome, Requeued, Retention, RetryFilter, RetryOutcome, RetryPolicy, Shapes, Store,
        StoreError, TaskFilter, TypeFilter, WorkerRegistration,
        testing::{RefillOn, TestDb},
    },
};
use uuid::Uuid;

/// Two `#[tokio::test]`s per case, `<case>::sqlite` and `<case>::postgres`, each on a fresh
/// database that is cleaned up whether the case passes or fails. The Postgres one is reported
/// as ignored ("needs TEST_DATABASE_URL") when the variable was not set at build time.
macro_rules! store_tests {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::run_case(super::TestDb::sqlite().await, |s| async move { super::cases::$case(&s).await }).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            #[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
            async fn postgres() {
                let db = super::TestDb::postgres().await.expect("TEST_DATABASE_URL is set");
                super::run_case(db, |s| async move { super::cases::$case(&s).await }).await;
            }
        }
    )*};
}

/// Runs one case on `db`, cleans the database up, then fails as the case failed.
async fn run_case<F, Fut>(db: TestDb, case: F)
where
    F: FnOnce(Store) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let outcome = tokio::spawn(case(db.store.clone())).await;
    db.cleanup().await;
    if let Err(e) = outcome {
        match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => panic!("the case did not finish: {e}"),
        }
    }
}

store_tests!(
    // create_tasks
    create_tasks_stores_every_field,
    idempotency_key_returns_the_existing_task,
    same_idempotency_key_twice_in_one_batch_creates_one_task,
    tasks_without_idempotency_key_never_collide,
    // claim
    claim_orders_by_priority_then_age_and_honours_limit,
    claim_skips_tasks_whose_run_after_is_in_the_future,
    a_task_submitted_to_run_later_is_not_claimed_before_its_time,
    claim_type_filter_only_offers_those_types,
    claim_type_filter_any_and_offers_the_first_of_any_type_and_of_each_named_type,
    claim_leaves_tasks_that_place_omits_pending,
    claim_ignores_placements_of_tasks_that_were_not_candidates,
    claim_assigns_attempt_worker_lease_deadline_and_history,
    a_tasks_traceparent_is_stored_and_sent_with_every_assignment,
    // mark_running, renew_leases
    mark_running_applies_only_for_the_holding_worker_and_attempt,
    a_delivery_mark_that_waits_for_a_connection_dates_the_delivery,
    renew_leases_returns_only_tasks_still_held,
    // complete
    complete_applies_once_then_reports_duplicate,
    complete_from_another_worker_is_stale_and_changes_nothing,
    complete_from_an_old_attempt_is_stale,
    complete_of_an_unknown_task_is_not_found,
    complete_batch_returns_one_outcome_per_report_in_order,
    complete_batch_with_a_stale_report_before_the_current_one_for_the_same_task,
    // complete_and_claim
    a_completion_claims_for_the_slots_it_frees_in_its_transaction,
    a_completion_that_changed_nothing_claims_nothing,
    a_refill_for_a_replaced_session_assigns_nothing_and_still_completes,
    a_claim_that_fails_is_undone_alone_and_the_completions_commit,
    // fail
    fail_retriable_goes_back_to_pending_after_backoff,
    fail_retriable_after_max_attempts_is_failed,
    fail_non_retriable_is_failed_at_once,
    fail_repeated_report_is_duplicate,
    fail_from_a_stale_attempt_or_worker_is_stale,
    a_failed_task_names_its_worker_and_a_retried_one_does_not,
    a_lost_attempt_keeps_the_error_of_an_earlier_failure_until_it_fails_the_task,
    // cancel
    cancel_pending_task_has_no_holder,
    cancel_held_task_names_its_holder_and_fences_later_reports,
    cancel_of_a_terminal_task_returns_it_unchanged,
    cancel_of_an_unknown_task_is_none,
    // requeues
    requeue_expired_returns_lapsed_leases_to_pending,
    requeue_expired_fails_a_task_out_of_attempts,
    requeue_expired_respects_its_limit,
    requeue_overdue_takes_back_attempts_past_their_deadline_and_grace,
    requeue_expired_leaves_a_task_completed_before_it,
    requeue_worker_gives_back_every_task_of_that_worker_only,
    // sessions
    a_dead_notice_for_a_replaced_session_takes_nothing,
    a_registration_gives_back_what_the_worker_does_not_hold,
    a_fenced_claim_for_a_replaced_session_assigns_nothing,
    a_reconnect_racing_a_dead_session_cleanup_never_loses_or_double_counts,
    renewals_in_one_batch_match_the_whole_fence,
    a_released_task_is_pending_again_and_not_charged,
    requeue_undelivered_moves_only_assigned_tasks_without_charging,
    held_by_lists_what_a_worker_holds,
    // races
    concurrent_claimers_never_share_a_task,
    completion_racing_requeue_worker_lands_exactly_once,
    // workers
    workers_register_and_list_with_in_flight_counts,
    worker_reregistration_replaces_session_and_fences_state_changes,
    flush_heartbeats_updates_many_workers_and_never_moves_backwards,
    live_workers_are_active_or_suspect_and_heard_from_lately,
    a_worker_stays_live_while_its_replica_is_seen,
    a_replica_s_row_says_which_process_refreshed_it,
    a_closed_stream_or_a_stopped_replica_clears_connected_for_its_session_only,
    worker_stats_count_outcomes_and_duration,
    // jobs, listings, counts
    jobs_track_their_tasks_until_done,
    job_resubmitted_with_known_idempotency_keys_is_done_when_its_tasks_are,
    a_job_key_makes_one_job_even_from_submissions_at_once,
    list_tasks_filters_and_pages_in_id_order,
    task_counts_and_pending_by_type,
    // retention
    prune_deletes_finished_tasks_past_their_age_and_never_unfinished_ones,
    prune_takes_the_oldest_first_a_batch_at_a_time,
    prune_deletes_a_job_once_its_tasks_are_gone,
    prune_deletes_silent_workers_that_hold_nothing,
    prune_runs_on_one_replica_at_a_time,
    // schedules
    schedules_are_created_listed_paused_and_deleted,
    firing_a_due_schedule_creates_each_occurrence_once_even_when_fired_at_once,
    // retries
    retry_task_resets_a_failed_task_and_keeps_its_history,
    retry_task_takes_failed_and_cancelled_tasks_only,
    retry_batch_takes_what_every_filter_matches,
    racing_bulk_retries_retry_each_task_once,
    // jobs as a whole
    list_jobs_pages_newest_first_with_counts,
    cancel_job_cancels_live_tasks_and_names_their_holders,
    // failures summary
    failure_summary_counts_failed_tasks_by_type_and_error_and_attempts_by_outcome,
);

// ---- helpers ----

const LONG_LEASE: Duration = Duration::from_secs(600);
const TINY_LEASE: Duration = Duration::from_millis(1);
/// Slack for comparing a stored timestamp with the test's clock (Postgres keeps microseconds).
const SLACK: TimeDelta = TimeDelta::milliseconds(5);

fn ms(n: i64) -> TimeDelta {
    TimeDelta::milliseconds(n)
}

fn td(d: Duration) -> TimeDelta {
    TimeDelta::from_std(d).expect("duration fits")
}

fn w(id: &str) -> WorkerId {
    WorkerId::from(id)
}

fn new_task(task_type: &str) -> NewTask {
    NewTask {
        id: TaskId::new(),
        task_type: task_type.to_owned(),
        payload: format!("payload of a {task_type}").into_bytes(),
        priority: 0,
        max_attempts: 3,
        timeout: Duration::from_secs(60),
        idempotency_key: None,
        job_id: None,
        run_after: None,
        traceparent: None,
        depends_on: Vec::new(),
        on_parent_failure: Default::default(),
        needs: Default::default(),
    }
}

fn with_attempts(mut t: NewTask, max_attempts: u32) -> NewTask {
    t.max_attempts = max_attempts;
    t
}

/// Creates tasks that must all be new; returns them as stored.
async fn create(s: &Store, tasks: Vec<NewTask>) -> Vec<Task> {
    let created = s.create_tasks(&tasks).await.expect("create_tasks");
    assert_eq!(created.len(), tasks.len(), "{}: one Created per NewTask", s.backend());
    created
        .into_iter()
        .map(|c| {
            assert!(c.created, "{}: task {} should be new", s.backend(), c.task.id);
            c.task
        })
        .collect()
}

async fn create_n(s: &Store, task_type: &str, n: usize) -> Vec<Task> {
    create(s, (0..n).map(|_| new_task(task_type)).collect()).await
}

async fn create_one(s: &Store, t: NewTask) -> Task {
    create(s, vec![t]).await.remove(0)
}

async fn get(s: &Store, id: TaskId) -> Task {
    s.get_task(id).await.expect("get_task").unwrap_or_else(|| panic!("{}: task {id} is missing", s.backend()))
}

async fn attempts(s: &Store, id: TaskId) -> Vec<AttemptRecord> {
    s.attempts(id).await.expect("attempts")
}

async fn all_tasks(s: &Store) -> Vec<Task> {
    s.list_tasks(&TaskFilter { limit: 100_000, ..TaskFilter::default() }).await.expect("list_tasks")
}

fn held(a: &Assignment) -> Held {
    Held { task_id: a.task_id, worker_id: a.worker_id.clone(), attempt: a.attempt }
}

fn held_as(task_id: TaskId, worker: &str, attempt: u32) -> Held {
    Held { task_id, worker_id: w(worker), attempt }
}

fn completion(h: &Held, result: &[u8]) -> Completion {
    Completion { held: h.clone(), result: result.to_vec(), delivered: None }
}

fn failure(h: &Held, error: &str, retriable: bool) -> Failure {
    Failure { held: h.clone(), error: error.to_owned(), retriable, delivered: None }
}

fn policy(base_ms: u64) -> RetryPolicy {
    RetryPolicy { base: Duration::from_millis(base_ms), max: Duration::from_secs(3600) }
}

/// Claims exactly `ids` (in any order) for `worker`; other candidates stay pending. Returns the
/// assignments in the order of `ids`.
async fn claim_ids(s: &Store, ids: &[TaskId], worker: &WorkerId, lease: Duration) -> Vec<Assignment> {
    let want: HashSet<TaskId> = ids.iter().copied().collect();
    let to = worker.clone();
    let got = s
        .claim(10_000, &TypeFilter::Any, lease, move |cands: &[Candidate]| {
            cands.iter().filter(|c| want.contains(&c.id)).map(|c| (c.id, to.clone())).collect()
        })
        .await
        .expect("claim");
    assert_eq!(got.len(), ids.len(), "{}: claimed {got:?}, wanted {ids:?}", s.backend());
    ids.iter().map(|id| got.iter().find(|a| a.task_id == *id).expect("claimed").clone()).collect()
}

/// A fenced claim of every runnable task for `worker` under `session`.
async fn claim_all_for(s: &Store, worker: &str, session: Uuid) -> Vec<Assignment> {
    claim_all_for_n(s, worker, session, 10).await
}

/// A fenced claim of up to `n` runnable tasks for `worker` under `session`.
async fn claim_all_for_n(s: &Store, worker: &str, session: Uuid, n: u32) -> Vec<Assignment> {
    let sessions = HashMap::from([(w(worker), session)]);
    s.claim_fenced(n, &ClaimFilter::types(TypeFilter::Any), LONG_LEASE, |c: &[Candidate], _| Placement {
        placed: c.iter().map(|c| (c.id, w(worker))).collect(),
        sessions,
    })
    .await
    .expect("claim")
}

async fn claim_one(s: &Store, id: TaskId, worker: &str, lease: Duration) -> Held {
    held(&claim_ids(s, &[id], &w(worker), lease).await[0])
}

async fn complete_one(s: &Store, h: &Held, result: &[u8]) -> ReportOutcome {
    let mut out = s.complete(&[completion(h, result)]).await.expect("complete");
    assert_eq!(out.len(), 1, "{}: one outcome per report", s.backend());
    out.remove(0)
}

async fn fail_one(s: &Store, h: &Held, error: &str, retriable: bool, p: RetryPolicy) -> ReportOutcome {
    s.fail(&failure(h, error, retriable), p).await.expect("fail")
}

/// A task of `task_type` that failed at once with `error`.
async fn failed_task(s: &Store, t: NewTask, error: &str) -> Task {
    let id = create_one(s, t).await.id;
    let h = claim_one(s, id, "w1", LONG_LEASE).await;
    let out = fail_one(s, &h, error, false, policy(100)).await;
    assert_eq!(out, ReportOutcome::Applied { state: TaskState::Failed }, "{}", s.backend());
    get(s, id).await
}

/// Polls the clock (bounded) until it is strictly past `t`.
async fn wait_until_past(t: DateTime<Utc>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Utc::now() <= t {
        assert!(Instant::now() < deadline, "the clock did not pass {t} within 10s");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Waits until the lease of `id` has run out, by the stored `lease_expires_at`.
async fn wait_for_lease_to_lapse(s: &Store, id: TaskId) {
    let lease = get(s, id).await.lease_expires_at.expect("a held task has a lease");
    wait_until_past(lease + ms(2)).await;
}

fn assert_within(b: &str, what: &str, t: DateTime<Utc>, lo: DateTime<Utc>, hi: DateTime<Utc>) {
    assert!(lo <= t && t <= hi, "{b}: {what} = {t}, expected within [{lo}, {hi}]");
}

/// The single attempts row of a task's latest attempt.
async fn last_attempt(s: &Store, id: TaskId) -> AttemptRecord {
    attempts(s, id).await.pop().unwrap_or_else(|| panic!("{}: task {id} has no attempts row", s.backend()))
}

/// Declares `worker` DEAD under its current session (registering one first, so the session
/// fence has a session to check) and requeues its tasks.
async fn requeue_dead(s: &Store, worker: &WorkerId) -> coordinator::store::Result<Vec<Requeued>> {
    let session = match s.get_worker(worker).await? {
        Some(r) => r.session_id,
        None => {
            let session = Uuid::now_v7();
            s.upsert_worker(&registration(&worker.0, session)).await?;
            session
        }
    };
    s.requeue_worker(worker, session).await
}

fn registration(id: &str, session: Uuid) -> WorkerRegistration {
    WorkerRegistration {
        id: w(id),
        prefetch: 0,
        max_concurrent_tasks: 4,
        capabilities: vec!["prove".into(), "verify".into()],
        labels: BTreeMap::from([("gpu".into(), "a100".into()), ("zone".into(), "eu-west-1".into())]),
        version: "1.2.3".into(),
        hostname: format!("{id}.example"),
        session_id: session,
        coordinator_id: "coord-a".into(),
        holding: None,
    }
}

/// Every connection the store writes through, held until the value is dropped.
async fn hold_every_connection(s: &Store) -> Box<dyn std::any::Any + Send> {
    match s {
        Store::Postgres(pg) => {
            let pool = pg.pool();
            let mut held = Vec::new();
            for _ in 0..pool.options().get_max_connections() {
                held.push(pool.acquire().await.expect("a connection"));
            }
            Box::new(held)
        }
        Store::Sqlite(lite) => Box::new(lite.writer_pool().acquire().await.expect("the writer")),
    }
}

/// A timestamp with microsecond precision, as both backends store it.
fn micros_precision(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.timestamp_micros()).expect("in range")
}

mod cases {
    use super::*;

    // ---- create_tasks ----

    pub async fn create_tasks_stores_every_field(s: &Store) {
        let b = s.backend();
        let mut nt = new_task("prove");
        nt.payload = vec![0, 1, 2, 254, 255];
        nt.priority = -7;
        nt.max_attempts = 5;
        nt.timeout = Duration::from_millis(12_345);
        nt.idempotency_key = Some("key-1".into());
        let plain = new_task("verify");
        let before = Utc::now();
        let created = s.create_tasks(&[nt.clone(), plain.clone()]).await.expect("create_tasks");
        let after = Utc::now();
        assert_eq!(created.len(), 2, "{b}");
        assert!(created.iter().all(|c| c.created), "{b}: both tasks are new");
        let t = &created[0].task;
        assert_eq!(t, &get(s, nt.id).await, "{b}: the returned task is the stored row");
        assert_eq!(t.id, nt.id, "{b}");
        assert_eq!(t.task_type, "prove", "{b}");
        assert_eq!(t.payload, vec![0, 1, 2, 254, 255], "{b}");
        assert_eq!(t.priority, -7, "{b}");
        assert_eq!(t.max_attempts, 5, "{b}");
        assert_eq!(t.timeout, Duration::from_millis(12_345), "{b}");
        assert_eq!(t.idempotency_key.as_deref(), Some("key-1"), "{b}");
        assert_eq!(t.state, TaskState::Pending, "{b}");
        assert_eq!((t.attempt, t.failures), (0, 0), "{b}: attempt and failures start at 0");
        assert_eq!(t.worker_id, None, "{b}");
        assert_eq!(t.job_id, None, "{b}");
        assert_eq!((&t.result, &t.error), (&None, &None), "{b}");
        assert_eq!(t.lease_expires_at, None, "{b}");
        assert_eq!((t.assigned_at, t.started_at, t.finished_at), (None, None, None), "{b}");
        assert_within(b, "created_at", t.created_at, before - SLACK, after + SLACK);
        assert_within(b, "run_after", t.run_after, before - SLACK, after + SLACK);
        assert!(attempts(s, t.id).await.is_empty(), "{b}: no attempts before a claim");

        let p = &created[1].task;
        assert_eq!(p, &get(s, plain.id).await, "{b}");
        assert_eq!((p.task_type.as_str(), p.idempotency_key.as_deref()), ("verify", None), "{b}");
        assert_eq!(p.payload, plain.payload, "{b}");
        assert_eq!((p.max_attempts, p.timeout), (3, Duration::from_secs(60)), "{b}");
        assert_eq!(s.get_task(TaskId::new()).await.expect("get_task"), None, "{b}: unknown id");
    }

    pub async fn idempotency_key_returns_the_existing_task(s: &Store) {
        let b = s.backend();
        let mut first = new_task("prove");
        first.idempotency_key = Some("order-42".into());
        let original = create_one(s, first.clone()).await;

        let mut again = new_task("verify");
        again.payload = b"different".to_vec();
        again.priority = 99;
        again.idempotency_key = Some("order-42".into());
        let fresh = NewTask { idempotency_key: Some("order-43".into()), ..new_task("prove") };
        let out = s.create_tasks(&[again.clone(), fresh.clone()]).await.expect("create_tasks");
        assert_eq!(out.len(), 2, "{b}");
        assert!(!out[0].created, "{b}: a known key is not created again");
        assert_eq!(out[0].task, original, "{b}: the existing task is returned as it is");
        assert!(out[1].created, "{b}: a new key in the same batch is created");
        assert_eq!(out[1].task.id, fresh.id, "{b}");
        assert_eq!(s.get_task(again.id).await.expect("get_task"), None, "{b}: the duplicate was not stored");
        assert_eq!(all_tasks(s).await.len(), 2, "{b}");

        // Still the same task after it moved on: the key keeps returning it, in its current state.
        let h = claim_one(s, original.id, "w1", LONG_LEASE).await;
        let again2 = NewTask { idempotency_key: Some("order-42".into()), ..new_task("prove") };
        let out = s.create_tasks(&[again2]).await.expect("create_tasks");
        assert!(!out[0].created, "{b}");
        assert_eq!(out[0].task.id, original.id, "{b}");
        assert_eq!(out[0].task.state, TaskState::Assigned, "{b}");
        assert_eq!(out[0].task.attempt, h.attempt, "{b}");
    }

    pub async fn same_idempotency_key_twice_in_one_batch_creates_one_task(s: &Store) {
        let b = s.backend();
        let one = NewTask { idempotency_key: Some("dup".into()), ..new_task("prove") };
        let two =
            NewTask { idempotency_key: Some("dup".into()), payload: b"second".to_vec(), ..new_task("prove") };
        let out = s.create_tasks(&[one.clone(), two.clone()]).await.expect("create_tasks");
        assert_eq!(out.len(), 2, "{b}: one Created per NewTask");
        assert!(out[0].created, "{b}: the first task with the key is created");
        assert!(!out[1].created, "{b}: the second returns the first");
        assert_eq!(out[0].task.id, one.id, "{b}");
        assert_eq!(out[1].task, out[0].task, "{b}: the second gets the first task");
        assert_eq!(out[1].task.payload, one.payload, "{b}");
        assert_eq!(s.get_task(two.id).await.expect("get_task"), None, "{b}");
        assert_eq!(all_tasks(s).await.len(), 1, "{b}");
    }

    pub async fn tasks_without_idempotency_key_never_collide(s: &Store) {
        let b = s.backend();
        let same = new_task("prove");
        let batch: Vec<NewTask> = (0..3).map(|_| NewTask { id: TaskId::new(), ..same.clone() }).collect();
        let first = create(s, batch).await;
        let batch: Vec<NewTask> = (0..3).map(|_| NewTask { id: TaskId::new(), ..same.clone() }).collect();
        let second = create(s, batch).await;
        let ids: BTreeSet<TaskId> = first.iter().chain(&second).map(|t| t.id).collect();
        assert_eq!(ids.len(), 6, "{b}: six distinct tasks");
        assert_eq!(all_tasks(s).await.len(), 6, "{b}");
        assert!(first.iter().chain(&second).all(|t| t.idempotency_key.is_none()), "{b}");
    }

    // ---- claim ----

    pub async fn claim_orders_by_priority_then_age_and_honours_limit(s: &Store) {
        let b = s.backend();
        let prios = [0, 5, 0, 10, 5, -1];
        let tasks =
            create(s, prios.iter().map(|&p| NewTask { priority: p, ..new_task("prove") }).collect()).await;
        let id = |i: usize| tasks[i].id;

        let mut offered = Vec::new();
        let got = s
            .claim(3, &TypeFilter::Any, LONG_LEASE, |c: &[Candidate]| {
                offered = c.to_vec();
                c.iter().map(|c| (c.id, w("w1"))).collect()
            })
            .await
            .expect("claim");
        let offered_ids: Vec<TaskId> = offered.iter().map(|c| c.id).collect();
        assert_eq!(offered_ids, vec![id(3), id(1), id(4)], "{b}: priority 10, then the two 5s oldest first");
        assert_eq!(
            offered.iter().map(|c| (c.priority, c.task_type.as_str())).collect::<Vec<_>>(),
            vec![(10, "prove"), (5, "prove"), (5, "prove")],
            "{b}: candidates carry type and priority"
        );
        let got: BTreeSet<TaskId> = got.iter().map(|a| a.task_id).collect();
        assert_eq!(got, BTreeSet::from([id(3), id(1), id(4)]), "{b}: limit 3 claims the top 3");

        let mut offered = Vec::new();
        let got = s
            .claim(10, &TypeFilter::Any, LONG_LEASE, |c: &[Candidate]| {
                offered = c.iter().map(|c| c.id).collect();
                c.iter().map(|c| (c.id, w("w1"))).collect()
            })
            .await
            .expect("claim");
        assert_eq!(offered, vec![id(0), id(2), id(5)], "{b}: then the 0s oldest first, then -1");
        assert_eq!(got.len(), 3, "{b}");
        let none =
            s.claim(10, &TypeFilter::Any, LONG_LEASE, |_| panic!("no candidates")).await.expect("claim");
        assert!(none.is_empty(), "{b}: nothing left");
        assert!(
            s.claim(0, &TypeFilter::Any, LONG_LEASE, |_| Vec::new()).await.expect("claim").is_empty(),
            "{b}: limit 0"
        );
    }

    pub async fn a_task_submitted_to_run_later_is_not_claimed_before_its_time(s: &Store) {
        let b = s.backend();
        let at = micros_precision(Utc::now() + TimeDelta::milliseconds(300));
        let later = create_one(s, NewTask { run_after: Some(at), ..new_task("prove") }).await;
        assert_eq!((later.state, later.run_after), (TaskState::Pending, at), "{b}: stored as given");
        let before = Utc::now();
        let now = create_one(s, new_task("prove")).await;
        assert_within(
            b,
            "run_after of a task without one",
            now.run_after,
            before - SLACK,
            Utc::now() + SLACK,
        );
        let claim = || {
            s.claim(10, &TypeFilter::Any, LONG_LEASE, |c: &[Candidate]| {
                c.iter().map(|c| (c.id, w("w1"))).collect()
            })
        };
        let first: Vec<TaskId> = claim().await.expect("claim").iter().map(|a| a.task_id).collect();
        if Utc::now() < at {
            assert_eq!(first, vec![now.id], "{b}: only the task due now");
        }
        wait_until_past(at).await;
        let mut all: Vec<TaskId> = first;
        all.extend(claim().await.expect("claim").iter().map(|a| a.task_id));
        assert!(all.contains(&later.id), "{b}: claimed once its time came");
        let assigned = get(s, later.id).await.assigned_at.expect("assigned");
        assert!(assigned >= at, "{b}: assigned at {assigned}, before its time {at}");
    }

    pub async fn claim_skips_tasks_whose_run_after_is_in_the_future(s: &Store) {
        let b = s.backend();
        let later = create_one(s, new_task("prove")).await;
        let h = claim_one(s, later.id, "w1", LONG_LEASE).await;
        // A retriable failure with a one-minute backoff: pending, but not runnable for a minute.
        let out = fail_one(s, &h, "transient", true, policy(60_000)).await;
        assert_eq!(out, ReportOutcome::Applied { state: TaskState::Pending }, "{b}");
        let t = get(s, later.id).await;
        assert_eq!(t.state, TaskState::Pending, "{b}");
        assert!(
            t.run_after > Utc::now() + TimeDelta::seconds(50),
            "{b}: run_after {} is a minute out",
            t.run_after
        );

        let now = create_one(s, new_task("prove")).await;
        let mut offered = Vec::new();
        let got = s
            .claim(10, &TypeFilter::Any, LONG_LEASE, |c: &[Candidate]| {
                offered = c.iter().map(|c| c.id).collect();
                c.iter().map(|c| (c.id, w("w2"))).collect()
            })
            .await
            .expect("claim");
        assert_eq!(offered, vec![now.id], "{b}: only the runnable task is a candidate");
        assert_eq!(got.iter().map(|a| a.task_id).collect::<Vec<_>>(), vec![now.id], "{b}");
        let t = get(s, later.id).await;
        assert_eq!(
            (t.state, t.attempt, t.worker_id.clone()),
            (TaskState::Pending, 1, None),
            "{b}: untouched"
        );
    }

    pub async fn claim_type_filter_only_offers_those_types(s: &Store) {
        let b = s.backend();
        let tasks = create(s, vec![new_task("a"), new_task("b"), new_task("c"), new_task("a")]).await;
        let only = TypeFilter::Only(vec!["a".into(), "c".into()]);
        let mut offered = Vec::new();
        let got = s
            .claim(10, &only, LONG_LEASE, |c: &[Candidate]| {
                offered = c.to_vec();
                c.iter().map(|c| (c.id, w("w1"))).collect()
            })
            .await
            .expect("claim");
        assert!(offered.iter().all(|c| c.task_type != "b"), "{b}: no b offered: {offered:?}");
        let got: BTreeSet<TaskId> = got.iter().map(|a| a.task_id).collect();
        assert_eq!(got, BTreeSet::from([tasks[0].id, tasks[2].id, tasks[3].id]), "{b}");
        let bt = get(s, tasks[1].id).await;
        assert_eq!((bt.state, bt.attempt), (TaskState::Pending, 0), "{b}: the b task stays pending");

        let none = TypeFilter::Only(vec!["zzz".into()]);
        assert!(
            s.claim(10, &none, LONG_LEASE, |_| panic!("nothing")).await.expect("claim").is_empty(),
            "{b}"
        );
        let empty = TypeFilter::Only(Vec::new());
        assert!(
            s.claim(10, &empty, LONG_LEASE, |_| panic!("nothing")).await.expect("claim").is_empty(),
            "{b}"
        );
        let only_b = TypeFilter::Only(vec!["b".into()]);
        let got = s.claim(10, &only_b, LONG_LEASE, |c| c.iter().map(|c| (c.id, w("w2"))).collect()).await;
        assert_eq!(
            got.expect("claim").iter().map(|a| a.task_id).collect::<Vec<_>>(),
            vec![tasks[1].id],
            "{b}"
        );
    }

    /// Five `a` tasks, then a `b` and a `c`: a claim of 2 of any type and of each of `b` offers the
    /// first two `a` and the `b` (not the `c`), each once, and assigns what placement chose.
    pub async fn claim_type_filter_any_and_offers_the_first_of_any_type_and_of_each_named_type(s: &Store) {
        let b = s.backend();
        let a = create_n(s, "a", 5).await;
        let bt = create_one(s, new_task("b")).await;
        let ct = create_one(s, new_task("c")).await;
        let mixed = TypeFilter::AnyAnd(vec!["b".into()]);
        let mut offered = Vec::new();
        let got = s
            .claim(2, &mixed, LONG_LEASE, |c: &[Candidate]| {
                offered = c.iter().map(|c| c.id).collect();
                vec![(a[0].id, w("any")), (bt.id, w("only-b"))]
            })
            .await
            .expect("claim");
        assert_eq!(offered, vec![a[0].id, a[1].id, bt.id], "{b}: in priority order, each once");
        let got: BTreeSet<(TaskId, WorkerId)> =
            got.iter().map(|a| (a.task_id, a.worker_id.clone())).collect();
        assert_eq!(got, BTreeSet::from([(a[0].id, w("any")), (bt.id, w("only-b"))]), "{b}");
        assert_eq!(get(s, a[1].id).await.state, TaskState::Pending, "{b}: offered, not placed");
        assert_eq!(get(s, ct.id).await, ct, "{b}: the c task was not offered");

        // A named type among the first of any type is offered once.
        let mut offered = Vec::new();
        let mixed = TypeFilter::AnyAnd(vec!["a".into(), "c".into()]);
        s.claim(3, &mixed, LONG_LEASE, |c: &[Candidate]| {
            offered = c.iter().map(|c| c.id).collect();
            Vec::new()
        })
        .await
        .expect("claim");
        assert_eq!(offered, vec![a[1].id, a[2].id, a[3].id, ct.id], "{b}");
    }

    pub async fn claim_leaves_tasks_that_place_omits_pending(s: &Store) {
        let b = s.backend();
        let tasks = create_n(s, "prove", 3).await;
        let middle = tasks[1].id;
        let got = s
            .claim(10, &TypeFilter::Any, LONG_LEASE, |c: &[Candidate]| {
                assert_eq!(c.len(), 3);
                vec![(middle, w("w1"))]
            })
            .await
            .expect("claim");
        assert_eq!(got.iter().map(|a| a.task_id).collect::<Vec<_>>(), vec![middle], "{b}");
        for t in [&tasks[0], &tasks[2]] {
            let now = get(s, t.id).await;
            assert_eq!(&now, t, "{b}: task {} left out by place is unchanged", t.id);
            assert_eq!((now.state, now.attempt, now.worker_id), (TaskState::Pending, 0, None), "{b}");
            assert!(attempts(s, t.id).await.is_empty(), "{b}: no attempts row");
        }
        // Placing nothing at all claims nothing.
        let got = s.claim(10, &TypeFilter::Any, LONG_LEASE, |_| Vec::new()).await.expect("claim");
        assert!(got.is_empty(), "{b}");
        assert_eq!(get(s, tasks[0].id).await, tasks[0], "{b}");
        // They are still candidates next time.
        let mut offered = Vec::new();
        s.claim(10, &TypeFilter::Any, LONG_LEASE, |c: &[Candidate]| {
            offered = c.iter().map(|c| c.id).collect();
            Vec::new()
        })
        .await
        .expect("claim");
        assert_eq!(offered, vec![tasks[0].id, tasks[2].id], "{b}");
    }

    pub async fn claim_ignores_placements_of_tasks_that_were_not_candidates(s: &Store) {
        let b = s.backend();
        let x = create_one(s, new_task("a")).await;
        let y = create_one(s, new_task("b")).await;
        let z = create_one(s, new_task("a")).await;
        let hz = claim_one(s, z.id, "w1", LONG_LEASE).await;
        let z_before = get(s, z.id).await;
        let unknown = TaskId::new();
        let got = s
            .claim(10, &TypeFilter::Only(vec!["a".into()]), LONG_LEASE, |c: &[Candidate]| {
                assert_eq!(c.iter().map(|c| c.id).collect::<Vec<_>>(), vec![x.id]);
                vec![
                    (y.id, w("w2")),    // pending, but filtered out by type
                    (z.id, w("w2")),    // held by w1
                    (unknown, w("w2")), // no such task
                    (x.id, w("w2")),    // the candidate
                    (x.id, w("w3")),    // the candidate again, to another worker
                ]
            })
            .await
            .expect("claim");
        assert_eq!(got.len(), 1, "{b}: only the candidate is assigned: {got:?}");
        assert_eq!((got[0].task_id, got[0].worker_id.clone(), got[0].attempt), (x.id, w("w2"), 1), "{b}");
        let xt = get(s, x.id).await;
        assert_eq!((xt.state, xt.worker_id, xt.attempt), (TaskState::Assigned, Some(w("w2")), 1), "{b}");
        assert_eq!(attempts(s, x.id).await.len(), 1, "{b}: one attempts row for x");
        assert_eq!(get(s, y.id).await, y, "{b}: y untouched");
        assert_eq!(get(s, z.id).await, z_before, "{b}: z still held by w1");
        assert_eq!(attempts(s, z.id).await.len(), 1, "{b}");
        assert_eq!(hz.worker_id, w("w1"), "{b}");
        assert_eq!(s.get_task(unknown).await.expect("get_task"), None, "{b}: nothing invented");
    }

    pub async fn a_tasks_traceparent_is_stored_and_sent_with_every_assignment(s: &Store) {
        let b = s.backend();
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let traced = NewTask { traceparent: Some(tp.into()), ..new_task("prove") };
        let plain = new_task("prove");
        create(s, vec![traced.clone(), plain.clone()]).await;
        let (_, in_job) = s
            .create_job("traced-job", vec![NewTask { traceparent: Some(tp.into()), ..new_task("prove") }])
            .await
            .expect("create_job");
        let job_task = in_job[0].task.id;
        assert_eq!(get(s, traced.id).await.traceparent.as_deref(), Some(tp), "{b}: stored");
        assert_eq!(get(s, plain.id).await.traceparent, None, "{b}: none given, none stored");

        let lease = Duration::from_secs(30);
        let got = claim_ids(s, &[traced.id, plain.id, job_task], &w("w1"), lease).await;
        let sent: HashMap<TaskId, Option<String>> =
            got.into_iter().map(|a| (a.task_id, a.traceparent)).collect();
        assert_eq!(sent[&traced.id].as_deref(), Some(tp), "{b}: sent with the assignment");
        assert_eq!(sent[&plain.id], None, "{b}");
        assert_eq!(sent[&job_task].as_deref(), Some(tp), "{b}: a job's task carries it too");

        // The next attempt, after the worker is lost, carries the same context.
        requeue_dead(s, &w("w1")).await.expect("requeue");
        let again = claim_ids(s, &[traced.id], &w("w2"), lease).await;
        assert_eq!(again[0].attempt, 2, "{b}");
        assert_eq!(again[0].traceparent.as_deref(), Some(tp), "{b}: every attempt carries it");
    }

    pub async fn claim_assigns_attempt_worker_lease_deadline_and_history(s: &Store) {
        let b = s.backend();
        let nt = NewTask {
            priority: 3,
            timeout: Duration::from_millis(90_500),
            payload: vec![9, 8, 7],
            ..new_task("prove")
        };
        let (job, _) = s.create_job("claim-job", vec![nt.clone()]).await.expect("create_job");
        let created = get(s, nt.id).await;
        let lease = Duration::from_secs(30);
        let before = Utc::now();
        let got = claim_ids(s, &[nt.id], &w("w1"), lease).await;
        let after = Utc::now();
        let a = &got[0];
        let t = get(s, nt.id).await;

        assert_eq!(t.state, TaskState::Assigned, "{b}");
        assert_eq!(t.attempt, 1, "{b}");
        assert_eq!(t.failures, 0, "{b}");
        assert_eq!(t.worker_id, Some(w("w1")), "{b}");
        let assigned_at = t.assigned_at.expect("assigned_at");
        assert_within(b, "assigned_at", assigned_at, before - SLACK, after + SLACK);
        assert_eq!(t.lease_expires_at, Some(assigned_at + td(lease)), "{b}: lease = assigned_at + lease");
        assert_eq!(t.started_at, None, "{b}: not started until delivered");
        assert_eq!(t.finished_at, None, "{b}");

        assert_eq!(a.task_id, nt.id, "{b}");
        assert_eq!(a.task_type, "prove", "{b}");
        assert_eq!(a.payload, vec![9, 8, 7], "{b}");
        assert_eq!(a.attempt, 1, "{b}");
        assert_eq!(a.worker_id, w("w1"), "{b}");
        assert_eq!(a.priority, 3, "{b}");
        assert_eq!(a.job_id, Some(job.id), "{b}");
        assert_eq!(a.created_at, created.created_at, "{b}");
        assert_eq!(a.deadline, assigned_at + ms(90_500), "{b}: deadline = assigned_at + timeout");

        let hist = attempts(s, nt.id).await;
        assert_eq!(
            hist,
            vec![AttemptRecord {
                task_id: nt.id,
                attempt: 1,
                worker_id: w("w1"),
                assigned_at,
                started_at: None,
                finished_at: None,
                outcome: None,
                error: None,
            }],
            "{b}"
        );
    }

    // ---- mark_running, renew_leases ----

    pub async fn mark_running_applies_only_for_the_holding_worker_and_attempt(s: &Store) {
        let b = s.backend();
        let t = create_one(s, new_task("prove")).await;
        let other = create_one(s, new_task("prove")).await;
        let h = claim_one(s, t.id, "w1", LONG_LEASE).await;
        let before = get(s, t.id).await;

        let refused = [
            held_as(t.id, "w2", 1),          // another worker
            held_as(t.id, "w1", 2),          // another attempt
            held_as(other.id, "w1", 0),      // a pending task
            held_as(TaskId::new(), "w1", 1), // no such task
        ];
        assert_eq!(s.mark_running(&refused).await.expect("mark_running"), 0, "{b}: nothing applies");
        assert_eq!(get(s, t.id).await, before, "{b}: still assigned, unchanged");
        assert_eq!(get(s, other.id).await, other, "{b}");

        let t0 = Utc::now();
        assert_eq!(s.mark_running(std::slice::from_ref(&h)).await.expect("mark_running"), 1, "{b}");
        let t1 = Utc::now();
        let now = get(s, t.id).await;
        assert_eq!(now.state, TaskState::Running, "{b}");
        assert_eq!((now.attempt, now.worker_id.clone()), (1, Some(w("w1"))), "{b}");
        assert_within(b, "started_at", now.started_at.expect("started_at"), t0 - SLACK, t1 + SLACK);
        assert_eq!(now.lease_expires_at, before.lease_expires_at, "{b}: lease unchanged");
        assert_eq!(last_attempt(s, t.id).await.started_at, now.started_at, "{b}: attempts row started too");

        assert_eq!(s.mark_running(&[h]).await.expect("mark_running"), 0, "{b}: already running");
        assert_eq!(get(s, t.id).await, now, "{b}");
    }

    /// A task starts when it went down its worker's stream, however long the mark then waits
    /// for a database connection: a wait taken off the start would make the task look shorter
    /// than the worker held it.
    pub async fn a_delivery_mark_that_waits_for_a_connection_dates_the_delivery(s: &Store) {
        const WAIT: Duration = Duration::from_millis(300);
        let b = s.backend();
        let t = create_one(s, new_task("prove")).await;
        let h = claim_one(s, t.id, "w1", LONG_LEASE).await;
        let busy = hold_every_connection(s).await;
        let (delivered_wall, delivered) = (Utc::now(), Instant::now());
        let mark = {
            let s = s.clone();
            tokio::spawn(async move { s.mark_delivered(&[(h, delivered)]).await })
        };
        tokio::time::sleep(WAIT).await;
        assert!(!mark.is_finished(), "{b}: the mark waits for a connection");
        drop(busy);
        assert_eq!(mark.await.expect("mark task").expect("mark_delivered"), 1, "{b}");
        let started = get(s, t.id).await.started_at.expect("started_at");
        assert_within(b, "started_at", started, delivered_wall - SLACK, delivered_wall + SLACK);
        assert_eq!(last_attempt(s, t.id).await.started_at, Some(started), "{b}: the attempt row too");
    }

    pub async fn renew_leases_returns_only_tasks_still_held(s: &Store) {
        let b = s.backend();
        let tasks = create_n(s, "prove", 6).await;
        let [a, r, c, d, e, f] = [0, 1, 2, 3, 4, 5].map(|i| tasks[i].id);
        let short = Duration::from_secs(5);
        let got = claim_ids(s, &[a, r, c, d, e], &w("w1"), short).await;
        let [ha, hr, hc, hd, he] = [0, 1, 2, 3, 4].map(|i| held(&got[i]));
        let hf = claim_one(s, f, "w2", short).await;
        s.mark_running(std::slice::from_ref(&hr)).await.expect("mark_running");
        // c: given back undelivered, then assigned again to the same worker: attempt 2 holds it.
        assert_eq!(s.requeue_undelivered(std::slice::from_ref(&hc)).await.expect("requeue").len(), 1, "{b}");
        let hc2 = claim_one(s, c, "w1", short).await;
        assert_eq!(hc2.attempt, 2, "{b}");
        // d completed, e cancelled.
        assert_eq!(
            complete_one(s, &hd, b"done").await,
            ReportOutcome::Applied { state: TaskState::Completed }
        );
        s.cancel(e, "not needed").await.expect("cancel").expect("exists");

        let before_a = get(s, a).await;
        let before_r = get(s, r).await;
        let before_c = get(s, c).await;
        let before_d = get(s, d).await;
        let before_e = get(s, e).await;
        let before_f = get(s, f).await;
        let lease = Duration::from_secs(300);
        let t0 = Utc::now();
        let renewed = s
            .renew_leases(
                &[
                    ha.clone(),
                    hr.clone(),
                    hc.clone(),
                    hd,
                    he,
                    held_as(f, "w1", hf.attempt),
                    held_as(TaskId::new(), "w1", 1),
                ],
                lease,
            )
            .await
            .expect("renew_leases");
        let t1 = Utc::now();
        let renewed: BTreeSet<TaskId> = renewed.into_iter().map(|h| h.task_id).collect();
        assert_eq!(
            renewed,
            BTreeSet::from([a, r]),
            "{b}: only a and r are still held by w1 at those attempts"
        );

        for (id, before) in [(a, &before_a), (r, &before_r)] {
            let now = get(s, id).await;
            assert_eq!(now.state, TaskState::Running, "{b}: a renewed task is running");
            let lease_at = now.lease_expires_at.expect("lease");
            assert!(lease_at > before.lease_expires_at.expect("lease"), "{b}: the lease moved forward");
            assert_within(b, "renewed lease", lease_at, t0 + td(lease) - SLACK, t1 + td(lease) + SLACK);
            assert!(now.started_at.is_some(), "{b}: started_at set");
            assert_eq!((now.attempt, now.worker_id), (1, Some(w("w1"))), "{b}");
        }
        assert_eq!(before_a.state, TaskState::Assigned, "{b}: a was assigned before the renewal");
        assert!(last_attempt(s, a).await.started_at.is_some(), "{b}: renewal starts the attempts row");
        assert_eq!(get(s, r).await.started_at, before_r.started_at, "{b}: r keeps its start time");
        assert_eq!(get(s, c).await, before_c, "{b}: attempt 2 of c is untouched by a renewal of attempt 1");
        assert_eq!(get(s, d).await, before_d, "{b}: completed d untouched");
        assert_eq!(get(s, e).await, before_e, "{b}: cancelled e untouched");
        assert_eq!(get(s, f).await, before_f, "{b}: w2's task untouched by w1's renewal");
        assert_eq!(get(s, d).await.lease_expires_at, None, "{b}");

        // The current holder of c renews fine.
        assert_eq!(
            s.renew_leases(std::slice::from_ref(&hc2), lease).await.expect("renew_leases"),
            vec![hc2],
            "{b}"
        );
    }

    // ---- complete ----

    pub async fn complete_applies_once_then_reports_duplicate(s: &Store) {
        let b = s.backend();
        let t = create_one(s, new_task("prove")).await;
        let h = claim_one(s, t.id, "w1", LONG_LEASE).await;
        s.mark_running(std::slice::from_ref(&h)).await.expect("mark_running");
        let t0 = Utc::now();
        let out = complete_one(s, &h, b"proof-bytes").await;
        let t1 = Utc::now();
        assert_eq!(out, ReportOutcome::Applied { state: TaskState::Completed }, "{b}");
        let done = get(s, t.id).await;
        assert_eq!(done.state, TaskState::Completed, "{b}");
        assert_eq!(done.result.as_deref(), Some(&b"proof-bytes"[..]), "{b}");
        assert_eq!(done.error, None, "{b}");
        assert_eq!((done.attempt, done.failures), (1, 0), "{b}");
        assert_eq!(done.lease_expires_at, None, "{b}: no lease once completed");
        assert_within(b, "finished_at", done.finished_at.expect("finished_at"), t0 - SLACK, t1 + SLACK);
        let att = last_attempt(s, t.id).await;
        assert_eq!((att.attempt, att.outcome.as_deref(), att.error), (1, Some("completed"), None), "{b}");
        assert_within(b, "attempt finished_at", att.finished_at.expect("finished"), t0 - SLACK, t1 + SLACK);
        assert!(att.started_at.is_some(), "{b}");

        let again = complete_one(s, &h, b"proof-bytes").await;
        assert_eq!(again, ReportOutcome::Duplicate { state: TaskState::Completed }, "{b}: same report again");
        let other_bytes = complete_one(s, &h, b"something else").await;
        assert_eq!(other_bytes, ReportOutcome::Duplicate { state: TaskState::Completed }, "{b}");
        assert_eq!(get(s, t.id).await, done, "{b}: a duplicate changes nothing, result included");
        assert_eq!(attempts(s, t.id).await.len(), 1, "{b}");
    }

    pub async fn complete_from_another_worker_is_stale_and_changes_nothing(s: &Store) {
        let b = s.backend();
        let t = create_one(s, new_task("prove")).await;
        let h = claim_one(s, t.id, "w1", LONG_LEASE).await;
        let before = get(s, t.id).await;
        let hist = attempts(s, t.id).await;
        let out = complete_one(s, &held_as(t.id, "w2", h.attempt), b"forged").await;
        assert_eq!(out, ReportOutcome::Stale { state: TaskState::Assigned, attempt: 1 }, "{b}");
        assert_eq!(get(s, t.id).await, before, "{b}: nothing changed");
        assert_eq!(attempts(s, t.id).await, hist, "{b}: history unchanged");
        // A report for a task that was never claimed is stale too.
        let never = create_one(s, new_task("prove")).await;
        assert_eq!(
            complete_one(s, &held_as(never.id, "w1", 0), b"forged").await,
            ReportOutcome::Stale { state: TaskState::Pending, attempt: 0 },
            "{b}"
        );
        assert_eq!(get(s, never.id).await, never, "{b}");
        // The holder can still complete.
        assert_eq!(
            complete_one(s, &h, b"real").await,
            ReportOutcome::Applied { state: TaskState::Completed }
        );
        assert_eq!(get(s, t.id).await.result.as_deref(), Some(&b"real"[..]), "{b}");
    }

    pub async fn complete_from_an_old_attempt_is_stale(s: &Store) {
        let b = s.backend();
        let x = create_one(s, new_task("prove")).await;
        let y = create_one(s, new_task("prove")).await;
        // x: attempt 1 on w1, lost with w1, attempt 2 on w2.
        let hx1 = claim_one(s, x.id, "w1", LONG_LEASE).await;
        assert_eq!(requeue_dead(s, &w("w1")).await.expect("requeue_worker").len(), 1, "{b}");
        let hx2 = claim_one(s, x.id, "w2", LONG_LEASE).await;
        assert_eq!(hx2.attempt, 2, "{b}");
        // y: attempt 1 undelivered, attempt 2 on the same worker.
        let hy1 = claim_one(s, y.id, "w3", LONG_LEASE).await;
        s.requeue_undelivered(std::slice::from_ref(&hy1)).await.expect("requeue_undelivered");
        let hy2 = claim_one(s, y.id, "w3", LONG_LEASE).await;
        assert_eq!(hy2.attempt, 2, "{b}");

        let bx = get(s, x.id).await;
        let by = get(s, y.id).await;
        let out =
            s.complete(&[completion(&hx1, b"late"), completion(&hy1, b"late")]).await.expect("complete");
        assert_eq!(
            out,
            vec![
                ReportOutcome::Stale { state: TaskState::Assigned, attempt: 2 },
                ReportOutcome::Stale { state: TaskState::Assigned, attempt: 2 },
            ],
            "{b}"
        );
        assert_eq!(get(s, x.id).await, bx, "{b}: x unchanged");
        assert_eq!(get(s, y.id).await, by, "{b}: y unchanged");
        let hist = attempts(s, x.id).await;
        assert_eq!(hist[0].outcome.as_deref(), Some("worker_dead"), "{b}: attempt 1 keeps its outcome");
        assert_eq!(hist[1].outcome, None, "{b}: attempt 2 still open");
        assert_eq!(
            complete_one(s, &hx2, b"ok").await,
            ReportOutcome::Applied { state: TaskState::Completed }
        );
    }

    pub async fn complete_of_an_unknown_task_is_not_found(s: &Store) {
        let b = s.backend();
        let out = complete_one(s, &held_as(TaskId::new(), "w1", 1), b"?").await;
        assert_eq!(out, ReportOutcome::NotFound, "{b}");
        assert!(all_tasks(s).await.is_empty(), "{b}");
    }

    pub async fn complete_batch_returns_one_outcome_per_report_in_order(s: &Store) {
        let b = s.backend();
        let tasks = create_n(s, "prove", 4).await;
        let [a, st, dup, d] = [0, 1, 2, 3].map(|i| tasks[i].id);
        let got = claim_ids(s, &[a, st, dup, d], &w("w1"), LONG_LEASE).await;
        let [ha, hst, hdup, hd] = [0, 1, 2, 3].map(|i| held(&got[i]));
        assert_eq!(
            complete_one(s, &hdup, b"early").await,
            ReportOutcome::Applied { state: TaskState::Completed }
        );
        let unknown = held_as(TaskId::new(), "w1", 1);
        let reports = vec![
            completion(&ha, b"ra"),
            completion(&held_as(st, "w9", hst.attempt), b"forged"),
            completion(&hdup, b"again"),
            completion(&unknown, b"?"),
            completion(&hd, b"rd"),
        ];
        let out = s.complete(&reports).await.expect("complete");
        assert_eq!(
            out,
            vec![
                ReportOutcome::Applied { state: TaskState::Completed },
                ReportOutcome::Stale { state: TaskState::Assigned, attempt: 1 },
                ReportOutcome::Duplicate { state: TaskState::Completed },
                ReportOutcome::NotFound,
                ReportOutcome::Applied { state: TaskState::Completed },
            ],
            "{b}"
        );
        assert_eq!(get(s, a).await.result.as_deref(), Some(&b"ra"[..]), "{b}");
        assert_eq!(get(s, d).await.result.as_deref(), Some(&b"rd"[..]), "{b}");
        assert_eq!(
            get(s, dup).await.result.as_deref(),
            Some(&b"early"[..]),
            "{b}: duplicate kept the first result"
        );
        let stt = get(s, st).await;
        assert_eq!(
            (stt.state, stt.result),
            (TaskState::Assigned, None),
            "{b}: the stale report changed nothing"
        );
        assert_eq!(last_attempt(s, st).await.outcome, None, "{b}");
        for id in [a, dup, d] {
            assert_eq!(last_attempt(s, id).await.outcome.as_deref(), Some("completed"), "{b}");
        }
        // The same report twice in one batch: applied once, then a duplicate.
        let out = s.complete(&[completion(&hst, b"x"), completion(&hst, b"x")]).await.expect("complete");
        assert_eq!(
            out,
            vec![
                ReportOutcome::Applied { state: TaskState::Completed },
                ReportOutcome::Duplicate { state: TaskState::Completed },
            ],
            "{b}"
        );
    }

    /// Two reports for one task in one batch, the stale one (a late report of a lost attempt)
    /// first: the stale one must be refused and the current one applied, as if sent one by one.
    pub async fn complete_batch_with_a_stale_report_before_the_current_one_for_the_same_task(s: &Store) {
        let b = s.backend();
        let t = create_one(s, new_task("prove")).await;
        let old = claim_one(s, t.id, "w1", LONG_LEASE).await;
        requeue_dead(s, &w("w1")).await.expect("requeue_worker");
        let cur = claim_one(s, t.id, "w2", LONG_LEASE).await;
        let out =
            s.complete(&[completion(&old, b"late"), completion(&cur, b"current")]).await.expect("complete");
        let task = get(s, t.id).await;
        let shown = (task.state, task.result.as_deref().map(String::from_utf8_lossy));
        assert_eq!(out.len(), 2, "{b}");
        // The stale report's `state` is the task's state when it was classified, which may be
        // before or after the current report applied; the attempt that holds it is 2 either way.
        assert!(
            matches!(out[0], ReportOutcome::Stale { attempt: 2, .. }),
            "{b}: the late report of attempt 1 is stale, got {:?} (task now {shown:?})",
            out[0]
        );
        assert_eq!(
            out[1],
            ReportOutcome::Applied { state: TaskState::Completed },
            "{b}: the current report applies (task now {shown:?})"
        );
        assert_eq!(task.state, TaskState::Completed, "{b}: the current attempt's completion applies");
        assert_eq!(task.result.as_deref(), Some(&b"current"[..]), "{b}");
    }

    // ---- complete_and_claim ----

    /// One batch: the completion of A and, in its transaction, the claim of the next task for
    /// the slot it frees, fenced by the worker's session. The refill is told what completed.
    pub async fn a_completion_claims_for_the_slots_it_frees_in_its_transaction(s: &Store) {
        let b = s.backend();
        let session = Uuid::now_v7();
        s.register_worker(&registration("w1", session)).await.expect("register");
        let tasks = create_n(s, "prove", 3).await;
        let a = held(&claim_all_for_n(s, "w1", session, 1).await[0]);
        assert_eq!(a.task_id, tasks[0].id, "{b}");
        let mut refill = RefillOn::new(&w("w1"), session);
        let (out, next) = s
            .complete_and_claim(&[completion(&a, b"a")], LONG_LEASE, &mut refill)
            .await
            .expect("complete_and_claim");
        assert_eq!(out, vec![ReportOutcome::Applied { state: TaskState::Completed }], "{b}");
        assert_eq!(refill.told, vec![vec![a.clone()]], "{b}: told what completed, once");
        assert_eq!(next.len(), 1, "{b}: one slot freed, one task claimed: {next:?}");
        assert_eq!((next[0].task_id, &next[0].worker_id, next[0].attempt), (tasks[1].id, &w("w1"), 1), "{b}");
        let (done, given, left) =
            (get(s, a.task_id).await, get(s, tasks[1].id).await, get(s, tasks[2].id).await);
        assert_eq!((done.state, done.result.as_deref()), (TaskState::Completed, Some(&b"a"[..])), "{b}");
        assert_eq!((given.state, given.worker_id.as_ref()), (TaskState::Assigned, Some(&w("w1"))), "{b}");
        assert_eq!(left.state, TaskState::Pending, "{b}");
        let holding: Vec<TaskId> =
            s.held_by(&w("w1")).await.expect("held_by").iter().map(|h| h.task_id).collect();
        assert_eq!(holding, vec![tasks[1].id], "{b}: the worker holds only the successor");
    }

    /// A report that applies nothing (an attempt the worker no longer holds) frees no slot: the
    /// refill is told nothing completed and nothing is claimed.
    pub async fn a_completion_that_changed_nothing_claims_nothing(s: &Store) {
        let b = s.backend();
        let session = Uuid::now_v7();
        s.register_worker(&registration("w1", session)).await.expect("register");
        let tasks = create_n(s, "prove", 2).await;
        let a = held(&claim_all_for_n(s, "w1", session, 1).await[0]);
        let old = Held { attempt: a.attempt + 1, ..a.clone() };
        let mut refill = RefillOn::new(&w("w1"), session);
        let (out, next) = s
            .complete_and_claim(&[completion(&old, b"x")], LONG_LEASE, &mut refill)
            .await
            .expect("complete_and_claim");
        assert!(matches!(out[0], ReportOutcome::Stale { attempt: 1, .. }), "{b}: {out:?}");
        assert_eq!(refill.told, vec![Vec::<Held>::new()], "{b}");
        assert!(next.is_empty(), "{b}: {next:?}");
        assert_eq!(get(s, tasks[1].id).await.state, TaskState::Pending, "{b}");
        assert_eq!(get(s, a.task_id).await.state, TaskState::Assigned, "{b}");
    }

    /// The worker registered a new session since the refill read its old one: the completion
    /// (fenced by task, worker and attempt) applies, the claim under the old session assigns
    /// nothing.
    pub async fn a_refill_for_a_replaced_session_assigns_nothing_and_still_completes(s: &Store) {
        let b = s.backend();
        let (s1, s2) = (Uuid::now_v7(), Uuid::now_v7());
        s.register_worker(&registration("w1", s1)).await.expect("register s1");
        let tasks = create_n(s, "prove", 2).await;
        let a = held(&claim_all_for_n(s, "w1", s1, 1).await[0]);
        s.upsert_worker(&registration("w1", s2)).await.expect("a new session");
        let mut refill = RefillOn::new(&w("w1"), s1);
        let (out, next) = s
            .complete_and_claim(&[completion(&a, b"a")], LONG_LEASE, &mut refill)
            .await
            .expect("complete_and_claim");
        assert_eq!(out, vec![ReportOutcome::Applied { state: TaskState::Completed }], "{b}");
        assert!(next.is_empty(), "{b}: the old session gets nothing: {next:?}");
        assert_eq!(get(s, tasks[1].id).await.state, TaskState::Pending, "{b}");
    }

    /// The claim of a batch fails (here: worker shapes the database cannot read, checked for a
    /// task that weighs two slots): it is rolled back alone, the refill is told, and the
    /// completion commits.
    pub async fn a_claim_that_fails_is_undone_alone_and_the_completions_commit(s: &Store) {
        let b = s.backend();
        let session = Uuid::now_v7();
        s.register_worker(&registration("w1", session)).await.expect("register");
        let first = create_one(s, new_task("prove")).await;
        let mut heavy = new_task("prove");
        heavy.needs.weight = 2;
        let heavy = create_one(s, heavy).await;
        let a = held(&claim_all_for_n(s, "w1", session, 1).await[0]);
        assert_eq!(a.task_id, first.id, "{b}");
        let mut refill = RefillOn::new(&w("w1"), session);
        refill.shapes = Some(Shapes("not json".into()));
        let (out, next) = s
            .complete_and_claim(&[completion(&a, b"a")], LONG_LEASE, &mut refill)
            .await
            .expect("complete_and_claim");
        assert_eq!(out, vec![ReportOutcome::Applied { state: TaskState::Completed }], "{b}");
        assert!(next.is_empty(), "{b}: {next:?}");
        assert_eq!(refill.failed.len(), 1, "{b}: the refill is told: {:?}", refill.failed);
        assert_eq!(get(s, first.id).await.state, TaskState::Completed, "{b}: the completion committed");
        assert_eq!(get(s, heavy.id).await.state, TaskState::Pending, "{b}");
    }

    // ---- fail ----

    pub async fn fail_retriable_goes_back_to_pending_after_backoff(s: &Store) {
        let b = s.backend();
        let p = policy(100);
        let t = create_one(s, new_task("prove")).await;
        let h = claim_one(s, t.id, "w1", LONG_LEASE).await;
        s.mark_running(std::slice::from_ref(&h)).await.expect("mark_running");
        let t0 = Utc::now();
        let out = fail_one(s, &h, "gpu fell off the bus", true, p).await;
        let t1 = Utc::now();
        assert_eq!(out, ReportOutcome::Applied { state: TaskState::Pending }, "{b}");
        let now = get(s, t.id).await;
        assert_eq!(now.state, TaskState::Pending, "{b}");
        assert_eq!((now.failures, now.attempt), (1, 1), "{b}: failures+1, attempt kept");
        assert_eq!(now.worker_id, None, "{b}: no worker while pending");
        assert_eq!(now.lease_expires_at, None, "{b}");
        assert_eq!(now.finished_at, None, "{b}: not finished");
        assert_eq!(now.error.as_deref(), Some("gpu fell off the bus"), "{b}: last error kept");
        assert!(now.run_after > t0, "{b}: run_after in the future");
        assert_within(
            b,
            "run_after (backoff 100ms)",
            now.run_after,
            t0 + ms(100) - ms(1),
            t1 + ms(100) + ms(1),
        );
        let att = last_attempt(s, t.id).await;
        assert_eq!(att.outcome.as_deref(), Some("failed"), "{b}");
        assert_eq!(att.error.as_deref(), Some("gpu fell off the bus"), "{b}");
        assert!(att.finished_at.is_some(), "{b}");

        // Runnable again once the backoff passed; the second failure backs off twice as long.
        wait_until_past(now.run_after).await;
        let h2 = claim_one(s, t.id, "w2", LONG_LEASE).await;
        assert_eq!(h2.attempt, 2, "{b}");
        let t0 = Utc::now();
        let out = fail_one(s, &h2, "again", true, p).await;
        let t1 = Utc::now();
        assert_eq!(out, ReportOutcome::Applied { state: TaskState::Pending }, "{b}");
        let now = get(s, t.id).await;
        assert_eq!((now.failures, now.attempt, now.state), (2, 2, TaskState::Pending), "{b}");
        assert_within(
            b,
            "run_after (backoff 200ms)",
            now.run_after,
            t0 + ms(200) - ms(1),
            t1 + ms(200) + ms(1),
        );
    }

    pub async fn fail_retriable_after_max_attempts_is_failed(s: &Store) {
        let b = s.backend();
        let p = policy(1);
        let t = create_one(s, with_attempts(new_task("prove"), 2)).await;
        let h1 = claim_one(s, t.id, "w1", LONG_LEASE).await;
        assert_eq!(
            fail_one(s, &h1, "e1", true, p).await,
            ReportOutcome::Applied { state: TaskState::Pending }
        );
        wait_until_past(get(s, t.id).await.run_after).await;
        let h2 = claim_one(s, t.id, "w1", LONG_LEASE).await;
        assert_eq!(h2.attempt, 2, "{b}");
        let t0 = Utc::now();
        let out = fail_one(s, &h2, "e2", true, p).await;
        let t1 = Utc::now();
        assert_eq!(out, ReportOutcome::Applied { state: TaskState::Failed }, "{b}: out of attempts");
        let now = get(s, t.id).await;
        assert_eq!(now.state, TaskState::Failed, "{b}");
        assert_eq!((now.failures, now.attempt), (2, 2), "{b}");
        assert_eq!(now.error.as_deref(), Some("e2"), "{b}");
        assert_eq!(now.lease_expires_at, None, "{b}");
        assert_within(b, "finished_at", now.finished_at.expect("finished"), t0 - SLACK, t1 + SLACK);
        let hist = attempts(s, t.id).await;
        let outcomes: Vec<_> = hist.iter().map(|a| (a.outcome.as_deref(), a.error.as_deref())).collect();
        assert_eq!(outcomes, vec![(Some("failed"), Some("e1")), (Some("failed"), Some("e2"))], "{b}");
        let got =
            s.claim(10, &TypeFilter::Any, LONG_LEASE, |_| panic!("a failed task is no candidate")).await;
        assert!(got.expect("claim").is_empty(), "{b}");
    }

    pub async fn fail_non_retriable_is_failed_at_once(s: &Store) {
        let b = s.backend();
        let t = create_one(s, with_attempts(new_task("prove"), 5)).await;
        let h = claim_one(s, t.id, "w1", LONG_LEASE).await;
        let out = fail_one(s, &h, "bad input", false, policy(100)).await;
        assert_eq!(out, ReportOutcome::Applied { state: TaskState::Failed }, "{b}");
        let now = get(s, t.id).await;
        assert_eq!((now.state, now.failures, now.attempt), (TaskState::Failed, 1, 1), "{b}");
        assert_eq!(now.error.as_deref(), Some("bad input"), "{b}");
        assert!(now.finished_at.is_some(), "{b}");
        assert_eq!(now.result, None, "{b}");
        let att = last_attempt(s, t.id).await;
        assert_eq!(
            (att.outcome.as_deref(), att.error.as_deref()),
            (Some("failed"), Some("bad input")),
            "{b}"
        );
    }

    pub async fn a_failed_task_names_its_worker_and_a_retried_one_does_not(s: &Store) {
        let b = s.backend();
        let t = create_one(s, with_attempts(new_task("prove"), 2)).await;
        let h = claim_one(s, t.id, "w1", LONG_LEASE).await;
        let out = fail_one(s, &h, "flaky", true, policy(0)).await;
        assert_eq!(out, ReportOutcome::Applied { state: TaskState::Pending }, "{b}");
        let now = get(s, t.id).await;
        assert_eq!((now.worker_id, now.finished_at, now.failures), (None, None, 1), "{b}: retried");
        let h = claim_one(s, t.id, "w2", LONG_LEASE).await;
        let out = fail_one(s, &h, "flaky again", true, policy(0)).await;
        assert_eq!(out, ReportOutcome::Applied { state: TaskState::Failed }, "{b}: out of attempts");
        let now = get(s, t.id).await;
        assert_eq!((now.worker_id, now.failures), (Some(w("w2")), 2), "{b}: failed by w2");
        assert_eq!(now.error.as_deref(), Some("flaky again"), "{b}");
        assert!(now.finished_at.is_some(), "{b}");
    }

    pub async fn a_lost_attempt_keeps_the_error_of_an_earlier_failure_until_it_fails_the_task(s: &Store) {
        let b = s.backend();
        let t = create_one(s, with_attempts(new_task("prove"), 2)).await;
        let h = claim_one(s, t.id, "w1", LONG_LEASE).await;
        fail_one(s, &h, "boom", true, policy(0)).await;
        // Released: not charged, and the error of the failure stays.
        let h = claim_one(s, t.id, "w2", LONG_LEASE).await;
        let out = s.requeue_released(std::slice::from_ref(&h)).await.expect("release");
        assert_eq!(out.len(), 1, "{b}");
        let now = get(s, t.id).await;
        assert_eq!(
            (now.state, now.failures, now.error.as_deref()),
            (TaskState::Pending, 1, Some("boom")),
            "{b}"
        );
        // A lapsed lease is charged: the last attempt is gone, and the error names the lost one.
        claim_one(s, t.id, "w3", TINY_LEASE).await;
        wait_for_lease_to_lapse(s, t.id).await;
        let out = s.requeue_expired(100).await.expect("requeue_expired");
        assert_eq!(out.len(), 1, "{b}");
        assert_eq!(out[0].state, TaskState::Failed, "{b}");
        let now = get(s, t.id).await;
        assert_eq!((now.state, now.failures, now.worker_id), (TaskState::Failed, 2, None), "{b}");
        assert_eq!(now.error.as_deref(), Some("attempt 3 lost: lease_expired on worker w3"), "{b}");
    }

    pub async fn fail_repeated_report_is_duplicate(s: &Store) {
        let b = s.backend();
        let p = policy(60_000);
        let r = create_one(s, new_task("prove")).await;
        let n = create_one(s, new_task("prove")).await;
        let hr = claim_one(s, r.id, "w1", LONG_LEASE).await;
        let hn = claim_one(s, n.id, "w1", LONG_LEASE).await;
        assert_eq!(
            fail_one(s, &hr, "flaky", true, p).await,
            ReportOutcome::Applied { state: TaskState::Pending }
        );
        assert_eq!(
            fail_one(s, &hn, "broken", false, p).await,
            ReportOutcome::Applied { state: TaskState::Failed }
        );
        let br = get(s, r.id).await;
        let bn = get(s, n.id).await;
        let hist_r = attempts(s, r.id).await;
        assert_eq!(
            fail_one(s, &hr, "flaky", true, p).await,
            ReportOutcome::Duplicate { state: TaskState::Pending }
        );
        assert_eq!(
            fail_one(s, &hn, "broken", false, p).await,
            ReportOutcome::Duplicate { state: TaskState::Failed }
        );
        assert_eq!(get(s, r.id).await, br, "{b}: no second failure charged");
        assert_eq!(get(s, n.id).await, bn, "{b}");
        assert_eq!(attempts(s, r.id).await, hist_r, "{b}");
        // A completion for the failed attempt is a different report: stale, not a duplicate.
        assert_eq!(
            complete_one(s, &hn, b"late").await,
            ReportOutcome::Stale { state: TaskState::Failed, attempt: 1 },
            "{b}"
        );
        assert_eq!(get(s, n.id).await, bn, "{b}");
    }

    pub async fn fail_from_a_stale_attempt_or_worker_is_stale(s: &Store) {
        let b = s.backend();
        let p = policy(100);
        let t = create_one(s, new_task("prove")).await;
        let h1 = claim_one(s, t.id, "w1", LONG_LEASE).await;
        requeue_dead(s, &w("w1")).await.expect("requeue_worker");
        let h2 = claim_one(s, t.id, "w2", LONG_LEASE).await;
        let before = get(s, t.id).await;
        let hist = attempts(s, t.id).await;
        let stale = ReportOutcome::Stale { state: TaskState::Assigned, attempt: 2 };
        assert_eq!(fail_one(s, &h1, "late", true, p).await, stale, "{b}: old attempt");
        assert_eq!(fail_one(s, &h1, "late", false, p).await, stale, "{b}: old attempt, non-retriable");
        assert_eq!(
            fail_one(s, &held_as(t.id, "w3", 2), "forged", false, p).await,
            stale,
            "{b}: other worker"
        );
        assert_eq!(get(s, t.id).await, before, "{b}: nothing changed");
        assert_eq!(attempts(s, t.id).await, hist, "{b}");
        assert_eq!(
            fail_one(s, &held_as(TaskId::new(), "w1", 1), "?", true, p).await,
            ReportOutcome::NotFound
        );
        assert_eq!(h2.attempt, 2, "{b}");
    }

    // ---- cancel ----

    pub async fn cancel_pending_task_has_no_holder(s: &Store) {
        let b = s.backend();
        let t = create_one(s, new_task("prove")).await;
        let t0 = Utc::now();
        let c = s.cancel(t.id, "user asked").await.expect("cancel").expect("known task");
        let t1 = Utc::now();
        assert!(c.applied, "{b}: the cancel applied");
        assert_eq!(c.held_by, None, "{b}: nobody to tell");
        assert_eq!(c.task.state, TaskState::Cancelled, "{b}");
        let now = get(s, t.id).await;
        assert_eq!(c.task, now, "{b}: the returned task is the stored row");
        assert_eq!(now.error.as_deref(), Some("user asked"), "{b}");
        assert_within(b, "finished_at", now.finished_at.expect("finished"), t0 - SLACK, t1 + SLACK);
        assert_eq!((now.attempt, now.worker_id), (0, None), "{b}");
        assert!(attempts(s, t.id).await.is_empty(), "{b}");
        let got = s.claim(10, &TypeFilter::Any, LONG_LEASE, |_| panic!("cancelled is no candidate")).await;
        assert!(got.expect("claim").is_empty(), "{b}");
    }

    pub async fn cancel_held_task_names_its_holder_and_fences_later_reports(s: &Store) {
        let b = s.backend();
        let a = create_one(s, new_task("prove")).await;
        let r = create_one(s, new_task("prove")).await;
        let ha = claim_one(s, a.id, "w1", LONG_LEASE).await;
        let hr = claim_one(s, r.id, "w2", LONG_LEASE).await;
        s.mark_running(std::slice::from_ref(&hr)).await.expect("mark_running");

        let ca = s.cancel(a.id, "superseded").await.expect("cancel").expect("known");
        assert!(ca.applied, "{b}");
        assert_eq!(ca.held_by, Some(ha.clone()), "{b}: the assigned task names (w1, 1)");
        assert_eq!(ca.task.state, TaskState::Cancelled, "{b}");
        assert_eq!(ca.task.lease_expires_at, None, "{b}");
        let cr = s.cancel(r.id, "superseded").await.expect("cancel").expect("known");
        assert!(cr.applied, "{b}");
        assert_eq!(cr.held_by, Some(hr.clone()), "{b}: the running task names (w2, 1)");
        for id in [a.id, r.id] {
            let att = last_attempt(s, id).await;
            assert_eq!(att.outcome.as_deref(), Some("cancelled"), "{b}");
            assert!(att.finished_at.is_some(), "{b}");
        }

        let after_a = get(s, a.id).await;
        let after_r = get(s, r.id).await;
        assert_eq!(
            complete_one(s, &ha, b"too late").await,
            ReportOutcome::Stale { state: TaskState::Cancelled, attempt: 1 },
            "{b}"
        );
        assert_eq!(
            fail_one(s, &hr, "too late", true, policy(100)).await,
            ReportOutcome::Stale { state: TaskState::Cancelled, attempt: 1 },
            "{b}"
        );
        assert!(
            s.renew_leases(&[ha, hr], LONG_LEASE).await.expect("renew").is_empty(),
            "{b}: leases revoked"
        );
        assert_eq!(get(s, a.id).await, after_a, "{b}: still cancelled, no result");
        assert_eq!(get(s, r.id).await, after_r, "{b}");
        assert_eq!(after_a.result, None, "{b}");
    }

    pub async fn cancel_of_a_terminal_task_returns_it_unchanged(s: &Store) {
        let b = s.backend();
        let done = create_one(s, new_task("prove")).await;
        let failed = create_one(s, new_task("prove")).await;
        let gone = create_one(s, new_task("prove")).await;
        let hd = claim_one(s, done.id, "w1", LONG_LEASE).await;
        complete_one(s, &hd, b"result").await;
        let hf = claim_one(s, failed.id, "w1", LONG_LEASE).await;
        fail_one(s, &hf, "fatal", false, policy(100)).await;
        s.cancel(gone.id, "first").await.expect("cancel");

        for (id, state) in
            [(done.id, TaskState::Completed), (failed.id, TaskState::Failed), (gone.id, TaskState::Cancelled)]
        {
            let before = get(s, id).await;
            let hist = attempts(s, id).await;
            let c = s.cancel(id, "second").await.expect("cancel").expect("known");
            assert!(!c.applied, "{b}: cancelling a {state} task does not apply");
            assert_eq!(c.held_by, None, "{b}: {state} task has no holder to tell");
            assert_eq!(c.task, before, "{b}: the {state} task is returned as it is");
            assert_eq!(get(s, id).await, before, "{b}: the {state} task is unchanged");
            assert_eq!(attempts(s, id).await, hist, "{b}");
        }
        assert_eq!(get(s, done.id).await.result.as_deref(), Some(&b"result"[..]), "{b}");
        assert_eq!(get(s, gone.id).await.error.as_deref(), Some("first"), "{b}");
    }

    pub async fn cancel_of_an_unknown_task_is_none(s: &Store) {
        let b = s.backend();
        assert_eq!(s.cancel(TaskId::new(), "?").await.expect("cancel"), None, "{b}");
    }

    // ---- requeues ----

    pub async fn requeue_expired_returns_lapsed_leases_to_pending(s: &Store) {
        let b = s.backend();
        let lapsed = create_one(s, new_task("prove")).await;
        let kept = create_one(s, new_task("verify")).await;
        let h = claim_one(s, lapsed.id, "w1", TINY_LEASE).await;
        s.mark_running(std::slice::from_ref(&h)).await.expect("mark_running");
        claim_one(s, kept.id, "w1", LONG_LEASE).await;
        let kept_before = get(s, kept.id).await;
        wait_for_lease_to_lapse(s, lapsed.id).await;

        let t0 = Utc::now();
        let out = s.requeue_expired(100).await.expect("requeue_expired");
        let t1 = Utc::now();
        assert_eq!(
            out,
            vec![Requeued {
                task_id: lapsed.id,
                task_type: "prove".into(),
                worker_id: w("w1"),
                attempt: 1,
                state: TaskState::Pending,
                reason: RequeueReason::LeaseExpired,
            }],
            "{b}"
        );
        let now = get(s, lapsed.id).await;
        assert_eq!(now.state, TaskState::Pending, "{b}");
        assert_eq!((now.failures, now.attempt), (1, 1), "{b}: charged one failure");
        assert_eq!(now.worker_id, None, "{b}");
        assert_eq!(now.lease_expires_at, None, "{b}");
        assert_eq!(now.finished_at, None, "{b}");
        assert_within(b, "run_after", now.run_after, t0 - SLACK, t1 + SLACK);
        let att = last_attempt(s, lapsed.id).await;
        assert_eq!(att.outcome.as_deref(), Some("lease_expired"), "{b}");
        assert!(att.finished_at.is_some(), "{b}");
        assert_eq!(get(s, kept.id).await, kept_before, "{b}: the long lease is untouched");
        assert!(s.requeue_expired(100).await.expect("requeue_expired").is_empty(), "{b}: nothing more");

        let again = claim_one(s, lapsed.id, "w2", LONG_LEASE).await;
        assert_eq!(again.attempt, 2, "{b}: runnable again, next attempt");
        // The lost worker's report is now stale.
        assert_eq!(
            complete_one(s, &h, b"late").await,
            ReportOutcome::Stale { state: TaskState::Assigned, attempt: 2 },
            "{b}"
        );
    }

    pub async fn requeue_expired_fails_a_task_out_of_attempts(s: &Store) {
        let b = s.backend();
        let t = create_one(s, with_attempts(new_task("prove"), 1)).await;
        claim_one(s, t.id, "worker-xyz", TINY_LEASE).await;
        wait_for_lease_to_lapse(s, t.id).await;
        let out = s.requeue_expired(100).await.expect("requeue_expired");
        assert_eq!(out.len(), 1, "{b}");
        assert_eq!((out[0].task_id, out[0].state), (t.id, TaskState::Failed), "{b}: out of attempts");
        assert_eq!((out[0].worker_id.clone(), out[0].attempt), (w("worker-xyz"), 1), "{b}");
        let now = get(s, t.id).await;
        assert_eq!((now.state, now.failures), (TaskState::Failed, 1), "{b}");
        let err = now.error.expect("an error is recorded");
        assert!(err.contains("worker-xyz"), "{b}: error {err:?} names the worker");
        assert!(err.contains("lease_expired"), "{b}: error {err:?} names the reason");
        assert!(now.finished_at.is_some(), "{b}");
        assert_eq!(now.lease_expires_at, None, "{b}");
        assert_eq!(last_attempt(s, t.id).await.outcome.as_deref(), Some("lease_expired"), "{b}");
        let got = s.claim(10, &TypeFilter::Any, LONG_LEASE, |_| panic!("failed is no candidate")).await;
        assert!(got.expect("claim").is_empty(), "{b}");
    }

    /// A running attempt still unreported `grace` after its deadline (its timeout after the
    /// assignment) is taken back whatever its lease says: charged (`timed_out`), pending again,
    /// or failed when out of attempts; one within its grace, one with a later deadline, a
    /// completed one and one never delivered (still `assigned`: the slot comparison gives it
    /// back uncharged) are untouched, and the late report of the one taken back is stale.
    pub async fn requeue_overdue_takes_back_attempts_past_their_deadline_and_grace(s: &Store) {
        let b = s.backend();
        let short = |attempts| {
            let mut t = with_attempts(new_task("prove"), attempts);
            t.timeout = Duration::from_millis(100);
            t
        };
        let overdue = create_one(s, short(3)).await;
        let last_try = create_one(s, short(1)).await;
        let done = create_one(s, short(3)).await;
        let later = create_one(s, new_task("prove")).await;
        let undelivered = create_one(s, short(3)).await;
        let h = claim_one(s, overdue.id, "w1", LONG_LEASE).await;
        let l = claim_one(s, last_try.id, "w2", LONG_LEASE).await;
        let d = claim_one(s, done.id, "w1", LONG_LEASE).await;
        let m = claim_one(s, later.id, "w1", LONG_LEASE).await;
        claim_one(s, undelivered.id, "w1", LONG_LEASE).await;
        s.mark_running(&[h.clone(), l, d.clone(), m]).await.expect("mark_running");
        assert_eq!(
            complete_one(s, &d, b"in time").await,
            ReportOutcome::Applied { state: TaskState::Completed }
        );
        let later_before = get(s, later.id).await;
        let undelivered_before = get(s, undelivered.id).await;
        tokio::time::sleep(Duration::from_millis(400)).await;

        // Past the deadline, within the grace: nothing yet.
        assert!(
            s.requeue_overdue(100, Duration::from_secs(60)).await.expect("requeue_overdue").is_empty(),
            "{b}"
        );
        let mut out = s.requeue_overdue(100, Duration::from_millis(100)).await.expect("requeue_overdue");
        out.sort_by_key(|r| r.worker_id.0.clone());
        assert_eq!(
            out,
            vec![
                Requeued {
                    task_id: overdue.id,
                    task_type: "prove".into(),
                    worker_id: w("w1"),
                    attempt: 1,
                    state: TaskState::Pending,
                    reason: RequeueReason::TimedOut,
                },
                Requeued {
                    task_id: last_try.id,
                    task_type: "prove".into(),
                    worker_id: w("w2"),
                    attempt: 1,
                    state: TaskState::Failed,
                    reason: RequeueReason::TimedOut,
                },
            ],
            "{b}"
        );
        let now = get(s, overdue.id).await;
        assert_eq!(
            (now.state, now.failures, now.worker_id.clone()),
            (TaskState::Pending, 1, None),
            "{b}: charged"
        );
        assert_eq!(last_attempt(s, overdue.id).await.outcome.as_deref(), Some("timed_out"), "{b}");
        let failed = get(s, last_try.id).await;
        assert_eq!(failed.state, TaskState::Failed, "{b}");
        let err = failed.error.expect("an error is recorded");
        assert!(err.contains("timed_out") && err.contains("w2"), "{b}: {err:?}");
        assert_eq!(get(s, done.id).await.state, TaskState::Completed, "{b}");
        assert_eq!(get(s, later.id).await, later_before, "{b}: a later deadline is untouched");
        assert_eq!(
            get(s, undelivered.id).await,
            undelivered_before,
            "{b}: never delivered: left to the slot comparison"
        );
        assert!(s.requeue_overdue(100, Duration::ZERO).await.expect("requeue_overdue").is_empty(), "{b}");
        assert_eq!(
            complete_one(s, &h, b"late").await,
            ReportOutcome::Stale { state: TaskState::Pending, attempt: 1 },
            "{b}: the late report changes nothing"
        );
    }

    pub async fn requeue_expired_respects_its_limit(s: &Store) {
        let b = s.backend();
        let tasks = create_n(s, "prove", 3).await;
        let ids: Vec<TaskId> = tasks.iter().map(|t| t.id).collect();
        claim_ids(s, &ids, &w("w1"), TINY_LEASE).await;
        for id in &ids {
            wait_for_lease_to_lapse(s, *id).await;
        }
        let first = s.requeue_expired(2).await.expect("requeue_expired");
        assert_eq!(first.len(), 2, "{b}");
        let second = s.requeue_expired(2).await.expect("requeue_expired");
        assert_eq!(second.len(), 1, "{b}");
        let all: BTreeSet<TaskId> = first.iter().chain(&second).map(|r| r.task_id).collect();
        assert_eq!(all, ids.iter().copied().collect(), "{b}");
    }

    pub async fn requeue_expired_leaves_a_task_completed_before_it(s: &Store) {
        let b = s.backend();
        let won = create_one(s, new_task("prove")).await;
        let control = create_one(s, new_task("prove")).await;
        let got = claim_ids(s, &[won.id, control.id], &w("w1"), TINY_LEASE).await;
        wait_for_lease_to_lapse(s, won.id).await;
        wait_for_lease_to_lapse(s, control.id).await;
        // The completion arrives after the lease ran out but before the sweeper: it wins.
        assert_eq!(
            complete_one(s, &held(&got[0]), b"just in time").await,
            ReportOutcome::Applied { state: TaskState::Completed },
            "{b}"
        );
        let done = get(s, won.id).await;
        let out = s.requeue_expired(100).await.expect("requeue_expired");
        let requeued: Vec<TaskId> = out.iter().map(|r| r.task_id).collect();
        assert_eq!(requeued, vec![control.id], "{b}: only the control task had a lapsed lease");
        assert_eq!(get(s, won.id).await, done, "{b}: the completed task is untouched");
        assert_eq!(done.result.as_deref(), Some(&b"just in time"[..]), "{b}");
        assert_eq!(last_attempt(s, won.id).await.outcome.as_deref(), Some("completed"), "{b}");
    }

    pub async fn requeue_worker_gives_back_every_task_of_that_worker_only(s: &Store) {
        let b = s.backend();
        let a = create_one(s, new_task("prove")).await;
        let r = create_one(s, new_task("verify")).await;
        let c = create_one(s, new_task("prove")).await;
        let last = create_one(s, with_attempts(new_task("prove"), 1)).await;
        let other = create_one(s, new_task("prove")).await;
        let got = claim_ids(s, &[a.id, r.id, c.id, last.id], &w("w1"), LONG_LEASE).await;
        s.mark_running(&[held(&got[1]), held(&got[3])]).await.expect("mark_running");
        complete_one(s, &held(&got[2]), b"done").await;
        claim_one(s, other.id, "w2", LONG_LEASE).await;
        let c_before = get(s, c.id).await;
        let other_before = get(s, other.id).await;

        let mut out = requeue_dead(s, &w("w1")).await.expect("requeue_worker");
        out.sort_by_key(|q| q.task_id);
        let rq = |task_id, task_type: &str, state| Requeued {
            task_id,
            task_type: task_type.into(),
            worker_id: w("w1"),
            attempt: 1,
            state,
            reason: RequeueReason::WorkerDead,
        };
        let mut want = vec![
            rq(a.id, "prove", TaskState::Pending),
            rq(r.id, "verify", TaskState::Pending),
            rq(last.id, "prove", TaskState::Failed),
        ];
        want.sort_by_key(|q| q.task_id);
        assert_eq!(out, want, "{b}");
        for id in [a.id, r.id] {
            let now = get(s, id).await;
            assert_eq!((now.state, now.failures, now.attempt), (TaskState::Pending, 1, 1), "{b}: charged");
            assert_eq!((now.worker_id, now.lease_expires_at), (None, None), "{b}");
            assert_eq!(last_attempt(s, id).await.outcome.as_deref(), Some("worker_dead"), "{b}");
        }
        let l = get(s, last.id).await;
        assert_eq!((l.state, l.failures), (TaskState::Failed, 1), "{b}");
        assert!(
            l.error.as_deref().is_some_and(|e| e.contains("w1")),
            "{b}: error {:?} names the worker",
            l.error
        );
        assert_eq!(last_attempt(s, last.id).await.outcome.as_deref(), Some("worker_dead"), "{b}");
        assert_eq!(get(s, c.id).await, c_before, "{b}: the completed task is untouched");
        assert_eq!(get(s, other.id).await, other_before, "{b}: w2's task is untouched");
        assert!(requeue_dead(s, &w("w1")).await.expect("requeue_worker").is_empty(), "{b}: nothing left");
        assert!(requeue_dead(s, &w("nobody")).await.expect("requeue_worker").is_empty(), "{b}");
    }

    pub async fn requeue_undelivered_moves_only_assigned_tasks_without_charging(s: &Store) {
        let b = s.backend();
        let tasks = create_n(s, "prove", 4).await;
        let [a, r, x, y] = [0, 1, 2, 3].map(|i| tasks[i].id);
        let got = claim_ids(s, &[a, r, x, y], &w("w1"), LONG_LEASE).await;
        let [ha, hr, hx, hy] = [0, 1, 2, 3].map(|i| held(&got[i]));
        s.mark_running(std::slice::from_ref(&hr)).await.expect("mark_running");
        let before: Vec<Task> = futures::future::join_all([r, x, y].map(|id| get(s, id))).await;

        let out = s
            .requeue_undelivered(&[
                ha.clone(),
                hr,                               // running: it was delivered
                held_as(x, "w1", hx.attempt + 1), // another attempt
                held_as(y, "w2", hy.attempt),     // another worker
                held_as(TaskId::new(), "w1", 1),  // unknown
            ])
            .await
            .expect("requeue_undelivered");
        assert_eq!(
            out,
            vec![Requeued {
                task_id: a,
                task_type: "prove".into(),
                worker_id: w("w1"),
                attempt: 1,
                state: TaskState::Pending,
                reason: RequeueReason::Undelivered,
            }],
            "{b}"
        );
        let now = get(s, a).await;
        assert_eq!(now.state, TaskState::Pending, "{b}");
        assert_eq!(now.failures, 0, "{b}: not charged");
        assert_eq!(now.attempt, 1, "{b}: attempt number kept");
        assert_eq!((now.worker_id, now.lease_expires_at), (None, None), "{b}");
        assert_eq!(last_attempt(s, a).await.outcome.as_deref(), Some("undelivered"), "{b}");
        let after: Vec<Task> = futures::future::join_all([r, x, y].map(|id| get(s, id))).await;
        assert_eq!(after, before, "{b}: running, other-attempt and other-worker tasks untouched");

        let next = claim_one(s, a, "w2", LONG_LEASE).await;
        assert_eq!(next.attempt, 2, "{b}: the next claim is attempt 2");
        assert_eq!(
            complete_one(s, &ha, b"late").await,
            ReportOutcome::Stale { state: TaskState::Assigned, attempt: 2 },
            "{b}"
        );
    }

    pub async fn held_by_lists_what_a_worker_holds(s: &Store) {
        let b = s.backend();
        let tasks = create_n(s, "prove", 6).await;
        let [a, r, done, failed, lost, other] = [0, 1, 2, 3, 4, 5].map(|i| tasks[i].id);
        let got = claim_ids(s, &[a, r, done, failed, lost], &w("w1"), LONG_LEASE).await;
        let h: Vec<Held> = got.iter().map(held).collect();
        s.mark_running(&[h[1].clone()]).await.expect("mark_running");
        complete_one(s, &h[2], b"ok").await;
        fail_one(s, &h[3], "fatal", false, policy(100)).await;
        s.requeue_undelivered(&[h[4].clone()]).await.expect("requeue_undelivered");
        let again = claim_one(s, lost, "w1", LONG_LEASE).await; // attempt 2
        claim_one(s, other, "w2", LONG_LEASE).await;

        let mut want = vec![h[0].clone(), h[1].clone(), again];
        want.sort_by_key(|h| h.task_id);
        assert_eq!(s.held_by(&w("w1")).await.expect("held_by"), want, "{b}: assigned + running, by id");
        assert_eq!(s.held_by(&w("w2")).await.expect("held_by"), vec![held_as(other, "w2", 1)], "{b}");
        assert!(s.held_by(&w("nobody")).await.expect("held_by").is_empty(), "{b}");
        assert!(want.iter().all(|h| h.task_id != done && h.task_id != failed), "{b}");
        assert_eq!(want.iter().find(|h| h.task_id == lost).map(|h| h.attempt), Some(2), "{b}");
        assert!(want.iter().any(|h| h.task_id == r) && want.iter().any(|h| h.task_id == a), "{b}");
    }

    // ---- races ----

    pub async fn concurrent_claimers_never_share_a_task(s: &Store) {
        let b = s.backend();
        let tasks = create_n(s, "prove", 300).await;
        let claimer = |name: &'static str| {
            let s = s.clone();
            tokio::spawn(async move {
                let mut mine = Vec::new();
                loop {
                    let got = s
                        .claim(10, &TypeFilter::Any, LONG_LEASE, |c| {
                            c.iter().map(|c| (c.id, w(name))).collect()
                        })
                        .await
                        .expect("claim");
                    if got.is_empty() {
                        break;
                    }
                    assert!(got.iter().all(|a| a.attempt == 1 && a.worker_id == w(name)));
                    mine.extend(got.into_iter().map(|a| a.task_id));
                }
                mine
            })
        };
        let (one, two) = (claimer("c1"), claimer("c2"));
        let (one, two) = (one.await.expect("claimer 1"), two.await.expect("claimer 2"));
        let set1: BTreeSet<TaskId> = one.iter().copied().collect();
        let set2: BTreeSet<TaskId> = two.iter().copied().collect();
        assert_eq!(set1.len(), one.len(), "{b}: claimer 1 got no task twice");
        assert_eq!(set2.len(), two.len(), "{b}: claimer 2 got no task twice");
        assert!(set1.is_disjoint(&set2), "{b}: shared: {:?}", set1.intersection(&set2).collect::<Vec<_>>());
        let all: BTreeSet<TaskId> = tasks.iter().map(|t| t.id).collect();
        let union: BTreeSet<TaskId> = set1.union(&set2).copied().collect();
        assert_eq!(union, all, "{b}: every task claimed");
        eprintln!("{b}: claimer 1 took {}, claimer 2 took {}", set1.len(), set2.len());
        for t in all_tasks(s).await {
            let want = if set1.contains(&t.id) { "c1" } else { "c2" };
            assert_eq!((t.state, t.attempt, t.worker_id), (TaskState::Assigned, 1, Some(w(want))), "{b}");
        }
        for t in tasks.iter().take(20) {
            assert_eq!(attempts(s, t.id).await.len(), 1, "{b}: one attempts row");
        }
    }

    pub async fn completion_racing_requeue_worker_lands_exactly_once(s: &Store) {
        let b = s.backend();
        let (mut completed, mut requeued_total) = (0, 0);
        for round in 0..50 {
            let worker = WorkerId(format!("w-race-{round}"));
            let tasks = create_n(s, "prove", 4).await;
            let ids: Vec<TaskId> = tasks.iter().map(|t| t.id).collect();
            let helds: Vec<Held> = claim_ids(s, &ids, &worker, LONG_LEASE).await.iter().map(held).collect();
            s.mark_running(&helds[..2]).await.expect("mark_running");
            let reports: Vec<Completion> =
                helds.iter().map(|h| completion(h, h.task_id.0.as_bytes())).collect();
            let barrier = Arc::new(tokio::sync::Barrier::new(2));
            let completer = {
                let (s, barrier, reports) = (s.clone(), barrier.clone(), reports.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    if round % 2 == 0 {
                        s.complete(&reports).await.expect("complete")
                    } else {
                        let mut out = Vec::new();
                        for r in &reports {
                            out.extend(s.complete(std::slice::from_ref(r)).await.expect("complete"));
                        }
                        out
                    }
                })
            };
            let requeuer = {
                let (s, barrier, worker) = (s.clone(), barrier.clone(), worker.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    requeue_dead(&s, &worker).await.expect("requeue_worker")
                })
            };
            let outcomes = completer.await.expect("completer");
            let requeued = requeuer.await.expect("requeuer");
            assert_eq!(outcomes.len(), 4, "{b}");
            for (i, h) in helds.iter().enumerate() {
                let task = get(s, h.task_id).await;
                let listed = requeued.iter().find(|r| r.task_id == h.task_id);
                let last = last_attempt(s, h.task_id).await;
                match (&outcomes[i], listed) {
                    (ReportOutcome::Applied { state: TaskState::Completed }, None) => {
                        completed += 1;
                        assert_eq!(task.state, TaskState::Completed, "{b}: round {round} task {i}");
                        assert_eq!(task.result.as_deref(), Some(h.task_id.0.as_bytes().as_slice()), "{b}");
                        assert_eq!(task.failures, 0, "{b}: round {round} task {i}");
                        assert_eq!(last.outcome.as_deref(), Some("completed"), "{b}: round {round} task {i}");
                    }
                    (ReportOutcome::Stale { state: TaskState::Pending, attempt: 1 }, Some(r)) => {
                        requeued_total += 1;
                        assert_eq!(
                            (r.state, r.reason),
                            (TaskState::Pending, RequeueReason::WorkerDead),
                            "{b}"
                        );
                        assert_eq!(task.state, TaskState::Pending, "{b}: round {round} task {i}");
                        assert_eq!((task.failures, task.worker_id.clone()), (1, None), "{b}");
                        assert_eq!(task.result, None, "{b}: round {round} task {i}");
                        assert_eq!(
                            last.outcome.as_deref(),
                            Some("worker_dead"),
                            "{b}: round {round} task {i}"
                        );
                    }
                    (outcome, listed) => panic!(
                        "{b}: round {round} task {i}: completion said {outcome:?}, requeue listed {listed:?}, \
                         task is {:?}: exactly one of them must win",
                        task.state
                    ),
                }
                assert_eq!(attempts(s, h.task_id).await.len(), 1, "{b}");
            }
        }
        eprintln!("{b}: {completed} completions won, {requeued_total} requeues won");
    }

    // ---- workers ----

    pub async fn workers_register_and_list_with_in_flight_counts(s: &Store) {
        let b = s.backend();
        let (s1, s2) = (Uuid::now_v7(), Uuid::now_v7());
        let before = Utc::now();
        s.upsert_worker(&registration("w-b", s2)).await.expect("upsert");
        let mut reg_a = registration("w-a", s1);
        reg_a.labels.insert("empty".into(), String::new());
        reg_a.capabilities = vec!["prove".into()];
        s.upsert_worker(&reg_a).await.expect("upsert");
        let after = Utc::now();

        let tasks = create_n(s, "prove", 4).await;
        let ids: Vec<TaskId> = tasks.iter().map(|t| t.id).collect();
        let got = claim_ids(s, &ids[..3], &w("w-a"), LONG_LEASE).await;
        s.mark_running(&[held(&got[0])]).await.expect("mark_running");
        complete_one(s, &held(&got[2]), b"done").await;

        let a = s.get_worker(&w("w-a")).await.expect("get_worker").expect("registered");
        assert_eq!(a.id, w("w-a"), "{b}");
        assert_eq!(a.state, WorkerState::Active, "{b}");
        assert_eq!(a.max_concurrent_tasks, 4, "{b}");
        assert_eq!(a.capabilities, vec!["prove".to_string()], "{b}");
        assert_eq!(a.labels, reg_a.labels, "{b}: labels round-trip");
        assert_eq!((a.version.as_str(), a.hostname.as_str()), ("1.2.3", "w-a.example"), "{b}");
        assert_eq!(a.session_id, s1, "{b}");
        assert_eq!(a.coordinator_id, "coord-a", "{b}");
        assert_within(b, "registered_at", a.registered_at, before - SLACK, after + SLACK);
        assert_within(b, "last_heartbeat_at", a.last_heartbeat_at, before - SLACK, after + SLACK);
        assert_eq!(a.in_flight, 2, "{b}: one assigned + one running; the completed one does not count");

        let all = s.list_workers(None, 1000).await.expect("list_workers");
        assert_eq!(all.iter().map(|w| w.id.0.as_str()).collect::<Vec<_>>(), vec!["w-a", "w-b"], "{b}: by id");
        assert_eq!(all[0], a, "{b}: list and get agree");
        let wb = &all[1];
        assert_eq!(wb.capabilities, vec!["prove".to_string(), "verify".to_string()], "{b}");
        assert_eq!(wb.labels, registration("w-b", s2).labels, "{b}");
        assert_eq!((wb.session_id, wb.in_flight), (s2, 0), "{b}");
        // A page at a time, by id, each with its holdings.
        let first = s.list_workers(None, 1).await.expect("list_workers");
        assert_eq!(first, vec![a.clone()], "{b}: the first page");
        let second = s.list_workers(Some(&first[0].id), 1).await.expect("list_workers");
        assert_eq!(second, vec![wb.clone()], "{b}: the page after w-a");
        assert!(s.list_workers(Some(&wb.id), 1).await.expect("list_workers").is_empty(), "{b}: none after");
        assert_eq!(s.get_worker(&w("nobody")).await.expect("get_worker"), None, "{b}");
        assert_eq!(s.worker_stats(&w("nobody")).await.expect("worker_stats"), None, "{b}");
    }

    pub async fn worker_reregistration_replaces_session_and_fences_state_changes(s: &Store) {
        let b = s.backend();
        let (old, new) = (Uuid::now_v7(), Uuid::now_v7());
        s.upsert_worker(&registration("w1", old)).await.expect("upsert");
        assert!(
            s.set_worker_state(&w("w1"), old, WorkerState::Suspect, Utc::now()).await.expect("set"),
            "{b}"
        );
        assert_eq!(s.get_worker(&w("w1")).await.unwrap().unwrap().state, WorkerState::Suspect, "{b}");

        let mut again = registration("w1", new);
        again.capabilities = vec!["verify".into()];
        again.version = "2.0.0".into();
        again.max_concurrent_tasks = 8;
        s.upsert_worker(&again).await.expect("upsert");
        let rec = s.get_worker(&w("w1")).await.unwrap().unwrap();
        assert_eq!(rec.session_id, new, "{b}: the new session replaces the old");
        assert_eq!(rec.state, WorkerState::Active, "{b}: re-registration makes it active");
        assert_eq!(
            (rec.capabilities, rec.version, rec.max_concurrent_tasks),
            (vec!["verify".into()], "2.0.0".into(), 8)
        );
        assert_eq!(s.list_workers(None, 1000).await.expect("list").len(), 1, "{b}: still one worker");

        assert!(
            !s.set_worker_state(&w("w1"), old, WorkerState::Dead, Utc::now()).await.expect("set"),
            "{b}: old session"
        );
        assert_eq!(
            s.get_worker(&w("w1")).await.unwrap().unwrap().state,
            WorkerState::Active,
            "{b}: unchanged"
        );
        assert!(
            s.set_worker_state(&w("w1"), new, WorkerState::Draining, Utc::now()).await.expect("set"),
            "{b}"
        );
        assert_eq!(s.get_worker(&w("w1")).await.unwrap().unwrap().state, WorkerState::Draining, "{b}");
        assert!(
            !s.set_worker_state(&w("nobody"), new, WorkerState::Dead, Utc::now()).await.expect("set"),
            "{b}"
        );
    }

    pub async fn flush_heartbeats_updates_many_workers_and_never_moves_backwards(s: &Store) {
        let b = s.backend();
        let names = ["w1", "w2", "w3", "w4", "w5"];
        for n in names {
            s.upsert_worker(&registration(n, Uuid::now_v7())).await.expect("upsert");
        }
        let t1 = micros_precision(Utc::now() + TimeDelta::seconds(1));
        let mut beats: Vec<(WorkerId, DateTime<Utc>)> = names.iter().map(|n| (w(n), t1)).collect();
        beats.push((w("ghost"), t1));
        assert_eq!(s.flush_heartbeats(&beats).await.expect("flush"), 5, "{b}: five workers in one call");
        for rec in s.list_workers(None, 1000).await.expect("list") {
            assert_eq!(rec.last_heartbeat_at, t1, "{b}: {}", rec.id);
        }
        assert_eq!(s.get_worker(&w("ghost")).await.expect("get"), None, "{b}: no worker invented");

        let t2 = t1 + TimeDelta::seconds(1);
        let older = t1 - TimeDelta::seconds(10);
        let n = s.flush_heartbeats(&[(w("w1"), older), (w("w2"), t2), (w("w3"), t1)]).await.expect("flush");
        assert_eq!(n, 1, "{b}: only w2 moved forward");
        let hb =
            |id: &'static str| async move { s.get_worker(&w(id)).await.unwrap().unwrap().last_heartbeat_at };
        assert_eq!(hb("w1").await, t1, "{b}: an older heartbeat does not move it back");
        assert_eq!(hb("w2").await, t2, "{b}");
        assert_eq!(hb("w3").await, t1, "{b}");
        assert_eq!(s.flush_heartbeats(&[]).await.expect("flush"), 0, "{b}");
    }

    /// A registration says the process is connected; a closed stream clears that for its own
    /// session only (a newer session, registered meanwhile, stays connected) and a stream
    /// opened again sets it, and a replica that stops clears it for the rows that still name it.
    pub async fn a_closed_stream_or_a_stopped_replica_clears_connected_for_its_session_only(s: &Store) {
        let b = s.backend();
        let connected =
            |id: &'static str| async move { s.get_worker(&w(id)).await.unwrap().unwrap().connected };
        let (old, new) = (Uuid::now_v7(), Uuid::now_v7());
        let mut reg = registration("w1", old);
        reg.holding = Some(Holding { instance: "i-1".into(), running: Vec::new() });
        s.upsert_worker(&reg).await.expect("upsert");
        let row = s.get_worker(&w("w1")).await.unwrap().unwrap();
        assert_eq!((row.connected, row.instance.as_deref()), (true, Some("i-1")), "{b}");
        s.upsert_worker(&registration("w1", new)).await.expect("a newer session");
        let closed = |id: &'static str, session| (w(id), session, false);
        let opened = |id: &'static str, session| (w(id), session, true);
        assert_eq!(
            s.streams_changed(&[closed("w1", old), closed("ghost", old)]).await.expect("closed"),
            0,
            "{b}"
        );
        assert!(connected("w1").await, "{b}: the stale session's stream leaves the newer one connected");
        assert_eq!(s.streams_changed(&[closed("w1", new)]).await.expect("closed"), 1, "{b}");
        assert!(!connected("w1").await, "{b}");
        // The session's stream opens again (and, in one batch, closes and opens once more): the
        // last change of the session wins; a stale session's opening changes nothing.
        assert_eq!(s.streams_changed(&[opened("w1", old)]).await.expect("stale"), 0, "{b}");
        assert!(!connected("w1").await, "{b}");
        let again = [closed("w1", new), opened("w1", new), closed("w1", new), opened("w1", new)];
        assert_eq!(s.streams_changed(&again).await.expect("reopened"), 1, "{b}");
        assert!(connected("w1").await, "{b}: reopened");
        assert_eq!(
            s.streams_changed(&[opened("w1", new)]).await.expect("again"),
            0,
            "{b}: no change, no write"
        );
        assert_eq!(
            s.streams_changed(&[opened("w1", new), closed("w1", new)]).await.expect("closed"),
            1,
            "{b}"
        );
        assert!(!connected("w1").await, "{b}: closed last");
        s.upsert_worker(&registration("w1", Uuid::now_v7())).await.expect("registers again");
        assert!(connected("w1").await, "{b}: a registration says connected again");

        let mut elsewhere = registration("w2", Uuid::now_v7());
        elsewhere.coordinator_id = "coord-b".into();
        s.upsert_worker(&elsewhere).await.expect("upsert");
        s.touch_coordinator("coord-a", "first").await.expect("touch");
        s.forget_coordinator("coord-a").await.expect("forget");
        assert!(!connected("w1").await, "{b}: its replica stopped");
        assert!(connected("w2").await, "{b}: another replica's worker is left alone");
        s.upsert_worker(&registration("w1", Uuid::now_v7())).await.expect("registers again");
        assert_eq!(s.disconnect_replica("coord-a").await.expect("a replica starts"), 1, "{b}");
        assert!(!connected("w1").await && connected("w2").await, "{b}");
        assert_eq!(s.streams_changed(&[]).await.expect("nothing"), 0, "{b}");
    }

    pub async fn live_workers_are_active_or_suspect_and_heard_from_lately(s: &Store) {
        let b = s.backend();
        let mut sessions = HashMap::new();
        for id in ["active", "suspect", "draining", "dead", "silent"] {
            let session = Uuid::now_v7();
            s.upsert_worker(&registration(id, session)).await.expect("upsert");
            sessions.insert(id, session);
        }
        for (id, state) in [
            ("suspect", WorkerState::Suspect),
            ("draining", WorkerState::Draining),
            ("dead", WorkerState::Dead),
        ] {
            assert!(s.set_worker_state(&w(id), sessions[id], state, Utc::now()).await.expect("set"), "{b}");
        }
        let tasks = create_n(s, "prove", 3).await;
        let ids: Vec<TaskId> = tasks.iter().map(|t| t.id).collect();
        claim_ids(s, &ids[..2], &w("active"), LONG_LEASE).await;

        // Let "silent" fall quiet for longer than the window; the others heartbeat.
        let window = Duration::from_millis(300);
        let quiet_since = s.get_worker(&w("silent")).await.unwrap().unwrap().last_heartbeat_at;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Utc::now() < quiet_since + TimeDelta::from_std(window * 2).unwrap() {
            assert!(Instant::now() < deadline, "{b}: the clock did not move");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let now = Utc::now();
        let beats: Vec<(WorkerId, DateTime<Utc>)> =
            ["active", "suspect", "draining", "dead"].iter().map(|id| (w(id), now)).collect();
        s.flush_heartbeats(&beats).await.expect("flush");

        let live = s.live_workers(window).await.expect("live_workers");
        let names: Vec<&str> = live.iter().map(|r| r.id.0.as_str()).collect();
        assert_eq!(names, ["active", "suspect"], "{b}: live rows, by id");
        assert_eq!(live[0].in_flight, 2, "{b}: with the tasks each holds");
        assert_eq!(live[0].capabilities, vec!["prove".to_string(), "verify".to_string()], "{b}");
        assert_eq!(live[1].state, WorkerState::Suspect, "{b}");
        let live = s.live_workers(Duration::from_secs(3600)).await.expect("live_workers");
        let names: Vec<&str> = live.iter().map(|r| r.id.0.as_str()).collect();
        assert_eq!(names, ["active", "silent", "suspect"], "{b}: within a longer window");
    }

    /// Each refresh of a replica's row names its process and answers the one it replaced.
    pub async fn a_replica_s_row_says_which_process_refreshed_it(s: &Store) {
        let b = s.backend();
        assert_eq!(s.coordinator_row("named").await.unwrap(), None, "{b}");
        assert_eq!(s.touch_coordinator("named", "first").await.unwrap(), None, "{b}: a new row");
        let row = s.coordinator_row("named").await.unwrap().expect("row");
        assert_eq!(row.instance.as_deref(), Some("first"), "{b}");
        assert!(row.seen_ago < Duration::from_secs(5), "{b}: {row:?}");
        assert_eq!(s.touch_coordinator("named", "first").await.unwrap().as_deref(), Some("first"), "{b}");
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(s.touch_coordinator("named", "second").await.unwrap().as_deref(), Some("first"), "{b}");
        let later = s.coordinator_row("named").await.unwrap().expect("row");
        assert_eq!(later.instance.as_deref(), Some("second"), "{b}");
        assert!(later.last_seen_at > row.last_seen_at, "{b}: {row:?} then {later:?}");
        s.forget_coordinator("named").await.unwrap();
        assert_eq!(s.coordinator_row("named").await.unwrap(), None, "{b}");
    }

    /// Heartbeats reach the database about once a minute; a worker whose replica is seen is
    /// live on its row's state alone, one whose replica is gone only on its own heartbeats.
    pub async fn a_worker_stays_live_while_its_replica_is_seen(s: &Store) {
        let b = s.backend();
        let mut here = registration("quiet-here", Uuid::now_v7());
        here.coordinator_id = "replica-a".into();
        let mut gone = registration("quiet-gone", Uuid::now_v7());
        gone.coordinator_id = "replica-b".into();
        s.upsert_worker(&here).await.expect("upsert");
        s.upsert_worker(&gone).await.expect("upsert");
        s.touch_coordinator("replica-b", "b-1").await.expect("touch");
        let window = Duration::from_millis(300);
        let registered = s.get_worker(&w("quiet-here")).await.unwrap().unwrap().last_heartbeat_at;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Utc::now() < registered + TimeDelta::from_std(window * 2).unwrap() {
            assert!(Instant::now() < deadline, "{b}: the clock did not move");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Only replica-a is seen lately (replica-b's row is as old as the heartbeats).
        s.touch_coordinator("replica-a", "a-1").await.expect("touch");
        s.touch_coordinator("replica-a", "a-1").await.expect("touch again");
        let live = s.live_workers(window).await.expect("live_workers");
        let names: Vec<&str> = live.iter().map(|r| r.id.0.as_str()).collect();
        assert_eq!(names, ["quiet-here"], "{b}: silent, but its replica is seen");
        assert!(live[0].owner_seen_at.is_some_and(|t| t > registered), "{b}: {:?}", live[0].owner_seen_at);
        let listed = s.list_workers(None, 10).await.expect("list");
        assert!(listed.iter().all(|r| r.owner_seen_at.is_some()), "{b}: both replicas have rows");

        // A state change carries the last heartbeat seen, forward only.
        let later = micros_precision(Utc::now());
        assert!(
            s.set_worker_state(&w("quiet-gone"), gone.session_id, WorkerState::Suspect, later).await.unwrap()
        );
        let rec = s.get_worker(&w("quiet-gone")).await.unwrap().unwrap();
        assert_eq!((rec.state, rec.last_heartbeat_at), (WorkerState::Suspect, later), "{b}");
        let earlier = later - TimeDelta::seconds(60);
        assert!(
            s.set_worker_state(&w("quiet-gone"), gone.session_id, WorkerState::Active, earlier)
                .await
                .unwrap()
        );
        assert_eq!(s.get_worker(&w("quiet-gone")).await.unwrap().unwrap().last_heartbeat_at, later, "{b}");
        let live = s.live_workers(window).await.expect("live_workers");
        let names: Vec<&str> = live.iter().map(|r| r.id.0.as_str()).collect();
        assert_eq!(names, ["quiet-gone", "quiet-here"], "{b}: its heartbeat is fresh again");

        // A replica that stopped cleanly removes its row: its silent workers are not live.
        s.forget_coordinator("replica-a").await.expect("forget");
        let live = s.live_workers(window).await.expect("live_workers");
        let names: Vec<&str> = live.iter().map(|r| r.id.0.as_str()).collect();
        assert_eq!(names, ["quiet-gone"], "{b}");
        assert_eq!(s.get_worker(&w("quiet-here")).await.unwrap().unwrap().owner_seen_at, None, "{b}");
    }

    pub async fn worker_stats_count_outcomes_and_duration(s: &Store) {
        let b = s.backend();
        s.upsert_worker(&registration("w1", Uuid::now_v7())).await.expect("upsert");
        s.upsert_worker(&registration("w2", Uuid::now_v7())).await.expect("upsert");
        let empty = s.worker_stats(&w("w1")).await.expect("stats").expect("known");
        assert_eq!((empty.tasks_completed, empty.tasks_failed, empty.in_flight), (0, 0, 0), "{b}");
        assert_eq!(empty.total_duration, Duration::ZERO, "{b}");

        let tasks = create_n(s, "prove", 6).await;
        let ids: Vec<TaskId> = tasks.iter().map(|t| t.id).collect();
        let got = claim_ids(s, &ids[..5], &w("w1"), LONG_LEASE).await;
        let h: Vec<Held> = got.iter().map(held).collect();
        s.mark_running(&h[..3]).await.expect("mark_running");
        let started = get(s, ids[0]).await.started_at.expect("started");
        wait_until_past(started + ms(20)).await;
        complete_one(s, &h[0], b"ok").await;
        complete_one(s, &h[1], b"ok").await;
        fail_one(s, &h[2], "boom", true, policy(60_000)).await;
        s.cancel(ids[3], "no").await.expect("cancel");
        // h[4] stays assigned; ids[5] goes to w2 and completes there.
        let hw2 = claim_one(s, ids[5], "w2", LONG_LEASE).await;
        complete_one(s, &hw2, b"ok").await;

        let st = s.worker_stats(&w("w1")).await.expect("stats").expect("known");
        assert_eq!(st.tasks_completed, 2, "{b}");
        assert_eq!(st.tasks_failed, 1, "{b}");
        assert_eq!(st.in_flight, 1, "{b}: the one still assigned");
        let mut want = TimeDelta::zero();
        for id in &ids[..3] {
            let a = last_attempt(s, *id).await;
            want += a.finished_at.expect("finished") - a.started_at.unwrap_or(a.assigned_at);
        }
        let want = want.to_std().expect("positive");
        assert!(want >= Duration::from_millis(20), "{b}: the first attempt ran 20ms or more");
        let diff = st.total_duration.abs_diff(want);
        assert!(
            diff <= Duration::from_millis(2),
            "{b}: total_duration {:?}, attempts say {want:?}",
            st.total_duration
        );
        let w2 = s.worker_stats(&w("w2")).await.expect("stats").expect("known");
        assert_eq!((w2.tasks_completed, w2.tasks_failed, w2.in_flight), (1, 0, 0), "{b}");
    }

    // ---- jobs, listings, counts ----

    pub async fn jobs_track_their_tasks_until_done(s: &Store) {
        let b = s.backend();
        let news: Vec<NewTask> = (0..3).map(|_| new_task("prove")).collect();
        let before = Utc::now();
        let (job, created) = s.create_job("nightly", news.clone()).await.expect("create_job");
        let after = Utc::now();
        assert_eq!((job.name.as_str(), job.total), ("nightly", 3), "{b}");
        assert_eq!(job.count(TaskState::Pending), 3, "{b}");
        assert!(!job.done(), "{b}");
        assert_within(b, "job created_at", job.created_at, before - SLACK, after + SLACK);
        assert_eq!(created.len(), 3, "{b}");
        for (c, n) in created.iter().zip(&news) {
            assert!(c.created, "{b}");
            assert_eq!(c.task.id, n.id, "{b}");
            assert_eq!(c.task.job_id, Some(job.id), "{b}: job_id set on the returned task");
            assert_eq!(get(s, n.id).await.job_id, Some(job.id), "{b}: and stored");
        }
        assert_eq!(s.get_job(job.id).await.expect("get_job"), Some(job.clone()), "{b}");
        let order: Vec<TaskId> = s.job_tasks(job.id).await.expect("job_tasks").iter().map(|t| t.id).collect();
        assert_eq!(order, news.iter().map(|n| n.id).collect::<Vec<_>>(), "{b}: submission order");

        let other = create_one(s, new_task("prove")).await;
        let h0 = claim_one(s, news[0].id, "w1", LONG_LEASE).await;
        let j = s.get_job(job.id).await.unwrap().unwrap();
        assert_eq!((j.count(TaskState::Pending), j.count(TaskState::Assigned)), (2, 1), "{b}");
        complete_one(s, &h0, b"ok").await;
        let j = s.get_job(job.id).await.unwrap().unwrap();
        assert_eq!((j.count(TaskState::Pending), j.count(TaskState::Completed)), (2, 1), "{b}");
        assert!(!j.done(), "{b}");
        let h1 = claim_one(s, news[1].id, "w1", LONG_LEASE).await;
        fail_one(s, &h1, "fatal", false, policy(100)).await;
        let j = s.get_job(job.id).await.unwrap().unwrap();
        assert!(!j.done(), "{b}: one still pending");
        s.cancel(news[2].id, "enough").await.expect("cancel");
        let j = s.get_job(job.id).await.unwrap().unwrap();
        assert_eq!(
            [TaskState::Completed, TaskState::Failed, TaskState::Cancelled].map(|st| j.count(st)),
            [1, 1, 1],
            "{b}"
        );
        assert_eq!(j.count(TaskState::Pending), 0, "{b}");
        assert!(j.done(), "{b}: all terminal");
        assert_eq!((j.total, j.created_at), (3, job.created_at), "{b}");
        assert_eq!(get(s, other.id).await.job_id, None, "{b}: other tasks are not in the job");
        assert_eq!(s.job_tasks(job.id).await.expect("job_tasks").len(), 3, "{b}");
        assert_eq!(s.get_job(coordinator::domain::JobId::new()).await.expect("get_job"), None, "{b}");
        assert!(s.job_tasks(coordinator::domain::JobId::new()).await.expect("job_tasks").is_empty(), "{b}");
    }

    /// A job's own idempotency key: a second submission with it creates nothing and names the
    /// first job, whatever its tasks (here keyless, which would otherwise all be made again);
    /// eight submissions of one new key at once make one job and one set of tasks, the others
    /// naming it; a job without a key never collides.
    pub async fn a_job_key_makes_one_job_even_from_submissions_at_once(s: &Store) {
        let b = s.backend();
        let tasks = || vec![new_task("prove"), new_task("prove")];
        let count =
            async || s.list_tasks(&TaskFilter { limit: 1000, ..TaskFilter::default() }).await.unwrap().len();
        let (first, created) =
            s.create_job_keyed("nightly", Some("night-1"), tasks()).await.expect("create_job");
        assert_eq!(created.len(), 2, "{b}");
        assert_eq!(s.job_by_key("night-1").await.expect("job_by_key"), Some(first.id), "{b}");
        assert_eq!(s.job_by_key("night-2").await.expect("job_by_key"), None, "{b}");
        match s.create_job_keyed("nightly", Some("night-1"), tasks()).await {
            Err(StoreError::JobExists(id)) => assert_eq!(id, first.id, "{b}"),
            other => panic!("{b}: a second job with the key: {other:?}"),
        }
        assert_eq!(count().await, 2, "{b}: nothing created by the second submission");
        let (a, _) = s.create_job_keyed("adhoc", None, tasks()).await.expect("create_job");
        let (c, _) = s.create_job_keyed("adhoc", None, tasks()).await.expect("create_job");
        assert_ne!(a.id, c.id, "{b}: jobs without a key are each made");

        let results =
            futures::future::join_all((0..8).map(|_| s.create_job_keyed("racing", Some("night-2"), tasks())))
                .await;
        let made: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(made.len(), 1, "{b}: one submission makes the job: {results:?}");
        let winner = made[0].0.id;
        for r in &results {
            match r {
                Ok(_) => {}
                Err(StoreError::JobExists(id)) => assert_eq!(*id, winner, "{b}"),
                Err(e) => panic!("{b}: {e}"),
            }
        }
        assert_eq!(s.job_by_key("night-2").await.expect("job_by_key"), Some(winner), "{b}");
        assert_eq!(count().await, 8, "{b}: the job of night-1, the two without a key, and the racing one");
        assert_eq!(s.job_task_ids(winner).await.expect("job_task_ids").len(), 2, "{b}");

        // A resend is answered with the job's tasks in submission order, a task its own key
        // returned among them (SQLite lists those after the others unless told the order).
        let lone = NewTask { idempotency_key: Some("lone".into()), ..new_task("prove") };
        s.create_tasks(std::slice::from_ref(&lone)).await.expect("create_tasks");
        let (mixed, created) = s
            .create_job_keyed("mixed", Some("night-3"), vec![new_task("prove"), lone, new_task("prove")])
            .await
            .expect("create_job");
        let order: Vec<TaskId> = created.iter().map(|c| c.task.id).collect();
        assert_eq!(created.iter().map(|c| c.created).collect::<Vec<_>>(), [true, false, true], "{b}");
        assert_eq!(s.job_task_ids(mixed.id).await.expect("job_task_ids"), order, "{b}: submission order");
    }

    /// A client retries a job submission whose tasks carry idempotency keys: the tasks are not
    /// created again, the existing ones are returned. Once every task the second submission
    /// returned is terminal, the job it got back must report done; a job that can never be done
    /// leaves anyone waiting on it waiting forever.
    pub async fn job_resubmitted_with_known_idempotency_keys_is_done_when_its_tasks_are(s: &Store) {
        let b = s.backend();
        let keyed = |i: usize| NewTask { idempotency_key: Some(format!("job-key-{i}")), ..new_task("prove") };
        let (first, _) = s.create_job("nightly", vec![keyed(0), keyed(1)]).await.expect("create_job");
        let (again, created) = s.create_job("nightly", vec![keyed(0), keyed(1)]).await.expect("create_job");
        assert!(created.iter().all(|c| !c.created), "{b}: the keyed tasks already exist");
        for c in &created {
            let h = claim_one(s, c.task.id, "w1", LONG_LEASE).await;
            complete_one(s, &h, b"ok").await;
        }
        assert!(
            s.get_job(first.id).await.expect("get_job").expect("job").done(),
            "{b}: the first job is done"
        );
        let job = s.get_job(again.id).await.expect("get_job").expect("job");
        assert!(
            job.done(),
            "{b}: all {} tasks the resubmission returned are completed, yet its job says total {} with \
             counts {:?}, so it is never done",
            created.len(),
            job.total,
            job.counts
        );
        let ids = |tasks: Vec<coordinator::domain::Task>| tasks.iter().map(|t| t.id).collect::<Vec<_>>();
        let first_ids = ids(s.job_tasks(first.id).await.expect("job_tasks"));
        assert_eq!(ids(s.job_tasks(again.id).await.expect("job_tasks")), first_ids, "{b}: the same members");

        // A job mixing new tasks with ones its keys return (one of them twice) lists them all, in
        // submission order, and each listing of its tasks finds them.
        let fresh = new_task("prove");
        let (mixed, created) = s
            .create_job("mixed", vec![keyed(1), fresh.clone(), keyed(0), keyed(1)])
            .await
            .expect("create_job");
        assert_eq!(created.iter().map(|c| c.created).collect::<Vec<_>>(), [false, true, false, false], "{b}");
        let order = ids(s.job_tasks(mixed.id).await.expect("job_tasks"));
        assert_eq!(order, [first_ids[1], fresh.id, first_ids[0], first_ids[1]], "{b}: submission order");
        let mut listed = ids(s
            .list_tasks(&TaskFilter { job_id: Some(mixed.id), limit: 100, ..TaskFilter::default() })
            .await
            .expect("list_tasks"));
        listed.sort();
        let mut want = vec![first_ids[0], first_ids[1], fresh.id];
        want.sort();
        assert_eq!(listed, want, "{b}: listed by job");
        let job = s.get_job(mixed.id).await.expect("get_job").expect("job");
        assert_eq!(
            (job.total, job.count(TaskState::Completed), job.count(TaskState::Pending)),
            (4, 3, 1),
            "{b}"
        );
        // Listed as they are read one by one, and a job without tasks lists with none.
        let (empty, _) = s.create_job("empty", Vec::new()).await.expect("create_job");
        let listed = s.list_jobs(None, 10).await.expect("list_jobs");
        let summary = |id| {
            let j = listed.iter().find(|j| j.id == id).expect("listed");
            (j.total, j.count(TaskState::Completed), j.count(TaskState::Pending))
        };
        assert_eq!(
            [summary(first.id), summary(again.id), summary(mixed.id), summary(empty.id)],
            [(2, 2, 0), (2, 2, 0), (4, 3, 1), (0, 0, 0)],
            "{b}"
        );
    }

    pub async fn list_tasks_filters_and_pages_in_id_order(s: &Store) {
        let b = s.backend();
        let (job, _) = s.create_job("j", vec![new_task("a"), new_task("b")]).await.expect("create_job");
        let loose =
            create(s, vec![new_task("a"), new_task("b"), new_task("a"), new_task("c"), new_task("a")]).await;
        let all = all_tasks(s).await;
        assert_eq!(all.len(), 7, "{b}");
        let mut sorted: Vec<TaskId> = all.iter().map(|t| t.id).collect();
        sorted.sort();
        assert_eq!(all.iter().map(|t| t.id).collect::<Vec<_>>(), sorted, "{b}: ordered by id");
        claim_ids(s, &[loose[0].id, loose[1].id], &w("w1"), LONG_LEASE).await;
        claim_ids(s, &[loose[2].id], &w("w2"), LONG_LEASE).await;

        let ids = |f: TaskFilter| async move {
            s.list_tasks(&TaskFilter { limit: 100, ..f })
                .await
                .expect("list_tasks")
                .iter()
                .map(|t| t.id)
                .collect::<Vec<_>>()
        };
        let by_type = ids(TaskFilter { task_type: Some("a".into()), ..TaskFilter::default() }).await;
        let want_a: Vec<TaskId> = all.iter().filter(|t| t.task_type == "a").map(|t| t.id).collect();
        assert_eq!(by_type, want_a, "{b}: type a");
        let by_state = ids(TaskFilter { state: Some(TaskState::Assigned), ..TaskFilter::default() }).await;
        assert_eq!(by_state, vec![loose[0].id, loose[1].id, loose[2].id], "{b}: assigned");
        let by_job = ids(TaskFilter { job_id: Some(job.id), ..TaskFilter::default() }).await;
        assert_eq!(by_job.len(), 2, "{b}: job");
        assert!(by_job.iter().all(|id| all.iter().any(|t| t.id == *id && t.job_id == Some(job.id))), "{b}");
        let by_worker = ids(TaskFilter { worker_id: Some(w("w1")), ..TaskFilter::default() }).await;
        assert_eq!(by_worker, vec![loose[0].id, loose[1].id], "{b}: worker w1");
        let combined = ids(TaskFilter {
            state: Some(TaskState::Pending),
            task_type: Some("a".into()),
            ..TaskFilter::default()
        })
        .await;
        let want: Vec<TaskId> = all
            .iter()
            .filter(|t| t.task_type == "a" && ![loose[0].id, loose[2].id].contains(&t.id))
            .map(|t| t.id)
            .collect();
        assert_eq!(combined, want, "{b}: pending a");
        assert!(
            ids(TaskFilter { task_type: Some("zzz".into()), ..TaskFilter::default() }).await.is_empty(),
            "{b}"
        );
        let none = s.list_tasks(&TaskFilter { limit: 0, ..TaskFilter::default() }).await.expect("list_tasks");
        assert!(none.is_empty(), "{b}: limit 0");

        // Pages of 3 walk every task exactly once, in id order.
        let mut walked = Vec::new();
        let mut after = None;
        let mut pages = 0;
        loop {
            let page =
                s.list_tasks(&TaskFilter { after, limit: 3, ..TaskFilter::default() }).await.expect("list");
            assert!(page.len() <= 3, "{b}");
            pages += 1;
            assert!(pages <= 10, "{b}: paging does not end");
            let Some(last) = page.last() else { break };
            after = Some(last.id);
            walked.extend(page.iter().map(|t| t.id));
        }
        assert_eq!(walked, sorted, "{b}: every task once, in id order");
        // Paging composes with a filter.
        let page = s
            .list_tasks(&TaskFilter {
                task_type: Some("a".into()),
                after: Some(want_a[0]),
                limit: 2,
                ..TaskFilter::default()
            })
            .await
            .expect("list");
        assert_eq!(page.iter().map(|t| t.id).collect::<Vec<_>>(), want_a[1..3].to_vec(), "{b}");
    }

    pub async fn task_counts_and_pending_by_type(s: &Store) {
        let b = s.backend();
        assert!(s.task_counts().await.expect("counts").is_empty(), "{b}: empty store");
        assert!(s.pending_by_type().await.expect("pending").is_empty(), "{b}");
        let a = create_n(s, "a", 4).await;
        let bt = create_n(s, "b", 3).await;
        let c = create_n(s, "c", 1).await;
        let got = claim_ids(s, &[a[0].id, a[1].id, a[2].id, bt[0].id, bt[1].id], &w("w1"), LONG_LEASE).await;
        let h: Vec<Held> = got.iter().map(held).collect();
        s.mark_running(&[h[1].clone()]).await.expect("mark_running"); // a1 running, a0 assigned
        complete_one(s, &h[2], b"ok").await; // a2 completed
        fail_one(s, &h[3], "later", true, policy(60_000)).await; // b0 pending, not runnable yet
        fail_one(s, &h[4], "fatal", false, policy(60_000)).await; // b1 failed
        s.cancel(c[0].id, "no").await.expect("cancel"); // c0 cancelled

        let counts = s.task_counts().await.expect("task_counts");
        let want = BTreeMap::from([
            (TaskState::Pending, 3), // a3, b0, b2
            (TaskState::Assigned, 1),
            (TaskState::Running, 1),
            (TaskState::Completed, 1),
            (TaskState::Failed, 1),
            (TaskState::Cancelled, 1),
        ]);
        assert_eq!(counts, want, "{b}");
        let (live, finished): (BTreeMap<_, _>, BTreeMap<_, _>) =
            want.into_iter().partition(|(s, _)| !s.is_terminal());
        assert_eq!(s.live_task_counts().await.expect("live_task_counts"), live, "{b}");
        assert_eq!(s.finished_task_counts().await.expect("finished_task_counts"), finished, "{b}");
        let pending = s.pending_by_type().await.expect("pending_by_type");
        let counts: BTreeMap<String, u64> = pending.iter().map(|(t, p)| (t.clone(), p.count)).collect();
        let want = BTreeMap::from([("a".to_string(), 1), ("b".to_string(), 2)]);
        assert_eq!(counts, want, "{b}: includes the pending task waiting out its backoff; no c");

        // The same statement tells since when the longest-waiting task of each type is runnable:
        // a3 since its submission; for b, b2 (submitted, runnable) and not b0 (in its backoff).
        let now = Utc::now();
        let since = |t: &str| pending[t].runnable_since;
        assert!(since("a") <= now && since("a") > now - chrono::Duration::seconds(60), "{b}: {pending:?}");
        assert!(since("b") <= now && since("b") > now - chrono::Duration::seconds(60), "{b}: {pending:?}");
        assert!(pending["a"].waited(now + chrono::Duration::seconds(30)) >= Duration::from_secs(30), "{b}");

        // Only tasks in their backoff: the earliest runnable time is ahead, nothing has waited.
        s.cancel(a[3].id, "done").await.expect("cancel a3");
        s.cancel(bt[2].id, "done").await.expect("cancel b2");
        let pending = s.pending_by_type().await.expect("pending_by_type");
        assert_eq!(pending.keys().collect::<Vec<_>>(), ["b"], "{b}: {pending:?}");
        assert!(pending["b"].runnable_since > Utc::now() + chrono::Duration::seconds(30), "{b}: {pending:?}");
        assert_eq!(pending["b"].waited(Utc::now()), Duration::ZERO, "{b}");
    }

    // ---- sessions ----

    /// A worker that registers again lists what it holds. What the store has beyond the list is
    /// given back at once: uncharged from the same process (it never arrived: lost with a
    /// connection or a replica), charged from a new process (it died with the old one). A worker
    /// that does not list adopts everything, as before.
    pub async fn a_registration_gives_back_what_the_worker_does_not_hold(s: &Store) {
        let b = s.backend();
        let holding = |instance: &str, running: Vec<(TaskId, u32)>| {
            Some(Holding { instance: instance.into(), running })
        };
        let (s1, s2, s3, s4) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let mut reg = registration("w1", s1);
        reg.holding = holding("p1", Vec::new());
        s.register_worker(&reg).await.expect("register s1");
        let (t1, t2, t3) = (
            create_one(s, new_task("prove")).await,
            create_one(s, new_task("prove")).await,
            create_one(s, new_task("prove")).await,
        );
        let got = claim_all_for(s, "w1", s1).await;
        assert_eq!(got.len(), 3, "{b}");
        s.mark_running(&[held_as(t3.id, "w1", 1)]).await.expect("mark running");

        // Same process: t1 arrived, t2 and t3 (running in the store) never did.
        let mut reg = registration("w1", s2);
        reg.holding = holding("p1", vec![(t1.id, 1)]);
        let r = s.register_worker(&reg).await.expect("register s2");
        assert_eq!(r.held, vec![held_as(t1.id, "w1", 1)], "{b}: keeps what it listed");
        let mut back: Vec<(TaskId, RequeueReason, TaskState)> =
            r.requeued.iter().map(|q| (q.task_id, q.reason, q.state)).collect();
        back.sort_by_key(|q| q.0);
        let mut want = vec![
            (t2.id, RequeueReason::NotReceived, TaskState::Pending),
            (t3.id, RequeueReason::NotReceived, TaskState::Pending),
        ];
        want.sort_by_key(|q| q.0);
        assert_eq!(back, want, "{b}");
        for t in [&t2, &t3] {
            let now = get(s, t.id).await;
            assert_eq!(
                (now.state, now.failures, now.worker_id.clone()),
                (TaskState::Pending, 0, None),
                "{b}: uncharged"
            );
            assert_eq!(last_attempt(s, t.id).await.outcome.as_deref(), Some("not_received"), "{b}");
        }
        assert_eq!(get(s, t1.id).await.state, TaskState::Assigned, "{b}: t1 untouched");

        // A new process lists nothing: t1 died with the old one, and that attempt is charged.
        let mut reg = registration("w1", s3);
        reg.holding = holding("p2", Vec::new());
        let r = s.register_worker(&reg).await.expect("register s3");
        assert!(r.held.is_empty(), "{b}");
        assert_eq!(
            r.requeued.iter().map(|q| (q.task_id, q.reason)).collect::<Vec<_>>(),
            vec![(t1.id, RequeueReason::WorkerRestarted)],
            "{b}"
        );
        let now = get(s, t1.id).await;
        assert_eq!((now.state, now.failures), (TaskState::Pending, 1), "{b}: charged");
        assert_eq!(last_attempt(s, t1.id).await.outcome.as_deref(), Some("worker_restarted"), "{b}");

        // A worker that does not list (an older client) adopts what the store has.
        let again = claim_one(s, t1.id, "w1", LONG_LEASE).await;
        let r = s.register_worker(&registration("w1", s4)).await.expect("register s4");
        assert_eq!((r.held, r.requeued), (vec![again], Vec::new()), "{b}");
    }

    /// Replica A declared a worker DEAD under the session it knew; the worker had already
    /// registered again (on replica B): nothing is taken from it, on any backend.
    pub async fn a_dead_notice_for_a_replaced_session_takes_nothing(s: &Store) {
        let b = s.backend();
        let (s1, s2) = (Uuid::now_v7(), Uuid::now_v7());
        s.register_worker(&registration("w1", s1)).await.expect("register s1");
        let t = create_one(s, new_task("prove")).await;
        let got = claim_all_for(s, "w1", s1).await;
        assert_eq!(got.len(), 1, "{b}");
        // The worker moves: a new session adopts what it holds.
        let held = s.register_worker(&registration("w1", s2)).await.expect("register s2").held;
        assert_eq!(held, vec![held_as(t.id, "w1", 1)], "{b}: the new session adopts the task");
        assert!(s.requeue_worker(&w("w1"), s1).await.expect("requeue").is_empty(), "{b}: stale session");
        let now = get(s, t.id).await;
        assert_eq!((now.state, now.failures, now.attempt), (TaskState::Assigned, 0, 1), "{b}: untouched");
        // The current session's death takes it.
        let out = s.requeue_worker(&w("w1"), s2).await.expect("requeue");
        assert_eq!(out.len(), 1, "{b}");
        assert_eq!(get(s, t.id).await.failures, 1, "{b}: charged once");
    }

    pub async fn a_fenced_claim_for_a_replaced_session_assigns_nothing(s: &Store) {
        let b = s.backend();
        let (s1, s2) = (Uuid::now_v7(), Uuid::now_v7());
        s.register_worker(&registration("w1", s1)).await.expect("register s1");
        s.register_worker(&registration("w1", s2)).await.expect("register s2");
        let t = create_one(s, new_task("prove")).await;
        let stale = HashMap::from([(w("w1"), s1)]);
        let got = s
            .claim_fenced(10, &ClaimFilter::types(TypeFilter::Any), LONG_LEASE, |c: &[Candidate], _| {
                Placement { placed: c.iter().map(|c| (c.id, w("w1"))).collect(), sessions: stale }
            })
            .await
            .expect("claim");
        assert!(got.is_empty(), "{b}: a replica holding the old session assigns nothing");
        assert_eq!(get(s, t.id).await.state, TaskState::Pending, "{b}");
        let current = HashMap::from([(w("w1"), s2)]);
        let got = s
            .claim_fenced(10, &ClaimFilter::types(TypeFilter::Any), LONG_LEASE, |c: &[Candidate], _| {
                Placement { placed: c.iter().map(|c| (c.id, w("w1"))).collect(), sessions: current }
            })
            .await
            .expect("claim");
        assert_eq!(got.len(), 1, "{b}: the current session gets it");
    }

    /// A worker registers a new session while the sweeper acts on its old session's death, many
    /// times over: either the cleanup ran first (the tasks were requeued, charged once, and the
    /// new session holds none of them) or the registration did (nothing requeued, the new
    /// session holds them all). Never both, never neither.
    pub async fn a_reconnect_racing_a_dead_session_cleanup_never_loses_or_double_counts(s: &Store) {
        let b = s.backend();
        for round in 0..20 {
            let worker = format!("race-{round}");
            let (s1, s2) = (Uuid::now_v7(), Uuid::now_v7());
            s.register_worker(&registration(&worker, s1)).await.expect("register s1");
            let ids: Vec<TaskId> = {
                let mut v = Vec::new();
                for _ in 0..3 {
                    v.push(create_one(s, new_task("prove")).await.id);
                }
                v
            };
            let sessions = HashMap::from([(w(&worker), s1)]);
            let want = ids.clone();
            let wk = worker.clone();
            let got = s
                .claim_fenced(
                    10,
                    &ClaimFilter::types(TypeFilter::Any),
                    LONG_LEASE,
                    move |c: &[Candidate], _| Placement {
                        placed: c.iter().filter(|c| want.contains(&c.id)).map(|c| (c.id, w(&wk))).collect(),
                        sessions,
                    },
                )
                .await
                .expect("claim");
            assert_eq!(got.len(), 3, "{b}");
            let barrier = Arc::new(tokio::sync::Barrier::new(2));
            let reg = {
                let (s, barrier, worker) = (s.clone(), barrier.clone(), worker.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    s.register_worker(&registration(&worker, s2)).await.expect("register s2").held
                })
            };
            let sweep = {
                let (s, barrier, worker) = (s.clone(), barrier.clone(), worker.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    s.requeue_worker(&w(&worker), s1).await.expect("requeue")
                })
            };
            let adopted = reg.await.expect("register");
            let requeued = sweep.await.expect("requeue");
            assert_eq!(adopted.len() + requeued.len(), 3, "{b} round {round}: each task exactly once");
            assert!(adopted.is_empty() || requeued.is_empty(), "{b} round {round}: one side wins whole");
            for id in &ids {
                let t = get(s, *id).await;
                if requeued.is_empty() {
                    assert_eq!(
                        (t.state, t.failures),
                        (TaskState::Assigned, 0),
                        "{b}: kept by the new session"
                    );
                } else {
                    assert_eq!((t.state, t.failures), (TaskState::Pending, 1), "{b}: requeued once");
                }
            }
            // Pending tasks of this round must not leak into the next one's claim.
            for id in &ids {
                s.cancel(*id, "round over").await.expect("cancel");
            }
        }
    }

    /// A stale holder's renewal listed before the current holder's in the same batch must not
    /// hide it (SQLite once deduplicated by task id alone).
    pub async fn renewals_in_one_batch_match_the_whole_fence(s: &Store) {
        let b = s.backend();
        let t = create_one(s, new_task("prove")).await;
        let old = claim_one(s, t.id, "w1", LONG_LEASE).await;
        requeue_dead(s, &w("w1")).await.expect("requeue");
        let cur = claim_one(s, t.id, "w2", Duration::from_secs(5)).await;
        let before = get(s, t.id).await.lease_expires_at.expect("lease");
        let renewed = s.renew_leases(&[old.clone(), cur.clone()], LONG_LEASE).await.expect("renew");
        assert_eq!(renewed, vec![cur.clone()], "{b}: only the current attempt is renewed");
        let after = get(s, t.id).await.lease_expires_at.expect("lease");
        assert!(after > before, "{b}: the current holder's lease moved forward");
    }

    pub async fn a_released_task_is_pending_again_and_not_charged(s: &Store) {
        let b = s.backend();
        let t = create_one(s, with_attempts(new_task("prove"), 1)).await;
        let h = claim_one(s, t.id, "w1", LONG_LEASE).await;
        s.mark_running(std::slice::from_ref(&h)).await.expect("mark_running");
        let stale = held_as(t.id, "w1", 7);
        assert!(s.requeue_released(&[stale]).await.expect("release").is_empty(), "{b}: fenced by attempt");
        let out = s.requeue_released(std::slice::from_ref(&h)).await.expect("release");
        assert_eq!(out.len(), 1, "{b}");
        assert_eq!((out[0].state, out[0].reason), (TaskState::Pending, RequeueReason::Released), "{b}");
        let now = get(s, t.id).await;
        assert_eq!(
            (now.state, now.failures, now.worker_id),
            (TaskState::Pending, 0, None),
            "{b}: not charged"
        );
        assert_eq!(last_attempt(s, t.id).await.outcome.as_deref(), Some("released"), "{b}");
    }

    // ---- retention ----

    /// Every age 1 ms except `failed`, which keeps a day.
    fn short_ages() -> Retention {
        let tiny = Some(Duration::from_millis(1));
        Retention {
            completed: tiny,
            failed: Some(Duration::from_secs(86_400)),
            cancelled: tiny,
            workers: tiny,
        }
    }

    async fn prune(s: &Store, rules: &Retention, limit: u32) -> Pruned {
        s.prune(rules, limit).await.expect("prune").expect("no other pruner")
    }

    /// Waits until every stored `finished_at` is more than `age` in the past.
    async fn wait_until_finished_before(s: &Store, age: Duration) {
        let last = all_tasks(s).await.into_iter().filter_map(|t| t.finished_at).max();
        if let Some(t) = last {
            wait_until_past(t + td(age) + ms(2)).await;
        }
    }

    pub async fn prune_deletes_finished_tasks_past_their_age_and_never_unfinished_ones(s: &Store) {
        let b = s.backend();
        let mut keyed = new_task("prove");
        keyed.idempotency_key = Some("once".into());
        let [done, failed, cancelled, pending, assigned, running] = <[Task; 6]>::try_from(
            create(
                s,
                vec![
                    keyed.clone(),
                    new_task("prove"),
                    new_task("prove"),
                    new_task("prove"),
                    new_task("prove"),
                    new_task("prove"),
                ],
            )
            .await,
        )
        .unwrap();
        let h = claim_one(s, done.id, "w1", LONG_LEASE).await;
        complete_one(s, &h, b"proof").await;
        let h = claim_one(s, failed.id, "w1", LONG_LEASE).await;
        fail_one(s, &h, "bad witness", false, policy(100)).await;
        claim_one(s, cancelled.id, "w1", LONG_LEASE).await;
        s.cancel(cancelled.id, "not needed").await.expect("cancel");
        claim_one(s, assigned.id, "w1", LONG_LEASE).await;
        let h = claim_one(s, running.id, "w1", LONG_LEASE).await;
        assert_eq!(s.mark_running(&[h]).await.expect("mark_running"), 1, "{b}");
        wait_until_finished_before(s, Duration::from_millis(1)).await;

        let p = prune(s, &short_ages(), 1000).await;
        assert_eq!(
            (p.tasks, p.task_attempts, p.jobs),
            (2, 1, 0),
            "{b}: the completed and the cancelled task"
        );
        for gone in [done.id, cancelled.id] {
            assert_eq!(s.get_task(gone).await.expect("get"), None, "{b}");
            assert!(attempts(s, gone).await.is_empty(), "{b}: its attempts go with it");
        }
        for kept in [failed.id, pending.id, assigned.id, running.id] {
            get(s, kept).await;
        }
        assert_eq!(attempts(s, failed.id).await.len(), 1, "{b}: a kept task keeps its history");
        let again = s.create_tasks(&[NewTask { id: TaskId::new(), ..keyed }]).await.expect("create");
        assert!(again[0].created, "{b}: the idempotency key went with its task");

        // Every age at 1 ms: the failed task goes too, and still nothing unfinished.
        let tiny = Some(Duration::from_millis(1));
        let all = Retention { completed: tiny, failed: tiny, cancelled: tiny, workers: None };
        let p = prune(s, &all, 1000).await;
        assert_eq!(p.tasks, 1, "{b}");
        let left: BTreeSet<TaskId> = all_tasks(s).await.iter().map(|t| t.id).collect();
        assert_eq!(left, BTreeSet::from([pending.id, assigned.id, running.id, again[0].task.id]), "{b}");
        assert_eq!(prune(s, &all, 1000).await, Pruned::default(), "{b}: nothing more");
    }

    pub async fn prune_takes_the_oldest_first_a_batch_at_a_time(s: &Store) {
        let b = s.backend();
        let tasks = create_n(s, "prove", 5).await;
        for t in &tasks {
            let h = claim_one(s, t.id, "w1", LONG_LEASE).await;
            complete_one(s, &h, b"ok").await;
            // Distinct finishing times, in order.
            wait_until_past(get(s, t.id).await.finished_at.unwrap()).await;
        }
        wait_until_finished_before(s, Duration::from_millis(1)).await;
        let rules = short_ages();
        let p = prune(s, &rules, 2).await;
        assert_eq!(p.tasks, 2, "{b}");
        assert!(p.full(2), "{b}: a full batch says there may be more");
        let left: Vec<TaskId> = all_tasks(s).await.iter().map(|t| t.id).collect();
        assert_eq!(left, tasks[2..].iter().map(|t| t.id).collect::<Vec<_>>(), "{b}: the two oldest went");
        assert_eq!(prune(s, &rules, 2).await.tasks, 2, "{b}");
        let p = prune(s, &rules, 2).await;
        assert_eq!(p.tasks, 1, "{b}");
        assert!(!p.full(2), "{b}");
    }

    pub async fn prune_deletes_a_job_once_its_tasks_are_gone(s: &Store) {
        let b = s.backend();
        let news: Vec<NewTask> = (0..2).map(|_| new_task("prove")).collect();
        let (job, _) = s.create_job("pruned", news.clone()).await.expect("create_job");
        let h = claim_one(s, news[0].id, "w1", LONG_LEASE).await;
        complete_one(s, &h, b"ok").await;
        wait_until_finished_before(s, Duration::from_millis(1)).await;
        let p = prune(s, &short_ages(), 1000).await;
        // A job's own tasks are members by their own rows: no membership rows to delete.
        assert_eq!((p.tasks, p.job_tasks, p.jobs), (1, 0, 0), "{b}: the job keeps a live task");
        let j = s.get_job(job.id).await.expect("get_job").expect("the job is kept");
        assert_eq!((j.total, j.count(TaskState::Pending), j.pruned()), (2, 1, 1), "{b}");
        assert!(!j.done(), "{b}");

        let h = claim_one(s, news[1].id, "w1", LONG_LEASE).await;
        complete_one(s, &h, b"ok").await;
        let j = s.get_job(job.id).await.unwrap().unwrap();
        assert!(j.done(), "{b}: done with one task pruned and one completed");
        wait_until_finished_before(s, Duration::from_millis(1)).await;
        let p = prune(s, &short_ages(), 1000).await;
        assert_eq!((p.tasks, p.job_tasks, p.jobs), (1, 0, 1), "{b}");
        assert_eq!(s.get_job(job.id).await.expect("get_job"), None, "{b}");

        // A job young enough to have lost nothing to the pruner is not taken for an empty one.
        let (empty, _) = s.create_job("empty", Vec::new()).await.expect("create_job");
        let day = Some(Duration::from_secs(86_400));
        let keep = Retention { completed: day, failed: day, cancelled: day, workers: None };
        assert_eq!(prune(s, &keep, 1000).await.jobs, 0, "{b}");
        assert!(s.get_job(empty.id).await.unwrap().is_some(), "{b}");
    }

    pub async fn prune_deletes_silent_workers_that_hold_nothing(s: &Store) {
        let b = s.backend();
        s.upsert_worker(&registration("idle", Uuid::now_v7())).await.expect("upsert");
        s.upsert_worker(&registration("busy", Uuid::now_v7())).await.expect("upsert");
        let t = create_one(s, new_task("prove")).await;
        claim_one(s, t.id, "busy", LONG_LEASE).await;
        let day = Some(Duration::from_secs(86_400));
        let keep = Retention { workers: day, ..Retention::default() };
        assert_eq!(prune(s, &keep, 1000).await.workers, 0, "{b}: both heard from within a day");
        let heard = s
            .list_workers(None, 1000)
            .await
            .expect("list")
            .iter()
            .map(|w| w.last_heartbeat_at)
            .max()
            .unwrap();
        wait_until_past(heard + ms(2)).await;
        let p = prune(s, &short_ages(), 1000).await;
        assert_eq!(p.workers, 1, "{b}");
        assert_eq!(s.get_worker(&w("idle")).await.expect("get"), None, "{b}");
        assert!(s.get_worker(&w("busy")).await.expect("get").is_some(), "{b}: it holds a task");
    }

    pub async fn prune_runs_on_one_replica_at_a_time(s: &Store) {
        let b = s.backend();
        let t = create_one(s, new_task("prove")).await;
        let h = claim_one(s, t.id, "w1", LONG_LEASE).await;
        complete_one(s, &h, b"ok").await;
        wait_until_finished_before(s, Duration::from_millis(1)).await;
        let Store::Postgres(pg) = s else {
            // One process serves a SQLite database: there is no other pruner.
            assert_eq!(prune(s, &short_ages(), 10).await.tasks, 1, "{b}");
            return;
        };
        let mut other = pg.pool().begin().await.expect("begin");
        sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext(current_schema()))")
            .bind(coordinator::store::postgres::PRUNER_LOCK)
            .execute(&mut *other)
            .await
            .expect("lock");
        assert_eq!(s.prune(&short_ages(), 10).await.expect("prune"), None, "{b}: another replica prunes");
        get(s, t.id).await;
        other.rollback().await.expect("rollback");
        // The pruner of another deployment, in a schema of its own in the same database, holds
        // its own lock, not this one.
        let elsewhere = TestDb::postgres().await.expect("a second schema");
        let Store::Postgres(pg2) = &elsewhere.store else { unreachable!() };
        let mut theirs = pg2.pool().begin().await.expect("begin");
        sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext(current_schema()))")
            .bind(coordinator::store::postgres::PRUNER_LOCK)
            .execute(&mut *theirs)
            .await
            .expect("lock");
        let pruned = s.prune(&short_ages(), 10).await.expect("prune");
        theirs.rollback().await.expect("rollback");
        elsewhere.cleanup().await;
        assert_eq!(
            pruned.map(|p| p.tasks),
            Some(1),
            "{b}: another schema's pruner does not hold this one back"
        );
    }

    // ---- schedules ----

    fn new_schedule(name: &str, cron: &str, next_run_at: DateTime<Utc>) -> NewSchedule {
        NewSchedule {
            id: ScheduleId::new(),
            name: name.to_owned(),
            cron: cron.to_owned(),
            timezone: "UTC".into(),
            template: TaskTemplate {
                task_type: "prove".into(),
                payload: b"template".to_vec(),
                priority: 3,
                max_attempts: 2,
                timeout: Duration::from_secs(30),
            },
            missed: MissedRuns::All,
            paused: false,
            next_run_at: Some(micros_precision(next_run_at)),
        }
    }

    pub async fn schedules_are_created_listed_paused_and_deleted(s: &Store) {
        let b = s.backend();
        let next = Utc::now() + TimeDelta::hours(1);
        let new = new_schedule("nightly", "0 2 * * *", next);
        let created = s.create_schedule(&new).await.expect("create").expect("a new name");
        assert_eq!(
            (created.id, created.name.as_str(), created.template.clone()),
            (new.id, "nightly", new.template.clone()),
            "{b}"
        );
        assert_eq!((created.paused, created.runs, created.next_run_at), (false, 0, new.next_run_at), "{b}");
        let again = new_schedule("nightly", "* * * * *", next);
        assert_eq!(s.create_schedule(&again).await.expect("create"), None, "{b}: the name is taken");
        assert_eq!(s.list_schedules().await.expect("list"), vec![created.clone()], "{b}");

        let paused = s.pause_schedule(new.id, true, None).await.expect("pause").expect("known");
        assert!(paused.paused, "{b}");
        assert_eq!(paused.next_run_at, new.next_run_at, "{b}: pausing keeps the next run");
        let later = micros_precision(next + TimeDelta::days(1));
        let resumed = s.pause_schedule(new.id, false, Some(later)).await.expect("resume").expect("known");
        assert_eq!((resumed.paused, resumed.next_run_at), (false, Some(later)), "{b}");
        let again = s.pause_schedule(new.id, false, Some(next)).await.expect("resume").expect("known");
        assert_eq!(again.next_run_at, Some(later), "{b}: resuming a running schedule moves nothing");
        assert_eq!(s.pause_schedule(ScheduleId::new(), true, None).await.expect("pause"), None, "{b}");

        assert!(s.delete_schedule(new.id).await.expect("delete"), "{b}");
        assert!(!s.delete_schedule(new.id).await.expect("delete"), "{b}: already gone");
        assert!(s.list_schedules().await.expect("list").is_empty(), "{b}");
    }

    pub async fn firing_a_due_schedule_creates_each_occurrence_once_even_when_fired_at_once(s: &Store) {
        let b = s.backend();
        let now = micros_precision(Utc::now());
        // Every second, due since five seconds ago: six occurrences up to now.
        let due = DateTime::from_timestamp(now.timestamp() - 5, 0).unwrap();
        let new = new_schedule("every-second", "* * * * * *", due);
        s.create_schedule(&new).await.expect("create").expect("new");
        let spec = CronSpec::parse("* * * * * *", "UTC").unwrap();
        let fire = || {
            s.fire_schedules(now, 10, |sch| {
                coordinator::cron::fire(&spec, sch.next_run_at.unwrap(), now, sch.missed)
            })
        };
        let (one, two) = tokio::join!(fire(), fire());
        let fired: Vec<Fired> = one.expect("fire").into_iter().chain(two.expect("fire")).collect();
        assert_eq!(fired.len(), 1, "{b}: one of the two fired it, the other found it not due");
        let created: Vec<&Task> = fired[0].created.iter().filter(|c| c.created).map(|c| &c.task).collect();
        assert_eq!(created.len(), 6, "{b}");
        for (i, t) in created.iter().enumerate() {
            let occurrence = due + TimeDelta::seconds(i as i64);
            let key = format!("schedule:{}:{}", new.id, occurrence.timestamp_micros());
            assert_eq!(t.idempotency_key.as_deref(), Some(key.as_str()), "{b}");
            assert_eq!(
                (t.task_type.as_str(), t.payload.as_slice(), t.priority),
                ("prove", &b"template"[..], 3),
                "{b}"
            );
        }
        let after = s.list_schedules().await.expect("list").remove(0);
        assert_eq!(after.runs, 6, "{b}");
        assert_eq!(after.last_run_at, Some(now.with_nanosecond(0).unwrap()), "{b}");
        assert!(after.next_run_at.unwrap() > now, "{b}");
        assert!(
            s.fire_schedules(now, 10, |_| panic!("nothing is due")).await.expect("fire").is_empty(),
            "{b}"
        );
        assert_eq!(all_tasks(s).await.len(), 6, "{b}");

        // A paused schedule does not fire.
        s.pause_schedule(new.id, true, None).await.expect("pause");
        let much_later = now + TimeDelta::hours(1);
        assert!(
            s.fire_schedules(much_later, 10, |_| panic!("paused")).await.expect("fire").is_empty(),
            "{b}"
        );
    }

    // ---- retries ----

    pub async fn retry_task_resets_a_failed_task_and_keeps_its_history(s: &Store) {
        let b = s.backend();
        let t = failed_task(s, with_attempts(new_task("prove"), 1), "out of memory").await;
        assert_eq!((t.state, t.failures, t.attempt), (TaskState::Failed, 1, 1), "{b}");
        let before = Utc::now();
        let Some(RetryOutcome::Retried(r)) = s.retry_task(t.id).await.expect("retry_task") else {
            panic!("{b}: a failed task is retried");
        };
        assert_eq!(r, get(s, t.id).await, "{b}: the answer is the stored task");
        assert_eq!(r.state, TaskState::Pending, "{b}");
        assert_eq!(r.failures, 0, "{b}: a fresh attempts budget");
        assert_eq!(r.attempt, 1, "{b}: the fence is never reset");
        assert_eq!((r.error.as_deref(), r.worker_id.as_ref(), r.finished_at), (None, None, None), "{b}");
        assert!(r.run_after <= Utc::now() + SLACK && r.run_after >= before - SLACK, "{b}: runnable now");
        assert_eq!(attempts(s, t.id).await.len(), 1, "{b}: the history stays");

        // It runs again, as attempt 2, and the first attempt's failure is still on record.
        let h = claim_one(s, t.id, "w2", LONG_LEASE).await;
        assert_eq!(h.attempt, 2, "{b}");
        assert_eq!(complete_one(s, &h, b"ok").await, ReportOutcome::Applied { state: TaskState::Completed });
        let history = attempts(s, t.id).await;
        let outcomes: Vec<_> = history.iter().map(|a| (a.attempt, a.outcome.as_deref())).collect();
        assert_eq!(outcomes, vec![(1, Some("failed")), (2, Some("completed"))], "{b}");
        assert_eq!(history[0].error.as_deref(), Some("out of memory"), "{b}");
    }

    pub async fn retry_task_takes_failed_and_cancelled_tasks_only(s: &Store) {
        let b = s.backend();
        let pending = create_one(s, new_task("prove")).await;
        let done = create_one(s, new_task("prove")).await;
        let h = claim_one(s, done.id, "w1", LONG_LEASE).await;
        complete_one(s, &h, b"ok").await;
        let running = create_one(s, new_task("prove")).await;
        claim_one(s, running.id, "w1", LONG_LEASE).await;
        for id in [pending.id, done.id, running.id] {
            let before = get(s, id).await;
            match s.retry_task(id).await.expect("retry_task") {
                Some(RetryOutcome::Refused(t)) => assert_eq!(t, before, "{b}: refused and unchanged"),
                other => panic!("{b}: a {} task is not retried: {other:?}", before.state),
            }
            assert_eq!(get(s, id).await, before, "{b}");
        }
        assert_eq!(s.retry_task(TaskId::new()).await.expect("retry_task"), None, "{b}: unknown");

        let cancelled = create_one(s, new_task("prove")).await;
        s.cancel(cancelled.id, "by hand").await.expect("cancel");
        match s.retry_task(cancelled.id).await.expect("retry_task") {
            Some(RetryOutcome::Retried(t)) => {
                assert_eq!((t.state, t.error), (TaskState::Pending, None), "{b}")
            }
            other => panic!("{b}: a cancelled task is retried: {other:?}"),
        }
        // Twice in a row: the second finds it pending.
        assert!(matches!(s.retry_task(cancelled.id).await.unwrap(), Some(RetryOutcome::Refused(_))), "{b}");
    }

    pub async fn retry_batch_takes_what_every_filter_matches(s: &Store) {
        let b = s.backend();
        let oom = failed_task(s, new_task("prove"), "worker ran out of memory\nat line 3").await;
        let boom = failed_task(s, new_task("hash"), "boom").await;
        let cancelled = create_one(s, new_task("prove")).await;
        s.cancel(cancelled.id, "by hand").await.expect("cancel");
        create_one(s, new_task("prove")).await;
        let (job, created) =
            s.create_job("nightly", vec![new_task("prove"), new_task("prove")]).await.expect("create_job");
        let in_job = created[0].task.id;
        let h = claim_one(s, in_job, "w1", LONG_LEASE).await;
        fail_one(s, &h, "fatal", false, policy(100)).await;
        let after_all = Utc::now() + TimeDelta::hours(1);
        let errors: HashMap<TaskId, &str> = HashMap::from([
            (oom.id, "worker ran out of memory\nat line 3"),
            (boom.id, "boom"),
            (in_job, "fatal"),
        ]);

        // Each query runs on a fresh copy of the state: retried tasks are failed again after.
        let cases: Vec<(&str, RetryFilter, Vec<TaskId>)> = vec![
            (
                "type",
                RetryFilter { task_type: Some("prove".into()), ..Default::default() },
                vec![oom.id, in_job],
            ),
            (
                "type and cancelled",
                RetryFilter {
                    task_type: Some("prove".into()),
                    include_cancelled: true,
                    ..Default::default()
                },
                vec![oom.id, cancelled.id, in_job],
            ),
            (
                "error",
                RetryFilter { error_contains: Some("of memory".into()), ..Default::default() },
                vec![oom.id],
            ),
            (
                "error is case-sensitive",
                RetryFilter { error_contains: Some("BOOM".into()), ..Default::default() },
                vec![],
            ),
            ("job", RetryFilter { job_id: Some(job.id), ..Default::default() }, vec![in_job]),
            (
                "type and error",
                RetryFilter {
                    task_type: Some("hash".into()),
                    error_contains: Some("boom".into()),
                    ..Default::default()
                },
                vec![boom.id],
            ),
            ("finished later", RetryFilter { finished_after: Some(after_all), ..Default::default() }, vec![]),
            (
                "finished before now",
                RetryFilter { finished_before: Some(after_all), ..Default::default() },
                vec![oom.id, boom.id, in_job],
            ),
        ];
        for (what, filter, want) in cases {
            let mut want = want;
            want.sort_unstable();
            let got = s.retry_batch(&filter, None, 100).await.expect("retry_batch");
            assert_eq!(got, want, "{b}: {what}");
            for id in &got {
                assert_eq!(get(s, *id).await.state, TaskState::Pending, "{b}: {what}");
                // Back to failed (or cancelled) for the next case.
                let h = claim_one(s, *id, "w1", LONG_LEASE).await;
                if *id == cancelled.id {
                    s.cancel(*id, "by hand").await.expect("cancel");
                } else {
                    fail_one(s, &h, errors[id], false, policy(100)).await;
                }
            }
        }

        // Paging by the last id: a limit of 1 takes them one at a time, in id order.
        let filter = RetryFilter { finished_before: Some(after_all), ..Default::default() };
        let mut seen = Vec::new();
        loop {
            let got = s.retry_batch(&filter, seen.last().copied(), 1).await.expect("retry_batch");
            if got.is_empty() {
                break;
            }
            assert_eq!(got.len(), 1, "{b}");
            seen.extend(got);
        }
        let mut want = vec![oom.id, boom.id, in_job];
        want.sort_unstable();
        assert_eq!(seen, want, "{b}: every match once, in id order");
    }

    pub async fn racing_bulk_retries_retry_each_task_once(s: &Store) {
        let b = s.backend();
        let tasks = create_n(s, "prove", 300).await;
        for t in &tasks {
            s.cancel(t.id, "to retry").await.expect("cancel");
        }
        let filter =
            RetryFilter { task_type: Some("prove".into()), include_cancelled: true, ..Default::default() };
        let retrier = || {
            let s = s.clone();
            let filter = filter.clone();
            tokio::spawn(async move {
                let mut mine: Vec<TaskId> = Vec::new();
                let mut after = None;
                loop {
                    let got = s.retry_batch(&filter, after, 25).await.expect("retry_batch");
                    let Some(last) = got.last().copied() else { break };
                    after = Some(last);
                    mine.extend(got);
                }
                mine
            })
        };
        let (one, two) = (retrier(), retrier());
        let (one, two) = (one.await.expect("retrier 1"), two.await.expect("retrier 2"));
        let set1: BTreeSet<TaskId> = one.iter().copied().collect();
        let set2: BTreeSet<TaskId> = two.iter().copied().collect();
        assert_eq!((set1.len(), set2.len()), (one.len(), two.len()), "{b}: no task twice in one retrier");
        assert!(
            set1.is_disjoint(&set2),
            "{b}: retried by both: {:?}",
            set1.intersection(&set2).collect::<Vec<_>>()
        );
        let all: BTreeSet<TaskId> = tasks.iter().map(|t| t.id).collect();
        assert_eq!(set1.union(&set2).copied().collect::<BTreeSet<_>>(), all, "{b}: every task retried");
        println!("{b}: retrier 1 took {}, retrier 2 took {}", one.len(), two.len());
        assert!(all_tasks(s).await.iter().all(|t| t.state == TaskState::Pending && t.attempt == 0), "{b}");
    }

    // ---- jobs as a whole ----

    pub async fn list_jobs_pages_newest_first_with_counts(s: &Store) {
        let b = s.backend();
        assert!(s.list_jobs(None, 10).await.expect("list_jobs").is_empty(), "{b}");
        let (j1, t1) = s.create_job("first", vec![new_task("prove"), new_task("prove")]).await.unwrap();
        let (j2, _) = s.create_job("second", vec![new_task("prove")]).await.unwrap();
        let (j3, t3) = s.create_job("third", vec![new_task("hash"); 1]).await.unwrap();
        claim_one(s, t1[0].task.id, "w1", LONG_LEASE).await;
        s.cancel(t3[0].task.id, "no").await.unwrap();

        let page = s.list_jobs(None, 2).await.expect("list_jobs");
        let ids: Vec<_> = page.iter().map(|j| j.id).collect();
        assert_eq!(ids, vec![j3.id, j2.id], "{b}: newest first");
        assert_eq!(page[0].count(TaskState::Cancelled), 1, "{b}");
        assert!(page[0].done(), "{b}");
        assert_eq!(page[1], s.get_job(j2.id).await.unwrap().unwrap(), "{b}: as GetJob shows it");
        let rest = s.list_jobs(Some(j2.id), 2).await.expect("list_jobs");
        assert_eq!(rest.len(), 1, "{b}");
        assert_eq!((rest[0].id, rest[0].name.as_str(), rest[0].total), (j1.id, "first", 2), "{b}");
        assert_eq!((rest[0].count(TaskState::Pending), rest[0].count(TaskState::Assigned)), (1, 1), "{b}");
        assert!(s.list_jobs(Some(j1.id), 2).await.unwrap().is_empty(), "{b}: nothing older");
    }

    pub async fn cancel_job_cancels_live_tasks_and_names_their_holders(s: &Store) {
        let b = s.backend();
        let news: Vec<NewTask> = (0..4).map(|_| new_task("prove")).collect();
        let (job, _) = s.create_job("nightly", news.clone()).await.unwrap();
        let outside = create_one(s, new_task("prove")).await;
        let done = claim_one(s, news[0].id, "w1", LONG_LEASE).await;
        complete_one(s, &done, b"ok").await;
        let assigned = claim_one(s, news[1].id, "w1", LONG_LEASE).await;
        let running = claim_one(s, news[2].id, "w2", LONG_LEASE).await;
        s.mark_running(std::slice::from_ref(&running)).await.unwrap();

        let cancelled = s.cancel_job(job.id, "superseded").await.expect("cancel_job").expect("known job");
        let mut want = vec![news[1].id, news[2].id, news[3].id];
        want.sort_unstable();
        assert_eq!(
            cancelled.iter().map(|c| c.task.id).collect::<Vec<_>>(),
            want,
            "{b}: the live ones, by id"
        );
        for c in &cancelled {
            assert!(c.applied, "{b}");
            assert_eq!(c.task, get(s, c.task.id).await, "{b}: as stored");
            assert_eq!(
                (c.task.state, c.task.error.as_deref()),
                (TaskState::Cancelled, Some("superseded")),
                "{b}"
            );
            let holder = if c.task.id == news[1].id {
                Some(assigned.clone())
            } else if c.task.id == news[2].id {
                Some(running.clone())
            } else {
                None
            };
            assert_eq!(c.held_by, holder, "{b}: held tasks name their (worker, attempt)");
        }
        for h in [&assigned, &running] {
            let att = last_attempt(s, h.task_id).await;
            assert_eq!((att.outcome.as_deref(), att.finished_at.is_some()), (Some("cancelled"), true), "{b}");
            assert_eq!(
                complete_one(s, h, b"late").await,
                ReportOutcome::Stale { state: TaskState::Cancelled, attempt: 1 },
                "{b}: a report after the cancel changes nothing"
            );
        }
        assert_eq!(get(s, news[0].id).await.state, TaskState::Completed, "{b}: the ended one stays");
        assert_eq!(get(s, outside.id).await.state, TaskState::Pending, "{b}: other tasks stay");
        let j = s.get_job(job.id).await.unwrap().unwrap();
        assert_eq!(
            (j.count(TaskState::Completed), j.count(TaskState::Cancelled), j.done()),
            (1, 3, true),
            "{b}"
        );

        assert_eq!(s.cancel_job(job.id, "again").await.unwrap(), Some(Vec::new()), "{b}: nothing left");
        assert_eq!(s.cancel_job(coordinator::domain::JobId::new(), "x").await.unwrap(), None, "{b}: unknown");
    }

    // ---- failures summary ----

    pub async fn failure_summary_counts_failed_tasks_by_type_and_error_and_attempts_by_outcome(s: &Store) {
        let b = s.backend();
        let since = Utc::now() - TimeDelta::seconds(1);
        let long = format!("{}\nsecond line", "x".repeat(300));
        let mut oom = Vec::new();
        for i in 0..3 {
            oom.push(failed_task(s, new_task("prove"), &format!("out of memory\nframe {i}")).await);
        }
        failed_task(s, new_task("prove"), "timeout").await;
        failed_task(s, new_task("hash"), &long).await;
        // A retriable failure with attempts left: an attempt outcome, not a failed task.
        let again = create_one(s, new_task("prove")).await;
        let h = claim_one(s, again.id, "w1", LONG_LEASE).await;
        fail_one(s, &h, "flaky", true, policy(100)).await;
        let done = create_one(s, new_task("prove")).await;
        let h = claim_one(s, done.id, "w1", LONG_LEASE).await;
        complete_one(s, &h, b"ok").await;
        let lapsed = create_one(s, new_task("prove")).await;
        claim_one(s, lapsed.id, "w1", TINY_LEASE).await;
        wait_for_lease_to_lapse(s, lapsed.id).await;
        assert_eq!(s.requeue_expired(10).await.expect("requeue_expired").len(), 1, "{b}");
        let until = Utc::now() + TimeDelta::seconds(1);

        let f = s.failure_summary(since, until, 2, 200).await.expect("failure_summary");
        assert_eq!(f.failed, 5, "{b}");
        assert_eq!(f.failed_by_type, BTreeMap::from([("hash".into(), 1), ("prove".into(), 4)]), "{b}");
        let latest = oom.last().unwrap();
        assert_eq!(
            f.top_errors[0],
            FailureGroup {
                task_type: "prove".into(),
                error: "out of memory".into(),
                count: 3,
                sample: latest.id,
                last_failed_at: f.top_errors[0].last_failed_at,
            },
            "{b}: first lines grouped, the latest task as the sample"
        );
        let last = oom.iter().filter_map(|t| t.finished_at).max().unwrap();
        assert!((f.top_errors[0].last_failed_at - last).abs() <= SLACK, "{b}");
        assert_eq!(f.top_errors.len(), 2, "{b}: only the top 2");
        assert_eq!(f.top_errors[1].count, 1, "{b}");
        let all = s.failure_summary(since, until, 10, 200).await.unwrap();
        let cut = all.top_errors.iter().find(|g| g.task_type == "hash").expect("the hash failure");
        assert_eq!(cut.error, "x".repeat(200), "{b}: the first line, cut to 200 characters");
        assert_eq!(
            all.attempt_outcomes,
            BTreeMap::from([("completed".into(), 1), ("failed".into(), 6), ("lease_expired".into(), 1)]),
            "{b}"
        );

        let later = s.failure_summary(until, until + TimeDelta::hours(1), 10, 200).await.unwrap();
        assert_eq!(later, Default::default(), "{b}: nothing failed in a later window");
    }
}

/// Runs `sql` on the database at `url` over a connection of its own.
async fn raw(url: &str, sql: &str) {
    use sqlx::Connection;
    if url.starts_with("sqlite:") {
        let mut c = sqlx::SqliteConnection::connect(url).await.expect("connect sqlite");
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned())).execute(&mut c).await.expect(sql);
        c.close().await.ok();
    } else {
        let mut c = sqlx::PgConnection::connect(url).await.expect("connect postgres");
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned())).execute(&mut c).await.expect(sql);
        c.close().await.ok();
    }
}

/// A database a newer build migrated (migration 9999 here): an earlier build starts on it while
/// the schema says builds of its migrations run on it (a replica of the earlier version restarted
/// during an upgrade, every replica after a roll-back), and stops with one line naming the build
/// to run once a migration has said they cannot. Before, any unknown migration stopped it.
async fn an_earlier_build_runs_on_a_newer_schema_until_the_schema_says_it_cannot(url: &str) {
    let cfg = coordinator::store::testing::db_config(url);
    let open = || async { Store::connect(&cfg).await };
    let first = open().await.expect("fresh database");
    first.close().await;
    drop(first);
    raw(
        url,
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         SELECT 9999, 'a later build''s', true, checksum, 0 FROM _sqlx_migrations WHERE version = 1",
    )
    .await;
    let earlier = open().await.expect("an earlier build runs on a newer schema that allows it");
    earlier.ping().await.expect("and serves");
    earlier.close().await;
    drop(earlier);
    raw(url, "UPDATE schema_compat SET oldest_build = 9999").await;
    let refused = open().await.expect_err("a schema that earlier builds cannot run on");
    let line = refused.to_string();
    assert!(!line.contains('\n'), "{line}");
    assert!(
        line.contains("migration 9999") && line.contains("run a build of migration 9999 or newer"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_earlier_build_runs_on_a_newer_schema_sqlite() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("coordinator.db").display());
    an_earlier_build_runs_on_a_newer_schema_until_the_schema_says_it_cannot(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
async fn an_earlier_build_runs_on_a_newer_schema_postgres() {
    let db = TestDb::postgres().await.expect("TEST_DATABASE_URL is set");
    db.store.close().await;
    an_earlier_build_runs_on_a_newer_schema_until_the_schema_says_it_cannot(&db.url).await;
    db.cleanup().await;
}

#[test]
fn schema_check_judges_migrations_a_build_does_not_know() {
    use coordinator::store::schema_check;
    let known = [1, 2, 20];
    assert!(schema_check(&known, &[], None).unwrap().is_none(), "a fresh database");
    assert!(schema_check(&known, &[1, 2], None).unwrap().is_none(), "an older schema: migrated as usual");
    assert!(schema_check(&known, &[1, 2, 20], Some(20)).unwrap().is_none());
    let warning = schema_check(&known, &[1, 2, 20, 21], Some(20)).unwrap().expect("a warning");
    assert!(warning.contains("migration 21, newer than this build's 20"), "{warning}");
    let refused = schema_check(&known, &[1, 2, 20, 21], Some(21)).unwrap_err().to_string();
    assert!(refused.contains("run a build of migration 21 or newer"), "{refused}");
    let refused = schema_check(&known, &[1, 2, 20, 21], None).unwrap_err().to_string();
    assert!(refused.contains("does not say which builds run on it"), "{refused}");
    let refused = schema_check(&known, &[1, 2, 3, 20], Some(20)).unwrap_err().to_string();
    assert!(refused.contains("migration 3 is applied but unknown to this build"), "{refused}");
}
