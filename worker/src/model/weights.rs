//! Reading and writing Hugging Face safetensors weights.
//!
//! Loading validates before it touches the model: the file must parse as
//! safetensors (a truncated or corrupt file is an error naming the file), and
//! the set of tensors must match the model's variables exactly, modulo the
//! usual name prefixes (`bert.`, `ernie.`, none) and known buffers
//! (`position_ids`). Missing, unexpected and mis-shaped tensors are all
//! reported by name in one error.

use crate::{Error, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tch::{nn::VarStore, Kind, Tensor};

/// Buffers that checkpoints may carry and that are not parameters.
const IGNORED_SUFFIXES: &[&str] = &["position_ids", "token_type_ids"];
const PREFIXES: &[&str] = &["bert.", "ernie.", "model."];

/// The weight files of a model directory: `model.safetensors`, or the shards
/// listed in `model.safetensors.index.json`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Weights {
            path: index.clone(),
            message: format!("invalid index json: {e}"),
        })?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::Weights {
                path: index.clone(),
                message: "field weight_map: missing or not an object".into(),
            })?;
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(|f| f.as_str())
            .map(|f| dir.join(f))
            .collect();
        files.sort();
        files.dedup();
        return Ok(files);
    }
    Err(Error::Weights {
        path: single,
        message: "no model.safetensors or model.safetensors.index.json in the model directory"
            .into(),
    })
}

/// Read every tensor of the given safetensors files, as float32 on the CPU.
pub fn read_tensors(files: &[PathBuf]) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    for path in files {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        out.extend(tensors_from_bytes(path, &bytes)?);
    }
    Ok(out)
}

/// The tensors of safetensors `bytes` (floating point as float32); `path`
/// names them in errors.
pub fn tensors_from_bytes(path: &Path, bytes: &[u8]) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    {
        let path = path.to_path_buf();
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| Error::Weights {
            path: path.clone(),
            message: format!("not a valid safetensors file (corrupt or truncated?): {e:?}"),
        })?;
        for (name, view) in st.tensors() {
            let kind = match view.dtype() {
                safetensors::Dtype::F32 => Kind::Float,
                safetensors::Dtype::F16 => Kind::Half,
                safetensors::Dtype::BF16 => Kind::BFloat16,
                safetensors::Dtype::F64 => Kind::Double,
                safetensors::Dtype::I64 => Kind::Int64,
                safetensors::Dtype::I32 => Kind::Int,
                safetensors::Dtype::I8 => Kind::Int8,
                safetensors::Dtype::U8 => Kind::Uint8,
                other => {
                    return Err(Error::Weights {
                        path: path.clone(),
                        message: format!("tensor {name}: unsupported dtype {other:?}"),
                    })
                }
            };
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            let t = Tensor::f_from_data_size(view.data(), &shape, kind)?;
            let t = if t.is_floating_point() {
                t.to_kind(Kind::Float)
            } else {
                t
            };
            out.insert(name, t);
        }
    }
    Ok(out)
}

/// Strip a known model prefix, so `bert.encoder.layer.0...` and
/// `encoder.layer.0...` name the same variable.
fn canonical(name: &str, head_names: &[&str]) -> String {
    if head_names.iter().any(|h| name.starts_with(h)) {
        return name.to_string();
    }
    for p in PREFIXES {
        if let Some(rest) = name.strip_prefix(p) {
            return rest.to_string();
        }
    }
    name.to_string()
}

/// What a load did not match.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub missing: Vec<String>,
    pub unexpected: Vec<String>,
    pub mismatched: Vec<String>,
}

impl LoadReport {
    fn is_clean(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.mismatched.is_empty()
    }
}

