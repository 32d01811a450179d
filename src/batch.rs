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

type Job<I, O> = (I, Option<oneshot::Sender<Result<O, BatchError>>>);

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

impl<I: Send + 'static, O: Send + 'static> Batcher<I, O> {
    /// Spawns the loop. `run` gets a batch of items and returns one output per item, in order.
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
                match run(items).await {
                    Ok(outputs) => {
                        for (reply, out) in replies.into_iter().zip(outputs) {
                            if let Some(reply) = reply {
                                let _ = reply.send(Ok(out));
                            }
                        }
                    }
                    Err(e) => {
                        let err = BatchError::from(&e);
                        tracing::warn!(error = %e, "batched store call failed");
                        for reply in replies.into_iter().flatten() {
                            let _ = reply.send(Err(err.clone()));
                        }
                    }
                }
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

    #[tokio::test]
    async fn a_failed_batch_fails_each_caller() {
        let (b, _h) = Batcher::<u32, u32>::spawn(8, |_| async {
            Err(StoreError::Unavailable(sqlx::Error::PoolTimedOut))
        });
        let err = b.call(1).await.unwrap_err();
        assert!(err.unavailable);
    }
}
