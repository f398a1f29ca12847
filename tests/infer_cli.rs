//! `distill infer` as a user runs it: the real binary on the real teacher.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn distill(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_distill"))
        .args(args)
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .expect("spawn distill")
}

fn read(path: &Path, name: &str) -> tch::Tensor {
    let t = tch::Tensor::read_safetensors(path).unwrap();
    t.into_iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no tensor {name}"))
        .1
}

#[test]
fn infer_writes_rows_in_input_order() {
    let model = root().join(".cache/data/models/all-MiniLM-L6-v2");
    assert!(model.exists(), "run scripts/setup.sh first");
    let tmp = tempfile::tempdir().unwrap();
    // 40 real reviews of very different lengths.
    let text =
        std::fs::read_to_string(root().join(".cache/data/rotten_tomatoes/test.jsonl")).unwrap();
    let data = tmp.path().join("in.jsonl");
    std::fs::write(&data, text.lines().take(40).collect::<Vec<_>>().join("\n")).unwrap();
    let (dyn_out, fixed_out) = (
        tmp.path().join("dyn.safetensors"),
        tmp.path().join("fixed.safetensors"),
    );
    for (out, padding) in [(&dyn_out, "dynamic"), (&fixed_out, "fixed")] {
        let o = distill(&[
            "infer",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--batch-size",
            "8",
            "--max-length",
            "64",
            "--padding",
            padding,
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(summary["examples"], 40);
    }
    let (a, b) = (read(&dyn_out, "embeddings"), read(&fixed_out, "embeddings"));
    assert_eq!(a.size(), vec![40, 384]);
    // Bucketed (reordered) batches are scattered back into input order: the
    // same rows as input-order fixed padding.
    let d = (&a - &b).abs().max().double_value(&[]);
    assert!(d < 1e-4, "dynamic and fixed padding disagree by {d}");
    // Rows really differ from each other (not one row repeated).
    assert!((a.get(0) - a.get(1)).abs().max().double_value(&[]) > 1e-3);
}

#[test]
fn infer_reports_bad_input_clearly() {
    let model = root().join(".cache/data/models/all-MiniLM-L6-v2");
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("bad.jsonl");
    std::fs::write(
        &data,
        "{\"text\": \"fine\"}\n{\"body\": \"no text field\"}\n",
    )
    .unwrap();
    let out = tmp.path().join("o.safetensors");
    let o = distill(&[
        "infer",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("bad.jsonl") && err.contains("line 2") && err.contains("field text: missing"),
        "{err}"
    );
    assert!(!out.exists(), "no output on failure");
}
