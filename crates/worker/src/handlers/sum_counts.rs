//! `sum_counts`: the aggregate step of a fan-out. It runs after its parents (`depends_on`) and
//! answers `{"count":N}`, the sum of the `count` in each parent's JSON result (`prime_count`
//! results, say). Its payload is ignored. A parent result it cannot read, or one the assignment
//! did not carry, fails it for good: the sum would be wrong.

use serde::{Deserialize, Serialize};

use super::json_result;
use crate::{Handler, TaskContext, TaskFailure};

/// Adds up its parents' counts.
#[derive(Debug, Clone, Copy, Default)]
pub struct SumCounts;

#[derive(Debug, Deserialize, Serialize)]
struct Count {
    count: u64,
}

#[tonic::async_trait]
impl Handler for SumCounts {
    async fn run(&self, task: TaskContext) -> Result<Vec<u8>, TaskFailure> {
        if task.parents.is_empty() {
            return Err(TaskFailure::permanent(
                "sum_counts: the task names no parents (depends_on) to add up",
            ));
        }
        let mut count: u64 = 0;
        for p in &task.parents {
            let Some(bytes) = &p.result else {
                return Err(TaskFailure::permanent(format!(
                    "sum_counts: the result of parent {} was too large to carry",
                    p.task_id
                )));
            };
            let c: Count = serde_json::from_slice(bytes).map_err(|e| {
                TaskFailure::permanent(format!(
                    "sum_counts: parent {} result is not {{\"count\":N}}: {e}",
                    p.task_id
                ))
            })?;
            count = count
                .checked_add(c.count)
                .ok_or_else(|| TaskFailure::permanent("sum_counts: the sum overflows u64"))?;
        }
        json_result(&Count { count })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ParentResult, handlers::test_support::task};

    fn parent(id: &str, result: Option<&str>) -> ParentResult {
        ParentResult { task_id: id.into(), result: result.map(|r| r.as_bytes().to_vec()) }
    }

    #[tokio::test]
    async fn adds_the_parents_counts_and_refuses_what_it_cannot_add() {
        let mut t = task("sum_counts", "");
        t.parents = vec![parent("a", Some(r#"{"count":4}"#)), parent("b", Some(r#"{"count":25}"#))];
        assert_eq!(SumCounts.run(t.clone()).await.unwrap(), br#"{"count":29}"#);

        t.parents.push(parent("c", None));
        let e = SumCounts.run(t.clone()).await.unwrap_err();
        assert!(!e.retriable && e.message.contains("parent c"), "{e:?}");

        t.parents = vec![parent("d", Some("nope"))];
        assert!(SumCounts.run(t.clone()).await.unwrap_err().message.contains("parent d result"));

        t.parents.clear();
        assert!(SumCounts.run(t).await.unwrap_err().message.contains("names no parents"));
    }
}
