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

/// `retry` needs a task id or a filter, not both, and a window that ends after it starts: each
/// mistake is named with its flags before anything is sent (no coordinator listens here).
#[test]
fn retry_s_usage_mistakes_exit_2_naming_the_flags() {
    for (args, names) in [
        (&["retry"][..], "--job"),
        (&["retry", "0190f5c2-0000-7000-8000-000000000000", "--type", "prove"][..], "--type"),
        (&["retry", "--since", "1h", "--until", "2h"][..], "--until must be later than --since"),
        (&["failures", "--since", "1h", "--until", "2h"][..], "--until must be later than --since"),
        (&["retry", "--since", "yesterday"][..], "--since \"yesterday\""),
    ] {
        let out = coordctl(&[&["--coordinator", "http://127.0.0.1:1"][..], args].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(names), "{args:?}: {stderr}");
    }
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
