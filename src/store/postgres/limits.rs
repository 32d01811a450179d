//! Per-type concurrency limits: the rows claims lock (see `claim::allowances`).

use std::{
    collections::{BTreeMap, HashSet},
    time::Duration,
};

use super::{PgStore, retry_conflicts};
use crate::{
    domain::TypeLimit,
    store::{Result, StoreError},
};

/// Waits for the claims in progress to commit and holds new ones back until this transaction
/// ends (see [`super::claim::LIMITS_LOCK`]).
async fn exclude_claims(tx: &mut sqlx::PgConnection) -> Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext(current_schema()))")
        .bind(super::claim::LIMITS_LOCK)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

impl PgStore {
    /// Replicas starting together write the same rows: a deadlock between them is retried.
    pub(in crate::store) async fn seed_type_limits(&self, limits: &BTreeMap<String, u32>) -> Result<()> {
        retry_conflicts!(self.seed_type_limits_once(limits).await)
    }

    async fn seed_type_limits_once(&self, limits: &BTreeMap<String, u32>) -> Result<()> {
        let types: Vec<&str> = limits.keys().map(String::as_str).collect();
        let max: Vec<i32> = limits.values().map(|m| (*m).min(i32::MAX as u32) as i32).collect();
        let mut tx = self.pool.begin().await?;
        exclude_claims(&mut tx).await?;
        sqlx::query("DELETE FROM type_limits WHERE source = 'config' AND task_type <> ALL($1)")
            .bind(&types)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO type_limits (task_type, max_in_flight, source)
             SELECT * FROM unnest($1::text[], $2::int[]) AS u(t, m), (VALUES ('config')) AS s(source)
             ON CONFLICT (task_type) DO UPDATE
             SET max_in_flight = EXCLUDED.max_in_flight, updated_at = now()
             WHERE type_limits.source = 'config' AND type_limits.max_in_flight <> EXCLUDED.max_in_flight",
        )
        .bind(&types)
        .bind(&max)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub(in crate::store) async fn set_type_limit(&self, task_type: &str, max: Option<u32>) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        exclude_claims(&mut tx).await?;
        match max {
            Some(m) => sqlx::query(
                "INSERT INTO type_limits (task_type, max_in_flight, source) VALUES ($1, $2, 'admin')
                 ON CONFLICT (task_type) DO UPDATE
                 SET max_in_flight = EXCLUDED.max_in_flight, source = 'admin', updated_at = now()",
            )
            .bind(task_type)
            .bind(m.min(i32::MAX as u32) as i32),
            None => sqlx::query("DELETE FROM type_limits WHERE task_type = $1").bind(task_type),
        }
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub(in crate::store) async fn limited_types(&self, types: &[String]) -> Result<HashSet<String>> {
        let rows: Vec<(String,)> =
            sqlx::query_as("SELECT task_type FROM type_limits WHERE task_type = ANY($1)")
                .bind(types)
                .fetch_all(&self.pool)
                .await?;
        Ok(rows.into_iter().map(|(t,)| t).collect())
    }

    pub(in crate::store) async fn type_limits(&self) -> Result<Vec<TypeLimit>> {
        let rows = sqlx::query(crate::store::sql::TYPE_LIMITS).fetch_all(&self.pool).await?;
        rows.iter().map(crate::store::decode::type_limit).collect()
    }
}
