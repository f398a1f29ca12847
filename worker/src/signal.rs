//! The offline teacher-signal shard format.
//!
//! A shard is the teacher's output for a contiguous range `[start, end)` of a
//! data set's examples: one safetensors file with a tensor `signal` (`[n,
//! labels]` logits or `[n, hidden]` embeddings, float32, row `i` = example
//! `start + i`) plus `manifest.json`. The shard lives in a directory named by
//! its content address
//!
//! ```text
//! key = sha256(teacher weights sha256, tokenizer.json sha256,
//!              shard data sha256, kind, max_length, start, end)
//! <signal root>/<key>/{signal.safetensors, manifest.json}
//! ```
//!
//! The signal root is an [`Artifacts`] store (`object_store`): a local
//! directory for `distill run`, `<artifacts>/signal` on a cluster.
//!
//! so a changed teacher, tokenizer, data or setting gives a different key and
//! a stale cache can never be read; a re-run finds finished shards by key. On
//! read, the manifest must match the expected key and every field, and the
//! file must match its recorded sha256, or the shard is refused with an error
//! that names the mismatch. The shard data hash covers each example's token
//! ids in order, so it also changes when truncation changes.

use crate::artifacts::Artifacts;
use crate::model::weights::{safetensors_bytes, tensors_from_bytes, weight_files};
use crate::tokenize::Encoded;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use tch::Tensor;

pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignalManifest {
    pub version: u32,
    pub key: String,
    pub teacher_sha256: String,
    pub tokenizer_sha256: String,
    pub data_sha256: String,
    /// "logits" or "embeddings".
    pub kind: String,
    pub max_length: usize,
    pub start: usize,
    pub end: usize,
    pub rows: usize,
    pub width: i64,
    pub file_sha256: String,
}

/// The sha256 of `b`, as 64 hex digits.
pub fn sha256_bytes(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// The sha256 of a file's bytes, as 64 hex digits.
pub fn sha256_path(p: &Path) -> Result<String> {
    Ok(sha256_bytes(
        &std::fs::read(p).map_err(|e| Error::io(p, e))?,
    ))
}

/// Hashes that identify a teacher: its weight files and its tokenizer.
#[derive(Debug, Clone)]
pub struct TeacherId {
    pub teacher_sha256: String,
    pub tokenizer_sha256: String,
}

impl TeacherId {
    pub fn of(dir: &Path) -> Result<Self> {
        let mut h = Sha256::new();
        for f in weight_files(dir)? {
            h.update(std::fs::read(&f).map_err(|e| Error::io(&f, e))?);
        }
        Ok(TeacherId {
            teacher_sha256: hex::encode(h.finalize()),
            tokenizer_sha256: sha256_path(&dir.join("tokenizer.json"))?,
        })
    }
}

/// What a shard must be: the identity of everything that went into it.
#[derive(Debug, Clone)]
pub struct ShardSpec<'a> {
    pub teacher: &'a TeacherId,
    pub kind: &'a str,
    pub max_length: usize,
    pub start: usize,
    pub end: usize,
}

pub fn data_sha256(examples: &[Encoded]) -> String {
    let mut h = Sha256::new();
    for e in examples {
        h.update((e.ids.len() as u64).to_le_bytes());
        for (i, t) in e.ids.iter().zip(&e.type_ids) {
            h.update(i.to_le_bytes());
            h.update(t.to_le_bytes());
        }
    }
    hex::encode(h.finalize())
}

impl ShardSpec<'_> {
    /// The shard's content address (its directory name under the signal
    /// directory).
    pub fn key(&self, examples: &[Encoded]) -> String {
        self.expected(examples).key
    }

    /// The expected manifest fields (without the file hash) and the key.
    fn expected(&self, examples: &[Encoded]) -> SignalManifest {
        let data = data_sha256(&examples[self.start..self.end]);
        let key = sha256_bytes(
            format!(
                "v{FORMAT_VERSION}|{}|{}|{data}|{}|{}|{}|{}",
                self.teacher.teacher_sha256,
                self.teacher.tokenizer_sha256,
                self.kind,
                self.max_length,
                self.start,
                self.end
            )
            .as_bytes(),
        );
        SignalManifest {
            version: FORMAT_VERSION,
            key,
            teacher_sha256: self.teacher.teacher_sha256.clone(),
            tokenizer_sha256: self.teacher.tokenizer_sha256.clone(),
            data_sha256: data,
            kind: self.kind.to_string(),
            max_length: self.max_length,
            start: self.start,
            end: self.end,
            rows: self.end - self.start,
            width: 0,
            file_sha256: String::new(),
        }
    }
}

/// The object key of a shard's file `name` (`<key>/<name>`).
pub fn shard_object(key: &str, name: &str) -> String {
    format!("{key}/{name}")
}

