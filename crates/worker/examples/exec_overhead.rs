//! Per-task overhead of a persistent prover process against a process per task (`exec`), for a
//! prover that loads a large key file at start: the reference prover
//! `examples/persistent/prover.py` (python3 from PATH), the same code both ways (`--once` for
//! exec). Prints the median and p90 time per task of each and their ratio.
//!
//! ```sh
//! cargo run --release -p coordinator-worker --example exec_overhead            # 200 MiB, 50 tasks
//! cargo run --release -p coordinator-worker --example exec_overhead -- 64 20   # 64 MiB, 20 tasks
//! ```

use std::{
    io::Write,
    time::{Duration, Instant},
};

use coordinator_worker::{
    CancellationToken, Handler, Persistent, PersistentConfig, TaskContext,
    handlers::{Exec, ExecConfig},
};

const PROVER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/persistent/prover.py");

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let size_mib: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(200);
    let tasks: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(50);

    let mut key = tempfile::NamedTempFile::new()?;
    let chunk: Vec<u8> = (0..1024 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    for _ in 0..size_mib {
        key.write_all(&chunk)?;
    }
    key.flush()?;
    let key_path = key.path().to_str().ok_or("temp path is not UTF-8")?.to_owned();
    println!("key file: {size_mib} MiB; {tasks} tasks each way; prover: python3 {PROVER}");

    let exec = Exec::new(ExecConfig::new("prove", ["python3", PROVER, "--once", &key_path]));
    // One untimed run first, so both ways start with the file in the page cache.
    run(&exec, 0).await?;
    let per_exec = time_tasks(&exec, tasks).await?;

    let started = Instant::now();
    let mut config = PersistentConfig::new("prove", ["python3", PROVER, &key_path]);
    config.start_timeout = Duration::from_secs(600);
    let persistent = Persistent::start(config)?;
    run(&persistent, 0).await?;
    let start_up = started.elapsed();
    let per_persistent = time_tasks(&persistent, tasks).await?;
    persistent.shutdown().await;

    let (em, e90) = (percentile(&per_exec, 50), percentile(&per_exec, 90));
    let (pm, p90) = (percentile(&per_persistent, 50), percentile(&per_persistent, 90));
    println!("exec, a process per task:  median {:>9.2} ms   p90 {:>9.2} ms", ms(em), ms(e90));
    println!(
        "persistent, one process:   median {:>9.2} ms   p90 {:>9.2} ms   (start-up, once: {:.0} ms)",
        ms(pm),
        ms(p90),
        ms(start_up)
    );
    println!(
        "exec / persistent:         median {:>9.0}x     p90 {:>9.0}x",
        em.as_secs_f64() / pm.as_secs_f64(),
        e90.as_secs_f64() / p90.as_secs_f64()
    );
    Ok(())
}

async fn run(handler: &dyn Handler, i: usize) -> Result<Vec<u8>, String> {
    let task = TaskContext {
        task_id: format!("t-{i}"),
        task_type: "prove".into(),
        payload: format!("witness {i}").into_bytes(),
        attempt: 1,
        deadline: None,
        cancelled: CancellationToken::new(),
        parents: Vec::new(),
    };
    handler.run(task).await.map_err(|e| e.message)
}

async fn time_tasks(handler: &dyn Handler, tasks: usize) -> Result<Vec<Duration>, String> {
    let mut times = Vec::with_capacity(tasks);
    for i in 1..=tasks {
        let started = Instant::now();
        run(handler, i).await?;
        times.push(started.elapsed());
    }
    times.sort();
    Ok(times)
}

/// The `p`th percentile of sorted `times` (nearest rank).
fn percentile(times: &[Duration], p: usize) -> Duration {
    let rank = (times.len() * p).div_ceil(100).max(1);
    times[rank - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
