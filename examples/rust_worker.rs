//! A worker of your own in Rust, on the crate's worker library: the built-in `echo` handler plus
//! `rs_upper`, a handler written here, which upper-cases the payload.
//!
//! ```sh
//! cargo run --example rust_worker -- http://127.0.0.1:9090 rust-worker-1
//! coordctl submit --type rs_upper --payload hello --wait     # HELLO
//! ```
//!
//! docs/writing-a-worker.md explains each piece.

use std::sync::Arc;

use coordinator::worker::{TaskFailure, Worker, WorkerOptions, handler_fn, handlers::Handlers};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let endpoint = args.next().unwrap_or_else(|| "http://127.0.0.1:9090".into());
    let worker_id = args.next().unwrap_or_else(|| "rust-worker-1".into());

    // A handler gets the task (id, type, payload, attempt, deadline, a cancellation token) and
    // returns the result's bytes, or a failure that says whether a retry could succeed.
    let upper = handler_fn(|task| async move {
        let text = String::from_utf8(task.payload)
            .map_err(|e| TaskFailure::permanent(format!("invalid rs_upper payload: not UTF-8 ({e})")))?;
        Ok(text.to_uppercase().into_bytes())
    });
    let handlers =
        Handlers::builtin(&["echo".to_owned()]).map_err(anyhow::Error::msg)?.with("rs_upper", upper);

    let mut options = WorkerOptions::new(endpoint, worker_id);
    options.max_concurrent = 4;
    // The task types this worker takes: the coordinator pushes only these to it.
    options.capabilities = handlers.task_types();
    let worker = Worker::new(options, Arc::new(handlers))?;

    // Ctrl-C: deregister, let running tasks finish within `drain_grace`, report them, return.
    let shutdown = CancellationToken::new();
    let on_ctrl_c = shutdown.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            on_ctrl_c.cancel();
        }
    });
    worker.run(shutdown).await
}
