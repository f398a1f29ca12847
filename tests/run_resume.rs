//! `distill run` survives SIGKILL: a run killed mid-training and started
//! again finishes with bitwise the same student as an uninterrupted run.
//! Ctrl-C (SIGINT) stops it cleanly: a checkpoint at the step it stopped
//! at, exit status 130, and the same command resumes from that step.
//! Real binary, real files; a tiny random teacher made by transformers.

mod common;

use common::{make_teacher, write_data, TINY};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn spec(dir: &Path) -> PathBuf {
    let p = dir.join("job.toml");
    let d = dir.display();
    std::fs::write(
        &p,
        format!(
            r#"name = "resume-test"
task = "text_classification"
[teacher]
path = "{d}/teacher"
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
init = "teacher"
[distill]
task = "auto"
kd = "auto"
attention = "auto"
hidden = "auto"
teacher_signal = "online"
[training]
steps = 1500
batch_size = 4
learning_rate = 1e-3
checkpoint_every = 50
eval_every = 100
seed = 3
"#
        ),
    )
    .unwrap();
    p
}

fn distill_run(spec: &Path, out: &Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_distill"))
        .args([
            "run",
            // A tiny random teacher: its student may stay at one class.
            "--on-failed-quality",
            "warn",
            spec.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--threads",
            "1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn distill")
}

fn finish(child: std::process::Child) {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "distill run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn sigkill_or_ctrl_c_mid_training_then_resume_matches_uninterrupted() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    make_teacher(&d.join("teacher"), TINY);
    write_data(&d.join("train.jsonl"), 64, 0, 2, 6);
    write_data(&d.join("dev.jsonl"), 16, 100, 2, 6);
    write_data(&d.join("test.jsonl"), 16, 200, 2, 6);
    let spec = spec(d);

    finish(distill_run(&spec, &d.join("a")));

    // Kill -9 once a checkpoint is published and training is under way.
    let mut child = distill_run(&spec, &d.join("b"));
    let latest = d.join("b/student-ckpt/LATEST");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(name) = std::fs::read_to_string(&latest) {
            if name.trim() >= "ckpt-00000100" {
                break;
            }
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "run finished before it could be killed"
        );
        assert!(Instant::now() < deadline, "no checkpoint published in time");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !d.join("b/student/model.safetensors").exists(),
        "the killed run must not have finished"
    );
    let killed_at = std::fs::read_to_string(&latest).unwrap();

    finish(distill_run(&spec, &d.join("b")));
    let a = std::fs::read(d.join("a/student/model.safetensors")).unwrap();
    let b = std::fs::read(d.join("b/student/model.safetensors")).unwrap();
    assert!(
        a == b,
        "student after kill at {killed_at} + resume differs from the uninterrupted run"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("b/report.json")).unwrap()).unwrap();
    assert!(report["student"]["metric"].as_f64().unwrap() >= 0.0);

    // Ctrl-C once training is under way: a clean stop.
    let child = distill_run(&spec, &d.join("c"));
    let latest = d.join("c/student-ckpt/LATEST");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !std::fs::read_to_string(&latest).is_ok_and(|n| n.trim() >= "ckpt-00000100") {
        assert!(Instant::now() < deadline, "no checkpoint published in time");
        std::thread::sleep(Duration::from_millis(5));
    }
    let before = std::fs::read_to_string(&latest).unwrap();
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("run: interrupted"), "{stderr}");
    assert!(
        stderr.contains("run: stopped; the same command resumes"),
        "{stderr}"
    );
    assert!(!d.join("c/student/model.safetensors").exists());
    let stopped_at = std::fs::read_to_string(&latest).unwrap();
    assert!(
        stopped_at.trim() >= before.trim(),
        "the stop saved {stopped_at}, before it {before} was published"
    );
    let step: u64 = stopped_at
        .trim()
        .trim_start_matches("ckpt-")
        .parse()
        .unwrap();
    let again = distill_run(&spec, &d.join("c")).wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("resumed from checkpoint step={step} ")),
        "resumes at the step it stopped at ({step}): {stderr}"
    );
    let c = std::fs::read(d.join("c/student/model.safetensors")).unwrap();
    assert!(
        a == c,
        "student after Ctrl-C at step {step} + resume differs from the uninterrupted run"
    );
}

