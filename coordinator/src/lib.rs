//! distill coordinator: the control plane.
//!
//! It keeps the job ledger (jobs, tasks, training generations, committed
//! checkpoints) in a state store — etcd in cluster mode, an embedded on-disk
//! store for `distill run` — and hands work to workers over gRPC.
//!
//! What it must never do: link libtorch (no `tch`/`torch-sys` anywhere in its
//! dependency graph; `tests/architecture.rs` checks this with `cargo metadata`),
//! or keep state that cannot be rebuilt from the store after a restart.
//!
//! Code map:
//! - [`store`]: the `Store` trait (CAS transactions on revisions, leases,
//!   watches), `EtcdStore`, `EmbeddedStore`, and the shared conformance suite;
//! - [`job`]: the job lifecycle state machine (pure `JobState::apply`);
//! - [`ledger`]: jobs persisted one key each, revision-guarded transitions;
//! - [`tasks`]: teacher-signal shard tasks, leased with attempt fencing;
//! - [`groups`]: training groups with a monotonic generation (fencing) and
//!   checkpoint commits visible only once committed;
//! - [`scheduler`]: the pure queue policy (which job gets which worker);
//! - [`driver`]: the main loop over a closed `Event` enum that applies it,
//!   plans jobs into shards and moves them along;
//! - [`server`]: the gRPC `JobService`/`WorkerService` and [`serve`];
//! - [`election`]: leader election through a lease-guarded key; only the
//!   leader runs the main loop and answers RPCs;
//! - [`auth`]: bearer tokens per role (clients vs workers);
//! - [`tls`]: rustls server (gRPC and metrics, optional mutual TLS) and
//!   client configurations from PEM files;
//! - [`metrics`]: Prometheus `/metrics` (store gauges, counters, latencies);
//! - [`error`]: `CoordinatorError` and its one mapping to gRPC codes;
//! - [`testing`]: a real etcd on loopback for tests, poll-with-timeout;
//! - [`sim`]: simulated workers and clients (endpoint-list failover) for
//!   integration tests and load benchmarks.

pub mod auth;
mod convert;
pub mod driver;
pub mod election;
pub mod error;
mod fetch;
pub mod groups;
pub mod job;
pub mod joblog;
pub mod ledger;
pub mod metrics;
pub mod scheduler;
pub mod server;
pub mod sim;
pub mod store;
pub mod tasks;
pub mod testing;
pub mod tls;

pub use error::CoordinatorError;
pub use server::{serve, serve_full, serve_with, Config, StoreConfig};
