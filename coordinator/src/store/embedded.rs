//! [`Store`] in one process, on disk: for `distill run` without etcd.
//!
//! State lives in memory behind one mutex and is made durable in a directory:
//!
//! - `wal.log`: one JSON line per committed change (transaction, lease grant,
//!   lease revoke), written and fsynced *before* the change is applied in
//!   memory or shown to watchers;
//! - `snapshot.json`: the whole state at some revision, replaced atomically
//!   (write a temp file, fsync, rename, fsync the directory).
//!
//! Opening replays the snapshot then the log (records at or below the
//! snapshot's revision are skipped, so a crash between snapshot and log
//! truncation is harmless; a torn final line is dropped), then compacts into
//! a fresh snapshot. Leases survive a restart with a fresh TTL, as in etcd
//! after a leader change. A background task expires leases; a bounded event
//! history lets a watch start at a recent revision.
//!
//! The store is single-process: two processes opening one directory would
//! corrupt it. Commits are serialised by the mutex and each costs an fsync.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::UnboundedSender;

use super::{
    Compare, EventKind, KeyValue, LeaseId, Op, Revision, Store, StoreError, Txn, TxnOutcome, Watch,
    WatchEvent,
};

/// Events kept for watches that start in the past.
const HISTORY: usize = 10_000;
/// Log records after which the log is folded into a new snapshot.
const COMPACT_AFTER: usize = 10_000;
/// How often leases are checked for expiry.
const REAP_EVERY: Duration = Duration::from_millis(50);

/// A handle on the embedded store; clones share it.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Mutex<State>>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore").finish_non_exhaustive()
    }
}

struct State {
    dir: PathBuf,
    /// Held (an exclusive advisory lock on `LOCK`) while the store is
    /// open: a second process on the same directory is refused.
    _lock: File,
    wal: File,
    wal_records: usize,
    revision: Revision,
    next_lease: LeaseId,
    kvs: BTreeMap<String, KeyValue>,
    leases: HashMap<LeaseId, Lease>,
    /// Events with revision > `history_floor`, oldest first.
    history: VecDeque<WatchEvent>,
    history_floor: Revision,
    watchers: Vec<(String, UnboundedSender<Result<WatchEvent, StoreError>>)>,
}

struct Lease {
    ttl: Duration,
    deadline: Instant,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum Record {
    Txn { rev: Revision, ops: Vec<RecOp> },
    Grant { id: LeaseId, ttl_ms: u64 },
    Revoke { id: LeaseId, rev: Revision },
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum RecOp {
    Put {
        key: String,
        value: String,
        lease: Option<LeaseId>,
    },
    Delete {
        key: String,
    },
}

#[derive(Serialize, Deserialize, Default)]
struct Snapshot {
    revision: Revision,
    next_lease: LeaseId,
    kvs: Vec<SnapKv>,
    leases: Vec<(LeaseId, u64)>,
}

#[derive(Serialize, Deserialize)]
struct SnapKv {
    key: String,
    value: String,
    create_revision: Revision,
    mod_revision: Revision,
    lease: Option<LeaseId>,
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

/// An exclusive lock on `dir/LOCK`, or an error naming the directory when
/// another store holds it. A store of this process that is being dropped
/// (its lease reaper may hold it a moment longer) is waited for, up to 2 s.
fn lock_dir(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join("LOCK");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io)?;
    let started = Instant::now();
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if started.elapsed() < Duration::from_secs(2) => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Unavailable(format!(
                    "{} is in use by another process (another `distill run` on the same output directory, or a coordinator with the same --state-dir)",
                    dir.display()
                )))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(format!("{}: {e}", path.display()))),
        }
    }
}

fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io)
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store in `dir`. Must be called inside a
    /// tokio runtime: it starts the lease-expiry task.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(io)?;
        let lock = lock_dir(dir)?;
        let snapshot: Snapshot = match std::fs::read(dir.join("snapshot.json")) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| StoreError::Corrupt(format!("snapshot.json: {e}")))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Snapshot::default(),
            Err(e) => return Err(io(e)),
        };
        let wal = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(dir.join("wal.log"))
            .map_err(io)?;
        let now = Instant::now();
        let mut st = State {
            dir: dir.to_path_buf(),
            _lock: lock,
            wal,
            wal_records: 0,
            revision: snapshot.revision,
            next_lease: snapshot.next_lease.max(1),
            kvs: BTreeMap::new(),
            leases: snapshot
                .leases
                .iter()
                .map(|&(id, ms)| {
                    (
                        id,
                        Lease {
                            ttl: Duration::from_millis(ms),
                            deadline: now + Duration::from_millis(ms),
                        },
                    )
                })
                .collect(),
            history: VecDeque::new(),
            history_floor: 0,
            watchers: Vec::new(),
        };
        for kv in snapshot.kvs {
            let value = hex::decode(&kv.value)
                .map_err(|e| StoreError::Corrupt(format!("snapshot value of {}: {e}", kv.key)))?;
            let key = kv.key.clone();
            st.kvs.insert(
                key,
                KeyValue {
                    key: kv.key,
                    value,
                    create_revision: kv.create_revision,
                    mod_revision: kv.mod_revision,
                    lease: kv.lease,
                },
            );
        }
        st.replay()?;
        st.history_floor = st.revision;
        st.compact()?;
        let inner = Arc::new(Mutex::new(st));
        tokio::spawn(reap_leases(Arc::downgrade(&inner)));
        Ok(Self { inner })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave a half-applied change:
        // changes are logged first and applied without fallible steps.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

