//! The gRPC contract of distill: the client-facing `JobService` and the
//! worker-facing `WorkerService`, generated from `distill/v1/*.proto`.
//!
//! This crate must never depend on libtorch (`tch`/`torch-sys`): the
//! coordinator links it, and the coordinator never links libtorch.
//! Prost types stop at the gRPC handlers; the coordinator and worker convert
//! them into validated domain types with `TryFrom`.

pub mod v1 {
    tonic::include_proto!("distill.v1");
}

pub mod client;

/// The collective protocol of this build: the sequence, split and order of
/// the collectives that data-parallel training issues (the gradient
/// buckets, the chunks a large Gloo all-reduce is cut into, the state
/// check on joining). Every rank of a group must issue the same ones, so a
/// worker registers with this number and the coordinator refuses one that
/// differs from its own. Bump it with any change to that sequence.
/// 1: 16 MiB buckets after backward, a Gloo all-reduce of 2 MiB or more
/// in one chunk per Gloo thread (2).
/// 2: on Gloo with CPU tensors, every parameter's gradient but the word
/// embedding's in 4 MiB buckets issued from backward hooks (parameters in
/// reverse name order), then one all-reduce (16 MiB buckets) of the
/// touched word-embedding rows, the loss and term sums and one "had a
/// gradient" flag per hooked parameter; otherwise as 1.
/// 3: as 2, and the all-reduce after backward has the same layout on every
/// rank: every parameter not hooked, a missing gradient as zeros, and one
/// "had a gradient" flag per parameter (hooked, then not), so ranks that
/// differ in which gradients they have still pair equal buffers.
pub const COLLECTIVE_PROTOCOL: u32 = 3;
