//! The one place errors become `tonic::Status`. Codes: `InvalidArgument` bad input, `OutOfRange`
//! a payload over its limit, `NotFound` unknown worker/task/job, `FailedPrecondition` a report
//! for an attempt the worker no longer holds, `Unauthenticated` / `PermissionDenied` auth,
//! `ResourceExhausted` too many requests, `Unavailable` shutting down or database down,
//! `Internal` for the rest (logged with detail, answered without it).

use tonic::Status;
use tracing::error;

use crate::core::CoreError;

impl From<CoreError> for Status {
    fn from(e: CoreError) -> Self {
        match e {
            CoreError::InvalidArgument(m) => Status::invalid_argument(m),
            CoreError::TooLarge(m) => Status::out_of_range(m),
            CoreError::NotFound(m) => Status::not_found(m),
            CoreError::FailedPrecondition(m) => Status::failed_precondition(m),
            CoreError::AlreadyExists(m) => Status::already_exists(m),
            CoreError::Unavailable(m) => Status::unavailable(m),
            CoreError::ResourceExhausted(m) => Status::resource_exhausted(m),
            CoreError::Unauthenticated(m) => Status::unauthenticated(m),
            CoreError::PermissionDenied(m) => Status::permission_denied(m),
            CoreError::Internal(detail) => {
                error!(error = %detail, "internal error");
                Status::internal("internal error")
            }
        }
    }
}

/// The answer to a call cut at the client's deadline (`grpc-timeout`), as tonic's own server
/// gives it.
pub fn timeout_expired() -> Status {
    Status::cancelled("Timeout expired")
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    #[test]
    fn internal_errors_are_answered_without_their_detail() {
        let s = Status::from(CoreError::Internal("disk on fire at /var/lib".into()));
        assert_eq!(s.code(), Code::Internal);
        assert_eq!(s.message(), "internal error");
        let s = Status::from(CoreError::invalid("worker_id", "must not be empty"));
        assert_eq!((s.code(), s.message()), (Code::InvalidArgument, "worker_id: must not be empty"));
        assert_eq!(Status::from(CoreError::shutting_down()).code(), Code::Unavailable);
    }
}
