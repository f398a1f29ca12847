//! Simulated workers and clients over the real gRPC APIs, for integration
//! tests and load benchmarks (no libtorch: a "task" is a short sleep).
//!
//! Both are given a list of coordinator endpoints and follow the leader:
//! a call that fails because the endpoint is down (transport error) or is a
//! standby (`UNAVAILABLE`) moves on to the next endpoint and is retried,
//! until a deadline. This is the failover behaviour real workers and the
//! CLI are expected to have.

use std::future::Future;
use std::time::Duration;

use distill_proto::v1 as pb;
use pb::job_service_client::JobServiceClient;
use pb::worker_service_client::WorkerServiceClient;
use tonic::transport::ClientTlsConfig;
use tonic::Code;
/// Re-exported so tests of crates without a tonic dependency can name it.
pub use tonic::Status;

use distill_proto::client::{authed, Endpoints};

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
            collective_protocol: distill_proto::COLLECTIVE_PROTOCOL,
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
            progress: vec![],
        };
        self.endpoints
            .call(|ch, token| {
                let req = authed(req.clone(), token);
                async move { WorkerServiceClient::new(ch).heartbeat(req).await }
            })
            .await
    }

    ///
    /// A simulated worker takes no part in training groups: a *member*
    /// lease (another worker holds the training task) reads as no work.
    pub async fn lease(&mut self) -> Result<pb::LeaseTaskResponse, Status> {
        let req = pb::LeaseTaskRequest {
            session_id: self.session_id(),
        };
        let mut r = self
            .endpoints
            .call(|ch, token| {
                let req = authed(req.clone(), token);
                async move { WorkerServiceClient::new(ch).lease_task(req).await }
            })
            .await?;
        if r.task.as_ref().is_some_and(|t| t.member) {
            r.task = None;
        }
        Ok(r)
    }

    /// Reports success for `task` (the manifest names the attempt).
    pub async fn report_success(&mut self, task: &pb::Task) -> Result<bool, Status> {
        let r = task.r#ref.clone().unwrap_or_default();
        let req = pb::ReportTaskRequest {
            session_id: self.session_id(),
            outcome: Some(pb::report_task_request::Outcome::Success(pb::TaskSuccess {
                manifest_uri: format!("sim://{}/{}/{}", self.name, r.task_id, r.attempt),
                manifest_sha256: sim_digest(&format!("{}/{}/{}", self.name, r.task_id, r.attempt)),
                samples: task.shard_end - task.shard_start,
                reused: false,
                outputs: vec![],
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
            output_dir: String::new(),
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
/// A stand-in manifest digest (64 hex digits) for a simulated output.
fn sim_digest(s: &str) -> String {
    use std::hash::{Hash, Hasher};
    (0..4)
        .map(|i| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (i, s).hash(&mut h);
            format!("{:016x}", h.finish())
        })
        .collect()
}
