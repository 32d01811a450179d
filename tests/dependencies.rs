//! Task dependencies in the store, on both backends: a task naming parents is blocked until
//! every parent completed, its assignment carries their results in order, a parent that fails
//! for good or is cancelled ends its dependents by their policy, unknown parents are refused,
//! and a fan-in of 10,000 parents releases its child exactly once, also with two replicas'
//! stores completing parents at the same time.

#[macro_use]
mod common;

use std::{collections::HashMap, time::Duration};

use common::*;
use coordinator::{
    domain::{Assignment, Candidate, NewTask, ParentFailure, TaskId, TaskState, WorkerId},
    store::{Completion, Failure, Held, RetryPolicy, Settled, Store, StoreError, TypeFilter},
};
use tokio::sync::mpsc::UnboundedReceiver;

const LEASE: Duration = Duration::from_secs(600);

fn task(task_type: &str) -> NewTask {
    coordinator::store::testing::new_task(task_type)
}

fn child(task_type: &str, parents: &[TaskId], policy: ParentFailure) -> NewTask {
    NewTask { depends_on: parents.to_vec(), on_parent_failure: policy, ..task(task_type) }
}

async fn state(s: &Store, id: TaskId) -> TaskState {
    s.get_task(id).await.unwrap().expect("task exists").state
}

/// Claims the runnable tasks among `ids` for worker `w`.
async fn claim(s: &Store, ids: &[TaskId], w: &str) -> Vec<Assignment> {
    let (ids, w) = (ids.to_vec(), WorkerId::from(w));
    s.claim(10_000, &TypeFilter::Any, LEASE, move |c: &[Candidate]| {
        c.iter().filter(|c| ids.contains(&c.id)).map(|c| (c.id, w.clone())).collect()
    })
    .await
    .expect("claim")
}

fn held(a: &Assignment) -> Held {
    Held { task_id: a.task_id, worker_id: a.worker_id.clone(), attempt: a.attempt }
}

async fn complete(s: &Store, a: &Assignment, result: &[u8]) {
    let c = Completion { held: held(a), result: result.to_vec(), delivered: None };
    s.complete(&[c]).await.expect("complete");
}

/// Everything announced so far.
fn drain(rx: &mut UnboundedReceiver<Settled>) -> Settled {
    let mut all = Settled::default();
    while let Ok(s) = rx.try_recv() {
        all.released.extend(s.released);
        all.ended.extend(s.ended);
    }
    all
}

// ---------------------------------------------------------------------------------------------

