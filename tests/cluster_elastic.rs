//! Elastic data-parallel training with real processes: etcd, the
//! `distill coordinator` binary and `distill worker` binaries (libtorch on
//! CPU, Gloo over loopback), a random teacher made by the test.
//!
//! Three workers train one student data-parallel. Mid-run:
//!
//! 1. one is SIGKILLed: the survivors re-form a group of two and go on; the
//!    test prints the seconds from the failure to the first step of the new
//!    group and the steps redone (at most the one in flight);
//! 2. a fresh worker starts: it is seen to join (a group of three) and to
//!    receive the state from a peer;
//! 3. one is frozen with SIGSTOP: the coordinator evicts it when its session
//!    expires and the others' collective in flight is aborted — the group
//!    goes on well before the 60 s collective deadline.
//!
//! The job then succeeds, its last checkpoint at the last step, and the
//! watch stream shows the group's size, generation, rate and loss terms.

mod common;

use common::cluster::{start_cluster, wait_job, worker_with, Proc};
use common::{make_teacher, write_data, TINY};
use std::path::Path;
use std::time::{Duration, Instant};

use distill_coordinator::testing::wait_for;
use distill_proto::v1 as pb;

const STEPS: u64 = 1200;

fn spec(dir: &Path) -> String {
    make_teacher(&dir.join("teacher"), TINY);
    write_data(&dir.join("train.jsonl"), 600, 0, 4, 12);
    write_data(&dir.join("test.jsonl"), 40, 10_000, 4, 12);
    let d = dir.display();
    format!(
        r#"name = "elastic-test"
task = "text_classification"
[teacher]
path = "{d}/teacher"
[data]
train = "{d}/train.jsonl"
test = "{d}/test.jsonl"
labels = ["class_0", "class_1"]
max_length = 32
[student]
layers = 1
hidden_size = 32
num_heads = 2
intermediate_size = 64
init = "teacher"
[distill]
teacher_signal = "online"
[training]
batch_size = 12
steps = {STEPS}
eval_every = 1000
checkpoint_every = 25
seed = 5
[quantization]
formats = ["bf16"]
[cluster]
min_workers = 3
max_workers = 4
"#
    )
}

fn steps_done(j: &pb::Job) -> u64 {
    j.progress.as_ref().map_or(0, |p| p.steps_done)
}

/// Lines of `log` containing `what`.
fn lines(log: &Path, what: &str) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(what))
        .map(String::from)
        .collect()
}

/// The value of `key=` in a log line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    line[at..].split_whitespace().next()
}

