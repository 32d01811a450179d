//! Placement: a pure function from runnable tasks and worker snapshots to assignments. No I/O;
//! the scheduler loop does the claiming and the pushing.

pub use crate::domain::WorkerSlot;
use crate::{
    config::Strategy,
    domain::{Candidate, TaskId, WorkerId},
};

/// Places `tasks` (already ordered: higher priority, then older, first) on `workers`, never
/// more than a worker's free slots and only where its capabilities include the task's type.
/// Tasks nobody can take now are left out. `cursor` carries the round-robin position across
/// calls so that consecutive passes keep rotating.
pub fn place(
    strategy: Strategy,
    tasks: &[Candidate],
    workers: &[WorkerSlot],
    cursor: &mut usize,
) -> Vec<(TaskId, WorkerId)> {
    let mut free: Vec<u32> = workers.iter().map(|w| w.free).collect();
    let mut load: Vec<u32> = workers.iter().map(|w| w.in_flight).collect();
    let mut out = Vec::with_capacity(tasks.len());
    if workers.is_empty() {
        return out;
    }
    let n = workers.len();
    for task in tasks {
        let eligible = |i: usize, free: &[u32]| free[i] > 0 && workers[i].runs(&task.task_type);
        let chosen = match strategy {
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
        if let Some(i) = chosen {
            free[i] -= 1;
            load[i] += 1;
            out.push((task.id, workers[i].id.clone()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    // The generator trait is renamed: `Strategy` here is the placement strategy.
    use proptest::{
        prelude::{Just, prop},
        prop_assert, prop_assert_eq, proptest,
        strategy::Strategy as Gen,
    };

    use super::*;

    fn worker(id: &str, caps: &[&str], free: u32) -> WorkerSlot {
        WorkerSlot {
            id: WorkerId(id.into()),
            capabilities: caps.iter().map(|s| s.to_string()).collect(),
            free,
            in_flight: 0,
            max: free,
        }
    }

    fn tasks(types: &[&str]) -> Vec<Candidate> {
        types.iter().map(|t| Candidate { id: TaskId::new(), task_type: t.to_string(), priority: 0 }).collect()
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
}
