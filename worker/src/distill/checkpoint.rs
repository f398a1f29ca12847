//! Checkpoints on local disk: write, verify, then publish.
//!
//! `ckpt-<step>/state.safetensors` holds every tensor (student, projections,
//! AdamW moments); `ckpt-<step>/meta.json` holds the step, AdamW's update
//! count, the balancer state, the best metric and the sha256 of the state
//! file. The directory is written under a temporary name and renamed; only
//! then is `LATEST` (one line: the directory name) atomically replaced. A
//! crash at any point leaves the previous checkpoint published and intact.
//! Loading verifies the checksum. The two newest checkpoints are kept.

use super::schedule::Balancer;
use crate::fsutil::write_atomic;
use crate::model::weights::{read_tensors, write_safetensors};
use crate::model::TaskModel;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::Tensor;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub step: u64,
    pub adam_t: u64,
    pub balancer: Balancer,
    pub best_metric: Option<f64>,
    /// Step whose weights are the best so far (`best-<step>.safetensors`).
    #[serde(default)]
    pub best_step: Option<u64>,
    pub sha256: String,
    /// The fingerprint of the job configuration that wrote it (see
    /// `pipeline::fingerprint`); absent in checkpoints written before it
    /// existed, which are taken as they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

pub fn save(dir: &Path, mut meta: CheckpointMeta, tensors: &[(String, Tensor)]) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let name = format!("ckpt-{:08}", meta.step);
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let state = tmp.join("state.safetensors");
    write_safetensors(&state, tensors)?;
    meta.sha256 = sha256_file(&state)?;
    write_atomic(
        &tmp.join("meta.json"),
        serde_json::to_string_pretty(&meta).unwrap().as_bytes(),
    )?;
    let final_dir = dir.join(&name);
    let _ = std::fs::remove_dir_all(&final_dir);
    std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
    write_atomic(&dir.join("LATEST"), name.as_bytes())?;
    prune(dir, &name, meta.best_step);
    Ok(final_dir)
}

fn prune(dir: &Path, latest: &str, best_step: Option<u64>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let all: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    // Best-weight files older than the committed best are no longer needed.
    if let Some(best) = best_step {
        for n in &all {
            let step = n
                .strip_prefix("best-")
                .and_then(|r| r.strip_suffix(".safetensors"))
                .and_then(|r| r.parse::<u64>().ok());
            if step.is_some_and(|s| s < best) {
                let _ = std::fs::remove_file(dir.join(n));
            }
        }
    }
    let mut names: Vec<String> = all.into_iter().filter(|n| n.starts_with("ckpt-")).collect();
    names.sort();
    let keep = names.len().saturating_sub(2);
    for n in &names[..keep] {
        if n != latest {
            let _ = std::fs::remove_dir_all(dir.join(n));
        }
    }
}

/// The latest published checkpoint, verified; `None` if nothing was published.
pub fn load_latest(dir: &Path) -> Result<Option<(CheckpointMeta, BTreeMap<String, Tensor>)>> {
    let latest = dir.join("LATEST");
    let name = match std::fs::read_to_string(&latest) {
        Ok(n) => n.trim().to_string(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(&latest, e)),
    };
    load_dir(&dir.join(&name)).map(Some)
}

/// The checkpoint in directory `ck` (a `ckpt-<step>` directory), verified.
pub fn load_dir(ck: &Path) -> Result<(CheckpointMeta, BTreeMap<String, Tensor>)> {
    let meta_path = ck.join("meta.json");
    let text = std::fs::read_to_string(&meta_path).map_err(|e| Error::io(&meta_path, e))?;
    let meta: CheckpointMeta = serde_json::from_str(&text).map_err(|e| {
        Error::Invalid(format!(
            "{}: invalid checkpoint meta: {e}",
            meta_path.display()
        ))
    })?;
    let state = ck.join("state.safetensors");
    let sum = sha256_file(&state)?;
    if sum != meta.sha256 {
        return Err(Error::Weights {
            path: state,
            message: format!("checksum mismatch (meta {}, file {sum})", meta.sha256),
        });
    }
    Ok((meta, read_tensors(&[state])?))
}

/// The best student so far (weights only), for export at the end. It is
/// named by step and only counts once a checkpoint's meta names it, so a
/// crash between the two cannot make a stale file the best.
pub fn save_best(dir: &Path, step: u64, student: &TaskModel) -> Result<()> {
    write_safetensors(&best_path(dir, step), &student.named_tensors())
}

pub fn best_path(dir: &Path, step: u64) -> PathBuf {
    dir.join(format!("best-{step:08}.safetensors"))
}
