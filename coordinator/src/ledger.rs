//! The job ledger: one key per job in the [`Store`], every change a
//! transaction guarded by the key's revision.
//!
//! Keys (relative to the store's namespace):
//!
//! | key                     | value                                   |
//! |-------------------------|-----------------------------------------|
//! | `jobs/<id>`             | [`JobRecord`] as JSON                   |
//! | `meta/job-seq`          | last job sequence number (decimal)      |
//! | `requests/<request_id>` | job id created for an idempotency key   |
//!
//! Job ids are `job-<seq>` with a zero-padded, store-allocated sequence, so
//! key order is submission order. A transition reads the job, applies the
//! pure [`JobState::apply`], and writes back only if the key is still at the
//! revision it read; on a conflict it re-reads and tries again (never patches
//! memory), so concurrent writers and a restarted coordinator can never lose
//! or reorder a transition.

use serde::{Deserialize, Serialize};

use crate::error::CoordinatorError;
use crate::job::{JobEvent, JobState};
use crate::store::{Revision, Store, Txn, TxnOutcome};

const JOBS: &str = "jobs/";
const SEQ: &str = "meta/job-seq";
const REQUESTS: &str = "requests/";
/// Attempts of one read-modify-write before giving up under contention.
const MAX_RETRIES: usize = 64;

/// Progress counters shown to clients.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub shards_total: u64,
    pub shards_committed: u64,
    pub steps_total: u64,
    pub steps_done: u64,
    pub checkpoint_step: u64,
    /// What the job's worker reports it is doing ("distilling", ...).
    #[serde(default)]
    pub stage: String,
    /// Committed shards whose output was found already computed.
    #[serde(default)]
    pub shards_reused: u64,
    /// Latest training loss reported.
    #[serde(default)]
    pub loss: f64,
    /// Training: the group's size and generation (0 when not training).
    #[serde(default)]
    pub world_size: u32,
    #[serde(default)]
    pub generation: u64,
    /// Over the last steps, and the time left at that rate.
    #[serde(default)]
    pub steps_per_second: f64,
    #[serde(default)]
    pub samples_per_second: f64,
    #[serde(default)]
    pub eta_seconds: f64,
    /// The latest step's loss terms by name.
    #[serde(default)]
    pub loss_terms: std::collections::BTreeMap<String, f64>,
}

/// A job as persisted under `jobs/<id>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    #[serde(flatten)]
    pub state: JobState,
    /// The validated spec as JSON (`JobSpec::to_json`).
    pub spec_json: String,
    pub priority: i32,
    /// Store-allocated sequence: submission order.
    pub seq: u64,
    pub submitted_at_ms: i64,
    pub updated_at_ms: i64,
    #[serde(default)]
    pub progress: Progress,
    /// What the job produced (the exported student, the report), as URIs
    /// under the artifact root; filled as its stage tasks commit.
    #[serde(default)]
    pub outputs: Vec<String>,
    /// Where the job's own files go, when its submitter chose (an absolute
    /// path every worker shares); otherwise `<artifact root>/jobs/<id>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_dir: Option<String>,
}

impl JobRecord {
    /// The job's own directory under the coordinator's `artifact_root`,
    /// or the one its submitter chose.
    pub fn dir(&self, artifact_root: &str) -> String {
        match &self.output_dir {
            Some(d) => d.clone(),
            None => format!("{}/jobs/{}", artifact_root.trim_end_matches('/'), self.id),
        }
    }
}

/// A value read from the store with the revision it was read at.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned<T> {
    pub value: T,
    pub revision: Revision,
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// Decodes a job record read from `key` (e.g. from a watch event).
pub fn decode(key: &str, bytes: &[u8]) -> Result<JobRecord, CoordinatorError> {
    serde_json::from_slice(bytes)
        .map_err(|e| CoordinatorError::Internal(format!("corrupt job record {key}: {e}")))
}

fn encode(job: &JobRecord) -> Vec<u8> {
    serde_json::to_vec(job).expect("a job record always serialises")
}

