//! Schedules: every value is a pure function of (step, state). The balancer's
//! state is the only mutable part; it is saved in checkpoints.
//!
//! With progress `p = step / total_steps` (clamped to [0, 1]):
//! ```text
//! temperature   T(p)        = T_end + (T_start − T_end) · (1 − p)
//! feature phase f(p)        = 1 − p            (attention, hidden: alignment early)
//! output phase  o(p)        = 0.5 + 0.5 · p    (task, KD, embedding: more weight late)
//! learning rate lr(s)       = lr · s / W                       for s < W (warmup steps)
//!                           = lr · (S − s) / (S − W)            linear decay, or
//!                           = lr · ½(1 + cos(π (s − W)/(S − W))) cosine decay
//! weight of term k          = w_k · phase_k(p)                  for a fixed weight w_k
//!                           = a_k · phase_k(p)                  for "auto", where
//!   output term k (task, KD, embedding):
//!     a_k = min(1 / ema_k, A_MAX)
//!   feature term k (attention, hidden):
//!     a_k = min(1 / ema_k, A_MAX, F_k)          F_k = max_j (a_j · g_j) / g_k
//!     (j over the active output terms, a_j their multiplier: w_j when fixed;
//!      F_k applies once both sides' gradients have been measured)
//! ```
//! `ema_k` is an exponential moving average (β = 0.9) of the term's measured
//! value, updated after every step; `g_k` one of the L2 norm of the term's
//! own gradient with respect to the student's parameters, `‖∇θ L_k‖`,
//! measured every [`PROBE_EVERY`] steps (β = [`GRAD_BETA`]). A_MAX =
//! [`AUTO_MAX`].
//!
//! Why the gradient cap: dividing a term by its value makes it contribute
//! about `phase_k` to the loss, but its *gradient* becomes `∇L_k / L_k`. For a
//! mean-squared error with residual `e`, that is about `2 ∇e / |e|`: the
//! closer the student already is, the harder the term pulls. At
//! `compression_ratio = 0.9` (a 6 × 64 student of a 6 × 384 teacher) the
//! attention MSE is ≈ 6e−4, its "auto" weight ≈ 1 600, and its gradient
//! outweighed the task's by orders of magnitude; after clipping to the
//! global norm the task and KD terms no longer moved the student (task CE
//! stayed at ln 2 for the whole run: issue 41, docs/quality.md "Compression").
//! With `F_k` a feature term can pull at most as hard as the strongest
//! output term, so the task and KD terms always move the student; where the
//! feature terms were already weaker (the L3-H384 quick start) the cap does
//! not bind and the weights are the loss-normalised ones as before.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TermWeight {
    Fixed(f64),
    Auto,
}

/// Loss terms in a fixed order (indexes the balancer state).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Term {
    Task = 0,
    Kd = 1,
    Attention = 2,
    Hidden = 3,
    Embedding = 4,
}

pub const TERMS: [Term; 5] = [
    Term::Task,
    Term::Kd,
    Term::Attention,
    Term::Hidden,
    Term::Embedding,
];

impl Term {
    pub fn name(self) -> &'static str {
        ["task", "kd", "attention", "hidden", "embedding"][self as usize]
    }
    fn is_feature(self) -> bool {
        matches!(self, Term::Attention | Term::Hidden)
    }
}

pub fn progress(step: u64, total: u64) -> f64 {
    if total == 0 {
        return 1.0;
    }
    (step as f64 / total as f64).clamp(0.0, 1.0)
}

pub fn temperature(step: u64, total: u64, start: f64, end: f64) -> f64 {
    end + (start - end) * (1.0 - progress(step, total))
}

