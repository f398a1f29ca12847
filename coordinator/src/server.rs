//! The gRPC services (`JobService` for clients, `WorkerService` for workers)
//! over the ledger and the task table, and [`serve`].
//!
//! Prost types stop here: each handler converts its request into checked
//! domain values (naming a missing or bad field in `InvalidArgument`), calls
//! the ledger/task layer, and converts back. Every error goes through the one
//! `CoordinatorError → Status` mapping. Handlers keep no state of their own:
//! everything is in the store, so a restarted coordinator serves on at once.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use distill_proto::v1 as pb;
use pb::job_service_server::{JobService, JobServiceServer};
use pb::worker_service_server::{WorkerService, WorkerServiceServer};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

use crate::auth::{Role, Tokens};
use crate::convert::{parse_session, required, Report, Submit};
use crate::driver::{self, Event, LoopHandle, Shutdown, ASSIGNMENTS};
use crate::election::Election;
use crate::error::CoordinatorError;
use crate::groups::{Commit, Groups, Join};
use crate::job::{JobEvent, JobState};
use crate::ledger::{Ledger, Versioned};
use crate::metrics::{serve_metrics, Metrics};
use crate::store::{EmbeddedStore, EtcdStore, LeaseId, Store, StoreError};
use crate::tasks::{LeaseKind, Reported, Speculation, TaskKind, TaskState, Tasks};
use crate::tls::ServerTls;

/// Timing knobs of the worker protocol.
#[derive(Debug, Clone)]
pub struct Config {
    /// How often workers heartbeat.
    pub heartbeat_interval: Duration,
    /// A worker is declared dead this long after its last heartbeat (its
    /// session lease in the store expires).
    pub session_timeout: Duration,
    /// A task lease lasts this long past the last heartbeat that renewed it.
    pub task_lease: Duration,
    /// A standby takes over at most this long after the leader dies.
    pub leader_ttl: Duration,
    /// Bearer tokens of the client and worker APIs (unset: open).
    pub tokens: Tokens,
    /// TLS on both listeners (gRPC and metrics); unset: plaintext.
    pub tls: Option<ServerTls>,
    /// When stragglers get a speculative backup (`None`: never).
    pub speculation: Option<Speculation>,
    /// Where workers write artifacts (a path every worker sees): shards
    /// under `signal/`, each job's outputs under `jobs/<id>/`.
    pub artifact_root: String,
}

impl Default for Config {
    /// Detects a dead worker in about 5 s.
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(1),
            session_timeout: Duration::from_secs(5),
            task_lease: Duration::from_secs(5),
            leader_ttl: Duration::from_secs(5),
            tokens: Tokens::default(),
            tls: None,
            speculation: Some(Speculation::default()),
            artifact_root: "artifacts".into(),
        }
    }
}

/// Where the coordinator keeps its state.
#[derive(Debug, Clone)]
pub enum StoreConfig {
    /// Cluster mode: etcd endpoints (`http://host:2379`) and a key namespace.
    Etcd {
        endpoints: Vec<String>,
        namespace: String,
    },
    /// `distill run`: the embedded on-disk store in `dir`.
    Embedded { dir: PathBuf },
}

/// Opens the configured store and serves both gRPC services on `listener`
/// until `shutdown` resolves.
pub async fn serve_with(
    store: StoreConfig,
    config: Config,
    listener: TcpListener,
    metrics: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), CoordinatorError> {
    match store {
        StoreConfig::Etcd {
            endpoints,
            namespace,
        } => {
            serve_full(
                EtcdStore::connect(&endpoints, &namespace).await?,
                config,
                listener,
                metrics,
                shutdown,
            )
            .await
        }
        StoreConfig::Embedded { dir } => {
            serve_full(
                EmbeddedStore::open(&dir)?,
                config,
                listener,
                metrics,
                shutdown,
            )
            .await
        }
    }
}

