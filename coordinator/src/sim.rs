//! Simulated workers and clients over the real gRPC APIs, for integration
//! tests and load benchmarks (no libtorch: a "task" is a short sleep).
//!
//! Both are given a list of coordinator endpoints and follow the leader:
//! a call that fails because the endpoint is down (transport error) or is a
//! standby (`UNAVAILABLE`) moves on to the next endpoint and is retried,
//! until a deadline. This is the failover behaviour real workers and the
//! CLI are expected to have.

use std::future::Future;
use std::time::{Duration, Instant};

use distill_proto::v1 as pb;
use pb::job_service_client::JobServiceClient;
use pb::worker_service_client::WorkerServiceClient;
use tonic::transport::{Channel, ClientTlsConfig};
use tonic::Code;
/// Re-exported so tests of crates without a tonic dependency can name it.
pub use tonic::Status;

/// How long one call keeps failing over before giving up.
const FAILOVER_DEADLINE: Duration = Duration::from_secs(60);

/// Endpoint rotation shared by workers and clients.
#[derive(Debug, Clone)]
struct Endpoints {
    list: Vec<String>,
    current: usize,
    channel: Option<Channel>,
    /// Sent as `authorization: Bearer <token>` when set.
    token: Option<String>,
    /// TLS for `https://` endpoints.
    tls: Option<ClientTlsConfig>,
}

impl Endpoints {
    fn new(list: Vec<String>) -> Self {
        assert!(!list.is_empty(), "at least one endpoint");
        Self {
            list,
            current: 0,
            channel: None,
            token: None,
            tls: None,
        }
    }

    async fn channel(&mut self) -> Option<Channel> {
        if self.channel.is_none() {
            let ep = tonic::transport::Endpoint::from_shared(self.list[self.current].clone())
                .ok()?
                .connect_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(10));
            let ep = match &self.tls {
                Some(tls) => ep.tls_config(tls.clone()).ok()?,
                None => ep,
            };
            // On failure the caller moves on to the next endpoint.
            self.channel = Some(ep.connect().await.ok()?);
        }
        self.channel.clone()
    }

    fn next(&mut self) {
        self.channel = None;
        self.current = (self.current + 1) % self.list.len();
    }

    /// Calls `f` on a channel to the current endpoint, failing over on
    /// errors that mean "not here" (down, or a standby).
    async fn call<T, F, Fut>(&mut self, mut f: F) -> Result<T, Status>
    where
        F: FnMut(Channel, Option<String>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let deadline = Instant::now() + FAILOVER_DEADLINE;
        let mut pause = Duration::from_millis(10);
        loop {
            let result = match self.channel().await {
                Some(ch) => f(ch, self.token.clone())
                    .await
                    .map(tonic::Response::into_inner),
                None => Err(Status::unavailable("cannot connect")),
            };
            match result {
                Err(s) if failover(&s) && Instant::now() < deadline => {
                    self.next();
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(200));
                }
                other => return other,
            }
        }
    }
}

/// Whether an error means "try another endpoint": anything but an answer
/// about the request itself. A connection cut mid-call (a coordinator
/// killed) surfaces as `UNKNOWN`, `INTERNAL` or `CANCELLED` depending on
/// where the stream broke.
fn failover(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::Internal
            | Code::DeadlineExceeded
            | Code::Aborted
    )
}

/// A simulated worker: one session, leases tasks and "runs" each for
/// `work`, heartbeating (with the task) at the interval the coordinator
/// gave at registration, then reports success; a task the coordinator
/// aborts (committed by another attempt, cancelled) is dropped.
#[derive(Debug, Clone)]
pub struct SimWorker {
    pub name: String,
    endpoints: Endpoints,
    session: Option<String>,
    /// Simulated time per task.
    pub work: Duration,
    heartbeat_every: Duration,
}

