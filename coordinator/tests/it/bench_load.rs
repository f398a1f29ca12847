//! Load benchmarks against a real etcd on loopback (run with `--release`;
//! they print timings and assert only correctness):
//!
//! - `bench_heartbeats`: `BENCH_WORKERS` (default 1,000) simulated workers
//!   register and heartbeat concurrently for a while; none may be declared
//!   dead (no `reregister`, no session expiry);
//! - `bench_lease_report`: simulated workers lease and report every task of
//!   a job; prints tasks/s and where the time goes (client-side latency per
//!   RPC vs. the handler time the coordinator measured itself).

use std::time::{Duration, Instant};

use distill_coordinator::driver::Shutdown;
use distill_coordinator::sim::{SimClient, SimWorker};
use distill_coordinator::testing::{wait_serving, EtcdServer};
use distill_coordinator::{serve_full, Config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(((v.len() as f64 - 1.0) * p).round() as usize)
        .copied()
        .unwrap_or(0.0)
        * 1e3
}

/// A coordinator on loopback with metrics; returns (url, metrics addr, stop).
async fn start(
    etcd: &EtcdServer,
    ns: &str,
    config: Config,
) -> (
    String,
    String,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let store = etcd.store(ns).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let maddr = metrics.local_addr().unwrap().to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let h = tokio::spawn(async move {
        serve_full(store, config, listener, Some(metrics), async move {
            let _ = stopped.await;
        })
        .await
        .unwrap()
    });
    wait_serving(&url, Duration::from_secs(10)).await.unwrap();
    (url, maddr, stop, h)
}

