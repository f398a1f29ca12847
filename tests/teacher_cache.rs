//! `distill run --teacher-cache DIR`: a run whose teacher would be
//! fine-tuned exactly as an earlier run's takes it from the cache (no
//! fine-tuning, the same weights byte for byte), and a run whose teacher
//! budget differs fine-tunes its own.

mod common;

use common::{make_teacher, write_data, TINY};
use std::path::Path;
use std::process::Command;

/// `distill run`, returning its stderr.
fn run(spec: &Path, out: &Path, cache: impl AsRef<std::ffi::OsStr>) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_distill"))
        .args([
            "--log-format",
            "plain",
            "run",
            "--on-failed-quality",
            "warn",
        ])
        .arg(spec)
        .arg("--output")
        .arg(out)
        .arg("--teacher-cache")
        .arg(cache)
        .args(["--threads", "1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "distill run failed:\n{err}");
    err
}

fn spec(d: &Path, name: &str, teacher_lr: &str, signal: &str, temperature: &str) -> String {
    format!(
        r#"name = "{name}"
task = "text_classification"
[teacher]
path = "{d}/teacher"
fine_tune = true
epochs = 1
learning_rate = {teacher_lr}
[data]
train = "{d}/train.jsonl"
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
teacher_signal = "{signal}"
temperature = {temperature}
[training]
batch_size = 8
steps = 10
eval_every = 5
seed = 3
"#,
        d = d.display()
    )
}

fn entries(cache: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(cache)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn a_teacher_fine_tuned_the_same_way_is_taken_from_the_cache_and_another_is_not() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    make_teacher(&d.join("teacher"), TINY);
    write_data(&d.join("train.jsonl"), 120, 0, 2, 6);
    write_data(&d.join("dev.jsonl"), 24, 1000, 2, 6);
    write_data(&d.join("test.jsonl"), 24, 2000, 2, 6);
    let cache = d.join("cache");
    let write = |name: &str, text: String| {
        let p = d.join(format!("{name}.toml"));
        std::fs::write(&p, text).unwrap();
        p
    };
    // A fine-tunes (in its own task: offline signal) and publishes.
    let a = write(
        "a",
        spec(d, "a", "1e-3", "offline", "{ start = 2.0, end = 2.0 }"),
    );
    let log_a = run(&a, &d.join("a"), &cache);
    assert!(log_a.contains("teacher: fine-tuning"), "{log_a}");
    assert!(log_a.contains("published to the teacher cache"), "{log_a}");
    assert_eq!(entries(&cache).len(), 1, "{:?}", entries(&cache));

    // B differs only in the student (another temperature, the teacher
    // online, so fine-tuned in the training task): it takes A's teacher.
    let b = write(
        "b",
        spec(d, "b", "1e-3", "online", "{ start = 4.0, end = 1.0 }"),
    );
    let log_b = run(&b, &d.join("b"), &cache);
    assert!(log_b.contains("taken from the teacher cache"), "{log_b}");
    assert!(!log_b.contains("teacher: fine-tuning"), "{log_b}");
    assert!(!d.join("b/teacher-ckpt").exists(), "B trained a teacher");
    let weights = |run: &str| std::fs::read(d.join(run).join("teacher/model.safetensors")).unwrap();
    assert!(weights("a") == weights("b"), "B's teacher is not A's");
    assert_eq!(entries(&cache).len(), 1);

    // C's teacher has another learning rate: it fine-tunes its own, and
    // publishes it beside A's.
    let c = write(
        "c",
        spec(d, "c", "3e-4", "offline", "{ start = 2.0, end = 2.0 }"),
    );
    let log_c = run(&c, &d.join("c"), &cache);
    assert!(log_c.contains("teacher: fine-tuning"), "{log_c}");
    assert!(!log_c.contains("taken from the teacher cache"), "{log_c}");
    assert!(weights("a") != weights("c"), "C's teacher is A's");
    assert_eq!(entries(&cache).len(), 2, "{:?}", entries(&cache));

    // B's report measures the same teacher as A's.
    let teacher_metric = |run: &str| {
        let r: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(d.join(run).join("report.json")).unwrap(),
        )
        .unwrap();
        r["teacher"]["metric"].as_f64().unwrap()
    };
    assert_eq!(teacher_metric("a"), teacher_metric("b"));

    // A job that fine-tuned its teacher without a cache publishes it when
    // it runs again with one (a finished job, or one resumed after its
    // teacher was done).
    let log_x = run(&c, &d.join("x"), "off");
    assert!(!log_x.contains("teacher cache"), "{log_x}");
    let cache2 = d.join("cache2");
    let log_x2 = run(&c, &d.join("x"), &cache2);
    assert!(
        log_x2.contains("reusing the fine-tuned teacher"),
        "{log_x2}"
    );
    assert!(
        log_x2.contains("published to the teacher cache"),
        "{log_x2}"
    );
    assert_eq!(
        entries(&cache2),
        entries(&cache)[..]
            .iter()
            .filter(|k| {
                std::fs::read(cache.join(k).join("model.safetensors")).unwrap() == weights("c")
            })
            .cloned()
            .collect::<Vec<_>>(),
        "cache2 holds C's teacher under C's key"
    );
}
