//! Configuration: defaults, then the YAML file, then environment overrides, then [`Config::validate`].
//!
//! Every leaf key can be overridden from the environment by its path joined with `_` and upper-cased:
//! `COORDINATOR_GRPC_PORT=9091` overrides `coordinator.grpc_port`, `DATABASE_URL` overrides
//! `database.url`, `GRPC_KEEPALIVE_INTERVAL=20s` overrides `grpc.keepalive.interval`. Durations are
//! written `500ms`, `2s`, `5m`; sizes `10MiB`, `512KiB` or a plain byte count. Unknown keys are an
//! error naming the key and its line.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use serde_norway::Value;

/// The file read when no `-config` flag is given.
pub const DEFAULT_CONFIG_PATH: &str = "configs/coordinator.yaml";

/// A start-up configuration mistake. Its `Display` is the single line printed before exiting.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("environment variable {var}={value:?}: {message}")]
    Env { var: String, value: String, message: String },
    #[error("environment variable {var} is not a configuration key; did you mean {nearest}?")]
    UnknownEnv { var: String, nearest: String },
    #[error("config key {key}: {message}")]
    Invalid { key: &'static str, message: String },
    #[error("config key auth.tokens: auth token {name}: {message}")]
    Token { name: String, message: String },
}

/// The YAML reader's words for number types ("expected u16"), said as an operator reads them.
pub(crate) fn plain_types(message: &str) -> String {
    const WORDS: [(&str, &str); 8] = [
        ("expected u8", "expected a whole number from 0 to 255"),
        ("expected u16", "expected a whole number from 0 to 65535"),
        ("expected u32", "expected a whole number from 0 to 4294967295"),
        ("expected u64", "expected a whole number, 0 or more"),
        ("expected usize", "expected a whole number, 0 or more"),
        ("expected i32", "expected a whole number from -2147483648 to 2147483647"),
        ("expected i64", "expected a whole number"),
        ("expected f64", "expected a number"),
    ];
    let mut out = message.to_owned();
    for (word, plain) in WORDS {
        // Whole words only: "expected u16" must not touch "expected u160".
        let mut from = 0;
        while let Some(at) = out[from..].find(word).map(|i| i + from) {
            let end = at + word.len();
            if out[end..].starts_with(|c: char| c.is_ascii_alphanumeric()) {
                from = end;
                continue;
            }
            out.replace_range(at..end, plain);
            from = at + plain.len();
        }
    }
    out
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, message: message.into() }
}

