//! `coordinator -config configs/coordinator.yaml`: the coordinator server.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use coordinator::{
    app::{self, App},
    config::{self, Config, LogFormat},
    error_text, telemetry,
    worker::{Worker, WorkerOptions, handlers::Handlers},
};
use tokio_util::sync::CancellationToken;

/// Streaming task-push coordinator: stores tasks in Postgres (or SQLite) and pushes them to
/// workers over gRPC streams.
#[derive(Debug, Parser)]
#[command(name = "coordinator", version)]
struct Cli {
    /// Configuration file (`-config FILE` works too).
    #[arg(long, short = 'c', default_value = config::DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Try it in one command: a coordinator on an embedded SQLite database plus local workers
    /// with the built-in handlers, until Ctrl-C.
    Dev {
        /// Keep the database in a temporary directory, deleted on exit (default: ./data/).
        #[arg(long)]
        ephemeral: bool,
        /// Local workers to start.
        #[arg(long, default_value_t = 3)]
        workers: u32,
        /// Tasks each local worker runs at once.
        #[arg(long, default_value_t = 2)]
        max_concurrent: u32,
        #[arg(long, default_value_t = 9090)]
        grpc_port: u16,
        #[arg(long, default_value_t = 8090)]
        http_port: u16,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse_from(config::normalize_args(std::env::args()));
    if let Some(Command::Dev { ephemeral, workers, max_concurrent, grpc_port, http_port }) = cli.command {
        return dev(ephemeral, workers, max_concurrent, grpc_port, http_port);
    }
    let config = match Config::load(&cli.config, &config::process_env()) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    telemetry::init(&config.logging);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    runtime.block_on(run(config))
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("coordinator: {message}");
    ExitCode::FAILURE
}

/// `coordinator dev`: SQLite, loopback ports, local workers, example commands.
fn dev(ephemeral: bool, workers: u32, max_concurrent: u32, grpc_port: u16, http_port: u16) -> ExitCode {
    let mut config = Config::default();
    config.coordinator.id = "coordinator-dev".into();
    config.coordinator.bind_address = [127, 0, 0, 1].into();
    config.coordinator.grpc_port = grpc_port;
    config.coordinator.http_port = http_port;
    config.coordinator.poll_interval = std::time::Duration::from_secs(1);
    config.coordinator.heartbeat_timeout = std::time::Duration::from_secs(15);
    config.coordinator.stale_task_timeout = std::time::Duration::from_secs(60);
    config.coordinator.cleanup_interval = std::time::Duration::from_secs(10);
    config.logging.format = LogFormat::Text;
    config.logging.level = "info,sqlx=warn".into();
    // Loopback only, for trying things out: no tokens to set up (a warning says so at start).
    config.auth.enabled = false;
    let temp = if ephemeral {
        match tempfile::tempdir() {
            Ok(d) => Some(d),
            Err(e) => return fail(format!("cannot create a temporary directory: {e}")),
        }
    } else {
        None
    };
    config.database.url = match &temp {
        Some(d) => format!("sqlite://{}", d.path().join("coordinator.db").display()),
        None => "sqlite://data/coordinator.db".into(),
    };
    if let Err(e) = config.validate() {
        return fail(e);
    }
    telemetry::init(&config.logging);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    runtime.block_on(async move {
        let ip = config.coordinator.bind_address;
        let database = config.database.url.clone();
        let app = match App::connect(config).await {
            Ok(app) => app,
            Err(e) => return fail(e),
        };
        let grpc = match app::bind(SocketAddr::new(ip, grpc_port), "--grpc-port").await {
            Ok(l) => l,
            Err(e) => return fail(error_text::anyhow_line(&e)),
        };
        let http = match app::bind(SocketAddr::new(ip, http_port), "--http-port").await {
            Ok(l) => l,
            Err(e) => return fail(error_text::anyhow_line(&e)),
        };
        let (grpc_addr, http_addr) = (grpc.local_addr().ok(), http.local_addr().ok());
        let shutdown = CancellationToken::new();
        tokio::spawn(app::shutdown_on_signals(shutdown.clone()));
        let stop_server = CancellationToken::new();
        let server = tokio::spawn(app.serve(grpc, http, stop_server.clone()));
        let endpoint = format!("http://{}", grpc_addr.map(|a| a.to_string()).unwrap_or_default());
        let stop_workers = CancellationToken::new();
        let mut local = Vec::new();
        for i in 1..=workers {
            let handlers = match Handlers::builtin(&builtin_names()) {
                Ok(h) => h,
                Err(e) => return fail(e),
            };
            let mut o = WorkerOptions::new(endpoint.clone(), format!("dev-worker-{i}"));
            o.max_concurrent = max_concurrent;
            o.capabilities = handlers.task_types();
            match Worker::new(o, std::sync::Arc::new(handlers)) {
                Ok(w) => local.push(tokio::spawn(w.run(stop_workers.clone()))),
                Err(e) => return fail(error_text::anyhow_line(&e)),
            }
        }
        println!(
            "\ncoordinator dev is running\n  gRPC     {endpoint}\n  HTTP     http://{}\n  database {database}\n  workers  {workers} local (dev-worker-1..{workers}), handlers: {}\n\ntry:\n  coordctl primes --low 0 --high 100000 --slices 8\n  coordctl is-prime 17 18 19\n  coordctl submit --type echo --payload hello --wait\n  coordctl workers\n  curl -s http://{}/health\n\nCtrl-C stops it.\n",
            http_addr.map(|a| a.to_string()).unwrap_or_default(),
            builtin_names().join(", "),
            http_addr.map(|a| a.to_string()).unwrap_or_default(),
        );
        // Ctrl-C: the local workers drain first (their results land), then the coordinator.
        shutdown.cancelled().await;
        stop_workers.cancel();
        for w in local {
            let _ = w.await;
        }
        stop_server.cancel();
        let result = server.await;
        drop(temp);
        match result {
            Ok(Ok(())) => ExitCode::SUCCESS,
            Ok(Err(e)) => fail(error_text::anyhow_line(&e)),
            Err(e) => fail(e),
        }
    })
}

fn builtin_names() -> Vec<String> {
    coordinator::worker::handlers::BUILTIN.iter().map(|s| s.to_string()).collect()
}

async fn run(config: Config) -> ExitCode {
    let ip = config.coordinator.bind_address;
    let grpc_addr = SocketAddr::new(ip, config.coordinator.grpc_port);
    let http_addr = SocketAddr::new(ip, config.coordinator.http_port);
    let app = match App::connect(config).await {
        Ok(app) => app,
        Err(e) => return fail(e),
    };
    let grpc = match app::bind(grpc_addr, "coordinator.grpc_port").await {
        Ok(l) => l,
        Err(e) => return fail(error_text::anyhow_line(&e)),
    };
    let http = match app::bind(http_addr, "coordinator.http_port").await {
        Ok(l) => l,
        Err(e) => return fail(error_text::anyhow_line(&e)),
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(app::shutdown_on_signals(shutdown.clone()));
    match app.serve(grpc, http, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(error_text::anyhow_line(&e)),
    }
}
