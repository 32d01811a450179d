//! Recurring schedules over the wire: created, listed, paused, resumed and deleted through gRPC,
//! REST and coordctl; each occurrence reaches a worker as a task; bad expressions, zones,
//! templates and names are refused; and on two replicas each occurrence of a schedule firing
//! every second is created exactly once (read from the database).

#[macro_use]
mod common;

use std::time::Duration;

use common::*;
use coordinator::{proto, store::Store};
use tonic::Code;

const T: Duration = Duration::from_secs(10);

fn every_second(name: &str) -> proto::CreateScheduleRequest {
    proto::CreateScheduleRequest {
        name: name.into(),
        cron: "* * * * * *".into(),
        timezone: "UTC".into(),
        task: Some(proto::SubmitTaskRequest {
            task_type: "prove".into(),
            payload: b"tick".to_vec(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

on_every_backend!(a_schedule_sends_a_task_at_each_occurrence_until_paused);
async fn a_schedule_sends_a_task_at_each_occurrence_until_paused(db: &TestDb) {
    let c = TestCoordinator::start(db, |_| {}).await;
    let mut client = c.client().await;
    let mut w = RawWorker::connect(&c.endpoint(), "sched-w", 4, &["prove"]).await;
    wait_connected(&client, &["sched-w"]).await;
    let s = client.create_schedule(every_second("ticks")).await.unwrap().into_inner();
    assert_eq!((s.name.as_str(), s.paused, s.runs), ("ticks", false, 0));
    assert!(s.next_run_at.is_some());
    let prefix = format!("schedule:{}:", s.schedule_id);
    let mut seen = Vec::new();
    for _ in 0..2 {
        let a = w.next(T).await;
        let task = client
            .get_task(proto::GetTaskRequest { task_id: a.task_id.clone(), ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        assert!(task.idempotency_key.starts_with(&prefix), "{}", task.idempotency_key);
        assert_eq!(a.payload, b"tick");
        w.complete(&a.task_id, a.attempt, b"ok").await.unwrap();
        seen.push(task.idempotency_key);
    }
    assert_ne!(seen[0], seen[1], "two occurrences");

    let paused = client
        .pause_schedule(proto::PauseScheduleRequest { schedule_id: s.schedule_id.clone(), paused: true })
        .await
        .unwrap()
        .into_inner();
    assert!(paused.paused);
    let listed = client.list_schedules(proto::ListSchedulesRequest {}).await.unwrap().into_inner().schedules;
    assert_eq!(listed.len(), 1);
    assert!(listed[0].runs >= 2 && listed[0].last_run_at.is_some(), "{listed:?}");
    let resumed = client
        .pause_schedule(proto::PauseScheduleRequest { schedule_id: s.schedule_id.clone(), paused: false })
        .await
        .unwrap()
        .into_inner();
    assert!(!resumed.paused);
    client
        .delete_schedule(proto::DeleteScheduleRequest { schedule_id: s.schedule_id.clone() })
        .await
        .unwrap();
    let err = client
        .delete_schedule(proto::DeleteScheduleRequest { schedule_id: s.schedule_id.clone() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    c.stop().await.unwrap();
}

on_every_backend!(bad_schedules_are_refused_naming_the_field);
async fn bad_schedules_are_refused_naming_the_field(db: &TestDb) {
    let c = TestCoordinator::start(db, |_| {}).await;
    let mut client = c.client().await;
    client.create_schedule(every_second("taken")).await.unwrap();
    let with = |f: &dyn Fn(&mut proto::CreateScheduleRequest)| {
        let mut r = every_second("other");
        f(&mut r);
        r
    };
    for (req, code, field) in [
        (with(&|r| r.cron = "every second".into()), Code::InvalidArgument, "cron"),
        (with(&|r| r.timezone = "Mars/Olympus".into()), Code::InvalidArgument, "timezone"),
        (with(&|r| r.name = String::new()), Code::InvalidArgument, "name"),
        (with(&|r| r.task = None), Code::InvalidArgument, "task"),
        (with(&|r| r.task.as_mut().unwrap().idempotency_key = "k".into()), Code::InvalidArgument, "task"),
        (
            with(&|r| r.task.as_mut().unwrap().task_type = String::new()),
            Code::InvalidArgument,
            "task.task_type",
        ),
        (with(&|r| r.missed = 99), Code::InvalidArgument, "missed"),
        (every_second("taken"), Code::AlreadyExists, "a schedule named"),
    ] {
        let err = client.create_schedule(req).await.unwrap_err();
        assert_eq!(err.code(), code, "{err:?}");
        assert!(err.message().starts_with(field), "{field}: {}", err.message());
    }
    let err = client
        .pause_schedule(proto::PauseScheduleRequest { schedule_id: "nope".into(), paused: true })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    c.stop().await.unwrap();
}

on_every_backend!(schedules_over_rest_and_coordctl);
async fn schedules_over_rest_and_coordctl(db: &TestDb) {
    let c = TestCoordinator::start(db, |_| {}).await;
    let body = r#"{"name":"hourly","cron":"0 * * * *","timezone":"Europe/Berlin",
                   "task":{"task_type":"report","payload":"aGk="},"missed":"MISSED_RUNS_SKIP"}"#;
    let (code, created) = http_request(c.http, "POST", "/api/v1/schedules", body).await.unwrap();
    assert_eq!(code, 201, "{created}");
    let created: serde_json::Value = serde_json::from_str(&created).unwrap();
    let id = created["schedule_id"].as_str().unwrap().to_owned();
    assert_eq!(created["missed"], "MISSED_RUNS_SKIP");
    let (code, listed) = http_get(c.http, "/api/v1/schedules").await.unwrap();
    assert_eq!(code, 200, "{listed}");
    assert!(listed.contains("\"hourly\""), "{listed}");
    let (code, paused) =
        http_request(c.http, "POST", &format!("/api/v1/schedules/{id}/pause"), "").await.unwrap();
    assert_eq!(code, 200, "{paused}");
    assert!(paused.contains("\"paused\":true"), "{paused}");

    let out = coordctl_async(
        &c.endpoint(),
        &[
            "schedule",
            "create",
            "--name",
            "nightly",
            "--cron",
            "30 2 * * *",
            "--timezone",
            "UTC",
            "--type",
            "report",
        ],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let out = coordctl_async(&c.endpoint(), &["schedule", "list"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("nightly") && text.contains("hourly"), "{text}");
    assert!(text.contains("paused") && text.contains("active"), "{text}");
    assert!(
        text.lines().next().is_some_and(|h| h.starts_with("SCHEDULE") && h.contains("NEXT RUN")),
        "{text}"
    );
    let paused_row = text.lines().find(|l| l.contains("hourly")).unwrap();
    let timestamp = |c: &str| c.len() == 24 && c.ends_with('Z') && c.contains('T');
    assert!(
        paused_row.contains("paused") && !paused_row.split_whitespace().any(timestamp),
        "no next run while paused: {text}"
    );
    let active_row = text.lines().find(|l| l.contains("nightly")).unwrap();
    assert!(active_row.split_whitespace().any(timestamp), "{text}");
    // --json lists are one array, as every other list's (and `[]` when empty).
    let out = coordctl_async(&c.endpoint(), &["--json", "schedule", "list"]).await;
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON array");
    assert_eq!(listed.as_array().map(Vec::len), Some(2), "{listed}");
    let out = coordctl_async(&c.endpoint(), &["--json", "limits", "list"]).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]", "{out:?}");
    let out = coordctl_async(&c.endpoint(), &["schedule", "delete", &id]).await;
    assert!(out.status.success(), "{out:?}");
    let (code, _) = http_request(c.http, "DELETE", &format!("/api/v1/schedules/{id}"), "").await.unwrap();
    assert_eq!(code, 404);
    c.stop().await.unwrap();
}

/// Two replicas fire one schedule every second until six occurrences exist; the database holds one
/// task per occurrence, with no second and no gap, and the schedule counts as many runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
async fn two_replicas_create_each_occurrence_exactly_once() {
    let db = TestDb::postgres().await.expect("TEST_DATABASE_URL is set");
    let a = TestCoordinator::start(&db, |c| c.coordinator.id = "sched-a".into()).await;
    let b = TestCoordinator::start(&db, |c| c.coordinator.id = "sched-b".into()).await;
    let mut client = a.client().await;
    let s = client.create_schedule(every_second("both")).await.unwrap().into_inner();
    let Store::Postgres(pg) = &db.store else { unreachable!() };
    let keys = || async {
        sqlx::query_scalar::<_, String>(
            "SELECT idempotency_key FROM tasks WHERE idempotency_key LIKE $1 ORDER BY idempotency_key",
        )
        .bind(format!("schedule:{}:%", s.schedule_id))
        .fetch_all(pg.pool())
        .await
        .unwrap()
    };
    wait_until("six occurrences fired", Duration::from_secs(30), || async { keys().await.len() >= 6 }).await;
    client
        .pause_schedule(proto::PauseScheduleRequest { schedule_id: s.schedule_id.clone(), paused: true })
        .await
        .unwrap();
    let keys = keys().await;
    let micros: Vec<i64> = keys.iter().map(|k| k.rsplit(':').next().unwrap().parse().unwrap()).collect();
    assert!(micros.len() >= 6, "{keys:?}");
    for pair in micros.windows(2) {
        assert_eq!(pair[1] - pair[0], 1_000_000, "one task per second, none twice, none missing: {keys:?}");
    }
    let runs: i64 = sqlx::query_scalar("SELECT runs FROM schedules WHERE id = $1::uuid")
        .bind(&s.schedule_id)
        .fetch_one(pg.pool())
        .await
        .unwrap();
    assert_eq!(runs as usize, micros.len(), "the schedule counts each occurrence once");
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    db.cleanup().await;
}
