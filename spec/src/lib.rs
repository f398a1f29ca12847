//! The distill job spec: one structure, TOML for people and JSON on the wire,
//! parsed in two stages (raw serde with `deny_unknown_fields`, then
//! `validate()` into the spec the rest of the code uses).
//!
//! What it must never do: depend on libtorch. The coordinator, the worker and
//! the CLI all use this crate.
