//! Bearer tokens per role and the Prometheus endpoint, over real sockets
//! with a real etcd: a call without a token or with the other role's token
//! is refused; `/metrics` shows jobs and tasks by state, live workers and
//! RPC latencies.

use std::time::Duration;

use distill_coordinator::auth::Tokens;
use distill_coordinator::sim::{SimClient, SimWorker};
use distill_coordinator::testing::{wait_for, EtcdServer, Served};
use distill_coordinator::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

const SPEC: &str = "task = \"text_classification\"\n[teacher]\npath = \"t\"\n[data]\ntrain = \"d.jsonl\"\nnum_samples = 3\nshard_size = 1\n";

async fn scrape(addr: &str) -> String {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    conn.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_per_role_and_metrics() {
    let etcd = EtcdServer::start().await.unwrap();
    let store = etcd.store("/auth/").await.unwrap();
    let config = Config {
        heartbeat_interval: Duration::from_millis(200),
        tokens: Tokens {
            client: Some("client-secret".into()),
            worker: Some("worker-secret".into()),
        },
        ..Config::default()
    };
    let server = Served::start(store, config, true).await.unwrap();
    let url = server.url();
    let metrics_addr = server.metrics.unwrap().to_string();

    // Refusals are answers, not failovers: they come back at once.
    let mut anonymous = SimClient::new(vec![url.clone()]);
    let e = anonymous.submit(SPEC, 0).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let mut wrong_role = SimClient::new(vec![url.clone()]).with_token("worker-secret");
    let e = wrong_role.submit(SPEC, 0).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert_eq!(
        e.message(),
        "permission denied: a worker token cannot call the client api"
    );
    let mut bad_worker = SimWorker::new("w", vec![url.clone()]).with_token("client-secret");
    assert_eq!(
        bad_worker.register().await.unwrap_err().code(),
        Code::PermissionDenied
    );
    let mut unknown = SimWorker::new("w", vec![url.clone()]).with_token("guess");
    assert_eq!(
        unknown.register().await.unwrap_err().code(),
        Code::Unauthenticated
    );

    // With the right tokens the job runs to the end (3 shards, training, evaluation).
    let mut client = SimClient::new(vec![url.clone()]).with_token("client-secret");
    let id = client.submit(SPEC, 0).await.unwrap().job_id;
    let worker = SimWorker::new("w", vec![url.clone()]).with_token("worker-secret");
    let stop_worker = distill_coordinator::driver::Shutdown::new();
    let w = {
        let s = stop_worker.clone();
        tokio::spawn(async move { worker.run(async move { s.cancelled().await }).await })
    };
    wait_for(Duration::from_secs(20), "the job to succeed", || {
        let mut client = client.clone();
        let id = id.clone();
        async move { (client.get(&id).await.ok()?.state == 7).then_some(()) }
    })
    .await
    .unwrap();

    // A report's commit is visible (the job succeeds) before its handler
    // returns and its timer records the call: wait for the fifth
    // report_task to be counted, then check every line of that scrape.
    let report_tasks = "distill_rpc_duration_seconds_count{method=\"report_task\"} 5";
    let text = wait_for(
        Duration::from_secs(10),
        "the last report_task to be timed",
        || {
            let addr = metrics_addr.clone();
            async move {
                let text = scrape(&addr).await;
                text.contains(report_tasks).then_some(text)
            }
        },
    )
    .await
    .unwrap();
    for line in [
        "distill_jobs{state=\"succeeded\"} 1",
        "distill_jobs{state=\"pending\"} 0",
        "distill_tasks{state=\"committed\"} 5",
        "distill_live_workers 1",
        "distill_lease_expiries_total{kind=\"session\"} 0",
        "# TYPE distill_rpc_duration_seconds histogram",
        "distill_rpc_duration_seconds_count{method=\"report_task\"} 5",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    assert!(text.contains("distill_rpc_duration_seconds_bucket{method=\"lease_task\",le=\"+Inf\"}"));

    stop_worker.cancel();
    let log = w.await.unwrap().unwrap();
    assert_eq!(log.committed.len(), 3 + 2, "3 shards, training, evaluation");
    server.stop().await.unwrap();
}
