//! Worker SDK for the coordinator: embed it in a prover (or any heavy batch job) and the
//! coordinator pushes tasks to it.
//!
//! Implement [`Handler`] (or wrap an async closure with [`handler_fn`]), describe the connection
//! with [`WorkerOptions`], and drive a [`Worker`] until a shutdown token fires. The runtime
//! registers, holds the `ReceiveTasks` stream, runs at most `max_concurrent` tasks at once,
//! heartbeats with the tasks it holds, reports each result with the attempt it was given,
//! reconnects with backoff and jitter, and on shutdown drains: no new work, running tasks finish
//! within a grace period and are reported, the rest is given back.
//!
//! ```no_run
//! use coordinator_worker::{TaskFailure, Worker, WorkerOptions, handler_fn};
//! use tokio_util::sync::CancellationToken;
//!
//! # async fn run() -> Result<(), coordinator_worker::Error> {
//! let mut options = WorkerOptions::new("http://127.0.0.1:9090", "prover-1");
//! options.capabilities = vec!["prove".into()];
//! let prove = handler_fn(|task| async move {
//!     if task.payload.is_empty() {
//!         return Err(TaskFailure::permanent("empty witness"));
//!     }
//!     Ok(task.payload.iter().rev().copied().collect())
//! });
//! Worker::new(options, prove)?.run(CancellationToken::new()).await
//! # }
//! ```
//!
//! # Layering
//! Depends on the wire contract ([`proto`], generated code) and on tonic's client, tokio and
//! rustls; nothing of the server (no database, no HTTP server, no metrics exporter). Inside:
//! [`error`], [`size`], [`resend`] (calls a connection going away turned back unseen) <-
//! [`client`] (channel, TLS, token) <- `report` (results on their way,
//! batched while one is in flight) <- [`worker`] (the runtime) <- [`handlers`]
//! (built-ins, `exec` per task, [`persistent`] prover processes over a framed protocol).
//!
//! # Tracing
//! Each task runs in a `handle_task` span and is reported from a `report_task` span under it.
//! With the `otel` cargo feature (off by default) the handler span continues the trace the task
//! was submitted under (the assignment's `traceparent`) and reports carry their span's
//! `traceparent` metadata back to the coordinator; the binary installs the OpenTelemetry
//! subscriber and exporter (the `worker` binary of the `coordinator` package does).

#![warn(missing_debug_implementations)]

pub mod client;
pub mod error;
pub mod handlers;
pub mod persistent;
mod report;
pub mod resend;
pub mod size;
pub mod trace;
pub mod worker;

pub use coordinator_proto as proto;
pub use error::Error;
pub use handlers::Handlers;
pub use persistent::{Persistent, PersistentConfig};
pub use size::ByteSize;
pub use tokio_util::sync::CancellationToken;
/// For `impl Handler for ...` blocks: `#[coordinator_worker::async_trait]`.
pub use tonic::async_trait;
pub use worker::{
    Handler, ParentResult, TaskContext, TaskFailure, Worker, WorkerCounters, WorkerOptions, backoff,
    handler_fn, hostname,
};