/// The whole configuration. Field docs live in `configs/coordinator.yaml`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub coordinator: CoordinatorConfig,
    pub database: DatabaseConfig,
    pub scheduler: SchedulerConfig,
    pub tasks: TasksConfig,
    pub grpc: GrpcConfig,
    pub tls: TlsConfig,
    pub auth: AuthConfig,
    pub http: HttpConfig,
    pub logging: LoggingConfig,
    pub retention: RetentionConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinatorConfig {
    pub id: String,
    pub bind_address: IpAddr,
    pub grpc_port: u16,
    pub http_port: u16,
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub heartbeat_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub stale_task_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub cleanup_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            id: "coordinator-local".into(),
            bind_address: IpAddr::from([0, 0, 0, 0]),
            grpc_port: 9090,
            http_port: 8090,
            poll_interval: Duration::from_secs(2),
            heartbeat_timeout: Duration::from_secs(30),
            stale_task_timeout: Duration::from_secs(300),
            cleanup_interval: Duration::from_secs(60),
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

impl CoordinatorConfig {
    /// How often workers are asked to heartbeat: three chances before `heartbeat_timeout`.
    pub fn heartbeat_interval(&self) -> Duration {
        self.heartbeat_timeout / 3
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `postgres://...` or `sqlite://path/to/file.db`.
    pub url: String,
    pub max_open_conns: u32,
    pub max_idle_conns: u32,
    #[serde(with = "humantime_serde")]
    pub conn_max_lifetime: Duration,
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "sqlite://data/coordinator.db".into(),
            max_open_conns: 25,
            max_idle_conns: 5,
            conn_max_lifetime: Duration::from_secs(300),
            acquire_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    RoundRobin,
    LeastLoaded,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerConfig {
    pub strategy: Strategy,
    pub batch_size: u32,
    /// At most this many tasks of a type assigned or running at once, across every replica.
    /// Written to the database at startup; an admin's limit (`coordctl limits set`) of the same
    /// type stays in force over it.
    pub type_limits: BTreeMap<String, u32>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self { strategy: Strategy::RoundRobin, batch_size: 100, type_limits: BTreeMap::new() }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TasksConfig {
    pub default_max_attempts: u32,
    #[serde(with = "humantime_serde")]
    pub default_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_backoff_base: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_backoff_max: Duration,
    pub max_payload_size: ByteSize,
    /// Refuse (FAILED_PRECONDITION) a submission of a type no live worker declared, instead of
    /// accepting it with a warning.
    pub reject_unknown_types: bool,
}

impl Default for TasksConfig {
    fn default() -> Self {
        Self {
            default_max_attempts: 3,
            default_timeout: Duration::from_secs(3600),
            retry_backoff_base: Duration::from_secs(1),
            retry_backoff_max: Duration::from_secs(300),
            max_payload_size: ByteSize(4 * MIB),
            reject_unknown_types: false,
        }
    }
}

/// How long finished work is kept. Each age counts from the task's end (`finished_at`) or the
/// worker's last heartbeat; `0` keeps those rows forever.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    #[serde(with = "humantime_serde")]
    pub completed: Duration,
    #[serde(with = "humantime_serde")]
    pub failed: Duration,
    #[serde(with = "humantime_serde")]
    pub cancelled: Duration,
    /// Worker rows not heard from for this long (and holding no task).
    #[serde(with = "humantime_serde")]
    pub workers: Duration,
    /// How often the pruner runs.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Rows deleted per transaction.
    pub batch_size: u32,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        const DAY: u64 = 24 * 3600;
        Self {
            completed: Duration::from_secs(7 * DAY),
            failed: Duration::from_secs(30 * DAY),
            cancelled: Duration::from_secs(30 * DAY),
            workers: Duration::from_secs(7 * DAY),
            interval: Duration::from_secs(60),
            batch_size: 1000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpcConfig {
    pub max_recv_msg_size: ByteSize,
    pub max_send_msg_size: ByteSize,
    pub keepalive: KeepaliveConfig,
    /// Connections older than this, give or take 10 % chosen per instance, are sent GOAWAY and
    /// their task streams end cleanly, so clients rebalance across replicas. 0 turns it off.
    #[serde(with = "humantime_serde")]
    pub max_connection_age: Duration,
    /// How long calls still open on an aged connection may go on before it is closed.
    #[serde(with = "humantime_serde")]
    pub max_connection_age_grace: Duration,
    /// Client RPCs (submit, get, list, ...) per second allowed from one peer address, REST
    /// client requests included (one budget for both); 0: no limit. Bursts of twice the rate
    /// pass.
    pub client_rate_limit: u32,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        Self {
            max_recv_msg_size: ByteSize(10 * MIB),
            max_send_msg_size: ByteSize(10 * MIB),
            keepalive: KeepaliveConfig::default(),
            max_connection_age: Duration::from_secs(30 * 60),
            max_connection_age_grace: Duration::from_secs(60),
            client_rate_limit: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeepaliveConfig {
    /// HTTP/2 PING interval on idle connections.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Close the connection when a PING is not answered within this.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// TCP keepalive on accepted sockets.
    #[serde(with = "humantime_serde")]
    pub tcp: Duration,
}

impl Default for KeepaliveConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(30),
            timeout: Duration::from_secs(10),
            tcp: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    pub enabled: bool,
    pub cert_file: String,
    pub key_file: String,
    /// CA bundle for client certificates (mTLS).
    pub client_ca_file: String,
    pub require_client_cert: bool,
    /// How often the files are checked for a new certificate (rotation without a restart).
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            cert_file: String::new(),
            key_file: String::new(),
            client_ca_file: String::new(),
            require_client_cert: false,
            reload_interval: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// On unless the config says `enabled: false` (then a warning is logged at start).
    pub enabled: bool,
    /// Ask for a token (any role) on `/metrics` too.
    pub metrics_require_token: bool,
    pub tokens: Vec<TokenConfig>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self { enabled: true, metrics_require_token: false, tokens: Vec::new() }
    }
}

/// One accepted token. Exactly one of `env`, `file` and `sha256` says where it comes from: the
/// token itself is never written in the YAML.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TokenConfig {
    /// A label for logs (never the token).
    pub name: String,
    pub role: crate::domain::Role,
    /// Environment variable holding the token.
    pub env: String,
    /// File holding the token (a mounted Secret).
    pub file: String,
    /// SHA-256 hex digest of the token.
    pub sha256: String,
    /// For a worker token: the only worker id it may act for.
    pub worker_id: String,
}

impl Default for TokenConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            role: crate::domain::Role::Client,
            env: String::new(),
            file: String::new(),
            sha256: String::new(),
            worker_id: String::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    #[serde(with = "humantime_serde")]
    pub read_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Open connections beyond this wait to be accepted.
    pub max_connections: u32,
    /// Serve HTTPS with the `tls` certificate (client certificates are never asked for here,
    /// so probes and Prometheus need none).
    pub tls: bool,
    /// A gauge or histogram series nothing updated for this long leaves `/metrics`, and a task
    /// type no live worker declared for this long (with no pending task) leaves the `task_type`
    /// label. Gauges are refreshed at least three times within it.
    #[serde(with = "humantime_serde")]
    pub metrics_series_ttl: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            read_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 1024,
            tls: false,
            metrics_series_ttl: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// JSON lines with ISO-8601 timestamps (production).
    Json,
    /// Human-readable text.
    Text,
    /// Text on a terminal, JSON otherwise.
    Auto,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoggingConfig {
    /// A `tracing` filter: `info`, `debug`, `coordinator=debug,sqlx=warn`. `RUST_LOG` wins.
    pub level: String,
    pub format: LogFormat,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self { level: "info".into(), format: LogFormat::Auto }
    }
}

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

pub use coordinator_worker::ByteSize;

impl Config {
    /// Loads `path` (defaults for absent keys), applies overrides from `env`, and validates.
    pub fn load(path: &Path, env: &HashMap<String, String>) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let config = Self::from_yaml(&text)
            .map_err(|message| ConfigError::Parse { path: path.to_owned(), message })?;
        let config = config.with_env(env)?;
        config.validate().map_err(|e| from_env(e, env))?;
        Ok(config)
    }

    /// Parses YAML text over the defaults. An empty document is all defaults.
    pub fn from_yaml(text: &str) -> Result<Config, String> {
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        serde_norway::from_str(text).map_err(|e| plain_types(&e.to_string()))
    }

    /// Applies environment overrides: every scalar key, by its path joined with `_`, upper-cased.
    ///
    /// A variable that looks like a misspelt override (one of our section prefixes, and within
    /// a few edits of a key's name) is refused, naming the nearest key: a typo is never silently
    /// ignored.
    pub fn with_env(self, env: &HashMap<String, String>) -> Result<Config, ConfigError> {
        let mut tree = serde_norway::to_value(&self).expect("config serializes");
        let mut leaves = Vec::new();
        collect_leaves(&tree, &mut Vec::new(), &mut leaves);
        let names: Vec<String> = leaves.iter().map(|p| p.join("_").to_uppercase()).collect();
        let mut vars: Vec<&String> = env.keys().collect();
        vars.sort();
        for var in vars {
            if let Some(nearest) = misspelt_override(var, &names, &self.auth.tokens) {
                return Err(ConfigError::UnknownEnv { var: var.clone(), nearest: nearest.to_owned() });
            }
        }
        let mut applied = Vec::new();
        for path in leaves {
            let var = path.join("_").to_uppercase();
            let Some(raw) = env.get(&var) else { continue };
            let typed = scalar_from_env(raw, get_leaf(&tree, &path));
            set_leaf(&mut tree, &path, typed);
            // Check each override on its own so the error names the variable at fault.
            serde_norway::from_value::<Config>(tree.clone()).map_err(|e| ConfigError::Env {
                var: var.clone(),
                value: raw.clone(),
                message: plain_types(&e.to_string()),
            })?;
            applied.push(var);
        }
        if applied.is_empty() {
            return Ok(self);
        }
        Ok(serde_norway::from_value(tree).expect("each override was checked"))
    }

    /// Checks values that parse but make no sense together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let c = &self.coordinator;
        if c.id.trim().is_empty() {
            return Err(invalid("coordinator.id", "must not be empty"));
        }
        if c.grpc_port != 0 && c.grpc_port == c.http_port {
            return Err(invalid(
                "coordinator.http_port",
                format!("{} is also coordinator.grpc_port", c.http_port),
            ));
        }
        for (key, d) in [
            ("coordinator.poll_interval", c.poll_interval),
            ("coordinator.heartbeat_timeout", c.heartbeat_timeout),
            ("coordinator.stale_task_timeout", c.stale_task_timeout),
            ("coordinator.cleanup_interval", c.cleanup_interval),
            ("coordinator.shutdown_timeout", c.shutdown_timeout),
            ("database.acquire_timeout", self.database.acquire_timeout),
            ("database.conn_max_lifetime", self.database.conn_max_lifetime),
            ("grpc.keepalive.tcp", self.grpc.keepalive.tcp),
            ("tasks.default_timeout", self.tasks.default_timeout),
            ("tasks.retry_backoff_base", self.tasks.retry_backoff_base),
            ("http.read_timeout", self.http.read_timeout),
            ("http.write_timeout", self.http.write_timeout),
            ("http.idle_timeout", self.http.idle_timeout),
        ] {
            if d.is_zero() {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        let r = &self.retention;
        if r.interval.is_zero() {
            return Err(invalid("retention.interval", "must be greater than 0"));
        }
        if !(1..=100_000).contains(&r.batch_size) {
            return Err(invalid(
                "retention.batch_size",
                format!("{} is not between 1 and 100000", r.batch_size),
            ));
        }
        // A worker row is what a registration of the same worker on another replica, and the
        // sweeper of a replica that lost it, are fenced by: it must outlive any silence the
        // registry still treats as a live worker.
        // Heartbeat times are written with each replica's clock and compared with the
        // database's: an hour of margin covers any clock a fleet would run with.
        let least = (c.heartbeat_timeout * 2).max(Duration::from_secs(3600));
        if !r.workers.is_zero() && r.workers < least {
            return Err(invalid(
                "retention.workers",
                format!(
                    "{} is shorter than {} (an hour, or twice coordinator.heartbeat_timeout if longer); \
                     live workers' rows could be deleted",
                    humantime::format_duration(r.workers),
                    humantime::format_duration(least)
                ),
            ));
        }
        // A live worker heartbeats every heartbeat_timeout/3 and each heartbeat renews its leases,
        // so a lease shorter than the heartbeat timeout could expire under a healthy worker.
        if c.stale_task_timeout < c.heartbeat_timeout {
            return Err(invalid(
                "coordinator.stale_task_timeout",
                format!(
                    "{} is shorter than coordinator.heartbeat_timeout ({}); leases would expire under live workers",
                    humantime::format_duration(c.stale_task_timeout),
                    humantime::format_duration(c.heartbeat_timeout)
                ),
            ));
        }
        if self.http.metrics_series_ttl < Duration::from_secs(3) {
            return Err(invalid("http.metrics_series_ttl", "must be at least 3s"));
        }
        let db = &self.database;
        if !(db.url.starts_with("postgres://")
            || db.url.starts_with("postgresql://")
            || db.url.starts_with("sqlite:"))
        {
            return Err(invalid(
                "database.url",
                format!("{:?} is not a postgres:// or sqlite: URL", redact_url(&db.url)),
            ));
        }
        if let Some(rest) = db.url.strip_prefix("sqlite:") {
            // Every pooled connection to an in-memory database opens a database of its own: the
            // tables one connection migrated, the next would not see.
            let path = rest.trim_start_matches("//");
            let path = path.split('?').next().unwrap_or_default();
            if path.is_empty() || path == ":memory:" || rest.contains("mode=memory") {
                return Err(invalid(
                    "database.url",
                    format!(
                        "{:?} names no database file; write sqlite://path/to/coordinator.db (an \
                         in-memory database is not shared between the coordinator's connections)",
                        db.url
                    ),
                ));
            }
        }
        if db.max_open_conns == 0 {
            return Err(invalid("database.max_open_conns", "must be at least 1"));
        }
        if db.max_idle_conns > db.max_open_conns {
            return Err(invalid(
                "database.max_idle_conns",
                format!("{} is more than database.max_open_conns ({})", db.max_idle_conns, db.max_open_conns),
            ));
        }
        if !(1..=10_000).contains(&self.scheduler.batch_size) {
            return Err(invalid("scheduler.batch_size", "must be between 1 and 10000"));
        }
        if let Some(t) = self.scheduler.type_limits.keys().find(|t| {
            t.is_empty()
                || t.len() > 128
                || !t.chars().all(|c| c.is_ascii_alphanumeric() || "._:@-/".contains(c))
        }) {
            return Err(invalid(
                "scheduler.type_limits",
                format!("{t:?} is not a task type (1 to 128 letters, digits and ._:@-/)"),
            ));
        }
        let t = &self.tasks;
        if !(1..=100).contains(&t.default_max_attempts) {
            return Err(invalid("tasks.default_max_attempts", "must be between 1 and 100"));
        }
        if t.retry_backoff_max < t.retry_backoff_base {
            return Err(invalid("tasks.retry_backoff_max", "is shorter than tasks.retry_backoff_base"));
        }
        let g = &self.grpc;
        for (key, size) in
            [("grpc.max_recv_msg_size", g.max_recv_msg_size), ("grpc.max_send_msg_size", g.max_send_msg_size)]
        {
            if size.0 < 64 * KIB || size.0 > GIB {
                return Err(invalid(key, format!("{size} is outside 64KiB..1GiB")));
            }
        }
        if t.max_payload_size.0 == 0 || t.max_payload_size >= g.max_recv_msg_size {
            return Err(invalid(
                "tasks.max_payload_size",
                format!(
                    "{} must be above 0 and below grpc.max_recv_msg_size ({})",
                    t.max_payload_size, g.max_recv_msg_size
                ),
            ));
        }
        if g.keepalive.interval.is_zero() {
            return Err(invalid("grpc.keepalive.interval", "must be greater than 0"));
        }
        if g.keepalive.timeout.is_zero() {
            return Err(invalid("grpc.keepalive.timeout", "must be greater than 0"));
        }
        let tls = &self.tls;
        if tls.enabled {
            for (key, file) in [("tls.cert_file", &tls.cert_file), ("tls.key_file", &tls.key_file)] {
                check_readable(key, file)?;
            }
            if tls.require_client_cert || !tls.client_ca_file.is_empty() {
                check_readable("tls.client_ca_file", &tls.client_ca_file)?;
            }
            if tls.reload_interval.is_zero() {
                return Err(invalid("tls.reload_interval", "must be greater than 0"));
            }
        } else if tls.require_client_cert {
            return Err(invalid("tls.require_client_cert", "needs tls.enabled: true"));
        } else if self.http.tls {
            return Err(invalid("http.tls", "needs tls.enabled: true (it serves the tls certificate)"));
        }
        if self.http.max_connections == 0 {
            return Err(invalid("http.max_connections", "must be at least 1"));
        }
        if self.auth.enabled && self.auth.tokens.is_empty() {
            return Err(invalid(
                "auth.tokens",
                "no tokens configured: add tokens, or set auth.enabled: false to accept every caller",
            ));
        }
        for (i, t) in self.auth.tokens.iter().enumerate() {
            if t.name.is_empty() {
                return Err(invalid("auth.tokens", format!("token {i} has no name")));
            }
            if !t.worker_id.is_empty() && t.role != crate::domain::Role::Worker {
                return Err(ConfigError::Token {
                    name: t.name.clone(),
                    message: "worker_id binds worker tokens only".into(),
                });
            }
        }
        if let Some(e) = level_spec_error(&self.logging.level) {
            return Err(invalid("logging.level", e));
        }
        Ok(())
    }

    /// `true` when the database is Postgres.
    pub fn is_postgres(&self) -> bool {
        self.database.url.starts_with("postgres")
    }
}

fn check_readable(key: &'static str, file: &str) -> Result<(), ConfigError> {
    if file.is_empty() {
        return Err(invalid(key, "must be set when tls.enabled is true"));
    }
    std::fs::metadata(file).map(|_| ()).map_err(|e| invalid(key, format!("{file}: {e}")))
}

/// Hides the password of a database URL (`user:password@` and a `password=` parameter) for
/// messages and logs.
pub fn redact_url(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let base = match base.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((userinfo, host)) => match userinfo.split_once(':') {
                Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
                None => base.to_owned(),
            },
            None => base.to_owned(),
        },
        None => base.to_owned(),
    };
    match query {
        None => base,
        Some(q) => {
            let q: Vec<String> = q
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => kv.to_owned(),
                })
                .collect();
            format!("{base}?{}", q.join("&"))
        }
    }
}

