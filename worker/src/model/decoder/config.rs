//! `config.json` of a decoder-only language model: Llama
//! (`LlamaForCausalLM`), Qwen2 (`Qwen2ForCausalLM`) and Mistral-shaped
//! configs, mirroring the Hugging Face fields.
//!
//! Rotary embeddings are read from both spellings found in the wild:
//! `rope_theta` + `rope_scaling` (transformers 4) and `rope_parameters`
//! (transformers 5, which also keeps `rope_theta` inside it). Scaling types
//! `default`, `linear` and `llama3` are built; any other (`dynamic`, `yarn`,
//! `longrope`, ...) is refused by name rather than silently ignored.
//! Every error names the file and the field.

use crate::{Error, Result};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// How rotary frequencies are scaled for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (every frequency divided by it).
    Linear {
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent scaling: low frequencies divided by
    /// `factor`, high frequencies kept, a smooth blend between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// The decoder families built here; they differ only in biases and defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Qwen2,
    Mistral,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DecoderConfig {
    pub family: Family,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub head_dim: i64,
    pub max_position_embeddings: i64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    /// Bias on q/k/v projections (Qwen2 always; Llama's `attention_bias`
    /// also puts one on o_proj).
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub tie_word_embeddings: bool,
    /// `torch_dtype` / `dtype` as written ("float32", "bfloat16", ...).
    pub dtype: Option<String>,
    /// Mistral's sliding attention window (`None`: full attention).
    pub sliding_window: Option<i64>,
    pub bos_token_id: Option<i64>,
    pub eos_token_ids: Vec<i64>,
    pub pad_token_id: Option<i64>,
    /// The file as read, written back on export with the sizes changed.
    pub raw: Map<String, Value>,
}

struct Fields<'a> {
    path: &'a Path,
    map: &'a Map<String, Value>,
}

impl Fields<'_> {
    fn err(&self, field: &str, message: impl std::fmt::Display) -> Error {
        Error::Config {
            path: self.path.to_path_buf(),
            message: format!("field {field}: {message}"),
        }
    }
    fn int(&self, field: &str) -> Result<i64> {
        self.opt_int(field)?
            .ok_or_else(|| self.err(field, "missing"))
    }
    /// The field converted by `conv`, `None` when absent or null; a value
    /// of another type is an error saying what was `expected`.
    fn opt<T>(
        &self,
        field: &str,
        expected: &str,
        conv: impl Fn(&Value) -> Option<T>,
    ) -> Result<Option<T>> {
        match self.map.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => conv(v)
                .map(Some)
                .ok_or_else(|| self.err(field, format!("expected {expected}, found {v}"))),
        }
    }
    fn opt_int(&self, field: &str) -> Result<Option<i64>> {
        self.opt(field, "an integer", Value::as_i64)
    }
    fn opt_float(&self, field: &str) -> Result<Option<f64>> {
        self.opt(field, "a number", Value::as_f64)
    }
    fn opt_bool(&self, field: &str) -> Result<Option<bool>> {
        self.opt(field, "true or false", Value::as_bool)
    }
    fn opt_str(&self, field: &str) -> Result<Option<String>> {
        self.opt(field, "a string", |v| v.as_str().map(str::to_string))
    }
}

