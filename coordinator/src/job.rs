//! The job lifecycle: a closed set of states, a closed set of events, and one
//! pure transition function. Persistence is in [`crate::ledger`]; nothing
//! here does I/O.

use serde::{Deserialize, Serialize};

/// Where a job is in its life.
///
/// ```text
///                 start        planned{labelling}      labelled      trained        quantized        evaluated
///     Pending ──────────► Planning ─────────► Labelling ─────────► Training ─────► Quantizing ─────► Evaluating ─────► Succeeded
///                             │                                       ▲
///                             └──── planned{no labelling} ────────────┘
///                                   (online teacher: no stored signal)
///
///     any non-terminal state ── fail{reason} ───► Failed{reason}
///     any non-terminal state ── cancel{reason} ─► Cancelled{reason}
///
///     Succeeded, Failed and Cancelled are terminal: every event is refused.
/// ```
///
/// The reason of a failure or cancellation is kept in the state itself, so
/// it is persisted with it and cannot be lost or mismatched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum JobState {
    Pending,
    Planning,
    Labelling,
    Training,
    Quantizing,
    Evaluating,
    Succeeded,
    Failed { reason: String },
    Cancelled { reason: String },
}

/// Something that happened to a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum JobEvent {
    /// The scheduler picked the job: its minimum of workers is free.
    Start,
    /// The plan is done; `labelling` when teacher signal must be computed
    /// and stored first (offline teacher signal).
    Planned {
        labelling: bool,
    },
    /// Every teacher-signal shard is committed.
    Labelled,
    /// The final student checkpoint is committed.
    Trained,
    /// Quantized variants are written (or rejected by the quality gate).
    Quantized,
    /// The report is written.
    Evaluated,
    Fail {
        reason: String,
    },
    Cancel {
        reason: String,
    },
}

/// An event that the current state does not accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid job transition: {event} in state {from}")]
pub struct InvalidTransition {
    pub from: &'static str,
    pub event: &'static str,
}

impl JobState {
    /// The state's name as used in logs, metrics and errors.
    pub fn name(&self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Planning => "planning",
            JobState::Labelling => "labelling",
            JobState::Training => "training",
            JobState::Quantizing => "quantizing",
            JobState::Evaluating => "evaluating",
            JobState::Succeeded => "succeeded",
            JobState::Failed { .. } => "failed",
            JobState::Cancelled { .. } => "cancelled",
        }
    }

    /// Succeeded, failed or cancelled: nothing more will happen.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed { .. } | JobState::Cancelled { .. }
        )
    }

    /// Whether the job holds workers (started and not finished).
    pub fn is_running(&self) -> bool {
        !self.is_terminal() && *self != JobState::Pending
    }

    /// Why the job failed or was cancelled.
    pub fn reason(&self) -> Option<&str> {
        match self {
            JobState::Failed { reason } | JobState::Cancelled { reason } => Some(reason),
            _ => None,
        }
    }

    /// The state after `event`, or why it cannot happen. Pure.
    pub fn apply(self, event: JobEvent) -> Result<JobState, InvalidTransition> {
        use JobEvent as E;
        use JobState as S;
        let refused = InvalidTransition {
            from: self.name(),
            event: event.name(),
        };
        if self.is_terminal() {
            return Err(refused);
        }
        Ok(match (self, event) {
            (_, E::Fail { reason }) => S::Failed { reason },
            (_, E::Cancel { reason }) => S::Cancelled { reason },
            (S::Pending, E::Start) => S::Planning,
            (S::Planning, E::Planned { labelling: true }) => S::Labelling,
            (S::Planning, E::Planned { labelling: false }) => S::Training,
            (S::Labelling, E::Labelled) => S::Training,
            (S::Training, E::Trained) => S::Quantizing,
            (S::Quantizing, E::Quantized) => S::Evaluating,
            (S::Evaluating, E::Evaluated) => S::Succeeded,
            _ => return Err(refused),
        })
    }

    /// Every state, for exhaustive tests and metrics.
    pub fn all() -> Vec<JobState> {
        vec![
            JobState::Pending,
            JobState::Planning,
            JobState::Labelling,
            JobState::Training,
            JobState::Quantizing,
            JobState::Evaluating,
            JobState::Succeeded,
            JobState::Failed { reason: "r".into() },
            JobState::Cancelled { reason: "r".into() },
        ]
    }
}

