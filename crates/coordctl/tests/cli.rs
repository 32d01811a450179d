//! The `coordctl` binary as a user meets it before any coordinator is involved: its version, a
//! usage mistake, and a coordinator that is not there.
//!
//! Being an integration test of this package also makes `cargo test` build the `coordctl`
//! binary itself, which the server package's tests run.

use std::process::{Command, Stdio};

fn coordctl(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_coordctl"))
        .args(args)
        .env_remove("COORDCTL_COORDINATOR")
        .env_remove("COORDCTL_TOKEN")
        .env_remove("COORDCTL_TOKEN_FILE")
        .stdin(Stdio::null())
        .output()
        .expect("run coordctl")
}

#[test]
fn version_names_the_program_and_its_version() {
    let out = coordctl(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("coordctl {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn a_usage_mistake_exits_2() {
    let out = coordctl(&["get"]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("TASK_ID"));
}

#[test]
fn a_coordinator_that_is_not_there_is_one_line_and_exit_1() {
    // A port nothing listens on: bind one, note it, close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let out = coordctl(&["--coordinator", &format!("http://127.0.0.1:{port}"), "workers"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("coordctl: ") && stderr.contains(&port.to_string()), "{stderr}");
    assert!(out.stdout.is_empty());
}
