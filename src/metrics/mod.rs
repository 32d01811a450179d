//! Every metric name in one place (Prometheus, `coordinator_` namespace, units in the names).
//! The Grafana dashboard and the alert rules use exactly these names.

use std::{collections::BTreeMap, sync::OnceLock, time::Duration};

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;

use crate::domain::{RequeueReason, TaskState, WorkerState};

pub mod process;
pub mod task_types;

pub const WORKERS: &str = "coordinator_workers";
pub const CAPACITY_SLOTS: &str = "coordinator_capacity_slots";
pub const TASKS: &str = "coordinator_tasks";
pub const TASKS_UNSCHEDULABLE: &str = "coordinator_tasks_unschedulable";
pub const STREAMS_OPEN: &str = "coordinator_streams_open";
pub const DB_POOL_CONNECTIONS: &str = "coordinator_db_pool_connections";
pub const DB_UP: &str = "coordinator_database_up";
pub const BUILD_INFO: &str = "coordinator_build_info";
pub const TASKS_SUBMITTED: &str = "coordinator_tasks_submitted_total";
pub const TASKS_ASSIGNED: &str = "coordinator_tasks_assigned_total";
pub const TASKS_COMPLETED: &str = "coordinator_tasks_completed_total";
pub const TASKS_FAILED: &str = "coordinator_tasks_failed_total";
pub const TASKS_REQUEUED: &str = "coordinator_tasks_requeued_total";
pub const TASKS_CANCELLED: &str = "coordinator_tasks_cancelled_total";
pub const POLL_CYCLES: &str = "coordinator_scheduler_poll_cycles_total";
pub const AFFINITY_PLACEMENTS: &str = "coordinator_affinity_placements_total";
pub const HEARTBEATS: &str = "coordinator_heartbeats_total";
pub const WORKER_TRANSITIONS: &str = "coordinator_worker_transitions_total";
pub const DISPATCH_LATENCY: &str = "coordinator_dispatch_latency_seconds";
pub const TASK_DURATION: &str = "coordinator_task_duration_seconds";
pub const AUTH_FAILURES: &str = "coordinator_auth_failures_total";
pub const REPORT_ENTRIES: &str = "coordinator_report_entries_total";
pub const DB_QUERY: &str = "coordinator_db_query_seconds";
pub const INFLIGHT_CORRECTIONS: &str = "coordinator_inflight_corrections_total";
pub const BACKGROUND_FAILURES: &str = "coordinator_background_failures_total";
pub const NOTIFICATIONS: &str = "coordinator_notifications_total";
pub const PRUNED_ROWS: &str = "coordinator_pruned_rows_total";
pub const TASKS_PENDING: &str = "coordinator_tasks_pending";
pub const QUEUE_OLDEST_PENDING: &str = "coordinator_queue_oldest_pending_seconds";
pub const GRPC_STARTED: &str = "grpc_server_started_total";
pub const GRPC_HANDLED: &str = "grpc_server_handled_total";
pub const GRPC_HANDLING: &str = "grpc_server_handling_seconds";
pub const HTTP_REQUESTS: &str = "http_requests_total";
pub const HTTP_DURATION: &str = "http_request_duration_seconds";

/// Every name `/metrics` exposes once the coordinator has started (dashboards rely on these).
pub const ALL: &[&str] = &[
    WORKERS,
    CAPACITY_SLOTS,
    TASKS,
    TASKS_UNSCHEDULABLE,
    STREAMS_OPEN,
    DB_POOL_CONNECTIONS,
    DB_UP,
    BUILD_INFO,
    TASKS_SUBMITTED,
    TASKS_ASSIGNED,
    AFFINITY_PLACEMENTS,
    TASKS_COMPLETED,
    TASKS_FAILED,
    TASKS_REQUEUED,
    TASKS_CANCELLED,
    POLL_CYCLES,
    HEARTBEATS,
    WORKER_TRANSITIONS,
    DISPATCH_LATENCY,
    TASK_DURATION,
    AUTH_FAILURES,
    REPORT_ENTRIES,
    DB_QUERY,
    INFLIGHT_CORRECTIONS,
    BACKGROUND_FAILURES,
    NOTIFICATIONS,
    TASKS_PENDING,
    QUEUE_OLDEST_PENDING,
    GRPC_STARTED,
    GRPC_HANDLED,
    GRPC_HANDLING,
    HTTP_REQUESTS,
    HTTP_DURATION,
];

