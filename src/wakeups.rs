//! Wake-ups across replicas: Postgres LISTEN/NOTIFY on one dedicated connection per replica.
//!
//! Submissions and requeues say "there is runnable work" (every replica's scheduler wakes),
//! terminal transitions name their tasks (every replica's `WatchTask` streams re-read them),
//! cancellations of held tasks and sweepers' take-backs name the attempts they ended (the
//! replica the worker streams from pushes the `CANCEL` and frees the slot), and registrations name their workers (a
//! replica holding an older session of one drops it once the database confirms the newer one:
//! the worker moved, and it no longer counts it). The
//! [`Notifier`] coalesces what happened since its last statement into one `pg_notify` call, so
//! a busy replica sends a few notifications per batch rather than one per task, and finished
//! tasks at most every [`FINISHED_SPACING`]. The listener
//! reconnects by itself; when it was away, notifications may have been lost, so it wakes
//! everything once, and `poll_interval` stays the fallback. On SQLite (one process) both are
//! no-ops.
//!
//! PgBouncer in transaction pooling mode does not carry LISTEN: point the coordinator at
//! Postgres directly or through session pooling, or it works on `poll_interval` alone.

use std::{collections::BTreeSet, time::Duration};

use tokio::{sync::mpsc, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::{
    domain::{TaskId, Wake, WorkerId},
    events::Events,
    metrics,
    registry::Registry,
    store::{Held, Store},
};

/// Finished tasks are sent at most this often: under load the notifier would otherwise send a
/// statement (and a commit) per batch of completions, for watchers on the other replicas that
/// then see a completion up to this much later. Runnable work goes out at once.
const FINISHED_SPACING: Duration = Duration::from_millis(5);
/// Task ids per notification: 36-byte ids stay well under Postgres' 8,000-byte payload limit.
const IDS_PER_NOTIFICATION: usize = 150;
/// Bytes of worker ids (or of cancelled attempts) per notification, under the same limit.
const LIST_BYTES_PER_NOTIFICATION: usize = 7000;
/// Backoff of the listener's reconnects.
const RECONNECT_MIN: Duration = Duration::from_millis(200);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

#[derive(Debug)]
enum Note {
    Runnable,
    Finished(TaskId),
    Cancelled(Held),
    Registered(WorkerId),
}

/// Sends notifications to the other replicas. Cheap to clone; never blocks.
#[derive(Debug, Clone)]
pub struct Notifier {
    /// The notifier loop holds the receiver; `None` when there is nobody to tell (SQLite).
    tx: Option<mpsc::UnboundedSender<Note>>,
}

impl Notifier {
    /// A notifier that tells nobody (SQLite, tests).
    pub fn disabled() -> Self {
        Self { tx: None }
    }

    /// There is runnable work: a submission, or a task back to pending.
    pub fn runnable(&self) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Note::Runnable);
        }
    }

    /// A task reached a terminal state.
    pub fn finished(&self, id: TaskId) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Note::Finished(id));
        }
    }

    /// The attempt `held` names is over while its worker may still run it (a client cancelled
    /// it, or a sweeper took it back): the replica that worker streams from tells it to stop.
    pub fn cancelled(&self, held: &Held) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Note::Cancelled(held.clone()));
        }
    }

    /// A worker registered a new session here.
    pub fn registered(&self, id: WorkerId) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Note::Registered(id));
        }
    }
}

/// The two loops of cross-replica wake-ups, for the app to spawn.
#[derive(Debug)]
pub struct Wakeups {
    /// This process's id in payloads, so it ignores its own notifications.
    origin: String,
    store: Store,
    rx: Option<mpsc::UnboundedReceiver<Note>>,
}

impl Wakeups {
    /// The notifier handle and the loops' state; on SQLite the notifier is disabled.
    pub fn new(store: Store) -> (Notifier, Wakeups) {
        let origin = Uuid::now_v7().simple().to_string();
        if store.backend() != "postgres" {
            return (Notifier::disabled(), Wakeups { origin, store, rx: None });
        }
        let (tx, rx) = mpsc::unbounded_channel();
        (Notifier { tx: Some(tx) }, Wakeups { origin, store, rx: Some(rx) })
    }

    /// The listener's part and the notifier's part, to run as two loops.
    pub fn split(self) -> (Wakeups, Wakeups) {
        let listener = Wakeups { origin: self.origin.clone(), store: self.store.clone(), rx: None };
        (listener, self)
    }

