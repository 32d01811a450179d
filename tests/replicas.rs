//! Two coordinators on one Postgres database, in this process: a submission to one replica
//! wakes the other at once (LISTEN/NOTIFY), a watcher on one sees a completion made on the
//! other, a cancel through one reaches a worker streaming from the other, a replica a worker
//! has left never takes that worker's tasks back, and a live worker's id is refused to another
//! host on either replica. The scheduler tick and the watch poll are
//! set to a minute, so only a notification can explain a prompt answer. Postgres only but for
//! the one-replica SQLite forms of the last: without `TEST_DATABASE_URL` the others are
//! reported ignored.

mod common;

use std::time::Duration;

use common::*;
use coordinator::{domain::TaskState, proto};

/// Long enough that the poll tick cannot be what moved the task.
const SLOW_POLL: Duration = Duration::from_secs(60);

async fn pair(
    db: &TestDb,
    tweak: impl Fn(&mut coordinator::config::Config),
) -> (TestCoordinator, TestCoordinator) {
    let a = TestCoordinator::start(db, |c| {
        c.coordinator.id = "replica-a".into();
        c.coordinator.poll_interval = SLOW_POLL;
        tweak(c);
    })
    .await;
    let b = TestCoordinator::start(db, |c| {
        c.coordinator.id = "replica-b".into();
        c.coordinator.poll_interval = SLOW_POLL;
        tweak(c);
    })
    .await;
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
async fn a_submission_to_one_replica_wakes_the_other_and_its_watchers() {
    let db = TestDb::postgres().await.expect("TEST_DATABASE_URL is set");
    let (a, b) = pair(&db, |_| {}).await;
    let mut on_b = RawWorker::connect(&b.endpoint(), "w-b", 1, &["prove"]).await;
    wait_connected(&b.client().await, &["w-b"]).await;
    // Past the first tick of both schedulers.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut client_a = a.client().await;
    for round in 0..3 {
        let started = std::time::Instant::now();
        let id = submit(&mut client_a, "prove", b"x").await;
        let mut watch = client_a
            .watch_task(proto::WatchTaskRequest { task_id: id.clone() })
            .await
            .expect("watch on a")
            .into_inner();
        let got = on_b.next(Duration::from_secs(10)).await;
        assert_eq!(got.task_id, id, "round {round}");
        let pushed = started.elapsed();
        on_b.complete(&got.task_id, got.attempt, b"done").await.expect("complete on b");
        // The watcher on A sees the completion made on B without waiting for its poll.
        let seen = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(ev) = watch.message().await.expect("watch stream") {
                if ev.status == proto::TaskStatus::Completed as i32 {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(seen, Ok(true), "round {round}: watcher on A saw the completion on B");
        println!(
            "round {round}: submit on A -> pushed on B in {pushed:?}; completion seen on A after {:?}",
            started.elapsed()
        );
    }
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    db.cleanup().await;
}

/// The worker's connection moves from replica A to replica B while it runs a task. A later
/// declares its old session DEAD; the task must stay with the worker, uncharged, and its result
/// is accepted through B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
async fn a_replica_the_worker_left_never_takes_its_tasks_back() {
    let db = TestDb::postgres().await.expect("TEST_DATABASE_URL is set");
    let (a, b) = pair(&db, |c| {
        c.coordinator.heartbeat_timeout = Duration::from_millis(500);
        c.coordinator.stale_task_timeout = Duration::from_secs(60);
        c.coordinator.cleanup_interval = Duration::from_millis(200);
    })
    .await;
    let mut on_a = RawWorker::connect(&a.endpoint(), "mover", 1, &["prove"]).await;
    let beats_a = on_a.keep_alive(Duration::from_millis(100));
    wait_connected(&a.client().await, &["mover"]).await;
    let id = submit(&mut a.client().await, "prove", b"x").await;
    let task = on_a.next(Duration::from_secs(70)).await;
    assert_eq!((task.task_id.as_str(), task.attempt), (id.as_str(), 1));
    // The connection moves: A hears nothing more from this worker.
    beats_a.abort();
    on_a.disconnect();
    let mut on_b = RawWorker::connect(&b.endpoint(), "mover", 1, &["prove"]).await;
    let beats = {
        let mut client = on_b.client.clone();
        let (tid, attempt) = (task.task_id.clone(), task.attempt);
        tokio::spawn(async move {
            loop {
                let _ = client
                    .send_heartbeat(proto::HeartbeatRequest {
                        worker_id: "mover".into(),
                        running_tasks: vec![proto::RunningTask { task_id: tid.clone(), attempt }],
                        ..Default::default()
                    })
                    .await;
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        })
    };
    // A declares its old session DEAD after 3x heartbeat_timeout (1.5 s) and its sweeper acts
    // on it at once (or its reconciliation drops the session first): either way, nothing may
    // happen to the task. Four times that is a generous bound for "never".
    let mut client_a = a.client().await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let t = get_task(&mut client_a, &id).await;
    assert_eq!(t.status, proto::TaskStatus::Running as i32, "the task stays with the live worker: {t:?}");
    assert_eq!(t.attempt, 1, "no new attempt: {t:?}");
    let resp = on_b.complete(&task.task_id, task.attempt, b"proof").await.expect("accepted through B");
    assert!(!resp.duplicate);
    beats.abort();
    let stored = db.store.get_task(id.parse().unwrap()).await.unwrap().unwrap();
    assert_eq!((stored.state, stored.failures, stored.attempt), (TaskState::Completed, 0, 1));
    let attempts = db.store.attempts(stored.id).await.unwrap();
    assert_eq!(attempts.len(), 1, "one attempt, never charged: {attempts:?}");
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    db.cleanup().await;
}

/// Two processes on two hosts configured with one worker id: while the first one's session is
/// live, a registration of the id from the second host is refused (ALREADY_EXISTS, naming the
/// first host) on either replica, and the first keeps its task and completes it; once the first
/// is gone, the second registers. A restart on the second's own host registers at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
async fn a_live_workers_id_is_refused_to_another_host() {
    let db = TestDb::postgres().await.expect("TEST_DATABASE_URL is set");
    let (a, b) = pair(&db, quick_liveness).await;
    id_in_use(&a, &b).await;
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    db.cleanup().await;
}

/// [`a_live_workers_id_is_refused_to_another_host`] with one replica on SQLite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_workers_id_is_refused_to_another_host_sqlite() {
    let db = TestDb::sqlite().await;
    let one = TestCoordinator::start(&db, quick_liveness).await;
    id_in_use(&one, &one).await;
    one.stop().await.unwrap();
    db.cleanup().await;
}

fn quick_liveness(c: &mut coordinator::config::Config) {
    c.coordinator.heartbeat_timeout = Duration::from_secs(2);
    c.coordinator.cleanup_interval = Duration::from_millis(200);
}

/// A registration of worker `id` that says it holds nothing, from `host`.
fn register(id: &str, host: &str, instance: &str) -> proto::RegisterWorkerRequest {
    proto::RegisterWorkerRequest {
        worker_id: id.into(),
        max_concurrent_tasks: 1,
        capabilities: vec!["prove".into()],
        hostname: host.into(),
        instance_id: instance.into(),
        ..Default::default()
    }
}

/// Sends `req` until it is not refused as an id in use (ALREADY_EXISTS), for at most `limit`.
async fn register_once_free(client: &mut Client, req: proto::RegisterWorkerRequest, limit: Duration) {
    let deadline = std::time::Instant::now() + limit;
    loop {
        match client.register_worker(req.clone()).await {
            Ok(_) => return,
            Err(s) if s.code() == tonic::Code::AlreadyExists && std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(s) => panic!("{} never registered: {s:?}", req.worker_id),
        }
    }
}

/// A worker row a replica left ACTIVE when it stopped (the worker never deregistered) does not
/// hold the id against a worker of another host once the replica runs again under the same
/// name: the replica knows its own sessions, and has none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_left_active_by_a_restarted_replica_does_not_hold_the_id() {
    let db = TestDb::sqlite().await;
    let before = TestCoordinator::start(&db, quick_liveness).await;
    client(&before.endpoint())
        .await
        .register_worker(register("gone", "gpu-1", "i-1"))
        .await
        .expect("register");
    before.stop().await.unwrap();
    let again = TestCoordinator::start(&db, quick_liveness).await;
    let row = db.store.get_worker(&"gone".into()).await.unwrap().expect("the row is left");
    assert_eq!(row.state, coordinator::domain::WorkerState::Active, "left ACTIVE by the stop");
    client(&again.endpoint())
        .await
        .register_worker(register("gone", "gpu-2", "i-2"))
        .await
        .expect("another host takes the id at once");
    again.stop().await.unwrap();
    db.cleanup().await;
}

/// The worker registers on `a`; another host tries its id on `b`, then on `a`.
async fn id_in_use(a: &TestCoordinator, b: &TestCoordinator) {
    let mut first = client(&a.endpoint()).await;
    first.register_worker(register("dup", "gpu-1", "i-1")).await.expect("the first registers");
    // Heartbeats from the start: the session stays ACTIVE however slow the machine.
    let beat = proto::HeartbeatRequest { worker_id: "dup".into(), ..Default::default() };
    first.send_heartbeat(beat).await.expect("a heartbeat");
    let beats = keep_alive(first.clone(), "dup", Duration::from_millis(100));
    let mut stream = first
        .receive_tasks(proto::ReceiveTasksRequest { worker_id: "dup".into(), ..Default::default() })
        .await
        .expect("open task stream")
        .into_inner();
    wait_connected(&a.client().await, &["dup"]).await;
    let id = submit(&mut a.client().await, "prove", b"x").await;
    let task = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("pushed")
        .expect("stream")
        .expect("an assignment");
    assert_eq!((task.task_id.as_str(), task.attempt), (id.as_str(), 1));

    for replica in [b, a] {
        let refused = client(&replica.endpoint())
            .await
            .register_worker(register("dup", "gpu-2", "i-2"))
            .await
            .expect_err("the id is in use");
        assert_eq!(refused.code(), tonic::Code::AlreadyExists, "{refused:?}");
        assert!(refused.message().contains("gpu-1"), "names the host: {}", refused.message());
    }
    let t = get_task(&mut a.client().await, &id).await;
    assert_eq!(t.attempt, 1, "never taken back: {t:?}");
    let done = first
        .report_completion(proto::ReportCompletionRequest {
            worker_id: "dup".into(),
            task_id: task.task_id.clone(),
            attempt: task.attempt,
            result: b"proof".to_vec(),
            held_ms: 0,
        })
        .await
        .expect("the first completes its task")
        .into_inner();
    assert!(!done.duplicate);

    // The first goes away (no heartbeats, no stream): once it is no longer ACTIVE, the id is
    // free for the second host.
    beats.abort();
    drop(stream);
    let mut second = client(&b.endpoint()).await;
    register_once_free(&mut second, register("dup", "gpu-2", "i-2"), Duration::from_secs(15)).await;
    // Its own restart (a new process on the same host) is not refused.
    second.register_worker(register("dup", "gpu-2", "i-3")).await.expect("a restart on the same host");
}

/// Registers worker `id` on `at` as process i-1 of host gpu-1, opens its task stream and takes
/// the push of a task submitted there: the worker's client, its stream and the task's id.
async fn streaming_with_a_task(
    at: &TestCoordinator,
    id: &str,
) -> (Client, tonic::Streaming<proto::TaskAssignment>, String) {
    let mut worker = client(&at.endpoint()).await;
    worker.register_worker(register(id, "gpu-1", "i-1")).await.expect("the first process registers");
    let mut stream = worker
        .receive_tasks(proto::ReceiveTasksRequest { worker_id: id.into(), ..Default::default() })
        .await
        .expect("open task stream")
        .into_inner();
    wait_connected(&at.client().await, &[id]).await;
    let task_id = submit(&mut at.client().await, "prove", b"x").await;
    let task = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("pushed")
        .expect("stream")
        .expect("an assignment");
    assert_eq!(task.task_id, task_id);
    (worker, stream, task_id)
}

/// Process i-2 of host gpu-1 registers "twin" through `client` and is refused as another live
/// process; the task `task_id` (read through `at`) stays at its first attempt.
async fn refused_as_another_process(client: &mut Client, at: &TestCoordinator, task_id: &str) {
    let refused = client
        .register_worker(register("twin", "gpu-1", "i-2"))
        .await
        .expect_err("another process streams under the id");
    assert_eq!(refused.code(), tonic::Code::AlreadyExists, "{refused:?}");
    assert!(refused.message().contains("another live process on host gpu-1"), "{}", refused.message());
    let t = get_task(&mut at.client().await, task_id).await;
    assert_eq!((t.attempt, t.status()), (1, proto::TaskStatus::Assigned), "not taken back: {t:?}");
}

/// Two processes on one host under one id: while the first has its task stream open on this
/// replica, a registration naming another process is refused (ALREADY_EXISTS) and the first
/// keeps its task; the first process registering again (a reconnect) is not. Once the first's
/// stream closes (its process exited), the second registers at once: a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_on_the_same_host_is_refused_while_the_first_streams() {
    let db = TestDb::sqlite().await;
    let one = TestCoordinator::start(&db, quick_liveness).await;
    let (mut first, stream, id) = streaming_with_a_task(&one, "twin").await;
    let mut second = client(&one.endpoint()).await;
    refused_as_another_process(&mut second, &one, &id).await;

    // The first process registers again (a reconnect), listing its task: kept, not refused.
    let mut again = register("twin", "gpu-1", "i-1");
    again.running_tasks = vec![proto::RunningTask { task_id: id.clone(), attempt: 1 }];
    first.register_worker(again).await.expect("the first process's reconnect");
    let t = get_task(&mut one.client().await, &id).await;
    assert_eq!(t.attempt, 1, "kept: {t:?}");
    drop(stream);
    let stream = first
        .receive_tasks(proto::ReceiveTasksRequest { worker_id: "twin".into(), ..Default::default() })
        .await
        .expect("the reconnect's task stream")
        .into_inner();
    wait_connected(&one.client().await, &["twin"]).await;
    let refused =
        second.register_worker(register("twin", "gpu-1", "i-2")).await.expect_err("still streaming");
    assert_eq!(refused.code(), tonic::Code::AlreadyExists, "{refused:?}");

    // The first process exits (its connection closes): the second's registration is a restart.
    drop(stream);
    drop(first);
    register_once_free(&mut second, register("twin", "gpu-1", "i-2"), Duration::from_secs(10)).await;
    one.stop().await.unwrap();
    db.cleanup().await;
}

/// A heartbeat keeps a worker's session alive only from the process that opened it: once
/// another process has registered under the id (the first had no stream open: a restart), the
/// first's heartbeats are answered NOT_FOUND, and the session goes SUSPECT when the second goes
/// quiet however long the first keeps sending. A heartbeat that names no process is taken as
/// before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_process_that_opened_a_session_keeps_it_alive() {
    let db = TestDb::sqlite().await;
    let one = TestCoordinator::start(&db, quick_liveness).await;
    let beat = |instance: &str| proto::HeartbeatRequest {
        worker_id: "twin".into(),
        instance_id: instance.into(),
        ..Default::default()
    };
    let mut first = client(&one.endpoint()).await;
    first.register_worker(register("twin", "gpu-1", "i-1")).await.expect("the first registers");
    first.send_heartbeat(beat("i-1")).await.expect("the session's own process");
    let mut second = client(&one.endpoint()).await;
    second.register_worker(register("twin", "gpu-1", "i-2")).await.expect("a restart");

    let refused = first.send_heartbeat(beat("i-1")).await.expect_err("another process's session");
    assert_eq!(refused.code(), tonic::Code::NotFound, "{refused:?}");
    assert!(refused.message().contains("another process"), "{}", refused.message());
    second.send_heartbeat(beat("i-2")).await.expect("the session's own process");
    first.send_heartbeat(beat("")).await.expect("naming no process: not checked");

    // The second goes quiet while the first keeps sending.
    let stale = tokio::spawn(async move {
        loop {
            let _ = first.send_heartbeat(beat("i-1")).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    wait_until("the session goes SUSPECT", Duration::from_secs(10), || async {
        worker_state(&mut one.client().await, "twin").await == proto::WorkerState::Suspect
    })
    .await;
    stale.abort();
    one.stop().await.unwrap();
    db.cleanup().await;
}

/// Only the process that opened a worker's session opens its task stream or drains it: a
/// second process under the id, refused at registration, that opens the stream or deregisters
/// anyway (naming itself) is answered NOT_FOUND, and the first keeps its stream, its ACTIVE
/// state and its next task. The first process's own Deregister drains the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_process_that_opened_a_session_streams_or_drains_it() {
    let db = TestDb::sqlite().await;
    let one = TestCoordinator::start(&db, quick_liveness).await;
    let (mut first, mut stream, held) = streaming_with_a_task(&one, "twin").await;
    let beats = keep_alive(first.clone(), "twin", Duration::from_millis(100));
    let mut second = client(&one.endpoint()).await;
    let refused =
        second.register_worker(register("twin", "gpu-1", "i-2")).await.expect_err("the first streams");
    assert_eq!(refused.code(), tonic::Code::AlreadyExists, "{refused:?}");

    let named = |instance: &str| proto::ReceiveTasksRequest {
        worker_id: "twin".into(),
        instance_id: instance.into(),
    };
    let refused = second.receive_tasks(named("i-2")).await.expect_err("another process's stream");
    assert_eq!(refused.code(), tonic::Code::NotFound, "{refused:?}");
    assert!(refused.message().contains("another process"), "{}", refused.message());
    let drain = |instance: &str| proto::DeregisterRequest {
        worker_id: "twin".into(),
        reason: "exit".into(),
        instance_id: instance.into(),
    };
    let refused = second.deregister(drain("i-2")).await.expect_err("another process's session");
    assert_eq!(refused.code(), tonic::Code::NotFound, "{refused:?}");
    assert_eq!(worker_state(&mut one.client().await, "twin").await, proto::WorkerState::Active);

    // The first's stream is still the one tasks go down: its slot, once free, takes the next.
    first
        .report_completion(proto::ReportCompletionRequest {
            worker_id: "twin".into(),
            task_id: held,
            attempt: 1,
            result: b"proof".to_vec(),
            held_ms: 0,
        })
        .await
        .expect("the first completes its task");
    let next = submit(&mut one.client().await, "prove", b"y").await;
    let task = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("pushed")
        .expect("stream")
        .expect("an assignment, not the stream's end");
    assert_eq!(task.task_id, next);

    first.deregister(drain("i-1")).await.expect("the session's own process drains it");
    assert_eq!(worker_state(&mut one.client().await, "twin").await, proto::WorkerState::Draining);
    beats.abort();
    drop(stream);
    one.stop().await.unwrap();
    db.cleanup().await;
}

/// Two processes on one host under one id, connected to different replicas: while the first
/// streams from replica A, the second's registration at B is refused (ALREADY_EXISTS) and the
/// first keeps its task. The first moving to B (a reconnect of the same process, as connection
/// ageing does) is not refused, and the second is then refused at A. Once the first's process
/// exits (its stream closes), the second registers: a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
async fn a_second_process_on_the_other_replica_is_refused_while_the_first_streams() {
    let db = TestDb::postgres().await.expect("TEST_DATABASE_URL is set");
    let (a, b) = pair(&db, |_| {}).await;
    let (_, stream, id) = streaming_with_a_task(&a, "twin").await;
    let mut second = client(&b.endpoint()).await;
    refused_as_another_process(&mut second, &a, &id).await;

    // The first process moves to B, listing its task: kept, not refused.
    let mut first = client(&b.endpoint()).await;
    let mut again = register("twin", "gpu-1", "i-1");
    again.running_tasks = vec![proto::RunningTask { task_id: id.clone(), attempt: 1 }];
    first.register_worker(again).await.expect("the first process's reconnect to B");
    drop(stream);
    let stream = first
        .receive_tasks(proto::ReceiveTasksRequest { worker_id: "twin".into(), ..Default::default() })
        .await
        .expect("the task stream from B")
        .into_inner();
    wait_connected(&b.client().await, &["twin"]).await;
    let refused = client(&a.endpoint())
        .await
        .register_worker(register("twin", "gpu-1", "i-2"))
        .await
        .expect_err("the first streams from B");
    assert_eq!(refused.code(), tonic::Code::AlreadyExists, "{refused:?}");
    let t = get_task(&mut a.client().await, &id).await;
    assert_eq!((t.attempt, t.status()), (1, proto::TaskStatus::Assigned), "still not taken back: {t:?}");

    // The first process exits: its connection closes, and the second's registration at A is
    // a restart.
    drop(stream);
    drop(first);
    let mut second = client(&a.endpoint()).await;
    register_once_free(&mut second, register("twin", "gpu-1", "i-2"), Duration::from_secs(10)).await;
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    db.cleanup().await;
}

/// Waits until replica `at` lists worker `id` as connected to another replica, or not.
async fn connected_elsewhere(at: &TestCoordinator, id: &str, want: bool) {
    let client = at.client().await;
    wait_until(&format!("{id} connected elsewhere: {want}"), Duration::from_secs(10), || {
        let mut client = client.clone();
        async move {
            let Ok(resp) = client.list_workers(proto::ListWorkersRequest::default()).await else {
                return false;
            };
            resp.into_inner().workers.iter().any(|w| w.worker_id == id && w.connected_elsewhere == want)
        }
    })
    .await;
}

/// A process that opens its task stream again without registering again (its stream closed,
/// its session lives on) is connected again in the database: the other replica lists it so and
/// refuses a second process under the id, as it did before the stream closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
async fn a_stream_opened_again_without_registering_still_holds_the_id() {
    let db = TestDb::postgres().await.expect("TEST_DATABASE_URL is set");
    let (a, b) = pair(&db, |_| {}).await;
    let (first, stream, id) = streaming_with_a_task(&a, "twin").await;
    let beats = keep_alive(first.clone(), "twin", Duration::from_millis(100));
    connected_elsewhere(&b, "twin", true).await;
    drop(stream);
    connected_elsewhere(&b, "twin", false).await;

    let stream = first
        .clone()
        .receive_tasks(proto::ReceiveTasksRequest { worker_id: "twin".into(), instance_id: "i-1".into() })
        .await
        .expect("the same session's stream, opened again")
        .into_inner();
    connected_elsewhere(&b, "twin", true).await;
    let mut second = client(&b.endpoint()).await;
    refused_as_another_process(&mut second, &a, &id).await;
    beats.abort();
    drop(stream);
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    db.cleanup().await;
}

/// A replica killed while a worker's process was connected to it leaves the worker's row saying
/// so; once the replica runs again under its name, that row no longer holds the id: the
/// worker's restarted process registers on the other replica at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
async fn a_restarted_replica_clears_the_connections_its_killed_process_left() {
    let db = TestDb::postgres().await.expect("TEST_DATABASE_URL is set");
    let (a, b) = pair(&db, quick_liveness).await;
    client(&a.endpoint())
        .await
        .register_worker(register("twin", "gpu-1", "i-1"))
        .await
        .expect("registers on A");
    a.stop().await.unwrap();
    // What a kill -9 of A leaves instead of a clean stop: the row still says connected, and A's
    // row was refreshed a moment ago.
    let coordinator::store::Store::Postgres(pg) = &db.store else { unreachable!() };
    sqlx::query("UPDATE workers SET connected = true WHERE id = 'twin'").execute(pg.pool()).await.unwrap();
    db.store.touch_coordinator("replica-a", "killed").await.unwrap();
    let again = TestCoordinator::start(&db, |c| {
        c.coordinator.id = "replica-a".into();
        quick_liveness(c);
    })
    .await;
    assert!(!db.store.get_worker(&"twin".into()).await.unwrap().expect("the row").connected);
    client(&b.endpoint())
        .await
        .register_worker(register("twin", "gpu-1", "i-2"))
        .await
        .expect("the restarted worker registers on B at once");
    again.stop().await.unwrap();
    b.stop().await.unwrap();
    db.cleanup().await;
}

/// A worker that moves to the other replica (as connection ageing makes it) stops counting on
/// the replica it left at once: its registration there is announced, and the replica it left
/// drops its older session without waiting for a reconciliation (every `heartbeat_timeout`,
/// 30 s here) or for that session to go SUSPECT. The task it holds stays its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
async fn a_worker_that_moved_stops_counting_on_the_replica_it_left() {
    let db = TestDb::postgres().await.expect("TEST_DATABASE_URL is set");
    let (a, b) = pair(&db, |_| {}).await;
    let total = |addr: std::net::SocketAddr| async move {
        let (code, body) = http_get(addr, "/health").await.expect("health answers");
        assert_eq!(code, 200, "{body}");
        let health: serde_json::Value = serde_json::from_str(&body).unwrap();
        health["workers"]["total"].as_u64().expect("a count")
    };
    let (_, stream, id) = streaming_with_a_task(&a, "mover").await;
    assert_eq!((total(a.http).await, total(b.http).await), (1, 0));

    // The same process moves to B, listing its task.
    let mut on_b = client(&b.endpoint()).await;
    let mut again = register("mover", "gpu-1", "i-1");
    again.running_tasks = vec![proto::RunningTask { task_id: id.clone(), attempt: 1 }];
    on_b.register_worker(again).await.expect("registers on B");
    drop(stream);
    let _stream = on_b
        .receive_tasks(proto::ReceiveTasksRequest { worker_id: "mover".into(), ..Default::default() })
        .await;
    wait_connected(&b.client().await, &["mover"]).await;
    let left = std::time::Instant::now();
    wait_until("replica A stops counting the worker", Duration::from_secs(5), || async move {
        total(a.http).await == 0
    })
    .await;
    eprintln!("replica A dropped the moved worker's session {:?} after B had it", left.elapsed());
    assert_eq!(total(b.http).await, 1);
    let t = get_task(&mut b.client().await, &id).await;
    assert_eq!(t.attempt, 1, "the task stays the worker's: {t:?}");
    assert!(matches!(t.status(), proto::TaskStatus::Assigned | proto::TaskStatus::Running), "{t:?}");
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    db.cleanup().await;
}

/// Runs a task pushed by replica A and reported through replica B after `runs`, the report
/// saying how long the worker held the attempt when `say_held`; returns how long the worker held
/// it and what the task and attempt rows measure, in ms.
async fn reported_through_the_other_replica(
    runs: Duration,
    say_held: bool,
) -> (u64, [(&'static str, i64); 2]) {
    let db = TestDb::postgres().await.expect("TEST_DATABASE_URL is set");
    let (a, b) = pair(&db, |_| {}).await;
    let mut w = RawWorker::connect(&a.endpoint(), "w-ab", 1, &["prove"]).await;
    wait_connected(&a.client().await, &["w-ab"]).await;
    let id = submit(&mut a.client().await, "prove", b"x").await;
    let got = w.next(Duration::from_secs(10)).await;
    assert_eq!(got.task_id, id);
    let received = std::time::Instant::now();
    tokio::time::sleep(runs).await;
    w.client = b.client().await;
    let held_ms = received.elapsed().as_millis() as u64;
    let said = if say_held { held_ms } else { 0 };
    w.complete_held(&got.task_id, got.attempt, b"done", said).await.expect("complete through b");
    let tid = id.parse().unwrap();
    let task = db.store.get_task(tid).await.unwrap().expect("task exists");
    assert_eq!(task.state, TaskState::Completed);
    let attempt = db.store.attempts(tid).await.unwrap().pop().expect("an attempt");
    let ms = |started: Option<chrono::DateTime<chrono::Utc>>,
              finished: Option<chrono::DateTime<chrono::Utc>>| {
        (finished.expect("finished_at") - started.expect("started_at")).num_milliseconds()
    };
    let rows = [
        ("task", ms(task.started_at, task.finished_at)),
        ("attempt", ms(attempt.started_at, attempt.finished_at)),
    ];
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    db.cleanup().await;
    (held_ms, rows)
}

/// A task pushed by replica A and reported through replica B lasts from its delivery by A to
/// its report on B: one clock (the database's) for both ends, and B does not restart it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
async fn a_task_reported_through_the_other_replica_lasts_from_its_delivery() {
    let (_, rows) = reported_through_the_other_replica(Duration::from_millis(700), false).await;
    for (row, ms) in rows {
        assert!((700..900).contains(&ms), "the {row} row of a 700 ms task measures {ms} ms");
    }
}

/// A short task reported through replica B before replica A (which delivered it) has written
/// its running mark: B has no record of the delivery, so the attempt's start comes from the
/// worker's word (`held_ms`), not from the report's arrival (which measured 0 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
async fn a_short_task_reported_through_the_other_replica_before_its_mark_lasts_what_the_worker_held_it() {
    let (held_ms, rows) = reported_through_the_other_replica(Duration::from_millis(60), true).await;
    let low = held_ms as i64;
    for (row, ms) in rows {
        assert!((low..low + 200).contains(&ms), "the {row} row of a task held {held_ms} ms measures {ms} ms");
    }
}

/// A second replica given the name of one that runs refuses to start, with a line that says so;
/// the running one keeps its row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
async fn a_second_replica_of_a_running_one_s_name_refuses_to_start() {
    let db = TestDb::postgres().await.expect("TEST_DATABASE_URL is set");
    let named = |c: &mut coordinator::config::Config| {
        c.coordinator.id = "twin".into();
        c.coordinator.heartbeat_timeout = Duration::from_secs(1);
        c.coordinator.stale_task_timeout = Duration::from_secs(5);
    };
    let a = TestCoordinator::start(&db, named).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while db.store.coordinator_row("twin").await.unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "replica a never wrote its row");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let held_by = db.store.coordinator_row("twin").await.unwrap().unwrap().instance;

    let mut config = test_config(&db.url);
    named(&mut config);
    let app = coordinator::app::App::connect(config).await.expect("connects");
    let [grpc, http] = free_ports();
    let grpc = tokio::net::TcpListener::bind(("127.0.0.1", grpc)).await.unwrap();
    let http = tokio::net::TcpListener::bind(("127.0.0.1", http)).await.unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let served = tokio::time::timeout(Duration::from_secs(10), app.serve(grpc, http, shutdown.clone()))
        .await
        .expect("refused within the wait");
    shutdown.cancel();
    let e = served.expect_err("a second replica named twin must not serve");
    let line = format!("{e:#}");
    assert!(line.contains("coordinator.id \"twin\" is in use by another running replica"), "{line}");
    assert!(!line.contains('\n'), "one line: {line}");
    assert_eq!(db.store.coordinator_row("twin").await.unwrap().unwrap().instance, held_by);
    a.stop().await.unwrap();
    db.cleanup().await;
}

/// A cancel made through the replica a worker is not connected to reaches that worker at once,
/// on its stream, and frees its slot there: the cancelling replica announces the attempt it
/// ended, and the worker's replica pushes the `CANCEL`. Without it the worker would hear of it
/// only when its lease came due for renewal (minutes: the lease here is 5 minutes, and this
/// worker sends no heartbeats), and run a cancelled task, holding its slot, until then. Both
/// cancels (a task's, a job's) take this path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
async fn a_cancel_through_the_other_replica_reaches_the_worker_at_once() {
    let db = TestDb::postgres().await.expect("TEST_DATABASE_URL is set");
    let (a, b) = pair(&db, |c| c.coordinator.stale_task_timeout = Duration::from_secs(300)).await;
    let mut w = RawWorker::connect(&a.endpoint(), "w-cancel", 1, &["prove"]).await;
    wait_connected(&a.client().await, &["w-cancel"]).await;
    let mut through_b = b.client().await;
    let cancelled = |msg: &proto::TaskAssignment, id: &str, attempt: u32| {
        assert_eq!(msg.kind, proto::AssignmentKind::Cancel as i32, "{msg:?}");
        assert_eq!((msg.task_id.as_str(), msg.attempt), (id, attempt));
    };

    let id = submit(&mut through_b, "prove", b"x").await;
    let got = w.next(Duration::from_secs(10)).await;
    assert_eq!(got.task_id, id);
    let r = through_b
        .cancel_task(proto::CancelTaskRequest { task_id: id.clone(), reason: "not needed".into() })
        .await
        .expect("cancel through b")
        .into_inner();
    assert!(r.cancelled);
    cancelled(&w.next(Duration::from_secs(5)).await, &id, got.attempt);

    // Its slot on A is free again: the next task is pushed (A's poll tick is a minute away).
    let job = through_b
        .submit_job(proto::SubmitJobRequest {
            name: "cancelled-job".into(),
            tasks: vec![proto::SubmitTaskRequest {
                task_type: "prove".into(),
                payload: b"y".to_vec(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .expect("submit a job through b")
        .into_inner();
    let next = w.next(Duration::from_secs(5)).await;
    assert_eq!(next.task_id, job.task_ids[0], "the freed slot took the next task");
    let r = through_b
        .cancel_job(proto::CancelJobRequest { job_id: job.job_id.clone(), reason: String::new() })
        .await
        .expect("cancel the job through b")
        .into_inner();
    assert_eq!(r.cancelled, 1);
    cancelled(&w.next(Duration::from_secs(5)).await, &next.task_id, next.attempt);
    let e = w.complete(&next.task_id, next.attempt, b"too late").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert_eq!(task_status(&mut through_b, &next.task_id).await, proto::TaskStatus::Cancelled);
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    db.cleanup().await;
}

/// An attempt another replica's sweeper takes back (here: past its deadline) is announced like
/// a cancel: the replica the worker streams from pushes the `CANCEL` at once, not after two
/// slot comparisons (a minute apart here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
async fn an_attempt_the_other_replica_takes_back_is_cancelled_on_the_worker_at_once() {
    let db = TestDb::postgres().await.expect("TEST_DATABASE_URL is set");
    let a = TestCoordinator::start(&db, |c| {
        c.coordinator.id = "replica-a".into();
        c.coordinator.poll_interval = SLOW_POLL;
        c.coordinator.heartbeat_timeout = Duration::from_secs(30);
        c.coordinator.cleanup_interval = Duration::from_secs(3600);
    })
    .await;
    let b = TestCoordinator::start(&db, |c| {
        c.coordinator.id = "replica-b".into();
        c.coordinator.poll_interval = SLOW_POLL;
        c.coordinator.heartbeat_timeout = Duration::from_secs(1);
        c.coordinator.cleanup_interval = Duration::from_millis(100);
    })
    .await;
    let mut w = RawWorker::connect(&a.endpoint(), "w-late", 1, &["prove"]).await;
    wait_connected(&a.client().await, &["w-late"]).await;
    let id = submit_with_timeout(&mut a.client().await, "prove", 200).await;
    let got = w.next(Duration::from_secs(10)).await;
    assert_eq!((got.task_id.as_str(), got.attempt), (id.as_str(), 1));
    // B's sweeper takes it back 1 s past its deadline; A's would not for an hour.
    let stop = w.next(Duration::from_secs(6)).await;
    assert_eq!(stop.kind, proto::AssignmentKind::Cancel as i32, "{stop:?}");
    assert_eq!((stop.task_id.as_str(), stop.attempt), (id.as_str(), 1));
    let t = get_task(&mut b.client().await, &id).await;
    assert!(t.attempt >= 1 && t.failures == 1, "taken back, charged: {t:?}");
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    db.cleanup().await;
}
