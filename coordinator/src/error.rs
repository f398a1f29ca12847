//! The coordinator's one error type and its single mapping to gRPC codes.
//!
//! Errors are logged where they are handled (the gRPC boundary logs internal
//! and unavailable errors), not where they are passed up.

use tonic::{Code, Status};

use crate::job::InvalidTransition;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// The job spec did not parse or validate; nothing was stored.
    #[error("invalid job spec: {0}")]
    InvalidSpec(#[from] distill_spec::SpecError),
    /// A request field is missing or malformed (names the field).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error(transparent)]
    InvalidTransition(#[from] InvalidTransition),
    /// A fencing token (task attempt, group generation, session) is stale:
    /// a newer holder exists, so this write is refused.
    #[error("stale {what}: {detail}")]
    Stale { what: &'static str, detail: String },
    #[error("state store: {0}")]
    Store(#[from] StoreError),
    /// Temporarily unable to serve (contention, not the leader); retry.
    /// The request is well-formed but cannot be served in this state (an
    /// incompatible worker version, say).
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl CoordinatorError {
    /// The gRPC code for this error; the only place codes are chosen.
    pub fn code(&self) -> Code {
        match self {
            CoordinatorError::InvalidSpec(_) | CoordinatorError::InvalidArgument(_) => {
                Code::InvalidArgument
            }
            CoordinatorError::NotFound(_) => Code::NotFound,
            CoordinatorError::FailedPrecondition(_) => Code::FailedPrecondition,
            CoordinatorError::InvalidTransition(_) | CoordinatorError::Stale { .. } => {
                Code::FailedPrecondition
            }
            CoordinatorError::Store(StoreError::Unavailable(_))
            | CoordinatorError::Unavailable(_) => Code::Unavailable,
            CoordinatorError::Store(StoreError::LeaseNotFound(_)) => Code::FailedPrecondition,
            CoordinatorError::Store(_) | CoordinatorError::Internal(_) => Code::Internal,
            CoordinatorError::Unauthenticated(_) => Code::Unauthenticated,
            CoordinatorError::PermissionDenied(_) => Code::PermissionDenied,
        }
    }
}

impl From<CoordinatorError> for Status {
    fn from(e: CoordinatorError) -> Status {
        let code = e.code();
        if matches!(code, Code::Internal | Code::Unavailable) {
            tracing::error!(error = %e, "request failed");
        }
        Status::new(code, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_messages() {
        let spec_err = distill_spec::from_toml_str("task = 1").unwrap_err();
        let cases: Vec<(CoordinatorError, Code)> = vec![
            (
                CoordinatorError::InvalidSpec(spec_err),
                Code::InvalidArgument,
            ),
            (
                CoordinatorError::InvalidArgument("job_id: missing".into()),
                Code::InvalidArgument,
            ),
            (
                CoordinatorError::NotFound("job job-000001".into()),
                Code::NotFound,
            ),
            (
                InvalidTransition {
                    from: "failed",
                    event: "start",
                }
                .into(),
                Code::FailedPrecondition,
            ),
            (
                CoordinatorError::Stale {
                    what: "task attempt",
                    detail: "1 < 2".into(),
                },
                Code::FailedPrecondition,
            ),
            (
                StoreError::Unavailable("down".into()).into(),
                Code::Unavailable,
            ),
            (StoreError::Corrupt("x".into()).into(), Code::Internal),
            (
                CoordinatorError::Unauthenticated("no token".into()),
                Code::Unauthenticated,
            ),
            (
                CoordinatorError::PermissionDenied("worker token on client api".into()),
                Code::PermissionDenied,
            ),
        ];
        for (err, code) in cases {
            let msg = err.to_string();
            assert!(
                !msg.ends_with('.') && msg.chars().next().unwrap().is_lowercase(),
                "{msg}"
            );
            let status = Status::from(err);
            assert_eq!(status.code(), code, "{msg}");
            assert_eq!(status.message(), msg);
        }
    }
}
