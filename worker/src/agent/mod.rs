//! `distill worker`: a process that registers with the coordinator,
//! heartbeats, leases tasks and runs them.
//!
//! Two sides that never block each other:
//!
//! - the async side (this module, on a small tokio runtime): registration,
//!   a heartbeat loop on its own task (so a long forward pass never delays
//!   a heartbeat), leasing and reporting. Every RPC goes through
//!   [`distill_proto::client::Endpoints`]: a list of coordinators, failing
//!   over to the next on "not here" answers; a coordinator that stays
//!   unreachable is retried with backoff, forever, until shutdown;
//! - the libtorch side ([`exec`]): one dedicated OS thread that runs one
//!   task at a time.
//!
//! A task the coordinator takes away (heartbeat `abort`, or the session
//! expired) is stopped at its next step or batch boundary and its output is
//! not reported. On shutdown (SIGTERM, Ctrl-C) the worker stops leasing,
//! stops the running task at its next boundary (training checkpoints
//! first), gives the task back (`released`: pending again, no failure
//! counted) and returns.
//!
//! The worker decides nothing about a job: the lease says what to run,
//! with the job's validated spec, and where the artifacts go.

pub mod exec;

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use distill_proto::client::{authed, Endpoints};
use distill_proto::v1 as pb;
use pb::worker_service_client::WorkerServiceClient;
use tch::Device;
use tokio::sync::{oneshot, watch};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};
use tonic::{Code, Status};

use crate::{Error, Result};
use exec::{Control, Executor, Work};

/// How a worker connects and what it runs on.
#[derive(Debug, Clone)]
pub struct Options {
    /// Coordinator endpoints (`http://host:port` or `https://…`), tried in
    /// order, following the leader.
    pub coordinators: Vec<String>,
    /// Sent as `authorization: Bearer <token>`.
    pub token: Option<String>,
    pub tls: Option<TlsFiles>,
    pub device: Device,
    /// libtorch intra-op threads (default: libtorch's choice).
    pub threads: Option<i32>,
    /// Stable identity shown in the coordinator's logs.
    pub name: String,
    /// The longest pause between two tries against an unreachable
    /// coordinator.
    pub max_backoff: Duration,
    /// Host peers reach this worker's collectives on (its rendezvous store
    /// and Gloo transport bind there).
    pub collective_host: String,
    /// Port of this worker's rendezvous store (0: any free port).
    pub collective_port: u16,
    /// Deadline of a group's rendezvous and of each collective.
    pub collective_timeout: Duration,
    /// The engine of training groups' collectives.
    pub collective_backend: crate::collective::BackendChoice,
    /// Where fine-tuned teachers are shared between jobs.
    pub teachers: crate::teachers::TeacherCache,
}

/// Client TLS files: the CA the coordinator's certificate chains to, and an
/// optional client certificate and key for mutual TLS.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: std::path::PathBuf,
    pub identity: Option<(std::path::PathBuf, std::path::PathBuf)>,
    pub domain: Option<String>,
}