/// How long a series may go without an update before it leaves `/metrics`, unless
/// [`install_with`] set it first (`http.metrics_series_ttl`).
pub const DEFAULT_SERIES_TTL: Duration = Duration::from_secs(600);

/// Kinds of `coordinator_inflight_corrections_total{kind}`.
pub const CORRECTION_KINDS: &[&str] =
    &["stale_slot", "missing_slot", "orphan_assignment", "superseded_session"];
/// Background loops watched by the supervisor (`coordinator_background_failures_total{task}`).
pub const BACKGROUND_TASKS: &[&str] = &[
    "scheduler",
    "sweeper",
    "registry",
    "gauges",
    "notifier",
    "listener",
    "grpc_health",
    "pruner",
    "schedules",
];
/// Tables the pruner deletes from (`coordinator_pruned_rows_total{table}`).
pub const PRUNED_TABLES: &[&str] = &["tasks", "task_attempts", "job_tasks", "jobs", "workers"];

/// Codes an entry of `ReportCompletions` is answered with, registered at start
/// (`coordinator_report_entries_total{grpc_code}`; another code gets its series when it first
/// happens).
pub const REPORT_ENTRY_CODES: &[&str] =
    &["OK", "InvalidArgument", "NotFound", "FailedPrecondition", "OutOfRange", "Unavailable", "Internal"];

/// Reasons an auth check refuses a call (`coordinator_auth_failures_total{reason}`).
pub const AUTH_FAILURE_REASONS: &[&str] =
    &["missing_token", "malformed_header", "unknown_token", "wrong_role", "identity_mismatch"];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// [`install_with`] the default series TTL.
pub fn install() -> PrometheusHandle {
    install_with(DEFAULT_SERIES_TTL)
}

/// Installs the process-wide Prometheus recorder (once; later calls return the same handle,
/// whatever they ask) and registers every series so each name appears in the first scrape.
///
/// Gauge and histogram series nothing updated for `series_ttl` are dropped from `/metrics`:
/// that is how the series of a task type that is gone disappear. The gauges that must stay are
/// set on every refresh, which runs several times within the TTL. Counters never expire (a
/// counter that vanished and came back would lose increments to `rate()`).
pub fn install_with(series_ttl: Duration) -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .idle_timeout(MetricKindMask::GAUGE | MetricKindMask::HISTOGRAM, Some(series_ttl))
                // Dispatch: 100 µs .. 10 s.
                .set_buckets_for_metric(
                    Matcher::Full(DISPATCH_LATENCY.into()),
                    &[
                        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                        1.0, 2.5, 10.0,
                    ],
                )
                .and_then(|b| {
                    // Task duration: 10 ms .. 4 h (proofs can take hours).
                    b.set_buckets_for_metric(
                        Matcher::Full(TASK_DURATION.into()),
                        &[
                            0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0,
                            14400.0,
                        ],
                    )
                })
                .and_then(|b| {
                    // Database statements: 100 µs .. 10 s.
                    b.set_buckets_for_metric(
                        Matcher::Full(DB_QUERY.into()),
                        &[
                            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                            1.0, 2.5, 10.0,
                        ],
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(HTTP_DURATION.into()),
                        &[
                            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                            10.0,
                        ],
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(GRPC_HANDLING.into()),
                        &[
                            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                            10.0,
                        ],
                    )
                })
                .expect("bucket lists are non-empty")
                .install_recorder()
                .expect("the metrics recorder is installed once");
            describe();
            handle
        })
        .clone()
}