/// `distill run` goes through the cluster's stages on an in-process
/// coordinator: a teacher fine-tuned in a task of its own, an offline
/// teacher signal in shards, the student and the labels-only baseline,
/// then evaluation. Run again, the same command reuses every stage (the
/// fine-tuned teacher, every shard) and gives the same student; a second
/// `distill run` on the same output directory at once is refused.
#[test]
fn run_fine_tunes_labels_offline_and_trains_the_baseline_through_the_coordinator() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    make_teacher(&d.join("teacher"), TINY);
    write_data(&d.join("train.jsonl"), 96, 0, 2, 6);
    write_data(&d.join("unl.jsonl"), 48, 300, 2, 6);
    write_data(&d.join("dev.jsonl"), 16, 100, 2, 6);
    write_data(&d.join("test.jsonl"), 16, 200, 2, 6);
    let text = std::fs::read_to_string(spec(d))
        .unwrap()
        .replace("path = \"", "fine_tune = true\nepochs = 1\npath = \"")
        .replace(
            "test = \"",
            &format!(
                "unlabelled = \"{}/unl.jsonl\"\nshard_size = 40\ntest = \"",
                d.display()
            ),
        )
        .replace(
            "teacher_signal = \"online\"",
            "teacher_signal = \"offline\"",
        )
        .replace("steps = 1500", "steps = 120");
    let job = d.join("offline.toml");
    std::fs::write(&job, text).unwrap();
    let out = d.join("o");
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_distill"))
            .args([
                "run",
                // A tiny random teacher: its student may stay at one class.
                "--on-failed-quality",
                "warn",
                job.to_str().unwrap(),
                "--output",
                out.to_str().unwrap(),
            ])
            .args(["--threads", "1", "--baseline"])
            .args(extra)
            .output()
            .unwrap()
    };
    let first = run(&[]);
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success(), "{stderr}");
    assert!(stderr.contains("teacher: fine-tuning"), "{stderr}");
    // 144 training examples in shards of 40, each computed once.
    assert_eq!(stderr.matches(" computed").count(), 4, "{stderr}");
    assert!(out.join("teacher/.complete").exists());
    assert!(out.join(".coordinator/wal.log").exists());
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert!(report["baseline"]["metric"].as_f64().is_some(), "{report}");
    let stages: Vec<&str> = report["stage_seconds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s[0].as_str().unwrap())
        .collect();
    assert_eq!(
        stages,
        [
            "prepare",
            "teacher",
            "teacher signal",
            "distillation",
            "labels-only baseline",
            "evaluation and quantization"
        ],
        "{report}"
    );
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(stdout.contains("student, labels only"), "{stdout}");
    let student = std::fs::read(out.join("student/model.safetensors")).unwrap();

    // While a run holds the directory, another is refused by name. (The
    // holder may finish before the second starts: then try again.)
    let refused = (0..3).find_map(|_| {
        let holder = Command::new(env!("CARGO_BIN_EXE_distill"))
            .args([
                "run",
                // A tiny random teacher: its student may stay at one class.
                "--on-failed-quality",
                "warn",
                job.to_str().unwrap(),
                "--output",
                out.to_str().unwrap(),
            ])
            .args(["--threads", "1", "--baseline"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lock = std::fs::File::open(out.join(".coordinator/LOCK")).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        // Until the holder has the lock (probing it takes it a moment,
        // which the holder waits out).
        while lock.try_lock().is_ok() {
            lock.unlock().unwrap();
            assert!(Instant::now() < deadline, "the holder never took the lock");
            std::thread::sleep(Duration::from_millis(2));
        }
        let second = run(&[]);
        let held = holder.wait_with_output().unwrap();
        assert!(
            held.status.success(),
            "{}",
            String::from_utf8_lossy(&held.stderr)
        );
        (!second.status.success()).then(|| String::from_utf8_lossy(&second.stderr).to_string())
    });
    let refused = refused.expect("a second run on the directory was never refused");
    assert!(refused.contains("in use by another process"), "{refused}");

    // The same command again: everything reused, the same student.
    let again = run(&[]);
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{stderr}");
    assert!(
        stderr.contains("reusing the fine-tuned teacher"),
        "{stderr}"
    );
    assert_eq!(stderr.matches(" computed").count(), 0, "{stderr}");
    assert_eq!(
        std::fs::read(out.join("student/model.safetensors")).unwrap(),
        student
    );
    // Another spec into the same directory would resume from this one's
    // checkpoints: refused, naming what differs, and nothing is touched.
    let other = run(&["--seed", "9"]);
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert!(!other.status.success(), "{stderr}");
    assert!(
        stderr.contains("of another spec") && stderr.contains("training.seed"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(out.join("student/model.safetensors")).unwrap(),
        student
    );
    // Without the run's own record (a cluster job given the same output
    // directory has none), the fingerprint in the fine-tuned teacher's
    // marker and in every checkpoint still refuses the other spec's job.
    std::fs::remove_dir_all(out.join(".coordinator")).unwrap();
    let other = run(&["--seed", "9"]);
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert!(!other.status.success(), "{stderr}");
    assert!(
        stderr.contains("by a job of another configuration")
            && stderr.contains(&out.join("teacher").display().to_string()),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(out.join("student/model.safetensors")).unwrap(),
        student
    );
    // The teacher is not the only guard: with its marker gone, the
    // teacher's checkpoints refuse the other spec too.
    std::fs::remove_dir_all(out.join(".coordinator")).unwrap();
    std::fs::remove_file(out.join("teacher/.complete")).unwrap();
    let other = run(&["--seed", "9"]);
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert!(!other.status.success(), "{stderr}");
    assert!(
        stderr.contains("by a job of another configuration")
            && stderr.contains(&out.join("teacher-ckpt").display().to_string()),
        "{stderr}"
    );
}
