//! The effects of each task transition, in one place: free the worker's slot, count it, publish
//! the change to watchers, wake the scheduler, tell other replicas, push a cancellation.
//!
//! Each function runs after the transition's commit, and callers run the store call and its
//! effects together in a task of their own ([`Effects::detached`], or the batch loop for
//! completions), so a request future dropped after the commit (a client that hung up, a
//! connection cut) cannot skip them. `Duplicate` and `Stale` answers free the slot too: the
//! release is fenced by attempt, so it only ever frees the slot of that very attempt.

use std::{future::Future, time::Instant};

use tracing::{Instrument, info, warn};

use crate::{
    domain::{TaskId, TaskState, Wake, WorkerId},
    events::Events,
    metrics,
    registry::Registry,
    scheduler::OnRequeue,
    store::{Cancelled, Created, Held, ReportOutcome, Requeued, Settled},
    wakeups::Notifier,
};

/// Cheap to clone.
#[derive(Debug, Clone)]
pub struct Effects {
    registry: Registry,
    wake: Wake,
    events: Events,
    notifier: Notifier,
}

/// What a worker reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reported {
    Completed,
    Failed,
}

impl Effects {
    pub fn new(registry: Registry, wake: Wake, events: Events, notifier: Notifier) -> Self {
        Self { registry, wake, events, notifier }
    }

    /// Runs `transition` (a store call followed by its effects) to the end in a task of its own
    /// and waits for it: dropping the caller does not stop it. The task runs in the caller's
    /// span, so its database calls stay in the caller's trace.
    pub async fn detached<T: Send + 'static>(
        transition: impl Future<Output = T> + Send + 'static,
    ) -> Result<T, tokio::task::JoinError> {
        tokio::spawn(transition.in_current_span()).await
    }

    /// Drops from `delivered` the attempts already over here, before their `running` mark
    /// ([`Registry::retain_held`]): under load most have reported by then, and their update would
    /// find nothing to do.
    pub fn retain_running(&self, delivered: &mut Vec<(Held, Instant)>) {
        self.registry.retain_held(delivered);
    }

    /// A submission answered `created`: the new tasks among them not assigned as they were
    /// stored wait for a claim.
    pub fn stored(&self, created: &[Created]) {
        let new = created.iter().filter(|c| c.created);
        let waiting = new.clone().filter(|c| c.task.state != TaskState::Assigned).count();
        self.submitted(new.count(), waiting);
    }

    /// New tasks were stored, `waiting` of them for a claim (the others were assigned as they
    /// were stored).
    pub fn submitted(&self, created: usize, waiting: usize) {
        if created == 0 {
            return;
        }
        metrics::tasks_submitted(created as u64);
        if waiting > 0 {
            self.wake.wake();
            self.notifier.runnable();
        }
    }

    /// A type's concurrency limit changed: tasks it held back may start, here and on every
    /// replica.
    pub fn limits_changed(&self) {
        self.wake.wake();
        self.notifier.runnable();
    }

    /// A worker registered a new session here: another replica holding an older session of it
    /// drops that one.
    pub fn registered(&self, worker: &WorkerId) {
        self.notifier.registered(worker.clone());
    }

    /// A worker's report was answered.
    pub fn reported(&self, held: &Held, outcome: &ReportOutcome, what: Reported) {
        let released = self.registry.release(&held.worker_id, held.task_id, held.attempt);
        let ReportOutcome::Applied { state } = outcome else {
            // Duplicate or stale: nothing changed in the store; the slot (if this process
            // still counted one for the attempt) is free all the same.
            return;
        };
        let (task_type, elapsed) = match &released {
            Some(r) => (r.task_type.as_deref().unwrap_or("unknown"), Some(r.elapsed)),
            None => ("unknown", None),
        };
        match what {
            Reported::Completed => metrics::task_completed(task_type, elapsed),
            Reported::Failed => metrics::task_failed(task_type, elapsed),
        }
        self.events.changed(held.task_id);
        self.wake.wake();
        if state.is_terminal() {
            self.notifier.finished(held.task_id);
        } else {
            // A retriable failure: back to pending after its backoff.
            self.notifier.runnable();
        }
    }

    /// The worker's attempt is no longer held (a hand-back that found it gone): its slot, if
    /// this process still counted one for that attempt, is free.
    pub fn not_held(&self, held: &Held) {
        self.registry.release(&held.worker_id, held.task_id, held.attempt);
    }

    /// Held tasks were given back (lease expired, worker dead, undelivered, released).
    pub fn requeued(&self, requeued: &[Requeued]) {
        for r in requeued {
            if r.reason.may_still_run() {
                self.stop(&r.held());
            } else {
                self.registry.release(&r.worker_id, r.task_id, r.attempt);
            }
            metrics::task_requeued(r.reason);
            if r.state == TaskState::Failed {
                metrics::task_failed(&r.task_type, None);
                warn!(task_id = %r.task_id, worker_id = %r.worker_id, attempt = r.attempt, "task failed: out of attempts");
                self.notifier.finished(r.task_id);
            }
            self.events.changed(r.task_id);
        }
        if requeued.iter().any(|r| r.state == TaskState::Pending) {
            self.notifier.runnable();
        }
        if !requeued.is_empty() {
            self.wake.wake();
        }
    }

    /// Failed or cancelled tasks were put back to pending: as a submission, the scheduler
    /// here and on every replica wakes for them, and their watchers re-read them.
    pub fn retried(&self, ids: &[TaskId]) {
        if ids.is_empty() {
            return;
        }
        for id in ids {
            self.events.changed(*id);
        }
        self.wake.wake();
        self.notifier.runnable();
    }

    /// Dependent tasks a transition released (now pending: this scheduler and every replica's
    /// wake for them) or ended (a parent failed for good or was cancelled).
    pub fn settled(&self, s: &Settled) {
        for id in &s.released {
            self.events.changed(*id);
        }
        if !s.released.is_empty() {
            self.wake.wake();
            self.notifier.runnable();
        }
        for (id, state) in &s.ended {
            if *state == TaskState::Cancelled {
                metrics::task_cancelled();
            } else {
                metrics::task_failed("", None);
            }
            self.events.changed(*id);
            self.notifier.finished(*id);
        }
        if !s.ended.is_empty() {
            info!(count = s.ended.len(), "dependent tasks ended with a parent that failed or was cancelled");
        }
    }

    /// An attempt the worker may still run is over (cancelled, or taken back from it): frees
    /// its slot and tells the worker to stop it, here or, through the announcement, on the
    /// replica it streams from. A worker that misses both stops at the answer to its next
    /// heartbeat, which revokes an attempt its replica no longer counts. True when it was
    /// pushed here.
    fn stop(&self, h: &Held) -> bool {
        self.notifier.cancelled(h);
        self.registry.push_cancel(&h.worker_id, h.task_id, h.attempt)
    }

    /// A client cancelled a task.
    pub fn cancelled(&self, c: &Cancelled) {
        if !c.applied {
            return;
        }
        metrics::task_cancelled();
        self.events.changed(c.task.id);
        self.notifier.finished(c.task.id);
        if let Some(h) = &c.held_by {
            let told = self.stop(h);
            info!(task_id = %h.task_id, worker_id = %h.worker_id, attempt = h.attempt, pushed = told, "cancelled a held task");
        }
    }
}

