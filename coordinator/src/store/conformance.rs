//! The one conformance suite every [`Store`] must pass.
//!
//! Each case takes a fresh, empty store (an etcd namespace or an embedded
//! directory) and panics with a message naming the broken property. The test
//! files run [`run_all`] against both implementations; lease and watch cases
//! wait with poll-with-timeout, never fixed sleeps.

use std::sync::Arc;
use std::time::Duration;

use super::{EventKind, Store, StoreError, Txn, TxnOutcome};
use crate::testing::wait_for;

/// Runs every case, each on a store produced by `fresh`.
pub async fn run_all<S, F, Fut>(mut fresh: F)
where
    S: Store,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = S>,
{
    get_put_and_revisions(fresh().await).await;
    compare_and_swap(fresh().await).await;
    concurrent_cas_exactly_one_wins(fresh().await).await;
    multi_key_txn_is_atomic(fresh().await).await;
    range_by_prefix(fresh().await).await;
    lease_expiry_removes_keys(fresh().await).await;
    lease_keepalive_and_revoke(fresh().await).await;
    watch_sees_puts_and_deletes(fresh().await).await;
    watch_from_revision_replays_history(fresh().await).await;
}

pub async fn get_put_and_revisions<S: Store>(s: S) {
    assert_eq!(s.get("a").await.unwrap(), None, "a fresh store is empty");
    let r1 = s.put("a", b"1".to_vec()).await.unwrap();
    let r2 = s.put("a", b"2".to_vec()).await.unwrap();
    assert!(r2 > r1, "revisions increase: {r1} then {r2}");
    let kv = s.get("a").await.unwrap().expect("a was written");
    assert_eq!(kv.value, b"2");
    assert_eq!(
        kv.mod_revision, r2,
        "mod_revision is the revision of the last write"
    );
    assert_eq!(
        kv.create_revision, r1,
        "create_revision is kept across updates"
    );
    assert_eq!(kv.lease, None);
}

pub async fn compare_and_swap<S: Store>(s: S) {
    let r1 = s
        .create("k", b"v1".to_vec(), None)
        .await
        .unwrap()
        .expect("create on an absent key succeeds");
    assert_eq!(
        s.create("k", b"again".to_vec(), None).await.unwrap(),
        None,
        "create on an existing key fails"
    );
    assert_eq!(
        s.put_if("k", b"stale".to_vec(), r1 - 1).await.unwrap(),
        None,
        "put_if with a stale revision fails"
    );
    let r2 = s
        .put_if("k", b"v2".to_vec(), r1)
        .await
        .unwrap()
        .expect("put_if with the current revision succeeds");
    assert_eq!(s.get("k").await.unwrap().unwrap().value, b"v2");
    assert!(
        !s.delete_if("k", r1).await.unwrap(),
        "delete_if with a stale revision fails"
    );
    assert!(s.get("k").await.unwrap().is_some());
    assert!(
        s.delete_if("k", r2).await.unwrap(),
        "delete_if with the current revision succeeds"
    );
    assert_eq!(s.get("k").await.unwrap(), None);
    assert!(
        s.create("k", b"v3".to_vec(), None).await.unwrap().is_some(),
        "a deleted key can be created again"
    );
}

pub async fn concurrent_cas_exactly_one_wins<S: Store>(s: S) {
    let base = s.put("race", b"start".to_vec()).await.unwrap();
    let s = Arc::new(s);
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                s.put_if("race", format!("writer-{i}").into_bytes(), base)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut winners = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        if t.await.unwrap().is_some() {
            winners.push(i);
        }
    }
    assert_eq!(
        winners.len(),
        1,
        "exactly one of 20 concurrent compare-and-swaps wins, got {winners:?}"
    );
    let value = s.get("race").await.unwrap().unwrap().value;
    assert_eq!(
        value,
        format!("writer-{}", winners[0]).into_bytes(),
        "the stored value is the winner's"
    );

    // Same for create-if-absent.
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                s.create("fresh", vec![i as u8], None)
                    .await
                    .unwrap()
                    .is_some()
            })
        })
        .collect();
    let mut created = 0;
    for t in tasks {
        created += t.await.unwrap() as usize;
    }
    assert_eq!(created, 1, "exactly one of 20 concurrent creates wins");
}

pub async fn multi_key_txn_is_atomic<S: Store>(s: S) {
    let ra = s.put("x/a", b"1".to_vec()).await.unwrap();
    let rb = s.put("x/b", b"1".to_vec()).await.unwrap();
    // One compare fails: nothing is written.
    let out = s
        .txn(
            Txn::new()
                .when("x/a", ra)
                .when("x/b", ra)
                .put("x/a", b"2".to_vec())
                .put("x/c", b"2".to_vec()),
        )
        .await
        .unwrap();
    assert_eq!(out, TxnOutcome::Conflict);
    assert_eq!(
        s.get("x/a").await.unwrap().unwrap().value,
        b"1",
        "a failed txn writes nothing"
    );
    assert_eq!(
        s.get("x/c").await.unwrap(),
        None,
        "a failed txn writes nothing"
    );
    // All compares hold: every op lands at one revision.
    let out = s
        .txn(
            Txn::new()
                .when("x/a", ra)
                .when("x/b", rb)
                .when("x/c", 0)
                .put("x/a", b"2".to_vec())
                .put("x/c", b"2".to_vec())
                .delete("x/b"),
        )
        .await
        .unwrap();
    let TxnOutcome::Committed(rev) = out else {
        panic!("txn with holding compares must commit")
    };
    assert_eq!(s.get("x/a").await.unwrap().unwrap().mod_revision, rev);
    assert_eq!(s.get("x/c").await.unwrap().unwrap().mod_revision, rev);
    assert_eq!(s.get("x/b").await.unwrap(), None);
}