fn collect_leaves(v: &Value, path: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match v {
        Value::Mapping(m) => {
            for (k, child) in m {
                if let Some(k) = k.as_str() {
                    path.push(k.to_owned());
                    collect_leaves(child, path, out);
                    path.pop();
                }
            }
        }
        Value::Sequence(_) => {} // lists are set in the file only
        _ => out.push(path.clone()),
    }
}

fn get_leaf<'a>(tree: &'a Value, path: &[String]) -> &'a Value {
    let mut node = tree;
    for key in path {
        node = node.get(key.as_str()).expect("path was collected from this tree");
    }
    node
}

fn set_leaf(tree: &mut Value, path: &[String], value: Value) {
    let mut node = tree;
    for key in path {
        node = node.get_mut(key.as_str()).expect("path was collected from this tree");
    }
    *node = value;
}

/// Most edits between a variable and a key's name for the variable to count as a typo of it.
/// Wider would catch other programs' variables that share a prefix: a Kubernetes Service named
/// `coordinator` gives every pod `COORDINATOR_PORT` and `COORDINATOR_SERVICE_HOST`, a proxy
/// sets `HTTP_PROXY`, gRPC core reads `GRPC_TRACE`.
const MAX_TYPO_EDITS: usize = 3;

/// The key `var` is a typo of: `var` starts with a section's prefix (`COORDINATOR_`,
/// `DATABASE_`, ...), is neither a key nor a variable a token reads, and some key is at most
/// [`MAX_TYPO_EDITS`] edits away. Returns the nearest such key.
fn misspelt_override<'a>(var: &str, names: &'a [String], tokens: &[TokenConfig]) -> Option<&'a str> {
    let ours = names.iter().any(|n| {
        n.split_once('_')
            .is_some_and(|(section, _)| var.strip_prefix(section).is_some_and(|rest| rest.starts_with('_')))
    });
    if !ours || names.iter().any(|n| n == var) || tokens.iter().any(|t| t.env == var) {
        return None;
    }
    names
        .iter()
        .map(|n| (edit_distance(var, n), n))
        .filter(|(d, _)| *d <= MAX_TYPO_EDITS)
        .min()
        .map(|(_, n)| n.as_str())
}