/// Serves `JobService` and `WorkerService` over `store` on `listener` (bind
/// it to `127.0.0.1:0` in tests) until `shutdown` resolves.
pub async fn serve<S: Store>(
    store: S,
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), CoordinatorError> {
    serve_full(store, config, listener, None, shutdown).await
}

/// [`serve`], plus Prometheus `GET /metrics` on `metrics` when given.
pub async fn serve_full<S: Store>(
    store: S,
    config: Config,
    listener: TcpListener,
    metrics: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), CoordinatorError> {
    let (handle, inbox) = driver::channel();
    let token = Shutdown::new();
    let me = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let election = Election::new(store.clone(), config.leader_ttl, me);
    let gate = election.state.clone();
    let counters = Metrics::default();
    let leadership = tokio::spawn(crate::election::lead(
        store.clone(),
        election,
        config.heartbeat_interval,
        inbox,
        token.clone(),
        counters.clone(),
    ));
    let scrape = metrics.map(|l| {
        tokio::spawn(serve_metrics(
            store.clone(),
            counters.clone(),
            l,
            config.tls.as_ref().map(|t| t.metrics.clone()),
            token.clone(),
        ))
    });
    let tokens = config.tokens.clone();
    let tls = config.tls.clone();
    let mut svc = Coordinator::new(store, config, handle);
    svc.metrics = counters;
    tracing::info!(addr = ?listener.local_addr().ok(), "coordinator serving");
    // Only the leader answers; a standby refuses with UNAVAILABLE (naming
    // the leader) so that clients with an endpoint list move on.
    // Tokens first: an unauthenticated caller learns nothing, not even who
    // leads.
    let check = move |role: Role| {
        let (gate, tokens) = (gate.clone(), tokens.clone());
        move |req: Request<()>| {
            let header = req
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok());
            let refused = match tokens.check(role, header) {
                Err(e) => e,
                Ok(()) if gate.is_leader() => return Ok(req),
                Ok(()) => gate.refusal(),
            };
            Err(Status::new(refused.code(), refused.to_string()))
        }
    };
    let stop = token.clone();
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls.grpc)
            .map_err(|e| CoordinatorError::Internal(format!("grpc TLS: {e}")))?;
    }
    let served = builder
        .add_service(JobServiceServer::with_interceptor(
            svc.clone(),
            check(Role::Client),
        ))
        .add_service(WorkerServiceServer::with_interceptor(
            svc,
            check(Role::Worker),
        ))
        .serve_with_incoming_shutdown(
            // No Nagle: small replies must not wait for a delayed ACK.
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            async move {
                tokio::select! {
                    _ = shutdown => {}
                    _ = stop.cancelled() => {}
                }
            },
        )
        .await
        .map_err(|e| CoordinatorError::Internal(format!("grpc server: {e}")));
    token.cancel();
    if let Some(scrape) = scrape {
        let _ = scrape.await;
    }
    if let Err(e) = leadership.await {
        return Err(CoordinatorError::Internal(format!("leadership task: {e}")));
    }
    served
}

/// Both services over one store.
#[derive(Debug, Clone)]
pub struct Coordinator<S> {
    ledger: Ledger<S>,
    tasks: Tasks<S>,
    config: Config,
    events: LoopHandle,
    metrics: Metrics,
}

impl<S: Store> Coordinator<S> {
    pub fn new(store: S, config: Config, events: LoopHandle) -> Self {
        Self {
            ledger: Ledger::new(store.clone()),
            tasks: Tasks::new(store).with_speculation(config.speculation),
            config,
            events,
            metrics: Metrics::default(),
        }
    }

