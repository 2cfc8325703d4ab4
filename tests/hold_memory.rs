//! "Hold the edge" (issue 14), the items measured in this process's
//! memory: each test runs alone (a lock), so that no other test's
//! allocations count.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{ADMIN_EMAIL, ADMIN_PASSWORD, Api, embedded, embedded_with, unique, wait_ready};
use reqwest::StatusCode;
use serde_json::json;

// The allocator of the `bazaar` binary: what is measured is what runs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

static ALONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A line of `/proc/self/status` (`VmRSS`, `VmHWM`), in MiB.
fn status_mib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib / 1024.0
}

fn rss_mib() -> f64 {
    status_mib("VmRSS")
}

#[tokio::test]
async fn item_02_login_limiter_memory_stays_bounded_under_huge_emails() {
    let _alone = ALONE.lock().await;
    let (system, _dir) = embedded().await;
    wait_ready(&system.gateway_url).await;
    let api = Api::new(&system.gateway_url);
    let url = format!("{}/auth/login", api.base);
    // Warm up: the first large bodies size the allocator's pools.
    let body = |i: usize| {
        let email = format!("{i:06}{}@x.org", "a".repeat(500 * 1024));
        json!({"email": email, "password": "password1"}).to_string()
    };
    for i in 0..32 {
        let res = api.http.post(&url).body(body(i)).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::UNPROCESSABLE_ENTITY);
    }
    let before = rss_mib();
    let statuses = futures::future::join_all((0..8).map(|worker| {
        let (http, url) = (api.http.clone(), url.clone());
        async move {
            let mut statuses = Vec::new();
            for i in (worker..2000).step_by(8) {
                let res = http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body(1000 + i))
                    .send()
                    .await
                    .unwrap();
                statuses.push(res.status());
            }
            statuses
        }
    }))
    .await;
    let grown = rss_mib() - before;
    let all: Vec<StatusCode> = statuses.into_iter().flatten().collect();
    assert_eq!(all.len(), 2000);
    assert!(
        all.iter().all(|s| *s == StatusCode::UNPROCESSABLE_ENTITY),
        "{:?}",
        all.iter().find(|s| **s != StatusCode::UNPROCESSABLE_ENTITY)
    );
    eprintln!("RSS grew {grown:.1} MiB over 2,000 logins with 500 KB emails");
    assert!(grown < 50.0, "RSS grew {grown:.1} MiB");
    // A real login still works.
    api.login(ADMIN_EMAIL, ADMIN_PASSWORD).await;
    system.shutdown.trigger();
}

#[tokio::test]
async fn item_03_password_hashing_floods_are_bounded() {
    let _alone = ALONE.lock().await;
    // Real argon2 parameters (19 MiB per hash), as in production.
    let (system, _dir) = embedded_with(|c| {
        c.argon2_memory_kib = 19_456;
        c.argon2_iterations = 2;
    })
    .await;
    wait_ready(&system.gateway_url).await;
    let api = Api::new(&system.gateway_url);
    let products = format!("{}/products?limit=5", api.base);
    assert_eq!(
        api.http.get(&products).send().await.unwrap().status(),
        StatusCode::OK
    );
    // Peak resident memory from here on ("5" resets the high-water mark).
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let before = rss_mib();
    let registrations = futures::future::join_all((0..256).map(|_| {
        let http = api.http.clone();
        let url = format!("{}/auth/register", api.base);
        async move {
            let res = http
                .post(url)
                .json(&json!({"email": format!("{}@x.org", unique()), "password": "password1", "name": "N"}))
                .send()
                .await
                .unwrap();
            let retry = res.headers().get("retry-after").is_some();
            (res.status(), retry)
        }
    }));
    let reads = async {
        let mut latencies = Vec::new();
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            let t = Instant::now();
            let res = api
                .http
                .get(&products)
                .header("cache-control", "no-cache")
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            latencies.push(t.elapsed());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        latencies
    };
    let (answers, mut latencies) = tokio::join!(registrations, reads);
    let peak = status_mib("VmHWM") - before;
    let created = answers
        .iter()
        .filter(|(s, _)| *s == StatusCode::CREATED)
        .count();
    let refused = answers
        .iter()
        .filter(|(s, retry)| *s == StatusCode::SERVICE_UNAVAILABLE && *retry)
        .count();
    assert_eq!(created + refused, 256, "{answers:?}");
    assert!(created >= 64, "{created} created");
    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100];
    eprintln!(
        "256 concurrent registrations: {created} created, {refused} refused (503); peak RSS growth {peak:.0} MiB; GET /products p99 {p99:?} over {} reads",
        latencies.len()
    );
    assert!(peak < 200.0, "peak RSS grew {peak:.0} MiB");
    // A bound only against starvation; the figure is printed above.
    assert!(p99 < Duration::from_secs(1), "{p99:?}");
    system.shutdown.trigger();
}
