//! Task change notifications inside one coordinator, for `WatchTask`. Watchers re-read the task
//! from the store on a notification (and on a slow timer, so changes made by another replica
//! are seen too), so a lagging watcher never misses a final state.

use tokio::sync::broadcast;

use crate::domain::TaskId;

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

    pub fn subscribe(&self) -> broadcast::Receiver<TaskId> {
        self.tx.subscribe()
    }
}
