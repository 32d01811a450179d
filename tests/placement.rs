//! Placement beyond task types, in the store on both backends: a claim offers only tasks some
//! worker with room could take (labels, weight), so tasks nobody fits never fill a claim; a
//! type's concurrency limit holds inside the claim whatever placement decides, also with two
//! replicas' stores claiming at once; limits from the configuration and from an admin; weights
//! carried by assignments and adopted by a registration.

#[macro_use]
mod common;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, Ordering},
    },
    time::Duration,
};

use common::*;
use coordinator::{
    domain::{Candidate, Needs, NewTask, Requirement, TaskId, TaskState, WorkerId, WorkerSlot},
    store::{Allowances, ClaimFilter, Completion, Held, Placement, Shapes, Store, TypeFilter},
};

const LEASE: Duration = Duration::from_secs(600);

fn task(task_type: &str) -> NewTask {
    coordinator::store::testing::new_task(task_type)
}

fn needing(task_type: &str, requires: &[&str], weight: u32) -> NewTask {
    let needs = Needs {
        requires: requires.iter().map(|r| Requirement::parse(r).unwrap()).collect(),
        weight,
        affinity_key: None,
    };
    NewTask { needs, ..task(task_type) }
}

fn slot(caps: &[&str], labels: &[(&str, &str)], free: u32) -> WorkerSlot {
    WorkerSlot {
        id: WorkerId::from("w"),
        capabilities: caps.iter().map(|c| c.to_string()).collect(),
        free,
        in_flight: 0,
        max: free,
        slots: free,
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
    }
}

/// The candidates a claim offers when the workers with room are `workers` (`None`: no shape
/// check). Nothing is assigned.
async fn offered(s: &Store, workers: Option<&[WorkerSlot]>, limit: u32) -> Vec<TaskId> {
    let filter = ClaimFilter { types: TypeFilter::Any, shapes: workers.map(|w| Shapes::of(w).unwrap()) };
    let mut seen = Vec::new();
    let got = s
        .claim_fenced(limit, &filter, LEASE, |c: &[Candidate], _: &Allowances| {
            seen = c.iter().map(|c| c.id).collect();
            Placement::default()
        })
        .await
        .expect("claim");
    assert!(got.is_empty());
    seen.sort();
    seen
}

fn ids(tasks: &[NewTask]) -> Vec<TaskId> {
    let mut v: Vec<TaskId> = tasks.iter().map(|t| t.id).collect();
    v.sort();
    v
}

fn sorted(mut v: Vec<TaskId>) -> Vec<TaskId> {
    v.sort();
    v
}

/// Claims whatever is offered for worker `w`, recording the allowances the claim was given.
async fn claim_all(s: &Store, w: &str) -> (Vec<coordinator::domain::Assignment>, Allowances) {
    let w = WorkerId::from(w);
    let mut given = Allowances::new();
    let got = s
        .claim_fenced(1000, &ClaimFilter::types(TypeFilter::Any), LEASE, |c: &[Candidate], a: &Allowances| {
            given = a.clone();
            Placement { placed: c.iter().map(|c| (c.id, w.clone())).collect(), sessions: HashMap::new() }
        })
        .await
        .expect("claim");
    (got, given)
}

async fn complete(s: &Store, a: &coordinator::domain::Assignment) {
    let held = Held { task_id: a.task_id, worker_id: a.worker_id.clone(), attempt: a.attempt };
    s.complete(&[Completion { held, result: b"ok".to_vec(), delivered: None }]).await.expect("complete");
}

// ---------------------------------------------------------------------------------------------

