//! Task change notifications inside one coordinator, for `WatchTask` and `WatchJob`. Watchers
//! re-read what they follow from the store on a notification (changes made by another replica
//! arrive through the LISTEN/NOTIFY wake-ups, and a slow timer covers lost notifications), so a
//! lagging watcher never misses a final state.

use tokio::sync::broadcast;

use crate::domain::TaskId;

/// Sent by [`Events::everything`]: matches every watcher.
pub const ANY_TASK: TaskId = TaskId(uuid::Uuid::nil());

/// Sender side; cheap to clone.
#[derive(Debug, Clone)]
pub struct Events {
    /// Every `WatchTask` stream holds a receiver.
    tx: broadcast::Sender<TaskId>,
}

impl Default for Events {
    fn default() -> Self {
        Self::new()
    }
}

impl Events {
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(4096);
        Self { tx }
    }

    /// Says that a task changed. Cheap when nobody watches.
    pub fn changed(&self, id: TaskId) {
        if self.tx.receiver_count() > 0 {
            let _ = self.tx.send(id);
        }
    }

    /// Says that any task may have changed (notifications from other replicas were lost):
    /// every watcher re-reads its task.
    pub fn everything(&self) {
        if self.tx.receiver_count() > 0 {
            let _ = self.tx.send(ANY_TASK);
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<TaskId> {
        self.tx.subscribe()
    }
}
