//! A prover on the worker SDK, to copy and fill in: it loads its proving key once at start (the
//! expensive part of a real prover) and proves every `prove` task pushed to it with that key.
//! The "proof" here is key and witness side by side; put your prover's call in its place.
//! This file is the SDK README's example, line for line.
//!
//! ```sh
//! cargo run -p coordinator-worker --example prover -- http://127.0.0.1:9090 prover-1
//! coordctl submit --type prove --payload 'witness bytes' --wait
//! ```

use coordinator_worker::{CancellationToken, Handler, TaskContext, TaskFailure, Worker, WorkerOptions};
use std::sync::Arc;

struct Prover {
    proving_key: Vec<u8>, // loaded once, kept between tasks
}

#[coordinator_worker::async_trait]
impl Handler for Prover {
    async fn run(&self, task: TaskContext) -> Result<Vec<u8>, TaskFailure> {
        if task.payload.is_empty() {
            return Err(TaskFailure::permanent("empty witness")); // no retry can help
        }
        let (key, witness) = (self.proving_key.clone(), task.payload);
        let proof = tokio::task::spawn_blocking(move || [key, witness].concat()); // your prover here
        tokio::select! {
            proof = proof => proof.map_err(|e| TaskFailure::retriable(format!("prover crashed: {e}"))),
            _ = task.cancelled.cancelled() => Err(TaskFailure::permanent("cancelled")),
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), coordinator_worker::Error> {
    let mut options = WorkerOptions::new("http://127.0.0.1:9090", "prover-1");
    options.capabilities = vec!["prove".into()]; // the task types pushed to this worker
    let shutdown = CancellationToken::new(); // cancel it on SIGTERM: the worker drains
    let prover = Prover { proving_key: std::fs::read("proving.key").unwrap_or_default() };
    Worker::new(options, Arc::new(prover))?.run(shutdown).await
}
