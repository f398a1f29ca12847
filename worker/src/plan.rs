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
    /// What a user should know before spending compute (nothing here stops
    /// the job): e.g. a compression beyond what `docs/quality.md` measured.
    pub warnings: Vec<String>,
}

/// The student sizes (kept fraction of the teacher's parameters) that the
/// quality studies of `docs/quality.md` measured, with where.
pub const STUDIED_KEPT: &[(f64, &str)] = &[
    (0.766, "the L3-H384 sentiment quick start"),
    (
        0.101,
        "compression_ratio = 0.9 on the sentiment quick start (section \"Compression\")",
    ),
];

/// A warning when a student keeping `kept` of its teacher's parameters is
/// smaller than any size `docs/quality.md` measured.
pub fn compression_warning(kept: f64) -> Option<String> {
    let (least, where_) = STUDIED_KEPT
        .iter()
        .copied()
        .fold((f64::INFINITY, ""), |a, b| if b.0 < a.0 { b } else { a });
    (kept < least - 0.01).then(|| {
        format!(
            "the student keeps {:.1}% of the teacher's parameters; the smallest student measured in docs/quality.md keeps {:.1}% ({where_}). Below that, distillation's gain is unmeasured: run with --baseline and read the report's quality check",
            100.0 * kept,
            100.0 * least
        )
    })
}

/// `Some(v)`, or `None` with the error added to `problems`.
fn keep<T>(problems: &mut Vec<String>, r: Result<T>) -> Option<T> {
    r.map_err(|e| problems.push(e.to_string())).ok()
}

