//! `distill infer`: run a model directory over a JSONL/CSV file and write one
//! output row per input line, in input order, to a safetensors file.

use anyhow::Context;
use distill_worker::data::{read_examples, Fields};
use distill_worker::infer::{infer, InferOptions};
use distill_worker::model::weights::write_safetensors;
use distill_worker::model::{Task, TaskModel};
use distill_worker::tokenize::{Padding, TextTokenizer};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// Hugging Face model directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Input file: JSONL (one object per line) or CSV with a header row.
    #[arg(long)]
    pub data: PathBuf,
    /// Output safetensors file; tensor `logits` [n, labels] or `embeddings` [n, hidden].
    #[arg(long)]
    pub output: PathBuf,
    /// `classification` (needs a classifier head) or `embedding` (mean pooling).
    #[arg(long, default_value = "embedding")]
    pub task: String,
    /// Field (or CSV column) holding the text.
    #[arg(long, default_value = "text")]
    pub text_field: String,
    /// Field holding the second text of a pair, for pair classification.
    #[arg(long)]
    pub text_pair_field: Option<String>,
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Longer inputs are truncated to this many tokens.
    #[arg(long, default_value_t = 128)]
    pub max_length: usize,
    /// `dynamic` (pad each batch to its longest input, batches length-bucketed)
    /// or `fixed` (pad every batch to --max-length, input order).
    #[arg(long, default_value = "dynamic")]
    pub padding: String,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Weights precision on the device: fp32, fp16 or bf16 (half precision on GPU only).
    #[arg(long, default_value = "fp32")]
    pub dtype: String,
    /// CPU threads for libtorch (at least 1; default: libtorch's choice).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
    pub threads: Option<i32>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if let Some(t) = a.threads {
        tch::set_num_threads(t);
    }
    let device = distill_worker::device::parse_device(&a.device)?;
    let task: Task = a.task.parse()?;
    let padding = match a.padding.as_str() {
        "dynamic" => Padding::Dynamic,
        "fixed" => Padding::Fixed,
        other => anyhow::bail!("--padding {other}: expected dynamic or fixed"),
    };
    anyhow::ensure!(a.batch_size > 0, "--batch-size must be positive");
    let mut model = TaskModel::load(&a.model, task, None, device)?;
    match a.dtype.as_str() {
        "fp32" => {}
        "fp16" | "bf16" if device == tch::Device::Cpu => {
            anyhow::bail!(
                "--dtype {}: half precision inference is only supported on cuda devices",
                a.dtype
            )
        }
        "fp16" => model.set_kind(tch::Kind::Half),
        "bf16" => model.set_kind(tch::Kind::BFloat16),
        other => anyhow::bail!("--dtype {other}: expected fp32, fp16 or bf16"),
    }
    let tok = TextTokenizer::load(&a.model, model.config(), a.max_length)?;
    let fields = Fields {
        text: a.text_field.clone(),
        text_pair: a.text_pair_field.clone(),
        label: None,
    };
    let examples = read_examples(&a.data, &fields)?;
    let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
    let pairs: Option<Vec<&str>> = a.text_pair_field.as_ref().map(|_| {
        examples
            .iter()
            .map(|e| e.text_pair.as_deref().unwrap_or(""))
            .collect()
    });
    let t0 = Instant::now();
    let encoded = tok.encode(&texts, pairs.as_deref())?;
    let opts = InferOptions {
        batch_size: a.batch_size,
        padding,
        bucket: true,
    };
    let total = encoded.len();
    let mut last_report = Instant::now();
    let out = infer(&model, &tok, &encoded, opts, |done, total| {
        if last_report.elapsed().as_secs() >= 5 || done == total {
            eprintln!(
                "infer: {done}/{total} examples ({:.0}/s)",
                done as f64 / t0.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
    })?;
    let name = if task == Task::Classification {
        "logits"
    } else {
        "embeddings"
    };
    write_safetensors(&a.output, &[(name.to_string(), out.shallow_clone())])
        .with_context(|| format!("writing {}", a.output.display()))?;
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "output": a.output,
            "tensor": name,
            "shape": out.size(),
            "examples": total,
            "seconds": (secs * 1000.0).round() / 1000.0,
            "examples_per_second": (total as f64 / secs).round(),
        })
    );
    Ok(())
}
