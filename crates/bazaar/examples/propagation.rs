//! How fast the mesh on etcd reacts, through a real gateway (`registry =
//! "etcd"`) under a steady stream of requests (`bench/discovery.sh` runs
//! this against an etcd of its own):
//!
//! - discovery: a new instance registers → the first request it serves;
//! - deregistration: an instance deregisters (what SIGTERM does first,
//!   before the drain) → the last request it is sent, and how many
//!   requests failed meanwhile;
//! - configuration: `features.v2_products` put in etcd → the first answer
//!   that obeys it.
//!
//! Each over `--trials` runs; p50 and max are printed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bazaar_mesh::etcd::{self, CONFIG_PREFIX, EtcdRegistry};
use bazaar_mesh::{Instance, Registry};
use serde_json::json;

type Log = Arc<Mutex<Vec<(Instant, u16, String)>>>;

async fn echo(id: String) -> (Instance, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let name = id.clone();
    let app = axum::Router::new()
        .route("/ready", axum::routing::get(|| async { "ready" }))
        .route("/health", axum::routing::get(|| async { "ok" }))
        .fallback(move || {
            let name = name.clone();
            async move { ([("x-instance-id", name)], "{}") }
        });
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let instance = Instance {
        name: "echo".into(),
        id,
        address: format!("http://{addr}"),
        version: "bench".into(),
        health: format!("http://{addr}/ready"),
        ..Instance::default()
    };
    (instance, task)
}

fn percentiles(mut v: Vec<Duration>) -> String {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    format!(
        "p50 {:.1} ms, max {:.1} ms ({} trials)",
        ms(v[v.len() / 2]),
        ms(v[v.len() - 1]),
        v.len()
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let etcd_url = arg("--etcd").expect("--etcd URL");
    let trials: usize = arg("--trials").map_or(20, |t| t.parse().expect("--trials N"));

    let dir = std::env::temp_dir().join(format!("bazaar-propagation-{}", std::process::id()));
    let mut config = bazaar_chassis::Config {
        data_dir: dir,
        registry: "etcd".into(),
        etcd_endpoints: Some(etcd_url.clone()),
        ..Default::default()
    };
    config.gateway_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    config.gateway.access_log = false;
    config.gateway.routes = serde_json::from_value(json!([
        { "prefix": "/echo", "service": "echo", "auth": false }
    ]))?;
    let system = bazaar::serve(config, "gateway").await?;
    let url = system.gateway_url.clone();
    let client = etcd::connect(&[etcd_url]).await?;
    let registry = EtcdRegistry::new(client.clone(), Duration::from_secs(10));
    let (base, _base_task) = echo("base".into()).await;
    registry.register(base).await?;

    // The steady stream: 4 callers in a loop.
    let log: Log = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut callers = Vec::new();
    for _ in 0..4 {
        let (log, stop, sent, url) = (log.clone(), stop.clone(), sent.clone(), url.clone());
        callers.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            while !stop.load(Ordering::Relaxed) {
                let r = http.get(format!("{url}/api/v1/echo")).send().await;
                let (status, instance) = match r {
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
                sent.fetch_add(1, Ordering::Relaxed);
                log.lock().unwrap().push((Instant::now(), status, instance));
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }));
    }
    while log.lock().unwrap().is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let (mut joins, mut leaves) = (Vec::new(), Vec::new());
    for n in 0..trials {
        let id = format!("new-{n}");
        let (instance, task) = echo(id.clone()).await;
        let joined = Instant::now();
        registry.register(instance).await?;
        let first = loop {
            let found = log
                .lock()
                .unwrap()
                .iter()
                .find(|(t, _, i)| *i == id && *t >= joined)
                .map(|(t, _, _)| *t);
            if let Some(t) = found {
                break t;
            }
            anyhow::ensure!(
                joined.elapsed() < Duration::from_secs(10),
                "{id} got no traffic"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        joins.push(first.duration_since(joined));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let left = Instant::now();
        registry.deregister("echo", &id).await?;
        // It keeps serving through its drain, as a stopping instance does.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let last = log
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, _, i)| *i == id)
            .map(|(t, _, _)| *t)
            .max()
            .unwrap_or(left);
        leaves.push(last.saturating_duration_since(left));
        task.abort();
    }

    // Configuration: the flag off → the first 404; on → the first non-404.
    let mut kv = client.clone();
    let http = reqwest::Client::new();
    let v2 = format!("{url}/api/v2/products");
    let mut configs = Vec::new();
    for n in 0..trials {
        let on = n % 2 == 1;
        let put = Instant::now();
        kv.put(
            format!("{CONFIG_PREFIX}features.v2_products"),
            on.to_string(),
            None,
        )
        .await?;
        loop {
            let s = http.get(&v2).send().await?.status().as_u16();
            if (s == 404) != on {
                break;
            }
            anyhow::ensure!(
                put.elapsed() < Duration::from_secs(10),
                "the flag did not apply"
            );
        }
        configs.push(put.elapsed());
    }
    kv.delete(format!("{CONFIG_PREFIX}features.v2_products"), None)
        .await?;

    stop.store(true, Ordering::Relaxed);
    for c in callers {
        let _ = c.await;
    }
    let failed = log
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, s, _)| *s != 200)
        .count();
    let total = sent.load(Ordering::Relaxed);
    println!(
        "requests: {total} in {:.1} s, failed {failed}",
        started.elapsed().as_secs_f64()
    );
    println!(
        "discovery (registered -> first request served): {}",
        percentiles(joins)
    );
    println!(
        "deregistration (deregistered -> last request sent to it): {}",
        percentiles(leaves)
    );
    println!(
        "configuration (etcd put -> first answer that obeys): {}",
        percentiles(configs)
    );
    system.stop().await?;
    anyhow::ensure!(failed == 0, "{failed} requests failed");
    Ok(())
}