on_every_backend!(a_claim_offers_only_tasks_a_worker_with_room_fits);
/// 30 tasks that need an H100, 30 that need 256 GB, 30 that weigh 4 slots, then 3 plain ones:
/// a claim for a plain worker with 2 free slots and a limit of 3 gets the 3 plain tasks, not
/// the 3 oldest (which nobody with room could take), and each shape gets exactly what fits it.
async fn a_claim_offers_only_tasks_a_worker_with_room_fits(db: &TestDb) {
    let s = &db.store;
    let h100: Vec<NewTask> = (0..30).map(|_| needing("prove", &["gpu=h100"], 1)).collect();
    let big: Vec<NewTask> = (0..30).map(|_| needing("prove", &["mem_gb>=256"], 1)).collect();
    let heavy: Vec<NewTask> = (0..30).map(|_| needing("prove", &[], 4)).collect();
    let plain: Vec<NewTask> = (0..3).map(|_| task("prove")).collect();
    for batch in [&h100, &big, &heavy, &plain] {
        s.create_tasks(batch).await.unwrap();
    }
    let cat = |parts: &[&Vec<NewTask>]| sorted(parts.iter().flat_map(|p| ids(p)).collect());

    assert_eq!(offered(s, Some(&[slot(&[], &[], 2)]), 3).await, ids(&plain), "a plain worker");
    assert_eq!(
        offered(s, Some(&[slot(&[], &[("gpu", "h100")], 1)]), 1000).await,
        cat(&[&h100, &plain]),
        "an H100 worker with one free slot"
    );
    assert_eq!(
        offered(s, Some(&[slot(&[], &[("mem_gb", "512")], 4)]), 1000).await,
        cat(&[&big, &heavy, &plain]),
        "512 GB, four free slots"
    );
    assert_eq!(
        offered(s, Some(&[slot(&[], &[("mem_gb", "128")], 8)]), 1000).await,
        cat(&[&heavy, &plain]),
        "128 GB is under the minimum"
    );
    assert_eq!(
        offered(s, Some(&[slot(&[], &[("mem_gb", "lots")], 8)]), 1000).await,
        cat(&[&heavy, &plain]),
        "a label that is no number meets no minimum"
    );
    assert_eq!(
        offered(s, Some(&[slot(&["other"], &[("gpu", "h100")], 8)]), 1000).await,
        ids(&plain),
        "an H100 worker that does not run the type: only what needs nothing passes here"
    );
    assert_eq!(
        offered(
            s,
            Some(&[slot(&[], &[], 1), slot(&["prove"], &[("gpu", "h100"), ("mem_gb", "256")], 4)]),
            1000
        )
        .await,
        cat(&[&h100, &big, &heavy, &plain]),
        "two shapes together"
    );
    assert_eq!(offered(s, None, 1000).await, cat(&[&h100, &big, &heavy, &plain]), "no shape check");
}

on_every_backend!(a_type_limit_holds_in_the_claim_whatever_placement_decides);
/// With a limit of 2 on `licensed`, a claim whose placement takes everything assigns 2 of them
/// (and every task of other types); the next claim offers none while 2 run; one completing
/// lets one more start; a limit of 0 holds them all; clearing it lets the rest go.
async fn a_type_limit_holds_in_the_claim_whatever_placement_decides(db: &TestDb) {
    let s = &db.store;
    s.set_type_limit("licensed", Some(2)).await.unwrap();
    let licensed: Vec<NewTask> = (0..6).map(|_| task("licensed")).collect();
    let free: Vec<NewTask> = (0..2).map(|_| task("free")).collect();
    s.create_tasks(&licensed).await.unwrap();
    s.create_tasks(&free).await.unwrap();

    let (got, given) = claim_all(s, "w1").await;
    assert_eq!(given, HashMap::from([("licensed".to_string(), 2)]));
    let of =
        |got: &[coordinator::domain::Assignment], ty: &str| got.iter().filter(|a| a.task_type == ty).count();
    assert_eq!((of(&got, "licensed"), of(&got, "free")), (2, 2), "{got:?}");
    let running: Vec<_> = got.into_iter().filter(|a| a.task_type == "licensed").collect();

    let (got, _) = claim_all(s, "w1").await;
    assert!(got.is_empty(), "at the limit: {got:?}");

    complete(s, &running[0]).await;
    let (got, given) = claim_all(s, "w1").await;
    assert_eq!((got.len(), given["licensed"]), (1, 1), "one finished, one more starts");

    s.set_type_limit("licensed", Some(0)).await.unwrap();
    complete(s, &running[1]).await;
    assert!(claim_all(s, "w1").await.0.is_empty(), "a limit of 0 holds them all");

    s.set_type_limit("licensed", None).await.unwrap();
    let (got, given) = claim_all(s, "w1").await;
    assert_eq!((got.len(), given.len()), (3, 0), "no limit: the rest start");
    let limits = s.type_limits().await.unwrap();
    assert!(limits.is_empty(), "{limits:?}");
}

on_every_backend!(limited_types_names_those_of_the_given_types_that_have_a_limit);
/// The lookup a refused submission makes: of the types given, those with a limit (from the
/// configuration or an admin, a limit of 0 too), and none once cleared.
async fn limited_types_names_those_of_the_given_types_that_have_a_limit(db: &TestDb) {
    let s = &db.store;
    s.seed_type_limits(&BTreeMap::from([("seeded".to_string(), 3)])).await.unwrap();
    s.set_type_limit("licensed", Some(0)).await.unwrap();
    s.set_type_limit("other", Some(1)).await.unwrap();
    let names = |t: &[&str]| t.iter().map(|t| t.to_string()).collect::<Vec<_>>();
    let got = s.limited_types(&names(&["licensed", "free", "seeded", "it's"])).await.unwrap();
    assert_eq!(got, ["licensed", "seeded"].map(String::from).into(), "only the given types with a limit");
    assert!(s.limited_types(&[]).await.unwrap().is_empty());
    s.set_type_limit("licensed", None).await.unwrap();
    let got = s.limited_types(&names(&["licensed", "seeded"])).await.unwrap();
    assert_eq!(got, ["seeded"].map(String::from).into(), "cleared");
}

