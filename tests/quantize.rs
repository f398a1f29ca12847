//! Quantization through the `distill` binary: `distill run` quantizes the
//! student to the target's formats, measures every variant and writes the
//! report and plots; the quality gate rejects a variant that drops more
//! than allowed; `distill plan` refuses a format the target cannot run;
//! `distill quantize`, `distill eval` and `distill infer` handle quantized
//! directories.

mod common;

use common::{make_teacher, write_data, TINY};
use std::path::Path;
use std::process::{Command, Output};

fn distill(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_distill"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(o: &Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what} failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A tiny job; `task` and `quantization` go into the spec as given.
fn job(d: &Path, task: &str, quantization: &str) -> std::path::PathBuf {
    if !d.join("teacher/config.json").exists() {
        make_teacher(&d.join("teacher"), TINY);
        write_data(&d.join("train.jsonl"), 160, 0, 2, 6);
        write_data(&d.join("test.jsonl"), 48, 2000, 2, 6);
    }
    let labels = if task == "text_classification" {
        "labels = [\"class_0\", \"class_1\"]"
    } else {
        ""
    };
    let spec = d.join(format!("{task}.toml"));
    std::fs::write(
        &spec,
        format!(
            r#"name = "quant-{task}"
task = "{task}"
[teacher]
path = "{d}/teacher"
[data]
train = "{d}/train.jsonl"
test = "{d}/test.jsonl"
{labels}
max_length = 16
[student]
layers = 1
hidden_size = 32
num_heads = 2
intermediate_size = 64
init = "teacher"
[training]
batch_size = 16
steps = 10
seed = 3
[evaluation]
latency_batch_sizes = [4]
latency_iters = 5
{quantization}
"#,
            d = d.display()
        ),
    )
    .unwrap();
    spec
}

fn report(out: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap()
}

#[test]
fn run_quantizes_to_the_targets_formats_and_reports_every_variant() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let spec = job(
        d,
        "text_classification",
        "[quantization]\nformats = \"auto\"\nhardware = \"cpu\"\nmax_accuracy_drop = 1.0\nkeep_all = true",
    );
    let out = d.join("run");
    let printed = ok(
        &distill(&[
            "run",
            // A tiny random teacher: its student may stay at one class.
            "--on-failed-quality",
            "warn",
            spec.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--threads",
            "1",
        ]),
        "distill run",
    );
    let r = report(&out);
    assert_eq!(r["version"], 2, "{r}");
    let variants = r["variants"].as_array().unwrap();
    let formats: Vec<&str> = variants
        .iter()
        .map(|v| v["format"].as_str().unwrap())
        .collect();
    // The CPU table: every candidate evaluated, in order.
    assert_eq!(
        formats,
        ["int8_dynamic", "int8_weight_only", "int4", "bf16"],
        "{r}"
    );
    for v in variants {
        // max_accuracy_drop = 1 lets everything through; keep_all keeps it.
        assert!(
            ["kept", "chosen"].contains(&v["verdict"].as_str().unwrap()),
            "{v}"
        );
        let dir = Path::new(v["dir"].as_str().unwrap());
        assert!(dir.join("model.safetensors").exists(), "{v}");
        assert!(dir.join("quantization.json").exists(), "{v}");
        let batches: Vec<u64> = v["latency"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["batch_size"].as_u64().unwrap())
            .collect();
        assert_eq!(
            batches,
            [1, 4],
            "latency at batch 1 and the spec's sizes: {v}"
        );
        for l in v["latency"].as_array().unwrap() {
            assert!(
                l["p50_ms"].as_f64().unwrap() > 0.0
                    && l["p95_ms"].as_f64().unwrap() >= l["p50_ms"].as_f64().unwrap(),
                "{l}"
            );
        }
        assert!(v["bytes_on_disk"].as_u64().unwrap() > 0);
        assert!(v["peak_rss_bytes"].as_u64().unwrap() > 0);
        assert!(
            v["macro_f1"].as_f64().is_some() && v["agreement_with_teacher"].as_f64().is_some(),
            "{v}"
        );
        assert_eq!(
            v["params"], r["student"]["params"],
            "quantization keeps the parameter count"
        );
    }
    // Exactly one default output, and it exists.
    let chosen = r["chosen"].as_str().unwrap();
    let n_chosen = variants.iter().filter(|v| v["verdict"] == "chosen").count();
    assert_eq!(n_chosen, usize::from(chosen != "fp32"), "{r}");
    assert!(Path::new(r["chosen_dir"].as_str().unwrap())
        .join("model.safetensors")
        .exists());
    // The stage times, the configuration, and both plots with every model.
    assert!(r["stage_seconds"].as_array().unwrap().len() >= 3, "{r}");
    assert_eq!(r["config"]["quantization"]["keep_all"], true);
    for plot in ["accuracy_vs_latency.svg", "size.svg"] {
        let svg = std::fs::read_to_string(out.join(plot)).unwrap();
        for name in [
            "teacher",
            "student fp32",
            "int8_dynamic",
            "int8_weight_only",
            "int4",
            "bf16",
        ] {
            assert!(svg.contains(name), "{plot} does not label {name}");
        }
    }
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    for f in &formats {
        assert!(
            md.contains(&format!("student {f}")),
            "report.md lacks {f}:\n{md}"
        );
    }
    assert!(printed.contains("deploy:"), "{printed}");

    // The saved int8 variant loads back: distill eval measures it the
    // same way (same metric), and distill infer runs it.
    let int8 = variants[0]["dir"].as_str().unwrap();
    let teacher = out.join("teacher");
    let teacher = if teacher.exists() {
        teacher
    } else {
        d.join("teacher")
    };
    let ev = ok(
        &distill(&[
            "eval",
            spec.to_str().unwrap(),
            "--model",
            int8,
            "--teacher",
            teacher.to_str().unwrap(),
            "--output",
            "json",
        ]),
        "distill eval",
    );
    let ev: serde_json::Value = serde_json::from_str(&ev).unwrap();
    assert_eq!(ev[1]["report"]["metric"], variants[0]["metric"], "{ev}");
    let logits = d.join("int8.safetensors");
    ok(
        &distill(&[
            "infer",
            "--model",
            int8,
            "--data",
            d.join("test.jsonl").to_str().unwrap(),
            "--output",
            logits.to_str().unwrap(),
            "--task",
            "classification",
            "--max-length",
            "16",
        ]),
        "distill infer",
    );
    assert!(logits.exists());
}

