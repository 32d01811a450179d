//! Placement: a pure function from runnable tasks and worker snapshots to assignments. No I/O;
//! the scheduler loop does the claiming and the pushing.

pub use crate::domain::WorkerSlot;
use std::collections::HashMap;

use crate::{
    config::Strategy,
    domain::{Candidate, TaskId, WorkerId},
};

/// What one placement decided.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Placed {
    /// Which worker takes which task, in queue order.
    pub placed: Vec<(TaskId, WorkerId)>,
    /// Tasks with an affinity key placed on the worker their key prefers.
    pub affinity_hits: u32,
    /// Tasks with an affinity key placed elsewhere: the preferred worker had no room.
    pub affinity_misses: u32,
}

/// Places `tasks` (already ordered: higher priority, then older, first) on `workers`:
///
/// - only on a worker that is eligible for the task ([`WorkerSlot::eligible`]: its type, the
///   labels it requires, as many slots in all as it weighs);
/// - never more than a worker's free slots, a task taking as many as it weighs;
/// - never more tasks of a type than `limits` allows (tasks it may still start, per limited
///   type; a type absent from it has no limit);
/// - a task with an affinity key on the eligible worker its key prefers (rendezvous hashing:
///   the same key picks the same worker while the set of eligible workers stays the same) when
///   that worker has room, or else on any eligible worker by `strategy`, without waiting.
///
/// Tasks nobody can take now are left out. `cursor` carries the round-robin position across
/// calls so that consecutive passes keep rotating.
pub fn place(
    strategy: Strategy,
    tasks: &[Candidate],
    workers: &[WorkerSlot],
    cursor: &mut usize,
    limits: &HashMap<String, u32>,
) -> Placed {
    let mut free: Vec<u32> = workers.iter().map(|w| w.free).collect();
    let mut load: Vec<u32> = workers.iter().map(|w| w.in_flight).collect();
    let mut allowed = limits.clone();
    let mut out = Placed { placed: Vec::with_capacity(tasks.len()), ..Placed::default() };
    if workers.is_empty() {
        return out;
    }
    let n = workers.len();
    // Each key's preferred worker, worked out once per pass for tasks that are eligible on the
    // same workers (same type, requirements and weight): the task that worked it out, and it.
    let mut preferences: HashMap<&str, Vec<(&Candidate, Option<usize>)>> = HashMap::new();
    for task in tasks {
        if allowed.get(&task.task_type).is_some_and(|left| *left == 0) {
            continue;
        }
        let weight = task.needs.weight.max(1);
        let eligible = |i: usize, free: &[u32]| free[i] >= weight && workers[i].eligible(task);
        let preferred = task.needs.affinity_key.as_deref().and_then(|key| {
            let same = |c: &Candidate| {
                c.task_type == task.task_type
                    && c.needs.requires == task.needs.requires
                    && c.needs.weight == task.needs.weight
            };
            let known = preferences.entry(key).or_default();
            if let Some((_, i)) = known.iter().find(|(seen, _)| same(seen)) {
                return *i;
            }
            let from = key_state(key);
            let i = (0..n)
                .filter(|&i| workers[i].eligible(task))
                .max_by_key(|&i| rendezvous_from(from, &workers[i].id));
            known.push((task, i));
            i
        });
        let chosen = match preferred {
            Some(i) if free[i] >= weight => {
                out.affinity_hits += 1;
                Some(i)
            }
            _ => {
                let fallback = match strategy {
                    Strategy::RoundRobin => (0..n)
                        .map(|k| (*cursor + k) % n)
                        .find(|&i| eligible(i, &free))
                        .inspect(|&i| *cursor = (i + 1) % n),
                    Strategy::LeastLoaded => (0..n)
                        .filter(|&i| eligible(i, &free))
                        // Lowest load relative to size; ties go to the larger free count, then order.
                        .min_by(|&a, &b| {
                            let ra = u64::from(load[a]) * u64::from(workers[b].max.max(1));
                            let rb = u64::from(load[b]) * u64::from(workers[a].max.max(1));
                            ra.cmp(&rb).then(free[b].cmp(&free[a])).then(a.cmp(&b))
                        }),
                };
                if preferred.is_some() && fallback.is_some() {
                    out.affinity_misses += 1;
                }
                fallback
            }
        };
        if let Some(i) = chosen {
            free[i] -= weight;
            load[i] += weight;
            if let Some(left) = allowed.get_mut(&task.task_type) {
                *left -= 1;
            }
            out.placed.push((task.id, workers[i].id.clone()));
        }
    }
    out
}

