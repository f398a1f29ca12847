//! Shared helpers for the worker's integration tests: the project venv's
//! python (the transformers reference) and the data that setup prepared.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The venv python with transformers; the tests need it (no silent skip).
pub fn python() -> PathBuf {
    let p = workspace().join(".venv/bin/python");
    assert!(
        p.exists(),
        "{} missing: run scripts/setup.sh first",
        p.display()
    );
    p
}

/// Run `scripts/parity/reference.py` with `args`; panic with its stderr on failure.
pub fn reference(args: &[&str]) {
    let script = workspace().join("scripts/parity/reference.py");
    let out = Command::new(python())
        .arg(script)
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_VERBOSITY", "error")
        .output()
        .expect("spawn python");
    assert!(
        out.status.success(),
        "reference.py {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The real teacher prepared by setup.
pub fn minilm_dir() -> PathBuf {
    let d = workspace().join(".cache/data/models/all-MiniLM-L6-v2");
    assert!(
        d.join("model.safetensors").exists(),
        "{} missing: run scripts/setup.sh first",
        d.display()
    );
    d
}

pub fn data_file(rel: &str) -> PathBuf {
    let p = workspace().join(".cache/data").join(rel);
    assert!(
        p.exists(),
        "{} missing: run scripts/setup.sh first",
        p.display()
    );
    p
}

pub fn max_abs_diff(a: &tch::Tensor, b: &tch::Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    (a.to_kind(tch::Kind::Double) - b.to_kind(tch::Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

/// Write a batch's inputs for `reference.py run`.
pub fn save_batch(b: &distill_worker::model::Batch, path: &Path) {
    distill_worker::model::weights::write_safetensors(
        path,
        &[
            ("input_ids".into(), b.input_ids.shallow_clone()),
            ("attention_mask".into(), b.attention_mask.shallow_clone()),
            ("token_type_ids".into(), b.token_type_ids.shallow_clone()),
        ],
    )
    .unwrap();
}
