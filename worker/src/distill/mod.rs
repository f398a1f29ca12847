//! The distillation engine: loss terms, schedules, our own AdamW, the
//! training loop with exact resume, and checkpoints.

pub mod adamw;
pub mod checkpoint;
pub mod lm_loss;
pub mod lm_train;
pub mod loss;
pub mod schedule;
pub mod train;