on_every_backend!(a_three_stage_pipeline_runs_each_stage_on_its_parents_results);
/// 8 chunks -> 2 batches (4 chunks each) -> 1 bundle, submitted at once.
async fn a_three_stage_pipeline_runs_each_stage_on_its_parents_results(db: &TestDb) {
    let s = &db.store;
    let mut settled = s.settled();
    let chunks: Vec<NewTask> = (0..8).map(|_| task("chunk")).collect();
    let c: Vec<TaskId> = chunks.iter().map(|t| t.id).collect();
    let batches =
        [child("batch", &c[..4], ParentFailure::Fail), child("batch", &c[4..], ParentFailure::Fail)];
    let b = [batches[0].id, batches[1].id];
    let bundle = child("bundle", &b, ParentFailure::Fail);
    let mut all = chunks.clone();
    all.extend(batches.iter().cloned());
    all.push(bundle.clone());
    let created = s.create_tasks(&all).await.unwrap();
    let states: Vec<TaskState> = created.iter().map(|c| c.task.state).collect();
    assert_eq!(&states[..8], &[TaskState::Pending; 8]);
    assert_eq!(&states[8..], &[TaskState::Blocked; 3], "what waits is blocked");

    // Only the chunks are runnable.
    let everything: Vec<TaskId> = all.iter().map(|t| t.id).collect();
    let mut got = claim(s, &everything, "w1").await;
    got.sort_by_key(|a| a.task_id);
    assert_eq!(got.iter().map(|a| a.task_id).collect::<Vec<_>>(), c);
    assert!(got.iter().all(|a| a.parents.is_empty()), "a chunk has no parents");

    // Completing three of the first four chunks releases nothing.
    for (i, a) in got.iter().enumerate().take(3) {
        complete(s, a, format!("chunk {i}").as_bytes()).await;
    }
    assert_eq!(state(s, b[0]).await, TaskState::Blocked);
    assert!(claim(s, &everything, "w1").await.is_empty(), "nothing else is runnable yet");
    // The fourth does; the later chunks release the second batch, in any order.
    for i in [3, 7, 5, 4, 6] {
        complete(s, &got[i], format!("chunk {i}").as_bytes()).await;
    }
    assert_eq!(state(s, b[0]).await, TaskState::Pending);
    assert_eq!(state(s, b[1]).await, TaskState::Pending);
    let mut released = drain(&mut settled).released;
    released.sort();
    assert_eq!(released, b.to_vec(), "each batch released once, and announced");

    let mut batches_got = claim(s, &everything, "w2").await;
    batches_got.sort_by_key(|a| if a.task_id == b[0] { 0 } else { 1 });
    for (k, a) in batches_got.iter().enumerate() {
        let want: Vec<(TaskId, Option<Vec<u8>>)> =
            (4 * k..4 * k + 4).map(|i| (c[i], Some(format!("chunk {i}").into_bytes()))).collect();
        let have: Vec<(TaskId, Option<Vec<u8>>)> =
            a.parents.iter().map(|p| (p.task_id, p.result.clone())).collect();
        assert_eq!(have, want, "batch {k} gets its chunks' results in the order it named them");
    }
    // The second batch completes first: the bundle still gets them in its own order.
    complete(s, &batches_got[1], b"batch 1").await;
    assert_eq!(state(s, bundle.id).await, TaskState::Blocked);
    complete(s, &batches_got[0], b"batch 0").await;
    let bundled = claim(s, &everything, "w3").await;
    assert_eq!(bundled.len(), 1);
    let results: Vec<Option<Vec<u8>>> = bundled[0].parents.iter().map(|p| p.result.clone()).collect();
    assert_eq!(results, vec![Some(b"batch 0".to_vec()), Some(b"batch 1".to_vec())]);
    complete(s, &bundled[0], b"bundle").await;
    assert_eq!(state(s, bundle.id).await, TaskState::Completed);
    assert_eq!(drain(&mut settled).released, vec![bundle.id]);
}

on_every_backend!(a_parent_that_fails_for_good_ends_its_dependents_by_their_policy);
/// P fails for good: A (fail) fails, B (cancel) is cancelled, and G, which waits on A, fails
/// too; each error names P and its error. A task that also waits on a healthy parent ends all
/// the same. Cancelling a blocked task ends what waits on it.
async fn a_parent_that_fails_for_good_ends_its_dependents_by_their_policy(db: &TestDb) {
    let s = &db.store;
    let mut settled = s.settled();
    let p = task("prove");
    let healthy = task("prove");
    let a = child("agg", &[p.id, healthy.id], ParentFailure::Fail);
    let b = child("agg", &[p.id], ParentFailure::Cancel);
    let g = child("agg", &[a.id], ParentFailure::Fail);
    s.create_tasks(&[p.clone(), healthy.clone(), a.clone(), b.clone(), g.clone()]).await.unwrap();

    let got = claim(s, &[p.id], "w1").await;
    let f = Failure { held: held(&got[0]), error: "out of memory".into(), retriable: false, delivered: None };
    s.fail(&f, RetryPolicy { base: Duration::from_millis(1), max: Duration::from_millis(1) }).await.unwrap();
    assert_eq!(state(s, p.id).await, TaskState::Failed);
    for (id, want) in [(a.id, TaskState::Failed), (b.id, TaskState::Cancelled), (g.id, TaskState::Failed)] {
        let t = s.get_task(id).await.unwrap().unwrap();
        assert_eq!(t.state, want, "{id}");
        let error = t.error.unwrap_or_default();
        assert!(error.contains(&p.id.to_string()) && error.contains("out of memory"), "{id}: {error}");
        assert!(t.finished_at.is_some());
    }
    let mut ended = drain(&mut settled).ended;
    ended.sort();
    let mut want = vec![(a.id, TaskState::Failed), (b.id, TaskState::Cancelled), (g.id, TaskState::Failed)];
    want.sort();
    assert_eq!(ended, want, "announced once each");
    // The healthy parent completing later releases nothing that already ended.
    let h = claim(s, &[healthy.id], "w1").await;
    complete(s, &h[0], b"fine").await;
    assert_eq!(state(s, a.id).await, TaskState::Failed);
    assert!(drain(&mut settled).released.is_empty());

    // A client cancels a blocked task: what waits on it ends with it.
    let q = task("prove");
    let x = child("agg", &[q.id], ParentFailure::Fail);
    let y = child("agg", &[x.id], ParentFailure::Cancel);
    s.create_tasks(&[q.clone(), x.clone(), y.clone()]).await.unwrap();
    let c = s.cancel(x.id, "not needed").await.unwrap().unwrap();
    assert!(c.applied && c.task.state == TaskState::Cancelled);
    let yt = s.get_task(y.id).await.unwrap().unwrap();
    assert_eq!(yt.state, TaskState::Cancelled);
    assert!(yt.error.unwrap_or_default().contains("was cancelled: not needed"));
    assert_eq!(state(s, q.id).await, TaskState::Pending, "a parent is not touched by its child's end");
}

