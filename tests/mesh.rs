//! The mesh on a real etcd, through a real gateway (`bazaar serve
//! gateway` with `registry = "etcd"`): a new instance gets traffic and a
//! deregistered one none within a second, with no failed request; the
//! configuration in etcd applies under load within a second (a rate limit
//! lowered and raised, the `v2_products` flag); `/_admin/config` says
//! where each value came from; `bazaar config set` refuses a bad value.

#![allow(clippy::unwrap_used)]
mod common;
#[path = "../crates/mesh/tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bazaar_mesh::etcd::{self, CONFIG_PREFIX, EtcdRegistry};
use bazaar_mesh::{Instance, Registry};
use common::{free_port, test_config, unique};
use serde_json::{Value, json};
use support::Etcd;
use tokio::net::TcpListener;

/// An upstream that answers with its id and counts its requests.
async fn echo(id: &str) -> (Instance, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let (name, counter) = (id.to_owned(), hits.clone());
    let app = axum::Router::new()
        .route("/ready", axum::routing::get(|| async { "ready" }))
        .route("/health", axum::routing::get(|| async { "ok" }))
        .fallback(move || {
            let (name, counter) = (name.clone(), counter.clone());
            async move {
                counter.fetch_add(1, Ordering::Relaxed);
                (
                    [("x-instance-id", name.clone())],
                    axum::Json(json!({ "instance": name })),
                )
            }
        });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let instance = Instance {
        name: "echo".into(),
        id: id.into(),
        address: format!("http://{addr}"),
        version: "test".into(),
        health: format!("http://{addr}/ready"),
        ..Instance::default()
    };
    (instance, hits)
}

async fn registry(etcd: &Etcd) -> EtcdRegistry {
    let client = etcd::connect(&[etcd.url()]).await.unwrap();
    EtcdRegistry::new(client, Duration::from_secs(5))
}

/// A gateway on etcd (registry and configuration), routing `/api/v1/echo`.
async fn gateway(etcd: &Etcd) -> (bazaar::System, String) {
    let dir = std::env::temp_dir().join(format!("bazaar-mesh-{}", unique()));
    let mut config = test_config(dir);
    config.registry = "etcd".into();
    config.etcd_endpoints = Some(etcd.url());
    config.gateway_port = free_port();
    config.gateway.routes = serde_json::from_value(json!([
        { "prefix": "/echo", "service": "echo", "auth": false }
    ]))
    .unwrap();
    let system = bazaar::serve(config, "gateway").await.unwrap();
    let url = system.gateway_url.clone();
    (system, url)
}

