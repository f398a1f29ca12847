//! Fixtures shared by the CLI tests: random teachers made by transformers
//! (scripts/parity/reference.py) and small labelled JSONL data sets.
#![allow(dead_code)]

pub mod cluster;

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The shape of a random teacher (vocabulary 60, 2 labels, seed 3).
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub layers: u32,
    pub hidden: u32,
    pub intermediate: u32,
}

/// 2 layers, hidden 32: fast enough for any test.
pub const TINY: Shape = Shape {
    layers: 2,
    hidden: 32,
    intermediate: 64,
};

/// A random BERT teacher with a 2-label classifier head in `dir`.
pub fn make_teacher(dir: &Path, s: Shape) {
    let out = Command::new(root().join(".venv/bin/python"))
        .arg(root().join("scripts/parity/reference.py"))
        .args(["make-random", dir.to_str().unwrap(), "--seed", "3"])
        .args([
            "--layers",
            &s.layers.to_string(),
            "--hidden",
            &s.hidden.to_string(),
        ])
        .args([
            "--heads",
            "4",
            "--intermediate",
            &s.intermediate.to_string(),
        ])
        .args(["--vocab", "60", "--labels", "2"])
        .output()
        .expect("run python (scripts/setup.sh makes .venv)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `n` examples `{"text": "w.. w..", "label": "class_k%2"}` of
/// `min_words + k % spread` words, `k` from `offset`.
pub fn write_data(path: &Path, n: usize, offset: usize, min_words: usize, spread: usize) {
    let mut s = String::new();
    for i in 0..n {
        let k = i + offset;
        let words: Vec<String> = (0..(min_words + k % spread))
            .map(|j| format!("w{}", 5 + (k * 11 + j * 7) % 50))
            .collect();
        s.push_str(&format!(
            "{{\"text\": \"{}\", \"label\": \"class_{}\"}}\n",
            words.join(" "),
            k % 2
        ));
    }
    std::fs::write(path, s).unwrap();
}
