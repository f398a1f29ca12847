//! Teacher-signal tasks: one per shard of a job, leased to workers, fenced by
//! attempt numbers.
//!
//! A task lives under `tasks/<job_id>/<task_id>` as a [`TaskRecord`]. Every
//! change is a revision-guarded transaction. Leasing bumps the attempt; the
//! attempt is the fencing token a worker must carry when it reports:
//!
//! - a report whose attempt is not the task's current attempt is refused
//!   ([`CoordinatorError::Stale`]), unless the task is already committed, in
//!   which case the caller is told its output is to be discarded;
//! - the first successful report of the current attempt commits the task,
//!   exactly once;
//! - a lease not renewed by heartbeats before its deadline lets another
//!   worker lease the task with a new attempt (the old holder becomes stale);
//! - a straggling *shard* is re-executed speculatively (stage tasks never
//!   are: they write the job's own directory): when a worker asks for work
//!   and nothing is pending, a shard whose only holder has run for longer
//!   than [`Speculation::factor`] × the median duration of the job's
//!   committed tasks (and at least [`Speculation::min_age_ms`]) gets a
//!   *backup* holder with its own, newer attempt. Both attempts are valid;
//!   the first success commits, the other is told to discard its output
//!   (and its next heartbeat aborts it);
//! - a report is accepted only from the session that holds the attempt, and
//!   never once the job is finished (a report after a cancel changes
//!   nothing);
//! - a failure puts the task back with a backoff; after
//!   [`MAX_FAILURES`] failures (or one non-retryable) the task fails, and
//!   with it the job, with a reason naming the shard — in the same
//!   transaction;
//! - a worker that shuts down *releases* its task: pending again at once,
//!   no failure counted.
//!
//! A job's stages are tasks too ([`TaskKind`]): the teacher-signal shards,
//! then one `stage-2-train` task, then one `stage-3-evaluate` task. The
//! commit that finishes a stage moves the job to the next state and creates
//! the next stage's task in one transaction with the task's own change
//! (the job record is staged through [`crate::ledger::Ledger::stage`]), so a
//! crash can never leave a job in a state without its task, nor count a
//! shard twice. Stage task ids sort after every `shard-…` id, so the lease
//! cursor (everything before it is finished) stays valid.

use serde::{Deserialize, Serialize};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::CoordinatorError;
use crate::job::{JobEvent, JobState};
use crate::ledger::{now_ms, JobRecord, Ledger, Versioned};
use crate::store::{Store, Txn};

const TASKS: &str = "tasks/";
/// Failures after which a shard, and its job, fail.
pub const MAX_FAILURES: u32 = 3;
/// Backoff after the first failure; doubles with each further one.
pub const BASE_BACKOFF_MS: i64 = 200;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum TaskState {
    /// Ready to lease from `not_before_ms` on (backoff after a failure).
    Pending {
        not_before_ms: i64,
    },
    /// Held by `holder`, and by a speculative `backup` while the holder
    /// straggles.
    Leased {
        holder: Holder,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        backup: Option<Holder>,
    },
    Committed {
        manifest_uri: String,
        manifest_sha256: String,
        samples: u64,
        /// The output was found already computed (content-addressed).
        #[serde(default)]
        reused: bool,
        /// The attempt whose output this is.
        #[serde(default)]
        by_attempt: u64,
        /// From the committing attempt's lease to its commit.
        #[serde(default)]
        duration_ms: i64,
    },
    Failed {
        reason: String,
    },
}

/// One worker's lease on a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub session: String,
    /// This holder's fencing token.
    pub attempt: u64,
    pub deadline_ms: i64,
    /// When this attempt was leased.
    pub since_ms: i64,
}

impl Holder {
    /// `session` holding `attempt` from `now` for `lease_ms`.
    fn new(session: &str, attempt: u64, now: i64, lease_ms: i64) -> Self {
        Self {
            session: session.to_string(),
            attempt,
            deadline_ms: now + lease_ms,
            since_ms: now,
        }
    }
}

/// When a straggling task gets a backup attempt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Speculation {
    /// A holder older than `factor` × the median committed duration of the
    /// job's tasks is a straggler.
    pub factor: f64,
    /// Never speculate on a holder younger than this.
    pub min_age_ms: i64,
    /// Committed tasks needed before a median is trusted.
    pub min_committed: usize,
}

