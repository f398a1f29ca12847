//! `distill quantize` (post-training quantization of a model directory) and
//! `distill eval` (models measured on a job's test split, as the job's
//! report measures them).

use anyhow::Context;
use distill_worker::model::export::export;
use distill_worker::model::{Task, TaskModel};
use distill_worker::quant::Scheme;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct QuantizeArgs {
    /// A Hugging Face model directory (a student distill exported).
    pub model: PathBuf,
    /// fp16, bf16, int8_dynamic (x86 CPU), int8_weight_only or int4.
    #[arg(long)]
    pub format: String,
    /// Input columns per scale/zero pair for int4: 32, 64, 128 or 256.
    #[arg(long, default_value_t = 32)]
    pub group_size: i64,
    /// `classification` or `embedding`.
    #[arg(long, default_value = "classification")]
    pub task: String,
    /// Output directory [default: MODEL-FORMAT].
    #[arg(long)]
    pub output: Option<PathBuf>,
}

pub fn quantize(a: QuantizeArgs) -> anyhow::Result<()> {
    let scheme = match a.format.as_str() {
        "fp16" => Scheme::Fp16,
        "bf16" => Scheme::Bf16,
        "int8_dynamic" => Scheme::Int8Dynamic,
        "int8_weight_only" => Scheme::Int8WeightOnly,
        "int4" => {
            anyhow::ensure!(
                [32, 64, 128, 256].contains(&a.group_size),
                "--group-size: {} is not one of 32, 64, 128, 256",
                a.group_size
            );
            Scheme::Int4 {
                group_size: a.group_size,
            }
        }
        other => anyhow::bail!(
            "--format: unknown format '{other}': expected fp16, bf16, int8_dynamic, int8_weight_only or int4"
        ),
    };
    let task: Task = a.task.parse()?;
    let mut m = TaskModel::load(&a.model, task, None, tch::Device::Cpu)
        .with_context(|| format!("loading {}", a.model.display()))?;
    m.quantize(scheme)?;
    let out = a.output.unwrap_or_else(|| {
        let mut s = a.model.clone().into_os_string();
        s.push(format!("-{}", scheme.name()));
        PathBuf::from(s)
    });
    export(&m, &out, &a.model)?;
    let before = distill_worker::report::dir_bytes(&a.model);
    let after = distill_worker::report::dir_bytes(&out);
    println!(
        "{}: {} → {} ({:.1} MB → {:.1} MB, {:.2}×)",
        scheme.name(),
        a.model.display(),
        out.display(),
        before as f64 / 1e6,
        after as f64 / 1e6,
        before as f64 / after.max(1) as f64
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct EvalArgs {
    /// The job spec whose test split, metric and latency settings to use.
    pub spec: PathBuf,
    /// Model directories to measure (fp32, fp16/bf16 or quantized); repeat.
    #[arg(long = "model", required = true)]
    pub models: Vec<PathBuf>,
    /// The teacher to compare against [default: the spec's teacher.path;
    /// give runs/<job>/teacher for a fine-tuned one].
    #[arg(long)]
    pub teacher: Option<PathBuf>,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// `table` or `json`.
    #[arg(long, default_value = "table")]
    pub output: String,
}

pub fn eval(a: EvalArgs) -> anyhow::Result<()> {
    let spec = distill_spec::load(&a.spec)
        .with_context(|| format!("invalid job spec {}", a.spec.display()))?;
    anyhow::ensure!(
        a.output == "table" || a.output == "json",
        "--output: expected table or json, got '{}'",
        a.output
    );
    let device = distill_worker::device::parse_device(&a.device)?;
    let teacher = a
        .teacher
        .unwrap_or_else(|| PathBuf::from(&spec.teacher.path));
    let rows = distill_worker::pipeline::evaluate_dirs(&spec, &teacher, &a.models, device)?;
    if a.output == "json" {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .map(|(n, r)| serde_json::json!({"model": n, "report": r}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let batches: Vec<u32> = rows[0].1.latency.iter().map(|l| l.batch_size).collect();
    print!("| model | metric | agreement |");
    for b in &batches {
        print!(" p50 ms @{b} |");
    }
    println!(" MB on disk |");
    for (n, r) in &rows {
        print!(
            "| {n} | {:.4} | {:.4} |",
            r.metric,
            r.agreement_with_teacher.unwrap_or(f64::NAN)
        );
        for l in &r.latency {
            print!(" {:.2} |", l.p50_ms);
        }
        println!(" {:.1} |", r.bytes_on_disk.unwrap_or(0) as f64 / 1e6);
    }
    Ok(())
}
