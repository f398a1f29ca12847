//! A job's log: what the coordinator saw happen to it, one line per event
//! (state changes, task leases, commits and failures, training groups
//! formed, checkpoints committed), kept in the state store so it survives
//! a coordinator's death and is the same whichever coordinator leads.
//! `distill logs JOB` reads it (`JobService/JobLogs`).
//!
//! | key                                   | value                    |
//! |---------------------------------------|--------------------------|
//! | `joblog/<job>/<ms, 13 digits>-<n, 6>` | [`LogLine`] as JSON      |
//!
//! Keys sort by time; `n` orders the lines this process wrote in the same
//! millisecond. Appends are best-effort: a failed append is logged here
//! and never fails the request that caused it.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::error::CoordinatorError;
use crate::store::Store;

const PREFIX: &str = "joblog/";

/// One event of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogLine {
    pub at_ms: i64,
    /// Who it concerns: `coordinator`, or a worker's name.
    pub source: String,
    pub message: String,
}

static SEQ: AtomicU64 = AtomicU64::new(0);

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Appends `message` to job `job`'s log.
pub async fn append<S: Store>(store: &S, job: &str, source: &str, message: impl Into<String>) {
    let line = LogLine {
        at_ms: now_ms(),
        source: source.to_string(),
        message: message.into(),
    };
    let n = SEQ.fetch_add(1, Ordering::Relaxed) % 1_000_000;
    let key = format!("{PREFIX}{job}/{:013}-{n:06}", line.at_ms);
    let value = serde_json::to_vec(&line).expect("a log line serializes");
    if let Err(e) = store.put(&key, value).await {
        tracing::warn!(job, error = %e, "cannot append to the job log");
    }
}

/// Up to `limit` lines of job `job`'s log after the key `after` (empty:
/// from the start), and the key to continue from.
pub async fn read<S: Store>(
    store: &S,
    job: &str,
    after: &str,
    limit: usize,
) -> Result<(Vec<LogLine>, String), CoordinatorError> {
    let prefix = format!("{PREFIX}{job}/");
    let from = if after.is_empty() {
        prefix.clone()
    } else if let Some(k) = after.strip_prefix(&prefix) {
        // Just past `after`.
        format!("{prefix}{k}\0")
    } else {
        return Err(CoordinatorError::InvalidArgument(format!(
            "after: {after:?} is not a key of job {job}'s log"
        )));
    };
    let kvs = store.range_page(&prefix, &from, limit).await?;
    let mut next = after.to_string();
    let mut lines = Vec::with_capacity(kvs.len());
    for kv in kvs {
        let line: LogLine = serde_json::from_slice(&kv.value)
            .map_err(|e| CoordinatorError::Internal(format!("job log entry {}: {e}", kv.key)))?;
        lines.push(line);
        next = kv.key;
    }
    Ok((lines, next))
}
