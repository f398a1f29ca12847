//! The distillation engine: loss terms, schedules, and (in `train`) the
//! training loop with exact resume.

pub mod loss;
pub mod schedule;