async fn reap_leases(inner: Weak<Mutex<State>>) {
    let mut tick = tokio::time::interval(REAP_EVERY);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let mut st = inner.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let expired: Vec<LeaseId> = st
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Err(e) = st.revoke(id) {
                tracing::error!(lease = id, error = %e, "embedded store: cannot expire lease");
            }
        }
    }
}

impl State {
    fn replay(&mut self) -> Result<(), StoreError> {
        let path = self.dir.join("wal.log");
        let file = File::open(&path).map_err(io)?;
        let lines: Vec<String> = BufReader::new(file)
            .lines()
            .collect::<Result<_, _>>()
            .map_err(io)?;
        let last = lines.len().saturating_sub(1);
        for (i, line) in lines.iter().enumerate() {
            let record: Record = match serde_json::from_str(line) {
                Ok(r) => r,
                // A crash mid-append leaves a torn last line: that change was
                // never acknowledged, so dropping it is correct.
                Err(_) if i == last => break,
                Err(e) => return Err(StoreError::Corrupt(format!("wal.log line {}: {e}", i + 1))),
            };
            match record {
                Record::Txn { rev, ops } if rev > self.revision => {
                    let ops = ops
                        .into_iter()
                        .map(RecOp::into_op)
                        .collect::<Result<Vec<_>, _>>()?;
                    self.apply(rev, &ops);
                }
                Record::Txn { .. } => {}
                Record::Grant { id, ttl_ms } if id >= self.next_lease => {
                    let ttl = Duration::from_millis(ttl_ms);
                    self.leases.insert(
                        id,
                        Lease {
                            ttl,
                            deadline: Instant::now() + ttl,
                        },
                    );
                    self.next_lease = id + 1;
                }
                Record::Grant { .. } => {}
                Record::Revoke { id, rev } => {
                    self.leases.remove(&id);
                    if rev > self.revision {
                        let ops = self.lease_deletes(id);
                        self.apply(rev, &ops);
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes the whole state as a new snapshot and empties the log.
    fn compact(&mut self) -> Result<(), StoreError> {
        let snap = Snapshot {
            revision: self.revision,
            next_lease: self.next_lease,
            kvs: self
                .kvs
                .values()
                .map(|kv| SnapKv {
                    key: kv.key.clone(),
                    value: hex::encode(&kv.value),
                    create_revision: kv.create_revision,
                    mod_revision: kv.mod_revision,
                    lease: kv.lease,
                })
                .collect(),
            leases: self
                .leases
                .iter()
                .map(|(id, l)| (*id, l.ttl.as_millis() as u64))
                .collect(),
        };
        let tmp = self.dir.join("snapshot.json.tmp");
        let mut f = File::create(&tmp).map_err(io)?;
        f.write_all(&serde_json::to_vec(&snap).map_err(io)?)
            .map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, self.dir.join("snapshot.json")).map_err(io)?;
        fsync_dir(&self.dir)?;
        self.wal.set_len(0).map_err(io)?;
        self.wal.sync_all().map_err(io)?;
        self.wal_records = 0;
        Ok(())
    }

    /// Appends one record to the log and fsyncs it.
    fn log(&mut self, record: &Record) -> Result<(), StoreError> {
        let mut line = serde_json::to_vec(record).map_err(io)?;
        line.push(b'\n');
        self.wal.write_all(&line).map_err(io)?;
        self.wal.sync_data().map_err(io)?;
        self.wal_records += 1;
        if self.wal_records >= COMPACT_AFTER {
            self.compact()?;
        }
        Ok(())
    }

    fn lease_deletes(&self, id: LeaseId) -> Vec<Op> {
        self.kvs
            .values()
            .filter(|kv| kv.lease == Some(id))
            .map(|kv| Op::Delete {
                key: kv.key.clone(),
            })
            .collect()
    }

    /// Applies logged writes at `rev` in memory and tells watchers.
    fn apply(&mut self, rev: Revision, ops: &[Op]) {
        self.revision = rev;
        for op in ops {
            let event = match op {
                Op::Put { key, value, lease } => {
                    let create_revision = self.kvs.get(key).map_or(rev, |kv| kv.create_revision);
                    let kv = KeyValue {
                        key: key.clone(),
                        value: value.clone(),
                        create_revision,
                        mod_revision: rev,
                        lease: *lease,
                    };
                    self.kvs.insert(key.clone(), kv.clone());
                    WatchEvent {
                        kind: EventKind::Put,
                        kv,
                    }
                }
                Op::Delete { key } => match self.kvs.remove(key) {
                    Some(old) => WatchEvent {
                        kind: EventKind::Delete,
                        kv: KeyValue {
                            value: Vec::new(),
                            mod_revision: rev,
                            lease: None,
                            ..old
                        },
                    },
                    None => continue,
                },
            };
            self.watchers.retain(|(prefix, tx)| {
                !event.kv.key.starts_with(prefix.as_str()) || tx.send(Ok(event.clone())).is_ok()
            });
            self.history.push_back(event);
            if self.history.len() > HISTORY {
                // Drop whole revisions, so a watch never starts mid-transaction.
                let dropped = self
                    .history
                    .pop_front()
                    .expect("history is not empty")
                    .kv
                    .mod_revision;
                while self
                    .history
                    .front()
                    .is_some_and(|e| e.kv.mod_revision == dropped)
                {
                    self.history.pop_front();
                }
                self.history_floor = dropped;
            }
        }
    }

    fn check_lease(&mut self, id: LeaseId) -> Result<(), StoreError> {
        match self.leases.get(&id) {
            Some(l) if l.deadline > Instant::now() => Ok(()),
            Some(_) => {
                self.revoke(id)?;
                Err(StoreError::LeaseNotFound(id))
            }
            None => Err(StoreError::LeaseNotFound(id)),
        }
    }

    fn revoke(&mut self, id: LeaseId) -> Result<(), StoreError> {
        if !self.leases.contains_key(&id) {
            return Ok(());
        }
        let ops = self.lease_deletes(id);
        let rev = if ops.is_empty() {
            self.revision
        } else {
            self.revision + 1
        };
        self.log(&Record::Revoke { id, rev })?;
        self.leases.remove(&id);
        if !ops.is_empty() {
            self.apply(rev, &ops);
        }
        Ok(())
    }
}

impl RecOp {
    fn into_op(self) -> Result<Op, StoreError> {
        Ok(match self {
            RecOp::Put { key, value, lease } => {
                let value = hex::decode(&value)
                    .map_err(|e| StoreError::Corrupt(format!("wal value of {key}: {e}")))?;
                Op::Put { key, value, lease }
            }
            RecOp::Delete { key } => Op::Delete { key },
        })
    }

    fn from_op(op: &Op) -> Self {
        match op {
            Op::Put { key, value, lease } => RecOp::Put {
                key: key.clone(),
                value: hex::encode(value),
                lease: *lease,
            },
            Op::Delete { key } => RecOp::Delete { key: key.clone() },
        }
    }
}

impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        Ok(self.lock().kvs.get(key).cloned())
    }

    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let st = self.lock();
        let kvs = st
            .kvs
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v.clone())
            .collect();
        Ok((kvs, st.revision))
    }

