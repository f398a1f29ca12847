//! The gRPC edge: prost types stop here: each gRPC request is converted into checked
//! domain values (an `InvalidArgument` naming the missing or bad field), and
//! domain values back into replies.

use distill_proto::v1 as pb;

use crate::error::CoordinatorError;
use crate::job::JobState;
use crate::ledger::{JobRecord, Versioned};
use crate::store::LeaseId;
use crate::tasks::Outcome;

pub(crate) fn parse_session(id: &str) -> Result<LeaseId, CoordinatorError> {
    id.strip_prefix("s-")
        .and_then(|h| i64::from_str_radix(h, 16).ok())
        .ok_or_else(|| {
            CoordinatorError::InvalidArgument(format!("session_id: \"{id}\" is not a session id"))
        })
}

pub(crate) fn required<'a>(field: &str, v: &'a str) -> Result<&'a str, CoordinatorError> {
    if v.trim().is_empty() {
        Err(CoordinatorError::InvalidArgument(format!(
            "{field}: missing"
        )))
    } else {
        Ok(v)
    }
}

pub(crate) fn state_to_pb(s: &JobState) -> pb::JobState {
    match s {
        JobState::Pending => pb::JobState::Pending,
        JobState::Planning => pb::JobState::Planning,
        JobState::Labelling => pb::JobState::Labelling,
        JobState::Training => pb::JobState::Training,
        JobState::Quantizing => pb::JobState::Quantizing,
        JobState::Evaluating => pb::JobState::Evaluating,
        JobState::Succeeded => pb::JobState::Succeeded,
        JobState::Failed { .. } => pb::JobState::Failed,
        JobState::Cancelled { .. } => pb::JobState::Cancelled,
    }
}

impl From<&Versioned<JobRecord>> for pb::Job {
    fn from(v: &Versioned<JobRecord>) -> Self {
        let j = &v.value;
        pb::Job {
            job_id: j.id.clone(),
            state: state_to_pb(&j.state) as i32,
            spec_json: j.spec_json.clone(),
            priority: j.priority,
            submitted_at_ms: j.submitted_at_ms,
            updated_at_ms: j.updated_at_ms,
            reason: j.state.reason().unwrap_or_default().to_string(),
            progress: Some(pb::Progress {
                shards_total: j.progress.shards_total,
                shards_committed: j.progress.shards_committed,
                steps_total: j.progress.steps_total,
                steps_done: j.progress.steps_done,
                checkpoint_step: j.progress.checkpoint_step,
                stage: j.progress.stage.clone(),
                shards_reused: j.progress.shards_reused,
                loss: j.progress.loss,
                world_size: j.progress.world_size,
                generation: j.progress.generation,
                steps_per_second: j.progress.steps_per_second,
                samples_per_second: j.progress.samples_per_second,
                eta_seconds: j.progress.eta_seconds,
                loss_terms: j.progress.loss_terms.clone().into_iter().collect(),
            }),
            revision: v.revision,
            outputs: j.outputs.clone(),
            output_dir: j.output_dir.clone().unwrap_or_default(),
        }
    }
}

/// A checked `SubmitJobRequest`.
pub(crate) struct Submit {
    pub(crate) spec: distill_spec::JobSpec,
    pub(crate) priority: i32,
    pub(crate) request_id: Option<String>,
    pub(crate) output_dir: Option<String>,
}

