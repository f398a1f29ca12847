//! The state store: the coordinator's single source of truth.
//!
//! [`Store`] is a small etcd-shaped key-value API: revisions, compare-and-swap
//! transactions, leases with a TTL and prefix watches. It has two
//! implementations that pass one conformance suite ([`conformance`]):
//!
//! - [`EtcdStore`]: etcd 3.4+ through `etcd-client`, for cluster mode;
//! - [`EmbeddedStore`]: one process, on disk (write-ahead log + snapshot, each
//!   commit fsynced), for `distill run` without etcd.
//!
//! Semantics both honour:
//! - the store revision increases by one with every transaction that writes;
//!   a key's `mod_revision` is the revision that last wrote it, and an absent
//!   key has `mod_revision` 0 (so "create if absent" is "compare to 0");
//! - a transaction applies all its operations or none, and only when every
//!   compare holds;
//! - when a lease expires or is revoked, every key attached to it is deleted
//!   (and watchers see the deletes);
//! - a watch delivers every put and delete under its prefix in revision
//!   order, starting at `start_revision` when given (older history may be
//!   compacted: [`StoreError::Compacted`]).
//!
//! Keys are UTF-8 strings; values are bytes.

pub mod conformance;
mod embedded;
mod etcd;

use std::future::Future;
use std::time::Duration;

pub use embedded::EmbeddedStore;
pub use etcd::EtcdStore;

/// A store revision (etcd's `mod_revision`/`header.revision`); 0 means absent.
pub type Revision = i64;

/// A lease id; keys attached to it vanish when it expires.
pub type LeaseId = i64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: Revision,
    pub mod_revision: Revision,
    /// The lease the key is attached to, if any.
    pub lease: Option<LeaseId>,
}

/// One condition of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key's `mod_revision` equals this (0: the key is absent).
    ModRevision(String, Revision),
}

/// One write of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    Delete {
        key: String,
    },
}

/// Compares that must all hold, then writes applied atomically.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub ops: Vec<Op>,
}

impl Txn {
    pub fn new() -> Self {
        Self::default()
    }
    /// Requires `key` to be at `revision` (0: absent).
    pub fn when(mut self, key: impl Into<String>, revision: Revision) -> Self {
        self.compares
            .push(Compare::ModRevision(key.into(), revision));
        self
    }
    pub fn put(mut self, key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.ops.push(Op::Put {
            key: key.into(),
            value: value.into(),
            lease: None,
        });
        self
    }
    pub fn put_with_lease(
        mut self,
        key: impl Into<String>,
        value: impl Into<Vec<u8>>,
        lease: LeaseId,
    ) -> Self {
        self.ops.push(Op::Put {
            key: key.into(),
            value: value.into(),
            lease: Some(lease),
        });
        self
    }
    pub fn delete(mut self, key: impl Into<String>) -> Self {
        self.ops.push(Op::Delete { key: key.into() });
        self
    }
}

/// The result of a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnOutcome {
    /// Every compare held and the writes were applied at this revision.
    Committed(Revision),
    /// A compare failed; nothing was written.
    Conflict,
}

impl TxnOutcome {
    pub fn committed(self) -> bool {
        matches!(self, TxnOutcome::Committed(_))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change seen by a watch. For a delete, `kv.value` is empty and
/// `kv.mod_revision` is the revision of the delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    pub kind: EventKind,
    pub kv: KeyValue,
}

/// A stream of changes under a prefix; dropping it cancels the watch.
pub struct Watch {
    rx: tokio::sync::mpsc::UnboundedReceiver<Result<WatchEvent, StoreError>>,
    _guard: Option<Box<dyn Send + Sync>>,
}

impl Watch {
    pub(crate) fn new(
        rx: tokio::sync::mpsc::UnboundedReceiver<Result<WatchEvent, StoreError>>,
        guard: Option<Box<dyn Send + Sync>>,
    ) -> Self {
        Self { rx, _guard: guard }
    }

