//! The coordinator runtime over real gRPC on loopback: push dispatch, round-robin placement,
//! capacity, the heartbeat machine, failover, leases, report fencing, retries, cancellation,
//! health, metrics and reflection. Each test runs on SQLite, and on Postgres when
//! `TEST_DATABASE_URL` is set.

#[macro_use]
mod common;

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use common::*;
use coordinator::{
    domain::{TaskId, TaskState},
    proto,
};
use coordinator_worker::{Worker, WorkerOptions, handler_fn};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const T: Duration = Duration::from_secs(5);

/// Every task completed, with exactly one accepted (completed) attempt in the history.
async fn assert_completed_exactly_once(db: &TestDb, ids: &[String]) {
    for id in ids {
        let tid: TaskId = id.parse().unwrap();
        let task = db.store.get_task(tid).await.unwrap().expect("task exists");
        assert_eq!(task.state, TaskState::Completed, "task {id}");
        let attempts = db.store.attempts(tid).await.unwrap();
        let completed = attempts.iter().filter(|a| a.outcome.as_deref() == Some("completed")).count();
        assert_eq!(completed, 1, "task {id} attempts: {attempts:?}");
    }
}

async fn held_by(db: &TestDb, worker: &str) -> usize {
    db.store.held_by(&worker.into()).await.unwrap().len()
}

// ---------------------------------------------------------------------------------------------

on_every_backend!(one_batch_is_spread_round_robin);
async fn one_batch_is_spread_round_robin(db: &TestDb) {
    let c = TestCoordinator::start(db, |_| {}).await;
    let mut client = c.client().await;
    let mut workers = Vec::new();
    for id in ["rr-a", "rr-b", "rr-c"] {
        workers.push(RawWorker::connect(&c.endpoint(), id, 10, &[]).await);
    }
    wait_connected(&client, &["rr-a", "rr-b", "rr-c"]).await;
    let tasks = (0..9)
        .map(|i| proto::SubmitTaskRequest {
            task_type: "noop".into(),
            payload: vec![i],
            ..Default::default()
        })
        .collect();
    client.submit_tasks(proto::SubmitTasksRequest { tasks }).await.unwrap();
    for w in &mut workers {
        for _ in 0..3 {
            w.next(T).await;
        }
    }
    for w in &workers {
        assert_eq!(held_by(db, &w.id).await, 3, "{} holds 3 of 9", w.id);
    }
    c.stop().await.unwrap();
}

on_every_backend!(three_workers_share_work_within_capacity_exactly_once);
async fn three_workers_share_work_within_capacity_exactly_once(db: &TestDb) {
    let c = TestCoordinator::start(db, |_| {}).await;
    let mut client = c.client().await;
    let ids = ["cap-a", "cap-b", "cap-c"];
    let mut workers = Vec::new();
    for id in ids {
        workers.push(RawWorker::connect(&c.endpoint(), id, 2, &["prove"]).await);
    }
    wait_connected(&client, &ids).await;
    const N: usize = 31;
    let submitted = submit_batch(&mut client, "prove", N, |i| vec![i as u8]).await;
    let mut per_worker: HashMap<String, usize> = HashMap::new();
    let mut seen = HashSet::new();
    let mut done = 0;
    while done < N {
        // Each round: every worker fills up to its capacity (or the queue runs dry).
        let mut round: Vec<(usize, proto::TaskAssignment)> = Vec::new();
        for (i, w) in workers.iter_mut().enumerate() {
            let expected = 2.min(N - done - round.len());
            for _ in 0..expected.min(2) {
                if round.len() + done >= N {
                    break;
                }
                if let Some(Ok(a)) = w.next_within(Duration::from_millis(1500)).await {
                    round.push((i, a));
                }
            }
        }
        assert!(!round.is_empty(), "no progress with {done} of {N} done");
        for w in &workers {
            let held = held_by(db, &w.id).await;
            assert!(held <= 2, "{} holds {held} tasks, over its capacity of 2", w.id);
        }
        for (i, a) in round {
            assert!(seen.insert(a.task_id.clone()), "task {} pushed twice", a.task_id);
            let w = &mut workers[i];
            let r = w.complete(&a.task_id, a.attempt, b"ok").await.unwrap();
            assert!(!r.duplicate);
            *per_worker.entry(w.id.clone()).or_default() += 1;
            done += 1;
        }
    }
    for id in ids {
        let n = per_worker.get(id).copied().unwrap_or(0);
        assert!((N / 3 - 1..=N / 3 + 1).contains(&n), "{id} ran {n} of {N}: {per_worker:?}");
    }
    assert_completed_exactly_once(db, &submitted).await;
    c.stop().await.unwrap();
}

on_every_backend!(a_submitted_task_is_pushed_without_waiting_for_the_poll_tick);
async fn a_submitted_task_is_pushed_without_waiting_for_the_poll_tick(db: &TestDb) {
    let c = TestCoordinator::start(db, |cfg| cfg.coordinator.poll_interval = Duration::from_secs(30)).await;
    let mut client = c.client().await;
    let mut w = RawWorker::connect(&c.endpoint(), "event-w", 1, &[]).await;
    wait_connected(&client, &["event-w"]).await;
    // Let the scheduler's first (immediate) tick pass, so only an event can wake it now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let id = submit(&mut client, "noop", b"{}").await;
    let a =
        w.next_within(Duration::from_secs(1)).await.expect("pushed within 1 s, long before the 30 s tick");
    assert_eq!(a.unwrap().task_id, id);
    c.stop().await.unwrap();
}

on_every_backend!(a_silent_worker_goes_suspect_then_dead_and_its_task_moves);
async fn a_silent_worker_goes_suspect_then_dead_and_its_task_moves(db: &TestDb) {
    let c = TestCoordinator::start(db, |cfg| {
        cfg.coordinator.heartbeat_timeout = Duration::from_millis(400);
        cfg.coordinator.stale_task_timeout = Duration::from_secs(30);
        cfg.coordinator.cleanup_interval = Duration::from_secs(30);
    })
    .await;
    let mut client = c.client().await;
    // Taken before registering: the coordinator's clock for this worker starts later.
    let registered = Instant::now();
    let mut silent = RawWorker::connect(&c.endpoint(), "silent", 1, &["prove"]).await;
    wait_connected(&client, &["silent"]).await;
    let id = submit(&mut client, "prove", b"block-1").await;
    let first = silent.next(T).await;
    assert_eq!((first.task_id.as_str(), first.attempt), (id.as_str(), 1));

    wait_until("silent worker is SUSPECT", T, || {
        let mut client = client.clone();
        async move { worker_state(&mut client, "silent").await == proto::WorkerState::Suspect }
    })
    .await;
    assert!(registered.elapsed() >= Duration::from_millis(400), "SUSPECT only after heartbeat_timeout");
    wait_until("silent worker is DEAD", T, || {
        let mut client = client.clone();
        async move { worker_state(&mut client, "silent").await == proto::WorkerState::Dead }
    })
    .await;
    assert!(registered.elapsed() >= Duration::from_millis(1200), "DEAD only after 3x heartbeat_timeout");

    // The task went back at once and runs on a healthy worker.
    let mut healthy = RawWorker::connect(&c.endpoint(), "healthy", 1, &["prove"]).await;
    let beating = healthy.keep_alive(Duration::from_millis(100));
    let second = healthy.next(T).await;
    assert_eq!((second.task_id.as_str(), second.attempt), (id.as_str(), 2));
    healthy.complete(&id, 2, b"proof").await.unwrap();

    // The dead worker's late report changes nothing.
    let late = silent.complete(&id, 1, b"late proof").await.unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition, "{late:?}");
    let task = get_task(&mut client, &id).await;
    assert_eq!(task.result, b"proof");
    assert_eq!(task.worker_id, "healthy");
    let attempts = db.store.attempts(id.parse().unwrap()).await.unwrap();
    let outcomes: Vec<_> = attempts.iter().map(|a| a.outcome.clone().unwrap_or_default()).collect();
    assert_eq!(outcomes, ["worker_dead", "completed"]);
    beating.abort();
    c.stop().await.unwrap();
}

on_every_backend!(a_heartbeating_worker_keeps_a_task_longer_than_the_lease);
async fn a_heartbeating_worker_keeps_a_task_longer_than_the_lease(db: &TestDb) {
    let c = TestCoordinator::start(db, |cfg| {
        cfg.coordinator.heartbeat_timeout = Duration::from_millis(300);
        cfg.coordinator.stale_task_timeout = Duration::from_millis(600);
        cfg.coordinator.cleanup_interval = Duration::from_millis(100);
    })
    .await;
    let mut client = c.client().await;
    let shutdown = CancellationToken::new();
    let mut opts = WorkerOptions::new(c.endpoint(), "long-runner");
    opts.max_concurrent = 1;
    // A "proof" that runs for more than three leases.
    let handler = handler_fn(|_t| async {
        tokio::time::sleep(Duration::from_millis(2000)).await;
        Ok(b"long proof".to_vec())
    });
    let worker = tokio::spawn(Worker::new(opts, handler).unwrap().run(shutdown.clone()));
    wait_connected(&client, &["long-runner"]).await;
    let id = submit(&mut client, "prove", b"big block").await;
    wait_until("long task completes", Duration::from_secs(15), || {
        let mut client = client.clone();
        let id = id.clone();
        async move { task_status(&mut client, &id).await == proto::TaskStatus::Completed }
    })
    .await;
    let task = get_task(&mut client, &id).await;
    assert_eq!(task.attempt, 1, "never requeued");
    assert_eq!(task.failures, 0);
    assert_completed_exactly_once(db, &[id]).await;
    shutdown.cancel();
    worker.await.unwrap().unwrap();
    c.stop().await.unwrap();
}