/// The rendezvous weight of `worker` for `key`: the eligible worker with the highest weight is
/// the key's preferred one. Stable across processes and releases (FNV-1a, then a 64-bit mix),
/// so every replica prefers the same worker for a key.
pub fn rendezvous(key: &str, worker: &WorkerId) -> u64 {
    rendezvous_from(key_state(key), worker)
}

const FNV_PRIME: u64 = 0x0100_0000_01b3;

/// The hash state after `key` and its separator: shared by every worker the key is weighed on.
fn key_state(key: &str) -> u64 {
    key.as_bytes()
        .iter()
        .chain(&[0xff])
        .fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(FNV_PRIME))
}

fn rendezvous_from(state: u64, worker: &WorkerId) -> u64 {
    let mut h = worker.0.as_bytes().iter().fold(state, |h, b| (h ^ u64::from(*b)).wrapping_mul(FNV_PRIME));
    // splitmix64's finaliser: FNV alone leaves the last bytes poorly mixed.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    // The generator trait is renamed: `Strategy` here is the placement strategy.
    use proptest::{
        prelude::{Just, prop},
        prop_assert, prop_assert_eq, prop_assume, proptest,
        strategy::Strategy as Gen,
    };

    use super::*;
    use crate::domain::{Needs, Requirement};

    /// Placement with no type limits, as most tests want it.
    fn place(
        strategy: Strategy,
        tasks: &[Candidate],
        workers: &[WorkerSlot],
        cursor: &mut usize,
    ) -> Vec<(TaskId, WorkerId)> {
        super::place(strategy, tasks, workers, cursor, &HashMap::new()).placed
    }

    fn worker(id: &str, caps: &[&str], free: u32) -> WorkerSlot {
        WorkerSlot {
            id: WorkerId(id.into()),
            capabilities: caps.iter().map(|s| s.to_string()).collect(),
            free,
            in_flight: 0,
            max: free,
            slots: free,
            labels: Default::default(),
        }
    }

    fn tasks(types: &[&str]) -> Vec<Candidate> {
        types
            .iter()
            .map(|t| Candidate {
                id: TaskId::new(),
                task_type: t.to_string(),
                priority: 0,
                needs: Needs::default(),
            })
            .collect()
    }

    fn per_worker(placed: &[(TaskId, WorkerId)]) -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for (_, w) in placed {
            *m.entry(w.0.clone()).or_default() += 1;
        }
        m
    }

    #[test]
    fn round_robin_spreads_evenly() {
        let ws = vec![worker("a", &[], 10), worker("b", &[], 10), worker("c", &[], 10)];
        let ts = tasks(&["x"; 9]);
        let mut cursor = 0;
        let placed = place(Strategy::RoundRobin, &ts, &ws, &mut cursor);
        assert_eq!(placed.len(), 9);
        assert!(per_worker(&placed).values().all(|&n| n == 3));
        // In order a, b, c, a, ...
        assert_eq!(placed[0].1.0, "a");
        assert_eq!(placed[1].1.0, "b");
        assert_eq!(placed[3].1.0, "a");
    }

    #[test]
    fn round_robin_continues_across_passes() {
        let ws = vec![worker("a", &[], 10), worker("b", &[], 10), worker("c", &[], 10)];
        let mut cursor = 0;
        let first = place(Strategy::RoundRobin, &tasks(&["x"]), &ws, &mut cursor);
        let second = place(Strategy::RoundRobin, &tasks(&["x"]), &ws, &mut cursor);
        let third = place(Strategy::RoundRobin, &tasks(&["x"]), &ws, &mut cursor);
        assert_eq!([&first[0].1.0, &second[0].1.0, &third[0].1.0], ["a", "b", "c"]);
    }

    #[test]
    fn never_exceeds_free_slots() {
        let ws = vec![worker("a", &[], 2), worker("b", &[], 1)];
        let mut cursor = 0;
        let placed = place(Strategy::RoundRobin, &tasks(&["x"; 10]), &ws, &mut cursor);
        assert_eq!(placed.len(), 3);
        let m = per_worker(&placed);
        assert_eq!(m["a"], 2);
        assert_eq!(m["b"], 1);
    }

    #[test]
    fn matches_capabilities_and_leaves_the_rest() {
        let ws = vec![worker("prover", &["prove"], 5), worker("hasher", &["merkle"], 5)];
        let ts = tasks(&["prove", "merkle", "unknown", "prove"]);
        let mut cursor = 0;
        let placed = place(Strategy::RoundRobin, &ts, &ws, &mut cursor);
        assert_eq!(placed.len(), 3);
        for (t, w) in &placed {
            let task = ts.iter().find(|c| c.id == *t).unwrap();
            assert!(ws.iter().find(|x| x.id == *w).unwrap().runs(&task.task_type));
        }
        assert!(!placed.iter().any(|(t, _)| *t == ts[2].id), "nobody runs `unknown`");
    }

    #[test]
    fn earlier_tasks_win_when_capacity_is_short() {
        let ws = vec![worker("a", &[], 2)];
        let ts = tasks(&["x", "x", "x"]);
        let mut cursor = 0;
        let placed = place(Strategy::RoundRobin, &ts, &ws, &mut cursor);
        assert_eq!(placed.iter().map(|p| p.0).collect::<Vec<_>>(), vec![ts[0].id, ts[1].id]);
    }

    #[test]
    fn least_loaded_prefers_the_emptiest_worker() {
        let mut busy = worker("busy", &[], 4);
        busy.in_flight = 3;
        busy.max = 4;
        busy.free = 1;
        let mut idle = worker("idle", &[], 4);
        idle.max = 4;
        let mut cursor = 0;
        let placed = place(Strategy::LeastLoaded, &tasks(&["x"; 4]), &[busy, idle], &mut cursor);
        let m = per_worker(&placed);
        // idle takes tasks while it is less loaded (0/4, 1/4, 2/4 < 3/4); at 3/4 each the tie
        // goes to the first in order.
        assert_eq!((m["idle"], m["busy"]), (3, 1), "{m:?}");
    }

    #[test]
    fn no_workers_places_nothing() {
        let mut cursor = 0;
        assert!(place(Strategy::RoundRobin, &tasks(&["x"]), &[], &mut cursor).is_empty());
    }

    // Property tests: random fleets and queues, both strategies, any cursor.

    const TYPES: [&str; 3] = ["a", "b", "c"];

    /// A worker's shape: capabilities (a subset of `TYPES`; empty means any), size and load.
    /// `free` is what the registry hands out: the slots not in flight.
    fn any_worker() -> impl Gen<Value = (Vec<&'static str>, u32, u32)> {
        (prop::sample::subsequence(TYPES.to_vec(), 0..=TYPES.len()), 0u32..6)
            .prop_flat_map(|(caps, max)| (Just(caps), Just(max), 0..=max))
    }

    fn fleet(shapes: &[(Vec<&'static str>, u32, u32)]) -> Vec<WorkerSlot> {
        shapes
            .iter()
            .enumerate()
            .map(|(i, (caps, max, in_flight))| WorkerSlot {
                id: WorkerId(format!("w{i}")),
                capabilities: caps.iter().map(|c| c.to_string()).collect(),
                free: max - in_flight,
                in_flight: *in_flight,
                max: *max,
                slots: *max,
                labels: Default::default(),
            })
            .collect()
    }

    fn any_types(max: usize) -> impl Gen<Value = Vec<&'static str>> {
        prop::collection::vec(prop::sample::select(TYPES.to_vec()), 0..max)
    }

    fn any_strategy() -> impl Gen<Value = Strategy> {
        prop::sample::select(vec![Strategy::RoundRobin, Strategy::LeastLoaded])
    }

    fn worker_of<'a>(ws: &'a [WorkerSlot], id: &WorkerId) -> &'a WorkerSlot {
        ws.iter().find(|w| w.id == *id).expect("placed on a worker it was given")
    }

    fn task_of<'a>(ts: &'a [Candidate], id: &TaskId) -> (usize, &'a Candidate) {
        ts.iter().enumerate().find(|(_, c)| c.id == *id).expect("placed a task it was given")
    }

    /// Free slots left on each worker after `placed`.
    fn left_after(ws: &[WorkerSlot], placed: &[(TaskId, WorkerId)]) -> HashMap<WorkerId, u32> {
        let mut free: HashMap<WorkerId, u32> = ws.iter().map(|w| (w.id.clone(), w.free)).collect();
        for (_, w) in placed {
            let f = free.get_mut(w).expect("a known worker");
            *f = f.checked_sub(1).expect("never over a worker's free slots");
        }
        free
    }

    proptest! {
        /// For any fleet and queue: never over a worker's free slots, never a task on a worker
        /// without its type, each task at most once and in queue order, and no task left out
        /// while a worker that runs it has room (so everything is placed when capacity
        /// suffices).
        #[test]
        fn invariants_hold_over_many_shapes(
            shapes in prop::collection::vec(any_worker(), 0..6),
            types in any_types(14),
            strategy in any_strategy(),
            cursor in 0usize..8,
        ) {
            let ws = fleet(&shapes);
            let ts = tasks(&types);
            let mut cursor = cursor;
            let placed = place(strategy, &ts, &ws, &mut cursor);
            let left = left_after(&ws, &placed);
            let mut last = None;
            for (t, w) in &placed {
                let (i, task) = task_of(&ts, t);
                prop_assert!(last < Some(i), "each task once, in queue order");
                last = Some(i);
                prop_assert!(worker_of(&ws, w).runs(&task.task_type), "{} on {:?}", task.task_type, w);
            }
            let placed_ids: HashSet<TaskId> = placed.iter().map(|(t, _)| *t).collect();
            for t in ts.iter().filter(|t| !placed_ids.contains(&t.id)) {
                prop_assert!(
                    ws.iter().all(|w| !w.runs(&t.task_type) || left[&w.id] == 0),
                    "{} left out while a worker that runs it has room", t.task_type
                );
            }
        }

        /// Earlier tasks win when capacity is short: once a task is left out, no later task of
        /// the same type is placed; with one type and capable workers, the placed tasks are
        /// exactly the head of the queue.
        #[test]
        fn earlier_tasks_win_when_capacity_is_short_for_any_shape(
            shapes in prop::collection::vec(any_worker(), 0..6),
            types in any_types(20),
            strategy in any_strategy(),
            cursor in 0usize..8,
        ) {
            let ws = fleet(&shapes);
            let ts = tasks(&types);
            let placed = place(strategy, &ts, &ws, &mut cursor.clone());
            let placed_ids: HashSet<TaskId> = placed.iter().map(|(t, _)| *t).collect();
            for (i, t) in ts.iter().enumerate().filter(|(_, t)| !placed_ids.contains(&t.id)) {
                prop_assert!(
                    ts[i + 1..].iter().all(|later| later.task_type != t.task_type || !placed_ids.contains(&later.id)),
                    "a later {} was placed after an earlier one was left out", t.task_type
                );
            }
            let one_type = tasks(&vec!["a"; types.len()]);
            let capacity: u32 = ws.iter().filter(|w| w.runs("a")).map(|w| w.free).sum();
            let placed = place(strategy, &one_type, &ws, &mut cursor.clone());
            let head: Vec<TaskId> = one_type.iter().take(capacity as usize).map(|t| t.id).collect();
            prop_assert_eq!(placed.iter().map(|(t, _)| *t).collect::<Vec<_>>(), head);
        }

        /// Every task is placed when the workers that run its type have room for all of them:
        /// here each worker runs one type, so types do not compete for a slot.
        #[test]
        fn every_task_is_placed_when_capable_capacity_suffices(
            shapes in prop::collection::vec((prop::sample::select(TYPES.to_vec()), 0u32..6), 0..6),
            types in any_types(20),
            strategy in any_strategy(),
            cursor in 0usize..8,
        ) {
            let ws: Vec<WorkerSlot> =
                shapes.iter().enumerate().map(|(i, (t, free))| worker(&format!("w{i}"), &[*t], *free)).collect();
            // The queue, cut to what the workers of each type have room for.
            let mut room: HashMap<&str, u32> =
                TYPES.iter().map(|ty| (*ty, ws.iter().filter(|w| w.runs(ty)).map(|w| w.free).sum())).collect();
            let fitting: Vec<&str> = types
                .into_iter()
                .filter(|ty| {
                    let r = room.get_mut(ty).unwrap();
                    r.checked_sub(1).map(|left| *r = left).is_some()
                })
                .collect();
            let ts = tasks(&fitting);
            let placed = place(strategy, &ts, &ws, &mut cursor.clone());
            prop_assert_eq!(placed.len(), ts.len());
        }

        /// Round-robin is fair among equal workers: when every worker runs every type and has
        /// room, the counts per worker differ by at most one, within a pass and over passes that
        /// carry the cursor.
        #[test]
        fn round_robin_is_fair_among_equal_workers(
            n in 1usize..7,
            passes in prop::collection::vec(0usize..15, 1..5),
            cursor in 0usize..7,
        ) {
            let total: usize = passes.iter().sum();
            let ws: Vec<WorkerSlot> = (0..n).map(|i| worker(&format!("w{i}"), &[], total as u32)).collect();
            let mut cursor = cursor % n;
            let mut overall: HashMap<String, usize> = HashMap::new();
            for k in passes {
                let placed = place(Strategy::RoundRobin, &tasks(&vec!["x"; k]), &ws, &mut cursor);
                prop_assert_eq!(placed.len(), k);
                let counts = per_worker(&placed);
                let spread = |m: &HashMap<String, usize>| {
                    let c: Vec<usize> = ws.iter().map(|w| m.get(&w.id.0).copied().unwrap_or(0)).collect();
                    c.iter().max().unwrap() - c.iter().min().unwrap()
                };
                prop_assert!(spread(&counts) <= 1, "one pass: {:?}", counts);
                for (w, c) in counts {
                    *overall.entry(w).or_default() += c;
                }
                prop_assert!(spread(&overall) <= 1, "over passes: {:?}", overall);
            }
        }

        /// Least-loaded puts each task on a worker whose load relative to its size is lowest
        /// among the workers that can take it, counting the tasks placed before it in the pass.
        #[test]
        fn least_loaded_picks_the_emptiest(
            shapes in prop::collection::vec(any_worker(), 0..6),
            types in any_types(14),
        ) {
            let ws = fleet(&shapes);
            let ts = tasks(&types);
            let placed = place(Strategy::LeastLoaded, &ts, &ws, &mut 0);
            let mut load: HashMap<WorkerId, u32> = ws.iter().map(|w| (w.id.clone(), w.in_flight)).collect();
            let mut free: HashMap<WorkerId, u32> = ws.iter().map(|w| (w.id.clone(), w.free)).collect();
            for (t, chosen) in &placed {
                let task = task_of(&ts, t).1;
                let c = worker_of(&ws, chosen);
                for other in ws.iter().filter(|w| free[&w.id] > 0 && w.runs(&task.task_type)) {
                    // load(c) / max(c) <= load(other) / max(other), without division.
                    let mine = u64::from(load[&c.id]) * u64::from(other.max.max(1));
                    let theirs = u64::from(load[&other.id]) * u64::from(c.max.max(1));
                    prop_assert!(mine <= theirs, "{:?} chosen over emptier {:?}", c.id, other.id);
                }
                *load.get_mut(chosen).unwrap() += 1;
                *free.get_mut(chosen).unwrap() -= 1;
            }
        }

        /// Placement is a pure function: the same inputs give the same assignments and cursor.
        #[test]
        fn placement_is_deterministic(
            shapes in prop::collection::vec(any_worker(), 0..6),
            types in any_types(14),
            strategy in any_strategy(),
            cursor in 0usize..8,
        ) {
            let ws = fleet(&shapes);
            let ts = tasks(&types);
            let (mut c1, mut c2) = (cursor, cursor);
            let first = place(strategy, &ts, &ws, &mut c1);
            let second = place(strategy, &ts, &ws, &mut c2);
            prop_assert_eq!(first, second);
            prop_assert_eq!(c1, c2);
        }
    }

    // Labels, weights, type limits and affinity.

    fn labelled(id: &str, labels: &[(&str, &str)], free: u32) -> WorkerSlot {
        let mut w = worker(id, &[], free);
        w.labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        w
    }

    fn needing(task_type: &str, requires: &[&str], weight: u32, key: Option<&str>) -> Candidate {
        Candidate {
            id: TaskId::new(),
            task_type: task_type.into(),
            priority: 0,
            needs: Needs {
                requires: requires.iter().map(|r| Requirement::parse(r).unwrap()).collect(),
                weight,
                affinity_key: key.map(Into::into),
            },
        }
    }

    #[test]
    fn a_task_goes_only_to_a_worker_with_the_labels_it_requires() {
        let ws = vec![
            labelled("a100", &[("gpu", "a100"), ("mem_gb", "512")], 4),
            labelled("h100-small", &[("gpu", "h100"), ("mem_gb", "128")], 4),
            labelled("h100", &[("gpu", "h100"), ("mem_gb", "512")], 4),
        ];
        let ts = vec![needing("prove", &["gpu=h100", "mem_gb>=256"], 1, None); 3];
        let placed = place(Strategy::RoundRobin, &ts, &ws, &mut 0);
        assert_eq!(placed.len(), 3);
        assert!(placed.iter().all(|(_, w)| w.0 == "h100"), "{placed:?}");
        let nobody = needing("prove", &["gpu=b200"], 1, None);
        assert!(place(Strategy::RoundRobin, &[nobody], &ws, &mut 0).is_empty());
    }

    #[test]
    fn a_heavy_task_takes_as_many_slots_as_it_weighs() {
        let ws = vec![worker("a", &[], 3), worker("b", &[], 4)];
        let ts = vec![needing("x", &[], 4, None), needing("x", &[], 2, None), needing("x", &[], 2, None)];
        let placed = place(Strategy::RoundRobin, &ts, &ws, &mut 0);
        // 4 fits only b; a 2 then fits a; the last 2 fits nowhere (a has 1 left, b none).
        let on: Vec<&str> = placed.iter().map(|(_, w)| w.0.as_str()).collect();
        assert_eq!(on, ["b", "a"]);
    }

    /// A prefetch queue holds tasks beyond the slots, but a task never weighs more than the
    /// slots it would run in.
    #[test]
    fn a_task_heavier_than_a_workers_slots_never_goes_there_whatever_its_queue() {
        let mut w = worker("a", &[], 4);
        w.slots = 2;
        let ts = vec![needing("x", &[], 3, None), needing("x", &[], 2, None), needing("x", &[], 2, None)];
        let placed = place(Strategy::RoundRobin, &ts, &[w], &mut 0);
        assert_eq!(placed.iter().map(|p| p.0).collect::<Vec<_>>(), [ts[1].id, ts[2].id]);
    }

    #[test]
    fn a_type_limit_caps_a_pass_and_other_types_go_on() {
        let ws = vec![worker("a", &[], 10)];
        let ts = tasks(&["licensed", "licensed", "licensed", "free", "licensed", "free"]);
        let limits = HashMap::from([("licensed".to_string(), 2)]);
        let placed = super::place(Strategy::RoundRobin, &ts, &ws, &mut 0, &limits).placed;
        let ids: Vec<TaskId> = placed.iter().map(|p| p.0).collect();
        assert_eq!(ids, [ts[0].id, ts[1].id, ts[3].id, ts[5].id]);
        let none = HashMap::from([("licensed".to_string(), 0)]);
        assert_eq!(super::place(Strategy::RoundRobin, &ts, &ws, &mut 0, &none).placed.len(), 2);
    }

    #[test]
    fn tasks_with_one_affinity_key_share_a_worker_while_it_has_room() {
        let ws: Vec<WorkerSlot> = (0..8).map(|i| worker(&format!("w{i}"), &[], 5)).collect();
        let ts = vec![needing("x", &[], 1, Some("circuit-7")); 5];
        let out = super::place(Strategy::RoundRobin, &ts, &ws, &mut 0, &HashMap::new());
        let on: HashSet<&WorkerId> = out.placed.iter().map(|(_, w)| w).collect();
        assert_eq!(on.len(), 1, "{:?}", out.placed);
        assert_eq!((out.affinity_hits, out.affinity_misses), (5, 0));
        // Two more than it has room for: they go elsewhere at once.
        let ts = vec![needing("x", &[], 1, Some("circuit-7")); 7];
        let out = super::place(Strategy::RoundRobin, &ts, &ws, &mut 0, &HashMap::new());
        assert_eq!(out.placed.len(), 7);
        assert_eq!((out.affinity_hits, out.affinity_misses), (5, 2));
    }

    const GPUS: [&str; 3] = ["h100", "a100", ""];
    const MEMS: [&str; 4] = ["64", "256", "512", ""];
    const REQUIREMENTS: [&str; 5] = ["gpu=h100", "gpu=a100", "mem_gb>=256", "mem_gb>=100", "zone=eu"];
    const KEYS: [&str; 4] = ["", "k1", "k2", "k3"];

    /// A worker's shape with labels: capabilities, size, load, gpu and memory (empty: no label).
    type LabelledShape = ((Vec<&'static str>, u32, u32), &'static str, &'static str);

    fn any_labelled_worker() -> impl Gen<Value = LabelledShape> {
        (any_worker(), prop::sample::select(GPUS.to_vec()), prop::sample::select(MEMS.to_vec()))
    }

    fn labelled_fleet(shapes: &[LabelledShape]) -> Vec<WorkerSlot> {
        let plain: Vec<_> = shapes.iter().map(|(s, _, _)| s.clone()).collect();
        let mut ws = fleet(&plain);
        for (i, (w, (_, gpu, mem))) in ws.iter_mut().zip(shapes).enumerate() {
            // Some with a prefetch queue: fewer slots than assignments they take.
            w.slots = w.max.saturating_sub((i % 3) as u32);
            for (k, v) in [("gpu", gpu), ("mem_gb", mem)] {
                if !v.is_empty() {
                    w.labels.insert(k.into(), v.to_string());
                }
            }
        }
        ws
    }

    /// A task: type, requirements (a subset of `REQUIREMENTS`), weight and affinity key.
    fn any_needing_task() -> impl Gen<Value = Candidate> {
        (
            prop::sample::select(TYPES.to_vec()),
            prop::sample::subsequence(REQUIREMENTS.to_vec(), 0..=2),
            1u32..4,
            prop::sample::select(KEYS.to_vec()),
        )
            .prop_map(|(t, req, weight, key)| needing(t, &req, weight, Some(key).filter(|k| !k.is_empty())))
    }

    fn any_limits() -> impl Gen<Value = HashMap<String, u32>> {
        prop::collection::hash_map(prop::sample::select(TYPES.to_vec()).prop_map(String::from), 0u32..4, 0..3)
    }

    proptest! {
        /// For any fleet with labels, any queue with requirements, weights and affinity keys, and
        /// any type limits: never a task on an ineligible worker, never over a worker's free
        /// slots counting weights, never over a type's limit, each task at most once in queue
        /// order; a task is left out only when its type's limit is used up or no eligible worker
        /// has room for its weight; and a task whose preferred worker had room went there.
        #[test]
        fn placement_honours_labels_weights_limits_and_affinity(
            shapes in prop::collection::vec(any_labelled_worker(), 0..7),
            ts in prop::collection::vec(any_needing_task(), 0..16),
            limits in any_limits(),
            strategy in any_strategy(),
            cursor in 0usize..8,
        ) {
            let ws = labelled_fleet(&shapes);
            let out = super::place(strategy, &ts, &ws, &mut cursor.clone(), &limits);
            let on: HashMap<TaskId, WorkerId> = out.placed.iter().cloned().collect();
            prop_assert_eq!(on.len(), out.placed.len(), "each task once");
            let mut last = None;
            for (t, _) in &out.placed {
                let (i, _) = task_of(&ts, t);
                prop_assert!(last < Some(i), "in queue order");
                last = Some(i);
            }
            // Replay the queue in order: the free slots and limits each task met.
            let mut free: HashMap<WorkerId, u32> = ws.iter().map(|w| (w.id.clone(), w.free)).collect();
            let mut started: HashMap<&str, u32> = HashMap::new();
            let (mut hits, mut misses) = (0, 0);
            for task in &ts {
                let weight = task.needs.weight;
                let limit_left = limits.get(&task.task_type).map(|l| l - started.get(task.task_type.as_str()).copied().unwrap_or(0));
                let preferred = task.needs.affinity_key.as_deref().and_then(|k| {
                    ws.iter().filter(|w| w.eligible(task)).max_by_key(|w| rendezvous(k, &w.id))
                });
                match on.get(&task.id) {
                    Some(w) => {
                        let worker = worker_of(&ws, w);
                        prop_assert!(worker.eligible(task), "{:?} on ineligible {:?}", task.needs, worker);
                        prop_assert!(limit_left != Some(0), "over the limit of {}", task.task_type);
                        let f = free.get_mut(w).unwrap();
                        prop_assert!(*f >= weight, "over the free slots of {:?}", w);
                        if let Some(p) = preferred {
                            if free[&p.id] >= weight {
                                prop_assert_eq!(&p.id, w, "the preferred worker had room");
                                hits += 1;
                            } else {
                                misses += 1;
                            }
                        }
                        *free.get_mut(w).unwrap() -= weight;
                        *started.entry(task.task_type.as_str()).or_default() += 1;
                    }
                    None => prop_assert!(
                        limit_left == Some(0)
                            || ws.iter().all(|w| !w.eligible(task) || free[&w.id] < weight),
                        "{:?} left out while an eligible worker had room", task
                    ),
                }
            }
            prop_assert_eq!((out.affinity_hits, out.affinity_misses), (hits, misses));
        }

        /// The key's preferred worker stays the same when another worker leaves or joins.
        #[test]
        fn a_key_keeps_its_worker_when_others_come_and_go(
            n in 2usize..40,
            gone in 0usize..40,
            key in "[a-z0-9]{1,12}",
        ) {
            let ids: Vec<WorkerId> = (0..n).map(|i| WorkerId(format!("worker-{i}"))).collect();
            let best = |ids: &[WorkerId]| ids.iter().max_by_key(|w| rendezvous(&key, w)).cloned();
            let preferred = best(&ids).unwrap();
            let gone = gone % n;
            prop_assume!(ids[gone] != preferred);
            let mut fewer = ids.clone();
            fewer.remove(gone);
            prop_assert_eq!(best(&fewer), Some(preferred));
        }
    }
}