    /// The next change; `None` when the store went away.
    pub async fn next(&mut self) -> Option<Result<WatchEvent, StoreError>> {
        self.rx.recv().await
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("state store unavailable: {0}")]
    Unavailable(String),
    #[error("lease {0} not found or expired")]
    LeaseNotFound(LeaseId),
    #[error("revision {requested} is compacted (oldest kept is {oldest})")]
    Compacted {
        requested: Revision,
        oldest: Revision,
    },
    #[error("state store i/o error: {0}")]
    Io(String),
    #[error("state store data is corrupt: {0}")]
    Corrupt(String),
}

/// The store API both implementations provide. Cheap to clone (a handle).
///
/// Methods return `Send` futures so they can be awaited inside spawned tasks
/// and tonic handlers.
pub trait Store: Clone + Send + Sync + 'static {
    /// The key, or `None` when absent.
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<KeyValue>, StoreError>> + Send;

    /// Every key starting with `prefix`, sorted by key, and the store revision
    /// the listing was read at (so a watch can start right after it).
    fn range(
        &self,
        prefix: &str,
    ) -> impl Future<Output = Result<(Vec<KeyValue>, Revision), StoreError>> + Send;

    /// At most `limit` keys under `prefix` from key `from` (inclusive) on,
    /// sorted: a page of a large prefix.
    fn range_page(
        &self,
        prefix: &str,
        from: &str,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<KeyValue>, StoreError>> + Send;

    /// Applies `txn` atomically if all its compares hold.
    fn txn(&self, txn: Txn) -> impl Future<Output = Result<TxnOutcome, StoreError>> + Send;

    /// A new lease that expires `ttl` after its last keepalive (etcd rounds
    /// the TTL up to whole seconds, with its own minimum).
    fn grant(&self, ttl: Duration) -> impl Future<Output = Result<LeaseId, StoreError>> + Send;

    /// Renews a lease; `LeaseNotFound` once it has expired or was revoked.
    fn keepalive(&self, lease: LeaseId) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Ends a lease now, deleting its keys. Revoking an unknown lease is not
    /// an error.
    fn revoke(&self, lease: LeaseId) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Changes under `prefix`, from `start_revision` (inclusive) when given,
    /// else from now.
    fn watch(
        &self,
        prefix: &str,
        start_revision: Option<Revision>,
    ) -> impl Future<Output = Result<Watch, StoreError>> + Send;

    /// Writes `key` unconditionally.
    fn put(
        &self,
        key: &str,
        value: Vec<u8>,
    ) -> impl Future<Output = Result<Revision, StoreError>> + Send {
        async move {
            match self.txn(Txn::new().put(key, value)).await? {
                TxnOutcome::Committed(rev) => Ok(rev),
                TxnOutcome::Conflict => Err(StoreError::Corrupt(
                    "unconditional put reported a conflict".into(),
                )),
            }
        }
    }

    /// Writes `key` only if it is at `expected` (0: absent); the new revision
    /// on success, `None` on conflict.
    fn put_if(
        &self,
        key: &str,
        value: Vec<u8>,
        expected: Revision,
    ) -> impl Future<Output = Result<Option<Revision>, StoreError>> + Send {
        async move {
            match self
                .txn(Txn::new().when(key, expected).put(key, value))
                .await?
            {
                TxnOutcome::Committed(rev) => Ok(Some(rev)),
                TxnOutcome::Conflict => Ok(None),
            }
        }
    }

    /// Creates `key` only if absent, optionally attached to a lease; `None`
    /// if it already exists.
    fn create(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> impl Future<Output = Result<Option<Revision>, StoreError>> + Send {
        async move {
            let txn = Txn::new().when(key, 0);
            let txn = match lease {
                Some(l) => txn.put_with_lease(key, value, l),
                None => txn.put(key, value),
            };
            match self.txn(txn).await? {
                TxnOutcome::Committed(rev) => Ok(Some(rev)),
                TxnOutcome::Conflict => Ok(None),
            }
        }
    }

    /// Deletes `key` only if it is at `expected`; whether it was deleted.
    fn delete_if(
        &self,
        key: &str,
        expected: Revision,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        async move {
            Ok(self
                .txn(Txn::new().when(key, expected).delete(key))
                .await?
                .committed())
        }
    }
}

/// The exclusive end of the key range holding every key with `prefix`.
pub(crate) fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}
