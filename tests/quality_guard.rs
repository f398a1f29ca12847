//! The quality guard end to end (issue 41): `distill run` on a tiny random
//! teacher, once with a student that cannot learn the task (every training
//! label is the same class, the test split is balanced: it can only answer
//! one class) and once with one that can (the labels follow the words). The
//! first finishes with every output written, a failed `quality` in
//! report.json, a banner in report.md and exit status 3 (0 under
//! `--on-failed-quality warn`); the second passes.

mod common;

use common::{make_teacher, write_data, TINY};
use std::path::Path;
use std::process::{Command, Output};

fn spec(d: &Path, train: &str) -> String {
    format!(
        r#"name = "guard"
task = "text_classification"
[teacher]
path = "{d}/teacher"
[data]
train = "{d}/{train}"
eval = "{d}/dev.jsonl"
test = "{d}/test.jsonl"
labels = ["class_0", "class_1"]
max_length = 16
[student]
layers = 1
hidden_size = 16
num_heads = 2
intermediate_size = 32
init = "random"
[distill]
task = 1.0
kd = 0.0
attention = 0.0
hidden = 0.0
teacher_signal = "online"
[training]
steps = 300
batch_size = 16
learning_rate = 3e-3
eval_every = 100
seed = 3
[quantization]
formats = ["int8_weight_only"]
"#,
        d = d.display()
    )
}

fn run(job: &Path, out: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_distill"))
        .args(["--log-format", "plain", "run"])
        .arg(job)
        .arg("--output")
        .arg(out)
        .args(["--threads", "1"])
        .args(extra)
        .output()
        .unwrap()
}

fn report(out: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap()
}

#[test]
fn a_student_that_cannot_learn_fails_the_quality_check_and_one_that_can_passes() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    make_teacher(&d.join("teacher"), TINY);
    write_data(&d.join("train.jsonl"), 256, 0, 2, 6);
    write_data(&d.join("dev.jsonl"), 64, 1000, 2, 6);
    write_data(&d.join("test.jsonl"), 128, 2000, 2, 6);
    // The same texts, every label class_0.
    let one_class = std::fs::read_to_string(d.join("train.jsonl"))
        .unwrap()
        .replace("class_1", "class_0");
    std::fs::write(d.join("one-class.jsonl"), one_class).unwrap();

    let bad_job = d.join("bad.toml");
    std::fs::write(&bad_job, spec(d, "one-class.jsonl")).unwrap();
    let out = d.join("bad");
    let o = run(&bad_job, &out, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(err.contains("QUALITY CHECK FAILED"), "{err}");
    let r = report(&out);
    assert_eq!(r["quality"]["passed"], false, "{r}");
    assert_eq!(r["quality"]["chance"], 0.5, "{r}");
    assert_eq!(r["student"]["metric"], 0.5, "answers one class: {r}");
    assert!(out.join("student/model.safetensors").exists());
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.starts_with("**QUALITY CHECK FAILED**"), "{md}");
    // Asked to warn only, the same finished job exits 0 and says why.
    let o = run(&bad_job, &out, &["--on-failed-quality", "warn"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("QUALITY CHECK FAILED"), "{err}");

    let good_job = d.join("good.toml");
    std::fs::write(&good_job, spec(d, "train.jsonl")).unwrap();
    let out = d.join("good");
    let o = run(&good_job, &out, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let r = report(&out);
    assert_eq!(r["quality"]["passed"], true, "{r}");
    assert!(r["student"]["metric"].as_f64().unwrap() > 0.6, "{r}");
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.starts_with("quality check: passed"), "{md}");
}
