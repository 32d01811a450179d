//! Recurring schedules. The one writer connection fires a due schedule, creates its
//! occurrences' tasks and moves `next_run_at` on in one transaction.

use chrono::{DateTime, Utc};

use super::{SqliteStore, submit::insert_tasks};
use crate::{
    cron::Firing,
    domain::{NewSchedule, Schedule, ScheduleId},
    store::{
        Fired, Result,
        decode::{self, micros},
        duration_ms, new_runs, occurrence_tasks, sql,
    },
};

impl SqliteStore {
    pub(in crate::store) async fn create_schedule(&self, s: &NewSchedule) -> Result<Option<Schedule>> {
        let now = micros(Utc::now());
        let sql = format!(
            "INSERT INTO schedules (id, name, cron, timezone, task_type, payload, priority, max_attempts,
                                    timeout_ms, missed, paused, next_run_at, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $13)
             ON CONFLICT (name) DO NOTHING
             RETURNING {}",
            sql::SCHEDULE_COLUMNS
        );
        let t = &s.template;
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(s.id.to_string())
            .bind(&s.name)
            .bind(&s.cron)
            .bind(&s.timezone)
            .bind(&t.task_type)
            .bind(&t.payload)
            .bind(t.priority)
            .bind(i64::from(t.max_attempts))
            .bind(duration_ms(t.timeout))
            .bind(s.missed.as_str())
            .bind(s.paused)
            .bind(s.next_run_at.map(micros))
            .bind(now)
            .fetch_optional(&self.writer)
            .await?;
        row.as_ref().map(decode::schedule).transpose()
    }

    pub(in crate::store) async fn list_schedules(&self) -> Result<Vec<Schedule>> {
        let rows = sqlx::query(sql::SCHEDULES).fetch_all(&self.reader).await?;
        rows.iter().map(decode::schedule).collect()
    }

    pub(in crate::store) async fn delete_schedule(&self, id: ScheduleId) -> Result<bool> {
        let done = sqlx::query(sql::DELETE_SCHEDULE).bind(id.to_string()).execute(&self.writer).await?;
        Ok(done.rows_affected() == 1)
    }

    pub(in crate::store) async fn pause_schedule(
        &self,
        id: ScheduleId,
        paused: bool,
        next: Option<DateTime<Utc>>,
    ) -> Result<Option<Schedule>> {
        let sql = format!(
            "UPDATE schedules SET paused = $2, next_run_at = CASE WHEN $2 THEN next_run_at ELSE $3 END,
                 updated_at = $4
             WHERE id = $1 AND paused <> $2 RETURNING {}",
            sql::SCHEDULE_COLUMNS
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id.to_string())
            .bind(paused)
            .bind(next.map(micros))
            .bind(micros(Utc::now()))
            .fetch_optional(&self.writer)
            .await?;
        if row.is_none() {
            // Already in that state (a resume of a running schedule must not move its next
            // run), or unknown.
            let row = sqlx::query(sql::SCHEDULE).bind(id.to_string()).fetch_optional(&self.reader).await?;
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
        let mut tx = self.writer.begin().await?;
        let sql = format!(
            "SELECT {} FROM schedules WHERE NOT paused AND next_run_at <= $1 ORDER BY next_run_at LIMIT $2",
            sql::SCHEDULE_COLUMNS
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(micros(now))
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
            sqlx::query(
                "UPDATE schedules SET next_run_at = $3, last_run_at = COALESCE($4, last_run_at),
                     runs = runs + $5, updated_at = $6
                 WHERE id = $1 AND next_run_at = $2",
            )
            .bind(schedule.id.to_string())
            .bind(schedule.next_run_at.map(micros))
            .bind(firing.next.map(micros))
            .bind(firing.occurrences.last().copied().map(micros))
            .bind(runs)
            .bind(micros(Utc::now()))
            .execute(&mut *tx)
            .await?;
            out.push(Fired { schedule, created });
        }
        tx.commit().await?;
        Ok(out)
    }
}
