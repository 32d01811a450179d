//! coordctl and the client calls a newcomer meets first, against a coordinator in this process:
//! a task of a type no live worker runs is accepted with a warning (or refused) and says why it
//! waits; `watch` shows every state a task went through and exits with a code that says how the
//! task ended; `bench` runs next to workers that take the same built-in task types.

#[macro_use]
mod common;

use std::{process::Stdio, sync::Arc, time::Duration};

use common::*;
use coordinator::proto;
use coordinator_worker::{Worker, WorkerOptions, handlers::Handlers};
use tokio_util::sync::CancellationToken;

/// Local workers running every built-in handler (`noop` among them), as `coordinator dev`
/// starts them.
fn dev_workers(endpoint: &str, n: usize, stop: &CancellationToken) -> Vec<tokio::task::JoinHandle<()>> {
    let names: Vec<String> = coordinator_worker::handlers::BUILTIN.iter().map(|s| s.to_string()).collect();
    (1..=n)
        .map(|i| {
            let handlers = Handlers::builtin(&names).unwrap();
            let mut o = WorkerOptions::new(endpoint.to_owned(), format!("dev-worker-{i}"));
            o.max_concurrent = 4;
            o.capabilities = handlers.task_types();
            let w = Worker::new(o, Arc::new(handlers)).unwrap();
            let stop = stop.clone();
            tokio::spawn(async move {
                let _ = w.run(stop).await;
            })
        })
        .collect()
}

// ---- coordctl bench next to other workers ----

