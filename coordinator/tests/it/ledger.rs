//! The job ledger on both stores: one key per job, revision-guarded
//! transitions (concurrent writers never lose one), failure reasons kept,
//! idempotent submission, and state that survives a reopen.

use std::sync::Arc;

use distill_coordinator::job::{JobEvent, JobState};
use distill_coordinator::ledger::Ledger;
use distill_coordinator::store::{EmbeddedStore, Store};
use distill_coordinator::testing::EtcdServer;
use distill_coordinator::CoordinatorError;

fn spec() -> distill_spec::JobSpec {
    distill_spec::from_toml_str(
        "task = \"text_classification\"\n[teacher]\npath = \"t\"\n[data]\ntrain = \"d.jsonl\"\n",
    )
    .unwrap()
}

async fn lifecycle<S: Store>(store: S) {
    let ledger = Ledger::new(store);
    let a = ledger.submit(&spec(), 0, None).await.unwrap();
    let b = ledger.submit(&spec(), 5, None).await.unwrap();
    assert_eq!(
        (a.value.id.as_str(), b.value.id.as_str()),
        ("job-000001", "job-000002")
    );
    assert_eq!(a.value.state, JobState::Pending);
    assert_eq!(
        distill_spec::from_json_str(&a.value.spec_json).unwrap(),
        spec(),
        "the stored spec is the validated one"
    );

    let got = ledger.get("job-000001").await.unwrap().unwrap();
    assert_eq!(
        got, a,
        "get returns what submit stored, at the same revision"
    );

    let t = ledger
        .transition("job-000001", JobEvent::Start)
        .await
        .unwrap();
    assert_eq!(t.value.state, JobState::Planning);
    assert!(t.revision > a.revision);
    let err = ledger
        .transition("job-000001", JobEvent::Trained)
        .await
        .unwrap_err();
    assert!(
        matches!(err, CoordinatorError::InvalidTransition(_)),
        "{err}"
    );
    assert_eq!(
        ledger.get("job-000001").await.unwrap().unwrap().revision,
        t.revision,
        "a refused event writes nothing"
    );

    let f = ledger
        .transition(
            "job-000001",
            JobEvent::Fail {
                reason: "teacher config.json missing".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(f.value.state.reason(), Some("teacher config.json missing"));
    let reread = ledger.get("job-000001").await.unwrap().unwrap();
    assert_eq!(
        reread.value.state,
        JobState::Failed {
            reason: "teacher config.json missing".into()
        },
        "the reason is persisted"
    );

    let err = ledger
        .transition("job-999999", JobEvent::Start)
        .await
        .unwrap_err();
    assert!(matches!(err, CoordinatorError::NotFound(_)));

    let (jobs, _) = ledger.list().await.unwrap();
    let ids: Vec<_> = jobs.iter().map(|j| j.value.id.as_str()).collect();
    assert_eq!(
        ids,
        ["job-000001", "job-000002"],
        "list is in submission order"
    );
}

async fn concurrent_updates_never_lose_one<S: Store>(store: S) {
    let ledger = Arc::new(Ledger::new(store));
    let job = ledger.submit(&spec(), 0, None).await.unwrap();
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let ledger = ledger.clone();
            let id = job.value.id.clone();
            tokio::spawn(async move {
                ledger
                    .update(&id, |j| {
                        j.progress.shards_committed += 1;
                        Ok(())
                    })
                    .await
                    .unwrap()
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let got = ledger.get(&job.value.id).await.unwrap().unwrap();
    assert_eq!(
        got.value.progress.shards_committed, 20,
        "20 concurrent guarded updates all land, none lost"
    );

    // Concurrent submissions get distinct ids; one idempotency key gives one job.
    let subs: Vec<_> = (0..10)
        .map(|_| {
            let ledger = ledger.clone();
            tokio::spawn(async move {
                ledger
                    .submit(&spec(), 0, Some("req-1"))
                    .await
                    .unwrap()
                    .value
                    .id
            })
        })
        .collect();
    let mut ids = Vec::new();
    for s in subs {
        ids.push(s.await.unwrap());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "one request id, one job: {ids:?}");
    assert_eq!(ledger.list().await.unwrap().0.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_on_etcd() {
    let etcd = EtcdServer::start().await.unwrap();
    lifecycle(etcd.store("/ledger-a/").await.unwrap()).await;
    concurrent_updates_never_lose_one(etcd.store("/ledger-b/").await.unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_on_embedded_store_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    lifecycle(EmbeddedStore::open(&dir.path().join("a")).unwrap()).await;
    concurrent_updates_never_lose_one(EmbeddedStore::open(&dir.path().join("b")).unwrap()).await;
    let ledger = Ledger::new(EmbeddedStore::open(&dir.path().join("a")).unwrap());
    let job = ledger.get("job-000001").await.unwrap().unwrap();
    assert_eq!(
        job.value.state.reason(),
        Some("teacher config.json missing")
    );
    let next = ledger.submit(&spec(), 0, None).await.unwrap();
    assert_eq!(
        next.value.id, "job-000003",
        "the id sequence survives reopen"
    );
}
