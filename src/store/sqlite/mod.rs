//! The SQLite backend: the embedded default for a laptop and for tests that need no server.
//!
//! All writes go through a pool of one connection, so transactions never contend for SQLite's
//! single write lock inside this process; reads use a separate pool and WAL mode lets them run
//! beside the writer. One coordinator process per database file (replicas need Postgres).
//!
//! One file per concern: [`submit`], [`claim`], [`report`], [`requeue`], [`retry`], [`jobs`],
//! [`failures`], [`workers`], [`read`], [`prune`], [`schedules`].
//! Rows are decoded by [`crate::store::decode`]; the rules a transition follows come from
//! [`crate::store::policy`].

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

use std::{str::FromStr, sync::Arc, time::Duration};

use sqlx::{
    SqlitePool,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};

use super::{DbHealth, Result, StoreError};
use crate::config::DatabaseConfig;

/// Applied migrations it does not know are [`super::schema_check`]'s to judge, before it runs.
static MIGRATOR: std::sync::LazyLock<sqlx::migrate::Migrator> = std::sync::LazyLock::new(|| {
    let mut m = sqlx::migrate!("migrations/sqlite");
    m.set_ignore_missing(true);
    m
});

/// An exclusive advisory lock on `<database>.lock` beside a SQLite database file, held by the
/// one process that serves that database: a second process on the same file would share its
/// rows and worker sessions while each believes it is alone. The operating system releases the
/// lock when the process exits, however it exits (kill -9 included), so there is nothing stale
/// to clean up.
#[derive(Debug)]
pub struct ProcessLock {
    /// Locked for as long as this value lives; closing the file releases the lock.
    _file: std::fs::File,
}

impl ProcessLock {
    /// Locks the database file `url` names; `None` for an in-memory database (nothing to
    /// share). Fails with [`StoreError::InUse`] when another process holds it.
    pub fn acquire(url: &str) -> Result<Option<ProcessLock>> {
        let options = SqliteConnectOptions::from_str(url).map_err(|_| StoreError::BadUrl(url.to_owned()))?;
        let db = options.get_filename();
        if url.contains(":memory:") || url.contains("mode=memory") || db.as_os_str().is_empty() {
            return Ok(None);
        }
        let mut path = db.as_os_str().to_owned();
        path.push(".lock");
        let path = std::path::PathBuf::from(path);
        let shown = db.display().to_string();
        let lock_err = |source| StoreError::Lock { path: shown.clone(), source };
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(lock_err)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(lock_err)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(ProcessLock { _file: file })),
            Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::InUse { path: shown }),
            Err(std::fs::TryLockError::Error(e)) => Err(lock_err(e)),
        }
    }
}

/// SQLite-backed store. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    /// One connection: every write transaction runs here, one at a time.
    writer: SqlitePool,
    /// Readers; WAL mode lets them read beside the writer.
    reader: SqlitePool,
    pub(super) health: Arc<DbHealth>,
    pub(super) settled: Arc<super::SettledSink>,
}

impl SqliteStore {
    pub(in crate::store) async fn connect(cfg: &DatabaseConfig) -> std::result::Result<Self, sqlx::Error> {
        let options = SqliteConnectOptions::from_str(&cfg.url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // NORMAL in WAL mode survives a process crash (kill -9); only an OS crash or power
            // loss can drop the last transactions.
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(cfg.acquire_timeout.max(Duration::from_secs(5)));
        if let Some(dir) = options.get_filename().parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(sqlx::Error::Io)?;
        }
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(cfg.acquire_timeout)
            .connect_with(options.clone())
            .await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(cfg.max_open_conns.clamp(1, 8))
            .acquire_timeout(cfg.acquire_timeout)
            .connect_with(options.read_only(true))
            .await?;
        Ok(Self { writer, reader, health: Arc::default(), settled: Arc::default() })
    }

    /// The single writer connection's pool: a test that holds it makes every write wait.
    pub fn writer_pool(&self) -> &SqlitePool {
        &self.writer
    }

    pub(in crate::store) async fn migrate(&self) -> Result<()> {
        super::migrate_judged(
            &MIGRATOR,
            || self.schema_state(),
            || async { Ok(MIGRATOR.run(&self.writer).await?) },
        )
        .await
    }

    /// The migrations applied, and the schema's oldest build that runs on it (see
    /// [`super::schema_check`]).
    async fn schema_state(&self) -> Result<(Vec<i64>, Option<i64>)> {
        let table = |name: &'static str| {
            sqlx::query_scalar::<_, bool>(
                "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = ?",
            )
            .bind(name)
            .fetch_one(&self.writer)
        };
        let applied: Vec<i64> = if table("_sqlx_migrations").await? {
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                .fetch_all(&self.writer)
                .await?
        } else {
            Vec::new()
        };
        let oldest: Option<i64> = if table("schema_compat").await? {
            sqlx::query_scalar("SELECT oldest_build FROM schema_compat").fetch_optional(&self.writer).await?
        } else {
            None
        };
        Ok((applied, oldest))
    }

    /// The write pool, for tests that inspect rows directly.
    pub fn pool(&self) -> &SqlitePool {
        &self.writer
    }

    pub(in crate::store) async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }

    pub(in crate::store) async fn close(&self) {
        self.reader.close().await;
        self.writer.close().await;
    }

    pub(in crate::store) fn pool_stats(&self) -> (u32, u32) {
        (self.writer.size() + self.reader.size(), (self.writer.num_idle() + self.reader.num_idle()) as u32)
    }
}

/// `ms` milliseconds after `micros` (a time column's value), saturating.
pub(super) fn plus_ms(micros: i64, ms: i64) -> i64 {
    micros.saturating_add(ms.saturating_mul(1000))
}

/// The write transaction every write runs in.
pub(super) type Tx<'a> = sqlx::Transaction<'a, sqlx::Sqlite>;
