//! `distill student`: derive a student from a teacher directory (shape from a
//! preset, explicit sizes or a compression ratio), initialise it from the
//! teacher, and export it as a Hugging Face directory. Prints the counts.

use distill_worker::model::decoder::student as dstudent;
use distill_worker::model::decoder::{DecoderConfig, DecoderModel};
use distill_worker::model::export::export;
use distill_worker::model::student::{
    derive_config, init_from_teacher, last_layer_map, uniform_layer_map, StudentShape,
};
use distill_worker::model::{Task, TaskModel};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Teacher: a Hugging Face model directory.
    #[arg(long)]
    pub teacher: PathBuf,
    /// Where to write the student directory.
    #[arg(long)]
    pub output: PathBuf,
    /// Preset shape L<layers>-H<hidden>, e.g. L3-H384, L4-H312.
    #[arg(long, conflicts_with = "compression_ratio")]
    pub preset: Option<String>,
    /// Fraction of the teacher's parameters to remove, in (0, 1).
    #[arg(long)]
    pub compression_ratio: Option<f64>,
    /// `classification` or `embedding`.
    #[arg(long, default_value = "embedding")]
    pub task: String,
    /// Teacher layers the student's layers copy: `uniform`, `last` (encoders),
    /// `first-and-last` (decoders), or a comma-separated list of teacher
    /// layer indices.
    #[arg(long, default_value = "uniform")]
    pub layer_map: String,
    /// Initialise randomly instead of from the teacher.
    #[arg(long)]
    pub random_init: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if DecoderConfig::is_decoder_dir(&a.teacher) {
        return run_decoder(a);
    }
    let task: Task = a.task.parse()?;
    let teacher = TaskModel::load(&a.teacher, task, None, tch::Device::Cpu)?;
    let shape = match (&a.preset, a.compression_ratio) {
        (Some(p), None) => StudentShape::Preset(p.clone()),
        (None, Some(r)) => StudentShape::CompressionRatio(r),
        _ => anyhow::bail!("give exactly one of --preset or --compression-ratio"),
    };
    let cfg = derive_config(teacher.config(), &shape)?;
    let (lt, ls) = (teacher.config().num_hidden_layers, cfg.num_hidden_layers);
    let map = match a.layer_map.as_str() {
        "uniform" => uniform_layer_map(lt, ls),
        "last" => last_layer_map(lt, ls),
        list => list
            .split(',')
            .map(|x| x.trim().parse::<i64>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| {
                anyhow::anyhow!("--layer-map {list}: expected uniform, last or a list like 1,3,5")
            })?,
    };
    let mut student = TaskModel::new(&cfg, task, teacher.labels.clone(), tch::Device::Cpu)?;
    student.normalize = teacher.normalize;
    if !a.random_init {
        init_from_teacher(&mut student, &teacher, &map)?;
    }
    export(&student, &a.output, &a.teacher)?;
    let (tp, sp) = (teacher.num_params(), student.num_params());
    println!(
        "{}",
        serde_json::json!({
            "output": a.output,
            "teacher": {"layers": lt, "hidden": teacher.config().hidden_size, "params": tp},
            "student": {"layers": ls, "hidden": cfg.hidden_size, "heads": cfg.num_attention_heads,
                        "intermediate": cfg.intermediate_size, "params": sp, "layer_map": map},
            "kept_fraction": (sp as f64 / tp as f64 * 10000.0).round() / 10000.0,
        })
    );
    Ok(())
}

/// A decoder teacher (Llama, Qwen2, Mistral): the student keeps the head
/// dimension and a leading slice of key/value groups, hidden size and MLP;
/// `--task` does not apply.
fn run_decoder(a: Args) -> anyhow::Result<()> {
    let teacher = DecoderModel::load(&a.teacher, tch::Device::Cpu, Some(tch::Kind::Float))?;
    let tc = &teacher.config;
    let shape = match (&a.preset, a.compression_ratio) {
        (Some(p), None) => {
            let (layers, hidden) = distill_worker::model::student::parse_preset(p)?;
            dstudent::DecoderShape::Sized { layers, hidden }
        }
        (None, Some(r)) => dstudent::DecoderShape::CompressionRatio(r),
        _ => anyhow::bail!("give exactly one of --preset or --compression-ratio"),
    };
    let cfg = dstudent::derive_config(tc, &shape)?;
    let choice: dstudent::LayerChoice = a.layer_map.parse()?;
    let map = dstudent::layer_map(&choice, tc.num_hidden_layers, cfg.num_hidden_layers)?;
    let mut student = DecoderModel::new(&cfg, tch::Device::Cpu)?;
    if !a.random_init {
        dstudent::init_from_teacher(&mut student, &teacher, &map)?;
    }
    let kind = tc.kind();
    if kind != tch::Kind::Float {
        student.set_kind(kind);
    }
    dstudent::export(&student, &a.teacher, &a.output)?;
    let (tp, sp) = (tc.params(), cfg.params());
    let (weights, train) = dstudent::memory_bytes(&cfg, kind);
    let mb = |b: i64| (b as f64 / 1048576.0 * 10.0).round() / 10.0;
    println!(
        "{}",
        serde_json::json!({
            "output": a.output,
            "teacher": {"layers": tc.num_hidden_layers, "hidden": tc.hidden_size, "heads": tc.num_attention_heads,
                        "kv_heads": tc.num_key_value_heads, "intermediate": tc.intermediate_size, "params": tp},
            "student": {"layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "heads": cfg.num_attention_heads,
                        "kv_heads": cfg.num_key_value_heads, "intermediate": cfg.intermediate_size, "params": sp,
                        "layer_map": map},
            "kept_fraction": (sp as f64 / tp as f64 * 10000.0).round() / 10000.0,
            "memory_mb": {"weights": mb(weights), "training_adamw_fp32_without_activations": mb(train)},
        })
    );
    Ok(())
}
