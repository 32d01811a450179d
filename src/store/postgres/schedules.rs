//! Recurring schedules. Firing locks each due schedule's row (`FOR UPDATE SKIP LOCKED`), creates
//! its occurrences' tasks and moves `next_run_at` on in one transaction: a replica firing at the
//! same moment skips the locked row, and finds it no longer due once the first commits.

use chrono::{DateTime, Utc};

use super::{PgStore, submit::insert_tasks};
use crate::{
    cron::Firing,
    domain::{NewSchedule, Schedule, ScheduleId},
    store::{Fired, Result, decode, duration_ms, new_runs, occurrence_tasks, sql},
};

impl PgStore {
    pub(in crate::store) async fn create_schedule(&self, s: &NewSchedule) -> Result<Option<Schedule>> {
        let sql = format!(
            "INSERT INTO schedules (id, name, cron, timezone, task_type, payload, priority, max_attempts,
                                    timeout_ms, missed, paused, next_run_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
             ON CONFLICT (name) DO NOTHING
             RETURNING {}",
            sql::SCHEDULE_COLUMNS
        );
        let t = &s.template;
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(s.id.0)
            .bind(&s.name)
            .bind(&s.cron)
            .bind(&s.timezone)
            .bind(&t.task_type)
            .bind(&t.payload)
            .bind(t.priority)
            .bind(t.max_attempts as i32)
            .bind(duration_ms(t.timeout))
            .bind(s.missed.as_str())
            .bind(s.paused)
            .bind(s.next_run_at)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(decode::schedule).transpose()
    }

    pub(in crate::store) async fn list_schedules(&self) -> Result<Vec<Schedule>> {
        let rows = sqlx::query(sql::SCHEDULES).fetch_all(&self.pool).await?;
        rows.iter().map(decode::schedule).collect()
    }

    pub(in crate::store) async fn delete_schedule(&self, id: ScheduleId) -> Result<bool> {
        Ok(sqlx::query(sql::DELETE_SCHEDULE).bind(id.0).execute(&self.pool).await?.rows_affected() == 1)
    }

    pub(in crate::store) async fn pause_schedule(
        &self,
        id: ScheduleId,
        paused: bool,
        next: Option<DateTime<Utc>>,
    ) -> Result<Option<Schedule>> {
        let sql = format!(
            "UPDATE schedules SET paused = $2, next_run_at = CASE WHEN $2 THEN next_run_at ELSE $3 END,
                 updated_at = now()
             WHERE id = $1 AND paused <> $2 RETURNING {}",
            sql::SCHEDULE_COLUMNS
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id.0)
            .bind(paused)
            .bind(next)
            .fetch_optional(&self.pool)
            .await?;
        if row.is_none() {
            // Already in that state (a resume of a running schedule must not move its next
            // run), or unknown.
            let row = sqlx::query(sql::SCHEDULE).bind(id.0).fetch_optional(&self.pool).await?;
            return row.as_ref().map(decode::schedule).transpose();
        }
        row.as_ref().map(decode::schedule).transpose()
    }

    pub(in crate::store) async fn fire_schedules<F>(
        &self,
        now: DateTime<Utc>,
        limit: u32,
        mut plan: F,
    ) -> Result<Vec<Fired>>
    where
        F: FnMut(&Schedule) -> Firing,
    {
        let mut tx = self.pool.begin().await?;
        let sql = format!(
            "SELECT {} FROM schedules WHERE NOT paused AND next_run_at <= $1
             ORDER BY next_run_at LIMIT $2 FOR UPDATE SKIP LOCKED",
            sql::SCHEDULE_COLUMNS
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(now)
            .bind(i64::from(limit))
            .fetch_all(&mut *tx)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let schedule = decode::schedule(row)?;
            let firing = plan(&schedule);
            let tasks = occurrence_tasks(&schedule, &firing);
            let created = if tasks.is_empty() { Vec::new() } else { insert_tasks(&mut tx, &tasks).await?.0 };
            let runs = new_runs(&created);
            // Fenced by the time it was due as read under the lock.
            sqlx::query(
                "UPDATE schedules SET next_run_at = $3, last_run_at = COALESCE($4, last_run_at),
                     runs = runs + $5, updated_at = now()
                 WHERE id = $1 AND next_run_at = $2",
            )
            .bind(schedule.id.0)
            .bind(schedule.next_run_at)
            .bind(firing.next)
            .bind(firing.occurrences.last())
            .bind(runs)
            .execute(&mut *tx)
            .await?;
            out.push(Fired { schedule, created });
        }
        tx.commit().await?;
        Ok(out)
    }
}
