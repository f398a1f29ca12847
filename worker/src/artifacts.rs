//! The artifact store: where teacher-signal shards (and, on the cluster,
//! every task's outputs) are published, through the `object_store` crate so
//! that a local directory and an object-store URI share one interface.
//!
//! A root is a local path (`/shared/artifacts`, `runs/x/teacher-signal`) or
//! a `file://` URL. This build carries only `object_store`'s local
//! filesystem backend: an `s3://`, `gs://`, `az://` or `http(s)://` root is
//! refused with an error that says so, never silently written elsewhere.
//!
//! Writes are atomic per object (the local backend writes a temporary file
//! and renames it), so a reader sees a whole object or none. Calls block the
//! calling thread on a private current-thread runtime: this is for the
//! libtorch thread and the CLI, never for a tokio worker thread.

use std::sync::Arc;

use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload};

use crate::{Error, Result};

/// One artifact root.
pub struct Artifacts {
    store: Arc<dyn ObjectStore>,
    /// The root as the user gave it, for messages and URIs.
    root: String,
    rt: tokio::runtime::Runtime,
}

impl std::fmt::Debug for Artifacts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Artifacts")
            .field("root", &self.root)
            .finish()
    }
}

impl Artifacts {
    /// Opens `root` (created when it is a local directory that does not
    /// exist yet).
    pub fn open(root: &str) -> Result<Self> {
        let local = match root.split_once("://") {
            None => root.to_string(),
            Some(("file", path)) => path.to_string(),
            Some((scheme, _)) => {
                return Err(Error::Invalid(format!(
                    "artifact root {root}: {scheme}:// needs an object_store backend this build does not include (only local paths and file:// are built in)"
                )))
            }
        };
        std::fs::create_dir_all(&local).map_err(|e| Error::io(&local, e))?;
        let store = LocalFileSystem::new_with_prefix(&local)
            .map_err(|e| Error::Invalid(format!("artifact root {root}: {e}")))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Invalid(format!("artifact store runtime: {e}")))?;
        Ok(Self {
            store: Arc::new(store),
            root: root.trim_end_matches('/').to_string(),
            rt,
        })
    }

    /// The URI of `key` under this root.
    pub fn uri(&self, key: &str) -> String {
        format!("{}/{key}", self.root)
    }

    fn path(&self, key: &str) -> Result<ObjectPath> {
        ObjectPath::parse(key).map_err(|e| Error::Invalid(format!("artifact key {key}: {e}")))
    }

    /// Writes `bytes` at `key` (atomically: whole or not at all).
    pub fn put(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
        let path = self.path(key)?;
        self.rt
            .block_on(self.store.put(&path, PutPayload::from(bytes)))
            .map_err(|e| self.error(key, e))?;
        Ok(())
    }

    /// The bytes at `key`, or `None` when there is no such object.
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let path = self.path(key)?;
        let got = self.rt.block_on(async {
            match self.store.get(&path).await {
                Ok(r) => r.bytes().await.map(Some),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        });
        got.map(|b| b.map(|b| b.to_vec()))
            .map_err(|e| self.error(key, e))
    }

    fn error(&self, key: &str, e: object_store::Error) -> Error {
        Error::Io {
            path: self.uri(key).into(),
            source: std::io::Error::other(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_roots_round_trip_and_remote_schemes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("art");
        let a = Artifacts::open(root.to_str().unwrap()).unwrap();
        assert_eq!(a.get("signal/k/manifest.json").unwrap(), None);
        a.put("signal/k/manifest.json", b"{}".to_vec()).unwrap();
        assert_eq!(a.get("signal/k/manifest.json").unwrap().unwrap(), b"{}");
        assert!(
            root.join("signal/k/manifest.json").exists(),
            "a plain file on disk"
        );
        let f = Artifacts::open(&format!("file://{}", root.display())).unwrap();
        assert_eq!(f.get("signal/k/manifest.json").unwrap().unwrap(), b"{}");
        let e = Artifacts::open("s3://bucket/prefix")
            .unwrap_err()
            .to_string();
        assert!(e.contains("s3://") && e.contains("backend"), "{e}");
    }
}