impl Default for Speculation {
    fn default() -> Self {
        Self {
            factor: 2.0,
            min_age_ms: 1_000,
            min_committed: 3,
        }
    }
}

/// How a lease was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseKind {
    /// A pending task.
    Fresh,
    /// Every holder's lease had expired (presumed dead).
    TookOver,
    /// A backup of a straggler, running alongside its holder.
    Speculative,
}

/// What a task does; a worker learns it from its lease.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// Run the frozen teacher over one shard and store its signal.
    #[default]
    TeacherSignal,
    /// Train the student (data-parallel: one holder, the job's other
    /// workers as members of its group) and export it.
    Train,
    /// Evaluate teacher and student on the test split; write the report.
    Evaluate,
    /// Fine-tune the teacher before its offline signal is computed: the
    /// first task of such a job; its commit creates the shard tasks.
    FineTuneTeacher,
}

impl TaskKind {
    /// The id of a job's single task of this stage (not for shards).
    pub fn stage_task_id(self) -> &'static str {
        match self {
            TaskKind::TeacherSignal => "shard",
            TaskKind::Train => "stage-2-train",
            TaskKind::Evaluate => "stage-3-evaluate",
            // Sorts before every `shard-…` id: the lease cursor moves past
            // it before the shards exist.
            TaskKind::FineTuneTeacher => "fine-tune-teacher",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub job_id: String,
    pub task_id: String,
    #[serde(default)]
    pub kind: TaskKind,
    /// Sample indices `[shard_start, shard_end)` of the job's global order.
    pub shard_start: u64,
    pub shard_end: u64,
    /// The highest attempt handed out; bumped on every lease (including
    /// backups), so attempt numbers are never reused.
    pub attempt: u64,
    pub failures: u32,
    #[serde(flatten)]
    pub state: TaskState,
}

/// What a worker reports for its attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Success {
        manifest_uri: String,
        manifest_sha256: String,
        samples: u64,
        reused: bool,
        outputs: Vec<String>,
    },
    Failure {
        reason: String,
        retryable: bool,
    },
    /// Given back unfinished (the worker is shutting down): pending again,
    /// no failure counted.
    Released,
}

/// The result of a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reported {
    /// This attempt committed the task.
    Committed,
    /// Another attempt had committed first: discard this output.
    AlreadyCommitted,
    /// The failure was recorded; the task will be retried.
    WillRetry,
    /// The task failed for good; the job failed with it (same transaction).
    TaskFailed { reason: String },
    /// Given back: pending again (or left to the other holder).
    Released,
}

fn key(job: &str, task: &str) -> String {
    format!("{TASKS}{job}/{task}")
}

fn encode(t: &TaskRecord) -> Vec<u8> {
    serde_json::to_vec(t).expect("a task record always serialises")
}

fn decode(key: &str, bytes: &[u8]) -> Result<TaskRecord, CoordinatorError> {
    serde_json::from_slice(bytes)
        .map_err(|e| CoordinatorError::Internal(format!("corrupt task record {key}: {e}")))
}

/// Splits `[0, total)` into shards of at most `size` samples. Pure.
pub fn shards(total: u64, size: u64) -> Vec<(u64, u64)> {
    let size = size.max(1);
    (0..total.div_ceil(size))
        .map(|i| (i * size, ((i + 1) * size).min(total)))
        .collect()
}

/// Tasks read per page when looking for one to lease.
const PAGE: usize = 64;

/// The task table over any [`Store`].
#[derive(Debug, Clone)]
pub struct Tasks<S> {
    store: S,
    /// Per job, a key before which every task is committed or failed (so
    /// never leasable again): leasing starts there instead of at the first
    /// shard. Only a hint; a new process starts from the beginning.
    cursors: Arc<Mutex<HashMap<String, String>>>,
    speculation: Option<Speculation>,
}

impl<S: Store> Tasks<S> {
    /// A task table that does not speculate.
    pub fn new(store: S) -> Self {
        Self {
            store,
            cursors: Arc::default(),
            speculation: None,
        }
    }

