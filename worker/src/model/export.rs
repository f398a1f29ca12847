//! Export a model as a Hugging Face directory: `config.json`,
//! `model.safetensors`, the tokenizer files, and for embedding models the
//! sentence-transformers module files (mean pooling, optional Normalize).
//! `transformers.AutoModel` / `AutoModelForSequenceClassification` load it
//! with no missing or unexpected weights.

use super::{Task, TaskModel};
use crate::fsutil::write_atomic;
use crate::{Error, Result};
use std::path::Path;

const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
];

pub fn export(model: &TaskModel, out: &Path, tokenizer_dir: &Path) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut config =
        serde_json::to_value(model.config()).map_err(|e| Error::Invalid(e.to_string()))?;
    let obj = config.as_object_mut().expect("config is an object");
    let arch = match model.task {
        Task::Classification => "BertForSequenceClassification",
        Task::Embedding => "BertModel",
    };
    obj.insert("architectures".into(), serde_json::json!([arch]));
    obj.insert("model_type".into(), "bert".into());
    let dtype = match model.vs.kind() {
        tch::Kind::Half => "float16",
        tch::Kind::BFloat16 => "bfloat16",
        _ => "float32",
    };
    obj.insert("torch_dtype".into(), dtype.into());
    if model.task == Task::Classification {
        let label2id: serde_json::Map<String, serde_json::Value> = model
            .labels
            .iter()
            .enumerate()
            .map(|(i, l)| (l.clone(), i.into()))
            .collect();
        obj.insert("label2id".into(), label2id.into());
    } else {
        obj.remove("id2label");
        obj.remove("num_labels");
    }
    let text = serde_json::to_string_pretty(&config).map_err(|e| Error::Invalid(e.to_string()))?;
    write_atomic(&out.join("config.json"), text.as_bytes())?;

    let tensors = model.named_tensors();
    super::weights::write_safetensors(&out.join("model.safetensors"), &tensors)?;

    let mut copied = 0;
    for f in TOKENIZER_FILES {
        let src = tokenizer_dir.join(f);
        if src.exists() {
            let bytes = std::fs::read(&src).map_err(|e| Error::io(&src, e))?;
            write_atomic(&out.join(f), &bytes)?;
            copied += 1;
        }
    }
    if copied == 0 || !out.join("tokenizer.json").exists() {
        return Err(Error::Tokenizer {
            path: tokenizer_dir.join("tokenizer.json"),
            message: "no tokenizer.json to export with the model".into(),
        });
    }
    if model.task == Task::Embedding {
        write_sentence_transformers(model, out)?;
    }
    // A quantized model says how (`crate::quant`); fp16/bf16 directories
    // stay plain Hugging Face checkpoints that transformers loads.
    if let Some(m) = model.quant_manifest() {
        write_atomic(
            &out.join(crate::quant::MANIFEST),
            serde_json::to_string_pretty(&m).unwrap().as_bytes(),
        )?;
    }
    Ok(())
}

fn write_sentence_transformers(model: &TaskModel, out: &Path) -> Result<()> {
    let mut modules = vec![
        serde_json::json!({"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}),
        serde_json::json!({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}),
    ];
    if model.normalize {
        modules.push(serde_json::json!({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}));
        std::fs::create_dir_all(out.join("2_Normalize")).map_err(|e| Error::io(out, e))?;
    }
    write_atomic(
        &out.join("modules.json"),
        serde_json::to_string_pretty(&modules).unwrap().as_bytes(),
    )?;
    let pooling = serde_json::json!({
        "word_embedding_dimension": model.config().hidden_size,
        "pooling_mode_cls_token": false,
        "pooling_mode_mean_tokens": true,
        "pooling_mode_max_tokens": false,
        "pooling_mode_mean_sqrt_len_tokens": false
    });
    write_atomic(
        &out.join("1_Pooling").join("config.json"),
        serde_json::to_string_pretty(&pooling).unwrap().as_bytes(),
    )
}
