//! `coordinator -config configs/coordinator.yaml`: the coordinator server.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use coordinator::{
    app::{self, App},
    config::{self, Config, LogFormat},
    error_text, telemetry,
};
use coordinator_worker::{Worker, WorkerOptions, handlers::Handlers};
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
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=10_000))]
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
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    // The trace exporter's connection lives on the runtime; the app flushes it on shutdown.
    if let Err(e) = runtime.block_on(async { telemetry::init_with_traces(&config.logging, "coordinator") }) {
        return fail(e);
    }
    runtime.block_on(run(config))
}

/// An [`App::connect`] failure on one line: a database error as the store words it, a file's
/// with its causes.
fn connect_line(e: &anyhow::Error) -> String {
    match e.downcast_ref::<coordinator::store::StoreError>() {
        Some(store) => store.to_string(),
        None => error_text::anyhow_line(e),
    }
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
            Err(e) => return fail(connect_line(&e)),
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
                Err(e) => return fail(error_text::one_line(&e)),
            }
        }
        let http_addr = http_addr.map(|a| a.to_string()).unwrap_or_default();
        let coordctl = coordctl_hint(&endpoint);
        let mut try_these = String::new();
        for args in [
            "primes --low 0 --high 100000 --slices 8",
            "is-prime 17 18 19",
            "submit --type echo --payload hello --wait",
            "workers",
        ] {
            try_these.push_str(&format!("  {} {args}\n", coordctl.command));
        }
        let local_workers = match workers {
            0 => format!("none started here (--workers 0): start one with `worker --coordinator {endpoint}`"),
            1 => format!("1 local (dev-worker-1), handlers: {}", builtin_names().join(", ")),
            n => format!("{n} local (dev-worker-1..{n}), handlers: {}", builtin_names().join(", ")),
        };
        println!(
            "\ncoordinator dev is running\n  gRPC     {endpoint}\n  HTTP     http://{http_addr}\n  database {database}\n  workers  {local_workers}\n\ntry, in another terminal in this directory:\n{try_these}  curl -s http://{http_addr}/health\n{}\nCtrl-C stops it.\n",
            coordctl.note.map(|n| format!("({n})\n")).unwrap_or_default(),
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

/// coordctl's default `--coordinator`.
const COORDCTL_DEFAULT_ENDPOINT: &str = "http://127.0.0.1:9090";

/// How to run coordctl from here, as the start-up hint prints it.
struct CoordctlHint {
    /// The program (and `--coordinator URL` when `endpoint` is not coordctl's default), ready
    /// to paste into a shell in the current directory.
    command: String,
    /// Said when the coordctl binary is not built yet.
    note: Option<String>,
}

/// The coordctl binary sits beside this one (cargo builds both into the same directory, `cargo
/// install` installs both into one). It is shown as `coordctl` when that is what PATH finds,
/// as a path relative to the current directory when it lies under it (`target/debug/coordctl`
/// from the repository root), and as an absolute path otherwise.
fn coordctl_hint(endpoint: &str) -> CoordctlHint {
    let name = format!("coordctl{}", std::env::consts::EXE_SUFFIX);
    let beside = std::env::current_exe().ok().and_then(|exe| exe.parent().map(|dir| dir.join(&name)));
    let Some(beside) = beside else {
        return CoordctlHint { command: with_endpoint("coordctl".into(), endpoint), note: None };
    };
    let on_path = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|dir| dir.join(&name)).find(|p| p.is_file()));
    let same = |a: &std::path::Path, b: &std::path::Path| matches!((a.canonicalize(), b.canonicalize()), (Ok(a), Ok(b)) if a == b);
    let program = if on_path.is_some_and(|p| same(&p, &beside)) {
        "coordctl".to_owned()
    } else {
        let cwd = std::env::current_dir().ok();
        match cwd.as_deref().and_then(|cwd| beside.strip_prefix(cwd).ok()) {
            Some(rel) if rel.parent().is_some_and(|p| !p.as_os_str().is_empty()) => {
                shell_word(&rel.to_string_lossy())
            }
            Some(rel) => shell_word(&format!("./{}", rel.to_string_lossy())),
            None => shell_word(&beside.to_string_lossy()),
        }
    };
    let note = (!beside.is_file())
        .then(|| format!("{program} is not built yet: `cargo build --bins` builds every binary"));
    CoordctlHint { command: with_endpoint(program, endpoint), note }
}

fn with_endpoint(program: String, endpoint: &str) -> String {
    if endpoint == COORDCTL_DEFAULT_ENDPOINT {
        program
    } else {
        format!("{program} --coordinator {}", shell_word(endpoint))
    }
}

/// `s` as one shell word: as it is when that is safe, else single-quoted.
fn shell_word(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "/._-+:@,=%".contains(c)) {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

fn builtin_names() -> Vec<String> {
    coordinator_worker::handlers::BUILTIN.iter().map(|s| s.to_string()).collect()
}

async fn run(config: Config) -> ExitCode {
    let ip = config.coordinator.bind_address;
    let grpc_addr = SocketAddr::new(ip, config.coordinator.grpc_port);
    let http_addr = SocketAddr::new(ip, config.coordinator.http_port);
    // Ports first, then the files the configuration names, then the database: a mistake in
    // either of the first two is reported before anything is migrated.
    let grpc = match app::bind(grpc_addr, "coordinator.grpc_port").await {
        Ok(l) => l,
        Err(e) => return fail(error_text::anyhow_line(&e)),
    };
    let http = match app::bind(http_addr, "coordinator.http_port").await {
        Ok(l) => l,
        Err(e) => return fail(error_text::anyhow_line(&e)),
    };
    let app = match App::connect(config).await {
        Ok(app) => app,
        Err(e) => return fail(connect_line(&e)),
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(app::shutdown_on_signals(shutdown.clone()));
    match app.serve(grpc, http, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(error_text::anyhow_line(&e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_words_paste_as_one_argument() {
        assert_eq!(shell_word("target/debug/coordctl"), "target/debug/coordctl");
        assert_eq!(shell_word("http://127.0.0.1:9091"), "http://127.0.0.1:9091");
        assert_eq!(shell_word("/home/me/my builds/coordctl"), "'/home/me/my builds/coordctl'");
        assert_eq!(shell_word("it's"), r"'it'\''s'");
        assert_eq!(shell_word(""), "''");
    }

    #[test]
    fn the_coordinator_flag_is_added_only_off_coordctls_default() {
        assert_eq!(with_endpoint("coordctl".into(), COORDCTL_DEFAULT_ENDPOINT), "coordctl");
        assert_eq!(
            with_endpoint("coordctl".into(), "http://127.0.0.1:9091"),
            "coordctl --coordinator http://127.0.0.1:9091"
        );
    }
}
