//! Bearer-token authentication with three roles, shared by the gRPC layer and the REST API.
//!
//! Tokens are never kept in memory as given: each configured token (from an environment
//! variable, a file, or a SHA-256 hex digest in the config) becomes its digest, and a presented
//! token is hashed and compared with every configured digest in constant time.

use std::{fmt, sync::Arc};

use sha2::{Digest, Sha256};

use crate::config::{AuthConfig, ConfigError, TokenConfig};
pub use crate::domain::Role;

/// What a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Nobody is asked for a token (health checks).
    Open,
    /// Any valid token.
    AnyRole,
    /// This role, or admin.
    Role(Role),
    /// Admin only.
    Admin,
}

impl Access {
    fn allows(self, role: Role) -> bool {
        match self {
            Access::Open | Access::AnyRole => true,
            Access::Role(r) => role == r || role == Role::Admin,
            Access::Admin => role == Role::Admin,
        }
    }
}

/// Who a valid token belongs to; handlers find it in the request extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's name from the config (safe to log).
    pub name: String,
    pub role: Role,
    /// For a worker token bound to one worker: the only `worker_id` it may act for.
    pub worker_id: Option<String>,
}

/// Why a call was refused. `reason` is the `coordinator_auth_failures_total` label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
    /// `true`: the caller is known but may not do this (`PermissionDenied` / 403); `false`: the
    /// caller is not known (`Unauthenticated` / 401).
    pub forbidden: bool,
    /// Safe to show the caller.
    pub message: String,
}

impl Refusal {
    fn unauthenticated(reason: &'static str, message: &str) -> Self {
        Self { reason, forbidden: false, message: message.to_owned() }
    }

    pub fn forbidden(reason: &'static str, message: impl Into<String>) -> Self {
        Self { reason, forbidden: true, message: message.into() }
    }
}

struct Entry {
    digest: [u8; 32],
    principal: Arc<Principal>,
}

/// The configured tokens. Cheap to clone.
#[derive(Clone)]
pub struct Authenticator {
    enabled: bool,
    metrics_require_token: bool,
    entries: Arc<Vec<Entry>>,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("enabled", &self.enabled)
            .field("tokens", &self.entries.len())
            .finish_non_exhaustive()
    }
}

/// The shortest token accepted from an environment variable or a file.
pub const MIN_TOKEN_LEN: usize = 16;

impl Authenticator {
    /// Everything allowed (auth off).
    pub fn disabled() -> Self {
        Self { enabled: false, metrics_require_token: false, entries: Arc::new(Vec::new()) }
    }