on_every_backend!(parents_that_ended_before_the_submission_settle_it_at_once);
/// A submission naming parents that already completed waits only for the others; one naming a
/// parent that already failed ends at once, and so does what waits on it in the same submission.
async fn parents_that_ended_before_the_submission_settle_it_at_once(db: &TestDb) {
    let s = &db.store;
    let done = task("prove");
    let running = task("prove");
    s.create_tasks(&[done.clone(), running.clone()]).await.unwrap();
    let got = claim(s, &[done.id], "w1").await;
    complete(s, &got[0], b"early").await;

    let only_done = child("agg", &[done.id], ParentFailure::Fail);
    let both = child("agg", &[done.id, running.id], ParentFailure::Fail);
    let created = s.create_tasks(&[only_done.clone(), both.clone()]).await.unwrap();
    assert_eq!(created[0].task.state, TaskState::Pending, "its only parent completed already");
    assert_eq!(created[1].task.state, TaskState::Blocked);
    let a = claim(s, &[only_done.id], "w1").await;
    assert_eq!(a[0].parents[0].result.as_deref(), Some(&b"early"[..]));

    let cancelled = task("prove");
    s.create_tasks(std::slice::from_ref(&cancelled)).await.unwrap();
    s.cancel(cancelled.id, "changed my mind").await.unwrap();
    let doomed = child("agg", &[cancelled.id], ParentFailure::Cancel);
    let after = child("agg", &[doomed.id], ParentFailure::Fail);
    let created = s.create_tasks(&[doomed.clone(), after.clone()]).await.unwrap();
    assert_eq!(created[0].task.state, TaskState::Cancelled);
    assert_eq!(created[1].task.state, TaskState::Failed, "answered as stored");
    assert_eq!(state(s, after.id).await, TaskState::Failed);
}

on_every_backend!(unknown_parents_are_refused_and_nothing_is_stored);
async fn unknown_parents_are_refused_and_nothing_is_stored(db: &TestDb) {
    let s = &db.store;
    let ghost = TaskId::new();
    let fine = task("prove");
    let orphan = child("agg", &[fine.id, ghost], ParentFailure::Fail);
    match s.create_tasks(&[fine.clone(), orphan.clone()]).await {
        Err(StoreError::UnknownParents(ids)) => assert_eq!(ids, vec![ghost]),
        other => panic!("want UnknownParents, got {other:?}"),
    }
    assert!(s.get_task(fine.id).await.unwrap().is_none(), "the whole submission is refused");
    assert!(s.get_task(orphan.id).await.unwrap().is_none());
}

