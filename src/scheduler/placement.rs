//! Placement: a pure function from runnable tasks and worker snapshots to assignments. No I/O;
//! the scheduler loop does the claiming and the pushing.

use crate::{
    config::Strategy,
    domain::{Candidate, TaskId, WorkerId},
};

/// A worker as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerSlot {
    pub id: WorkerId,
    /// Task types it runs; empty means any.
    pub capabilities: Vec<String>,
    /// Slots free now.
    pub free: u32,
    pub in_flight: u32,
    pub max: u32,
}

impl WorkerSlot {
    pub fn runs(&self, task_type: &str) -> bool {
        self.capabilities.is_empty() || self.capabilities.iter().any(|c| c == task_type)
    }
}

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
    use std::collections::HashMap;

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

    /// A small deterministic property check: for many random-ish shapes, placement never
    /// exceeds capacity, never mismatches a type, and places each task at most once.
    #[test]
    fn invariants_hold_over_many_shapes() {
        let types = ["a", "b", "c"];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..500 {
            let nw = (next() % 5) as usize;
            let ws: Vec<WorkerSlot> = (0..nw)
                .map(|i| {
                    let caps: Vec<&str> = types.iter().copied().filter(|_| next() % 2 == 0).collect();
                    worker(&format!("w{i}"), &caps, (next() % 4) as u32)
                })
                .collect();
            let ts: Vec<Candidate> = (0..(next() % 12))
                .map(|_| Candidate {
                    id: TaskId::new(),
                    task_type: types[(next() % 3) as usize].into(),
                    priority: 0,
                })
                .collect();
            for strategy in [Strategy::RoundRobin, Strategy::LeastLoaded] {
                let mut cursor = (next() % 7) as usize;
                let placed = place(strategy, &ts, &ws, &mut cursor);
                let m = per_worker(&placed);
                for w in &ws {
                    assert!(m.get(&w.id.0).copied().unwrap_or(0) as u32 <= w.free);
                }
                let mut seen = std::collections::HashSet::new();
                for (t, w) in &placed {
                    assert!(seen.insert(*t), "task placed twice");
                    let task = ts.iter().find(|c| c.id == *t).unwrap();
                    assert!(ws.iter().find(|x| x.id == *w).unwrap().runs(&task.task_type));
                }
                // Maximality for round robin: a task left out has no eligible worker with room.
                if strategy == Strategy::RoundRobin {
                    let mut free: HashMap<&str, u32> = ws.iter().map(|w| (w.id.0.as_str(), w.free)).collect();
                    for (_, w) in &placed {
                        *free.get_mut(w.0.as_str()).unwrap() -= 1;
                    }
                    for t in ts.iter().filter(|t| !seen.contains(&t.id)) {
                        assert!(ws.iter().all(|w| !w.runs(&t.task_type) || free[w.id.0.as_str()] == 0));
                    }
                }
            }
        }
    }
}
