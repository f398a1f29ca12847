//! [`Store`] on etcd 3.4+ (`etcd-client`), for cluster mode.
//!
//! Every key is stored under a namespace prefix (so tests and several
//! deployments can share one etcd); the prefix is stripped on the way out.
//! Leases map one to one onto etcd leases; TTLs round up to whole seconds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare as EtcdCompare, CompareOp, EventType, GetOptions, LeaseKeepAliveStream,
    LeaseKeeper, PutOptions, Txn as EtcdTxn, TxnOp, WatchOptions,
};

use super::{
    prefix_end, Compare, EventKind, KeyValue, LeaseId, Op, Revision, Store, StoreError, Txn,
    TxnOutcome, Watch, WatchEvent,
};

/// A handle on an etcd cluster; clones share the connection and the
/// open keep-alive streams.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    namespace: String,
    keepers: Keepers,
}

/// One open keep-alive stream per lease, reused by every renewal of that
/// lease (a worker heartbeats its session lease every second; opening a
/// fresh bidirectional stream each time was the main cost of a heartbeat).
/// A stream that errors, and a lease revoked or found expired, is dropped;
/// streams idle for [`KEEPER_IDLE`] are closed when the table grows.
type Keepers = Arc<Mutex<HashMap<LeaseId, Arc<tokio::sync::Mutex<Keeper>>>>>;

struct Keeper {
    keeper: LeaseKeeper,
    stream: LeaseKeepAliveStream,
    used: Instant,
    /// A request was sent and its reply not yet read.
    in_flight: bool,
}

/// Keep-alive streams unused for this long are closed (when the table has
/// more than [`KEEPER_PRUNE_AT`] entries).
const KEEPER_IDLE: Duration = Duration::from_secs(60);
const KEEPER_PRUNE_AT: usize = 4096;

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("namespace", &self.namespace)
            .finish()
    }
}

fn unavailable(e: etcd_client::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// A keep-alive failure: the lease is gone, or etcd is unreachable.
fn keepalive_error(lease: LeaseId, e: etcd_client::Error) -> StoreError {
    match e.to_string().contains("lease not found") {
        true => StoreError::LeaseNotFound(lease),
        false => unavailable(e),
    }
}

/// One renewal on an open stream: send, then read the matching reply.
async fn renew(k: &mut Keeper, lease: LeaseId) -> Result<(), StoreError> {
    let lease_err = |e| keepalive_error(lease, e);
    k.keeper.keep_alive().await.map_err(lease_err)?;
    match k.stream.message().await.map_err(lease_err)? {
        Some(resp) if resp.ttl() > 0 => Ok(()),
        _ => Err(StoreError::LeaseNotFound(lease)),
    }
}

impl EtcdStore {
    /// `lease`'s keep-alive stream: the cached one, or (when `fresh` or
    /// none is cached) a newly opened one, cached for the next renewal.
    async fn keeper(
        &self,
        lease: LeaseId,
        fresh: bool,
    ) -> Result<Arc<tokio::sync::Mutex<Keeper>>, StoreError> {
        if !fresh {
            if let Some(e) = self
                .keepers
                .lock()
                .ok()
                .and_then(|k| k.get(&lease).cloned())
            {
                return Ok(e);
            }
        }
        let (keeper, stream) = self
            .client
            .clone()
            .lease_keep_alive(lease)
            .await
            .map_err(|e| keepalive_error(lease, e))?;
        let e = Arc::new(tokio::sync::Mutex::new(Keeper {
            keeper,
            stream,
            used: Instant::now(),
            in_flight: false,
        }));
        let Ok(mut k) = self.keepers.lock() else {
            return Ok(e);
        };
        if k.len() >= KEEPER_PRUNE_AT {
            k.retain(|_, e| {
                e.try_lock()
                    .map_or(true, |e| e.used.elapsed() < KEEPER_IDLE)
            });
        }
        k.insert(lease, e.clone());
        Ok(e)
    }

    /// Drops `lease`'s cached keep-alive stream if it is still `entry`.
    fn forget_keeper(&self, lease: LeaseId, entry: &Arc<tokio::sync::Mutex<Keeper>>) {
        if let Ok(mut k) = self.keepers.lock() {
            if k.get(&lease).is_some_and(|e| Arc::ptr_eq(e, entry)) {
                k.remove(&lease);
            }
        }
    }

    /// Connects to any of `endpoints` (`http://host:port`); every key lives
    /// under `namespace` (e.g. `/distill/`).
    pub async fn connect(endpoints: &[String], namespace: &str) -> Result<Self, StoreError> {
        let opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(10))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5));
        let client = Client::connect(endpoints, Some(opts))
            .await
            .map_err(unavailable)?;
        Ok(Self {
            client,
            namespace: namespace.to_string(),
            keepers: Keepers::default(),
        })
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.namespace)
    }

    fn convert(&self, kv: &etcd_client::KeyValue) -> Result<KeyValue, StoreError> {
        let key = kv
            .key_str()
            .map_err(|e| StoreError::Corrupt(format!("non-utf8 key: {e}")))?;
        let key = key.strip_prefix(&self.namespace).unwrap_or(key).to_string();
        Ok(KeyValue {
            key,
            value: kv.value().to_vec(),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
            lease: (kv.lease() != 0).then_some(kv.lease()),
        })
    }
}

impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let resp = self
            .client
            .clone()
            .get(self.full(key), None)
            .await
            .map_err(unavailable)?;
        resp.kvs().first().map(|kv| self.convert(kv)).transpose()
    }

    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let full = self.full(prefix);
        let opts = GetOptions::new().with_range(prefix_end(&full));
        let resp = self
            .client
            .clone()
            .get(full, Some(opts))
            .await
            .map_err(unavailable)?;
        let rev = resp.header().map(|h| h.revision()).unwrap_or_default();
        let kvs = resp
            .kvs()
            .iter()
            .map(|kv| self.convert(kv))
            .collect::<Result<_, _>>()?;
        Ok((kvs, rev))
    }

    async fn range_page(
        &self,
        prefix: &str,
        from: &str,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        let opts = GetOptions::new()
            .with_range(prefix_end(&self.full(prefix)))
            .with_limit(limit as i64);
        let resp = self
            .client
            .clone()
            .get(self.full(from.max(prefix)), Some(opts))
            .await
            .map_err(unavailable)?;
        resp.kvs().iter().map(|kv| self.convert(kv)).collect()
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        let compares: Vec<EtcdCompare> = txn
            .compares
            .iter()
            .map(|c| match c {
                // An absent key has version 0; `create_revision == 0` is etcd's idiom.
                Compare::ModRevision(k, 0) => {
                    EtcdCompare::create_revision(self.full(k), CompareOp::Equal, 0)
                }
                Compare::ModRevision(k, r) => {
                    EtcdCompare::mod_revision(self.full(k), CompareOp::Equal, *r)
                }
            })
            .collect();
        let ops: Vec<TxnOp> = txn
            .ops
            .iter()
            .map(|op| match op {
                Op::Put { key, value, lease } => TxnOp::put(
                    self.full(key),
                    value.clone(),
                    lease.map(|l| PutOptions::new().with_lease(l)),
                ),
                Op::Delete { key } => TxnOp::delete(self.full(key), None),
            })
            .collect();
        let resp = self
            .client
            .clone()
            .txn(EtcdTxn::new().when(compares).and_then(ops))
            .await
            .map_err(|e| {
                // A put attached to a dead lease fails the whole request.
                match &e {
                    etcd_client::Error::GRpcStatus(s)
                        if s.message().contains("lease not found") =>
                    {
                        let lease = txn.ops.iter().find_map(|op| match op {
                            Op::Put { lease: Some(l), .. } => Some(*l),
                            _ => None,
                        });
                        StoreError::LeaseNotFound(lease.unwrap_or_default())
                    }
                    _ => unavailable(e),
                }
            })?;
        let rev = resp.header().map(|h| h.revision()).unwrap_or_default();
        Ok(if resp.succeeded() {
            TxnOutcome::Committed(rev)
        } else {
            TxnOutcome::Conflict
        })
    }

    async fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let secs = ttl.as_millis().div_ceil(1000).max(1) as i64;
        let resp = self
            .client
            .clone()
            .lease_grant(secs, None)
            .await
            .map_err(unavailable)?;
        Ok(resp.id())
    }

    async fn keepalive(&self, lease: LeaseId) -> Result<(), StoreError> {
        // A cached stream that fails for any reason other than the lease
        // being gone gets one retry on a fresh stream, so a stream that
        // broke while idle never fails a heartbeat.
        for fresh in [false, true] {
            let entry = self.keeper(lease, fresh).await?;
            let mut k = entry.lock().await;
            if k.in_flight {
                // A caller was cancelled between request and reply: its
                // reply may still be queued. Never read it as ours.
                drop(k);
                self.forget_keeper(lease, &entry);
                continue;
            }
            k.used = Instant::now();
            k.in_flight = true;
            let renewed = renew(&mut k, lease).await;
            k.in_flight = false;
            drop(k);
            match renewed {
                Ok(()) => return Ok(()),
                Err(e) => {
                    self.forget_keeper(lease, &entry);
                    if matches!(e, StoreError::LeaseNotFound(_)) || fresh {
                        return Err(e);
                    }
                }
            }
        }
        Err(StoreError::Unavailable(format!(
            "lease {lease}: no usable keep-alive stream"
        )))
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        if let Ok(mut k) = self.keepers.lock() {
            k.remove(&lease);
        }
        match self.client.clone().lease_revoke(lease).await {
            Ok(_) => Ok(()),
            Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("lease not found") => {
                Ok(())
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn watch(
        &self,
        prefix: &str,
        start_revision: Option<Revision>,
    ) -> Result<Watch, StoreError> {
        let full = self.full(prefix);
        let mut opts = WatchOptions::new().with_range(prefix_end(&full));
        if let Some(r) = start_revision {
            opts = opts.with_start_revision(r);
        }
        let mut stream = self
            .client
            .clone()
            .watch(full, Some(opts))
            .await
            .map_err(unavailable)?;
        // Wait until etcd has created the watch, so a write made after this
        // returns is always seen.
        match stream.message().await.map_err(unavailable)? {
            Some(resp) if resp.created() && !resp.canceled() => {}
            Some(resp) if resp.compact_revision() > 0 => {
                return Err(StoreError::Compacted {
                    requested: start_revision.unwrap_or_default(),
                    oldest: resp.compact_revision(),
                })
            }
            Some(resp) => {
                return Err(StoreError::Unavailable(format!(
                    "watch not created: {}",
                    resp.cancel_reason()
                )))
            }
            None => return Err(StoreError::Unavailable("watch stream closed".into())),
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    _ = tx.closed() => return,
                    msg = stream.message() => msg,
                };
                let resp = match msg {
                    Ok(Some(resp)) => resp,
                    Ok(None) => return,
                    Err(e) => {
                        let _ = tx.send(Err(unavailable(e)));
                        return;
                    }
                };
                if resp.compact_revision() > 0 {
                    let requested = start_revision.unwrap_or_default();
                    let _ = tx.send(Err(StoreError::Compacted {
                        requested,
                        oldest: resp.compact_revision(),
                    }));
                    return;
                }
                if resp.canceled() {
                    let _ = tx.send(Err(StoreError::Unavailable(format!(
                        "watch cancelled: {}",
                        resp.cancel_reason()
                    ))));
                    return;
                }
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let event = this.convert(kv).map(|kv| WatchEvent {
                        kind: match ev.event_type() {
                            EventType::Put => EventKind::Put,
                            EventType::Delete => EventKind::Delete,
                        },
                        kv,
                    });
                    if tx.send(event).is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Watch::new(rx, None))
    }
}
