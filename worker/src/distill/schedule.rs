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

pub const TERMS: [Term; 5] = [Term::Task, Term::Kd, Term::Attention, Term::Hidden, Term::Embedding];

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