/// Checks everything about `spec`'s files that can be checked without
/// training — the teacher's config, weights and tokenizer (against its
/// embeddings), the student's shape and layer map, every data file, its
/// fields and labels, and the quantization candidates against the
/// student — and returns the plan, or one error listing every problem.
pub fn plan(spec: &JobSpec) -> Result<Plan> {
    let mut problems = vec![];
    let p = &mut problems;
    keep(p, crate::pipeline::check_supported(spec));
    let dir = Path::new(&spec.teacher.path);
    let cfg = keep(p, BertConfig::from_dir(dir));
    let tok = cfg.as_ref().and_then(|cfg| {
        let files = keep(p, weights::weight_files(dir))?;
        // Parse the weight headers (catches corrupt or truncated files).
        let tensors = keep(p, weights::read_tensors(&files))?;
        let emb_rows = tensors
            .iter()
            .find(|(n, _)| n.ends_with("word_embeddings.weight"))
            .map(|(_, t)| t.size()[0]);
        if let Some(rows) = emb_rows.filter(|&r| r != cfg.vocab_size) {
            p.push(
                Error::Weights {
                    path: files[0].clone(),
                    message: format!(
                        "word embeddings have {rows} rows but config.json vocab_size is {}",
                        cfg.vocab_size
                    ),
                }
                .to_string(),
            );
        }
        keep(
            p,
            TextTokenizer::load(dir, cfg, spec.data.max_length as usize),
        )
    });
    let shape = StudentShape::from(&spec.student.size);
    let s = cfg
        .as_ref()
        .and_then(|cfg| keep(p, derive_config(cfg, &shape)));
    if let (Some(cfg), Some(s)) = (&cfg, &s) {
        let explicit = match (&spec.student.layer_map, &spec.distill.layer_map) {
            (Some(m), _) => Some(("student.layer_map", m)),
            (None, distill_spec::LayerMap::Explicit(m)) => Some(("distill.layer_map", m)),
            _ => None,
        };
        if let Some((field, m)) = explicit {
            if m.len() as i64 != s.num_hidden_layers {
                p.push(format!(
                    "{field}: {} entries for a student of {} layers",
                    m.len(),
                    s.num_hidden_layers
                ));
            }
            for (i, &l) in m.iter().enumerate() {
                if l as i64 >= cfg.num_hidden_layers {
                    p.push(format!(
                        "{field}[{i}]: teacher layer {l} does not exist (the teacher at {} has layers 0..{})",
                        dir.display(),
                        cfg.num_hidden_layers - 1
                    ));
                }
            }
        }
    }
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
        let Some(path) = path else { continue };
        let Some(ex) = keep(
            p,
            read_examples(Path::new(path), &fields).map_err(Error::from),
        )
        .or_else(|| {
            // Name the spec field beside the file's own error.
            if let Some(last) = p.last_mut() {
                *last = format!("data.{name}: {last}");
            }
            None
        }) else {
            continue;
        };
        if name == "train" || name == "unlabelled" {
            n_train += ex.len();
        }
        // Labels outside the declared set (the first few lines of each file).
        let labels = spec.data.labels.as_deref().unwrap_or_default();
        if name != "unlabelled" && !labels.is_empty() {
            let bad: Vec<String> = ex
                .iter()
                .filter_map(|e| {
                    let l = e.label.as_ref()?;
                    (!labels.contains(l)).then(|| format!("line {}: '{l}'", e.line))
                })
                .collect();
            if !bad.is_empty() {
                p.push(format!(
                    "data.{name}: {path}: {} example(s) with a label outside data.labels {labels:?} ({}{})",
                    bad.len(),
                    bad.iter().take(3).cloned().collect::<Vec<_>>().join(", "),
                    if bad.len() > 3 { ", …" } else { "" }
                ));
            }
        }
        counts.insert(name.into(), ex.len().into());
    }
    // `[data.augment]`: the copies follow train and unlabelled in the
    // training order, so a job measured in epochs trains on them too (the
    // confidence filter, decided at run time, can only drop some).
    let n_order = spec.data.with_augmented(n_train as u64) as usize;
    if n_order > n_train {
        counts.insert("augmented".into(), (n_order - n_train).into());
    }
    // Under `per_batch` the copies ride along in every batch instead.
    let rows = crate::pipeline::order_rows(spec, n_order, n_order - n_train);
    let steps = crate::pipeline::total_steps(spec, rows);
    let schemes = crate::quant::Scheme::from_spec(&spec.quantization);
    // An explicit int4 needs a group size that divides every quantized
    // layer's inputs (hidden and intermediate sizes); "auto" skips it.
    if let (true, Some(s)) = (
        spec.quantization.formats != distill_spec::QuantFormats::Auto,
        &s,
    ) {
        for sch in &schemes {
            if let crate::quant::Scheme::Int4 { group_size } = sch {
                for (what, k) in [
                    ("hidden_size", s.hidden_size),
                    ("intermediate_size", s.intermediate_size),
                ] {
                    if k % group_size != 0 {
                        p.push(format!(
                            "quantization.group_size: {group_size} does not divide the student's {what} {k}; int4 needs it to"
                        ));
                    }
                }
            }
        }
    }
    let (Some(cfg), Some(tok), Some(s), true) = (cfg, tok, s, problems.is_empty()) else {
        let n = problems.len();
        return Err(Error::Invalid(format!(
            "{n} problem{} found:\n  - {}",
            if n == 1 { "" } else { "s" },
            problems.join("\n  - ")
        )));
    };
    let kept = s.encoder_params() as f64 / cfg.encoder_params() as f64;
    let mut warnings: Vec<String> = compression_warning(kept).into_iter().collect();
    let auto_features: Vec<&str> = [
        ("attention", &spec.distill.attention),
        ("hidden", &spec.distill.hidden),
    ]
    .into_iter()
    .filter(|(_, w)| matches!(w, distill_spec::Weight::Auto))
    .map(|(n, _)| n)
    .collect();
    if s.hidden_size < cfg.hidden_size && !auto_features.is_empty() {
        warnings.push(format!(
            "distill.{}: \"auto\" is off for a student narrower than its teacher (hidden {} < {}): at that width these terms drove the student to chance in docs/quality.md (\"Compression\"); set a number to keep them",
            auto_features.join(", distill."),
            s.hidden_size,
            cfg.hidden_size
        ));
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
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_student_smaller_than_any_study_is_warned_about() {
        assert!(compression_warning(0.77).is_none());
        assert!(compression_warning(0.10).is_none());
        let w = compression_warning(0.05).expect("5 % is beyond the studies");
        assert!(w.contains("5.0%") && w.contains("10.1%"), "{w}");
    }
}
