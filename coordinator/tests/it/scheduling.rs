//! The main loop against a real etcd over gRPC: jobs start only with their
//! minimum of free workers, in queue order (priority, then submission);
//! planning counts the JSONL lines and cuts shards; cancelling a job
//! releases its workers at once (their heartbeats are told to abort) and
//! the next job in the queue gets them.

use std::time::Duration;

use distill_coordinator::testing::{wait_for, EtcdServer, Served};
use distill_coordinator::Config;
use distill_proto::v1 as pb;
use pb::job_service_client::JobServiceClient;
use pb::worker_service_client::WorkerServiceClient;
use tonic::transport::Channel;

fn spec(train: &str, min: u32, max: u32) -> String {
    format!(
        "task = \"text_classification\"\n[teacher]\npath = \"t\"\n[data]\ntrain = \"{train}\"\nshard_size = 4\n[cluster]\nmin_workers = {min}\nmax_workers = {max}\n"
    )
}

async fn state(jobs: &mut JobServiceClient<Channel>, id: &str) -> pb::Job {
    jobs.get_job(pb::GetJobRequest { job_id: id.into() })
        .await
        .unwrap()
        .into_inner()
}

async fn wait_state(jobs: &JobServiceClient<Channel>, id: &str, want: pb::JobState) -> pb::Job {
    wait_for(
        Duration::from_secs(10),
        &format!("{id} to be {want:?}"),
        || {
            let mut jobs = jobs.clone();
            let id = id.to_string();
            async move {
                let j = state(&mut jobs, &id).await;
                (j.state == want as i32).then_some(j)
            }
        },
    )
    .await
    .unwrap()
}

async fn register(w: &mut WorkerServiceClient<Channel>, name: &str) -> String {
    w.register(pb::RegisterRequest {
        worker_name: name.into(),
        version: env!("CARGO_PKG_VERSION").into(),
        collective_protocol: distill_proto::COLLECTIVE_PROTOCOL,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .session_id
}

async fn lease(w: &mut WorkerServiceClient<Channel>, session: &str) -> Option<pb::Task> {
    w.lease_task(pb::LeaseTaskRequest {
        session_id: session.into(),
    })
    .await
    .unwrap()
    .into_inner()
    .task
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queue_policy_planning_and_prompt_release_on_cancel() {
    let etcd = EtcdServer::start().await.unwrap();
    let store = etcd.store("/sched/").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("train.jsonl");
    // 10 samples (blank lines do not count): 3 shards of at most 4.
    let lines: String = (0..10)
        .map(|i| format!("{{\"text\":\"s{i}\",\"label\":0}}\n\n"))
        .collect();
    std::fs::write(&data, lines).unwrap();
    let data = data.display().to_string();

    let config = Config {
        heartbeat_interval: Duration::from_millis(200),
        session_timeout: Duration::from_secs(2),
        task_lease: Duration::from_secs(2),
        ..Config::default()
    };
    let server = Served::start(store.clone(), config, false).await.unwrap();
    let addr = server.url();
    let mut jobs = wait_for(Duration::from_secs(10), "the coordinator", || {
        let addr = addr.clone();
        async move {
            distill_coordinator::testing::wait_serving(&addr, Duration::from_secs(10))
                .await
                .ok()?;
            JobServiceClient::connect(addr).await.ok()
        }
    })
    .await
    .unwrap();
    let mut w = WorkerServiceClient::connect(addr.clone()).await.unwrap();

    let submit = |spec: String, priority: i32| pb::SubmitJobRequest {
        spec,
        format: pb::SpecFormat::Toml as i32,
        priority,
        ..Default::default()
    };
    let low = jobs
        .submit_job(submit(spec(&data, 1, 1), 0))
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap()
        .job_id;
    let high = jobs
        .submit_job(submit(spec(&data, 2, 2), 5))
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap()
        .job_id;
    let missing = jobs
        .submit_job(submit(spec("/no/such/file.jsonl", 1, 1), -1))
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap()
        .job_id;

    // One worker: `high` (priority 5) needs 2 and blocks the queue, so
    // `low` must not start either, even though it would fit.
    let s1 = register(&mut w, "w1").await;
    assert!(lease(&mut w, &s1).await.is_none(), "no job may start yet");
    assert_eq!(
        state(&mut jobs, &high).await.state,
        pb::JobState::Pending as i32
    );
    assert_eq!(
        state(&mut jobs, &low).await.state,
        pb::JobState::Pending as i32
    );

    // The second worker starts `high` on both; planning counts 10 samples.
    let s2 = register(&mut w, "w2").await;
    let planned = wait_state(&jobs, &high, pb::JobState::Labelling).await;
    assert_eq!(planned.progress.unwrap().shards_total, 3);
    let t1 = lease(&mut w, &s1).await.expect("w1 serves high");
    let t2 = lease(&mut w, &s2).await.expect("w2 serves high");
    assert_eq!(t1.r#ref.as_ref().unwrap().job_id, high);
    assert_eq!(t2.r#ref.as_ref().unwrap().job_id, high);
    assert_eq!((t1.shard_start, t1.shard_end), (0, 4));
    assert_eq!(
        state(&mut jobs, &low).await.state,
        pb::JobState::Pending as i32
    );

    // Cancel `high`: heartbeats abort its tasks and `low` gets a worker
    // within a few passes, long before any lease would expire.
    let cancelled_at = std::time::Instant::now();
    jobs.cancel_job(pb::CancelJobRequest {
        job_id: high.clone(),
        reason: "make room".into(),
    })
    .await
    .unwrap();
    let hb = w
        .heartbeat(pb::HeartbeatRequest {
            session_id: s1.clone(),
            running: vec![t1.r#ref.clone().unwrap()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        hb.abort,
        vec![t1.r#ref.clone().unwrap()],
        "cancelled work aborts"
    );
    wait_state(&jobs, &low, pb::JobState::Labelling).await;
    let took = cancelled_at.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "released within a pass or two, took {took:?}"
    );
    let got = wait_for(Duration::from_secs(5), "a task of `low`", || {
        let mut w = w.clone();
        let (s1, s2) = (s1.clone(), s2.clone());
        async move {
            match lease(&mut w, &s1).await {
                Some(t) => Some(t),
                None => lease(&mut w, &s2).await,
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(got.r#ref.unwrap().job_id, low);

    // The job whose data is missing then starts on the free worker and
    // fails at planning, naming the field.
    let failed = wait_state(&jobs, &missing, pb::JobState::Failed).await;
    assert!(
        failed
            .reason
            .contains("planning: data.train: /no/such/file.jsonl: No such file"),
        "{}",
        failed.reason
    );

    server.stop().await.unwrap();
}
