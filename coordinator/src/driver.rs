//! The coordinator's main loop: it consumes a closed [`Event`] stream and,
//! after each batch of events, runs one *pass* that reads the store, applies
//! the pure [`crate::scheduler::schedule`] policy, and moves jobs along
//! (pending → planning → labelling, or training for an online teacher).
//!
//! A pass keeps no state of its own between runs: it re-reads jobs, live
//! sessions and assignments, so a restarted (or newly elected) coordinator
//! picks up exactly where the store says things are. Every write is a
//! guarded transaction; when one loses a race the next pass sees the winner.
//!
//! Keys it owns:
//!
//! | key                      | value  | lease                      |
//! |--------------------------|--------|----------------------------|
//! | `assignments/<session>`  | job id | the worker's session lease |
//!
//! An assignment vanishes with its worker's session, so a dead worker's
//! slot is refilled on the next pass. Planning counts the examples of the
//! spec's `data.train` and `data.unlabelled` files with the reader the
//! worker uses (`distill_data::training_examples`; relative paths are
//! relative to the coordinator's working directory) unless the spec states
//! `data.num_samples`, and cuts them into `data.shard_size` shards.
//!
//! Shutdown is through a [`Shutdown`] token: the loop finishes its pass and
//! returns.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::error::CoordinatorError;
use crate::job::{JobEvent, JobState};
use crate::ledger::{JobRecord, Ledger, Versioned};
use crate::scheduler::{schedule, Action, JobView, WorkerView};
use crate::store::{EventKind, Store, StoreError, Txn};
use crate::tasks::{TaskKind, TaskState, Tasks};

pub(crate) const ASSIGNMENTS: &str = "assignments/";
pub(crate) const SESSIONS: &str = "sessions/";

/// Something the main loop reacts to. Closed: every source of work for the
/// loop is one of these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    JobSubmitted {
        job_id: String,
    },
    JobCancelled {
        job_id: String,
    },
    WorkerRegistered {
        session_id: String,
    },
    /// A worker asked for work but has no job: schedule it now.
    WorkerIdle {
        session_id: String,
    },
    /// A session's lease expired (seen through a watch).
    WorkerExpired {
        session_id: String,
    },
    TaskReported {
        job_id: String,
    },
    /// Periodic: re-check everything (every heartbeat interval).
    Tick,
}

/// A cancellation token: cloned freely, cancelled once, awaited anywhere.
#[derive(Debug, Clone)]
pub struct Shutdown {
    tx: std::sync::Arc<watch::Sender<bool>>,
    rx: watch::Receiver<bool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        let (tx, rx) = watch::channel(false);
        Self {
            tx: std::sync::Arc::new(tx),
            rx,
        }
    }
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.tx.send_replace(true);
    }
    pub fn is_cancelled(&self) -> bool {
        *self.rx.borrow()
    }
    /// Resolves once [`Shutdown::cancel`] has been called.
    pub async fn cancelled(&self) {
        let mut rx = self.rx.clone();
        let _ = rx.wait_for(|c| *c).await;
    }
}

/// How request handlers talk to the loop.
#[derive(Debug, Clone)]
pub struct LoopHandle {
    events: mpsc::UnboundedSender<Event>,
    passes: watch::Receiver<u64>,
}

impl LoopHandle {
    /// Queues an event; dropped silently when the loop is not running (a
    /// standby, say): the next leader's first pass sees the store anyway.
    pub fn send(&self, event: Event) {
        let _ = self.events.send(event);
    }

    /// Queues an event and waits (up to `timeout`) for a pass that started
    /// after it to finish.
    pub async fn send_and_wait(&self, event: Event, timeout: Duration) {
        let mut passes = self.passes.clone();
        let seen = *passes.borrow_and_update();
        self.send(event);
        // The pass running now may have read the store before the event:
        // wait for the one after it.
        let _ = tokio::time::timeout(timeout, passes.wait_for(|n| *n >= seen + 2)).await;
    }
}

/// The receiving ends the loop runs on.
pub struct LoopInbox {
    events: mpsc::UnboundedReceiver<Event>,
    passes: watch::Sender<u64>,
}

/// A connected handle and inbox.
pub fn channel() -> (LoopHandle, LoopInbox) {
    let (etx, erx) = mpsc::unbounded_channel();
    let (ptx, prx) = watch::channel(0);
    (
        LoopHandle {
            events: etx,
            passes: prx,
        },
        LoopInbox {
            events: erx,
            passes: ptx,
        },
    )
}