impl DecoderConfig {
    /// Read and validate `<dir>/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: path.clone(),
            message: format!("invalid config.json: {e}"),
        })?;
        Self::from_value(value, &path)
    }

    /// Whether `<dir>/config.json` names a decoder family built here.
    pub fn is_decoder_dir(dir: &Path) -> bool {
        let Ok(text) = std::fs::read_to_string(dir.join("config.json")) else {
            return false;
        };
        let Ok(v) = serde_json::from_str::<Value>(&text) else {
            return false;
        };
        matches!(
            v.get("model_type").and_then(|m| m.as_str()),
            Some("llama" | "qwen2" | "mistral")
        )
    }

    /// Parse a config object; `path` names it in errors.
    pub fn from_value(value: Value, path: &Path) -> Result<Self> {
        let Value::Object(map) = value else {
            return Err(Error::Config {
                path: path.to_path_buf(),
                message: "expected a JSON object".into(),
            });
        };
        let f = Fields { path, map: &map };
        let model_type = f
            .opt_str("model_type")?
            .ok_or_else(|| f.err("model_type", "missing"))?;
        let family = match model_type.as_str() {
            "llama" => Family::Llama,
            "qwen2" => Family::Qwen2,
            "mistral" => Family::Mistral,
            other => {
                return Err(f.err(
                    "model_type",
                    format!(
                        "'{other}' is not a decoder family distill builds (llama, qwen2, mistral)"
                    ),
                ))
            }
        };
        let act = f.opt_str("hidden_act")?.unwrap_or_else(|| "silu".into());
        if act != "silu" {
            return Err(f.err(
                "hidden_act",
                format!("'{act}' unsupported: decoders use silu (SwiGLU)"),
            ));
        }
        let hidden_size = f.int("hidden_size")?;
        let heads = f.int("num_attention_heads")?;
        let kv_heads = f.opt_int("num_key_value_heads")?.unwrap_or(heads);
        let head_dim = match f.opt_int("head_dim")? {
            Some(d) => d,
            None if heads > 0 => hidden_size / heads,
            None => 0,
        };
        let (rope_theta, rope_scaling) = rope(&f, family)?;
        let attention_bias = f.opt_bool("attention_bias")?.unwrap_or(false);
        let (qkv_bias, o_bias) = match family {
            Family::Qwen2 => (true, false),
            _ => (attention_bias, attention_bias),
        };
        let sliding_window = match family {
            Family::Mistral => f.opt_int("sliding_window")?,
            Family::Qwen2 if f.opt_bool("use_sliding_window")?.unwrap_or(false) => {
                return Err(f.err(
                    "use_sliding_window",
                    "Qwen2 sliding-window attention is not built; set it false",
                ))
            }
            _ => None,
        };
        let eos_token_ids = match map.get("eos_token_id") {
            None | Some(Value::Null) => vec![],
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_i64()
                        .ok_or_else(|| f.err("eos_token_id", "expected integers"))
                })
                .collect::<Result<_>>()?,
            Some(v) => vec![v
                .as_i64()
                .ok_or_else(|| f.err("eos_token_id", "expected an integer or a list"))?],
        };
        if let Some(p) = f.opt_float("partial_rotary_factor")? {
            if p != 1.0 {
                return Err(f.err("partial_rotary_factor", "only 1.0 (full rotary) is built"));
            }
        }
        let cfg = DecoderConfig {
            family,
            vocab_size: f.int("vocab_size")?,
            hidden_size,
            intermediate_size: f.int("intermediate_size")?,
            num_hidden_layers: f.int("num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            max_position_embeddings: f.opt_int("max_position_embeddings")?.unwrap_or(2048),
            rms_norm_eps: f.opt_float("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            qkv_bias,
            o_bias,
            mlp_bias: f.opt_bool("mlp_bias")?.unwrap_or(false),
            tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            dtype: match f.opt_str("dtype")? {
                Some(d) => Some(d),
                None => f.opt_str("torch_dtype")?,
            },
            sliding_window,
            bos_token_id: f.opt_int("bos_token_id")?,
            eos_token_ids,
            pad_token_id: f.opt_int("pad_token_id")?,
            raw: map.clone(),
        };
        cfg.validate().map_err(|message| Error::Config {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(cfg)
    }

    /// Sizes that do not fit together, named by field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
        ] {
            if v <= 0 {
                return Err(format!("field {name}: must be positive, found {v}"));
            }
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(format!(
                "field num_key_value_heads: {} does not divide num_attention_heads {}",
                self.num_key_value_heads, self.num_attention_heads
            ));
        }
        if self.head_dim % 2 != 0 {
            return Err(format!(
                "field head_dim: rotary embeddings need an even head_dim, found {}",
                self.head_dim
            ));
        }
        Ok(())
    }

    /// The dtype the weights should stay in unless the caller asks
    /// otherwise.
    pub fn kind(&self) -> tch::Kind {
        match self.dtype.as_deref() {
            Some("bfloat16") => tch::Kind::BFloat16,
            Some("float16") => tch::Kind::Half,
            _ => tch::Kind::Float,
        }
    }

    pub fn params(&self) -> i64 {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let attn = h * q
            + 2 * h * kv
            + q * h
            + if self.qkv_bias { q + 2 * kv } else { 0 }
            + if self.o_bias { h } else { 0 };
        let mlp = 3 * h * i + if self.mlp_bias { 2 * i + h } else { 0 };
        let layer = attn + mlp + 2 * h;
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + self.num_hidden_layers * layer + h + head
    }

    /// The config as `config.json` for transformers: the file as read, with
    /// the sizes and dtype of this config written over it.
    pub fn to_json(&self) -> Value {
        let mut m = self.raw.clone();
        let set = |m: &mut Map<String, Value>, k: &str, v: Value| {
            m.insert(k.to_string(), v);
        };
        set(&mut m, "vocab_size", self.vocab_size.into());
        set(&mut m, "hidden_size", self.hidden_size.into());
        set(&mut m, "intermediate_size", self.intermediate_size.into());
        set(&mut m, "num_hidden_layers", self.num_hidden_layers.into());
        set(
            &mut m,
            "num_attention_heads",
            self.num_attention_heads.into(),
        );
        set(
            &mut m,
            "num_key_value_heads",
            self.num_key_value_heads.into(),
        );
        set(&mut m, "head_dim", self.head_dim.into());
        set(
            &mut m,
            "tie_word_embeddings",
            self.tie_word_embeddings.into(),
        );
        if let Some(d) = &self.dtype {
            set(&mut m, "dtype", d.clone().into());
            m.remove("torch_dtype");
        }
        m.remove("quantization_config");
        Value::Object(m)
    }
}

