//! Real processes for the cluster tests: `distill coordinator` on etcd and
//! `distill worker`s, with their logs in files.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use distill_coordinator::sim::SimClient;
use distill_coordinator::testing::{wait_for, EtcdServer};
use distill_proto::v1 as pb;
use tokio::io::AsyncBufReadExt;

pub struct Proc {
    pub child: tokio::process::Child,
}

impl Proc {
    pub fn pid(&self) -> String {
        self.child.id().expect("running").to_string()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.pid()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    }

    pub async fn sigkill(&mut self) {
        self.child.start_kill().unwrap();
        self.child.wait().await.unwrap();
    }
}

/// `distill coordinator` on etcd; waits for its address.
pub async fn coordinator(
    etcd: &str,
    ns: &str,
    listen: &str,
    artifacts: &Path,
    log: &Path,
) -> (Proc, String) {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_distill"))
        .args(["coordinator", "--etcd", etcd, "--namespace", ns])
        .args(["--listen", listen])
        .args([
            "--heartbeat-interval-ms",
            "200",
            "--session-timeout-ms",
            "1500",
        ])
        .args(["--speculation-factor", "0"])
        .arg("--artifacts")
        .arg(artifacts)
        .env("DISTILL_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap(),
        )
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
    let addr = v["listening"].as_str().expect("listening").to_string();
    (Proc { child }, addr)
}

/// `distill worker` on one libtorch thread.
pub fn worker(url: &str, name: &str, log: &Path) -> Proc {
    worker_with(url, name, log, &[])
}

/// `distill worker` on one libtorch thread, with `extra` arguments.
pub fn worker_with(url: &str, name: &str, log: &Path, extra: &[&str]) -> Proc {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_distill"))
        .args([
            "worker",
            "--coordinator",
            url,
            "--threads",
            "1",
            "--name",
            name,
        ])
        .args(["--max-backoff-ms", "300"])
        .args(extra)
        .env("DISTILL_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn distill worker");
    Proc { child }
}

pub async fn wait_job(
    client: &SimClient,
    id: &str,
    what: &str,
    secs: u64,
    ok: impl Fn(&pb::Job) -> bool,
) -> pb::Job {
    wait_for(Duration::from_secs(secs), what, || {
        let mut client = client.clone();
        let id = id.to_string();
        let ok = &ok;
        async move {
            let job = client.get(&id).await.ok()?;
            assert!(
                job.state != pb::JobState::Failed as i32
                    && job.state != pb::JobState::Cancelled as i32,
                "job ended badly: {job:?}"
            );
            ok(&job).then_some(job)
        }
    })
    .await
    .unwrap()
}

/// A fresh etcd and `distill coordinator` on it (namespace `ns`, artifact
/// root `art`, log `log`): etcd, the coordinator, its URL and a client.
pub async fn start_cluster(
    ns: &str,
    art: &Path,
    log: &Path,
) -> (EtcdServer, Proc, String, SimClient) {
    let etcd = EtcdServer::start().await.unwrap();
    let (coord, addr) = coordinator(etcd.endpoint(), ns, "127.0.0.1:0", art, log).await;
    let url = format!("http://{addr}");
    let client = SimClient::new(vec![url.clone()]);
    (etcd, coord, url, client)
}
