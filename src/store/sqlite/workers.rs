//! Worker registrations, sessions, states and heartbeats.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::SqliteStore;
use crate::{
    domain::{WorkerId, WorkerState},
    store::{
        Leaving, Registration, ReplicaRow, Result, WorkerRegistration,
        decode::{self, micros},
        sql,
    },
};

impl SqliteStore {
    pub(in crate::store) async fn upsert_worker(&self, w: &WorkerRegistration) -> Result<()> {
        upsert_worker(&self.writer, w).await
    }

    /// One transaction: the worker row (its new session), the tasks it holds moved to that
    /// session, and those it says it does not hold given back.
    pub(in crate::store) async fn register_worker(&self, w: &WorkerRegistration) -> Result<Registration> {
        let mut tx = self.writer.begin().await?;
        let previous: Option<Option<String>> =
            sqlx::query_scalar("SELECT instance_id FROM workers WHERE id = $1")
                .bind(&w.id.0)
                .fetch_optional(&mut *tx)
                .await?;
        upsert_worker(&mut *tx, w).await?;
        let rows =
            sqlx::query(sql::ADOPT).bind(&w.id.0).bind(w.session_id.to_string()).fetch_all(&mut *tx).await?;
        let mut held = rows.iter().map(decode::held).collect::<Result<Vec<_>>>()?;
        let weights = decode::weights(&rows)?;
        let mut requeued = Vec::new();
        let mut settled = crate::store::Settled::default();
        if let Some(holding) = &w.holding {
            let (kept, missing, reason) = holding.split(previous.flatten().as_deref(), held);
            held = kept;
            if !missing.is_empty() {
                requeued =
                    super::requeue::requeue(&mut tx, &missing, reason, micros(Utc::now()), &mut settled)
                        .await?;
            }
        }
        tx.commit().await?;
        self.settled.send(settled);
        held.sort_by_key(|h| h.task_id);
        Ok(Registration { held, requeued, weights })
    }

