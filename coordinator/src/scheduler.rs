//! The scheduling policy: which jobs start and which workers they get. Pure:
//! [`schedule`] maps a snapshot of jobs and workers to [`Action`]s, and is
//! tested exhaustively here without I/O. The main loop ([`crate::driver`])
//! takes the snapshot from the store and applies the actions as guarded
//! transactions.
//!
//! # Queue policy
//!
//! Jobs are served in queue order: **higher `priority` first, then
//! submission order** (the store-allocated sequence number). Walking the
//! queue with the pool of free workers (live sessions assigned to no job):
//!
//! - a started job (planning, labelling, training, ...) with fewer than its
//!   `cluster.max_workers` workers is topped up from the pool;
//! - a pending job starts only when the pool holds at least its
//!   `cluster.min_workers`; it then takes up to `max_workers`;
//! - a pending job that cannot start **blocks the queue**: no job behind it
//!   gets a worker until it starts (no backfill), so a large high-priority
//!   job is never starved by a stream of small ones. Jobs ahead of it are
//!   still topped up.
//!
//! A worker assigned to a finished (or unknown) job is released to the pool
//! first, so cancellation frees workers on the next pass. Free workers are
//! handed out in session-id order, so the result is deterministic.

use std::cmp::Reverse;
use std::collections::BTreeMap;

use crate::job::JobState;

/// What the policy needs to know about a job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobView {
    pub id: String,
    pub state: JobState,
    pub priority: i32,
    pub seq: u64,
    pub min_workers: u32,
    pub max_workers: u32,
}

/// A live worker session and the job it is assigned to, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerView {
    pub session: String,
    pub job: Option<String>,
}

/// A change the main loop applies to the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// The worker's job is finished or gone: free the worker.
    Release { session: String },
    /// Start a pending job on these (free) workers.
    Start { job: String, workers: Vec<String> },
    /// Add a free worker to a started job.
    Assign { job: String, session: String },
}

/// Jobs in queue order: priority (high first), then submission order.
pub fn queue_order(jobs: &[JobView]) -> Vec<&JobView> {
    let mut q: Vec<&JobView> = jobs.iter().filter(|j| !j.state.is_terminal()).collect();
    q.sort_by_key(|j| (Reverse(j.priority), j.seq));
    q
}

