//! The same job run twice from scratch gives byte-identical models and the
//! same report metrics on CPU — including a teacher whose classifier head
//! does not exist yet (it is created, then fine-tuned, in the job: the
//! head is initialised from the job seed, not from whatever state the
//! random generator is in), and augmented examples (`[data.augment]`)
//! filtered on that teacher's confidence. So does `distill run --workers
//! 2` (two data-parallel ranks as threads of one process, dropout on).

mod common;

use common::{make_teacher, root, write_data, TINY};
use std::path::Path;
use std::process::Command;

/// A random teacher without a classifier head.
fn make_headless_teacher(dir: &Path) {
    make_teacher(dir, TINY);
    let py = root().join(".venv/bin/python");
    let strip = format!(
        "from safetensors.torch import load_file, save_file\n\
         p = '{}'\n\
         t = {{k: v for k, v in load_file(p).items() if not k.startswith('classifier')}}\n\
         save_file(t, p, metadata={{'format': 'pt'}})\n",
        dir.join("model.safetensors").display()
    );
    let out = Command::new(&py).args(["-c", &strip]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs the job into `out`; returns its log (stderr).
fn run(spec: &Path, out: &Path, extra: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_distill"))
        .arg("run")
        // A tiny random teacher: its student may stay at one class.
        .args(["--on-failed-quality", "warn"])
        .arg(spec)
        .arg("--output")
        .arg(out)
        .args(["--threads", "1"])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "distill run failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The teacher and the student of runs `a` and `b` are byte-identical.
fn same_models(a: &Path, b: &Path, what: &str) {
    for file in ["teacher/model.safetensors", "student/model.safetensors"] {
        let (x, y) = (
            std::fs::read(a.join(file)).unwrap(),
            std::fs::read(b.join(file)).unwrap(),
        );
        assert!(x == y, "{file} differs between {what}");
    }
}

fn metrics(report: &Path) -> Vec<f64> {
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report).unwrap()).unwrap();
    ["teacher", "student", "baseline"]
        .iter()
        .map(|m| r[m]["metric"].as_f64().unwrap())
        .chain([r["retention"].as_f64().unwrap()])
        .collect()
}

/// The job (headless teacher, data, augmentation) in `d`; returns its spec.
fn write_job(d: &Path) -> std::path::PathBuf {
    make_headless_teacher(&d.join("teacher"));
    write_data(&d.join("train.jsonl"), 200, 0, 2, 6);
    write_data(&d.join("dev.jsonl"), 40, 1000, 2, 6);
    write_data(&d.join("test.jsonl"), 40, 2000, 2, 6);
    let spec = d.join("job.toml");
    std::fs::write(
        &spec,
        format!(
            r#"name = "determinism"
task = "text_classification"
[teacher]
path = "{d}/teacher"
fine_tune = true
[data]
train = "{d}/train.jsonl"
eval = "{d}/dev.jsonl"
test = "{d}/test.jsonl"
labels = ["class_0", "class_1"]
max_length = 16
shard_size = 64
[data.augment]
method = "neighbours"
factor = 2
probability = 0.3
min_confidence = 0.52
[student]
layers = 1
hidden_size = 16
num_heads = 2
intermediate_size = 32
init = "random"
[distill]
teacher_signal = "offline"
[training]
batch_size = 8
steps = 20
eval_every = 10
checkpoint_every = 10
seed = 5
"#,
            d = d.display()
        ),
    )
    .unwrap();
    spec
}

#[test]
fn the_same_job_twice_from_scratch_gives_the_same_models_and_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let spec = write_job(d);
    let (a, b) = (d.join("a"), d.join("b"));
    let _ = run(&spec, &a, &["--baseline"]);
    let _ = run(&spec, &b, &["--baseline"]);
    same_models(&a, &b, "two runs of the same job");
    assert_eq!(
        metrics(&a.join("report.json")),
        metrics(&b.join("report.json")),
        "teacher, student, baseline metrics and retention"
    );
    // Augmentation: 2 copies of each of the 200 examples, filtered on the
    // fine-tuned teacher's confidence, the same both times.
    let aug = |d: &Path| {
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("report.json")).unwrap()).unwrap();
        r["augmentation"].clone()
    };
    assert_eq!(aug(&a)["generated"], 400, "{}", aug(&a));
    let kept = aug(&a)["kept"].as_u64().unwrap();
    assert!(kept <= 400, "{}", aug(&a));
    assert_eq!(aug(&a), aug(&b));
}

/// `distill run --workers 2` on the CPU: two ranks as threads of one
/// process, training data-parallel with dropout on, give the same student
/// byte for byte twice. (Before each rank thread drew its dropout masks
/// from a generator of its own, three such runs gave three students.)
#[test]
fn two_local_workers_twice_give_the_same_student() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let spec = write_job(d);
    let (a, b) = (d.join("a"), d.join("b"));
    let log = run(&spec, &a, &["--workers", "2"]);
    assert!(log.contains("on 2 local worker(s)"), "{log}");
    let _ = run(&spec, &b, &["--workers", "2"]);
    let cfg = std::fs::read_to_string(a.join("student/config.json")).unwrap();
    assert!(
        cfg.contains("\"hidden_dropout_prob\": 0.1"),
        "dropout is on: {cfg}"
    );
    same_models(&a, &b, "two runs with --workers 2");
}