/// (sum seconds, count) of a method's handler latency from `/metrics`.
async fn handler_time(maddr: &str, method: &str) -> (f64, f64) {
    let mut c = tokio::net::TcpStream::connect(maddr).await.unwrap();
    c.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").await.unwrap();
    let mut text = String::new();
    c.read_to_string(&mut text).await.unwrap();
    let get = |what: &str| {
        let key = format!("distill_rpc_duration_seconds_{what}{{method=\"{method}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&key))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    (get("sum"), get("count"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_heartbeats() {
    let workers = env("BENCH_WORKERS", 1000);
    let rounds = env("BENCH_ROUNDS", 10);
    let etcd = EtcdServer::start().await.unwrap();
    let config = Config {
        heartbeat_interval: Duration::from_millis(1000),
        session_timeout: Duration::from_secs(5),
        ..Config::default()
    };
    let (url, maddr, stop, server) = start(&etcd, "/bench-hb/", config).await;
    let began = Instant::now();
    let tasks: Vec<_> = (0..workers)
        .map(|i| {
            let mut w = SimWorker::new(format!("w{i}"), vec![url.clone()]);
            tokio::spawn(async move {
                let t = Instant::now();
                let r = w.register().await.unwrap();
                let reg = t.elapsed().as_secs_f64();
                let every = Duration::from_millis(r.heartbeat_interval_ms);
                let mut lat = Vec::new();
                let mut dead = 0;
                let mut tick = tokio::time::interval(every);
                tick.tick().await;
                for _ in 0..rounds {
                    tick.tick().await;
                    let t = Instant::now();
                    let hb = w.heartbeat(vec![]).await.unwrap();
                    lat.push(t.elapsed().as_secs_f64());
                    dead += hb.reregister as usize;
                }
                (reg, lat, dead)
            })
        })
        .collect();
    let (mut reg, mut lat, mut dead) = (Vec::new(), Vec::new(), 0);
    for t in tasks {
        let (r, l, d) = t.await.unwrap();
        reg.push(r);
        lat.extend(l);
        dead += d;
    }
    let secs = began.elapsed().as_secs_f64();
    let (hsum, hcount) = handler_time(&maddr, "heartbeat").await;
    let live = {
        use distill_coordinator::store::Store;
        let store = etcd.store("/bench-hb/").await.unwrap();
        store.range("sessions/").await.unwrap().0.len()
    };
    println!(
        "bench_heartbeats: {workers} workers x {rounds} heartbeats (1 s interval, 5 s timeout) in {secs:.1}s: \
         {:.0} heartbeats/s; register p50 {:.1} ms p99 {:.1} ms; heartbeat p50 {:.1} ms p99 {:.1} ms max {:.1} ms; \
         handler mean {:.2} ms (rest is gRPC + client); false deaths {dead}; live sessions {live}",
        lat.len() as f64 / secs,
        pct(&mut reg, 0.5),
        pct(&mut reg, 0.99),
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.99),
        pct(&mut lat, 1.0),
        hsum / hcount.max(1.0) * 1e3,
    );
    assert_eq!(dead, 0, "no worker may be declared dead while heartbeating");
    assert_eq!(live, workers, "every session alive");
    stop.send(()).unwrap();
    server.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_lease_report() {
    let workers = env("BENCH_LEASE_WORKERS", 16);
    let shards = env("BENCH_SHARDS", 2000);
    let etcd = EtcdServer::start().await.unwrap();
    // Workers here do not heartbeat (only lease and report): sessions and
    // task leases outlive the run.
    let config = Config {
        heartbeat_interval: Duration::from_millis(200),
        session_timeout: Duration::from_secs(300),
        task_lease: Duration::from_secs(300),
        ..Config::default()
    };
    let (url, maddr, stop, server) = start(&etcd, "/bench-lease/", config).await;
    let spec = format!(
        "task = \"text_classification\"\n[teacher]\npath = \"t\"\n[data]\ntrain = \"d.jsonl\"\nnum_samples = {shards}\nshard_size = 1\n[cluster]\nmax_workers = {workers}\n"
    );
    let mut client = SimClient::new(vec![url.clone()]);
    let id = client.submit(&spec, 0).await.unwrap().job_id;
    // Register everyone first so that planning is not in the timing.
    let mut ws = Vec::new();
    for i in 0..workers {
        let mut w = SimWorker::new(format!("w{i}"), vec![url.clone()]);
        w.register().await.unwrap();
        ws.push(w);
    }
    distill_coordinator::testing::wait_for(Duration::from_secs(60), "planning", || {
        let mut c = client.clone();
        let id = id.clone();
        async move { (c.get(&id).await.ok()?.state == 3).then_some(()) }
    })
    .await
    .unwrap();
    let stop_all = Shutdown::new();
    let began = Instant::now();
    let handles: Vec<_> = ws
        .into_iter()
        .map(|mut w| {
            tokio::spawn(async move {
                let (mut lease, mut report, mut done) = (Vec::new(), Vec::new(), 0);
                loop {
                    let t = Instant::now();
                    let Some(task) = w.lease().await.unwrap().task else {
                        break;
                    };
                    lease.push(t.elapsed().as_secs_f64());
                    let t = Instant::now();
                    assert!(w.report_success(&task).await.unwrap());
                    report.push(t.elapsed().as_secs_f64());
                    done += 1;
                }
                (lease, report, done)
            })
        })
        .collect();
    let (mut lease, mut report, mut done) = (Vec::new(), Vec::new(), 0);
    for h in handles {
        let (l, r, d) = h.await.unwrap();
        lease.extend(l);
        report.extend(r);
        done += d;
    }
    let secs = began.elapsed().as_secs_f64();
    stop_all.cancel();
    let (ls, lc) = handler_time(&maddr, "lease_task").await;
    let (rs, rc) = handler_time(&maddr, "report_task").await;
    let job = client.get(&id).await.unwrap();
    println!(
        "bench_lease_report: {shards} tasks by {workers} workers against etcd in {secs:.2}s = {:.0} tasks/s; \
         lease p50 {:.2} ms p99 {:.2} ms (handler mean {:.2} ms); report p50 {:.2} ms p99 {:.2} ms (handler mean {:.2} ms)",
        done as f64 / secs,
        pct(&mut lease, 0.5),
        pct(&mut lease, 0.99),
        ls / lc.max(1.0) * 1e3,
        pct(&mut report, 0.5),
        pct(&mut report, 0.99),
        rs / rc.max(1.0) * 1e3,
    );
    assert_eq!(
        done,
        shards + 2,
        "every shard, then the training and evaluation tasks, exactly once"
    );
    assert_eq!(job.state, 7, "the job ran to the end");
    stop.send(()).unwrap();
    server.await.unwrap();
}
