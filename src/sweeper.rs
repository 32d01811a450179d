//! The sweeper: takes work back from workers that can no longer do it. On every
//! `cleanup_interval` tick it requeues tasks whose lease ran out (no heartbeat renewed them
//! within `stale_task_timeout`) and tasks still unreported `heartbeat_timeout` after their
//! deadline (a worker that ignores deadlines, or a handler that hangs while its worker
//! heartbeats: the lease alone would keep such a task there for good); when the registry
//! declares a worker DEAD it requeues that worker's tasks at once. A task out of attempts
//! becomes `failed`. Each requeue is a
//! conditional update, so it never overwrites a completion that raced it, and running it on
//! every replica at once is safe.

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use std::{sync::Arc, time::Duration};

use crate::{
    registry::DeadSession,
    scheduler::OnRequeue,
    store::{Requeued, Store},
};

/// Tasks requeued per statement when leases expire.
const BATCH: u32 = 500;

#[derive(Debug)]
pub struct Sweeper {
    store: Store,
    /// The effects of each requeue (the core's).
    effects: Arc<dyn OnRequeue>,
    interval: Duration,
    /// After the database was unreachable, expired leases are left alone this long after it
    /// came back, so workers that kept heartbeating through the outage renew them first
    /// (2x `heartbeat_timeout`: every live worker heartbeats six times in it).
    outage_hold: Duration,
    /// The registry holds the sender: sessions that just went DEAD.
    dead_rx: mpsc::UnboundedReceiver<DeadSession>,
    /// How long after its deadline an attempt may still be reported before it is taken back:
    /// a worker that keeps deadlines reports the failure itself well within it.
    overdue_grace: Duration,
}

/// What a sweep takes back.
#[derive(Debug, Clone, Copy)]
enum Sweep {
    /// Leases that ran out.
    Expired,
    /// Attempts past their deadline and its grace.
    Overdue,
}

impl Sweep {
    fn what(self) -> &'static str {
        match self {
            Sweep::Expired => "expired leases",
            Sweep::Overdue => "attempts past their deadline",
        }
    }
}

impl Sweeper {
    pub fn new(
        store: Store,
        effects: Arc<dyn OnRequeue>,
        interval: Duration,
        outage_hold: Duration,
        dead_rx: mpsc::UnboundedReceiver<DeadSession>,
        overdue_grace: Duration,
    ) -> Self {
        Self { store, effects, interval, outage_hold, dead_rx, overdue_grace }
    }

    pub async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(dead) = self.dead_rx.recv() => self.worker_dead(&dead).await,
                _ = tick.tick() => self.sweep_expired().await,
            }
        }
        Ok(())
    }

    /// Requeues every task of a DEAD session, if it is still the worker's current one.
    pub async fn worker_dead(&self, dead: &DeadSession) {
        let worker = &dead.worker_id;
        match self.store.requeue_worker(worker, dead.session_id).await {
            Ok(requeued) => {
                if !requeued.is_empty() {
                    info!(worker_id = %worker, session_id = %dead.session_id, count = requeued.len(), "requeued tasks of a dead worker");
                }
                self.after(&requeued);
            }
            // The leases still run out: the next tick's sweep takes them.
            Err(error) => warn!(%error, worker_id = %worker, "failed to requeue tasks of a dead worker"),
        }
    }

    /// Requeues tasks whose lease expired, then those past their deadline, in batches until
    /// none is left.
    pub async fn sweep_expired(&self) {
        // Leases cannot be renewed during an outage: after one, live workers get time to renew
        // them before any is taken back. A probe first, with a deadline: during an outage calls
        // often hang on a connection rather than fail, and a sweep that hung would run the
        // moment the database returned, before anybody could renew.
        let health = self.store.health();
        if tokio::time::timeout(self.outage_hold / 2, self.store.ping()).await.is_err() {
            health.mark_down();
            return;
        }
        if health.unavailable_within(self.outage_hold) {
            return;
        }
        for sweep in [Sweep::Expired, Sweep::Overdue] {
            // A sweep that failed, or an outage that began meanwhile, ends the tick: reports
            // that could not land during an outage must not be charged as late.
            if !self.sweep(sweep).await || health.unavailable_within(self.outage_hold) {
                return;
            }
        }
    }

    /// One kind of sweep, in batches until none is left; false when a batch failed.
    async fn sweep(&self, sweep: Sweep) -> bool {
        loop {
            let requeued = match sweep {
                Sweep::Expired => self.store.requeue_expired(BATCH).await,
                Sweep::Overdue => self.store.requeue_overdue(BATCH, self.overdue_grace).await,
            };
            match requeued {
                Ok(requeued) => {
                    for r in &requeued {
                        warn!(task_id = %r.task_id, worker_id = %r.worker_id, attempt = r.attempt,
                              next = %r.state, reason = r.reason.as_str(), "task taken back from its worker");
                    }
                    self.after(&requeued);
                    if (requeued.len() as u32) < BATCH {
                        return true;
                    }
                }
                Err(error) => {
                    warn!(%error, "failed to requeue {}", sweep.what());
                    return false;
                }
            }
        }
    }

    fn after(&self, requeued: &[Requeued]) {
        self.effects.requeued(requeued);
    }
}
