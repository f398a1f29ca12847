//! A cluster job end to end with real processes only: etcd, the
//! `distill coordinator` binary and `distill worker` binaries (libtorch on
//! CPU), a teacher made by the test (transformers, random weights) and a
//! few thousand examples.
//!
//! - Three workers label the corpus; mid-labelling one is SIGKILLed and one
//!   SIGSTOPped. The job still reaches `succeeded` through training and
//!   evaluation; every example has exactly one teacher signal; the signal
//!   is bitwise equal to a one-worker run; the frozen worker, resumed after
//!   the job finished, changes nothing.
//! - The coordinator is SIGKILLed mid-labelling and restarted on the same
//!   etcd and address; the job completes exactly once. The same spec
//!   submitted again reuses every shard: zero are recomputed.

mod common;

use common::cluster::{coordinator, start_cluster, wait_job, worker, Proc};
use common::{make_teacher, write_data, Shape};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use distill_coordinator::ledger::Ledger;
use distill_coordinator::sim::SimClient;
use distill_coordinator::tasks::{TaskState, Tasks};
use distill_coordinator::testing::EtcdServer;
use distill_proto::v1 as pb;

const EXAMPLES: usize = 2400;
const SHARD: usize = 40;

/// Teacher, data and spec in `dir`; returns the spec's text.
fn job(dir: &Path) -> String {
    // 4 layers, hidden 256: big enough that labelling takes seconds.
    make_teacher(
        &dir.join("teacher"),
        Shape {
            layers: 4,
            hidden: 256,
            intermediate: 1024,
        },
    );
    write_data(&dir.join("train.jsonl"), EXAMPLES, 0, 10, 30);
    write_data(&dir.join("test.jsonl"), 40, 10_000, 10, 30);
    let d = dir.display();
    format!(
        r#"name = "cluster-test"
task = "text_classification"
[teacher]
path = "{d}/teacher"
[data]
train = "{d}/train.jsonl"
test = "{d}/test.jsonl"
labels = ["class_0", "class_1"]
max_length = 64
shard_size = {SHARD}
[student]
layers = 1
hidden_size = 32
num_heads = 2
intermediate_size = 64
init = "teacher"
[distill]
teacher_signal = "offline"
[training]
batch_size = 8
steps = 20
eval_every = 100
checkpoint_every = 10
seed = 11
[cluster]
min_workers = 1
max_workers = 3
"#
    )
}

fn committed(job: &pb::Job) -> u64 {
    job.progress.as_ref().map_or(0, |p| p.shards_committed)
}

/// Each shard's signal file under `signal_dir`, keyed by its content key,
/// after checking that the manifests cover `[0, EXAMPLES)` exactly once.
fn shard_files(signal_dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut ranges = vec![];
    let mut files = BTreeMap::new();
    for e in std::fs::read_dir(signal_dir).unwrap() {
        let dir = e.unwrap().path();
        let Ok(text) = std::fs::read_to_string(dir.join("manifest.json")) else {
            continue; // an interrupted write never published a manifest
        };
        let m: serde_json::Value = serde_json::from_str(&text).unwrap();
        let (s, e) = (m["start"].as_u64().unwrap(), m["end"].as_u64().unwrap());
        assert_eq!(m["rows"].as_u64().unwrap(), e - s);
        ranges.push((s, e));
        let key = dir.file_name().unwrap().to_string_lossy().to_string();
        files.insert(key, std::fs::read(dir.join("signal.safetensors")).unwrap());
    }
    ranges.sort_unstable();
    let mut next = 0;
    for (s, e) in &ranges {
        assert_eq!(*s, next, "shards are contiguous, none twice: {ranges:?}");
        next = *e;
    }
    assert_eq!(next as usize, EXAMPLES, "every example has a signal");
    files
}