    pub(in crate::store) async fn set_worker_state(
        &self,
        id: &WorkerId,
        session: Uuid,
        state: WorkerState,
        last_seen: DateTime<Utc>,
    ) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE workers SET state = $3, updated_at = $4, last_heartbeat_at = max(last_heartbeat_at, $5)
             WHERE id = $1 AND session_id = $2",
        )
        .bind(&id.0)
        .bind(session.to_string())
        .bind(state.as_str())
        .bind(micros(Utc::now()))
        .bind(micros(last_seen))
        .execute(&self.writer)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    pub(in crate::store) async fn forget_left_worker(&self, id: &WorkerId, session: Uuid) -> Result<Leaving> {
        // One writer: nothing else writes between these statements.
        let mut tx = self.writer.begin().await?;
        let current: Option<String> = sqlx::query_scalar("SELECT session_id FROM workers WHERE id = $1")
            .bind(&id.0)
            .fetch_optional(&mut *tx)
            .await?;
        if current != Some(session.to_string()) {
            return Ok(Leaving::Superseded);
        }
        let charged: bool = sqlx::query_scalar(sql::CHARGED_TO).bind(&id.0).fetch_one(&mut *tx).await?;
        if charged {
            return Ok(Leaving::Charged);
        }
        sqlx::query(sql::DELETE_WORKER).bind(&id.0).bind(session.to_string()).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(Leaving::Removed)
    }

    pub(in crate::store) async fn touch_coordinator(
        &self,
        id: &str,
        instance: &str,
    ) -> Result<Option<String>> {
        let now = micros(Utc::now());
        let mut tx = self.writer.begin().await?;
        let previous: Option<Option<String>> =
            sqlx::query_scalar("SELECT instance_id FROM coordinators WHERE id = $1")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        sqlx::query(
            "INSERT INTO coordinators (id, started_at, last_seen_at, instance_id) VALUES ($1, $2, $2, $3)
             ON CONFLICT (id) DO UPDATE SET last_seen_at = excluded.last_seen_at,
                                            instance_id = excluded.instance_id",
        )
        .bind(id)
        .bind(now)
        .bind(instance)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(previous.flatten())
    }

    pub(in crate::store) async fn coordinator_row(&self, id: &str) -> Result<Option<ReplicaRow>> {
        let row = sqlx::query("SELECT instance_id, last_seen_at FROM coordinators WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.reader)
            .await?;
        row.map(|r| decode::replica(&r, Utc::now())).transpose()
    }

    pub(in crate::store) async fn forget_coordinator(&self, id: &str) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        sqlx::query("DELETE FROM coordinators WHERE id = $1").bind(id).execute(&mut *tx).await?;
        sqlx::query(sql::DISCONNECT_REPLICA).bind(id).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }

    pub(in crate::store) async fn disconnect_replica(&self, id: &str) -> Result<u64> {
        let r = sqlx::query(sql::DISCONNECT_REPLICA).bind(id).execute(&self.writer).await?;
        Ok(r.rows_affected())
    }

    /// One change per session ([`crate::store::Store::streams_changed`]).
    pub(in crate::store) async fn streams_changed(&self, changes: &[(WorkerId, Uuid, bool)]) -> Result<u64> {
        let mut tx = self.writer.begin().await?;
        let mut changed = 0;
        for (id, session, connected) in changes {
            changed += sqlx::query(
                "UPDATE workers SET connected = $3 WHERE id = $1 AND session_id = $2 AND connected <> $3",
            )
            .bind(&id.0)
            .bind(session.to_string())
            .bind(connected)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        tx.commit().await?;
        Ok(changed)
    }

    pub(in crate::store) async fn flush_heartbeats(
        &self,
        beats: &[(WorkerId, DateTime<Utc>)],
    ) -> Result<u64> {
        // One statement for the whole batch: the pairs travel as a JSON array.
        let json = serde_json::Value::Array(
            beats.iter().map(|(w, t)| serde_json::json!([w.0, micros(*t)])).collect(),
        );
        let r = sqlx::query(
            "UPDATE workers SET last_heartbeat_at = b.ts
             FROM (SELECT value ->> 0 AS id, value ->> 1 AS ts FROM json_each($1)) AS b
             WHERE workers.id = b.id AND workers.last_heartbeat_at < b.ts",
        )
        .bind(json.to_string())
        .execute(&self.writer)
        .await?;
        Ok(r.rows_affected())
    }
}

async fn upsert_worker<'e>(exec: impl sqlx::SqliteExecutor<'e>, w: &WorkerRegistration) -> Result<()> {
    let now = micros(Utc::now());
    sqlx::query(
        "INSERT INTO workers (id, state, max_concurrent_tasks, capabilities, labels, version, hostname,
                              session_id, coordinator_id, instance_id, registered_at, last_heartbeat_at,
                              updated_at, connected, prefetch)
         VALUES ($1, 'active', $2, $3, $4, $5, $6, $7, $8, $10, $9, $9, $9, 1, $11)
         ON CONFLICT (id) DO UPDATE SET
             state = 'active', max_concurrent_tasks = excluded.max_concurrent_tasks,
             capabilities = excluded.capabilities, labels = excluded.labels, version = excluded.version,
             hostname = excluded.hostname, session_id = excluded.session_id,
             coordinator_id = excluded.coordinator_id, instance_id = excluded.instance_id,
             registered_at = excluded.registered_at, last_heartbeat_at = excluded.last_heartbeat_at,
             updated_at = excluded.updated_at, connected = 1, prefetch = excluded.prefetch",
    )
    .bind(&w.id.0)
    .bind(i64::from(w.max_concurrent_tasks))
    .bind(decode::encode_json(&w.capabilities))
    .bind(decode::encode_json(&w.labels))
    .bind(&w.version)
    .bind(&w.hostname)
    .bind(w.session_id.to_string())
    .bind(&w.coordinator_id)
    .bind(now)
    .bind(w.holding.as_ref().map(|h| h.instance.as_str()))
    .bind(i64::from(w.prefetch))
    .execute(exec)
    .await?;
    Ok(())
}
