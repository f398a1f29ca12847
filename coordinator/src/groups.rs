//! Training groups and checkpoint commits, fenced by a monotonic generation.
//!
//! Keys:
//!
//! | key                  | value                          |
//! |----------------------|--------------------------------|
//! | `groups/<job>`       | [`Group`]: generation, members |
//! | `checkpoints/<job>`  | [`Checkpoint`], once committed |
//!
//! The members of a job's group are the live workers the scheduler assigned
//! to it, in session order (rank = position). A join that finds the stored
//! membership different from the live roster (a worker died, or one
//! joined) writes a new group with `generation + 1` in a transaction
//! guarded by the group key's revision; otherwise it returns the current
//! generation. Every training call carries the generation it was given:
//!
//! - a checkpoint commit from an older generation is refused (stale);
//! - a commit's step must exceed the committed one (resubmitting the
//!   committed step and URI is a no-op), so the checkpoint only moves on;
//! - the checkpoint (and the job's `checkpoint_step`) is written in the same
//!   transaction that checks the generation, so a checkpoint is visible —
//!   to joins and to clients — only once committed. The worker has written
//!   and verified the file before it commits; the store only publishes it.

use serde::{Deserialize, Serialize};

use crate::driver::{ASSIGNMENTS, SESSIONS};
use crate::error::CoordinatorError;
use crate::job::JobState;
use crate::ledger::{Ledger, Versioned};
use crate::store::{Store, Txn};

const GROUPS: &str = "groups/";
const CHECKPOINTS: &str = "checkpoints/";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub session: String,
    pub collective_address: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    pub generation: u64,
    /// By rank.
    pub members: Vec<Member>,
    /// When a member first reported that this generation's collective
    /// failed while the membership was unchanged (see [`Groups::join`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_at_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub step: u64,
    pub uri: String,
    pub sha256: String,
    pub generation: u64,
}

/// What a join gets: a group, or "call again later".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Join {
    Joined(Joined),
    /// The failed generation's membership is unchanged: a dead member's
    /// session may not have expired yet.
    Wait {
        retry_after_ms: u64,
    },
}

/// What a joining worker is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    pub group: Group,
    pub rank: u32,
    pub checkpoint: Option<Checkpoint>,
}

/// A checkpoint commit request, checked at the gRPC edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    pub session: String,
    pub job_id: String,
    pub generation: u64,
    pub step: u64,
    pub uri: String,
    pub sha256: String,
    /// The training's total steps, when the worker said (0: unknown).
    pub total_steps: u64,
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("serialisable")
}

fn parse<T: for<'de> Deserialize<'de>>(key: &str, b: &[u8]) -> Result<T, CoordinatorError> {
    serde_json::from_slice(b).map_err(|e| CoordinatorError::Internal(format!("corrupt {key}: {e}")))
}

/// Groups and checkpoints over any [`Store`].
#[derive(Debug, Clone)]
pub struct Groups<S> {
    store: S,
    ledger: Ledger<S>,
}

impl<S: Store> Groups<S> {
    pub fn new(store: S) -> Self {
        Self {
            ledger: Ledger::new(store.clone()),
            store,
        }
    }

    /// The live workers assigned to `job`, in session order.
    async fn roster(&self, job: &str) -> Result<Vec<Member>, CoordinatorError> {
        let (assigned, _) = self.store.range(ASSIGNMENTS).await?;
        let mut members = Vec::new();
        for kv in assigned.iter().filter(|kv| kv.value == job.as_bytes()) {
            let session = kv.key.trim_start_matches(ASSIGNMENTS).to_string();
            let key = format!("{SESSIONS}{session}");
            let Some(info) = self.store.get(&key).await? else {
                continue;
            };
            let info: serde_json::Value = parse(&key, &info.value)?;
            members.push(Member {
                collective_address: info["collective_address"].as_str().unwrap_or("").into(),
                session,
            });
        }
        members.sort_by(|a, b| a.session.cmp(&b.session));
        Ok(members)
    }

