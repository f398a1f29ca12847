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
//! The teacher's distribution outside its top-k is unknown. Each loss says
//! how it treats that tail:
//! - [`forward_kl`]: the teacher's top-k renormalised at temperature `T`,
//!   `p = softmax(logp / T)` over the k ids, the tail taken as zero teacher
//!   mass; the student's log-probabilities at `T` over the **whole**
//!   vocabulary, `log q = log_softmax(z / T)`, gathered at the k ids. Loss
//!   `T² · Σ_k p (log p − log q)`. Since `q` is normalised over the whole
//!   vocabulary, student mass in the tail raises the loss: it is pushed onto
//!   the teacher's support. (At k = vocab this is the usual T²·KL.)
//! - [`reverse_kl`] and [`generalized_jsd`] need the student's distribution
//!   as a whole, which the teacher cannot be compared with outside its
//!   top-k; both compare on the teacher's top-k support with both sides
//!   renormalised there (`q̃ = softmax(z_k / T)`, `p̃` as above):
//!   `RKL = T² · Σ_k q̃ (log q̃ − log p̃)`;
//!   `JSD_β = T² · (β · KL(p̃ ‖ m) + (1 − β) · KL(q̃ ‖ m))` with
//!   `m = β p̃ + (1 − β) q̃` (β = 0.5: the symmetric Jensen–Shannon
//!   divergence; β → 0 approaches forward KL up to scale, as in TRL's GKD).
//! - [`sequence_ce`]: cross-entropy on the tokens themselves (the teacher's
//!   generations as hard labels: sequence-level KD; or reference responses).

use tch::{Kind, Tensor};

/// Teacher probabilities and log-probabilities renormalised over its
/// top-k at temperature `t`.
fn teacher_topk(logp: &Tensor, t: f64) -> (Tensor, Tensor) {
    let lp = (logp.to_kind(Kind::Float) / t).log_softmax(-1, Kind::Float);
    (lp.exp(), lp)
}

/// Forward KL(teacher ‖ student) at temperature `t` over the teacher's top-k.
pub fn forward_kl(student: &Tensor, ids: &Tensor, logp: &Tensor, t: f64) -> Tensor {
    let (p, lp) = teacher_topk(logp, t);
    let lq = (student.to_kind(Kind::Float) / t)
        .log_softmax(-1, Kind::Float)
        .gather(1, ids, false);
    let per = (&p * (lp - lq)).sum_dim_intlist(-1, false, Kind::Float);
    per.mean(Kind::Float) * (t * t)
}

/// Reverse KL(student ‖ teacher) at temperature `t`, both renormalised on
/// the teacher's top-k.
pub fn reverse_kl(student: &Tensor, ids: &Tensor, logp: &Tensor, t: f64) -> Tensor {
    let (_, lp) = teacher_topk(logp, t);
    let lq = (student.to_kind(Kind::Float).gather(1, ids, false) / t).log_softmax(-1, Kind::Float);
    let per = (lq.exp() * (&lq - lp)).sum_dim_intlist(-1, false, Kind::Float);
    per.mean(Kind::Float) * (t * t)
}

/// Generalised Jensen–Shannon divergence with weight `beta` on the teacher,
/// at temperature `t`, both renormalised on the teacher's top-k.
pub fn generalized_jsd(student: &Tensor, ids: &Tensor, logp: &Tensor, beta: f64, t: f64) -> Tensor {
    assert!((0.0..=1.0).contains(&beta), "beta must be in [0, 1]");
    let (p, lp) = teacher_topk(logp, t);
    let lq = (student.to_kind(Kind::Float).gather(1, ids, false) / t).log_softmax(-1, Kind::Float);
    let q = lq.exp();
    let m = &p * beta + &q * (1.0 - beta);
    let lm = m.clamp_min(1e-30).log();
    let kl_p = (&p * (&lp - &lm)).sum_dim_intlist(-1, false, Kind::Float);
    let kl_q = (&q * (&lq - &lm)).sum_dim_intlist(-1, false, Kind::Float);
    (kl_p * beta + kl_q * (1.0 - beta)).mean(Kind::Float) * (t * t)
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
pub fn response_rows(logits: &Tensor, input_ids: &Tensor, response_mask: &Tensor) -> (Tensor, Tensor) {
    let s = logits.size();
    let (b, t, v) = (s[0], s[1], s[2]);
    let pred = logits.narrow(1, 0, t - 1).reshape([b * (t - 1), v]);
    let tgt = input_ids.narrow(1, 1, t - 1).reshape([b * (t - 1)]);
    let sel = response_mask.narrow(1, 1, t - 1).reshape([b * (t - 1)]).to_kind(Kind::Bool);
    let idx = sel.nonzero().squeeze_dim(1);
    (pred.index_select(0, &idx), tgt.index_select(0, &idx))
}
