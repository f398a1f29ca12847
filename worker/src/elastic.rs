//! Elastic data-parallel training: one rank's loop of join → sync → train
//! → (group changed) → join again, over a [`Membership`] that the cluster
//! worker implements against the coordinator (`JoinGroup`, heartbeat,
//! `CommitCheckpoint`).
//!
//! - **Joining.** The coordinator answers with a generation, this rank,
//!   the world size and the peers' collective addresses, and the last
//!   committed checkpoint. A group of more than one rank meets at rank 0's
//!   rendezvous store (the worker's own [`StoreServer`], which outlives
//!   groups) under the prefix `<job>/gen-<generation>/`.
//! - **State.** Every survivor of a failure holds the weights and
//!   optimizer state of the last step it completed. After each
//!   (re-)formation, [`Trainer::sync_state`] finds the rank furthest on and
//!   sends its whole state to every rank whose digest differs (a new
//!   member, or one that missed the last step): at most the step that was
//!   in flight is redone. A rank whose in-memory state is behind the last
//!   committed checkpoint (a fresh process) loads that checkpoint first;
//!   only committed checkpoints are ever loaded.
//! - **Changes.** The coordinator's heartbeat sets the group's flag when
//!   the membership changed (a member's session expired, or a worker was
//!   assigned): a collective in flight returns within 20 ms
//!   ([`Group::join_abortable`]), or the trainer stops at the next step
//!   boundary ([`Error::Regroup`]). A collective that fails on its own (a
//!   peer's connection reset, a deadline) reports the failed generation at
//!   the next join, so the coordinator waits for the dead member's session
//!   rather than re-forming the same group.
//! - **Checkpoints.** Rank 0 writes them (the trainer's format, verified by
//!   checksum) and commits each with its generation; a commit refused as
//!   stale means the group moved on, and this rank re-joins.
//! - **Done.** A rank whose committed checkpoint is already the last step
//!   (a holder that took the task over after the members finished) forms
//!   no group: the finished members stay assigned to the job and would
//!   never meet it. It returns [`Finished::AtCheckpoint`] holding that
//!   state, and the holder exports.
//!
//! [`StoreServer`]: crate::collective::StoreServer

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::collective::{BackendChoice, Group, Rendezvous};
use crate::distill::train::{StepLog, TrainData, Trainer};
use crate::model::TaskModel;
use crate::{Error, Result};

/// What a rank is told when it joins.
#[derive(Debug, Clone)]
pub struct Joined {
    pub generation: u64,
    pub rank: u32,
    pub world: u32,
    /// Collective addresses (`host:port` of each rank's store), by rank.
    pub peers: Vec<String>,
    /// The last committed checkpoint directory and its step.
    pub checkpoint: Option<(PathBuf, u64)>,
}

/// Publishes a checkpoint directory of a step; fails with
/// [`Error::Regroup`] when the generation is no longer current.
pub type Committer = Box<dyn Fn(&Path, u64) -> Result<()> + Send>;

/// A rank's link to whoever forms training groups.
pub trait Membership {
    /// Joins the job's group, blocking until one is formed. `failed` is
    /// the generation whose collective failed on this rank (0: none).
    fn join(&mut self, failed: u64) -> Result<Joined>;
    /// Commits checkpoints under `generation`.
    /// Commits each checkpoint of a training of `total_steps` steps.
    fn committer(&self, generation: u64, total_steps: u64) -> Committer;
    /// Set when the group changed; aborts collectives in flight.
    fn flag(&self) -> Arc<AtomicBool>;
    /// Tells the heartbeat which generation (and group size) this rank is in.
    fn set_group(&self, generation: u64, world: u32);
    /// The address this rank's Gloo transport binds to.
    fn bind_host(&self) -> String;
    /// Deadline of the rendezvous and of every collective.
    fn timeout(&self) -> Duration;
    /// The collective engine to use.
    fn backend(&self) -> BackendChoice {
        BackendChoice::Auto
    }
    /// Prefix of this job's keys in the rendezvous store.
    fn job(&self) -> String;
    /// Whether this rank exports the student when it finds the training
    /// already complete at the committed checkpoint and trains nothing:
    /// the task's holder does; a group member does not.
    fn exports(&self) -> bool {
        true
    }
}

/// How [`train`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished {
    /// Trained to the last step in a group, which `tr` is still in.
    InGroup,
    /// The committed checkpoint was already the last step: nothing to
    /// train, no group formed (a holder that took the task over after the
    /// members finished: the members that are done are still assigned to
    /// the job, and a group with them would never meet).
    AtCheckpoint,
}

fn split_address(a: &str) -> Result<(String, u16)> {
    let (host, port) = a
        .rsplit_once(':')
        .ok_or_else(|| Error::Collective(format!("peer address {a:?} is not host:port")))?;
    let port = port
        .parse()
        .map_err(|_| Error::Collective(format!("peer address {a:?}: bad port")))?;
    Ok((host.trim_matches(['[', ']']).to_string(), port))
}