    /// Sends what the notifier collected until `shutdown` (and the rest after it).
    pub async fn run_notifier(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Some(mut rx) = self.rx.take() else {
            // Nobody to tell (SQLite): idle until shutdown, like every supervised loop.
            shutdown.cancelled().await;
            return Ok(());
        };
        let mut notes = Vec::new();
        let mut last_sent: Option<Instant> = None;
        loop {
            let n = tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    rx.close();
                    rx.recv_many(&mut notes, usize::MAX).await
                }
                n = rx.recv_many(&mut notes, 4096) => n,
            };
            if n == 0 {
                return Ok(());
            }
            if let Some(last) = last_sent {
                gather(&mut rx, &mut notes, last + FINISHED_SPACING, &shutdown).await;
            }
            let payloads = encode(&self.origin, notes.drain(..));
            last_sent = Some(Instant::now());
            if let Err(error) = self.store.notify(&payloads).await {
                // Lost notifications cost latency only: the other replicas poll.
                debug!(%error, "failed to notify other replicas");
            } else {
                metrics::notifications("sent", payloads.len() as u64);
            }
            if shutdown.is_cancelled() && rx.is_empty() {
                return Ok(());
            }
        }
    }

    /// Listens until `shutdown`, waking the scheduler and watchers, and telling `registry` of
    /// workers that registered elsewhere.
    pub async fn run_listener(
        self,
        wake: Wake,
        events: Events,
        registry: Registry,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        if self.store.backend() != "postgres" {
            shutdown.cancelled().await;
            return Ok(());
        }
        let mut delay = RECONNECT_MIN;
        loop {
            let listener = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(()),
                l = self.store.listen() => l,
            };
            let mut listener = match listener {
                Some(Ok(l)) => l,
                Some(Err(error)) => {
                    warn!(%error, retry_in_ms = delay.as_millis() as u64, "cannot listen for other replicas; polling meanwhile");
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(RECONNECT_MAX);
                    continue;
                }
                None => {
                    shutdown.cancelled().await;
                    return Ok(());
                }
            };
            delay = RECONNECT_MIN;
            info!("listening for other replicas");
            // Whatever was sent while nobody listened: look again.
            wake.wake();
            events.everything();
            loop {
                let got = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return Ok(()),
                    n = listener.try_recv() => n,
                };
                match got {
                    Ok(Some(n)) => {
                        metrics::notifications("received", 1);
                        match decode(&self.origin, n.payload()) {
                            Decoded::Own => {}
                            Decoded::Runnable => wake.wake(),
                            Decoded::Finished(ids) => {
                                for id in ids {
                                    events.changed(id);
                                }
                            }
                            // A replica without the worker's session has nothing to free
                            // and no stream to tell.
                            Decoded::Cancelled(held) => {
                                for h in held {
                                    registry.push_cancel(&h.worker_id, h.task_id, h.attempt);
                                }
                            }
                            // Checked against the database in a task of its own: the listener
                            // never waits on a query.
                            Decoded::Registered(ids) => {
                                let registry = registry.clone();
                                tokio::spawn(async move { registry.drop_superseded(ids).await });
                            }
                            Decoded::Unknown => debug!(payload = n.payload(), "unknown notification ignored"),
                        }
                    }
                    // The connection dropped; the next try_recv reconnects. Notifications sent
                    // meanwhile are lost: wake everything once.
                    Ok(None) => {
                        warn!("lost the notification connection; reconnecting");
                        wake.wake();
                        events.everything();
                    }
                    Err(error) => {
                        warn!(%error, "notification connection failed; reconnecting");
                        break;
                    }
                }
            }
        }
    }
}

/// Waits until `until` for more notes while `notes` holds only finished tasks and workers,
/// adding what comes to `notes`; returns at once when a runnable note is among them (a
/// submission on this replica for a worker on another must not wait), at `shutdown`, or when
/// the notifier's senders are gone.
async fn gather(
    rx: &mut mpsc::UnboundedReceiver<Note>,
    notes: &mut Vec<Note>,
    until: Instant,
    shutdown: &CancellationToken,
) {
    let mut seen = 0;
    loop {
        if notes[seen..].iter().any(|n| matches!(n, Note::Runnable)) {
            return;
        }
        seen = notes.len();
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(until) => return,
            n = rx.recv_many(notes, 4096) => if n == 0 { return },
        }
    }
}