impl JobEvent {
    pub fn name(&self) -> &'static str {
        match self {
            JobEvent::Start => "start",
            JobEvent::Planned { labelling: true } => "planned (labelling)",
            JobEvent::Planned { labelling: false } => "planned (no labelling)",
            JobEvent::Labelled => "labelled",
            JobEvent::Trained => "trained",
            JobEvent::Quantized => "quantized",
            JobEvent::Evaluated => "evaluated",
            JobEvent::Fail { .. } => "fail",
            JobEvent::Cancel { .. } => "cancel",
        }
    }

    /// Every event, for exhaustive tests.
    pub fn all() -> Vec<JobEvent> {
        vec![
            JobEvent::Start,
            JobEvent::Planned { labelling: true },
            JobEvent::Planned { labelling: false },
            JobEvent::Labelled,
            JobEvent::Trained,
            JobEvent::Quantized,
            JobEvent::Evaluated,
            JobEvent::Fail {
                reason: "boom".into(),
            },
            JobEvent::Cancel {
                reason: "user".into(),
            },
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The full transition table, written out by hand: (state, event) → next.
    fn expected(from: &JobState, event: &JobEvent) -> Option<JobState> {
        use JobEvent as E;
        use JobState as S;
        if from.is_terminal() {
            return None;
        }
        match (from, event) {
            (_, E::Fail { reason }) => Some(S::Failed {
                reason: reason.clone(),
            }),
            (_, E::Cancel { reason }) => Some(S::Cancelled {
                reason: reason.clone(),
            }),
            (S::Pending, E::Start) => Some(S::Planning),
            (S::Planning, E::Planned { labelling: true }) => Some(S::Labelling),
            (S::Planning, E::Planned { labelling: false }) => Some(S::Training),
            (S::Labelling, E::Labelled) => Some(S::Training),
            (S::Training, E::Trained) => Some(S::Quantizing),
            (S::Quantizing, E::Quantized) => Some(S::Evaluating),
            (S::Evaluating, E::Evaluated) => Some(S::Succeeded),
            _ => None,
        }
    }

    #[test]
    fn every_state_event_pair_matches_the_table() {
        let mut accepted = 0;
        for from in JobState::all() {
            for event in JobEvent::all() {
                let got = from.clone().apply(event.clone());
                match expected(&from, &event) {
                    Some(next) => {
                        assert_eq!(got, Ok(next), "{} + {}", from.name(), event.name());
                        accepted += 1;
                    }
                    None => {
                        let err = got.expect_err("transition must be refused");
                        assert_eq!((err.from, err.event), (from.name(), event.name()));
                    }
                }
            }
        }
        // 7 happy-path edges + fail and cancel from each of 6 non-terminal states.
        assert_eq!(accepted, 7 + 2 * 6);
    }

    #[test]
    fn happy_paths_reach_succeeded() {
        let offline = [
            JobEvent::Start,
            JobEvent::Planned { labelling: true },
            JobEvent::Labelled,
            JobEvent::Trained,
            JobEvent::Quantized,
            JobEvent::Evaluated,
        ];
        let end = offline
            .iter()
            .cloned()
            .try_fold(JobState::Pending, JobState::apply)
            .unwrap();
        assert_eq!(end, JobState::Succeeded);
        let online = [
            JobEvent::Start,
            JobEvent::Planned { labelling: false },
            JobEvent::Trained,
            JobEvent::Quantized,
            JobEvent::Evaluated,
        ];
        assert_eq!(
            online
                .iter()
                .cloned()
                .try_fold(JobState::Pending, JobState::apply)
                .unwrap(),
            JobState::Succeeded
        );
    }

    #[test]
    fn terminal_states_refuse_everything_and_keep_the_reason() {
        let failed = JobState::Training
            .apply(JobEvent::Fail {
                reason: "shard 3 failed 5 times".into(),
            })
            .unwrap();
        assert_eq!(failed.reason(), Some("shard 3 failed 5 times"));
        assert!(failed.is_terminal() && !failed.is_running());
        let err = failed
            .clone()
            .apply(JobEvent::Cancel {
                reason: "late".into(),
            })
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid job transition: cancel in state failed"
        );
        assert_eq!(
            JobState::Succeeded
                .apply(JobEvent::Evaluated)
                .unwrap_err()
                .from,
            "succeeded"
        );
    }

    #[test]
    fn states_round_trip_through_json() {
        for s in JobState::all() {
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(
                serde_json::from_str::<JobState>(&json).unwrap(),
                s,
                "{json}"
            );
        }
        let json = serde_json::to_string(&JobState::Failed {
            reason: "oom".into(),
        })
        .unwrap();
        assert_eq!(json, r#"{"state":"failed","reason":"oom"}"#);
    }
}