impl OnRequeue for Effects {
    fn requeued(&self, requeued: &[Requeued]) {
        Effects::requeued(self, requeued);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        domain::WorkerId,
        registry::RegistryConfig,
        store::testing::{self, TestDb},
    };

    /// A retried report answered `Duplicate` (its first answer was lost with the slot still
    /// counted) frees the slot of that attempt, and a `Stale` one frees nothing else.
    #[tokio::test]
    async fn duplicate_and_stale_answers_free_only_that_attempts_slot() {
        let db = TestDb::sqlite().await;
        let wake = Wake::default();
        let config = RegistryConfig::for_tests();
        let (registry, _dead) = Registry::new(config, db.store.clone(), wake.clone());
        let w = WorkerId::from("w1");
        let session = registry.register(testing::registration("w1", 2)).await.unwrap().session_id;
        let (_, _rx) = registry.attach(&w, None).unwrap();
        db.store.create_tasks(&[testing::new_task("prove")]).await.unwrap();
        let a = testing::claim_one(&db.store, &w).await.remove(0);
        let held = Held { task_id: a.task_id, worker_id: w.clone(), attempt: a.attempt };
        registry.push(a, session).unwrap();
        let effects = Effects::new(registry.clone(), wake, Events::new(), Notifier::disabled());
        let in_flight = || registry.session(&w).unwrap().in_flight;

        let older = Held { attempt: held.attempt - 1, ..held.clone() };
        effects.reported(
            &older,
            &ReportOutcome::Stale { state: TaskState::Assigned, attempt: 1 },
            Reported::Completed,
        );
        assert_eq!(in_flight(), 1, "a stale report of another attempt leaves the slot alone");
        effects.reported(
            &held,
            &ReportOutcome::Duplicate { state: TaskState::Completed },
            Reported::Completed,
        );
        assert_eq!(in_flight(), 0, "the duplicate frees the slot its lost answer never freed");
        db.cleanup().await;
    }
}
