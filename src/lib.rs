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
//! [`scheduler`] (+ `placement`) · [`sweeper`] · [`grpc`] (+ `convert`, `status`, `layer`, `codec`,
//! `serve`) · [`http`] · [`metrics`] · [`telemetry`] · [`batch`] group commit · [`effects`] of each
//! task transition · [`events`] · [`fleet`] what the live workers run (submission checks, why a
//! task waits) · [`wakeups`] across replicas (LISTEN/NOTIFY) · [`domain`] ·
//! [`worker`] the worker side · [`proto`] generated code · [`error_text`] one line per error
#![warn(missing_debug_implementations)]

pub mod app;
pub mod auth;
pub mod batch;
pub mod bench;
pub mod client;
pub mod config;
pub mod domain;
pub mod effects;
pub mod error_text;
pub mod events;
pub mod fleet;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod proto;
pub mod registry;
pub mod rest;
pub mod scheduler;
pub mod store;
pub mod sweeper;
pub mod telemetry;
pub mod tls;
pub mod wakeups;
pub mod worker;