on_every_backend!(a_claim_for_a_mixed_fleet_offers_only_what_its_limits_and_shapes_allow);
/// A claim for a worker of any type and a worker of `licensed` and `gpu` only (labelled
/// `gpu=a10`): the first of any type and the first of each of those types, and from neither a
/// task of a type at its limit nor one that no free worker fits.
async fn a_claim_for_a_mixed_fleet_offers_only_what_its_limits_and_shapes_allow(db: &TestDb) {
    let s = &db.store;
    s.set_type_limit("licensed", Some(1)).await.unwrap();
    s.create_tasks(&[task("licensed")]).await.unwrap();
    let (got, _) = claim_all(s, "w1").await;
    assert_eq!(got.len(), 1, "{got:?}");

    let licensed: Vec<NewTask> = (0..3).map(|_| task("licensed")).collect();
    let unfit: Vec<NewTask> = (0..3).map(|_| needing("gpu", &["gpu=h100"], 1)).collect();
    let fit: Vec<NewTask> = (0..2).map(|_| needing("gpu", &["gpu=a10"], 1)).collect();
    let plain: Vec<NewTask> = (0..2).map(|_| task("plain")).collect();
    for batch in [&licensed, &unfit, &fit, &plain] {
        s.create_tasks(batch).await.unwrap();
    }
    let workers = [slot(&[], &[], 1), slot(&["licensed", "gpu"], &[("gpu", "a10")], 1)];
    let filter = ClaimFilter {
        types: TypeFilter::AnyAnd(vec!["gpu".into(), "licensed".into()]),
        shapes: Some(Shapes::of(&workers).unwrap()),
    };
    let mut seen = Vec::new();
    s.claim_fenced(3, &filter, LEASE, |c: &[Candidate], _: &Allowances| {
        seen = c.iter().map(|c| c.id).collect();
        Placement::default()
    })
    .await
    .unwrap();
    // The first 3 of any type the fleet can take: the two a10 tasks and the first plain one.
    let expected = ids(&[fit, plain[..1].to_vec()].concat());
    assert_eq!(sorted(seen), expected, "no licensed task (at its limit), no h100 task (no worker fits)");
}

on_every_backend!(configured_limits_are_written_at_startup_and_an_admins_stay);
/// The configuration's limits are written (and dropped when no longer configured); an admin's
/// limit of a type wins over the configuration's until cleared.
async fn configured_limits_are_written_at_startup_and_an_admins_stay(db: &TestDb) {
    let s = &db.store;
    let show = |s: &Store| {
        let s = s.clone();
        async move {
            s.type_limits()
                .await
                .unwrap()
                .into_iter()
                .map(|l| {
                    format!("{}={} {} ({} running)", l.task_type, l.max_in_flight, l.source, l.in_flight)
                })
                .collect::<Vec<_>>()
        }
    };
    s.seed_type_limits(&BTreeMap::from([("a".into(), 1), ("b".into(), 2)])).await.unwrap();
    assert_eq!(show(s).await, ["a=1 config (0 running)", "b=2 config (0 running)"]);
    s.set_type_limit("b", Some(5)).await.unwrap();
    s.create_tasks(&[task("a")]).await.unwrap();
    claim_all(s, "w1").await;
    s.seed_type_limits(&BTreeMap::from([("a".into(), 3), ("c".into(), 1)])).await.unwrap();
    assert_eq!(show(s).await, ["a=3 config (1 running)", "b=5 admin (0 running)", "c=1 config (0 running)"]);
    s.seed_type_limits(&BTreeMap::new()).await.unwrap();
    assert_eq!(show(s).await, ["b=5 admin (0 running)"]);
    s.set_type_limit("b", None).await.unwrap();
    assert!(show(s).await.is_empty());
}