/// Levenshtein distance between two ASCII-ish strings, by characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1).min(row[j] + 1).min(diag + usize::from(ca != *cb));
            diag = above;
        }
    }
    row[b.len()]
}

/// An environment value read as the type the key already has: a number or boolean key parses
/// it (`9091`, `true`), every other key takes the text as it is (`2s`, `10MiB`, `1234`).
fn scalar_from_env(raw: &str, current: &Value) -> Value {
    match current {
        Value::Bool(_) | Value::Number(_) => serde_norway::from_str::<Value>(raw)
            .ok()
            .filter(|v| matches!(v, Value::Bool(_) | Value::Number(_)))
            .unwrap_or_else(|| Value::String(raw.to_owned())),
        _ => Value::String(raw.to_owned()),
    }
}

/// Turns Go-style flags (`-config FILE`, `-config=FILE`, any `-word` of letters and dashes)
/// into long ones (`--config`), so both spellings work and a mistyped one (`-conf`) is named as
/// an unknown flag with the nearest real one, not read as `-c onf`. A short flag with its value
/// attached is left alone when the value holds anything but letters and dashes (`-cfile.yaml`),
/// as are words that start with two dashes or none.
pub fn normalize_args<I: IntoIterator<Item = String>>(args: I) -> Vec<String> {
    let go_style = |word: &str| {
        word.len() >= 3
            && word.starts_with(|c: char| c.is_ascii_lowercase())
            && word.chars().all(|c| c.is_ascii_lowercase() || c == '-')
    };
    args.into_iter()
        .map(|a| match a.strip_prefix('-') {
            Some(rest) if !rest.starts_with('-') => match rest.split_once('=') {
                Some((flag, value)) if go_style(flag) => format!("--{flag}={value}"),
                None if go_style(rest) => format!("--{rest}"),
                _ => a,
            },
            _ => a,
        })
        .collect()
}

