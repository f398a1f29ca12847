//! The coordinator's integration tests, one binary: each module was its own
//! test binary, and linking twelve of them (each with tonic, etcd-client
//! and the coordinator) cost minutes of every clean build.

mod auth_metrics;
mod bench_load;
mod fencing;
mod fine_tune;
mod groups;
mod grpc;
mod ledger;
mod planning;
mod restart;
mod scheduling;
mod speculation;
mod store_conformance;
mod tls;
