//! Every fencing rule of the worker protocol, one test each, over a real
//! socket and a real etcd:
//!
//! - a report is accepted only from the session that holds that attempt
//!   (a live session cannot report another worker's live attempt);
//! - `manifest_sha256` must be a sha256 digest;
//! - `Register` refuses an incompatible version, and a worker of another
//!   collective protocol;
//! - a report that arrives after a cancel changes nothing;
//! - a task's final failure fails the job in the same transaction;
//! - the commit that ends a stage creates the next stage's task with it,
//!   so the job runs labelling → training → evaluating → succeeded.

use std::time::Duration;

use distill_coordinator::ledger::Ledger;
use distill_coordinator::store::Store;
use distill_coordinator::tasks::{TaskKind, TaskState, Tasks};
use distill_coordinator::testing::{wait_for, EtcdServer, Served};
use distill_coordinator::Config;
use distill_proto::v1 as pb;
use pb::job_service_client::JobServiceClient;
use pb::worker_service_client::WorkerServiceClient;
use tonic::transport::Channel;
use tonic::Code;

/// Four samples in two shards, for up to two workers.
const SPEC: &str = concat!(
    "task = \"text_classification\"\n[teacher]\npath = \"t\"\n[data]\ntrain = \"d.jsonl\"\n",
    "num_samples = 4\nshard_size = 2\n[cluster]\nmax_workers = 2\n"
);

struct Harness {
    _etcd: EtcdServer,
    store: distill_coordinator::store::EtcdStore,
    server: Served,
    jobs: JobServiceClient<Channel>,
    workers: WorkerServiceClient<Channel>,
}

async fn harness(ns: &str) -> Harness {
    let etcd = EtcdServer::start().await.unwrap();
    let store = etcd.store(ns).await.unwrap();
    let config = Config {
        heartbeat_interval: Duration::from_millis(200),
        session_timeout: Duration::from_secs(2),
        task_lease: Duration::from_secs(2),
        speculation: None,
        ..Config::default()
    };
    let server = Served::start(store.clone(), config, false).await.unwrap();
    let url = server.url();
    distill_coordinator::testing::wait_serving(&url, Duration::from_secs(10))
        .await
        .unwrap();
    let jobs = JobServiceClient::connect(url.clone()).await.unwrap();
    let workers = WorkerServiceClient::connect(url).await.unwrap();
    Harness {
        _etcd: etcd,
        store,
        server,
        jobs,
        workers,
    }
}

fn register(name: &str) -> pb::RegisterRequest {
    pb::RegisterRequest {
        worker_name: name.into(),
        version: env!("CARGO_PKG_VERSION").into(),
        collective_protocol: distill_proto::COLLECTIVE_PROTOCOL,
        ..Default::default()
    }
}

fn success(session: &str, task: &pb::TaskRef, sha: String) -> pb::ReportTaskRequest {
    pb::ReportTaskRequest {
        session_id: session.into(),
        r#ref: Some(task.clone()),
        outcome: Some(pb::report_task_request::Outcome::Success(pb::TaskSuccess {
            manifest_uri: format!("mem://{}/{}", task.task_id, task.attempt),
            manifest_sha256: sha,
            samples: 2,
            ..Default::default()
        })),
    }
}

fn digest() -> String {
    "ab".repeat(32)
}