impl TryFrom<pb::SubmitJobRequest> for Submit {
    type Error = CoordinatorError;
    fn try_from(r: pb::SubmitJobRequest) -> Result<Self, CoordinatorError> {
        let format = match pb::SpecFormat::try_from(r.format) {
            Ok(pb::SpecFormat::Json) => distill_spec::Format::Json,
            Ok(pb::SpecFormat::Toml | pb::SpecFormat::Unspecified) => distill_spec::Format::Toml,
            Err(_) => {
                return Err(CoordinatorError::InvalidArgument(format!(
                    "format: unknown value {}",
                    r.format
                )))
            }
        };
        required("spec", &r.spec)?;
        let spec = distill_spec::parse(&r.spec, format)?;
        let output_dir = match r.output_dir.as_str() {
            "" => None,
            d => {
                let p = std::path::Path::new(d);
                if !p.is_absolute()
                    || p.components()
                        .any(|c| matches!(c, std::path::Component::ParentDir))
                {
                    return Err(CoordinatorError::InvalidArgument(format!(
                        "output_dir: {d:?} must be an absolute path without `..`"
                    )));
                }
                Some(d.trim_end_matches('/').to_string())
            }
        };
        Ok(Submit {
            spec,
            priority: r.priority,
            request_id: (!r.request_id.is_empty()).then_some(r.request_id),
            output_dir,
        })
    }
}

/// A checked `ReportTaskRequest`.
pub(crate) struct Report {
    pub(crate) session_id: String,
    pub(crate) job_id: String,
    pub(crate) task_id: String,
    pub(crate) attempt: u64,
    pub(crate) outcome: Outcome,
}

impl TryFrom<pb::ReportTaskRequest> for Report {
    type Error = CoordinatorError;
    fn try_from(r: pb::ReportTaskRequest) -> Result<Self, CoordinatorError> {
        use pb::report_task_request::Outcome as O;
        let task = r
            .r#ref
            .ok_or_else(|| CoordinatorError::InvalidArgument("ref: missing".into()))?;
        if task.attempt == 0 {
            return Err(CoordinatorError::InvalidArgument(
                "ref.attempt: missing (attempts start at 1)".into(),
            ));
        }
        let outcome = match r
            .outcome
            .ok_or_else(|| CoordinatorError::InvalidArgument("outcome: missing".into()))?
        {
            O::Success(s) => {
                if !is_sha256_hex(&s.manifest_sha256) {
                    return Err(CoordinatorError::InvalidArgument(
                        "success.manifest_sha256: must be 64 hex digits".into(),
                    ));
                }
                Outcome::Success {
                    manifest_uri: required("success.manifest_uri", &s.manifest_uri)?.to_string(),
                    manifest_sha256: s.manifest_sha256,
                    samples: s.samples,
                    reused: s.reused,
                    outputs: s.outputs,
                }
            }
            O::Failure(f) if f.released => Outcome::Released,
            O::Failure(f) => Outcome::Failure {
                reason: f.reason,
                retryable: f.retryable,
            },
        };
        Ok(Report {
            session_id: required("session_id", &r.session_id)?.to_string(),
            job_id: required("ref.job_id", &task.job_id)?.to_string(),
            task_id: required("ref.task_id", &task.task_id)?.to_string(),
            attempt: task.attempt,
            outcome,
        })
    }
}

/// A sha256 digest as 64 hex digits (checkpoint and manifest hashes).
pub(crate) fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Whether a worker of `theirs` can work with a coordinator of `ours`:
/// the same major version, and for 0.x the same minor (semver's rule for
/// breaking changes). An empty or unparsable version is incompatible.
pub(crate) fn compatible_version(ours: &str, theirs: &str) -> bool {
    let parse = |v: &str| -> Option<(u64, u64)> {
        let mut it = v.trim().split('.');
        Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
    };
    match (parse(ours), parse(theirs)) {
        (Some((0, a)), Some((0, b))) => a == b,
        (Some((a, _)), Some((b, _))) => a == b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_compatible_by_semver() {
        assert!(compatible_version("0.1.0", "0.1.7"));
        assert!(!compatible_version("0.1.0", "0.2.0"));
        assert!(compatible_version("1.2.0", "1.9.1"));
        assert!(!compatible_version("1.2.0", "2.0.0"));
        assert!(!compatible_version("0.1.0", ""));
        assert!(!compatible_version("0.1.0", "banana"));
    }

    #[test]
    fn sha256_digests_are_64_hex_digits() {
        assert!(is_sha256_hex(&"ab".repeat(32)));
        assert!(!is_sha256_hex("abc"));
        assert!(!is_sha256_hex(&"zz".repeat(32)));
    }
}
