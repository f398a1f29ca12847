//! The coordinator over a real socket (127.0.0.1:0) with a real etcd:
//! malformed specs are refused with precise errors and store nothing; a
//! worker that stops heartbeating loses its task to another within the
//! configured timeout; a stale attempt's report is refused; the job moves on
//! once every shard is committed exactly once; watch streams the changes.

use std::time::Duration;

use distill_coordinator::job::JobState;
use distill_coordinator::ledger::Ledger;
use distill_coordinator::tasks::{TaskState, Tasks};
use distill_coordinator::testing::{wait_for, EtcdServer, Served};
use distill_coordinator::Config;
use distill_proto::v1 as pb;
use pb::job_service_client::JobServiceClient;
use pb::worker_service_client::WorkerServiceClient;
use tonic::Code;

const SPEC: &str =
    "task = \"text_classification\"\n[teacher]\npath = \"t\"\n[data]\ntrain = \"d.jsonl\"\n";
/// Ten samples in two shards, for up to two workers.
const GOOD: &str = concat!(
    "task = \"text_classification\"\n[teacher]\npath = \"t\"\n[data]\ntrain = \"d.jsonl\"\n",
    "num_samples = 10\nshard_size = 5\n[cluster]\nmax_workers = 2\n"
);

fn success(session: &str, task: &pb::TaskRef) -> pb::ReportTaskRequest {
    pb::ReportTaskRequest {
        session_id: session.into(),
        r#ref: Some(task.clone()),
        outcome: Some(pb::report_task_request::Outcome::Success(pb::TaskSuccess {
            manifest_uri: format!("mem://{}/{}", task.task_id, task.attempt),
            manifest_sha256: "0".repeat(64),
            samples: 5,
            ..Default::default()
        })),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_and_workers_over_grpc() {
    let etcd = EtcdServer::start().await.unwrap();
    let store = etcd.store("/grpc/").await.unwrap();
    let config = Config {
        heartbeat_interval: Duration::from_millis(200),
        session_timeout: Duration::from_secs(1),
        task_lease: Duration::from_millis(1500),
        ..Config::default()
    };
    let server = Served::start(store.clone(), config, false).await.unwrap();
    let addr = server.url();
    let mut jobs = wait_for(
        Duration::from_secs(10),
        "the coordinator to accept connections",
        || {
            let addr = addr.clone();
            async move {
                distill_coordinator::testing::wait_serving(&addr, Duration::from_secs(10))
                    .await
                    .ok()?;
                JobServiceClient::connect(addr).await.ok()
            }
        },
    )
    .await
    .unwrap();
    let mut workers = WorkerServiceClient::connect(addr.clone()).await.unwrap();

    // Malformed specs: precise errors, nothing stored.
    let bad = [
        ("task = \"text_classification\"\n[teacher\n", "line 2"),
        (
            &format!("{SPEC}[training]\nbatchsize = 3\n") as &str,
            "training.batchsize: unknown field",
        ),
        (
            &format!("{SPEC}[training]\nbatch_size = \"x\"\n"),
            "training.batch_size: invalid type",
        ),
        (
            "task = \"text_classification\"\n[data]\ntrain = \"d\"\n",
            "teacher: missing section",
        ),
        (
            &format!("{SPEC}[training]\nbatch_size = -2\n"),
            "training.batch_size: must be a positive integer, got -2 (line 7)",
        ),
        (
            &format!("{SPEC}[cluster]\nmin_workers = 3\nmax_workers = 2\n"),
            "cluster.min_workers: min_workers (3) is greater than max_workers (2)",
        ),
    ];
    for (spec, want) in bad {
        let req = pb::SubmitJobRequest {
            spec: spec.to_string(),
            format: pb::SpecFormat::Toml as i32,
            ..Default::default()
        };
        let status = jobs.submit_job(req).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{spec}");
        assert!(
            status.message().contains(want),
            "{:?} should contain {want:?}",
            status.message()
        );
    }
    assert!(
        jobs.list_jobs(pb::ListJobsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .jobs
            .is_empty(),
        "nothing stored"
    );

    // A good spec.
    let req = pb::SubmitJobRequest {
        spec: GOOD.into(),
        format: pb::SpecFormat::Toml as i32,
        priority: 1,
        request_id: "r1".into(),
        ..Default::default()
    };
    let job = jobs
        .submit_job(req.clone())
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(job.state, pb::JobState::Pending as i32);
    let again = jobs
        .submit_job(req)
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(again.job_id, job.job_id, "same request id, same job");
    let id = job.job_id.clone();
    assert_eq!(
        jobs.get_job(pb::GetJobRequest {
            job_id: "nope".into()
        })
        .await
        .unwrap_err()
        .code(),
        Code::NotFound
    );
    assert_eq!(
        jobs.get_job(pb::GetJobRequest {
            job_id: String::new()
        })
        .await
        .unwrap_err()
        .code(),
        Code::InvalidArgument
    );

    let register = |name: &str| pb::RegisterRequest {
        worker_name: name.into(),
        version: env!("CARGO_PKG_VERSION").into(),
        collective_protocol: distill_proto::COLLECTIVE_PROTOCOL,
        ..Default::default()
    };
    // The job waits for a worker; once one registers, the scheduler starts
    // it and plans it into two shards.
    let a = workers.register(register("a")).await.unwrap().into_inner();
    assert_eq!((a.heartbeat_interval_ms, a.session_timeout_ms), (200, 1000));
    let ledger = Ledger::new(store.clone());
    wait_for(Duration::from_secs(10), "the job to be planned", || {
        let ledger = ledger.clone();
        let id = id.clone();
        async move {
            let j = ledger.get(&id).await.unwrap().unwrap().value;
            (j.state == JobState::Labelling).then_some(())
        }
    })
    .await
    .unwrap();
    let mut watch = jobs
        .watch_job(pb::WatchJobRequest { job_id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap().job.unwrap();
    assert_eq!(
        first.state,
        pb::JobState::Labelling as i32,
        "watch starts with the current state"
    );

    let lease = |s: &str| pb::LeaseTaskRequest {
        session_id: s.into(),
    };
    let ta = workers
        .lease_task(lease(&a.session_id))
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap();
    let ta_ref = ta.r#ref.clone().unwrap();
    assert_eq!(
        (
            ta_ref.task_id.as_str(),
            ta_ref.attempt,
            ta.shard_start,
            ta.shard_end
        ),
        ("shard-00000", 1, 0, 5)
    );

    // Worker a goes silent. Worker b takes shard 1, then shard 0 once a's lease lapses.
    let b = workers.register(register("b")).await.unwrap().into_inner();
    let tb1 = workers
        .lease_task(lease(&b.session_id))
        .await
        .unwrap()
        .into_inner()
        .task
        .unwrap()
        .r#ref
        .unwrap();
    assert_eq!(tb1.task_id, "shard-00001");
    let silent_since = std::time::Instant::now();
    let tb0 = wait_for(
        Duration::from_secs(10),
        "shard 0 to be re-leased to worker b",
        || {
            let mut workers = workers.clone();
            let (session, running) = (b.session_id.clone(), vec![tb1.clone()]);
            async move {
                let hb = pb::HeartbeatRequest {
                    session_id: session.clone(),
                    running,
                    ..Default::default()
                };
                assert!(
                    workers
                        .heartbeat(hb)
                        .await
                        .unwrap()
                        .into_inner()
                        .abort
                        .is_empty(),
                    "b keeps its lease"
                );
                workers
                    .lease_task(pb::LeaseTaskRequest {
                        session_id: session,
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .task
            }
        },
    )
    .await
    .unwrap()
    .r#ref
    .unwrap();
    let took = silent_since.elapsed();
    assert_eq!((tb0.task_id.as_str(), tb0.attempt), ("shard-00000", 2));
    assert!(
        took < Duration::from_secs(4),
        "reassigned within the task lease (1.5 s) plus slack, took {took:?}"
    );

    // The zombie's report carries attempt 1: refused, and nothing changes.
    let status = workers
        .report_task(success(&a.session_id, &ta_ref))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("stale task attempt"),
        "{}",
        status.message()
    );

    assert!(
        workers
            .report_task(success(&b.session_id, &tb1))
            .await
            .unwrap()
            .into_inner()
            .committed
    );
    assert!(
        workers
            .report_task(success(&b.session_id, &tb0))
            .await
            .unwrap()
            .into_inner()
            .committed
    );
    // A duplicate report of a committed task is told to discard its output.
    assert!(
        !workers
            .report_task(success(&b.session_id, &tb0))
            .await
            .unwrap()
            .into_inner()
            .committed
    );

    let tasks = Tasks::new(store.clone()).shards(&id).await.unwrap();
    let manifests: Vec<_> = tasks
        .iter()
        .map(|t| match &t.value.state {
            TaskState::Committed { manifest_uri, .. } => manifest_uri.as_str(),
            other => panic!("{} not committed: {other:?}", t.value.task_id),
        })
        .collect();
    assert_eq!(
        manifests,
        ["mem://shard-00000/2", "mem://shard-00001/1"],
        "each shard committed once, by its current attempt"
    );
    let got = jobs
        .get_job(pb::GetJobRequest { job_id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        got.state,
        pb::JobState::Training as i32,
        "all shards committed: labelling is done"
    );
    assert_eq!(
        got.progress
            .as_ref()
            .map(|p| (p.shards_committed, p.shards_total)),
        Some((2, 2))
    );

    // The silent worker's session expires (polled without renewing it), and
    // its next heartbeat is told to register again.
    wait_for(
        Duration::from_secs(10),
        "worker a's session to expire",
        || {
            let mut workers = workers.clone();
            let session = a.session_id.clone();
            async move {
                let refused = workers
                    .lease_task(pb::LeaseTaskRequest {
                        session_id: session,
                    })
                    .await
                    .err()?;
                assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
                Some(())
            }
        },
    )
    .await
    .unwrap();
    let hb = pb::HeartbeatRequest {
        session_id: a.session_id.clone(),
        running: vec![ta_ref.clone()],
        ..Default::default()
    };
    let hb = workers.heartbeat(hb).await.unwrap().into_inner();
    assert!(hb.reregister, "an expired session must register again");
    assert_eq!(
        hb.abort,
        vec![ta_ref.clone()],
        "and abort what it thought it was running"
    );

    // Cancel: the watch sees it and ends; cancelling again is refused.
    let cancelled = jobs
        .cancel_job(pb::CancelJobRequest {
            job_id: id.clone(),
            reason: "enough".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (cancelled.state, cancelled.reason.as_str()),
        (pb::JobState::Cancelled as i32, "enough")
    );
    let mut states = vec![first.state];
    while let Some(ev) = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("watch in time")
        .unwrap()
    {
        states.push(ev.job.unwrap().state);
    }
    assert_eq!(states.first(), Some(&(pb::JobState::Labelling as i32)));
    assert!(
        states.contains(&(pb::JobState::Training as i32)),
        "{states:?}"
    );
    assert_eq!(
        states.last(),
        Some(&(pb::JobState::Cancelled as i32)),
        "{states:?}"
    );
    let again = jobs
        .cancel_job(pb::CancelJobRequest {
            job_id: id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition);
    let job = ledger.get(&id).await.unwrap().unwrap();
    assert_eq!(
        job.value.state,
        JobState::Cancelled {
            reason: "enough".into()
        }
    );

    server.stop().await.unwrap();
}