impl TlsFiles {
    /// The client TLS configuration (also used by the client commands).
    pub fn load(&self) -> Result<ClientTlsConfig> {
        let read = |p: &std::path::Path| std::fs::read(p).map_err(|e| Error::io(p, e));
        let ca = read(&self.ca)?;
        if !String::from_utf8_lossy(&ca).contains("-----BEGIN CERTIFICATE-----") {
            return Err(Error::Invalid(format!(
                "{}: no CERTIFICATE section found",
                self.ca.display()
            )));
        }
        let mut cfg = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        if let Some((cert, key)) = &self.identity {
            cfg = cfg.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        if let Some(d) = &self.domain {
            cfg = cfg.domain_name(d.clone());
        }
        Ok(cfg)
    }
}

/// The session and the running task, shared by the lease loop and the
/// heartbeat loop.
#[derive(Default)]
struct Shared {
    session: Option<String>,
    running: Option<(pb::TaskRef, Arc<Control>)>,
}

type SharedState = Arc<Mutex<Shared>>;

/// Runs the worker until `shutdown` resolves (then gives back its task and
/// returns `Ok`). Fails only on what no retry can fix: bad TLS files, or a
/// coordinator that refuses this worker's version.
pub async fn serve(opts: Options, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
    let mut endpoints = Endpoints::new(opts.coordinators.clone());
    endpoints.token = opts.token.clone();
    endpoints.tls = opts.tls.as_ref().map(TlsFiles::load).transpose()?;
    endpoints.deadline = Duration::from_secs(10);
    endpoints.max_pause = opts.max_backoff;
    let executor = Executor::spawn(opts.device, opts.threads, opts.teachers.clone())
        .map_err(|e| Error::Invalid(format!("cannot start the libtorch thread: {e}")))?;
    // This worker's rendezvous store, for every group it is rank 0 of.
    let store = crate::collective::StoreServer::serve(&opts.collective_host, opts.collective_port)?;
    let collective_address = format!("{}:{}", opts.collective_host, store.port);
    tracing::info!(address = collective_address, "collective store serving");
    let shared: SharedState = Arc::default();
    let (stop_tx, stop_rx) = watch::channel(false);
    let (interval_tx, interval_rx) = watch::channel(Duration::from_secs(1));
    let heartbeats = tokio::spawn(heartbeat_loop(
        endpoints.clone(),
        shared.clone(),
        interval_rx,
    ));
    let timeout_of_rendezvous = opts.collective_timeout;
    let worker = Worker {
        opts,
        endpoints,
        shared,
        executor,
        stop: stop_rx,
        interval: interval_tx,
        collective_address,
        _store: store,
    };
    let result = tokio::select! {
        r = worker.run() => r,
        _ = async {
            shutdown.await;
            let _ = stop_tx.send(true);
            std::future::pending::<()>().await
        } => unreachable!(),
    };
    heartbeats.abort();
    // An aborted rendezvous may still wait inside c10d (until its own
    // deadline): exiting under it would crash in libtorch's destructors.
    let waited = std::time::Instant::now();
    let most = timeout_of_rendezvous + Duration::from_secs(2);
    if crate::collective::rendezvous_threads() > 0 {
        tracing::info!(
            seconds = most.as_secs_f64(),
            "waiting (at most) for an abandoned rendezvous to end"
        );
    }
    while crate::collective::rendezvous_threads() > 0 && waited.elapsed() < most {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    result
}

struct Worker {
    opts: Options,
    endpoints: Endpoints,
    shared: SharedState,
    executor: Executor,
    stop: watch::Receiver<bool>,
    interval: watch::Sender<Duration>,
    collective_address: String,
    _store: crate::collective::StoreServer,
}

impl Worker {
    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Sleeps `d`, or less when shutdown begins.
    async fn pause(&self, d: Duration) {
        let mut stop = self.stop.clone();
        let _ = tokio::time::timeout(d, stop.wait_for(|s| *s)).await;
    }

    async fn run(mut self) -> Result<()> {
        let mut backoff = Duration::from_millis(100);
        while !self.stopping() {
            let session = match self.session().await {
                Ok(Some(s)) => s,
                Ok(None) => break, // shutting down
                Err(e) => return Err(e),
            };
            let req = pb::LeaseTaskRequest {
                session_id: session.clone(),
            };
            let leased = self
                .endpoints
                .call(|ch, token| {
                    let req = authed(req.clone(), token);
                    async move { WorkerServiceClient::new(ch).lease_task(req).await }
                })
                .await;
            let leased = match leased {
                Ok(l) => {
                    backoff = Duration::from_millis(100);
                    l
                }
                Err(s) if s.code() == Code::FailedPrecondition => {
                    tracing::warn!(error = %s.message(), "session lost; registering again");
                    self.forget_session(&session);
                    continue;
                }
                Err(s) => {
                    tracing::warn!(error = %s, retry_in = ?backoff, "cannot lease work; retrying");
                    self.pause(backoff).await;
                    backoff = (backoff * 2).min(self.opts.max_backoff);
                    continue;
                }
            };
            match leased.task {
                None => {
                    self.pause(Duration::from_millis(leased.retry_after_ms.clamp(10, 5000)))
                        .await
                }
                Some(task) => self.run_task(&session, task).await,
            }
        }
        tracing::info!("worker stopped");
        Ok(())
    }

    /// The current session, registering (with retries) when there is none;
    /// `None` once shutdown has begun.
    async fn session(&mut self) -> Result<Option<String>> {
        if let Some(s) = self.shared.lock().ok().and_then(|s| s.session.clone()) {
            return Ok(Some(s));
        }
        let req = pb::RegisterRequest {
            worker_name: self.opts.name.clone(),
            devices: vec![pb::Device {
                name: format!("{:?}", self.opts.device).to_lowercase(),
                memory_bytes: 0,
            }],
            host_memory_bytes: 0,
            version: env!("CARGO_PKG_VERSION").into(),
            collective_address: self.collective_address.clone(),
            collective_protocol: distill_proto::COLLECTIVE_PROTOCOL,
        };
        let mut backoff = Duration::from_millis(100);
        loop {
            if self.stopping() {
                return Ok(None);
            }
            let r = self
                .endpoints
                .call(|ch, token| {
                    let req = authed(req.clone(), token);
                    async move { WorkerServiceClient::new(ch).register(req).await }
                })
                .await;
            match r {
                Ok(r) => {
                    tracing::info!(
                        session = r.session_id,
                        coordinator = self.endpoints.current(),
                        "registered"
                    );
                    let every = Duration::from_millis(r.heartbeat_interval_ms.max(10));
                    let _ = self.interval.send(every);
                    if let Ok(mut s) = self.shared.lock() {
                        s.session = Some(r.session_id.clone());
                    }
                    return Ok(Some(r.session_id));
                }
                Err(s)
                    if matches!(
                        s.code(),
                        Code::FailedPrecondition
                            | Code::PermissionDenied
                            | Code::Unauthenticated
                            | Code::InvalidArgument
                    ) =>
                {
                    return Err(Error::Invalid(format!(
                        "the coordinator refused this worker: {}",
                        s.message()
                    )));
                }
                Err(s) => {
                    tracing::warn!(error = %s, retry_in = ?backoff, "cannot register; retrying");
                    self.pause(backoff).await;
                    backoff = (backoff * 2).min(self.opts.max_backoff);
                }
            }
        }
    }

    fn forget_session(&self, session: &str) {
        if let Ok(mut s) = self.shared.lock() {
            if s.session.as_deref() == Some(session) {
                s.session = None;
            }
        }
    }

    async fn run_task(&mut self, session: &str, task: pb::Task) {
        let r = task.r#ref.clone().unwrap_or_default();
        let kind = pb::TaskKind::try_from(task.kind)
            .map(|k| k.as_str_name())
            .unwrap_or("unknown");
        tracing::info!(
            job = r.job_id,
            task = r.task_id,
            attempt = r.attempt,
            kind,
            "task leased"
        );
        // The spec travels as validated JSON; it is parsed into the one
        // typed spec here, never read as untyped JSON.
        let spec = match distill_spec::from_json_str(&task.spec_json) {
            Ok(s) => s,
            Err(e) => {
                let f = failure(format!("the lease's spec does not parse: {e}"), false);
                self.report(session, &r, f).await;
                return;
            }
        };
        let control = Arc::new(Control::default());
        if let Ok(mut s) = self.shared.lock() {
            s.running = Some((r.clone(), control.clone()));
        }
        let member = task.member;
        let link = (task.kind == pb::TaskKind::Train as i32).then(|| exec::LinkParts {
            handle: tokio::runtime::Handle::current(),
            endpoints: self.endpoints.clone(),
            session: session.to_string(),
            job: r.job_id.clone(),
            host: self.opts.collective_host.clone(),
            timeout: self.opts.collective_timeout,
            backend: self.opts.collective_backend,
        });
        let (tx, mut rx) = oneshot::channel();
        let submitted = self.executor.submit(Work {
            task,
            spec,
            control: control.clone(),
            reply: tx,
            link,
        });
        let result = match submitted {
            Err(e) => Err(e),
            Ok(()) => {
                let mut stop = self.stop.clone();
                loop {
                    tokio::select! {
                        r = &mut rx => break r.unwrap_or_else(|_| Err(Error::Invalid("the libtorch thread died".into()))),
                        _ = stop.wait_for(|s| *s) => {
                            tracing::info!(task = r.task_id, "shutting down: stopping the task at its next boundary");
                            control.stop.store(true, Ordering::Relaxed);
                            // Wait for the thread to reach the boundary.
                            break rx.await.unwrap_or_else(|_| Err(Error::Invalid("the libtorch thread died".into())));
                        }
                    }
                }
            }
        };
        if let Ok(mut s) = self.shared.lock() {
            s.running = None;
        }
        if control.aborted.load(Ordering::Relaxed) {
            tracing::info!(
                task = r.task_id,
                attempt = r.attempt,
                "task taken away by the coordinator; output discarded"
            );
            return;
        }
        if member {
            // Another worker holds the task and reports it.
            match &result {
                Ok(_) => tracing::info!(job = r.job_id, "training member done"),
                Err(e) => tracing::warn!(job = r.job_id, error = %e, "training member stopped"),
            }
            return;
        }
        let outcome = match result {
            Ok(success) => pb::report_task_request::Outcome::Success(success),
            Err(Error::Stopped) => pb::report_task_request::Outcome::Failure(pb::TaskFailure {
                reason: "the worker is shutting down".into(),
                retryable: true,
                released: true,
            }),
            Err(e) => {
                tracing::warn!(task = r.task_id, error = %e, "task failed");
                failure(e.to_string(), exec::retryable(&e))
            }
        };
        self.report(session, &r, outcome).await;
    }

    /// Reports an outcome, retrying transport failures (a few times, then
    /// the lease expires and the task is leased again).
    async fn report(
        &mut self,
        session: &str,
        r: &pb::TaskRef,
        outcome: pb::report_task_request::Outcome,
    ) {
        let req = pb::ReportTaskRequest {
            session_id: session.to_string(),
            r#ref: Some(r.clone()),
            outcome: Some(outcome),
        };
        // While shutting down, one try: an unreported task's lease expires
        // and it is leased again, so nothing is lost by not waiting.
        let tries = if self.stopping() { 1 } else { 5 };
        for attempt in 0..tries {
            let res = self
                .endpoints
                .call(|ch, token| {
                    let req = authed(req.clone(), token);
                    async move { WorkerServiceClient::new(ch).report_task(req).await }
                })
                .await;
            match res {
                Ok(a) => {
                    tracing::info!(
                        task = r.task_id,
                        attempt = r.attempt,
                        committed = a.committed,
                        "reported"
                    );
                    return;
                }
                Err(s) if s.code() == Code::FailedPrecondition => {
                    tracing::warn!(task = r.task_id, error = %s.message(), "report refused; output discarded");
                    return;
                }
                Err(s) => {
                    tracing::warn!(task = r.task_id, error = %s, try_ = attempt + 1, "cannot report; retrying");
                    self.pause(Duration::from_millis(200 << attempt)).await;
                }
            }
        }
    }
}

fn failure(reason: String, retryable: bool) -> pb::report_task_request::Outcome {
    pb::report_task_request::Outcome::Failure(pb::TaskFailure {
        reason,
        retryable,
        released: false,
    })
}

/// Heartbeats at the interval the coordinator gave, with the running task
/// and its progress; stops a task the coordinator takes away and forgets
/// an expired session.
async fn heartbeat_loop(
    mut endpoints: Endpoints,
    shared: SharedState,
    mut interval: watch::Receiver<Duration>,
) {
    loop {
        let every = *interval.borrow_and_update();
        // Heartbeats go on through shutdown, until the lease loop has
        // stopped the task and given it back (then `serve` ends this task).
        tokio::time::sleep(every).await;
        let (session, running) = match shared.lock() {
            Ok(s) => (s.session.clone(), s.running.clone()),
            Err(_) => return,
        };
        let Some(session) = session else { continue };
        let progress = running.as_ref().and_then(|(r, c)| {
            let p = c.progress.lock().ok()?.clone()?;
            Some(pb::TaskProgress {
                r#ref: Some(r.clone()),
                stage: p.stage,
                steps_done: p.steps_done,
                steps_total: p.steps_total,
                loss: p.loss,
                world_size: c.world.load(Ordering::Relaxed),
                generation: c.generation.load(Ordering::Relaxed),
                steps_per_second: p.steps_per_second,
                samples_per_second: p.samples_per_second,
                loss_terms: p.loss_terms.into_iter().collect(),
            })
        });
        let req = pb::HeartbeatRequest {
            session_id: session.clone(),
            running: running.iter().map(|(r, _)| r.clone()).collect(),
            progress: progress.into_iter().collect(),
        };
        let res: std::result::Result<pb::HeartbeatResponse, Status> = endpoints
            .call(|ch, token| {
                let req = authed(req.clone(), token);
                async move { WorkerServiceClient::new(ch).heartbeat(req).await }
            })
            .await;
        match res {
            Ok(hb) => {
                let take_away = |c: &Control| {
                    c.aborted.store(true, Ordering::Relaxed);
                    c.stop.store(true, Ordering::Relaxed);
                    // A collective in flight returns at once.
                    c.group_flag.store(true, Ordering::Relaxed);
                };
                if hb.reregister {
                    tracing::warn!(session, "session expired; registering again");
                    if let Ok(mut s) = shared.lock() {
                        if s.session.as_deref() == Some(&session) {
                            s.session = None;
                        }
                    }
                    // Whatever runs now (a task leased after the snapshot
                    // above too) belonged to the dead session.
                    if let Some((_, c)) = shared.lock().ok().and_then(|s| s.running.clone()) {
                        take_away(&c);
                    }
                } else if let Some((r, c)) = &running {
                    // The training group changed: leave it now (an
                    // answer about an older generation is ignored).
                    let mine = c.generation.load(Ordering::Relaxed);
                    if mine != 0
                        && (hb.group_generation > mine
                            || (hb.regroup && hb.group_generation == mine))
                        && !c.group_flag.swap(true, Ordering::Relaxed)
                    {
                        tracing::info!(
                            generation = mine,
                            current = hb.group_generation,
                            "the training group changed"
                        );
                    }
                    if hb.abort.contains(r) {
                        tracing::info!(
                            task = r.task_id,
                            attempt = r.attempt,
                            "coordinator aborted the task"
                        );
                        take_away(c);
                    }
                }
            }
            Err(s) => tracing::warn!(error = %s, "heartbeat failed; retrying"),
        }
    }
}
