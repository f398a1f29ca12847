//! distill worker: everything that touches libtorch.
//!
//! The worker runs the frozen teacher (pseudo-labelling) and trains the
//! student, on CPU or CUDA devices chosen by the caller. It talks to the
//! coordinator over gRPC and to peers over the collective backend.
//!
//! Map: `model/` (BERT-family encoder, heads, weights I/O, student
//! derivation, export), `tokenize` (tokenizer.json, padding, bucketing),
//! `data` (JSONL/CSV), `infer` (batched no-grad inference), `device`.
//!
//! What it must never do: talk to etcd (the coordinator owns all state), or run
//! libtorch work on an async runtime thread (tensors live on dedicated OS
//! threads that talk to tokio over channels).

pub mod agent;
pub mod artifacts;
pub mod augment;
pub mod autocast;
pub mod collective;
pub mod data;
pub mod device;
pub mod distill;
pub mod elastic;
pub mod error;
pub mod fsutil;
pub mod infer;
pub mod model;
pub mod pipeline;
pub mod plan;
pub mod progress;
pub mod quality;
pub mod quant;
pub mod report;
pub mod rng;
pub mod signal;
pub mod teachers;
pub mod tokenize;

pub use error::{Error, Result};