/// `(theta, scaling)` from either spelling.
fn rope(f: &Fields<'_>, family: Family) -> Result<(f64, RopeScaling)> {
    let default_theta = match family {
        Family::Llama | Family::Mistral => 10_000.0,
        Family::Qwen2 => 10_000.0,
    };
    // transformers 5: everything in rope_parameters.
    let (params, field) = match f.map.get("rope_parameters") {
        Some(Value::Object(p)) => (Some(p), "rope_parameters"),
        Some(Value::Null) | None => match f.map.get("rope_scaling") {
            Some(Value::Object(p)) => (Some(p), "rope_scaling"),
            Some(Value::Null) | None => (None, "rope_scaling"),
            Some(v) => return Err(f.err("rope_scaling", format!("expected an object, found {v}"))),
        },
        Some(v) => return Err(f.err("rope_parameters", format!("expected an object, found {v}"))),
    };
    let theta_outer = f.opt_float("rope_theta")?;
    let Some(p) = params else {
        return Ok((theta_outer.unwrap_or(default_theta), RopeScaling::None));
    };
    let num = |k: &str| -> Result<Option<f64>> {
        match p.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                f.err(
                    &format!("{field}.{k}"),
                    format!("expected a number, found {v}"),
                )
            }),
        }
    };
    let need = |k: &str| -> Result<f64> {
        num(k)?.ok_or_else(|| f.err(&format!("{field}.{k}"), "missing"))
    };
    let theta = num("rope_theta")?.or(theta_outer).unwrap_or(default_theta);
    let kind = p
        .get("rope_type")
        .or_else(|| p.get("type"))
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    let scaling = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: need("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: need("factor")?,
            low_freq_factor: need("low_freq_factor")?,
            high_freq_factor: need("high_freq_factor")?,
            original_max_position_embeddings: need("original_max_position_embeddings")?,
        },
        other => {
            return Err(f.err(
                &format!("{field}.rope_type"),
                format!("rotary scaling '{other}' is not built (default, linear, llama3)"),
            ))
        }
    };
    Ok((theta, scaling))
}

/// `<dir>/generation_config.json`, if any: the EOS ids it adds and the
/// sampling defaults it carries.
#[derive(Debug, Clone, Default)]
pub struct GenerationDefaults {
    pub eos_token_ids: Vec<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub do_sample: Option<bool>,
}

impl GenerationDefaults {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path: PathBuf = dir.join("generation_config.json");
        if !path.exists() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: path.clone(),
            message: format!("invalid json: {e}"),
        })?;
        let eos = match v.get("eos_token_id") {
            Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_i64()).collect(),
            Some(x) => x.as_i64().into_iter().collect(),
            None => vec![],
        };
        Ok(GenerationDefaults {
            eos_token_ids: eos,
            temperature: v.get("temperature").and_then(|x| x.as_f64()),
            top_p: v.get("top_p").and_then(|x| x.as_f64()),
            top_k: v.get("top_k").and_then(|x| x.as_i64()),
            do_sample: v.get("do_sample").and_then(|x| x.as_bool()),
        })
    }
}
