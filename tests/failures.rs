//! Failures an operator can see and act on, over real gRPC, REST and coordctl: a summary of
//! what failed by type and error; a failed or cancelled task retried runs again at once with its
//! history kept; other states are refused; a bulk retry takes what its filter picks out, needs a
//! filter, stops at its limit, and two racing ones (on two replicas on Postgres) retry each
//! task once.

#[macro_use]
mod common;

use std::{collections::BTreeSet, time::Duration};

use common::*;
use coordinator::proto;
use tonic::Code;

/// Long enough that the scheduler's tick cannot be what moved a task: only a wake-up can.
const SLOW_POLL: Duration = Duration::from_secs(60);
/// A type no worker in these tests runs: its tasks wait until cancelled.
const NOBODY: &str = "nobody-runs-this";

async fn submit_one(client: &mut Client, task_type: &str, max_attempts: u32) -> String {
    client
        .submit_task(proto::SubmitTaskRequest {
            task_type: task_type.into(),
            payload: b"x".to_vec(),
            max_attempts,
            ..Default::default()
        })
        .await
        .expect("submit")
        .into_inner()
        .task_id
}

/// `n` tasks of `task_type`, each cancelled while it waits.
async fn cancelled_tasks(client: &mut Client, task_type: &str, n: usize) -> Vec<String> {
    let ids = submit_batch(client, task_type, n, |_| Vec::new()).await;
    for id in &ids {
        client
            .cancel_task(proto::CancelTaskRequest { task_id: id.clone(), reason: String::new() })
            .await
            .unwrap();
    }
    ids
}

fn status(t: &proto::Task) -> proto::TaskStatus {
    proto::TaskStatus::try_from(t.status).unwrap()
}