/// The session id's lease (`s-<hex lease id>`).
pub(crate) fn session_lease(session: &str) -> Option<i64> {
    session
        .strip_prefix("s-")
        .and_then(|h| i64::from_str_radix(h, 16).ok())
}

/// Runs the main loop until `shutdown` is cancelled.
pub async fn run<S: Store>(
    store: S,
    tick: Duration,
    inbox: &mut LoopInbox,
    shutdown: Shutdown,
    metrics: crate::metrics::Metrics,
) -> Result<(), CoordinatorError> {
    let mut driver = Driver::new(store.clone());
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sessions = store.watch(SESSIONS, None).await.ok();
    let mut first = true;
    while !shutdown.is_cancelled() {
        let mut batch = Vec::new();
        tokio::select! {
            _ = shutdown.cancelled() => break,
            ev = inbox.events.recv() => match ev {
                Some(ev) => batch.push(ev),
                None => break,
            },
            ev = async { sessions.as_mut()?.next().await } => match ev {
                Some(Ok(ev)) if ev.kind == EventKind::Delete => {
                    let session_id = ev.kv.key.trim_start_matches(SESSIONS).to_string();
                    metrics
                        .session_expiries
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    batch.push(Event::WorkerExpired { session_id });
                }
                Some(Ok(_)) => batch.push(Event::Tick),
                Some(Err(_)) | None => sessions = None,
            },
            _ = ticker.tick() => {
                batch.push(Event::Tick);
                if sessions.is_none() {
                    sessions = store.watch(SESSIONS, None).await.ok();
                }
            }
        }
        while let Ok(ev) = inbox.events.try_recv() {
            batch.push(ev);
        }
        tracing::debug!(events = batch.len(), "scheduler pass");
        if let Err(e) = driver.pass(&batch, first).await {
            // Handled here: nothing was patched in memory, the next pass
            // re-reads the store.
            tracing::warn!(error = %e, "scheduler pass failed; retrying on the next event");
        } else {
            first = false;
        }
        inbox.passes.send_modify(|n| *n += 1);
    }
    tracing::info!("scheduler stopped");
    Ok(())
}

/// Scheduling limits parsed from a job's spec (which never changes).
#[derive(Debug, Clone, Copy)]
struct Limits {
    min_workers: u32,
    max_workers: u32,
}

struct Driver<S> {
    store: S,
    ledger: Ledger<S>,
    tasks: Tasks<S>,
    limits: HashMap<String, Limits>,
}

impl<S: Store> Driver<S> {
    fn new(store: S) -> Self {
        Self {
            ledger: Ledger::new(store.clone()),
            tasks: Tasks::new(store.clone()),
            store,
            limits: HashMap::new(),
        }
    }

    fn limits(&mut self, job: &JobRecord) -> Limits {
        *self.limits.entry(job.id.clone()).or_insert_with(|| {
            // The stored spec was validated at submission; one that no
            // longer parses (an older layout) fails at planning, so a
            // minimal one-worker claim is enough until then.
            match distill_spec::from_json_str(&job.spec_json) {
                Ok(spec) => Limits {
                    min_workers: spec.cluster.min_workers.max(1),
                    max_workers: spec.cluster.max_workers.max(1),
                },
                Err(_) => Limits {
                    min_workers: 1,
                    max_workers: 1,
                },
            }
        })
    }

    async fn pass(&mut self, _events: &[Event], first: bool) -> Result<(), CoordinatorError> {
        let (jobs, _) = self.ledger.list().await?;
        let (sessions, _) = self.store.range(SESSIONS).await?;
        let (assigned, _) = self.store.range(ASSIGNMENTS).await?;
        let assigned: HashMap<String, (String, i64)> = assigned
            .into_iter()
            .map(|kv| {
                let s = kv.key.trim_start_matches(ASSIGNMENTS).to_string();
                (
                    s,
                    (String::from_utf8_lossy(&kv.value).into(), kv.mod_revision),
                )
            })
            .collect();
        let workers: Vec<WorkerView> = sessions
            .iter()
            .map(|kv| {
                let session = kv.key.trim_start_matches(SESSIONS).to_string();
                let job = assigned.get(&session).map(|(j, _)| j.clone());
                WorkerView { session, job }
            })
            .collect();
        let views: Vec<JobView> = jobs
            .iter()
            .map(|j| {
                let l = self.limits(&j.value);
                JobView {
                    id: j.value.id.clone(),
                    state: j.value.state.clone(),
                    priority: j.value.priority,
                    seq: j.value.seq,
                    min_workers: l.min_workers,
                    max_workers: l.max_workers,
                }
            })
            .collect();
        for action in schedule(&views, &workers) {
            self.apply(action, &assigned).await?;
        }
        // Jobs to plan: every job in planning (a crash mid-planning is
        // finished here; creating shards is idempotent).
        let (jobs, _) = self.ledger.list().await?;
        for job in jobs.iter().filter(|j| j.value.state == JobState::Planning) {
            self.plan(job).await?;
        }
        // Progress moves with each commit (one transaction); re-count only
        // when taking over, in case the store holds an older layout.
        if first {
            for job in jobs.iter().filter(|j| j.value.state == JobState::Labelling) {
                self.reconcile_labelling(&job.value.id).await?;
            }
        }
        self.limits.retain(|id, _| {
            jobs.iter()
                .any(|j| &j.value.id == id && !j.value.state.is_terminal())
        });
        Ok(())
    }