    /// Backs up stragglers as `speculation` says (`None`: never).
    pub fn with_speculation(mut self, speculation: Option<Speculation>) -> Self {
        self.speculation = speculation;
        self
    }

    /// Creates the job's shard tasks; idempotent (existing tasks are kept).
    pub async fn create_shards(
        &self,
        job_id: &str,
        total: u64,
        shard_size: u64,
    ) -> Result<usize, CoordinatorError> {
        let all = shards(total, shard_size);
        for (i, (start, end)) in all.iter().enumerate() {
            let task_id = format!("shard-{i:05}");
            let rec = TaskRecord {
                job_id: job_id.to_string(),
                task_id: task_id.clone(),
                kind: TaskKind::TeacherSignal,
                shard_start: *start,
                shard_end: *end,
                attempt: 0,
                failures: 0,
                state: TaskState::Pending { not_before_ms: 0 },
            };
            self.store
                .create(&key(job_id, &task_id), encode(&rec), None)
                .await?;
        }
        Ok(all.len())
    }

    /// Every task of `job_id` (all jobs when empty), in key order.
    pub async fn list(&self, job_id: &str) -> Result<Vec<Versioned<TaskRecord>>, CoordinatorError> {
        let prefix = if job_id.is_empty() {
            TASKS.to_string()
        } else {
            format!("{TASKS}{job_id}/")
        };
        let (kvs, _) = self.store.range(&prefix).await?;
        kvs.iter()
            .map(|kv| {
                Ok(Versioned {
                    value: decode(&kv.key, &kv.value)?,
                    revision: kv.mod_revision,
                })
            })
            .collect()
    }

    /// The teacher-signal shard tasks of `job_id`, in key order.
    pub async fn shards(
        &self,
        job_id: &str,
    ) -> Result<Vec<Versioned<TaskRecord>>, CoordinatorError> {
        let mut all = self.list(job_id).await?;
        all.retain(|t| t.value.kind == TaskKind::TeacherSignal);
        Ok(all)
    }

    /// Leases the first available task of any job in `jobs` to `session`
    /// until `now + lease_ms`: a pending task past its backoff, or a leased
    /// one whose every holder's deadline passed (presumed dead:
    /// [`LeaseKind::TookOver`]). When none is available and speculation is
    /// on, a straggler's backup ([`LeaseKind::Speculative`]).
    pub async fn lease(
        &self,
        jobs: &[String],
        session: &str,
        lease_ms: i64,
    ) -> Result<Option<(TaskRecord, LeaseKind)>, CoordinatorError> {
        for job in jobs {
            if let Some(got) = self.lease_available(job, session, lease_ms).await? {
                return Ok(Some(got));
            }
        }
        if let Some(spec) = self.speculation {
            for job in jobs {
                if let Some(got) = self.lease_backup(job, session, lease_ms, spec).await? {
                    return Ok(Some(got));
                }
            }
        }
        Ok(None)
    }

    async fn lease_available(
        &self,
        job: &str,
        session: &str,
        lease_ms: i64,
    ) -> Result<Option<(TaskRecord, LeaseKind)>, CoordinatorError> {
        let prefix = format!("{TASKS}{job}/");
        let start = self.cursors.lock().ok().and_then(|c| c.get(job).cloned());
        let mut from = start.unwrap_or_else(|| prefix.clone());
        let mut finished_so_far = true;
        loop {
            let page = self.store.range_page(&prefix, &from, PAGE).await?;
            let full = page.len() == PAGE;
            for kv in &page {
                let t = decode(&kv.key, &kv.value)?;
                let now = now_ms();
                let kind = match &t.state {
                    TaskState::Pending { not_before_ms } if *not_before_ms <= now => {
                        LeaseKind::Fresh
                    }
                    TaskState::Leased { holder, backup }
                        if holder.deadline_ms <= now
                            && backup.as_ref().is_none_or(|b| b.deadline_ms <= now) =>
                    {
                        LeaseKind::TookOver
                    }
                    TaskState::Committed { .. } | TaskState::Failed { .. } => {
                        if finished_so_far {
                            if let Ok(mut c) = self.cursors.lock() {
                                c.insert(job.to_string(), format!("{}\0", kv.key));
                            }
                        }
                        continue;
                    }
                    _ => {
                        finished_so_far = false;
                        continue;
                    }
                };
                finished_so_far = false;
                let mut rec = t.clone();
                rec.attempt += 1;
                rec.state = TaskState::Leased {
                    holder: Holder::new(session, rec.attempt, now, lease_ms),
                    backup: None,
                };
                if self
                    .store
                    .put_if(&kv.key, encode(&rec), kv.mod_revision)
                    .await?
                    .is_some()
                {
                    tracing::debug!(
                        job = rec.job_id,
                        task = rec.task_id,
                        attempt = rec.attempt,
                        session,
                        ?kind,
                        "task leased"
                    );
                    return Ok(Some((rec, kind)));
                }
                // Lost the race for this task: try the next one.
            }
            match page.last() {
                Some(last) if full => from = format!("{}\0", last.key),
                _ => return Ok(None),
            }
        }
    }

