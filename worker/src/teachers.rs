//! Fine-tuned teachers shared between jobs.
//!
//! Fine-tuning the teacher is often half of a job (11 of 21 minutes for the
//! CPU quick start), and users compare jobs that differ only in the student:
//! loss weights, temperature, a bigger student, another learning rate for the
//! student. A job that fine-tunes its teacher publishes it under
//! `<cache>/<key>/`, and a later job whose teacher would come out the same
//! takes it from there instead of fine-tuning again.
//!
//! The key is a sha256 over everything the fine-tuned weights depend on:
//! every file of the teacher directory the spec names (weights, config,
//! tokenizer), the tokenized labelled and eval examples with their labels
//! (the eval split picks the best checkpoint), the label names, the task,
//! the teacher's whole training configuration (its epochs, learning rate,
//! batch, schedule, clipping, precision, seed …), the device kind and this
//! crate's version. Not in it: the thread count (the cached teacher is the
//! one the first job made) and code changes within one version.
//!
//! An entry appears whole or not at all (written under a temporary name,
//! synced, renamed), carries the sha256 of its weights, and is checked
//! against it before use; a damaged entry is ignored (the teacher is
//! fine-tuned again) and replaced.

use crate::distill::train::TrainConfig;
use crate::fsutil::write_atomic;
use crate::signal::sha256_path;
use crate::tokenize::Encoded;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// Where a worker keeps fine-tuned teachers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum TeacherCache {
    /// `<artifact root>/teachers` (a cluster worker's default: shared by
    /// the jobs of one artifact root, like the teacher-signal shards).
    #[default]
    ArtifactRoot,
    /// A directory of its own.
    Dir(PathBuf),
    /// No sharing: every job fine-tunes its own teacher.
    Off,
}

impl TeacherCache {
    /// `off`, or a directory.
    pub fn parse(s: &str) -> Self {
        match s {
            "off" | "none" | "" => TeacherCache::Off,
            d => TeacherCache::Dir(PathBuf::from(d)),
        }
    }

    /// The directory, given the lease's artifact root.
    pub fn dir(&self, artifact_root: &Path) -> Option<PathBuf> {
        match self {
            TeacherCache::ArtifactRoot => Some(artifact_root.join("teachers")),
            TeacherCache::Dir(d) => Some(d.clone()),
            TeacherCache::Off => None,
        }
    }
}

/// What the key is computed from, besides the data.
pub struct KeyParts<'a> {
    pub teacher_dir: &'a Path,
    pub task: &'a str,
    pub labels: &'a [String],
    pub train: (&'a [Encoded], &'a [i64]),
    pub eval: Option<(&'a [Encoded], &'a [i64])>,
    pub config: &'a TrainConfig,
    pub device: tch::Device,
}

fn hash_examples(h: &mut Sha256, examples: &[Encoded], labels: &[i64]) {
    h.update((examples.len() as u64).to_le_bytes());
    for (e, l) in examples.iter().zip(labels) {
        for (i, t) in e.ids.iter().zip(&e.type_ids) {
            h.update(i.to_le_bytes());
            h.update(t.to_le_bytes());
        }
        h.update(u64::MAX.to_le_bytes());
        h.update(l.to_le_bytes());
    }
}

/// The cache key of a fine-tuned teacher (64 hex digits).
pub fn key(k: &KeyParts) -> Result<String> {
    let mut h = Sha256::new();
    h.update(b"distill fine-tuned teacher v1\0");
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    h.update(b"\0");
    h.update(if k.device.is_cuda() { "cuda" } else { "cpu" }.as_bytes());
    h.update(b"\0");
    h.update(k.task.as_bytes());
    h.update(b"\0");
    for l in k.labels {
        h.update(l.as_bytes());
        h.update(b"\0");
    }
    // Every file of the teacher directory, by name and content.
    for f in &model_files(k.teacher_dir)? {
        h.update(f.file_name().unwrap().to_string_lossy().as_bytes());
        h.update(b"\0");
        h.update(sha256_path(f)?.as_bytes());
    }
    // The training configuration, without what cannot change the weights.
    let mut c = k.config.clone();
    c.checkpoint_every = 0;
    h.update(format!("{c:?}").as_bytes());
    hash_examples(&mut h, k.train.0, k.train.1);
    match k.eval {
        Some((e, l)) => hash_examples(&mut h, e, l),
        None => h.update(b"no eval"),
    }
    Ok(hex::encode(h.finalize()))
}

/// The record an entry ends with (`.complete`).
#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    key: String,
    model_sha256: String,
    /// Where it was fine-tuned (for people reading the cache).
    from: String,
}

const MARKER: &str = ".complete";

/// The files of a model directory, without markers and temporaries.
fn model_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    v.sort();
    Ok(v)
}

/// A hard link where the file system allows, else a copy.
fn link_or_copy(from: &Path, to: &Path) -> Result<()> {
    let _ = std::fs::remove_file(to);
    if std::fs::hard_link(from, to).is_ok() {
        return Ok(());
    }
    std::fs::copy(from, to).map_err(|e| Error::io(to, e))?;
    Ok(())
}