/// The process environment as a map, for [`Config::load`].
pub fn process_env() -> HashMap<String, String> {
    std::env::vars().collect()
}

/// `e`, naming the variable that set its key when one did: the file may say otherwise. The
/// variable's value is not repeated (a database URL's password, a token): the message already
/// shows what may be shown of it.
fn from_env(e: ConfigError, env: &HashMap<String, String>) -> ConfigError {
    let ConfigError::Invalid { key, message } = e else { return e };
    let set: Vec<String> = env_overrides()
        .into_iter()
        .filter(|(var, path)| {
            (path == key || path.strip_prefix(key).is_some_and(|rest| rest.starts_with('.')))
                && env.contains_key(var)
        })
        .map(|(var, _)| var)
        .collect();
    match set.as_slice() {
        [] => ConfigError::Invalid { key, message },
        vars => ConfigError::Invalid { key, message: format!("{message} (set by {})", vars.join(", ")) },
    }
}

/// Variables that override keys, for the reference in docs/configuration.md.
pub fn env_overrides() -> BTreeMap<String, String> {
    let tree = serde_norway::to_value(Config::default()).expect("config serializes");
    let mut leaves = Vec::new();
    collect_leaves(&tree, &mut Vec::new(), &mut leaves);
    leaves.into_iter().map(|p| (p.join("_").to_uppercase(), p.join("."))).collect()
}

