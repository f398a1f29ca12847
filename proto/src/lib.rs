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
