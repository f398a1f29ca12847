//! Training groups over gRPC with a real etcd: members share a generation
//! and get ranks; a worker's death opens a new generation; a checkpoint
//! commit from a stale generation is refused; checkpoints only move forward
//! and are visible (to joins and to clients) only once committed.

use std::time::Duration;

use distill_coordinator::testing::{wait_for, wait_serving, EtcdServer, Served};
use distill_coordinator::Config;
use distill_proto::v1 as pb;
use pb::job_service_client::JobServiceClient;
use pb::worker_service_client::WorkerServiceClient;
use tonic::transport::Channel;
use tonic::Code;

const SPEC: &str = "task = \"text_classification\"\n[teacher]\npath = \"t\"\n[data]\ntrain = \"d.jsonl\"\n[distill]\nteacher_signal = \"online\"\n[cluster]\nmin_workers = 2\nmax_workers = 2\n";

async fn register(w: &mut WorkerServiceClient<Channel>, name: &str) -> String {
    w.register(pb::RegisterRequest {
        worker_name: name.into(),
        version: env!("CARGO_PKG_VERSION").into(),
        collective_protocol: distill_proto::COLLECTIVE_PROTOCOL,
        collective_address: format!("{name}:29500"),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .session_id
}

/// A coordinator under `config` on a fresh etcd prefix, serving; its
/// clients; and the id of [`SPEC`] submitted to it.
async fn serve_and_submit(
    prefix: &str,
    config: Config,
) -> (
    EtcdServer,
    Served,
    JobServiceClient<Channel>,
    WorkerServiceClient<Channel>,
    String,
) {
    let etcd = EtcdServer::start().await.unwrap();
    let store = etcd.store(prefix).await.unwrap();
    let server = Served::start(store, config, false).await.unwrap();
    let addr = server.url();
    wait_serving(&addr, Duration::from_secs(10)).await.unwrap();
    let mut jobs = JobServiceClient::connect(addr.clone()).await.unwrap();
    let w = WorkerServiceClient::connect(addr).await.unwrap();
    let job = jobs
        .submit_job(pb::SubmitJobRequest {
            spec: SPEC.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .job
        .unwrap()
        .job_id;
    (etcd, server, jobs, w, job)
}

fn commit(session: &str, job: &str, generation: u64, step: u64) -> pb::CommitCheckpointRequest {
    pb::CommitCheckpointRequest {
        session_id: session.into(),
        job_id: job.into(),
        generation,
        step,
        checkpoint_uri: format!("ckpt/{job}/{step}"),
        sha256: "ab".repeat(32),
        total_steps: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn generations_fence_checkpoint_commits() {
    let config = Config {
        heartbeat_interval: Duration::from_millis(200),
        session_timeout: Duration::from_secs(1),
        ..Config::default()
    };
    let (_etcd, server, mut jobs, mut w, job) = serve_and_submit("/groups/", config).await;
    let a = register(&mut w, "a").await;
    let join = |session: &str| pb::JoinGroupRequest {
        session_id: session.into(),
        job_id: job.clone(),
        ..Default::default()
    };
    // One worker: the job cannot start (min 2), so there is no group yet.
    let early = w.join_group(join(&a)).await.unwrap_err();
    assert_eq!(early.code(), Code::FailedPrecondition, "{early:?}");
    let b = register(&mut w, "b").await;
    // An online teacher: planning goes straight to training.
    wait_for(Duration::from_secs(10), "the job to train", || {
        let mut w = w.clone();
        let a = a.clone();
        let req = join(&a);
        async move { w.join_group(req).await.ok() }
    })
    .await
    .unwrap();
    let ja = w.join_group(join(&a)).await.unwrap().into_inner();
    let jb = w.join_group(join(&b)).await.unwrap().into_inner();
    assert_eq!(
        ja.generation, jb.generation,
        "same membership, same generation"
    );
    assert_eq!((ja.world_size, jb.world_size), (2, 2));
    assert_ne!(ja.rank, jb.rank);
    assert_eq!(ja.peers, jb.peers);
    let mut peers = ja.peers.clone();
    peers.sort();
    assert_eq!(peers, ["a:29500", "b:29500"]);
    assert_eq!(
        (ja.checkpoint_uri.as_str(), ja.checkpoint_step),
        ("", 0),
        "nothing committed yet"
    );
    let g1 = ja.generation;

    w.commit_checkpoint(commit(&a, &job, g1, 10)).await.unwrap();
    w.commit_checkpoint(commit(&a, &job, g1, 10))
        .await
        .expect("a retried commit is a no-op");
    let back = w
        .commit_checkpoint(commit(&b, &job, g1, 5))
        .await
        .unwrap_err();
    assert_eq!(back.code(), Code::FailedPrecondition);
    assert!(
        back.message().contains("stale checkpoint step"),
        "{}",
        back.message()
    );
    let bad = w
        .commit_checkpoint(pb::CommitCheckpointRequest {
            sha256: "x".into(),
            ..commit(&a, &job, g1, 11)
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    let seen = jobs
        .get_job(pb::GetJobRequest {
            job_id: job.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(seen.progress.unwrap().checkpoint_step, 10);

    // b dies (stops heartbeating); a keeps its session alive and rejoins:
    // a new generation of one, resuming from the committed checkpoint.
    let rejoined = wait_for(
        Duration::from_secs(10),
        "a new generation without b",
        || {
            let mut w = w.clone();
            let (a, req) = (a.clone(), join(&a));
            async move {
                w.heartbeat(pb::HeartbeatRequest {
                    session_id: a,
                    running: vec![],
                    ..Default::default()
                })
                .await
                .unwrap();
                let j = w.join_group(req).await.unwrap().into_inner();
                (j.generation > g1).then_some(j)
            }
        },
    )
    .await
    .unwrap();
    assert_eq!((rejoined.world_size, rejoined.rank), (1, 0));
    assert_eq!(
        (rejoined.checkpoint_uri.as_str(), rejoined.checkpoint_step),
        (format!("ckpt/{job}/10").as_str(), 10)
    );

    // The old generation is fenced off; the new one commits.
    let stale = w
        .commit_checkpoint(commit(&a, &job, g1, 20))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition);
    assert!(
        stale.message().contains("stale group generation"),
        "{}",
        stale.message()
    );
    w.commit_checkpoint(commit(&a, &job, rejoined.generation, 20))
        .await
        .unwrap();
    let seen = jobs
        .get_job(pb::GetJobRequest {
            job_id: job.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(seen.progress.unwrap().checkpoint_step, 20);

    // a's collective of generation g2 fails while the membership is
    // unchanged: no group yet (a dead member's session may not have
    // expired), then, once a session timeout has passed with no change, a
    // new generation of the same members. The heartbeat of a's training
    // member reports the current generation.
    let g2 = rejoined.generation;
    let failed = pb::JoinGroupRequest {
        failed_generation: g2,
        ..join(&a)
    };
    let wait = w.join_group(failed.clone()).await.unwrap().into_inner();
    assert!(
        wait.retry_after_ms > 0 && wait.generation == 0,
        "an unchanged failed group is not re-formed at once: {wait:?}"
    );
    let t0 = std::time::Instant::now();
    let again = wait_for(Duration::from_secs(10), "a new generation", || {
        let mut w = w.clone();
        let (a, req) = (a.clone(), failed.clone());
        async move {
            w.heartbeat(pb::HeartbeatRequest {
                session_id: a,
                ..Default::default()
            })
            .await
            .unwrap();
            let j = w.join_group(req).await.unwrap().into_inner();
            (j.retry_after_ms == 0).then_some(j)
        }
    })
    .await
    .unwrap();
    assert_eq!((again.generation, again.world_size), (g2 + 1, 1));
    assert!(
        t0.elapsed() >= Duration::from_millis(1800),
        "re-formed only after the grace: {:?}",
        t0.elapsed()
    );
    let hb = w
        .heartbeat(pb::HeartbeatRequest {
            session_id: a.clone(),
            running: vec![pb::TaskRef {
                job_id: job.clone(),
                task_id: "stage-2-train".into(),
                attempt: 0,
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hb.group_generation, g2 + 1);
    assert!(!hb.regroup, "membership unchanged");
    assert!(
        hb.abort.is_empty(),
        "a member of a training job is kept: {hb:?}"
    );

    server.stop().await.unwrap();
}

/// Training is data-parallel: while the holder trains, another assigned
/// worker is handed a *member* lease; once the final checkpoint (its step
/// the training's total) is committed, no more (the holder exports and
/// trains the baseline alone, and a finished member does not start over).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_member_lease_once_the_final_checkpoint_is_committed() {
    let (_etcd, server, _jobs, mut w, job) = serve_and_submit("/members/", Config::default()).await;
    let a = register(&mut w, "a").await;
    let b = register(&mut w, "b").await;
    let lease = |session: &str| pb::LeaseTaskRequest {
        session_id: session.into(),
    };
    let held = wait_for(Duration::from_secs(10), "the training task", || {
        let mut w = w.clone();
        let req = lease(&a);
        async move { w.lease_task(req).await.ok()?.into_inner().task }
    })
    .await
    .unwrap();
    assert!(!held.member);
    let member = w.lease_task(lease(&b)).await.unwrap().into_inner().task;
    assert!(member.is_some_and(|t| t.member), "b trains as a member");
    let g = w
        .join_group(pb::JoinGroupRequest {
            session_id: a.clone(),
            job_id: job.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .generation;
    // A checkpoint before the end changes nothing.
    w.commit_checkpoint(pb::CommitCheckpointRequest {
        total_steps: 20,
        ..commit(&a, &job, g, 10)
    })
    .await
    .unwrap();
    let member = w.lease_task(lease(&b)).await.unwrap().into_inner().task;
    assert!(member.is_some_and(|t| t.member), "still training");
    w.commit_checkpoint(pb::CommitCheckpointRequest {
        total_steps: 20,
        ..commit(&a, &job, g, 20)
    })
    .await
    .unwrap();
    let after = w.lease_task(lease(&b)).await.unwrap().into_inner().task;
    assert!(
        after.is_none(),
        "no member lease after the final checkpoint: {after:?}"
    );
    server.stop().await.unwrap();
}
