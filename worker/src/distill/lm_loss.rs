//! Token-level distillation losses for language models, on response tokens
//! only, from the teacher's stored top-k signal.
//!
//! Shapes: `student` logits `[n, vocab]` — one row per response token (the
//! logits at the position before it), already selected; teacher `ids`
//! `[n, k]` (int64) and `logp` `[n, k]`: the teacher's k most likely tokens
//! and their log-probabilities at temperature 1 over the whole vocabulary
//! (what `generate`'s top-k log-probabilities and the teacher-signal stage
//! store). Every loss is a mean over the `n` tokens.
//!
//! The teacher's distribution outside its top-k is unknown, so every
//! divergence compares the same coarsening of both distributions: `k + 1`
//! buckets, the teacher's k tokens and one bucket for all the others (the
//! tail). The teacher's tail mass is `1 − Σ_k exp(logp)`; the student's is
//! its probability mass outside those k ids, from the whole vocabulary (a
//! log-sum-exp over the other logits). At temperature `T` each bucketed
//! distribution is tempered as a categorical, `softmax(log b / T)`. At
//! `T = 1` the forward KL is exactly the KL of the coarsened distributions,
//! a lower bound of the full KL that equals it when k covers the
//! vocabulary. Why not drop the tail and renormalise the top-k (as some
//! tools do): when the teacher is unsure (its top-k holds little mass) that
//! pushes all of the student's mass onto the k tokens, sharper than the
//! teacher; on a near-uniform tiny teacher it made the student's
//! cross-entropy on the teacher's own samples worse while the truncated KL
//! fell (the first version of `tests/decoder.rs`'s distillation test).
//!
//! - [`forward_kl`]: `T² · Σ p̂ (log p̂ − log q̂)` over the buckets.
//! - [`reverse_kl`]: `T² · Σ q̂ (log q̂ − log p̂)`.
//! - [`generalized_jsd`]: `T² · (β · KL(p̂ ‖ m) + (1 − β) · KL(q̂ ‖ m))`,
//!   `m = β p̂ + (1 − β) q̂` (β = 0.5: the symmetric Jensen–Shannon
//!   divergence; small β weighs the student side, as in TRL's GKD).
//! - [`sequence_ce`]: cross-entropy on the tokens themselves (the teacher's
//!   generations as hard labels: sequence-level KD; or reference responses).

use tch::{Kind, Tensor};

/// log of the smallest bucket mass kept (an empty tail is 1e-30, not 0).
const LOG_FLOOR: f64 = -69.0;

/// The teacher's bucketed log-probabilities `[n, k + 1]` at temperature `t`.
fn teacher_buckets(logp: &Tensor, t: f64) -> Tensor {
    let lp = logp.to_kind(Kind::Float);
    let tail = (lp.exp().sum_dim_intlist(-1, true, Kind::Float).neg() + 1.0)
        .clamp_min(1e-30)
        .log()
        .clamp_min(LOG_FLOOR);
    (Tensor::cat(&[lp, tail], -1) / t).log_softmax(-1, Kind::Float)
}

/// The student's bucketed log-probabilities `[n, k + 1]` at temperature `t`:
/// its k gathered log-probabilities and its log mass outside them.
fn student_buckets(student: &Tensor, ids: &Tensor, t: f64) -> Tensor {
    let z = student.to_kind(Kind::Float);
    let all = z.logsumexp([-1i64].as_slice(), true);
    let top = z.gather(1, ids, false) - &all;
    let rest = z
        .scatter_value(1, ids, f64::NEG_INFINITY)
        .logsumexp([-1i64].as_slice(), true)
        - &all;
    let tail = rest.clamp_min(LOG_FLOOR);
    (Tensor::cat(&[top, tail], -1) / t).log_softmax(-1, Kind::Float)
}

/// Σ exp(a) (a − b) over the last dimension, mean over rows.
fn kl(a: &Tensor, b: &Tensor) -> Tensor {
    (a.exp() * (a - b))
        .sum_dim_intlist(-1, false, Kind::Float)
        .mean(Kind::Float)
}

/// Forward KL(teacher ‖ student) at temperature `t` over the top-k and tail.
pub fn forward_kl(student: &Tensor, ids: &Tensor, logp: &Tensor, t: f64) -> Tensor {
    kl(&teacher_buckets(logp, t), &student_buckets(student, ids, t)) * (t * t)
}

/// Reverse KL(student ‖ teacher) at temperature `t` over the top-k and tail.
pub fn reverse_kl(student: &Tensor, ids: &Tensor, logp: &Tensor, t: f64) -> Tensor {
    kl(&student_buckets(student, ids, t), &teacher_buckets(logp, t)) * (t * t)
}

/// Generalised Jensen–Shannon divergence with weight `beta` on the teacher,
/// at temperature `t`, over the top-k and tail.
pub fn generalized_jsd(student: &Tensor, ids: &Tensor, logp: &Tensor, beta: f64, t: f64) -> Tensor {
    assert!((0.0..=1.0).contains(&beta), "beta must be in [0, 1]");
    let lp = teacher_buckets(logp, t);
    let lq = student_buckets(student, ids, t);
    let m = lp.exp() * beta + lq.exp() * (1.0 - beta);
    let lm = m.clamp_min(1e-30).log();
    (kl(&lp, &lm) * beta + kl(&lq, &lm) * (1.0 - beta)) * (t * t)
}

/// Cross-entropy of the student on `targets` (`[n]` token ids).
pub fn sequence_ce(student: &Tensor, targets: &Tensor) -> Tensor {
    student
        .to_kind(Kind::Float)
        .log_softmax(-1, Kind::Float)
        .gather(1, &targets.unsqueeze(1), false)
        .neg()
        .mean(Kind::Float)
}

/// The rows of `logits` `[batch, seq, vocab]` that predict response tokens:
/// position `j` predicts token `j + 1`, so the rows are those `j` with
/// `response_mask[:, j + 1]` set. Returns `(logits [n, vocab], targets [n])`.
pub fn response_rows(
    logits: &Tensor,
    input_ids: &Tensor,
    response_mask: &Tensor,
) -> (Tensor, Tensor) {
    let s = logits.size();
    let (b, t, v) = (s[0], s[1], s[2]);
    let pred = logits.narrow(1, 0, t - 1).reshape([b * (t - 1), v]);
    let tgt = input_ids.narrow(1, 1, t - 1).reshape([b * (t - 1)]);
    let sel = response_mask
        .narrow(1, 1, t - 1)
        .reshape([b * (t - 1)])
        .to_kind(Kind::Bool);
    let idx = sel.nonzero().squeeze_dim(1);
    (pred.index_select(0, &idx), tgt.index_select(0, &idx))
}
