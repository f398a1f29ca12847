//! Deriving a student from a teacher: its config (preset, explicit shape or
//! compression ratio) and its initialisation from the teacher's weights.
//!
//! ## Shapes
//! - preset `L<layers>-H<hidden>` (e.g. `L4-H312`, `L3-H384`): heads keep
//!   the teacher's head count when it divides the hidden size, else
//!   `hidden / 64`; the intermediate size keeps the teacher's
//!   intermediate/hidden ratio.
//! - `compression_ratio = r`: the fraction of teacher parameters removed. We
//!   search every (layers ≤ teacher layers, hidden = k · teacher head size);
//!   among shapes whose parameter count is within 2.5% (of the teacher's
//!   count) of `(1 − r) · teacher`, the deepest wins, then the closest; if
//!   none is that close, the closest.
//!
//! ## Initialisation from the teacher
//! Student layer `i` copies teacher layer `layer_map[i]` (uniform by default:
//! `⌈(i+1)·Lt/Ls⌉ − 1`, so 3 of 6 takes layers 1, 3, 5). Embeddings, pooler
//! and classifier are copied too. Where the hidden (or intermediate) size is
//! smaller than the teacher's, every tensor is cut to its leading slice along
//! each dimension: with the teacher's head size kept, this keeps the first
//! `k` attention heads whole and the first neurons of each feed-forward block.

use super::{BertConfig, TaskModel};
use crate::{Error, Result};
use tch::Tensor;

/// How the student's shape is chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum StudentShape {
    Preset(String),
    Explicit {
        layers: i64,
        hidden: i64,
        heads: i64,
        intermediate: i64,
    },
    CompressionRatio(f64),
}

impl From<&distill_spec::StudentSize> for StudentShape {
    /// The job spec resolves presets to explicit sizes; a ratio stays a ratio
    /// (it needs the teacher's config).
    fn from(s: &distill_spec::StudentSize) -> Self {
        match s {
            distill_spec::StudentSize::Explicit(a) => StudentShape::Explicit {
                layers: a.layers as i64,
                hidden: a.hidden_size as i64,
                heads: a.num_heads as i64,
                intermediate: a.intermediate_size as i64,
            },
            distill_spec::StudentSize::Ratio { compression_ratio } => {
                StudentShape::CompressionRatio(*compression_ratio)
            }
        }
    }
}

/// Parse `L<layers>-H<hidden>`.
pub fn parse_preset(s: &str) -> Result<(i64, i64)> {
    let bad = || {
        Error::Invalid(format!(
            "student preset '{s}': expected L<layers>-H<hidden>, e.g. L4-H312"
        ))
    };
    let (l, h) = s.split_once('-').ok_or_else(bad)?;
    let l = l
        .strip_prefix(['L', 'l'])
        .and_then(|x| x.parse().ok())
        .ok_or_else(bad)?;
    let h = h
        .strip_prefix(['H', 'h'])
        .and_then(|x| x.parse().ok())
        .ok_or_else(bad)?;
    if l < 1 || h < 1 {
        return Err(bad());
    }
    Ok((l, h))
}

fn shaped(
    teacher: &BertConfig,
    layers: i64,
    hidden: i64,
    heads: i64,
    intermediate: i64,
) -> BertConfig {
    BertConfig {
        num_hidden_layers: layers,
        hidden_size: hidden,
        num_attention_heads: heads,
        intermediate_size: intermediate,
        architectures: None,
        ..teacher.clone()
    }
}

fn default_heads(teacher: &BertConfig, hidden: i64) -> i64 {
    if hidden % teacher.num_attention_heads == 0 {
        teacher.num_attention_heads
    } else if hidden % 64 == 0 {
        hidden / 64
    } else {
        1
    }
}

fn ratio_intermediate(teacher: &BertConfig, hidden: i64) -> i64 {
    (hidden * teacher.intermediate_size + teacher.hidden_size / 2) / teacher.hidden_size
}

/// The student's config.
pub fn derive_config(teacher: &BertConfig, shape: &StudentShape) -> Result<BertConfig> {
    let cfg = match shape {
        StudentShape::Preset(p) => {
            let (l, h) = parse_preset(p)?;
            shaped(
                teacher,
                l,
                h,
                default_heads(teacher, h),
                ratio_intermediate(teacher, h),
            )
        }
        StudentShape::Explicit {
            layers,
            hidden,
            heads,
            intermediate,
        } => shaped(teacher, *layers, *hidden, *heads, *intermediate),
        StudentShape::CompressionRatio(r) => {
            if !(*r > 0.0 && *r < 1.0) {
                return Err(Error::Invalid(format!(
                    "compression_ratio must be in (0, 1), got {r}"
                )));
            }
            let total = teacher.encoder_params() as f64;
            let target = (1.0 - r) * total;
            let hd = teacher.head_dim();
            let mut candidates = vec![];
            for k in 1..=teacher.num_attention_heads {
                let h = k * hd;
                for l in 1..=teacher.num_hidden_layers {
                    let c = shaped(teacher, l, h, k, ratio_intermediate(teacher, h));
                    candidates.push(((c.encoder_params() as f64 - target).abs(), c));
                }
            }
            // Within 2.5% of the teacher's size of the target, depth wins
            // (deeper students keep more of the teacher's layer structure);
            // otherwise the closest count.
            let near: Vec<&(f64, BertConfig)> = candidates
                .iter()
                .filter(|(e, _)| *e <= 0.025 * total)
                .collect();
            let pick = if near.is_empty() {
                candidates.iter().min_by(|a, b| a.0.total_cmp(&b.0))
            } else {
                near.into_iter().min_by(|a, b| {
                    b.1.num_hidden_layers
                        .cmp(&a.1.num_hidden_layers)
                        .then(a.0.total_cmp(&b.0))
                })
            };
            let best: Option<(f64, BertConfig)> = pick.cloned();
            best.expect("at least one candidate").1
        }
    };
    cfg.validate()
        .map_err(|m| Error::Invalid(format!("derived student config: {m}")))?;
    if cfg.num_hidden_layers > teacher.num_hidden_layers || cfg.hidden_size > teacher.hidden_size {
        return Err(Error::Invalid(format!(
            "student L{}-H{} is larger than its teacher L{}-H{}",
            cfg.num_hidden_layers, cfg.hidden_size, teacher.num_hidden_layers, teacher.hidden_size
        )));
    }
    Ok(cfg)
}

