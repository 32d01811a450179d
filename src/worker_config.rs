//! The `worker` binary's configuration (the SDK itself takes [`WorkerOptions`]): defaults, then `configs/worker.yaml` (or `-config FILE`), then
//! environment variables and flags (`--coordinator`, `--worker-id`, `--max-concurrent`,
//! `--handlers`), which win.

use std::{collections::HashMap, path::Path, time::Duration};

use serde::{Deserialize, Serialize};

use coordinator_worker::{
    WorkerOptions, client::ClientSecurity, handlers::ExecConfig, persistent::PersistentConfig,
};

use crate::config::{ByteSize, LoggingConfig};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// `http://host:9090`.
    pub coordinator: String,
    /// Empty: the hostname plus a short random suffix, new on every start.
    pub worker_id: String,
    pub max_concurrent: u32,
    /// Assignments queued beyond `max_concurrent`, for short tasks (0: none).
    pub prefetch: u32,
    /// Built-in handlers to enable; their names are the task types this worker takes.
    pub handlers: Vec<String>,
    /// External commands, one per task type (e.g. a prover CLI).
    pub exec: Vec<ExecEntry>,
    /// Long-lived prover processes, one task type each, spoken to over the framed protocol.
    pub persistent: Vec<PersistentEntry>,
    pub labels: HashMap<String, String>,
    #[serde(with = "humantime_serde")]
    pub drain_grace: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    pub max_message_size: ByteSize,
    /// File holding this worker's bearer token (`WORKER_TOKEN` or `--token` win over it).
    pub token_file: String,
    pub tls: WorkerTls,
    pub logging: LoggingConfig,
}

/// TLS towards the coordinator (`coordinator: https://...`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerTls {
    /// PEM CA bundle that signed the coordinator's certificate.
    pub ca_file: String,
    /// PEM client certificate and key, for mTLS; the certificate names this worker's id.
    pub cert_file: String,
    pub key_file: String,
    /// Name to verify in the coordinator's certificate when it differs from the URL's host.
    pub server_name: String,
}

/// An `exec` handler as written in the file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecEntry {
    pub task_type: String,
    pub command: Vec<String>,
    #[serde(default)]
    pub retriable_exit_codes: Vec<i32>,
    #[serde(default)]
    pub env: HashMap<String, String>,
}

/// A `persistent` handler as written in the file; absent keys take the SDK's defaults
/// ([`PersistentConfig::new`]), `processes` the worker's `max_concurrent` and `max_output` the
/// message limit less room for the envelope.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PersistentEntry {
    pub task_type: String,
    pub command: Vec<String>,
    #[serde(default)]
    pub env: HashMap<String, String>,
    #[serde(default)]
    pub processes: Option<u32>,
    #[serde(default)]
    pub max_output: Option<ByteSize>,
    #[serde(default, with = "humantime_serde")]
    pub start_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub cancel_grace: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub restart_backoff_base: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub restart_backoff_max: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub progress_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub shutdown_grace: Option<Duration>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            coordinator: "http://127.0.0.1:9090".into(),
            worker_id: String::new(),
            max_concurrent: 4,
            prefetch: 0,
            handlers: coordinator_worker::handlers::BUILTIN.iter().map(|s| s.to_string()).collect(),
            exec: Vec::new(),
            persistent: Vec::new(),
            labels: HashMap::new(),
            drain_grace: Duration::from_secs(30),
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            max_message_size: ByteSize(10 * 1024 * 1024),
            token_file: String::new(),
            tls: WorkerTls::default(),
            logging: LoggingConfig::default(),
        }
    }
}

