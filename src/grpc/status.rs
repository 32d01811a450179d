//! The one place errors become `tonic::Status`. Codes: `InvalidArgument` bad input, `NotFound`
//! unknown worker/task/job, `FailedPrecondition` a report for an attempt the worker no longer
//! holds, `Unavailable` shutting down or database down, `Internal` for the rest (logged with
//! detail, answered without it).

use tonic::Status;
use tracing::error;

use crate::{batch::BatchError, registry::RegistryError, store::StoreError};

pub fn invalid(field: &str, message: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {message}"))
}

pub fn store(e: StoreError) -> Status {
    if e.is_unavailable() {
        error!(error = %e, "database unavailable");
        Status::unavailable("database unavailable; retry later")
    } else {
        error!(error = %e, "store error");
        Status::internal("internal error")
    }
}

pub fn batch(e: BatchError) -> Status {
    if e.unavailable {
        Status::unavailable("database unavailable; retry later")
    } else {
        error!(error = %e.message, "store error");
        Status::internal("internal error")
    }
}

pub fn registry(e: RegistryError) -> Status {
    match e {
        RegistryError::UnknownWorker(id) => {
            Status::not_found(format!("worker {id} is not registered; call RegisterWorker"))
        }
    }
}

pub fn shutting_down() -> Status {
    Status::unavailable("coordinator is shutting down; reconnect to another replica")
}

/// A failure with nothing to tell the caller (a task of ours panicked; logged where it happened).
pub fn internal_error() -> Status {
    Status::internal("internal error")
}