/// What a simulated worker did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkLog {
    /// (job, task, attempt) this worker's report committed.
    pub committed: Vec<(String, String, u64)>,
    /// Reports answered "already committed by another attempt".
    pub discarded: usize,
    /// Reports refused as stale.
    pub stale: usize,
    /// Tasks dropped mid-work because a heartbeat said abort.
    pub aborted: Vec<(String, String, u64)>,
    pub registrations: usize,
}

impl SimWorker {
    pub fn new(name: impl Into<String>, endpoints: Vec<String>) -> Self {
        Self {
            name: name.into(),
            endpoints: Endpoints::new(endpoints),
            session: None,
            work: Duration::ZERO,
            heartbeat_every: Duration::from_secs(1),
        }
    }

    /// Authenticates with the worker bearer token.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.endpoints.token = Some(token.into());
        self
    }

    /// Connects over TLS (endpoints must be `https://`).
    pub fn with_tls(mut self, tls: ClientTlsConfig) -> Self {
        self.endpoints.tls = Some(tls);
        self
    }

    pub fn session(&self) -> Option<&str> {
        self.session.as_deref()
    }

    /// Opens a (new) session.
    pub async fn register(&mut self) -> Result<pb::RegisterResponse, Status> {
        let req = pb::RegisterRequest {
            worker_name: self.name.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            devices: vec![pb::Device {
                name: "cpu".into(),
                memory_bytes: 0,
            }],
            ..Default::default()
        };
        let r = self
            .endpoints
            .call(|ch, token| {
                let req = authed(req.clone(), token);
                async move { WorkerServiceClient::new(ch).register(req).await }
            })
            .await?;
        self.session = Some(r.session_id.clone());
        if r.heartbeat_interval_ms > 0 {
            self.heartbeat_every = Duration::from_millis(r.heartbeat_interval_ms);
        }
        Ok(r)
    }

    fn session_id(&self) -> String {
        self.session.clone().unwrap_or_default()
    }

    pub async fn heartbeat(
        &mut self,
        running: Vec<pb::TaskRef>,
    ) -> Result<pb::HeartbeatResponse, Status> {
        let req = pb::HeartbeatRequest {
            session_id: self.session_id(),
            running,
        };
        self.endpoints
            .call(|ch, token| {
                let req = authed(req.clone(), token);
                async move { WorkerServiceClient::new(ch).heartbeat(req).await }
            })
            .await
    }

    pub async fn lease(&mut self) -> Result<pb::LeaseTaskResponse, Status> {
        let req = pb::LeaseTaskRequest {
            session_id: self.session_id(),
        };
        self.endpoints
            .call(|ch, token| {
                let req = authed(req.clone(), token);
                async move { WorkerServiceClient::new(ch).lease_task(req).await }
            })
            .await
    }

    /// Reports success for `task` (the manifest names the attempt).
    pub async fn report_success(&mut self, task: &pb::Task) -> Result<bool, Status> {
        let r = task.r#ref.clone().unwrap_or_default();
        let req = pb::ReportTaskRequest {
            session_id: self.session_id(),
            outcome: Some(pb::report_task_request::Outcome::Success(pb::TaskSuccess {
                manifest_uri: format!("sim://{}/{}/{}", self.name, r.task_id, r.attempt),
                manifest_sha256: "00".into(),
                samples: task.shard_end - task.shard_start,
            })),
            r#ref: Some(r),
        };
        self.endpoints
            .call(|ch, token| {
                let req = authed(req.clone(), token);
                async move { WorkerServiceClient::new(ch).report_task(req).await }
            })
            .await
            .map(|r| r.committed)
    }

    /// Works until `stop` resolves: registers (again whenever told to),
    /// leases, simulates each task, reports it.
    pub async fn run(mut self, stop: impl Future<Output = ()>) -> Result<WorkLog, Status> {
        let mut log = WorkLog::default();
        tokio::pin!(stop);
        loop {
            if self.session.is_none() {
                self.register().await?;
                log.registrations += 1;
            }
            let leased = tokio::select! {
                _ = &mut stop => return Ok(log),
                r = self.lease() => r,
            };
            let leased = match leased {
                Ok(r) => r,
                Err(s) if s.code() == Code::FailedPrecondition => {
                    self.session = None; // session expired: register again
                    continue;
                }
                Err(s) => return Err(s),
            };
            let Some(task) = leased.task else {
                let pause = Duration::from_millis(leased.retry_after_ms.clamp(10, 1000));
                tokio::select! {
                    _ = &mut stop => return Ok(log),
                    _ = tokio::time::sleep(pause) => continue,
                }
            };
            let r = task.r#ref.clone().unwrap_or_default();
            let mut expired = false;
            let mut left = self.work;
            let mut aborted = false;
            while !left.is_zero() {
                let step = if expired {
                    left
                } else {
                    left.min(self.heartbeat_every)
                };
                tokio::select! {
                    _ = &mut stop => return Ok(log),
                    _ = tokio::time::sleep(step) => {}
                }
                left -= step;
                if expired {
                    break;
                }
                let hb = self.heartbeat(vec![r.clone()]).await?;
                // An expired session still finishes and reports: the
                // attempt number alone decides whether the output counts.
                expired = hb.reregister;
                aborted = hb.abort.contains(&r) && !expired;
                if aborted {
                    break;
                }
            }
            if aborted {
                log.aborted.push((r.job_id, r.task_id, r.attempt));
                continue;
            }
            match self.report_success(&task).await {
                Ok(true) => log.committed.push((r.job_id, r.task_id, r.attempt)),
                Ok(false) => log.discarded += 1,
                Err(s) if s.code() == Code::FailedPrecondition => log.stale += 1,
                Err(s) => return Err(s),
            }
            if expired {
                self.session = None;
            }
        }
    }
}