/// Payloads: `<origin> r` (runnable work), `<origin> f <id>,<id>,...` (finished tasks),
/// `<origin> c <task>=<attempt>=<worker>,...` (cancelled attempts) and
/// `<origin> w <worker>,<worker>,...` (workers that registered; their ids have neither commas
/// nor `=`).
fn encode(origin: &str, notes: impl Iterator<Item = Note>) -> Vec<String> {
    let mut runnable = false;
    let mut finished = BTreeSet::new();
    let mut cancelled = BTreeSet::new();
    let mut registered = BTreeSet::new();
    for n in notes {
        match n {
            Note::Runnable => runnable = true,
            Note::Finished(id) => {
                finished.insert(id);
            }
            Note::Cancelled(h) => {
                cancelled.insert(format!("{}={}={}", h.task_id, h.attempt, h.worker_id.0));
            }
            Note::Registered(id) => {
                registered.insert(id.0);
            }
        }
    }
    let mut out = Vec::new();
    if runnable {
        out.push(format!("{origin} r"));
    }
    let ids: Vec<String> = finished.into_iter().map(|id| id.to_string()).collect();
    for chunk in ids.chunks(IDS_PER_NOTIFICATION) {
        out.push(format!("{origin} f {}", chunk.join(",")));
    }
    listed(&mut out, origin, "c", cancelled);
    listed(&mut out, origin, "w", registered);
    out
}

/// `items` joined by commas into payloads `<origin> <kind> ...` of bounded size.
fn listed(out: &mut Vec<String>, origin: &str, kind: &str, items: BTreeSet<String>) {
    let mut list = String::new();
    for item in items {
        if !list.is_empty() && list.len() + item.len() >= LIST_BYTES_PER_NOTIFICATION {
            out.push(format!("{origin} {kind} {list}"));
            list.clear();
        }
        if !list.is_empty() {
            list.push(',');
        }
        list.push_str(&item);
    }
    if !list.is_empty() {
        out.push(format!("{origin} {kind} {list}"));
    }
}

#[derive(Debug, PartialEq)]
enum Decoded {
    Own,
    Runnable,
    Finished(Vec<TaskId>),
    Cancelled(Vec<Held>),
    Registered(Vec<WorkerId>),
    Unknown,
}

fn decode(origin: &str, payload: &str) -> Decoded {
    let mut parts = payload.splitn(3, ' ');
    let (Some(from), Some(kind)) = (parts.next(), parts.next()) else { return Decoded::Unknown };
    if from == origin {
        return Decoded::Own;
    }
    match (kind, parts.next()) {
        ("r", None) => Decoded::Runnable,
        ("f", Some(ids)) => Decoded::Finished(ids.split(',').filter_map(|s| s.parse().ok()).collect()),
        ("c", Some(list)) => Decoded::Cancelled(list.split(',').filter_map(cancelled_attempt).collect()),
        ("w", Some(ids)) => Decoded::Registered(ids.split(',').map(WorkerId::from).collect()),
        _ => Decoded::Unknown,
    }
}