pub fn phase(term: Term, step: u64, total: u64) -> f64 {
    let p = progress(step, total);
    if term.is_feature() {
        1.0 - p
    } else {
        0.5 + 0.5 * p
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decay {
    Linear,
    Cosine,
}

pub fn learning_rate(step: u64, total: u64, warmup: u64, peak: f64, decay: Decay) -> f64 {
    if step < warmup {
        return peak * step as f64 / warmup as f64;
    }
    if total <= warmup {
        return peak;
    }
    let q = ((step - warmup) as f64 / (total - warmup) as f64).clamp(0.0, 1.0);
    match decay {
        Decay::Linear => peak * (1.0 - q),
        Decay::Cosine => peak * 0.5 * (1.0 + (std::f64::consts::PI * q).cos()),
    }
}

/// Measured loss magnitudes and gradient norms for "auto" weights.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Balancer {
    /// EMA of each term's value, by `Term as usize`; `None` until first seen.
    pub ema: [Option<f64>; 5],
    /// EMA of the L2 norm of each term's own gradient (unweighted), by
    /// `Term as usize`; `None` until first measured. Absent in checkpoints
    /// written before it existed (read as never measured).
    #[serde(default)]
    pub grad: [Option<f64>; 5],
}

pub const BALANCER_BETA: f64 = 0.9;
/// Smoothing of the measured gradient norms (one measurement per probe).
pub const GRAD_BETA: f64 = 0.5;
/// Gradient norms are measured at steps that are multiples of this.
pub const PROBE_EVERY: u64 = 10;
/// No "auto" multiplier exceeds this, whatever a term measures.
pub const AUTO_MAX: f64 = 1000.0;

impl Balancer {
    /// The weight to use for `term` at `step`; `weights` are every term's
    /// configured weights (the feature terms' cap looks at the output terms).
    pub fn weight(&self, term: Term, weights: &[TermWeight; 5], step: u64, total: u64) -> f64 {
        phase(term, step, total) * self.multiplier(term, weights)
    }

    /// `a_k` of the module doc (`w_k` for a fixed weight).
    pub fn multiplier(&self, term: Term, weights: &[TermWeight; 5]) -> f64 {
        let i = term as usize;
        match weights[i] {
            TermWeight::Fixed(v) => v,
            TermWeight::Auto => {
                let a = self.loss_multiplier(term);
                if !term.is_feature() {
                    return a;
                }
                match self.feature_cap(term, weights) {
                    Some(cap) => a.min(cap),
                    None => a,
                }
            }
        }
    }

    fn loss_multiplier(&self, term: Term) -> f64 {
        (1.0 / self.ema[term as usize].unwrap_or(1.0).max(1e-12)).min(AUTO_MAX)
    }

    /// `F_k`: the largest output-term gradient force over this term's own
    /// gradient norm; `None` until both have been measured.
    fn feature_cap(&self, term: Term, weights: &[TermWeight; 5]) -> Option<f64> {
        let g = self.grad[term as usize].filter(|g| *g > 0.0)?;
        let force = [Term::Task, Term::Kd, Term::Embedding]
            .into_iter()
            .filter_map(|o| {
                let go = self.grad[o as usize]?;
                let a = match weights[o as usize] {
                    TermWeight::Fixed(v) => v,
                    TermWeight::Auto => self.loss_multiplier(o),
                };
                Some(a * go)
            })
            .fold(None, |m: Option<f64>, f| Some(m.map_or(f, |m| m.max(f))))?;
        Some(force / g)
    }

    /// Record the measured (unweighted) value of a term after a step.
    pub fn observe(&mut self, term: Term, value: f64) {
        if !value.is_finite() {
            return;
        }
        let e = &mut self.ema[term as usize];
        *e = Some(match *e {
            None => value,
            Some(old) => BALANCER_BETA * old + (1.0 - BALANCER_BETA) * value,
        });
    }

    /// Record the norm of a term's own gradient, measured at a probe step.
    /// Zero (a batch without labelled rows has no task gradient) and
    /// non-finite norms are not measurements.
    pub fn observe_grad(&mut self, term: Term, norm: f64) {
        if !norm.is_finite() || norm <= 0.0 {
            return;
        }
        let e = &mut self.grad[term as usize];
        *e = Some(match *e {
            None => norm,
            Some(old) => GRAD_BETA * old + (1.0 - GRAD_BETA) * norm,
        });
    }
}

/// "auto" feature terms (attention, hidden) are turned off for a student
/// narrower than its teacher: `weights` with those set to `Fixed(0.0)`, and
/// the terms turned off. Explicit numbers are kept as given.
///
/// Why: at a width reduction the feature terms compare representations that
/// no longer correspond — the attention term averages the teacher's heads
/// against the student's fewer heads, the hidden term maps the student's
/// width onto the teacher's through a fresh projection — and under AdamW,
/// which normalises every parameter's step by its own gradient, a term with a
/// small total gradient still sets the direction of the parameters it
/// dominates (attention moves Q and K at the full learning rate). Measured
/// at `compression_ratio = 0.9` (6 × 64 student of a 6 × 384 teacher,
/// sentiment, seed 1): with the gradient cap on, attention alone or hidden
/// alone beside task + KD left the student answering one class (dev
/// 0.5656 from step 100 to 400) while task + KD alone reached 0.66 by step
/// 200 (docs/quality.md, "Compression").
pub fn auto_features_for_width(
    mut weights: [TermWeight; 5],
    student_hidden: i64,
    teacher_hidden: i64,
) -> ([TermWeight; 5], Vec<Term>) {
    let mut off = vec![];
    if student_hidden < teacher_hidden {
        for t in [Term::Attention, Term::Hidden] {
            if weights[t as usize] == TermWeight::Auto {
                weights[t as usize] = TermWeight::Fixed(0.0);
                off.push(t);
            }
        }
    }
    (weights, off)
}

/// Whether `step` measures the terms' gradient norms.
pub fn is_probe_step(step: u64) -> bool {
    step % PROBE_EVERY == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * b.abs().max(1.0)
    }

    macro_rules! assert_close {
        ($a:expr, $b:expr) => {{
            let (a, b) = ($a, $b);
            assert!(close(a, b), "{} = {a}, expected {b}", stringify!($a));
        }};
    }

    fn all(w: TermWeight) -> [TermWeight; 5] {
        [w; 5]
    }

    #[test]
    fn temperature_decays_linearly_from_start_to_end() {
        assert_close!(temperature(0, 100, 4.0, 1.0), 4.0);
        assert_close!(temperature(25, 100, 4.0, 1.0), 3.25);
        assert_close!(temperature(50, 100, 4.0, 1.0), 2.5);
        assert_close!(temperature(100, 100, 4.0, 1.0), 1.0);
        // Past the end, and with no steps at all, it stays at the end value.
        assert_close!(temperature(250, 100, 4.0, 1.0), 1.0);
        assert_close!(temperature(0, 0, 4.0, 1.0), 1.0);
        // A constant schedule is constant.
        assert_close!(temperature(37, 100, 2.0, 2.0), 2.0);
    }

    #[test]
    fn feature_terms_fade_out_and_output_terms_grow() {
        for term in [Term::Attention, Term::Hidden] {
            assert_close!(phase(term, 0, 200), 1.0);
            assert_close!(phase(term, 50, 200), 0.75);
            assert_close!(phase(term, 100, 200), 0.5);
            assert_close!(phase(term, 200, 200), 0.0);
            assert_close!(phase(term, 400, 200), 0.0);
        }
        for term in [Term::Task, Term::Kd, Term::Embedding] {
            assert_close!(phase(term, 0, 200), 0.5);
            assert_close!(phase(term, 50, 200), 0.625);
            assert_close!(phase(term, 100, 200), 0.75);
            assert_close!(phase(term, 200, 200), 1.0);
            assert_close!(phase(term, 400, 200), 1.0);
        }
    }

    #[test]
    fn learning_rate_warms_up_then_decays() {
        let (total, warmup, peak) = (110, 10, 1e-3);
        for decay in [Decay::Linear, Decay::Cosine] {
            assert_close!(learning_rate(0, total, warmup, peak, decay), 0.0);
            assert_close!(learning_rate(5, total, warmup, peak, decay), 5e-4);
            assert_close!(learning_rate(9, total, warmup, peak, decay), 9e-4);
            assert_close!(learning_rate(10, total, warmup, peak, decay), peak);
            assert_close!(learning_rate(60, total, warmup, peak, decay), 5e-4);
            assert_close!(learning_rate(110, total, warmup, peak, decay), 0.0);
            assert_close!(learning_rate(500, total, warmup, peak, decay), 0.0);
        }
        // Linear: a quarter of the way through the decay, three quarters left.
        assert_close!(
            learning_rate(35, total, warmup, peak, Decay::Linear),
            7.5e-4
        );
        assert_close!(
            learning_rate(85, total, warmup, peak, Decay::Linear),
            2.5e-4
        );
        // Cosine: ½(1 + cos(π/4)) and ½(1 + cos(3π/4)).
        let quarter = 0.5 * (1.0 + std::f64::consts::FRAC_1_SQRT_2);
        assert_close!(
            learning_rate(35, total, warmup, peak, Decay::Cosine),
            peak * quarter
        );
        assert_close!(
            learning_rate(85, total, warmup, peak, Decay::Cosine),
            peak * (1.0 - quarter)
        );
        // No warmup starts at the peak; no decay span stays there.
        assert_close!(learning_rate(0, 100, 0, peak, Decay::Linear), peak);
        assert_close!(learning_rate(50, 100, 0, peak, Decay::Linear), 5e-4);
        assert_close!(learning_rate(20, 10, 10, peak, Decay::Cosine), peak);
    }

    #[test]
    fn fixed_weights_follow_the_phase_and_ignore_measurements() {
        let mut b = Balancer::default();
        b.observe(Term::Hidden, 1000.0);
        b.observe(Term::Task, 1000.0);
        b.observe_grad(Term::Hidden, 1e6);
        b.observe_grad(Term::Task, 1e-6);
        assert_close!(
            b.weight(Term::Hidden, &all(TermWeight::Fixed(0.3)), 25, 100),
            0.3 * 0.75
        );
        assert_close!(
            b.weight(Term::Task, &all(TermWeight::Fixed(0.3)), 25, 100),
            0.3 * 0.625
        );
        assert_close!(
            b.weight(Term::Kd, &all(TermWeight::Fixed(2.0)), 100, 100),
            2.0
        );
        assert_close!(
            b.weight(Term::Attention, &all(TermWeight::Fixed(2.0)), 100, 100),
            0.0
        );
        assert_close!(
            b.weight(Term::Embedding, &all(TermWeight::Fixed(0.0)), 0, 100),
            0.0
        );
    }

    #[test]
    fn auto_weights_divide_the_phase_by_the_ema() {
        let mut b = Balancer::default();
        // Before any measurement the weight is the phase alone.
        assert_close!(b.weight(Term::Kd, &all(TermWeight::Auto), 0, 100), 0.5);
        assert_close!(b.weight(Term::Hidden, &all(TermWeight::Auto), 0, 100), 1.0);

        b.observe(Term::Kd, 2.0);
        assert_eq!(
            b.ema[Term::Kd as usize],
            Some(2.0),
            "first value seeds the EMA"
        );
        b.observe(Term::Kd, 4.0);
        assert_close!(b.ema[Term::Kd as usize].unwrap(), 0.9 * 2.0 + 0.1 * 4.0);
        b.observe(Term::Kd, 1.0);
        let ema = 0.9 * 2.2 + 0.1 * 1.0;
        assert_close!(b.ema[Term::Kd as usize].unwrap(), ema);
        // Non-finite measurements leave it alone.
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            b.observe(Term::Kd, bad);
        }
        assert_close!(b.ema[Term::Kd as usize].unwrap(), ema);
        assert_close!(
            b.weight(Term::Kd, &all(TermWeight::Auto), 0, 100),
            0.5 / ema
        );
        assert_close!(
            b.weight(Term::Kd, &all(TermWeight::Auto), 50, 100),
            0.75 / ema
        );
        // Other terms are untouched.
        assert_eq!(b.ema.iter().filter(|e| e.is_some()).count(), 1);

        // A term measured at zero gets a bounded weight.
        b.observe(Term::Attention, 0.0);
        assert_close!(
            b.weight(Term::Attention, &all(TermWeight::Auto), 0, 100),
            AUTO_MAX
        );
    }

    #[test]
    fn auto_weight_times_its_term_is_about_the_phase() {
        let mut b = Balancer::default();
        for i in 0..200 {
            b.observe(Term::Task, 50.0 + (i % 3) as f64);
            b.observe(Term::Hidden, 0.002);
        }
        let task = b.weight(Term::Task, &all(TermWeight::Auto), 100, 100) * 51.0;
        assert!((task - 1.0).abs() < 0.01, "{task}");
        assert_close!(
            b.weight(Term::Hidden, &all(TermWeight::Auto), 0, 100) * 0.002,
            1.0
        );
    }

    /// Issue 41: a term that starts near zero (the attention MSE of a
    /// narrow student, ≈ 6e−4, or KD of a student copied from its teacher,
    /// ≈ 1e−6) must not be multiplied by thousands. With `AUTO_MAX` removed
    /// from `loss_multiplier` this fails (weights 1e6 and 1e12).
    #[test]
    fn auto_weights_stay_bounded_when_a_term_starts_near_zero() {
        let auto = all(TermWeight::Auto);
        for tiny in [1e-6, 1e-12, 0.0] {
            let mut b = Balancer::default();
            b.observe(Term::Kd, tiny);
            b.observe(Term::Attention, tiny);
            for step in [0, 50, 99] {
                for term in [Term::Kd, Term::Attention] {
                    let w = b.weight(term, &auto, step, 100);
                    assert!(w.is_finite() && w <= AUTO_MAX, "{term:?} at {tiny}: {w}");
                }
            }
            assert_close!(b.multiplier(Term::Kd, &auto), AUTO_MAX);
        }
        // Above the bound's reach the loss normalisation is unchanged.
        let mut b = Balancer::default();
        b.observe(Term::Attention, 0.01);
        assert_close!(b.multiplier(Term::Attention, &auto), 100.0);
    }

    /// The feature terms' gradient force is capped by the strongest output
    /// term's: `a_k · g_k ≤ max_j a_j · g_j`. With the cap removed the
    /// attention term, measured at 6e−4 with a gradient as large as the
    /// task's, would pull 1 000 times harder than the task (the collapse).
    #[test]
    fn a_feature_term_never_pulls_harder_than_the_output_terms() {
        let auto = all(TermWeight::Auto);
        let mut b = Balancer::default();
        b.observe(Term::Task, 0.69);
        b.observe(Term::Kd, 2.0);
        b.observe(Term::Attention, 6e-4);
        b.observe(Term::Hidden, 0.44);
        // Before any gradient is measured: loss normalisation, bounded
        // (1 / 6e-4 ≈ 1 667 is over the bound).
        assert_close!(b.multiplier(Term::Attention, &auto), AUTO_MAX);
        assert_close!(b.multiplier(Term::Hidden, &auto), 1.0 / 0.44);
        b.observe_grad(Term::Task, 0.5);
        b.observe_grad(Term::Kd, 0.2);
        b.observe_grad(Term::Attention, 0.3);
        b.observe_grad(Term::Hidden, 10.0);
        let force = |b: &Balancer, t: Term| b.multiplier(t, &auto) * b.grad[t as usize].unwrap();
        let strongest = force(&b, Term::Task).max(force(&b, Term::Kd));
        assert_close!(strongest, 0.5 / 0.69);
        for t in [Term::Attention, Term::Hidden] {
            assert!(
                force(&b, t) <= strongest * (1.0 + 1e-12),
                "{t:?}: {}",
                force(&b, t)
            );
        }
        // Attention is capped (its bounded loss multiplier would give 1 000 · 0.3 = 300).
        assert_close!(force(&b, Term::Attention), strongest);
        // Hidden's loss multiplier (1/0.44 · 10 = 22.7) is also above: capped.
        assert_close!(force(&b, Term::Hidden), strongest);
        // A weak feature term keeps its loss-normalised weight.
        b.grad[Term::Hidden as usize] = Some(1e-4);
        assert!(force(&b, Term::Hidden) < strongest);
        assert_close!(b.multiplier(Term::Hidden, &auto), 1.0 / 0.44);
        // The output terms are never capped by the features.
        assert_close!(b.multiplier(Term::Task, &auto), 1.0 / 0.69);
        assert_close!(b.multiplier(Term::Kd, &auto), 1.0 / 2.0);
        // A fixed task weight is the force's multiplier as is.
        let mut w = auto;
        w[Term::Task as usize] = TermWeight::Fixed(3.0);
        w[Term::Kd as usize] = TermWeight::Fixed(0.0);
        assert_close!(
            b.multiplier(Term::Attention, &w) * 0.3,
            3.0 * b.grad[Term::Task as usize].unwrap()
        );
    }

    #[test]
    fn auto_feature_terms_are_off_for_a_narrower_student_only() {
        let auto = all(TermWeight::Auto);
        let (w, off) = auto_features_for_width(auto, 64, 384);
        assert_eq!(off, [Term::Attention, Term::Hidden]);
        assert_eq!(w[Term::Attention as usize], TermWeight::Fixed(0.0));
        assert_eq!(w[Term::Hidden as usize], TermWeight::Fixed(0.0));
        assert_eq!(w[Term::Task as usize], TermWeight::Auto);
        assert_eq!(w[Term::Kd as usize], TermWeight::Auto);
        // Same width: unchanged.
        assert_eq!(auto_features_for_width(auto, 384, 384), (auto, vec![]));
        // An explicit number is the user's choice, at any width.
        let mut explicit = auto;
        explicit[Term::Hidden as usize] = TermWeight::Fixed(0.5);
        let (w, off) = auto_features_for_width(explicit, 64, 384);
        assert_eq!(off, [Term::Attention]);
        assert_eq!(w[Term::Hidden as usize], TermWeight::Fixed(0.5));
    }

    #[test]
    fn gradient_norms_are_smoothed_and_zero_is_no_measurement() {
        let mut b = Balancer::default();
        b.observe_grad(Term::Task, 0.0);
        assert_eq!(b.grad[Term::Task as usize], None);
        b.observe_grad(Term::Task, 2.0);
        b.observe_grad(Term::Task, f64::NAN);
        b.observe_grad(Term::Task, 0.0);
        b.observe_grad(Term::Task, 4.0);
        assert_close!(b.grad[Term::Task as usize].unwrap(), 3.0);
        assert!(is_probe_step(0) && is_probe_step(PROBE_EVERY) && !is_probe_step(1));
        // Checkpoints written before the gradient norms existed still load.
        let old: Balancer = serde_json::from_str("{\"ema\":[0.5,null,null,null,null]}").unwrap();
        assert_eq!(old.grad, [None; 5]);
        assert_eq!(old.ema[0], Some(0.5));
    }

    #[test]
    fn balancer_round_trips_through_json_exactly() {
        let mut b = Balancer::default();
        // Arbitrary full-precision values, as the EMA produces.
        let mut x = 0.123_456_789_f64;
        for i in 0..500 {
            x = (x * 3.987_654_321 + 0.1).fract() * 10f64.powi(i % 7 - 3);
            b.observe(TERMS[i as usize % 4], x);
            // The gradient norms too (a resumed run must weigh alike).
            b.observe_grad(TERMS[(i as usize + 1) % 4], x);
        }
        assert_eq!(b.ema[Term::Embedding as usize], None);
        assert!(b.grad[Term::Hidden as usize].is_some());
        let json = serde_json::to_string(&b).unwrap();
        let back: Balancer = serde_json::from_str(&json).unwrap();
        for (a, z) in b
            .ema
            .iter()
            .zip(&back.ema)
            .chain(b.grad.iter().zip(&back.grad))
        {
            assert_eq!(a.map(f64::to_bits), z.map(f64::to_bits), "{json}");
        }
        assert_eq!(back, b);
        assert_eq!(
            serde_json::from_str::<Balancer>("{\"ema\":[null,null,null,null,null]}").unwrap(),
            Balancer::default()
        );
    }
}
