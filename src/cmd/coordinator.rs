//! `distill coordinator`: the cluster control plane as a process.
//!
//! Keeps its state in etcd (`--etcd`, cluster mode) or in the embedded
//! on-disk store (`--state-dir`), binds `--listen` (port 0 picks a free
//! port), prints `{"listening":"HOST:PORT"}` (plus `"metrics"` with
//! `--metrics-listen`) as one JSON line on stdout once it accepts
//! connections, and serves until SIGINT or SIGTERM. With `--tls-cert`
//! and `--tls-key` both listeners speak TLS; `--tls-client-ca` makes it
//! mutual. Everything it
//! knows is in the store, so a restart (or a SIGKILL) loses nothing.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use distill_coordinator::auth::Tokens;
use distill_coordinator::tasks::Speculation;
use distill_coordinator::tls::ServerTlsFiles;
use distill_coordinator::{serve_with, Config, StoreConfig};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Address to serve the gRPC APIs on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// etcd endpoints, comma separated (`http://host:2379,...`): cluster mode.
    #[arg(
        long,
        value_delimiter = ',',
        conflicts_with = "state_dir",
        required_unless_present = "state_dir"
    )]
    pub etcd: Vec<String>,
    /// Directory of the embedded store (single node, no etcd).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Key prefix of this deployment in etcd.
    #[arg(long, default_value = "/distill/")]
    pub namespace: String,
    /// How often workers heartbeat.
    #[arg(long, default_value_t = 1000)]
    pub heartbeat_interval_ms: u64,
    /// A worker is declared dead this long after its last heartbeat.
    #[arg(long, default_value_t = 5000)]
    pub session_timeout_ms: u64,
    /// A task lease lasts this long past the heartbeat that last renewed it
    /// (default: the session timeout).
    #[arg(long)]
    pub task_lease_ms: Option<u64>,
    /// With several coordinators on one etcd: a standby takes over at most
    /// this long after the leader dies.
    #[arg(long, default_value_t = 5000)]
    pub leader_ttl_ms: u64,
    /// Bearer token clients must present (job API); unset: open.
    #[arg(long, env = "DISTILL_CLIENT_TOKEN", hide_env_values = true)]
    pub client_token: Option<String>,
    /// Bearer token workers must present (worker API); unset: open.
    #[arg(long, env = "DISTILL_WORKER_TOKEN", hide_env_values = true)]
    pub worker_token: Option<String>,
    /// Serve Prometheus `GET /metrics` on this address (HTTPS with TLS).
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Speculative re-execution: a task running longer than this many times
    /// the median duration of its job's committed tasks gets a backup
    /// attempt on an idle worker; the first to commit wins (0: never).
    #[arg(long, default_value_t = 2.0)]
    pub speculation_factor: f64,
    /// Never back up a task that has run for less than this.
    #[arg(long, default_value_t = 1000)]
    pub speculation_min_ms: u64,
    /// PEM certificate chain: serve TLS on every listener (needs --tls-key).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s): require every client (workers, clients,
    /// scrapers) to present a certificate signed by it (mutual TLS).
    #[arg(long, requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Artifact root every worker writes to and reads from (a directory all
    /// of them see, e.g. a shared mount): teacher-signal shards under
    /// `signal/` (content-addressed, reused by later jobs), each job's
    /// checkpoints, student and report under `jobs/<job id>/`. A relative
    /// path is made absolute against this process's working directory.
    #[arg(long, default_value = "artifacts")]
    pub artifacts: PathBuf,
}

impl Args {
    fn store(&self) -> anyhow::Result<StoreConfig> {
        match (&self.state_dir, self.etcd.is_empty()) {
            (Some(dir), true) => Ok(StoreConfig::Embedded { dir: dir.clone() }),
            (None, false) => Ok(StoreConfig::Etcd {
                endpoints: self.etcd.clone(),
                namespace: self.namespace.clone(),
            }),
            _ => anyhow::bail!("give exactly one of --etcd and --state-dir"),
        }
    }

    fn config(&self) -> anyhow::Result<Config> {
        if self.heartbeat_interval_ms == 0 || self.session_timeout_ms <= self.heartbeat_interval_ms
        {
            anyhow::bail!(
                "--session-timeout-ms ({}) must be greater than --heartbeat-interval-ms ({}), which must be positive",
                self.session_timeout_ms,
                self.heartbeat_interval_ms
            );
        }
        let session_timeout = Duration::from_millis(self.session_timeout_ms);
        let artifacts = std::path::absolute(&self.artifacts)
            .map_err(|e| anyhow::anyhow!("--artifacts {}: {e}", self.artifacts.display()))?;
        Ok(Config {
            artifact_root: artifacts.display().to_string(),
            heartbeat_interval: Duration::from_millis(self.heartbeat_interval_ms),
            session_timeout,
            task_lease: self
                .task_lease_ms
                .map(Duration::from_millis)
                .unwrap_or(session_timeout),
            leader_ttl: Duration::from_millis(self.leader_ttl_ms.max(1000)),
            tokens: Tokens {
                client: self.client_token.clone(),
                worker: self.worker_token.clone(),
            },
            speculation: (self.speculation_factor > 0.0).then(|| Speculation {
                factor: self.speculation_factor,
                min_age_ms: self.speculation_min_ms as i64,
                ..Speculation::default()
            }),
            tls: match (&self.tls_cert, &self.tls_key) {
                (Some(cert), Some(key)) => Some(
                    ServerTlsFiles {
                        cert: cert.clone(),
                        key: key.clone(),
                        client_ca: self.tls_client_ca.clone(),
                    }
                    .load()?,
                ),
                _ => None,
            },
        })
    }
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let store = a.store()?;
    let config = a.config()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("coordinator")
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(a.listen).await?;
        let addr = listener.local_addr()?;
        let metrics = match a.metrics_listen {
            Some(m) => Some(tokio::net::TcpListener::bind(m).await?),
            None => None,
        };
        let mut ready = serde_json::json!({ "listening": addr.to_string() });
        if let Some(m) = &metrics {
            ready["metrics"] = m.local_addr()?.to_string().into();
        }
        println!("{ready}");
        use std::io::Write;
        std::io::stdout().flush()?;
        serve_with(store, config, listener, metrics, shutdown_signal()).await?;
        Ok(())
    })
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
    }
}
