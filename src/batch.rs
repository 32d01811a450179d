//! Group commit: callers hand single items to a [`Batcher`]; one loop takes whatever has queued
//! up (up to a maximum) and runs one store call for all of it. Under load, many reports become
//! one statement; when idle, a lone item goes at once, with no added wait.

use std::future::Future;

use tokio::{
    sync::{mpsc, oneshot},
    task::JoinHandle,
};

use crate::store::StoreError;

/// A failed batch, as each of its callers sees it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct BatchError {
    /// The database was unreachable (callers answer "unavailable").
    pub unavailable: bool,
    pub message: String,
}

impl From<&StoreError> for BatchError {
    fn from(e: &StoreError) -> Self {
        Self { unavailable: e.is_unavailable(), message: e.to_string() }
    }
}

type Job<I, O> = (I, Reply<O>);

/// Handle to a batching loop; cheap to clone. The loop ends when every handle is dropped, after
/// finishing what was queued.
#[derive(Debug)]
pub struct Batcher<I, O> {
    /// The loop spawned by [`Batcher::spawn`] holds the receiver.
    tx: mpsc::Sender<Job<I, O>>,
}

impl<I, O> Clone for Batcher<I, O> {
    fn clone(&self) -> Self {
        Self { tx: self.tx.clone() }
    }
}

impl<I: Clone + Send + 'static, O: Send + 'static> Batcher<I, O> {
    /// Spawns the loop. `run` gets a batch of items and returns one output per item, in order.
    ///
    /// A batch that fails with an error other than "database unavailable" may have failed for
    /// one bad item (a constraint or a value the database refuses): it is split in halves and
    /// each half run again, down to single items, so only the callers of bad items get the
    /// error. An unavailable database fails every caller at once, with no retries.
    pub fn spawn<F, Fut>(max_batch: usize, mut run: F) -> (Self, JoinHandle<()>)
    where
        F: FnMut(Vec<I>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Vec<O>, StoreError>> + Send,
    {
        let (tx, mut rx) = mpsc::channel::<Job<I, O>>(max_batch * 4);
        let handle = tokio::spawn(async move {
            let mut jobs = Vec::with_capacity(max_batch);
            while rx.recv_many(&mut jobs, max_batch).await > 0 {
                let (items, replies): (Vec<I>, Vec<_>) = jobs.drain(..).unzip();
                run_batch(&mut run, items, replies).await;
            }
        });
        (Self { tx }, handle)
    }

    /// Queues `item` and waits for its output.
    pub async fn call(&self, item: I) -> Result<O, BatchError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send((item, Some(reply))).await.map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    /// Queues `item` without waiting for its output; `false` (and the item dropped) when the
    /// queue is full or closed.
    pub fn try_send(&self, item: I) -> bool {
        self.tx.try_send((item, None)).is_ok()
    }
}

type Reply<O> = Option<oneshot::Sender<Result<O, BatchError>>>;

/// Runs one batch and answers its callers, splitting it on a failure that may be one item's
/// (see [`Batcher::spawn`]). Halves run one after the other, the first half first.
async fn run_batch<I, O, F, Fut>(run: &mut F, items: Vec<I>, replies: Vec<Reply<O>>)
where
    I: Clone,
    F: FnMut(Vec<I>) -> Fut,
    Fut: Future<Output = Result<Vec<O>, StoreError>>,
{
    let mut pending = vec![(items, replies)];
    while let Some((items, mut replies)) = pending.pop() {
        let len = items.len();
        // Kept only when a failure could be split further: a lone item is not copied.
        let retry = (len > 1).then(|| items.clone());
        match run(items).await {
            Ok(outputs) => {
                for (reply, out) in replies.into_iter().zip(outputs) {
                    if let Some(reply) = reply {
                        let _ = reply.send(Ok(out));
                    }
                }
            }
            Err(e) if e.is_unavailable() => {
                // Whatever is left would meet the same database: fail it all now.
                let err = BatchError::from(&e);
                let callers = len + pending.iter().map(|(i, _)| i.len()).sum::<usize>();
                tracing::warn!(error = %e, callers, "batched store call failed");
                let rest = pending.drain(..).flat_map(|(_, r)| r);
                for reply in replies.into_iter().chain(rest).flatten() {
                    let _ = reply.send(Err(err.clone()));
                }
                return;
            }
            Err(e) => match retry {
                Some(mut first) => {
                    tracing::warn!(error = %e, items = len, "batched store call failed; retrying it in halves");
                    let second = first.split_off(len / 2);
                    let second_replies = replies.split_off(len / 2);
                    pending.push((second, second_replies));
                    pending.push((first, replies));
                }
                None => {
                    tracing::warn!(error = %e, "batched store call failed for one item");
                    let err = BatchError::from(&e);
                    for reply in replies.into_iter().flatten() {
                        let _ = reply.send(Err(err.clone()));
                    }
                }
            },
        }
    }
}

fn closed() -> BatchError {
    BatchError { unavailable: true, message: "shutting down".into() }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };

    use super::*;