#[test]
fn the_quality_gate_rejects_a_variant_that_drops_more_than_allowed() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // Embeddings: the metric (mean cosine to the teacher) is continuous,
    // so int4's rounding lowers it and a zero allowance rejects it.
    let spec = job(
        d,
        "sentence_embedding",
        "[quantization]\nformats = [\"int4\", \"int8_weight_only\"]\nhardware = \"cpu\"\nmax_accuracy_drop = 0.0",
    );
    let out = d.join("run");
    ok(
        &distill(&[
            "run",
            // A tiny random teacher: its student may stay at one class.
            "--on-failed-quality",
            "warn",
            spec.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--threads",
            "1",
        ]),
        "distill run",
    );
    let r = report(&out);
    let student = r["student"]["metric"].as_f64().unwrap();
    let int4 = &r["variants"][0];
    assert_eq!(int4["format"], "int4");
    assert!(int4["metric"].as_f64().unwrap() < student, "{r}");
    assert_eq!(int4["verdict"], "rejected", "{r}");
    assert!(
        int4["reason"]
            .as_str()
            .unwrap()
            .contains("max_accuracy_drop"),
        "{int4}"
    );
    assert!(
        int4["dir"].is_null() && !out.join("quantized/int4").exists(),
        "a rejected variant is removed"
    );
    // Every verdict follows the rule, whichever way each variant went.
    for v in r["variants"].as_array().unwrap() {
        let dropped = student - v["metric"].as_f64().unwrap() > 1e-12;
        assert_eq!(v["verdict"] == "rejected", dropped, "{v}");
    }
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        md.contains("rejected") && md.contains("max_accuracy_drop"),
        "{md}"
    );
}

#[test]
fn plan_refuses_a_format_the_target_cannot_run() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let spec = job(
        d,
        "text_classification",
        "[quantization]\nformats = [\"fp16\", \"int8_dynamic\"]\nhardware = \"nvidia_gpu\"",
    );
    let o = distill(&["plan", spec.to_str().unwrap()]);
    assert!(
        !o.status.success(),
        "plan accepted int8_dynamic on nvidia_gpu"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("quantization.formats[1]") && err.contains("nvidia_gpu"),
        "{err}"
    );
    // A group size that does not divide the student's layers.
    let spec = job(
        d,
        "text_classification",
        "[quantization]\nformats = [\"int4\"]\ngroup_size = 256",
    );
    let o = distill(&["plan", spec.to_str().unwrap()]);
    assert!(
        !o.status.success(),
        "plan accepted int4 with group 256 on hidden 32"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("quantization.group_size"), "{err}");
    // The same spec with the target's INT8 plans, and lists the candidates.
    let spec = job(
        d,
        "text_classification",
        "[quantization]\nformats = [\"int8\", \"int4\"]\nhardware = \"nvidia_gpu\"",
    );
    let plan = ok(&distill(&["plan", spec.to_str().unwrap()]), "distill plan");
    assert!(
        plan.contains("int8_weight_only") && plan.contains("int4"),
        "{plan}"
    );
}

#[test]
fn quantize_writes_a_directory_and_refuses_unknown_formats() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    make_teacher(&d.join("m"), TINY);
    let m = d.join("m");
    let printed = ok(
        &distill(&[
            "quantize",
            m.to_str().unwrap(),
            "--format",
            "int8_weight_only",
        ]),
        "distill quantize",
    );
    assert!(printed.contains("int8_weight_only"), "{printed}");
    let q = d.join("m-int8_weight_only");
    let manifest = std::fs::read_to_string(q.join("quantization.json")).unwrap();
    assert!(
        manifest.contains("int8_weight_only") && manifest.contains("encoder.layer.1.output.dense"),
        "{manifest}"
    );
    let o = distill(&["quantize", m.to_str().unwrap(), "--format", "int3"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--format"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
