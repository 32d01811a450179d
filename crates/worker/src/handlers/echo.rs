//! `echo`: the result is the payload, byte for byte.

use crate::{Handler, TaskContext, TaskFailure};

/// Returns the payload unchanged.
#[derive(Debug, Clone, Copy, Default)]
pub struct Echo;

#[tonic::async_trait]
impl Handler for Echo {
    async fn run(&self, task: TaskContext) -> Result<Vec<u8>, TaskFailure> {
        Ok(task.payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handlers::test_support::*;

    #[tokio::test]
    async fn returns_the_payload_unchanged() {
        bounded(async {
            assert_eq!(Echo.run(task("echo", "hello")).await.unwrap(), b"hello");
            assert_eq!(Echo.run(task("echo", vec![0u8, 255, 10])).await.unwrap(), [0u8, 255, 10]);
            assert_eq!(Echo.run(task("echo", Vec::new())).await.unwrap(), b"");
        })
        .await
    }
}