/// Write a shard's signal (`[end-start, width]`) to `store` (rooted at the
/// signal directory): `signal.safetensors` first, `manifest.json` last, so
/// a shard without a manifest does not exist. Returns the manifest's
/// object key and its bytes.
pub fn write_shard(
    store: &Artifacts,
    spec: &ShardSpec,
    examples: &[Encoded],
    signal: &Tensor,
) -> Result<(String, Vec<u8>)> {
    let mut m = spec.expected(examples);
    let size = signal.size();
    if size.len() != 2 || size[0] as usize != m.rows {
        return Err(Error::Invalid(format!(
            "shard signal has shape {size:?}, expected [{}, width]",
            m.rows
        )));
    }
    m.width = size[1];
    // Write once: a shard another attempt already published (and that
    // verifies) is kept, never overwritten under a reader.
    let mkey = shard_object(&m.key, "manifest.json");
    if let Some((_, existing)) = read_shard_with_manifest(store, spec, examples)? {
        return Ok((mkey, existing));
    }
    let bytes = safetensors_bytes(&[("signal".into(), signal.to_kind(tch::Kind::Float))])?;
    m.file_sha256 = sha256_bytes(&bytes);
    store.put(&shard_object(&m.key, "signal.safetensors"), bytes)?;
    let manifest = serde_json::to_string_pretty(&m).unwrap().into_bytes();
    let key = shard_object(&m.key, "manifest.json");
    store.put(&key, manifest.clone())?;
    Ok((key, manifest))
}

/// Read a shard from `store` if it exists and is exactly what `spec` asks
/// for. `Ok(None)`: not computed yet. `Err`: present but wrong (refused).
pub fn read_shard(
    store: &Artifacts,
    spec: &ShardSpec,
    examples: &[Encoded],
) -> Result<Option<Tensor>> {
    Ok(read_shard_with_manifest(store, spec, examples)?.map(|(t, _)| t))
}

/// [`read_shard`], also returning the bytes of the manifest that was
/// checked (so a caller reports the digest of exactly what it verified).
pub fn read_shard_with_manifest(
    store: &Artifacts,
    spec: &ShardSpec,
    examples: &[Encoded],
) -> Result<Option<(Tensor, Vec<u8>)>> {
    let want = spec.expected(examples);
    let mkey = shard_object(&want.key, "manifest.json");
    let mpath = PathBuf::from(store.uri(&mkey));
    let Some(text) = store.get(&mkey)? else {
        return Ok(None);
    };
    let got: SignalManifest = serde_json::from_slice(&text).map_err(|e| Error::Data {
        path: mpath.clone(),
        message: format!("invalid shard manifest: {e}"),
    })?;
    let checks = [
        ("version", got.version.to_string(), want.version.to_string()),
        ("key", got.key.clone(), want.key.clone()),
        (
            "teacher_sha256",
            got.teacher_sha256.clone(),
            want.teacher_sha256.clone(),
        ),
        (
            "tokenizer_sha256",
            got.tokenizer_sha256.clone(),
            want.tokenizer_sha256.clone(),
        ),
        (
            "data_sha256",
            got.data_sha256.clone(),
            want.data_sha256.clone(),
        ),
        ("kind", got.kind.clone(), want.kind.clone()),
        (
            "max_length",
            got.max_length.to_string(),
            want.max_length.to_string(),
        ),
        ("start", got.start.to_string(), want.start.to_string()),
        ("end", got.end.to_string(), want.end.to_string()),
    ];
    for (field, g, w) in checks {
        if g != w {
            return Err(Error::Data {
                path: mpath,
                message: format!("teacher-signal manifest field {field} is {g} but this job needs {w}: refusing a mismatched shard"),
            });
        }
    }
    let fkey = shard_object(&want.key, "signal.safetensors");
    let file = PathBuf::from(store.uri(&fkey));
    let bytes = store.get(&fkey)?.ok_or_else(|| Error::Data {
        path: file.clone(),
        message: "the manifest exists but the signal file does not".into(),
    })?;
    let sum = sha256_bytes(&bytes);
    if sum != got.file_sha256 {
        return Err(Error::Data {
            path: file,
            message: format!(
                "checksum {sum} does not match the manifest's {}",
                got.file_sha256
            ),
        });
    }
    let t = tensors_from_bytes(&file, &bytes)?;
    let s = t.get("signal").ok_or_else(|| Error::Data {
        path: file.clone(),
        message: "no tensor named signal".into(),
    })?;
    if s.size() != [got.rows as i64, got.width] {
        return Err(Error::Data {
            path: file,
            message: format!("signal shape {:?} disagrees with the manifest", s.size()),
        });
    }
    Ok(Some((s.shallow_clone(), text)))
}
