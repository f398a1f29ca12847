//! `distill coordinator` as an operator runs it: the real binary on a real
//! etcd, with simulated workers over gRPC (no libtorch in the workers).
//!
//! - SIGKILL mid-job, restart on the same etcd and address: the job finishes
//!   with every shard committed exactly once.
//! - Two coordinators on one etcd: one leads, the other stands by; SIGKILL
//!   the leader and the job completes through the standby, with workers and
//!   the client following the endpoint list.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use distill_coordinator::driver::Shutdown;
use distill_coordinator::sim::{SimClient, SimWorker, WorkLog};
use distill_coordinator::tasks::{TaskState, Tasks};
use distill_coordinator::testing::{wait_for, EtcdServer};
use distill_proto::v1 as pb;
use tokio::io::AsyncBufReadExt;

/// One `distill coordinator` process.
struct Coordinator {
    child: tokio::process::Child,
    addr: String,
}

impl Coordinator {
    /// Starts the binary and waits for its `{"listening": ...}` line.
    async fn spawn(etcd: &str, listen: &str, log: &std::path::Path) -> Coordinator {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_distill"))
            .args(["coordinator", "--etcd", etcd, "--namespace", "/cli/"])
            .args(["--listen", listen])
            .args([
                "--heartbeat-interval-ms",
                "200",
                "--session-timeout-ms",
                "2000",
            ])
            .args(["--leader-ttl-ms", "2000"])
            .env("DISTILL_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn distill coordinator");
        let stdout = child.stdout.take().unwrap();
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("the coordinator prints its address within 30 s")
            .unwrap()
            .expect("a line on stdout");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let addr = v["listening"]
            .as_str()
            .expect("listening address")
            .to_string();
        Coordinator { child, addr }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// SIGKILL: no shutdown path runs.
    async fn kill(mut self) {
        self.child.start_kill().unwrap();
        self.child.wait().await.unwrap();
    }
}

/// The coordinators' logs, for a failure message.
fn logs(dir: &std::path::Path) -> String {
    let mut out = String::new();
    for name in ["a.log", "b.log"] {
        let text = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        out += &format!("--- {name} (last 40 lines)\n");
        for l in tail.into_iter().rev() {
            out += l;
            out += "\n";
        }
    }
    out
}

fn spec(samples: u64, workers: u32) -> String {
    format!(
        "task = \"text_classification\"\n[teacher]\npath = \"t\"\n[data]\ntrain = \"unused.jsonl\"\nnum_samples = {samples}\nshard_size = 1\n[cluster]\nmin_workers = 2\nmax_workers = {workers}\n"
    )
}

/// Starts `n` simulated workers on `endpoints`; they stop when `stop` fires.
fn workers(
    n: usize,
    endpoints: &[String],
    stop: &Shutdown,
) -> Vec<tokio::task::JoinHandle<Result<WorkLog, distill_coordinator::sim::Status>>> {
    (0..n)
        .map(|i| {
            let mut w = SimWorker::new(format!("w{i}"), endpoints.to_vec());
            w.work = Duration::from_millis(60);
            let stop = stop.clone();
            tokio::spawn(async move { w.run(async move { stop.cancelled().await }).await })
        })
        .collect()
}

async fn wait_committed(client: &SimClient, id: &str, at_least: u64) -> pb::Job {
    wait_for(
        Duration::from_secs(60),
        &format!("{at_least} shards of {id} committed"),
        || {
            let mut client = client.clone();
            let id = id.to_string();
            async move {
                let job = client.get(&id).await.ok()?;
                let p = job.progress.clone().unwrap_or_default();
                (p.shards_committed >= at_least).then_some(job)
            }
        },
    )
    .await
    .unwrap()
}

/// Every shard committed exactly once: in the store, each task is
/// committed by exactly one attempt, the samples add up, and no two
/// worker reports were told "committed" for the same task.
async fn assert_exactly_once(etcd: &EtcdServer, id: &str, samples: u64, logs: &[WorkLog]) {
    let store = etcd.store("/cli/").await.unwrap();
    let tasks = Tasks::new(store).shards(id).await.unwrap();
    assert_eq!(tasks.len() as u64, samples);
    let mut total = 0;
    for t in &tasks {
        match &t.value.state {
            TaskState::Committed {
                samples,
                manifest_uri,
                by_attempt,
                ..
            } => {
                total += samples;
                assert!(
                    manifest_uri.ends_with(&format!("/{by_attempt}")),
                    "the output of the attempt that committed: {t:?}"
                );
            }
            other => panic!("{} not committed: {other:?}", t.value.task_id),
        }
    }
    assert_eq!(total, samples, "no sample dropped or duplicated");
    let mut told: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, task, _) in logs.iter().flat_map(|l| &l.committed) {
        *told.entry(task).or_default() += 1;
    }
    assert!(told.values().all(|n| *n == 1), "{told:?}");
}