fn describe() {
    process::describe();
    describe_gauge!(WORKERS, "Workers known to this coordinator, by state.");
    describe_gauge!(
        CAPACITY_SLOTS,
        "Task slots of ACTIVE workers, by state (used, available); their sum is the capacity."
    );
    describe_gauge!(
        TASKS,
        "Tasks in the database, by status: the live states at each refresh, the finished ones as often as counting them takes under 1% of the time."
    );
    describe_gauge!(
        TASKS_UNSCHEDULABLE,
        "Pending tasks whose type no registered worker runs, by task_type (undeclared types as other)."
    );
    describe_gauge!(
        TASKS_PENDING,
        "Pending tasks by task_type (types no live worker declared lately as other); sums to the pending count."
    );
    describe_gauge!(
        QUEUE_OLDEST_PENDING,
        "How long the longest-waiting runnable pending task of each task_type has waited, in seconds."
    );
    describe_gauge!(STREAMS_OPEN, "Open ReceiveTasks streams.");
    describe_gauge!(
        DB_POOL_CONNECTIONS,
        "Database pool connections, by state (busy, idle); their sum is the open connections."
    );
    describe_gauge!(DB_UP, "1 when the last database probe succeeded.");
    describe_gauge!(BUILD_INFO, "Build information; always 1.");
    describe_counter!(TASKS_SUBMITTED, "Tasks created by submissions.");
    describe_counter!(TASKS_ASSIGNED, "Assignments pushed to workers.");
    describe_counter!(
        AFFINITY_PLACEMENTS,
        "Placements of tasks with an affinity key, by outcome: hit (the key's worker) or miss (it had no room)."
    );
    describe_counter!(TASKS_COMPLETED, "Completions accepted.");
    describe_counter!(TASKS_FAILED, "Failure reports accepted (retried or final).");
    describe_counter!(TASKS_REQUEUED, "Tasks taken back from workers, by reason.");
    describe_counter!(TASKS_CANCELLED, "Tasks cancelled by clients.");
    describe_counter!(POLL_CYCLES, "Scheduler passes.");
    describe_counter!(HEARTBEATS, "Heartbeats received.");
    describe_counter!(
        INFLIGHT_CORRECTIONS,
        "Worker slots the reconciliation corrected against the database, by kind (expected 0)."
    );
    describe_counter!(BACKGROUND_FAILURES, "Background loops that panicked or stopped early, by task.");
    describe_counter!(NOTIFICATIONS, "Cross-replica notifications (Postgres NOTIFY), sent and received.");
    describe_counter!(WORKER_TRANSITIONS, "Worker state changes, by from and to.");
    describe_histogram!(
        DISPATCH_LATENCY,
        metrics::Unit::Seconds,
        "From submission to the push onto a worker stream."
    );
    describe_histogram!(TASK_DURATION, metrics::Unit::Seconds, "From push to accepted report, by task type.");
    describe_counter!(AUTH_FAILURES, "Calls refused by the auth check, by reason.");
    describe_counter!(
        REPORT_ENTRIES,
        "Results reported together in ReportCompletions calls, by the gRPC code each was answered with."
    );
    describe_histogram!(DB_QUERY, metrics::Unit::Seconds, "Database statement duration, by operation.");
    describe_counter!(PRUNED_ROWS, "Rows deleted by the retention pruner, by table.");
    describe_counter!(GRPC_STARTED, "gRPC calls started, by service, method and type.");
    describe_counter!(GRPC_HANDLED, "gRPC calls completed, by service, method, type and code.");
    describe_histogram!(
        GRPC_HANDLING,
        metrics::Unit::Seconds,
        "gRPC call duration until the last message, by service, method and type."
    );
    describe_counter!(HTTP_REQUESTS, "HTTP requests answered, by method, route template and status.");
    describe_histogram!(
        HTTP_DURATION,
        metrics::Unit::Seconds,
        "HTTP request duration until the response headers, by method and route template."
    );

    keep_alive();
    for s in WorkerState::ALL {
        gauge!(WORKERS, "state" => s.as_str()).set(0.0);
    }
    for state in ["used", "available"] {
        gauge!(CAPACITY_SLOTS, "state" => state).set(0.0);
    }
    for s in TaskState::ALL {
        gauge!(TASKS, "status" => s.as_str()).set(0.0);
    }
    gauge!(STREAMS_OPEN).set(0.0);
    for state in ["busy", "idle"] {
        gauge!(DB_POOL_CONNECTIONS, "state" => state).set(0.0);
    }
    gauge!(DB_UP).set(0.0);
    counter!(TASKS_SUBMITTED).absolute(0);
    counter!(TASKS_ASSIGNED).absolute(0);
    for outcome in ["hit", "miss"] {
        counter!(AFFINITY_PLACEMENTS, "outcome" => outcome).absolute(0);
    }
    counter!(TASKS_COMPLETED).absolute(0);
    counter!(TASKS_FAILED).absolute(0);
    counter!(TASKS_CANCELLED).absolute(0);
    for r in RequeueReason::ALL {
        counter!(TASKS_REQUEUED, "reason" => r.as_str()).absolute(0);
    }
    counter!(POLL_CYCLES).absolute(0);
    counter!(HEARTBEATS).absolute(0);
    for from in WorkerState::ALL {
        for to in WorkerState::ALL.into_iter().filter(|to| *to != from) {
            counter!(WORKER_TRANSITIONS, "from" => from.as_str(), "to" => to.as_str()).absolute(0);
        }
    }
    for reason in AUTH_FAILURE_REASONS {
        counter!(AUTH_FAILURES, "reason" => *reason).absolute(0);
    }
    for kind in CORRECTION_KINDS {
        counter!(INFLIGHT_CORRECTIONS, "kind" => *kind).absolute(0);
    }
    for code in REPORT_ENTRY_CODES {
        counter!(REPORT_ENTRIES, "grpc_code" => *code).absolute(0);
    }
    for task in BACKGROUND_TASKS {
        counter!(BACKGROUND_FAILURES, "task" => *task).absolute(0);
    }
    for dir in ["sent", "received"] {
        counter!(NOTIFICATIONS, "direction" => dir).absolute(0);
    }
    for table in PRUNED_TABLES {
        counter!(PRUNED_ROWS, "table" => *table).absolute(0);
    }
}