/// The cached teacher of `key` copied into `dest` (its files; the caller
/// writes its own completion marker): `Ok(true)` when there was a sound
/// entry. A damaged one is reported and ignored.
pub fn take(cache: &Path, key: &str, dest: &Path) -> Result<bool> {
    let entry = cache.join(key);
    if !entry.join(MARKER).exists() {
        return Ok(false);
    }
    if !sound(&entry, key) {
        tracing::warn!(
            entry = %entry.display(),
            "the cached teacher is damaged (its record or its weights' sha256 do not match): fine-tuning again"
        );
        return Ok(false);
    }
    std::fs::create_dir_all(dest).map_err(|e| Error::io(dest, e))?;
    for f in model_files(&entry)? {
        link_or_copy(&f, &dest.join(f.file_name().unwrap()))?;
    }
    Ok(true)
}

/// Publishes the complete teacher in `src` as the entry of `key`:
/// `Ok(true)` when this call published it, `Ok(false)` when a sound entry
/// was there (the first publisher wins). A damaged entry is replaced.
pub fn publish(cache: &Path, key: &str, src: &Path) -> Result<bool> {
    std::fs::create_dir_all(cache).map_err(|e| Error::io(cache, e))?;
    let entry = cache.join(key);
    if sound(&entry, key) {
        return Ok(false);
    }
    let tmp = cache.join(format!(
        ".{key}.tmp-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let result = (|| {
        for f in model_files(src)? {
            link_or_copy(&f, &tmp.join(f.file_name().unwrap()))?;
        }
        let record = Entry {
            key: key.to_string(),
            model_sha256: sha256_path(&tmp.join("model.safetensors"))?,
            from: src.display().to_string(),
        };
        write_atomic(
            &tmp.join(MARKER),
            serde_json::to_string_pretty(&record).unwrap().as_bytes(),
        )?;
        if entry.exists() {
            // Damaged (checked above): set it aside, then take its place.
            let aside = cache.join(format!(".{key}.damaged-{}", std::process::id()));
            let _ = std::fs::rename(&entry, &aside);
            let _ = std::fs::remove_dir_all(&aside);
        }
        match std::fs::rename(&tmp, &entry) {
            Ok(()) => {
                if let Ok(d) = std::fs::File::open(cache) {
                    let _ = d.sync_all();
                }
                Ok(true)
            }
            // Another job published the same teacher first.
            Err(_) if entry.join(MARKER).exists() => Ok(false),
            Err(e) => Err(Error::io(&entry, e)),
        }
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

/// Whether `entry` is a sound entry of `key`: its record names the key and
/// the weights' sha256 matches it.
fn sound(entry: &Path, key: &str) -> bool {
    std::fs::read_to_string(entry.join(MARKER))
        .ok()
        .and_then(|t| serde_json::from_str::<Entry>(&t).ok())
        .is_some_and(|e| {
            e.key == key
                && sha256_path(&entry.join("model.safetensors"))
                    .ok()
                    .as_deref()
                    == Some(e.model_sha256.as_str())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(dir: &Path, weights: &[u8]) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("model.safetensors"), weights).unwrap();
        std::fs::write(dir.join("config.json"), b"{}").unwrap();
        std::fs::write(dir.join(".complete"), b"job fingerprint").unwrap();
    }

    #[test]
    fn an_entry_is_taken_whole_and_a_damaged_one_is_ignored_then_replaced() {
        let t = tempfile::tempdir().unwrap();
        let cache = t.path().join("cache");
        model(&t.path().join("a"), b"weights a");
        assert!(
            !take(&cache, "k1", &t.path().join("b")).unwrap(),
            "empty cache"
        );
        assert!(publish(&cache, "k1", &t.path().join("a")).unwrap());
        // No temporaries are left, and the source's marker is not copied.
        let names: Vec<_> = std::fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        assert_eq!(names, ["k1"]);
        assert!(take(&cache, "k1", &t.path().join("b")).unwrap());
        assert_eq!(
            std::fs::read(t.path().join("b/model.safetensors")).unwrap(),
            b"weights a"
        );
        assert!(!t.path().join("b/.complete").exists());
        assert!(
            !take(&cache, "k2", &t.path().join("c")).unwrap(),
            "another key"
        );
        // A second publisher of the same key leaves the first entry.
        model(&t.path().join("a2"), b"weights a2");
        assert!(!publish(&cache, "k1", &t.path().join("a2")).unwrap());
        assert!(take(&cache, "k1", &t.path().join("d")).unwrap());
        assert_eq!(
            std::fs::read(t.path().join("d/model.safetensors")).unwrap(),
            b"weights a"
        );
        // Damaged weights: ignored, then replaced by the next publisher.
        std::fs::remove_file(cache.join("k1/model.safetensors")).unwrap();
        std::fs::write(cache.join("k1/model.safetensors"), b"bit rot").unwrap();
        assert!(!take(&cache, "k1", &t.path().join("e")).unwrap());
        assert!(publish(&cache, "k1", &t.path().join("a2")).unwrap());
        assert!(take(&cache, "k1", &t.path().join("f")).unwrap());
        assert_eq!(
            std::fs::read(t.path().join("f/model.safetensors")).unwrap(),
            b"weights a2"
        );
    }
}
