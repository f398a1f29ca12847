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
    parity_script("reference.py", args);
}

/// Run `scripts/parity/<script>` with `args` (offline, quiet
/// transformers); panic with its stderr on failure.
pub fn parity_script(script: &str, args: &[&str]) {
    let path = workspace().join("scripts/parity").join(script);
    let out = Command::new(python())
        .arg(path)
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_VERBOSITY", "error")
        .output()
        .expect("spawn python");
    assert!(
        out.status.success(),
        "{script} {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The shape of a random BERT made by transformers (`make-random`).
#[derive(Clone, Copy, Debug)]
pub struct Random {
    pub seed: i64,
    pub layers: i64,
    pub hidden: i64,
    pub heads: i64,
    pub intermediate: i64,
    pub vocab: i64,
    pub labels: i64,
}

/// The small random teacher most tests train against: 2 layers, hidden 32,
/// 4 heads, vocabulary 60, 2 labels.
pub const SMALL: Random = Random {
    seed: 0,
    layers: 2,
    hidden: 32,
    heads: 4,
    intermediate: 64,
    vocab: 60,
    labels: 2,
};

/// A random model of shape `r` with its own tokenizer.json, made by
/// transformers into `dir`.
pub fn random_model(dir: &Path, r: Random) -> PathBuf {
    let s = |v: i64| v.to_string();
    reference(&[
        "make-random",
        dir.to_str().unwrap(),
        "--seed",
        &s(r.seed),
        "--layers",
        &s(r.layers),
        "--hidden",
        &s(r.hidden),
        "--heads",
        &s(r.heads),
        "--intermediate",
        &s(r.intermediate),
        "--vocab",
        &s(r.vocab),
        "--labels",
        &s(r.labels),
    ]);
    dir.to_path_buf()
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

/// A free loopback port for a test's TCPStore.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `rank` of a two-rank Gloo group on loopback (rank 0 hosts the store),
/// keys under `prefix`.
pub fn rendezvous(
    port: u16,
    prefix: &str,
    rank: u32,
    timeout: std::time::Duration,
) -> distill_worker::collective::Rendezvous {
    distill_worker::collective::Rendezvous {
        host: "127.0.0.1".into(),
        port,
        host_store: true,
        prefix: prefix.into(),
        bind_host: "127.0.0.1".into(),
        rank,
        world: 2,
        timeout,
        backend: distill_worker::collective::Backend::Gloo,
    }
}