/// Copy `tensors` into the variables of `vs`. `head_names` are top-level
/// names (like `classifier.`) that are never prefix-stripped. Variables listed
/// in `optional` may be absent (they keep their initialisation; e.g. a task
/// head that the teacher checkpoint does not have yet).
pub fn load_into(
    vs: &mut VarStore,
    tensors: &BTreeMap<String, Tensor>,
    head_names: &[&str],
    optional: &[&str],
    origin: &Path,
) -> Result<LoadReport> {
    let canon: HashMap<String, &Tensor> = tensors
        .iter()
        .filter(|(n, _)| !IGNORED_SUFFIXES.iter().any(|s| n.ends_with(s)))
        .map(|(n, t)| (canonical(n, head_names), t))
        .collect();
    let mut report = LoadReport::default();
    let mut vars = vs.variables();
    let mut names: Vec<String> = vars.keys().cloned().collect();
    names.sort();
    tch::no_grad(|| {
        for name in &names {
            let var = vars.get_mut(name).unwrap();
            match canon.get(name) {
                None if optional.iter().any(|o| name.starts_with(o)) => {}
                None => report.missing.push(name.clone()),
                Some(src) if src.size() != var.size() => report.mismatched.push(format!(
                    "{name} (checkpoint {:?}, model {:?})",
                    src.size(),
                    var.size()
                )),
                Some(src) => var.copy_(src),
            }
        }
    });
    // A checkpoint tensor is unexpected only if it matches no variable and is
    // not a head the model chose not to build: a pooler, a classifier, or
    // the pre-training heads (`cls.`: masked-LM and next-sentence) that
    // BERT checkpoints such as bert-base-uncased carry, which transformers
    // also drops when it loads them for a task.
    let known: std::collections::HashSet<&String> = names.iter().collect();
    for n in canon.keys() {
        if !known.contains(n)
            && !n.starts_with("pooler.")
            && !n.starts_with("classifier.")
            && !n.starts_with("cls.")
        {
            report.unexpected.push(n.clone());
        }
    }
    report.unexpected.sort();
    if !report.is_clean() {
        let mut parts = vec![];
        let show = |v: &Vec<String>| {
            let head: Vec<_> = v.iter().take(8).cloned().collect();
            let more = if v.len() > 8 {
                format!(" and {} more", v.len() - 8)
            } else {
                String::new()
            };
            format!("{}{}", head.join(", "), more)
        };
        if !report.missing.is_empty() {
            parts.push(format!("missing tensors: {}", show(&report.missing)));
        }
        if !report.mismatched.is_empty() {
            parts.push(format!("mis-shaped tensors: {}", show(&report.mismatched)));
        }
        if !report.unexpected.is_empty() {
            parts.push(format!("unexpected tensors: {}", show(&report.unexpected)));
        }
        return Err(Error::Weights {
            path: origin.to_path_buf(),
            message: parts.join("; "),
        });
    }
    Ok(report)
}

/// Write tensors as a safetensors file with `{"format": "pt"}` metadata
/// (what transformers expects), atomically: temp file, fsync, rename.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let bytes = safetensors_bytes(tensors)
        .map_err(|e| Error::Invalid(format!("serialising {}: {e}", path.display())))?;
    crate::fsutil::write_atomic(path, &bytes)
}

/// `tensors` as the bytes of a safetensors file (`format: pt`).
pub fn safetensors_bytes(tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
    let mut buffers = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.to_device(tch::Device::Cpu).contiguous();
        let dtype = match t.kind() {
            Kind::Float => safetensors::Dtype::F32,
            Kind::Half => safetensors::Dtype::F16,
            Kind::BFloat16 => safetensors::Dtype::BF16,
            Kind::Int64 => safetensors::Dtype::I64,
            Kind::Int => safetensors::Dtype::I32,
            Kind::Int8 => safetensors::Dtype::I8,
            Kind::Uint8 => safetensors::Dtype::U8,
            k => {
                return Err(Error::Invalid(format!(
                    "tensor {name}: cannot write kind {k:?}"
                )))
            }
        };
        let numel = t.numel();
        let mut data = vec![0u8; numel * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut data, numel)?;
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        buffers.push((name.clone(), dtype, shape, data));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = buffers
        .iter()
        .map(|(n, d, s, b)| {
            Ok((
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b)?,
            ))
        })
        .collect::<std::result::Result<_, safetensors::SafeTensorError>>()
        .map_err(|e| Error::Invalid(format!("building safetensors views: {e:?}")))?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::tensor::serialize(views, &Some(meta))
        .map_err(|e| Error::Invalid(format!("safetensors: {e:?}")))
}
