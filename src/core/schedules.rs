//! Recurring schedules: create, list, pause, resume, delete, and the loop that fires them.
//! Each due occurrence becomes one task from the schedule's template (see [`crate::cron`] for
//! which occurrences run and [`crate::store::Store::fire_schedules`] for how each is created
//! once across replicas); the scheduler is woken for them as for a submission.

use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Core, CoreError};
use crate::{
    cron::{self, CronSpec, Firing},
    domain::{MissedRuns, NewSchedule, Schedule, ScheduleId, TaskTemplate},
};

/// How often each replica looks for due schedules: a schedule runs at most this late.
pub const FIRE_EVERY: Duration = Duration::from_millis(250);
/// Schedules fired per transaction.
const FIRE_BATCH: u32 = 100;
/// The longest schedule name.
pub const MAX_NAME_LEN: usize = 128;

/// What a client asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleRequest {
    pub name: String,
    pub cron: String,
    pub timezone: String,
    pub template: TaskTemplate,
    pub missed: MissedRuns,
    pub paused: bool,
}

fn schedule_not_found(id: ScheduleId) -> CoreError {
    CoreError::NotFound(format!("schedule {id} not found"))
}

impl Core {
    /// Creates a schedule; its first run is the first occurrence after now.
    pub async fn create_schedule(&self, req: ScheduleRequest) -> Result<Schedule, CoreError> {
        let name = req.name.trim();
        if name.is_empty() || name.len() > MAX_NAME_LEN {
            return Err(CoreError::invalid("name", format!("must be 1 to {MAX_NAME_LEN} bytes")));
        }
        super::storable("name", name)?;
        let spec =
            CronSpec::parse(&req.cron, &req.timezone).map_err(|(field, m)| CoreError::invalid(field, m))?;
        let new = NewSchedule {
            id: ScheduleId::new(),
            name: name.to_owned(),
            cron: req.cron.trim().to_owned(),
            timezone: if req.timezone.is_empty() { "UTC".into() } else { req.timezone },
            template: req.template,
            missed: req.missed,
            paused: req.paused,
            next_run_at: spec.next_after(Utc::now()),
        };
        let created = self.inner.store.create_schedule(&new).await?;
        let schedule =
            created.ok_or_else(|| CoreError::AlreadyExists(format!("a schedule named {name:?} exists")))?;
        info!(schedule_id = %schedule.id, name = %schedule.name, cron = %schedule.cron, "schedule created");
        Ok(schedule)
    }

    pub async fn list_schedules(&self) -> Result<Vec<Schedule>, CoreError> {
        Ok(self.inner.store.list_schedules().await?)
    }

    pub async fn delete_schedule(&self, id: ScheduleId) -> Result<(), CoreError> {
        if !self.inner.store.delete_schedule(id).await? {
            return Err(schedule_not_found(id));
        }
        info!(schedule_id = %id, "schedule deleted");
        Ok(())
    }

    /// Pauses, or resumes from the next occurrence after now (occurrences that fell due while
    /// paused are not made up).
    pub async fn pause_schedule(&self, id: ScheduleId, paused: bool) -> Result<Schedule, CoreError> {
        let next = if paused {
            None
        } else {
            let current = self.list_schedules().await?.into_iter().find(|s| s.id == id);
            let current = current.ok_or_else(|| schedule_not_found(id))?;
            let spec = CronSpec::parse(&current.cron, &current.timezone)
                .map_err(|(_, m)| CoreError::Internal(format!("stored schedule {id}: {m}")))?;
            spec.next_after(Utc::now())
        };
        let schedule =
            self.inner.store.pause_schedule(id, paused, next).await?.ok_or_else(|| schedule_not_found(id))?;
        info!(schedule_id = %id, paused, "schedule paused or resumed");
        Ok(schedule)
    }

    /// Fires every due schedule; returns the tasks created.
    pub async fn fire_schedules(&self) -> Result<usize, CoreError> {
        let mut created = 0;
        loop {
            let now = Utc::now();
            let fired = self.inner.store.fire_schedules(now, FIRE_BATCH, |s| plan(s, now)).await?;
            let n = fired.len();
            for f in &fired {
                let new = f.created.iter().filter(|c| c.created).count();
                created += new;
                if new > 0 {
                    info!(schedule_id = %f.schedule.id, name = %f.schedule.name, tasks = new, "schedule fired");
                }
            }
            let fired_now = fired.iter().flat_map(|f| &f.created).filter(|c| c.created).count();
            self.inner.effects.submitted(fired_now, fired_now);
            if n < FIRE_BATCH as usize {
                return Ok(created);
            }
        }
    }
}

/// Which occurrences of `s`, due at `now`, get a task. A stored expression that no longer parses
/// (written by a newer version) ends the schedule rather than firing it wrongly.
fn plan(s: &Schedule, now: chrono::DateTime<Utc>) -> Firing {
    let Some(due) = s.next_run_at else { return Firing { occurrences: Vec::new(), next: None } };
    match CronSpec::parse(&s.cron, &s.timezone) {
        Ok(spec) => cron::fire(&spec, due, now, s.missed),
        Err((_, error)) => {
            warn!(schedule_id = %s.id, %error, "a stored schedule does not parse; it stops");
            Firing { occurrences: Vec::new(), next: None }
        }
    }
}

/// Fires due schedules every [`FIRE_EVERY`] until `stop`. Failures (the database away) are
/// logged and tried again at the next tick; missed occurrences then follow each schedule's
/// policy.
pub async fn run(core: Core, stop: CancellationToken) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(FIRE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        if let Err(error) = core.fire_schedules().await {
            warn!(%error, "firing schedules failed; trying again");
        }
    }
}
