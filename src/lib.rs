//! A streaming task-push coordinator with Postgres persistence: the control plane of a proving
//! fleet (or any heavy batch work).
//!
//! Clients submit tasks; the coordinator stores them (Postgres in production, SQLite embedded)
//! and pushes each one, the moment it is assigned, down a server-streaming gRPC call
//! (`ReceiveTasks`) to a worker that can run it. The [`registry`] tracks every worker through
//! ACTIVE -> SUSPECT -> DEAD by heartbeats; the [`scheduler`] claims runnable tasks in batches
//! and places them with a pure function; the [`sweeper`] takes work back from dead workers and
//! expired leases. Every state change in the [`store`] is a conditional write fenced by the
//! task's attempt number, so a crash of any process loses nothing and accepts nothing twice.
//!
//! # Layout
//! [`app`] wiring and shutdown · [`config`] · [`store`] (Postgres, SQLite) · [`registry`] ·
//! [`scheduler`] (+ `placement`) · [`sweeper`] · [`pruner`] retention · [`cron`] schedules' times ·
//! [`core`] use cases and the effects of each task
//! transition · [`grpc`] (+ `client_api`, `worker_api`, `convert`, `status`, `auth`, `layer`,
//! `trace`, `serve`) · [`rest`] · [`http`] ·
//! [`metrics`] · [`telemetry`] · [`batch`] group commit · [`events`] · [`fleet`] what the live
//! workers run (submission checks, why a task waits) · [`wakeups`] across replicas
//! (LISTEN/NOTIFY) · [`auth`] · [`tls`] · [`domain`] · [`worker_config`] the `worker` binary's
//! file · [`proto`] the wire contract (crate `coordinator-proto`) · [`error_text`] one line per
//! error
//!
//! The worker side is the `coordinator-worker` crate (the SDK provers embed; the server uses it
//! for `coordinator dev`'s local workers); `coordctl` is a crate of its own. Both live under
//! `crates/`.
//!
//! # Layering
//! Imports point one way, each module using only those before it (`tests/layering.rs` checks):
//! [`domain`], [`proto`] <- [`config`] <- [`cron`] <- [`error_text`] <- [`telemetry`] <- [`worker_config`]
//! <- [`tls`] <- [`auth`] <- [`metrics`] <- [`store`] <- [`registry`] <- [`fleet`] <-
//! [`events`] <- [`wakeups`] <- [`batch`] <- [`scheduler`], [`sweeper`], [`pruner`] <- [`core`] <- the
//! adapters [`grpc`], [`rest`], [`http`] <- [`app`]. A type two rooms need lives in the lower one
//! (most often [`domain`]); the scheduler and the sweeper reach the core's effects through
//! [`scheduler::OnRequeue`].
#![warn(missing_debug_implementations)]

pub mod app;
pub mod auth;
pub mod batch;
pub mod config;
pub mod core;
pub mod cron;
pub mod domain;
pub mod error_text;
pub mod events;
pub mod fleet;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod proto;
pub mod pruner;
pub mod registry;
pub mod rest;
pub mod scheduler;
pub mod store;
pub mod sweeper;
pub mod telemetry;
pub mod tls;
pub mod wakeups;
pub mod worker_config;
