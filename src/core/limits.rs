//! Per-type concurrency limits: at most N tasks of a type assigned or running at once across
//! every replica, held inside each claim (see [`crate::store::Store::claim_fenced`]).

use tracing::info;

use super::{Core, CoreError};
use crate::domain::TypeLimit;

impl Core {
    /// Sets `task_type`'s limit (an admin's: it outlives restarts and configuration changes
    /// until cleared), or with `None` removes it. The schedulers here and on every replica wake:
    /// a raised or removed limit lets waiting tasks start at once.
    pub async fn set_type_limit(
        &self,
        task_type: &str,
        max_in_flight: Option<u32>,
    ) -> Result<TypeLimit, CoreError> {
        self.inner.store.set_type_limit(task_type, max_in_flight).await?;
        match max_in_flight {
            Some(max) => info!(task_type, max_in_flight = max, "type limit set"),
            None => info!(task_type, "type limit cleared"),
        }
        self.inner.effects.limits_changed();
        let limits = self.inner.store.type_limits().await?;
        Ok(limits.into_iter().find(|l| l.task_type == task_type).unwrap_or(TypeLimit {
            task_type: task_type.to_owned(),
            max_in_flight: 0,
            source: String::new(),
            in_flight: 0,
        }))
    }

    pub async fn type_limits(&self) -> Result<Vec<TypeLimit>, CoreError> {
        Ok(self.inner.store.type_limits().await?)
    }
}
