//! Speculative re-execution of stragglers, on a real etcd over real
//! sockets: one simulated worker takes a shard and then runs 100× slower
//! than its peers while still heartbeating (alive, so its lease never
//! expires). With speculation on, an idle peer gets a backup attempt of that
//! shard, its commit wins, the straggler's heartbeat tells it to abort, and
//! every shard is committed exactly once long before the straggler would
//! have finished. With speculation off, the same straggler holds the job.

use std::time::Duration;

use distill_coordinator::driver::Shutdown;
use distill_coordinator::sim::{SimClient, SimWorker, Status, WorkLog};
use distill_coordinator::tasks::{Speculation, TaskState, Tasks};
use distill_coordinator::testing::{wait_for, wait_serving, EtcdServer, Served};
use distill_coordinator::Config;

const SHARDS: u64 = 12;
const SLOW: Duration = Duration::from_secs(30);

fn spec() -> String {
    format!(
        "task = \"text_classification\"\n[teacher]\npath = \"t\"\n[data]\ntrain = \"d.jsonl\"\nnum_samples = {SHARDS}\nshard_size = 1\n[cluster]\nmin_workers = 1\nmax_workers = 3\n"
    )
}

type Handle = tokio::task::JoinHandle<Result<WorkLog, Status>>;

fn spawn(name: &str, url: &str, work: Duration, stop: &Shutdown) -> Handle {
    let mut w = SimWorker::new(name, vec![url.to_string()]);
    w.work = work;
    let stop = stop.clone();
    tokio::spawn(async move { w.run(async move { stop.cancelled().await }).await })
}

/// Starts a coordinator, a slow worker that takes the first shard, then two
/// fast workers. Returns what happened after `watch`.
struct Run {
    etcd: EtcdServer,
    client: SimClient,
    job: String,
    stop: Shutdown,
    slow: Handle,
    fast: Vec<Handle>,
    served: Served,
}

async fn start(speculation: Option<Speculation>) -> Run {
    let etcd = EtcdServer::start().await.unwrap();
    let store = etcd.store("/spec/").await.unwrap();
    let config = Config {
        heartbeat_interval: Duration::from_millis(100),
        session_timeout: Duration::from_secs(2),
        task_lease: Duration::from_secs(2),
        speculation,
        ..Config::default()
    };
    let served = Served::start(store.clone(), config, false).await.unwrap();
    let url = served.url();
    wait_serving(&url, Duration::from_secs(20)).await.unwrap();
    let mut client = SimClient::new(vec![url.clone()]);
    let job = client.submit(&spec(), 0).await.unwrap().job_id;
    let stop = Shutdown::new();
    let slow = spawn("slow", &url, SLOW, &stop);
    // The slow worker holds a shard before the fast ones arrive.
    let tasks = Tasks::new(store);
    let leased = wait_for(Duration::from_secs(20), "the slow worker to lease", || {
        let (tasks, job) = (tasks.clone(), job.clone());
        async move {
            let all = tasks.list(&job).await.ok()?;
            all.iter()
                .any(|t| matches!(t.value.state, TaskState::Leased { .. }))
                .then_some(())
        }
    })
    .await;
    if let Err(e) = leased {
        let seen = client.get(&job).await;
        panic!(
            "{e}; slow worker finished: {}, job: {seen:?}",
            slow.is_finished()
        );
    }
    let fast = (0..2)
        .map(|i| spawn(&format!("fast{i}"), &url, Duration::from_millis(50), &stop))
        .collect();
    Run {
        etcd,
        client,
        job,
        stop,
        slow,
        fast,
        served,
    }
}

impl Run {
    async fn committed(&self) -> u64 {
        let mut c = self.client.clone();
        c.get(&self.job)
            .await
            .ok()
            .and_then(|j| j.progress)
            .map_or(0, |p| p.shards_committed)
    }

    async fn finish(self) -> (WorkLog, Vec<WorkLog>, EtcdServer) {
        self.stop.cancel();
        let slow = self.slow.await.unwrap().unwrap();
        let mut fast = Vec::new();
        for h in self.fast {
            fast.push(h.await.unwrap().unwrap());
        }
        self.served.stop().await.unwrap();
        (slow, fast, self.etcd)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_straggler_is_backed_up_and_the_first_commit_wins() {
    let run = start(Some(Speculation {
        factor: 2.0,
        min_age_ms: 300,
        min_committed: 3,
    }))
    .await;
    let t0 = std::time::Instant::now();
    wait_for(Duration::from_secs(20), "every shard committed", || async {
        (run.committed().await == SHARDS).then_some(())
    })
    .await
    .unwrap();
    let took = t0.elapsed();
    assert!(
        took < SLOW / 2,
        "finished in {took:?}, not waiting for the straggler"
    );

    // The straggler hears "abort" at its next heartbeat (every 100 ms).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let job = run.job.clone();
    let (slow, fast, etcd) = run.finish().await;
    assert_eq!(slow.committed, vec![], "the straggler committed nothing");
    assert_eq!(slow.aborted.len(), 1, "{slow:?}");
    let (_, straggled, slow_attempt) = slow.aborted[0].clone();

    let store = etcd.store("/spec/").await.unwrap();
    let tasks = Tasks::new(store).shards(&job).await.unwrap();
    assert_eq!(tasks.len() as u64, SHARDS);
    for t in &tasks {
        let TaskState::Committed { by_attempt, .. } = &t.value.state else {
            panic!("{} not committed: {:?}", t.value.task_id, t.value.state);
        };
        if t.value.task_id == straggled {
            assert!(
                *by_attempt > slow_attempt,
                "the backup's attempt committed: {t:?}"
            );
        }
    }
    // Exactly once: the fast workers' commits cover every shard once.
    let mut told: Vec<&str> = fast
        .iter()
        .flat_map(|l| l.committed.iter().map(|(_, t, _)| t.as_str()))
        .filter(|t| t.starts_with("shard-"))
        .collect();
    told.sort_unstable();
    let before = told.len();
    told.dedup();
    assert_eq!((before, told.len()), (SHARDS as usize, SHARDS as usize));
    assert!(told.contains(&straggled.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_speculation_the_straggler_holds_the_job() {
    let run = start(None).await;
    wait_for(
        Duration::from_secs(20),
        "every other shard committed",
        || async { (run.committed().await == SHARDS - 1).then_some(()) },
    )
    .await
    .unwrap();
    // Alive and heartbeating, the straggler keeps its shard: nothing moves.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(run.committed().await, SHARDS - 1);
    let (slow, fast, _etcd) = run.finish().await;
    assert!(
        slow.aborted.is_empty() && slow.committed.is_empty(),
        "{slow:?}"
    );
    let n: usize = fast
        .iter()
        .map(|l| {
            l.committed
                .iter()
                .filter(|c| c.1.starts_with("shard-"))
                .count()
        })
        .sum();
    assert_eq!(n as u64, SHARDS - 1);
}
