//! The sweeper: takes work back from workers that can no longer do it. On every
//! `cleanup_interval` tick it requeues tasks whose lease ran out (no heartbeat renewed them
//! within `stale_task_timeout`); when the registry declares a worker DEAD it requeues that
//! worker's tasks at once. A task out of attempts becomes `failed`. Each requeue is a
//! conditional update, so it never overwrites a completion that raced it, and running it on
//! every replica at once is safe.

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    domain::{TaskState, WorkerId},
    events::Events,
    metrics,
    registry::Registry,
    scheduler::Wake,
    store::{Requeued, Store},
};

/// Tasks requeued per statement when leases expire.
const BATCH: u32 = 500;

#[derive(Debug)]
pub struct Sweeper {
    store: Store,
    registry: Registry,
    wake: Wake,
    events: Events,
    interval: std::time::Duration,
    /// The registry holds the sender: workers that just went DEAD.
    dead_rx: mpsc::UnboundedReceiver<WorkerId>,
}

impl Sweeper {
    pub fn new(
        store: Store,
        registry: Registry,
        wake: Wake,
        events: Events,
        interval: std::time::Duration,
        dead_rx: mpsc::UnboundedReceiver<WorkerId>,
    ) -> Self {
        Self { store, registry, wake, events, interval, dead_rx }
    }

    pub async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(worker) = self.dead_rx.recv() => self.worker_dead(&worker).await,
                _ = tick.tick() => self.sweep_expired().await,
            }
        }
        Ok(())
    }

    /// Requeues every task of a DEAD worker.
    pub async fn worker_dead(&self, worker: &WorkerId) {
        match self.store.requeue_worker(worker).await {
            Ok(requeued) => {
                if !requeued.is_empty() {
                    info!(worker_id = %worker, count = requeued.len(), "requeued tasks of a dead worker");
                }
                self.after(&requeued);
            }
            // The leases still run out: the next tick's sweep takes them.
            Err(error) => warn!(%error, worker_id = %worker, "failed to requeue tasks of a dead worker"),
        }
    }

    /// Requeues tasks whose lease expired, in batches until none is left.
    pub async fn sweep_expired(&self) {
        loop {
            match self.store.requeue_expired(BATCH).await {
                Ok(requeued) => {
                    for r in &requeued {
                        warn!(task_id = %r.task_id, worker_id = %r.worker_id, attempt = r.attempt,
                              next = %r.state, "lease expired; task taken back");
                    }
                    self.after(&requeued);
                    if (requeued.len() as u32) < BATCH {
                        return;
                    }
                }
                Err(error) => {
                    warn!(%error, "failed to requeue expired leases");
                    return;
                }
            }
        }
    }

    fn after(&self, requeued: &[Requeued]) {
        for r in requeued {
            self.registry.release(&r.worker_id, r.task_id, r.attempt);
            metrics::task_requeued(r.reason);
            if r.state == TaskState::Failed {
                metrics::task_failed(&r.task_type, None);
                warn!(task_id = %r.task_id, worker_id = %r.worker_id, attempt = r.attempt, "task failed: out of attempts");
            }
            self.events.changed(r.task_id);
        }
        if !requeued.is_empty() {
            self.wake.wake();
        }
    }
}