    /// Joins `session` to `job`'s training group, opening a new generation
    /// when the live membership changed.
    ///
    /// `failed` is the generation whose collective failed on this worker
    /// (0: none). While the membership still equals that generation's, a
    /// member may have died without its session having expired yet: the
    /// answer is [`Join::Wait`]. The first such report is timestamped on
    /// the group; once `grace_ms` has passed with no change (the failure
    /// was not a death — a network blip, a peer that re-joined), a new
    /// generation of the same members is opened.
    pub async fn join(
        &self,
        session: &str,
        job: &str,
        failed: u64,
        grace_ms: i64,
    ) -> Result<Join, CoordinatorError> {
        let gkey = format!("{GROUPS}{job}");
        for _ in 0..64 {
            let state = self
                .ledger
                .get(job)
                .await?
                .ok_or_else(|| CoordinatorError::NotFound(format!("job {job}")))?
                .value
                .state;
            if state != JobState::Training {
                return Err(CoordinatorError::Stale {
                    what: "job state",
                    detail: format!("{job} is {}, not training", state.name()),
                });
            }
            let roster = self.roster(job).await?;
            let Some(rank) = roster.iter().position(|m| m.session == session) else {
                return Err(CoordinatorError::Stale {
                    what: "assignment",
                    detail: format!("{session} is not assigned to {job}"),
                });
            };
            let current = self.store.get(&gkey).await?;
            let (old, rev) = match &current {
                Some(kv) => (Some(parse::<Group>(&gkey, &kv.value)?), kv.mod_revision),
                None => (None, 0),
            };
            let now = crate::ledger::now_ms();
            let group = match old {
                Some(g) if g.members == roster && (failed == 0 || failed != g.generation) => g,
                Some(g)
                    if g.members == roster && g.failed_at_ms.is_none_or(|t| now - t < grace_ms) =>
                {
                    if g.failed_at_ms.is_none() {
                        let marked = Group {
                            failed_at_ms: Some(now),
                            ..g
                        };
                        if self
                            .store
                            .put_if(&gkey, json(&marked), rev)
                            .await?
                            .is_none()
                        {
                            continue;
                        }
                    }
                    return Ok(Join::Wait {
                        retry_after_ms: 100,
                    });
                }
                old => {
                    let next = Group {
                        generation: old.map_or(1, |g| g.generation + 1),
                        members: roster,
                        failed_at_ms: None,
                    };
                    if self.store.put_if(&gkey, json(&next), rev).await?.is_none() {
                        continue; // another join moved it: re-read
                    }
                    tracing::info!(
                        job,
                        generation = next.generation,
                        world = next.members.len(),
                        "training group formed"
                    );
                    next
                }
            };
            return Ok(Join::Joined(Joined {
                group,
                rank: rank as u32,
                checkpoint: self.checkpoint(job).await?.map(|c| c.value),
            }));
        }
        Err(CoordinatorError::Unavailable(format!(
            "too much contention forming the group of {job}"
        )))
    }

    /// `job`'s current generation (0: no group yet) and whether the live
    /// membership differs from it (a member died, or a worker joined).
    pub async fn status(&self, job: &str) -> Result<(u64, bool), CoordinatorError> {
        let gkey = format!("{GROUPS}{job}");
        let Some(kv) = self.store.get(&gkey).await? else {
            return Ok((0, false));
        };
        let g: Group = parse(&gkey, &kv.value)?;
        let roster = self.roster(job).await?;
        Ok((g.generation, g.members != roster))
    }

    /// The committed checkpoint of `job`, if any.
    pub async fn checkpoint(
        &self,
        job: &str,
    ) -> Result<Option<Versioned<Checkpoint>>, CoordinatorError> {
        let key = format!("{CHECKPOINTS}{job}");
        match self.store.get(&key).await? {
            Some(kv) => Ok(Some(Versioned {
                value: parse(&key, &kv.value)?,
                revision: kv.mod_revision,
            })),
            None => Ok(None),
        }
    }

    /// Publishes a checkpoint if `c.generation` is current and its step
    /// moves forward; the job's `checkpoint_step` changes in the same
    /// transaction.
    pub async fn commit(&self, c: &Commit) -> Result<(), CoordinatorError> {
        let (gkey, ckey) = (
            format!("{GROUPS}{}", c.job_id),
            format!("{CHECKPOINTS}{}", c.job_id),
        );
        for _ in 0..64 {
            let Some(gkv) = self.store.get(&gkey).await? else {
                return Err(CoordinatorError::Stale {
                    what: "group generation",
                    detail: format!("{} has no training group", c.job_id),
                });
            };
            let group: Group = parse(&gkey, &gkv.value)?;
            if c.generation != group.generation {
                return Err(CoordinatorError::Stale {
                    what: "group generation",
                    detail: format!(
                        "generation {} is not the current generation {}",
                        c.generation, group.generation
                    ),
                });
            }
            if !group.members.iter().any(|m| m.session == c.session) {
                return Err(CoordinatorError::Stale {
                    what: "group member",
                    detail: format!("{} is not in generation {}", c.session, c.generation),
                });
            }
            let prev = self.checkpoint(&c.job_id).await?;
            if let Some(p) = &prev {
                if p.value.step == c.step && p.value.uri == c.uri {
                    return Ok(()); // a retried commit
                }
                if c.step <= p.value.step {
                    return Err(CoordinatorError::Stale {
                        what: "checkpoint step",
                        detail: format!(
                            "step {} is not after the committed step {}",
                            c.step, p.value.step
                        ),
                    });
                }
            }
            let (step, total_steps) = (c.step, c.total_steps);
            let job_id = c.job_id.clone();
            let staged = self
                .ledger
                .stage(&c.job_id, |j| {
                    if j.state.is_terminal() {
                        return Err(CoordinatorError::Stale {
                            what: "job state",
                            detail: format!("{job_id} is {}", j.state.name()),
                        });
                    }
                    j.progress.checkpoint_step = step;
                    if total_steps > 0 {
                        j.progress.steps_total = total_steps;
                    }
                    Ok(())
                })
                .await?;
            let ckpt = Checkpoint {
                step: c.step,
                uri: c.uri.clone(),
                sha256: c.sha256.clone(),
                generation: c.generation,
            };
            let txn = staged.guard(
                Txn::new()
                    .when(&gkey, gkv.mod_revision)
                    .when(&ckey, prev.map_or(0, |p| p.revision))
                    .put(&ckey, json(&ckpt)),
            );
            if self.store.txn(txn).await?.committed() {
                tracing::info!(
                    job = c.job_id,
                    step = c.step,
                    generation = c.generation,
                    "checkpoint committed"
                );
                return Ok(());
            }
        }
        Err(CoordinatorError::Unavailable(format!(
            "too much contention committing a checkpoint of {}",
            c.job_id
        )))
    }
}
