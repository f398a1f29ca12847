//! distill coordinator: the control plane.
//!
//! It keeps the job ledger (jobs, tasks, training generations, committed
//! checkpoints) in a state store — etcd in cluster mode, an embedded on-disk
//! store for `distill run` — and hands work to workers over gRPC.
//!
//! What it must never do: link libtorch (no `tch`/`torch-sys` anywhere in its
//! dependency graph; `tests/architecture.rs` checks this with `cargo metadata`),
//! or keep state that cannot be rebuilt from the store after a restart.

pub mod error;
pub mod job;
pub mod ledger;
pub mod store;
pub mod testing;

pub use error::CoordinatorError;
