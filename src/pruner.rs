//! The pruner: deletes what retention no longer keeps (`retention.*`): finished tasks past
//! their state's age, with their attempts, job memberships and idempotency keys; jobs left
//! without members; workers long silent that hold nothing. Every `retention.interval` it deletes
//! in steps of `retention.batch_size` rows, each step a transaction of its own, until a step
//! finds less than a batch. Pending, assigned and running tasks are never touched: each delete
//! is conditional on the row still qualifying. On Postgres one replica prunes at a time (an
//! advisory lock per step); the others find it taken and wait for their next tick.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    config::RetentionConfig,
    metrics,
    store::{Pruned, Retention, Store},
};

#[derive(Debug)]
pub struct Pruner {
    store: Store,
    rules: Retention,
    interval: Duration,
    batch_size: u32,
}

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pass {
    pub pruned: Pruned,
    /// Steps run (each one transaction).
    pub steps: u32,
    /// True when another replica held the pruner's lock.
    pub elsewhere: bool,
}

impl Pruner {
    pub fn new(store: Store, config: &RetentionConfig) -> Self {
        Self {
            store,
            rules: Retention::from(config),
            interval: config.interval,
            batch_size: config.batch_size,
        }
    }

    /// Prunes every `interval` until `stop`. The first pass runs one interval after start, so
    /// replicas starting together do not begin by competing for the lock.
    pub async fn run(self, stop: CancellationToken) -> anyhow::Result<()> {
        if self.rules == Retention::default() {
            info!("retention keeps everything: the pruner is off");
            stop.cancelled().await;
            return Ok(());
        }
        let start = tokio::time::Instant::now() + self.interval;
        let mut tick = tokio::time::interval_at(start, self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return Ok(()),
                _ = tick.tick() => {}
            }
            self.pass(&stop).await;
        }
    }

    /// Deletes step after step until a step finds less than a batch, another replica holds the
    /// lock, the database fails (the next tick tries again) or `stop` fires.
    pub async fn pass(&self, stop: &CancellationToken) -> Pass {
        let mut pass = Pass::default();
        while !stop.is_cancelled() {
            match self.store.prune(&self.rules, self.batch_size).await {
                Ok(Some(step)) => {
                    pass.steps += 1;
                    pass.pruned.add(step);
                    for (table, n) in step.by_table() {
                        metrics::pruned_rows(table, n);
                    }
                    if !step.full(self.batch_size) {
                        break;
                    }
                    // Room for the transactions of the data path between steps.
                    tokio::task::yield_now().await;
                }
                Ok(None) => {
                    pass.elsewhere = true;
                    debug!("another replica is pruning");
                    break;
                }
                Err(error) => {
                    warn!(%error, "pruning failed; trying again at the next interval");
                    break;
                }
            }
        }
        let p = pass.pruned;
        if p != Pruned::default() {
            info!(
                tasks = p.tasks,
                task_attempts = p.task_attempts,
                job_tasks = p.job_tasks,
                jobs = p.jobs,
                workers = p.workers,
                steps = pass.steps,
                "pruned rows past retention"
            );
        }
        pass
    }
}
