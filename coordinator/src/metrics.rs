//! Prometheus metrics in the text exposition format, served over HTTP/1.1
//! (HTTPS when the coordinator has TLS) on their own listener
//! (`GET /metrics`).
//!
//! Gauges that describe state — jobs by state, tasks by state, live
//! workers — are read from the store at scrape time, so every coordinator
//! (leader or standby) reports the same truth. Counters and RPC latency
//! histograms are this process's own, since its start.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::driver::{Shutdown, SESSIONS};
use crate::ledger::Ledger;
use crate::store::Store;
use crate::tasks::{TaskState, Tasks};

/// Upper bounds (seconds) of the RPC latency histogram buckets.
const BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

#[derive(Debug, Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// This process's counters; cheap to clone (shared).
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    /// Worker sessions whose lease expired (seen by the leader).
    pub session_expiries: Arc<AtomicU64>,
    /// Task leases taken over after their deadline passed.
    pub task_lease_expiries: Arc<AtomicU64>,
    /// Backup attempts started for straggling tasks.
    pub speculative_leases: Arc<AtomicU64>,
    rpc: Arc<Mutex<BTreeMap<&'static str, Histogram>>>,
}

/// Records an RPC's latency when dropped.
pub struct RpcTimer {
    metrics: Metrics,
    method: &'static str,
    start: Instant,
}

impl Drop for RpcTimer {
    fn drop(&mut self) {
        let secs = self.start.elapsed().as_secs_f64();
        if let Ok(mut m) = self.metrics.rpc.lock() {
            let h = m.entry(self.method).or_default();
            for (i, le) in BUCKETS.iter().enumerate() {
                if secs <= *le {
                    h.counts[i] += 1;
                }
            }
            h.count += 1;
            h.sum += secs;
        }
    }
}

impl Metrics {
    /// Starts timing one call of `method`.
    pub fn time(&self, method: &'static str) -> RpcTimer {
        RpcTimer {
            metrics: self.clone(),
            method,
            start: Instant::now(),
        }
    }

    /// The exposition text: store gauges plus this process's counters.
    pub async fn render<S: Store>(&self, store: &S) -> String {
        let mut out = String::new();
        let mut jobs: BTreeMap<&str, u64> = crate::job::JobState::all()
            .iter()
            .map(|s| (s.name(), 0))
            .collect();
        if let Ok((list, _)) = Ledger::new(store.clone()).list().await {
            for j in list {
                *jobs.entry(j.value.state.name()).or_default() += 1;
            }
        }
        out += "# HELP distill_jobs Jobs by lifecycle state.\n# TYPE distill_jobs gauge\n";
        for (state, n) in jobs {
            let _ = writeln!(out, "distill_jobs{{state=\"{state}\"}} {n}");
        }
        let mut tasks: BTreeMap<&str, u64> = ["pending", "leased", "committed", "failed"]
            .into_iter()
            .map(|s| (s, 0))
            .collect();
        if let Ok(list) = Tasks::new(store.clone()).list("").await {
            for t in list {
                let s = match t.value.state {
                    TaskState::Pending { .. } => "pending",
                    TaskState::Leased { .. } => "leased",
                    TaskState::Committed { .. } => "committed",
                    TaskState::Failed { .. } => "failed",
                };
                *tasks.entry(s).or_default() += 1;
            }
        }
        out += "# HELP distill_tasks Teacher-signal tasks by state.\n# TYPE distill_tasks gauge\n";
        for (state, n) in tasks {
            let _ = writeln!(out, "distill_tasks{{state=\"{state}\"}} {n}");
        }
        let live = store
            .range(SESSIONS)
            .await
            .map(|(kv, _)| kv.len())
            .unwrap_or(0);
        out += "# HELP distill_live_workers Worker sessions alive now.\n# TYPE distill_live_workers gauge\n";
        let _ = writeln!(out, "distill_live_workers {live}");
        out += "# HELP distill_lease_expiries_total Leases that expired, by kind.\n# TYPE distill_lease_expiries_total counter\n";
        let _ = writeln!(
            out,
            "distill_lease_expiries_total{{kind=\"session\"}} {}",
            self.session_expiries.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "distill_lease_expiries_total{{kind=\"task\"}} {}",
            self.task_lease_expiries.load(Ordering::Relaxed)
        );
        out += "# HELP distill_speculative_leases_total Backup attempts of straggling tasks.\n# TYPE distill_speculative_leases_total counter\n";
        let _ = writeln!(
            out,
            "distill_speculative_leases_total {}",
            self.speculative_leases.load(Ordering::Relaxed)
        );
        out += "# HELP distill_rpc_duration_seconds gRPC handler latency.\n# TYPE distill_rpc_duration_seconds histogram\n";
        if let Ok(m) = self.rpc.lock() {
            for (method, h) in m.iter() {
                for (i, le) in BUCKETS.iter().enumerate() {
                    let _ = writeln!(
                        out,
                        "distill_rpc_duration_seconds_bucket{{method=\"{method}\",le=\"{le}\"}} {}",
                        h.counts[i]
                    );
                }
                let _ = writeln!(
                    out,
                    "distill_rpc_duration_seconds_bucket{{method=\"{method}\",le=\"+Inf\"}} {}",
                    h.count
                );
                let _ = writeln!(
                    out,
                    "distill_rpc_duration_seconds_sum{{method=\"{method}\"}} {}",
                    h.sum
                );
                let _ = writeln!(
                    out,
                    "distill_rpc_duration_seconds_count{{method=\"{method}\"}} {}",
                    h.count
                );
            }
        }
        out
    }
}

/// Serves `GET /metrics` (HTTP/1.1, one request per connection) on
/// `listener` until `shutdown` fires; over TLS when `tls` is given (a
/// failed handshake, e.g. no client certificate under mutual TLS, closes
/// that connection only).
pub async fn serve_metrics<S: Store>(
    store: S,
    metrics: Metrics,
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: Shutdown,
) {
    loop {
        let (conn, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            c = listener.accept() => match c {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    continue;
                }
            },
        };
        let (store, metrics, tls) = (store.clone(), metrics.clone(), tls.clone());
        tokio::spawn(async move {
            let limit = std::time::Duration::from_secs(5);
            match tls {
                None => answer(conn, &store, &metrics).await,
                Some(tls) => match tokio::time::timeout(limit, tls.accept(conn)).await {
                    Ok(Ok(conn)) => answer(conn, &store, &metrics).await,
                    Ok(Err(e)) => tracing::debug!(error = %e, "metrics TLS handshake failed"),
                    Err(_) => tracing::debug!("metrics TLS handshake timed out"),
                },
            }
        });
    }
}

/// Reads one request from `conn` and answers it.
async fn answer<S: Store, C: AsyncRead + AsyncWrite + Unpin>(
    mut conn: C,
    store: &S,
    metrics: &Metrics,
) {
    let mut buf = vec![0u8; 4096];
    let n = match tokio::time::timeout(std::time::Duration::from_secs(5), conn.read(&mut buf)).await
    {
        Ok(Ok(n)) => n,
        _ => return,
    };
    let head = String::from_utf8_lossy(&buf[..n]);
    let (status, body) = if head.starts_with("GET /metrics ") {
        ("200 OK", metrics.render(store).await)
    } else {
        ("404 Not Found", "not found\n".to_string())
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = conn.write_all(reply.as_bytes()).await;
    let _ = conn.shutdown().await;
}
