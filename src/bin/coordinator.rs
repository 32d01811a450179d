//! `coordinator -config configs/coordinator.yaml`: the coordinator server.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::Parser;
use coordinator::{
    app::{self, App},
    config::{self, Config},
    telemetry,
};
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// Streaming task-push coordinator: stores tasks in Postgres (or SQLite) and pushes them to
/// workers over gRPC streams.
#[derive(Debug, Parser)]
#[command(name = "coordinator", version)]
struct Cli {
    /// Configuration file (`-config FILE` works too).
    #[arg(long, short = 'c', default_value = config::DEFAULT_CONFIG_PATH)]
    config: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse_from(config::normalize_args(std::env::args()));
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
        Err(e) => return fail(format!("{e:#}")),
    };
    let http = match app::bind(http_addr, "coordinator.http_port").await {
        Ok(l) => l,
        Err(e) => return fail(format!("{e:#}")),
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(signals(shutdown.clone()));
    match app.serve(grpc, http, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(format!("{e:#}")),
    }
}

/// First SIGINT or SIGTERM starts the graceful shutdown; a second one exits at once.
async fn signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        warn!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    shutdown.cancel();
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    warn!("second signal: exiting now");
    std::process::exit(130);
}