/// Trains `tr` to its last step as one rank of an elastic group. Returns
/// with `tr` still in the final group (rank 0 exports; see
/// `pipeline::distill_student_in`), or out of any group when the
/// committed checkpoint was already the last step.
pub fn train(
    tr: &mut Trainer,
    data: &TrainData,
    mut evaluate: Option<&mut dyn FnMut(&TaskModel) -> Result<f64>>,
    mut on_step: impl FnMut(&StepLog),
    m: &mut dyn Membership,
) -> Result<Finished> {
    let flag = m.flag();
    let mut failed = 0u64;
    // The generation this rank last trained in: never formed twice.
    let mut left = 0u64;
    // The failure (or change) being recovered from: when, and this rank's
    // step then.
    let mut since: Option<(Instant, u64, &'static str)> = None;
    loop {
        tr.leave_group();
        // Out of any group while joining: a heartbeat about the old
        // generation must not flag the new one.
        m.set_group(0, 0);
        let j = m.join(failed)?;
        let joined_at = Instant::now();
        if j.generation <= left {
            // Told to change while the coordinator saw no change (a late
            // heartbeat): report the generation as failed, so the group
            // re-forms under a new one.
            failed = left;
            continue;
        }
        left = j.generation;
        m.set_group(j.generation, j.world);
        // A change after this is flagged again by the next heartbeat (the
        // coordinator reports it for as long as it holds).
        flag.store(false, Ordering::Relaxed);
        if let Some((dir, step)) = &j.checkpoint {
            if *step > tr.step {
                tr.resume_from(dir)?;
                tracing::info!(step, dir = %dir.display(), "loaded the committed checkpoint");
            }
        }
        if tr.step >= tr.cfg.total_steps {
            tracing::info!(
                generation = j.generation,
                step = tr.step,
                "training already complete at the committed checkpoint; no group needed"
            );
            m.set_group(0, 0);
            return Ok(Finished::AtCheckpoint);
        }
        let before = tr.step;
        if j.world > 1 {
            let (host, port) = split_address(&j.peers[0])?;
            let r = Rendezvous {
                host,
                port,
                host_store: false,
                prefix: format!("{}/gen-{}/", m.job(), j.generation),
                bind_host: m.bind_host(),
                rank: j.rank,
                world: j.world,
                timeout: m.timeout(),
                backend: m.backend().resolve(tr.device())?,
            };
            let formed = Group::join_abortable(&r, flag.clone())
                .and_then(|g| tr.data_parallel(g))
                .and_then(|()| tr.sync_state());
            match formed {
                Ok((src, step, receivers)) => tracing::info!(
                    generation = j.generation,
                    rank = j.rank,
                    world = j.world,
                    backend = r.backend.name(),
                    device = ?tr.device(),
                    source = src,
                    step,
                    receivers,
                    "group formed; state synchronised"
                ),
                Err(e @ Error::Collective(_)) => {
                    tracing::warn!(generation = j.generation, error = %e, "cannot form the group; joining again");
                    // Aborted: the coordinator already moved on. Failed on
                    // its own: report the generation.
                    failed = if flag.load(Ordering::Relaxed) {
                        0
                    } else {
                        j.generation
                    };
                    since.get_or_insert((Instant::now(), before, "rendezvous"));
                    continue;
                }
                Err(e) => return Err(e),
            }
        } else {
            tracing::info!(generation = j.generation, device = ?tr.device(), "training alone (world 1)");
        }
        let mut pending = since.take().map(|(at, step_then, why)| {
            let redone = step_then.saturating_sub(tr.step);
            (at, redone, why)
        });
        tr.regroup_on(Some(flag.clone()));
        tr.on_checkpoint(m.committer(j.generation, tr.cfg.total_steps));
        let generation = j.generation;
        let world = j.world;
        // A fresh, shorter-lived trait object per attempt.
        let mut ev = evaluate
            .as_deref_mut()
            .map(|f| move |model: &TaskModel| f(model));
        let ev = ev
            .as_mut()
            .map(|f| f as &mut dyn FnMut(&TaskModel) -> Result<f64>);
        let result = tr.train(data, ev, |l| {
            if let Some((at, redone, why)) = pending.take() {
                tracing::info!(
                    generation,
                    world,
                    step = l.step,
                    seconds_since_failure = at.elapsed().as_secs_f64(),
                    seconds_since_join = joined_at.elapsed().as_secs_f64(),
                    steps_redone = redone,
                    cause = why,
                    "recovered: first step of the new group done"
                );
            }
            on_step(l)
        });
        match result {
            Ok(()) => return Ok(Finished::InGroup),
            Err(Error::Regroup) => {
                tracing::info!(
                    generation,
                    step = tr.step,
                    "the group changed; joining again"
                );
                failed = 0;
                since = Some((Instant::now(), tr.step, "group changed"));
            }
            Err(Error::Collective(e)) => {
                tracing::warn!(generation, step = tr.step, error = %e, "collective failed; joining again");
                // An abort means the coordinator already knows; a failure
                // on its own is reported with the generation.
                failed = if flag.load(Ordering::Relaxed) {
                    0
                } else {
                    generation
                };
                since = Some((Instant::now(), tr.step, "collective failed"));
            }
            Err(e) => return Err(e),
        }
    }
}