/// A job change read at a revision and not yet written: see
/// [`Ledger::stage`].
#[derive(Debug, Clone)]
pub struct Staged {
    key: String,
    revision: Revision,
    /// The record as read.
    pub before: JobRecord,
    /// The record as it will be written.
    pub job: JobRecord,
}

impl Staged {
    /// `txn`, guarded by the job's revision and writing the changed record.
    pub fn guard(&self, txn: Txn) -> Txn {
        txn.when(&self.key, self.revision)
            .put(&self.key, encode(&self.job))
    }

    /// `txn`, guarded by the job's revision, leaving the record as it is.
    pub fn guard_only(&self, txn: Txn) -> Txn {
        txn.when(&self.key, self.revision)
    }

    /// Once the transaction committed: a state change goes to the job's log.
    pub async fn log_change<S: Store>(&self, store: &S) {
        let id = self.key.strip_prefix(JOBS).unwrap_or(&self.key);
        log_state_change(store, id, &self.before.state, &self.job.state).await;
    }
}

/// `job <before> -> <after>[: reason]` in the job's log, when the state
/// changed.
async fn log_state_change<S: Store>(store: &S, id: &str, before: &JobState, after: &JobState) {
    if before.name() == after.name() {
        return;
    }
    let why = match after {
        JobState::Failed { reason } | JobState::Cancelled { reason } => format!(": {reason}"),
        _ => String::new(),
    };
    let line = format!("job {} -> {}{why}", before.name(), after.name());
    crate::joblog::append(store, id, "coordinator", line).await;
}

/// The job ledger over any [`Store`].
#[derive(Debug, Clone)]
pub struct Ledger<S> {
    store: S,
}