    async fn range_page(
        &self,
        prefix: &str,
        from: &str,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        let st = self.lock();
        Ok(st
            .kvs
            .range(from.max(prefix).to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .map(|(_, v)| v.clone())
            .collect())
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome, StoreError> {
        let mut st = self.lock();
        let holds = txn.compares.iter().all(|c| match c {
            Compare::ModRevision(key, rev) => {
                st.kvs.get(key).map_or(0, |kv| kv.mod_revision) == *rev
            }
        });
        if !holds {
            return Ok(TxnOutcome::Conflict);
        }
        for op in &txn.ops {
            if let Op::Put { lease: Some(l), .. } = op {
                st.check_lease(*l)?;
            }
        }
        if txn.ops.is_empty() {
            return Ok(TxnOutcome::Committed(st.revision));
        }
        let rev = st.revision + 1;
        st.log(&Record::Txn {
            rev,
            ops: txn.ops.iter().map(RecOp::from_op).collect(),
        })?;
        st.apply(rev, &txn.ops);
        Ok(TxnOutcome::Committed(rev))
    }

    async fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let mut st = self.lock();
        let id = st.next_lease;
        st.log(&Record::Grant {
            id,
            ttl_ms: ttl.as_millis() as u64,
        })?;
        st.next_lease = id + 1;
        st.leases.insert(
            id,
            Lease {
                ttl,
                deadline: Instant::now() + ttl,
            },
        );
        Ok(id)
    }

    async fn keepalive(&self, lease: LeaseId) -> Result<(), StoreError> {
        let mut st = self.lock();
        st.check_lease(lease)?;
        let l = st.leases.get_mut(&lease).expect("checked above");
        l.deadline = Instant::now() + l.ttl;
        Ok(())
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.lock().revoke(lease)
    }

    async fn watch(
        &self,
        prefix: &str,
        start_revision: Option<Revision>,
    ) -> Result<Watch, StoreError> {
        let mut st = self.lock();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        if let Some(start) = start_revision.filter(|&r| r <= st.revision) {
            if start <= st.history_floor {
                return Err(StoreError::Compacted {
                    requested: start,
                    oldest: st.history_floor + 1,
                });
            }
            for ev in st
                .history
                .iter()
                .filter(|e| e.kv.mod_revision >= start && e.kv.key.starts_with(prefix))
            {
                let _ = tx.send(Ok(ev.clone()));
            }
        }
        st.watchers.push((prefix.to_string(), tx));
        Ok(Watch::new(rx, None))
    }
}
