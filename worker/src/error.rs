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
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
