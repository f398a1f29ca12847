//! The quality guard: after evaluation, is the distilled student a real
//! result or a failed run that happens to have finished?
//!
//! A student that ends near chance, or below the labels-only student of the
//! same shape, is a failed distillation (DESIGN, "The adaptive loss"). The
//! guard is a pure function of the measured reports; its verdict goes into
//! `report.json` (`quality`), on top of `report.md`, into the job's log, and
//! `distill run` exits with [`EXIT_FAILED_QUALITY`] instead of 0.
//!
//! ```text
//! classification, on the test split (n rows, C labels, q the most frequent label's share):
//!   chance       c  = max(q, 1 / C)                       (always answering the most frequent label)
//!   chance F1    cf = 2q / (1 + q) / C                    (that answer's macro-F1)
//!   fails when   accuracy < c + CHANCE_MARGIN   or   macro-F1 < cf + CHANCE_MARGIN
//!   warns when   accuracy < labels-only accuracy          (with --baseline)
//! embeddings: no chance level is defined; only the baseline comparison
//! ```
//!
//! The guard reads the test split, but it selects nothing: it only says
//! whether the run failed, so it does not bias the reported figure.

use crate::report::ModelReport;
use serde::{Deserialize, Serialize};

/// How far above chance a student must be, in accuracy (and macro-F1).
pub const CHANCE_MARGIN: f64 = 0.02;

/// `distill run`'s exit status for a job that finished with a failed
/// quality check (its outputs are all written).
pub const EXIT_FAILED_QUALITY: i32 = 3;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QualityCheck {
    /// False when any failure was found: the run did not produce a usable
    /// student, whatever its state says.
    pub passed: bool,
    /// Why it failed (empty when it passed).
    pub failures: Vec<String>,
    /// What a user should know but does not fail the run.
    pub warnings: Vec<String>,
    /// The chance accuracy used (classification).
    pub chance: Option<f64>,
}

/// The verdict for a student measured on a test split with `labels` (label
/// ids, −100 or other negatives for none) out of `n_labels` classes;
/// `labels` empty for embedding tasks.
pub fn check(
    labels: &[i64],
    n_labels: usize,
    student: &ModelReport,
    baseline: Option<&ModelReport>,
) -> QualityCheck {
    let mut q = QualityCheck::default();
    let known: Vec<i64> = labels.iter().copied().filter(|&l| l >= 0).collect();
    if n_labels >= 2 && !known.is_empty() {
        let mut counts = vec![0usize; n_labels];
        for &l in &known {
            if let Some(c) = counts.get_mut(l as usize) {
                *c += 1;
            }
        }
        let top = *counts.iter().max().unwrap_or(&0) as f64 / known.len() as f64;
        let chance = top.max(1.0 / n_labels as f64);
        q.chance = Some(chance);
        if student.metric < chance + CHANCE_MARGIN {
            q.failures.push(format!(
                "the student's test accuracy {:.4} is within {:.0} points of chance ({:.4}, always answering the most frequent label): it did not learn the task",
                student.metric,
                100.0 * CHANCE_MARGIN,
                chance
            ));
        }
        let chance_f1 = 2.0 * top / (1.0 + top) / n_labels as f64;
        if let Some(f1) = student.macro_f1 {
            if f1 < chance_f1 + CHANCE_MARGIN {
                q.failures.push(format!(
                    "the student's macro-F1 {f1:.4} is within {:.0} points of a model that always answers one label ({chance_f1:.4})",
                    100.0 * CHANCE_MARGIN
                ));
            }
        }
    }
    if let Some(b) = baseline {
        if student.metric < b.metric {
            q.warnings.push(format!(
                "the distilled student ({:.4}) is below the labels-only student of the same shape ({:.4}) by {:.2} points: distillation did not pay here",
                student.metric,
                b.metric,
                100.0 * (b.metric - student.metric)
            ));
        }
    }
    q.passed = q.failures.is_empty();
    q
}

/// The lines `report.md` and `distill run` put above the table.
pub fn render(q: &QualityCheck) -> String {
    let mut s = String::new();
    if q.passed {
        s.push_str("quality check: passed");
        if let Some(c) = q.chance {
            s.push_str(&format!(" (chance {c:.4})"));
        }
        s.push_str("  \n");
    } else {
        s.push_str("**QUALITY CHECK FAILED**: this run did not produce a usable student.  \n");
        for f in &q.failures {
            s.push_str(&format!("- {f}\n"));
        }
    }
    for w in &q.warnings {
        s.push_str(&format!("- warning: {w}\n"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(metric: f64, f1: Option<f64>) -> ModelReport {
        ModelReport {
            metric,
            macro_f1: f1,
            ..ModelReport::default()
        }
    }

    #[test]
    fn a_student_at_the_majority_rate_fails_and_a_learned_one_passes() {
        // 60 % of the test rows are label 1 (the issue-41 collapse: 0.6008, F1 0.375).
        let labels: Vec<i64> = (0..100).map(|i| (i < 60) as i64).collect();
        let q = check(&labels, 2, &model(0.6008, Some(0.375)), None);
        assert!(!q.passed);
        assert_eq!(q.failures.len(), 2, "{q:?}");
        assert_eq!(q.chance, Some(0.6));
        let q = check(&labels, 2, &model(0.83, Some(0.82)), None);
        assert!(q.passed, "{q:?}");
        assert!(q.failures.is_empty() && q.warnings.is_empty());
        // Accuracy above chance but one label only by F1: still a failure.
        let q = check(&labels, 2, &model(0.65, Some(0.38)), None);
        assert!(!q.passed);
        assert_eq!(q.failures.len(), 1, "{q:?}");
    }

    #[test]
    fn chance_is_at_least_one_over_the_labels_and_unlabelled_rows_do_not_count() {
        let labels = [0, 1, 2, 3, -100, -100, -100, -100];
        let q = check(&labels, 4, &model(0.26, None), None);
        assert_eq!(q.chance, Some(0.25));
        assert!(!q.passed);
        assert!(check(&labels, 4, &model(0.5, None), None).passed);
    }

    #[test]
    fn below_the_labels_only_student_is_a_warning_not_a_failure() {
        let labels: Vec<i64> = (0..10).map(|i| i % 2).collect();
        let q = check(&labels, 2, &model(0.80, None), Some(&model(0.82, None)));
        assert!(q.passed);
        assert_eq!(q.warnings.len(), 1);
        assert!(q.warnings[0].contains("2.00 points"), "{q:?}");
        assert!(render(&q).contains("warning: the distilled student"));
        let q = check(&labels, 2, &model(0.84, None), Some(&model(0.82, None)));
        assert!(q.warnings.is_empty());
    }

    #[test]
    fn embeddings_have_no_chance_level() {
        let q = check(&[], 0, &model(0.1, None), None);
        assert!(q.passed && q.chance.is_none());
        assert!(render(&q).starts_with("quality check: passed"));
    }
}
