//! The gateway as an edge: balancing strategies, failover, rate limits,
//! login brute-force limits, caching, RBAC, versions, aggregation, CORS,
//! body limits, header hygiene, the admin view and live reload. Upstreams
//! are small echo servers registered in the system's registry, each behind
//! a "plug" that can be pulled (listener and every connection gone, as
//! when a process dies) and put back on the same address.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use bazaar_chassis::config::{RateLimitConfig, RouteConfig};
use bazaar_mesh::Instance;
use common::{ADMIN_EMAIL, ADMIN_PASSWORD, Api, embedded_with, unique, wait_ready};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// An upstream that answers every request with what it saw.
struct Echo {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
}

async fn echo(id: &str, delay: Duration) -> Echo {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let (id, counter) = (id.to_owned(), hits.clone());
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let (id, counter) = (id.clone(), counter.clone());
        async move {
            counter.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(delay).await;
            let headers: HashMap<String, String> = req
                .headers()
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
                .collect();
            (
                [("x-instance-id", id.clone())],
                axum::Json(json!({
                    "instance": id,
                    "method": req.method().as_str(),
                    "path": req.uri().path_and_query().map(|p| p.to_string()),
                    "headers": headers,
                })),
            )
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Echo { addr, hits }
}

/// A TCP forwarder in front of an upstream that can be pulled out.
struct Plug {
    addr: SocketAddr,
    backend: SocketAddr,
    task: Option<JoinHandle<()>>,
    /// Connections accepted so far.
    accepted: Arc<AtomicUsize>,
}

impl Plug {
    async fn new(backend: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        Self {
            addr,
            backend,
            task: Some(tokio::spawn(Self::run(listener, backend, accepted.clone()))),
            accepted,
        }
    }

    async fn run(listener: TcpListener, backend: SocketAddr, accepted: Arc<AtomicUsize>) {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((mut inbound, _)) = listener.accept().await {
            accepted.fetch_add(1, Ordering::Relaxed);
            conns.spawn(async move {
                if let Ok(mut out) = TcpStream::connect(backend).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
            });
        }
    }

    /// The listener and every open connection go, as when a process dies.
    fn pull(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    async fn put_back(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("cannot rebind {}: {e}", self.addr),
            }
        };
        self.task = Some(tokio::spawn(Self::run(
            listener,
            self.backend,
            self.accepted.clone(),
        )));
    }
}

/// `n` echo upstreams of `service`, each behind a plug, registered with
/// the given tags.
async fn upstreams(
    system: &bazaar::System,
    service: &str,
    tags: &[&[&str]],
    delays: &[u64],
) -> (Vec<Plug>, Vec<Echo>) {
    let (mut plugs, mut echoes) = (Vec::new(), Vec::new());
    for (i, tag) in tags.iter().enumerate() {
        let id = format!("{service}-{i}");
        let e = echo(
            &id,
            Duration::from_millis(delays.get(i).copied().unwrap_or(0)),
        )
        .await;
        let plug = Plug::new(e.addr).await;
        system
            .discovery
            .registry()
            .register(Instance {
                name: service.into(),
                id,
                address: format!("http://{}", plug.addr),
                version: "test".into(),
                tags: tag.iter().map(|t| (*t).to_owned()).collect(),
                ..Instance::default()
            })
            .await
            .unwrap();
        plugs.push(plug);
        echoes.push(e);
    }
    (plugs, echoes)
}

/// A system whose gateway routes `/<service>` (no token needed) to one
/// echo upstream that answers after `delay_ms`.
async fn one_upstream(
    service: &str,
    delay_ms: u64,
) -> (bazaar::System, std::path::PathBuf, Vec<Plug>, Vec<Echo>) {
    let prefix = format!("/{service}");
    let (system, dir) = embedded_with(|c| {
        c.gateway.routes = vec![open_route(&prefix, service, "round_robin")];
    })
    .await;
    let (plugs, echoes) = upstreams(&system, service, &[&[]], &[delay_ms]).await;
    (system, dir, plugs, echoes)
}

fn open_route(prefix: &str, service: &str, balance: &str) -> RouteConfig {
    RouteConfig {
        auth: false,
        balance: Some(balance.into()),
        ..RouteConfig::new(prefix, service)
    }
}

