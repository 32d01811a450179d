//! Worker registrations, sessions, states and heartbeats.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::Row;
use uuid::Uuid;

use super::{PgStore, retry_conflicts};
use crate::{
    domain::{WorkerId, WorkerState},
    store::{Leaving, Registration, ReplicaRow, Result, StoreError, WorkerRegistration, decode, sql},
};

impl PgStore {
    pub(in crate::store) async fn upsert_worker(&self, w: &WorkerRegistration) -> Result<()> {
        upsert_worker(&self.pool, w).await
    }

    pub(in crate::store) async fn register_worker(&self, w: &WorkerRegistration) -> Result<Registration> {
        retry_conflicts!(self.register_worker_once(w).await)
    }

    /// One transaction: the worker row (its new session), the tasks it holds moved to that
    /// session, and those it says it does not hold given back.
    async fn register_worker_once(&self, w: &WorkerRegistration) -> Result<Registration> {
        let mut tx = self.pool.begin().await?;
        let previous: Option<Option<String>> =
            sqlx::query_scalar("SELECT instance_id FROM workers WHERE id = $1 FOR UPDATE")
                .bind(&w.id.0)
                .fetch_optional(&mut *tx)
                .await?;
        upsert_worker(&mut *tx, w).await?;
        let rows = sqlx::query(sql::ADOPT).bind(&w.id.0).bind(w.session_id).fetch_all(&mut *tx).await?;
        let mut held = rows.iter().map(decode::held).collect::<Result<Vec<_>>>()?;
        let weights = decode::weights(&rows)?;
        let mut requeued = Vec::new();
        let mut settled = super::super::Settled::default();
        if let Some(holding) = &w.holding {
            let (kept, missing, reason) = holding.split(previous.flatten().as_deref(), held);
            held = kept;
            if !missing.is_empty() {
                requeued = super::requeue::requeue_held_in(&mut tx, &missing, reason, &mut settled).await?;
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
            "UPDATE workers SET state = $3, updated_at = now(), last_heartbeat_at = GREATEST(last_heartbeat_at, $4)
             WHERE id = $1 AND session_id = $2",
        )
        .bind(&id.0)
        .bind(session)
        .bind(state.as_str())
        .bind(last_seen)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }

    pub(in crate::store) async fn forget_left_worker(&self, id: &WorkerId, session: Uuid) -> Result<Leaving> {
        let mut tx = self.pool.begin().await?;
        // Locked first: a claim fenced by this row (it share-locks it) has committed by the time
        // the tasks are read below, in a statement of their own, so its assignment is seen.
        let current: Option<Uuid> =
            sqlx::query_scalar("SELECT session_id FROM workers WHERE id = $1 FOR UPDATE")
                .bind(&id.0)
                .fetch_optional(&mut *tx)
                .await?;
        if current != Some(session) {
            return Ok(Leaving::Superseded);
        }
        let charged: bool = sqlx::query_scalar(sql::CHARGED_TO).bind(&id.0).fetch_one(&mut *tx).await?;
        if charged {
            return Ok(Leaving::Charged);
        }
        sqlx::query(sql::DELETE_WORKER).bind(&id.0).bind(session).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(Leaving::Removed)
    }

    pub(in crate::store) async fn touch_coordinator(
        &self,
        id: &str,
        instance: &str,
    ) -> Result<Option<String>> {
        let previous: Option<Option<String>> = sqlx::query_scalar(
            "WITH prev AS (SELECT instance_id FROM coordinators WHERE id = $1)
             INSERT INTO coordinators (id, instance_id) VALUES ($1, $2)
             ON CONFLICT (id) DO UPDATE SET last_seen_at = now(), instance_id = EXCLUDED.instance_id
             RETURNING (SELECT instance_id FROM prev)",
        )
        .bind(id)
        .bind(instance)
        .fetch_optional(&self.pool)
        .await?;
        Ok(previous.flatten())
    }

    pub(in crate::store) async fn coordinator_row(&self, id: &str) -> Result<Option<ReplicaRow>> {
        let row =
            sqlx::query("SELECT instance_id, last_seen_at, now() AS now FROM coordinators WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        row.map(|r| decode::replica(&r, r.try_get("now")?)).transpose()
    }

    pub(in crate::store) async fn forget_coordinator(&self, id: &str) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM coordinators WHERE id = $1").bind(id).execute(&mut *tx).await?;
        sqlx::query(sql::DISCONNECT_REPLICA).bind(id).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }

    pub(in crate::store) async fn disconnect_replica(&self, id: &str) -> Result<u64> {
        let r = sqlx::query(sql::DISCONNECT_REPLICA).bind(id).execute(&self.pool).await?;
        Ok(r.rows_affected())
    }

    /// One change per session, in id order ([`crate::store::Store::streams_changed`]).
    pub(in crate::store) async fn streams_changed(&self, changes: &[(WorkerId, Uuid, bool)]) -> Result<u64> {
        let ids: Vec<&str> = changes.iter().map(|(w, _, _)| w.0.as_str()).collect();
        let sessions: Vec<Uuid> = changes.iter().map(|(_, s, _)| *s).collect();
        let connected: Vec<bool> = changes.iter().map(|(_, _, c)| *c).collect();
        let r = sqlx::query(
            "UPDATE workers w SET connected = c.connected
             FROM unnest($1::text[], $2::uuid[], $3::bool[]) AS c(id, session_id, connected)
             WHERE w.id = c.id AND w.session_id = c.session_id AND w.connected <> c.connected",
        )
        .bind(&ids)
        .bind(&sessions)
        .bind(&connected)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected())
    }