/// Why `spec` is not a log level specification, if it is not: a level (`info`), or
/// comma-separated directives (`info,sqlx=warn`). A bare word that is not a level is refused
/// although the filter syntax reads it as a target to log everything of and nothing else: a
/// misspelt `warnn` would otherwise silence every line (a target is named as `target=level`).
pub fn level_spec_error(spec: &str) -> Option<String> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(spec) {
        return Some(format!("{spec:?}: {e}"));
    }
    let bare = spec
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty() && !d.contains(['=', '[']))
        .find(|d| !LEVELS.iter().any(|l| l.eq_ignore_ascii_case(d)));
    bare.map(|d| {
        let within = if d == spec.trim() { String::new() } else { format!("{spec:?}: ") };
        format!(
            "{within}{d:?} is not a level (trace, debug, info, warn, error or off; a target takes \
             one after it: {d}=debug)"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_match_the_documented_values() {
        let c = Config::default();
        assert_eq!(c.coordinator.grpc_port, 9090);
        assert_eq!(c.coordinator.http_port, 8090);
        assert_eq!(c.coordinator.poll_interval, Duration::from_secs(2));
        assert_eq!(c.coordinator.heartbeat_timeout, Duration::from_secs(30));
        assert_eq!(c.coordinator.stale_task_timeout, Duration::from_secs(300));
        assert_eq!(c.coordinator.cleanup_interval, Duration::from_secs(60));
        assert_eq!(c.database.max_open_conns, 25);
        assert_eq!(c.database.max_idle_conns, 5);
        assert_eq!(c.database.conn_max_lifetime, Duration::from_secs(300));
        assert_eq!(c.tasks.default_max_attempts, 3);
        assert_eq!(c.grpc.max_send_msg_size, ByteSize(10 * MIB));
        assert_eq!(c.http.read_timeout, Duration::from_secs(5));
        assert_eq!(c.http.write_timeout, Duration::from_secs(10));
        assert_eq!(c.http.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.http.metrics_series_ttl, Duration::from_secs(600));
        assert_eq!(c.scheduler.strategy, Strategy::RoundRobin);
        // Auth is on unless turned off, and on with no tokens it refuses to start.
        assert!(c.auth.enabled);
        assert!(c.validate().unwrap_err().to_string().starts_with("config key auth.tokens:"));
        let mut c = c;
        c.auth.enabled = false;
        c.validate().unwrap();
    }

    #[test]
    fn a_metrics_series_ttl_too_short_for_three_refreshes_is_refused() {
        let mut c = Config::default();
        c.auth.enabled = false;
        c.http.metrics_series_ttl = Duration::from_secs(2);
        let err = c.validate().unwrap_err().to_string();
        assert!(err.starts_with("config key http.metrics_series_ttl:"), "{err}");
        c.http.metrics_series_ttl = Duration::from_secs(3);
        c.validate().unwrap();
    }

    #[test]
    fn yaml_overrides_defaults_and_keeps_the_rest() {
        let c = Config::from_yaml(
            "coordinator:\n  grpc_port: 7000\n  poll_interval: 250ms\ngrpc:\n  max_recv_msg_size: 2MiB\nscheduler:\n  strategy: least_loaded\n",
        )
        .unwrap();
        assert_eq!(c.coordinator.grpc_port, 7000);
        assert_eq!(c.coordinator.poll_interval, Duration::from_millis(250));
        assert_eq!(c.coordinator.http_port, 8090);
        assert_eq!(c.grpc.max_recv_msg_size, ByteSize(2 * MIB));
        assert_eq!(c.scheduler.strategy, Strategy::LeastLoaded);
    }

    #[test]
    fn unknown_key_names_the_key_and_line() {
        let err = Config::from_yaml("coordinator:\n  id: x\n  grpc_prot: 1\n").unwrap_err();
        assert!(err.contains("grpc_prot"), "{err}");
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn bad_size_names_the_key_and_its_line() {
        let err = Config::from_yaml("grpc:\n  max_send_msg_size: 10MiB\n  max_recv_msg_size: 10 parsecs\n")
            .unwrap_err();
        assert!(
            err.contains("max_recv_msg_size") && err.contains("line 3") && err.contains("parsecs"),
            "{err}"
        );
    }

    #[test]
    fn bad_duration_names_the_key() {
        let err = Config::from_yaml("coordinator:\n  poll_interval: soon\n").unwrap_err();
        assert!(err.contains("poll_interval"), "{err}");
    }

    #[test]
    fn a_bad_value_set_from_the_environment_names_its_variable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, "grpc:\n  keepalive:\n    timeout: 5s\n").unwrap();
        let env = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        let err = Config::load(&path, &env(&[("AUTH_ENABLED", "false"), ("GRPC_KEEPALIVE_INTERVAL", "0s")]))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "config key grpc.keepalive.interval: must be greater than 0 (set by GRPC_KEEPALIVE_INTERVAL)"
        );
        std::fs::write(&path, "grpc:\n  keepalive:\n    interval: 0s\n").unwrap();
        let err = Config::load(&path, &env(&[("AUTH_ENABLED", "false")])).unwrap_err().to_string();
        assert_eq!(err, "config key grpc.keepalive.interval: must be greater than 0", "the file set it");
    }

    #[test]
    fn env_overrides_every_kind_of_key() {
        let c = Config::default()
            .with_env(&env(&[
                ("COORDINATOR_GRPC_PORT", "9191"),
                ("DATABASE_URL", "postgres://u:p@localhost/db"),
                ("GRPC_KEEPALIVE_INTERVAL", "20s"),
                ("GRPC_MAX_RECV_MSG_SIZE", "16MiB"),
                ("TLS_ENABLED", "false"),
                ("LOGGING_FORMAT", "text"),
                ("COORDINATOR_ID", "1234"),
                ("UNRELATED", "x"),
            ]))
            .unwrap();
        assert_eq!(c.coordinator.grpc_port, 9191);
        assert_eq!(c.database.url, "postgres://u:p@localhost/db");
        assert_eq!(c.grpc.keepalive.interval, Duration::from_secs(20));
        assert_eq!(c.grpc.max_recv_msg_size, ByteSize(16 * MIB));
        assert_eq!(c.logging.format, LogFormat::Text);
        // A numeric-looking value for a string key stays a string.
        assert_eq!(c.coordinator.id, "1234");
    }

    #[test]
    fn bad_env_value_names_the_variable() {
        let err = Config::default().with_env(&env(&[("COORDINATOR_GRPC_PORT", "ninety")])).unwrap_err();
        let line = err.to_string();
        assert!(line.contains("COORDINATOR_GRPC_PORT"), "{line}");
        assert!(line.contains("ninety"), "{line}");
    }

    #[test]
    fn validation_names_the_key() {
        type Mutation = Box<dyn Fn(&mut Config)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("coordinator.http_port", Box::new(|c| c.coordinator.http_port = 9090)),
            (
                "coordinator.stale_task_timeout",
                Box::new(|c| c.coordinator.stale_task_timeout = Duration::from_secs(1)),
            ),
            ("database.url", Box::new(|c| c.database.url = "mysql://x".into())),
            // Each of these opens a database of its own per connection: "no such table" later.
            ("database.url", Box::new(|c| c.database.url = "sqlite:".into())),
            ("database.url", Box::new(|c| c.database.url = "sqlite://".into())),
            ("database.url", Box::new(|c| c.database.url = "sqlite::memory:".into())),
            ("database.url", Box::new(|c| c.database.url = "sqlite://x.db?mode=memory".into())),
            ("database.max_idle_conns", Box::new(|c| c.database.max_idle_conns = 99)),
            ("scheduler.batch_size", Box::new(|c| c.scheduler.batch_size = 0)),
            ("tasks.default_max_attempts", Box::new(|c| c.tasks.default_max_attempts = 0)),
            ("coordinator.poll_interval", Box::new(|c| c.coordinator.poll_interval = Duration::ZERO)),
            ("tls.cert_file", Box::new(|c| c.tls.enabled = true)),
            ("grpc.max_recv_msg_size", Box::new(|c| c.grpc.max_recv_msg_size = ByteSize(10))),
            ("logging.level", Box::new(|c| c.logging.level = "info,=[".into())),
            // Read by the filter as a target to log alone: every other line would be silenced.
            ("logging.level", Box::new(|c| c.logging.level = "warnn".into())),
            ("auth.tokens", Box::new(|c| c.auth.enabled = true)),
            ("retention.workers", Box::new(|c| c.retention.workers = Duration::from_secs(30))),
            ("retention.interval", Box::new(|c| c.retention.interval = Duration::ZERO)),
            ("retention.batch_size", Box::new(|c| c.retention.batch_size = 0)),
            ("grpc.keepalive.interval", Box::new(|c| c.grpc.keepalive.interval = Duration::ZERO)),
            ("grpc.keepalive.timeout", Box::new(|c| c.grpc.keepalive.timeout = Duration::ZERO)),
        ];
        for (key, mutate) in cases {
            let mut c = Config::default();
            c.auth.enabled = false;
            mutate(&mut c);
            let err = c.validate().expect_err(key).to_string();
            assert!(err.starts_with(&format!("config key {key}:")), "{key}: {err}");
        }
    }

    #[test]
    fn a_level_is_a_level_name_or_directives() {
        for ok in ["info", "WARN", "off", "info,sqlx=warn", "coordinator=debug", "debug,h2=error"] {
            assert_eq!(level_spec_error(ok), None, "{ok}");
        }
        // Each of these parses as a filter that logs one target and silences every other line.
        for bad in ["warnn", "loud", "info,coordinatr", "information"] {
            let e = level_spec_error(bad).unwrap_or_else(|| panic!("{bad} accepted"));
            assert!(e.contains("is not a level"), "{bad}: {e}");
        }
        assert!(level_spec_error("info,=[").is_some());
    }

    #[test]
    fn number_types_are_named_in_words() {
        let e = Config::from_yaml("coordinator:\n  grpc_port: -1\n").unwrap_err();
        assert!(e.contains("expected a whole number from 0 to 65535"), "{e}");
        assert!(!e.contains("u16"), "{e}");
        let e = Config::from_yaml("database:\n  max_open_conns: -3\n").unwrap_err();
        assert!(e.contains("expected a whole number from 0 to 4294967295"), "{e}");
        let env = HashMap::from([("COORDINATOR_HTTP_PORT".to_owned(), "70000".to_owned())]);
        let e = Config::default().with_env(&env).unwrap_err().to_string();
        assert!(e.contains("COORDINATOR_HTTP_PORT") && e.contains("from 0 to 65535"), "{e}");
        assert_eq!(plain_types("expected u160"), "expected u160");
    }

    #[test]
    fn byte_sizes_parse_and_print() {
        assert_eq!("10MiB".parse::<ByteSize>().unwrap(), ByteSize(10 * MIB));
        assert_eq!("512KiB".parse::<ByteSize>().unwrap(), ByteSize(512 * KIB));
        assert_eq!("1000".parse::<ByteSize>().unwrap(), ByteSize(1000));
        assert_eq!("2MB".parse::<ByteSize>().unwrap(), ByteSize(2_000_000));
        assert!("10 parsecs".parse::<ByteSize>().is_err());
        assert!("MiB".parse::<ByteSize>().is_err());
        assert_eq!(ByteSize(10 * MIB).to_string(), "10MiB");
    }

    #[test]
    fn go_style_flag_is_accepted() {
        let args = normalize_args(["coordinator", "-config", "a.yaml"].map(String::from));
        assert_eq!(args, ["coordinator", "--config", "a.yaml"]);
        let args = normalize_args(["coordinator", "-config=b.yaml"].map(String::from));
        assert_eq!(args, ["coordinator", "--config=b.yaml"]);
        // A mistyped one stays a flag of its own, for the parser to name.
        let args = normalize_args(["coordinator", "-conf", "x.yaml"].map(String::from));
        assert_eq!(args, ["coordinator", "--conf", "x.yaml"]);
        let args = normalize_args(["coordinator", "dev", "-ephemeral", "-grpc-port=0"].map(String::from));
        assert_eq!(args, ["coordinator", "dev", "--ephemeral", "--grpc-port=0"]);
        // Short flags, attached values, long flags and plain words are left alone.
        for kept in [["-c", "x.yaml"], ["-cx.yaml", "dev"], ["--config", "-"], ["-c", "./-odd.yaml"]] {
            let args = normalize_args(kept.map(String::from));
            assert_eq!(args, kept);
        }
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact_url("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact_url("sqlite://data/x.db"), "sqlite://data/x.db");
        assert_eq!(
            redact_url("postgres://u@h/db?sslmode=require&password=pw"),
            "postgres://u@h/db?sslmode=require&password=***"
        );
        assert_eq!(redact_url("postgres://u:a@b@h/db"), "postgres://u:***@h/db");
    }

    #[test]
    fn misspelt_override_names_the_nearest_key() {
        let err = Config::default().with_env(&env(&[("COORDINATOR_GRPC_PROT", "1")])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "environment variable COORDINATOR_GRPC_PROT is not a configuration key; did you mean COORDINATOR_GRPC_PORT?"
        );
        let err = Config::default().with_env(&env(&[("DATABASE_ULR", "x")])).unwrap_err();
        assert!(err.to_string().contains("did you mean DATABASE_URL?"), "{err}");
    }

    #[test]
    fn variables_far_from_every_key_or_read_by_a_token_are_not_typos() {
        let mut c = Config::default();
        c.auth.tokens.push(TokenConfig { env: "COORDINATOR_GRPC_TOKEN".into(), ..TokenConfig::default() });
        let vars = [
            "COORDINATOR_SERVICE_HOST",
            "COORDINATOR_PORT",
            "COORDINATOR_PORT_9090_TCP",
            "HTTP_PROXY",
            "GRPC_TRACE",
            "COORDINATOR_GRPC_TOKEN",
            "PATH",
        ];
        for var in vars {
            c.clone().with_env(&env(&[(var, "x")])).unwrap_or_else(|e| panic!("{var}: {e}"));
        }
    }

    #[test]
    fn edit_distance_counts_insertions_deletions_and_substitutions() {
        assert_eq!(edit_distance("PROT", "PORT"), 2);
        assert_eq!(edit_distance("", "ab"), 2);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("same", "same"), 0);
    }

    #[test]
    fn every_leaf_key_has_an_env_name() {
        let vars = env_overrides();
        assert_eq!(vars.get("COORDINATOR_GRPC_PORT").unwrap(), "coordinator.grpc_port");
        assert_eq!(vars.get("DATABASE_URL").unwrap(), "database.url");
        assert_eq!(vars.get("GRPC_KEEPALIVE_TIMEOUT").unwrap(), "grpc.keepalive.timeout");
    }

    #[test]
    fn reject_unknown_types_is_off_unless_set_and_takes_only_a_boolean() {
        assert!(!Config::default().tasks.reject_unknown_types);
        let c = Config::from_yaml("tasks:\n  reject_unknown_types: true\n").unwrap();
        assert!(c.tasks.reject_unknown_types);
        let c = Config::default().with_env(&env(&[("TASKS_REJECT_UNKNOWN_TYPES", "true")])).unwrap();
        assert!(c.tasks.reject_unknown_types);
        let err = Config::from_yaml("tasks:\n  reject_unknown_types: sometimes\n").unwrap_err();
        assert!(err.contains("reject_unknown_types") && err.contains("line 2"), "{err}");
        let err = Config::default()
            .with_env(&env(&[("TASKS_REJECT_UNKNOWN_TYPES", "sometimes")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("TASKS_REJECT_UNKNOWN_TYPES") && err.contains("sometimes"), "{err}");
    }
}
