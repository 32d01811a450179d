//! The rules of a task's life, written once for both dialects: the backoff before a retry, which
//! lost attempts are charged, what a failure report or a lost attempt does to a task, and how a
//! report that changed nothing is answered. Pure functions; each dialect reads the row's counts,
//! asks here, and binds the answer (next status, charged failures, delay, error text) into its
//! statement, so no rule is restated in SQL.

use std::time::Duration;

use super::{Held, ReportOutcome};
use crate::domain::{Attempt, RequeueReason, TaskState};

/// Exponential backoff for retriable failures: `base * 2^(failures-1)`, capped at `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub base: Duration,
    pub max: Duration,
}

impl RetryPolicy {
    /// The delay before the retry that follows the `failures`-th failure (1-based).
    pub fn backoff(&self, failures: u32) -> Duration {
        let exp = failures.saturating_sub(1).min(30);
        self.base.saturating_mul(1u32 << exp).min(self.max)
    }
}

/// The attempt counters of a held task, as read (and locked) from its row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Charges {
    /// Attempts charged so far.
    pub failures: u32,
    pub max_attempts: u32,
}

/// What a task becomes when its attempt ends without success: the values a dialect writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Next {
    /// `Pending` to run again, or `Failed`.
    pub state: TaskState,
    /// Attempts charged, this one included when it is charged.
    pub failures: u32,
    /// `run_after` becomes now plus this delay; `None` keeps it (a failure report that failed
    /// the task leaves the time it last became runnable).
    pub retry_in: Option<Duration>,
    /// The task's error text; `None` keeps the text it has.
    pub error: Option<String>,
    /// Whether the task keeps naming the worker (a failed report names who failed it).
    pub keeps_worker: bool,
}

impl Next {
    /// True when the task is finished (`finished_at` is set).
    pub fn finished(&self) -> bool {
        self.state.is_terminal()
    }

    /// The delay in whole milliseconds, as the dialects bind it.
    pub fn retry_in_ms(&self) -> Option<i64> {
        self.retry_in.map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    }
}

/// A failure report for the current attempt: always charged; pending again after the backoff
/// while the failure is retriable and attempts remain, failed otherwise.
pub(crate) fn after_failure(c: Charges, retriable: bool, error: &str, policy: RetryPolicy) -> Next {
    let failures = c.failures.saturating_add(1);
    let retry = retriable && failures < c.max_attempts;
    Next {
        state: if retry { TaskState::Pending } else { TaskState::Failed },
        failures,
        retry_in: retry.then(|| policy.backoff(failures)),
        error: Some(error.to_owned()),
        keeps_worker: !retry,
    }
}

/// An attempt lost without a report (lease expired, worker dead, undelivered, released, ...):
/// charged only when [`RequeueReason::charged`]; pending again at once while attempts remain,
/// failed with an error naming the lost attempt when they ran out. No backoff: the attempt did
/// not fail, it was lost (`run_after` is now, whichever the outcome).
pub(crate) fn after_loss(c: Charges, reason: RequeueReason, lost: &Held) -> Next {
    let failures = c.failures.saturating_add(u32::from(reason.charged()));
    let out = failures >= c.max_attempts;
    Next {
        state: if out { TaskState::Failed } else { TaskState::Pending },
        failures,
        retry_in: Some(Duration::ZERO),
        error: out.then(|| lost_error(reason, lost)),
        keeps_worker: false,
    }
}

/// Which held tasks a requeue for `reason` may take: undelivered assignments only while still
/// `assigned` (they never reached the worker), every other reason also once running.
pub(crate) fn takes_running(reason: RequeueReason) -> bool {
    reason != RequeueReason::Undelivered
}

/// Error text kept for a task that ran out of attempts without a report.
fn lost_error(reason: RequeueReason, lost: &Held) -> String {
    format!("attempt {} lost: {} on worker {}", lost.attempt, reason.as_str(), lost.worker_id)
}