/// Rows the retention pruner deleted from `table` (one of [`PRUNED_TABLES`]).
pub fn pruned_rows(table: &'static str, n: u64) {
    if n > 0 {
        counter!(PRUNED_ROWS, "table" => table).increment(n);
    }
}

/// Sets the gauges no refresh otherwise touches, so the series TTL never drops them.
pub fn keep_alive() {
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

/// Corrections made by the registry's reconciliation (expected to stay 0).
pub fn inflight_corrections(kind: &'static str, n: u64) {
    if n > 0 {
        counter!(INFLIGHT_CORRECTIONS, "kind" => kind).increment(n);
    }
}

/// A background loop that panicked or ended before shutdown.
pub fn background_failure(task: &'static str) {
    counter!(BACKGROUND_FAILURES, "task" => task).increment(1);
}

/// Cross-replica notifications sent or received.
pub fn notifications(direction: &'static str, n: u64) {
    counter!(NOTIFICATIONS, "direction" => direction).increment(n);
}

/// One entry of a `ReportCompletions` call, answered with `grpc_code` (a name as
/// `grpc_server_handled_total` writes it).
pub fn report_entry(grpc_code: &'static str) {
    counter!(REPORT_ENTRIES, "grpc_code" => grpc_code).increment(1);
}

pub fn auth_failure(reason: &'static str) {
    counter!(AUTH_FAILURES, "reason" => reason).increment(1);
}

pub fn db_query(op: &'static str, elapsed: Duration) {
    histogram!(DB_QUERY, "op" => op).record(elapsed.as_secs_f64());
}

pub fn heartbeat() {
    counter!(HEARTBEATS).increment(1);
}

pub fn worker_transition(from: WorkerState, to: WorkerState) {
    counter!(WORKER_TRANSITIONS, "from" => from.as_str(), "to" => to.as_str()).increment(1);
}

/// A drained worker left: its session and row are gone (`to="left"`, not a state it stays in).
pub fn worker_left(from: WorkerState) {
    counter!(WORKER_TRANSITIONS, "from" => from.as_str(), "to" => "left").increment(1);
}

pub fn poll_cycle() {
    counter!(POLL_CYCLES).increment(1);
}

pub fn tasks_submitted(n: u64) {
    counter!(TASKS_SUBMITTED).increment(n);
}

pub fn task_assigned(dispatch_latency: Duration) {
    counter!(TASKS_ASSIGNED).increment(1);
    histogram!(DISPATCH_LATENCY).record(dispatch_latency.as_secs_f64());
}

/// Placements of tasks with an affinity key: on the key's worker, or elsewhere for want of room.
pub fn affinity_placements(hits: u32, misses: u32) {
    counter!(AFFINITY_PLACEMENTS, "outcome" => "hit").increment(u64::from(hits));
    counter!(AFFINITY_PLACEMENTS, "outcome" => "miss").increment(u64::from(misses));
}

pub fn task_completed(task_type: &str, duration: Option<Duration>) {
    counter!(TASKS_COMPLETED).increment(1);
    if let Some(d) = duration {
        histogram!(TASK_DURATION, "task_type" => task_types::label(task_type)).record(d.as_secs_f64());
    }
}

pub fn task_failed(task_type: &str, duration: Option<Duration>) {
    counter!(TASKS_FAILED).increment(1);
    if let Some(d) = duration {
        histogram!(TASK_DURATION, "task_type" => task_types::label(task_type)).record(d.as_secs_f64());
    }
}

pub fn task_cancelled() {
    counter!(TASKS_CANCELLED).increment(1);
}

pub fn task_requeued(reason: RequeueReason) {
    counter!(TASKS_REQUEUED, "reason" => reason.as_str()).increment(1);
}

/// A gRPC method as the go-grpc-middleware metrics name it: `grpc_service` (the full service
/// name), `grpc_method`, and `grpc_type` (`unary`, `client_stream`, `server_stream`,
/// `bidi_stream`). Values come from fixed lists, so the label sets stay bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrpcMethod {
    pub service: &'static str,
    pub method: &'static str,
    pub kind: &'static str,
}

