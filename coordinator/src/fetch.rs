//! `FetchOutputs`: a finished job's files, read from the coordinator's
//! artifact root (`<root>/jobs/<id>/`) and streamed in chunks.
//!
//! Only files inside the job's directory are served: an output path that
//! leads elsewhere (a `..`, a link out) is refused, so the API cannot be
//! used to read anything else on the coordinator's disk.

use std::io::Read;
use std::path::{Path, PathBuf};

use distill_proto::v1 as pb;
use sha2::{Digest, Sha256};
use tonic::Status;

use crate::error::CoordinatorError;

/// Chunk size of the stream.
const CHUNK: usize = 1 << 20;

/// The files under the job directory `dir` that `outputs` name (a
/// directory stands for every file below it), as paths relative to `dir`,
/// sorted and without repeats.
pub fn output_files(dir: &Path, outputs: &[String]) -> Result<Vec<PathBuf>, CoordinatorError> {
    let root = dir
        .canonicalize()
        .map_err(|e| CoordinatorError::FailedPrecondition(format!("{}: {e}", dir.display())))?;
    let mut files = vec![];
    for o in outputs {
        let path = Path::new(o);
        let path = if path.is_absolute() {
            path.to_path_buf()
        } else {
            std::env::current_dir().unwrap_or_default().join(path)
        };
        let real = path
            .canonicalize()
            .map_err(|e| CoordinatorError::FailedPrecondition(format!("output {o}: {e}")))?;
        if !real.starts_with(&root) {
            return Err(CoordinatorError::PermissionDenied(format!(
                "output {o} is outside the job's directory {}",
                root.display()
            )));
        }
        walk(&real, &mut files)
            .map_err(|e| CoordinatorError::FailedPrecondition(format!("output {o}: {e}")))?;
    }
    let mut rel: Vec<PathBuf> = files
        .into_iter()
        .filter_map(|f| f.strip_prefix(&root).ok().map(Path::to_path_buf))
        .collect();
    rel.sort();
    rel.dedup();
    Ok(rel)
}

fn walk(p: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    if p.is_dir() {
        for e in std::fs::read_dir(p)? {
            walk(&e?.path(), out)?;
        }
    } else if p.is_file() {
        out.push(p.canonicalize()?);
    }
    Ok(())
}

/// Sends every file of `files` (relative to `dir`) as chunks; the last
/// chunk of each carries its sha256. Stops when the receiver is gone.
pub fn stream(
    dir: &Path,
    files: Vec<PathBuf>,
    tx: tokio::sync::mpsc::Sender<Result<pb::FileChunk, Status>>,
) {
    for rel in files {
        let name = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy())
            .collect::<Vec<_>>()
            .join("/");
        let sent = (|| -> std::io::Result<bool> {
            let mut f = std::fs::File::open(dir.join(&rel))?;
            let mut h = Sha256::new();
            let mut buf = vec![0u8; CHUNK];
            let mut pending: Option<Vec<u8>> = None;
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                if let Some(data) = pending.replace(buf[..n].to_vec()) {
                    let chunk = pb::FileChunk {
                        path: name.clone(),
                        data,
                        sha256: String::new(),
                    };
                    if tx.blocking_send(Ok(chunk)).is_err() {
                        return Ok(false);
                    }
                }
            }
            let last = pb::FileChunk {
                path: name.clone(),
                data: pending.unwrap_or_default(),
                sha256: hex::encode(h.finalize()),
            };
            Ok(tx.blocking_send(Ok(last)).is_ok())
        })();
        match sent {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                let _ = tx.blocking_send(Err(Status::internal(format!("{name}: {e}"))));
                return;
            }
        }
    }
}
