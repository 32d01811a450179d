//! `coordctl`: the coordinator's client. Submit, read, watch and cancel tasks and jobs, see what
//! failed and retry it, list workers, fan a prime count out over the fleet, and benchmark
//! (`coordctl bench`).
//!
//! # Layering
//! A client of the wire contract (`coordinator-proto`) through the worker SDK's client
//! (`coordinator-worker`); [`bench`](mod@bench) also runs the SDK's workers. The server crate comes in only
//! with the `embedded` feature, for `bench --embedded`.

use std::{io::IsTerminal, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use coordinator_worker::{
    ByteSize,
    client::{Client, ClientSecurity},
    error::{one_line_with, scheme_hint, status_line},
    proto,
};

/// `print!` to stdout, ending the process as [`stdout_failed`] says when stdout is gone.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = write!(std::io::stdout(), $($arg)*) {
            crate::stdout_failed(e);
        }
    }};
}

/// `println!` to stdout, ending the process as [`stdout_failed`] says when stdout is gone.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            crate::stdout_failed(e);
        }
    }};
}

mod bench;
mod fleet_bench;
mod job_file;

use bench::BenchOptions;
use serde_json::json;

/// The heading of the options every command takes, listed apart from its own.
const GLOBAL: &str = "Global options";

/// Client of the coordinator.
#[derive(Debug, Parser)]
#[command(name = "coordctl", version)]
struct Cli {
    /// Coordinator gRPC URL.
    #[arg(long, global = true, help_heading = GLOBAL, env = "COORDCTL_COORDINATOR", default_value = "http://127.0.0.1:9090")]
    coordinator: String,
    /// Machine-readable JSON output.
    #[arg(long, global = true, help_heading = GLOBAL)]
    json: bool,
    /// Bearer token (client or admin role). Prefer COORDCTL_TOKEN or --token-file: flags show
    /// in `ps`.
    #[arg(long, global = true, help_heading = GLOBAL, env = "COORDCTL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the bearer token.
    #[arg(long, global = true, help_heading = GLOBAL, env = "COORDCTL_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// PEM CA bundle that signed the coordinator's certificate (use an https:// URL).
    #[arg(long, global = true, help_heading = GLOBAL, env = "COORDCTL_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// PEM client certificate, for mTLS.
    #[arg(long, global = true, help_heading = GLOBAL, env = "COORDCTL_CERT_FILE")]
    cert_file: Option<PathBuf>,
    /// PEM key of --cert-file.
    #[arg(long, global = true, help_heading = GLOBAL, env = "COORDCTL_KEY_FILE")]
    key_file: Option<PathBuf>,
    /// Largest gRPC message sent or accepted.
    #[arg(long, global = true, help_heading = GLOBAL, default_value = "10MiB")]
    max_message_size: ByteSize,
    #[command(subcommand)]
    cmd: Cmd,
}

/// How `watch` and `submit --wait` end.
const WAIT_EXIT_STATUS: &str = "\
Exit status (watch, and submit --wait):
  0  the task completed
  3  the task failed (out of attempts, or a permanent failure)
  4  the task was cancelled
  1  coordctl could not follow the task to its end (cannot connect, refused, no such task,
     the stream broke); the reason is on stderr
  2  usage error