    /// A backup lease on the job's oldest straggler, if one qualifies: held
    /// by another session, without a live backup, older than the threshold.
    async fn lease_backup(
        &self,
        job: &str,
        session: &str,
        lease_ms: i64,
        spec: Speculation,
    ) -> Result<Option<(TaskRecord, LeaseKind)>, CoordinatorError> {
        // Only shards are backed up: a stage task (training, evaluation)
        // writes the job's own directory, and two attempts must never
        // write it at once.
        let all = self.shards(job).await?;
        let mut durations: Vec<i64> = all
            .iter()
            .filter_map(|t| match &t.value.state {
                TaskState::Committed { duration_ms, .. } => Some(*duration_ms),
                _ => None,
            })
            .collect();
        if durations.len() < spec.min_committed.max(1) {
            return Ok(None);
        }
        durations.sort_unstable();
        let median = durations[durations.len() / 2];
        let threshold = ((median as f64 * spec.factor) as i64).max(spec.min_age_ms);
        let now = now_ms();
        let mut stragglers: Vec<_> = all
            .iter()
            .filter_map(|t| match &t.value.state {
                TaskState::Leased { holder, backup }
                    if holder.session != session
                        && holder.deadline_ms > now
                        && now - holder.since_ms > threshold
                        && backup.as_ref().is_none_or(|b| b.deadline_ms <= now) =>
                {
                    Some((holder.since_ms, t))
                }
                _ => None,
            })
            .collect();
        stragglers.sort_by_key(|(since, _)| *since);
        for (_, t) in stragglers {
            let mut rec = t.value.clone();
            let TaskState::Leased { holder, .. } = &rec.state else {
                continue;
            };
            let holder = holder.clone();
            rec.attempt += 1;
            rec.state = TaskState::Leased {
                holder: holder.clone(),
                backup: Some(Holder::new(session, rec.attempt, now, lease_ms)),
            };
            if self
                .store
                .put_if(&key(job, &rec.task_id), encode(&rec), t.revision)
                .await?
                .is_some()
            {
                tracing::info!(
                    job,
                    task = rec.task_id,
                    straggler = holder.session,
                    straggler_attempt = holder.attempt,
                    running_ms = now - holder.since_ms,
                    median_ms = median,
                    backup = session,
                    attempt = rec.attempt,
                    "speculative backup of a straggler"
                );
                return Ok(Some((rec, LeaseKind::Speculative)));
            }
        }
        Ok(None)
    }

    /// The record of task `task` of `job`, if it exists.
    pub async fn get(&self, job: &str, task: &str) -> Result<Option<TaskRecord>, CoordinatorError> {
        let k = key(job, task);
        match self.store.get(&k).await? {
            Some(kv) => Ok(Some(decode(&k, &kv.value)?)),
            None => Ok(None),
        }
    }