impl<S: Store> Ledger<S> {
    pub fn new(store: S) -> Self {
        Self { store }
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    /// Stores a new pending job for an already validated spec. With a
    /// `request_id`, a repeat submission returns the job created first.
    pub async fn submit(
        &self,
        spec: &distill_spec::JobSpec,
        priority: i32,
        request_id: Option<&str>,
    ) -> Result<Versioned<JobRecord>, CoordinatorError> {
        self.submit_to(spec, priority, request_id, None).await
    }

    /// [`Ledger::submit`], with the job's outputs in `output_dir` (an
    /// absolute path) instead of under the artifact root.
    pub async fn submit_to(
        &self,
        spec: &distill_spec::JobSpec,
        priority: i32,
        request_id: Option<&str>,
        output_dir: Option<&str>,
    ) -> Result<Versioned<JobRecord>, CoordinatorError> {
        let spec_json = spec.to_json();
        for _ in 0..MAX_RETRIES {
            if let Some(rid) = request_id {
                if let Some(kv) = self.store.get(&format!("{REQUESTS}{rid}")).await? {
                    let id = String::from_utf8_lossy(&kv.value).to_string();
                    return self.get(&id).await?.ok_or_else(|| {
                        CoordinatorError::Internal(format!("request {rid} names missing job {id}"))
                    });
                }
            }
            let seq_kv = self.store.get(SEQ).await?;
            let (seq_rev, last) = match &seq_kv {
                Some(kv) => (
                    kv.mod_revision,
                    String::from_utf8_lossy(&kv.value)
                        .parse::<u64>()
                        .unwrap_or(0),
                ),
                None => (0, 0),
            };
            let seq = last + 1;
            let id = format!("job-{seq:06}");
            let now = now_ms();
            let job = JobRecord {
                id: id.clone(),
                state: JobState::Pending,
                spec_json: spec_json.clone(),
                priority,
                seq,
                submitted_at_ms: now,
                updated_at_ms: now,
                progress: Progress::default(),
                outputs: vec![],
                output_dir: output_dir.map(str::to_string),
            };
            let key = format!("{JOBS}{id}");
            let mut txn = Txn::new()
                .when(SEQ, seq_rev)
                .when(&key, 0)
                .put(SEQ, seq.to_string())
                .put(&key, encode(&job));
            if let Some(rid) = request_id {
                let rkey = format!("{REQUESTS}{rid}");
                txn = txn.when(&rkey, 0).put(rkey, id.clone());
            }
            if let TxnOutcome::Committed(revision) = self.store.txn(txn).await? {
                return Ok(Versioned {
                    value: job,
                    revision,
                });
            }
        }
        Err(CoordinatorError::Unavailable(
            "too much contention allocating a job id".into(),
        ))
    }

    pub async fn get(&self, id: &str) -> Result<Option<Versioned<JobRecord>>, CoordinatorError> {
        let key = format!("{JOBS}{id}");
        match self.store.get(&key).await? {
            Some(kv) => Ok(Some(Versioned {
                value: decode(&key, &kv.value)?,
                revision: kv.mod_revision,
            })),
            None => Ok(None),
        }
    }

    /// Every job in submission order, and the store revision read at.
    pub async fn list(&self) -> Result<(Vec<Versioned<JobRecord>>, Revision), CoordinatorError> {
        let (kvs, rev) = self.store.range(JOBS).await?;
        let jobs = kvs
            .iter()
            .map(|kv| {
                Ok(Versioned {
                    value: decode(&kv.key, &kv.value)?,
                    revision: kv.mod_revision,
                })
            })
            .collect::<Result<_, CoordinatorError>>()?;
        Ok((jobs, rev))
    }

    /// Applies `event` to job `id` in a revision-guarded transaction,
    /// re-reading on conflict.
    pub async fn transition(
        &self,
        id: &str,
        event: JobEvent,
    ) -> Result<Versioned<JobRecord>, CoordinatorError> {
        self.update(id, |job| {
            job.state = job.state.clone().apply(event.clone())?;
            Ok(())
        })
        .await
    }

    /// Applies `f` to job `id` in a revision-guarded transaction, re-reading
    /// and re-applying on conflict. `f` must be a pure function of the record.
    pub async fn update(
        &self,
        id: &str,
        mut f: impl FnMut(&mut JobRecord) -> Result<(), CoordinatorError> + Send,
    ) -> Result<Versioned<JobRecord>, CoordinatorError> {
        let key = format!("{JOBS}{id}");
        for _ in 0..MAX_RETRIES {
            let Some(current) = self.get(id).await? else {
                return Err(CoordinatorError::NotFound(format!("job {id}")));
            };
            let mut job = current.value;
            let before = job.state.clone();
            f(&mut job)?;
            job.updated_at_ms = now_ms();
            if let Some(revision) = self
                .store
                .put_if(&key, encode(&job), current.revision)
                .await?
            {
                tracing::info!(job = id, state = job.state.name(), revision, "job updated");
                log_state_change(&self.store, id, &before, &job.state).await;
                return Ok(Versioned {
                    value: job,
                    revision,
                });
            }
        }
        Err(CoordinatorError::Unavailable(format!(
            "too much contention updating job {id}"
        )))
    }

    /// Reads job `id` and applies `f` to it without writing: the caller adds
    /// the result to its own transaction with [`Staged::guard`], so a job
    /// change and the task change that caused it commit together or not at
    /// all. On a lost race the caller calls this again (re-reads).
    pub async fn stage(
        &self,
        id: &str,
        f: impl FnOnce(&mut JobRecord) -> Result<(), CoordinatorError>,
    ) -> Result<Staged, CoordinatorError> {
        let Some(current) = self.get(id).await? else {
            return Err(CoordinatorError::NotFound(format!("job {id}")));
        };
        let before = current.value.clone();
        let mut job = current.value;
        f(&mut job)?;
        job.updated_at_ms = now_ms();
        Ok(Staged {
            key: format!("{JOBS}{id}"),
            revision: current.revision,
            before,
            job,
        })
    }

    /// Changes to jobs from `start_revision` on (inclusive).
    pub async fn watch(
        &self,
        start_revision: Option<Revision>,
    ) -> Result<crate::store::Watch, CoordinatorError> {
        Ok(self.store.watch(JOBS, start_revision).await?)
    }
}