While the task is pending, why it waits (no connected worker runs its type, every such worker is
busy, backing off after a failure, or queued behind other tasks) is printed to stderr as a
`waiting: ...` line each time the reason changes.";

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Submit a task; prints its id, or its result with --wait.
    ///
    /// A type no connected worker declared is accepted with a warning on stderr (a worker may
    /// register later), unless the coordinator refuses unknown types.
    #[command(after_help = WAIT_EXIT_STATUS)]
    Submit {
        /// The task type; only workers that declared it run the task.
        #[arg(long = "type")]
        task_type: String,
        /// The payload, or @FILE to read it from a file.
        #[arg(long, default_value = "")]
        payload: String,
        /// Higher runs first among pending tasks; may be negative.
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        priority: i32,
        /// Attempts before the task fails for good (0: the coordinator's
        /// tasks.default_max_attempts).
        #[arg(long, default_value_t = 0)]
        max_attempts: u32,
        /// A key of the caller's: a second submission with the same key returns the first
        /// task instead of storing another.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Per-attempt deadline, e.g. 30s or 2h.
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
        /// Run no earlier than this long from now, e.g. 90s or 2h (at most a year).
        #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "run_at")]
        delay: Option<Duration>,
        /// Run no earlier than this time, RFC 3339 (2027-01-02T03:04:05Z).
        #[arg(long, value_parser = parse_rfc3339)]
        run_at: Option<chrono::DateTime<chrono::Utc>>,
        /// A parent task id (repeat for more): the task waits until every parent completed, then
        /// runs with their results.
        #[arg(long = "depends-on")]
        depends_on: Vec<String>,
        /// What the task does when a parent fails for good or is cancelled: fail or cancel.
        #[arg(long, default_value = "fail", value_parser = ["fail", "cancel"])]
        on_parent_failure: String,
        /// A worker label the task needs (repeat for more): key=value, or key>=number for a
        /// numeric minimum, e.g. --requires gpu=h100 --requires mem_gb>=256.
        #[arg(long)]
        requires: Vec<String>,
        /// Slots the task takes on its worker (default 1).
        #[arg(long, default_value_t = 1)]
        weight: u32,
        /// Tasks with the same key go to the same worker while it has room.
        #[arg(long)]
        affinity_key: Option<String>,
        /// Wait until the task ends and print its result; the exit status says how it ended.
        #[arg(long)]
        wait: bool,
    },
    /// Show one task.
    Get {
        task_id: String,
        /// Also show every attempt: worker, times, outcome, error.
        #[arg(long)]
        attempts: bool,
    },
    /// Stream a task's state changes until it ends; the exit status says how it ended.
    ///
    /// Every state the task went through is shown, `running` included for an attempt that ended
    /// before its running mark was written (a fast task).
    #[command(after_help = WAIT_EXIT_STATUS)]
    Watch { task_id: String },
    /// Cancel a task.
    Cancel {
        task_id: String,
        /// Why, kept as the task's error and told to the worker running it.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Retry a failed or cancelled task (admin), or, with filters and no id, every failed task
    /// they pick out.
    ///
    /// A retried task is pending again with a fresh attempts budget; its attempt history stays.
    /// Filters combine; at least one is needed. Prints the ids retried, one a line.
    #[command(group(clap::ArgGroup::new("what").required(true).multiple(true)
        .args(["task_id", "job", "task_type", "error", "since", "until"])))]
    Retry {
        /// The task to retry; leave out to retry by filter.
        #[arg(conflicts_with_all = ["job", "task_type", "error", "since", "until", "include_cancelled", "limit"])]
        task_id: Option<String>,
        /// Tasks of this job.
        #[arg(long)]
        job: Option<String>,
        /// Tasks of this type.
        #[arg(long = "type")]
        task_type: Option<String>,
        /// Tasks whose error contains this text (case-sensitive).
        #[arg(long)]
        error: Option<String>,
        /// Finished at or after: an RFC 3339 time, or an age such as 2h.
        #[arg(long)]
        since: Option<String>,
        /// Finished before: an RFC 3339 time, or an age such as 30m.
        #[arg(long)]
        until: Option<String>,
        /// Cancelled tasks too (by default only failed ones).
        #[arg(long)]
        include_cancelled: bool,
        /// At most this many tasks (the coordinator's default is 1000, its maximum 10000).
        #[arg(long, default_value_t = 0)]
        limit: u32,
    },
    /// What failed lately: failed tasks by type, the most frequent errors with a sample task,
    /// and attempts by outcome.
    Failures {
        /// The window's start: an RFC 3339 time, or an age such as 6h (default: 24h before
        /// --until).
        #[arg(long)]
        since: Option<String>,
        /// The window's end: an RFC 3339 time, or an age (default: now).
        #[arg(long)]
        until: Option<String>,
        /// How many errors to list (the coordinator's default is 10, its maximum 100).
        #[arg(long, default_value_t = 0)]
        top: u32,
    },
    /// List tasks, oldest first; says on stderr when more match than it shows.
    Tasks {
        /// blocked, pending, assigned, running, completed, failed or cancelled.
        #[arg(long)]
        status: Option<String>,
        /// Only tasks of this type.
        #[arg(long = "type")]
        task_type: Option<String>,
        /// Only tasks of this job (its id).
        #[arg(long)]
        job: Option<String>,
        /// Show at most this many (1 to 1000).
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: u32,
    },
    /// List workers.
    Workers,
    /// A worker's totals.
    Stats { worker_id: String },
    /// List jobs, newest first, with their tasks counted by state.
    Jobs {
        /// Show at most this many (the newest).
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Jobs: batches of tasks.
    #[command(subcommand)]
    Job(JobCmd),
    /// Recurring schedules: a task from a template at every occurrence of a cron expression.
    #[command(subcommand)]
    Schedule(ScheduleCmd),
    /// Per-type concurrency limits across every replica (admin).
    #[command(subcommand)]
    Limits(LimitsCmd),
    /// Count primes in [low, high) as a job of slices spread over the workers.
    Primes {
        /// The range's first number.
        #[arg(long)]
        low: u64,
        /// The number after the range's last.
        #[arg(long)]
        high: u64,
        /// Tasks the range is split into.
        #[arg(long, default_value_t = 8)]
        slices: u64,
        /// Add the slices up on the workers too: one `sum_counts` task that depends on every
        /// slice and receives their results; this command only waits for the job.
        #[arg(long)]
        server_side: bool,
    },
    /// Test numbers for primality on the workers.
    IsPrime { numbers: Vec<u64> },
    /// Load generator: W workers, N tasks; prints throughput and latency.
    Bench {
        /// Tasks of the bulk phase.
        #[arg(long, default_value_t = 20_000)]
        tasks: usize,
        /// Workers the benchmark runs (in its own process).
        #[arg(long, default_value_t = 8)]
        workers: usize,
        /// Tasks each worker runs at once.
        #[arg(long, alias = "slots", default_value_t = 64)]
        concurrency: u32,
        /// Assignments each worker queues beyond its slots.
        #[arg(long, default_value_t = 0)]
        prefetch: u32,
        /// Tasks per submission.
        #[arg(long, default_value_t = 1000)]
        batch: usize,
        /// Submit the bulk phase with SubmitTasks, outside any job (one job per batch otherwise).
        #[arg(long)]
        no_jobs: bool,
        /// Pace the bulk phase's submissions at this many tasks per second, batches evenly
        /// spaced and each sent when due (one after the other, as fast as answered, otherwise).
        #[arg(long)]
        rate: Option<f64>,
        /// Tasks in the one-at-a-time latency phase.
        #[arg(long, default_value_t = 200)]
        trickle: usize,
        /// Start a coordinator in this process (SQLite in a temp dir unless --database-url).
        #[arg(long)]
        embedded: bool,
        /// With --embedded, the coordinator's database; otherwise the remote coordinator's
        /// database, read only for its statistics (rows, commits, WAL, statements per task).
        #[arg(long, env = "DATABASE_URL")]
        database_url: Option<String>,
        /// The remote coordinator's process id, for its CPU time per task.
        #[arg(long)]
        coordinator_pid: Option<u32>,
    },
    /// Measure what a large idle fleet costs a running coordinator: memory, connect time,
    /// ListWorkers, heartbeat round trips, database writes per worker-minute (admin).
    BenchFleet {
        /// Idle workers to register.
        #[arg(long, default_value_t = 10_000)]
        workers: usize,
        /// Workers sharing one HTTP/2 connection.
        #[arg(long, default_value_t = 100)]
        per_connection: usize,
        /// How long the connected fleet is watched. Heartbeat writes are counted whole, about one
        /// per worker every 65 s: a window of several minutes shows their rate.
        #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
        window: Duration,
        /// The coordinator's process id, for its resident memory.
        #[arg(long)]
        coordinator_pid: Option<u32>,
        /// The coordinator's database, read only for its statistics.
        #[arg(long, env = "DATABASE_URL")]
        database_url: Option<String>,
        /// The coordinator's metrics (http://host:8090/metrics), for its time per heartbeat.
        #[arg(long)]
        metrics_url: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum LimitsCmd {
    /// Every type's limit and its tasks assigned or running now.
    List,
    /// At most N tasks of TYPE assigned or running at once; stays until cleared.
    Set {
        /// The task type.
        #[arg(value_name = "TYPE")]
        task_type: String,
        /// Tasks of the type assigned or running at once, across every replica (0 holds the type).
        #[arg(value_name = "N")]
        max_in_flight: u32,
    },
    /// Remove TYPE's limit.
    Clear {
        /// The task type.
        #[arg(value_name = "TYPE")]
        task_type: String,
    },
}

#[derive(Debug, Subcommand)]
enum ScheduleCmd {
    /// Create a schedule (admin).
    Create {
        /// A unique name.
        #[arg(long)]
        name: String,
        /// 5 fields (minute hour day-of-month month day-of-week), 6 with seconds first, or 7 with a
        /// year last.
        #[arg(long)]
        cron: String,
        /// IANA time zone the expression is read in (default UTC), e.g. Europe/Berlin.
        #[arg(long, default_value = "")]
        timezone: String,
        /// The type of the task each occurrence creates.
        #[arg(long = "type")]
        task_type: String,
        /// The payload, or @FILE to read it from a file.
        #[arg(long, default_value = "")]
        payload: String,
        /// Higher runs first among pending tasks; may be negative.
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        priority: i32,
        /// Attempts before the task fails for good (0: the coordinator's
        /// tasks.default_max_attempts).
        #[arg(long, default_value_t = 0)]
        max_attempts: u32,
        /// Per-attempt deadline, e.g. 30s or 2h.
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
        /// Occurrences more than a minute overdue when a coordinator gets to them (after an
        /// outage): latest (run the latest once), skip, or all (the latest 1,000). Occurrences
        /// less late than that all run.
        #[arg(long, default_value = "latest", value_parser = ["latest", "skip", "all"])]
        missed: String,
        /// Create it paused.
        #[arg(long)]
        paused: bool,
    },
    /// List schedules: next run, runs so far.
    List,
    /// Pause a schedule (admin).
    Pause { schedule_id: String },
    /// Resume a schedule from its next occurrence (admin).
    Resume { schedule_id: String },
    /// Delete a schedule; the tasks it created stay (admin).
    Delete { schedule_id: String },
}

#[derive(Debug, Subcommand)]
enum JobCmd {
    /// Submit a job from a JSON-lines file: one `{"type":..,"payload":..}` per line.
    Submit {
        file: PathBuf,
        /// Made once: run again with the same key (after an error or a timeout, say), it
        /// prints the job the first run made and creates nothing.
        #[arg(long, default_value = "")]
        idempotency_key: String,
    },
    /// Show a job's progress (and results).
    Get {
        job_id: String,
        /// Also list each task with its worker, time taken and result or error.
        #[arg(long)]
        results: bool,
    },
    /// Follow a job's progress until every task has ended: a line each time its counts change.
    Watch { job_id: String },
    /// Cancel every task of a job that has not ended; running ones are told to stop.
    Cancel {
        job_id: String,
        /// Why, kept as each cancelled task's error and told to the workers running them.
        #[arg(long, default_value = "")]
        reason: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = check_usage(&cli.cmd) {
        eprintln!("coordctl: {e}");
        return ExitCode::from(2);
    }
    // Warnings and errors of the libraries, on stderr; stdout is the command's output.
    let filter = std::env::var("RUST_LOG").ok().and_then(|v| tracing_subscriber::EnvFilter::try_new(v).ok());
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(filter.unwrap_or_else(|| tracing_subscriber::EnvFilter::new("warn")))
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("coordctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    let tls = cli.coordinator.starts_with("https://");
    let tls_without_cert = tls && cli.cert_file.is_none();
    let credentials = Credentials {
        token: cli.token.is_some() || cli.token_file.is_some(),
        ca_file: cli.ca_file.is_some(),
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            let line = one_line(&e);
            // The first hint that explains the line.
            let cert = if tls_without_cert { client_cert_hint(&line) } else { "" };
            let hint = [scheme_hint(&line, tls), cert, credentials_hint(&line, credentials)]
                .into_iter()
                .find(|h| !h.is_empty())
                .unwrap_or_default();
            eprintln!("coordctl: {line}{hint}");
            ExitCode::FAILURE
        }
    }
}

/// What to add to an error over TLS without a client certificate when the coordinator ended
/// the connection at its start: asked for a certificate (TLS 1.3 says so after the handshake,
/// and the request may already be on its way, so the close is also seen as a broken pipe or a
/// closed connection).
fn client_cert_hint(line: &str) -> &'static str {
    if line.contains("CertificateRequired") {
        " (the coordinator requires a client certificate: give --cert-file and --key-file)"
    } else if coordinator_worker::error::connection_closed(line) {
        " (the coordinator closed the connection; if it requires client certificates, give \
         --cert-file and --key-file)"
    } else {
        ""
    }
}

/// Which credentials the command line gave (flags or their environment variables).
#[derive(Debug, Clone, Copy)]
struct Credentials {
    token: bool,
    ca_file: bool,
}

/// What to add to an error that a credential left out explains: no token where the coordinator
/// asks for one, no CA file for a certificate signed by a CA of the operator's own.
fn credentials_hint(line: &str, given: Credentials) -> &'static str {
    if !given.token && line.starts_with("Unauthenticated: missing") {
        " (the coordinator requires a token: give --token-file, or set COORDCTL_TOKEN_FILE or COORDCTL_TOKEN)"
    } else if !given.ca_file && coordinator_worker::error::untrusted_certificate(line) {
        " (the coordinator's certificate is signed by a CA this client does not trust: give --ca-file \
         with that CA, or set COORDCTL_CA_FILE)"
    } else {
        ""
    }
}

/// A worker's tasks against its slots, and its prefetch queue when it has one: `2/4`, `6/3+3`.
fn in_flight_text(in_flight: u32, max: u32, prefetch: u32) -> String {
    if prefetch == 0 { format!("{in_flight}/{max}") } else { format!("{in_flight}/{max}+{prefetch}") }
}

/// Where a worker's task stream is open: to the replica that answered, to the one its REPLICA
/// column names (as that replica wrote it to the database), or nowhere.
fn stream_text(here: bool, elsewhere: bool) -> &'static str {
    match (here, elsewhere) {
        (true, _) => "open here",
        (false, true) => "open",
        (false, false) => "-",
    }
}

