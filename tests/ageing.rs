//! Connection ageing under load: connections are sent GOAWAY at `grpc.max_connection_age`, task
//! streams end cleanly and workers reopen them on a new connection, and no task is lost, run
//! twice or charged an attempt. And an idle coordinator stops at once, without warnings.

mod common;

use std::{
    collections::BTreeMap,
    io::Write,
    sync::{Arc, Mutex, OnceLock, atomic::Ordering},
    time::{Duration, Instant},
};

use common::*;
use coordinator::proto;
use coordinator_worker::{Worker, WorkerCounters, WorkerOptions, handler_fn};
use tokio_util::sync::CancellationToken;
use tonic::Code;

/// Warnings and errors logged by this test binary (every test in it shares the buffer).
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || Sink(sink.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("no other global subscriber");
        logs
    })
    .clone()
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A worker whose tasks sleep for the number of milliseconds in their payload.
fn sleeper(endpoint: String, id: &str) -> Worker {
    let mut o = WorkerOptions::new(endpoint, id);
    o.max_concurrent = 4;
    o.capabilities = vec!["sleep".into()];
    o.backoff_base = Duration::from_millis(50);
    o.backoff_max = Duration::from_millis(300);
    Worker::new(
        o,
        handler_fn(|ctx| async move {
            let ms: u64 = std::str::from_utf8(&ctx.payload).unwrap().parse().unwrap();
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(ctx.payload)
        }),
    )
    .unwrap()
}

/// Submits a task, retrying calls that raced the close of an aged connection: the client's
/// channel can hand a call to a connection in the instant it closes (hyper answers `Cancelled`,
/// "connection closed", and the call was never sent). The idempotency key makes a retry safe.
async fn submit_sleep(client: &mut Client, key: &str, ms: u64) -> String {
    let req = proto::SubmitTaskRequest {
        task_type: "sleep".into(),
        payload: ms.to_string().into_bytes(),
        idempotency_key: key.into(),
        ..Default::default()
    };
    let mut tries = 0;
    loop {
        match client.submit_task(req.clone()).await {
            Ok(r) => return r.into_inner().task_id,
            // The connection aged under the call: sent again (the key makes it one task). A
            // request that met the GOAWAY in flight fails in the client's transport (hyper
            // answers `Internal` for it), not with a status the server sent.
            Err(s)
                if tries < 5
                    && (matches!(s.code(), Code::Unknown | Code::Unavailable | Code::Cancelled)
                        || from_transport(&s)) =>
            {
                tries += 1
            }
            Err(s) => panic!("submit {key}: {s:?}"),
        }
    }
}

/// Whether the call failed in the client's transport (a connection closed under it) rather
/// than with a status the server sent.
fn from_transport(s: &tonic::Status) -> bool {
    std::error::Error::source(s).is_some_and(|e| e.is::<tonic::transport::Error>())
}

fn total(counters: &[Arc<WorkerCounters>], f: impl Fn(&WorkerCounters) -> u64) -> u64 {
    counters.iter().map(|c| f(c)).sum()
}