    #[tokio::test]
    async fn concurrent_calls_share_batches_and_get_their_own_answers() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let (b, handle) = Batcher::<u32, u32>::spawn(64, move |items| {
            counter.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::task::yield_now().await;
                Ok(items.into_iter().map(|i| i * 10).collect())
            }
        });
        let mut joins = Vec::new();
        for i in 0..200u32 {
            let b = b.clone();
            joins.push(tokio::spawn(async move { (i, b.call(i).await.unwrap()) }));
        }
        for j in joins {
            let (i, out) = j.await.unwrap();
            assert_eq!(out, i * 10);
        }
        drop(b);
        handle.await.unwrap();
        assert!(calls.load(Ordering::SeqCst) <= 200);
    }

    /// Every batch the closure was given, in order. std Mutex: held only to push or copy, never
    /// across an await.
    type Seen = Arc<std::sync::Mutex<Vec<Vec<u32>>>>;

    /// A batcher whose first call (item 0) holds the loop until `open` is notified, so that
    /// the calls queued meanwhile make up the next batch. Every batch `run` is given is noted.
    fn gated(
        fail: impl Fn(&[u32]) -> Option<StoreError> + Send + 'static,
    ) -> (Batcher<u32, u32>, Arc<tokio::sync::Notify>, Seen) {
        let open = Arc::new(tokio::sync::Notify::new());
        let seen = Seen::default();
        let (gate, log) = (open.clone(), seen.clone());
        let (b, _h) = Batcher::<u32, u32>::spawn(64, move |items| {
            log.lock().unwrap().push(items.clone());
            let outcome = fail(&items);
            let gate = gate.clone();
            async move {
                if items == [0] {
                    gate.notified().await;
                }
                match outcome {
                    Some(e) => Err(e),
                    None => Ok(items.into_iter().map(|i| i * 10).collect()),
                }
            }
        });
        (b, open, seen)
    }

    /// Starts the gate call and calls for `items` behind it; returns their answers once the gate
    /// opens, in the order of `items`.
    async fn behind_the_gate(
        b: &Batcher<u32, u32>,
        open: &tokio::sync::Notify,
        seen: &std::sync::Mutex<Vec<Vec<u32>>>,
        items: &[u32],
    ) -> Vec<Result<u32, BatchError>> {
        let gate = tokio::spawn({
            let b = b.clone();
            async move { b.call(0).await }
        });
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while seen.lock().unwrap().is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "the gate call never ran");
            tokio::task::yield_now().await;
        }
        let joins: Vec<_> = items
            .iter()
            .map(|&i| {
                let b = b.clone();
                tokio::spawn(async move { b.call(i).await })
            })
            .collect();
        while b.tx.max_capacity() - b.tx.capacity() < items.len() {
            assert!(tokio::time::Instant::now() < deadline, "the calls were never queued");
            tokio::task::yield_now().await;
        }
        open.notify_one();
        assert_eq!(gate.await.unwrap().unwrap(), 0);
        let mut out = Vec::new();
        for j in joins {
            out.push(j.await.unwrap());
        }
        out
    }

    fn data_error() -> StoreError {
        StoreError::Database(sqlx::Error::Protocol("value out of range".into()))
    }

    #[tokio::test]
    async fn one_bad_item_fails_only_its_own_caller() {
        let (b, open, seen) = gated(|items| items.contains(&5).then(data_error));
        let items: Vec<u32> = (1..=8).collect();
        let answers = behind_the_gate(&b, &open, &seen, &items).await;
        for (i, answer) in items.iter().zip(&answers) {
            match answer {
                Ok(out) => assert_eq!(*out, i * 10),
                Err(e) => {
                    assert_eq!(*i, 5, "item {i} failed: {e}");
                    assert!(!e.unavailable);
                }
            }
        }
        assert_eq!(answers.iter().filter(|a| a.is_err()).count(), 1);
        let seen = seen.lock().unwrap().clone();
        let mut whole = seen[1].clone();
        whole.sort_unstable();
        assert_eq!(whole, items, "the calls behind the gate went as one batch: {seen:?}");
        assert!(seen.iter().any(|batch| batch == &[5]), "the bad item ran alone: {seen:?}");
        // Split in halves, not item by item: 1 gate + 1 whole + at most 2 per level of 3.
        assert!(seen.len() <= 2 + 2 * 3, "{seen:?}");
    }

    #[tokio::test]
    async fn an_unavailable_database_fails_every_caller_without_retries() {
        let (b, open, seen) =
            gated(|items| (items != [0]).then(|| StoreError::Unavailable(sqlx::Error::PoolTimedOut)));
        let answers = behind_the_gate(&b, &open, &seen, &(1..=8).collect::<Vec<_>>()).await;
        for answer in &answers {
            assert!(answer.as_ref().is_err_and(|e| e.unavailable), "{answer:?}");
        }
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 2, "one call for the gate, one for the batch: {seen:?}");
    }

    #[tokio::test]
    async fn a_failed_batch_fails_each_caller() {
        let (b, _h) = Batcher::<u32, u32>::spawn(8, |_| async {
            Err(StoreError::Unavailable(sqlx::Error::PoolTimedOut))
        });
        let err = b.call(1).await.unwrap_err();
        assert!(err.unavailable);
    }
}