/// Waits for a line with `what` (and every `also`) in one of `logs`,
/// beyond the first `skip[i]` such lines of log `i`.
async fn wait_line(logs: &[&Path], what: &str, also: &[&str], skip: &[usize], secs: u64) -> String {
    wait_for(Duration::from_secs(secs), what, || async {
        logs.iter().zip(skip).find_map(|(log, &n)| {
            lines(log, what)
                .into_iter()
                .skip(n)
                .find(|l| also.iter().all(|a| l.contains(a)))
        })
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_survives_a_kill_a_join_and_a_freeze() {
    let tmp = tempfile::tempdir().unwrap();
    // DISTILL_KEEP_TEST_DIR=1 keeps the logs for a look after a failure.
    let dir = &if std::env::var_os("DISTILL_KEEP_TEST_DIR").is_some() {
        tmp.keep()
    } else {
        tmp.path().to_path_buf()
    };
    eprintln!("test directory: {}", dir.display());
    let spec = spec(dir);
    let (_etcd, mut coord, url, client) =
        start_cluster("/elastic/", &dir.join("art"), &dir.join("coordinator.log")).await;
    let log = |i: usize| dir.join(format!("w{i}.log"));
    // A long collective deadline: a frozen peer must be evicted by the
    // coordinator, not waited out.
    let start = |i: usize| -> Proc {
        worker_with(
            &url,
            &format!("w{i}"),
            &log(i),
            &["--collective-timeout-ms", "60000"],
        )
    };
    let id = client.clone().submit(&spec, 0).await.unwrap().job_id;
    let mut ws: Vec<Proc> = (0..3).map(start).collect();
    wait_line(
        &[&log(0), &log(1), &log(2)],
        "group formed",
        &["world=3"],
        &[0, 0, 0],
        120,
    )
    .await;
    let at = wait_job(&client, &id, "training under way", 120, |j| {
        steps_done(j) >= 30
    })
    .await;
    eprintln!("steps done before the kill: {}", steps_done(&at));

    // 1. SIGKILL one worker.
    let killed_at = Instant::now();
    ws[0].sigkill().await;
    let recovered = wait_line(
        &[&log(1), &log(2)],
        "recovered: first step of the new group done",
        &["world=2"],
        &[0, 0],
        60,
    )
    .await;
    let secs: f64 = field(&recovered, "seconds_since_failure")
        .unwrap()
        .parse()
        .unwrap();
    let after_join: f64 = field(&recovered, "seconds_since_join")
        .unwrap()
        .parse()
        .unwrap();
    let redone: u64 = field(&recovered, "steps_redone").unwrap().parse().unwrap();
    eprintln!(
        "SIGKILL: {secs:.2} s from the failure to the first step of the new group \
         (session timeout 1.5 s; {:.2} s from the kill as the test saw it), of \
         which {after_join:.3} s after the coordinator formed the new group; \
         {redone} step(s) redone besides the one in flight",
        killed_at.elapsed().as_secs_f64()
    );
    assert!(
        redone <= 1,
        "at most the step in flight is redone: {recovered}"
    );

    // 2. A fresh worker joins, and receives the state from a peer.
    ws.push(start(3));
    let formed = wait_line(&[&log(3)], "group formed", &["world=3"], &[0], 60).await;
    let receivers: u32 = field(&formed, "receivers").unwrap().parse().unwrap();
    assert!(
        receivers >= 1,
        "the new member received the state: {formed}"
    );
    eprintln!("joined: {formed}");
    // The watch stream shows the group: its size, generation and rate.
    let seen = wait_job(&client, &id, "progress from the group of three", 60, |j| {
        j.progress
            .as_ref()
            .is_some_and(|p| p.world_size == 3 && p.generation >= 3 && p.samples_per_second > 0.0)
    })
    .await;
    let p = seen.progress.unwrap();
    eprintln!(
        "progress: world {} generation {} {:.1} steps/s {:.0} samples/s ETA {:.1} s terms {:?}",
        p.world_size,
        p.generation,
        p.steps_per_second,
        p.samples_per_second,
        p.eta_seconds,
        p.loss_terms
    );
    assert!(p.loss_terms.contains_key("task"), "{:?}", p.loss_terms);

    // 3. SIGSTOP one of the original survivors.
    let seen = [
        lines(&log(2), "group formed").len(),
        lines(&log(3), "group formed").len(),
    ];
    let frozen_at = Instant::now();
    ws[1].signal("-STOP");
    let formed = wait_line(&[&log(2), &log(3)], "group formed", &["world=2"], &seen, 60).await;
    let took = frozen_at.elapsed();
    eprintln!(
        "SIGSTOP: evicted and re-formed after {:.2} s: {formed}",
        took.as_secs_f64()
    );
    assert!(
        took < Duration::from_secs(30),
        "evicted by the coordinator, not at the 60 s collective deadline ({took:?})"
    );

    let training = wait_job(&client, &id, "the job after the freeze", 60, |_| true).await;
    assert_eq!(
        training.state,
        pb::JobState::Training as i32,
        "the freeze landed mid-training ({} steps done)",
        steps_done(&training)
    );
    let done = wait_job(&client, &id, "the job to succeed", 300, |j| {
        j.state == pb::JobState::Succeeded as i32
    })
    .await;
    // The last checkpoint, committed with the last step.
    assert_eq!(done.progress.as_ref().unwrap().checkpoint_step, STEPS);
    for o in &done.outputs {
        assert!(Path::new(o).exists(), "{o} exists");
    }
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join(format!("art/jobs/{id}/report.json"))).unwrap(),
    )
    .unwrap();
    assert!(report["student"]["metric"].as_f64().is_some(), "{report}");
    // `distill fetch` downloads the outputs, byte for byte.
    let fetched = dir.join("fetched");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_distill"))
        .args(["fetch", &id])
        .arg(&fetched)
        .args(["--coordinator", &url, "--output", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(summary["files"].as_u64().unwrap() >= 4, "{summary}");
    let job_dir = dir.join(format!("art/jobs/{id}"));
    for f in [
        "report.json",
        "report.md",
        "student/model.safetensors",
        "student/config.json",
    ] {
        assert_eq!(
            std::fs::read(fetched.join(f)).unwrap(),
            std::fs::read(job_dir.join(f)).unwrap(),
            "{f} fetched intact"
        );
    }
    ws[1].signal("-CONT");
    for w in ws.iter_mut() {
        w.sigkill().await;
    }
    coord.sigkill().await;
}