on_every_backend!(a_retried_task_is_pushed_at_once_and_completes_with_its_history);
async fn a_retried_task_is_pushed_at_once_and_completes_with_its_history(db: &TestDb) {
    let c = TestCoordinator::start(db, |cfg| cfg.coordinator.poll_interval = SLOW_POLL).await;
    let mut client = c.client().await;
    let mut worker = RawWorker::connect(&c.endpoint(), "w1", 1, &["prove"]).await;
    wait_connected(&client, &["w1"]).await;
    let id = submit_one(&mut client, "prove", 1).await;
    let first = worker.next(Duration::from_secs(10)).await;
    assert_eq!((first.task_id.as_str(), first.attempt), (id.as_str(), 1));
    worker.fail(&id, 1, false).await.expect("report failure");
    assert_eq!(task_status(&mut client, &id).await, proto::TaskStatus::Failed);

    let retried =
        client.retry_task(proto::RetryTaskRequest { task_id: id.clone() }).await.unwrap().into_inner();
    assert_eq!(status(&retried), proto::TaskStatus::Pending);
    assert_eq!((retried.failures, retried.attempt, retried.error.as_str()), (0, 1, ""));
    // Pushed at once: the scheduler's tick is a minute away.
    let second = worker.next(Duration::from_secs(10)).await;
    assert_eq!((second.task_id.as_str(), second.attempt), (id.as_str(), 2));
    worker.complete(&id, 2, b"done").await.expect("complete");

    let t = client
        .get_task(proto::GetTaskRequest { task_id: id.clone(), include_attempts: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status(&t), proto::TaskStatus::Completed);
    assert_eq!(t.result, b"done");
    let history: Vec<(u32, &str, &str)> =
        t.attempts.iter().map(|a| (a.attempt, a.outcome.as_str(), a.error.as_str())).collect();
    assert_eq!(history, vec![(1, "failed", "boom"), (2, "completed", "")]);
    c.stop().await.unwrap();
}

on_every_backend!(retry_refuses_a_task_that_is_not_failed_or_cancelled);
async fn retry_refuses_a_task_that_is_not_failed_or_cancelled(db: &TestDb) {
    let c = TestCoordinator::start(db, |_| {}).await;
    let mut client = c.client().await;
    let pending = submit_one(&mut client, NOBODY, 0).await;
    let e = client.retry_task(proto::RetryTaskRequest { task_id: pending.clone() }).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("is pending"), "{}", e.message());
    assert_eq!(task_status(&mut client, &pending).await, proto::TaskStatus::Pending);

    let mut worker = RawWorker::connect(&c.endpoint(), "w1", 1, &["prove"]).await;
    let done = submit_one(&mut client, "prove", 0).await;
    let a = worker.next(Duration::from_secs(10)).await;
    worker.complete(&a.task_id, a.attempt, b"ok").await.unwrap();
    let e = client.retry_task(proto::RetryTaskRequest { task_id: done.clone() }).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("is completed"), "{}", e.message());
    assert_eq!(get_task(&mut client, &done).await.result, b"ok", "the completed task is untouched");

    let unknown = "0190a0b0-0000-7000-8000-000000000001".to_string();
    let e = client.retry_task(proto::RetryTaskRequest { task_id: unknown }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = client.retry_task(proto::RetryTaskRequest { task_id: "nope".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // REST answers the same: 409 for the wrong state, 200 with the task for a cancelled one.
    let (code, body) = http(c.http, "POST", &format!("/api/v1/tasks/{pending}/retry"), "").await;
    assert_eq!(code, 409, "{body}");
    client
        .cancel_task(proto::CancelTaskRequest { task_id: pending.clone(), reason: String::new() })
        .await
        .unwrap();
    let (code, body) = http(c.http, "POST", &format!("/api/v1/tasks/{pending}/retry"), "").await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "TASK_STATUS_PENDING", "{body}");
    c.stop().await.unwrap();
}

on_every_backend!(bulk_retry_needs_a_filter_and_stops_at_its_limit);
async fn bulk_retry_needs_a_filter_and_stops_at_its_limit(db: &TestDb) {
    let c = TestCoordinator::start(db, |_| {}).await;
    let mut client = c.client().await;
    let ids = cancelled_tasks(&mut client, NOBODY, 5).await;
    let other = cancelled_tasks(&mut client, "another-type", 1).await;

    for (req, field) in [
        (proto::RetryTasksRequest { include_cancelled: true, ..Default::default() }, "at least one filter"),
        (proto::RetryTasksRequest { task_type: NOBODY.into(), limit: 10_001, ..Default::default() }, "limit"),
        (proto::RetryTasksRequest { job_id: "nope".into(), ..Default::default() }, "job_id"),
        (
            proto::RetryTasksRequest {
                task_type: NOBODY.into(),
                finished_after: Some(prost_types::Timestamp { seconds: 20, nanos: 0 }),
                finished_before: Some(prost_types::Timestamp { seconds: 10, nanos: 0 }),
                ..Default::default()
            },
            "finished_before",
        ),
    ] {
        let e = client.retry_tasks(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(e.message().contains(field), "{field}: {}", e.message());
    }
    let by_type = |limit, include_cancelled| proto::RetryTasksRequest {
        task_type: NOBODY.into(),
        include_cancelled,
        limit,
        ..Default::default()
    };
    let r = client.retry_tasks(by_type(2, false)).await.unwrap().into_inner();
    assert_eq!((r.retried, r.more), (0, false), "cancelled tasks only when asked");

    let mut seen = BTreeSet::new();
    for (want, more) in [(2, true), (2, true), (1, false), (0, false)] {
        let r = client.retry_tasks(by_type(2, true)).await.unwrap().into_inner();
        assert_eq!((r.retried, r.more), (want, more), "{r:?}");
        assert_eq!(r.task_ids.len(), want as usize);
        for id in &r.task_ids {
            assert!(seen.insert(id.clone()), "{id} retried twice");
            assert_eq!(task_status(&mut client, id).await, proto::TaskStatus::Pending);
        }
    }
    assert_eq!(seen, ids.iter().cloned().collect(), "every task of the type, once");
    assert_eq!(task_status(&mut client, &other[0]).await, proto::TaskStatus::Cancelled, "another type stays");

    // REST: the same request as JSON.
    let (code, body) = http(
        c.http,
        "POST",
        "/api/v1/tasks/retry",
        r#"{"task_type":"another-type","include_cancelled":true}"#,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["retried"], 1, "{body}");
    assert_eq!(v["task_ids"][0], other[0].as_str(), "{body}");
    let (code, body) = http(c.http, "POST", "/api/v1/tasks/retry", "{}").await;
    assert_eq!(code, 400, "{body}");
    c.stop().await.unwrap();
}

on_every_backend!(racing_bulk_retries_retry_each_task_once);
async fn racing_bulk_retries_retry_each_task_once(db: &TestDb) {
    let a = TestCoordinator::start(db, |cfg| cfg.coordinator.id = "replica-a".into()).await;
    // On Postgres the second retry goes through a second replica; SQLite serves one process.
    let b = match db.store.backend() {
        "postgres" => Some(TestCoordinator::start(db, |cfg| cfg.coordinator.id = "replica-b".into()).await),
        _ => None,
    };
    let mut client_a = a.client().await;
    let mut client_b = match &b {
        Some(b) => b.client().await,
        None => a.client().await,
    };
    let ids = cancelled_tasks(&mut client_a, NOBODY, 600).await;
    let req =
        proto::RetryTasksRequest { task_type: NOBODY.into(), include_cancelled: true, ..Default::default() };
    let (one, two) = tokio::join!(client_a.retry_tasks(req.clone()), client_b.retry_tasks(req));
    let (one, two) = (one.unwrap().into_inner(), two.unwrap().into_inner());
    let set1: BTreeSet<String> = one.task_ids.iter().cloned().collect();
    let set2: BTreeSet<String> = two.task_ids.iter().cloned().collect();
    assert!(set1.is_disjoint(&set2), "retried twice: {:?}", set1.intersection(&set2).collect::<Vec<_>>());
    assert_eq!(one.retried + two.retried, ids.len() as u32);
    assert_eq!(set1.union(&set2).cloned().collect::<BTreeSet<_>>(), ids.iter().cloned().collect());
    println!("retry 1 took {}, retry 2 took {}", one.retried, two.retried);
    let counts = db.store.task_counts().await.unwrap();
    assert_eq!(counts.get(&coordinator::domain::TaskState::Pending), Some(&(ids.len() as u64)));
    if let Some(b) = b {
        b.stop().await.unwrap();
    }
    a.stop().await.unwrap();
}

on_every_backend!(coordctl_retries_one_task_or_many_by_filter);
async fn coordctl_retries_one_task_or_many_by_filter(db: &TestDb) {
    let c = TestCoordinator::start(db, |_| {}).await;
    let mut client = c.client().await;
    let ids = cancelled_tasks(&mut client, NOBODY, 3).await;
    let out = coordctl_async(&c.endpoint(), &["retry", &ids[0]]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("retried {}", ids[0])), "{}", text(&out));
    let out = coordctl_async(&c.endpoint(), &["retry", &ids[0]]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("FailedPrecondition: task"), "{}", text(&out));

    let out = coordctl_async(&c.endpoint(), &["retry"]).await;
    assert_eq!(out.status.code(), Some(2), "no filter is a usage error: {}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--type"), "{}", text(&out));
    let out = coordctl_async(
        &c.endpoint(),
        &[
            "retry",
            "--type",
            NOBODY,
            "--include-cancelled",
            "--since",
            "1h",
            "--until",
            "2999-01-01T00:00:00Z",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out));
    let printed: BTreeSet<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect();
    assert_eq!(printed, ids[1..].iter().cloned().collect(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("retried 2 tasks"), "{}", text(&out));
    c.stop().await.unwrap();
}

on_every_backend!(the_failures_summary_counts_what_failed_by_type_and_error);
async fn the_failures_summary_counts_what_failed_by_type_and_error(db: &TestDb) {
    let c = TestCoordinator::start(db, |_| {}).await;
    let mut client = c.client().await;
    let mut worker = RawWorker::connect(&c.endpoint(), "w1", 1, &["prove", "hash"]).await;
    wait_connected(&client, &["w1"]).await;
    let mut ids = Vec::new();
    for task_type in ["prove", "prove", "hash"] {
        let id = submit_one(&mut client, task_type, 1).await;
        let a = worker.next(Duration::from_secs(10)).await;
        worker.fail(&a.task_id, a.attempt, false).await.unwrap();
        ids.push(id);
    }
    let ok = submit_one(&mut client, "prove", 1).await;
    let a = worker.next(Duration::from_secs(10)).await;
    worker.complete(&ok, a.attempt, b"ok").await.unwrap();

    let f =
        client.get_failure_summary(proto::GetFailureSummaryRequest::default()).await.unwrap().into_inner();
    assert_eq!(f.failed, 3, "{f:?}");
    assert_eq!(f.failed_by_type.get("prove"), Some(&2));
    assert_eq!(f.failed_by_type.get("hash"), Some(&1));
    let top = &f.top_errors[0];
    assert_eq!((top.task_type.as_str(), top.error.as_str(), top.count), ("prove", "boom", 2));
    assert_eq!(top.sample_task_id, ids[1], "the latest task is the sample");
    assert_eq!(f.attempt_outcomes.get("failed"), Some(&3));
    assert_eq!(f.attempt_outcomes.get("completed"), Some(&1));
    let (since, until) = (f.since.unwrap(), f.until.unwrap());
    assert_eq!(until.seconds - since.seconds, 24 * 3600, "the default window is a day");

    let e = client
        .get_failure_summary(proto::GetFailureSummaryRequest { top: 101, ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = client
        .get_failure_summary(proto::GetFailureSummaryRequest {
            since: Some(until),
            until: Some(since),
            top: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    let (code, body) = http(c.http, "GET", "/api/v1/failures?top=1", "").await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["failed"], 3, "{body}");
    assert_eq!(v["top_errors"].as_array().map(Vec::len), Some(1), "{body}");
    let (code, body) =
        http(c.http, "GET", "/api/v1/failures?since=2000-01-01T00:00:00Z&until=2000-01-02T00:00:00Z", "")
            .await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["failed"], 0, "nothing failed then (zero is said, not left out): {body}");
    assert_eq!(v["top_errors"], serde_json::json!([]), "{body}");

    let out = coordctl_async(&c.endpoint(), &["failures", "--since", "1h"]).await;
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("3 tasks failed from "), "{}", text(&out));
    assert!(stdout.contains(&format!("      2  prove             {}  boom", ids[1])), "{}", text(&out));
    c.stop().await.unwrap();
}