/// Connections age every ~1.5 s (grace 3 s) while 3 workers run 200 short tasks and 4 tasks of
/// 4 s over ~10 s: several connections per worker, every task completed exactly once at its
/// first charged attempt, and no task stream ended with an error (tonic's own ageing cut them
/// at age + grace, mid-push).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn aged_connections_end_task_streams_cleanly_and_lose_nothing() {
    let _logs = captured_logs();
    let db = TestDb::sqlite().await;
    let c = TestCoordinator::start(&db, |cfg| {
        cfg.grpc.max_connection_age = Duration::from_millis(1500);
        cfg.grpc.max_connection_age_grace = Duration::from_secs(3);
    })
    .await;
    let stop = CancellationToken::new();
    let mut counters = Vec::new();
    let mut runs = Vec::new();
    for i in 0..3 {
        let w = sleeper(c.endpoint(), &format!("ageing-{i}"));
        counters.push(w.counters());
        runs.push(tokio::spawn(w.run(stop.clone())));
    }
    let mut client = c.client().await;
    wait_connected(&client, &["ageing-0", "ageing-1", "ageing-2"]).await;

    // 40 rounds of 250 ms: 5 short tasks each, and a 4 s task every 10th round.
    let started = Instant::now();
    let mut ids = Vec::new();
    for round in 0..40u64 {
        for i in 0..5 {
            ids.push(submit_sleep(&mut client, &format!("short-{round}-{i}"), 20).await);
        }
        if round % 10 == 0 {
            ids.push(submit_sleep(&mut client, &format!("long-{round}"), 4000).await);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let n = ids.len() as u64;
    assert_eq!(n, 204);
    wait_until("every task completes", Duration::from_secs(60), || async {
        c.store.audit().await.unwrap().completed == n
    })
    .await;
    let elapsed = started.elapsed();

    let audit = c.store.audit().await.unwrap();
    assert_eq!(audit.tasks, n, "each task stored once");
    assert_eq!(audit.accepted_twice, 0, "no task accepted twice");
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    let mut retried = 0;
    for id in &ids {
        let attempts = c.store.attempts(id.parse().unwrap()).await.unwrap();
        let completed = attempts.iter().filter(|a| a.outcome.as_deref() == Some("completed")).count();
        assert_eq!(completed, 1, "task {id} completed once: {attempts:?}");
        if attempts.len() > 1 {
            retried += 1;
        }
        for a in &attempts {
            *outcomes.entry(a.outcome.clone().unwrap_or_default()).or_default() += 1;
        }
    }
    let sessions = total(&counters, |c| c.sessions.load(Ordering::Relaxed));
    let stream_errors = total(&counters, |c| c.stream_errors.load(Ordering::Relaxed));
    let refused = total(&counters, |c| c.refused.load(Ordering::Relaxed));
    let accepted = total(&counters, |c| c.accepted.load(Ordering::Relaxed));
    eprintln!(
        "ageing: {n} tasks in {elapsed:?}; attempt outcomes {outcomes:?}; {retried} tasks retried; \
         {sessions} sessions; {stream_errors} stream errors; {accepted} accepted; {refused} refused"
    );
    // Only `undelivered` and `not_received` (never reached a worker, not charged) may come
    // before the completion.
    let charged: Vec<&String> = outcomes
        .keys()
        .filter(|o| !matches!(o.as_str(), "completed" | "undelivered" | "not_received"))
        .collect();
    assert!(charged.is_empty(), "attempts ended as {charged:?}: {outcomes:?}");
    assert_eq!(stream_errors, 0, "no task stream ended with an error");
    assert_eq!(refused, 0, "no result was refused");
    assert!(sessions > 3, "workers reopened their streams on new connections ({sessions} sessions)");

    stop.cancel();
    for r in runs {
        r.await.unwrap().unwrap();
    }
    c.stop().await.unwrap();
}

/// An idle coordinator stops at once: nothing holds the batched writers open, so their loops
/// end and nothing waits out a timeout or warns that writes did not finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_an_idle_coordinator_stops_at_once_without_warnings() {
    an_idle_coordinator_stops_at_once_without_warnings(TestDb::sqlite().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
async fn postgres_an_idle_coordinator_stops_at_once_without_warnings() {
    let db = TestDb::postgres().await.expect("TEST_DATABASE_URL is set");
    an_idle_coordinator_stops_at_once_without_warnings(db).await;
}

async fn an_idle_coordinator_stops_at_once_without_warnings(db: TestDb) {
    let logs = captured_logs();
    let c = TestCoordinator::start(&db, |_| {}).await;
    let started = Instant::now();
    c.stop().await.unwrap();
    let took = started.elapsed();
    eprintln!("idle stop ({}): {took:?}", db.store.backend());
    // Loose on purpose (a shared, noisy machine): the batch wait alone used to take 5 s.
    assert!(took < Duration::from_secs(3), "an idle stop took {took:?}");
    db.cleanup().await;
    let logs = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(!logs.contains("did not finish in time"), "a stop warned: {logs}");
    assert!(!logs.contains("did not drain"), "a stop warned: {logs}");
}
