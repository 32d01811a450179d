//! Test databases: a fresh SQLite file in a temporary directory, and, when `TEST_DATABASE_URL` is
//! set, a fresh Postgres schema on that server, so tests run in parallel without sharing rows.
//! Used by the unit and integration tests; not part of the service.

use std::time::Duration;

use sqlx::Connection;
use uuid::Uuid;

use super::{
    Allowances, ClaimFilter, Held, Placement, Refill, Store, StoreError, TypeFilter, WorkerRegistration,
};
use crate::{
    config::DatabaseConfig,
    domain::{Assignment, Candidate, NewTask, TaskId, WorkerId},
};

/// A task of `task_type` with an empty payload, 3 attempts and a minute's timeout.
pub fn new_task(task_type: &str) -> NewTask {
    NewTask {
        id: TaskId::new(),
        task_type: task_type.into(),
        payload: Vec::new(),
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

/// Claims the first runnable task for `worker`, with a minute's lease: its assignment, if any.
pub async fn claim_one(store: &Store, worker: &WorkerId) -> Vec<Assignment> {
    let w = worker.clone();
    store
        .claim(1, &super::TypeFilter::Any, Duration::from_secs(60), move |c| vec![(c[0].id, w)])
        .await
        .expect("claim")
}

/// A [`Refill`] that claims up to one task of any type per completed attempt and places each
/// candidate on `worker` under `session`; it keeps what it was told completed, call by call.
#[derive(Debug)]
pub struct RefillOn {
    pub worker: WorkerId,
    pub session: Uuid,
    pub told: Vec<Vec<Held>>,
    /// With these shapes instead of none (the claim's check of worker shapes).
    pub shapes: Option<super::Shapes>,
    /// The errors of the claims that failed.
    pub failed: Vec<String>,
}

impl RefillOn {
    pub fn new(worker: &WorkerId, session: Uuid) -> Self {
        Self { worker: worker.clone(), session, told: Vec::new(), shapes: None, failed: Vec::new() }
    }
}

impl Refill for RefillOn {
    fn wanted(&mut self, completed: &[Held]) -> Option<(u32, ClaimFilter)> {
        self.told.push(completed.to_vec());
        let n = u32::try_from(completed.len()).ok().filter(|n| *n > 0)?;
        Some((n, ClaimFilter { types: TypeFilter::Any, shapes: self.shapes.clone() }))
    }

    fn place(&mut self, candidates: &[Candidate], _: &Allowances) -> Placement {
        Placement {
            placed: candidates.iter().map(|c| (c.id, self.worker.clone())).collect(),
            sessions: [(self.worker.clone(), self.session)].into(),
        }
    }

    fn claim_failed(&mut self, error: &StoreError) {
        self.failed.push(error.to_string());
    }
}

/// A registration of `id` with `max` slots, any task type, and a fresh session.
pub fn registration(id: &str, max: u32) -> WorkerRegistration {
    WorkerRegistration {
        id: WorkerId::from(id),
        prefetch: 0,
        max_concurrent_tasks: max,
        capabilities: Vec::new(),
        labels: Default::default(),
        version: String::new(),
        hostname: String::new(),
        session_id: Uuid::now_v7(),
        coordinator_id: "c".into(),
        holding: None,
    }
}

/// One test's private database.
#[derive(Debug)]
pub struct TestDb {
    pub store: Store,
    /// A URL that reaches the same database (and schema) from another process.
    pub url: String,
    /// Postgres schema to drop in [`TestDb::cleanup`].
    schema: Option<(String, String)>,
    /// Keeps the SQLite file's directory until the test ends.
    _dir: Option<tempfile::TempDir>,
}

/// The Postgres server for tests, from `TEST_DATABASE_URL`; `None` when unset or empty.
pub fn postgres_url() -> Option<String> {
    std::env::var("TEST_DATABASE_URL").ok().filter(|u| !u.is_empty())
}

pub fn db_config(url: &str) -> DatabaseConfig {
    DatabaseConfig {
        url: url.to_owned(),
        max_open_conns: 10,
        max_idle_conns: 0,
        acquire_timeout: Duration::from_secs(10),
        ..DatabaseConfig::default()
    }
}

/// A fresh, empty schema on the `TEST_DATABASE_URL` server, for a test that migrates it itself;
/// [`TestDb::postgres_in`] opens the store in it (and drops it at cleanup).
#[derive(Debug)]
pub struct EmptySchema {
    base: String,
    schema: String,
    /// A URL that reaches the schema.
    pub url: String,
}

impl EmptySchema {
    /// `None` when `TEST_DATABASE_URL` is not set.
    pub async fn new() -> Option<EmptySchema> {
        let base = postgres_url()?;
        let (url, schema) = create_schema(&base, "t").await;
        Some(EmptySchema { base, schema, url })
    }
}

/// Creates a schema named `<prefix>_<uuid>` on the server of `base`: a URL whose connections use
/// it, and its name.
pub async fn create_schema(base: &str, prefix: &str) -> (String, String) {
    let schema = format!("{prefix}_{}", Uuid::now_v7().simple());
    let mut conn = sqlx::PgConnection::connect(base).await.expect("connect to TEST_DATABASE_URL");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&mut conn)
        .await
        .expect("create the test schema");
    conn.close().await.ok();
    let sep = if base.contains('?') { '&' } else { '?' };
    (format!("{base}{sep}options=-c%20search_path%3D{schema}"), schema)
}

impl TestDb {
    /// A fresh SQLite database in a temporary directory.
    pub async fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("coordinator.db").display());
        let store = Store::connect(&db_config(&url)).await.expect("open sqlite");
        TestDb { store, url, schema: None, _dir: Some(dir) }
    }

    /// A fresh schema on the `TEST_DATABASE_URL` server, or `None` when it is not set. A test
    /// that needs it is marked `#[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]`
    /// (build.rs sets `test_postgres` when the variable is set), so without a server it is
    /// reported ignored, never passed.
    pub async fn postgres() -> Option<TestDb> {
        let empty = EmptySchema::new().await?;
        Some(Self::postgres_in(empty).await)
    }

    /// Opens the store (migrating what is not yet migrated) in a schema of [`EmptySchema`].
    pub async fn postgres_in(empty: EmptySchema) -> TestDb {
        let EmptySchema { base, schema, url } = empty;
        let store = Store::connect(&db_config(&url)).await.expect("open postgres test schema");
        TestDb { store, url, schema: Some((base, schema)), _dir: None }
    }

    /// Closes the pool and drops the Postgres schema.
    pub async fn cleanup(self) {
        self.store.close().await;
        if let Some((base, schema)) = self.schema
            && let Ok(mut conn) = sqlx::PgConnection::connect(&base).await
        {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
                .execute(&mut conn)
                .await;
            conn.close().await.ok();
        }
    }
}
