//! The etcd registry against a real etcd: leases, a crashed instance's
//! expiry, deregistration, readiness, an etcd restart, compaction, and
//! etcd out of reach and back.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bazaar_mesh::etcd::{self, EtcdRegistry};
use bazaar_mesh::{Instance, Registry};
use support::{Etcd, Relay, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn instance(id: &str, health: &str) -> Instance {
    Instance {
        name: "catalog".into(),
        id: id.into(),
        address: "http://127.0.0.1:1".into(),
        version: "1".into(),
        health: health.into(),
        ..Instance::default()
    }
}

async fn registry(url: &str, ttl_secs: u64) -> EtcdRegistry {
    let client = etcd::connect(&[url.to_owned()]).await.unwrap();
    EtcdRegistry::new(client, Duration::from_secs(ttl_secs))
}

async fn listed(r: &EtcdRegistry, id: &str) -> bool {
    r.list("catalog")
        .await
        .is_ok_and(|l| l.iter().any(|i| i.id == id))
}

/// A `/ready` that answers 200 or 503 as the test says.
async fn readiness() -> (String, Arc<AtomicBool>) {
    let ready = Arc::new(AtomicBool::new(true));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/ready", listener.local_addr().unwrap());
    let r = ready.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let ok = r.load(Ordering::Relaxed);
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let status = if ok {
                    "200 OK"
                } else {
                    "503 Service Unavailable"
                };
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        )
                        .as_bytes(),
                    )
                    .await;
            });
        }
    });
    (url, ready)
}

#[tokio::test]
async fn a_crashed_instance_leaves_when_its_lease_runs_out_and_a_stopped_one_at_once() {
    let Some(etcd) = Etcd::start().await else {
        return;
    };
    let observer = registry(&etcd.url(), 2).await;
    let crashing = registry(&etcd.url(), 2).await;
    crashing.register(instance("crashed", "")).await.unwrap();
    within(Duration::from_secs(1), "registered", || {
        listed(&observer, "crashed")
    })
    .await;
    // Dropped without deregistering: its keep-alives stop, as at kill -9.
    drop(crashing);
    let gone = within(Duration::from_secs(5), "expired", || async {
        !listed(&observer, "crashed").await
    })
    .await;
    assert!(
        gone > Duration::from_millis(500),
        "not before the lease ran out: {gone:?}"
    );

    let stopping = registry(&etcd.url(), 10).await;
    stopping.register(instance("stopped", "")).await.unwrap();
    within(Duration::from_secs(1), "registered", || {
        listed(&observer, "stopped")
    })
    .await;
    stopping.deregister("catalog", "stopped").await.unwrap();
    within(Duration::from_secs(1), "deregistered at once", || async {
        !listed(&observer, "stopped").await
    })
    .await;
}

#[tokio::test]
async fn an_instance_that_is_not_ready_lapses_and_comes_back_when_ready() {
    let Some(etcd) = Etcd::start().await else {
        return;
    };
    let (health, ready) = readiness().await;
    let observer = registry(&etcd.url(), 2).await;
    let owner = registry(&etcd.url(), 2).await;
    owner.register(instance("flaky", &health)).await.unwrap();
    within(Duration::from_secs(1), "registered", || {
        listed(&observer, "flaky")
    })
    .await;
    ready.store(false, Ordering::Relaxed);
    within(Duration::from_secs(6), "lapsed while not ready", || async {
        !listed(&observer, "flaky").await
    })
    .await;
    ready.store(true, Ordering::Relaxed);
    within(Duration::from_secs(5), "back when ready", || {
        listed(&observer, "flaky")
    })
    .await;
}

#[tokio::test]
async fn an_etcd_restart_keeps_the_view_and_the_watch_resumes() {
    let Some(mut etcd) = Etcd::start().await else {
        return;
    };
    let observer = registry(&etcd.url(), 5).await;
    let owner = registry(&etcd.url(), 5).await;
    owner.register(instance("kept", "")).await.unwrap();
    within(Duration::from_secs(1), "registered", || {
        listed(&observer, "kept")
    })
    .await;

    etcd.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        listed(&observer, "kept").await,
        "the last known view while etcd is down"
    );
    assert!(!observer.connected());
    etcd.resume().await;

    let late = registry(&etcd.url(), 5).await;
    late.register(instance("late", "")).await.unwrap();
    within(
        Duration::from_secs(5),
        "a registration after the restart",
        || listed(&observer, "late"),
    )
    .await;
    assert!(
        listed(&observer, "kept").await,
        "the lease survived the restart"
    );
    assert!(observer.connected());
}

#[tokio::test]
async fn a_watch_that_missed_compacted_revisions_lists_again() {
    let Some(etcd) = Etcd::start().await else {
        return;
    };
    let relay = Relay::start(etcd.client_port).await;
    let observer = registry(&relay.url(), 5).await;
    let owner = registry(&etcd.url(), 5).await;
    owner.register(instance("old", "")).await.unwrap();
    within(Duration::from_secs(1), "registered", || {
        listed(&observer, "old")
    })
    .await;

    relay.cut();
    owner.register(instance("new", "")).await.unwrap();
    owner.deregister("catalog", "old").await.unwrap();
    let mut direct = etcd.client().await;
    let revision = direct
        .get("/", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    direct.compact(revision, None).await.unwrap();
    relay.restore();

    within(
        Duration::from_secs(6),
        "listed again after compaction",
        || async { listed(&observer, "new").await && !listed(&observer, "old").await },
    )
    .await;
}

#[tokio::test]
async fn out_of_reach_of_etcd_an_instance_serves_its_view_and_registers_again_when_back() {
    let Some(etcd) = Etcd::start().await else {
        return;
    };
    let relay = Relay::start(etcd.client_port).await;
    let cut_off = registry(&relay.url(), 2).await;
    let observer = registry(&etcd.url(), 2).await;
    observer.register(instance("peer", "")).await.unwrap();
    cut_off.register(instance("me", "")).await.unwrap();
    within(Duration::from_secs(1), "both listed", || async {
        listed(&cut_off, "peer").await && listed(&observer, "me").await
    })
    .await;

    relay.cut();
    // Longer than the TTL: etcd lets the unreachable instance go.
    within(Duration::from_secs(6), "the lease ran out", || async {
        !listed(&observer, "me").await
    })
    .await;
    assert!(
        listed(&cut_off, "peer").await,
        "the last known view, no error"
    );
    // A registration while etcd is away does not fail.
    cut_off.register(instance("me-too", "")).await.unwrap();

    relay.restore();
    within(Duration::from_secs(6), "registered again", || async {
        listed(&observer, "me").await && listed(&observer, "me-too").await
    })
    .await;
}