    /// Reads every token source named in the config. One line naming the token and the fault
    /// when a source is missing, empty or malformed.
    pub fn from_config(cfg: &AuthConfig) -> Result<Self, ConfigError> {
        if !cfg.enabled {
            return Ok(Self::disabled());
        }
        let mut entries = Vec::with_capacity(cfg.tokens.len());
        for t in &cfg.tokens {
            let digest = token_digest(t)?;
            if entries.iter().any(|e: &Entry| e.digest == digest) {
                return Err(token_error(&t.name, "the same token is configured twice".into()));
            }
            let worker_id = (!t.worker_id.is_empty()).then(|| t.worker_id.clone());
            entries.push(Entry {
                digest,
                principal: Arc::new(Principal { name: t.name.clone(), role: t.role, worker_id }),
            });
        }
        Ok(Self {
            enabled: true,
            metrics_require_token: cfg.metrics_require_token,
            entries: Arc::new(entries),
        })
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The access `/metrics` needs.
    pub fn metrics_access(&self) -> Access {
        if self.metrics_require_token { Access::AnyRole } else { Access::Open }
    }

    /// Checks an `authorization` header value against what the call needs. `Ok(None)` when
    /// auth is off or the call is open.
    pub fn check(&self, header: Option<&[u8]>, access: Access) -> Result<Option<Arc<Principal>>, Refusal> {
        if !self.enabled || access == Access::Open {
            return Ok(None);
        }
        let Some(header) = header else {
            return Err(Refusal::unauthenticated("missing_token", "missing authorization header"));
        };
        let token = parse_bearer(header).ok_or_else(|| {
            Refusal::unauthenticated("malformed_header", "authorization header must be `Bearer <token>`")
        })?;
        let digest: [u8; 32] = Sha256::digest(token).into();
        // Every entry is compared, whatever matches, so timing says nothing about which did.
        let mut found: Option<&Arc<Principal>> = None;
        for e in self.entries.iter() {
            if constant_time_eq(&e.digest, &digest) {
                found = Some(&e.principal);
            }
        }
        let principal = found.ok_or_else(|| Refusal::unauthenticated("unknown_token", "unknown token"))?;
        if !access.allows(principal.role) {
            let needs = match access {
                Access::Role(r) => format!("a {r} or admin token"),
                _ => "an admin token".to_owned(),
            };
            return Err(Refusal::forbidden(
                "wrong_role",
                format!("the {} role may not call this: it needs {needs}", principal.role),
            ));
        }
        Ok(Some(principal.clone()))
    }
}

/// `Bearer <token>` (scheme case-insensitive, one space, printable ASCII token).
fn parse_bearer(header: &[u8]) -> Option<&[u8]> {
    let (scheme, token) = header.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = token.trim_ascii();
    (!token.is_empty() && token.iter().all(|b| b.is_ascii_graphic())).then_some(token)
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

fn token_error(name: &str, message: String) -> ConfigError {
    ConfigError::Token { name: name.to_owned(), message }
}

fn token_digest(t: &TokenConfig) -> Result<[u8; 32], ConfigError> {
    let sources = [!t.env.is_empty(), !t.file.is_empty(), !t.sha256.is_empty()];
    if sources.iter().filter(|s| **s).count() != 1 {
        return Err(token_error(&t.name, "set exactly one of env, file and sha256".into()));
    }
    if !t.sha256.is_empty() {
        let mut out = [0u8; 32];
        hex::decode_to_slice(t.sha256.trim(), &mut out)
            .map_err(|_| token_error(&t.name, "sha256 must be 64 hex digits".into()))?;
        return Ok(out);
    }
    let (raw, from) = if !t.env.is_empty() {
        let v = std::env::var(&t.env)
            .map_err(|_| token_error(&t.name, format!("environment variable {} is not set", t.env)))?;
        (v, format!("environment variable {}", t.env))
    } else {
        let v = std::fs::read_to_string(&t.file)
            .map_err(|e| token_error(&t.name, format!("token file {}: {e}", t.file)))?;
        (v, format!("token file {}", t.file))
    };
    let token = raw.trim();
    if token.len() < MIN_TOKEN_LEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(token_error(
            &t.name,
            format!("{from} must hold at least {MIN_TOKEN_LEN} printable characters without spaces"),
        ));
    }
    Ok(Sha256::digest(token.as_bytes()).into())
}

/// The SHA-256 hex digest of a token, as written in `auth.tokens[].sha256`.
pub fn sha256_hex(token: &str) -> String {
    hex::encode(Sha256::digest(token.trim().as_bytes()))
}

/// The access each gRPC method needs, by its path.
pub fn grpc_access(path: &str) -> Access {
    let Some((service, method)) = path.trim_start_matches('/').split_once('/') else {
        return Access::Admin;
    };
    match service {
        "grpc.health.v1.Health" => Access::Open,
        "grpc.reflection.v1.ServerReflection" | "grpc.reflection.v1alpha.ServerReflection" => Access::AnyRole,
        "coordinator.CoordinatorService" => match method {
            "RegisterWorker" | "SendHeartbeat" | "ReceiveTasks" | "ReportCompletion"
            | "ReportCompletions" | "ReportFailure" | "Deregister" => Access::Role(Role::Worker),
            "SubmitTask" | "SubmitTasks" | "GetTask" | "ListTasks" | "CancelTask" | "WatchTask"
            | "SubmitJob" | "GetJob" | "ListJobs" | "CancelJob" | "WatchJob" | "GetFailureSummary"
            | "ListSchedules" => Access::Role(Role::Client),
            // Retries act on failures at large: operators only.
            "RetryTask" | "RetryTasks" => Access::Admin,
            _ => Access::Admin,
        },
        _ => Access::Admin,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(name: &str, role: Role, sha: &str, worker_id: &str) -> TokenConfig {
        TokenConfig {
            name: name.into(),
            role,
            sha256: sha.into(),
            worker_id: worker_id.into(),
            ..TokenConfig::default()
        }
    }

    fn auth() -> Authenticator {
        let cfg = AuthConfig {
            enabled: true,
            metrics_require_token: false,
            tokens: vec![
                token("w", Role::Worker, &sha256_hex("worker-token-0123456789"), "worker-a"),
                token("c", Role::Client, &sha256_hex("client-token-0123456789"), ""),
                token("a", Role::Admin, &sha256_hex("admin-token-0123456789"), ""),
            ],
        };
        Authenticator::from_config(&cfg).unwrap()
    }

    #[test]
    fn roles_reach_only_their_methods() {
        let a = auth();
        let submit = grpc_access("/coordinator.CoordinatorService/SubmitTask");
        let stream = grpc_access("/coordinator.CoordinatorService/ReceiveTasks");
        let workers = grpc_access("/coordinator.CoordinatorService/ListWorkers");
        let w = Some(b"Bearer worker-token-0123456789".as_slice());
        let c = Some(b"bearer client-token-0123456789".as_slice());
        let ad = Some(b"Bearer admin-token-0123456789".as_slice());
        assert_eq!(a.check(w, stream).unwrap().unwrap().worker_id.as_deref(), Some("worker-a"));
        assert_eq!(a.check(w, submit).unwrap_err().reason, "wrong_role");
        assert_eq!(a.check(c, submit).unwrap().unwrap().role, Role::Client);
        assert!(a.check(c, stream).unwrap_err().forbidden);
        assert_eq!(a.check(c, workers).unwrap_err().reason, "wrong_role");
        // The refusal says which token would do.
        let e = a.check(w, submit).unwrap_err().message;
        assert_eq!(e, "the worker role may not call this: it needs a client or admin token");
        assert!(a.check(c, workers).unwrap_err().message.ends_with("it needs an admin token"));
        for access in [submit, stream, workers] {
            assert_eq!(a.check(ad, access).unwrap().unwrap().role, Role::Admin);
        }
    }

    #[test]
    fn missing_malformed_and_unknown_tokens_are_unauthenticated() {
        let a = auth();
        let submit = grpc_access("/coordinator.CoordinatorService/SubmitTask");
        for (header, reason) in [
            (None, "missing_token"),
            (Some(b"client-token-0123456789".as_slice()), "malformed_header"),
            (Some(b"Basic Y2xpZW50".as_slice()), "malformed_header"),
            (Some(b"Bearer ".as_slice()), "malformed_header"),
            (Some(b"Bearer nope-nope-nope-nope".as_slice()), "unknown_token"),
        ] {
            let r = a.check(header, submit).unwrap_err();
            assert_eq!((r.reason, r.forbidden), (reason, false), "{header:?}");
        }
        assert_eq!(a.check(None, grpc_access("/grpc.health.v1.Health/Check")).unwrap(), None);
        assert_eq!(Authenticator::disabled().check(None, submit).unwrap(), None);
    }

    #[test]
    fn token_sources_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t");
        std::fs::write(&file, "file-token-0123456789\n").unwrap();
        let from_file = TokenConfig {
            name: "f".into(),
            role: Role::Client,
            file: file.display().to_string(),
            ..TokenConfig::default()
        };
        let cfg = AuthConfig { enabled: true, metrics_require_token: true, tokens: vec![from_file.clone()] };
        let a = Authenticator::from_config(&cfg).unwrap();
        assert!(a.check(Some(b"Bearer file-token-0123456789"), Access::AnyRole).is_ok());
        assert_eq!(a.metrics_access(), Access::AnyRole);

        let short = dir.path().join("short");
        std::fs::write(&short, "abc").unwrap();
        for (t, needle) in [
            (TokenConfig { file: short.display().to_string(), ..from_file.clone() }, "at least 16"),
            (TokenConfig { file: "/nonexistent/token".into(), ..from_file.clone() }, "/nonexistent/token"),
            (
                TokenConfig {
                    env: "COORDINATOR_TEST_UNSET_TOKEN".into(),
                    file: String::new(),
                    ..from_file.clone()
                },
                "COORDINATOR_TEST_UNSET_TOKEN is not set",
            ),
            (TokenConfig { sha256: "zz".into(), ..from_file.clone() }, "exactly one"),
            (TokenConfig { sha256: "zz".into(), file: String::new(), ..from_file.clone() }, "64 hex digits"),
        ] {
            let cfg = AuthConfig { enabled: true, metrics_require_token: false, tokens: vec![t] };
            let e = Authenticator::from_config(&cfg).unwrap_err().to_string();
            assert!(e.contains(needle) && e.contains("auth token f"), "{e}");
        }
    }
}
