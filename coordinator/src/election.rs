//! Leader election between coordinators sharing one store, through a
//! lease-guarded key.
//!
//! Each coordinator campaigns by creating `leader` (compare: absent)
//! attached to a lease of its own with TTL `leader_ttl`; whoever creates it
//! leads, and renews its lease every third of the TTL. The others stand by:
//! they watch the key and try again as soon as it is deleted — which etcd
//! does by itself when the leader's lease expires (the leader was killed,
//! hung, or cut off). A leader that fails to renew in time, or finds the
//! key no longer its own, steps down at once (its main loop is cancelled)
//! and campaigns again.
//!
//! Only the leader runs the main loop and answers RPCs; a standby answers
//! `UNAVAILABLE` naming the leader, so workers and clients given a list of
//! endpoints move on. Even a deposed leader that has not noticed yet cannot
//! corrupt anything: every write it makes is a revision-guarded transaction.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::driver::{self, Shutdown};
use crate::error::CoordinatorError;
use crate::metrics::Metrics;
use crate::store::{EventKind, LeaseId, Store, StoreError};

const LEADER: &str = "leader";

/// What this coordinator knows about leadership; shared with the RPC gate.
#[derive(Debug, Clone, Default)]
pub struct LeaderState {
    leading: Arc<AtomicBool>,
    /// The current leader's advertised address, as last seen.
    leader: Arc<RwLock<String>>,
}

impl LeaderState {
    pub fn is_leader(&self) -> bool {
        self.leading.load(Ordering::Acquire)
    }

    /// The refusal a standby gives.
    pub fn refusal(&self) -> CoordinatorError {
        let leader = self.leader.read().map(|l| l.clone()).unwrap_or_default();
        if leader.is_empty() {
            CoordinatorError::Unavailable("not the leader; no leader is elected yet".into())
        } else {
            CoordinatorError::Unavailable(format!("not the leader; the leader is {leader}"))
        }
    }

    fn set(&self, leading: bool, leader: &str) {
        if let Ok(mut l) = self.leader.write() {
            *l = leader.to_string();
        }
        self.leading.store(leading, Ordering::Release);
    }
}

/// One coordinator's candidacy.
#[derive(Debug, Clone)]
pub struct Election<S> {
    store: S,
    ttl: Duration,
    /// Advertised address of this coordinator (stored in the key).
    me: String,
    pub state: LeaderState,
}

impl<S: Store> Election<S> {
    pub fn new(store: S, ttl: Duration, me: String) -> Self {
        Self {
            store,
            ttl,
            me,
            state: LeaderState::default(),
        }
    }

    /// Campaigns until this coordinator leads (returning its lease) or
    /// `shutdown` fires (`None`).
    pub async fn campaign(&self, shutdown: &Shutdown) -> Result<Option<LeaseId>, CoordinatorError> {
        let mut lease = self.store.grant(self.ttl).await?;
        loop {
            if shutdown.is_cancelled() {
                let _ = self.store.revoke(lease).await;
                return Ok(None);
            }
            match self
                .store
                .create(LEADER, self.me.clone().into_bytes(), Some(lease))
                .await
            {
                Ok(Some(_)) => {
                    self.state.set(true, &self.me);
                    tracing::info!(leader = self.me, "elected leader");
                    return Ok(Some(lease));
                }
                Ok(None) => {}
                Err(StoreError::LeaseNotFound(_)) => {
                    lease = self.store.grant(self.ttl).await?;
                    continue;
                }
                Err(e) if e.to_string().contains("lease not found") => {
                    lease = self.store.grant(self.ttl).await?;
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
            // Someone else leads: note who, then wait for the key to go
            // (or a third of our TTL, to keep our own lease alive).
            let current = self.store.get(LEADER).await?;
            let Some(current) = current else { continue };
            self.state
                .set(false, &String::from_utf8_lossy(&current.value));
            let mut watch = self
                .store
                .watch(LEADER, Some(current.mod_revision + 1))
                .await?;
            let wait = async {
                while let Some(ev) = watch.next().await {
                    match ev {
                        Ok(ev) if ev.kind == EventKind::Delete && ev.kv.key == LEADER => return,
                        Ok(_) => {}
                        Err(_) => return,
                    }
                }
            };
            tokio::select! {
                _ = wait => {}
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(self.ttl / 3) => {}
            }
            if self.store.keepalive(lease).await.is_err() {
                lease = self.store.grant(self.ttl).await?;
            }
        }
    }

    /// Keeps leading on `lease` until leadership is lost (returns) or
    /// `shutdown` fires (resigns: revokes the lease, so a standby takes
    /// over at once).
    pub async fn hold(&self, lease: LeaseId, shutdown: &Shutdown) {
        let period = self.ttl / 3;
        let mut last_renewed = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    self.state.set(false, "");
                    let _ = self.store.revoke(lease).await;
                    tracing::info!("resigned leadership");
                    return;
                }
                _ = tokio::time::sleep(period) => {}
            }
            let renewed = tokio::time::timeout(period, self.store.keepalive(lease)).await;
            let still_mine = match renewed {
                Ok(Ok(())) => match self.store.get(LEADER).await {
                    Ok(Some(kv)) => kv.lease == Some(lease),
                    Ok(None) => false,
                    Err(_) => true, // unknown: the TTL check below decides
                },
                Ok(Err(StoreError::LeaseNotFound(_))) => false,
                _ => true,
            };
            if matches!(renewed, Ok(Ok(()))) && still_mine {
                last_renewed = tokio::time::Instant::now();
            }
            // Not renewed for most of a TTL: the lease may be gone already.
            if !still_mine || last_renewed.elapsed() > self.ttl * 2 / 3 {
                self.state.set(false, "");
                tracing::warn!("lost leadership; standing by");
                return;
            }
        }
    }
}

/// Campaigns, runs the main loop while leading, and campaigns again after
/// losing leadership, until `token` fires (then resigns).
pub(crate) async fn lead<S: Store>(
    store: S,
    election: Election<S>,
    tick: Duration,
    mut inbox: driver::LoopInbox,
    token: Shutdown,
    metrics: Metrics,
) {
    while !token.is_cancelled() {
        let lease = match election.campaign(&token).await {
            Ok(Some(lease)) => lease,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "campaign failed; retrying");
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(tick) => continue,
                }
            }
        };
        let term = Shutdown::new();
        let hold = election.hold(lease, &token);
        let run = driver::run(
            store.clone(),
            tick,
            &mut inbox,
            term.clone(),
            metrics.clone(),
        );
        tokio::pin!(hold, run);
        tokio::select! {
            _ = &mut hold => {
                term.cancel();
                let _ = run.await;
            }
            _ = &mut run => {
                // The loop ends only when every handle is gone: shutting down.
                hold.await;
                return;
            }
        }
    }
}
