//! Compiles `proto/coordinator.proto` into Rust (tonic + prost) and a descriptor set for gRPC
//! reflection. Uses the vendored `protoc` unless `PROTOC` points at another one.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Printing any rerun line turns off cargo's default "rerun on any change", so name every input.
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=migrations");
    println!("cargo:rerun-if-env-changed=PROTOC");

    // tests/python_worker.rs runs examples/python/worker.py with the python3 named by
    // TEST_PYTHON (one with grpcio and grpcio-tools); without it that test is reported as
    // ignored, never as passed.
    println!("cargo::rustc-check-cfg=cfg(test_python)");
    println!("cargo::rerun-if-env-changed=TEST_PYTHON");
    if env::var_os("TEST_PYTHON").is_some_and(|p| !p.is_empty()) {
        println!("cargo::rustc-cfg=test_python");
    }

    // Tests that need a Postgres server are compiled `#[ignore]`d (reported as skipped, never as
    // passed) unless `TEST_DATABASE_URL` is set: `#[cfg_attr(not(test_postgres), ignore = ...)]`.
    println!("cargo::rustc-check-cfg=cfg(test_postgres)");
    println!("cargo::rerun-if-env-changed=TEST_DATABASE_URL");
    if env::var_os("TEST_DATABASE_URL").is_some_and(|u| !u.is_empty()) {
        println!("cargo::rustc-cfg=test_postgres");
    }

    if env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
        unsafe { env::set_var("PROTOC", protoc) };
    }

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // Answers a request that does not decode with InvalidArgument naming the field, where
        // tonic's default codec answers Internal with the decoder's text.
        .codec_path("crate::grpc::codec::ProtoCodec")
        .file_descriptor_set_path(out_dir.join("coordinator_descriptor.bin"))
        .compile_protos(&["proto/coordinator.proto"], &["proto"])?;
    Ok(())
}
