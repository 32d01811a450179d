//! The coordinator's wire contract: Rust types, a gRPC client and a server skeleton generated
//! from `proto/coordinator.proto` (package `coordinator`, service `CoordinatorService`), its
//! encoded descriptor set for gRPC reflection, and the protobuf codec both sides use.
//!
//! # Layering
//! The bottom of the workspace: it depends on prost and tonic's codegen only (no transport, no
//! server runtime). The worker SDK (`coordinator-worker`), `coordctl` and the server build on it.
//!
//! The package keeps its unversioned name, `coordinator`: the contract is additive (new fields
//! and RPCs only, never a renumbering), and existing `grpcurl` commands and generated clients in
//! other languages use these names. A breaking change would add `coordinator.v2` beside it.

#![allow(clippy::all, missing_docs)]

pub mod codec;

tonic::include_proto!("coordinator");

/// Encoded `FileDescriptorSet` of the wire contract, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("coordinator_descriptor");
