//! The worker's error type. Messages are lowercase, without trailing
//! punctuation, and name the file and field they are about.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Weights { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Data { path: PathBuf, message: String },
    #[error("invalid device '{0}': expected cpu, cuda or cuda:N")]
    Device(String),
    #[error("{0}")]
    Invalid(String),
    /// Work stopped on request (the worker is shutting down, or its task
    /// was taken away); what was done is checkpointed.
    #[error("stopped on request")]
    Stopped,
    /// A collective (rendezvous, all-reduce, barrier) failed or passed its
    /// deadline.
    #[error("collective: {0}")]
    Collective(String),
    /// The coordinator changed the training group: leave it and join the
    /// new generation (no step is lost).
    #[error("the training group changed")]
    Regroup,
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The error a C++ shim wrote into `err` (NUL-terminated; its first
    /// line), for the call `what`.
    pub(crate) fn shim(err: &[u8], what: &str) -> Self {
        let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
        let msg = String::from_utf8_lossy(&err[..end]);
        Error::Invalid(format!("{what}: {}", msg.lines().next().unwrap_or("")))
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// The tensor a C++ shim returned, or its error (`raw` null).
pub(crate) fn shim_result(
    raw: *mut torch_sys::C_tensor,
    err: &[u8],
    what: &str,
) -> Result<tch::Tensor> {
    if raw.is_null() {
        return Err(Error::shim(err, what));
    }
    // SAFETY: the shim returns a heap-allocated `at::Tensor` that we now own.
    Ok(unsafe { tch::Tensor::from_ptr(raw) })
}
