//! What a use case answers when it does not succeed: a small, deliberate set of kinds. Each
//! adapter maps them once (`grpc/status.rs` to a `tonic::Status`, `rest.rs` to an HTTP status).

use tracing::error;

use crate::{auth::Refusal, batch::BatchError, registry::RegistryError, store::StoreError};

const DATABASE_UNAVAILABLE: &str = "database unavailable; retry later";

/// The errors of the core's use cases. The message is the caller's, except `Internal`'s, which
/// is logged and never shown.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    /// Bad input; the message names the field.
    #[error("{0}")]
    InvalidArgument(String),
    /// A payload over its limit.
    #[error("{0}")]
    TooLarge(String),
    /// An unknown task, job or worker.
    #[error("{0}")]
    NotFound(String),
    /// Nothing changed: a report for an attempt the worker no longer holds, or a submission of
    /// a type no live worker runs when that is refused.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A name another object already has (a schedule's).
    #[error("{0}")]
    AlreadyExists(String),
    /// Shutting down, or the database is down: retry, elsewhere or later.
    #[error("{0}")]
    Unavailable(String),
    /// Too many requests.
    #[error("{0}")]
    ResourceExhausted(String),
    /// No valid token.
    #[error("{0}")]
    Unauthenticated(String),
    /// A token (or certificate) that may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// A fault of ours; the detail is logged where it is mapped, not answered.
    #[error("internal error: {0}")]
    Internal(String),
}

impl CoreError {
    /// Bad input in `field`.
    pub fn invalid(field: &str, message: impl std::fmt::Display) -> Self {
        CoreError::InvalidArgument(format!("{field}: {message}"))
    }

    /// Shutdown has begun: new streams and registrations go to another replica.
    pub fn shutting_down() -> Self {
        CoreError::Unavailable("coordinator is shutting down; reconnect to another replica".into())
    }
}

impl From<StoreError> for CoreError {
    fn from(e: StoreError) -> Self {
        if e.is_unavailable() {
            error!(error = %e, "database unavailable");
            CoreError::Unavailable(DATABASE_UNAVAILABLE.into())
        } else if let StoreError::UnknownParents(_) = e {
            CoreError::InvalidArgument(format!("depends_on: {e}"))
        } else if let StoreError::JobExists(_) = e {
            CoreError::AlreadyExists(format!("idempotency_key: {e}"))
        } else {
            CoreError::Internal(format!("store error: {e}"))
        }
    }
}

impl From<BatchError> for CoreError {
    fn from(e: BatchError) -> Self {
        if e.unavailable {
            CoreError::Unavailable(DATABASE_UNAVAILABLE.into())
        } else {
            CoreError::Internal(format!("store error: {}", e.message))
        }
    }
}

impl From<RegistryError> for CoreError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::UnknownWorker(id) => {
                CoreError::NotFound(format!("worker {id} is not registered; call RegisterWorker"))
            }
            RegistryError::AnotherProcess(id) => CoreError::NotFound(format!(
                "worker {id}'s session was opened by another process (instance_id); call RegisterWorker"
            )),
        }
    }
}

impl From<tokio::task::JoinError> for CoreError {
    /// A transition's own task failed (it panicked; the panic was logged where it happened).
    fn from(e: tokio::task::JoinError) -> Self {
        CoreError::Internal(format!("transition task: {e}"))
    }
}

impl From<&Refusal> for CoreError {
    fn from(r: &Refusal) -> Self {
        if r.forbidden {
            CoreError::PermissionDenied(r.message.clone())
        } else {
            CoreError::Unauthenticated(r.message.clone())
        }
    }
}