on_every_backend!(what_a_task_needs_is_stored_assigned_and_adopted);
/// Requirements, weight and affinity key read back as submitted; an assignment carries the
/// weight; a registration that adopts the task says what it weighs (its slots count so).
async fn what_a_task_needs_is_stored_assigned_and_adopted(db: &TestDb) {
    let s = &db.store;
    let mut t = needing("prove", &["gpu=h100", "mem_gb>=256.5"], 3);
    t.needs.affinity_key = Some("circuit-7".into());
    let plain = task("prove");
    s.create_tasks(&[t.clone(), plain.clone()]).await.unwrap();
    let read = s.get_task(t.id).await.unwrap().unwrap();
    assert_eq!(read.needs, t.needs);
    assert_eq!(s.get_task(plain.id).await.unwrap().unwrap().needs, Needs::default());

    let mut reg = coordinator::store::testing::registration("w1", 8);
    s.register_worker(&reg).await.unwrap();
    let (got, _) = claim_all(s, "w1").await;
    let weights: HashMap<TaskId, u32> = got.iter().map(|a| (a.task_id, a.weight)).collect();
    assert_eq!(weights, HashMap::from([(t.id, 3), (plain.id, 1)]));

    reg.session_id = uuid::Uuid::now_v7();
    let adopted = s.register_worker(&reg).await.unwrap();
    assert_eq!(adopted.held.len(), 2);
    assert_eq!(adopted.weights, HashMap::from([(t.id, 3)]));
}

