//! The store conformance suite against both implementations: a real etcd
//! (started on free loopback ports) and the embedded on-disk store; plus the
//! embedded store's durability across reopen.

use std::time::Duration;

use distill_coordinator::store::{conformance, EmbeddedStore, Store, Txn};
use distill_coordinator::testing::EtcdServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_store_passes_conformance() {
    let etcd = EtcdServer::start().await.expect("start etcd");
    let mut n = 0;
    conformance::run_all(|| {
        n += 1;
        let ns = format!("/conformance-{n}/");
        let etcd = &etcd;
        async move { etcd.store(&ns).await.expect("connect to etcd") }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_store_passes_conformance() {
    let dir = tempfile::tempdir().unwrap();
    let mut n = 0;
    conformance::run_all(|| {
        n += 1;
        let path = dir.path().join(format!("store-{n}"));
        async move { EmbeddedStore::open(&path).expect("open embedded store") }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (rev, lease) = {
        let s = EmbeddedStore::open(dir.path()).unwrap();
        s.put("jobs/1", b"pending".to_vec()).await.unwrap();
        s.put("jobs/2", b"x".to_vec()).await.unwrap();
        let r = s.put("jobs/1", b"training".to_vec()).await.unwrap();
        s.txn(
            Txn::new()
                .when("jobs/2", r - 1)
                .delete("jobs/2")
                .put("jobs/3", b"y".to_vec()),
        )
        .await
        .unwrap();
        let lease = s.grant(Duration::from_secs(30)).await.unwrap();
        s.create("workers/w1", b"alive".to_vec(), Some(lease))
            .await
            .unwrap()
            .unwrap();
        (s.get("jobs/3").await.unwrap().unwrap().mod_revision, lease)
    };
    // Reopen twice: once replaying the log, once from the compacted snapshot.
    for round in 0..2 {
        let s = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(
            s.get("jobs/1").await.unwrap().unwrap().value,
            b"training",
            "round {round}"
        );
        assert_eq!(
            s.get("jobs/2").await.unwrap(),
            None,
            "round {round}: the delete survives"
        );
        let kv3 = s.get("jobs/3").await.unwrap().unwrap();
        assert_eq!(kv3.mod_revision, rev, "round {round}: revisions survive");
        assert_eq!(
            s.get("workers/w1").await.unwrap().unwrap().lease,
            Some(lease),
            "round {round}: leased keys survive"
        );
        s.keepalive(lease)
            .await
            .expect("leases survive a reopen with a fresh ttl");
        // Revisions keep increasing after a reopen; CAS against old revisions still fails.
        assert!(s
            .put_if("jobs/3", b"z".to_vec(), rev - 1)
            .await
            .unwrap()
            .is_none());
        let (_, now) = s.range("").await.unwrap();
        assert!(now >= rev, "round {round}");
    }
    let s = EmbeddedStore::open(dir.path()).unwrap();
    let new = s.put("jobs/4", b"n".to_vec()).await.unwrap();
    assert!(
        new > rev,
        "revision after reopen ({new}) is above every earlier one ({rev})"
    );
    s.revoke(lease).await.unwrap();
    drop(s);
    let s = EmbeddedStore::open(dir.path()).unwrap();
    assert_eq!(
        s.get("workers/w1").await.unwrap(),
        None,
        "a revoke survives reopen"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_drops_a_torn_last_log_line() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    {
        let s = EmbeddedStore::open(dir.path()).unwrap();
        s.put("a", b"1".to_vec()).await.unwrap();
    }
    // A crash mid-append leaves half a record at the end of the log.
    let mut wal = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.path().join("wal.log"))
        .unwrap();
    wal.write_all(b"{\"t\":\"txn\",\"rev\":99,\"ops\":[{\"put\":{\"key\":\"b\"")
        .unwrap();
    drop(wal);
    let s = EmbeddedStore::open(dir.path()).unwrap();
    assert_eq!(s.get("a").await.unwrap().unwrap().value, b"1");
    assert_eq!(
        s.get("b").await.unwrap(),
        None,
        "the torn record was never acknowledged"
    );
}

/// Two stores on one directory would interleave their logs: the second is
/// refused, naming the directory, while the first is open; once it is
/// dropped the directory opens again with nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_embedded_store_on_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let first = EmbeddedStore::open(dir.path()).unwrap();
    first.put("jobs/1", b"kept".to_vec()).await.unwrap();
    let e = EmbeddedStore::open(dir.path())
        .err()
        .expect("refused while open");
    let msg = e.to_string();
    assert!(
        msg.contains("in use by another process")
            && msg.contains(&dir.path().display().to_string()),
        "{msg}"
    );
    drop(first);
    let again = EmbeddedStore::open(dir.path()).unwrap();
    assert_eq!(again.get("jobs/1").await.unwrap().unwrap().value, b"kept");
}
