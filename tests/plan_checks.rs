//! `distill plan` checks everything it can before compute is spent, and
//! lists every problem it finds, not just the first: a tokenizer whose
//! vocabulary is larger than the teacher's embeddings, a layer map naming a
//! teacher layer that does not exist, a label outside the declared set, a
//! data file that does not exist — all in one run. A quantization format
//! the hardware target cannot run is refused by the spec check, by field.

mod common;

use common::{make_teacher, write_data, TINY};
use std::path::Path;
use std::process::Command;

fn plan(spec: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_distill"))
        .arg("plan")
        .arg(spec)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn spec(dir: &Path, extra_student: &str, quant: &str) -> String {
    let d = dir.display();
    format!(
        r#"name = "plan-test"
task = "text_classification"
[teacher]
path = "{d}/teacher"
[data]
train = "{d}/train.jsonl"
eval = "{d}/missing-dev.jsonl"
test = "{d}/test.jsonl"
labels = ["class_0", "class_1"]
max_length = 32
[student]
layers = 2
hidden_size = 32
num_heads = 2
intermediate_size = 64
{extra_student}
[quantization]
{quant}
"#
    )
}

#[test]
fn plan_lists_every_problem_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    make_teacher(&dir.join("teacher"), TINY);
    write_data(&dir.join("train.jsonl"), 30, 0, 3, 5);
    write_data(&dir.join("test.jsonl"), 10, 100, 3, 5);
    // Everything right: a plan, and it names the student.
    let good = dir.join("good.toml");
    std::fs::write(&good, spec(dir, "", "").replace("eval = ", "# eval = ")).unwrap();
    let (ok, out) = plan(&good);
    assert!(ok, "{out}");
    assert!(out.contains("\"layers\": 2"), "{out}");
    // 30 examples, batch 32, 3 epochs (the defaults): 3 steps. With two
    // augmented copies of each the epoch is 90 examples: 9 steps.
    assert!(out.contains("\"steps\": 3"), "{out}");
    assert!(!out.contains("augmented"), "{out}");
    // The good spec with `extra` appended, planned.
    let variant = |name: &str, extra: &str| {
        let path = dir.join(name);
        std::fs::write(&path, std::fs::read_to_string(&good).unwrap() + extra).unwrap();
        plan(&path)
    };
    let augment = "[data.augment]\nmethod = \"mask\"\nfactor = 2\n";
    let (ok, out) = variant("augmented.toml", augment);
    assert!(ok, "{out}");
    assert!(out.contains("\"augmented\": 60"), "{out}");
    assert!(out.contains("\"steps\": 9"), "{out}");
    // `per_batch`: the copies ride along in every batch, and the epochs
    // count the 30 texts alone: 3 steps again.
    let (ok, out) = variant("per-batch.toml", &format!("{augment}per_batch = 16\n"));
    assert!(ok, "{out}");
    assert!(out.contains("\"augmented\": 60"), "{out}");
    assert!(out.contains("\"steps\": 3"), "{out}");
    let (ok, out) = variant("per-batch-zero.toml", &format!("{augment}per_batch = 0\n"));
    assert!(!ok, "{out}");
    assert!(out.contains("data.augment.per_batch"), "{out}");

    // Four problems at once.
    let mut train = std::fs::read_to_string(dir.join("train.jsonl")).unwrap();
    train.push_str("{\"text\": \"w5 w6\", \"label\": \"class_9\"}\n");
    std::fs::write(dir.join("train.jsonl"), train).unwrap();
    let tok_path = dir.join("teacher/tokenizer.json");
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tok_path).unwrap()).unwrap();
    let vocab = tok["model"]["vocab"].as_object_mut().unwrap();
    for i in 0..10 {
        vocab.insert(format!("extra{i}"), (60 + i).into());
    }
    std::fs::write(&tok_path, tok.to_string()).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, spec(dir, "layer_map = [0, 7]", "")).unwrap();
    let (ok, out) = plan(&bad);
    assert!(!ok, "{out}");
    assert!(out.contains("4 problems found"), "{out}");
    for want in [
        "tokenizer has 70 tokens but config.json field vocab_size is 60",
        "student.layer_map[1]: teacher layer 7 does not exist",
        "data.train:",
        "label outside data.labels",
        "line 31: 'class_9'",
        "data.eval:",
        "missing-dev.jsonl",
    ] {
        assert!(out.contains(want), "{want:?} missing from:\n{out}");
    }

    // A format the target cannot run: refused by field, before any file.
    let gpu = dir.join("gpu.toml");
    std::fs::write(
        &gpu,
        spec(
            dir,
            "",
            "formats = [\"fp16\", \"int8_dynamic\"]\nhardware = \"nvidia_gpu\"",
        ),
    )
    .unwrap();
    let (ok, out) = plan(&gpu);
    assert!(!ok, "{out}");
    assert!(
        out.contains("quantization.formats[1]") && out.contains("int8_dynamic"),
        "{out}"
    );
}