/// In the store, each shard is committed by exactly one attempt.
async fn assert_exactly_once(store: &distill_coordinator::store::EtcdStore, id: &str) {
    let tasks = Tasks::new(store.clone()).shards(id).await.unwrap();
    assert_eq!(tasks.len(), EXAMPLES / SHARD);
    let mut samples = 0;
    for t in &tasks {
        match &t.value.state {
            TaskState::Committed {
                samples: n,
                by_attempt,
                ..
            } => {
                samples += n;
                assert!(*by_attempt >= 1 && *by_attempt <= t.value.attempt);
            }
            other => panic!("{} not committed: {other:?}", t.value.task_id),
        }
    }
    assert_eq!(samples as usize, EXAMPLES);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_killed_and_frozen_mid_labelling_still_give_one_exact_signal() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let spec = job(dir);
    let (etcd, mut coord, url, client) =
        start_cluster("/three/", &dir.join("art3"), &dir.join("c3.log")).await;
    let id = client.clone().submit(&spec, 0).await.unwrap().job_id;
    let mut ws: Vec<Proc> = (0..3)
        .map(|i| worker(&url, &format!("w{i}"), &dir.join(format!("w{i}.log"))))
        .collect();
    let total = (EXAMPLES / SHARD) as u64;
    let at_kill = wait_job(&client, &id, "a few shards committed", 120, |j| {
        committed(j) >= 3
    })
    .await;
    ws[0].sigkill().await;
    ws[1].signal("-STOP");
    assert!(
        committed(&at_kill) < total / 2,
        "the failures land mid-labelling ({} of {total} committed)",
        committed(&at_kill)
    );
    let done = wait_job(&client, &id, "the job to succeed", 300, |j| {
        j.state == pb::JobState::Succeeded as i32
    })
    .await;
    assert_eq!(committed(&done), total);
    assert_eq!(
        done.outputs.len(),
        6,
        "student, report.json, report.md, two plots, the chosen variant: {done:?}"
    );
    for o in &done.outputs {
        assert!(Path::new(o).exists(), "{o} exists");
    }
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join(format!("art3/jobs/{id}/report.json"))).unwrap(),
    )
    .unwrap();
    assert!(report["student"]["metric"].as_f64().is_some(), "{report}");
    let store = etcd.store("/three/").await.unwrap();
    assert_exactly_once(&store, &id).await;
    let three = shard_files(&dir.join("art3/signal"));

    // The frozen worker wakes up after the fact: whatever it reports is
    // refused, and the job does not change.
    let before = Ledger::new(store.clone()).get(&id).await.unwrap().unwrap();
    ws[1].signal("-CONT");
    tokio::time::sleep(Duration::from_secs(2)).await; // let it try
    let after = Ledger::new(store.clone()).get(&id).await.unwrap().unwrap();
    assert_eq!(after.value.state, before.value.state);
    assert_eq!(after.value.progress.shards_committed, total);
    assert_exactly_once(&store, &id).await;

    // A one-worker run of the same job in a fresh namespace and artifact
    // root gives bitwise the same signal.
    for w in ws.iter_mut() {
        w.sigkill().await;
    }
    coord.sigkill().await;
    let (mut coord1, addr1) = coordinator(
        etcd.endpoint(),
        "/one/",
        "127.0.0.1:0",
        &dir.join("art1"),
        &dir.join("c1.log"),
    )
    .await;
    let url1 = format!("http://{addr1}");
    let client1 = SimClient::new(vec![url1.clone()]);
    let id1 = client1.clone().submit(&spec, 0).await.unwrap().job_id;
    let mut w1 = worker(&url1, "solo", &dir.join("solo.log"));
    wait_job(&client1, &id1, "the one-worker job to succeed", 300, |j| {
        j.state == pb::JobState::Succeeded as i32
    })
    .await;
    let one = shard_files(&dir.join("art1/signal"));
    assert_eq!(
        three.keys().collect::<Vec<_>>(),
        one.keys().collect::<Vec<_>>(),
        "the same content keys"
    );
    for (k, bytes) in &three {
        assert!(
            bytes == &one[k],
            "shard {k} differs from the one-worker run"
        );
    }
    w1.sigkill().await;
    coord1.sigkill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_mid_labelling_finishes_once_and_a_resubmission_reuses_every_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let spec = job(dir);
    let etcd = EtcdServer::start().await.unwrap();
    let log = dir.join("c.log");
    let art = dir.join("art");
    let (mut coord, addr) =
        coordinator(etcd.endpoint(), "/restart/", "127.0.0.1:0", &art, &log).await;
    let url = format!("http://{addr}");
    let client = SimClient::new(vec![url.clone()]);
    let id = client.clone().submit(&spec, 0).await.unwrap().job_id;
    let mut ws: Vec<Proc> = (0..2)
        .map(|i| worker(&url, &format!("r{i}"), &dir.join(format!("r{i}.log"))))
        .collect();
    let total = (EXAMPLES / SHARD) as u64;
    let at_kill = wait_job(&client, &id, "a few shards committed", 120, |j| {
        committed(j) >= 3
    })
    .await;
    coord.sigkill().await;
    assert!(committed(&at_kill) < total / 2, "killed mid-labelling");
    // Same etcd, same address: the workers find it again on their own.
    let (mut coord, _) = coordinator(etcd.endpoint(), "/restart/", &addr, &art, &log).await;
    let done = wait_job(
        &client,
        &id,
        "the job to succeed after the restart",
        300,
        |j| j.state == pb::JobState::Succeeded as i32,
    )
    .await;
    assert_eq!(committed(&done), total);
    let store = etcd.store("/restart/").await.unwrap();
    assert_exactly_once(&store, &id).await;
    shard_files(&art.join("signal"));

    // The same job again, through the client CLI (`distill submit`, then
    // `distill watch` until it ends): every shard is found, verified and
    // reused.
    let spec_file = dir.join("job.toml");
    std::fs::write(&spec_file, &spec).unwrap();
    let cli = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_distill"))
            .args(args)
            .args(["--coordinator", &url])
            .output()
            .unwrap()
    };
    let out = cli(&["submit", spec_file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let again = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_ne!(again, id);
    let out = cli(&["watch", &again, "--output", "json"]);
    assert!(
        out.status.success(),
        "watch exits 0 on success: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = String::from_utf8(out.stdout).unwrap();
    let last: serde_json::Value = serde_json::from_str(lines.lines().last().unwrap()).unwrap();
    assert_eq!(last["state"], "succeeded", "{lines}");
    // A finished job cannot be cancelled: the CLI says so and fails.
    let out = cli(&["cancel", &again]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("invalid job transition"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let done = client.clone().get(&again).await.unwrap();
    let p = done.progress.unwrap();
    assert_eq!(
        (p.shards_committed, p.shards_reused),
        (total, total),
        "zero shards recomputed"
    );

    // The same job file through `distill run` on this machine gives the
    // same report as the cluster's (brought by `distill fetch`): the same
    // teacher and teacher signal, the same student within fp32 reduction
    // order (two ranks there, one here), the same variants and choice.
    let fetched = dir.join("fetched");
    let out = cli(&["fetch", &again, fetched.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "fetch: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let local = dir.join("local");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_distill"))
        .arg("run")
        .arg(&spec_file)
        .arg("--output")
        .arg(&local)
        .args(["--threads", "1"])
        // Its tiny student may stay at chance: this compares the reports,
        // the quality check is tests/quality_guard.rs's.
        .args(["--on-failed-quality", "warn"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "distill run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = |d: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("report.json")).unwrap()).unwrap()
    };
    let (c, l) = (report(&fetched), report(&local));
    assert_eq!(c["teacher"]["metric"], l["teacher"]["metric"], "teacher");
    for k in ["params", "layers", "hidden"] {
        assert_eq!(c["student"][k], l["student"][k], "student {k}");
    }
    let (cs, ls) = (
        c["student"]["metric"].as_f64().unwrap(),
        l["student"]["metric"].as_f64().unwrap(),
    );
    assert!(
        (cs - ls).abs() <= 1.0 / 40.0 + 1e-9,
        "student accuracy on 40 test examples: cluster {cs}, distill run {ls}"
    );
    let names = |r: &serde_json::Value| -> Vec<String> {
        r["variants"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["format"].to_string())
            .collect()
    };
    assert_eq!(names(&c), names(&l), "quantized variants");
    assert_eq!(
        c["config"], l["config"],
        "the job's configuration after defaults"
    );

    // The first job's log (`distill logs`) outlived the coordinator that
    // was killed: it has the lines from before the kill and after the
    // restart, and no shard committed twice. (Appends are best-effort, so
    // a commit whose line was lost at the kill is allowed.)
    let out = cli(&["logs", &id, "--output", "json"]);
    assert!(
        out.status.success(),
        "logs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let msgs: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["message"].as_str().unwrap().to_string()
        })
        .collect();
    for want in ["job pending -> planning", "job evaluating -> succeeded"] {
        assert!(msgs.iter().any(|m| m == want), "{want:?} in {msgs:#?}");
    }
    let shards: Vec<&str> = msgs
        .iter()
        .filter(|m| m.starts_with("shard-") && m.ends_with(" committed"))
        .map(|m| m.split_whitespace().next().unwrap())
        .collect();
    let unique: std::collections::BTreeSet<&str> = shards.iter().copied().collect();
    assert_eq!(
        unique.len(),
        shards.len(),
        "a shard committed twice: {shards:?}"
    );
    assert!(
        shards.len() as u64 + 3 >= total,
        "{} of {total} shard commits in the log",
        shards.len()
    );
    for w in ws.iter_mut() {
        w.sigkill().await;
    }
    coord.sigkill().await;
}

/// A free loopback port (bound, then released).
fn free_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_waits_for_its_coordinator_and_sigterm_gives_training_back() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // The labelling tests' job with the teacher online: training is the
    // first task, and with the 4-layer teacher run at every step, 600
    // steps last long enough to be interrupted.
    let spec = job(dir)
        .replace(
            "teacher_signal = \"offline\"",
            "teacher_signal = \"online\"",
        )
        .replace("steps = 20", "steps = 600")
        .replace("checkpoint_every = 10", "checkpoint_every = 25");
    // The worker starts first, against an address where nothing listens
    // yet: it keeps retrying instead of exiting.
    let addr = free_port();
    let url = format!("http://{addr}");
    let mut a = worker(&url, "early", &dir.join("early.log"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        a.child.try_wait().unwrap().is_none(),
        "the worker is still running without a coordinator"
    );
    let etcd = EtcdServer::start().await.unwrap();
    let art = dir.join("art");
    let (mut coord, _) =
        coordinator(etcd.endpoint(), "/term/", &addr, &art, &dir.join("c.log")).await;
    let client = SimClient::new(vec![url.clone()]);
    let id = client.clone().submit(&spec, 0).await.unwrap().job_id;
    // Progress shows on the job while it trains.
    let training = wait_job(&client, &id, "training progress on the job", 120, |j| {
        j.progress
            .as_ref()
            .is_some_and(|p| p.stage == "distill" && p.steps_done >= 60 && p.steps_total == 600)
    })
    .await;
    assert_eq!(training.state, pb::JobState::Training as i32);
    a.signal("-TERM");
    let status = tokio::time::timeout(Duration::from_secs(30), a.child.wait())
        .await
        .expect("the worker exits within 30 s of SIGTERM")
        .unwrap();
    assert!(status.success(), "exit 0 on SIGTERM: {status:?}");
    // The training task was given back, not failed, and its checkpoint
    // is on disk for whoever takes it next.
    let store = etcd.store("/term/").await.unwrap();
    let tasks = Tasks::new(store.clone()).list(&id).await.unwrap();
    let train = tasks
        .iter()
        .find(|t| t.value.task_id == "stage-2-train")
        .unwrap();
    assert_eq!(train.value.failures, 0, "{train:?}");
    assert!(
        matches!(train.value.state, TaskState::Pending { .. }),
        "{train:?}"
    );
    let latest = std::fs::read_to_string(art.join(format!("jobs/{id}/student-ckpt/LATEST")))
        .expect("a checkpoint was written");
    assert!(!latest.trim().is_empty());
    // Another worker takes it over and finishes from the checkpoint.
    let mut b = worker(&url, "late", &dir.join("late.log"));
    let done = wait_job(&client, &id, "the job to succeed", 300, |j| {
        j.state == pb::JobState::Succeeded as i32
    })
    .await;
    assert_eq!(done.outputs.len(), 6, "{done:?}");
    let late = std::fs::read_to_string(dir.join("late.log")).unwrap();
    assert!(
        !late.contains("distill: step 1/600 "),
        "the second worker resumed instead of starting over:\n{}",
        &late[..late.len().min(2000)]
    );
    b.sigkill().await;
    coord.sigkill().await;
}