/// Sends GET /api/v1/echo in a loop until stopped: (when, status, instance).
fn load(url: &str, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Vec<(Instant, u16, String)>> {
    let url = format!("{url}/api/v1/echo");
    tokio::spawn(async move {
        let http = reqwest::Client::new();
        let mut seen = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let (status, instance) = match http.get(&url).send().await {
                Ok(r) => (
                    r.status().as_u16(),
                    r.headers()
                        .get("x-instance-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned(),
                ),
                Err(_) => (0, String::new()),
            };
            seen.push((Instant::now(), status, instance));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        seen
    })
}

#[tokio::test]
async fn instances_join_and_leave_within_a_second_without_a_failed_request() {
    let Some(etcd) = Etcd::start().await else {
        return;
    };
    let (a, _) = echo("echo-a").await;
    let (b, b_hits) = echo("echo-b").await;
    let ra = registry(&etcd).await;
    let rb = registry(&etcd).await;
    ra.register(a).await.unwrap();
    let (system, url) = gateway(&etcd).await;
    common::wait_ok(&format!("{url}/api/v1/echo")).await;

    let stop = Arc::new(AtomicBool::new(false));
    let running = load(&url, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let joined = Instant::now();
    rb.register(b).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let left = Instant::now();
    rb.deregister("echo", "echo-b").await.unwrap();
    let hits_at_leave = b_hits.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let seen = running.await.unwrap();

    let failed: Vec<_> = seen.iter().filter(|(_, s, _)| *s != 200).collect();
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    let first_b = seen
        .iter()
        .find(|(_, _, i)| i == "echo-b")
        .map(|(t, _, _)| t.duration_since(joined))
        .expect("the new instance got traffic");
    assert!(first_b < Duration::from_secs(1), "joined after {first_b:?}");
    let last_b = seen
        .iter()
        .filter(|(_, _, i)| i == "echo-b")
        .map(|(t, _, _)| *t)
        .max()
        .unwrap();
    assert!(
        last_b < left + Duration::from_secs(1),
        "still served {:?} after leaving",
        last_b.duration_since(left)
    );
    assert!(hits_at_leave > 0);
    system.stop().await.unwrap();
}

#[tokio::test]
async fn configuration_in_etcd_applies_under_load_within_a_second() {
    let Some(etcd) = Etcd::start().await else {
        return;
    };
    let (a, _) = echo("echo-a").await;
    let ra = registry(&etcd).await;
    ra.register(a).await.unwrap();
    let (system, url) = gateway(&etcd).await;
    common::wait_ok(&format!("{url}/api/v1/echo")).await;
    let mut kv = etcd.client().await;
    let routes = |requests: u32| {
        json!([{ "prefix": "/echo", "service": "echo", "auth": false,
                 "rate_limit": { "requests": requests, "per_secs": 60, "key": "ip" } }])
        .to_string()
    };

    let stop = Arc::new(AtomicBool::new(false));
    let running = load(&url, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lowered = Instant::now();
    kv.put(format!("{CONFIG_PREFIX}gateway.routes"), routes(5), None)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let raised = Instant::now();
    kv.put(
        format!("{CONFIG_PREFIX}gateway.routes"),
        routes(1_000_000),
        None,
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let seen = running.await.unwrap();

    let first_429 = seen
        .iter()
        .find(|(t, s, _)| *s == 429 && *t > lowered)
        .map(|(t, _, _)| t.duration_since(lowered))
        .expect("the lowered limit answered 429");
    assert!(
        first_429 < Duration::from_secs(1),
        "429 after {first_429:?}"
    );
    let late_429 = seen
        .iter()
        .filter(|(t, s, _)| *s == 429 && *t > raised + Duration::from_secs(1))
        .count();
    assert_eq!(late_429, 0, "the raised limit lets requests through");
    assert!(
        seen.iter().all(|(_, s, _)| *s == 200 || *s == 429),
        "nothing else"
    );

    // A bad value is ignored: the running table stays.
    kv.put(
        format!("{CONFIG_PREFIX}gateway.routes"),
        "[{\"prefix\": 3}]",
        None,
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let http = reqwest::Client::new();
    let status = http
        .get(format!("{url}/api/v1/echo"))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200);

    // The feature flag: /api/v2/products goes away and comes back.
    let v2 = || async {
        http.get(format!("{url}/api/v2/products"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_ne!(v2().await, 404);
    let off = Instant::now();
    kv.put(
        format!("{CONFIG_PREFIX}features.v2_products"),
        "false",
        None,
    )
    .await
    .unwrap();
    while v2().await != 404 {
        assert!(off.elapsed() < Duration::from_secs(1), "v2 still served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // /_admin/config says where each value came from; secrets are masked.
    let shown: Value = http
        .get(format!("{url}/_admin/config"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(shown["features.v2_products"]["value"], false);
    assert_eq!(shown["features.v2_products"]["source"], "etcd");
    assert_eq!(shown["admin_password"]["value"], "********");
    assert_eq!(shown["registry"]["source"], "override");
    assert_eq!(shown["body_limit"]["source"], "default");
    let on = Instant::now();
    kv.delete(format!("{CONFIG_PREFIX}features.v2_products"), None)
        .await
        .unwrap();
    while v2().await == 404 {
        assert!(on.elapsed() < Duration::from_secs(1), "v2 not back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    system.stop().await.unwrap();
}

#[tokio::test]
async fn bazaar_config_checks_values_and_writes_them_to_etcd() {
    let Some(etcd) = Etcd::start().await else {
        return;
    };
    let endpoints = [etcd.url()];
    let e = bazaar::configure::set(&endpoints, "features.v2_products", "maybe")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("features.v2_products"), "{e}");
    assert!(
        bazaar::configure::set(&endpoints, "no_such_key", "1")
            .await
            .is_err()
    );
    bazaar::configure::set(&endpoints, "payments_failure_rate", "0.25")
        .await
        .unwrap();
    let mut kv = etcd.client().await;
    let got = kv
        .get(format!("{CONFIG_PREFIX}payments_failure_rate"), None)
        .await
        .unwrap();
    assert_eq!(got.kvs()[0].value(), b"0.25");
    bazaar::configure::unset(&endpoints, "payments_failure_rate")
        .await
        .unwrap();
    let got = kv
        .get(format!("{CONFIG_PREFIX}payments_failure_rate"), None)
        .await
        .unwrap();
    assert!(got.kvs().is_empty());
    // No etcd: a clear error, not a hang.
    let e = bazaar::configure::set(&["http://127.0.0.1:1".to_owned()], "log_level", "debug")
        .await
        .unwrap_err();
    assert!(format!("{e:#}").contains("cannot reach etcd"), "{e:#}");
}

/// `bazaar serve catalog` on etcd, as a child process with a 2 s lease.
fn serve_catalog(etcd: &Etcd) -> std::process::Child {
    let dir = std::env::temp_dir().join(format!("bazaar-mesh-{}", unique()));
    std::process::Command::new(env!("CARGO_BIN_EXE_bazaar"))
        .args(["serve", "catalog", "--port", "0"])
        .env("BAZAAR_REGISTRY", "etcd")
        .env("BAZAAR_ETCD_ENDPOINTS", etcd.url())
        .env("BAZAAR_REGISTRY_TTL_SECS", "2")
        .env("BAZAAR_DATA_DIR", &dir)
        .env("BAZAAR_LOG_FORMAT", "json")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

async fn catalogs(observer: &EtcdRegistry) -> usize {
    observer.list("catalog").await.map_or(0, |l| l.len())
}

#[tokio::test]
async fn a_killed_process_leaves_within_its_ttl_and_a_terminated_one_at_once() {
    let Some(etcd) = Etcd::start().await else {
        return;
    };
    let observer = registry(&etcd).await;
    let mut killed = serve_catalog(&etcd);
    support::within(Duration::from_secs(30), "registered", || async {
        catalogs(&observer).await == 1
    })
    .await;
    killed.kill().unwrap();
    killed.wait().unwrap();
    let gone = support::within(Duration::from_secs(5), "expired", || async {
        catalogs(&observer).await == 0
    })
    .await;
    assert!(
        gone < Duration::from_secs(4),
        "kill -9: gone after {gone:?} (TTL 2 s)"
    );

    let mut stopped = serve_catalog(&etcd);
    support::within(Duration::from_secs(30), "registered", || async {
        catalogs(&observer).await == 1
    })
    .await;
    let pid = rustix::process::Pid::from_child(&stopped);
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let gone = support::within(
        Duration::from_secs(1),
        "deregistered on SIGTERM",
        || async { catalogs(&observer).await == 0 },
    )
    .await;
    eprintln!("SIGTERM: deregistered after {gone:?}");
    let status = stopped.wait().unwrap();
    assert!(status.success(), "a clean stop: {status}");
}
