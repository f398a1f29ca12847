//! Decoder students derived from a decoder teacher, by depth (keep N of L
//! layers) and by width (key/value groups, with their query heads, the
//! hidden size and the MLP's intermediate size), initialised from the
//! teacher's leading slices.
//!
//! The compression ratio is the fraction of the teacher's parameters
//! removed (0.9: a student with 10 % of them), as for encoders. A ratio is
//! met by trying each width the attention layout allows (`k` of the
//! teacher's key/value heads, each with its group of query heads; the
//! hidden size and the MLP scaled alike; the head dimension kept) and, for
//! each, the number of layers whose count of parameters comes closest to the
//! target; the widest shape within 5 % of the target wins (Minitron's
//! finding: width pruning keeps more than depth pruning at the same size),
//! else the closest. Embeddings count: for a small model with a large
//! vocabulary they are most of what a strong ratio must remove, which only
//! a narrower hidden size can do.

use super::{DecoderConfig, DecoderModel};
use crate::{Error, Result};
use tch::{Kind, Tensor};

/// Which teacher layers the student's layers start from.
#[derive(Debug, Clone, PartialEq)]
pub enum LayerChoice {
    /// Evenly spaced, ending at the teacher's last layer.
    Uniform,
    /// The first and the last layers, the rest evenly spaced between.
    FirstAndLast,
    /// Explicit teacher layer indices, in order.
    List(Vec<i64>),
}

impl std::str::FromStr for LayerChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "uniform" => Ok(LayerChoice::Uniform),
            "first-and-last" | "first_and_last" => Ok(LayerChoice::FirstAndLast),
            list => list
                .split(',')
                .map(|x| x.trim().parse::<i64>())
                .collect::<std::result::Result<Vec<_>, _>>()
                .map(LayerChoice::List)
                .map_err(|_| {
                    Error::Invalid(format!(
                        "layer map '{list}': expected uniform, first-and-last or a list like 0,4,8"
                    ))
                }),
        }
    }
}

/// The shape asked for.
#[derive(Debug, Clone, PartialEq)]
pub enum DecoderShape {
    /// Fraction of the teacher's parameters to remove, 0.1 to 0.95.
    CompressionRatio(f64),
    /// `layers` layers of `hidden` width (a multiple of the head dimension
    /// times the query heads per key/value head).
    Sized { layers: i64, hidden: i64 },
}

/// The teacher's config at `kv` key/value heads and `layers` layers.
fn shaped(t: &DecoderConfig, kv: i64, layers: i64) -> DecoderConfig {
    let group = t.num_attention_heads / t.num_key_value_heads;
    let heads = kv * group;
    let mut c = t.clone();
    c.num_key_value_heads = kv;
    c.num_attention_heads = heads;
    c.hidden_size = if kv == t.num_key_value_heads {
        t.hidden_size
    } else {
        (t.hidden_size * kv / t.num_key_value_heads).max(1)
    };
    c.intermediate_size = if kv == t.num_key_value_heads {
        t.intermediate_size
    } else {
        // Scaled with the hidden size, rounded to a multiple of 32.
        (((t.intermediate_size * kv / t.num_key_value_heads) as f64 / 32.0).round() as i64 * 32)
            .max(32)
    };
    c.num_hidden_layers = layers;
    c
}

/// The student's config for `shape`.
pub fn derive_config(teacher: &DecoderConfig, shape: &DecoderShape) -> Result<DecoderConfig> {
    let t = teacher;
    let cfg = match shape {
        DecoderShape::CompressionRatio(r) => {
            if !(0.1..=0.95).contains(r) {
                return Err(Error::Invalid(format!(
                    "compression_ratio {r}: expected 0.1 to 0.95 (the fraction of the teacher's parameters removed)"
                )));
            }
            let target = (1.0 - r) * t.params() as f64;
            let mut best: Option<(f64, DecoderConfig)> = None;
            let mut chosen = None;
            for kv in (1..=t.num_key_value_heads).rev() {
                let (err, c) = (1..=t.num_hidden_layers)
                    .map(|l| {
                        let c = shaped(t, kv, l);
                        ((c.params() as f64 - target).abs() / target, c)
                    })
                    .min_by(|a, b| a.0.total_cmp(&b.0))
                    .unwrap();
                if err <= 0.05 {
                    chosen = Some(c);
                    break;
                }
                if best.as_ref().is_none_or(|b| err < b.0) {
                    best = Some((err, c));
                }
            }
            chosen.unwrap_or_else(|| best.unwrap().1)
        }
        DecoderShape::Sized { layers, hidden } => {
            let group = t.num_attention_heads / t.num_key_value_heads;
            let unit = t.hidden_size / t.num_key_value_heads;
            if *hidden <= 0 || hidden % unit != 0 || *hidden > t.hidden_size {
                return Err(Error::Invalid(format!(
                    "student hidden size {hidden}: must be a multiple of {unit} (one key/value head with its {group} query heads) up to the teacher's {}",
                    t.hidden_size
                )));
            }
            if *layers < 1 || *layers > t.num_hidden_layers {
                return Err(Error::Invalid(format!(
                    "student layers {layers}: must be 1 to the teacher's {}",
                    t.num_hidden_layers
                )));
            }
            shaped(t, hidden / unit, *layers)
        }
    };
    cfg.validate().map_err(Error::Invalid)?;
    Ok(cfg)
}