    /// Extends the leases `session` holds on the given (task, attempt) refs.
    /// Returns the refs it no longer holds (to abort).
    pub async fn extend(
        &self,
        session: &str,
        running: &[(String, String, u64)],
        lease_ms: i64,
    ) -> Result<Vec<(String, String, u64)>, CoordinatorError> {
        let mut lost = Vec::new();
        for (job, task, attempt) in running {
            let k = key(job, task);
            let held = loop {
                let Some(kv) = self.store.get(&k).await? else {
                    break false;
                };
                let mut rec = decode(&k, &kv.value)?;
                let TaskState::Leased { holder, backup } = &mut rec.state else {
                    break false;
                };
                let mine = |h: &Holder| h.session == session && h.attempt == *attempt;
                let h = if mine(holder) {
                    holder
                } else if let Some(b) = backup.as_mut().filter(|b| mine(b)) {
                    b
                } else {
                    break false;
                };
                h.deadline_ms = now_ms() + lease_ms;
                if self
                    .store
                    .put_if(&k, encode(&rec), kv.mod_revision)
                    .await?
                    .is_some()
                {
                    break true;
                }
            };
            if !held {
                lost.push((job.clone(), task.clone(), *attempt));
            }
        }
        Ok(lost)
    }

    /// The shard tasks of a job whose teacher fine-tuning task `ft` (which
    /// spans the job's samples) committed; idempotent.
    pub async fn create_fine_tuned_shards(
        &self,
        job: &JobRecord,
        ft: &TaskRecord,
    ) -> Result<usize, CoordinatorError> {
        let spec = distill_spec::from_json_str(&job.spec_json).map_err(|e| {
            CoordinatorError::Internal(format!("job {}: stored spec is invalid: {e}", job.id))
        })?;
        self.create_shards(&job.id, ft.shard_end, spec.data.shard_size)
            .await
    }

    /// Adds to `txn` the creation of `job`'s task for stage `kind`, unless
    /// it exists (then the txn is guarded on it staying as it is).
    async fn with_stage_task(
        &self,
        txn: Txn,
        job_id: &str,
        kind: TaskKind,
        samples: u64,
    ) -> Result<Txn, CoordinatorError> {
        let k = key(job_id, kind.stage_task_id());
        if let Some(kv) = self.store.get(&k).await? {
            return Ok(txn.when(&k, kv.mod_revision));
        }
        let rec = TaskRecord {
            job_id: job_id.to_string(),
            task_id: kind.stage_task_id().to_string(),
            kind,
            shard_start: 0,
            shard_end: samples,
            attempt: 0,
            failures: 0,
            state: TaskState::Pending { not_before_ms: 0 },
        };
        Ok(txn.when(&k, 0).put(&k, encode(&rec)))
    }

    /// Changes job `id` by `f` in one guarded transaction; when `f` returns
    /// a stage, that stage's task is created in the same transaction. Used
    /// by the main loop for stage changes that no task report causes
    /// (planning, a takeover's re-count).
    pub async fn advance(
        &self,
        id: &str,
        f: impl FnMut(&mut JobRecord) -> Result<Option<TaskKind>, CoordinatorError>,
    ) -> Result<JobRecord, CoordinatorError> {
        self.advance_spanning(id, None, f).await
    }

    /// [`Tasks::advance`], the created stage task spanning samples
    /// `[0, samples)` when given.
    pub async fn advance_spanning(
        &self,
        id: &str,
        samples: Option<u64>,
        mut f: impl FnMut(&mut JobRecord) -> Result<Option<TaskKind>, CoordinatorError>,
    ) -> Result<JobRecord, CoordinatorError> {
        let ledger = Ledger::new(self.store.clone());
        loop {
            let mut next = None;
            let staged = ledger
                .stage(id, |j| {
                    next = f(j)?;
                    Ok(())
                })
                .await?;
            let mut txn = staged.guard(Txn::new());
            if let Some(kind) = next {
                let samples = samples.unwrap_or(staged.job.progress.shards_total);
                txn = self.with_stage_task(txn, id, kind, samples).await?;
            }
            if self.store.txn(txn).await?.committed() {
                staged.log_change(&self.store).await;
                return Ok(staged.job);
            }
        }
    }

