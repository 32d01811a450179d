//! `worker -config configs/worker.yaml`: registers with a coordinator, runs the tasks pushed to
//! it through the enabled handlers, and drains on SIGTERM.

use std::{path::PathBuf, process::ExitCode, sync::Arc};

use clap::Parser;
use coordinator::{app, config::normalize_args, error_text, telemetry, worker_config::WorkerConfig};
use coordinator_worker::{Persistent, Worker, handlers::Handlers};
use tokio_util::sync::CancellationToken;
use tracing::info;

/// A worker of the coordinator's fleet.
#[derive(Debug, Parser)]
#[command(name = "worker", version)]
struct Cli {
    /// Configuration file (`-config FILE` works too). Flags and environment win over it.
    #[arg(long, short = 'c', env = "WORKER_CONFIG")]
    config: Option<PathBuf>,
    /// Coordinator gRPC URL, e.g. http://coordinator:9090.
    #[arg(long, env = "WORKER_COORDINATOR")]
    coordinator: Option<String>,
    /// Worker id (default: hostname plus a short random suffix).
    #[arg(long, env = "WORKER_ID")]
    worker_id: Option<String>,
    /// Tasks run at once.
    #[arg(long, env = "WORKER_MAX_CONCURRENT")]
    max_concurrent: Option<u32>,
    /// Assignments queued beyond max_concurrent (short tasks only; 0: none).
    #[arg(long, env = "WORKER_PREFETCH")]
    prefetch: Option<u32>,
    /// Built-in handlers to enable, comma-separated (echo,noop,sleep,prime_count,is_prime,merkle_proof,sum_counts).
    #[arg(long, env = "WORKER_HANDLERS", value_delimiter = ',')]
    handlers: Option<Vec<String>>,
    /// Bearer token (the worker role). Prefer WORKER_TOKEN or --token-file: flags show in `ps`.
    #[arg(long, env = "WORKER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the bearer token.
    #[arg(long)]
    token_file: Option<String>,
    /// PEM CA bundle that signed the coordinator's certificate (use an https:// URL).
    #[arg(long)]
    ca_file: Option<String>,
    /// PEM client certificate naming this worker's id, for mTLS.
    #[arg(long)]
    cert_file: Option<String>,
    /// PEM key of --cert-file.
    #[arg(long)]
    key_file: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse_from(normalize_args(std::env::args()));
    let mut config = match &cli.config {
        Some(path) => match WorkerConfig::load(path) {
            Ok(c) => c,
            Err(e) => return fail(e),
        },
        None => WorkerConfig::default(),
    };
    if let Some(v) = cli.coordinator {
        config.coordinator = v;
    }
    if let Some(v) = cli.worker_id {
        config.worker_id = v;
    }
    if let Some(v) = cli.max_concurrent {
        config.max_concurrent = v;
    }
    if let Some(v) = cli.prefetch {
        config.prefetch = v;
    }
    if let Some(v) = cli.handlers {
        config.handlers = v.into_iter().filter(|s| !s.is_empty()).collect();
    }
    for (flag, field) in [
        (cli.token_file, &mut config.token_file),
        (cli.ca_file, &mut config.tls.ca_file),
        (cli.cert_file, &mut config.tls.cert_file),
        (cli.key_file, &mut config.tls.key_file),
    ] {
        if let Some(v) = flag {
            *field = v;
        }
    }
    if let Err(e) = config.validate() {
        return fail(e);
    }
    let security = match config.security(cli.token) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    // The trace exporter's connection lives on the runtime; flushed after the drain below.
    if let Err(e) = runtime.block_on(async { telemetry::init_with_traces(&config.logging, "worker") }) {
        return fail(e);
    }
    let mut handlers = match Handlers::builtin(&config.handlers) {
        Ok(h) => h,
        Err(e) => return fail(format!("handlers: {e}")),
    };
    for exec in config.exec_configs() {
        handlers = handlers.with_exec(exec);
    }
    let worker_id = config.resolved_worker_id();
    runtime.block_on(async move {
        // Prover processes start with the worker, so their start-up overlaps registration.
        let mut provers = Vec::new();
        for (i, p) in config.persistent_configs().into_iter().enumerate() {
            let task_type = p.task_type.clone();
            match Persistent::start(p) {
                Ok(prover) => {
                    handlers = handlers.with(task_type, Arc::new(prover.clone()));
                    provers.push(prover);
                }
                Err(e) => return fail(format!("persistent[{i}]: {}", error_text::one_line(&e))),
            }
        }
        let capabilities = handlers.task_types();
        let mut options = config.options(worker_id.clone(), capabilities.clone());
        options.security = security;
        let worker = match Worker::new(options, Arc::new(handlers)) {
            Ok(w) => w,
            Err(e) => return fail(format!("coordinator: {}", error_text::one_line(&e))),
        };
        info!(%worker_id, coordinator = %config.coordinator, ?capabilities, max_concurrent = config.max_concurrent,
              "worker starting");
        let shutdown = CancellationToken::new();
        tokio::spawn(app::shutdown_on_signals(shutdown.clone()));
        let outcome = worker.run(shutdown).await;
        // The worker has drained: no task runs any more.
        for prover in &provers {
            prover.shutdown().await;
        }
        telemetry::shutdown(std::time::Duration::from_secs(5)).await;
        match outcome {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(error_text::one_line(&e)),
        }
    })
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("worker: {message}");
    ExitCode::FAILURE
}