impl WorkerConfig {
    /// Reads a YAML file over the defaults; errors name the file and the key.
    pub fn load(path: &Path) -> Result<WorkerConfig, String> {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("config file {}: {e}", path.display()))?;
        if text.trim().is_empty() {
            return Ok(WorkerConfig::default());
        }
        serde_norway::from_str(&text).map_err(|e| {
            format!("config file {}: {}", path.display(), crate::config::plain_types(&e.to_string()))
        })
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(self.coordinator.starts_with("http://") || self.coordinator.starts_with("https://")) {
            return Err(format!("coordinator: {:?} is not an http:// or https:// URL", self.coordinator));
        }
        if self.max_concurrent == 0 || self.max_concurrent > 10_000 {
            return Err("max_concurrent: must be between 1 and 10000".into());
        }
        if self.prefetch > 1024 {
            return Err("prefetch: must be at most 1024".into());
        }
        if self.handlers.is_empty() && self.exec.is_empty() && self.persistent.is_empty() {
            return Err("handlers: enable at least one handler, exec or persistent entry".into());
        }
        for (i, e) in self.exec.iter().enumerate() {
            if e.command.is_empty() {
                return Err(format!("exec[{i}].command: must name a program"));
            }
        }
        for (i, p) in self.persistent.iter().enumerate() {
            if p.task_type.trim().is_empty() {
                return Err(format!("persistent[{i}].task_type: must not be empty"));
            }
            if p.command.is_empty() {
                return Err(format!("persistent[{i}].command: must name a program"));
            }
            let served_twice = self.handlers.iter().any(|h| h.trim() == p.task_type)
                || self.exec.iter().any(|e| e.task_type == p.task_type)
                || self.persistent[..i].iter().any(|q| q.task_type == p.task_type);
            if served_twice {
                return Err(format!(
                    "persistent[{i}].task_type: {:?} is already served by another handler",
                    p.task_type
                ));
            }
            if p.processes.is_some_and(|n| n == 0 || n > 10_000) {
                return Err(format!("persistent[{i}].processes: must be between 1 and 10000"));
            }
            if p.start_timeout.is_some_and(|t| t.is_zero()) {
                return Err(format!("persistent[{i}].start_timeout: must be more than 0"));
            }
            if let (Some(base), Some(max)) = (p.restart_backoff_base, p.restart_backoff_max)
                && base > max
            {
                return Err(format!(
                    "persistent[{i}].restart_backoff_base: must not exceed restart_backoff_max"
                ));
            }
        }
        if let Some(e) = crate::config::level_spec_error(&self.logging.level) {
            return Err(format!("logging.level: {e}"));
        }
        Ok(())
    }

    /// The worker id: configured, or the hostname plus a random suffix (unique per boot).
    pub fn resolved_worker_id(&self) -> String {
        if !self.worker_id.is_empty() {
            return self.worker_id.clone();
        }
        let host = coordinator_worker::worker::hostname();
        let host: String =
            host.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.').take(100).collect();
        let host = if host.is_empty() { "worker".to_owned() } else { host };
        format!("{host}-{:06x}", rand::random::<u32>() & 0xff_ffff)
    }

    pub fn exec_configs(&self) -> Vec<ExecConfig> {
        self.exec
            .iter()
            .map(|e| ExecConfig {
                task_type: e.task_type.clone(),
                command: e.command.clone(),
                retriable_exit_codes: e.retriable_exit_codes.clone(),
                env: e.env.clone(),
                // Results travel in one gRPC message; leave room for the envelope.
                max_output: self.max_message_size.as_usize().saturating_sub(64 * 1024),
            })
            .collect()
    }

    pub fn persistent_configs(&self) -> Vec<PersistentConfig> {
        self.persistent
            .iter()
            .map(|p| {
                let mut c = PersistentConfig::new(p.task_type.clone(), p.command.clone());
                c.env = p.env.clone();
                c.processes = p.processes.unwrap_or(self.max_concurrent) as usize;
                // Results travel in one gRPC message; leave room for the envelope.
                c.max_output = p
                    .max_output
                    .map(ByteSize::as_usize)
                    .unwrap_or_else(|| self.max_message_size.as_usize().saturating_sub(64 * 1024));
                let set = |field: &mut Duration, value: Option<Duration>| {
                    if let Some(v) = value {
                        *field = v;
                    }
                };
                set(&mut c.start_timeout, p.start_timeout);
                set(&mut c.cancel_grace, p.cancel_grace);
                set(&mut c.restart_backoff_base, p.restart_backoff_base);
                set(&mut c.restart_backoff_max, p.restart_backoff_max);
                set(&mut c.shutdown_grace, p.shutdown_grace);
                c.progress_timeout = p.progress_timeout;
                c
            })
            .collect()
    }

    /// The token and TLS files as the client wants them; `token` (flag or env) wins over
    /// `token_file`.
    pub fn security(&self, token: Option<String>) -> Result<ClientSecurity, String> {
        let path = |s: &str| (!s.is_empty()).then(|| std::path::PathBuf::from(s));
        let token_file = path(&self.token_file);
        let token = ClientSecurity::read_token(token, token_file.as_deref()).map_err(|e| format!("{e:#}"))?;
        Ok(ClientSecurity {
            token,
            ca_file: path(&self.tls.ca_file),
            cert_file: path(&self.tls.cert_file),
            key_file: path(&self.tls.key_file),
            server_name: (!self.tls.server_name.is_empty()).then(|| self.tls.server_name.clone()),
        })
    }

    pub fn options(&self, worker_id: String, capabilities: Vec<String>) -> WorkerOptions {
        let mut o = WorkerOptions::new(self.coordinator.clone(), worker_id);
        o.max_concurrent = self.max_concurrent;
        o.prefetch = self.prefetch;
        o.capabilities = capabilities;
        o.labels = self.labels.clone();
        o.drain_grace = self.drain_grace;
        o.backoff_base = self.backoff_base;
        o.backoff_max = self.backoff_max;
        o.max_message_size = self.max_message_size.as_usize();
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_ids_are_unique_per_boot() {
        let c = WorkerConfig::default();
        c.validate().unwrap();
        assert_ne!(c.resolved_worker_id(), c.resolved_worker_id());
        let named = WorkerConfig { worker_id: "w-1".into(), ..WorkerConfig::default() };
        assert_eq!(named.resolved_worker_id(), "w-1");
    }

    #[test]
    fn the_file_shape_parses_and_unknown_keys_are_refused() {
        let c: WorkerConfig = serde_norway::from_str(
            "coordinator: http://c:9090\nmax_concurrent: 2\nhandlers: [echo]\nexec:\n  - task_type: prove\n    command: [prover, --stdin]\n    retriable_exit_codes: [75]\n",
        )
        .unwrap();
        assert_eq!(c.exec[0].retriable_exit_codes, [75]);
        let e = serde_norway::from_str::<WorkerConfig>("max_concurent: 2\n").unwrap_err().to_string();
        assert!(e.contains("max_concurent"), "{e}");
    }

    #[test]
    fn persistent_entries_take_defaults_from_the_worker_and_are_validated() {
        let c: WorkerConfig = serde_norway::from_str(
            "max_concurrent: 3\nhandlers: []\npersistent:\n  - task_type: prove\n    \
             command: [python3, prover.py, keys.bin]\n    env: {PROVER_MODE: fast}\n    \
             start_timeout: 5m\n    progress_timeout: 30s\n",
        )
        .unwrap();
        c.validate().unwrap();
        let p = &c.persistent_configs()[0];
        assert_eq!(p.command, ["python3", "prover.py", "keys.bin"]);
        assert_eq!(p.processes, 3, "one process per slot by default");
        assert_eq!(p.max_output, 10 * 1024 * 1024 - 64 * 1024);
        assert_eq!(p.start_timeout, Duration::from_secs(300));
        assert_eq!(p.progress_timeout, Some(Duration::from_secs(30)));
        assert_eq!(p.cancel_grace, PersistentConfig::new("x", ["y"]).cancel_grace);
        assert_eq!(p.env["PROVER_MODE"], "fast");

        let c: WorkerConfig = serde_norway::from_str(
            "persistent:\n  - task_type: prove\n    command: [p]\n    processes: 1\n    max_output: 1MiB\n",
        )
        .unwrap();
        let p = &c.persistent_configs()[0];
        assert_eq!((p.processes, p.max_output), (1, 1024 * 1024));

        let invalid = |yaml: &str| {
            let c: WorkerConfig = serde_norway::from_str(yaml).unwrap();
            c.validate().unwrap_err()
        };
        let e = invalid("persistent:\n  - task_type: prove\n    command: []\n");
        assert_eq!(e, "persistent[0].command: must name a program");
        let e = invalid("persistent:\n  - task_type: prove\n    command: [p]\n    processes: 0\n");
        assert!(e.starts_with("persistent[0].processes"), "{e}");
        let e = invalid("persistent:\n  - task_type: echo\n    command: [p]\n");
        assert_eq!(e, "persistent[0].task_type: \"echo\" is already served by another handler");
        let e = invalid("logging:\n  level: warnn\n");
        assert!(e.starts_with("logging.level: \"warnn\" is not a level"), "{e}");
        let e = serde_norway::from_str::<WorkerConfig>(
            "persistent:\n  - task_type: p\n    command: [p]\n    procs: 2\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("procs"), "{e}");
    }
}
