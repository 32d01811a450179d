//! What an operator reads after a common mistake: the real `coordctl` and `coordinator` binaries
//! print one line, with no cause repeated, no database server source line, and a hint where the
//! mistake is a usual one (a URL without its scheme, the HTTP port given for the gRPC one).

mod common;

use std::{
    net::TcpListener,
    process::{Command, Output, Stdio},
};

use common::*;

const COORDINATOR: &str = env!("CARGO_BIN_EXE_coordinator");

/// Runs `coordctl --coordinator <address> workers` with a clean environment.
fn coordctl_workers(address: &str) -> Output {
    Command::new(coordctl_bin())
        .args(["--coordinator", address, "workers"])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .output()
        .expect("run coordctl")
}

/// The single line on stderr of a failed run, checked for a prefix and for repeated causes.
fn one_line(out: &Output, prefix: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let context = format!("status: {}\nstderr:\n{stderr}", out.status);
    assert!(!out.status.success(), "expected a failure\n{context}");
    let line = stderr.strip_suffix('\n').unwrap_or(&stderr).to_owned();
    assert!(!line.contains('\n'), "more than one line\n{context}");
    assert!(line.starts_with(prefix), "no {prefix:?} prefix\n{context}");
    let parts: Vec<&str> = line.split(": ").collect();
    for pair in parts.windows(2) {
        assert!(!pair[0].contains(pair[1]), "a cause is repeated ({:?})\n{context}", pair[1]);
    }
    line
}

/// A loopback port nothing listens on (bound, then released).
fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().unwrap().port()
}

#[test]
fn an_address_without_a_scheme_is_answered_with_the_fix() {
    let out = coordctl_workers("localhost:50051");
    let line = one_line(&out, "coordctl: ");
    assert!(line.contains("localhost:50051"), "{line}");
    assert!(line.contains("add http:// or https://"), "{line}");
    assert!(!line.contains("scheme is missing: invalid URL"), "{line}");
}

#[test]
fn a_refused_connection_names_the_address_once_without_doubled_causes() {
    let port = closed_port();
    let out = coordctl_workers(&format!("http://127.0.0.1:{port}"));
    let line = one_line(&out, "coordctl: ");
    assert!(line.contains(&format!("127.0.0.1:{port}")), "{line}");
    assert!(!line.contains("tcp connect error: tcp connect error"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_port_given_for_the_grpc_one_is_named_as_such() {
    let db = TestDb::sqlite().await;
    let c = TestCoordinator::start(&db, |_| {}).await;
    let address = format!("http://{}", c.http);
    let out = tokio::task::spawn_blocking(move || coordctl_workers(&address)).await.unwrap();
    let line = one_line(&out, "coordctl: ");
    assert!(line.contains("HTTP port"), "{line}");
    assert!(line.contains("gRPC listens on"), "{line}");
    assert!(!line.contains("compression flag"), "{line}");
    c.stop().await.unwrap();
    db.cleanup().await;
}

/// The coordinator pointed at a Postgres database that does not exist.
#[test]
#[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
fn a_postgres_error_shows_no_server_source_line() {
    let base = coordinator::store::testing::postgres_url().expect("TEST_DATABASE_URL is set");
    let (server, _) = base.rsplit_once('/').expect("a database name in TEST_DATABASE_URL");
    let url = format!("{server}/no_such_database_here");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.yaml");
    std::fs::write(
        &cfg,
        "coordinator:\n  bind_address: 127.0.0.1\n  grpc_port: 0\n  http_port: 0\nauth:\n  enabled: false\n",
    )
    .unwrap();
    let out = Command::new(COORDINATOR)
        .arg("--config")
        .arg(&cfg)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("DATABASE_URL", &url)
        .env("DATABASE_ACQUIRE_TIMEOUT", "5s")
        .stdin(Stdio::null())
        .output()
        .expect("run coordinator");
    let line = one_line(&out, "coordinator: ");
    assert!(line.contains("no_such_database_here"), "{line}");
    assert!(!line.contains(" at line "), "{line}");
}
