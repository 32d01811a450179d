//! Build-time switches of the server's test suite: which external resources (a Postgres server,
//! a Python with grpcio) the tests may use. The wire contract is compiled by `crates/proto`.

use std::env;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Printing any rerun line turns off cargo's default "rerun on any change", so name every input.
    // `sqlx::migrate!` embeds migrations/ at compile time.
    println!("cargo:rerun-if-changed=migrations");

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

    Ok(())
}
