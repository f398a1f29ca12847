//! `config.json` of a BERT-family encoder, mirroring the Hugging Face fields.
//!
//! Accepted: `model_type` "bert" (BERT, MiniLM, ERNIE/ERNIE-Tiny checkpoints
//! converted to BERT layout) and "ernie" without task-type embeddings.
//! Rejected with an error that names the file and field: other model types,
//! non-absolute position embeddings, unknown activations, and sizes that do
//! not fit together (hidden size not divisible by the number of heads).

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    #[serde(default = "default_model_type")]
    pub model_type: String,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub intermediate_size: i64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: i64,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: i64,
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
    #[serde(default = "default_ln_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: Option<i64>,
    #[serde(default = "default_pos_type")]
    pub position_embedding_type: String,
    /// Class names by id, for classification heads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id2label: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_labels: Option<i64>,
    /// ERNIE: task-type embeddings (unsupported when true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_task_id: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
}

fn default_model_type() -> String {
    "bert".into()
}
fn default_act() -> String {
    "gelu".into()
}
fn default_dropout() -> f64 {
    0.1
}
fn default_max_pos() -> i64 {
    512
}
fn default_type_vocab() -> i64 {
    2
}
fn default_init_range() -> f64 {
    0.02
}
fn default_ln_eps() -> f64 {
    1e-12
}
fn default_pos_type() -> String {
    "absolute".into()
}

/// The activation of the feed-forward block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// erf-based GELU (`gelu`).
    Gelu,
    /// tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    Relu,
}

impl BertConfig {
    /// Read and validate `<dir>/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let cfg: BertConfig = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: path.clone(),
            message: format!("invalid config.json: {e}"),
        })?;
        cfg.validate()
            .map_err(|message| Error::Config { path, message })?;
        Ok(cfg)
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        match self.model_type.as_str() {
            "bert" => {}
            "ernie" if self.use_task_id != Some(true) => {}
            "ernie" => {
                return Err(
                    "field use_task_id: ERNIE task-type embeddings are not supported".into(),
                )
            }
            other => {
                return Err(format!(
                    "field model_type: unsupported architecture '{other}' (supported: bert, ernie)"
                ))
            }
        }
        if self.position_embedding_type != "absolute" {
            return Err(format!(
                "field position_embedding_type: '{}' is not supported (only 'absolute')",
                self.position_embedding_type
            ));
        }
        self.activation()?;
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
        ] {
            if v <= 0 {
                return Err(format!("field {field}: must be positive, got {v}"));
            }
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(format!(
                "field num_attention_heads: hidden_size {} is not divisible by {} heads",
                self.hidden_size, self.num_attention_heads
            ));
        }
        Ok(())
    }

    pub fn activation(&self) -> std::result::Result<Activation, String> {
        match self.hidden_act.as_str() {
            "gelu" => Ok(Activation::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluTanh),
            "relu" => Ok(Activation::Relu),
            other => Err(format!(
                "field hidden_act: unsupported activation '{other}'"
            )),
        }
    }

    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_attention_heads
    }

    /// Number of classes: `num_labels`, else the size of `id2label`.
    pub fn label_count(&self) -> Option<i64> {
        self.num_labels
            .or_else(|| self.id2label.as_ref().map(|m| m.len() as i64))
    }

    /// Class names ordered by id (`LABEL_i` where the config has none).
    pub fn label_names(&self) -> Vec<String> {
        let n = self.label_count().unwrap_or(0);
        (0..n)
            .map(|i| {
                self.id2label
                    .as_ref()
                    .and_then(|m| m.get(&i.to_string()).cloned())
                    .unwrap_or_else(|| format!("LABEL_{i}"))
            })
            .collect()
    }

    /// Parameters of the encoder (embeddings, layers, pooler), no task head.
    pub fn encoder_params(&self) -> i64 {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let emb =
            (self.vocab_size + self.max_position_embeddings + self.type_vocab_size) * h + 2 * h;
        let layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 4 * h;
        let pooler = h * h + h;
        emb + self.num_hidden_layers * layer + pooler
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> BertConfig {
        serde_json::from_str(
            r#"{"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2,
                "num_attention_heads": 4, "intermediate_size": 64}"#,
        )
        .unwrap()
    }

    #[test]
    fn defaults_and_validation() {
        let c = base();
        assert_eq!(c.model_type, "bert");
        assert_eq!(c.layer_norm_eps, 1e-12);
        assert!(c.validate().is_ok());
        let mut bad = c.clone();
        bad.model_type = "gpt2".into();
        assert!(bad.validate().unwrap_err().contains("model_type"));
        let mut bad = c.clone();
        bad.position_embedding_type = "relative_key".into();
        assert!(bad
            .validate()
            .unwrap_err()
            .contains("position_embedding_type"));
        let mut bad = c.clone();
        bad.num_attention_heads = 5;
        assert!(bad.validate().unwrap_err().contains("divisible"));
        let mut bad = c;
        bad.hidden_act = "swish".into();
        assert!(bad.validate().unwrap_err().contains("hidden_act"));
    }

    #[test]
    fn minilm_parameter_count() {
        // all-MiniLM-L6-v2 as transformers counts it: 22,713,216 (BertModel with pooler).
        let c: BertConfig = serde_json::from_str(
            r#"{"vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6,
                "num_attention_heads": 12, "intermediate_size": 1536}"#,
        )
        .unwrap();
        assert_eq!(c.encoder_params(), 22_713_216);
    }
}
