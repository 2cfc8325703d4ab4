//! "Hold the edge" (issue 14): one test per defect a hostile client or a
//! new user found, each named after its item. Every test failed on the
//! `main` before the fix.

#![allow(clippy::unwrap_used)]

mod common;

use base64::Engine as _;
use common::{ADMIN_EMAIL, ADMIN_PASSWORD, Api, embedded, embedded_with, unique, wait_ready};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// `POST /orders` for one unit of `product`.
async fn checkout(api: &Api, token: &str, product: &str) -> (StatusCode, Value) {
    api.call(
        "POST",
        "/orders",
        Some(token),
        Some(json!({"items": [{"product_id": product, "quantity": 1}]})),
    )
    .await
}

/// The first product of the demo catalog.
async fn first_product(api: &Api) -> String {
    let (s, page) = api.call("GET", "/products?limit=1", None, None).await;
    assert_eq!(s, StatusCode::OK, "{page}");
    page["items"][0]["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn item_05_product_id_is_not_pasted_into_a_url() {
    let (system, _dir) = embedded().await;
    wait_ready(&system.gateway_url).await;
    let api = Api::new(&system.gateway_url);
    let (token, _) = api.register_and_login(&format!("{}@x.org", unique())).await;
    let real = first_product(&api).await;
    for bad in [
        format!("{real}?x=1"),
        format!("{real}#f"),
        format!("./{real}"),
        "../health".to_owned(),
        "../../metrics".to_owned(),
        "%2e%2e/health".to_owned(),
        String::new(),
    ] {
        let (s, p) = checkout(&api, &token, &bad).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {p}");
        assert_eq!(p["errors"][0]["field"], "items[0].product_id", "{bad}: {p}");
        assert!(!p.to_string().contains("127.0.0.1"), "{p}");
    }
    // Ids in paths and in buy bodies are checked the same way.
    for path in [
        "/products/not-an-id".to_owned(),
        "/inventory/not-an-id".to_owned(),
    ] {
        let (s, p) = api.call("GET", &path, None, None).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{path}: {p}");
    }
    for path in ["/orders/x", "/payments/x"] {
        let (s, p) = api.call("GET", path, Some(&token), None).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{path}: {p}");
    }
    let (s, p) = api
        .call(
            "POST",
            "/products/buy",
            Some(&token),
            Some(json!({"ids": [real, "../health"]})),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{p}");
    assert_eq!(p["errors"][0]["field"], "ids[1]");
    // The real id still buys.
    let (s, p) = checkout(&api, &token, &real).await;
    assert_eq!(s, StatusCode::CREATED, "{p}");
    api.assert_no_5xx();
    system.shutdown.trigger();
}

#[tokio::test]
async fn item_08_stock_overflow_is_refused_at_the_edge() {
    let (system, _dir) = embedded().await;
    wait_ready(&system.gateway_url).await;
    let api = Api::new(&system.gateway_url);
    let admin = api.login(ADMIN_EMAIL, ADMIN_PASSWORD).await;
    let p = first_product(&api).await;
    let path = format!("/inventory/{p}");
    for bad in [json!(i64::MAX), json!(1_000_000_001_i64), json!(-1)] {
        let (s, body) = api
            .call("PUT", &path, Some(&admin), Some(json!({"available": bad})))
            .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {body}");
        assert_eq!(body["errors"][0]["field"], "available");
    }
    let (s, body) = api
        .call(
            "PUT",
            &path,
            Some(&admin),
            Some(json!({"available": 1_000_000_000_i64})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (s, body) = api.call("GET", &path, None, None).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["available"], 1_000_000_000_i64);
    system.shutdown.trigger();
}

fn claims_of(token: &str) -> Value {
    let payload = token.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

#[tokio::test]
async fn item_10_tokens_carry_iss_and_aud_and_both_are_checked() {
    let (system, _dir) = embedded_with(|c| {
        c.token_issuer = "https://shop.example".into();
        c.token_audience = "shop-api".into();
    })
    .await;
    wait_ready(&system.gateway_url).await;
    let api = Api::new(&system.gateway_url);
    let (token, _) = api.register_and_login(&format!("{}@x.org", unique())).await;
    let claims = claims_of(&token);
    assert_eq!(claims["iss"], "https://shop.example", "{claims}");
    assert_eq!(claims["aud"], "shop-api", "{claims}");
    let (s, _) = api.call("GET", "/auth/me", Some(&token), None).await;
    assert_eq!(s, StatusCode::OK);
    system.shutdown.trigger();

    // Another deployment (other iss and aud, its own keys) refuses it:
    // at the gateway and at the service.
    let (other, _dir) = embedded().await;
    wait_ready(&other.gateway_url).await;
    let api = Api::new(&other.gateway_url);
    let (s, _) = api.call("GET", "/orders", Some(&token), None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (own, _) = api.register_and_login(&format!("{}@x.org", unique())).await;
    assert_eq!(claims_of(&own)["iss"], "bazaar");
    assert_eq!(claims_of(&own)["aud"], "bazaar-api");
    other.shutdown.trigger();
}

#[tokio::test]
async fn item_11_control_characters_in_emails_and_names_are_refused() {
    let (system, _dir) = embedded().await;
    wait_ready(&system.gateway_url).await;
    let api = Api::new(&system.gateway_url);
    for (email, name, field) in [
        (format!("a\u{0}{}@x.org", unique()), "Ann", "email"),
        (format!("a\u{7}{}@x.org", unique()), "Ann", "email"),
        (format!("{}@x.org", unique()), "Ann\u{1b}[31m", "name"),
        (format!("{}@x.org", unique()), "Ann\u{0}", "name"),
    ] {
        let (s, p) = api
            .call(
                "POST",
                "/auth/register",
                None,
                Some(json!({"email": email, "password": "password1", "name": name})),
            )
            .await;
        assert_eq!(
            s,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{email:?} {name:?}: {p}"
        );
        assert_eq!(p["errors"][0]["field"], field);
    }
    system.shutdown.trigger();
}

#[tokio::test]
async fn item_12_every_401_says_www_authenticate_bearer() {
    let (system, _dir) = embedded().await;
    wait_ready(&system.gateway_url).await;
    let api = Api::new(&system.gateway_url);
    let challenge = |res: &reqwest::Response| {
        res.headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap().to_owned())
    };
    // No token: `Bearer`, at the gateway and at a service's own check.
    let res = api
        .http
        .get(format!("{}/orders", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(challenge(&res).as_deref(), Some("Bearer"));
    // A bad token: `error="invalid_token"`.
    let res = api
        .http
        .get(format!("{}/auth/me", api.base))
        .bearer_auth("not.a.token")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        challenge(&res).as_deref(),
        Some(r#"Bearer error="invalid_token""#)
    );
    // Wrong credentials.
    let res = api
        .http
        .post(format!("{}/auth/login", api.base))
        .json(&json!({"email": "nobody@x.org", "password": "password1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert!(challenge(&res).is_some_and(|c| c.starts_with("Bearer")));
    system.shutdown.trigger();
}

#[tokio::test]
async fn item_13_an_idempotency_key_reused_with_another_body_is_422_and_outlives_its_products() {
    let (system, _dir) = embedded().await;
    wait_ready(&system.gateway_url).await;
    let api = Api::new(&system.gateway_url);
    let (token, _) = api.register_and_login(&format!("{}@x.org", unique())).await;
    let (_, page) = api.call("GET", "/products?limit=2", None, None).await;
    let a = page["items"][0]["id"].as_str().unwrap();
    let b = page["items"][1]["id"].as_str().unwrap();
    let checkout = |items: Value| {
        api.http
            .post(format!("{}/orders", api.base))
            .bearer_auth(&token)
            .header("idempotency-key", "cart-1")
            .json(&json!({ "items": items }))
    };
    let first = json!([{"product_id": a, "quantity": 2}]);
    let first_again = first.clone();
    let (s, order) = api.send("first", checkout(first.clone())).await;
    assert_eq!(s, StatusCode::CREATED, "{order}");
    let (s, again) = api.send("same", checkout(first)).await;
    assert_eq!(s, StatusCode::OK, "{again}");
    assert_eq!(again["id"], order["id"]);
    for other in [
        json!([{"product_id": a, "quantity": 3}]),
        json!([{"product_id": b, "quantity": 2}]),
        json!([{"product_id": a, "quantity": 2}, {"product_id": b, "quantity": 1}]),
    ] {
        let (s, p) = api.send("other", checkout(other.clone())).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{other}: {p}");
        assert_eq!(p["errors"][0]["field"], "Idempotency-Key");
    }
    // A product deleted since cannot be priced, but the key's order is
    // still the answer to a retry.
    let admin = api.login(ADMIN_EMAIL, ADMIN_PASSWORD).await;
    let (s, _) = api
        .call("DELETE", &format!("/products/{a}"), Some(&admin), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    // Once orders has heard of it (its price cache), a new checkout fails…
    let (other, _) = api.register_and_login(&format!("{}@x.org", unique())).await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (s, p) = api
            .call(
                "POST",
                "/orders",
                Some(&other),
                Some(json!({"items": [{"product_id": a, "quantity": 1}]})),
            )
            .await;
        if s == StatusCode::UNPROCESSABLE_ENTITY {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still priced: {s} {p}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // …and the retry still gets its order.
    let (s, again) = api.send("after the delete", checkout(first_again)).await;
    assert_eq!(s, StatusCode::OK, "{again}");
    assert_eq!(again["id"], order["id"]);
    let (_, mine) = api.call("GET", "/orders", Some(&token), None).await;
    assert_eq!(mine["total"], 1, "{mine}");
    system.shutdown.trigger();
}

#[tokio::test]
async fn item_17_a_known_path_with_another_method_is_405_with_allow() {
    let (system, _dir) = embedded().await;
    wait_ready(&system.gateway_url).await;
    let http = reqwest::Client::new();
    let res = http
        .patch(format!("{}/api/v1/products", system.gateway_url))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::METHOD_NOT_ALLOWED);
    let allow = res.headers()["allow"].to_str().unwrap().to_owned();
    for m in ["GET", "HEAD", "POST", "PUT", "DELETE"] {
        assert!(allow.contains(m), "{allow}");
    }
    assert!(!allow.contains("PATCH"));
    // An unknown path is still 404.
    let res = http
        .get(format!("{}/api/v1/nothing-here", system.gateway_url))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    system.shutdown.trigger();
}

async fn refresh(api: &Api, token: String) -> (StatusCode, Option<String>) {
    let (s, t) = api
        .call(
            "POST",
            "/auth/refresh",
            None,
            Some(json!({"refresh_token": token})),
        )
        .await;
    (s, t["refresh_token"].as_str().map(str::to_owned))
}

#[tokio::test]
async fn item_09_a_reused_refresh_token_revokes_its_family() {
    let (system, _dir) = embedded().await;
    wait_ready(&system.gateway_url).await;
    let api = Api::new(&system.gateway_url);
    let email = format!("{}@x.org", unique());
    api.register_and_login(&email).await;
    let login = || async {
        let (s, t) = api
            .call(
                "POST",
                "/auth/login",
                None,
                Some(json!({"email": email, "password": "password1"})),
            )
            .await;
        assert_eq!(s, StatusCode::OK);
        t["refresh_token"].as_str().unwrap().to_owned()
    };
    let r1 = login().await;
    let other_session = login().await;
    let (s, r2) = refresh(&api, r1.clone()).await;
    assert_eq!(s, StatusCode::OK);
    let r2 = r2.unwrap();
    let (s, r3) = refresh(&api, r2).await;
    assert_eq!(s, StatusCode::OK);
    let r3 = r3.unwrap();
    // r1 again: refused, and r3 (descended from r1's login) dies with it.
    assert_eq!(refresh(&api, r1).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(refresh(&api, r3).await.0, StatusCode::UNAUTHORIZED);
    // Another login's family is untouched.
    assert_eq!(refresh(&api, other_session).await.0, StatusCode::OK);
    system.shutdown.trigger();
}

/// `promtool`, or `None` when it is missing (a failure when `CI=true`).
fn promtool() -> Option<&'static str> {
    let found = std::process::Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "promtool is missing (Debian package prometheus)"
        );
        eprintln!("skipped: promtool is not installed");
        return None;
    }
    Some("promtool")
}

#[tokio::test]
async fn item_16_every_metrics_endpoint_passes_promtool_check_metrics() {
    let Some(promtool) = promtool() else { return };
    let (system, _dir) = embedded().await;
    wait_ready(&system.gateway_url).await;
    let api = Api::new(&system.gateway_url);
    // Some traffic, so that every family has samples.
    let (token, _) = api.register_and_login(&format!("{}@x.org", unique())).await;
    let p = first_product(&api).await;
    let (s, _) = checkout(&api, &token, &p).await;
    assert_eq!(s, StatusCode::CREATED);
    let instances = system.discovery.registry().all().await.unwrap();
    let names: std::collections::HashSet<&str> =
        instances.iter().map(|i| i.name.as_str()).collect();
    for service in [
        "gateway",
        "auth",
        "catalog",
        "orders",
        "inventory",
        "payments",
        "notifications",
    ] {
        assert!(names.contains(service), "{service} is not registered");
    }
    let http = reqwest::Client::new();
    // The checkout's messages leave through the outbox relay a moment
    // after its answer: wait until orders has published one.
    let orders = instances.iter().find(|i| i.name == "orders").unwrap();
    for _ in 0..100 {
        let text = http
            .get(format!("{}/metrics", orders.address))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text.contains("bus_published_total{") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    for i in &instances {
        let res = http
            .get(format!("{}/metrics", i.address))
            .header("accept", "text/plain")
            .send()
            .await
            .unwrap();
        assert_eq!(
            res.headers()["content-type"],
            "text/plain; version=0.0.4; charset=utf-8"
        );
        let text = res.text().await.unwrap();
        if ["gateway", "orders"].contains(&i.name.as_str()) {
            assert!(text.contains("# HELP http_requests_total "), "{}", i.name);
        }
        // The gateway labels proxied requests with its table's route.
        if i.name == "gateway" {
            assert!(
                text.contains(r#"method="POST",route="v1 * /orders",status_code="201""#),
                "{text}"
            );
        }
        for family in ["process_resident_memory_bytes", "process_cpu_seconds_total"] {
            assert!(
                text.contains(&format!("# TYPE {family} ")),
                "{}: {family}",
                i.name
            );
        }
        if i.name == "orders" {
            for family in [
                "db_pool_connections",
                "bus_published_total",
                "outbox_waiting",
                "saga_started_total",
                "saga_duration_seconds",
            ] {
                assert!(
                    text.contains(&format!("# TYPE {family} ")),
                    "{family}: {text}"
                );
            }
        }
        let mut child = std::process::Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write as _;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics failed for {}: {}{}",
            i.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // OpenMetrics when asked.
        let res = http
            .get(format!("{}/metrics", i.address))
            .header("accept", "application/openmetrics-text; version=1.0.0")
            .send()
            .await
            .unwrap();
        assert!(
            res.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/openmetrics-text")
        );
        assert!(res.text().await.unwrap().ends_with("# EOF\n"));
    }
    system.shutdown.trigger();
}

#[tokio::test]
async fn item_04_registrations_are_limited_per_address() {
    let (system, _dir) = embedded_with(|c| {
        c.gateway.trusted_proxies = vec!["127.0.0.1".into()];
        c.gateway.registrations_per_address_per_minute = 3;
    })
    .await;
    wait_ready(&system.gateway_url).await;
    let api = Api::new(&system.gateway_url);
    let register = |from: Option<&'static str>| {
        let mut req = api.http.post(format!("{}/auth/register", api.base)).json(
            &json!({"email": format!("{}@x.org", unique()), "password": "password1", "name": "N"}),
        );
        if let Some(ip) = from {
            req = req.header("x-forwarded-for", ip);
        }
        req.send()
    };
    // Loopback clients (tests, `bazaar load`) are exempt.
    for _ in 0..6 {
        assert_eq!(register(None).await.unwrap().status(), StatusCode::CREATED);
    }
    // An address a trusted proxy names is limited, loopback or not.
    for ip in ["203.0.113.7", "127.0.0.9"] {
        for _ in 0..3 {
            assert_eq!(
                register(Some(ip)).await.unwrap().status(),
                StatusCode::CREATED
            );
        }
        let refused = register(Some(ip)).await.unwrap();
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS, "{ip}");
        let wait: u64 = refused.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=60).contains(&wait), "{wait}");
    }
    // Another address has its own allowance.
    assert_eq!(
        register(Some("198.51.100.1")).await.unwrap().status(),
        StatusCode::CREATED
    );
    system.shutdown.trigger();
}

/// A TCP connection to `to` from the loopback address `from`.
async fn connect_from(from: [u8; 4], to: std::net::SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(std::net::SocketAddr::from((from, 0))).unwrap();
    socket.connect(to).await.unwrap()
}

fn gateway_addr(system: &bazaar::System) -> std::net::SocketAddr {
    system
        .gateway_url
        .trim_start_matches("http://")
        .parse()
        .unwrap()
}

#[tokio::test]
async fn item_01_bodies_that_never_finish_are_cut_off_and_others_are_served() {
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    bazaar_chassis::http::raise_open_files_limit();
    let body_timeout = Duration::from_secs(2);
    let (system, _dir) = embedded_with(|c| {
        c.gateway.body_timeout_ms = body_timeout.as_millis() as u64;
    })
    .await;
    wait_ready(&system.gateway_url).await;
    let addr = gateway_addr(&system);
    let started = Instant::now();
    // 1,000 clients, from four addresses (each under the per-address cap),
    // each announcing a huge body and trickling it a byte at a time.
    let trickles: Vec<_> = (0..1000u32)
        .map(|i| {
            tokio::spawn(async move {
                let from = [127, 0, 0, 2 + (i % 4) as u8];
                let mut tcp = connect_from(from, addr).await;
                let opened = Instant::now();
                tcp.write_all(
                    b"POST /api/v1/auth/login HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 999999999\r\n\r\n{",
                )
                .await
                .unwrap();
                let mut answer = Vec::new();
                let mut buf = [0u8; 1024];
                loop {
                    tokio::select! {
                        read = tcp.read(&mut buf) => match read {
                            Ok(0) | Err(_) => break,
                            Ok(n) => answer.extend_from_slice(&buf[..n]),
                        },
                        () = tokio::time::sleep(Duration::from_millis(500)) => {
                            if tcp.write_all(b" ").await.is_err() {
                                // Closed by the server; read what it said.
                                while let Ok(n) = tcp.read(&mut buf).await {
                                    if n == 0 { break; }
                                    answer.extend_from_slice(&buf[..n]);
                                }
                                break;
                            }
                        }
                    }
                    assert!(opened.elapsed() < Duration::from_secs(60), "never closed");
                }
                (opened.elapsed(), String::from_utf8_lossy(&answer).into_owned())
            })
        })
        .collect();
    // Meanwhile, a normal client is served throughout.
    let http = reqwest::Client::new();
    let mut slowest = Duration::ZERO;
    let mut gets = 0;
    while started.elapsed() < body_timeout + Duration::from_secs(3) {
        let t = Instant::now();
        let res = http
            .get(format!("{}/api/v1/products?limit=1", system.gateway_url))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        slowest = slowest.max(t.elapsed());
        gets += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut latest = Duration::ZERO;
    for t in trickles {
        let (lived, answer) = t.await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        latest = latest.max(lived);
    }
    eprintln!(
        "1,000 trickling connections closed after at most {latest:?}; {gets} GETs meanwhile, slowest {slowest:?}"
    );
    assert!(latest < body_timeout + Duration::from_secs(5), "{latest:?}");
    // A wall-clock bound only against hanging: the figure is printed above.
    assert!(slowest < Duration::from_secs(2), "{slowest:?}");
    system.shutdown.trigger();
}

#[tokio::test]
async fn item_01_connections_per_address_are_capped_trusted_proxies_excepted() {
    use std::time::Duration;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (system, _dir) = embedded_with(|c| {
        c.gateway.max_connections_per_address = 20;
        c.gateway.trusted_proxies = vec!["127.0.0.4".into()];
    })
    .await;
    wait_ready(&system.gateway_url).await;
    let addr = gateway_addr(&system);
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(connect_from([127, 0, 0, 3], addr).await);
    }
    // Let the gateway count them.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = connect_from([127, 0, 0, 3], addr).await;
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0) | Err(_))),
        "the 21st connection was not closed: {closed:?}"
    );
    // Other clients are served meanwhile.
    let res = reqwest::get(format!("{}/api/v1/products?limit=1", system.gateway_url))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    // A held connection still works; once some close, the address may open more.
    let get = b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n";
    held[0].write_all(get).await.unwrap();
    let n = held[0].read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    held.truncate(10);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut again = connect_from([127, 0, 0, 3], addr).await;
    again.write_all(get).await.unwrap();
    let n = again.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    // A trusted proxy is not capped.
    let mut proxied = Vec::new();
    for _ in 0..30 {
        proxied.push(connect_from([127, 0, 0, 4], addr).await);
    }
    for tcp in &mut proxied {
        tcp.write_all(get).await.unwrap();
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    }
    system.shutdown.trigger();
}

/// A `bazaar` process of a test's own, serving on `port`.
struct Process {
    child: std::process::Child,
    port: u16,
}

impl Process {
    /// Waits (up to a minute) until `/health` answers; fails if it exits.
    async fn healthy(&mut self) {
        use std::time::{Duration, Instant};
        let health = format!("http://127.0.0.1:{}/health", self.port);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("bazaar exited with {status} while starting");
            }
            if reqwest::get(&health)
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return;
            }
            assert!(Instant::now() < deadline, "bazaar did not come up");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// SIGTERM, then its exit status (a failure if it ignores the signal).
    async fn terminate(mut self) -> std::process::ExitStatus {
        use std::time::{Duration, Instant};
        let term = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(term.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("SIGTERM was ignored");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// `bazaar` with `args` (`{port}` replaced) and `env`, its stdout and
/// stderr on a pipe whose reader goes away: before start-up ends, or
/// after the first line (as `| head -1`). It must serve on, logging into
/// the broken pipe, and exit 0 on SIGTERM.
async fn with_broken_log_pipe(args: &[&str], env: &[(&str, String)], close_before_start: bool) {
    use std::io::BufRead as _;
    use std::time::Duration;
    let port = common::free_port();
    let (reader, writer) = std::io::pipe().unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_bazaar"))
        .args(args.iter().map(|a| a.replace("{port}", &port.to_string())))
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("BAZAAR_LOG_FORMAT", "json")
        .env("BAZAAR_ARGON2_MEMORY_KIB", "256")
        .env("BAZAAR_ARGON2_ITERATIONS", "1")
        .stdout(writer.try_clone().unwrap())
        .stderr(writer)
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut process = Process { child, port };
    if close_before_start {
        drop(reader);
    } else {
        let mut first = String::new();
        std::io::BufReader::new(reader)
            .read_line(&mut first)
            .unwrap();
        assert!(!first.is_empty());
    }
    process.healthy().await;
    for _ in 0..5 {
        let _ = reqwest::get(format!("http://127.0.0.1:{port}/api/v1/products")).await;
        let _ = reqwest::get(format!("http://127.0.0.1:{port}/nowhere")).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(process.child.try_wait().unwrap().is_none(), "bazaar died");
    let status = process.terminate().await;
    assert_eq!(status.code(), Some(0), "{status}");
}

async fn up_with_broken_log_pipe(close_before_start: bool) {
    let dir = std::env::temp_dir().join(format!("bazaar-pipe-{}", unique()));
    let dir_arg = dir.to_string_lossy().into_owned();
    with_broken_log_pipe(
        &["up", "--port", "{port}", "--data-dir", &dir_arg],
        &[],
        close_before_start,
    )
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// `bazaar serve payments` as the issue ran it: on RabbitMQ and PostgreSQL.
async fn serve_payments_with_broken_log_pipe(close_before_start: bool) {
    let Some((amqp, db)) = common::real_servers() else {
        return;
    };
    let env = [
        ("BAZAAR_AMQP_URL", amqp),
        ("BAZAAR_DATABASE_URL", db),
        (
            "BAZAAR_DATABASE_SCHEMA_PREFIX",
            format!("pipe{}_", unique()),
        ),
        ("BAZAAR_REGISTRY", "static".to_owned()),
    ];
    with_broken_log_pipe(
        &["serve", "payments", "--port", "{port}"],
        &env,
        close_before_start,
    )
    .await;
}

#[tokio::test]
async fn item_14_sigterm_stops_the_process_after_its_log_pipe_broke() {
    up_with_broken_log_pipe(false).await;
    serve_payments_with_broken_log_pipe(false).await;
}

#[tokio::test]
async fn item_14_a_log_pipe_closed_during_start_up_kills_nothing() {
    up_with_broken_log_pipe(true).await;
    serve_payments_with_broken_log_pipe(true).await;
}

#[tokio::test]
async fn item_01_the_soft_open_files_limit_is_raised_to_the_hard_one() {
    let port = common::free_port();
    let dir = std::env::temp_dir().join(format!("bazaar-nofile-{}", unique()));
    // Started with a low soft limit, as many shells and service managers do.
    let child = std::process::Command::new("sh")
        .args([
            "-c",
            r#"ulimit -Sn 256 && exec "$0" up --port "$1" --data-dir "$2""#,
            env!("CARGO_BIN_EXE_bazaar"),
            &port.to_string(),
        ])
        .arg(&dir)
        .env("BAZAAR_ARGON2_MEMORY_KIB", "256")
        .env("BAZAAR_ARGON2_ITERATIONS", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut process = Process { child, port };
    process.healthy().await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", process.child.id())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .to_owned();
    let numbers: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    let status = process.terminate().await;
    assert_eq!(status.code(), Some(0));
    assert_ne!(numbers[0], "256", "{line}");
    assert_eq!(numbers[0], numbers[1], "soft and hard differ: {line}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn item_15_ready_says_503_while_a_service_it_calls_cannot_be_found() {
    let (system, _dir) = embedded().await;
    wait_ready(&system.gateway_url).await;
    let registry = system.discovery.registry().clone();
    let all = registry.all().await.unwrap();
    let orders = all.iter().find(|i| i.name == "orders").unwrap();
    let ready = format!("{}/ready", orders.address);
    assert_eq!(reqwest::get(&ready).await.unwrap().status(), StatusCode::OK);
    for catalog in all.iter().filter(|i| i.name == "catalog") {
        registry.deregister("catalog", &catalog.id).await.unwrap();
    }
    let res = reqwest::get(&ready).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = res.json().await.unwrap();
    assert!(
        body["detail"].as_str().unwrap().contains("catalog"),
        "{body}"
    );
    system.shutdown.trigger();
}

/// `(available, reserved)` of a product, once inventory has heard of it.
async fn stock(api: &Api, product: &str) -> (i64, i64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let (s, b) = loop {
        let (s, b) = api
            .call("GET", &format!("/inventory/{product}"), None, None)
            .await;
        if s != StatusCode::NOT_FOUND || std::time::Instant::now() > deadline {
            break (s, b);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(s, StatusCode::OK, "{b}");
    (
        b["available"].as_i64().unwrap(),
        b["reserved"].as_i64().unwrap(),
    )
}

#[tokio::test]
async fn item_06_a_reservation_that_never_ends_is_released() {
    use bazaar_bus::{Envelope, QueueSpec};
    use bazaar_contracts::topics;
    use futures::StreamExt as _;
    use std::time::{Duration, Instant};
    let (system, _dir) = embedded_with(|c| {
        c.inventory.reservation_ttl_ms = Some(1_000);
    })
    .await;
    wait_ready(&system.gateway_url).await;
    let api = Api::new(&system.gateway_url);
    let p = first_product(&api).await;
    let (available, reserved) = stock(&api, &p).await;
    let tap = QueueSpec::new(format!("tap.released.{}", unique()))
        .bind(topics::INVENTORY, topics::INVENTORY_RELEASED)
        .expires_after(Duration::from_secs(60));
    let mut released = system.bus.subscribe(&tap, 10).await.unwrap();
    // A foreign client reserves for an order that does not exist.
    let ghost = uuid::Uuid::now_v7().to_string();
    let cmd = Envelope::new(
        topics::INVENTORY_RESERVE,
        &json!({"order_id": ghost, "items": [{"product_id": p, "quantity": 5}]}),
    )
    .unwrap();
    system
        .bus
        .publish(topics::COMMAND_EXCHANGE, topics::INVENTORY_RESERVE, &cmd)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while stock(&api, &p).await != (available - 5, reserved + 5) {
        assert!(Instant::now() < deadline, "never reserved");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Released (with its event) once the TTL has passed.
    let event = tokio::time::timeout(Duration::from_secs(15), released.next())
        .await
        .expect("no inventory.released")
        .unwrap();
    let env = event.envelope().unwrap();
    assert_eq!(env.payload::<Value>().unwrap()["order_id"], ghost.as_str());
    assert_eq!(stock(&api, &p).await, (available, reserved));
    system.shutdown.trigger();
}

#[tokio::test]
async fn item_07_a_deleted_product_no_longer_sells() {
    use std::time::{Duration, Instant};
    let (system, _dir) = embedded_with(|c| {
        // Charges take a while: an order sits in its saga when the delete comes.
        c.payments_latency_ms = 1_500;
    })
    .await;
    wait_ready(&system.gateway_url).await;
    let api = Api::new(&system.gateway_url);
    let admin = api.login(ADMIN_EMAIL, ADMIN_PASSWORD).await;
    let (token, _) = api.register_and_login(&format!("{}@x.org", unique())).await;
    let (s, product) = api
        .call(
            "POST",
            "/products",
            Some(&admin),
            Some(json!({"name": "Doomed", "price": 500})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{product}");
    let p = product["id"].as_str().unwrap().to_owned();
    let buy = json!({"items": [{"product_id": p, "quantity": 1}]});
    let (s, in_saga) = api
        .call("POST", "/orders", Some(&token), Some(buy.clone()))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{in_saga}");
    let order_path = format!("/orders/{}", in_saga["id"].as_str().unwrap());
    // Wait until it is charging (stock held), then delete the product.
    let deadline = Instant::now() + Duration::from_secs(10);
    while stock(&api, &p).await.1 != 1 {
        assert!(Instant::now() < deadline, "never reserved");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (s, _) = api
        .call("DELETE", &format!("/products/{p}"), Some(&admin), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    // A second after the delete was answered, no order for it is taken.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (s, refused) = api
        .call("POST", "/orders", Some(&token), Some(buy.clone()))
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{refused}");
    // The order already in its saga is cancelled, its stock released and
    // its charge not kept.
    let deadline = Instant::now() + Duration::from_secs(20);
    let order = loop {
        let (_, o) = api.call("GET", &order_path, Some(&token), None).await;
        if o["status"] != "PENDING" {
            break o;
        }
        assert!(Instant::now() < deadline, "still pending: {o}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(order["status"], "CANCELLED", "{order}");
    assert_eq!(order["cancel_reason"], "product_unavailable");
    // Past the provider's latency: a charge in flight has landed by now.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (s, pay) = api
            .call(
                "GET",
                &format!("/payments/{}", order["id"].as_str().unwrap()),
                Some(&token),
                None,
            )
            .await;
        if s == StatusCode::NOT_FOUND || pay["status"] == "REFUNDED" || pay["status"] == "VOIDED" {
            break;
        }
        assert!(Instant::now() < deadline, "the charge stayed: {pay}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(stock(&api, &p).await.1, 0, "held units came back");
    api.assert_no_5xx();
    system.shutdown.trigger();
}
