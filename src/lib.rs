//! A streaming task-push coordinator with Postgres persistence.
//!
//! Clients submit tasks; the coordinator stores them (Postgres in production, SQLite embedded)
//! and pushes each one, the moment it is assigned, down a server-streaming gRPC call
//! (`ReceiveTasks`) to a worker that can run it. Every state change in the store is a conditional
//! write fenced by the task's attempt number, so a crash of any process loses nothing and accepts
//! nothing twice.
//!
//! # Layout
//! [`config`] · [`domain`] · [`store`] · [`proto`]
#![warn(missing_debug_implementations)]

pub mod config;
pub mod domain;
pub mod proto;
pub mod store;