    /// Records the outcome of `attempt` of a task, fenced by the attempt
    /// and the session holding it. The task's change, the job's progress
    /// and state, and the next stage's task commit in one transaction.
    pub async fn report(
        &self,
        session: &str,
        job: &str,
        task: &str,
        attempt: u64,
        outcome: Outcome,
    ) -> Result<Reported, CoordinatorError> {
        let k = key(job, task);
        let ledger = Ledger::new(self.store.clone());
        loop {
            let Some(kv) = self.store.get(&k).await? else {
                return Err(CoordinatorError::NotFound(format!("task {job}/{task}")));
            };
            let mut rec = decode(&k, &kv.value)?;
            if let TaskState::Committed { .. } = rec.state {
                return Ok(Reported::AlreadyCommitted);
            }
            // The reporting holder, and the other one (if any) that stays.
            let (me, other) = match &rec.state {
                TaskState::Leased { holder, backup } if holder.attempt == attempt => {
                    (holder.clone(), backup.clone())
                }
                TaskState::Leased {
                    holder,
                    backup: Some(b),
                } if b.attempt == attempt => (b.clone(), Some(holder.clone())),
                _ => {
                    return Err(CoordinatorError::Stale {
                        what: "task attempt",
                        detail: format!(
                            "{job}/{task} attempt {attempt} is not a current attempt (latest {})",
                            rec.attempt
                        ),
                    })
                }
            };
            if me.session != session {
                return Err(CoordinatorError::Stale {
                    what: "task attempt",
                    detail: format!(
                        "{job}/{task} attempt {attempt} is held by another session, not {session}"
                    ),
                });
            }
            let mut next_stage = None;
            let mut job_change: Option<
                Box<dyn FnOnce(&mut JobRecord) -> Result<(), CoordinatorError> + Send>,
            > = None;
            let reported = match outcome.clone() {
                Outcome::Success {
                    manifest_uri,
                    manifest_sha256,
                    samples,
                    reused,
                    outputs,
                } => {
                    rec.state = TaskState::Committed {
                        manifest_uri,
                        manifest_sha256,
                        samples,
                        reused,
                        by_attempt: attempt,
                        duration_ms: now_ms() - me.since_ms,
                    };
                    let kind = rec.kind;
                    next_stage = match kind {
                        TaskKind::TeacherSignal => Some(TaskKind::Train),
                        TaskKind::Train => Some(TaskKind::Evaluate),
                        TaskKind::Evaluate => None,
                        // Its shards are created once it is committed.
                        TaskKind::FineTuneTeacher => None,
                    };
                    job_change = Some(Box::new(move |j: &mut JobRecord| {
                        match kind {
                            // A per-job counter moves with each commit (no
                            // re-count of every task); the last shard ends
                            // labelling.
                            TaskKind::TeacherSignal => {
                                j.progress.shards_committed += 1;
                                j.progress.shards_reused += reused as u64;
                                if j.progress.shards_committed >= j.progress.shards_total
                                    && j.state == JobState::Labelling
                                {
                                    j.state = j.state.clone().apply(JobEvent::Labelled)?;
                                    j.progress.stage = "training".into();
                                }
                            }
                            TaskKind::Train => {
                                // No quantization stage is built yet: the
                                // job passes through it in this transaction.
                                let s = j.state.clone().apply(JobEvent::Trained)?;
                                j.state = s.apply(JobEvent::Quantized)?;
                                j.progress.stage = "evaluating".into();
                                j.outputs.extend(outputs);
                            }
                            TaskKind::Evaluate => {
                                j.state = j.state.clone().apply(JobEvent::Evaluated)?;
                                j.progress.stage = "done".into();
                                j.outputs.extend(outputs);
                            }
                            TaskKind::FineTuneTeacher => {
                                j.progress.stage = "labelling".into();
                            }
                        }
                        Ok(())
                    }));
                    Reported::Committed
                }
                Outcome::Released => {
                    rec.state = match other {
                        Some(stays) => TaskState::Leased {
                            holder: stays,
                            backup: None,
                        },
                        None => TaskState::Pending { not_before_ms: 0 },
                    };
                    Reported::Released
                }
                Outcome::Failure { reason, retryable } => {
                    rec.failures += 1;
                    if let (Some(stays), true) = (other, retryable && rec.failures < MAX_FAILURES) {
                        // The other attempt carries on alone.
                        rec.state = TaskState::Leased {
                            holder: stays,
                            backup: None,
                        };
                        Reported::WillRetry
                    } else if !retryable || rec.failures >= MAX_FAILURES {
                        let what = match rec.kind {
                            TaskKind::TeacherSignal => "shard",
                            TaskKind::Train => "training task",
                            TaskKind::Evaluate => "evaluation task",
                            TaskKind::FineTuneTeacher => "teacher fine-tuning task",
                        };
                        let reason = format!(
                            "{what} {task} failed {} time(s), last: {reason}",
                            rec.failures
                        );
                        rec.state = TaskState::Failed {
                            reason: reason.clone(),
                        };
                        let r = reason.clone();
                        job_change = Some(Box::new(move |j: &mut JobRecord| {
                            j.state = j.state.clone().apply(JobEvent::Fail { reason: r })?;
                            Ok(())
                        }));
                        Reported::TaskFailed { reason }
                    } else {
                        let backoff = BASE_BACKOFF_MS << (rec.failures - 1).min(10);
                        rec.state = TaskState::Pending {
                            not_before_ms: now_ms() + backoff,
                        };
                        Reported::WillRetry
                    }
                }
            };
            // Every report is guarded by the job's record, so a cancel that
            // lands between our read and our write makes this loop re-read
            // and refuse below.
            let staged = ledger
                .stage(job, |j| {
                    if j.state.is_terminal() {
                        return Err(CoordinatorError::Stale {
                            what: "job",
                            detail: format!(
                                "{job} is {}; the report of {task} attempt {attempt} is discarded",
                                j.state.name()
                            ),
                        });
                    }
                    match job_change {
                        Some(f) => f(j),
                        None => Ok(()),
                    }
                })
                .await?;
            let entered = staged.job.state != staged.before.state;
            let mut txn = Txn::new().when(&k, kv.mod_revision).put(&k, encode(&rec));
            txn = if job_changed(&staged.before, &staged.job) {
                staged.guard(txn)
            } else {
                // Unchanged job: guard on it without rewriting it.
                staged.guard_only(txn)
            };
            if let (true, Some(stage)) = (entered && !staged.job.state.is_terminal(), next_stage) {
                let samples = staged.job.progress.shards_total;
                txn = self.with_stage_task(txn, job, stage, samples).await?;
            }
            if self.store.txn(txn).await?.committed() {
                staged.log_change(&self.store).await;
                if rec.kind == TaskKind::FineTuneTeacher && reported == Reported::Committed {
                    // The teacher is ready: its signal's shards. Outside
                    // the transaction (a job may have more shards than one
                    // transaction may hold); if this process dies first,
                    // the main loop's reconciliation creates them.
                    self.create_fine_tuned_shards(&staged.job, &rec).await?;
                }
                return Ok(reported);
            }
        }
    }
}