/// Uniform layer map: student layer `i` ← teacher layer `⌈(i+1)·Lt/Ls⌉ − 1`.
pub fn uniform_layer_map(teacher_layers: i64, student_layers: i64) -> Vec<i64> {
    (0..student_layers)
        .map(|i| ((i + 1) * teacher_layers + student_layers - 1) / student_layers - 1)
        .collect()
}

/// The last `Ls` teacher layers.
pub fn last_layer_map(teacher_layers: i64, student_layers: i64) -> Vec<i64> {
    (teacher_layers - student_layers..teacher_layers).collect()
}

/// Copy (a leading slice of) the teacher's weights into the student.
pub fn init_from_teacher(
    student: &mut TaskModel,
    teacher: &TaskModel,
    layer_map: &[i64],
) -> Result<()> {
    let ls = student.config().num_hidden_layers;
    if layer_map.len() as i64 != ls {
        return Err(Error::Invalid(format!(
            "layer map has {} entries for {ls} student layers",
            layer_map.len()
        )));
    }
    let lt = teacher.config().num_hidden_layers;
    if let Some(bad) = layer_map.iter().find(|&&t| t < 0 || t >= lt) {
        return Err(Error::Invalid(format!(
            "layer map entry {bad} is outside the teacher's {lt} layers"
        )));
    }
    let teacher_vars = teacher.vs.variables();
    let mut student_vars = student.vs.variables();
    tch::no_grad(|| {
        for (name, var) in student_vars.iter_mut() {
            let source = map_layer_name(name, layer_map);
            let Some(src) = teacher_vars.get(&source) else {
                continue;
            };
            if src.dim() != var.dim() {
                continue;
            }
            let mut s: Tensor = src.shallow_clone();
            for (d, &n) in var.size().iter().enumerate() {
                if s.size()[d] < n {
                    s = Tensor::new(); // the student is wider here: keep its init
                    break;
                }
                s = s.narrow(d as i64, 0, n);
            }
            if s.defined() {
                var.copy_(&s.to_device(var.device()));
            }
        }
    });
    Ok(())
}

/// `encoder.layer.{i}.rest` → `encoder.layer.{map[i]}.rest`.
fn map_layer_name(name: &str, layer_map: &[i64]) -> String {
    if let Some(rest) = name.strip_prefix("encoder.layer.") {
        if let Some((idx, tail)) = rest.split_once('.') {
            if let Ok(i) = idx.parse::<usize>() {
                return format!("encoder.layer.{}.{tail}", layer_map[i]);
            }
        }
    }
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minilm() -> BertConfig {
        serde_json::from_str(
            r#"{"vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6,
                "num_attention_heads": 12, "intermediate_size": 1536}"#,
        )
        .unwrap()
    }

    #[test]
    fn presets() {
        let c = derive_config(&minilm(), &StudentShape::Preset("L4-H312".into())).unwrap();
        assert_eq!(
            (
                c.num_hidden_layers,
                c.hidden_size,
                c.num_attention_heads,
                c.intermediate_size
            ),
            (4, 312, 12, 1248)
        );
        let c = derive_config(&minilm(), &StudentShape::Preset("L3-H384".into())).unwrap();
        assert_eq!((c.num_hidden_layers, c.hidden_size), (3, 384));
        assert!(derive_config(&minilm(), &StudentShape::Preset("L12-H384".into())).is_err());
        assert!(parse_preset("4x312").is_err());
    }

    #[test]
    fn compression_ratio_lands_near_target() {
        let t = minilm();
        for r in [0.3, 0.5, 0.7] {
            let c = derive_config(&t, &StudentShape::CompressionRatio(r)).unwrap();
            let kept = c.encoder_params() as f64 / t.encoder_params() as f64;
            assert!((kept - (1.0 - r)).abs() < 0.05, "r={r}: kept {kept}");
        }
        assert!(derive_config(&t, &StudentShape::CompressionRatio(1.5)).is_err());
    }

    #[test]
    fn layer_maps() {
        assert_eq!(uniform_layer_map(6, 3), vec![1, 3, 5]);
        assert_eq!(uniform_layer_map(6, 4), vec![1, 2, 4, 5]);
        assert_eq!(uniform_layer_map(6, 6), vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(last_layer_map(6, 2), vec![4, 5]);
        assert_eq!(
            map_layer_name("encoder.layer.2.output.dense.weight", &[1, 3, 5]),
            "encoder.layer.5.output.dense.weight"
        );
    }
}
