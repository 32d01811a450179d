//! What `/metrics` holds over time, rather than what it shows at one instant:
//!
//! - histogram samples are folded into their buckets by the exporter's upkeep whether or not
//!   anything scrapes, so the memory they take does not grow while Prometheus is away (a
//!   counting allocator sees the bytes the raw samples hold and sees them given back);
//! - the series of a task type no live worker declares any more leave `/metrics` after the
//!   series TTL, while a type with tasks still waiting keeps its series.
//!
//! Its own test binary: the allocator counts this process only, and the process-wide recorder
//! is installed with a short series TTL by whichever coordinator starts first (all use the same).

mod common;

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicI64, Ordering},
    time::Duration,
};

use common::*;
use coordinator_worker::{Worker, WorkerOptions, handler_fn};
use tokio_util::sync::CancellationToken;

/// Bytes allocated and not yet freed, by the whole process.
static LIVE: AtomicI64 = AtomicI64::new(0);

struct Counting;

// SAFETY: every call is passed to the system allocator unchanged; only sizes are counted.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Short, so a type that is gone leaves within seconds; gauges refresh every TTL/3.
const TTL: Duration = Duration::from_secs(3);

/// The allocator and the recorder are shared by the whole process: one test at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn start(db: &TestDb) -> TestCoordinator {
    TestCoordinator::start(db, |c| c.http.metrics_series_ttl = TTL).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn histogram_samples_are_folded_into_buckets_without_a_scrape() {
    let _one = ONE_AT_A_TIME.lock().await;
    let db = TestDb::sqlite().await;
    let c = start(&db).await;
    let latency = metrics::histogram!(coordinator::metrics::DISPATCH_LATENCY);

    // Raw samples are kept until upkeep (or a render) folds them: record until they visibly
    // hold memory. Upkeep may run meanwhile; recording goes on until the growth shows.
    let before = LIVE.load(Ordering::Relaxed);
    let mut grown = 0;
    for _ in 0..500 {
        for _ in 0..10_000 {
            latency.record(0.001);
        }
        grown = LIVE.load(Ordering::Relaxed) - before;
        if grown >= 4 << 20 {
            break;
        }
    }
    assert!(grown >= 4 << 20, "recorded samples hold no memory ({grown} bytes): nothing to observe");

    // Nothing scrapes. The gauge refresh runs the upkeep, which gives the memory back. (Each
    // recording below also lets the epoch-based reclamation behind the sample buffers run.)
    let probe = metrics::histogram!(coordinator::metrics::DB_QUERY, "op" => "upkeep_probe");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        probe.record(0.0);
        let held = LIVE.load(Ordering::Relaxed) - before;
        // Without upkeep they hold all of it; half leaves room for what the running
        // coordinator allocates meanwhile.
        if held < grown / 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "without a scrape the samples still hold {held} of {grown} bytes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Folded, not lost: the buckets count every sample.
    let (_, scrape) = http_get(c.http, "/metrics").await.unwrap();
    let count = scrape
        .lines()
        .find_map(|l| l.strip_prefix("coordinator_dispatch_latency_seconds_count "))
        .map(|v| v.trim().parse::<f64>().unwrap())
        .unwrap_or(0.0);
    assert!(count >= 40_000.0, "{count}");
    c.stop().await.unwrap();
    db.cleanup().await;
}

fn echo(o: WorkerOptions) -> Worker {
    Worker::new(o, handler_fn(|t| async move { Ok(t.payload) })).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_series_of_a_type_no_worker_declares_any_more_leave_metrics() {
    let _one = ONE_AT_A_TIME.lock().await;
    let db = TestDb::sqlite().await;
    let c = start(&db).await;
    let mut o = WorkerOptions::new(c.endpoint(), "short-lived");
    o.capabilities = vec!["transient".into(), "kept".into()];
    let stop = CancellationToken::new();
    let run = tokio::spawn(echo(o).run(stop.clone()));
    let mut client = c.client().await;
    wait_connected(&client, &["short-lived"]).await;
    let id = submit(&mut client, "transient", b"x").await;
    wait_until("the task completes", Duration::from_secs(20), || {
        let (id, mut client) = (id.clone(), client.clone());
        async move { task_status(&mut client, &id).await == coordinator::proto::TaskStatus::Completed }
    })
    .await;
    scrape_until(c.http, "the declared types have series", |s| {
        s.contains(r#"coordinator_task_duration_seconds_count{task_type="transient"} 1"#)
            && s.contains(r#"coordinator_tasks_pending{task_type="transient"} 0"#)
            && s.contains(r#"coordinator_tasks_pending{task_type="kept"} 0"#)
    })
    .await;

    // The worker leaves; a task of one of its types is left waiting.
    stop.cancel();
    run.await.unwrap().unwrap();
    submit(&mut client, "kept", b"x").await;

    let scrape = scrape_until(c.http, "the gone type's series leave /metrics", |s| {
        !s.contains(r#"task_type="transient""#)
    })
    .await;
    // The type with a waiting task keeps its name (so an operator sees what waits).
    assert!(scrape.contains(r#"coordinator_tasks_pending{task_type="kept"} 1"#), "{scrape}");
    assert!(scrape.contains(r#"coordinator_tasks_unschedulable{task_type="kept"} 1"#), "{scrape}");
    // Counters stay (a counter that came back would lose increments to rate()); the always-set
    // gauges stay.
    for series in
        ["coordinator_tasks_completed_total ", "coordinator_build_info{", "coordinator_database_up "]
    {
        assert!(scrape.contains(series), "{series} left /metrics\n{scrape}");
    }
    c.stop().await.unwrap();
    db.cleanup().await;
}
