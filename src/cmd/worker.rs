//! `distill worker`: a cluster worker process (see
//! `distill_worker::agent`). It registers with the coordinator, heartbeats,
//! leases tasks (teacher-signal shards, training, evaluation) and runs them
//! on a dedicated libtorch thread; SIGTERM or Ctrl-C gives the running
//! task back and exits 0.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use distill_worker::agent::{serve, Options, TlsFiles};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Coordinator endpoints, comma separated (`http://host:7070,...`;
    /// `https://` with --tls-ca). Calls follow the leader; an unreachable
    /// coordinator is retried with backoff, never given up on.
    #[arg(
        long,
        value_delimiter = ',',
        required = true,
        env = "DISTILL_COORDINATOR"
    )]
    pub coordinator: Vec<String>,
    /// Bearer token of the worker API (the coordinator's --worker-token).
    #[arg(long, env = "DISTILL_WORKER_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM CA certificate(s) the coordinator's certificate chains to.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (needs --tls-key and --tls-ca).
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Name to verify the coordinator's certificate against, instead of the
    /// endpoint's host.
    #[arg(long, requires = "tls_ca")]
    pub tls_domain: Option<String>,
    /// The device this worker runs on: `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub devices: String,
    /// libtorch CPU threads (at least 1; default: libtorch's choice).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
    pub threads: Option<i32>,
    /// Directory that relative paths in job specs (teacher, data) are
    /// resolved against: the worker runs there (default: the current
    /// directory).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Name shown in the coordinator's logs (default: host name and pid).
    #[arg(long)]
    pub name: Option<String>,
    /// The longest pause between two tries against an unreachable
    /// coordinator.
    #[arg(long, default_value_t = 5000)]
    pub max_backoff_ms: u64,
    /// Address peers reach this worker's collectives on: its rendezvous
    /// store listens there, and the Gloo transport binds to the host.
    #[arg(long, default_value = "127.0.0.1")]
    pub collective_host: String,
    /// Port of this worker's rendezvous store (0: any free port; it is
    /// sent to the coordinator on registration).
    #[arg(long, default_value_t = 0)]
    pub collective_port: u16,
    /// Deadline of a training group's rendezvous and of each collective
    /// (all-reduce, broadcast, barrier). A dead peer fails a collective at
    /// once; a frozen one at this deadline, or sooner when the coordinator
    /// evicts it.
    #[arg(long, default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(100..))]
    pub collective_timeout_ms: u64,
    /// Engine of the training groups' collectives: `nccl` (CUDA tensors,
    /// one GPU per rank; builds with the `nccl` feature), `gloo` (any
    /// device; CUDA tensors are staged through host memory), or `auto`:
    /// nccl when the student trains on CUDA and the build has it, gloo
    /// otherwise. Every worker of a cluster must resolve to the same one.
    #[arg(long, default_value = "auto", env = "DISTILL_COLLECTIVE_BACKEND")]
    pub collective_backend: distill_worker::collective::BackendChoice,
    /// Where fine-tuned teachers are shared between jobs: a directory, or
    /// `off` (default: `<artifact root>/teachers`, beside the teacher-signal
    /// shards). A job whose teacher would be fine-tuned exactly as an earlier
    /// job's (same teacher files, labelled and eval data, teacher budget,
    /// seed, device kind) takes it from there instead of fine-tuning again.
    #[arg(long, env = "DISTILL_TEACHER_CACHE")]
    pub teacher_cache: Option<String>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if let Some(d) = &a.work_dir {
        std::env::set_current_dir(d).with_context(|| format!("--work-dir {}", d.display()))?;
    }
    let device = distill_worker::device::parse_device(&a.devices)
        .with_context(|| format!("--devices {}", a.devices))?;
    let name = a.name.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "worker".into());
        format!("{host}-{}", std::process::id())
    });
    let opts = Options {
        coordinators: a.coordinator.clone(),
        token: a.token.clone(),
        tls: a.tls_ca.clone().map(|ca| TlsFiles {
            ca,
            identity: a.tls_cert.clone().zip(a.tls_key.clone()),
            domain: a.tls_domain.clone(),
        }),
        device,
        threads: a.threads,
        name,
        max_backoff: Duration::from_millis(a.max_backoff_ms.max(10)),
        collective_host: a.collective_host.clone(),
        collective_port: a.collective_port,
        collective_timeout: Duration::from_millis(a.collective_timeout_ms),
        collective_backend: a.collective_backend,
        teachers: a
            .teacher_cache
            .as_deref()
            .map(distill_worker::teachers::TeacherCache::parse)
            .unwrap_or_default(),
    };
    // A small runtime for RPC and heartbeats; libtorch has its own thread.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("install a SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::info!("shutdown requested");
        };
        serve(opts, shutdown).await
    })?;
    Ok(())
}
