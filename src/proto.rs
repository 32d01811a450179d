//! Generated gRPC and protobuf code for `proto/coordinator.proto`, and its descriptor set for
//! server reflection. Nothing else lives here.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("coordinator");

/// Encoded `FileDescriptorSet` of the wire contract, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("coordinator_descriptor");