    async fn apply(
        &self,
        action: Action,
        assigned: &HashMap<String, (String, i64)>,
    ) -> Result<(), CoordinatorError> {
        match action {
            Action::Release { session } => {
                if let Some((job, rev)) = assigned.get(&session) {
                    let key = format!("{ASSIGNMENTS}{session}");
                    self.store.delete_if(&key, *rev).await?;
                    tracing::info!(session, job, "worker released");
                }
            }
            Action::Start { job, workers } => {
                match self.ledger.transition(&job, JobEvent::Start).await {
                    Ok(_) => {}
                    // Cancelled (or started by another pass) meanwhile.
                    Err(CoordinatorError::InvalidTransition(_)) => return Ok(()),
                    Err(e) => return Err(e),
                }
                tracing::info!(job, workers = workers.len(), "job started");
                for session in workers {
                    self.assign(&job, &session).await?;
                }
            }
            Action::Assign { job, session } => self.assign(&job, &session).await?,
        }
        Ok(())
    }

    /// Assigns a free worker to `job`, attached to the worker's session
    /// lease; a worker that died meanwhile is skipped.
    async fn assign(&self, job: &str, session: &str) -> Result<(), CoordinatorError> {
        let Some(lease) = session_lease(session) else {
            return Ok(());
        };
        let key = format!("{ASSIGNMENTS}{session}");
        let txn = Txn::new()
            .when(&key, 0)
            .put_with_lease(&key, job.as_bytes().to_vec(), lease);
        match self.store.txn(txn).await {
            Ok(_) | Err(StoreError::LeaseNotFound(_)) => Ok(()),
            // etcd reports a put on an expired lease as a plain error.
            Err(StoreError::Unavailable(m)) if m.contains("lease not found") => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Planning → labelling with the job's shard tasks created, or →
    /// training for an online teacher; → failed when the data cannot be
    /// counted.
    async fn plan(&self, job: &Versioned<JobRecord>) -> Result<(), CoordinatorError> {
        let id = job.value.id.clone();
        let spec = match distill_spec::from_json_str(&job.value.spec_json) {
            Ok(s) => s,
            Err(e) => {
                return self
                    .fail(&id, format!("planning: stored spec is invalid: {e}"))
                    .await
            }
        };
        if spec.distill.teacher_signal == distill_spec::TeacherSignal::Online {
            // Straight to training, with the training task, in one
            // transaction.
            let r = self
                .tasks
                .advance(&id, |j| {
                    j.state = j
                        .state
                        .clone()
                        .apply(JobEvent::Planned { labelling: false })?;
                    j.progress.stage = "training".into();
                    Ok(Some(TaskKind::Train))
                })
                .await;
            return match r {
                Ok(_) | Err(CoordinatorError::InvalidTransition(_)) => Ok(()),
                Err(e) => Err(e),
            };
        }
        let total = match spec.data.num_samples {
            Some(n) => n,
            None => {
                // The same reader, policy and order the worker uses: the
                // plan counts examples, not lines.
                let s = spec.clone();
                match tokio::task::spawn_blocking(move || distill_data::training_examples(&s)).await
                {
                    Ok(Ok(read)) => {
                        if !read.skipped.is_empty() {
                            tracing::warn!(
                                job = id,
                                skipped = read.skipped.len(),
                                first = %read.skipped[0],
                                "bad examples skipped (data.on_bad_example = \"skip\")"
                            );
                        }
                        read.examples.len() as u64
                    }
                    Ok(Err(e)) => return self.fail(&id, format!("planning: {e}")).await,
                    Err(e) => return Err(CoordinatorError::Internal(format!("reading data: {e}"))),
                }
            }
        };
        // Every example's augmented copies follow in the global order.
        let total = spec.data.with_augmented(total);
        if total == 0 {
            return self
                .fail(&id, "planning: the data holds no samples".into())
                .await;
        }
        if spec.teacher.fine_tune {
            // The teacher is fine-tuned first, in a task of its own that
            // spans the samples; its commit creates the shards.
            let n = crate::tasks::shards(total, spec.data.shard_size).len() as u64;
            let r = self
                .tasks
                .advance_spanning(&id, Some(total), |j| {
                    j.state = j
                        .state
                        .clone()
                        .apply(JobEvent::Planned { labelling: true })?;
                    j.progress.shards_total = n;
                    j.progress.stage = "fine-tuning the teacher".into();
                    Ok(Some(TaskKind::FineTuneTeacher))
                })
                .await;
            return match r {
                Ok(_) => {
                    tracing::info!(
                        job = id,
                        samples = total,
                        shards = n,
                        "job planned: teacher fine-tuning first"
                    );
                    Ok(())
                }
                Err(CoordinatorError::InvalidTransition(_)) => Ok(()),
                Err(e) => Err(e),
            };
        }
        let n = self
            .tasks
            .create_shards(&id, total, spec.data.shard_size)
            .await? as u64;
        let result = self
            .ledger
            .update(&id, |j| {
                j.state = j
                    .state
                    .clone()
                    .apply(JobEvent::Planned { labelling: true })?;
                j.progress.shards_total = n;
                j.progress.stage = "labelling".into();
                Ok(())
            })
            .await;
        match result {
            Ok(_) => {
                tracing::info!(job = id, samples = total, shards = n, "job planned");
                Ok(())
            }
            Err(CoordinatorError::InvalidTransition(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn fail(&self, id: &str, reason: String) -> Result<(), CoordinatorError> {
        tracing::warn!(job = id, reason, "job failed");
        match self.ledger.transition(id, JobEvent::Fail { reason }).await {
            Ok(_) | Err(CoordinatorError::InvalidTransition(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn reconcile_labelling(&self, id: &str) -> Result<(), CoordinatorError> {
        let mut tasks = self.tasks.list(id).await?;
        // A fine-tuned teacher whose shards were not all created (the
        // process died between its commit and their creation).
        let ft = tasks
            .iter()
            .find(|t| t.value.kind == TaskKind::FineTuneTeacher)
            .map(|t| t.value.clone());
        if let Some(ft) = ft {
            if !matches!(ft.state, TaskState::Committed { .. }) {
                if let TaskState::Failed { reason } = &ft.state {
                    return self.fail(id, reason.clone()).await;
                }
                return Ok(());
            }
            let have = tasks
                .iter()
                .filter(|t| t.value.kind == TaskKind::TeacherSignal)
                .count() as u64;
            if let Some(job) = self.ledger.get(id).await? {
                if have < job.value.progress.shards_total {
                    self.tasks.create_fine_tuned_shards(&job.value, &ft).await?;
                    tasks = self.tasks.list(id).await?;
                }
            }
        }
        let committed = tasks
            .iter()
            .filter(|t| {
                t.value.kind == TaskKind::TeacherSignal
                    && matches!(t.value.state, TaskState::Committed { .. })
            })
            .count() as u64;
        if let Some(t) = tasks.iter().find_map(|t| match &t.value.state {
            TaskState::Failed { reason } => Some(reason.clone()),
            _ => None,
        }) {
            return self.fail(id, t).await;
        }
        let total = tasks
            .iter()
            .filter(|t| t.value.kind == TaskKind::TeacherSignal)
            .count() as u64;
        let r = self
            .tasks
            .advance(id, |j| {
                j.progress.shards_total = total;
                // Never below the counter: a shard committed after the
                // list above already moved it (monotone, so a re-count
                // cannot undo a commit and strand the job in labelling).
                j.progress.shards_committed = j.progress.shards_committed.max(committed);
                let committed = j.progress.shards_committed;
                if total > 0 && committed == total && j.state == JobState::Labelling {
                    j.state = j.state.clone().apply(JobEvent::Labelled)?;
                    return Ok(Some(TaskKind::Train));
                }
                Ok(None)
            })
            .await;
        match r {
            Ok(_) | Err(CoordinatorError::InvalidTransition(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}