/// Waits (60 s) for the job to finish labelling, i.e. reach `training`;
/// on timeout, panics with the coordinators' logs from `dir`.
async fn wait_labelled(client: &SimClient, id: &str, what: &str, dir: &std::path::Path) -> pb::Job {
    wait_for(Duration::from_secs(60), what, || {
        let mut client = client.clone();
        let id = id.to_string();
        async move {
            let j = client.get(&id).await.ok()?;
            (j.state == pb::JobState::Training as i32).then_some(j)
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(dir)))
}

async fn finish(
    stop: Shutdown,
    handles: Vec<tokio::task::JoinHandle<Result<WorkLog, distill_coordinator::sim::Status>>>,
) -> Vec<WorkLog> {
    stop.cancel();
    let mut logs = Vec::new();
    for h in handles {
        logs.push(h.await.unwrap().expect("simulated worker"));
    }
    logs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkilled_coordinator_restarts_and_finishes_the_job_exactly_once() {
    const SAMPLES: u64 = 80;
    let etcd = EtcdServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let first = Coordinator::spawn(etcd.endpoint(), "127.0.0.1:0", &dir.path().join("a.log")).await;
    let addr = first.addr.clone();
    let endpoints = vec![first.url()];
    let mut client = SimClient::new(endpoints.clone());
    let id = client.submit(&spec(SAMPLES, 4), 0).await.unwrap().job_id;
    let stop = Shutdown::new();
    let handles = workers(4, &endpoints, &stop);

    let before = wait_committed(&client, &id, 10).await;
    assert_eq!(before.state, pb::JobState::Labelling as i32);
    first.kill().await;

    // Same etcd, same address: the workers' endpoint list still holds.
    let second = Coordinator::spawn(etcd.endpoint(), &addr, &dir.path().join("b.log")).await;
    let done = wait_labelled(&client, &id, "the job to finish labelling", dir.path()).await;
    let p = done.progress.unwrap();
    assert_eq!((p.shards_committed, p.shards_total), (SAMPLES, SAMPLES));
    let logs = finish(stop, handles).await;
    assert_exactly_once(&etcd, &id, SAMPLES, &logs).await;
    second.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn standby_takes_over_when_the_leader_is_killed() {
    use distill_coordinator::store::Store;
    const SAMPLES: u64 = 80;
    let etcd = EtcdServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let a = Coordinator::spawn(etcd.endpoint(), "127.0.0.1:0", &dir.path().join("a.log")).await;
    let b = Coordinator::spawn(etcd.endpoint(), "127.0.0.1:0", &dir.path().join("b.log")).await;
    let endpoints = vec![a.url(), b.url()];
    let store = etcd.store("/cli/").await.unwrap();
    let leader_addr = || {
        let store = store.clone();
        async move {
            let kv = store.get("leader").await.ok()??;
            Some(String::from_utf8(kv.value).unwrap())
        }
    };
    let leader = wait_for(
        Duration::from_secs(20),
        "a leader to be elected",
        leader_addr,
    )
    .await
    .unwrap();
    let (leader, standby) = if leader == a.addr { (a, b) } else { (b, a) };

    // The standby refuses (UNAVAILABLE): a client that only knows it keeps
    // failing over and gets nothing.
    let mut only_standby = SimClient::new(vec![standby.url()]);
    let refused =
        tokio::time::timeout(Duration::from_secs(1), only_standby.get("job-000001")).await;
    assert!(refused.is_err(), "the standby must not answer: {refused:?}");

    let mut client = SimClient::new(endpoints.clone());
    let id = client.submit(&spec(SAMPLES, 4), 0).await.unwrap().job_id;
    let stop = Shutdown::new();
    let handles = workers(4, &endpoints, &stop);
    let before = wait_committed(&client, &id, 10).await;
    assert_eq!(before.state, pb::JobState::Labelling as i32);
    leader.kill().await;

    let done = wait_labelled(&client, &id, "the standby to finish the job", dir.path()).await;
    let p = done.progress.unwrap();
    assert_eq!((p.shards_committed, p.shards_total), (SAMPLES, SAMPLES));
    let logs = finish(stop, handles).await;
    assert_exactly_once(&etcd, &id, SAMPLES, &logs).await;
    assert_eq!(
        leader_addr().await.as_deref(),
        Some(standby.addr.as_str()),
        "the standby leads"
    );
    standby.kill().await;
}

/// A TLS file that cannot be read stops the coordinator before it binds or
/// announces anything, naming the file; `--tls-key` without `--tls-cert` is
/// a usage error.
#[test]
fn unreadable_tls_files_stop_the_coordinator_before_it_listens() {
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("missing-cert.pem");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_distill"))
        .args(["coordinator", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(dir.path().join("state"))
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(dir.path().join("key.pem"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr.contains("missing-cert.pem") && stderr.contains("cannot read"),
        "{stderr}"
    );

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_distill"))
        .args(["coordinator", "--state-dir", "x", "--tls-key", "k.pem"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--tls-cert"), "{stderr}");
}
