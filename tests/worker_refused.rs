//! A worker the coordinator refuses, in a process of its own: the auth failures it counts are
//! process-wide, and no other test's refusals may mix with them.

mod common;

use std::time::Duration;

use common::*;
use coordinator::{
    auth::{Role, sha256_hex},
    config::TokenConfig,
};
use coordinator_worker::{Worker, WorkerOptions, handler_fn};
use tokio_util::sync::CancellationToken;

/// The refusals of calls without a token, as `/metrics` counts them.
async fn missing_token_refusals(c: &TestCoordinator) -> u64 {
    let (_, text) = http_get(c.http, "/metrics").await.expect("GET /metrics");
    text.lines()
        .find(|l| l.starts_with("coordinator_auth_failures_total{reason=\"missing_token\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0, |n| n.parse::<f64>().unwrap() as u64)
}

/// A worker whose registration is refused (no token here) retries it, and sends nothing else:
/// before its first session it has no tasks whose leases a heartbeat would renew, and each
/// heartbeat was one more refusal in the coordinator's log and counters.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_never_registered_sends_no_heartbeats() {
    let db = TestDb::sqlite().await;
    let c = TestCoordinator::start(&db, |cfg| {
        cfg.auth.enabled = true;
        cfg.auth.tokens = vec![TokenConfig {
            name: "workers".into(),
            role: Role::Worker,
            sha256: sha256_hex("worker-token-0123456789abcdef"),
            ..TokenConfig::default()
        }];
    })
    .await;
    let mut o = WorkerOptions::new(c.endpoint(), "no-token");
    o.heartbeat_interval = Some(Duration::from_millis(50));
    o.backoff_base = Duration::from_millis(100);
    o.backoff_max = Duration::from_millis(200);
    let worker = Worker::new(o, handler_fn(|ctx| async move { Ok(ctx.payload) })).unwrap();
    let counters = worker.counters();
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(worker.run(shutdown.clone()));
    wait_until("three refused registrations", Duration::from_secs(10), || {
        let n = counters.refusals.load(std::sync::atomic::Ordering::SeqCst);
        async move { n >= 3 }
    })
    .await;
    shutdown.cancel();
    run.await.unwrap().unwrap();
    let registrations = counters.refusals.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(counters.sessions.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert_eq!(missing_token_refusals(&c).await, registrations, "every refused call was a registration");
    c.stop().await.unwrap();
    db.cleanup().await;
}
