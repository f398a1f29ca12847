//! Test support shared by this crate's tests and other crates' tests: a real
//! `etcd` on free loopback ports in a temp dir (killed on drop), and a
//! poll-with-timeout helper. No mocks of etcd; no fixed sleeps.

use std::future::Future;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::store::EtcdStore;

/// A private etcd server for one test.
pub struct EtcdServer {
    child: Child,
    endpoint: String,
    _dir: tempfile::TempDir,
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl EtcdServer {
    /// Starts `etcd` (from `PATH`) and waits until it answers, retrying with
    /// new ports if a port was taken between picking and binding.
    pub async fn start() -> anyhow::Result<Self> {
        let mut last_err = None;
        for _ in 0..3 {
            match Self::try_start().await {
                Ok(s) => return Ok(s),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.expect("at least one attempt"))
    }

    async fn try_start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let (client, peer) = (free_port()?, free_port()?);
        let endpoint = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.path().join("etcd.log"))?;
        let child = Command::new("etcd")
            .arg("--name=test")
            .arg(format!("--data-dir={}", dir.path().join("data").display()))
            .arg(format!("--listen-client-urls={endpoint}"))
            .arg(format!("--advertise-client-urls={endpoint}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=test={peer_url}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start etcd (is it on PATH?): {e}"))?;
        let mut server = Self {
            child,
            endpoint,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = server.child.try_wait()? {
                let log = std::fs::read_to_string(server._dir.path().join("etcd.log"))
                    .unwrap_or_default();
                let tail: String = log.lines().rev().take(5).collect::<Vec<_>>().join("\n");
                anyhow::bail!("etcd exited early ({status}):\n{tail}");
            }
            if let Ok(store) =
                EtcdStore::connect(std::slice::from_ref(&server.endpoint), "/probe/").await
            {
                use crate::store::Store;
                if store.get("ready").await.is_ok() {
                    return Ok(server);
                }
            }
            if Instant::now() > deadline {
                anyhow::bail!("etcd did not become ready within 20s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The client URL, `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// A store handle whose keys live under `namespace`.
    pub async fn store(&self, namespace: &str) -> anyhow::Result<EtcdStore> {
        Ok(EtcdStore::connect(std::slice::from_ref(&self.endpoint), namespace).await?)
    }

    /// Kills the server now (it is also killed on drop).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `check` every 20 ms until it returns `Some`, failing after `timeout`
/// with a message naming `what`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the coordinator at `url` (`http://host:port`) accepts
/// connections and leads (answers instead of refusing as a standby).
pub async fn wait_serving(url: &str, timeout: Duration) -> anyhow::Result<()> {
    use distill_proto::v1::job_service_client::JobServiceClient;
    wait_for(timeout, &format!("{url} to lead"), || async move {
        let mut c = JobServiceClient::connect(url.to_string()).await.ok()?;
        c.list_jobs(distill_proto::v1::ListJobsRequest::default())
            .await
            .ok()
            .map(|_| ())
    })
    .await
}

/// A coordinator served by this process on loopback (`127.0.0.1:0`), with
/// Prometheus metrics on a second port when asked; [`Served::stop`] shuts
/// it down and returns how serving ended.
pub struct Served {
    /// The gRPC listener's address (`HOST:PORT`).
    pub addr: std::net::SocketAddr,
    /// The metrics listener's address, when started with metrics.
    pub metrics: Option<std::net::SocketAddr>,
    stop: tokio::sync::oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<Result<(), crate::CoordinatorError>>,
}

impl Served {
    /// Binds the listeners and spawns `serve_full` on the current runtime.
    pub async fn start<S: crate::store::Store>(
        store: S,
        config: crate::Config,
        with_metrics: bool,
    ) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let metrics = match with_metrics {
            true => Some(tokio::net::TcpListener::bind("127.0.0.1:0").await?),
            false => None,
        };
        let addr = listener.local_addr()?;
        let metrics_addr = metrics.as_ref().map(|m| m.local_addr()).transpose()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(crate::serve_full(
            store,
            config,
            listener,
            metrics,
            async move {
                let _ = stopped.await;
            },
        ));
        Ok(Self {
            addr,
            metrics: metrics_addr,
            stop,
            handle,
        })
    }

    /// `http://HOST:PORT` of the gRPC listener.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Shuts the coordinator down and waits (at most 30 s) for it to stop.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .map_err(|_| anyhow::anyhow!("the coordinator did not stop within 30 s"))??
            .map_err(anyhow::Error::from)
    }
}
