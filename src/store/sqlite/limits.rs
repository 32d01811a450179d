//! Per-type concurrency limits (see `claim::allowances`).

use std::collections::{BTreeMap, HashSet};

use chrono::Utc;

use super::SqliteStore;
use crate::{
    domain::TypeLimit,
    store::{Result, decode::micros},
};

impl SqliteStore {
    pub(in crate::store) async fn seed_type_limits(&self, limits: &BTreeMap<String, u32>) -> Result<()> {
        let now = micros(Utc::now());
        let mut tx = self.writer.begin().await?;
        let types = crate::store::decode::encode_json(&limits.keys().collect::<Vec<_>>());
        sqlx::query(
            "DELETE FROM type_limits WHERE source = 'config' AND task_type NOT IN (SELECT value FROM json_each($1))",
        )
        .bind(types)
        .execute(&mut *tx)
        .await?;
        for (task_type, max) in limits {
            sqlx::query(
                "INSERT INTO type_limits (task_type, max_in_flight, source, updated_at) VALUES ($1, $2, 'config', $3)
                 ON CONFLICT (task_type) DO UPDATE
                 SET max_in_flight = excluded.max_in_flight, updated_at = excluded.updated_at
                 WHERE type_limits.source = 'config' AND type_limits.max_in_flight <> excluded.max_in_flight",
            )
            .bind(task_type)
            .bind(i64::from(*max))
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub(in crate::store) async fn set_type_limit(&self, task_type: &str, max: Option<u32>) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        match max {
            Some(m) => sqlx::query(
                "INSERT INTO type_limits (task_type, max_in_flight, source, updated_at) VALUES ($1, $2, 'admin', $3)
                 ON CONFLICT (task_type) DO UPDATE
                 SET max_in_flight = excluded.max_in_flight, source = 'admin', updated_at = excluded.updated_at",
            )
            .bind(task_type)
            .bind(i64::from(m))
            .bind(micros(Utc::now())),
            None => sqlx::query("DELETE FROM type_limits WHERE task_type = $1").bind(task_type),
        }
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub(in crate::store) async fn limited_types(&self, types: &[String]) -> Result<HashSet<String>> {
        let names = crate::store::decode::encode_json(&types);
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT task_type FROM type_limits WHERE task_type IN (SELECT value FROM json_each($1))",
        )
        .bind(names)
        .fetch_all(&self.reader)
        .await?;
        Ok(rows.into_iter().map(|(t,)| t).collect())
    }

    pub(in crate::store) async fn type_limits(&self) -> Result<Vec<TypeLimit>> {
        let rows = sqlx::query(crate::store::sql::TYPE_LIMITS).fetch_all(&self.reader).await?;
        rows.iter().map(crate::store::decode::type_limit).collect()
    }
}