/// Two replicas' stores claim one limited type as fast as they can while their tasks complete
/// after a few milliseconds: sampled all along, the type never has more than its limit assigned
/// or running, and it does reach it. Postgres only (replicas need it).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
async fn two_replicas_claiming_at_once_never_exceed_a_type_limit() {
    const LIMIT: i64 = 3;
    const TASKS: usize = 150;
    let db = TestDb::postgres().await.expect("TEST_DATABASE_URL is set");
    db.store.set_type_limit("licensed", Some(LIMIT as u32)).await.unwrap();
    let tasks: Vec<NewTask> = (0..TASKS).map(|_| task("licensed")).collect();
    db.store.create_tasks(&tasks).await.unwrap();
    let cfg = coordinator::store::testing::db_config(&db.url);
    let replicas = [Store::connect(&cfg).await.unwrap(), Store::connect(&cfg).await.unwrap()];

    let done = Arc::new(AtomicBool::new(false));
    let most = Arc::new(AtomicI64::new(0));
    let sampler = {
        let (s, done, most) = (db.store.clone(), done.clone(), most.clone());
        tokio::spawn(async move {
            let mut samples = 0u64;
            while !done.load(Ordering::Relaxed) {
                let n = s.type_limits().await.unwrap().first().map_or(0, |l| i64::from(l.in_flight));
                most.fetch_max(n, Ordering::Relaxed);
                samples += 1;
            }
            samples
        })
    };
    let mut claimers = Vec::new();
    for (r, store) in replicas.iter().enumerate() {
        for k in 0..2 {
            let s = store.clone();
            claimers.push(tokio::spawn(async move {
                let mut mine = 0;
                let deadline = std::time::Instant::now() + Duration::from_secs(60);
                loop {
                    let (got, _) = claim_all(&s, &format!("w{r}{k}")).await;
                    for a in &got {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        complete(&s, a).await;
                    }
                    mine += got.len();
                    let counts = s.task_counts().await.unwrap();
                    let left = counts.get(&TaskState::Pending).copied().unwrap_or(0);
                    if left == 0 || std::time::Instant::now() > deadline {
                        return mine;
                    }
                    if got.is_empty() {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }));
        }
    }
    let mut claimed = 0;
    for c in claimers {
        claimed += c.await.unwrap();
    }
    done.store(true, Ordering::Relaxed);
    let samples = sampler.await.unwrap();
    let most = most.load(Ordering::Relaxed);
    println!("{TASKS} tasks over 2 replicas x 2 claimers: {samples} samples, at most {most} in flight");
    assert_eq!(claimed, TASKS, "every task claimed once");
    assert!(most <= LIMIT, "{most} in flight over the limit of {LIMIT}");
    assert_eq!(most, LIMIT, "the load reached the limit (or the test shows nothing)");
    for r in replicas {
        r.close().await;
    }
    db.cleanup().await;
}

/// A limit created while a claim of its type is in progress (so that claim never saw it) waits
/// for that claim to commit: a claim that starts after the limit exists counts what the first
/// one assigned, and starts nothing while that is at or over the limit. Without the wait, the
/// second claim counts none of the first one's uncommitted assignments and starts one more.
/// Postgres only.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(test_postgres), ignore = "needs TEST_DATABASE_URL")]
async fn a_limit_created_during_a_claim_holds_for_every_claim_after_it() {
    let db = TestDb::postgres().await.expect("TEST_DATABASE_URL is set");
    let tasks: Vec<NewTask> = (0..6).map(|_| task("licensed")).collect();
    db.store.create_tasks(&tasks).await.unwrap();
    let cfg = coordinator::store::testing::db_config(&db.url);
    let (a, b) = (Store::connect(&cfg).await.unwrap(), Store::connect(&cfg).await.unwrap());

    // Claim A takes 2 and holds its transaction open until released.
    let (inside_tx, inside) = tokio::sync::oneshot::channel();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let first = tokio::spawn(async move {
        let w = WorkerId::from("wa");
        a.claim_fenced(
            2,
            &ClaimFilter::types(TypeFilter::Any),
            LEASE,
            move |c: &[Candidate], _: &Allowances| {
                inside_tx.send(()).unwrap();
                released.recv().unwrap();
                Placement { placed: c.iter().map(|c| (c.id, w.clone())).collect(), sessions: HashMap::new() }
            },
        )
        .await
        .unwrap()
        .len()
    });
    inside.await.unwrap();
    // Meanwhile an admin limits the type to 1, and claim B starts once that returned.
    let setter = db.store.clone();
    let second = tokio::spawn(async move {
        setter.set_type_limit("licensed", Some(1)).await.unwrap();
        claim_all(&b, "wb").await.0.len()
    });
    // Claim A stays open until either the limit's writer waits for a lock (it must: A is in
    // progress) or, without that wait, the limit and claim B went through (the failure this
    // test exists to show).
    let waiting = |pool: sqlx::PgPool| async move {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    wait_until("the limit's writer waits, or claim B is done", Duration::from_secs(10), || {
        let (pool, done) = (pool.clone(), second.is_finished());
        async move { done || waiting(pool).await > 0 }
    })
    .await;
    release.send(()).unwrap();
    assert_eq!(first.await.unwrap(), 2, "claim A assigned what it placed");
    assert_eq!(second.await.unwrap(), 0, "claim B started nothing: 2 run under a limit of 1");
    let l = db.store.type_limits().await.unwrap();
    assert_eq!((l[0].max_in_flight, l[0].in_flight), (1, 2), "{l:?}");
    pool.close().await;
    db.cleanup().await;
}

/// Bad requirements, weights, affinity keys and worker labels are refused with
/// `INVALID_ARGUMENT` naming the field, and nothing is stored: a control character in a stored
/// requirement or label would otherwise reach the claim's SQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_placement_input_is_refused_as_invalid_arguments() {
    let db = TestDb::sqlite().await;
    let c = TestCoordinator::start(&db, |_| {}).await;
    let mut client = c.client().await;
    let submit =
        |requires: &[&str], weight: u32, affinity_key: String| coordinator::proto::SubmitTaskRequest {
            task_type: "prove".into(),
            requires: requires.iter().map(|r| r.to_string()).collect(),
            weight,
            affinity_key,
            ..Default::default()
        };
    let cases = [
        (submit(&["gpu"], 0, String::new()), "requires[0]"),
        (submit(&["gpu=h100", "=x"], 0, String::new()), "requires[1]"),
        (submit(&["mem_gb>=lots"], 0, String::new()), "requires[0]"),
        (submit(&["mem_gb>=inf"], 0, String::new()), "requires[0]"),
        (submit(&["gpu=h1\u{0}00"], 0, String::new()), "requires[0]"),
        (submit(&["gpu=h100"; 17], 0, String::new()), "requires"),
        (submit(&[], 1025, String::new()), "weight"),
        (submit(&[], 1, "k".repeat(257)), "affinity_key"),
    ];
    for (req, field) in cases {
        let shown = format!("{:?}", req.requires);
        let err = client.submit_task(req).await.expect_err(&shown);
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{shown}: {err:?}");
        assert!(err.message().contains(field), "{shown}: {}", err.message());
    }
    let counts = c.store.task_counts().await.unwrap();
    assert_eq!(counts.values().sum::<u64>(), 0, "nothing stored: {counts:?}");
    for (k, v) in [("gpu", "h1\u{0}00"), ("g=pu", "h100"), ("", "x")] {
        let req = coordinator::proto::RegisterWorkerRequest {
            worker_id: "w1".into(),
            max_concurrent_tasks: 1,
            labels: [(k.to_string(), v.to_string())].into(),
            ..Default::default()
        };
        let err = client.register_worker(req).await.expect_err("a bad label");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{k:?}={v:?}: {err:?}");
        assert!(err.message().contains("labels"), "{}", err.message());
    }
    c.stop().await.unwrap();
    db.cleanup().await;
}