/// Whether anything but the update time differs.
fn job_changed(a: &JobRecord, b: &JobRecord) -> bool {
    let mut b = b.clone();
    b.updated_at_ms = a.updated_at_ms;
    *a != b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_records_round_trip() {
        let h = |s: &str, a| Holder {
            session: s.into(),
            attempt: a,
            deadline_ms: 5,
            since_ms: 1,
        };
        for state in [
            TaskState::Pending { not_before_ms: 3 },
            TaskState::Leased {
                holder: h("a", 2),
                backup: None,
            },
            TaskState::Leased {
                holder: h("a", 2),
                backup: Some(h("b", 3)),
            },
            TaskState::Committed {
                manifest_uri: "m".into(),
                manifest_sha256: "00".into(),
                samples: 4,
                reused: true,
                by_attempt: 3,
                duration_ms: 9,
            },
            TaskState::Failed { reason: "r".into() },
        ] {
            let rec = TaskRecord {
                job_id: "j".into(),
                task_id: "t".into(),
                kind: TaskKind::Train,
                shard_start: 0,
                shard_end: 4,
                attempt: 3,
                failures: 1,
                state,
            };
            assert_eq!(decode("k", &encode(&rec)).unwrap(), rec);
        }
    }

    #[test]
    fn shards_cover_every_sample_exactly_once() {
        for total in [0u64, 1, 9, 10, 11, 1000] {
            for size in [1u64, 3, 10, 64] {
                let s = shards(total, size);
                let mut next = 0;
                for (a, b) in &s {
                    assert_eq!(*a, next, "contiguous");
                    assert!(b > a && b - a <= size);
                    next = *b;
                }
                assert_eq!(next, total, "total {total} size {size}");
            }
        }
    }
}