pub async fn range_by_prefix<S: Store>(s: S) {
    for k in ["jobs/2", "jobs/1", "jobs/10", "jobsx", "tasks/1"] {
        s.put(k, k.as_bytes().to_vec()).await.unwrap();
    }
    let (kvs, rev) = s.range("jobs/").await.unwrap();
    let keys: Vec<_> = kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(
        keys,
        ["jobs/1", "jobs/10", "jobs/2"],
        "range returns the prefix's keys, sorted"
    );
    assert!(
        rev >= kvs.iter().map(|kv| kv.mod_revision).max().unwrap(),
        "range revision covers what it read"
    );
    assert!(s.range("nothing/").await.unwrap().0.is_empty());
    let page = |from: &'static str, limit| {
        let s = s.clone();
        async move {
            let kvs = s.range_page("jobs/", from, limit).await.unwrap();
            kvs.into_iter().map(|kv| kv.key).collect::<Vec<_>>()
        }
    };
    assert_eq!(
        page("jobs/", 2).await,
        ["jobs/1", "jobs/10"],
        "a page from the start"
    );
    assert_eq!(
        page("jobs/10", 5).await,
        ["jobs/10", "jobs/2"],
        "from a key, inclusive"
    );
    assert!(page("jobs/3", 5).await.is_empty(), "past the prefix's end");
}

pub async fn lease_expiry_removes_keys<S: Store>(s: S) {
    let lease = s.grant(Duration::from_secs(1)).await.unwrap();
    s.create("live/w1", b"alive".to_vec(), Some(lease))
        .await
        .unwrap()
        .expect("create with lease");
    s.put("live/keep", b"no lease".to_vec()).await.unwrap();
    assert_eq!(s.get("live/w1").await.unwrap().unwrap().lease, Some(lease));
    wait_for(
        Duration::from_secs(10),
        "the leased key to vanish after expiry",
        || {
            let s = s.clone();
            async move { s.get("live/w1").await.unwrap().is_none().then_some(()) }
        },
    )
    .await
    .unwrap();
    assert!(
        s.get("live/keep").await.unwrap().is_some(),
        "keys without the lease stay"
    );
    assert_eq!(
        s.keepalive(lease).await,
        Err(StoreError::LeaseNotFound(lease)),
        "an expired lease cannot be kept alive"
    );
    let err = s
        .create("live/w2", b"x".to_vec(), Some(lease))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::LeaseNotFound(_)),
        "attaching a key to an expired lease fails: {err:?}"
    );
}

pub async fn lease_keepalive_and_revoke<S: Store>(s: S) {
    let lease = s.grant(Duration::from_secs(2)).await.unwrap();
    s.create("held", b"x".to_vec(), Some(lease))
        .await
        .unwrap()
        .unwrap();
    // Kept alive well past its TTL, the key stays.
    let until = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < until {
        s.keepalive(lease).await.unwrap();
        assert!(
            s.get("held").await.unwrap().is_some(),
            "a kept-alive lease keeps its key"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    s.revoke(lease).await.unwrap();
    assert_eq!(
        s.get("held").await.unwrap(),
        None,
        "revoking a lease deletes its keys at once"
    );
    s.revoke(lease).await.unwrap();
}

pub async fn watch_sees_puts_and_deletes<S: Store>(s: S) {
    let mut w = s.watch("w/", None).await.unwrap();
    s.put("w/a", b"1".to_vec()).await.unwrap();
    s.put("other", b"x".to_vec()).await.unwrap();
    let rev = s.put("w/a", b"2".to_vec()).await.unwrap();
    s.delete_if("w/a", rev).await.unwrap();
    let lease = s.grant(Duration::from_secs(5)).await.unwrap();
    s.create("w/leased", b"l".to_vec(), Some(lease))
        .await
        .unwrap();
    s.revoke(lease).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..5 {
        let ev = tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .expect("watch event in time")
            .unwrap()
            .unwrap();
        seen.push((
            ev.kind,
            ev.kv.key.clone(),
            String::from_utf8(ev.kv.value).unwrap(),
        ));
    }
    let want = [
        (EventKind::Put, "w/a", "1"),
        (EventKind::Put, "w/a", "2"),
        (EventKind::Delete, "w/a", ""),
        (EventKind::Put, "w/leased", "l"),
        (EventKind::Delete, "w/leased", ""),
    ];
    let want: Vec<_> = want
        .iter()
        .map(|(k, key, v)| (*k, key.to_string(), v.to_string()))
        .collect();
    assert_eq!(
        seen, want,
        "watch sees puts and deletes under its prefix, in order, and nothing else"
    );
}

pub async fn watch_from_revision_replays_history<S: Store>(s: S) {
    let r1 = s.put("h/a", b"1".to_vec()).await.unwrap();
    s.put("h/b", b"2".to_vec()).await.unwrap();
    let mut w = s.watch("h/", Some(r1)).await.unwrap();
    s.put("h/c", b"3".to_vec()).await.unwrap();
    let mut keys = Vec::new();
    for _ in 0..3 {
        let ev = tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .expect("watch event in time")
            .unwrap()
            .unwrap();
        keys.push(ev.kv.key);
    }
    assert_eq!(
        keys,
        ["h/a", "h/b", "h/c"],
        "a watch from a past revision replays history then follows"
    );
}
