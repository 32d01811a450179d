//! What a Postgres database did, sampled from its statistics views: the benchmark reads it before
//! and after a run to report writes, commits, WAL and statements per task.
//!
//! Postgres publishes a backend's counters when it goes idle (at most every second, and within
//! [`STATS_SETTLE`] of going idle, unless busy or kept from it), so a sample taken right after a
//! run misses its last moments: [`DbStats::settle`] waits for them before the closing sample.

use std::time::{Duration, Instant};

use sqlx::{Connection, Row, postgres::PgConnection};

use super::{Result, StoreError};
use crate::config::redact_url;

/// How long after a run its counters are all published (Postgres 15 flushes an idle backend's
/// statistics within 10 s).
pub const STATS_SETTLE: Duration = Duration::from_secs(11);

/// The longest [`DbStats::settle`] waits in all for rows still unpublished after
/// [`STATS_SETTLE`]: a backend busy past it, or whose flush found a counter locked by another
/// (it tries again 10 s later), publishes late.
pub const STATS_SETTLE_MAX: Duration = Duration::from_secs(40);

/// Cumulative counters of one database; subtract two samples for what happened between them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DbCounters {
    /// Committed transactions of this database (`pg_stat_database`).
    pub commits: i64,
    /// Rows inserted, updated (of which HOT: no index entry written) and deleted in this
    /// schema's tables (`pg_stat_user_tables`).
    pub rows_inserted: i64,
    pub rows_updated: i64,
    pub rows_hot_updated: i64,
    pub rows_deleted: i64,
    /// Of those, the rows written in `workers` (registrations, state changes, heartbeat times).
    pub worker_rows: i64,
    /// WAL written by the whole cluster (`pg_stat_wal`), so other databases' work counts too.
    pub wal_bytes: i64,
    /// Statements run in this database, when `pg_stat_statements` is loaded and created.
    pub statements: Option<i64>,
}

impl DbCounters {
    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &DbCounters) -> DbCounters {
        DbCounters {
            commits: self.commits - earlier.commits,
            rows_inserted: self.rows_inserted - earlier.rows_inserted,
            rows_updated: self.rows_updated - earlier.rows_updated,
            rows_hot_updated: self.rows_hot_updated - earlier.rows_hot_updated,
            rows_deleted: self.rows_deleted - earlier.rows_deleted,
            worker_rows: self.worker_rows - earlier.worker_rows,
            wal_bytes: self.wal_bytes - earlier.wal_bytes,
            statements: self.statements.zip(earlier.statements).map(|(a, b)| a - b),
        }
    }

    /// Rows inserted, updated and deleted.
    pub fn rows_written(&self) -> i64 {
        self.rows_inserted + self.rows_updated + self.rows_deleted
    }
}

/// A connection that samples a Postgres database's statistics.
#[derive(Debug)]
pub struct DbStats {
    conn: PgConnection,
    statements: bool,
}

impl DbStats {
    /// Connects to `url`; `None` for a database that is not Postgres.
    pub async fn connect(url: &str) -> Result<Option<DbStats>> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Ok(None);
        }
        let mut conn = PgConnection::connect(url)
            .await
            .map_err(|source| StoreError::Connect { url: redact_url(url), source })?;
        let statements: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_stat_statements')
                    AND current_setting('shared_preload_libraries') LIKE '%pg_stat_statements%'",
        )
        .fetch_one(&mut conn)
        .await?;
        Ok(Some(DbStats { conn, statements }))
    }

    /// Whether statements are counted (`pg_stat_statements` is loaded and created here).
    pub fn counts_statements(&self) -> bool {
        self.statements
    }

    /// Waits until what was written before is published: [`STATS_SETTLE`], then until every
    /// row now in `tasks` and `jobs` is counted as inserted (inserted less deleted at least the
    /// rows there), [`STATS_SETTLE_MAX`] at most in all. `false`: some were still not counted
    /// then, and a sample may count them later, as written after it. (Updates cannot be checked
    /// this way; they are published with the inserts of the same backend, or on their own.)
    pub async fn settle(&mut self) -> Result<bool> {
        let deadline = Instant::now() + STATS_SETTLE_MAX;
        tokio::time::sleep(STATS_SETTLE).await;
        loop {
            if self.inserts_published().await? {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Whether every row in `tasks` and `jobs` is counted as inserted.
    pub async fn inserts_published(&mut self) -> Result<bool> {
        Ok(sqlx::query_scalar(
            "SELECT COALESCE(bool_and(s.n_tup_ins - s.n_tup_del >= c.n), true)
             FROM (SELECT 'tasks' AS rel, count(*) AS n FROM tasks
                   UNION ALL SELECT 'jobs', count(*) FROM jobs) AS c
             JOIN pg_stat_user_tables s ON s.relname = c.rel AND s.schemaname = current_schema()",
        )
        .fetch_one(&mut self.conn)
        .await?)
    }

    /// The counters now.
    pub async fn sample(&mut self) -> Result<DbCounters> {
        let r = sqlx::query(
            "SELECT d.xact_commit AS commits,
                    t.ins, t.upd, t.hot, t.del, t.workers,
                    (SELECT wal_bytes FROM pg_stat_wal)::bigint AS wal_bytes
             FROM pg_stat_database d,
                  (SELECT COALESCE(sum(n_tup_ins), 0)::bigint AS ins, COALESCE(sum(n_tup_upd), 0)::bigint AS upd,
                          COALESCE(sum(n_tup_hot_upd), 0)::bigint AS hot, COALESCE(sum(n_tup_del), 0)::bigint AS del,
                          COALESCE(sum(n_tup_ins + n_tup_upd + n_tup_del) FILTER (WHERE relname = 'workers'), 0)::bigint
                              AS workers
                   FROM pg_stat_user_tables WHERE schemaname = current_schema()) AS t
             WHERE d.datname = current_database()",
        )
        .fetch_one(&mut self.conn)
        .await?;
        let statements = if self.statements {
            Some(
                sqlx::query_scalar::<_, i64>(
                    "SELECT COALESCE(sum(calls), 0)::bigint FROM pg_stat_statements
                     WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
                )
                .fetch_one(&mut self.conn)
                .await?,
            )
        } else {
            None
        };
        Ok(DbCounters {
            commits: r.try_get("commits")?,
            rows_inserted: r.try_get("ins")?,
            rows_updated: r.try_get("upd")?,
            rows_hot_updated: r.try_get("hot")?,
            rows_deleted: r.try_get("del")?,
            worker_rows: r.try_get("workers")?,
            wal_bytes: r.try_get("wal_bytes")?,
            statements,
        })
    }
}
