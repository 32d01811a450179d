//! `noop`: an empty result at once, whatever the payload; for benchmarks of the task path.

use crate::{Handler, TaskContext, TaskFailure};

/// Returns an empty result immediately.
#[derive(Debug, Clone, Copy, Default)]
pub struct Noop;

#[tonic::async_trait]
impl Handler for Noop {
    async fn run(&self, _task: TaskContext) -> Result<Vec<u8>, TaskFailure> {
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handlers::test_support::*;

    #[tokio::test]
    async fn returns_an_empty_result() {
        bounded(async {
            assert_eq!(Noop.run(task("noop", "anything")).await.unwrap(), b"");
            assert_eq!(Noop.run(task("noop", Vec::new())).await.unwrap(), b"");
        })
        .await
    }
}
