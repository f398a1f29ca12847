//! Restart and throughput with a real etcd and simulated workers over gRPC:
//! a coordinator stopped mid-job and started again (new process state, same
//! store) finishes the job with every shard committed exactly once; and a
//! small load run prints task lease + report throughput.

use std::time::{Duration, Instant};

use distill_coordinator::job::JobEvent;
use distill_coordinator::ledger::Ledger;
use distill_coordinator::store::EtcdStore;
use distill_coordinator::tasks::{TaskState, Tasks};
use distill_coordinator::testing::{wait_for, EtcdServer};
use distill_coordinator::{serve, Config};
use distill_proto::v1 as pb;
use pb::worker_service_client::WorkerServiceClient;
use tonic::transport::Channel;

const SPEC: &str = "task = \"text_classification\"\n[teacher]\npath = \"t\"\n[data]\ntrain = \"d.jsonl\"\n[cluster]\nmax_workers = 64\n";

/// A running coordinator and how to stop it.
struct Running {
    addr: String,
    stop: tokio::sync::oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<Result<(), distill_coordinator::CoordinatorError>>,
}

async fn start(store: EtcdStore) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(serve(store, Config::default(), listener, async move {
        let _ = stopped.await;
    }));
    Running { addr, stop, handle }
}

async fn connect(addr: &str) -> WorkerServiceClient<Channel> {
    wait_for(
        Duration::from_secs(10),
        "the coordinator to accept connections",
        || {
            let addr = addr.to_string();
            async move {
                distill_coordinator::testing::wait_serving(&addr, Duration::from_secs(10))
                    .await
                    .ok()?;
                WorkerServiceClient::connect(addr).await.ok()
            }
        },
    )
    .await
    .unwrap()
}

/// A job in labelling with `shards` shards of one sample each.
async fn labelling_job(store: &EtcdStore, shards: u64) -> String {
    let ledger = Ledger::new(store.clone());
    let id = ledger
        .submit(&distill_spec::from_toml_str(SPEC).unwrap(), 0, None)
        .await
        .unwrap()
        .value
        .id;
    ledger.transition(&id, JobEvent::Start).await.unwrap();
    ledger
        .transition(&id, JobEvent::Planned { labelling: true })
        .await
        .unwrap();
    Tasks::new(store.clone())
        .create_shards(&id, shards, 1)
        .await
        .unwrap();
    ledger
        .update(&id, |j| {
            j.progress.shards_total = shards;
            Ok(())
        })
        .await
        .unwrap();
    id
}

/// Leases and commits up to `n` tasks as one worker; how many it did.
async fn work(client: &mut WorkerServiceClient<Channel>, session: &str, n: usize) -> usize {
    for done in 0..n {
        let Some(task) = client
            .lease_task(pb::LeaseTaskRequest {
                session_id: session.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .task
        else {
            return done;
        };
        if task.member {
            // A member lease of the training group: this simulated worker
            // trains nothing, and the holder of the task reports it.
            return done;
        }
        let r = task.r#ref.unwrap();
        let req = pb::ReportTaskRequest {
            session_id: session.into(),
            outcome: Some(pb::report_task_request::Outcome::Success(pb::TaskSuccess {
                manifest_uri: format!("mem://{}/{}", r.task_id, r.attempt),
                manifest_sha256: "0".repeat(64),
                samples: 1,
                ..Default::default()
            })),
            r#ref: Some(r),
        };
        assert!(
            client
                .report_task(req)
                .await
                .unwrap()
                .into_inner()
                .committed
        );
    }
    n
}

fn register(name: &str) -> pb::RegisterRequest {
    pb::RegisterRequest {
        worker_name: name.into(),
        version: env!("CARGO_PKG_VERSION").into(),
        collective_protocol: distill_proto::COLLECTIVE_PROTOCOL,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarted_coordinator_finishes_the_job_exactly_once() {
    let etcd = EtcdServer::start().await.unwrap();
    let store = etcd.store("/restart/").await.unwrap();
    let id = labelling_job(&store, 6).await;

    let first = start(store.clone()).await;
    let mut client = connect(&first.addr).await;
    let session = client
        .register(register("w"))
        .await
        .unwrap()
        .into_inner()
        .session_id;
    assert_eq!(work(&mut client, &session, 3).await, 3);
    first.stop.send(()).unwrap();
    first.handle.await.unwrap().unwrap();

    // A new coordinator on the same store: the worker's session and the job's
    // progress are all in etcd, so the worker carries on where it was.
    let second = start(store.clone()).await;
    let mut client = connect(&second.addr).await;
    let hb = client
        .heartbeat(pb::HeartbeatRequest {
            session_id: session.clone(),
            running: vec![],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!hb.reregister, "the session survives a coordinator restart");
    assert_eq!(
        work(&mut client, &session, 100).await,
        3 + 2,
        "exactly the 3 remaining shards are handed out, then the training and evaluation tasks"
    );

    let tasks = Tasks::new(store.clone()).shards(&id).await.unwrap();
    assert_eq!(tasks.len(), 6);
    for t in &tasks {
        assert!(
            matches!(t.value.state, TaskState::Committed { .. }),
            "{t:?}"
        );
        assert_eq!(t.value.attempt, 1, "no shard was handed out twice: {t:?}");
    }
    let job = Ledger::new(store.clone())
        .get(&id)
        .await
        .unwrap()
        .unwrap()
        .value;
    assert_eq!(job.state.name(), "succeeded");
    assert_eq!(
        (job.progress.shards_committed, job.progress.shards_total),
        (6, 6)
    );
    second.stop.send(()).unwrap();
    second.handle.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn load_task_lease_and_report_throughput() {
    const WORKERS: usize = 8;
    const SHARDS: u64 = 200;
    let etcd = EtcdServer::start().await.unwrap();
    let store = etcd.store("/load/").await.unwrap();
    let id = labelling_job(&store, SHARDS).await;
    let server = start(store.clone()).await;
    let client = connect(&server.addr).await;

    let began = Instant::now();
    let workers: Vec<_> = (0..WORKERS)
        .map(|i| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let session = client
                    .register(register(&format!("w{i}")))
                    .await
                    .unwrap()
                    .into_inner()
                    .session_id;
                work(&mut client, &session, usize::MAX).await
            })
        })
        .collect();
    let mut total = 0;
    for w in workers {
        total += w.await.unwrap();
    }
    let secs = began.elapsed().as_secs_f64();
    assert_eq!(
        total as u64,
        SHARDS + 2,
        "every shard (then training and evaluation) done exactly once across {WORKERS} workers"
    );
    let tasks = Tasks::new(store.clone()).shards(&id).await.unwrap();
    assert!(tasks
        .iter()
        .all(|t| matches!(t.value.state, TaskState::Committed { .. })));
    println!(
        "load: {SHARDS} tasks leased+reported by {WORKERS} workers against etcd in {secs:.2}s = {:.0} tasks/s",
        SHARDS as f64 / secs
    );
    server.stop.send(()).unwrap();
    server.handle.await.unwrap().unwrap();
}