impl Harness {
    async fn submit(&mut self) -> String {
        self.jobs
            .submit_job(pb::SubmitJobRequest {
                spec: SPEC.into(),
                format: pb::SpecFormat::Toml as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .job
            .unwrap()
            .job_id
    }

    async fn session(&mut self, name: &str) -> String {
        self.workers
            .register(register(name))
            .await
            .unwrap()
            .into_inner()
            .session_id
    }

    /// Leases until a task comes (the scheduler assigns the worker first).
    async fn lease(&mut self, session: &str) -> pb::Task {
        let w = self.workers.clone();
        let s = session.to_string();
        wait_for(Duration::from_secs(10), "a task", || {
            let mut w = w.clone();
            let s = s.clone();
            async move {
                w.lease_task(pb::LeaseTaskRequest { session_id: s })
                    .await
                    .ok()?
                    .into_inner()
                    .task
            }
        })
        .await
        .unwrap()
    }

    async fn job(
        &self,
        id: &str,
    ) -> distill_coordinator::ledger::Versioned<distill_coordinator::ledger::JobRecord> {
        Ledger::new(self.store.clone())
            .get(id)
            .await
            .unwrap()
            .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_is_accepted_only_from_the_session_holding_the_attempt() {
    let mut h = harness("/fence-session/").await;
    let id = h.submit().await;
    let a = h.session("a").await;
    let b = h.session("b").await;
    let ta = h.lease(&a).await.r#ref.unwrap();
    // b is alive and assigned to the same job, but does not hold ta.
    let status = h
        .workers
        .report_task(success(&b, &ta, digest()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("held by another session"),
        "{status:?}"
    );
    let t = Tasks::new(h.store.clone()).shards(&id).await.unwrap();
    let t = t.iter().find(|t| t.value.task_id == ta.task_id).unwrap();
    assert!(
        matches!(t.value.state, TaskState::Leased { .. }),
        "not committed by an impostor: {t:?}"
    );
    // The holder's own report commits.
    assert!(
        h.workers
            .report_task(success(&a, &ta, digest()))
            .await
            .unwrap()
            .into_inner()
            .committed
    );
    h.server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_digests_and_worker_versions_are_checked() {
    let mut h = harness("/fence-args/").await;
    let _id = h.submit().await;
    let a = h.session("a").await;
    let ta = h.lease(&a).await.r#ref.unwrap();
    for bad in ["", "00", &"zz".repeat(32)] {
        let status = h
            .workers
            .report_task(success(&a, &ta, bad.to_string()))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}");
        assert!(status.message().contains("manifest_sha256"), "{status:?}");
    }
    let mut old = register("old");
    old.version = "0.0.1".into();
    let status = h.workers.register(old).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("version"), "{status:?}");
    let mut none = register("none");
    none.version = String::new();
    assert_eq!(
        h.workers.register(none).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    // The same version but another collective protocol (a build that
    // splits its all-reduces otherwise), or none (a build from before the
    // field): refused by name, and no session is created for it.
    for (protocol, says) in [
        (distill_proto::COLLECTIVE_PROTOCOL + 1, "another build"),
        (0, "a build from before the field"),
    ] {
        let mut other = register("other");
        other.collective_protocol = protocol;
        let status = h.workers.register(other).await.unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert!(
            status.message().contains(&format!(
                "collective_protocol: worker other speaks collective protocol {protocol} ({says})"
            )),
            "{status:?}"
        );
    }
    let (sessions, _) = h.store.range("sessions/").await.unwrap();
    assert_eq!(sessions.len(), 1, "only worker a holds a session");
    h.server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_after_a_cancel_changes_nothing() {
    let mut h = harness("/fence-cancel/").await;
    let id = h.submit().await;
    let a = h.session("a").await;
    let ta = h.lease(&a).await.r#ref.unwrap();
    h.jobs
        .cancel_job(pb::CancelJobRequest {
            job_id: id.clone(),
            reason: "changed my mind".into(),
        })
        .await
        .unwrap();
    let before = h.job(&id).await;
    let status = h
        .workers
        .report_task(success(&a, &ta, digest()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("cancelled"), "{status:?}");
    let after = h.job(&id).await;
    assert_eq!(
        after.revision, before.revision,
        "the job record is untouched"
    );
    assert_eq!(after.value.progress.shards_committed, 0);
    let t = Tasks::new(h.store.clone()).shards(&id).await.unwrap();
    assert!(t
        .iter()
        .all(|t| !matches!(t.value.state, TaskState::Committed { .. })));
    h.server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_failure_fails_the_job_and_stages_follow_commits() {
    let mut h = harness("/fence-stages/").await;
    // One job runs to the end through its stage tasks.
    let id = h.submit().await;
    let a = h.session("a").await;
    let mut kinds = vec![];
    loop {
        let t = h.lease(&a).await;
        kinds.push(t.kind);
        assert!(
            !t.artifact_root.is_empty(),
            "the lease names the artifact root"
        );
        let r = t.r#ref.unwrap();
        let mut req = success(&a, &r, digest());
        if let Some(pb::report_task_request::Outcome::Success(s)) = req.outcome.as_mut() {
            s.outputs = vec![format!("mem://{}", r.task_id)];
        }
        assert!(
            h.workers
                .report_task(req)
                .await
                .unwrap()
                .into_inner()
                .committed
        );
        if t.kind == pb::TaskKind::Evaluate as i32 {
            break;
        }
    }
    use pb::TaskKind as K;
    assert_eq!(
        kinds,
        [K::TeacherSignal, K::TeacherSignal, K::Train, K::Evaluate].map(|k| k as i32)
    );
    let job = h.job(&id).await.value;
    assert_eq!(job.state.name(), "succeeded");
    assert_eq!(
        job.outputs,
        ["mem://stage-2-train", "mem://stage-3-evaluate"]
    );
    let all = Tasks::new(h.store.clone()).list(&id).await.unwrap();
    assert_eq!(
        all.iter().map(|t| t.value.kind).collect::<Vec<_>>(),
        [
            TaskKind::TeacherSignal,
            TaskKind::TeacherSignal,
            TaskKind::Train,
            TaskKind::Evaluate
        ]
    );

    // A second job: its shard fails for good (non-retryable); the job
    // fails in the same transaction as the task.
    let id2 = h.submit().await;
    let t = h.lease(&a).await.r#ref.unwrap();
    assert_eq!(t.job_id, id2);
    let fail = pb::ReportTaskRequest {
        session_id: a.clone(),
        r#ref: Some(t.clone()),
        outcome: Some(pb::report_task_request::Outcome::Failure(pb::TaskFailure {
            reason: "corrupt input".into(),
            retryable: false,
            released: false,
        })),
    };
    assert!(
        !h.workers
            .report_task(fail)
            .await
            .unwrap()
            .into_inner()
            .committed
    );
    let job = h.job(&id2).await.value;
    assert_eq!(job.state.name(), "failed");
    assert!(
        job.state.reason().unwrap().contains("corrupt input"),
        "{job:?}"
    );
    h.server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_task_is_pending_again_without_a_failure() {
    let mut h = harness("/fence-release/").await;
    let id = h.submit().await;
    let a = h.session("a").await;
    let t = h.lease(&a).await.r#ref.unwrap();
    let release = pb::ReportTaskRequest {
        session_id: a.clone(),
        r#ref: Some(t.clone()),
        outcome: Some(pb::report_task_request::Outcome::Failure(pb::TaskFailure {
            reason: "worker shutting down".into(),
            retryable: true,
            released: true,
        })),
    };
    h.workers.report_task(release).await.unwrap();
    let tasks = Tasks::new(h.store.clone()).shards(&id).await.unwrap();
    let rec = &tasks
        .iter()
        .find(|x| x.value.task_id == t.task_id)
        .unwrap()
        .value;
    assert_eq!(rec.failures, 0);
    assert!(
        matches!(rec.state, TaskState::Pending { not_before_ms: 0 }),
        "{rec:?}"
    );
    // The released attempt is stale now.
    let status = h
        .workers
        .report_task(success(&a, &t, digest()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    h.server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_straggling_stage_task_never_gets_a_speculative_backup() {
    // Speculation on, with a low bar: shards commit in milliseconds, so a
    // training task held for a second is a "straggler" by their median.
    let etcd = EtcdServer::start().await.unwrap();
    let store = etcd.store("/fence-spec/").await.unwrap();
    let config = Config {
        heartbeat_interval: Duration::from_millis(200),
        session_timeout: Duration::from_secs(5),
        task_lease: Duration::from_secs(5),
        speculation: Some(distill_coordinator::tasks::Speculation {
            factor: 2.0,
            min_age_ms: 200,
            min_committed: 2,
        }),
        ..Config::default()
    };
    let server = Served::start(store.clone(), config, false).await.unwrap();
    let url = server.url();
    distill_coordinator::testing::wait_serving(&url, Duration::from_secs(10))
        .await
        .unwrap();
    let mut h = Harness {
        _etcd: etcd,
        store,
        server,
        jobs: JobServiceClient::connect(url.clone()).await.unwrap(),
        workers: WorkerServiceClient::connect(url).await.unwrap(),
    };
    let _id = h.submit().await;
    let a = h.session("a").await;
    let b = h.session("b").await;
    // a commits both shards, then takes the training task and holds it.
    let train = loop {
        let t = h.lease(&a).await;
        if t.kind == pb::TaskKind::Train as i32 {
            break t.r#ref.unwrap();
        }
        let r = t.r#ref.unwrap();
        h.workers
            .report_task(success(&a, &r, digest()))
            .await
            .unwrap();
    };
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // b asks for work: nothing is pending, the training task is past the
    // threshold, and still it is not handed out a second time.
    for _ in 0..3 {
        let got = h
            .workers
            .lease_task(pb::LeaseTaskRequest {
                session_id: b.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        // b may join the training group as a member (attempt 0: it
        // holds no lease on the task); it never gets an attempt of its own.
        assert!(
            got.task
                .as_ref()
                .is_none_or(|t| t.member && t.r#ref.as_ref().is_some_and(|r| r.attempt == 0)),
            "a backup of {train:?}: {got:?}"
        );
    }
    h.server.stop().await.unwrap();
}