pub fn grpc_started(m: GrpcMethod) {
    counter!(GRPC_STARTED, "grpc_service" => m.service, "grpc_method" => m.method, "grpc_type" => m.kind)
        .increment(1);
}

pub fn grpc_call(m: GrpcMethod, code: &'static str, elapsed: Duration) {
    counter!(
        GRPC_HANDLED,
        "grpc_service" => m.service,
        "grpc_method" => m.method,
        "grpc_type" => m.kind,
        "grpc_code" => code
    )
    .increment(1);
    histogram!(GRPC_HANDLING, "grpc_service" => m.service, "grpc_method" => m.method, "grpc_type" => m.kind)
        .record(elapsed.as_secs_f64());
}

/// One HTTP request answered: `route` is the template it matched (`/api/v1/tasks/{id}`), never
/// the raw path.
pub fn http_request(method: &'static str, route: String, status: u16, elapsed: Duration) {
    histogram!(HTTP_DURATION, "method" => method, "route" => route.clone()).record(elapsed.as_secs_f64());
    counter!(HTTP_REQUESTS, "method" => method, "route" => route, "status" => status.to_string())
        .increment(1);
}

/// Gauges read off the registry.
pub fn set_registry_gauges(c: &crate::domain::FleetCounts) {
    for (state, n) in [
        (WorkerState::Active, c.active),
        (WorkerState::Suspect, c.suspect),
        (WorkerState::Dead, c.dead),
        (WorkerState::Draining, c.draining),
    ] {
        gauge!(WORKERS, "state" => state.as_str()).set(f64::from(n));
    }
    gauge!(CAPACITY_SLOTS, "state" => "used").set(f64::from(c.capacity_used));
    gauge!(CAPACITY_SLOTS, "state" => "available")
        .set(f64::from(c.capacity_total.saturating_sub(c.capacity_used)));
    gauge!(STREAMS_OPEN).set(f64::from(c.streams_open));
}

/// Gauges read off the database, set by the app's periodic refresh. `pool` is (open, idle);
/// `unschedulable` and `pending` are keyed by label value (see [`task_types`]).
pub fn set_store_gauges(
    tasks: &BTreeMap<TaskState, u64>,
    unschedulable: &[(String, u64)],
    pending: &BTreeMap<String, (u64, Duration)>,
    pool: (u32, u32),
    db_up: bool,
) {
    for s in TaskState::ALL {
        gauge!(TASKS, "status" => s.as_str()).set(tasks.get(&s).copied().unwrap_or(0) as f64);
    }
    for (t, n) in unschedulable {
        gauge!(TASKS_UNSCHEDULABLE, "task_type" => t.clone()).set(*n as f64);
    }
    for (t, (n, waited)) in pending {
        gauge!(TASKS_PENDING, "task_type" => t.clone()).set(*n as f64);
        gauge!(QUEUE_OLDEST_PENDING, "task_type" => t.clone()).set(waited.as_secs_f64());
    }
    let (open, idle) = pool;
    gauge!(DB_POOL_CONNECTIONS, "state" => "busy").set(f64::from(open.saturating_sub(idle)));
    gauge!(DB_POOL_CONNECTIONS, "state" => "idle").set(f64::from(idle));
    gauge!(DB_UP).set(if db_up { 1.0 } else { 0.0 });
}
