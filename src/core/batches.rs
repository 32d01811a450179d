//! The batched store writes the use cases share: completions (with the effects of each one,
//! applied in the batch loop right after the commit), lease renewals from heartbeats, the
//! delayed `running` marks of delivered assignments, and the closed task streams. The app
//! spawns their loops and waits for them at shutdown.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use tokio::task::JoinHandle;
use uuid::Uuid;

use super::effects::{Effects, Reported};
use crate::{
    batch::Batcher,
    domain::WorkerId,
    scheduler::Refiller,
    store::{Completion, Held, ReportOutcome, Store},
};

/// Rows per batched statement for completions and lease renewals.
const BATCH_MAX: usize = 512;
/// A delivered task is marked `running` this long after it left on its stream, in one batched
/// statement. Short tasks have usually reported by then, and their update finds nothing to do:
/// that halves the writes per task under load (measured: ~4,100 -> ~8,000 tasks/s on Postgres).
/// A long task shows `running` a quarter of a second after it started.
pub const DELIVERY_MARK_DELAY: Duration = Duration::from_millis(250);
/// Deliveries per batch: enough for DELIVERY_MARK_DELAY at well over 10,000 tasks/s.
const DELIVERY_BATCH_MAX: usize = 4096;

/// The senders of the batch loops. Cheap to clone; a loop ends once all its senders are gone.
#[derive(Debug, Clone)]
pub struct Batchers {
    /// Completions in, their outcomes out; the batch loop applies each one's effects after the
    /// commit, whatever became of the request that sent it.
    pub completions: Batcher<Completion, ReportOutcome>,
    /// One heartbeat's running tasks in, the ones still held out.
    pub renewals: Batcher<Vec<Held>, Vec<Held>>,
    /// Assignments that left on a stream, and when: assigned -> running, a little later.
    pub deliveries: Batcher<(Held, Instant), ()>,
    /// Sessions whose task stream closed here (false) or opened again (true): their rows say
    /// so, the last word for a session winning.
    pub streams: Batcher<(WorkerId, Uuid, bool), ()>,
}

/// Starts the batch loops: their senders, and the handles to wait for at shutdown.
///
/// With `refill`, a batch of completions also claims the next tasks for the slots it frees
/// while tasks wait ([`Refiller`]).
pub fn spawn(
    store: &Store,
    lease: Duration,
    effects: &Effects,
    refill: Option<Refiller>,
) -> (Batchers, Vec<JoinHandle<()>>) {
    let s = store.clone();
    let fx = effects.clone();
    // The effects of each completion run here, in the batch loop, right after the commit: a
    // report whose request was dropped meanwhile still frees its slot.
    let (completions, h1) = Batcher::spawn(BATCH_MAX, move |items: Vec<Completion>| {
        let s = s.clone();
        let fx = fx.clone();
        let refill = refill.clone();
        async move {
            let reported = |outcomes: &[ReportOutcome]| {
                for (item, outcome) in items.iter().zip(outcomes) {
                    fx.reported(&item.held, outcome, Reported::Completed);
                }
            };
            match &refill {
                Some(refill) => refill.complete(&items, reported).await,
                None => {
                    let outcomes = s.complete(&items).await?;
                    reported(&outcomes);
                    Ok(outcomes)
                }
            }
        }
    });
    let s = store.clone();
    let (renewals, h2) = Batcher::spawn(BATCH_MAX, move |requests: Vec<Vec<Held>>| {
        let s = s.clone();
        async move {
            let all: Vec<Held> = requests.iter().flatten().cloned().collect();
            // Matched by (task, worker, attempt): one worker's renewal never answers another's.
            let renewed: HashSet<Held> = s.renew_leases(&all, lease).await?.into_iter().collect();
            Ok(requests.iter().map(|r| r.iter().filter(|h| renewed.contains(h)).cloned().collect()).collect())
        }
    });
    let s = store.clone();
    let fx = effects.clone();
    let (deliveries, h3) = Batcher::spawn(DELIVERY_BATCH_MAX, move |mut items: Vec<(Held, Instant)>| {
        let s = s.clone();
        let fx = fx.clone();
        async move {
            let answers = vec![(); items.len()];
            if let Some(oldest) = items.iter().map(|(_, at)| *at).min() {
                tokio::time::sleep_until((oldest + DELIVERY_MARK_DELAY).into()).await;
            }
            // Those that reported meanwhile need no mark: their result was written instead.
            fx.retain_running(&mut items);
            s.mark_delivered(&items).await?;
            Ok(answers)
        }
    });
    let s = store.clone();
    let (streams, h4) = Batcher::spawn(BATCH_MAX, move |changes: Vec<(WorkerId, Uuid, bool)>| {
        let s = s.clone();
        async move {
            s.streams_changed(&changes).await?;
            Ok(vec![(); changes.len()])
        }
    });
    (Batchers { completions, renewals, deliveries, streams }, vec![h1, h2, h3, h4])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        domain::{Wake, WorkerId},
        events::Events,
        registry::{Registry, RegistryConfig},
        store::testing::{self, TestDb},
        wakeups::Notifier,
    };

    /// A report whose request is dropped once it is queued (a client that hung up, a connection
    /// cut) still frees its worker's slot: the effects run in the batch loop after the commit.
    #[tokio::test]
    async fn a_report_dropped_after_it_was_queued_still_frees_the_slot() {
        let db = TestDb::sqlite().await;
        let store = db.store.clone();
        let wake = Wake::default();
        let config = RegistryConfig::for_tests();
        let (registry, _dead) = Registry::new(config, store.clone(), wake.clone());
        let worker = WorkerId::from("w1");
        let session = registry.register(testing::registration("w1", 1)).await.unwrap().session_id;
        let (_stream, _rx) = registry.attach(&worker, None).unwrap();
        store.create_tasks(&[testing::new_task("prove")]).await.unwrap();
        let a = testing::claim_one(&store, &worker).await.remove(0);
        let held = Held { task_id: a.task_id, worker_id: worker.clone(), attempt: a.attempt };
        registry.push(a, session).unwrap();
        assert_eq!(registry.session(&worker).unwrap().in_flight, 1);

        let effects = Effects::new(registry.clone(), wake, Events::new(), Notifier::disabled());
        let (batchers, _handles) = spawn(&store, Duration::from_secs(60), &effects, None);
        let mut call =
            Box::pin(batchers.completions.call(Completion { held, result: b"ok".to_vec(), delivered: None }));
        assert!(futures::poll!(&mut call).is_pending(), "queued, waiting for its answer");
        drop(call);
        let deadline = Instant::now() + Duration::from_secs(10);
        while registry.session(&worker).unwrap().in_flight != 0 {
            assert!(Instant::now() < deadline, "the slot was never freed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        db.cleanup().await;
    }
}