/// The teacher layers the student's layers start from.
pub fn layer_map(
    choice: &LayerChoice,
    teacher_layers: i64,
    student_layers: i64,
) -> Result<Vec<i64>> {
    let map = match choice {
        LayerChoice::Uniform => {
            crate::model::student::uniform_layer_map(teacher_layers, student_layers)
        }
        LayerChoice::FirstAndLast if student_layers == 1 => vec![teacher_layers - 1],
        LayerChoice::FirstAndLast => (0..student_layers)
            .map(|i| {
                (i as f64 * (teacher_layers - 1) as f64 / (student_layers - 1) as f64).round()
                    as i64
            })
            .collect(),
        LayerChoice::List(v) => v.clone(),
    };
    if map.len() as i64 != student_layers {
        return Err(Error::Invalid(format!(
            "layer map {map:?}: {} entries for a {student_layers}-layer student",
            map.len()
        )));
    }
    if let Some(bad) = map.iter().find(|&&l| l < 0 || l >= teacher_layers) {
        return Err(Error::Invalid(format!(
            "layer map {map:?}: teacher layer {bad} does not exist (0..{})",
            teacher_layers - 1
        )));
    }
    Ok(map)
}

/// A student with `cfg`'s shape, every weight a leading slice of the
/// teacher's (layer `i` from teacher layer `map[i]`).
pub fn init_from_teacher(
    student: &mut DecoderModel,
    teacher: &DecoderModel,
    map: &[i64],
) -> Result<()> {
    let tv = teacher.vs.variables();
    let mut sv = student.vs.variables();
    let mut names: Vec<String> = sv.keys().cloned().collect();
    names.sort();
    tch::no_grad(|| -> Result<()> {
        for name in names {
            let src_name = match name.strip_prefix("layers.") {
                Some(rest) => {
                    let (i, tail) = rest.split_once('.').unwrap();
                    let i: usize = i.parse().unwrap();
                    format!("layers.{}.{tail}", map[i])
                }
                None => name.clone(),
            };
            let src = tv.get(&src_name).ok_or_else(|| {
                Error::Invalid(format!(
                    "teacher has no {src_name} for the student's {name}"
                ))
            })?;
            let dst = sv.get_mut(&name).unwrap();
            let mut s = src.shallow_clone();
            for (d, &n) in dst.size().iter().enumerate() {
                s = s.narrow(d as i64, 0, n);
            }
            dst.copy_(&s.to_kind(dst.kind()));
        }
        Ok(())
    })
}

/// Bytes the student needs: weights at `kind`, and for training with AdamW
/// in fp32 (weights, gradients, two moments; activations not included).
pub fn memory_bytes(cfg: &DecoderConfig, kind: Kind) -> (i64, i64) {
    let p = cfg.params();
    (p * kind.elt_size_in_bytes() as i64, p * 16)
}

/// The student exported: weights (sorted, checkpoint names), its config,
/// and the teacher's tokenizer, chat template and generation config.
pub fn export(
    model: &DecoderModel,
    teacher_dir: &std::path::Path,
    out: &std::path::Path,
) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let tensors: Vec<(String, Tensor)> = model.named_tensors();
    crate::model::weights::write_safetensors(&out.join("model.safetensors"), &tensors)?;
    let mut cfg = model.config.clone();
    cfg.dtype = Some(
        match model.kind() {
            Kind::BFloat16 => "bfloat16",
            Kind::Half => "float16",
            _ => "float32",
        }
        .into(),
    );
    let text = serde_json::to_string_pretty(&cfg.to_json()).unwrap() + "\n";
    crate::fsutil::write_atomic(&out.join("config.json"), text.as_bytes())?;
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "chat_template.jinja",
        "special_tokens_map.json",
    ] {
        let src = teacher_dir.join(f);
        if src.exists() {
            let bytes = std::fs::read(&src).map_err(|e| Error::io(&src, e))?;
            crate::fsutil::write_atomic(&out.join(f), &bytes)?;
        }
    }
    Ok(())
}