    pub(in crate::store) async fn flush_heartbeats(
        &self,
        beats: &[(WorkerId, DateTime<Utc>)],
    ) -> Result<u64> {
        // In id order, as claims and batches of results lock workers' rows: two of them never
        // wait on each other in a cycle.
        let mut beats: Vec<&(WorkerId, DateTime<Utc>)> = beats.iter().collect();
        beats.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let ids: Vec<&str> = beats.iter().map(|(w, _)| w.0.as_str()).collect();
        let ts: Vec<DateTime<Utc>> = beats.iter().map(|(_, t)| *t).collect();
        let r = sqlx::query(
            "UPDATE workers w SET last_heartbeat_at = b.ts
             FROM unnest($1::text[], $2::timestamptz[]) AS b(id, ts)
             WHERE w.id = b.id AND w.last_heartbeat_at < b.ts",
        )
        .bind(&ids)
        .bind(&ts)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected())
    }
}

async fn upsert_worker<'e>(exec: impl sqlx::PgExecutor<'e>, w: &WorkerRegistration) -> Result<()> {
    sqlx::query(
        "INSERT INTO workers (id, state, max_concurrent_tasks, capabilities, labels, version, hostname,
                              session_id, coordinator_id, instance_id, registered_at, last_heartbeat_at,
                              updated_at, connected, prefetch)
         VALUES ($1, 'active', $2, $3, $4, $5, $6, $7, $8, $9, now(), now(), now(), true, $10)
         ON CONFLICT (id) DO UPDATE SET
             state = 'active', max_concurrent_tasks = EXCLUDED.max_concurrent_tasks,
             capabilities = EXCLUDED.capabilities, labels = EXCLUDED.labels, version = EXCLUDED.version,
             hostname = EXCLUDED.hostname, session_id = EXCLUDED.session_id,
             coordinator_id = EXCLUDED.coordinator_id, instance_id = EXCLUDED.instance_id,
             registered_at = now(), last_heartbeat_at = now(), updated_at = now(), connected = true,
             prefetch = EXCLUDED.prefetch",
    )
    .bind(&w.id.0)
    .bind(w.max_concurrent_tasks as i32)
    .bind(decode::encode_json(&w.capabilities))
    .bind(decode::encode_json(&w.labels))
    .bind(&w.version)
    .bind(&w.hostname)
    .bind(w.session_id)
    .bind(&w.coordinator_id)
    .bind(w.holding.as_ref().map(|h| h.instance.as_str()))
    .bind(w.prefetch as i32)
    .execute(exec)
    .await?;
    Ok(())
}
