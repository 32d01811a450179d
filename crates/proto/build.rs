//! Compiles the wire contract (`proto/coordinator.proto` at the workspace root) into Rust: message
//! types, a client and a server skeleton (tonic + prost, no transport), and a descriptor set for
//! gRPC reflection. Uses the vendored `protoc` unless `PROTOC` points at another one.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    // A packaged copy carries its own `proto/`; in the workspace the contract lives at the root.
    let dir = [manifest.join("proto"), manifest.join("../../proto")]
        .into_iter()
        .find(|d| d.join("coordinator.proto").is_file())
        .ok_or("proto/coordinator.proto not found")?;
    println!("cargo:rerun-if-changed={}", dir.display());
    println!("cargo:rerun-if-env-changed=PROTOC");
    if env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
        unsafe { env::set_var("PROTOC", protoc) };
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // Answers a request that does not decode with InvalidArgument naming the field, where
        // tonic's default codec answers Internal with the decoder's text.
        .codec_path("crate::codec::ProtoCodec")
        // Callers bring their own channel (TLS, keepalive, limits): no `connect` helpers, so
        // nothing here needs tonic's transport.
        .build_transport(false)
        .file_descriptor_set_path(out_dir.join("coordinator_descriptor.bin"))
        .compile_protos(&[dir.join("coordinator.proto")], &[dir])?;
    Ok(())
}