fn instance_of(headers: &HeaderMap) -> String {
    headers
        .get("x-instance-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// Sends `n` GETs to `url`, `concurrency` at a time; counts answers per instance.
async fn spread(
    http: &reqwest::Client,
    url: &str,
    n: usize,
    concurrency: usize,
) -> HashMap<String, usize> {
    let counts = Arc::new(std::sync::Mutex::new(HashMap::new()));
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (http, url, counts, next) =
                (http.clone(), url.to_owned(), counts.clone(), next.clone());
            tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < n {
                    let res = http.get(&url).send().await.unwrap();
                    assert_eq!(res.status(), StatusCode::OK);
                    *counts
                        .lock()
                        .unwrap()
                        .entry(instance_of(res.headers()))
                        .or_insert(0) += 1;
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    Arc::try_unwrap(counts).unwrap().into_inner().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn balancing_strategies_spread_as_configured() {
    let (system, dir) = embedded_with(|c| {
        c.gateway.routes = vec![
            open_route("/rr", "echo-rr", "round_robin"),
            open_route("/ip", "echo-ip", "ip_hash"),
            open_route("/weighted", "echo-w", "weighted"),
            open_route("/lc", "echo-lc", "least_connections"),
            open_route("/p2c", "echo-p2c", "p2c"),
        ];
        c.gateway.trusted_proxies = vec!["127.0.0.1".into()];
    })
    .await;
    let gw = format!("{}/api/v1", system.gateway_url);
    let http = reqwest::Client::new();
    let (_rr, _) = upstreams(&system, "echo-rr", &[&[], &[], &[]], &[]).await;
    let (_ip, _) = upstreams(&system, "echo-ip", &[&[], &[], &[]], &[]).await;
    let (_w, _) = upstreams(&system, "echo-w", &[&["weight=3"], &["weight=1"]], &[]).await;
    let slow = [60, 0, 0];
    let (_lc, _) = upstreams(&system, "echo-lc", &[&[], &[], &[]], &slow).await;
    let (_p2c, _) = upstreams(&system, "echo-p2c", &[&[], &[], &[]], &slow).await;

    // Round-robin: 300 over 3, each within ±10% of 100.
    let rr = spread(&http, &format!("{gw}/rr/x"), 300, 6).await;
    assert_eq!(rr.len(), 3, "{rr:?}");
    assert!(rr.values().all(|c| (90..=110).contains(c)), "{rr:?}");

    // IP-hash: one client, one instance; different clients (through a
    // trusted proxy) spread over several.
    let one = spread(&http, &format!("{gw}/ip/x"), 60, 4).await;
    assert_eq!(one.len(), 1, "one client stuck to one instance: {one:?}");
    let mut seen = HashSet::new();
    for k in 0..60u8 {
        let res = http
            .get(format!("{gw}/ip/x"))
            .header("x-forwarded-for", format!("198.51.100.{k}"))
            .send()
            .await
            .unwrap();
        let first = instance_of(res.headers());
        let again = http
            .get(format!("{gw}/ip/x"))
            .header("x-forwarded-for", format!("198.51.100.{k}"))
            .send()
            .await
            .unwrap();
        assert_eq!(instance_of(again.headers()), first, "client {k} moved");
        seen.insert(first);
    }
    assert_eq!(seen.len(), 3, "{seen:?}");

    // Weighted 3:1 within ±10%.
    let w = spread(&http, &format!("{gw}/weighted/x"), 400, 4).await;
    let heavy = w.get("echo-w-0").copied().unwrap_or(0);
    let light = w.get("echo-w-1").copied().unwrap_or(0);
    assert!(
        (270..=330).contains(&heavy) && (90..=110).contains(&light),
        "{w:?}"
    );

    // Least-connections and p2c send less to the slowed instance (60 ms).
    for (path, svc) in [("lc", "echo-lc"), ("p2c", "echo-p2c")] {
        let counts = spread(&http, &format!("{gw}/{path}/x"), 300, 8).await;
        let slowed = counts.get(&format!("{svc}-0")).copied().unwrap_or(0);
        let fast = counts.get(&format!("{svc}-1")).copied().unwrap_or(0);
        assert!(slowed * 3 < fast, "{path}: {counts:?}");
    }
    system.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_connections_are_reused_and_a_restart_loses_no_write() {
    let (system, dir, mut plugs, echoes) = one_upstream("echo", 0).await;
    let base = system.gateway_url.clone();
    let http = reqwest::Client::new();

    for i in 0..30 {
        let res = http
            .get(format!("{base}/api/v1/echo/{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    // One client connection, so one upstream connection carries all 30
    // (a health check may have opened one more).
    let opened = plugs[0].accepted.load(Ordering::Relaxed);
    assert!(opened <= 2, "30 calls opened {opened} upstream connections");

    // The upstream restarts: every idle connection to it is dead. A write
    // then reaches it once, on a new connection.
    plugs[0].pull();
    plugs[0].put_back().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = echoes[0].hits.load(Ordering::Relaxed);
    let res = http
        .post(format!("{base}/api/v1/echo/orders"))
        .json(&json!({"n": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let seen: Value = res.json().await.unwrap();
    assert_eq!(seen["method"], "POST");
    assert_eq!(echoes[0].hits.load(Ordering::Relaxed), before + 1);
    system.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stopping_finishes_requests_in_flight_then_refuses_new_ones() {
    let (system, dir, _plugs, _echoes) = one_upstream("slow", 800).await;
    let base = system.gateway_url.clone();
    let http = reqwest::Client::new();

    let in_flight = tokio::spawn({
        let (http, url) = (http.clone(), format!("{base}/api/v1/slow/x"));
        async move { http.get(url).send().await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stopped = tokio::spawn(system.stop());
    let res = in_flight.await.unwrap().unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let seen: Value = res.json().await.unwrap();
    assert_eq!(seen["instance"], "slow-0");
    stopped.await.unwrap().unwrap();
    assert!(
        reqwest::Client::new()
            .get(format!("{base}/health"))
            .send()
            .await
            .is_err(),
        "a stopped gateway still answers"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failover_ejects_a_dead_instance_and_takes_it_back() {
    let (system, dir) = embedded_with(|c| {
        c.gateway.routes = vec![open_route("/echo", "echo", "round_robin")];
        c.gateway.health_interval_ms = 200;
        c.gateway.breaker_open_ms = 1000;
    })
    .await;
    let base = system.gateway_url.clone();
    let (mut plugs, _echoes) = upstreams(&system, "echo", &[&[], &[], &[]], &[]).await;
    let http = reqwest::Client::new();

    // Load from 8 clients for 3 s; the second instance dies after 0.7 s.
    let failures = Arc::new(AtomicUsize::new(0));
    let served = Arc::new(AtomicUsize::new(0));
    let stop = Instant::now() + Duration::from_secs(3);
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (http, base, failures, served) =
                (http.clone(), base.clone(), failures.clone(), served.clone());
            tokio::spawn(async move {
                while Instant::now() < stop {
                    match http.get(format!("{base}/api/v1/echo/x")).send().await {
                        Ok(r) if r.status() == StatusCode::OK => {
                            served.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(700)).await;
    plugs[1].pull();
    for w in workers {
        w.await.unwrap();
    }
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "idempotent requests failed although two instances were up ({} served)",
        served.load(Ordering::Relaxed)
    );

    let services: Value = http
        .get(format!("{base}/_admin/services"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let dead = services
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == "echo-1")
        .unwrap();
    assert!(
        dead["healthy"] == false || dead["breaker"] != "closed",
        "{dead}"
    );

    // Back on the same address: it serves again once a health check passes.
    plugs[1].put_back().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let counts = spread(&http, &format!("{base}/api/v1/echo/x"), 30, 1).await;
        if counts.contains_key("echo-1") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the instance did not rejoin: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    system.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_answer_429_with_headers() {
    let (system, dir) = embedded_with(|c| {
        c.gateway.routes = vec![RouteConfig {
            rate_limit: Some(RateLimitConfig {
                requests: 3,
                per_secs: 60,
                key: "ip".into(),
            }),
            ..open_route("/limited", "echo", "round_robin")
        }];
    })
    .await;
    let _up = upstreams(&system, "echo", &[&[]], &[]).await;
    let http = reqwest::Client::new();
    let url = format!("{}/api/v1/limited/x", system.gateway_url);
    for left in (0..3).rev() {
        let res = http.get(&url).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()["ratelimit-limit"], "3");
        assert_eq!(
            res.headers()["ratelimit-remaining"],
            left.to_string().as_str()
        );
    }
    let res = http.get(&url).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=20).contains(&retry), "{retry}");
    assert_eq!(res.headers()["ratelimit-remaining"], "0");
    assert!(res.headers().contains_key("ratelimit-reset"));
    // A spoofed X-Forwarded-For does not buy a new bucket (not trusted).
    let res = http
        .get(&url)
        .header("x-forwarded-for", "203.0.113.77")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    system.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_are_limited_per_account_and_per_address() {
    let (system, dir) = embedded_with(|c| {
        c.gateway.login_failures_per_ip = 20;
    })
    .await;
    wait_ready(&system.gateway_url).await;
    let api = Api::new(&system.gateway_url);
    let victim = format!("victim-{}@test.local", unique());
    let regular = format!("regular-{}@test.local", unique());
    api.register_and_login(&victim).await;
    api.register_and_login(&regular).await;
    let login = |email: String, password: &'static str| {
        let api = &api;
        async move {
            api.call(
                "POST",
                "/auth/login",
                None,
                Some(json!({"email": email, "password": password})),
            )
            .await
            .0
        }
    };
    for _ in 0..10 {
        assert_eq!(
            login(victim.clone(), "wrong-password").await,
            StatusCode::UNAUTHORIZED
        );
    }
    // The account is locked for a while, even with the right password.
    assert_eq!(
        login(victim.to_uppercase(), "password1").await,
        StatusCode::TOO_MANY_REQUESTS
    );
    // Successful logins never count: 30 in a row from the same address.
    for _ in 0..30 {
        assert_eq!(login(regular.clone(), "password1").await, StatusCode::OK);
    }
    // Failures across accounts exhaust the address's budget (20).
    for k in 0..10 {
        let s = login(format!("nobody-{k}@test.local"), "wrong-password").await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "failure {k}");
    }
    assert_eq!(
        login(regular.clone(), "password1").await,
        StatusCode::TOO_MANY_REQUESTS
    );
    api.assert_no_5xx();
    system.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

/// The demo product a test can play with, and an admin token.
async fn product_and_admin(api: &Api) -> (String, String) {
    let admin = api.login(ADMIN_EMAIL, ADMIN_PASSWORD).await;
    let (s, p) = api
        .call(
            "POST",
            "/products",
            Some(&admin),
            Some(json!({"name": format!("Lamp {}", unique()), "price": 2500, "currency": "EUR"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{p}");
    (p["id"].as_str().unwrap().to_owned(), admin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_reads_are_cached_validated_and_invalidated() {
    let (system, dir) = embedded_with(|_| {}).await;
    wait_ready(&system.gateway_url).await;
    let api = Api::new(&system.gateway_url);
    let (id, admin) = product_and_admin(&api).await;
    let http = reqwest::Client::new();
    let url = format!("{}/api/v1/products/{id}", system.gateway_url);

    let first = http.get(&url).send().await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(first.headers()["x-cache"], "MISS");
    let etag = first.headers()["etag"].to_str().unwrap().to_owned();
    let hit = http.get(&url).send().await.unwrap();
    assert_eq!(hit.headers()["x-cache"], "HIT");
    assert_eq!(hit.headers()["etag"].to_str().unwrap(), etag);
    assert_eq!(hit.json::<Value>().await.unwrap()["price"], 2500);

    let not_modified = http
        .get(&url)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(not_modified.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(not_modified.text().await.unwrap(), "");

    let bypass = http
        .get(&url)
        .header("cache-control", "no-cache")
        .send()
        .await
        .unwrap();
    assert_eq!(bypass.status(), StatusCode::OK);
    assert_eq!(bypass.headers()["x-cache"], "MISS");

    // A write through the gateway drops the cached reads of the product.
    let (s, _) = api
        .call(
            "PUT",
            &format!("/products/{id}"),
            Some(&admin),
            Some(json!({"name": "Lamp", "price": 2700, "currency": "EUR"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let after = http.get(&url).send().await.unwrap();
    assert_eq!(after.headers()["x-cache"], "MISS");
    assert_ne!(after.headers()["etag"].to_str().unwrap(), etag);
    assert_eq!(after.json::<Value>().await.unwrap()["price"], 2700);
    let stale = http
        .get(&url)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(
        stale.status(),
        StatusCode::OK,
        "an old ETag no longer matches"
    );
    system.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_are_checked_at_the_edge() {
    let (system, dir) = embedded_with(|c| {
        c.gateway.routes = vec![RouteConfig {
            roles: vec!["admin".into()],
            ..RouteConfig::new("/ops", "echo")
        }];
    })
    .await;
    wait_ready(&system.gateway_url).await;
    let (_plugs, echoes) = upstreams(&system, "echo", &[&[]], &[]).await;
    let api = Api::new(&system.gateway_url);
    let (shopper, _) = api
        .register_and_login(&format!("s-{}@test.local", unique()))
        .await;
    let admin = api.login(ADMIN_EMAIL, ADMIN_PASSWORD).await;
    assert_eq!(
        api.call("GET", "/ops/x", None, None).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        api.call("GET", "/ops/x", Some(&shopper), None).await.0,
        StatusCode::FORBIDDEN
    );
    let body = json!({"name": "X", "price": 1, "currency": "EUR"});
    assert_eq!(
        api.call("POST", "/products", Some(&shopper), Some(body))
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        echoes[0].hits.load(Ordering::Relaxed),
        0,
        "refused calls never reach the upstream"
    );
    let (s, seen) = api.call("GET", "/ops/x", Some(&admin), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(seen["headers"]["x-user-role"], "admin");
    system.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_products_carry_price_objects() {
    let (system, dir) = embedded_with(|_| {}).await;
    wait_ready(&system.gateway_url).await;
    let api = Api::new(&system.gateway_url);
    let (id, admin) = product_and_admin(&api).await;
    let http = reqwest::Client::new();
    let v2 = format!("{}/api/v2", system.gateway_url);

    let one: Value = http
        .get(format!("{v2}/products/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(one["price"], json!({"amount": 2500, "currency": "EUR"}));
    assert!(one.get("currency").is_none(), "{one}");
    let page: Value = http
        .get(format!("{v2}/products?limit=3"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 3);
    assert!(page["items"][0]["price"]["amount"].is_number(), "{page}");
    let (_, v1) = api
        .call("GET", &format!("/products/{id}"), None, None)
        .await;
    assert_eq!(
        (v1["price"].clone(), v1["currency"].clone()),
        (json!(2500), json!("EUR"))
    );

    // Writes in v2 speak v2 too.
    let created = http
        .post(format!("{v2}/products"))
        .bearer_auth(&admin)
        .json(&json!({"name": "Vase", "price": {"amount": 4200, "currency": "USD"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    let created: Value = created.json().await.unwrap();
    assert_eq!(created["price"], json!({"amount": 4200, "currency": "USD"}));
    let (_, v1) = api
        .call(
            "GET",
            &format!("/products/{}", created["id"].as_str().unwrap()),
            None,
            None,
        )
        .await;
    assert_eq!(v1["price"], 4200);
    let bad = http
        .post(format!("{v2}/products"))
        .bearer_auth(&admin)
        .json(&json!({"name": "Vase", "price": 4200}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::UNPROCESSABLE_ENTITY);
    system.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overview_aggregates_and_degrades_to_a_partial_answer() {
    let (system, dir) = embedded_with(|_| {}).await;
    wait_ready(&system.gateway_url).await;
    let api = Api::new(&system.gateway_url);
    let email = format!("o-{}@test.local", unique());
    let (token, user_id) = api.register_and_login(&email).await;
    assert_eq!(
        api.call("GET", "/me/overview", None, None).await.0,
        StatusCode::UNAUTHORIZED
    );
    let (s, all) = api.call("GET", "/me/overview", Some(&token), None).await;
    assert_eq!(s, StatusCode::OK, "{all}");
    assert_eq!(all["profile"]["id"], user_id.as_str());
    assert_eq!(all["orders"]["total"], 0);
    assert!(all["notifications"]["total"].is_number(), "{all}");
    assert_eq!(all["partial"], false);

    // Notifications gone: the rest still comes, the missing part is named.
    let registry = system.discovery.registry().clone();
    for i in registry.list("notifications").await.unwrap() {
        registry.deregister("notifications", &i.id).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let partial = loop {
        let (s, body) = api.call("GET", "/me/overview", Some(&token), None).await;
        assert_eq!(s, StatusCode::OK, "{body}");
        if body["partial"] == true {
            break body;
        }
        assert!(Instant::now() < deadline, "never partial: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(partial["notifications"].is_null());
    assert!(
        partial["errors"]["notifications"]
            .as_str()
            .unwrap()
            .contains("notifications"),
        "{partial}"
    );
    assert_eq!(partial["profile"]["email"], email.as_str());
    assert_eq!(partial["orders"]["total"], 0);
    system.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_hygiene_cors_body_limit_and_forwarding() {
    let (system, dir) = embedded_with(|c| {
        c.gateway.cors_origins = vec!["http://shop.example".into()];
        c.gateway.routes = vec![
            RouteConfig {
                add_headers: [("x-edge".to_owned(), "bazaar".to_owned())].into(),
                remove_headers: vec!["x-debug".into()],
                ..open_route("/echo", "echo", "round_robin")
            },
            RouteConfig {
                rewrite: Some("/echo-shop".into()),
                ..open_route("/shop", "echo", "round_robin")
            },
        ];
    })
    .await;
    wait_ready(&system.gateway_url).await;
    let _up = upstreams(&system, "echo", &[&[]], &[]).await;
    let http = reqwest::Client::new();
    let gw = format!("{}/api/v1", system.gateway_url);

    // CORS: preflight from an allowed origin, refusal for another, and the
    // origin echoed on real answers.
    let pre = http
        .request(reqwest::Method::OPTIONS, format!("{gw}/products"))
        .header("origin", "http://shop.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(pre.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        pre.headers()["access-control-allow-origin"],
        "http://shop.example"
    );
    assert!(
        pre.headers()["access-control-allow-methods"]
            .to_str()
            .unwrap()
            .contains("POST")
    );
    assert_eq!(
        pre.headers()["access-control-allow-headers"],
        "authorization, content-type"
    );
    let refused = http
        .request(reqwest::Method::OPTIONS, format!("{gw}/products"))
        .header("origin", "http://evil.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    assert!(
        !refused
            .headers()
            .contains_key("access-control-allow-origin")
    );
    let get = http
        .get(format!("{gw}/products?limit=1"))
        .header("origin", "http://shop.example")
        .send()
        .await
        .unwrap();
    assert_eq!(
        get.headers()["access-control-allow-origin"],
        "http://shop.example"
    );
    let other = http
        .get(format!("{gw}/products?limit=1"))
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert!(!other.headers().contains_key("access-control-allow-origin"));

    // 413 for a body over the limit (1 MiB), before any upstream sees it.
    let big = vec![b'x'; 2 * 1024 * 1024];
    let res = http
        .post(format!("{gw}/echo/upload"))
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);

    // Hop-by-hop headers stripped, identity and X-Forwarded-For from the
    // client not believed, X-Forwarded-* set.
    let seen: Value = http
        .get(format!("{gw}/echo/headers"))
        .header("connection", "keep-alive, x-secret")
        .header("x-secret", "1")
        .header("x-user-id", "someone-else")
        .header("x-forwarded-for", "203.0.113.1")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let h = &seen["headers"];
    assert!(h.get("x-secret").is_none(), "{h}");
    assert!(h.get("x-user-id").is_none(), "{h}");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert!(
        h["x-forwarded-host"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{h}"
    );
    assert_eq!(seen["path"], "/echo/headers");
    // Every call carries a request id and a trace: the client's trace,
    // with a span id of the gateway's call.
    assert!(
        h["x-request-id"].as_str().is_some_and(|v| !v.is_empty()),
        "{h}"
    );
    assert!(
        bazaar_chassis::http::valid_traceparent(h["traceparent"].as_str().unwrap()),
        "{h}"
    );
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let traced: Value = http
        .get(format!("{gw}/echo/headers"))
        .header("traceparent", parent)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let tp = traced["headers"]["traceparent"].as_str().unwrap();
    assert!(
        tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{tp}"
    );
    assert_ne!(tp, parent, "a span id of its own");
    // Per-route header edits and path rewrite.
    let seen: Value = http
        .get(format!("{gw}/echo/x"))
        .header("x-debug", "1")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(seen["headers"]["x-edge"], "bazaar");
    assert!(seen["headers"].get("x-debug").is_none(), "{seen}");
    let seen: Value = http
        .get(format!("{gw}/shop/7?x=1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(seen["path"], "/echo-shop/7?x=1");
    system.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

/// Reads from `tcp` until the peer closes it; what was read, or `None` if
/// it is still open after `within`.
async fn read_until_closed(tcp: &mut TcpStream, within: Duration) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut seen = Vec::new();
    let read = tokio::time::timeout(within, async {
        let mut buf = [0u8; 4096];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    read.ok()
        .map(|()| String::from_utf8_lossy(&seen).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_clients_are_disconnected() {
    use tokio::io::AsyncWriteExt;
    let (system, dir) = embedded_with(|c| {
        c.gateway.routes = vec![open_route("/echo", "echo", "round_robin")];
        c.gateway.header_timeout_ms = 400;
    })
    .await;
    let _up = upstreams(&system, "echo", &[&[]], &[300]).await;
    let addr = system.gateway_url.trim_start_matches("http://").to_owned();

    // Slowloris: a head sent a few bytes at a time, never finished. The
    // bytes keep arriving, yet the connection is closed once the head
    // has taken longer than the limit.
    let mut slow = TcpStream::connect(&addr).await.unwrap();
    let started = Instant::now();
    slow.write_all(b"GET /api/v1/echo/x HTTP/1.1\r\n")
        .await
        .unwrap();
    let trickle = async {
        for i in 0..40 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if slow
                .write_all(format!("x-pad-{i}: 1\r\n").as_bytes())
                .await
                .is_err()
            {
                break;
            }
        }
    };
    trickle.await;
    let closed = read_until_closed(&mut slow, Duration::from_secs(3)).await;
    assert!(closed.is_some(), "a trickled head kept its connection");
    assert!(
        started.elapsed() < Duration::from_millis(2_100),
        "the connection was closed only after {:?}",
        started.elapsed()
    );

    // A keep-alive connection: a request that takes longer than the limit
    // (the upstream answers after 300 ms, the head came at once) is
    // served in full; left idle afterwards, the connection is closed.
    let mut kept = TcpStream::connect(&addr).await.unwrap();
    let request = b"GET /api/v1/echo/y HTTP/1.1\r\nhost: gw\r\n\r\n";
    kept.write_all(request).await.unwrap();
    tokio::time::sleep(Duration::from_millis(350)).await;
    kept.write_all(request).await.unwrap();
    let answers = read_until_closed(&mut kept, Duration::from_secs(5))
        .await
        .expect("an idle keep-alive connection stayed open");
    assert_eq!(
        answers.matches("HTTP/1.1 200 OK").count(),
        2,
        "both requests are answered before the idle close: {answers}"
    );

    // An ordinary client is unaffected.
    let res = reqwest::get(format!("{}/api/v1/echo/z", system.gateway_url))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    system.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_services_lists_instances_for_admins_and_loopback() {
    let (system, dir) = embedded_with(|c| {
        c.gateway.trusted_proxies = vec!["127.0.0.1".into()];
    })
    .await;
    wait_ready(&system.gateway_url).await;
    let api = Api::new(&system.gateway_url);
    let http = reqwest::Client::new();
    let url = format!("{}/_admin/services", system.gateway_url);

    let local: Value = http.get(&url).send().await.unwrap().json().await.unwrap();
    let catalog = local
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "catalog")
        .unwrap();
    assert_eq!(catalog["healthy"], true);
    assert_eq!(catalog["breaker"], "closed");
    assert!(
        catalog["address"]
            .as_str()
            .unwrap()
            .starts_with("http://127.0.0.1:")
    );
    assert!(catalog["id"].as_str().unwrap().starts_with("catalog-"));

    // From afar (through the trusted proxy): a token, and the admin role.
    let remote = || http.get(&url).header("x-forwarded-for", "203.0.113.5");
    assert_eq!(
        remote().send().await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    let (shopper, _) = api
        .register_and_login(&format!("a-{}@test.local", unique()))
        .await;
    assert_eq!(
        remote()
            .bearer_auth(&shopper)
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::FORBIDDEN
    );
    let admin = api.login(ADMIN_EMAIL, ADMIN_PASSWORD).await;
    assert_eq!(
        remote().bearer_auth(&admin).send().await.unwrap().status(),
        StatusCode::OK
    );
    // The same for the dashboard's API and for the diagnostics every
    // instance serves, which on the gateway's public port are guarded
    // too; the dashboard's page itself holds no data and loads for all.
    let base = &system.gateway_url;
    for path in [
        "/_dashboard/api/snapshot",
        "/_dashboard/api/traces",
        "/_dashboard/api/replays",
        "/_dashboard/api/dead-letters",
        "/_traces",
        "/_traces/search?q=x",
        "/_traces/edges",
        "/_traces/0af7651916cd43dd8448eb211c80319c",
        "/_timeline/0190c6a0-0000-7000-8000-000000000000",
        "/_mesh/calls",
    ] {
        let afar = || {
            http.get(format!("{base}{path}"))
                .header("x-forwarded-for", "203.0.113.5")
        };
        assert_eq!(
            afar().send().await.unwrap().status(),
            StatusCode::UNAUTHORIZED,
            "{path}"
        );
        assert_eq!(
            afar().bearer_auth(&shopper).send().await.unwrap().status(),
            StatusCode::FORBIDDEN,
            "{path}"
        );
        assert_eq!(
            afar().bearer_auth(&admin).send().await.unwrap().status(),
            StatusCode::OK,
            "{path}"
        );
        assert_eq!(
            http.get(format!("{base}{path}"))
                .send()
                .await
                .unwrap()
                .status(),
            StatusCode::OK,
            "{path} from loopback"
        );
    }
    let page = http
        .get(format!("{base}/_dashboard"))
        .header("x-forwarded-for", "203.0.113.5")
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert!(page.text().await.unwrap().contains("signin-form"));

    // Not only the gateway's view: after a checkout, orders' mesh client
    // has called catalog, and its breaker for each catalog instance shows.
    let (_, products) = api.call("GET", "/products?limit=1", None, None).await;
    let (s, order) = api
        .call(
            "POST",
            "/orders",
            Some(&shopper),
            Some(json!({"items": [{"product_id": products["items"][0]["id"], "quantity": 1}]})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{order}");
    let all: Value = http.get(&url).send().await.unwrap().json().await.unwrap();
    let seen = all
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["caller"] == "orders" && i["name"] == "catalog")
        .unwrap_or_else(|| panic!("orders' calls to catalog are not shown: {all}"));
    assert_eq!(seen["breaker"], "closed");
    assert!(
        seen["caller_instance"]
            .as_str()
            .unwrap()
            .starts_with("orders-")
    );
    assert!(
        all.as_array()
            .unwrap()
            .iter()
            .any(|i| i["caller"] == "gateway")
    );
    system.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_table_reloads_live_without_disturbing_requests() {
    let dir = std::env::temp_dir().join(format!("bazaar-reload-{}", unique()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bazaar.toml");
    let table = |prefix: &str| {
        format!("[[gateway.routes]]\nprefix = \"{prefix}\"\nservice = \"echo\"\nauth = false\n")
    };
    std::fs::write(&file, table("/old")).unwrap();
    let mut config = bazaar_chassis::Config::load(Some(&file)).unwrap();
    let base = common::test_config(dir.clone());
    config.data_dir = base.data_dir;
    config.admin_email = base.admin_email;
    config.admin_password = base.admin_password;
    config.argon2_memory_kib = base.argon2_memory_kib;
    config.argon2_iterations = base.argon2_iterations;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let system = bazaar::up(config, &HashMap::new(), listener).await.unwrap();
    let (_plugs, _echoes) = upstreams(&system, "echo", &[&[]], &[]).await;
    let slow_echo = echo("echo-slow", Duration::from_millis(2500)).await;
    system
        .discovery
        .registry()
        .register(Instance {
            name: "slow".into(),
            id: "echo-slow".into(),
            address: format!("http://{}", slow_echo.addr),
            version: "test".into(),
            ..Instance::default()
        })
        .await
        .unwrap();
    std::fs::write(
        &file,
        format!(
            "{}[[gateway.routes]]\nprefix = \"/slow\"\nservice = \"slow\"\nauth = false\n",
            table("/old")
        ),
    )
    .unwrap();
    let http = reqwest::Client::new();
    let gw = format!("{}/api/v1", system.gateway_url);
    let wait_for = |path: &'static str, want: StatusCode| {
        let (http, gw) = (http.clone(), gw.clone());
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let s = http
                    .get(format!("{gw}{path}"))
                    .send()
                    .await
                    .unwrap()
                    .status();
                if s == want {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "{path} still answers {s}, not {want}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    wait_for("/slow/x", StatusCode::OK).await;
    assert_eq!(
        http.get(format!("{gw}/old/x"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );

    // A request in flight while the table changes finishes on its route.
    let in_flight = tokio::spawn({
        let (http, gw) = (http.clone(), gw.clone());
        async move {
            http.get(format!("{gw}/slow/x"))
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(&file, table("/new")).unwrap();
    wait_for("/new/x", StatusCode::OK).await;
    wait_for("/old/x", StatusCode::NOT_FOUND).await;
    assert_eq!(in_flight.await.unwrap(), StatusCode::OK);

    // A broken file leaves the running table alone.
    std::fs::write(
        &file,
        "[[gateway.routes]]\nprefix = \"nope\"\nservice = \"echo\"\n",
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        http.get(format!("{gw}/new/x"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    system.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}