/// A worker's labels as `key=value` pairs in key order (what `--requires` names), or `-`.
fn labels_text(labels: &std::collections::HashMap<String, String>) -> String {
    let mut pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    pairs.sort();
    if pairs.is_empty() { "-".into() } else { pairs.join(",") }
}

/// Usage mistakes clap cannot see, found before connecting: they exit 2 as clap's do.
fn check_usage(cmd: &Cmd) -> anyhow::Result<()> {
    if let Cmd::Tasks { status: Some(s), .. } = cmd {
        parse_status(s)?;
    }
    if let Cmd::Retry { since, until, .. } | Cmd::Failures { since, until, .. } = cmd {
        let since = since.as_deref().map(|s| parse_time("--since", s)).transpose()?;
        let until = until.as_deref().map(|s| parse_time("--until", s)).transpose()?;
        if let (Some(a), Some(b)) = (since, until)
            && (b.seconds, b.nanos) <= (a.seconds, a.nanos)
        {
            // An age counts back from now: --since 1h --until 2h ends before it starts.
            bail!("--until must be later than --since (an age such as 2h counts back from now)");
        }
    }
    Ok(())
}

/// Output could not be written. Piped into `head` or a pager that quits, coordctl ends as
/// command-line tools do, by SIGPIPE (exit status 141 in a shell), quietly. Only stdout ends it
/// so: SIGPIPE stays ignored otherwise, and a connection the coordinator closed is an error
/// like any other.
fn stdout_failed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        #[cfg(unix)]
        // SAFETY: restores the default disposition of SIGPIPE and raises it, so the process
        // ends by that signal; nothing runs after it.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            libc::raise(libc::SIGPIPE);
        }
    }
    eprintln!("coordctl: cannot write the output: {e}");
    std::process::exit(1)
}