on_every_backend!(an_attempt_its_worker_never_reports_past_its_deadline_is_taken_back);
/// A worker that heartbeats but never reports a task past its deadline (it ignores deadlines,
/// or its handler hangs) does not keep the task for good, as its renewed lease alone would
/// let it: one `heartbeat_timeout` after the deadline the sweeper takes it back, charged
/// (`timed_out`), the worker is told to stop it, and the task runs again.
async fn an_attempt_its_worker_never_reports_past_its_deadline_is_taken_back(db: &TestDb) {
    let c = TestCoordinator::start(db, |cfg| {
        cfg.coordinator.heartbeat_timeout = Duration::from_millis(1500);
        cfg.coordinator.stale_task_timeout = Duration::from_secs(60);
        cfg.coordinator.cleanup_interval = Duration::from_millis(100);
    })
    .await;
    let mut client = c.client().await;
    let mut w = RawWorker::connect(&c.endpoint(), "hung", 1, &["prove"]).await;
    wait_connected(&client, &["hung"]).await;
    // Before the submission, so before the assignment the deadline runs from.
    let submitted = std::time::Instant::now();
    let id = submit_with_timeout(&mut client, "prove", 300).await;
    let first = w.next(T).await;
    assert_eq!((first.task_id.as_str(), first.attempt), (id.as_str(), 1));
    // Heartbeats go on, naming the task, while nothing is reported.
    let beats = {
        let mut hb = w.client.clone();
        let running = vec![proto::RunningTask { task_id: id.clone(), attempt: 1 }];
        tokio::spawn(async move {
            loop {
                let beat = proto::HeartbeatRequest {
                    worker_id: "hung".into(),
                    running_tasks: running.clone(),
                    ..Default::default()
                };
                let _ = hb.send_heartbeat(beat).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let stop = w.next(Duration::from_secs(10)).await;
    let after = submitted.elapsed();
    assert_eq!(stop.kind, proto::AssignmentKind::Cancel as i32, "{stop:?}");
    assert_eq!((stop.task_id.as_str(), stop.attempt), (id.as_str(), 1));
    assert!(after >= Duration::from_millis(1800), "not before its deadline and grace: {after:?}");
    // Its slot is free: the task comes back to the same worker as attempt 2, reported at once
    // (its own deadline runs too).
    let again = w.next(Duration::from_secs(10)).await;
    assert_eq!(
        (again.task_id.as_str(), again.attempt, again.kind),
        (id.as_str(), 2, proto::AssignmentKind::Run as i32)
    );
    w.complete(&id, 2, b"done").await.unwrap();
    beats.abort();
    let t = client
        .get_task(proto::GetTaskRequest { task_id: id.clone(), include_attempts: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(t.failures, 1, "charged: {t:?}");
    assert_eq!(t.attempts.first().map(|a| a.outcome.as_str()), Some("timed_out"), "{t:?}");
    assert_eq!(t.status(), proto::TaskStatus::Completed, "{t:?}");
    let e = w.complete(&id, 1, b"too late").await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    c.stop().await.unwrap();
}

on_every_backend!(reports_are_fenced_by_worker_and_attempt);
async fn reports_are_fenced_by_worker_and_attempt(db: &TestDb) {
    let c = TestCoordinator::start(db, |_| {}).await;
    let mut client = c.client().await;
    let mut w = RawWorker::connect(&c.endpoint(), "fence-a", 1, &[]).await;
    let mut other = RawWorker::connect(&c.endpoint(), "fence-b", 1, &["nothing-matches"]).await;
    wait_connected(&client, &["fence-a"]).await;
    let id = submit(&mut client, "noop", b"x").await;
    let a = w.next(T).await;

    let e = other.complete(&id, a.attempt, b"stolen").await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "another worker");
    let e = w.complete(&id, a.attempt + 1, b"future").await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "an attempt it does not hold");
    // Delivered tasks are marked running shortly after they leave on the stream.
    wait_until("the delivered task shows running", T, || {
        let mut client = client.clone();
        let id = id.clone();
        async move { task_status(&mut client, &id).await == proto::TaskStatus::Running }
    })
    .await;
    let task = get_task(&mut client, &id).await;
    assert_eq!(
        (task.attempt, task.worker_id.as_str(), task.result.len()),
        (a.attempt, "fence-a", 0),
        "unchanged"
    );

    let first = w.complete(&id, a.attempt, b"result").await.unwrap();
    assert!(!first.duplicate);
    let again = w.complete(&id, a.attempt, b"result").await.unwrap();
    assert!(again.duplicate, "a repeat of the accepted report answers success, marked duplicate");
    assert_eq!(again.status, proto::TaskStatus::Completed as i32);
    let e = w.fail(&id, a.attempt, true).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "a failure after the completion");
    let e = w.complete(&TaskId::new().to_string(), 1, b"?").await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = w.complete("not-a-uuid", 1, b"?").await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    let task = get_task(&mut client, &id).await;
    assert_eq!(task.result, b"result");
    assert_completed_exactly_once(db, &[id]).await;
    c.stop().await.unwrap();
}

on_every_backend!(text_no_database_can_hold_is_refused_where_chosen_and_replaced_where_reported);
/// U+0000 is valid UTF-8 that no Postgres text column holds. Text a caller chose (a key, a
/// name, a filter, a worker's hostname) with it is refused as invalid, naming the field, on
/// both backends; text that says what happened (a failure's error, a cancel's reason) is kept
/// with the character replaced, so no report or cancel is lost to it. Never `INTERNAL`.
async fn text_no_database_can_hold_is_refused_where_chosen_and_replaced_where_reported(db: &TestDb) {
    let c = TestCoordinator::start(db, |_| {}).await;
    let mut client = c.client().await;
    let nul = "a\u{0}b";
    let task = |f: &dyn Fn(&mut proto::SubmitTaskRequest)| {
        let mut t = proto::SubmitTaskRequest { task_type: "noop".into(), ..Default::default() };
        f(&mut t);
        t
    };
    fn refused<T>(field: &str, r: Result<tonic::Response<T>, tonic::Status>) {
        match r {
            Ok(_) => panic!("{field}: accepted"),
            Err(e) => {
                assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
                assert!(
                    e.message().contains(field) && e.message().contains("U+0000"),
                    "{field}: {}",
                    e.message()
                );
            }
        }
    }
    refused("idempotency_key", client.submit_task(task(&|t| t.idempotency_key = nul.into())).await);
    refused("affinity_key", client.submit_task(task(&|t| t.affinity_key = nul.into())).await);
    let batch = vec![task(&|_| {}), task(&|t| t.idempotency_key = nul.into())];
    refused(
        "tasks[1].idempotency_key",
        client.submit_tasks(proto::SubmitTasksRequest { tasks: batch }).await,
    );
    let job = proto::SubmitJobRequest { name: nul.into(), tasks: vec![task(&|_| {})], ..Default::default() };
    refused("name", client.submit_job(job).await);
    let retry = proto::RetryTasksRequest { error_contains: nul.into(), ..Default::default() };
    refused("error_contains", client.retry_tasks(retry).await);
    let schedule = proto::CreateScheduleRequest {
        name: nul.into(),
        cron: "0 2 * * *".into(),
        task: Some(task(&|_| {})),
        ..Default::default()
    };
    refused("name", client.create_schedule(schedule).await);
    for field in ["hostname", "version", "instance_id"] {
        let mut r = proto::RegisterWorkerRequest { worker_id: "nul-w".into(), ..Default::default() };
        match field {
            "hostname" => r.hostname = nul.into(),
            "version" => r.version = nul.into(),
            _ => r.instance_id = nul.into(),
        }
        refused(field, client.register_worker(r).await);
    }

    // Reported text: taken, with U+FFFD in place of U+0000.
    let mut w = RawWorker::connect(&c.endpoint(), "nul-reporter", 1, &[]).await;
    wait_connected(&client, &["nul-reporter"]).await;
    let id = submit(&mut client, "noop", b"x").await;
    let a = w.next(T).await;
    let failure = proto::ReportFailureRequest {
        worker_id: w.id.clone(),
        task_id: id.clone(),
        attempt: a.attempt,
        error: nul.into(),
        retriable: false,
        ..Default::default()
    };
    w.client.report_failure(failure).await.expect("a failure whose error holds U+0000 is taken");
    assert_eq!(get_task(&mut client, &id).await.error, "a\u{FFFD}b");
    let id = submit(&mut client, "nothing-runs-this", b"x").await;
    client
        .cancel_task(proto::CancelTaskRequest { task_id: id.clone(), reason: nul.into() })
        .await
        .expect("a cancel whose reason holds U+0000 is taken");
    assert_eq!(get_task(&mut client, &id).await.error, "a\u{FFFD}b");
    let deregister =
        proto::DeregisterRequest { worker_id: w.id.clone(), reason: nul.into(), ..Default::default() };
    w.client.deregister(deregister).await.expect("a deregistration whose reason holds U+0000 is taken");
    c.stop().await.unwrap();
}

on_every_backend!(a_batch_of_reports_is_judged_entry_by_entry_as_single_reports_are);
async fn a_batch_of_reports_is_judged_entry_by_entry_as_single_reports_are(db: &TestDb) {
    let c = TestCoordinator::start(db, |_| {}).await;
    let mut client = c.client().await;
    let mut w = RawWorker::connect(&c.endpoint(), "batch-a", 3, &[]).await;
    let mut other = RawWorker::connect(&c.endpoint(), "batch-b", 1, &["nothing-matches"]).await;
    wait_connected(&client, &["batch-a"]).await;
    let mut held = Vec::new();
    for i in 0..3 {
        submit(&mut client, "noop", &[i]).await;
        let a = w.next(T).await;
        held.push((a.task_id, a.attempt));
    }
    let entry = |(id, attempt): &(String, u32), result: &[u8]| proto::CompletionEntry {
        task_id: id.clone(),
        attempt: *attempt,
        result: result.to_vec(),
        held_ms: 5,
        traceparent: String::new(),
    };
    let report = |worker: &mut RawWorker, completions: Vec<proto::CompletionEntry>| {
        let (mut c, worker_id) = (worker.client.clone(), worker.id.clone());
        async move {
            c.report_completions(proto::ReportCompletionsRequest { worker_id, completions })
                .await
                .map(|r| r.into_inner().verdicts)
        }
    };
    let codes = |verdicts: &[proto::CompletionVerdict]| {
        verdicts.iter().map(|v| (Code::from_i32(v.code), v.duplicate)).collect::<Vec<_>>()
    };

    let (_, before) = http_get(c.http, "/metrics").await.unwrap();

    // Another worker's batch changes nothing.
    let stolen = report(&mut other, held.iter().map(|h| entry(h, b"stolen")).collect()).await.unwrap();
    assert_eq!(codes(&stolen), [(Code::FailedPrecondition, false); 3]);
    assert!(stolen[0].message.contains("is not held by worker batch-b"), "{}", stolen[0].message);

    let (t0, t1, t2) = (&held[0], &held[1], &held[2]);
    let verdicts = report(
        &mut w,
        vec![
            entry(t0, b"r0"),
            // The same result twice in one call: one is accepted, the other is its duplicate.
            entry(t1, b"r1"),
            entry(t1, b"r1"),
            entry(&(t2.0.clone(), t2.1 + 1), b"future"),
            entry(&(TaskId::new().to_string(), 1), b"?"),
            entry(&("not-a-uuid".into(), 1), b"?"),
        ],
    )
    .await
    .unwrap();
    let got = codes(&verdicts);
    assert_eq!(got[0], (Code::Ok, false));
    let mut twice = [got[1], got[2]];
    twice.sort_by_key(|(_, duplicate)| *duplicate);
    assert_eq!(twice, [(Code::Ok, false), (Code::Ok, true)], "{verdicts:?}");
    assert_eq!(
        &got[3..],
        [(Code::FailedPrecondition, false), (Code::NotFound, false), (Code::InvalidArgument, false)]
    );
    assert!(verdicts[..3].iter().all(|v| v.status == proto::TaskStatus::Completed as i32));
    assert!(verdicts[5].message.contains("task_id"), "{}", verdicts[5].message);

    // The rest: the one left, and repeats of the two accepted.
    let verdicts = report(&mut w, vec![entry(t2, b"r2"), entry(t0, b"r0"), entry(t1, b"r1")]).await.unwrap();
    assert_eq!(codes(&verdicts), [(Code::Ok, false), (Code::Ok, true), (Code::Ok, true)]);
    // Nothing to report is not an error.
    assert!(report(&mut w, vec![]).await.unwrap().is_empty());
    // Over the limit, the call is refused as a whole and changes nothing.
    let many = (0..1001).map(|_| entry(t0, b"r0")).collect();
    let e = report(&mut w, many).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("at most 1000"), "{}", e.message());

    // Each entry is counted by the code it was answered with (other tests of this process may
    // add to the same counters, never take away).
    let (_, after) = http_get(c.http, "/metrics").await.unwrap();
    let entries = |scrape: &str, code: &str| {
        sample(scrape, &format!(r#"coordinator_report_entries_total{{grpc_code="{code}"}}"#))
    };
    for (code, n) in [("OK", 6.0), ("FailedPrecondition", 4.0), ("NotFound", 1.0), ("InvalidArgument", 1.0)] {
        let counted = entries(&after, code) - entries(&before, code);
        assert!(counted >= n, "{code}: {counted} entries counted, {n} answered");
    }

    for ((id, _), result) in held.iter().zip([b"r0", b"r1", b"r2"]) {
        assert_eq!(get_task(&mut client, id).await.result, result);
    }
    let ids: Vec<String> = held.into_iter().map(|(id, _)| id).collect();
    assert_completed_exactly_once(db, &ids).await;
    c.stop().await.unwrap();
}

on_every_backend!(results_that_finish_together_go_in_one_call_each_accepted_once);
async fn results_that_finish_together_go_in_one_call_each_accepted_once(db: &TestDb) {
    let c = TestCoordinator::start(db, |_| {}).await;
    let mut client = c.client().await;
    const N: usize = 24;
    let mut o = WorkerOptions::new(c.endpoint(), "together");
    o.max_concurrent = N as u32;
    // Every handler waits until all N have started, so their results finish at once: the
    // first goes alone and the others wait for it, then go together.
    let gate = Arc::new(tokio::sync::Barrier::new(N));
    let worker = Worker::new(
        o,
        handler_fn(move |t| {
            let gate = gate.clone();
            async move {
                gate.wait().await;
                Ok(t.payload)
            }
        }),
    )
    .unwrap();
    let counters = worker.counters();
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    wait_connected(&client, &["together"]).await;
    let (_, before) = http_get(c.http, "/metrics").await.unwrap();
    let ids = submit_batch(&mut client, "noop", N, |i| format!("r{i}").into_bytes()).await;
    wait_until("every result is accepted", Duration::from_secs(20), || {
        let counters = counters.clone();
        async move { counters.accepted.load(std::sync::atomic::Ordering::Relaxed) == N as u64 }
    })
    .await;
    let (_, after) = http_get(c.http, "/metrics").await.unwrap();
    let calls = |method: &str| {
        let series = format!(
            r#"grpc_server_handled_total{{grpc_service="coordinator.CoordinatorService",grpc_method="{method}",grpc_type="unary",grpc_code="OK"}}"#
        );
        sample(&after, &series) - sample(&before, &series)
    };
    let (alone, batched) = (calls("ReportCompletion"), calls("ReportCompletions"));
    assert!(batched >= 1.0, "results that waited went together: {alone} alone, {batched} batched");
    assert!(alone + batched < N as f64, "{alone} alone, {batched} batched for {N} results");
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(get_task(&mut client, id).await.result, format!("r{i}").into_bytes());
    }
    assert_completed_exactly_once(db, &ids).await;
    assert_eq!(counters.duplicates.load(std::sync::atomic::Ordering::Relaxed), 0);
    stop.cancel();
    run.await.unwrap().unwrap();
    c.stop().await.unwrap();
}

on_every_backend!(retriable_failures_back_off_until_max_attempts_then_fail);
async fn retriable_failures_back_off_until_max_attempts_then_fail(db: &TestDb) {
    let c = TestCoordinator::start(db, |cfg| {
        cfg.coordinator.poll_interval = Duration::from_millis(50);
        cfg.tasks.retry_backoff_base = Duration::from_millis(150);
        cfg.tasks.retry_backoff_max = Duration::from_millis(300);
    })
    .await;
    let mut client = c.client().await;
    let mut w = RawWorker::connect(&c.endpoint(), "flaky", 1, &[]).await;
    wait_connected(&client, &["flaky"]).await;
    let id = client
        .submit_task(proto::SubmitTaskRequest {
            task_type: "prove".into(),
            max_attempts: 3,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .task_id;
    let mut failed_at = None;
    for attempt in 1..=3u32 {
        let a = w.next(T).await;
        assert_eq!((a.task_id.as_str(), a.attempt), (id.as_str(), attempt));
        if let Some(at) = failed_at {
            let waited = Instant::now() - at;
            assert!(
                waited >= Duration::from_millis(140),
                "attempt {attempt} came {waited:?} after the failure"
            );
        }
        // The backoff runs from when the coordinator handled the failure, which is after it was sent.
        let sent = Instant::now();
        let r = w.fail(&id, attempt, true).await.unwrap();
        failed_at = Some(sent);
        let expected = if attempt < 3 { proto::TaskStatus::Pending } else { proto::TaskStatus::Failed };
        assert_eq!(r.status, expected as i32, "after attempt {attempt}");
    }
    let task = get_task(&mut client, &id).await;
    assert_eq!((task.status, task.failures), (proto::TaskStatus::Failed as i32, 3));
    assert!(w.next_within(Duration::from_millis(300)).await.is_none(), "a failed task is not retried");

    // A non-retriable failure is final at once.
    let id2 = submit(&mut client, "prove", b"bad input").await;
    let a = w.next(T).await;
    assert_eq!(a.task_id, id2);
    let r = w.fail(&id2, a.attempt, false).await.unwrap();
    assert_eq!(r.status, proto::TaskStatus::Failed as i32);
    let task = get_task(&mut client, &id2).await;
    assert_eq!((task.attempt, task.failures, task.error.as_str()), (1, 1, "boom"));
    c.stop().await.unwrap();
}

on_every_backend!(cancel_reaches_the_worker_and_a_later_report_changes_nothing);
async fn cancel_reaches_the_worker_and_a_later_report_changes_nothing(db: &TestDb) {
    let c = TestCoordinator::start(db, |_| {}).await;
    let mut client = c.client().await;
    let mut w = RawWorker::connect(&c.endpoint(), "cancel-w", 1, &["prove"]).await;
    wait_connected(&client, &["cancel-w"]).await;
    let id = submit(&mut client, "prove", b"x").await;
    let a = w.next(T).await;
    let r = client
        .cancel_task(proto::CancelTaskRequest { task_id: id.clone(), reason: "no longer needed".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(r.cancelled);
    let msg = w.next(T).await;
    assert_eq!(msg.kind, proto::AssignmentKind::Cancel as i32);
    assert_eq!((msg.task_id.as_str(), msg.attempt), (id.as_str(), a.attempt));
    assert_eq!(task_status(&mut client, &id).await, proto::TaskStatus::Cancelled);
    let e = w.complete(&id, a.attempt, b"too late").await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(task_status(&mut client, &id).await, proto::TaskStatus::Cancelled);

    // The cancelled task freed the worker's slot: the next task is pushed.
    let next = submit(&mut client, "prove", b"y").await;
    assert_eq!(w.next(T).await.task_id, next);

    // A pending task (nobody runs its type) is cancelled too; cancelling twice is harmless.
    let pending = submit(&mut client, "nobody-runs-this", b"z").await;
    let r = client
        .cancel_task(proto::CancelTaskRequest { task_id: pending.clone(), reason: String::new() })
        .await
        .unwrap();
    assert!(r.into_inner().cancelled);
    let r = client
        .cancel_task(proto::CancelTaskRequest { task_id: pending.clone(), reason: String::new() })
        .await
        .unwrap();
    assert!(!r.into_inner().cancelled);
    let e = client
        .cancel_task(proto::CancelTaskRequest { task_id: TaskId::new().to_string(), reason: String::new() })
        .await;
    assert_eq!(e.unwrap_err().code(), Code::NotFound);
    c.stop().await.unwrap();
}

on_every_backend!(a_heartbeat_from_an_unknown_worker_is_not_found);
async fn a_heartbeat_from_an_unknown_worker_is_not_found(db: &TestDb) {
    let c = TestCoordinator::start(db, |_| {}).await;
    let mut client = c.client().await;
    let e = client
        .send_heartbeat(proto::HeartbeatRequest { worker_id: "stranger".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = client
        .receive_tasks(proto::ReceiveTasksRequest { worker_id: "stranger".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    c.stop().await.unwrap();
}

on_every_backend!(watch_streams_states_until_terminal_and_jobs_report_progress);
async fn watch_streams_states_until_terminal_and_jobs_report_progress(db: &TestDb) {
    let c = TestCoordinator::start(db, |_| {}).await;
    let mut client = c.client().await;
    let job = client
        .submit_job(proto::SubmitJobRequest {
            name: "primes".into(),
            tasks: (0..3)
                .map(|i| proto::SubmitTaskRequest {
                    task_type: "slice".into(),
                    payload: vec![i],
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.task_ids.len(), 3);
    let mut watch = client
        .watch_task(proto::WatchTaskRequest { task_id: job.task_ids[0].clone() })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status, proto::TaskStatus::Pending as i32);

    let mut w = RawWorker::connect(&c.endpoint(), "job-w", 3, &["slice"]).await;
    for _ in 0..3 {
        let a = w.next(T).await;
        w.complete(&a.task_id, a.attempt, format!("done {}", a.payload[0]).as_bytes()).await.unwrap();
    }
    let mut statuses = vec![first.status];
    while let Some(ev) = tokio::time::timeout(T, watch.message()).await.expect("watch ends").unwrap() {
        statuses.push(ev.status);
        if ev.status == proto::TaskStatus::Completed as i32 {
            assert_eq!(ev.result, b"done 0");
        }
    }
    assert_eq!(*statuses.last().unwrap(), proto::TaskStatus::Completed as i32, "{statuses:?}");

    let got = client
        .get_job(proto::GetJobRequest { job_id: job.job_id.clone(), include_results: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((got.total, got.completed, got.done), (3, 3, true));
    let results: Vec<_> =
        got.results.iter().map(|r| String::from_utf8_lossy(&r.result).into_owned()).collect();
    assert_eq!(results, ["done 0", "done 1", "done 2"]);
    assert!(got.results.iter().all(|r| r.worker_id == "job-w"));

    let stats =
        client.get_worker_stats(proto::GetWorkerStatsRequest { worker_id: "job-w".into() }).await.unwrap();
    assert_eq!(stats.into_inner().tasks_completed, 3);
    c.stop().await.unwrap();
}

on_every_backend!(a_dropped_stream_gives_undelivered_work_back);
async fn a_dropped_stream_gives_undelivered_work_back(db: &TestDb) {
    let c =
        TestCoordinator::start(db, |cfg| cfg.coordinator.stale_task_timeout = Duration::from_secs(60)).await;
    let mut client = c.client().await;
    let w = RawWorker::connect(&c.endpoint(), "dropper", 1, &["prove"]).await;
    wait_connected(&client, &["dropper"]).await;
    w.disconnect();
    // Wait until the coordinator has seen the stream go.
    wait_until("stream closed", T, || {
        let mut client = client.clone();
        async move {
            let workers =
                client.list_workers(proto::ListWorkersRequest::default()).await.unwrap().into_inner().workers;
            workers.iter().any(|w| w.worker_id == "dropper" && !w.connected)
        }
    })
    .await;
    let id = submit(&mut client, "prove", b"x").await;
    // Nobody can take it now: it stays pending (not stuck as assigned to a gone stream).
    let mut w2 = RawWorker::connect(&c.endpoint(), "dropper", 1, &["prove"]).await;
    let a = w2.next(T).await;
    assert_eq!(a.task_id, id);
    w2.complete(&id, a.attempt, b"ok").await.unwrap();
    assert_completed_exactly_once(db, &[id]).await;
    c.stop().await.unwrap();
}

on_every_backend!(graceful_shutdown_ends_open_streams_with_unavailable);
async fn graceful_shutdown_ends_open_streams_with_unavailable(db: &TestDb) {
    let c = TestCoordinator::start(db, |cfg| cfg.coordinator.shutdown_timeout = Duration::from_secs(5)).await;
    let client = c.client().await;
    let mut workers = Vec::new();
    for id in ["sd-a", "sd-b", "sd-c"] {
        workers.push(RawWorker::connect(&c.endpoint(), id, 1, &[]).await);
    }
    wait_connected(&client, &["sd-a", "sd-b", "sd-c"]).await;
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), c.stop()).await.expect("shutdown finishes").unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    for w in &mut workers {
        match w.next_within(T).await {
            Some(Err(s)) => assert_eq!(s.code(), Code::Unavailable, "{s:?}"),
            other => panic!("expected UNAVAILABLE, got {other:?}"),
        }
    }
}

on_every_backend!(health_and_metrics_show_the_fleet);
async fn health_and_metrics_show_the_fleet(db: &TestDb) {
    let c = TestCoordinator::start(db, |_| {}).await;
    let mut client = c.client().await;
    let mut w = RawWorker::connect(&c.endpoint(), "hm-w", 2, &["prove"]).await;
    wait_connected(&client, &["hm-w"]).await;
    let id = submit(&mut client, "prove", b"x").await;
    let a = w.next(T).await;
    let (code, body) = http_get(c.http, "/health").await.unwrap();
    assert_eq!(code, 200, "{body}");
    let h: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(h["status"], "healthy");
    assert_eq!(h["database"], "connected");
    assert_eq!(h["coordinator_id"], "coordinator-test");
    assert_eq!(h["workers"]["total"], 1);
    assert_eq!(h["workers"]["active"], 1);
    assert_eq!(h["capacity"]["total"], 2);
    assert_eq!(h["capacity"]["used"], 1);
    assert_eq!(h["capacity"]["available"], 1);
    assert!(h["scheduler"]["tasks_assigned"].as_u64().unwrap() >= 1);
    assert!(h["scheduler"]["poll_cycles"].as_u64().unwrap() >= 1);
    w.complete(&id, a.attempt, b"done").await.unwrap();

    let (code, _) = http_get(c.http, "/health/live").await.unwrap();
    assert_eq!(code, 200);
    let (code, body) = http_get(c.http, "/").await.unwrap();
    assert_eq!(code, 200);
    assert!(body.contains("coordinator-test"));
    let (code, _) = http_get(c.http, "/no/such/page").await.unwrap();
    assert_eq!(code, 404);

    let (code, text) = http_get(c.http, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    // Every name DESIGN.md lists (dashboards and alerts use exactly these).
    for name in [
        "coordinator_workers",
        "coordinator_capacity_slots",
        "coordinator_tasks",
        "coordinator_tasks_submitted_total",
        "coordinator_tasks_assigned_total",
        "coordinator_tasks_completed_total",
        "coordinator_tasks_failed_total",
        "coordinator_tasks_requeued_total",
        "coordinator_scheduler_poll_cycles_total",
        "coordinator_dispatch_latency_seconds",
        "coordinator_task_duration_seconds",
        "grpc_server_handled_total",
        "grpc_server_handling_seconds",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ', '_'])),
            "/metrics lacks {name}"
        );
    }
    assert!(
        text.contains(
            r#"grpc_server_handled_total{grpc_service="coordinator.CoordinatorService",grpc_method="SubmitTask",grpc_type="unary",grpc_code="OK"}"#
        ),
        "{text}"
    );
    assert!(text.contains(r#"coordinator_workers{state="active"} 1"#));
    c.stop().await.unwrap();
}

/// `/health` follows the database: 503 while it is unreachable, 200 again when it returns; gRPC
/// health, for the whole server and for the service, says NOT_SERVING and SERVING with it.
/// The coordinator reaches Postgres through a TCP proxy the test can cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
async fn health_turns_503_while_the_database_is_unreachable() {
    let db = TestDb::postgres().await.expect("TEST_DATABASE_URL is set");
    let target = url_host_port(&db.url);
    let proxy = Proxy::start(target.clone()).await;
    let proxied = db.url.replacen(&target, &proxy.addr.to_string(), 1);
    let c = TestCoordinator::start_url(&proxied, |cfg| {
        cfg.database.acquire_timeout = Duration::from_millis(500);
    })
    .await;
    let (code, _) = http_get(c.http, "/health").await.unwrap();
    assert_eq!(code, 200);
    let health = grpc_health(&c.endpoint()).await;
    assert_eq!(grpc_status(&health, "").await, ServingStatus::Serving);
    proxy.cut();
    wait_until("/health is 503", Duration::from_secs(15), || async {
        matches!(http_get(c.http, "/health").await, Ok((503, b)) if b.contains("unreachable"))
    })
    .await;
    for service in ["", "coordinator.CoordinatorService"] {
        wait_until(
            &format!("gRPC health of {service:?} is NOT_SERVING"),
            Duration::from_secs(15),
            || async { grpc_status(&health, service).await == ServingStatus::NotServing },
        )
        .await;
    }
    proxy.restore();
    wait_until("/health is 200 again", Duration::from_secs(15), || async {
        matches!(http_get(c.http, "/health").await, Ok((200, _)))
    })
    .await;
    for service in ["", "coordinator.CoordinatorService"] {
        wait_until(
            &format!("gRPC health of {service:?} is SERVING again"),
            Duration::from_secs(15),
            || async { grpc_status(&health, service).await == ServingStatus::Serving },
        )
        .await;
    }
    c.stop().await.unwrap();
    db.cleanup().await;
}

/// A gRPC health client of the coordinator at `endpoint`.
async fn grpc_health(endpoint: &str) -> HealthClient<tonic::transport::Channel> {
    let channel =
        tonic::transport::Endpoint::from_shared(endpoint.to_owned()).unwrap().connect().await.unwrap();
    HealthClient::new(channel)
}

/// What `Check` answers for `service`.
async fn grpc_status(health: &HealthClient<tonic::transport::Channel>, service: &str) -> ServingStatus {
    let r = health.clone().check(HealthCheckRequest { service: service.into() }).await.unwrap();
    ServingStatus::try_from(r.into_inner().status).unwrap()
}

on_every_backend!(grpc_health_turns_not_serving_when_shutdown_begins);
/// From the moment shutdown begins, gRPC health says NOT_SERVING for the whole server (not only
/// for the service), so a gRPC-aware balancer stops sending work while the replica drains.
async fn grpc_health_turns_not_serving_when_shutdown_begins(db: &TestDb) {
    let c = TestCoordinator::start(db, |_| {}).await;
    let health = grpc_health(&c.endpoint()).await;
    let mut watch =
        health.clone().watch(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
    let first = watch.message().await.unwrap().expect("a first status");
    assert_eq!(ServingStatus::try_from(first.status).unwrap(), ServingStatus::Serving);
    c.begin_stop();
    let next = tokio::time::timeout(T, watch.message()).await.expect("a status change").unwrap();
    let status = next.map(|m| ServingStatus::try_from(m.status).unwrap());
    assert_eq!(status, Some(ServingStatus::NotServing), "the overall status when shutdown begins");
    drop(watch);
    c.stop().await.unwrap();
}

fn url_host_port(url: &str) -> String {
    let after = url.split_once('@').map(|(_, r)| r).unwrap_or_else(|| url.split_once("://").unwrap().1);
    after.split(['/', '?']).next().unwrap().to_owned()
}

/// A loopback TCP proxy that can refuse and drop connections on demand.
struct Proxy {
    addr: std::net::SocketAddr,
    up: Arc<std::sync::atomic::AtomicBool>,
    generation: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Proxy {
    async fn start(target: String) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (gen_tx, _) = tokio::sync::watch::channel(0u64);
        let generation = Arc::new(gen_tx);
        let (up2, gen2) = (up.clone(), generation.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else { return };
                if !up2.load(std::sync::atomic::Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let target = target.clone();
                let mut cut = gen2.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Proxy { addr, up, generation }
    }

    fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

on_every_backend!(register_worker_accepts_grpcurl_style_json_through_reflection);
async fn register_worker_accepts_grpcurl_style_json_through_reflection(db: &TestDb) {
    use prost::Message;
    use prost_reflect::{DescriptorPool, DynamicMessage};
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };

    let c = TestCoordinator::start(db, |_| {}).await;
    // 1. Ask the server (not a local .proto) for the service's file descriptor, as grpcurl does.
    let channel = tonic::transport::Endpoint::from_shared(c.endpoint()).unwrap().connect().await.unwrap();
    let mut reflection = ServerReflectionClient::new(channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol("coordinator.CoordinatorService".into())),
    };
    let mut responses =
        reflection.server_reflection_info(tokio_stream::iter(vec![request])).await.unwrap().into_inner();
    let resp = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::FileDescriptorResponse(files)) = resp.message_response else {
        panic!("no file descriptor: {resp:?}")
    };
    let mut set = prost_types::FileDescriptorSet::default();
    for bytes in &files.file_descriptor_proto {
        set.file.push(prost_types::FileDescriptorProto::decode(bytes.as_slice()).unwrap());
    }
    // The timestamp import is served too when asked; add it from prost-types if absent.
    if !set.file.iter().any(|f| f.name() == "google/protobuf/timestamp.proto") {
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileByFilename("google/protobuf/timestamp.proto".into())),
        };
        let mut r =
            reflection.server_reflection_info(tokio_stream::iter(vec![request])).await.unwrap().into_inner();
        if let Some(MessageResponse::FileDescriptorResponse(f)) =
            r.message().await.unwrap().unwrap().message_response
        {
            for bytes in &f.file_descriptor_proto {
                set.file.insert(0, prost_types::FileDescriptorProto::decode(bytes.as_slice()).unwrap());
            }
        }
    }
    let pool = DescriptorPool::from_file_descriptor_set(set).unwrap();
    let service = pool.get_service_by_name("coordinator.CoordinatorService").unwrap();
    let method = service.methods().find(|m| m.name() == "RegisterWorker").unwrap();

    // 2. Build the request from grpcurl's JSON and send it as raw bytes.
    let mut de = serde_json::Deserializer::from_str(r#"{"worker_id":"worker-1","max_concurrent_tasks":2}"#);
    let msg = DynamicMessage::deserialize(method.input(), &mut de).unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/coordinator.CoordinatorService/RegisterWorker");
    let resp: tonic::Response<Vec<u8>> =
        grpc.unary(tonic::Request::new(msg.encode_to_vec()), path, RawCodec).await.unwrap();
    let reply = DynamicMessage::decode(method.output(), resp.into_inner().as_slice()).unwrap();
    let json = serde_json::to_value(&reply).unwrap();
    assert_eq!(json["workerId"], "worker-1", "{json}");

    let mut client = c.client().await;
    let workers =
        client.list_workers(proto::ListWorkersRequest::default()).await.unwrap().into_inner().workers;
    let w = workers.iter().find(|w| w.worker_id == "worker-1").expect("registered");
    assert_eq!(w.max_concurrent_tasks, 2);
    c.stop().await.unwrap();
}

/// Passes protobuf bytes through unchanged.
#[derive(Debug, Clone, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf;
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

on_every_backend!(a_backlog_of_one_type_never_hides_a_task_another_free_worker_runs);
/// Five older tasks of type b fill what the old claim offered (two candidates for two free
/// slots); the one task of type a must still reach the free a-worker in the same pass, not at
/// the next poll tick (a minute away here).
async fn a_backlog_of_one_type_never_hides_a_task_another_free_worker_runs(db: &TestDb) {
    let c = TestCoordinator::start(db, |c| c.coordinator.poll_interval = Duration::from_secs(60)).await;
    let mut wb = RawWorker::connect(&c.endpoint(), "wb", 1, &["b"]).await;
    let mut wa = RawWorker::connect(&c.endpoint(), "wa", 1, &["a"]).await;
    let mut client = c.client().await;
    wait_connected(&client, &["wa", "wb"]).await;
    let task = |t: &str| proto::SubmitTaskRequest {
        task_type: t.into(),
        payload: b"x".to_vec(),
        ..Default::default()
    };
    let tasks = vec![task("b"), task("b"), task("b"), task("b"), task("b"), task("a")];
    client.submit_tasks(proto::SubmitTasksRequest { tasks }).await.expect("submit");
    assert_eq!(wb.next(T).await.task_type, "b");
    assert_eq!(wa.next(T).await.task_type, "a", "the a task was not hidden behind the b backlog");
    c.stop().await.unwrap();
}

on_every_backend!(a_stale_revocation_leaves_the_current_attempt_of_the_same_task_alone);
/// The worker's heartbeat was built before attempt 2 of its task arrived and still names
/// attempt 1: the answer revokes attempt 1 only, and attempt 2 keeps its slot and its result.
async fn a_stale_revocation_leaves_the_current_attempt_of_the_same_task_alone(db: &TestDb) {
    let c = TestCoordinator::start(db, |_| {}).await;
    let mut w = RawWorker::connect(&c.endpoint(), "w1", 2, &["prove"]).await;
    let mut client = c.client().await;
    wait_connected(&client, &["w1"]).await;
    let id = submit(&mut client, "prove", b"x").await;
    let first = w.next(T).await;
    assert_eq!((first.task_id.as_str(), first.attempt), (id.as_str(), 1));
    // Attempt 1 is taken back (as the sweeper does when a lease runs out) and the task comes
    // back to the same worker as attempt 2.
    let session = db.store.get_worker(&"w1".into()).await.unwrap().expect("worker row").session_id;
    assert_eq!(db.store.requeue_worker(&"w1".into(), session).await.unwrap().len(), 1);
    let second = w.next(T).await;
    assert_eq!((second.task_id.as_str(), second.attempt), (id.as_str(), 2));
    let used = || async {
        let (_, body) = http_get(c.http, "/health").await.unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["capacity"]["used"].as_u64().unwrap()
    };
    assert_eq!(used().await, 1, "one slot: attempt 2 took the task's place");
    let resp = w.heartbeat(&[(&id, 1)]).await.expect("heartbeat");
    assert_eq!(resp.revoked, vec![proto::RunningTask { task_id: id.clone(), attempt: 1 }]);
    assert_eq!(resp.revoked_task_ids, vec![id.clone()], "older workers still read the task id");
    assert_eq!(used().await, 1, "attempt 2 keeps its slot");
    let done = w.complete(&id, 2, b"ok").await.expect("attempt 2 is accepted");
    assert!(!done.duplicate);
    assert_eq!(used().await, 0);
    c.stop().await.unwrap();
}

on_every_backend!(a_running_task_s_lease_is_renewed_only_near_its_end);
/// A lease of 6 s under heartbeats every 250 ms (timeout 1 s) is renewed in the database once
/// two thirds of it have passed, not at the first heartbeat a third of the way through: the
/// stored expiry stays as granted for 3 s of heartbeats, then moves before it is reached.
async fn a_running_task_s_lease_is_renewed_only_near_its_end(db: &TestDb) {
    let c = TestCoordinator::start(db, |c| {
        c.coordinator.heartbeat_timeout = Duration::from_secs(1);
        c.coordinator.stale_task_timeout = Duration::from_secs(6);
    })
    .await;
    let mut w = RawWorker::connect(&c.endpoint(), "w1", 1, &["prove"]).await;
    let mut client = c.client().await;
    wait_connected(&client, &["w1"]).await;
    let id = submit(&mut client, "prove", b"x").await;
    let task = w.next(T).await;
    let received = std::time::Instant::now();
    let tid: TaskId = id.parse().unwrap();
    let expiry =
        || async { db.store.get_task(tid).await.unwrap().expect("task").lease_expires_at.expect("leased") };
    let granted = expiry().await;
    let running = [(task.task_id.as_str(), task.attempt)];
    while received.elapsed() < Duration::from_secs(3) {
        assert!(w.heartbeat(&running).await.expect("heartbeat").revoked.is_empty(), "still held");
        assert_eq!(expiry().await, granted, "renewed {:?} after the task arrived", received.elapsed());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    loop {
        assert!(w.heartbeat(&running).await.expect("heartbeat").revoked.is_empty(), "still held");
        let now = expiry().await;
        if now != granted {
            assert!(chrono::Utc::now() < granted, "renewed only after the lease ran out");
            assert!(now > granted);
            break;
        }
        assert!(received.elapsed() < Duration::from_secs(10), "the lease was never renewed");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    w.complete(&id, task.attempt, b"ok").await.expect("still its attempt");
    c.stop().await.unwrap();
}

on_every_backend!(a_draining_worker_out_of_time_hands_its_task_back_uncharged);
/// A worker stopped while its task still runs deregisters, waits out its grace period, then
/// hands the task back: pending at once, no attempt charged, outcome `released`.
async fn a_draining_worker_out_of_time_hands_its_task_back_uncharged(db: &TestDb) {
    let c = TestCoordinator::start(db, |_| {}).await;
    let mut client = c.client().await;
    let shutdown = CancellationToken::new();
    let mut opts = WorkerOptions::new(c.endpoint(), "drainer");
    opts.drain_grace = Duration::from_millis(300);
    // The handler says when it has the task: an assignment in the database may not have reached
    // the worker yet, and a task the worker never received is not its to hand back.
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
    let handler = handler_fn(move |t| {
        let started_tx = started_tx.clone();
        async move {
            let _ = started_tx.send(());
            t.cancelled.cancelled().await;
            Err(coordinator_worker::TaskFailure::retriable("stopped"))
        }
    });
    let worker = tokio::spawn(Worker::new(opts, handler).unwrap().run(shutdown.clone()));
    wait_connected(&client, &["drainer"]).await;
    let id = submit(&mut client, "prove", b"x").await;
    tokio::time::timeout(T, started.recv()).await.expect("the task runs").expect("the handler");
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(15), worker).await.expect("worker stops").unwrap().unwrap();
    let tid: TaskId = id.parse().unwrap();
    let task = db.store.get_task(tid).await.unwrap().unwrap();
    assert_eq!((task.state, task.failures), (TaskState::Pending, 0), "handed back, not charged: {task:?}");
    let attempts = db.store.attempts(tid).await.unwrap();
    assert_eq!(attempts.last().and_then(|a| a.outcome.as_deref()), Some("released"), "{attempts:?}");
    c.stop().await.unwrap();
}

on_every_backend!(a_task_lost_in_transit_is_given_back_uncharged_when_the_worker_registers_again);
/// An assignment the worker never received (its push was lost with a connection or a replica)
/// is given back, uncharged, as soon as the worker registers again listing what it holds; it
/// does not wait out its lease and cost an attempt. The lost push is made by assigning a task
/// in the store behind the coordinator's back; connection ageing makes the worker register
/// again within seconds, while the lease is a minute.
async fn a_task_lost_in_transit_is_given_back_uncharged_when_the_worker_registers_again(db: &TestDb) {
    use coordinator::{
        domain::{Candidate, WorkerId},
        store::{ClaimFilter, Placement, TypeFilter},
    };
    let c = TestCoordinator::start(db, |cfg| {
        cfg.grpc.max_connection_age = Duration::from_secs(2);
        cfg.grpc.max_connection_age_grace = Duration::from_secs(1);
    })
    .await;
    let client = c.client().await;
    let shutdown = CancellationToken::new();
    let mut opts = WorkerOptions::new(c.endpoint(), "mover");
    opts.capabilities = vec!["prove".into()];
    let worker = Worker::new(opts, handler_fn(|t| async move { Ok(t.payload) })).unwrap();
    let worker = tokio::spawn(worker.run(shutdown.clone()));
    wait_connected(&client, &["mover"]).await;

    // Assigned to the worker under its current session, and never pushed: a type no worker
    // runs keeps the scheduler away from it.
    let mover = WorkerId::from("mover");
    let session = db.store.get_worker(&mover).await.unwrap().expect("registered").session_id;
    let mut task = coordinator::store::testing::new_task("lost");
    task.max_attempts = 1;
    let id = task.id;
    db.store.create_tasks(&[task]).await.unwrap();
    let sessions = HashMap::from([(mover.clone(), session)]);
    let claimed = db
        .store
        .claim_fenced(
            10,
            &ClaimFilter::types(TypeFilter::Any),
            Duration::from_secs(60),
            |c: &[Candidate], _| Placement {
                placed: c.iter().filter(|c| c.id == id).map(|c| (c.id, mover.clone())).collect(),
                sessions: sessions.clone(),
            },
        )
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);

    wait_until("the task is given back", Duration::from_secs(20), || async {
        db.store.get_task(id).await.unwrap().is_some_and(|t| t.state == TaskState::Pending)
    })
    .await;
    let task = db.store.get_task(id).await.unwrap().unwrap();
    assert_eq!((task.failures, task.worker_id.clone()), (0, None), "not charged (max_attempts 1): {task:?}");
    // Only a registration gives a task back with this outcome.
    let attempts = db.store.attempts(id).await.unwrap();
    assert_eq!(attempts.last().and_then(|a| a.outcome.as_deref()), Some("not_received"), "{attempts:?}");

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(15), worker).await.expect("worker stops").unwrap().unwrap();
    c.stop().await.unwrap();
}

/// A loopback TCP proxy whose coordinator -> worker direction can be held: bytes the server
/// sends wait in the proxy until it is released, so a push can be made "in transit".
struct HoldingProxy {
    addr: std::net::SocketAddr,
    hold: tokio::sync::watch::Sender<bool>,
}

impl HoldingProxy {
    async fn start(target: std::net::SocketAddr) -> HoldingProxy {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (hold, _) = tokio::sync::watch::channel(false);
        let holds = hold.clone();
        tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else { return };
                let Ok(outbound) = tokio::net::TcpStream::connect(target).await else { return };
                let (mut from_worker, mut to_worker) = inbound.into_split();
                let (mut from_server, mut to_server) = outbound.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut from_worker, &mut to_server).await;
                    let _ = to_server.shutdown().await;
                });
                let mut held = holds.subscribe();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let Ok(n) = from_server.read(&mut buf).await else { return };
                        if n == 0 {
                            let _ = to_worker.shutdown().await;
                            return;
                        }
                        if held.wait_for(|h| !*h).await.is_err() {
                            return;
                        }
                        if to_worker.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        HoldingProxy { addr, hold }
    }

    fn hold(&self, on: bool) {
        self.hold.send_replace(on);
    }
}

on_every_backend!(a_push_in_transit_when_the_worker_stops_still_runs);
/// A worker that stops deregisters first, then reads its stream to the end: an assignment that
/// was on its way when shutdown began runs and is reported, not lost until its lease runs out.
/// The push is held in transit by a proxy until the coordinator has seen the worker drain.
async fn a_push_in_transit_when_the_worker_stops_still_runs(db: &TestDb) {
    use coordinator::domain::{WorkerId, WorkerState};
    let c = TestCoordinator::start(db, |_| {}).await;
    let mut client = c.client().await;
    let proxy = HoldingProxy::start(c.grpc).await;
    let shutdown = CancellationToken::new();
    let mut opts = WorkerOptions::new(format!("http://{}", proxy.addr), "stopper");
    opts.capabilities = vec!["prove".into()];
    opts.drain_grace = Duration::from_secs(10);
    let worker = Worker::new(opts, handler_fn(|t| async move { Ok(t.payload) })).unwrap();
    let worker = tokio::spawn(worker.run(shutdown.clone()));
    wait_connected(&client, &["stopper"]).await;

    proxy.hold(true);
    let id = submit(&mut client, "prove", b"in transit").await;
    let tid: TaskId = id.parse().unwrap();
    wait_until("the task is pushed", T, || async {
        db.store.get_task(tid).await.unwrap().is_some_and(|t| t.state == TaskState::Assigned)
    })
    .await;
    shutdown.cancel();
    wait_until("the coordinator sees the worker drain", T, || async {
        db.store
            .get_worker(&WorkerId::from("stopper"))
            .await
            .unwrap()
            .is_some_and(|w| w.state == WorkerState::Draining)
    })
    .await;
    proxy.hold(false);

    tokio::time::timeout(Duration::from_secs(20), worker).await.expect("worker stops").unwrap().unwrap();
    let task = db.store.get_task(tid).await.unwrap().unwrap();
    assert_eq!(
        (task.state, task.failures, task.result.as_deref()),
        (TaskState::Completed, 0, Some(&b"in transit"[..])),
        "{task:?}"
    );
    let attempts = db.store.attempts(tid).await.unwrap();
    assert_eq!(attempts.len(), 1, "{attempts:?}");
    c.stop().await.unwrap();
}

on_every_backend!(a_task_lasts_from_its_delivery_to_its_report);
/// A task that runs 700 ms measures 700 ms, from the moment it went down the worker's stream
/// to its report: not from the batched `running` mark (a quarter second later), and a task
/// reported before that mark lands does not measure 0. Both the task row and the attempt row,
/// for a completion and for a failure.
async fn a_task_lasts_from_its_delivery_to_its_report(db: &TestDb) {
    let c = TestCoordinator::start(db, |_| {}).await;
    let mut client = c.client().await;
    let mut w = RawWorker::connect(&c.endpoint(), "timed-w", 1, &[]).await;
    wait_connected(&client, &["timed-w"]).await;
    for (runs, fails) in [(700, false), (60, false), (700, true), (60, true)] {
        let id = submit(&mut client, "noop", b"{}").await;
        let a = w.next(T).await;
        assert_eq!(a.task_id, id);
        tokio::time::sleep(Duration::from_millis(runs)).await;
        if fails {
            w.fail(&a.task_id, a.attempt, false).await.unwrap();
        } else {
            w.complete(&a.task_id, a.attempt, b"ok").await.unwrap();
        }
        let tid: TaskId = id.parse().unwrap();
        let task = db.store.get_task(tid).await.unwrap().expect("task exists");
        let attempts = db.store.attempts(tid).await.unwrap();
        let attempt = attempts.last().expect("an attempt");
        let rows = [
            ("task", task.started_at, task.finished_at),
            ("attempt", attempt.started_at, attempt.finished_at),
        ];
        for (row, started, finished) in rows {
            let (started, finished) = (started.expect("started_at"), finished.expect("finished_at"));
            let ms = (finished - started).num_milliseconds();
            let what = format!("{} {row} row of a {runs} ms task (fails: {fails})", db.store.backend());
            // Never shorter than the worker held it (the batched mark made it ~250 ms short);
            // longer only by the report's way back, which a loaded machine can stretch.
            assert!((runs as i64..runs as i64 + 200).contains(&ms), "{what} measures {ms} ms");
        }
    }
    c.stop().await.unwrap();
}

on_every_backend!(get_task_shows_every_attempt_when_asked);
/// `GetTask` with `include_attempts` (gRPC, REST and `coordctl get --attempts`) shows each
/// attempt: its worker, times, outcome and error; without it, none.
async fn get_task_shows_every_attempt_when_asked(db: &TestDb) {
    let c = TestCoordinator::start(db, |_| {}).await;
    let mut client = c.client().await;
    let mut w = RawWorker::connect(&c.endpoint(), "hist-w", 1, &["prove"]).await;
    wait_connected(&client, &["hist-w"]).await;
    let id = submit(&mut client, "prove", b"x").await;
    let first = w.next(T).await;
    w.fail(&id, first.attempt, true).await.unwrap();
    let second = w.next(T).await;
    assert_eq!(second.attempt, 2);
    w.complete(&id, second.attempt, b"done").await.unwrap();

    let plain = get_task(&mut client, &id).await;
    assert!(plain.attempts.is_empty(), "{plain:?}");
    let req = proto::GetTaskRequest { task_id: id.clone(), include_attempts: true };
    let full = client.get_task(req).await.unwrap().into_inner();
    let seen: Vec<(u32, &str, &str, &str)> = full
        .attempts
        .iter()
        .map(|a| (a.attempt, a.worker_id.as_str(), a.outcome.as_str(), a.error.as_str()))
        .collect();
    assert_eq!(seen, [(1, "hist-w", "failed", "boom"), (2, "hist-w", "completed", "")]);
    for a in &full.attempts {
        let (assigned, started, finished) =
            (a.assigned_at.unwrap(), a.started_at.unwrap(), a.finished_at.unwrap());
        assert!(assigned.seconds <= started.seconds && started.seconds <= finished.seconds, "{a:?}");
    }

    let (code, body) = http_get(c.http, &format!("/api/v1/tasks/{id}?include_attempts=true")).await.unwrap();
    assert_eq!(code, 200, "{body}");
    let rest: serde_json::Value = serde_json::from_str(&body).unwrap();
    let outcomes: Vec<&str> =
        rest["attempts"].as_array().unwrap().iter().map(|a| a["outcome"].as_str().unwrap()).collect();
    assert_eq!(outcomes, ["failed", "completed"], "{body}");
    let (_, body) = http_get(c.http, &format!("/api/v1/tasks/{id}")).await.unwrap();
    assert!(
        serde_json::from_str::<serde_json::Value>(&body)
            .unwrap()
            .get("attempts")
            .is_none_or(|a| a.as_array().is_some_and(|a| a.is_empty())),
        "{body}"
    );

    let endpoint = c.endpoint();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(coordctl_bin())
            .args(["--coordinator", &endpoint, "get", &id, "--attempts"])
            .env_remove("COORDCTL_TOKEN")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text} {}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("attempt 1 on hist-w at ") && text.contains(": failed in "), "{text}");
    assert!(text.contains(": boom") && text.contains("attempt 2 on hist-w at "), "{text}");
    c.stop().await.unwrap();
}

on_every_backend!(finished_tasks_are_pruned_after_their_retention_and_unfinished_ones_stay);
/// With retention ages of a fraction of a second, a completed task is gone soon after it
/// finishes (GetTask: NOT_FOUND) while a pending one of the same age stays, and the pruner's
/// deletes are counted.
async fn finished_tasks_are_pruned_after_their_retention_and_unfinished_ones_stay(db: &TestDb) {
    let c = TestCoordinator::start(db, |cfg| {
        let r = &mut cfg.retention;
        (r.completed, r.failed, r.cancelled) = (Duration::from_millis(300), Duration::ZERO, Duration::ZERO);
        r.interval = Duration::from_millis(100);
    })
    .await;
    let mut client = c.client().await;
    let mut w = RawWorker::connect(&c.endpoint(), "prune-w", 1, &["prove"]).await;
    wait_connected(&client, &["prune-w"]).await;
    let waiting = submit(&mut client, "nobody-runs-this", b"x").await;
    let done = submit(&mut client, "prove", b"x").await;
    let a = w.next(T).await;
    w.complete(&done, a.attempt, b"proof").await.unwrap();
    let get = |id: &str| {
        let mut client = client.clone();
        let req = proto::GetTaskRequest { task_id: id.to_owned(), ..Default::default() };
        async move { client.get_task(req).await.map(|r| r.into_inner()) }
    };
    wait_until("the completed task is pruned", Duration::from_secs(15), || async {
        matches!(get(&done).await, Err(s) if s.code() == Code::NotFound)
    })
    .await;
    let kept = get(&waiting).await.expect("the pending task is kept");
    assert_eq!(kept.status, proto::TaskStatus::Pending as i32);
    let (_, text) = http_get(c.http, "/metrics").await.unwrap();
    let pruned: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix(r#"coordinator_pruned_rows_total{table="tasks"} "#))
        .expect("the pruned rows counter")
        .parse()
        .unwrap();
    assert!(pruned >= 1.0, "{text}");
    c.stop().await.unwrap();
}

on_every_backend!(a_delayed_task_waits_for_its_time_then_runs);
/// `delay_ms` and `run_at` hold a task back: it is pending with that `run_after`, no worker gets
/// it before then, and it runs once the time has come; both at once, or a time more than a year
/// ahead, are refused with INVALID_ARGUMENT.
async fn a_delayed_task_waits_for_its_time_then_runs(db: &TestDb) {
    let c =
        TestCoordinator::start(db, |cfg| cfg.coordinator.poll_interval = Duration::from_millis(100)).await;
    let mut client = c.client().await;
    let mut w = RawWorker::connect(&c.endpoint(), "delay-w", 2, &["prove"]).await;
    wait_connected(&client, &["delay-w"]).await;
    let submit_at = |delay_ms, run_at| proto::SubmitTaskRequest {
        task_type: "prove".into(),
        payload: b"x".to_vec(),
        delay_ms,
        run_at,
        ..Default::default()
    };
    let before = chrono::Utc::now();
    let delayed = client.submit_task(submit_at(700, None)).await.unwrap().into_inner();
    let at = chrono::Utc::now() + chrono::Duration::milliseconds(900);
    let ts = |t: chrono::DateTime<chrono::Utc>| prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    };
    let scheduled = client.submit_task(submit_at(0, Some(ts(at)))).await.unwrap().into_inner();
    let run_after = |t: &proto::SubmitTaskResponse| {
        let r = t.task.as_ref().unwrap().run_after.unwrap();
        chrono::DateTime::from_timestamp(r.seconds, r.nanos as u32).unwrap()
    };
    assert!(run_after(&delayed) >= before + chrono::Duration::milliseconds(700));
    assert_eq!(run_after(&scheduled).timestamp_micros(), at.timestamp_micros());
    let mut got = Vec::new();
    for _ in 0..2 {
        let a = w.next(T).await;
        w.complete(&a.task_id, a.attempt, b"ok").await.unwrap();
        got.push(a.task_id);
    }
    got.sort();
    let mut want = vec![delayed.task_id.clone(), scheduled.task_id.clone()];
    want.sort();
    assert_eq!(got, want);
    for (id, not_before) in [(&delayed.task_id, run_after(&delayed)), (&scheduled.task_id, at)] {
        let t = client
            .get_task(proto::GetTaskRequest { task_id: id.clone(), include_attempts: true })
            .await
            .unwrap()
            .into_inner();
        let assigned = t.attempts[0].assigned_at.unwrap();
        let assigned = chrono::DateTime::from_timestamp(assigned.seconds, assigned.nanos as u32).unwrap();
        assert!(assigned >= not_before, "{id} assigned at {assigned}, before its time {not_before}");
    }
    for bad in [
        submit_at(10, Some(ts(at))),
        submit_at(0, Some(ts(chrono::Utc::now() + chrono::Duration::days(400)))),
        submit_at(400 * 24 * 3600 * 1000, None),
    ] {
        let err = client.submit_task(bad).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    }
    c.stop().await.unwrap();
}

on_every_backend!(list_workers_pages_by_id);
/// `ListWorkers` answers a page at a time, in id order, with a token to the next page and none
/// after the last; a page size over the limit is refused.
async fn list_workers_pages_by_id(db: &TestDb) {
    let c = TestCoordinator::start(db, |_| {}).await;
    let mut client = c.client().await;
    let mut workers = Vec::new();
    for i in 0..5 {
        workers.push(RawWorker::connect(&c.endpoint(), &format!("page-w{i}"), 1, &[]).await);
    }
    wait_connected(&client, &["page-w0", "page-w1", "page-w2", "page-w3", "page-w4"]).await;
    let mut seen = Vec::new();
    let mut page_token = String::new();
    let mut pages = 0;
    loop {
        let req = proto::ListWorkersRequest { page_size: 2, page_token };
        let page = client.list_workers(req).await.unwrap().into_inner();
        assert!(page.workers.len() <= 2);
        seen.extend(page.workers.into_iter().map(|w| w.worker_id));
        pages += 1;
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(seen, ["page-w0", "page-w1", "page-w2", "page-w3", "page-w4"]);
    assert_eq!(pages, 3);
    let err = client
        .list_workers(proto::ListWorkersRequest { page_size: 5000, ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let (code, body) = http_get(c.http, "/api/v1/workers?page_size=2&page_token=page-w1").await.unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("page-w2") && body.contains("page-w3") && !body.contains("page-w1\""), "{body}");
    drop(workers);
    c.stop().await.unwrap();
}

on_every_backend!(a_type_limit_must_name_its_maximum_and_a_held_type_reads_zero);
/// A request to set a type's limit that leaves the maximum out is refused, over REST and gRPC
/// alike, rather than read as 0 (which holds every task of the type); an explicit 0 holds the
/// type, and the answer and the listing say `"max_in_flight": 0` and `"in_flight": 0`.
async fn a_type_limit_must_name_its_maximum_and_a_held_type_reads_zero(db: &TestDb) {
    let c = TestCoordinator::start(db, |_| {}).await;
    let mut client = c.client().await;
    for body in ["", "{}", r#"{"clear":false}"#] {
        let (code, answer) = http_request(c.http, "PUT", "/api/v1/limits/prove", body).await.unwrap();
        assert_eq!(code, 400, "body {body:?}: {answer}");
        assert!(answer.contains("max_in_flight: required"), "body {body:?}: {answer}");
    }
    let err = client
        .set_type_limit(proto::SetTypeLimitRequest {
            task_type: "prove".into(),
            max_in_flight: None,
            clear: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let (code, listed) = http_get(c.http, "/api/v1/limits").await.unwrap();
    assert_eq!(
        (code, serde_json::from_str::<serde_json::Value>(&listed).unwrap()),
        (200, json!({"limits": []}))
    );

    let (code, held) =
        http_request(c.http, "PUT", "/api/v1/limits/prove", r#"{"max_in_flight":0}"#).await.unwrap();
    assert_eq!(code, 200, "{held}");
    let expected = json!({"task_type": "prove", "max_in_flight": 0, "source": "admin", "in_flight": 0});
    assert_eq!(serde_json::from_str::<serde_json::Value>(&held).unwrap(), expected);
    let (_, listed) = http_get(c.http, "/api/v1/limits").await.unwrap();
    assert_eq!(serde_json::from_str::<serde_json::Value>(&listed).unwrap(), json!({"limits": [expected]}));

    let (code, cleared) = http_request(c.http, "DELETE", "/api/v1/limits/prove", "").await.unwrap();
    assert_eq!(code, 200, "{cleared}");
    let (_, listed) = http_get(c.http, "/api/v1/limits").await.unwrap();
    assert_eq!(serde_json::from_str::<serde_json::Value>(&listed).unwrap(), json!({"limits": []}));
    c.stop().await.unwrap();
}

on_every_backend!(a_prefetching_worker_queues_beyond_its_slots_and_hands_the_queue_back_on_drain);
/// A worker with one slot and a prefetch of 3 holds four assignments (one running, three queued
/// locally), never more, and runs one at a time; when it drains, the queued ones go back at
/// once, uncharged (outcome `released`), while the running one finishes.
async fn a_prefetching_worker_queues_beyond_its_slots_and_hands_the_queue_back_on_drain(db: &TestDb) {
    let c = TestCoordinator::start(db, |_| {}).await;
    let mut client = c.client().await;
    let shutdown = CancellationToken::new();
    let mut opts = WorkerOptions::new(c.endpoint(), "prefetcher");
    opts.max_concurrent = 1;
    opts.prefetch = 3;
    opts.drain_grace = Duration::from_secs(10);
    let running = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (r, m, g) = (running.clone(), most.clone(), gate.clone());
    let handler = handler_fn(move |_t| {
        let (r, m, g) = (r.clone(), m.clone(), g.clone());
        async move {
            let now = r.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            m.fetch_max(now, std::sync::atomic::Ordering::SeqCst);
            let _ = g.acquire().await.map(|p| p.forget());
            r.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            Ok(b"done".to_vec())
        }
    });
    let worker = tokio::spawn(Worker::new(opts, handler).unwrap().run(shutdown.clone()));
    wait_connected(&client, &["prefetcher"]).await;
    // One submission: the refill takes them in one claim (a worker with a queue is topped up
    // once half of its queue is free, not after every task).
    let tasks = (0..6)
        .map(|i| proto::SubmitTaskRequest {
            task_type: "prove".into(),
            payload: format!("{i}").into_bytes(),
            ..Default::default()
        })
        .collect();
    let ids = client
        .submit_job(proto::SubmitJobRequest { name: "prefetch".into(), tasks, ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .task_ids;
    wait_until("one slot and three queued are held", T, || async { held_by(db, "prefetcher").await == 4 })
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(held_by(db, "prefetcher").await, 4, "never more than slots + prefetch");
    assert_eq!(running.load(std::sync::atomic::Ordering::SeqCst), 1, "one runs; three wait in the queue");

    shutdown.cancel();
    // The queued three are handed back while the running one is still running.
    wait_until("the queue is handed back", T, || async { held_by(db, "prefetcher").await == 1 }).await;
    gate.add_permits(1);
    tokio::time::timeout(Duration::from_secs(15), worker).await.expect("worker stops").unwrap().unwrap();
    assert_eq!(most.load(std::sync::atomic::Ordering::SeqCst), 1, "one at a time");

    let mut completed = 0;
    let mut released = 0;
    for id in &ids {
        let tid: TaskId = id.parse().unwrap();
        let task = db.store.get_task(tid).await.unwrap().unwrap();
        assert_eq!(task.failures, 0, "nothing charged: {task:?}");
        match task.state {
            TaskState::Completed => completed += 1,
            TaskState::Pending => {
                let attempts = db.store.attempts(tid).await.unwrap();
                if let Some(last) = attempts.last() {
                    assert_eq!(last.outcome.as_deref(), Some("released"), "{attempts:?}");
                    released += 1;
                }
            }
            other => panic!("task {id} is {other:?}"),
        }
    }
    assert_eq!((completed, released), (1, 3), "the running task finished; the queued three went back");
    c.stop().await.unwrap();
}

/// A coordinator with a quick heartbeat timeout, a client, and a holder of worker id `dup`
/// registered from gpu-1 that heartbeats (no stream: it takes no work) until aborted.
async fn holder_of_dup(db: &TestDb) -> (TestCoordinator, Client, tokio::task::JoinHandle<()>) {
    let c = TestCoordinator::start(db, |c| {
        c.coordinator.heartbeat_timeout = Duration::from_secs(2);
        c.coordinator.cleanup_interval = Duration::from_millis(200);
    })
    .await;
    let mut client = c.client().await;
    client
        .register_worker(proto::RegisterWorkerRequest {
            worker_id: "dup".into(),
            max_concurrent_tasks: 1,
            hostname: "gpu-1".into(),
            instance_id: "holder".into(),
            ..Default::default()
        })
        .await
        .expect("the holder registers");
    let beat = proto::HeartbeatRequest { worker_id: "dup".into(), ..Default::default() };
    client.send_heartbeat(beat).await.expect("a heartbeat");
    let holder = keep_alive(client.clone(), "dup", Duration::from_millis(100));
    (c, client, holder)
}

/// An SDK worker of id `dup` on host gpu-2, quick to retry.
fn second_dup(c: &TestCoordinator) -> Worker {
    let mut opts = WorkerOptions::new(c.endpoint(), "dup");
    opts.hostname = "gpu-2".into();
    opts.capabilities = vec!["prove".into()];
    opts.heartbeat_interval = Some(Duration::from_millis(100));
    opts.backoff_base = Duration::from_millis(50);
    opts.backoff_max = Duration::from_millis(200);
    Worker::new(opts, handler_fn(|_t| async { Ok(b"proof".to_vec()) })).unwrap()
}

/// A worker refused its id (a live worker of another host holds it) keeps trying while the
/// holder heartbeats, and sends no heartbeats under that id: they would keep the holder's
/// session alive after it died. Once the holder falls silent, the refused worker registers and
/// runs the work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_refused_its_id_registers_once_the_holder_is_gone() {
    let db = TestDb::sqlite().await;
    let (c, mut client, holder) = holder_of_dup(&db).await;
    let worker = second_dup(&c);
    let counters = worker.counters();
    let count = |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::SeqCst);
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(worker.run(shutdown.clone()));
    wait_until("the second is refused twice", Duration::from_secs(10), || {
        let n = count(&counters.refusals);
        async move { n >= 2 }
    })
    .await;
    assert_eq!(count(&counters.sessions), 0, "refused while the holder is live");
    holder.abort();
    let silent = Instant::now();
    wait_until("the second registers", Duration::from_secs(15), || {
        let n = count(&counters.sessions);
        async move { n > 0 }
    })
    .await;
    println!("registered {:?} after the holder fell silent", silent.elapsed());
    let id = submit(&mut client, "prove", b"x").await;
    wait_until("the task completes", Duration::from_secs(10), || {
        let mut client = client.clone();
        let id = id.clone();
        async move { task_status(&mut client, &id).await == proto::TaskStatus::Completed }
    })
    .await;
    shutdown.cancel();
    run.await.unwrap().unwrap();
    c.stop().await.unwrap();
    db.cleanup().await;
}

/// A worker refused its id that stops leaves the holder alone: Deregister names only the id,
/// and would drain the holder's session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_refused_its_id_does_not_drain_the_holder_when_it_stops() {
    let db = TestDb::sqlite().await;
    let (c, mut client, holder) = holder_of_dup(&db).await;
    let worker = second_dup(&c);
    let counters = worker.counters();
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(worker.run(shutdown.clone()));
    wait_until("the second is refused", Duration::from_secs(10), || {
        let n = counters.refusals.load(std::sync::atomic::Ordering::SeqCst);
        async move { n >= 1 }
    })
    .await;
    shutdown.cancel();
    run.await.unwrap().unwrap();
    assert_eq!(
        worker_state(&mut client, "dup").await,
        proto::WorkerState::Active,
        "the holder is not drained"
    );
    holder.abort();
    c.stop().await.unwrap();
    db.cleanup().await;
}