    /// The job `session` is assigned to, asking the main loop to schedule
    /// it first when it has none.
    async fn assignment(&self, session: &str) -> Result<Option<String>, CoordinatorError> {
        let key = format!("{ASSIGNMENTS}{session}");
        if let Some(kv) = self.store().get(&key).await? {
            return Ok(Some(String::from_utf8_lossy(&kv.value).into()));
        }
        let idle = Event::WorkerIdle {
            session_id: session.to_string(),
        };
        self.events
            .send_and_wait(idle, self.config.heartbeat_interval * 2)
            .await;
        Ok(self
            .store()
            .get(&key)
            .await?
            .map(|kv| String::from_utf8_lossy(&kv.value).into()))
    }

    fn store(&self) -> &S {
        self.ledger.store()
    }

    /// Appends to job `job`'s log on behalf of the worker of `session`
    /// (named as it registered).
    async fn log(&self, job: &str, session: &str, message: String) {
        let name = match self.store().get(&format!("sessions/{session}")).await {
            Ok(Some(kv)) => serde_json::from_slice::<serde_json::Value>(&kv.value)
                .ok()
                .and_then(|v| v["worker_name"].as_str().map(String::from)),
            _ => None,
        };
        let source = name.map_or_else(|| session.to_string(), |n| format!("{n} ({session})"));
        crate::joblog::append(self.store(), job, &source, message).await;
    }

    /// The job `id` (a required field), or NOT_FOUND.
    async fn job(&self, id: &str) -> Result<Versioned<crate::ledger::JobRecord>, CoordinatorError> {
        self.ledger
            .get(required("job_id", id)?)
            .await?
            .ok_or_else(|| CoordinatorError::NotFound(format!("job {id}")))
    }

    /// The lease behind a live session, or `Stale` when it has expired.
    async fn session_lease(&self, session_id: &str) -> Result<LeaseId, CoordinatorError> {
        let lease = parse_session(session_id)?;
        match self.store().get(&format!("sessions/{session_id}")).await? {
            Some(_) => Ok(lease),
            None => Err(CoordinatorError::Stale {
                what: "session",
                detail: format!("{session_id} expired; register again"),
            }),
        }
    }
}

type EventStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::JobEvent, Status>> + Send>>;
type FileStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::FileChunk, Status>> + Send>>;

#[tonic::async_trait]
impl<S: Store> JobService for Coordinator<S> {
    async fn submit_job(
        &self,
        req: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let _timer = self.metrics.time("submit_job");
        let submit = Submit::try_from(req.into_inner())?;
        let job = self
            .ledger
            .submit_to(
                &submit.spec,
                submit.priority,
                submit.request_id.as_deref(),
                submit.output_dir.as_deref(),
            )
            .await?;
        self.events.send(Event::JobSubmitted {
            job_id: job.value.id.clone(),
        });
        Ok(Response::new(pb::SubmitJobResponse {
            job: Some((&job).into()),
        }))
    }

    async fn get_job(&self, req: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        let _timer = self.metrics.time("get_job");
        let id = req.into_inner().job_id;
        let job = self.job(&id).await?;
        Ok(Response::new((&job).into()))
    }

    async fn list_jobs(
        &self,
        req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let _timer = self.metrics.time("list_jobs");
        let states = req.into_inner().states;
        let (jobs, _) = self.ledger.list().await?;
        let jobs = jobs
            .iter()
            .map(pb::Job::from)
            .filter(|j| states.is_empty() || states.contains(&j.state))
            .collect();
        Ok(Response::new(pb::ListJobsResponse { jobs }))
    }

    type WatchJobStream = EventStream;
    type FetchOutputsStream = FileStream;

    async fn job_logs(
        &self,
        req: Request<pb::JobLogsRequest>,
    ) -> Result<Response<pb::JobLogsResponse>, Status> {
        let _timer = self.metrics.time("job_logs");
        let r = req.into_inner();
        let job = self.job(&r.job_id).await?;
        let limit = match r.limit {
            0 => 500,
            n => n.min(5000) as usize,
        };
        let (lines, next) = crate::joblog::read(self.store(), &r.job_id, &r.after, limit).await?;
        Ok(Response::new(pb::JobLogsResponse {
            lines: lines
                .into_iter()
                .map(|l| pb::LogLine {
                    at_ms: l.at_ms,
                    source: l.source,
                    message: l.message,
                })
                .collect(),
            next,
            state: crate::convert::state_to_pb(&job.value.state) as i32,
        }))
    }

