//! Jobs as a whole, over real gRPC, REST and coordctl: listed newest first with their counts,
//! cancelled with their running tasks' workers told to stop, and watched to their end, also
//! when the change is made through another replica (Postgres).

#[macro_use]
mod common;

use std::time::Duration;

use common::*;
use coordinator::proto;
use tonic::Code;

async fn submit_job(client: &mut Client, name: &str, task_type: &str, n: usize) -> proto::SubmitJobResponse {
    let tasks = (0..n)
        .map(|i| proto::SubmitTaskRequest {
            task_type: task_type.into(),
            payload: format!("{i}").into_bytes(),
            ..Default::default()
        })
        .collect();
    client
        .submit_job(proto::SubmitJobRequest { name: name.into(), tasks, ..Default::default() })
        .await
        .expect("submit job")
        .into_inner()
}

on_every_backend!(jobs_are_listed_newest_first_with_their_counts);
async fn jobs_are_listed_newest_first_with_their_counts(db: &TestDb) {
    let c = TestCoordinator::start(db, |_| {}).await;
    let mut client = c.client().await;
    let first = submit_job(&mut client, "first", "nobody-runs-this", 2).await;
    let second = submit_job(&mut client, "second", "nobody-runs-this", 3).await;
    client
        .cancel_task(proto::CancelTaskRequest { task_id: second.task_ids[0].clone(), reason: String::new() })
        .await
        .unwrap();

    let page = |page_token: String| proto::ListJobsRequest { page_size: 1, page_token };
    let p1 = client.list_jobs(page(String::new())).await.unwrap().into_inner();
    assert_eq!(p1.jobs.len(), 1);
    let j = &p1.jobs[0];
    assert_eq!((j.job_id.as_str(), j.name.as_str()), (second.job_id.as_str(), "second"), "newest first");
    assert_eq!((j.total, j.pending, j.cancelled, j.done), (3, 2, 1, false));
    assert!(j.results.is_empty(), "a listing carries no results");
    let p2 = client.list_jobs(page(p1.next_page_token.clone())).await.unwrap().into_inner();
    assert_eq!(p2.jobs.iter().map(|j| j.job_id.as_str()).collect::<Vec<_>>(), vec![first.job_id.as_str()]);
    assert_eq!((p2.jobs[0].total, p2.jobs[0].pending), (2, 2));
    let p3 = client.list_jobs(page(p2.next_page_token.clone())).await.unwrap().into_inner();
    assert!(p3.jobs.is_empty() && p3.next_page_token.is_empty(), "{p3:?}");
    let all = client.list_jobs(proto::ListJobsRequest::default()).await.unwrap().into_inner();
    assert_eq!(all.jobs.len(), 2);
    assert!(all.next_page_token.is_empty(), "the last page has no token");

    let e =
        client.list_jobs(proto::ListJobsRequest { page_size: 1001, ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = client
        .list_jobs(proto::ListJobsRequest { page_token: "nope".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    let (code, body) = http(c.http, "GET", "/api/v1/jobs?page_size=1", "").await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["jobs"][0]["job_id"], second.job_id.as_str(), "{body}");

    let out = coordctl_async(&c.endpoint(), &["jobs"]).await;
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", text(&out));
    assert!(lines[1].starts_with(&second.job_id) && lines[2].starts_with(&first.job_id), "{}", text(&out));
    c.stop().await.unwrap();
}

on_every_backend!(cancel_job_cancels_what_runs_and_tells_the_worker);
async fn cancel_job_cancels_what_runs_and_tells_the_worker(db: &TestDb) {
    let c = TestCoordinator::start(db, |_| {}).await;
    let mut client = c.client().await;
    let mut worker = RawWorker::connect(&c.endpoint(), "w1", 2, &["prove"]).await;
    wait_connected(&client, &["w1"]).await;
    let job = submit_job(&mut client, "proofs", "prove", 4).await;
    let a = worker.next(Duration::from_secs(10)).await;
    let b = worker.next(Duration::from_secs(10)).await;
    // One runs (the worker says so), one ends, and two wait for a slot.
    worker.heartbeat(&[(&a.task_id, a.attempt)]).await.unwrap();
    worker.complete(&b.task_id, b.attempt, b"ok").await.unwrap();
    let c2 = worker.next(Duration::from_secs(10)).await;
    wait_until("the first task runs", Duration::from_secs(10), || {
        let mut client = client.clone();
        let id = a.task_id.clone();
        async move { task_status(&mut client, &id).await == proto::TaskStatus::Running }
    })
    .await;

    let r = client
        .cancel_job(proto::CancelJobRequest { job_id: job.job_id.clone(), reason: "superseded".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.cancelled, 3, "every task but the completed one");
    let j = r.job.unwrap();
    assert_eq!((j.completed, j.cancelled, j.done), (1, 3, true));
    // The worker is told to stop both tasks it holds.
    let mut told = Vec::new();
    for _ in 0..2 {
        let m = worker.next(Duration::from_secs(10)).await;
        assert_eq!(m.kind, proto::AssignmentKind::Cancel as i32, "{m:?}");
        told.push((m.task_id, m.attempt));
    }
    told.sort();
    let mut want = vec![(a.task_id.clone(), a.attempt), (c2.task_id.clone(), c2.attempt)];
    want.sort();
    assert_eq!(told, want);
    // Its late report changes nothing.
    let e = worker.complete(&a.task_id, a.attempt, b"late").await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let t = get_task(&mut client, &a.task_id).await;
    assert_eq!((t.status, t.error.as_str()), (proto::TaskStatus::Cancelled as i32, "superseded"));

    // Again: nothing left to cancel. Unknown and malformed ids.
    let r = client
        .cancel_job(proto::CancelJobRequest { job_id: job.job_id.clone(), reason: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.cancelled, 0);
    let unknown = proto::CancelJobRequest {
        job_id: "0190a0b0-0000-7000-8000-000000000001".into(),
        ..Default::default()
    };
    assert_eq!(client.cancel_job(unknown).await.unwrap_err().code(), Code::NotFound);
    let bad = proto::CancelJobRequest { job_id: "nope".into(), ..Default::default() };
    assert_eq!(client.cancel_job(bad).await.unwrap_err().code(), Code::InvalidArgument);

    // REST and coordctl, on a job of waiting tasks.
    let other = submit_job(&mut client, "waits", "nobody-runs-this", 2).await;
    let (code, body) = http(c.http, "POST", &format!("/api/v1/jobs/{}/cancel", other.job_id), "").await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["cancelled"], 2, "{body}");
    let third = submit_job(&mut client, "more", "nobody-runs-this", 1).await;
    let out = coordctl_async(&c.endpoint(), &["job", "cancel", &third.job_id]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("cancelled 1 of the 1 tasks"), "{}", text(&out));
    c.stop().await.unwrap();
}

/// Every message of a `WatchJob` stream until it ends (bounded).
async fn watch_to_end(mut stream: tonic::Streaming<proto::Job>) -> Vec<proto::Job> {
    tokio::time::timeout(Duration::from_secs(20), async move {
        let mut seen = Vec::new();
        while let Some(j) = stream.message().await.expect("watch stream") {
            seen.push(j);
        }
        seen
    })
    .await
    .expect("the watch ends once the job is done")
}

on_every_backend!(watch_job_streams_progress_until_the_job_is_done);
async fn watch_job_streams_progress_until_the_job_is_done(db: &TestDb) {
    let c = TestCoordinator::start(db, |_| {}).await;
    let mut client = c.client().await;
    // No worker yet: the first message is the job as submitted.
    let job = submit_job(&mut client, "proofs", "prove", 3).await;
    let stream =
        client.watch_job(proto::WatchJobRequest { job_id: job.job_id.clone() }).await.unwrap().into_inner();
    let watcher = tokio::spawn(watch_to_end(stream));
    let mut worker = RawWorker::connect(&c.endpoint(), "w1", 3, &["prove"]).await;
    for _ in 0..3 {
        let a = worker.next(Duration::from_secs(10)).await;
        if a.payload == b"1" {
            worker.fail(&a.task_id, a.attempt, false).await.unwrap();
        } else {
            worker.complete(&a.task_id, a.attempt, b"ok").await.unwrap();
        }
    }
    let seen = watcher.await.unwrap();
    let first = &seen[0];
    assert_eq!(
        (first.job_id.as_str(), first.total, first.pending, first.done),
        (job.job_id.as_str(), 3, 3, false)
    );
    let last = seen.last().unwrap();
    assert_eq!((last.completed, last.failed, last.done), (2, 1, true), "{seen:?}");
    assert!(seen[..seen.len() - 1].iter().all(|j| !j.done), "only the last message is done");
    let ended: Vec<u32> = seen.iter().map(|j| j.completed + j.failed + j.cancelled).collect();
    assert!(ended.windows(2).all(|w| w[0] <= w[1]), "progress never goes back: {ended:?}");
    for pair in seen.windows(2) {
        assert_ne!(pair[0], pair[1], "a message only when the counts change");
    }

    // A job already done: one message, then the end.
    let seen = watch_to_end(
        client.watch_job(proto::WatchJobRequest { job_id: job.job_id.clone() }).await.unwrap().into_inner(),
    )
    .await;
    assert_eq!(seen.len(), 1);
    assert!(seen[0].done);
    let unknown = proto::WatchJobRequest { job_id: "0190a0b0-0000-7000-8000-000000000001".into() };
    assert_eq!(client.watch_job(unknown).await.unwrap_err().code(), Code::NotFound);

    // coordctl follows a job the same way: `job watch`, and the commands that wait for one.
    let other = submit_job(&mut client, "more", "prove", 2).await;
    let endpoint = c.endpoint();
    let id = other.job_id.clone();
    let cli = tokio::spawn(async move { coordctl_async(&endpoint, &["job", "watch", &id]).await });
    for result in [&b"line one\nline two\n"[..], b"ok\n"] {
        let a = worker.next(Duration::from_secs(10)).await;
        worker.complete(&a.task_id, a.attempt, result).await.unwrap();
    }
    let out = cli.await.unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.lines().last().unwrap_or_default().starts_with("2/2 done"), "{}", text(&out));
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines.windows(2).all(|w| w[0] != w[1]), "a line only when it changes: {stdout}");

    // Results that end in a newline or span lines keep one row each.
    let out = coordctl_async(&c.endpoint(), &["job", "get", &other.job_id, "--results"]).await;
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<&str> = stdout.lines().collect();
    assert_eq!(rows.len(), 3, "a header and one row per task: {stdout}");
    assert!(rows.iter().any(|r| r.ends_with(r"line one\nline two")), "{stdout}");
    assert!(rows.iter().any(|r| r.ends_with(" ok")), "{stdout}");
    c.stop().await.unwrap();
}

/// A watcher on replica A sees a job end whose tasks complete through replica B, with both
/// replicas' scheduler ticks and watch re-reads a minute apart: only the cross-replica
/// notifications can explain a prompt end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
async fn watch_job_on_one_replica_follows_completions_on_another() {
    let db = TestDb::postgres().await.expect("TEST_DATABASE_URL is set");
    let slow = Duration::from_secs(60);
    let a = TestCoordinator::start(&db, |cfg| {
        cfg.coordinator.id = "replica-a".into();
        cfg.coordinator.poll_interval = slow;
    })
    .await;
    let b = TestCoordinator::start(&db, |cfg| {
        cfg.coordinator.id = "replica-b".into();
        cfg.coordinator.poll_interval = slow;
    })
    .await;
    let mut client_a = a.client().await;
    let job = submit_job(&mut client_a, "across", "prove", 2).await;
    let stream =
        client_a.watch_job(proto::WatchJobRequest { job_id: job.job_id.clone() }).await.unwrap().into_inner();
    let watcher = tokio::spawn(watch_to_end(stream));
    let mut on_b = RawWorker::connect(&b.endpoint(), "w-b", 2, &["prove"]).await;
    for _ in 0..2 {
        let t = on_b.next(Duration::from_secs(10)).await;
        on_b.complete(&t.task_id, t.attempt, b"ok").await.unwrap();
    }
    let seen = watcher.await.unwrap();
    let last = seen.last().unwrap();
    assert_eq!((last.completed, last.done), (2, true), "{seen:?}");
    b.stop().await.unwrap();
    a.stop().await.unwrap();
    db.cleanup().await;
}

on_every_backend!(a_job_sent_again_with_its_key_is_made_once);
/// A client that sends a job again with the same idempotency key (after a timeout, say) gets the
/// job the first submission made, over gRPC, REST and coordctl alike, and nothing is created
/// again: the tasks here carry no keys of their own, so before job keys each resend made every
/// task once more.
async fn a_job_sent_again_with_its_key_is_made_once(db: &TestDb) {
    let c = TestCoordinator::start(db, |_| {}).await;
    let mut client = c.client().await;
    let job = |key: &str| proto::SubmitJobRequest {
        name: "nightly".into(),
        tasks: (0..3)
            .map(|i| proto::SubmitTaskRequest {
                task_type: "nobody-runs-this".into(),
                payload: format!("{i}").into_bytes(),
                ..Default::default()
            })
            .collect(),
        idempotency_key: key.into(),
    };
    let first = client.submit_job(job("nightly-2026-12-07")).await.unwrap().into_inner();
    let again = client.submit_job(job("nightly-2026-12-07")).await.unwrap().into_inner();
    assert!(!first.existing && again.existing, "{first:?} {again:?}");
    assert_eq!((&again.job_id, &again.task_ids), (&first.job_id, &first.task_ids));
    let body = r#"{"name":"nightly","idempotency_key":"nightly-2026-12-07","tasks":[{"task_type":"nobody-runs-this"}]}"#;
    let (code, answer) = http_request(c.http, "POST", "/api/v1/jobs", body).await.unwrap();
    assert_eq!(code, 200, "{answer}");
    let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(
        (answer["job_id"].as_str(), answer["existing"].as_bool()),
        (Some(first.job_id.as_str()), Some(true))
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tasks.jsonl");
    std::fs::write(&file, "{\"type\":\"nobody-runs-this\",\"payload\":\"x\"}\n").unwrap();
    let file = file.to_str().unwrap();
    let run =
        async || coordctl_async(&c.endpoint(), &["job", "submit", file, "--idempotency-key", "cli-1"]).await;
    let (one, two) = (run().await, run().await);
    for out in [&one, &two] {
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!(one.stdout, two.stdout, "the same job id");
    assert!(
        String::from_utf8_lossy(&two.stderr).contains("made earlier with this idempotency key"),
        "{two:?}"
    );

    let all =
        client.list_tasks(proto::ListTasksRequest { page_size: 100, ..Default::default() }).await.unwrap();
    assert_eq!(all.into_inner().tasks.len(), 4, "the three tasks of the first job and the one of coordctl's");
    let jobs = client.list_jobs(proto::ListJobsRequest::default()).await.unwrap().into_inner();
    assert_eq!(jobs.jobs.len(), 2);
    let e = client.submit_job(job(&"k".repeat(257))).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    c.stop().await.unwrap();
}