/// `<task>=<attempt>=<worker>`.
fn cancelled_attempt(s: &str) -> Option<Held> {
    let mut parts = s.splitn(3, '=');
    let task_id = parts.next()?.parse().ok()?;
    let attempt = parts.next()?.parse().ok()?;
    let worker_id = WorkerId::from(parts.next().filter(|w| !w.is_empty())?);
    Some(Held { task_id, worker_id, attempt })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_coalesce_and_round_trip() {
        let ids: Vec<TaskId> = (0..400).map(|_| TaskId::new()).collect();
        let notes = std::iter::repeat_with(|| Note::Runnable)
            .take(50)
            .chain(ids.iter().map(|id| Note::Finished(*id)))
            .chain(ids.iter().take(10).map(|id| Note::Finished(*id)));
        let payloads = encode("a", notes);
        // One runnable, 400 distinct ids in chunks of 150.
        assert_eq!(payloads.len(), 1 + 3);
        assert!(payloads.iter().all(|p| p.len() < 8000));
        assert_eq!(decode("b", &payloads[0]), Decoded::Runnable);
        let mut back = Vec::new();
        for p in &payloads[1..] {
            match decode("b", p) {
                Decoded::Finished(ids) => back.extend(ids),
                other => panic!("{other:?}"),
            }
        }
        back.sort();
        let mut want = ids.clone();
        want.sort();
        assert_eq!(back, want);
        assert_eq!(decode("a", &payloads[0]), Decoded::Own, "own notifications are ignored");
        assert_eq!(decode("b", "garbage"), Decoded::Unknown);
    }

    /// Registered workers go out once each, in payloads under Postgres' limit however long
    /// their ids, and come back as sent.
    #[test]
    fn registered_workers_round_trip_in_bounded_payloads() {
        let long: Vec<WorkerId> = (0..200).map(|i| WorkerId(format!("{i:03}-{}", "x".repeat(120)))).collect();
        let notes = long
            .iter()
            .chain(long.iter().take(5))
            .map(|id| Note::Registered(id.clone()))
            .chain([Note::Finished(TaskId::new())]);
        let payloads = encode("a", notes);
        let workers: Vec<&String> = payloads.iter().filter(|p| p.starts_with("a w ")).collect();
        assert!(workers.len() > 1, "split: {}", workers.len());
        assert!(payloads.iter().all(|p| p.len() < 8000));
        let mut back = Vec::new();
        for p in workers {
            match decode("b", p) {
                Decoded::Registered(ids) => back.extend(ids),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(back, long, "each once, in order");
        assert_eq!(decode("b", "a w gpu-1"), Decoded::Registered(vec![WorkerId::from("gpu-1")]));
        assert_eq!(decode("a", "a w gpu-1"), Decoded::Own);
    }

    /// Cancelled attempts go out once each, with worker ids of every allowed character, in
    /// payloads under Postgres' limit, and come back as sent; a malformed entry is skipped.
    #[test]
    fn cancelled_attempts_round_trip_in_bounded_payloads() {
        let held: Vec<Held> = (0..120)
            .map(|i| Held {
                task_id: TaskId::new(),
                worker_id: WorkerId(format!("gpu-{i}.rack:2@dc/a_{}", "y".repeat(100))),
                attempt: i + 1,
            })
            .collect();
        let notes = held.iter().chain(held.iter().take(3)).map(|h| Note::Cancelled(h.clone()));
        let payloads = encode("a", notes);
        assert!(payloads.len() > 1, "split: {}", payloads.len());
        assert!(payloads.iter().all(|p| p.len() < 8000));
        let mut back = Vec::new();
        for p in &payloads {
            match decode("b", p) {
                Decoded::Cancelled(h) => back.extend(h),
                other => panic!("{other:?}"),
            }
        }
        back.sort_by_key(|h| h.task_id);
        let mut want = held.clone();
        want.sort_by_key(|h| h.task_id);
        assert_eq!(back, want, "each once");
        let one = TaskId::new();
        assert_eq!(
            decode("b", &format!("a c {one}=2=w-1,nonsense,{one}=x=w-1,{one}=3=")),
            Decoded::Cancelled(vec![Held { task_id: one, worker_id: WorkerId::from("w-1"), attempt: 2 }])
        );
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Sends `note` after `after`.
    fn later(tx: &mpsc::UnboundedSender<Note>, after: Duration, note: Note) {
        let tx = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let _ = tx.send(note);
        });
    }

    #[tokio::test(start_paused = true)]
    async fn finished_tasks_wait_out_the_spacing_together_and_runnable_work_does_not_wait() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let shutdown = CancellationToken::new();

        let t0 = Instant::now();
        let mut notes = vec![Note::Finished(TaskId::new())];
        later(&tx, ms(2), Note::Finished(TaskId::new()));
        later(&tx, ms(4), Note::Finished(TaskId::new()));
        gather(&mut rx, &mut notes, t0 + FINISHED_SPACING, &shutdown).await;
        assert_eq!((t0.elapsed(), notes.len()), (FINISHED_SPACING, 3), "one statement for all three");

        let t1 = Instant::now();
        let mut notes = vec![Note::Finished(TaskId::new())];
        later(&tx, ms(1), Note::Runnable);
        gather(&mut rx, &mut notes, t1 + FINISHED_SPACING, &shutdown).await;
        assert_eq!((t1.elapsed(), notes.len()), (ms(1), 2), "runnable work ends the wait");

        let t2 = Instant::now();
        let mut notes = vec![Note::Runnable];
        gather(&mut rx, &mut notes, t2 + FINISHED_SPACING, &shutdown).await;
        assert_eq!(t2.elapsed(), Duration::ZERO, "runnable work never waits");

        let t3 = Instant::now();
        let mut notes = vec![Note::Finished(TaskId::new())];
        gather(&mut rx, &mut notes, t3 - ms(1), &shutdown).await;
        assert_eq!(t3.elapsed(), Duration::ZERO, "no wait once the spacing has passed");

        let t4 = Instant::now();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(ms(3)).await;
            stop.cancel();
        });
        gather(&mut rx, &mut notes, t4 + FINISHED_SPACING, &shutdown).await;
        assert_eq!(t4.elapsed(), ms(3), "shutdown ends the wait");
    }
}