    async fn fetch_outputs(
        &self,
        req: Request<pb::FetchOutputsRequest>,
    ) -> Result<Response<FileStream>, Status> {
        let _timer = self.metrics.time("fetch_outputs");
        let id = req.into_inner().job_id;
        let job = self.job(&id).await?;
        if job.value.outputs.is_empty() {
            return Err(CoordinatorError::FailedPrecondition(format!(
                "job {id} has no outputs yet (it is {})",
                job.value.state.name()
            ))
            .into());
        }
        let dir = std::path::PathBuf::from(job.value.dir(&self.config.artifact_root));
        let files = crate::fetch::output_files(&dir, &job.value.outputs)?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::task::spawn_blocking(move || crate::fetch::stream(&dir, files, tx));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn watch_job(
        &self,
        req: Request<pb::WatchJobRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let _timer = self.metrics.time("watch_job");
        let id = req.into_inner().job_id;
        let job = self.job(&id).await?;
        let mut watch = self.ledger.watch(Some(job.revision + 1)).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let key = format!("jobs/{id}");
        tokio::spawn(async move {
            let mut done = job.value.state.is_terminal();
            if tx
                .send(Ok(pb::JobEvent {
                    job: Some((&job).into()),
                }))
                .await
                .is_err()
            {
                return;
            }
            while !done {
                let ev = tokio::select! {
                    _ = tx.closed() => return,
                    ev = watch.next() => ev,
                };
                let kv = match ev {
                    Some(Ok(ev)) if ev.kv.key == key && ev.kind == crate::store::EventKind::Put => {
                        ev.kv
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => {
                        let _ = tx.send(Err(CoordinatorError::from(e).into())).await;
                        return;
                    }
                    None => return,
                };
                let item = crate::ledger::decode(&kv.key, &kv.value).map(|value| {
                    done = value.state.is_terminal();
                    pb::JobEvent {
                        job: Some(
                            (&Versioned {
                                value,
                                revision: kv.mod_revision,
                            })
                                .into(),
                        ),
                    }
                });
                if tx.send(item.map_err(Status::from)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn cancel_job(
        &self,
        req: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let _timer = self.metrics.time("cancel_job");
        let r = req.into_inner();
        let reason = if r.reason.is_empty() {
            "cancelled by client".to_string()
        } else {
            r.reason
        };
        let job = self
            .ledger
            .transition(required("job_id", &r.job_id)?, JobEvent::Cancel { reason })
            .await?;
        self.events.send(Event::JobCancelled {
            job_id: job.value.id.clone(),
        });
        Ok(Response::new((&job).into()))
    }
}

#[tonic::async_trait]
impl<S: Store> WorkerService for Coordinator<S> {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let _timer = self.metrics.time("register");
        let r = req.into_inner();
        let name = required("worker_name", &r.worker_name)?.to_string();
        let ours = env!("CARGO_PKG_VERSION");
        if !crate::convert::compatible_version(ours, &r.version) {
            return Err(CoordinatorError::FailedPrecondition(format!(
                "version: worker {name} runs distill {:?}, this coordinator runs {ours}; upgrade one of them",
                r.version
            ))
            .into());
        }
        // Exact: the ranks of a training group must cut and order their
        // all-reduces alike, and a mismatch would pair unequal collectives.
        let protocol = distill_proto::COLLECTIVE_PROTOCOL;
        if r.collective_protocol != protocol {
            return Err(CoordinatorError::FailedPrecondition(format!(
                "collective_protocol: worker {name} speaks collective protocol {} ({}), this coordinator {protocol}; the ranks of a training group must split their all-reduces alike, so a cluster runs one build of distill",
                r.collective_protocol,
                if r.collective_protocol == 0 { "a build from before the field" } else { "another build" }
            ))
            .into());
        }
        let lease = self
            .store()
            .grant(self.config.session_timeout)
            .await
            .map_err(CoordinatorError::from)?;
        let session_id = format!("s-{lease:x}");
        let info = serde_json::json!({
            "worker_name": name,
            "version": r.version,
            "collective_address": r.collective_address,
            "host_memory_bytes": r.host_memory_bytes,
            "devices": r.devices.iter().map(|d| serde_json::json!({"name": d.name, "memory_bytes": d.memory_bytes})).collect::<Vec<_>>(),
        });
        let key = format!("sessions/{session_id}");
        self.store()
            .create(&key, info.to_string().into_bytes(), Some(lease))
            .await
            .map_err(CoordinatorError::from)?;
        tracing::info!(worker = name, session = session_id, "worker registered");
        self.events.send(Event::WorkerRegistered {
            session_id: session_id.clone(),
        });
        Ok(Response::new(pb::RegisterResponse {
            session_id,
            heartbeat_interval_ms: self.config.heartbeat_interval.as_millis() as u64,
            session_timeout_ms: self.config.session_timeout.as_millis() as u64,
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let _timer = self.metrics.time("heartbeat");
        let r = req.into_inner();
        let lease = parse_session(required("session_id", &r.session_id)?)?;
        match self.store().keepalive(lease).await {
            Ok(()) => {}
            Err(StoreError::LeaseNotFound(_)) => {
                let abort = r.running;
                return Ok(Response::new(pb::HeartbeatResponse {
                    abort,
                    reregister: true,
                    ..Default::default()
                }));
            }
            Err(e) => return Err(CoordinatorError::from(e).into()),
        }
        let running: Vec<_> = r
            .running
            .iter()
            .map(|t| (t.job_id.clone(), t.task_id.clone(), t.attempt))
            .collect();
        let train = TaskKind::Train.stage_task_id();
        // Attempt 0 of the training task: a member of the job's group, not
        // a lease holder (see `lease_task`).
        let (members, held): (Vec<_>, Vec<_>) = running
            .iter()
            .cloned()
            .partition(|(_, task, attempt)| *attempt == 0 && task == train);
        let mut lost = self
            .tasks
            .extend(
                &r.session_id,
                &held,
                self.config.task_lease.as_millis() as i64,
            )
            .await?;
        // A member stays while the job trains and the worker is assigned to it.
        for m in members {
            let training = self
                .ledger
                .get(&m.0)
                .await?
                .is_some_and(|j| j.value.state == JobState::Training);
            let assigned = self
                .store()
                .get(&format!("{ASSIGNMENTS}{}", r.session_id))
                .await
                .map_err(CoordinatorError::from)?
                .is_some_and(|kv| kv.value == m.0.as_bytes());
            if !training || !assigned {
                lost.push(m);
            }
        }
        // The group of a running training task: its generation, and
        // whether the live membership moved on from it.
        let mut group = (0, false);
        if let Some((job, _, _)) = running.iter().find(|(_, t, _)| t == train) {
            group = Groups::new(self.store().clone()).status(job).await?;
        }
        let mut finished: Vec<&str> = Vec::new();
        for (job_id, _, _) in &running {
            if finished.contains(&job_id.as_str()) {
                continue;
            }
            if let Some(job) = self.ledger.get(job_id).await? {
                if job.value.state.is_terminal() {
                    finished.push(job_id);
                }
            }
        }
        // Tasks of a finished (cancelled, failed) job stop at once.
        for r in &running {
            if finished.contains(&r.0.as_str()) && !lost.contains(r) {
                lost.push(r.clone());
            }
        }
        // Progress of tasks this session still holds shows on the job.
        for p in &r.progress {
            let Some(t) = &p.r#ref else { continue };
            let held = (t.job_id.clone(), t.task_id.clone(), t.attempt);
            if !running.contains(&held) || lost.contains(&held) {
                continue;
            }
            let (stage, done, total, loss) = (p.stage.clone(), p.steps_done, p.steps_total, p.loss);
            let p = p.clone();
            // Progress belongs to the stage the task runs in: a late beat
            // after the task committed never rewinds the job's stage.
            let stage_state = match t.task_id.as_str() {
                id if id == TaskKind::Train.stage_task_id() => JobState::Training,
                id if id == TaskKind::Evaluate.stage_task_id() => JobState::Evaluating,
                _ => JobState::Labelling,
            };
            let r = self
                .ledger
                .update(&t.job_id, |j| {
                    if j.state != stage_state {
                        return Err(CoordinatorError::Stale {
                            what: "job",
                            detail: "moved on".into(),
                        });
                    }
                    j.progress.stage = stage.clone();
                    // A stage without steps (evaluation) keeps the
                    // training counts on show.
                    if total > 0 {
                        j.progress.steps_done = done;
                        j.progress.steps_total = total;
                        j.progress.loss = loss;
                        j.progress.world_size = p.world_size;
                        j.progress.generation = p.generation;
                        j.progress.steps_per_second = p.steps_per_second;
                        j.progress.samples_per_second = p.samples_per_second;
                        j.progress.eta_seconds = if p.steps_per_second > 0.0 {
                            total.saturating_sub(done) as f64 / p.steps_per_second
                        } else {
                            0.0
                        };
                        j.progress.loss_terms = p.loss_terms.clone().into_iter().collect();
                    }
                    Ok(())
                })
                .await;
            match r {
                Ok(_) | Err(CoordinatorError::Stale { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let abort = lost
            .into_iter()
            .map(|(job_id, task_id, attempt)| pb::TaskRef {
                job_id,
                task_id,
                attempt,
            })
            .collect();
        Ok(Response::new(pb::HeartbeatResponse {
            abort,
            reregister: false,
            group_generation: group.0,
            regroup: group.1,
        }))
    }

    async fn lease_task(
        &self,
        req: Request<pb::LeaseTaskRequest>,
    ) -> Result<Response<pb::LeaseTaskResponse>, Status> {
        let _timer = self.metrics.time("lease_task");
        let session = req.into_inner().session_id;
        self.session_lease(required("session_id", &session)?)
            .await?;
        // The main loop decides which job a worker serves (queue policy in
        // `scheduler`); here the worker only takes that job's tasks.
        let retry_after_ms = self.config.heartbeat_interval.as_millis() as u64;
        let none = || {
            Ok(Response::new(pb::LeaseTaskResponse {
                task: None,
                retry_after_ms,
            }))
        };
        let Some(job_id) = self.assignment(&session).await? else {
            return none();
        };
        let Some(job) = self.ledger.get(&job_id).await? else {
            return none();
        };
        if !matches!(
            job.value.state,
            JobState::Labelling | JobState::Training | JobState::Evaluating
        ) {
            return none();
        }
        let lease_ms = self.config.task_lease.as_millis() as i64;
        let Some((t, kind)) = self
            .tasks
            .lease(&[job_id.clone()], &session, lease_ms)
            .await?
        else {
            // Training is data-parallel over every worker assigned to the
            // job: one holds the task (and reports it); each other one
            // trains as a member of the group.
            // (Not when the task fine-tunes the teacher: that runs on the
            // holder alone.)
            // (An offline job fine-tunes its teacher in a stage of its own.)
            let fine_tunes = distill_spec::from_json_str(&job.value.spec_json)
                .map_or(true, |s| s.fine_tunes_in_training());
            // (Nor once the final checkpoint is committed: the holder is
            // exporting, or training the labels-only baseline, alone.)
            let p = &job.value.progress;
            let trained = p.steps_total > 0 && p.checkpoint_step >= p.steps_total;
            if job.value.state == JobState::Training && !fine_tunes && !trained {
                let train = TaskKind::Train.stage_task_id();
                if let Some(t) = self.tasks.get(&job_id, train).await? {
                    if matches!(&t.state, TaskState::Leased { holder, .. } if holder.session != session)
                    {
                        let root = self.config.artifact_root.trim_end_matches('/');
                        let job_dir = job.value.dir(root);
                        tracing::info!(job = job_id, session, "training member joins");
                        self.log(
                            &job_id,
                            &session,
                            format!("joins {train} as a member of the training group"),
                        )
                        .await;
                        return Ok(Response::new(pb::LeaseTaskResponse {
                            task: Some(pb::Task {
                                output_uri: format!("{job_dir}/{train}"),
                                artifact_root: root.to_string(),
                                job_dir,
                                r#ref: Some(pb::TaskRef {
                                    job_id: job_id.clone(),
                                    task_id: train.to_string(),
                                    attempt: 0,
                                }),
                                kind: pb::TaskKind::Train as i32,
                                spec_json: job.value.spec_json,
                                shard_start: t.shard_start,
                                shard_end: t.shard_end,
                                lease_deadline_ms: 0,
                                member: true,
                            }),
                            retry_after_ms,
                        }));
                    }
                }
            }
            return none();
        };
        let how = match kind {
            LeaseKind::Fresh => "",
            LeaseKind::TookOver => " (the previous holder's lease expired)",
            LeaseKind::Speculative => " (a speculative backup of a slow attempt)",
        };
        self.log(
            &t.job_id,
            &session,
            format!("leased {} attempt {}{how}", t.task_id, t.attempt),
        )
        .await;
        let counter = match kind {
            LeaseKind::Fresh => None,
            LeaseKind::TookOver => Some(&self.metrics.task_lease_expiries),
            LeaseKind::Speculative => Some(&self.metrics.speculative_leases),
        };
        if let Some(c) = counter {
            c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let job_dir = job.value.dir(&self.config.artifact_root);
        let spec_json = job.value.spec_json;
        let deadline = match &t.state {
            TaskState::Leased { holder, backup } => backup
                .iter()
                .chain(std::iter::once(holder))
                .find(|h| h.attempt == t.attempt)
                .map_or(0, |h| h.deadline_ms as u64),
            _ => 0,
        };
        let root = self.config.artifact_root.trim_end_matches('/');
        let task = pb::Task {
            output_uri: format!("{job_dir}/{}", t.task_id),
            artifact_root: root.to_string(),
            job_dir,
            r#ref: Some(pb::TaskRef {
                job_id: t.job_id,
                task_id: t.task_id,
                attempt: t.attempt,
            }),
            kind: match t.kind {
                TaskKind::TeacherSignal => pb::TaskKind::TeacherSignal,
                TaskKind::Train => pb::TaskKind::Train,
                TaskKind::Evaluate => pb::TaskKind::Evaluate,
                TaskKind::FineTuneTeacher => pb::TaskKind::FineTuneTeacher,
            } as i32,
            spec_json,
            shard_start: t.shard_start,
            shard_end: t.shard_end,
            lease_deadline_ms: deadline,
            member: false,
        };
        Ok(Response::new(pb::LeaseTaskResponse {
            task: Some(task),
            retry_after_ms,
        }))
    }

    async fn report_task(
        &self,
        req: Request<pb::ReportTaskRequest>,
    ) -> Result<Response<pb::ReportTaskResponse>, Status> {
        let _timer = self.metrics.time("report_task");
        let r = Report::try_from(req.into_inner())?;
        parse_session(&r.session_id)?;
        let reported = self
            .tasks
            .report(&r.session_id, &r.job_id, &r.task_id, r.attempt, r.outcome)
            .await?;
        if let Reported::TaskFailed { reason } = &reported {
            tracing::warn!(job = r.job_id, reason, "job failed");
        }
        let what = format!("{} attempt {}", r.task_id, r.attempt);
        let line = match &reported {
            Reported::Committed => Some(format!("{what} committed")),
            Reported::AlreadyCommitted => Some(format!(
                "{what} finished after another attempt committed; discarded"
            )),
            Reported::WillRetry => Some(format!("{what} failed; it will be retried")),
            Reported::TaskFailed { reason } => Some(format!("{what} failed for good: {reason}")),
            Reported::Released => Some(format!("{what} given back")),
        };
        if let Some(line) = line {
            self.log(&r.job_id, &r.session_id, line).await;
        }
        self.events.send(Event::TaskReported {
            job_id: r.job_id.clone(),
        });
        Ok(Response::new(pb::ReportTaskResponse {
            committed: reported == Reported::Committed,
        }))
    }

    async fn join_group(
        &self,
        req: Request<pb::JoinGroupRequest>,
    ) -> Result<Response<pb::JoinGroupResponse>, Status> {
        let _timer = self.metrics.time("join_group");
        let r = req.into_inner();
        let session = required("session_id", &r.session_id)?;
        let job = required("job_id", &r.job_id)?;
        self.session_lease(session).await?;
        // Twice the session timeout: a dead member's session must have
        // expired by then (etcd rounds lease TTLs up to whole seconds), so
        // the same membership is re-formed only when nobody died.
        let grace = 2 * self.config.session_timeout.as_millis() as i64;
        let joined = match Groups::new(self.store().clone())
            .join(session, job, r.failed_generation, grace)
            .await?
        {
            Join::Joined(j) => j,
            Join::Wait { retry_after_ms } => {
                return Ok(Response::new(pb::JoinGroupResponse {
                    retry_after_ms,
                    ..Default::default()
                }))
            }
        };
        self.log(
            job,
            session,
            format!(
                "joined training group generation {}: rank {} of {}",
                joined.group.generation,
                joined.rank,
                joined.group.members.len()
            ),
        )
        .await;
        let (checkpoint_uri, checkpoint_step) = joined
            .checkpoint
            .map(|c| (c.uri, c.step))
            .unwrap_or_default();
        Ok(Response::new(pb::JoinGroupResponse {
            generation: joined.group.generation,
            rank: joined.rank,
            world_size: joined.group.members.len() as u32,
            peers: joined
                .group
                .members
                .into_iter()
                .map(|m| m.collective_address)
                .collect(),
            checkpoint_uri,
            checkpoint_step,
            retry_after_ms: 0,
        }))
    }

    async fn commit_checkpoint(
        &self,
        req: Request<pb::CommitCheckpointRequest>,
    ) -> Result<Response<pb::CommitCheckpointResponse>, Status> {
        let _timer = self.metrics.time("commit_checkpoint");
        let r = req.into_inner();
        if r.generation == 0 {
            return Err(CoordinatorError::InvalidArgument(
                "generation: missing (generations start at 1)".into(),
            )
            .into());
        }
        if !crate::convert::is_sha256_hex(&r.sha256) {
            return Err(
                CoordinatorError::InvalidArgument("sha256: must be 64 hex digits".into()).into(),
            );
        }
        let commit = Commit {
            session: required("session_id", &r.session_id)?.to_string(),
            job_id: required("job_id", &r.job_id)?.to_string(),
            generation: r.generation,
            step: r.step,
            uri: required("checkpoint_uri", &r.checkpoint_uri)?.to_string(),
            sha256: r.sha256,
            total_steps: r.total_steps,
        };
        self.session_lease(&commit.session).await?;
        Groups::new(self.store().clone()).commit(&commit).await?;
        self.log(
            &commit.job_id,
            &commit.session,
            format!(
                "checkpoint of step {} committed (generation {})",
                commit.step, commit.generation
            ),
        )
        .await;
        Ok(Response::new(pb::CommitCheckpointResponse {}))
    }
}