on_every_backend!(a_fan_in_of_10000_parents_releases_its_child_exactly_once);
/// 10,000 parents completed by 8 concurrent completers in batches of 50: the child is released
/// once, when the last one completes, with every result in order.
async fn a_fan_in_of_10000_parents_releases_its_child_exactly_once(db: &TestDb) {
    fan_in(std::slice::from_ref(&db.store), 10_000).await;
}

/// With two replicas' stores (two pools on one database) completing the parents at the same time,
/// the child is still released exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
async fn two_replicas_completing_parents_release_the_child_exactly_once() {
    let db = TestDb::postgres().await.expect("TEST_DATABASE_URL is set");
    let other = Store::connect(&coordinator::store::testing::db_config(&db.url)).await.unwrap();
    for _ in 0..5 {
        fan_in(&[db.store.clone(), other.clone()], 400).await;
    }
    other.close().await;
    db.cleanup().await;
}

async fn fan_in(stores: &[Store], n: usize) {
    let s = &stores[0];
    let mut announced: Vec<UnboundedReceiver<Settled>> = stores.iter().map(|s| s.settled()).collect();
    let parents: Vec<NewTask> = (0..n).map(|_| task("leaf")).collect();
    let ids: Vec<TaskId> = parents.iter().map(|t| t.id).collect();
    for chunk in parents.chunks(5_000) {
        s.create_tasks(chunk).await.unwrap();
    }
    let sum = child("sum", &ids, ParentFailure::Fail);
    s.create_tasks(std::slice::from_ref(&sum)).await.unwrap();
    assert_eq!(state(s, sum.id).await, TaskState::Blocked);
    let got = claim(s, &ids, "w1").await;
    assert_eq!(got.len(), n);
    let results: HashMap<TaskId, Vec<u8>> =
        got.iter().map(|a| (a.task_id, a.task_id.to_string().into_bytes())).collect();
    let completers = 8;
    let mut handles = Vec::new();
    for k in 0..completers {
        let store = stores[k % stores.len()].clone();
        let mine: Vec<Completion> = got
            .iter()
            .skip(k)
            .step_by(completers)
            .map(|a| Completion { held: held(a), result: results[&a.task_id].clone(), delivered: None })
            .collect();
        handles.push(tokio::spawn(async move {
            for batch in mine.chunks(50) {
                store.complete(batch).await.expect("complete");
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let released: Vec<TaskId> = announced.iter_mut().flat_map(|rx| drain(rx).released).collect();
    assert_eq!(released, vec![sum.id], "released exactly once, by exactly one completion");
    let a = claim(s, &[sum.id], "w2").await;
    assert_eq!(a.len(), 1);
    let want: Vec<TaskId> = ids.clone();
    assert_eq!(a[0].parents.iter().map(|p| p.task_id).collect::<Vec<_>>(), want, "in the order named");
    assert!(a[0].parents.iter().all(|p| p.result.as_ref() == Some(&results[&p.task_id])));
}

// ---- over gRPC, with workers ----------------------------------------------------------------

on_every_backend!(a_pipeline_job_flows_through_workers_without_a_client_round_trip);
/// A job of 8 chunks -> 2 batches -> 1 bundle, submitted once with `#N` parents, runs on two SDK
/// workers; each aggregation step joins its parents' results, so the bundle's result shows every
/// stage got its parents' results in order.
async fn a_pipeline_job_flows_through_workers_without_a_client_round_trip(db: &TestDb) {
    use coordinator::proto;
    use coordinator_worker::{Worker, WorkerOptions, handler_fn};

    let c = TestCoordinator::start(db, |_| {}).await;
    let mut client = c.client().await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut workers = Vec::new();
    for id in ["pipe-a", "pipe-b"] {
        let mut opts = WorkerOptions::new(c.endpoint(), id);
        opts.max_concurrent = 3;
        let handler = handler_fn(|t| async move {
            if t.task_type == "chunk" {
                return Ok(t.payload);
            }
            let parts: Vec<String> = t
                .parents
                .iter()
                .map(|p| String::from_utf8_lossy(p.result.as_deref().unwrap_or(b"?")).into_owned())
                .collect();
            Ok(format!("({})", parts.join("+")).into_bytes())
        });
        workers.push(tokio::spawn(Worker::new(opts, handler).unwrap().run(shutdown.clone())));
    }
    wait_connected(&client, &["pipe-a", "pipe-b"]).await;

    let mut tasks: Vec<proto::SubmitTaskRequest> = (0..8)
        .map(|i| proto::SubmitTaskRequest {
            task_type: "chunk".into(),
            payload: format!("c{i}").into_bytes(),
            ..Default::default()
        })
        .collect();
    for k in 0..2 {
        tasks.push(proto::SubmitTaskRequest {
            task_type: "batch".into(),
            depends_on: (4 * k..4 * k + 4).map(|i| format!("#{i}")).collect(),
            ..Default::default()
        });
    }
    tasks.push(proto::SubmitTaskRequest {
        task_type: "bundle".into(),
        depends_on: vec!["#8".into(), "#9".into()],
        ..Default::default()
    });
    let job = client
        .submit_job(proto::SubmitJobRequest { name: "rollup".into(), tasks, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let bundle = job.task_ids[10].clone();
    wait_until("the bundle completes", Duration::from_secs(20), || {
        let mut client = client.clone();
        let id = bundle.clone();
        async move {
            client
                .get_task(proto::GetTaskRequest { task_id: id, ..Default::default() })
                .await
                .is_ok_and(|t| t.into_inner().status == proto::TaskStatus::Completed as i32)
        }
    })
    .await;
    let t = client
        .get_task(proto::GetTaskRequest { task_id: bundle, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(String::from_utf8_lossy(&t.result), "((c0+c1+c2+c3)+(c4+c5+c6+c7))");
    shutdown.cancel();
    for w in workers {
        w.await.unwrap().unwrap();
    }
    c.stop().await.unwrap();
}

on_every_backend!(cycles_and_unknown_parents_are_refused_as_invalid_arguments);
async fn cycles_and_unknown_parents_are_refused_as_invalid_arguments(db: &TestDb) {
    use coordinator::proto;

    let c = TestCoordinator::start(db, |_| {}).await;
    let mut client = c.client().await;
    let t = |deps: &[&str]| proto::SubmitTaskRequest {
        task_type: "noop".into(),
        depends_on: deps.iter().map(|d| d.to_string()).collect(),
        ..Default::default()
    };
    let ghost = TaskId::new().to_string();
    for (tasks, says) in [
        (vec![t(&["#1"]), t(&["#2"]), t(&["#0"])], "cycle"),
        (vec![t(&["#0"])], "itself"),
        (vec![t(&[]), t(&["#5"])], "not a task of this request"),
        (vec![t(&["nope"])], "not a task id"),
        (vec![t(&[&ghost])], &ghost),
    ] {
        let e = client.submit_tasks(proto::SubmitTasksRequest { tasks }).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(says), "{}", e.message());
    }
    let listed = client.list_tasks(proto::ListTasksRequest::default()).await.unwrap().into_inner();
    assert!(listed.tasks.is_empty(), "nothing stored: {:?}", listed.tasks);
    c.stop().await.unwrap();
}

on_every_backend!(a_submission_racing_its_parents_end_is_never_left_blocked);
/// A child submitted while its parent's completion (or failure for good) commits either sees the
/// parent's end or is settled by it: never left blocked behind a parent that ended. Many rounds,
/// alternating completion and failure.
async fn a_submission_racing_its_parents_end_is_never_left_blocked(db: &TestDb) {
    let s = &db.store;
    for round in 0..40 {
        let fails = round % 2 == 1;
        let parent = task("prove");
        s.create_tasks(std::slice::from_ref(&parent)).await.unwrap();
        let a = claim(s, &[parent.id], "w1").await.remove(0);
        let kid = child("agg", &[parent.id], ParentFailure::Fail);
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(2));
        let (s1, b1) = (s.clone(), barrier.clone());
        let ending = tokio::spawn(async move {
            b1.wait().await;
            if fails {
                let f = Failure {
                    held: held(&a),
                    error: "bad witness".into(),
                    retriable: false,
                    delivered: None,
                };
                s1.fail(&f, RetryPolicy { base: Duration::from_millis(1), max: Duration::from_millis(1) })
                    .await
                    .unwrap();
            } else {
                complete(&s1, &a, b"done").await;
            }
        });
        let (s2, b2, k) = (s.clone(), barrier.clone(), kid.clone());
        let submitting = tokio::spawn(async move {
            b2.wait().await;
            s2.create_tasks(std::slice::from_ref(&k)).await.unwrap();
        });
        ending.await.unwrap();
        submitting.await.unwrap();
        let want = if fails { TaskState::Failed } else { TaskState::Pending };
        assert_eq!(state(s, kid.id).await, want, "round {round}");
    }
}

on_every_backend!(a_submission_racing_an_end_two_levels_up_is_never_left_blocked);
/// Q waits on R; a child of Q is submitted while R fails for good: the failure reaches the new
/// child through Q whichever commits first. Many rounds.
async fn a_submission_racing_an_end_two_levels_up_is_never_left_blocked(db: &TestDb) {
    let s = &db.store;
    for round in 0..40 {
        let r = task("prove");
        let q = child("agg", &[r.id], ParentFailure::Fail);
        s.create_tasks(&[r.clone(), q.clone()]).await.unwrap();
        let a = claim(s, &[r.id], "w1").await.remove(0);
        let kid = child("agg", &[q.id], ParentFailure::Cancel);
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(2));
        let (s1, b1) = (s.clone(), barrier.clone());
        let failing = tokio::spawn(async move {
            b1.wait().await;
            let f =
                Failure { held: held(&a), error: "bad witness".into(), retriable: false, delivered: None };
            s1.fail(&f, RetryPolicy { base: Duration::from_millis(1), max: Duration::from_millis(1) })
                .await
                .unwrap();
        });
        let (s2, b2, k) = (s.clone(), barrier.clone(), kid.clone());
        let submitting = tokio::spawn(async move {
            b2.wait().await;
            s2.create_tasks(std::slice::from_ref(&k)).await.unwrap();
        });
        failing.await.unwrap();
        submitting.await.unwrap();
        assert_eq!(state(s, q.id).await, TaskState::Failed, "round {round}");
        assert_eq!(state(s, kid.id).await, TaskState::Cancelled, "round {round}");
    }
}

on_every_backend!(a_blocked_task_shows_its_parents_and_which_it_waits_for);
/// `GetTask` (and `coordctl get`) list a task's parents in its order, each with its status: a
/// blocked task says what it waits for without a look into the database.
async fn a_blocked_task_shows_its_parents_and_which_it_waits_for(db: &TestDb) {
    use coordinator::proto;

    let c = TestCoordinator::start(db, |_| {}).await;
    let mut client = c.client().await;
    // No worker runs `stage`: both parents stay pending; one completes through the store.
    let first = submit(&mut client, "stage", b"").await;
    let second = submit(&mut client, "stage", b"").await;
    let req = proto::SubmitTaskRequest {
        task_type: "stage".into(),
        depends_on: vec![second.clone(), first.clone()],
        ..Default::default()
    };
    let child = client.submit_task(req).await.unwrap().into_inner().task.unwrap().task_id;
    let a = claim(&c.store, &[TaskId(first.parse().unwrap())], "w1").await.remove(0);
    complete(&c.store, &a, b"done").await;

    let shown = get_task(&mut client, &child).await;
    assert_eq!(shown.status, proto::TaskStatus::Blocked as i32);
    let parents: Vec<(String, i32)> = shown.parents.iter().map(|p| (p.task_id.clone(), p.status)).collect();
    assert_eq!(
        parents,
        [
            (second.clone(), proto::TaskStatus::Pending as i32),
            (first.clone(), proto::TaskStatus::Completed as i32)
        ]
    );
    let out = coordctl(&c.endpoint(), &["get", &child]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("parents   {second} (pending), {first} (completed)")), "{text}");
    assert!(text.contains("waiting   for 1 of its 2 parents to complete"), "{text}");
    // A task without parents lists none.
    assert!(get_task(&mut client, &first).await.parents.is_empty());
    c.stop().await.unwrap();
}
