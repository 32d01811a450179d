//! The cost of placement at fleet size: one scheduler pass's worth of tasks (1,000) placed on
//! 1,000 workers, plain round-robin against the same with label requirements, weights and
//! affinity keys, and the worker shapes a claim carries. Pure computation, no database.
//!
//! `cargo bench --bench placement` prints the median of 21 runs of each.

use std::{
    collections::{BTreeMap, HashMap},
    hint::black_box,
    time::{Duration, Instant},
};

use coordinator::{
    config::Strategy,
    domain::{Candidate, Needs, Requirement, TaskId, WorkerId, WorkerSlot},
    scheduler::placement::place,
    store::Shapes,
};

const WORKERS: usize = 1_000;
const TASKS: usize = 1_000;
const RUNS: usize = 21;

/// 1,000 workers of 8 slots, half of them busy on half their slots; with `labels`, a quarter
/// have an H100 (the rest an A100), memory of 128, 256 or 512 GB, and one of 4 zones.
fn fleet(labels: bool) -> Vec<WorkerSlot> {
    (0..WORKERS)
        .map(|i| {
            let in_flight = if i % 2 == 0 { 4 } else { 0 };
            let mut l = BTreeMap::new();
            if labels {
                l.insert("gpu".to_string(), if i % 4 == 0 { "h100" } else { "a100" }.to_string());
                l.insert("mem_gb".to_string(), ["128", "256", "512"][i % 3].to_string());
                l.insert("zone".to_string(), format!("zone-{}", i % 4));
            }
            WorkerSlot {
                id: WorkerId(format!("worker-{i:04}")),
                capabilities: vec!["prove".into()],
                free: 8 - in_flight,
                in_flight,
                max: 8,
                slots: 8,
                labels: l,
            }
        })
        .collect()
}

/// 1,000 tasks; with `needs`, a quarter require an H100, half 256 GB or more, one in eight
/// weighs 2 slots; with `affinity`, each names one of 100 keys.
fn queue(needs: bool, affinity: bool) -> Vec<Candidate> {
    (0..TASKS)
        .map(|i| {
            let mut n = Needs::default();
            if needs {
                if i % 4 == 0 {
                    n.requires.push(Requirement::parse("gpu=h100").unwrap());
                }
                if i % 2 == 0 {
                    n.requires.push(Requirement::parse("mem_gb>=256").unwrap());
                }
                n.weight = if i % 8 == 0 { 2 } else { 1 };
            }
            if affinity {
                n.affinity_key = Some(format!("circuit-{}", i % 100));
            }
            Candidate { id: TaskId::new(), task_type: "prove".into(), priority: 0, needs: n }
        })
        .collect()
}

fn median(mut f: impl FnMut() -> usize) -> (Duration, usize) {
    let mut times = Vec::with_capacity(RUNS);
    let mut placed = 0;
    for _ in 0..RUNS {
        let start = Instant::now();
        placed = black_box(f());
        times.push(start.elapsed());
    }
    times.sort();
    (times[RUNS / 2], placed)
}

fn main() {
    let limits = HashMap::new();
    let cases: [(&str, bool, bool, bool); 4] = [
        ("plain round-robin", false, false, false),
        ("labels and weights", true, true, false),
        ("affinity keys", false, false, true),
        ("labels, weights and affinity", true, true, true),
    ];
    println!("placement of {TASKS} tasks on {WORKERS} workers (8 slots each), median of {RUNS} runs:");
    let mut plain = Duration::ZERO;
    for (name, labels, needs, affinity) in cases {
        let (workers, tasks) = (fleet(labels), queue(needs, affinity));
        let (t, placed) = median(|| {
            let mut cursor = 0;
            place(Strategy::RoundRobin, black_box(&tasks), black_box(&workers), &mut cursor, &limits)
                .placed
                .len()
        });
        if plain.is_zero() {
            plain = t;
        }
        println!(
            "  {name:<30} {:>8.3} ms per pass, {:>6.2} us per task, {placed} placed, {:.1}x plain",
            t.as_secs_f64() * 1e3,
            t.as_secs_f64() * 1e6 / TASKS as f64,
            t.as_secs_f64() / plain.as_secs_f64()
        );
    }
    for labels in [false, true] {
        let workers = fleet(labels);
        let (t, _) = median(|| Shapes::of(black_box(&workers)).map_or(0, |s| s.0.len()));
        let what = if labels { "with labels" } else { "without labels" };
        println!("  worker shapes for the claim, {what:<16} {:>8.3} ms per pass", t.as_secs_f64() * 1e3);
    }
}
