//! What the mesh client costs a caller over a bare `reqwest` call
//! (bench/calls.sh): the same `GET /products/{id}` against a running
//! catalog, made alternately the way orders priced a checkout before the
//! client (a pooled reqwest client, the URL built by hand) and through
//! `bazaar_mesh::Client` (discovery, breaker, bulkhead, budget, metrics,
//! escaped path, request id and traceparent). Prints this process's CPU
//! time per call for each, from /proc/self/stat.
//!
//! cargo run --release --example mesh_overhead -- CATALOG_URL PRODUCT_ID [CALLS] [ROUNDS]

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bazaar_mesh::{Client, Discovery, StaticRegistry};

/// This process's user + system CPU time, in clock ticks.
fn ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

const CONCURRENCY: usize = 16;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (catalog, id) = (args[0].clone(), args[1].clone());
    let calls: usize = args.get(2).map_or(20_000, |n| n.parse().unwrap());
    let rounds: usize = args.get(3).map_or(5, |n| n.parse().unwrap());
    let hz = 100.0; // CLK_TCK on Linux
    let bare = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let base = reqwest::Url::parse(&catalog).unwrap();
    let registry = StaticRegistry::new(&HashMap::from([(
        "catalog".to_owned(),
        vec![catalog.clone()],
    )]));
    let mesh = Client::new(
        Discovery::new(Arc::new(registry)),
        Default::default(),
        Duration::from_secs(5),
    );
    let incoming = http::HeaderMap::new();

    let run_bare = || async {
        let each = (0..CONCURRENCY).map(|_| async {
            for _ in 0..calls / CONCURRENCY {
                let mut url = base.clone();
                url.path_segments_mut()
                    .unwrap()
                    .pop_if_empty()
                    .extend(["products", &id]);
                let res = bare.get(url).send().await.unwrap();
                assert!(res.status().is_success());
                let _: serde_json::Value = res.json().await.unwrap();
            }
        });
        futures::future::join_all(each).await;
    };
    let run_mesh = || async {
        let each = (0..CONCURRENCY).map(|_| async {
            for _ in 0..calls / CONCURRENCY {
                let reply = mesh
                    .get("catalog", &["products", &id])
                    .context(&incoming)
                    .send()
                    .await
                    .unwrap();
                assert!(reply.status.is_success());
                let _: serde_json::Value = reply.json().unwrap();
            }
        });
        futures::future::join_all(each).await;
    };
    run_bare().await;
    run_mesh().await;
    let (mut b, mut m) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        for which in if r % 2 == 0 { [0, 1] } else { [1, 0] } {
            let t0 = ticks();
            if which == 0 {
                run_bare().await;
            } else {
                run_mesh().await;
            }
            let us = (ticks() - t0) as f64 / hz * 1e6 / calls as f64;
            if which == 0 { b.push(us) } else { m.push(us) }
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (b, m) = (median(&mut b), median(&mut m));
    println!(
        "caller_cpu_us_per_call bare_reqwest={b:.1} mesh_client={m:.1} overhead={:.1}",
        m - b
    );
}
