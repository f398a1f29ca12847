//! Planning counts examples with the worker's reader and policy: a CSV
//! header and a quoted newline are not examples; a bad line fails the job
//! naming file and line, or is skipped and not planned under
//! `data.on_bad_example = "skip"`.

use std::time::Duration;

use distill_coordinator::sim::{SimClient, SimWorker};
use distill_coordinator::testing::{wait_for, EtcdServer, Served};
use distill_coordinator::Config;
use distill_proto::v1 as pb;

async fn planned(dir: &std::path::Path, file: &str, policy: &str) -> pb::Job {
    let etcd = EtcdServer::start().await.unwrap();
    let store = etcd.store("/plan/").await.unwrap();
    let server = Served::start(store, Config::default(), false)
        .await
        .unwrap();
    let url = server.url();
    distill_coordinator::testing::wait_serving(&url, Duration::from_secs(10))
        .await
        .unwrap();
    let spec = format!(
        "task = \"text_classification\"\n[teacher]\npath = \"t\"\n[data]\ntrain = \"{}\"\nshard_size = 2\non_bad_example = \"{policy}\"\n",
        dir.join(file).display()
    );
    let mut client = SimClient::new(vec![url.clone()]);
    let id = client.submit(&spec, 0).await.unwrap().job_id;
    // A registered worker lets the scheduler start (and plan) the job.
    let mut w = SimWorker::new("w", vec![url.clone()]);
    w.register().await.unwrap();
    let job = wait_for(Duration::from_secs(20), "the job planned or failed", || {
        let mut client = client.clone();
        let id = id.clone();
        async move {
            let j = client.get(&id).await.ok()?;
            let p = j.progress.clone().unwrap_or_default();
            (j.state == pb::JobState::Failed as i32 || p.shards_total > 0).then_some(j)
        }
    })
    .await
    .unwrap();
    server.stop().await.unwrap();
    job
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planning_counts_examples_not_lines_and_applies_the_bad_example_policy() {
    let dir = tempfile::tempdir().unwrap();
    // 5 examples over 7 lines (a header, a quoted newline).
    std::fs::write(
        dir.path().join("d.csv"),
        "text,label\n\"two\nlines\",a\nb,b\nc,a\nd,b\ne,a\n",
    )
    .unwrap();
    let job = planned(dir.path(), "d.csv", "fail").await;
    assert_eq!(
        job.progress.unwrap().shards_total,
        3,
        "5 examples in shards of 2"
    );

    std::fs::write(
        dir.path().join("bad.jsonl"),
        "{\"text\": \"ok\", \"label\": \"a\"}\n{\"txt\": \"x\"}\n{\"text\": \"ok\", \"label\": \"b\"}\n",
    )
    .unwrap();
    let job = planned(dir.path(), "bad.jsonl", "fail").await;
    assert_eq!(job.state, pb::JobState::Failed as i32);
    assert!(
        job.reason.contains("data.train")
            && job.reason.contains("bad.jsonl")
            && job.reason.contains("line 2")
            && job.reason.contains("field text: missing"),
        "{}",
        job.reason
    );
    let job = planned(dir.path(), "bad.jsonl", "skip").await;
    assert_ne!(job.state, pb::JobState::Failed as i32, "{}", job.reason);
    assert_eq!(
        job.progress.unwrap().shards_total,
        1,
        "the 2 good examples, one shard"
    );
}