/// The actions that bring the assignment of `workers` to `jobs` in line with
/// the queue policy (see the module docs). Pure.
pub fn schedule(jobs: &[JobView], workers: &[WorkerView]) -> Vec<Action> {
    let live: BTreeMap<&str, &JobView> = jobs
        .iter()
        .filter(|j| !j.state.is_terminal())
        .map(|j| (j.id.as_str(), j))
        .collect();
    let mut actions = Vec::new();
    let mut assigned: BTreeMap<&str, u32> = BTreeMap::new();
    let mut sorted: Vec<&WorkerView> = workers.iter().collect();
    sorted.sort_by(|a, b| a.session.cmp(&b.session));
    let mut free: Vec<&str> = Vec::new();
    for w in sorted {
        match w.job.as_deref() {
            Some(j) if live.contains_key(j) => *assigned.entry(j).or_default() += 1,
            Some(_) => {
                actions.push(Action::Release {
                    session: w.session.clone(),
                });
                free.push(&w.session);
            }
            None => free.push(&w.session),
        }
    }
    let mut free = free.into_iter();
    let mut left = free.len();
    for job in queue_order(jobs) {
        let have = assigned.get(job.id.as_str()).copied().unwrap_or(0);
        let want = job.max_workers.saturating_sub(have) as usize;
        if job.state == JobState::Pending {
            // Workers already assigned (a start cut short by a crash) count.
            if have as usize + left < job.min_workers.max(1) as usize {
                break; // blocks the queue: no backfill behind it
            }
            let take = want.min(left);
            let workers: Vec<String> = free.by_ref().take(take).map(String::from).collect();
            left -= workers.len();
            actions.push(Action::Start {
                job: job.id.clone(),
                workers,
            });
        } else {
            for session in free.by_ref().take(want.min(left)) {
                left -= 1;
                actions.push(Action::Assign {
                    job: job.id.clone(),
                    session: session.to_string(),
                });
            }
        }
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str, state: JobState, priority: i32, seq: u64, min: u32, max: u32) -> JobView {
        JobView {
            id: id.into(),
            state,
            priority,
            seq,
            min_workers: min,
            max_workers: max,
        }
    }

    fn workers(free: usize, assigned: &[(&str, usize)]) -> Vec<WorkerView> {
        let mut v: Vec<WorkerView> = (0..free)
            .map(|i| WorkerView {
                session: format!("s-f{i:02}"),
                job: None,
            })
            .collect();
        for (j, n) in assigned {
            for i in 0..*n {
                v.push(WorkerView {
                    session: format!("s-{j}-{i:02}"),
                    job: Some(j.to_string()),
                });
            }
        }
        v
    }

    fn started(actions: &[Action]) -> Vec<(&str, usize)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Start { job, workers } => Some((job.as_str(), workers.len())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_job_starts_only_with_its_minimum_of_free_workers() {
        let jobs = [job("a", JobState::Pending, 0, 1, 3, 4)];
        assert!(schedule(&jobs, &workers(2, &[])).is_empty());
        assert_eq!(started(&schedule(&jobs, &workers(3, &[]))), [("a", 3)]);
        assert_eq!(started(&schedule(&jobs, &workers(9, &[]))), [("a", 4)]);
    }

    #[test]
    fn priority_then_submission_order() {
        let jobs = [
            job("old-low", JobState::Pending, 0, 1, 1, 1),
            job("new-high", JobState::Pending, 5, 3, 1, 1),
            job("old-high", JobState::Pending, 5, 2, 1, 1),
        ];
        let order: Vec<&str> = queue_order(&jobs).iter().map(|j| j.id.as_str()).collect();
        assert_eq!(order, ["old-high", "new-high", "old-low"]);
        assert_eq!(
            started(&schedule(&jobs, &workers(1, &[]))),
            [("old-high", 1)]
        );
        assert_eq!(
            started(&schedule(&jobs, &workers(2, &[]))),
            [("old-high", 1), ("new-high", 1)]
        );
    }

    #[test]
    fn a_blocked_job_blocks_the_queue_but_jobs_ahead_are_topped_up() {
        let jobs = [
            job("running", JobState::Labelling, 9, 1, 1, 3),
            job("big", JobState::Pending, 5, 2, 4, 4),
            job("small", JobState::Pending, 0, 3, 1, 1),
        ];
        let actions = schedule(&jobs, &workers(3, &[("running", 1)]));
        assert_eq!(
            actions,
            [
                Action::Assign {
                    job: "running".into(),
                    session: "s-f00".into()
                },
                Action::Assign {
                    job: "running".into(),
                    session: "s-f01".into()
                },
            ],
            "one worker stays free for `big`; `small` must not jump the queue"
        );
    }

    #[test]
    fn finished_jobs_release_their_workers_to_the_queue() {
        let jobs = [
            job(
                "done",
                JobState::Cancelled { reason: "x".into() },
                0,
                1,
                1,
                2,
            ),
            job("next", JobState::Pending, 0, 2, 2, 2),
        ];
        let actions = schedule(&jobs, &workers(0, &[("done", 2)]));
        assert_eq!(
            actions,
            [
                Action::Release {
                    session: "s-done-00".into()
                },
                Action::Release {
                    session: "s-done-01".into()
                },
                Action::Start {
                    job: "next".into(),
                    workers: vec!["s-done-00".into(), "s-done-01".into()]
                },
            ]
        );
        // A worker of a job that no longer exists is released too.
        let actions = schedule(&[], &workers(0, &[("gone", 1)]));
        assert_eq!(
            actions,
            [Action::Release {
                session: "s-gone-00".into()
            }]
        );
    }

    #[test]
    fn exhaustive_small_cases_keep_the_invariants() {
        let states = [JobState::Pending, JobState::Labelling, JobState::Succeeded];
        for free in 0..5usize {
            for s1 in &states {
                for s2 in &states {
                    for (min1, max1, min2, max2) in [(1, 1, 1, 3), (2, 3, 1, 2), (3, 4, 2, 2)] {
                        for have1 in 0..2usize {
                            let jobs = [
                                job("j1", s1.clone(), 1, 1, min1, max1),
                                job("j2", s2.clone(), 0, 2, min2, max2),
                            ];
                            let ws = workers(free, &[("j1", have1)]);
                            check(&jobs, &ws, &schedule(&jobs, &ws));
                        }
                    }
                }
            }
        }
    }

    /// No worker handed out twice, no job above its max, pending jobs start
    /// with at least their min, nothing assigned to a finished job.
    fn check(jobs: &[JobView], ws: &[WorkerView], actions: &[Action]) {
        let mut count: BTreeMap<String, u32> = BTreeMap::new();
        let mut owner: BTreeMap<String, Option<String>> = ws
            .iter()
            .map(|w| (w.session.clone(), w.job.clone()))
            .collect();
        for w in ws {
            if let Some(j) = &w.job {
                *count.entry(j.clone()).or_default() += 1;
            }
        }
        let find = |id: &str| jobs.iter().find(|j| j.id == id).unwrap();
        for a in actions {
            match a {
                Action::Release { session } => {
                    let j = owner[session].clone().unwrap();
                    assert!(find(&j).state.is_terminal());
                    *count.get_mut(&j).unwrap() -= 1;
                    owner.insert(session.clone(), None);
                }
                Action::Start { job, workers } => {
                    let j = find(job);
                    assert_eq!(j.state, JobState::Pending);
                    let have = count.get(job).copied().unwrap_or(0) as usize;
                    assert!(have + workers.len() >= j.min_workers as usize, "{a:?}");
                    for w in workers {
                        assert_eq!(owner[w], None, "{w} handed out twice");
                        owner.insert(w.clone(), Some(job.clone()));
                    }
                    *count.entry(job.clone()).or_default() += workers.len() as u32;
                }
                Action::Assign { job, session } => {
                    assert!(!find(job).state.is_terminal());
                    assert_eq!(owner[session], None, "{session} handed out twice");
                    owner.insert(session.clone(), Some(job.clone()));
                    *count.entry(job.clone()).or_default() += 1;
                }
            }
        }
        for j in jobs {
            let n = count.get(&j.id).copied().unwrap_or(0);
            if !j.state.is_terminal() && n > 0 {
                assert!(n <= j.max_workers.max(1) || j.state != JobState::Pending);
            }
        }
    }
}
