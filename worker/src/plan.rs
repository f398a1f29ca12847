//! `plan`: check a job's files and derive what it will do, without training.
//! Every problem found here is reported before any compute is spent.

use crate::data::{read_examples, Fields};
use crate::model::student::{derive_config, StudentShape};
use crate::model::{weights, BertConfig};
use crate::tokenize::TextTokenizer;
use crate::{Error, Result};
use distill_spec::JobSpec;
use serde::Serialize;
use std::path::Path;

#[derive(Debug, Serialize)]
pub struct Plan {
    pub teacher: serde_json::Value,
    pub student: serde_json::Value,
    pub data: serde_json::Value,
    pub steps: u64,
    /// The quantization candidates for the hardware target.
    pub quantization: Vec<String>,
}

pub fn plan(spec: &JobSpec) -> Result<Plan> {
    crate::pipeline::check_supported(spec)?;
    let dir = Path::new(&spec.teacher.path);
    let cfg = BertConfig::from_dir(dir)?;
    let files = weights::weight_files(dir)?;
    // Parse the weight headers (catches corrupt or truncated files).
    let tensors = weights::read_tensors(&files)?;
    let emb_rows = tensors
        .iter()
        .find(|(n, _)| n.ends_with("word_embeddings.weight"))
        .map(|(_, t)| t.size()[0]);
    if emb_rows.is_some_and(|r| r != cfg.vocab_size) {
        return Err(Error::Weights {
            path: files[0].clone(),
            message: format!(
                "word embeddings have {} rows but config.json vocab_size is {}",
                emb_rows.unwrap(),
                cfg.vocab_size
            ),
        });
    }
    let tok = TextTokenizer::load(dir, &cfg, spec.data.max_length as usize)?;
    let shape = StudentShape::from(&spec.student.size);
    let s = derive_config(&cfg, &shape)?;
    let fields = Fields {
        text: spec.data.text_field.clone(),
        text_pair: spec.data.text_pair_field.clone(),
        label: Some(spec.data.label_field.clone()),
    };
    let mut counts = serde_json::Map::new();
    let mut n_train = 0;
    for (name, path) in [
        ("train", &spec.data.train),
        ("unlabelled", &spec.data.unlabelled),
        ("eval", &spec.data.eval),
        ("test", &spec.data.test),
    ] {
        if let Some(p) = path {
            let ex = read_examples(Path::new(p), &fields)?;
            if name == "train" || name == "unlabelled" {
                n_train += ex.len();
            }
            counts.insert(name.into(), ex.len().into());
        }
    }
    let steps = crate::pipeline::total_steps(spec, n_train);
    let schemes = crate::quant::Scheme::from_spec(&spec.quantization);
    // An explicit int4 needs a group size that divides every quantized
    // layer's inputs (hidden and intermediate sizes); "auto" skips it.
    if spec.quantization.formats != distill_spec::QuantFormats::Auto {
        for sch in &schemes {
            if let crate::quant::Scheme::Int4 { group_size } = sch {
                for (what, k) in [
                    ("hidden_size", s.hidden_size),
                    ("intermediate_size", s.intermediate_size),
                ] {
                    if k % group_size != 0 {
                        return Err(Error::Invalid(format!(
                            "quantization.group_size: {group_size} does not divide the student's {what} {k}; int4 needs it to"
                        )));
                    }
                }
            }
        }
    }
    Ok(Plan {
        teacher: serde_json::json!({"path": dir, "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
            "params": cfg.encoder_params(), "vocab": cfg.vocab_size, "tokenizer_vocab": tok.vocab_size()}),
        student: serde_json::json!({"layers": s.num_hidden_layers, "hidden": s.hidden_size, "heads": s.num_attention_heads,
            "intermediate": s.intermediate_size, "params": s.encoder_params(),
            "kept_fraction": s.encoder_params() as f64 / cfg.encoder_params() as f64}),
        data: counts.into(),
        steps,
        quantization: schemes.iter().map(|s| s.name().to_string()).collect(),
    })
}