/// Decides the outcome of a report that matched no held row, from the task's current row and
/// the attempts history (was this very report accepted before?).
pub(crate) fn classify_unapplied(
    task: Option<(TaskState, Attempt)>,
    prior_outcome: Option<&str>,
    reported: &str,
) -> ReportOutcome {
    match task {
        None => ReportOutcome::NotFound,
        Some((state, attempt)) => {
            if prior_outcome == Some(reported) {
                ReportOutcome::Duplicate { state }
            } else {
                ReportOutcome::Stale { state, attempt }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{TaskId, WorkerId};

    fn lost(attempt: Attempt) -> Held {
        Held { task_id: TaskId::new(), worker_id: WorkerId::from("w1"), attempt }
    }

    const POLICY: RetryPolicy = RetryPolicy { base: Duration::from_millis(100), max: Duration::from_secs(1) };

    #[test]
    fn backoff_doubles_and_caps() {
        let p = POLICY;
        assert_eq!(p.backoff(1), Duration::from_millis(100));
        assert_eq!(p.backoff(2), Duration::from_millis(200));
        assert_eq!(p.backoff(4), Duration::from_millis(800));
        assert_eq!(p.backoff(5), Duration::from_secs(1));
        assert_eq!(p.backoff(90), Duration::from_secs(1));
        assert_eq!(p.backoff(0), Duration::from_millis(100), "no failure yet counts as the first");
    }

    #[test]
    fn a_retriable_failure_with_attempts_left_is_pending_after_its_backoff() {
        let next = after_failure(Charges { failures: 1, max_attempts: 3 }, true, "boom", POLICY);
        assert_eq!(
            next,
            Next {
                state: TaskState::Pending,
                failures: 2,
                retry_in: Some(Duration::from_millis(200)),
                error: Some("boom".into()),
                keeps_worker: false,
            }
        );
        assert!(!next.finished());
        assert_eq!(next.retry_in_ms(), Some(200));
    }

    #[test]
    fn a_failure_that_uses_the_last_attempt_fails_the_task() {
        let next = after_failure(Charges { failures: 2, max_attempts: 3 }, true, "boom", POLICY);
        assert_eq!(next.state, TaskState::Failed);
        assert_eq!(next.failures, 3);
        assert_eq!(next.retry_in, None);
        assert!(next.keeps_worker, "a failed task names the worker that failed it");
        assert!(next.finished());
    }

    #[test]
    fn a_non_retriable_failure_fails_at_once_and_is_charged() {
        let next = after_failure(Charges { failures: 0, max_attempts: 5 }, false, "bad input", POLICY);
        assert_eq!(next.state, TaskState::Failed);
        assert_eq!(next.failures, 1);
        assert_eq!(next.error.as_deref(), Some("bad input"));
    }

    #[test]
    fn a_charged_loss_with_attempts_left_is_pending_now_and_keeps_the_error() {
        for reason in [RequeueReason::LeaseExpired, RequeueReason::WorkerDead, RequeueReason::WorkerRestarted]
        {
            let next = after_loss(Charges { failures: 0, max_attempts: 3 }, reason, &lost(1));
            assert_eq!(next.state, TaskState::Pending, "{reason:?}");
            assert_eq!(next.failures, 1, "{reason:?} is charged");
            assert_eq!(next.retry_in, Some(Duration::ZERO), "{reason:?}: no backoff for a lost attempt");
            assert_eq!(next.error, None, "{reason:?}");
            assert!(!next.keeps_worker);
        }
    }

    #[test]
    fn an_uncharged_loss_is_not_counted() {
        for reason in [RequeueReason::Undelivered, RequeueReason::Released, RequeueReason::NotReceived] {
            let next = after_loss(Charges { failures: 2, max_attempts: 3 }, reason, &lost(7));
            assert_eq!(next.state, TaskState::Pending, "{reason:?}");
            assert_eq!(next.failures, 2, "{reason:?} is not charged");
        }
    }

    #[test]
    fn a_charged_loss_of_the_last_attempt_fails_with_an_error_naming_it() {
        let next =
            after_loss(Charges { failures: 2, max_attempts: 3 }, RequeueReason::LeaseExpired, &lost(3));
        assert_eq!(next.state, TaskState::Failed);
        assert_eq!(next.failures, 3);
        assert_eq!(next.error.as_deref(), Some("attempt 3 lost: lease_expired on worker w1"));
        assert!(!next.keeps_worker);
        assert!(next.finished());
    }

    #[test]
    fn only_undelivered_requeues_leave_running_tasks_alone() {
        for reason in RequeueReason::ALL {
            assert_eq!(takes_running(reason), reason != RequeueReason::Undelivered, "{reason:?}");
        }
    }

    #[test]
    fn an_unapplied_report_is_a_duplicate_only_if_the_same_report_was_recorded() {
        assert_eq!(classify_unapplied(None, None, "completed"), ReportOutcome::NotFound);
        assert_eq!(
            classify_unapplied(Some((TaskState::Completed, 1)), Some("completed"), "completed"),
            ReportOutcome::Duplicate { state: TaskState::Completed }
        );
        assert_eq!(
            classify_unapplied(Some((TaskState::Running, 2)), Some("lease_expired"), "completed"),
            ReportOutcome::Stale { state: TaskState::Running, attempt: 2 }
        );
    }
}
