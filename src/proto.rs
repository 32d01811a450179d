//! The wire contract (generated code, descriptor set, codec), from the `coordinator-proto` crate.

pub use coordinator_proto::*;