/// `coordctl bench` against a coordinator whose own workers also run `noop` (as under
/// `coordinator dev`): the bench's tasks go to the bench's workers only, it prints its figures
/// and exits 0, and the workers it registered are gone from the live fleet afterwards.
async fn bench_next_to_dev_workers(db: &TestDb) {
    let tc = TestCoordinator::start(db, |_| {}).await;
    let stop = CancellationToken::new();
    let dev = dev_workers(&tc.endpoint(), 2, &stop);
    let client = tc.client().await;
    wait_connected(&client, &["dev-worker-1", "dev-worker-2"]).await;

    let out = coordctl_async(
        &tc.endpoint(),
        &[
            "bench",
            "--tasks",
            "300",
            "--workers",
            "2",
            "--concurrency",
            "8",
            "--batch",
            "100",
            "--trickle",
            "20",
        ],
    )
    .await;
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "bench exits 0\n{}", text(&out));
    assert!(report.contains("end to end") && report.contains("latency (trickle)"), "{}", text(&out));
    assert!(report.contains("exactly once      yes"), "{}", text(&out));

    // The dev workers ran none of the bench's tasks.
    let mut c = client.clone();
    for w in ["dev-worker-1", "dev-worker-2"] {
        let stats = c
            .get_worker_stats(proto::GetWorkerStatsRequest { worker_id: w.into() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(stats.tasks_completed, 0, "{w} took bench tasks");
    }
    // The bench's workers deregistered when it ended.
    let workers = c.list_workers(proto::ListWorkersRequest::default()).await.unwrap().into_inner().workers;
    let bench: Vec<_> = workers.iter().filter(|w| w.worker_id.starts_with("bench-")).collect();
    assert_eq!(bench.len(), 2, "{workers:?}");
    for w in bench {
        assert_ne!(
            w.state,
            proto::WorkerState::Active as i32,
            "{} still active after the bench",
            w.worker_id
        );
    }

    stop.cancel();
    for h in dev {
        h.await.unwrap();
    }
    tc.stop().await.unwrap();
}

on_every_backend!(bench_next_to_dev_workers);

/// `coordctl bench --rate` spaces the bulk phase's submissions evenly at that pace: 120 tasks in
/// batches of 6 at 100 tasks/s take at least 1.14 s to submit (the last batch is due then), and
/// each is still run and accepted once. A rate that is not above 0, or so low the submissions
/// would take more than a day, is refused in one line.
async fn bench_paces_its_submissions(db: &TestDb) {
    let tc = TestCoordinator::start(db, |_| {}).await;
    let args = ["bench", "--tasks", "120", "--workers", "2", "--concurrency", "4", "--batch", "6"];
    let mut paced = vec!["--json"];
    paced.extend(args);
    paced.extend(["--no-jobs", "--trickle", "0", "--rate", "100"]);
    let out = coordctl_async(&tc.endpoint(), &paced).await;
    assert!(out.status.success(), "bench exits 0\n{}", text(&out));
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", text(&out)));
    assert_eq!(report["rate"], 100.0, "{report}");
    assert_eq!(report["exactly_once"], true, "{report}");
    let submit = report["submit_seconds"].as_f64().unwrap();
    assert!(submit >= 1.14, "paced submissions took {submit} s: {report}");

    for (rate, says) in [
        ("0", "--rate must be a number of tasks per second above 0"),
        ("0.000001", "--rate 0.000001 would take more than a day to submit 120 tasks"),
    ] {
        let mut refused = args.to_vec();
        refused.extend(["--rate", rate]);
        let out = coordctl_async(&tc.endpoint(), &refused).await;
        assert!(!out.status.success(), "{}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{}", text(&out));
        assert_eq!(err.trim().lines().count(), 1, "{}", text(&out));
    }
    tc.stop().await.unwrap();
}

on_every_backend!(bench_paces_its_submissions);

/// `coordctl bench --database-url` counts the writes of its bulk phase only. Postgres publishes
/// a backend's counters within seconds of its statements, not at once, so the trickle phase's
/// tasks, written just before the bulk phase, would otherwise be counted in part as the bulk
/// phase's: 100 tasks one at a time, then 100 in bulk, is one row inserted per bulk task.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
async fn bench_counts_the_writes_of_its_bulk_phase_only() {
    let db = TestDb::postgres().await.expect("TEST_DATABASE_URL is set");
    let tc = TestCoordinator::start(&db, |_| {}).await;
    let args = [
        "--json",
        "bench",
        "--tasks",
        "100",
        "--workers",
        "2",
        "--concurrency",
        "4",
        "--batch",
        "50",
        "--no-jobs",
        "--trickle",
        "100",
        "--database-url",
        &db.url,
    ];
    let out = coordctl_async(&tc.endpoint(), &args).await;
    assert!(out.status.success(), "bench exits 0\n{}", text(&out));
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", text(&out)));
    assert_eq!(report["exactly_once"], true, "{report}");
    assert_eq!(report["cost"]["rows_inserted_per_task"], 1.0, "one insert per bulk task: {report}");
    tc.stop().await.unwrap();
    db.cleanup().await;
}

/// The benchmarks' database counters keep the rows of `workers` apart from the rest: a
/// registration writes one there, a submitted task one in `tasks`.
#[tokio::test]
async fn db_stats_count_the_rows_of_workers_apart() {
    use coordinator::store::stats::{DbStats, STATS_SETTLE};
    let db = TestDb::postgres().await.expect("TEST_DATABASE_URL is set");
    let mut stats = DbStats::connect(&db.url).await.unwrap().expect("a Postgres database");
    let before = stats.sample().await.unwrap();
    db.store.register_worker(&coordinator::store::testing::registration("w1", 1)).await.unwrap();
    db.store.create_tasks(&[coordinator::store::testing::new_task("prove")]).await.unwrap();
    // Published once the writing connections go idle (within STATS_SETTLE).
    let deadline = std::time::Instant::now() + STATS_SETTLE + Duration::from_secs(5);
    let written = loop {
        let d = stats.sample().await.unwrap().since(&before);
        if d.worker_rows >= 1 && d.rows_written() > d.worker_rows {
            break d;
        }
        assert!(std::time::Instant::now() < deadline, "not counted: {d:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // (The rest also holds whatever the migrations wrote before they were published.)
    assert_eq!(written.worker_rows, 1, "the registration alone: {written:?}");
    db.cleanup().await;
}

/// A row whose backend publishes it late (busy past `STATS_SETTLE` right after writing it, as a
/// connection whose flush found a counter locked retries 10 s later) is waited for before a
/// sample: a benchmark would otherwise count it as written in its next phase.
#[tokio::test]
async fn db_stats_settle_waits_for_rows_published_late() {
    use coordinator::store::stats::{DbStats, STATS_SETTLE};
    use sqlx::Connection;
    let db = TestDb::postgres().await.expect("TEST_DATABASE_URL is set");
    let mut stats = DbStats::connect(&db.url).await.unwrap().expect("a Postgres database");
    let busy_for = STATS_SETTLE + Duration::from_secs(4);
    let mut writer = sqlx::PgConnection::connect(&db.url).await.unwrap();
    // Its counters published on going idle; the next statement's are then held for 10 s.
    sqlx::query("SELECT count(*) FROM jobs").execute(&mut writer).await.unwrap();
    sqlx::query("INSERT INTO jobs (id, name, total) VALUES (gen_random_uuid(), 'late', 0)")
        .execute(&mut writer)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let busy = tokio::spawn(async move {
        sqlx::query("SELECT pg_sleep($1)").bind(busy_for.as_secs_f64()).execute(&mut writer).await.unwrap();
    });
    let mut reader = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let jobs_inserted =
        "SELECT n_tup_ins FROM pg_stat_user_tables WHERE relname = 'jobs' AND schemaname = current_schema()";
    assert!(!stats.inserts_published().await.unwrap(), "the row is not published yet");
    assert_eq!(sqlx::query_scalar::<_, i64>(jobs_inserted).fetch_one(&mut reader).await.unwrap(), 0);

    assert!(stats.settle().await.unwrap(), "published once its backend went idle");
    assert!(started.elapsed() >= busy_for, "waited past STATS_SETTLE for it: {:?}", started.elapsed());
    let counted: i64 = sqlx::query_scalar(jobs_inserted).fetch_one(&mut reader).await.unwrap();
    assert_eq!(counted, 1, "the late row is counted");
    busy.await.unwrap();
    db.cleanup().await;
}

// ---- WatchTask and coordctl watch ----

/// Collects a watch stream's events until it ends.
async fn watch_events(client: &Client, task_id: &str) -> tokio::task::JoinHandle<Vec<proto::TaskEvent>> {
    let mut c = client.clone();
    let mut stream =
        c.watch_task(proto::WatchTaskRequest { task_id: task_id.into() }).await.expect("watch").into_inner();
    tokio::spawn(async move {
        let mut events = Vec::new();
        while let Ok(Some(ev)) = stream.message().await {
            events.push(ev);
        }
        events
    })
}

fn statuses(events: &[proto::TaskEvent]) -> Vec<proto::TaskStatus> {
    events.iter().map(|e| proto::TaskStatus::try_from(e.status).unwrap()).collect()
}

/// A task its worker finishes before the batched running mark is written goes pending ->
/// (assigned) -> completed in the database; the watch still shows it running, on its worker
/// and attempt, before it shows it completed.
async fn watch_shows_running_of_a_fast_task(db: &TestDb) {
    let tc = TestCoordinator::start(db, |_| {}).await;
    let mut client = tc.client().await;
    let mut w = RawWorker::connect(&tc.endpoint(), "fast-1", 2, &["quick"]).await;
    wait_connected(&client, &["fast-1"]).await;
    for round in 0..3 {
        let id = submit(&mut client, "quick", b"x").await;
        let events = watch_events(&client, &id).await;
        let a = w.next(Duration::from_secs(10)).await;
        assert_eq!(a.task_id, id);
        let r = w.complete(&id, a.attempt, b"done").await.unwrap();
        assert!(!r.duplicate);
        let events =
            tokio::time::timeout(Duration::from_secs(10), events).await.expect("watch ends").unwrap();
        let seen = statuses(&events);
        let running = seen.iter().position(|s| *s == proto::TaskStatus::Running);
        assert_eq!(seen.last(), Some(&proto::TaskStatus::Completed), "round {round}: {seen:?}");
        let running = running.unwrap_or_else(|| panic!("round {round}: no running event: {seen:?}"));
        assert_eq!(running, seen.len() - 2, "round {round}: running right before completed: {seen:?}");
        assert_eq!(events[running].worker_id, "fast-1");
        assert_eq!(events[running].attempt, a.attempt);
        assert_eq!(
            seen.iter().filter(|s| **s == proto::TaskStatus::Running).count(),
            1,
            "round {round}: {seen:?}"
        );
    }
    drop(w);
    tc.stop().await.unwrap();
}

on_every_backend!(watch_shows_running_of_a_fast_task);

/// A fast attempt that fails and is retried, then a fast retry: the watch shows each attempt
/// running once, the failed one before the task waits again, the second before it completes.
async fn watch_shows_each_attempt_running_once(db: &TestDb) {
    let tc = TestCoordinator::start(db, |_| {}).await;
    let mut client = tc.client().await;
    let mut w = RawWorker::connect(&tc.endpoint(), "retry-1", 1, &["flaky"]).await;
    wait_connected(&client, &["retry-1"]).await;
    let id = submit(&mut client, "flaky", b"").await;
    let events = watch_events(&client, &id).await;
    let a = w.next(Duration::from_secs(10)).await;
    w.fail(&id, a.attempt, true).await.unwrap();
    let b = w.next(Duration::from_secs(10)).await;
    assert_eq!((a.attempt, b.attempt), (1, 2));
    w.complete(&id, b.attempt, b"").await.unwrap();
    let events = tokio::time::timeout(Duration::from_secs(10), events).await.expect("watch ends").unwrap();
    let seen: Vec<(proto::TaskStatus, u32)> =
        events.iter().map(|e| (proto::TaskStatus::try_from(e.status).unwrap(), e.attempt)).collect();
    let running = |attempt| seen.iter().filter(|s| **s == (proto::TaskStatus::Running, attempt)).count();
    assert!(running(1) <= 1, "{seen:?}");
    assert_eq!(running(2), 1, "{seen:?}");
    assert_eq!(&seen[seen.len() - 2..], [(proto::TaskStatus::Running, 2), (proto::TaskStatus::Completed, 2)]);
    // Waiting again after attempt 1: attempt 1 was shown running before.
    if let Some(again) = seen.iter().position(|s| *s == (proto::TaskStatus::Pending, 1)) {
        assert_eq!(running(1), 1, "{seen:?}");
        assert!(seen[..again].contains(&(proto::TaskStatus::Running, 1)), "{seen:?}");
    }
    drop(w);
    tc.stop().await.unwrap();
}

on_every_backend!(watch_shows_each_attempt_running_once);

/// A task cancelled before any worker took it never ran: the watch shows no running state.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_shows_no_running_for_a_task_that_never_ran() {
    let db = TestDb::sqlite().await;
    let tc = TestCoordinator::start(&db, |_| {}).await;
    let mut client = tc.client().await;
    let id = submit(&mut client, "nobody-runs-this", b"").await;
    let events = watch_events(&client, &id).await;
    client
        .cancel_task(proto::CancelTaskRequest { task_id: id.clone(), reason: String::new() })
        .await
        .unwrap();
    let events = tokio::time::timeout(Duration::from_secs(10), events).await.expect("watch ends").unwrap();
    let seen = statuses(&events);
    assert_eq!(seen.first(), Some(&proto::TaskStatus::Pending), "{seen:?}");
    assert_eq!(seen.last(), Some(&proto::TaskStatus::Cancelled), "{seen:?}");
    assert!(!seen.contains(&proto::TaskStatus::Running), "{seen:?}");
    tc.stop().await.unwrap();
    db.cleanup().await;
}

/// `coordctl watch` (and `submit --wait`) exit 0 for a completed task, 3 for a failed one, 4 for
/// a cancelled one, and 1 when they cannot watch it; `watch --help` says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_exit_codes_say_how_the_task_ended() {
    let db = TestDb::sqlite().await;
    let tc = TestCoordinator::start(&db, |_| {}).await;
    let endpoint = tc.endpoint();
    let mut client = tc.client().await;
    let mut w = RawWorker::connect(&endpoint, "codes-1", 4, &["job"]).await;
    wait_connected(&client, &["codes-1"]).await;

    let completed = submit(&mut client, "job", b"").await;
    let a = w.next(Duration::from_secs(10)).await;
    w.complete(&completed, a.attempt, b"ok").await.unwrap();

    let failed = client
        .submit_task(proto::SubmitTaskRequest {
            task_type: "job".into(),
            max_attempts: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .task_id;
    let a = w.next(Duration::from_secs(10)).await;
    w.fail(&failed, a.attempt, false).await.unwrap();

    let cancelled = submit(&mut client, "job", b"").await;
    w.next(Duration::from_secs(10)).await;
    client
        .cancel_task(proto::CancelTaskRequest {
            task_id: cancelled.clone(),
            reason: "changed my mind".into(),
        })
        .await
        .unwrap();

    for (id, code, last) in
        [(&completed, 0, "completed"), (&failed, 3, "failed"), (&cancelled, 4, "cancelled")]
    {
        let out = coordctl_async(&endpoint, &["watch", id]).await;
        assert_eq!(out.status.code(), Some(code), "watch of a {last} task\n{}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.lines().last().is_some_and(|l| l.starts_with(last)), "{}", text(&out));
    }
    let unknown = coordinator::domain::TaskId::new().to_string();
    let out = coordctl_async(&endpoint, &["watch", &unknown]).await;
    assert_eq!(out.status.code(), Some(1), "watch of an unknown task\n{}", text(&out));

    let out = coordctl_async(&endpoint, &["watch", "--help"]).await;
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in ["0 ", "1 ", "3 ", "4 ", "completed", "failed", "cancelled"] {
        assert!(help.contains(needle), "watch --help names exit status {needle:?}:\n{help}");
    }
    drop(w);
    tc.stop().await.unwrap();
    db.cleanup().await;
}

/// The replica answering `watch`, `job watch` and `submit --wait` shuts down (a rollout) and
/// another takes its address: coordctl follows the task and the job on, says so on stderr, and
/// ends as they end, instead of failing with "coordinator is shutting down".
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watches_follow_a_task_and_a_job_across_a_replica_restart() {
    let db = TestDb::sqlite().await;
    let [port] = free_ports::<1>();
    let addr = format!("127.0.0.1:{port}");
    let a = TestCoordinator::start_at(&db.url, &addr, |cfg| cfg.coordinator.id = "replica-a".into()).await;
    let endpoint = a.endpoint();
    let mut client = a.client().await;
    let task = submit(&mut client, "nobody-runs-this", b"x").await;
    let job = client
        .submit_job(proto::SubmitJobRequest {
            name: "across".into(),
            tasks: vec![proto::SubmitTaskRequest {
                task_type: "nobody-runs-this".into(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // Each command has printed its first line (or, for --wait, opened its watch) before the
    // replica goes.
    let spawn = |endpoint: &str, args: Vec<String>| {
        let mut child = coordctl_command(endpoint, &args.iter().map(String::as_str).collect::<Vec<_>>())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run coordctl");
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        std::io::BufRead::read_line(&mut stdout, &mut first).unwrap();
        (child, first, stdout)
    };
    let watches = tokio::task::spawn_blocking({
        let (task, job, e) = (task.clone(), job.job_id.clone(), endpoint.clone());
        move || [spawn(&e, vec!["watch".into(), task]), spawn(&e, vec!["job".into(), "watch".into(), job])]
    })
    .await
    .unwrap();
    let wait = tokio::task::spawn_blocking({
        let endpoint = endpoint.clone();
        move || coordctl(&endpoint, &["submit", "--type", "waited-for", "--wait"])
    });
    // Its task is stored; its watch opens on this replica or, once it is gone, on the next.
    wait_until("submit --wait has submitted", Duration::from_secs(10), || {
        let mut client = client.clone();
        async move {
            let req = proto::ListTasksRequest { task_type: "waited-for".into(), ..Default::default() };
            client.list_tasks(req).await.is_ok_and(|r| !r.into_inner().tasks.is_empty())
        }
    })
    .await;
    a.stop().await.unwrap();
    let b = TestCoordinator::start_at(&db.url, &addr, |cfg| cfg.coordinator.id = "replica-b".into()).await;
    let mut client = b.client().await;
    let waited = client
        .list_tasks(proto::ListTasksRequest { task_type: "waited-for".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .tasks
        .remove(0)
        .task_id;
    for id in [&task, &job.job_id, &waited] {
        let req = proto::CancelTaskRequest { task_id: id.clone(), reason: "done with it".into() };
        if id == &job.job_id {
            client
                .cancel_job(proto::CancelJobRequest { job_id: id.clone(), reason: req.reason })
                .await
                .unwrap();
        } else {
            client.cancel_task(req).await.unwrap();
        }
    }
    for (child, first, mut rest) in watches {
        let out = tokio::task::spawn_blocking(move || {
            let mut tail = String::new();
            std::io::Read::read_to_string(&mut rest, &mut tail).unwrap();
            (child.wait_with_output().unwrap(), first + &tail)
        })
        .await
        .unwrap();
        let (out, stdout) = out;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(4), "ends as cancelled: {stdout}\n{stderr}");
        assert!(stderr.contains("broke") && stderr.contains("following it again"), "{stderr}");
    }
    let out = wait.await.unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    b.stop().await.unwrap();
    db.cleanup().await;
}

/// Two replicas: `coordctl workers` through either says which replica holds each worker, and
/// whether its stream is open there (`open`) or here (`open here`); once the worker's stream
/// closes, the other replica shows it closed too. A worker's prefetch shows beside its slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
async fn workers_name_the_replica_that_holds_them() {
    let db = TestDb::postgres().await.expect("TEST_DATABASE_URL is set");
    let a = TestCoordinator::start(&db, |cfg| cfg.coordinator.id = "replica-a".into()).await;
    let b = TestCoordinator::start(&db, |cfg| cfg.coordinator.id = "replica-b".into()).await;
    let on_b = RawWorker::connect(&b.endpoint(), "w-on-b", 1, &["echo"]).await;
    let mut queued = client(&b.endpoint()).await;
    queued
        .register_worker(proto::RegisterWorkerRequest {
            worker_id: "w-queues".into(),
            max_concurrent_tasks: 2,
            prefetch: 3,
            ..Default::default()
        })
        .await
        .expect("register");
    let _stream = queued
        .receive_tasks(proto::ReceiveTasksRequest { worker_id: "w-queues".into(), ..Default::default() })
        .await;
    wait_connected(&b.client().await, &["w-on-b", "w-queues"]).await;
    for (replica, here) in [(&a, false), (&b, true)] {
        let out = coordctl_async(&replica.endpoint(), &["--json", "workers"]).await;
        assert!(out.status.success(), "{}", text(&out));
        let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let w = &listed[0];
        assert_eq!(
            (w["worker_id"].as_str(), w["replica"].as_str()),
            (Some("w-on-b"), Some("replica-b")),
            "{listed}"
        );
        assert_eq!(w["connected"].as_bool(), Some(here), "{listed}");
        assert_eq!(w["connected_elsewhere"].as_bool(), Some(!here), "{listed}");
        assert_eq!(
            (listed[1]["prefetch"].as_u64(), listed[1]["max_concurrent_tasks"].as_u64()),
            (Some(3), Some(2))
        );
        let out = coordctl_async(&replica.endpoint(), &["workers"]).await;
        let table = String::from_utf8_lossy(&out.stdout);
        let header: Vec<&str> =
            table.lines().next().unwrap().split("  ").map(str::trim).filter(|c| !c.is_empty()).collect();
        let row = table.lines().nth(1).unwrap();
        assert!(header.contains(&"REPLICA") && row.contains("replica-b"), "{table}");
        assert!(row.contains(if here { " open here " } else { " open " }), "{table}");
        assert!(row.contains(" 0/1 "), "{table}");
        assert!(table.lines().nth(2).unwrap().contains(" 0/2+3 "), "{table}");
    }
    // The worker's process exits: replica A learns from the row that its stream closed.
    on_b.disconnect();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let out = coordctl_async(&a.endpoint(), &["--json", "workers"]).await;
        let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        if listed[0]["connected_elsewhere"].as_bool() == Some(false) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still shown open on replica-b: {listed}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    b.stop().await.unwrap();
    a.stop().await.unwrap();
    db.cleanup().await;
}

// ---- a type no live worker runs ----

fn reason(t: &proto::Task) -> proto::PendingReason {
    proto::PendingReason::try_from(t.pending_reason).unwrap()
}

fn submit_request(task_type: &str) -> proto::SubmitTaskRequest {
    proto::SubmitTaskRequest { task_type: task_type.into(), ..Default::default() }
}

/// A mistyped type is accepted with a warning that names it and the types the live workers run;
/// the pending task says why it is not moving (GetTask, ListTasks, REST), as does one waiting
/// for a busy worker and one backing off after a failure.
async fn pending_tasks_say_why_they_wait(db: &TestDb) {
    let tc = TestCoordinator::start(db, |c| {
        // A retry waits long enough to be seen waiting.
        c.tasks.retry_backoff_base = Duration::from_secs(60);
        c.tasks.retry_backoff_max = Duration::from_secs(120);
    })
    .await;
    let mut client = tc.client().await;
    let mut w = RawWorker::connect(&tc.endpoint(), "w-1", 1, &["noop", "prime_count"]).await;
    wait_connected(&client, &["w-1"]).await;

    let resp = client.submit_task(submit_request("prime")).await.unwrap().into_inner();
    assert_eq!(
        resp.warnings,
        [
            r#"no connected worker runs type "prime" (known types: noop, prime_count); the task waits until a worker that runs it registers"#
        ],
    );
    let expected = r#"no connected worker runs type "prime" (known types: noop, prime_count)"#;
    let answered = resp.task.unwrap();
    assert_eq!(
        (reason(&answered), answered.pending_detail.as_str()),
        (proto::PendingReason::NoWorker, expected)
    );
    let t = get_task(&mut client, &resp.task_id).await;
    assert_eq!((reason(&t), t.pending_detail.as_str()), (proto::PendingReason::NoWorker, expected));
    let listed = client
        .list_tasks(proto::ListTasksRequest { task_type: "prime".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .tasks;
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (reason(&listed[0]), listed[0].pending_detail.as_str()),
        (proto::PendingReason::NoWorker, expected)
    );
    let (code, body) = http_get(tc.http, &format!("/api/v1/tasks/{}", resp.task_id)).await.unwrap();
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["pending_reason"], "PENDING_REASON_NO_WORKER", "{body}");
    assert_eq!(v["pending_detail"], expected, "{body}");
    let (code, body) = http(tc.http, "POST", "/api/v1/tasks", r#"{"task_type":"prime"}"#).await;
    assert_eq!(code, 201, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(v["warnings"][0].as_str().unwrap().starts_with(expected), "{body}");

    // Batches and jobs: one warning per unknown type; a known type gets none.
    let batch = client
        .submit_tasks(proto::SubmitTasksRequest {
            tasks: vec![submit_request("prime"), submit_request("prime"), submit_request("isprime")],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(batch.warnings.len(), 2, "{:?}", batch.warnings);
    assert!(batch.warnings[0].contains(r#""isprime""#) && batch.warnings[1].contains(r#""prime""#));
    assert!(batch.results.iter().all(|r| r.warnings.is_empty()));
    assert!(batch.results.iter().all(|r| reason(r.task.as_ref().unwrap()) == proto::PendingReason::NoWorker));
    let job = client
        .submit_job(proto::SubmitJobRequest {
            name: "j".into(),
            tasks: vec![submit_request("prime")],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.warnings.len(), 1);

    // The worker's one slot taken: the next task of its type waits for a free slot.
    let first = client.submit_task(submit_request("noop")).await.unwrap().into_inner();
    assert!(first.warnings.is_empty(), "{:?}", first.warnings);
    let a = w.next(Duration::from_secs(10)).await;
    assert_eq!(a.task_id, first.task_id);
    let second = submit(&mut client, "noop", b"").await;
    let t = get_task(&mut client, &second).await;
    assert_eq!(reason(&t), proto::PendingReason::WorkersBusy, "{t:?}");
    assert_eq!(
        t.pending_detail,
        r#"no worker that runs type "noop" has a free slot (1 worker, all 1 slots taken)"#
    );

    // A retriable failure: the first backs off; the second takes the free slot.
    w.fail(&first.task_id, a.attempt, true).await.unwrap();
    let t = get_task(&mut client, &first.task_id).await;
    assert_eq!(reason(&t), proto::PendingReason::Delayed, "{t:?}");
    assert!(t.pending_detail.starts_with("delayed until "), "{}", t.pending_detail);
    let b = w.next(Duration::from_secs(10)).await;
    assert_eq!(b.task_id, second);
    let t = get_task(&mut client, &second).await;
    assert_eq!(
        (reason(&t), t.pending_detail.as_str()),
        (proto::PendingReason::Unspecified, ""),
        "not pending"
    );

    drop(w);
    tc.stop().await.unwrap();
}

on_every_backend!(pending_tasks_say_why_they_wait);

/// With `tasks.reject_unknown_types` a type no live worker runs is refused with
/// FAILED_PRECONDITION (REST 409) in one line naming it and the known types; a batch or job
/// holding one is refused whole; known types are accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reject_unknown_types_refuses_them_in_one_line() {
    let db = TestDb::sqlite().await;
    let tc = TestCoordinator::start(&db, |c| c.tasks.reject_unknown_types = true).await;
    let mut client = tc.client().await;

    // No worker at all.
    let e = client.submit_task(submit_request("noop")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert_eq!(
        e.message(),
        r#"task type "noop" is not run by any connected worker (no worker is connected); this coordinator refuses unknown types (tasks.reject_unknown_types)"#
    );

    // A worker registered since: its types are accepted at once, others refused.
    let _w = RawWorker::connect(&tc.endpoint(), "w-1", 2, &["noop", "echo"]).await;
    let ok = client.submit_task(submit_request("noop")).await.unwrap().into_inner();
    assert!(ok.created && ok.warnings.is_empty());
    let e = client.submit_task(submit_request("prime")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(
        e.message()
            .starts_with(r#"task type "prime" is not run by any connected worker (known types: echo, noop)"#)
    );
    assert!(!e.message().contains('\n'));
    let e = client
        .submit_tasks(proto::SubmitTasksRequest {
            tasks: vec![submit_request("echo"), submit_request("prime")],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    let e = client
        .submit_job(proto::SubmitJobRequest {
            name: "j".into(),
            tasks: vec![submit_request("prime"), submit_request("nope")],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(e.message().starts_with(r#"task types "nope", "prime" are not run"#), "{}", e.message());
    let (code, body) = http(tc.http, "POST", "/api/v1/tasks", r#"{"task_type":"prime"}"#).await;
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("failed_precondition") && body.contains(r#"\"prime\""#), "{body}");
    // Nothing of the refused submissions was stored.
    let all = client.list_tasks(proto::ListTasksRequest::default()).await.unwrap().into_inner().tasks;
    assert_eq!(all.iter().map(|t| t.task_type.as_str()).collect::<Vec<_>>(), ["noop"]);

    tc.stop().await.unwrap();
    db.cleanup().await;
}

/// With `tasks.reject_unknown_types`, a job made while its type ran and sent again once no live
/// worker runs it (its first answer lost, say) is answered with the job made earlier, not
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_sent_again_is_not_refused_for_a_type_that_left() {
    let db = TestDb::sqlite().await;
    let tc = TestCoordinator::start(&db, |c| {
        c.tasks.reject_unknown_types = true;
        c.coordinator.heartbeat_timeout = Duration::from_secs(1);
    })
    .await;
    let mut client = tc.client().await;
    let w = RawWorker::connect(&tc.endpoint(), "w-1", 2, &["echo"]).await;
    let keyed = || proto::SubmitJobRequest {
        name: "j".into(),
        tasks: vec![submit_request("echo")],
        idempotency_key: "echo-job".into(),
    };
    let made = client.submit_job(keyed()).await.unwrap().into_inner();
    drop(w);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while client.submit_task(submit_request("echo")).await.is_ok() {
        assert!(std::time::Instant::now() < deadline, "echo still accepted 15 s after its worker left");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let again = client.submit_job(keyed()).await.expect("the job made earlier").into_inner();
    assert!(again.existing && again.job_id == made.job_id && again.task_ids == made.task_ids, "{again:?}");
    tc.stop().await.unwrap();
    db.cleanup().await;
}

/// Replicas share one database: a worker connected to replica B runs what is submitted to
/// replica A, so A neither warns about nor refuses its type, and A sees B's worker busy.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
async fn a_worker_on_another_replica_counts() {
    let db = TestDb::postgres().await.expect("TEST_DATABASE_URL is set");
    let a = TestCoordinator::start(&db, |c| {
        c.coordinator.id = "replica-a".into();
        c.tasks.reject_unknown_types = true;
    })
    .await;
    let b = TestCoordinator::start(&db, |c| c.coordinator.id = "replica-b".into()).await;
    let mut on_b = RawWorker::connect(&b.endpoint(), "w-b", 1, &["prove"]).await;
    let mut client_a = a.client().await;
    let first = client_a.submit_task(submit_request("prove")).await.expect("accepted on A").into_inner();
    assert!(first.warnings.is_empty(), "{:?}", first.warnings);
    let e = client_a.submit_task(submit_request("verify")).await.unwrap_err();
    assert!(e.message().contains("(known types: prove)"), "{}", e.message());
    let got = on_b.next(Duration::from_secs(10)).await;
    assert_eq!(got.task_id, first.task_id);
    let second = submit(&mut client_a, "prove", b"").await;
    wait_until("A sees B's worker busy", Duration::from_secs(10), || {
        let mut c = client_a.clone();
        let id = second.clone();
        async move { reason(&get_task(&mut c, &id).await) == proto::PendingReason::WorkersBusy }
    })
    .await;
    on_b.complete(&got.task_id, got.attempt, b"").await.unwrap();
    drop(on_b);
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    db.cleanup().await;
}

/// `coordctl submit --type late --wait` with no worker for `late`: it says on stderr why it
/// waits and keeps waiting; a worker that runs `late` arrives, and it prints the result and
/// exits 0. Without --wait the warning goes to stderr, and `get` and `tasks` say why it waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn coordctl_says_why_a_task_waits_and_keeps_waiting() {
    use std::io::BufRead;
    let db = TestDb::sqlite().await;
    let tc = TestCoordinator::start(&db, |_| {}).await;
    let endpoint = tc.endpoint();
    let client = tc.client().await;
    let _other = RawWorker::connect(&endpoint, "w-echo", 1, &["echo"]).await;
    wait_connected(&client, &["w-echo"]).await;

    let out = coordctl_async(&endpoint, &["submit", "--type", "late-ish"]).await;
    assert!(out.status.success(), "{}", text(&out));
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.trim(),
        r#"coordctl: warning: no connected worker runs type "late-ish" (known types: echo); the task waits until a worker that runs it registers"#
    );
    let out = coordctl_async(&endpoint, &["get", &id]).await;
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains(r#"waiting   no connected worker runs type "late-ish" (known types: echo)"#),
        "{}",
        text(&out)
    );
    let out = coordctl_async(&endpoint, &["tasks", "--status", "pending"]).await;
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(listed.lines().next().unwrap().ends_with("WAITING"), "{listed}");
    assert!(listed.lines().any(|l| l.starts_with(&id) && l.ends_with("no_worker")), "{listed}");
    // A state that does not exist is a usage error, as other bad flags are.
    let out = coordctl_async(&endpoint, &["tasks", "--status", "bogus"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("use blocked, pending"), "{}", text(&out));

    let mut child = coordctl_command(&endpoint, &["submit", "--type", "late", "--payload", "hi", "--wait"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (line_tx, mut line_rx) = tokio::sync::mpsc::unbounded_channel();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = line_tx.send(line);
        }
    });
    let first = tokio::time::timeout(Duration::from_secs(20), line_rx.recv()).await.expect("a waiting line");
    assert_eq!(
        first.as_deref(),
        Some(r#"waiting: no connected worker runs type "late" (known types: echo)"#)
    );
    // Still waiting, and still running.
    assert!(child.try_wait().unwrap().is_none(), "coordctl keeps waiting");

    let mut late = RawWorker::connect(&endpoint, "w-late", 1, &["late"]).await;
    let a = late.next(Duration::from_secs(10)).await;
    late.complete(&a.task_id, a.attempt, b"hello").await.unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output()).await.unwrap().unwrap();
    reader.join().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "hello");
    tc.stop().await.unwrap();
    db.cleanup().await;
}

/// Piped into a reader that has gone (`coordctl get ID | head -1` after head quit), coordctl
/// ends quietly on SIGPIPE instead of panicking on the failed write.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reader_that_goes_away_ends_coordctl_quietly() {
    let db = TestDb::sqlite().await;
    let tc = TestCoordinator::start(&db, |_| {}).await;
    let endpoint = tc.endpoint();
    let id = submit(&mut tc.client().await, "nobody-runs-this", b"x").await;
    let out = tokio::task::spawn_blocking(move || {
        let mut child = coordctl_command(&endpoint, &["get", &id])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run coordctl");
        // The reader is gone before coordctl writes a byte.
        drop(child.stdout.take());
        child.wait_with_output().expect("coordctl ends")
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{}", text(&out));
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{}", text(&out));
    }
    tc.stop().await.unwrap();
    db.cleanup().await;
}

/// A task that a free worker takes at once is "queued" for a few milliseconds: `submit --wait`
/// does not print that as a reason it waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn submit_wait_of_a_task_taken_at_once_prints_no_waiting_line() {
    let db = TestDb::sqlite().await;
    let tc = TestCoordinator::start(&db, |_| {}).await;
    let endpoint = tc.endpoint();
    let stop = CancellationToken::new();
    let dev = dev_workers(&endpoint, 2, &stop);
    wait_connected(&tc.client().await, &["dev-worker-1", "dev-worker-2"]).await;
    for _ in 0..3 {
        let out = coordctl_async(&endpoint, &["submit", "--type", "echo", "--payload", "hi", "--wait"]).await;
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "hi", "{}", text(&out));
        assert!(!String::from_utf8_lossy(&out.stderr).contains("waiting:"), "{}", text(&out));
    }
    stop.cancel();
    for h in dev {
        h.await.unwrap();
    }
    tc.stop().await.unwrap();
    db.cleanup().await;
}