/// Text shown in one row of a listing: trailing white space dropped, line breaks and other
/// control characters inside written as escapes (`\n`), so a result that ends in a newline or
/// spans lines keeps its row.
fn table_cell(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.trim_end().chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// A gRPC status as "CODE: message"; other errors with their causes on one line.
fn one_line(e: &anyhow::Error) -> String {
    // A status says its own causes: theirs, after it, are dropped as already said.
    one_line_with(&**e, |cause| match cause.downcast_ref::<tonic::Status>() {
        Some(s) => status_line(s),
        None => cause.to_string(),
    })
}

fn security(cli: &Cli) -> anyhow::Result<ClientSecurity> {
    Ok(ClientSecurity {
        token: ClientSecurity::read_token(cli.token.clone(), cli.token_file.as_deref())?,
        ca_file: cli.ca_file.clone(),
        cert_file: cli.cert_file.clone(),
        key_file: cli.key_file.clone(),
        server_name: None,
    })
}

/// A benchmark's report: JSON with `--json`, else its rendering for people.
fn print_report(report: &impl serde::Serialize, json: bool, rendered: String) -> anyhow::Result<()> {
    if json {
        outln!("{}", serde_json::to_string_pretty(report)?);
    } else {
        out!("{rendered}");
    }
    Ok(())
}

async fn connect(cli: &Cli) -> anyhow::Result<Client> {
    Ok(coordinator_worker::client::connect(
        &cli.coordinator,
        &security(cli)?,
        cli.max_message_size.as_usize(),
    )
    .await?)
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let json_out = cli.json;
    let bench_security = security(&cli)?;
    if let Cmd::Bench {
        tasks,
        workers,
        concurrency,
        prefetch,
        batch,
        no_jobs,
        rate,
        trickle,
        embedded,
        database_url,
        coordinator_pid,
    } = cli.cmd
    {
        let report = bench::run(BenchOptions {
            tasks,
            workers,
            concurrency,
            prefetch,
            batch,
            no_jobs,
            rate,
            trickle,
            endpoint: cli.coordinator.clone(),
            embedded,
            stats_database_url: if embedded { None } else { database_url.clone() },
            database_url: if embedded { database_url } else { None },
            security: bench_security,
            coordinator_pid,
        })
        .await?;
        print_report(&report, json_out, report.render())?;
        return Ok(if report.exactly_once { ExitCode::SUCCESS } else { ExitCode::FAILURE });
    }
    if let Cmd::BenchFleet { workers, per_connection, window, coordinator_pid, database_url, metrics_url } =
        cli.cmd
    {
        let report = fleet_bench::run(fleet_bench::FleetOptions {
            workers,
            per_connection,
            window,
            endpoint: cli.coordinator.clone(),
            security: bench_security,
            coordinator_pid,
            database_url,
            metrics_url,
        })
        .await?;
        print_report(&report, json_out, report.render())?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut c = connect(&cli).await?;
    match cli.cmd {
        Cmd::Submit {
            task_type,
            payload,
            priority,
            max_attempts,
            idempotency_key,
            timeout,
            delay,
            run_at,
            depends_on,
            on_parent_failure,
            requires,
            weight,
            affinity_key,
            wait,
        } => {
            let payload = read_payload(&payload)?;
            let resp = c
                .submit_task(proto::SubmitTaskRequest {
                    task_type,
                    payload,
                    priority,
                    max_attempts,
                    idempotency_key: idempotency_key.unwrap_or_default(),
                    timeout_ms: timeout.map(|d| d.as_millis() as u64).unwrap_or(0),
                    delay_ms: delay.map(|d| d.as_millis() as u64).unwrap_or(0),
                    run_at: run_at.map(|t| prost_types::Timestamp {
                        seconds: t.timestamp(),
                        nanos: t.timestamp_subsec_nanos() as i32,
                    }),
                    depends_on,
                    on_parent_failure: parent_failure(&on_parent_failure) as i32,
                    requires,
                    weight,
                    affinity_key: affinity_key.unwrap_or_default(),
                })
                .await?
                .into_inner();
            if !resp.created && !json_out {
                // Otherwise a second submission with another payload looks like a new task.
                eprintln!(
                    "coordctl: the idempotency key names a task submitted before: that task is shown, \
                     and this submission's type and payload were not used"
                );
            }
            if !wait {
                warn_all(&resp.warnings);
                if json_out {
                    outln!(
                        "{}",
                        json!({"task_id": resp.task_id, "created": resp.created, "warnings": resp.warnings})
                    );
                } else {
                    outln!("{}", resp.task_id);
                }
                return Ok(ExitCode::SUCCESS);
            }
            // With --wait the first `waiting:` line says the same as a warning would.
            let task = wait_task(&mut c, &resp.task_id)
                .await
                .with_context(|| format!("task {} was submitted; following it failed", resp.task_id))?;
            if json_out {
                print_task(&task, true);
            } else if task.status == proto::TaskStatus::Completed as i32 {
                outln!("{}", String::from_utf8_lossy(&task.result));
            } else {
                eprintln!("task {} {}: {}", task.task_id, status_name(task.status), task.error);
            }
            Ok(exit_for(&task))
        }
        Cmd::Get { task_id, attempts } => {
            let task =
                c.get_task(proto::GetTaskRequest { task_id, include_attempts: attempts }).await?.into_inner();
            print_task(&task, json_out);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Watch { task_id } => {
            let mut stream = follow_task(&c, &task_id).await?;
            let mut last: Option<(i32, u32, String)> = None;
            let mut waiting = Waiting::default();
            while let Some(ev) = stream.message().await? {
                if json_out {
                    outln!("{}", event_json(&ev));
                } else {
                    // A pending task's event comes again when the reason it waits changes: that
                    // is a `waiting:` line, not a new state.
                    let state = (ev.status, ev.attempt, ev.worker_id.clone());
                    if last.as_ref() != Some(&state) {
                        let worker = if ev.worker_id.is_empty() {
                            String::new()
                        } else {
                            format!(" on {}", ev.worker_id)
                        };
                        let err =
                            if ev.error.is_empty() { String::new() } else { format!(" ({})", ev.error) };
                        outln!("{} attempt {}{worker}{err}", status_name(ev.status), ev.attempt);
                    }
                    waiting.show(ev.pending_reason, &ev.pending_detail, false);
                    last = Some(state);
                }
                if is_terminal(ev.status) {
                    return Ok(exit_status(ev.status));
                }
            }
            bail!("the watch of task {task_id} ended before the task did")
        }
        Cmd::Cancel { task_id, reason } => {
            let r = c.cancel_task(proto::CancelTaskRequest { task_id, reason }).await?.into_inner();
            let task = r.task.unwrap_or_default();
            if json_out {
                outln!(
                    "{}",
                    json!({"task_id": task.task_id, "cancelled": r.cancelled, "status": status_name(task.status)})
                );
            } else if r.cancelled {
                outln!("cancelled {}", task.task_id);
            } else {
                outln!("{} was already {}", task.task_id, status_name(task.status));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Retry {
            task_id: Some(task_id),
            job,
            task_type,
            error,
            since,
            until,
            include_cancelled,
            limit,
        } => {
            // clap refuses an id with filters (a usage error); these are their defaults.
            debug_assert!(job.is_none() && task_type.is_none() && error.is_none());
            debug_assert!(since.is_none() && until.is_none() && !include_cancelled && limit == 0);
            let t = c.retry_task(proto::RetryTaskRequest { task_id }).await?.into_inner();
            if json_out {
                print_task(&t, true);
            } else {
                outln!(
                    "retried {} (now {}, {} so far)",
                    t.task_id,
                    status_name(t.status),
                    count(t.attempt, "attempt")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Retry { task_id: None, job, task_type, error, since, until, include_cancelled, limit } => {
            let finished_after = since.as_deref().map(|s| parse_time("--since", s)).transpose()?;
            let finished_before = until.as_deref().map(|s| parse_time("--until", s)).transpose()?;
            let r = c
                .retry_tasks(proto::RetryTasksRequest {
                    job_id: job.unwrap_or_default(),
                    task_type: task_type.unwrap_or_default(),
                    error_contains: error.unwrap_or_default(),
                    finished_after,
                    finished_before,
                    include_cancelled,
                    limit,
                })
                .await?
                .into_inner();
            if json_out {
                outln!("{}", json!({"retried": r.retried, "task_ids": r.task_ids, "more": r.more}));
            } else {
                for id in &r.task_ids {
                    outln!("{id}");
                }
                eprintln!("retried {}", count(r.retried, "task"));
                if r.more {
                    eprintln!("more tasks may match: the limit was reached; run again to retry them");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Failures { since, until, top } => {
            let f = c
                .get_failure_summary(proto::GetFailureSummaryRequest {
                    since: since.as_deref().map(|s| parse_time("--since", s)).transpose()?,
                    until: until.as_deref().map(|s| parse_time("--until", s)).transpose()?,
                    top,
                })
                .await?
                .into_inner();
            let window = |t: &Option<prost_types::Timestamp>| t.as_ref().map(ts_string).unwrap_or_default();
            if json_out {
                let groups: Vec<_> = f
                    .top_errors
                    .iter()
                    .map(|g| {
                        json!({"task_type": g.task_type, "error": g.error, "count": g.count,
                               "sample_task_id": g.sample_task_id,
                               "last_failed_at": g.last_failed_at.as_ref().map(ts_string)})
                    })
                    .collect();
                outln!(
                    "{}",
                    json!({"since": window(&f.since), "until": window(&f.until), "failed": f.failed,
                           "failed_by_type": f.failed_by_type, "top_errors": groups,
                           "attempt_outcomes": f.attempt_outcomes})
                );
                return Ok(ExitCode::SUCCESS);
            }
            let tasks = if f.failed == 1 { "task" } else { "tasks" };
            outln!("{} {tasks} failed from {} to {}", f.failed, window(&f.since), window(&f.until));
            let mut by_type: Vec<_> = f.failed_by_type.iter().collect();
            by_type.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            for (t, n) in by_type {
                outln!("  {n:>7}  {t}");
            }
            if !f.top_errors.is_empty() {
                outln!("\n{:>7}  {:<16}  {:<36}  ERROR", "COUNT", "TYPE", "SAMPLE TASK");
                for g in &f.top_errors {
                    outln!("{:>7}  {:<16}  {:<36}  {}", g.count, g.task_type, g.sample_task_id, g.error);
                }
            }
            let mut outcomes: Vec<_> = f.attempt_outcomes.iter().collect();
            outcomes.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            outln!("\nattempts ended, by outcome:");
            for (o, n) in outcomes {
                outln!("  {n:>7}  {o}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Tasks { status, task_type, job, limit } => {
            let status = match status.as_deref() {
                None => 0,
                Some(s) => parse_status(s)? as i32,
            };
            let page = c
                .list_tasks(proto::ListTasksRequest {
                    status,
                    task_type: task_type.unwrap_or_default(),
                    job_id: job.unwrap_or_default(),
                    page_size: limit,
                    ..Default::default()
                })
                .await?
                .into_inner();
            let tasks = page.tasks;
            if !page.next_page_token.is_empty() {
                eprintln!(
                    "coordctl: more tasks match than the {} shown (oldest first): raise --limit (at most \
                     1000) or narrow with --status, --type or --job",
                    tasks.len()
                );
            }
            if json_out {
                outln!("{}", serde_json::Value::Array(tasks.iter().map(task_json).collect()));
            } else {
                outln!(
                    "{:<36}  {:<16}  {:<10}  {:>7}  {:<24}  WAITING",
                    "TASK",
                    "TYPE",
                    "STATUS",
                    "ATTEMPT",
                    "WORKER"
                );
                for t in &tasks {
                    outln!(
                        "{:<36}  {:<16}  {:<10}  {:>7}  {:<24}  {}",
                        t.task_id,
                        t.task_type,
                        status_name(t.status),
                        t.attempt,
                        t.worker_id,
                        pending_reason_name(t.pending_reason).unwrap_or_default()
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Workers => {
            // Every page.
            let mut workers = Vec::new();
            let mut page_token = String::new();
            loop {
                let req = proto::ListWorkersRequest { page_size: 1000, page_token };
                let page = c.list_workers(req).await?.into_inner();
                workers.extend(page.workers);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            if json_out {
                let v: Vec<_> = workers
                    .iter()
                    .map(|w| {
                        json!({"worker_id": w.worker_id, "state": worker_state_name(w.state),
                               "max_concurrent_tasks": w.max_concurrent_tasks, "prefetch": w.prefetch,
                               "in_flight": w.in_flight, "capabilities": w.capabilities,
                               "connected": w.connected, "connected_elsewhere": w.connected_elsewhere,
                               "version": w.version,
                               "hostname": w.hostname, "labels": w.labels, "replica": w.coordinator_id,
                               "last_heartbeat": w.last_heartbeat.as_ref().map(ts_string)})
                    })
                    .collect();
                outln!("{}", serde_json::Value::Array(v));
            } else {
                outln!(
                    "{:<28}  {:<9}  {:>11}  {:<20}  {:<9}  {:<25}  CAPABILITIES  LABELS",
                    "WORKER",
                    "STATE",
                    "IN FLIGHT",
                    "REPLICA",
                    "STREAM",
                    "LAST HEARTBEAT"
                );
                for w in &workers {
                    outln!(
                        "{:<28}  {:<9}  {:>11}  {:<20}  {:<9}  {:<25}  {}  {}",
                        w.worker_id,
                        worker_state_name(w.state),
                        in_flight_text(w.in_flight, w.max_concurrent_tasks, w.prefetch),
                        if w.coordinator_id.is_empty() { "-" } else { w.coordinator_id.as_str() },
                        stream_text(w.connected, w.connected_elsewhere),
                        w.last_heartbeat.as_ref().map(ts_string).unwrap_or_default(),
                        if w.capabilities.is_empty() { "(any)".to_owned() } else { w.capabilities.join(",") },
                        labels_text(&w.labels)
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Schedule(cmd) => schedule_command(&mut c, cmd, json_out).await,
        Cmd::Limits(cmd) => limits_command(&mut c, cmd, json_out).await,
        Cmd::Stats { worker_id } => {
            let s = c.get_worker_stats(proto::GetWorkerStatsRequest { worker_id }).await?.into_inner();
            if json_out {
                outln!(
                    "{}",
                    json!({"worker_id": s.worker_id, "state": worker_state_name(s.state),
                           "tasks_completed": s.tasks_completed, "tasks_failed": s.tasks_failed,
                           "total_duration_ms": s.total_duration_ms, "mean_duration_ms": s.mean_duration_ms,
                           "in_flight": s.in_flight})
                );
            } else {
                outln!("worker          {}", s.worker_id);
                outln!("state           {}", worker_state_name(s.state));
                outln!("completed       {}", s.tasks_completed);
                outln!("failed          {}", s.tasks_failed);
                outln!("in flight       {}", s.in_flight);
                outln!("total duration  {} ms", s.total_duration_ms);
                outln!("mean duration   {} ms", s.mean_duration_ms);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Job(JobCmd::Submit { file, idempotency_key }) => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("{}", file.display()))?;
            let tasks = job_file::parse(&file.display().to_string(), &text)?;
            let name = file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            let r =
                c.submit_job(proto::SubmitJobRequest { name, tasks, idempotency_key }).await?.into_inner();
            warn_all(&r.warnings);
            if json_out {
                outln!(
                    "{}",
                    json!({"job_id": r.job_id, "task_ids": r.task_ids, "warnings": r.warnings, "existing": r.existing})
                );
            } else {
                // The id alone on stdout, so `J=$(coordctl job submit f.jsonl)` works.
                outln!("{}", r.job_id);
                if r.existing {
                    eprintln!(
                        "{} tasks; made earlier with this idempotency key, nothing created",
                        r.task_ids.len()
                    );
                } else {
                    eprintln!("{} tasks", r.task_ids.len());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Job(JobCmd::Get { job_id, results }) => {
            let j = c.get_job(proto::GetJobRequest { job_id, include_results: results }).await?.into_inner();
            if json_out {
                outln!("{}", job_json(&j));
            } else {
                outln!(
                    "job {} ({}): {} tasks; {} blocked, {} pending, {} assigned, {} running, {} completed, {} failed, {} cancelled{}",
                    j.job_id,
                    j.name,
                    j.total,
                    j.blocked,
                    j.pending,
                    j.assigned,
                    j.running,
                    j.completed,
                    j.failed,
                    j.cancelled,
                    if j.done { "; done" } else { "" }
                );
                for r in &j.results {
                    let body = if r.error.is_empty() {
                        table_cell(&String::from_utf8_lossy(&r.result))
                    } else {
                        table_cell(&r.error)
                    };
                    outln!(
                        "  {}  {:<10} {:<24} {:>6} ms  {}",
                        r.task_id,
                        status_name(r.status),
                        r.worker_id,
                        r.duration_ms,
                        body
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Job(JobCmd::Watch { job_id }) => {
            let mut stream = follow_job(&c, &job_id).await?;
            // A task going from assigned to running changes no count this line shows: a line
            // is printed when what it says changes.
            let mut last = String::new();
            while let Some(j) = stream.message().await? {
                if json_out {
                    outln!("{}", job_json(&j));
                } else {
                    let line = progress(&j);
                    if line != last {
                        outln!("{line}");
                        last = line;
                    }
                }
                if j.done {
                    return Ok(job_exit(&j));
                }
            }
            bail!("the watch of job {job_id} ended before the job did")
        }
        Cmd::Job(JobCmd::Cancel { job_id, reason }) => {
            let r = c.cancel_job(proto::CancelJobRequest { job_id, reason }).await?.into_inner();
            let j = r.job.unwrap_or_default();
            if json_out {
                outln!("{}", json!({"cancelled": r.cancelled, "job": job_json(&j)}));
            } else {
                outln!("cancelled {} of the {} tasks of job {}", r.cancelled, j.total, j.job_id);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Jobs { limit } => {
            let jobs = c
                .list_jobs(proto::ListJobsRequest {
                    page_size: limit.clamp(1, 1000),
                    page_token: String::new(),
                })
                .await?
                .into_inner()
                .jobs;
            if json_out {
                outln!("{}", serde_json::Value::Array(jobs.iter().map(job_json).collect()));
            } else {
                outln!(
                    "{:<36}  {:<20}  {:>6}  {:>7}  {:>7}  {:>7}  {:>9}  {:>6}  {:>9}  {:<24}",
                    "JOB",
                    "NAME",
                    "TOTAL",
                    "BLOCKED",
                    "PENDING",
                    "RUNNING",
                    "COMPLETED",
                    "FAILED",
                    "CANCELLED",
                    "CREATED"
                );
                for j in &jobs {
                    outln!(
                        "{:<36}  {:<20}  {:>6}  {:>7}  {:>7}  {:>7}  {:>9}  {:>6}  {:>9}  {:<24}",
                        j.job_id,
                        j.name,
                        j.total,
                        j.blocked,
                        j.pending,
                        j.assigned + j.running,
                        j.completed,
                        j.failed,
                        j.cancelled,
                        j.created_at.as_ref().map(ts_string).unwrap_or_default()
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Primes { low, high, slices, server_side } => {
            primes(&mut c, low, high, slices, server_side, json_out).await
        }
        Cmd::IsPrime { numbers } => is_prime(&mut c, &numbers, json_out).await,
        Cmd::Bench { .. } | Cmd::BenchFleet { .. } => unreachable!("handled above"),
    }
}

/// An RFC 3339 time, as `--run-at` takes it.
fn parse_rfc3339(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| format!("{e}; write a time as 2027-01-02T03:04:05Z"))
}

fn read_payload(arg: &str) -> anyhow::Result<Vec<u8>> {
    match arg.strip_prefix('@') {
        Some(path) => std::fs::read(path).with_context(|| format!("payload file {path}")),
        None => Ok(arg.as_bytes().to_vec()),
    }
}

/// Waits for a task to end (watching its state), showing progress on a terminal.
async fn wait_task(c: &mut Client, task_id: &str) -> anyhow::Result<proto::Task> {
    let mut stream = follow_task(c, task_id).await?;
    let tty = std::io::stderr().is_terminal();
    let mut waiting = Waiting::default();
    let mut ended = false;
    while let Some(ev) = stream.message().await? {
        waiting.show(ev.pending_reason, &ev.pending_detail, tty);
        if tty {
            eprint!("\r\x1b[2K{task_id}: {} (attempt {})", status_name(ev.status), ev.attempt);
        }
        ended = is_terminal(ev.status);
    }
    if tty {
        eprintln!();
    }
    if !ended {
        bail!("the watch of task {task_id} ended before the task did");
    }
    Ok(c.get_task(proto::GetTaskRequest { task_id: task_id.into(), ..Default::default() })
        .await?
        .into_inner())
}

async fn primes(
    c: &mut Client,
    low: u64,
    high: u64,
    slices: u64,
    server_side: bool,
    json_out: bool,
) -> anyhow::Result<ExitCode> {
    if high <= low || slices == 0 {
        bail!("need --low < --high and --slices >= 1");
    }
    let slices = slices.min(high - low);
    let width = (high - low).div_ceil(slices);
    let mut ranges = Vec::new();
    let mut a = low;
    while a < high {
        let b = (a + width).min(high);
        ranges.push((a, b));
        a = b;
    }
    let mut tasks: Vec<proto::SubmitTaskRequest> = ranges
        .iter()
        .map(|(a, b)| proto::SubmitTaskRequest {
            task_type: "prime_count".into(),
            payload: json!({"low": a, "high": b}).to_string().into_bytes(),
            ..Default::default()
        })
        .collect();
    if server_side {
        tasks.push(proto::SubmitTaskRequest {
            task_type: "sum_counts".into(),
            depends_on: (0..ranges.len()).map(|i| format!("#{i}")).collect(),
            ..Default::default()
        });
    }
    let job = c
        .submit_job(proto::SubmitJobRequest {
            name: format!("primes {low}..{high}"),
            tasks,
            ..Default::default()
        })
        .await?
        .into_inner();
    warn_all(&job.warnings);
    let j = wait_job(c, &job.job_id).await?;
    let mut total = 0u64;
    let mut failures = Vec::new();
    let mut rows = Vec::new();
    // With --server-side the last task is the sum: its count is the total.
    let summed = if server_side {
        j.results.last().map(|r| {
            let count =
                serde_json::from_slice::<serde_json::Value>(&r.result).ok().and_then(|v| v["count"].as_u64());
            (r.status == proto::TaskStatus::Completed as i32, count, r.error.clone())
        })
    } else {
        None
    };
    for (r, (a, b)) in j.results.iter().zip(&ranges) {
        let count =
            serde_json::from_slice::<serde_json::Value>(&r.result).ok().and_then(|v| v["count"].as_u64());
        match (r.status == proto::TaskStatus::Completed as i32, count) {
            (true, Some(n)) => total += n,
            _ => failures.push(format!(
                "slice {a}..{b}: {} {}",
                status_name(r.status),
                if r.error.is_empty() { "(no count in the result)" } else { &r.error }
            )),
        }
        rows.push(json!({"low": a, "high": b, "count": count, "worker_id": r.worker_id,
                         "duration_ms": r.duration_ms, "status": status_name(r.status), "error": r.error}));
    }
    match &summed {
        Some((true, Some(n), _)) if failures.is_empty() => total = *n,
        Some((_, _, error)) if failures.is_empty() => failures
            .push(format!("sum_counts: {}", if error.is_empty() { "no count in the result" } else { error })),
        _ => {}
    }
    if json_out {
        outln!(
            "{}",
            json!({"job_id": j.job_id, "low": low, "high": high, "total": if failures.is_empty() { Some(total) } else { None },
                   "slices": rows, "failures": failures})
        );
    } else {
        for row in &rows {
            outln!(
                "  [{:>12}, {:>12})  {:>9}  {:<24} {:>6} ms",
                row["low"].as_u64().unwrap_or_default(),
                row["high"].as_u64().unwrap_or_default(),
                row["count"].as_u64().map(|n| n.to_string()).unwrap_or_else(|| "-".into()),
                row["worker_id"].as_str().unwrap_or_default(),
                row["duration_ms"].as_u64().unwrap_or_default()
            );
        }
        if failures.is_empty() && server_side {
            outln!("{total} primes in [{low}, {high}) (summed on a worker)");
        } else if failures.is_empty() {
            outln!("{total} primes in [{low}, {high})");
        } else {
            outln!(
                "partial result: {total} primes counted in the slices that completed; {} of {} slices failed:",
                failures.len(),
                ranges.len()
            );
            for f in &failures {
                outln!("  {f}");
            }
        }
    }
    Ok(if failures.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Follows a job (`WatchJob`) until it is done, showing progress on a terminal; then reads it
/// with its results.
async fn wait_job(c: &mut Client, job_id: &str) -> anyhow::Result<proto::Job> {
    let tty = std::io::stderr().is_terminal();
    let mut stream = follow_job(c, job_id).await?;
    let mut done = false;
    while let Some(j) = stream.message().await? {
        if tty {
            eprint!("\r\x1b[2K{}", progress(&j));
        }
        done = j.done;
    }
    if tty {
        eprintln!();
    }
    if !done {
        bail!("the watch of job {job_id} ended before the job did");
    }
    Ok(c.get_job(proto::GetJobRequest { job_id: job_id.into(), include_results: true }).await?.into_inner())
}

/// How long a broken watch is opened again before coordctl gives up on it.
const FOLLOW_FOR: Duration = Duration::from_secs(30);

/// A watch (`WatchTask`, `WatchJob`) followed across the replicas that answer it: when the one
/// answering goes away (it shuts down in a rollout, or its connection breaks), the watch is
/// opened again through the same address, so by another replica behind a shared one, and
/// starts, as every watch does, with the current state. A watch that cannot be opened again
/// for [`FOLLOW_FOR`] fails with the error that broke it.
struct Follow<T, F> {
    open: F,
    stream: Option<tonic::Streaming<T>>,
    what: String,
    /// When the watch broke, if no message has come since.
    broke_at: Option<std::time::Instant>,
    /// The wait before the next try.
    pause: Duration,
}

/// The first wait before a broken watch is opened again; it doubles up to 2 s.
const FIRST_PAUSE: Duration = Duration::from_millis(100);

impl<T, F, Fut> Follow<T, F>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<tonic::Streaming<T>>, tonic::Status>>,
{
    /// Opens the watch, again while the replica answering is going away (as [`Follow::message`]
    /// does); a refusal (no such task, a bad token) is the command's error at once.
    async fn open(open: F, what: String) -> anyhow::Result<Self> {
        let mut follow = Follow { open, stream: None, what, broke_at: None, pause: FIRST_PAUSE };
        follow.reopen().await?;
        Ok(follow)
    }

    /// Opens the watch when it is not open, trying again while it fails as [`follows_again`]
    /// allows, until [`FOLLOW_FOR`] after it broke.
    async fn reopen(&mut self) -> anyhow::Result<()> {
        while self.stream.is_none() {
            match (self.open)().await {
                Ok(r) => self.stream = Some(r.into_inner()),
                Err(status) => self.broke(status).await?,
            }
        }
        Ok(())
    }

    /// After the watch failed with `status`: waits before the next try when it may be opened
    /// again (said on stderr the first time), else gives the error back.
    async fn broke(&mut self, status: tonic::Status) -> anyhow::Result<()> {
        if !follows_again(&status) || self.broke_at.is_some_and(|t| t.elapsed() >= FOLLOW_FOR) {
            return Err(status.into());
        }
        if self.broke_at.is_none() {
            eprintln!(
                "coordctl: the watch of {} broke ({}); following it again",
                self.what,
                status_line(&status)
            );
            self.broke_at = Some(std::time::Instant::now());
        }
        self.stream = None;
        tokio::time::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(Duration::from_secs(2));
        Ok(())
    }

    /// The watch's next message; `None` once the coordinator ends it.
    async fn message(&mut self) -> anyhow::Result<Option<T>> {
        loop {
            self.reopen().await?;
            let Some(stream) = self.stream.as_mut() else { continue };
            match stream.message().await {
                Ok(m) => {
                    // It works again: a later break is a new one.
                    (self.broke_at, self.pause) = (None, FIRST_PAUSE);
                    return Ok(m);
                }
                Err(status) => self.broke(status).await?,
            }
        }
    }
}

/// Whether a watch that failed so may be opened again: the replica went away or is going, or
/// the connection under the call broke (a replica killed, a node lost, a connection aged out
/// or cut by a proxy), which this client reports itself, with the cause attached.
fn follows_again(status: &tonic::Status) -> bool {
    match status.code() {
        tonic::Code::Unavailable => true,
        tonic::Code::Unknown | tonic::Code::Internal | tonic::Code::Cancelled => {
            let m = status.message();
            std::error::Error::source(status).is_some()
                || m.contains("transport error")
                || m.contains("h2 protocol error")
        }
        _ => false,
    }
}

/// `WatchTask` of `task_id`, followed across replicas ([`Follow`]).
async fn follow_task(
    c: &Client,
    task_id: &str,
) -> anyhow::Result<Follow<proto::TaskEvent, impl FnMut() -> WatchCall<proto::TaskEvent> + use<>>> {
    let (c, req) = (c.clone(), proto::WatchTaskRequest { task_id: task_id.into() });
    let open = move || -> WatchCall<proto::TaskEvent> {
        let (mut c, req) = (c.clone(), req.clone());
        Box::pin(async move { c.watch_task(req).await })
    };
    Follow::open(open, format!("task {task_id}")).await
}

/// `WatchJob` of `job_id`, followed across replicas ([`Follow`]).
async fn follow_job(
    c: &Client,
    job_id: &str,
) -> anyhow::Result<Follow<proto::Job, impl FnMut() -> WatchCall<proto::Job> + use<>>> {
    let (c, req) = (c.clone(), proto::WatchJobRequest { job_id: job_id.into() });
    let open = move || -> WatchCall<proto::Job> {
        let (mut c, req) = (c.clone(), req.clone());
        Box::pin(async move { c.watch_job(req).await })
    };
    Follow::open(open, format!("job {job_id}")).await
}

/// The opening of a watch, as [`Follow`] calls it.
type WatchCall<T> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<tonic::Response<tonic::Streaming<T>>, tonic::Status>> + Send>,
>;

/// A job's progress in one line.
fn progress(j: &proto::Job) -> String {
    format!(
        "{}/{} done ({} running, {} pending, {} blocked; {} completed, {} failed, {} cancelled)",
        j.completed + j.failed + j.cancelled,
        j.total,
        j.running + j.assigned,
        j.pending,
        j.blocked,
        j.completed,
        j.failed,
        j.cancelled
    )
}

async fn is_prime(c: &mut Client, numbers: &[u64], json_out: bool) -> anyhow::Result<ExitCode> {
    if numbers.is_empty() {
        bail!("give at least one number");
    }
    let tasks = numbers
        .iter()
        .map(|n| proto::SubmitTaskRequest {
            task_type: "is_prime".into(),
            payload: json!({"number": n}).to_string().into_bytes(),
            ..Default::default()
        })
        .collect();
    let job = c
        .submit_job(proto::SubmitJobRequest { name: "is-prime".into(), tasks, ..Default::default() })
        .await?
        .into_inner();
    warn_all(&job.warnings);
    let j = wait_job(c, &job.job_id).await?;
    let mut ok = true;
    let mut out = Vec::new();
    for (n, r) in numbers.iter().zip(&j.results) {
        let answer =
            serde_json::from_slice::<serde_json::Value>(&r.result).ok().and_then(|v| v["is_prime"].as_bool());
        match answer {
            Some(p) if r.status == proto::TaskStatus::Completed as i32 => {
                if json_out {
                    out.push(json!({"number": n, "is_prime": p, "worker_id": r.worker_id}));
                } else {
                    outln!("{n} is prime: {p} (processed by {})", r.worker_id);
                }
            }
            _ => {
                ok = false;
                if json_out {
                    out.push(json!({"number": n, "error": r.error, "status": status_name(r.status)}));
                } else {
                    outln!("{n}: {} {}", status_name(r.status), r.error);
                }
            }
        }
    }
    if json_out {
        outln!("{}", serde_json::Value::Array(out));
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// The reason a watched task waits, printed to stderr as a `waiting:` line when it changes.
/// "Queued" (a worker has room; the task waits its turn) is what every task says for the few
/// milliseconds before it is assigned, so it is shown only once the watch is older than
/// [`QUEUED_QUIET`].
#[derive(Debug)]
struct Waiting {
    last: String,
    since: std::time::Instant,
}

/// How long a task may be queued before `waiting:` says so.
const QUEUED_QUIET: std::time::Duration = std::time::Duration::from_secs(2);

impl Default for Waiting {
    fn default() -> Self {
        Self { last: String::new(), since: std::time::Instant::now() }
    }
}

impl Waiting {
    /// `detail` is the event's pending detail (empty once the task is no longer pending),
    /// `reason` its pending reason.
    fn show(&mut self, reason: i32, detail: &str, tty: bool) {
        let queued = reason == proto::PendingReason::Queued as i32;
        if queued && self.since.elapsed() < QUEUED_QUIET {
            return;
        }
        if detail != self.last && !detail.is_empty() {
            if tty {
                // Off the progress line, which the caller redraws.
                eprint!("\r\x1b[2K");
            }
            eprintln!("waiting: {detail}");
        }
        self.last = detail.to_owned();
    }
}

fn warn_all(warnings: &[String]) {
    for w in warnings {
        eprintln!("coordctl: warning: {w}");
    }
}

/// A finished job exits as its worst task would with `watch`: 3 when one failed, else 4 when
/// one was cancelled, else 0.
fn job_exit(j: &proto::Job) -> ExitCode {
    if j.failed > 0 {
        ExitCode::from(3)
    } else if j.cancelled > 0 {
        ExitCode::from(4)
    } else {
        ExitCode::SUCCESS
    }
}

fn exit_for(t: &proto::Task) -> ExitCode {
    exit_status(t.status)
}

/// See [`WAIT_EXIT_STATUS`].
fn exit_status(status: i32) -> ExitCode {
    match proto::TaskStatus::try_from(status) {
        Ok(proto::TaskStatus::Completed) => ExitCode::SUCCESS,
        Ok(proto::TaskStatus::Failed) => ExitCode::from(3),
        Ok(proto::TaskStatus::Cancelled) => ExitCode::from(4),
        _ => ExitCode::FAILURE,
    }
}

fn is_terminal(status: i32) -> bool {
    matches!(
        proto::TaskStatus::try_from(status),
        Ok(proto::TaskStatus::Completed | proto::TaskStatus::Failed | proto::TaskStatus::Cancelled)
    )
}

/// The reason a pending task waits, as a short name; `None` when it is not pending.
fn pending_reason_name(r: i32) -> Option<&'static str> {
    match proto::PendingReason::try_from(r).unwrap_or(proto::PendingReason::Unspecified) {
        proto::PendingReason::Unspecified => None,
        proto::PendingReason::NoWorker => Some("no_worker"),
        proto::PendingReason::WorkersBusy => Some("workers_busy"),
        proto::PendingReason::Delayed => Some("delayed"),
        proto::PendingReason::Queued => Some("queued"),
        proto::PendingReason::Unschedulable => Some("unschedulable"),
        proto::PendingReason::TypeLimit => Some("type_limit"),
    }
}

fn parent_failure(s: &str) -> proto::ParentFailurePolicy {
    if s == "cancel" { proto::ParentFailurePolicy::Cancel } else { proto::ParentFailurePolicy::Fail }
}

fn status_name(s: i32) -> &'static str {
    match proto::TaskStatus::try_from(s).unwrap_or(proto::TaskStatus::Unspecified) {
        proto::TaskStatus::Unspecified => "unknown",
        proto::TaskStatus::Blocked => "blocked",
        proto::TaskStatus::Pending => "pending",
        proto::TaskStatus::Assigned => "assigned",
        proto::TaskStatus::Running => "running",
        proto::TaskStatus::Completed => "completed",
        proto::TaskStatus::Failed => "failed",
        proto::TaskStatus::Cancelled => "cancelled",
    }
}

fn parse_status(s: &str) -> anyhow::Result<proto::TaskStatus> {
    Ok(match s {
        "blocked" => proto::TaskStatus::Blocked,
        "pending" => proto::TaskStatus::Pending,
        "assigned" => proto::TaskStatus::Assigned,
        "running" => proto::TaskStatus::Running,
        "completed" => proto::TaskStatus::Completed,
        "failed" => proto::TaskStatus::Failed,
        "cancelled" => proto::TaskStatus::Cancelled,
        other => bail!(
            "--status {other:?}: use blocked, pending, assigned, running, completed, failed or cancelled"
        ),
    })
}

/// A time given on the command line: RFC 3339, or an age (`2h`) before now.
fn parse_time(flag: &str, s: &str) -> anyhow::Result<prost_types::Timestamp> {
    let t = match humantime::parse_duration(s) {
        Ok(age) => chrono::Utc::now() - chrono::TimeDelta::from_std(age).context(flag.to_owned())?,
        Err(_) => chrono::DateTime::parse_from_rfc3339(s)
            .map(|t| t.with_timezone(&chrono::Utc))
            .map_err(|_| anyhow::anyhow!("{flag} {s:?}: give an RFC 3339 time or an age such as 2h"))?,
    };
    Ok(prost_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 })
}

fn worker_state_name(s: i32) -> &'static str {
    match proto::WorkerState::try_from(s).unwrap_or(proto::WorkerState::Unspecified) {
        proto::WorkerState::Unspecified => "unknown",
        proto::WorkerState::Active => "active",
        proto::WorkerState::Suspect => "suspect",
        proto::WorkerState::Dead => "dead",
        proto::WorkerState::Draining => "draining",
    }
}

async fn limits_command(c: &mut Client, cmd: LimitsCmd, json_out: bool) -> anyhow::Result<ExitCode> {
    let set = |task_type: String, max_in_flight: Option<u32>| proto::SetTypeLimitRequest {
        task_type,
        clear: max_in_flight.is_none(),
        max_in_flight,
    };
    let list = matches!(cmd, LimitsCmd::List);
    let shown = match cmd {
        LimitsCmd::List => c.list_type_limits(proto::ListTypeLimitsRequest {}).await?.into_inner().limits,
        LimitsCmd::Set { task_type, max_in_flight } => {
            vec![c.set_type_limit(set(task_type, Some(max_in_flight))).await?.into_inner()]
        }
        LimitsCmd::Clear { task_type } => {
            let before = c.list_type_limits(proto::ListTypeLimitsRequest {}).await?.into_inner().limits;
            let had = before.iter().any(|l| l.task_type == task_type);
            c.set_type_limit(set(task_type.clone(), None)).await?;
            if json_out {
                outln!("{}", json!({"task_type": task_type, "cleared": had}));
            } else if had {
                outln!("cleared the limit of {task_type}");
            } else {
                outln!("{task_type} had no limit to clear");
            }
            return Ok(ExitCode::SUCCESS);
        }
    };
    if json_out {
        let all: Vec<serde_json::Value> = shown
            .iter()
            .map(|l| {
                json!({"task_type": l.task_type, "max_in_flight": l.max_in_flight, "source": l.source,
                       "in_flight": l.in_flight})
            })
            .collect();
        print_json_shown(all, list);
        return Ok(ExitCode::SUCCESS);
    }
    for l in shown {
        outln!("{}", limit_line(&l));
    }
    Ok(ExitCode::SUCCESS)
}

/// One limit as `limits` prints it: in flight of the maximum, and where the limit came from; a
/// maximum of 0 says the type is held.
fn limit_line(l: &proto::TypeLimit) -> String {
    let held =
        if l.max_in_flight == 0 { "; held: its tasks wait until the limit is raised or cleared" } else { "" };
    format!("{:<24} {:>3} of {:<6} ({}{held})", l.task_type, l.in_flight, l.max_in_flight, l.source)
}

/// `--json` of a list command: one array, `[]` when empty (as `tasks`, `jobs` and `workers`
/// print); of a command that made or changed one thing: that object.
fn print_json_shown(mut all: Vec<serde_json::Value>, list: bool) {
    if list || all.len() != 1 {
        outln!("{}", serde_json::Value::Array(all));
    } else {
        outln!("{}", all.remove(0));
    }
}

async fn schedule_command(c: &mut Client, cmd: ScheduleCmd, json_out: bool) -> anyhow::Result<ExitCode> {
    let list = matches!(cmd, ScheduleCmd::List);
    let shown = match cmd {
        ScheduleCmd::Create {
            name,
            cron,
            timezone,
            task_type,
            payload,
            priority,
            max_attempts,
            timeout,
            missed,
            paused,
        } => {
            let missed = match missed.as_str() {
                "skip" => proto::MissedRuns::Skip,
                "all" => proto::MissedRuns::All,
                _ => proto::MissedRuns::Latest,
            };
            let task = proto::SubmitTaskRequest {
                task_type,
                payload: read_payload(&payload)?,
                priority,
                max_attempts,
                timeout_ms: timeout.map(|d| d.as_millis() as u64).unwrap_or(0),
                ..Default::default()
            };
            let req = proto::CreateScheduleRequest {
                name,
                cron,
                timezone,
                task: Some(task),
                missed: missed as i32,
                paused,
            };
            vec![c.create_schedule(req).await?.into_inner()]
        }
        ScheduleCmd::List => c.list_schedules(proto::ListSchedulesRequest {}).await?.into_inner().schedules,
        ScheduleCmd::Pause { schedule_id } => {
            vec![
                c.pause_schedule(proto::PauseScheduleRequest { schedule_id, paused: true })
                    .await?
                    .into_inner(),
            ]
        }
        ScheduleCmd::Resume { schedule_id } => {
            vec![
                c.pause_schedule(proto::PauseScheduleRequest { schedule_id, paused: false })
                    .await?
                    .into_inner(),
            ]
        }
        ScheduleCmd::Delete { schedule_id } => {
            c.delete_schedule(proto::DeleteScheduleRequest { schedule_id: schedule_id.clone() }).await?;
            if json_out {
                outln!("{}", json!({"schedule_id": schedule_id, "deleted": true}));
            } else {
                outln!("deleted {schedule_id}");
            }
            return Ok(ExitCode::SUCCESS);
        }
    };
    let mut all = Vec::new();
    let row = |cells: [&str; 8]| {
        let [id, name, cron, tz, ty, state, next, runs] = cells;
        format!("{id:<36}  {name:<20}  {cron:<16}  {tz:<12}  {ty:<16}  {state:<6}  {next:<24}  {runs}")
    };
    if list && !json_out {
        outln!("{}", row(["SCHEDULE", "NAME", "CRON", "TIMEZONE", "TYPE", "STATE", "NEXT RUN", "RUNS"]));
    }
    for s in shown {
        let next = s.next_run_at.as_ref().map(ts_string).unwrap_or_else(|| "-".into());
        let task_type = s.task.as_ref().map(|t| t.task_type.clone()).unwrap_or_default();
        if json_out {
            all.push(
                json!({"schedule_id": s.schedule_id, "name": s.name, "cron": s.cron, "timezone": s.timezone,
                   "task_type": task_type, "paused": s.paused, "next_run_at": next, "runs": s.runs,
                   "last_run_at": s.last_run_at.as_ref().map(ts_string)}),
            );
        } else {
            // A paused schedule has no next run until it is resumed.
            let (state, next) = if s.paused { ("paused", "-".to_owned()) } else { ("active", next) };
            outln!(
                "{}",
                row([
                    &s.schedule_id,
                    &s.name,
                    &s.cron,
                    &s.timezone,
                    &task_type,
                    state,
                    &next,
                    &s.runs.to_string()
                ])
            );
        }
    }
    if json_out {
        print_json_shown(all, list);
    }
    Ok(ExitCode::SUCCESS)
}

fn ts_time(t: &prost_types::Timestamp) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32)
}

fn ts_string(t: &prost_types::Timestamp) -> String {
    ts_time(t).map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)).unwrap_or_default()
}

fn bytes_text(b: &[u8]) -> serde_json::Value {
    match std::str::from_utf8(b) {
        Ok(s) => serde_json::from_str(s).unwrap_or_else(|_| serde_json::Value::String(s.to_owned())),
        Err(_) => json!({"bytes": b.len()}),
    }
}

fn task_json(t: &proto::Task) -> serde_json::Value {
    json!({"task_id": t.task_id, "type": t.task_type, "status": status_name(t.status), "attempt": t.attempt,
           "max_attempts": t.max_attempts, "failures": t.failures, "priority": t.priority,
           "worker_id": t.worker_id, "job_id": t.job_id, "result": bytes_text(&t.result), "error": t.error,
           "created_at": t.created_at.as_ref().map(ts_string), "finished_at": t.finished_at.as_ref().map(ts_string),
           "pending_reason": pending_reason_name(t.pending_reason), "pending_detail": t.pending_detail,
           "requires": t.requires, "weight": t.weight.max(1), "affinity_key": t.affinity_key,
           "attempts": t.attempts.iter().map(attempt_json).collect::<Vec<_>>(),
           "parents": t.parents.iter().map(|p| json!({"task_id": p.task_id, "status": parent_status(p)}))
               .collect::<Vec<_>>()})
}

/// `1 task`, `2 tasks`.
fn count(n: u32, noun: &str) -> String {
    if n == 1 { format!("1 {noun}") } else { format!("{n} {noun}s") }
}

/// A parent's status; one no longer stored completed and was pruned.
fn parent_status(p: &proto::TaskParent) -> &'static str {
    if p.status == proto::TaskStatus::Unspecified as i32 { "pruned" } else { status_name(p.status) }
}

fn attempt_json(a: &proto::TaskAttempt) -> serde_json::Value {
    json!({"attempt": a.attempt, "worker_id": a.worker_id, "assigned_at": a.assigned_at.as_ref().map(ts_string),
           "started_at": a.started_at.as_ref().map(ts_string), "finished_at": a.finished_at.as_ref().map(ts_string),
           "outcome": a.outcome, "error": a.error})
}

fn event_json(e: &proto::TaskEvent) -> serde_json::Value {
    json!({"task_id": e.task_id, "status": status_name(e.status), "attempt": e.attempt, "worker_id": e.worker_id,
           "error": e.error, "at": e.at.as_ref().map(ts_string),
           "pending_reason": pending_reason_name(e.pending_reason), "pending_detail": e.pending_detail})
}

fn job_json(j: &proto::Job) -> serde_json::Value {
    json!({"job_id": j.job_id, "name": j.name, "total": j.total, "blocked": j.blocked, "pending": j.pending, "assigned": j.assigned,
           "running": j.running, "completed": j.completed, "failed": j.failed, "cancelled": j.cancelled,
           "done": j.done, "created_at": j.created_at.as_ref().map(ts_string),
           "results": j.results.iter().map(|r| json!({"task_id": r.task_id, "status": status_name(r.status),
               "result": bytes_text(&r.result), "error": r.error, "worker_id": r.worker_id,
               "duration_ms": r.duration_ms})).collect::<Vec<_>>()})
}

fn print_task(t: &proto::Task, json_out: bool) {
    if json_out {
        outln!("{}", task_json(t));
        return;
    }
    outln!("task      {}", t.task_id);
    outln!("type      {}", t.task_type);
    outln!("status    {}", status_name(t.status));
    outln!("attempt   {} of {} ({} failed)", t.attempt, t.max_attempts, t.failures);
    if !t.worker_id.is_empty() {
        outln!("worker    {}", t.worker_id);
    }
    if !t.requires.is_empty() {
        outln!("requires  {}", t.requires.join(", "));
    }
    if t.weight > 1 {
        outln!("weight    {} slots", t.weight);
    }
    if !t.affinity_key.is_empty() {
        outln!("affinity  {}", t.affinity_key);
    }
    if !t.parents.is_empty() {
        let shown: Vec<String> =
            t.parents.iter().map(|p| format!("{} ({})", p.task_id, parent_status(p))).collect();
        outln!("parents   {}", shown.join(", "));
    }
    if !t.pending_detail.is_empty() {
        outln!("waiting   {}", t.pending_detail);
    } else if t.status == proto::TaskStatus::Blocked as i32 {
        let open = t.parents.iter().filter(|p| p.status != proto::TaskStatus::Completed as i32).count();
        outln!("waiting   for {open} of its {} parents to complete", t.parents.len());
    }
    if !t.job_id.is_empty() {
        outln!("job       {}", t.job_id);
    }
    if !t.error.is_empty() {
        outln!("error     {}", table_cell(&t.error));
    }
    if !t.result.is_empty() {
        outln!("result    {}", table_cell(&String::from_utf8_lossy(&t.result)));
    }
    for a in &t.attempts {
        let outcome = if a.outcome.is_empty() { "running" } else { a.outcome.as_str() };
        let at = a.assigned_at.as_ref().map(ts_string).unwrap_or_default();
        let took = match (a.started_at.as_ref().and_then(ts_time), a.finished_at.as_ref().and_then(ts_time)) {
            (Some(s), Some(f)) => format!(" in {} ms", (f - s).num_milliseconds()),
            _ => String::new(),
        };
        let error = if a.error.is_empty() { String::new() } else { format!(": {}", a.error) };
        outln!("attempt {} on {} at {at}: {outcome}{took}{error}", a.attempt, a.worker_id);
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// A type held at 0 says so.
    #[test]
    fn a_held_type_says_so() {
        let limit = |max| proto::TypeLimit {
            task_type: "prove".into(),
            max_in_flight: max,
            source: "admin".into(),
            in_flight: 1,
        };
        assert_eq!(limit_line(&limit(4)), format!("{:<24}   1 of 4      (admin)", "prove"));
        assert_eq!(
            limit_line(&limit(0)),
            format!(
                "{:<24}   1 of 0      (admin; held: its tasks wait until the limit is raised or cleared)",
                "prove"
            )
        );
    }

    /// Every flag of every command says what it does in `--help`, and the options every command
    /// takes are listed apart from the command's own.
    #[test]
    fn every_flag_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if arg.is_positional() || ["help", "version"].contains(&id) {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} --{id}"));
                }
                if arg.is_global_set() && arg.get_help_heading() != Some(GLOBAL) {
                    missing.push(format!("{path} --{id}: global, not under {GLOBAL:?}"));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "coordctl", &mut missing);
        assert!(missing.is_empty(), "flags without help: {missing:#?}");
    }

    #[test]
    fn an_error_line_keeps_its_context_and_the_status() {
        let e = anyhow::Error::from(tonic::Status::unavailable("coordinator is shutting down"))
            .context("task T was submitted; following it failed");
        assert_eq!(
            one_line(&e),
            "task T was submitted; following it failed: Unavailable: coordinator is shutting down"
        );
        let e = anyhow::Error::from(tonic::Status::not_found("no such task"));
        assert_eq!(one_line(&e), "NotFound: no such task");
        let e = anyhow::anyhow!("root").context("outer");
        assert_eq!(one_line(&e), "outer: root");
    }

    #[test]
    fn a_watch_is_followed_again_after_a_broken_connection_not_a_refusal() {
        use tonic::Status;
        for again in [
            Status::unavailable("coordinator is shutting down; reconnect to another replica"),
            Status::unknown("transport error"),
            Status::internal("h2 protocol error: error reading a body from connection"),
        ] {
            assert!(follows_again(&again), "{again:?}");
        }
        for refused in [
            Status::not_found("task not found"),
            Status::permission_denied("no"),
            Status::internal("something else"),
            Status::unauthenticated("unknown token"),
        ] {
            assert!(!follows_again(&refused), "{refused:?}");
        }
    }

    #[test]
    fn a_connection_closed_at_its_start_over_tls_without_a_certificate_asks_for_one() {
        for line in [
            "Unknown: transport error: connection error: received fatal alert: CertificateRequired",
            "Unknown: transport error: connection error: stream closed because of a broken pipe",
            "Unavailable: the coordinator turned the call back without taking it, 4 times: \
             transport error: operation was canceled: connection closed",
        ] {
            assert!(client_cert_hint(line).contains("--cert-file"), "{line}");
        }
        assert_eq!(client_cert_hint("NotFound: task not found"), "");
    }

    #[test]
    fn a_missing_token_or_ca_file_is_named_only_when_it_was_left_out() {
        let none = Credentials { token: false, ca_file: false };
        let both = Credentials { token: true, ca_file: true };
        let unauthenticated = "Unauthenticated: missing authorization header";
        assert!(credentials_hint(unauthenticated, none).contains("--token-file"));
        assert_eq!(credentials_hint(unauthenticated, both), "");
        let untrusted = "cannot reach the coordinator at https://127.0.0.1:9091: transport error: invalid \
                         peer certificate: UnknownIssuer";
        assert!(credentials_hint(untrusted, none).contains("--ca-file"));
        assert_eq!(credentials_hint(untrusted, both), "");
        assert_eq!(credentials_hint("NotFound: task not found", none), "");
    }

    #[test]
    fn a_cell_keeps_its_row() {
        assert_eq!(table_cell("line one\nline two\n"), r"line one\nline two");
        assert_eq!(table_cell("tab\there\r\n"), r"tab\there");
        assert_eq!(table_cell("plain"), "plain");
    }
}