/// A job client that follows the leader across `endpoints`.
#[derive(Debug, Clone)]
pub struct SimClient {
    endpoints: Endpoints,
}

impl SimClient {
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints: Endpoints::new(endpoints),
        }
    }

    /// Authenticates with the client bearer token.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.endpoints.token = Some(token.into());
        self
    }

    /// Connects over TLS (endpoints must be `https://`).
    pub fn with_tls(mut self, tls: ClientTlsConfig) -> Self {
        self.endpoints.tls = Some(tls);
        self
    }

    pub async fn submit(&mut self, spec: &str, priority: i32) -> Result<pb::Job, Status> {
        let req = pb::SubmitJobRequest {
            spec: spec.into(),
            format: pb::SpecFormat::Toml as i32,
            priority,
            // Retried submissions after a failover must not create twins.
            request_id: format!(
                "sim-{}-{}",
                now_nanos(),
                NEXT_REQUEST.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ),
        };
        self.endpoints
            .call(|ch, token| {
                let req = authed(req.clone(), token);
                async move { JobServiceClient::new(ch).submit_job(req).await }
            })
            .await
            .map(|r| r.job.unwrap_or_default())
    }

    pub async fn get(&mut self, job_id: &str) -> Result<pb::Job, Status> {
        let req = pb::GetJobRequest {
            job_id: job_id.into(),
        };
        self.endpoints
            .call(|ch, token| {
                let req = authed(req.clone(), token);
                async move { JobServiceClient::new(ch).get_job(req).await }
            })
            .await
    }

    pub async fn cancel(&mut self, job_id: &str, reason: &str) -> Result<pb::Job, Status> {
        let req = pb::CancelJobRequest {
            job_id: job_id.into(),
            reason: reason.into(),
        };
        self.endpoints
            .call(|ch, token| {
                let req = authed(req.clone(), token);
                async move { JobServiceClient::new(ch).cancel_job(req).await }
            })
            .await
    }
}

static NEXT_REQUEST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn now_nanos() -> usize {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as usize)
        .unwrap_or_default()
}

/// `msg` with `authorization: Bearer <token>` when a token is set.
fn authed<T>(msg: T, token: Option<String>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Some(t) = token.and_then(|t| format!("Bearer {t}").parse().ok()) {
        req.metadata_mut().insert("authorization", t);
    }
    req
}
