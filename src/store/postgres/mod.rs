//! The Postgres backend. Claims lock candidates with `FOR UPDATE SKIP LOCKED`, so replicas never
//! claim the same task; batch operations take arrays and `unnest` them, one statement per batch.
//!
//! One file per concern: [`submit`], [`claim`], [`report`], [`requeue`], [`retry`], [`jobs`],
//! [`failures`], [`workers`], [`read`], [`prune`], [`schedules`].
//! Rows are decoded by [`crate::store::decode`]; the rules a transition follows come from
//! [`crate::store::policy`].
//!
//! A batch statement that joins `tasks` to its unnested arrays finds each row by its key (or,
//! for a claim, where the locked row is: its `ctid`), and states its status condition as
//! `(...) IS TRUE`, which no partial index matches. Without statistics (a new database under its
//! first load, or autovacuum off) the planner otherwise takes a partial index on the status, that
//! is every pending or running task, for a few rows: tens of milliseconds per batch instead of a
//! fraction of one, growing with the backlog.

mod claim;
mod dependents;
mod failures;
mod jobs;
mod limits;
mod prune;
mod read;
mod report;
mod requeue;
mod retry;
mod schedules;
mod submit;
mod workers;
pub use prune::PRUNER_LOCK;

use std::{str::FromStr, sync::Arc, time::Duration};

use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use uuid::Uuid;

use super::{DbHealth, Held, NOTIFY_CHANNEL, Result};
use crate::config::DatabaseConfig;

/// Applied migrations it does not know are [`super::schema_check`]'s to judge, before it runs.
static MIGRATOR: std::sync::LazyLock<sqlx::migrate::Migrator> = std::sync::LazyLock::new(|| {
    let mut m = sqlx::migrate!("migrations/postgres");
    m.set_ignore_missing(true);
    m
});

/// Postgres-backed store. Cheap to clone (the pool is shared).
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    pub(super) health: Arc<DbHealth>,
    pub(super) settled: Arc<super::SettledSink>,
}

/// Runs a statement group again when Postgres aborted it to break a deadlock or a serialization
/// conflict between two batches touching the same rows in different orders.
macro_rules! retry_conflicts {
    ($body:expr) => {{
        let mut tries = 0;
        loop {
            match $body {
                Err(StoreError::Database(sqlx::Error::Database(e)))
                    if tries < 5 && matches!(e.code().as_deref(), Some("40P01") | Some("40001")) =>
                {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(5 * tries)).await;
                }
                other => break other,
            }
        }
    }};
}
pub(super) use retry_conflicts;

/// The planner settings of a transaction whose batch statements join an array of tasks to their
/// rows, for that transaction only: the columns of one `SELECT` sent with its `BEGIN`, in the
/// same round trip.
///
/// - No sequential scans. Statistics from a quiet moment (every task finished) make a scan of
///   `tasks` filtered by a live state look like one row after a burst, and the planner then
///   scans the whole backlog once for each row of the batch (backlog x batch row comparisons:
///   0.3 to 1 s per claim of a few hundred tasks with 20,000 pending). Every such statement
///   reaches its rows by key or by their locked place.
/// - No hash or merge joins: each row of the batch is found by key (a nested loop over an index),
///   never by reading a whole index to join it at once. A plan made while the table was small
///   would otherwise stay with the connection after the table has grown (next point).
/// - One plan per statement and connection (`force_generic_plan`), made at its first run and
///   kept: planning a completion took 0.17 ms at each call, more than running it, for a batch of
///   one or two reports.
/// - No just in time compilation: a scan that stays (of a table nothing else reads) carries the
///   planner's disabling cost, far above its threshold, which would cost each statement 0.2 to
///   0.5 s.
///
/// And each statement names its tasks so that a lookup by key is the only way to them that is
/// not disabled: `t.id = ANY(ARRAY[<batch>.id])`, with the rest of the match (worker, attempt)
/// wrapped in `IS TRUE`. A join on `t.id = <batch>.id` would make the key's order useful for
/// merging, and a plan made while the table's statistics said it was empty (a new table, or
/// one pruned empty and analyzed) then put `tasks` on the outer side of the loop: a walk of all
/// of `tasks_pkey` per statement, re-reading the batch for each task, kept by the connection
/// after the table had grown. The lookup is checked again on a newer version of the row when a
/// concurrent update (a running mark, a renewal) moved it, as any condition on the key is.
macro_rules! batch_settings {
    () => {
        "set_config('enable_seqscan', 'off', true), set_config('enable_hashjoin', 'off', true), \
         set_config('enable_mergejoin', 'off', true), \
         set_config('plan_cache_mode', 'force_generic_plan', true), set_config('jit', 'off', true)"
    };
}
pub(super) use batch_settings;

/// The `BEGIN` of a transaction of batch statements, and its settings ([`batch_settings`]).
pub(super) const BATCH_BEGIN: &str = concat!("BEGIN; SELECT ", batch_settings!());

/// Closes the attempts of just-cancelled tasks that a worker held: an attempt row written from
/// each task's row (a cancel keeps the worker). An attempt already closed keeps its row.
const CLOSE_CANCELLED_ATTEMPTS: &str =
    "INSERT INTO task_attempts (task_id, attempt, worker_id, assigned_at, started_at, finished_at, outcome, error)
     SELECT id, attempt, worker_id, COALESCE(assigned_at, now()), started_at, now(), 'cancelled', $2 FROM tasks
     WHERE id = ANY($1) AND worker_id IS NOT NULL AND attempt > 0
     ON CONFLICT (task_id, attempt) DO NOTHING";

/// How long a pooled connection may sit idle and still be handed out unchecked.
const CHECK_IDLE_AFTER: Duration = Duration::from_secs(1);

impl PgStore {
    pub(in crate::store) async fn connect(cfg: &DatabaseConfig) -> std::result::Result<Self, sqlx::Error> {
        // Notices ("relation ... already exists, skipping" at every start's migration check)
        // are not the coordinator's to log; warnings and errors still arrive.
        let options = PgConnectOptions::from_str(&cfg.url)?
            .application_name("coordinator")
            .options([("client_min_messages", "warning")]);
        // One direct connection first: an unreachable or misconfigured server fails at once with
        // its real cause (refused, bad password, no such database) rather than a pool timeout.
        use sqlx::{ConnectOptions, Connection};
        let probe = tokio::time::timeout(cfg.acquire_timeout, options.connect())
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)??;
        probe.close().await?;
        let pool = PgPoolOptions::new()
            // A connection taken from the pool is checked (a round trip) only when it sat idle
            // long enough to have been cut (a restart of the server, a proxy's idle timeout): a
            // check on every take added a round trip to every statement of the hot path, a
            // fifth of an idle dispatch. A connection that breaks while in use fails its call,
            // which the callers answer as unavailable, and is not returned to the pool.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for < CHECK_IDLE_AFTER {
                        return Ok(true);
                    }
                    conn.ping().await.map(|()| true)
                })
            })
            .max_connections(cfg.max_open_conns)
            .min_connections(cfg.max_idle_conns)
            .max_lifetime(cfg.conn_max_lifetime)
            .acquire_timeout(cfg.acquire_timeout)
            .connect_with(options)
            .await?;
        Ok(Self { pool, health: Arc::default(), settled: Arc::default() })
    }

    pub(in crate::store) async fn migrate(&self) -> Result<()> {
        super::migrate_judged(
            &MIGRATOR,
            || self.schema_state(),
            || async { Ok(MIGRATOR.run(&self.pool).await?) },
        )
        .await
    }

    /// The migrations applied, and the schema's oldest build that runs on it (see
    /// [`super::schema_check`]).
    async fn schema_state(&self) -> Result<(Vec<i64>, Option<i64>)> {
        let tables: (bool, bool) = sqlx::query_as(
            "SELECT to_regclass('_sqlx_migrations') IS NOT NULL, to_regclass('schema_compat') IS NOT NULL",
        )
        .fetch_one(&self.pool)
        .await?;
        let applied: Vec<i64> = if tables.0 {
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                .fetch_all(&self.pool)
                .await?
        } else {
            Vec::new()
        };
        let oldest: Option<i64> = if tables.1 {
            sqlx::query_scalar("SELECT oldest_build::bigint FROM schema_compat")
                .fetch_optional(&self.pool)
                .await?
        } else {
            None
        };
        Ok((applied, oldest))
    }

    /// The pool, for tests that inspect rows directly.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub(in crate::store) async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub(in crate::store) async fn close(&self) {
        self.pool.close().await;
    }

    pub(in crate::store) fn pool_stats(&self) -> (u32, u32) {
        (self.pool.size(), self.pool.num_idle() as u32)
    }

    /// Sends the payloads on the notification channel. The statement's commit does not wait for
    /// its WAL record to reach the disk (`synchronous_commit` off, for this transaction only): a
    /// notification is delivered at commit, and one lost in a crash costs latency only, so the
    /// other replicas hear of a submission one disk flush sooner.
    pub(in crate::store) async fn notify(&self, payloads: &[String]) -> Result<()> {
        sqlx::query(
            "WITH nosync AS (SELECT set_config('synchronous_commit', 'off', true))
             SELECT pg_notify($1, p) FROM nosync, unnest($2::text[]) AS p",
        )
        .bind(NOTIFY_CHANNEL)
        .bind(payloads)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(in crate::store) async fn listen(&self) -> Result<sqlx::postgres::PgListener> {
        let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool).await?;
        listener.listen(NOTIFY_CHANNEL).await?;
        Ok(listener)
    }
}

