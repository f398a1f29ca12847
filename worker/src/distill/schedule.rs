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
//!                           = phase_k(p) / max(ema_k, 1e−8)     for "auto"
//! ```
//! "auto" makes each term contribute about `phase_k(p)` to the loss whatever
//! its natural scale: `ema_k` is an exponential moving average (β = 0.9) of
//! the term's measured value, updated after every step.

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

/// Measured loss magnitudes for "auto" weights.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Balancer {
    /// EMA of each term's value, by `Term as usize`; `None` until first seen.
    pub ema: [Option<f64>; 5],
}

pub const BALANCER_BETA: f64 = 0.9;

impl Balancer {
    /// The weight to use for `term` at `step`.
    pub fn weight(&self, term: Term, w: TermWeight, step: u64, total: u64) -> f64 {
        let ph = phase(term, step, total);
        match w {
            TermWeight::Fixed(v) => v * ph,
            TermWeight::Auto => ph / self.ema[term as usize].unwrap_or(1.0).max(1e-8),
        }
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
        assert_close!(
            b.weight(Term::Hidden, TermWeight::Fixed(0.3), 25, 100),
            0.3 * 0.75
        );
        assert_close!(
            b.weight(Term::Task, TermWeight::Fixed(0.3), 25, 100),
            0.3 * 0.625
        );
        assert_close!(b.weight(Term::Kd, TermWeight::Fixed(2.0), 100, 100), 2.0);
        assert_close!(
            b.weight(Term::Attention, TermWeight::Fixed(2.0), 100, 100),
            0.0
        );
        assert_close!(
            b.weight(Term::Embedding, TermWeight::Fixed(0.0), 0, 100),
            0.0
        );
    }

    #[test]
    fn auto_weights_divide_the_phase_by_the_ema() {
        let mut b = Balancer::default();
        // Before any measurement the weight is the phase alone.
        assert_close!(b.weight(Term::Kd, TermWeight::Auto, 0, 100), 0.5);
        assert_close!(b.weight(Term::Hidden, TermWeight::Auto, 0, 100), 1.0);

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
        assert_close!(b.weight(Term::Kd, TermWeight::Auto, 0, 100), 0.5 / ema);
        assert_close!(b.weight(Term::Kd, TermWeight::Auto, 50, 100), 0.75 / ema);
        // Other terms are untouched.
        assert_eq!(b.ema.iter().filter(|e| e.is_some()).count(), 1);

        // A term measured at zero gets a large but finite weight.
        b.observe(Term::Attention, 0.0);
        assert_close!(b.weight(Term::Attention, TermWeight::Auto, 0, 100), 1e8);
    }

    #[test]
    fn auto_weight_times_its_term_is_about_the_phase() {
        let mut b = Balancer::default();
        for i in 0..200 {
            b.observe(Term::Task, 50.0 + (i % 3) as f64);
            b.observe(Term::Hidden, 0.002);
        }
        let task = b.weight(Term::Task, TermWeight::Auto, 100, 100) * 51.0;
        assert!((task - 1.0).abs() < 0.01, "{task}");
        assert_close!(
            b.weight(Term::Hidden, TermWeight::Auto, 0, 100) * 0.002,
            1.0
        );
    }

    #[test]
    fn balancer_round_trips_through_json_exactly() {
        let mut b = Balancer::default();
        // Arbitrary full-precision values, as the EMA produces.
        let mut x = 0.123_456_789_f64;
        for i in 0..500 {
            x = (x * 3.987_654_321 + 0.1).fract() * 10f64.powi(i % 7 - 3);
            b.observe(TERMS[i as usize % 4], x);
        }
        assert_eq!(b.ema[Term::Embedding as usize], None);
        let json = serde_json::to_string(&b).unwrap();
        let back: Balancer = serde_json::from_str(&json).unwrap();
        for (a, z) in b.ema.iter().zip(&back.ema) {
            assert_eq!(a.map(f64::to_bits), z.map(f64::to_bits), "{json}");
        }
        assert_eq!(back, b);
        assert_eq!(
            serde_json::from_str::<Balancer>("{\"ema\":[null,null,null,null,null]}").unwrap(),
            Balancer::default()
        );
    }
}
