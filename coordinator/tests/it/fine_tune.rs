//! A job with `teacher.fine_tune` and an offline teacher signal: the teacher
//! is fine-tuned first, in a task of its own (`fine-tune-teacher`, spanning
//! the job's samples); no shard exists until it commits, and its commit
//! creates them. A coordinator that died between that commit and the
//! shards' creation creates them when the next one takes over. Real etcd,
//! simulated workers over gRPC; the job's chosen output directory travels
//! on every lease.

use std::time::Duration;

use distill_coordinator::sim::{SimClient, SimWorker};
use distill_coordinator::store::{Store, Txn};
use distill_coordinator::tasks::{TaskKind, Tasks};
use distill_coordinator::testing::{wait_for, wait_serving, EtcdServer, Served};
use distill_coordinator::Config;
use distill_proto::client::authed;
use distill_proto::v1 as pb;
use pb::job_service_client::JobServiceClient;

/// Heartbeats and leases until a task comes (the scheduler needs a moment
/// to start and plan the job, or to move it to this worker).
async fn next_task(w: &mut SimWorker) -> pb::Task {
    wait_for(Duration::from_secs(20), "a task to lease", || {
        let mut w = w.clone();
        async move {
            // Heartbeats keep the session (the job moves to a worker
            // only once the previous one's session expired).
            w.heartbeat(vec![]).await.ok()?;
            w.lease().await.ok()?.task
        }
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_job_fine_tunes_its_teacher_before_any_shard_exists() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d.jsonl");
    std::fs::write(
        &data,
        (0..5)
            .map(|i| format!("{{\"text\": \"t{i}\", \"label\": \"a\"}}\n"))
            .collect::<String>(),
    )
    .unwrap();
    let spec = format!(
        "task = \"text_classification\"\n[teacher]\npath = \"t\"\nfine_tune = true\n[data]\ntrain = \"{}\"\nshard_size = 2\n[distill]\nteacher_signal = \"offline\"\n",
        data.display()
    );
    let out = dir.path().join("out").display().to_string();
    let etcd = EtcdServer::start().await.unwrap();
    let store = etcd.store("/ft/").await.unwrap();
    let server = Served::start(store.clone(), Config::default(), false)
        .await
        .unwrap();
    let url = server.url();
    wait_serving(&url, Duration::from_secs(10)).await.unwrap();
    let mut jobs = JobServiceClient::connect(url.clone()).await.unwrap();
    let job = jobs
        .submit_job(authed(
            pb::SubmitJobRequest {
                spec: spec.clone(),
                output_dir: out.clone(),
                ..Default::default()
            },
            None,
        ))
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap();
    assert_eq!(job.output_dir, out);
    let id = job.job_id;
    // A relative output directory is refused, naming the field.
    let bad = jobs
        .submit_job(pb::SubmitJobRequest {
            spec: spec.clone(),
            output_dir: "runs/x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().contains("output_dir"), "{}", bad.message());

    let mut w = SimWorker::new("w", vec![url.clone()]);
    w.register().await.unwrap();
    let ft = next_task(&mut w).await;
    let r = ft.r#ref.clone().unwrap();
    assert_eq!(r.task_id, "fine-tune-teacher");
    assert_eq!(ft.kind, pb::TaskKind::FineTuneTeacher as i32);
    assert_eq!((ft.shard_start, ft.shard_end), (0, 5), "spans every sample");
    assert_eq!(ft.job_dir, out, "the job's chosen directory");
    let tasks = Tasks::new(store.clone());
    let kinds = |ts: Vec<
        distill_coordinator::ledger::Versioned<distill_coordinator::tasks::TaskRecord>,
    >| { ts.into_iter().map(|t| t.value.kind).collect::<Vec<_>>() };
    assert_eq!(
        kinds(tasks.list(&id).await.unwrap()),
        vec![TaskKind::FineTuneTeacher],
        "no shard before the teacher is fine-tuned"
    );
    let mut client = SimClient::new(vec![url.clone()]);
    let j = client.get(&id).await.unwrap();
    assert_eq!(j.state, pb::JobState::Labelling as i32);
    assert_eq!(j.progress.unwrap().shards_total, 3);

    assert!(w.report_success(&ft).await.unwrap());
    let all = tasks.list(&id).await.unwrap();
    assert_eq!(
        kinds(all.clone()),
        vec![
            TaskKind::FineTuneTeacher,
            TaskKind::TeacherSignal,
            TaskKind::TeacherSignal,
            TaskKind::TeacherSignal
        ],
        "its commit created the shards"
    );

    // The coordinator dies between that commit and the shards' creation:
    // the shards are removed as if they had never been written.
    server.stop().await.unwrap();
    let mut txn = Txn::new();
    for t in all
        .iter()
        .filter(|t| t.value.kind == TaskKind::TeacherSignal)
    {
        txn = txn.delete(format!("tasks/{id}/{}", t.value.task_id));
    }
    assert!(store.txn(txn).await.unwrap().committed());
    assert_eq!(tasks.list(&id).await.unwrap().len(), 1);

    // The next coordinator creates them on taking over, and the job
    // labels each once and goes on to training.
    let server = Served::start(store.clone(), Config::default(), false)
        .await
        .unwrap();
    let url = server.url();
    wait_serving(&url, Duration::from_secs(10)).await.unwrap();
    let mut w = SimWorker::new("w2", vec![url.clone()]);
    w.register().await.unwrap();
    let mut shards = vec![];
    loop {
        let t = next_task(&mut w).await;
        let r = t.r#ref.clone().unwrap();
        if t.kind != pb::TaskKind::TeacherSignal as i32 {
            assert_eq!(r.task_id, "stage-2-train");
            assert_eq!(t.job_dir, out);
            break;
        }
        shards.push((t.shard_start, t.shard_end));
        assert!(w.report_success(&t).await.unwrap());
    }
    assert_eq!(shards, vec![(0, 2), (2, 4), (4, 5)]);
    let mut client = SimClient::new(vec![url.clone()]);
    let j = client.get(&id).await.unwrap();
    assert_eq!(j.state, pb::JobState::Training as i32);
    assert_eq!(j.progress.unwrap().shards_committed, 3);
    server.stop().await.unwrap();
}