pub(super) fn held_arrays(held: &[Held]) -> (Vec<Uuid>, Vec<String>, Vec<i32>) {
    let mut ids = Vec::with_capacity(held.len());
    let mut workers = Vec::with_capacity(held.len());
    let mut attempts = Vec::with_capacity(held.len());
    for h in held {
        ids.push(h.task_id.0);
        workers.push(h.worker_id.0.clone());
        attempts.push(h.attempt as i32);
    }
    (ids, workers, attempts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        domain::{JobId, TaskState},
        store::{ClaimFilter, Completion, Store, TypeFilter, testing},
    };

    /// The backend of `tx`, whose locks the tests below make others wait for.
    async fn backend_pid(tx: &mut sqlx::Transaction<'_, sqlx::Postgres>) -> i32 {
        sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut **tx).await.unwrap()
    }

    /// Waits until a backend waits for a lock `blocker` holds (and so for nothing of another
    /// test); panics with `what` after 10 s.
    async fn blocked_by(pg: &PgStore, blocker: i32, what: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
            )
            .bind(blocker)
            .fetch_one(pg.pool())
            .await
            .unwrap();
            if waiting > 0 {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A drained worker's row is removed only while no task is charged to it, as the database
    /// is once the row is locked: a claim that share-locked the row (its session fence) and
    /// assigns a task to the worker commits first, and the removal then sees that task and
    /// keeps the row (the tasks are read after the lock, in a statement of their own).
    #[tokio::test]
    #[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
    async fn a_leaving_worker_keeps_its_row_for_a_claim_that_fenced_on_it() {
        let db = testing::TestDb::postgres().await.expect("TEST_DATABASE_URL");
        let Store::Postgres(pg) = &db.store else { unreachable!("a Postgres test database") };
        let reg = testing::registration("leaving", 1);
        let (worker, session) = (reg.id.clone(), reg.session_id);
        db.store.register_worker(&reg).await.unwrap();
        let task = testing::new_task("prove");
        let id = task.id;
        db.store.create_tasks(&[task]).await.unwrap();
        // A claim in flight: its fence holds the worker's row.
        let mut claim = pg.pool().begin().await.unwrap();
        let claim_pid = backend_pid(&mut claim).await;
        sqlx::query("SELECT 1 FROM workers WHERE id = $1 FOR SHARE")
            .bind(&worker.0)
            .execute(&mut *claim)
            .await
            .unwrap();
        let leaving = {
            let (store, worker) = (db.store.clone(), worker.clone());
            tokio::spawn(async move { store.forget_left_worker(&worker, session).await })
        };
        blocked_by(pg, claim_pid, "the removal never waited for the claim").await;
        sqlx::query("UPDATE tasks SET status = 'assigned', worker_id = $1, session_id = $2, attempt = 1 WHERE id = $3")
            .bind(&worker.0)
            .bind(session)
            .bind(id.0)
            .execute(&mut *claim)
            .await
            .unwrap();
        claim.commit().await.unwrap();
        assert_eq!(leaving.await.unwrap().unwrap(), crate::store::Leaving::Charged);
        assert!(db.store.get_worker(&worker).await.unwrap().is_some(), "the row stays with its task");
        db.cleanup().await;
    }

    /// Running marks and lease renewals lock tasks' rows in task id order, as completions and
    /// requeues do, whatever order they are given: a transaction that holds the lower of two
    /// rows and then takes the higher (as a completion of both would) waits for nobody, and the
    /// mark or renewal goes on once it commits. In the order given (higher first), each held a
    /// row the other wanted, until Postgres aborted one after its deadlock timeout (here the
    /// other gives up first, at its lock timeout).
    #[tokio::test]
    #[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
    async fn running_marks_and_lease_renewals_lock_tasks_in_id_order() {
        let db = testing::TestDb::postgres().await.expect("TEST_DATABASE_URL");
        let Store::Postgres(pg) = &db.store else { unreachable!("a Postgres test database") };
        let reg = testing::registration("ordered", 4);
        let worker = reg.id.clone();
        db.store.register_worker(&reg).await.unwrap();
        for op in ["mark", "renew"] {
            let tasks = [testing::new_task("prove"), testing::new_task("prove")];
            db.store.create_tasks(&tasks).await.unwrap();
            let mut held: Vec<Held> = Vec::new();
            for _ in 0..2 {
                let a = testing::claim_one(&db.store, &worker).await.remove(0);
                held.push(Held { task_id: a.task_id, worker_id: worker.clone(), attempt: a.attempt });
            }
            held.sort_by_key(|h| std::cmp::Reverse(h.task_id));
            let (high, low) = (held[0].task_id, held[1].task_id);

            // Another transaction holds the lower row. Half the deadlock check's second for its
            // next lock: a batch holding the higher row would make it wait past that.
            let mut other = pg.pool().begin().await.unwrap();
            let other_pid = backend_pid(&mut other).await;
            sqlx::query("SET LOCAL lock_timeout = '500ms'").execute(&mut *other).await.unwrap();
            let touch = "UPDATE tasks SET updated_at = now() WHERE id = $1";
            sqlx::query(touch).bind(low.0).execute(&mut *other).await.unwrap();
            let batch = {
                let (store, held) = (db.store.clone(), held.clone());
                tokio::spawn(async move {
                    match op {
                        "mark" => {
                            let now = std::time::Instant::now();
                            let delivered: Vec<_> = held.into_iter().map(|h| (h, now)).collect();
                            store.mark_delivered(&delivered).await.map(|n| n as usize)
                        }
                        _ => store.renew_leases(&held, Duration::from_secs(60)).await.map(|r| r.len()),
                    }
                })
            };
            blocked_by(pg, other_pid, &format!("{op}: the batch never waited for the row")).await;
            let r = sqlx::query(touch).bind(high.0).execute(&mut *other).await;
            assert!(r.is_ok(), "{op}: the higher row was free, not held by the batch: {r:?}");
            other.commit().await.unwrap();
            assert_eq!(batch.await.unwrap().unwrap(), 2, "{op}: both rows, once the other committed");
        }
        db.cleanup().await;
    }

    /// A job's cancel locks its tasks' rows in task id order, as completions do, whatever the
    /// order of the job's members: a transaction that holds the lower of two and then takes
    /// the higher waits for nobody, and the cancel goes on once it commits.
    #[tokio::test]
    #[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
    async fn a_job_cancel_locks_its_tasks_in_id_order() {
        let db = testing::TestDb::postgres().await.expect("TEST_DATABASE_URL");
        let Store::Postgres(pg) = &db.store else { unreachable!("a Postgres test database") };
        let mut tasks = vec![testing::new_task("prove"), testing::new_task("prove")];
        // The first member has the higher id.
        tasks.sort_by_key(|t| std::cmp::Reverse(t.id));
        let (high, low) = (tasks[0].id, tasks[1].id);
        let (job, _) = db.store.create_job("ordered", tasks).await.unwrap();

        // Half the deadlock check's second for the other's next lock (as above).
        let mut other = pg.pool().begin().await.unwrap();
        let other_pid = backend_pid(&mut other).await;
        sqlx::query("SET LOCAL lock_timeout = '500ms'").execute(&mut *other).await.unwrap();
        let touch = "UPDATE tasks SET updated_at = now() WHERE id = $1";
        sqlx::query(touch).bind(low.0).execute(&mut *other).await.unwrap();
        let cancel = {
            let store = db.store.clone();
            tokio::spawn(async move { store.cancel_job(job.id, "stop").await })
        };
        blocked_by(pg, other_pid, "the cancel never waited for the row").await;
        let r = sqlx::query(touch).bind(high.0).execute(&mut *other).await;
        assert!(r.is_ok(), "the higher row was free, not held by the cancel: {r:?}");
        other.commit().await.unwrap();
        let cancelled = cancel.await.unwrap().unwrap().expect("the job exists");
        assert_eq!(cancelled.iter().filter(|c| c.applied).count(), 2);
        db.cleanup().await;
    }

    /// A batch of completions that refills its workers locks their rows before its tasks' rows,
    /// as a requeue of a worker does (the worker's row, then its tasks): a requeue that holds the
    /// worker's row while such a batch completes one of its tasks takes that task back without
    /// waiting, and the report then finds it taken. Locking the task first (the completion's
    /// update, then the claim's fence on the worker) made the two wait on each other until the
    /// deadlock check aborted one.
    #[tokio::test]
    #[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
    async fn a_refilling_completion_locks_its_workers_before_their_tasks() {
        let db = testing::TestDb::postgres().await.expect("TEST_DATABASE_URL");
        let Store::Postgres(pg) = &db.store else { unreachable!("a Postgres test database") };
        let reg = testing::registration("refilled", 1);
        let (worker, session) = (reg.id.clone(), reg.session_id);
        db.store.register_worker(&reg).await.unwrap();
        let (first, next) = (testing::new_task("prove"), testing::new_task("prove"));
        let (first_id, next_id) = (first.id, next.id);
        db.store.create_tasks(&[first, next]).await.unwrap();
        let a = testing::claim_one(&db.store, &worker).await.remove(0);
        assert_eq!(a.task_id, first_id);
        let held = Held { task_id: a.task_id, worker_id: worker.clone(), attempt: a.attempt };

        // A requeue of the worker in flight: it holds the worker's row.
        let mut requeue = pg.pool().begin().await.unwrap();
        let requeue_pid = backend_pid(&mut requeue).await;
        sqlx::query("SELECT 1 FROM workers WHERE id = $1 FOR UPDATE")
            .bind(&worker.0)
            .execute(&mut *requeue)
            .await
            .unwrap();
        let batch = {
            let (store, worker) = (db.store.clone(), worker.clone());
            let completion = Completion { held: held.clone(), result: b"done".to_vec(), delivered: None };
            tokio::spawn(async move {
                let mut refill = testing::RefillOn::new(&worker, session);
                let done =
                    store.complete_and_claim(&[completion], Duration::from_secs(60), &mut refill).await;
                (done, refill.told)
            })
        };
        // The batch's backend, blocked by this requeue.
        blocked_by(pg, requeue_pid, "the batch never waited for the requeue").await;
        // The requeue takes the task back. Half the deadlock check's second: a batch holding the
        // task's row would make it wait past that.
        sqlx::query("SET LOCAL lock_timeout = '500ms'").execute(&mut *requeue).await.unwrap();
        sqlx::query("UPDATE tasks SET status = 'pending', worker_id = NULL, session_id = NULL WHERE id = $1")
            .bind(first_id.0)
            .execute(&mut *requeue)
            .await
            .expect("the requeue takes the task without waiting for the batch");
        requeue.commit().await.unwrap();

        let (done, told) = batch.await.unwrap();
        let (outcomes, assigned) = done.expect("the batch commits");
        assert!(
            matches!(outcomes[..], [crate::store::ReportOutcome::Stale { .. }]),
            "the report finds its task taken back: {outcomes:?}"
        );
        assert_eq!(told, vec![Vec::<Held>::new()], "nothing completed, nothing to refill");
        assert!(assigned.is_empty(), "{assigned:?}");
        let next = db.store.get_task(next_id).await.unwrap().unwrap();
        assert_eq!(next.state, TaskState::Pending);
        db.cleanup().await;
    }

    /// Statistics for this test's own tables. A bare `ANALYZE` would visit every schema of the
    /// database, and fails when a test running beside this one drops its schema meanwhile.
    async fn analyze_schema(pool: &sqlx::PgPool) {
        sqlx::query("ANALYZE tasks, jobs, job_tasks, task_parents, task_attempts, workers")
            .execute(pool)
            .await
            .unwrap();
    }

    /// The rows of `tasks` read so far by the transaction `tx` (its table statistics).
    async fn tasks_rows_read(tx: &mut sqlx::Transaction<'_, sqlx::Postgres>) -> i64 {
        sqlx::query_scalar(
            "SELECT COALESCE(seq_tup_read, 0) + COALESCE(idx_tup_fetch, 0) FROM pg_stat_xact_user_tables
             WHERE relid = 'tasks'::regclass",
        )
        .fetch_one(&mut **tx)
        .await
        .unwrap()
    }

    /// A fresh schema migrated up to `version` (for a test of the migrations after it), and a
    /// pool on it.
    async fn schema_migrated_to(version: i64) -> (testing::EmptySchema, PgPool) {
        let empty = testing::EmptySchema::new().await.expect("TEST_DATABASE_URL");
        let pool = PgPool::connect(&empty.url).await.unwrap();
        MIGRATOR.run_to(version, &pool).await.unwrap();
        (empty, pool)
    }

    /// Waits until every job is more than a millisecond old by the database's clock (the age a
    /// pruning test gives jobs).
    async fn jobs_older_than_a_millisecond(pool: &PgPool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !sqlx::query_scalar::<_, bool>(
            "SELECT COALESCE(bool_and(created_at < now() - interval '1 millisecond'), true) FROM jobs",
        )
        .fetch_one(pool)
        .await
        .unwrap()
        {
            assert!(std::time::Instant::now() < deadline, "jobs never aged");
            tokio::task::yield_now().await;
        }
    }

    /// Submits `n` pending tasks of type `prove`, in batches of at most 1,000.
    async fn prove_tasks(store: &Store, n: usize) {
        for start in (0..n).step_by(1000) {
            let batch: Vec<_> = (start..n.min(start + 1000)).map(|_| testing::new_task("prove")).collect();
            store.create_tasks(&batch).await.unwrap();
        }
    }

    /// `n` tasks already finished (completed now): a history beside the live tasks.
    async fn finished_history(store: &Store, pool: &sqlx::PgPool, n: usize) {
        prove_tasks(store, n).await;
        sqlx::query("UPDATE tasks SET status = 'completed', finished_at = now()")
            .execute(pool)
            .await
            .unwrap();
    }

    /// The sweeper's statements read only the tasks out on workers (`tasks_worker`), not the
    /// table with its finished history, on every `cleanup_interval`.
    #[tokio::test]
    #[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
    async fn the_sweeps_read_the_tasks_out_on_workers_only() {
        let db = testing::TestDb::postgres().await.expect("TEST_DATABASE_URL");
        let Store::Postgres(pg) = &db.store else { unreachable!("a Postgres test database") };
        finished_history(&db.store, pg.pool(), 20_000).await;
        sqlx::query("ANALYZE tasks").execute(pg.pool()).await.unwrap();
        let explain =
            |sql: &str| sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(format!("EXPLAIN {sql}")));
        let expired = explain(requeue::EXPIRED).bind(500i64).fetch_all(pg.pool()).await.unwrap();
        let overdue =
            explain(requeue::OVERDUE).bind(500i64).bind(30_000i64).fetch_all(pg.pool()).await.unwrap();
        for (name, plan) in [("expired", expired), ("overdue", overdue)] {
            let plan = plan.join("\n");
            assert!(plan.contains("tasks_worker"), "the {name} sweep reads every task:\n{plan}");
        }
        db.cleanup().await;
    }

    /// The gauges' count of live tasks, every few seconds on every replica, reads the partial
    /// indexes of the live states, not the finished history (a parallel scan of 2 million
    /// finished tasks took 276 ms, most of a core for a refresh every 5 s).
    #[tokio::test]
    #[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
    async fn the_live_counts_read_the_live_tasks_only() {
        let db = testing::TestDb::postgres().await.expect("TEST_DATABASE_URL");
        let Store::Postgres(pg) = &db.store else { unreachable!("a Postgres test database") };
        finished_history(&db.store, pg.pool(), 20_000).await;
        prove_tasks(&db.store, 10).await;
        sqlx::query("ANALYZE tasks").execute(pg.pool()).await.unwrap();
        let plan: Vec<String> =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("EXPLAIN {}", read::LIVE_TASK_COUNTS)))
                .fetch_all(pg.pool())
                .await
                .unwrap();
        let plan = plan.join("\n");
        assert!(!plan.contains("Seq Scan on tasks"), "the live counts read every task:\n{plan}");
        assert!(plan.contains("tasks_status") && plan.contains("tasks_worker"), "{plan}");
        let live = db.store.live_task_counts().await.unwrap();
        assert_eq!(live, std::collections::BTreeMap::from([(crate::domain::TaskState::Pending, 10)]));
        db.cleanup().await;
    }

    /// The hot path's batch statements find their tasks by key or row even on a table that was
    /// never analyzed (a new database under its first load, or autovacuum off), never through a
    /// partial index on the status: without statistics that index looks like a few rows, and it
    /// holds the whole backlog (measured: 44 ms per claim of 60 tasks with 20,000 pending).
    #[tokio::test]
    #[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
    async fn batch_statements_never_read_a_whole_state_before_any_analyze() {
        let db = testing::TestDb::postgres().await.expect("TEST_DATABASE_URL");
        let Store::Postgres(pg) = &db.store else { unreachable!("a Postgres test database") };
        prove_tasks(&db.store, 10_000).await;
        let rows: Vec<(Uuid, String)> =
            sqlx::query_as("SELECT id, ctid::text FROM tasks LIMIT 50").fetch_all(pg.pool()).await.unwrap();
        let plans = batch_plans(pg, rows).await;
        // Each of these indexes holds every task in some live state: a plan that reads one
        // reads the whole backlog to find a batch.
        for (name, plan) in &plans {
            for index in ["tasks_runnable", "tasks_runnable_by_type", "tasks_status", "tasks_worker"] {
                assert!(!plan.contains(&format!(" on {index} ")), "{name} reads {index}:\n{plan}");
            }
        }
        db.cleanup().await;
    }

    /// A queue that was quiet when it was last analyzed (every task finished) and then takes a
    /// burst: the statistics say almost no task is pending, so a scan of the table looks like a
    /// row or two. The claim's assignment must still find each candidate by its locked row, never
    /// join the batch against a scan of the backlog (measured: 0.3 to 1 s per claim of 200 to 300
    /// tasks with 20,000 pending, most of a benchmark's database time).
    #[tokio::test]
    #[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
    async fn the_claim_finds_its_rows_by_place_when_the_statistics_predate_a_burst() {
        let db = testing::TestDb::postgres().await.expect("TEST_DATABASE_URL");
        let Store::Postgres(pg) = &db.store else { unreachable!("a Postgres test database") };
        // The statistics stay those of the quiet moment for the whole test.
        sqlx::query("ALTER TABLE tasks SET (autovacuum_enabled = off)").execute(pg.pool()).await.unwrap();
        finished_history(&db.store, pg.pool(), 200).await;
        sqlx::query("ANALYZE tasks").execute(pg.pool()).await.unwrap();
        prove_tasks(&db.store, 10_000).await;
        let mut tx = pg.pool().begin_with(claim::CLAIM_BEGIN).await.unwrap();
        let prove = vec!["prove".to_owned()];
        for types in [TypeFilter::Any, TypeFilter::Only(prove.clone()), TypeFilter::AnyAnd(prove)] {
            let sql = format!("EXPLAIN {}", claim::candidates_query(&types));
            let query =
                sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(sql)).bind(300i64).bind(None::<&str>);
            let query = match &types {
                TypeFilter::Any => query,
                TypeFilter::Only(t) | TypeFilter::AnyAnd(t) => query.bind(t.clone()),
            };
            let plan = query.fetch_all(&mut *tx).await.unwrap().join("\n");
            assert!(!plan.contains("Seq Scan on tasks"), "candidates of {types:?} scan tasks:\n{plan}");
            assert!(!plan.contains("JIT:"), "candidates of {types:?} compile their plan:\n{plan}");
        }
        tx.rollback().await.unwrap();

        // A batch claimed and out on the workers: its assignment, running marks, renewals and
        // reports. (A plan comes from the statistics, not from the rows' current states.)
        let rows: Vec<(Uuid, String)> =
            sqlx::query_as("SELECT id, ctid::text FROM tasks WHERE status = 'pending' ORDER BY id LIMIT 300")
                .fetch_all(pg.pool())
                .await
                .unwrap();
        for (name, plan) in batch_plans(pg, rows).await {
            if name == "claim" {
                assert!(!plan.contains("Seq Scan on tasks"), "the claim scans tasks:\n{plan}");
            }
            // A hash join over one scan of a small table is the planner's fair choice; a scan
            // repeated for each row of the batch is not.
            assert!(!scans_tasks_per_row(&plan), "{name} scans tasks for each row:\n{plan}");
            assert!(!plan.contains("JIT:"), "{name} compiles its plan:\n{plan}");
        }
        db.cleanup().await;
    }

    /// The plans of the hot path's batch statements for the tasks `rows` (id, place), each run as
    /// the store runs it: each in a transaction with its planner settings.
    async fn batch_plans(pg: &PgStore, rows: Vec<(Uuid, String)>) -> Vec<(&'static str, String)> {
        let (ids, places): (Vec<Uuid>, Vec<String>) = rows.into_iter().unzip();
        let workers: Vec<String> = vec!["w1".into(); ids.len()];
        let attempts: Vec<i32> = vec![1; ids.len()];
        let sessions: Vec<Option<Uuid>> = vec![None; ids.len()];
        let results: Vec<Vec<u8>> = vec![Vec::new(); ids.len()];
        let ago: Vec<Option<i64>> = vec![None; ids.len()];
        let ago_us: Vec<i64> = vec![0; ids.len()];
        let explain =
            |sql: &str| sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(format!("EXPLAIN {sql}")));
        let mut tx = pg.pool().begin_with(claim::CLAIM_BEGIN).await.unwrap();
        let claim = explain(claim::CLAIM_ASSIGN)
            .bind(&ids)
            .bind(&workers)
            .bind(60_000i64)
            .bind(&sessions)
            .bind(&places)
            .fetch_all(&mut *tx)
            .await
            .unwrap();
        tx.rollback().await.unwrap();
        let mut tx = pg.pool().begin_with(BATCH_BEGIN).await.unwrap();
        let mark_running = explain(claim::MARK_RUNNING)
            .bind(&ids)
            .bind(&workers)
            .bind(&attempts)
            .bind(&ago_us)
            .fetch_all(&mut *tx)
            .await
            .unwrap();
        let renew = explain(claim::RENEW)
            .bind(&ids)
            .bind(&workers)
            .bind(&attempts)
            .bind(60_000i64)
            .fetch_all(&mut *tx)
            .await
            .unwrap();
        tx.rollback().await.unwrap();
        let mut tx = pg.pool().begin_with(BATCH_BEGIN).await.unwrap();
        let complete = explain(report::COMPLETE)
            .bind(&ids)
            .bind(&workers)
            .bind(&attempts)
            .bind(&results)
            .bind(&ago)
            .fetch_all(&mut *tx)
            .await
            .unwrap();
        tx.rollback().await.unwrap();
        [("claim", claim), ("mark_running", mark_running), ("renew", renew), ("complete", complete)]
            .into_iter()
            .map(|(name, plan)| (name, plan.join("\n")))
            .collect()
    }

    /// The server's notices (the migration check's "already exists, skipping" at every start)
    /// are not sent to the coordinator; warnings are.
    #[tokio::test]
    #[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
    async fn connections_take_warnings_but_not_notices() {
        let db = testing::TestDb::postgres().await.expect("TEST_DATABASE_URL");
        let Store::Postgres(pg) = &db.store else { unreachable!("a Postgres test database") };
        let level: String =
            sqlx::query_scalar("SHOW client_min_messages").fetch_one(pg.pool()).await.unwrap();
        assert_eq!(level, "warning");
        db.cleanup().await;
    }

    /// Listing by state, under the generic plan a pooled connection settles on after a few runs:
    /// pending and blocked tasks are read from tasks_status in id order, tasks out on workers
    /// from tasks_worker; never a walk of every task in id order past the finished ones.
    #[tokio::test]
    #[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
    async fn listing_by_state_reads_the_index_of_that_state_under_a_generic_plan() {
        let db = testing::TestDb::postgres().await.expect("TEST_DATABASE_URL");
        let Store::Postgres(pg) = &db.store else { unreachable!("a Postgres test database") };
        finished_history(&db.store, pg.pool(), 2000).await;
        prove_tasks(&db.store, 20).await;
        let worker = crate::domain::WorkerId("w1".into());
        db.store
            .claim(5, &TypeFilter::Any, Duration::from_secs(60), |c| {
                c.iter().map(|c| (c.id, worker.clone())).collect()
            })
            .await
            .unwrap();
        sqlx::query("ANALYZE tasks").execute(pg.pool()).await.unwrap();
        let mut conn = pg.pool().acquire().await.unwrap();
        sqlx::raw_sql("SET plan_cache_mode = force_generic_plan").execute(&mut *conn).await.unwrap();
        for (state, index) in [
            (TaskState::Pending, "tasks_status"),
            (TaskState::Blocked, "tasks_status"),
            (TaskState::Assigned, "tasks_worker"),
            (TaskState::Running, "tasks_worker"),
        ] {
            let prepare = format!(
                "PREPARE listing (text, uuid, text, uuid, bigint) AS {}",
                read::list_tasks_query(Some(state), false)
            );
            sqlx::raw_sql(sqlx::AssertSqlSafe(prepare)).execute(&mut *conn).await.unwrap();
            let plan: Vec<String> =
                sqlx::query_scalar("EXPLAIN EXECUTE listing (NULL, NULL, NULL, NULL, 50)")
                    .fetch_all(&mut *conn)
                    .await
                    .unwrap();
            let plan = plan.join("\n");
            sqlx::raw_sql("DEALLOCATE listing").execute(&mut *conn).await.unwrap();
            let read_from =
                plan.contains(&format!("using {index} ")) || plan.contains(&format!(" on {index} "));
            assert!(read_from, "{state:?} is not read from {index}:\n{plan}");
            assert!(!plan.contains("Seq Scan on tasks"), "{state:?}:\n{plan}");
            assert!(!plan.contains("using tasks_pkey"), "{state:?} walks the tasks in id order:\n{plan}");
        }
        sqlx::raw_sql("RESET plan_cache_mode").execute(&mut *conn).await.unwrap();
        drop(conn);
        db.cleanup().await;
    }

    /// Every status change writes a new version of the task's row into each index whose
    /// predicate it meets (the status is in the predicates, so the update cannot be HOT): on the
    /// happy path each version is in the indexes a lookup of that state needs, and no other.
    #[tokio::test]
    #[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
    async fn each_version_of_a_task_is_in_the_indexes_its_state_is_looked_up_by() {
        let db = testing::TestDb::postgres().await.expect("TEST_DATABASE_URL");
        let Store::Postgres(pg) = &db.store else { unreachable!("a Postgres test database") };
        let indexes: Vec<(String, Option<String>)> = sqlx::query_as(
            "SELECT c.relname::text, pg_get_expr(i.indpred, i.indrelid) FROM pg_index i
             JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = 'tasks'::regclass",
        )
        .fetch_all(pg.pool())
        .await
        .unwrap();
        // A task of a job: its versions are in no index of jobs (a job lists its members).
        let (_, created) = db.store.create_job("j", vec![testing::new_task("prove")]).await.unwrap();
        let id = created[0].task.id;
        let holding = |id: crate::domain::TaskId| {
            let indexes = indexes.clone();
            async move {
                let mut names = Vec::new();
                for (name, predicate) in indexes {
                    let sql = format!(
                        "SELECT count(*) FROM tasks WHERE id = $1 AND ({})",
                        predicate.as_deref().unwrap_or("true")
                    );
                    let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                        .bind(id.0)
                        .fetch_one(pg.pool())
                        .await
                        .unwrap();
                    if n == 1 {
                        names.push(name);
                    }
                }
                names.sort();
                names
            }
        };
        assert_eq!(
            holding(id).await,
            ["tasks_pkey", "tasks_runnable", "tasks_runnable_by_type", "tasks_status"],
            "pending"
        );
        let worker = crate::domain::WorkerId("w1".into());
        let held = testing::claim_one(&db.store, &worker).await;
        assert_eq!(held.len(), 1);
        assert_eq!(holding(id).await, ["tasks_pkey", "tasks_worker"], "assigned");
        let held = Held { task_id: id, worker_id: worker, attempt: 1 };
        db.store
            .complete(&[crate::store::Completion { held, result: Vec::new(), delivered: None }])
            .await
            .unwrap();
        assert_eq!(holding(id).await, ["tasks_completed_by", "tasks_finished", "tasks_pkey"], "completed");
        db.cleanup().await;
    }

    /// An update whose new version stays on its row's page logs only the bytes from the first
    /// to the last that differ from the version before. A claim and a completion each change
    /// adjacent columns of the task's row: no column either leaves as it was (and that takes
    /// bytes: a null takes none) lies between two it changes, so neither logs it again.
    #[tokio::test]
    #[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
    async fn a_claim_and_a_completion_each_change_adjacent_columns_of_the_task_row() {
        let db = testing::TestDb::postgres().await.expect("TEST_DATABASE_URL");
        let Store::Postgres(pg) = &db.store else { unreachable!("a Postgres test database") };
        let columns: Vec<String> = sqlx::query_scalar(
            "SELECT attname::text FROM pg_attribute
             WHERE attrelid = 'tasks'::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        )
        .fetch_all(pg.pool())
        .await
        .unwrap();
        let registration = testing::registration("w1", 1);
        db.store.register_worker(&registration).await.unwrap();
        // A task with what a submission may give it, so that its unchanged columns take bytes.
        let mut task = testing::new_task("prove");
        task.payload = vec![7; 300];
        task.priority = 3;
        task.idempotency_key = Some("key-1".into());
        task.traceparent = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
        let (_, created) = db.store.create_job("j", vec![task]).await.unwrap();
        let id = created[0].task.id;
        let row = || async move {
            let text: String = sqlx::query_scalar("SELECT to_jsonb(t)::text FROM tasks t WHERE t.id = $1")
                .bind(id.0)
                .fetch_one(pg.pool())
                .await
                .unwrap();
            serde_json::from_str::<serde_json::Value>(&text).unwrap()
        };
        let pending = row().await;
        let worker = registration.id.clone();
        let session = registration.session_id;
        let held = db
            .store
            .claim_fenced(1, &ClaimFilter::types(TypeFilter::Any), Duration::from_secs(60), |c, _| {
                crate::store::Placement {
                    placed: vec![(c[0].id, worker.clone())],
                    sessions: std::collections::HashMap::from([(worker.clone(), session)]),
                }
            })
            .await
            .unwrap();
        assert_eq!(held.len(), 1);
        let assigned = row().await;
        let held = Held { task_id: id, worker_id: worker.clone(), attempt: 1 };
        let delivered = Some(std::time::Instant::now());
        db.store
            .complete(&[crate::store::Completion { held, result: b"proof".to_vec(), delivered }])
            .await
            .unwrap();
        let completed = row().await;
        for (step, before, after) in [("claim", &pending, &assigned), ("completion", &assigned, &completed)] {
            let changed: Vec<&str> = columns
                .iter()
                .filter(|c| before[c.as_str()] != after[c.as_str()])
                .map(String::as_str)
                .collect();
            let first = columns.iter().position(|c| c == changed[0]).unwrap();
            let last = columns.iter().position(|c| c == changed[changed.len() - 1]).unwrap();
            let logged_unchanged: Vec<&str> = columns[first..=last]
                .iter()
                .filter(|c| before[c.as_str()] == after[c.as_str()] && !after[c.as_str()].is_null())
                .map(String::as_str)
                .collect();
            assert!(
                logged_unchanged.is_empty(),
                "a {step} changes {changed:?}, with {logged_unchanged:?} between them"
            );
        }
        assert_eq!(completed["status"], "completed");
        db.cleanup().await;
    }

    /// Migration 0016 writes `tasks` again with its columns in another order: every row keeps
    /// every value, and the table keeps its columns' types, defaults and nullability, its
    /// indexes, constraints, storage settings and the view over it, as they were.
    #[tokio::test]
    #[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
    async fn the_task_table_written_again_in_its_new_order_keeps_every_row_and_index() {
        let (empty, pool) = schema_migrated_to(15).await;
        let job = Uuid::now_v7();
        sqlx::query("INSERT INTO jobs (id, name, total, members) VALUES ($1, 'j', 2, ARRAY[$2, $3]::uuid[])")
            .bind(job)
            .bind(Uuid::from_u128(1))
            .bind(Uuid::from_u128(2))
            .execute(&pool)
            .await
            .unwrap();
        // One task in each shape a row takes: pending in a job, out on a worker, completed,
        // failed with a retry counted, blocked on a parent with placement needs.
        sqlx::query(
            "INSERT INTO tasks (id, task_type, payload, priority, max_attempts, timeout_ms, job_id,
                                job_position, idempotency_key, traceparent, status, attempt, failures,
                                worker_id, session_id, lease_expires_at, assigned_at, started_at,
                                finished_at, result, error, run_after, parents, blocked_on,
                                dependents, on_parent_failure, requires, weight, affinity_key)
             VALUES
             ($1, 'prove', '\\x0102', 5, 3, 60000, $6, 0, 'k1', '00-ab-cd-01', 'pending', 0, 0,
              NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, now() + interval '1 hour', NULL, NULL,
              1, NULL, NULL, NULL, NULL),
             ($2, 'prove', '\\x03', 0, 3, 1000, $6, 1, NULL, NULL, 'running', 2, 1, 'w1', $7,
              now() + interval '1 minute', now(), now(), NULL, NULL, 'lost its lease', now(), NULL,
              NULL, NULL, NULL, NULL, NULL, NULL),
             ($3, 'agg', '', 0, 1, 1000, NULL, NULL, NULL, NULL, 'completed', 1, 0, 'w1', $7, NULL,
              now(), now(), now(), '\\xff', NULL, now(), NULL, NULL, NULL, NULL, NULL, NULL, NULL),
             ($4, 'agg', '', 0, 2, 1000, NULL, NULL, 'k2', NULL, 'failed', 2, 2, 'w2', NULL, NULL,
              now(), now(), now(), NULL, 'out of memory', now(), NULL, NULL, NULL, NULL, NULL, NULL, NULL),
             ($5, 'gpu', '', 0, 3, 1000, NULL, NULL, NULL, NULL, 'blocked', 0, 0, NULL, NULL, NULL,
              NULL, NULL, NULL, NULL, NULL, now(), 1, 1, NULL, 'cancel', '{\"eq\":[\"gpu\"]}', 2, 'key')",
        )
        .bind(Uuid::from_u128(1))
        .bind(Uuid::from_u128(2))
        .bind(Uuid::from_u128(3))
        .bind(Uuid::from_u128(4))
        .bind(Uuid::from_u128(5))
        .bind(job)
        .bind(Uuid::now_v7())
        .execute(&pool)
        .await
        .unwrap();
        let rows = || {
            let pool = pool.clone();
            async move {
                let text: String =
                    sqlx::query_scalar("SELECT jsonb_agg(to_jsonb(t) ORDER BY t.id)::text FROM tasks t")
                        .fetch_one(&pool)
                        .await
                        .unwrap();
                serde_json::from_str::<serde_json::Value>(&text).unwrap()
            }
        };
        let definitions = || {
            let pool = pool.clone();
            async move {
                sqlx::query_scalar::<_, String>(
                    "SELECT indexname || ': ' || indexdef FROM pg_indexes
                     WHERE schemaname = current_schema() AND tablename = 'tasks'
                     UNION ALL
                     SELECT conname || ': ' || pg_get_constraintdef(oid) FROM pg_constraint
                     WHERE conrelid = 'tasks'::regclass
                     UNION ALL
                     SELECT 'options: ' || array_to_string(reloptions, ',') FROM pg_class
                     WHERE oid = 'tasks'::regclass
                     UNION ALL
                     SELECT 'column ' || a.attname || ': ' || format_type(a.atttypid, a.atttypmod)
                            || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
                            || COALESCE(' default ' || pg_get_expr(d.adbin, d.adrelid), '')
                            || ' statistics ' || a.attstattarget
                     FROM pg_attribute a
                     LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
                     WHERE a.attrelid = 'tasks'::regclass AND a.attnum > 0 AND NOT a.attisdropped
                     UNION ALL
                     SELECT 'job_members: ' || pg_get_viewdef('job_members'::regclass)
                     ORDER BY 1",
                )
                .fetch_all(&pool)
                .await
                .unwrap()
            }
        };
        let (rows_before, definitions_before) = (rows().await, definitions().await);
        assert_eq!(rows_before.as_array().map(Vec::len), Some(5));
        MIGRATOR.run(&pool).await.unwrap();
        assert_eq!(rows().await, rows_before);
        assert_eq!(definitions().await, definitions_before);
        pool.close().await;
        testing::TestDb::postgres_in(empty).await.cleanup().await;
    }

    /// A job's counts, its tasks, a page of jobs and a listing by job read each member task once
    /// (its id comes from the job's list of members), not every older task on the way to them. Counted
    /// from the table's statistics of the reading transaction, with 25 older jobs of 200 tasks
    /// beside this one.
    #[tokio::test]
    #[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
    async fn job_reads_read_each_member_task_once() {
        let db = testing::TestDb::postgres().await.expect("TEST_DATABASE_URL");
        let Store::Postgres(pg) = &db.store else { unreachable!("a Postgres test database") };
        for _ in 0..25 {
            let older: Vec<_> = (0..200).map(|_| testing::new_task("prove")).collect();
            db.store.create_job("older", older).await.unwrap();
        }
        let tasks: Vec<_> = (0..200).map(|_| testing::new_task("prove")).collect();
        let (job, _) = db.store.create_job("j", tasks).await.unwrap();
        analyze_schema(pg.pool()).await;
        let list = read::list_tasks_query(None, true);
        // Each reads the members' ids from the job's row, then each member's row once.
        for (name, sql, rows) in [
            ("counts", jobs::JOB_COUNTS, 200),
            ("tasks", jobs::JOB_TASKS, 200),
            ("page", jobs::LIST_JOBS, 200),
            ("listing", list.as_str(), 200),
        ] {
            let mut tx = pg.pool().begin().await.unwrap();
            let before: i64 = tasks_rows_read(&mut tx).await;
            let query = sqlx::query(sqlx::AssertSqlSafe(sql));
            let query = match name {
                // A page of one job: the newest, this one.
                "page" => query.bind(None::<Uuid>).bind(1i64),
                "listing" => {
                    query.bind(None::<&str>).bind(job.id.0).bind(None::<&str>).bind(None::<Uuid>).bind(100i64)
                }
                _ => query.bind(job.id.0),
            };
            query.fetch_all(&mut *tx).await.unwrap();
            let after: i64 = tasks_rows_read(&mut tx).await;
            tx.rollback().await.unwrap();
            assert_eq!(after - before, rows, "{name}: task rows read for 200 members");
        }
        db.cleanup().await;
    }

    /// Jobs stored before a job listed its members in its own row (migration 0015) get that list
    /// from their tasks' rows and `job_tasks`, in submission order, and a job with no task left
    /// an empty one; a job written without a list afterwards (as a replica of the earlier version
    /// writes it while replicas are being upgraded) is still read whole.
    #[tokio::test]
    #[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
    async fn jobs_stored_before_their_members_were_listed_read_as_before() {
        let (empty, pool) = schema_migrated_to(14).await;
        let (a, pruned, later) = (JobId::new(), JobId::new(), JobId::new());
        let [a0, shared, a2, l0, l1] = [(); 5].map(|_| Uuid::now_v7());
        let task =
            "INSERT INTO tasks (id, task_type, payload, max_attempts, timeout_ms, job_id, job_position,
                                       idempotency_key)
                    VALUES ($1, 'prove', '', 3, 60000, $2, $3, $4)";
        let job = "INSERT INTO jobs (id, name, total) VALUES ($1, 'old', $2)";
        // Job a: its first and third tasks created by it, the second returned by a key.
        sqlx::query(task)
            .bind(shared)
            .bind(None::<Uuid>)
            .bind(None::<i32>)
            .bind("k")
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query(job).bind(a.0).bind(3).execute(&pool).await.unwrap();
        let member = |id: Uuid, job: JobId, position: i32| {
            let pool = pool.clone();
            async move {
                let q = sqlx::query(task).bind(id).bind(job.0).bind(position).bind(None::<&str>);
                q.execute(&pool).await.unwrap();
            }
        };
        member(a0, a, 0).await;
        member(a2, a, 2).await;
        sqlx::query("INSERT INTO job_tasks (job_id, position, task_id) VALUES ($1, 1, $2)")
            .bind(a.0)
            .bind(shared)
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query(job).bind(pruned.0).bind(2).execute(&pool).await.unwrap();
        MIGRATOR.run(&pool).await.unwrap();
        let lists: Vec<(Uuid, Vec<Uuid>)> =
            sqlx::query_as("SELECT id, members FROM jobs ORDER BY id").fetch_all(&pool).await.unwrap();
        assert_eq!(lists, [(a.0, vec![a0, shared, a2]), (pruned.0, vec![])]);
        sqlx::query(job).bind(later.0).bind(2).execute(&pool).await.unwrap();
        member(l1, later, 1).await;
        member(l0, later, 0).await;
        pool.close().await;

        let db = testing::TestDb::postgres_in(empty).await;
        let ids = |tasks: Vec<crate::domain::Task>| tasks.into_iter().map(|t| t.id.0).collect::<Vec<_>>();
        assert_eq!(ids(db.store.job_tasks(a).await.unwrap()), [a0, shared, a2]);
        assert_eq!(ids(db.store.job_tasks(later).await.unwrap()), [l0, l1]);
        assert!(db.store.job_tasks(pruned).await.unwrap().is_empty());
        let pending = |job: crate::domain::Job| job.counts.get(&TaskState::Pending).copied().unwrap_or(0);
        assert_eq!(pending(db.store.get_job(a).await.unwrap().unwrap()), 3);
        assert_eq!(pending(db.store.get_job(later).await.unwrap().unwrap()), 2);
        let page = db.store.list_jobs(None, 10).await.unwrap();
        let counted: Vec<(JobId, u32)> = page.into_iter().map(|j| (j.id, pending(j))).collect();
        let mut expected = vec![(a, 3), (pruned, 0), (later, 2)];
        expected.sort_by_key(|j| std::cmp::Reverse(j.0.0));
        assert_eq!(counted, expected);
        let mut members: Vec<Uuid> =
            db.store.job_task_ids(later).await.unwrap().into_iter().map(|t| t.0).collect();
        members.sort();
        let mut expected = vec![l0, l1];
        expected.sort();
        assert_eq!(members, expected);

        // A job is pruned once none of its members is left, whether it lists them or not.
        let short = Some(Duration::from_millis(1));
        let rules =
            crate::store::Retention { completed: short, failed: short, cancelled: short, workers: None };
        let Store::Postgres(pg) = &db.store else { unreachable!("a Postgres test database") };
        jobs_older_than_a_millisecond(pg.pool()).await;
        let pruned_jobs = || {
            let store = db.store.clone();
            async move { store.prune(&rules, 1000).await.unwrap().expect("no other pruner").jobs }
        };
        assert_eq!(pruned_jobs().await, 1, "only the job with no task left");
        sqlx::query("DELETE FROM tasks").execute(pg.pool()).await.unwrap();
        assert_eq!(pruned_jobs().await, 2, "the job with a list and the one without");
        assert!(db.store.list_jobs(None, 10).await.unwrap().is_empty());
        db.cleanup().await;
    }

    /// The pruner's search for emptied jobs checks each old job through its list of members, a
    /// key lookup until one is found: it never reads every task (as a join of every job's
    /// members against a scan of `tasks` did, 0.3 s per pass with 300,000 tasks in jobs).
    #[tokio::test]
    #[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
    async fn pruning_jobs_looks_up_members_of_old_jobs_and_reads_no_whole_table() {
        let db = testing::TestDb::postgres().await.expect("TEST_DATABASE_URL");
        let Store::Postgres(pg) = &db.store else { unreachable!("a Postgres test database") };
        for _ in 0..20 {
            db.store.create_job("j", (0..100).map(|_| testing::new_task("prove")).collect()).await.unwrap();
        }
        let (empty, _) = db.store.create_job("empty", Vec::new()).await.unwrap();
        analyze_schema(pg.pool()).await;
        jobs_older_than_a_millisecond(pg.pool()).await;
        let mut tx = pg.pool().begin().await.unwrap();
        let explain = format!("EXPLAIN (ANALYZE, COSTS OFF) {}", prune::PRUNE_JOBS);
        let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(explain))
            .bind(1i64)
            .bind(1000i64)
            .fetch_all(&mut *tx)
            .await
            .unwrap();
        let left: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM jobs").fetch_all(&mut *tx).await.unwrap();
        tx.rollback().await.unwrap();
        let plan = plan.join("\n");
        assert_eq!(left.len(), 20, "the emptied job went, the others stay:\n{plan}");
        assert!(!left.contains(&empty.id.0));
        for line in plan.lines().filter(|l| l.contains("Seq Scan on tasks")) {
            assert!(line.contains("never executed"), "the pruner scans tasks:\n{plan}");
        }
        assert!(!plan.contains("Hash Anti Join"), "{plan}");
        db.cleanup().await;
    }

    /// Retrying a job's failed tasks reads the job's members, not every task (in id order, or
    /// every failed one) on the way to them. Counted from the table's statistics of the retrying
    /// transaction, with 30 older jobs of 100 failed tasks beside this one.
    #[tokio::test]
    #[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
    async fn retrying_by_job_reads_the_jobs_members_only() {
        let db = testing::TestDb::postgres().await.expect("TEST_DATABASE_URL");
        let Store::Postgres(pg) = &db.store else { unreachable!("a Postgres test database") };
        for _ in 0..30 {
            db.store
                .create_job("older", (0..100).map(|_| testing::new_task("prove")).collect())
                .await
                .unwrap();
        }
        let (job, _) =
            db.store.create_job("j", (0..100).map(|_| testing::new_task("prove")).collect()).await.unwrap();
        sqlx::query("UPDATE tasks SET status = 'failed', error = 'boom', finished_at = now()")
            .execute(pg.pool())
            .await
            .unwrap();
        analyze_schema(pg.pool()).await;
        let mut tx = pg.pool().begin().await.unwrap();
        let before: i64 = tasks_rows_read(&mut tx).await;
        let retried: Vec<(Uuid,)> = sqlx::query_as(sqlx::AssertSqlSafe(retry::retry_batch_query(true)))
            .bind(false)
            .bind(job.id.0)
            .bind(None::<&str>)
            .bind(None::<&str>)
            .bind(None::<chrono::DateTime<chrono::Utc>>)
            .bind(None::<chrono::DateTime<chrono::Utc>>)
            .bind(None::<Uuid>)
            .bind(50i64)
            .fetch_all(&mut *tx)
            .await
            .unwrap();
        let after: i64 = tasks_rows_read(&mut tx).await;
        tx.rollback().await.unwrap();
        assert_eq!(retried.len(), 50);
        // The members' rows (100), then the 50 retried once more by the update.
        assert!(after - before <= 160, "{} task rows read to retry 50 of a job of 100", after - before);
        db.cleanup().await;
    }

    /// The batch statements plan once per connection (`force_generic_plan`) and keep that plan.
    /// One made while `tasks` held no row or three (analyzed: a new table, or one pruned empty),
    /// then run with 10,000 pending (no analyze in between, as on a connection that outlives a
    /// burst), still finds each row of its batch by key or by place: every scan of `tasks` is
    /// a lookup, never a walk of the table or of a whole index of it. The statements are those
    /// of the claim, the running mark, the renewal, the completion and what runs in its
    /// transaction (the classification of reports it did not apply, the release of dependents),
    /// and a submission's links to its parents.
    #[tokio::test]
    #[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
    async fn a_batch_statements_plan_made_on_a_small_table_finds_its_rows_by_key_once_it_has_grown() {
        for start in [0, 3] {
            let db = testing::TestDb::postgres().await.expect("TEST_DATABASE_URL");
            let Store::Postgres(pg) = &db.store else { unreachable!("a Postgres test database") };
            sqlx::query("ALTER TABLE tasks SET (autovacuum_enabled = off)").execute(pg.pool()).await.unwrap();
            prove_tasks(&db.store, start).await;
            sqlx::query("ANALYZE tasks").execute(pg.pool()).await.unwrap();
            let statements = [
                ("claim", claim::CLAIM_BEGIN, claim::CLAIM_ASSIGN, "('{}', '{}', 60000, '{}', '{}')"),
                ("mark_running", BATCH_BEGIN, claim::MARK_RUNNING, "('{}', '{}', '{}', '{}')"),
                ("renew", BATCH_BEGIN, claim::RENEW, "('{}', '{}', '{}', 60000)"),
                ("complete", BATCH_BEGIN, report::COMPLETE, "('{}', '{}', '{}', '{}', '{}')"),
                (
                    "complete_locking",
                    claim::CLAIM_BEGIN,
                    report::COMPLETE_LOCKING,
                    "('{}', '{}', '{}', '{}', '{}', '{}')",
                ),
                ("outcomes", BATCH_BEGIN, report::OUTCOMES, "('{}', '{}', '{}')"),
                ("release_lock", BATCH_BEGIN, dependents::RELEASE_LOCK, "('{}')"),
                ("release", BATCH_BEGIN, dependents::RELEASE, "('{}')"),
                ("lock_by_id", BATCH_BEGIN, dependents::LOCK_BY_ID, "('{}')"),
                ("link_parents", BATCH_BEGIN, dependents::LINK_PARENTS, "('{}')"),
                ("settle_children", BATCH_BEGIN, dependents::SETTLE_CHILDREN, "('{}', '{}', '{}')"),
                ("end_level", BATCH_BEGIN, dependents::END_LEVEL, "('{}', '{}')"),
            ];
            let mut conn = pg.pool().acquire().await.unwrap();
            for (name, begin, sql, args) in statements {
                let run = format!("{begin}; PREPARE {name} AS {sql}; EXECUTE {name} {args}; COMMIT");
                sqlx::raw_sql(sqlx::AssertSqlSafe(run)).execute(&mut *conn).await.unwrap();
            }
            prove_tasks(&db.store, 10_000).await;
            for (name, begin, _, args) in statements {
                sqlx::raw_sql(sqlx::AssertSqlSafe(begin)).execute(&mut *conn).await.unwrap();
                let explain = format!("EXPLAIN EXECUTE {name} {args}");
                let plan: Vec<String> =
                    sqlx::query_scalar(sqlx::AssertSqlSafe(explain)).fetch_all(&mut *conn).await.unwrap();
                sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await.unwrap();
                let plan = plan.join("\n");
                for whole in ["Seq Scan", "Hash Join", "Merge Join"] {
                    assert!(
                        !plan.contains(whole),
                        "{name} (made at {start} rows) keeps a plan with a {whole}:\n{plan}"
                    );
                }
                let lines: Vec<&str> = plan.lines().collect();
                let scans: Vec<usize> = (0..lines.len())
                    .filter(|&i| lines[i].contains("Scan") && lines[i].contains(" on tasks "))
                    .collect();
                assert!(!scans.is_empty(), "{name} reads no task:\n{plan}");
                for i in scans {
                    let next = lines.get(i + 1).copied().unwrap_or("");
                    let lookup = (lines[i].contains("Index Scan using tasks_pkey on tasks")
                        && next.contains("Index Cond: (id = "))
                        || (lines[i].contains("Tid Scan on tasks") && next.contains("TID Cond: "))
                        || (lines[i].contains("Bitmap Heap Scan on tasks")
                            && next.contains("Recheck Cond: (id = "));
                    assert!(
                        lookup,
                        "{name} (made at {start} rows) reads tasks other than by key or place:\n{plan}"
                    );
                }
            }
            drop(conn);
            db.cleanup().await;
        }
    }

    /// A completion that finds its task's row being updated by another transaction waits for it,
    /// then decides on the version that transaction wrote: it applies after a running mark of
    /// its attempt, and not after the task went to another attempt (a requeue and a new claim).
    #[tokio::test]
    #[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
    async fn a_completion_that_waits_on_another_update_of_its_task_decides_on_the_newer_version() {
        let db = testing::TestDb::postgres().await.expect("TEST_DATABASE_URL");
        let Store::Postgres(pg) = &db.store else { unreachable!("a Postgres test database") };
        let cases = [
            (
                "UPDATE tasks SET status = 'running', started_at = now(), updated_at = now() WHERE id = $1",
                true,
            ),
            ("UPDATE tasks SET attempt = 2, worker_id = 'w2', updated_at = now() WHERE id = $1", false),
        ];
        for (update, applies) in cases {
            let created = db.store.create_tasks(&[testing::new_task("prove")]).await.unwrap();
            let id = created[0].task.id;
            let worker = crate::domain::WorkerId("w1".into());
            let claimed = testing::claim_one(&db.store, &worker).await;
            assert_eq!(claimed.len(), 1);
            // The other update, not yet committed: the row's newer version is elsewhere.
            let mut other = pg.pool().begin().await.unwrap();
            let other_pid = backend_pid(&mut other).await;
            sqlx::query(update).bind(id.0).execute(&mut *other).await.unwrap();
            let store = db.store.clone();
            let held = Held { task_id: id, worker_id: worker, attempt: 1 };
            let completion = tokio::spawn(async move {
                let report = crate::store::Completion { held, result: b"proof".to_vec(), delivered: None };
                store.complete(&[report]).await
            });
            blocked_by(pg, other_pid, &format!("the completion never waited ({update})")).await;
            other.commit().await.unwrap();
            let outcomes = completion.await.unwrap().unwrap();
            let applied = outcomes == [crate::store::ReportOutcome::Applied { state: TaskState::Completed }];
            assert_eq!(applied, applies, "after {update}: {outcomes:?}");
            let status: String = sqlx::query_scalar("SELECT status FROM tasks WHERE id = $1")
                .bind(id.0)
                .fetch_one(pg.pool())
                .await
                .unwrap();
            assert_eq!(status == "completed", applies, "after {update}: {status}");
        }
        db.cleanup().await;
    }

    /// Whether a plan (EXPLAIN's text) scans `tasks` sequentially below a nested loop, that is
    /// once for each row of the loop's other side.
    fn scans_tasks_per_row(plan: &str) -> bool {
        let lines: Vec<&str> = plan.lines().collect();
        let depth = |l: &str| l.len() - l.trim_start().len();
        lines.iter().enumerate().filter(|(_, l)| l.contains("Seq Scan on tasks")).any(|(i, l)| {
            let mut d = depth(l);
            lines[..i].iter().rev().any(|above| {
                if depth(above) < d {
                    d = depth(above);
                    above.contains("Nested Loop")
                } else {
                    false
                }
            })
        })
    }

    #[test]
    fn a_scan_below_a_nested_loop_is_one_per_row() {
        let per_row = "Update on tasks t\n  ->  Nested Loop\n        ->  Seq Scan on tasks t\n        ->  CTE Scan on a";
        assert!(scans_tasks_per_row(per_row));
        let once = "Update on tasks t\n  ->  Hash Join\n        ->  Function Scan on h\n        ->  Hash\n              ->  Seq Scan on tasks t";
        assert!(!scans_tasks_per_row(once));
        let beside =
            "Nested Loop\n  ->  Index Scan using tasks_pkey on tasks t\nHash Join\n  ->  Seq Scan on tasks t";
        assert!(!scans_tasks_per_row(beside));
    }
}
