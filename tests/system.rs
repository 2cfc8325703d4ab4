//! Whole-system tests: the buy flow end to end through the gateway, the
//! bad-input cases of API.md, and concurrent buyers — in-process on the
//! embedded defaults, and as separate `bazaar serve` processes on RabbitMQ
//! and PostgreSQL when `BAZAAR_TEST_AMQP_URL` and `BAZAAR_TEST_DATABASE_URL`
//! are set (required with `CI=true`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};

mod common;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use reqwest::StatusCode;
use serde_json::{Value, json};

use common::*;

/// register → login → list → admin creates a product → buy → list orders,
/// then every bad-input case of API.md, and never a 5xx.
async fn walkthrough(gateway: &str) {
    let api = Api::new(gateway);
    let tag = unique();
    let (ann, ann_id) = api
        .register_and_login(&format!("ann.{tag}@example.com"))
        .await;

    let (s, page) = api.call("GET", "/products?limit=5", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        page["total"].as_i64().unwrap() >= 20,
        "demo catalog seeded: {page}"
    );
    assert_eq!(page["items"].as_array().unwrap().len(), 5);

    let admin = api.login(ADMIN_EMAIL, ADMIN_PASSWORD).await;
    let (s, product) = api
        .call(
            "POST",
            "/products",
            Some(&admin),
            Some(json!({"name": "Test Lamp", "description": "bright", "price": 2500})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{product}");
    assert_eq!(product["currency"], "USD");
    let lamp = product["id"].as_str().unwrap().to_owned();
    // The same list query as before now counts the new product (no stale page).
    let (_, after) = api.call("GET", "/products?limit=5", None, None).await;
    assert_eq!(
        after["total"].as_i64(),
        page["total"].as_i64().map(|t| t + 1)
    );
    let (_, found) = api.call("GET", "/products?q=test%20lamp", None, None).await;
    assert!(
        found["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["id"] == lamp.as_str()),
        "{found}"
    );
    let (s, got) = api
        .call("GET", &format!("/products/{lamp}"), None, None)
        .await;
    assert_eq!(
        (s, got["name"].as_str()),
        (StatusCode::OK, Some("Test Lamp"))
    );

    let mug = page["items"][0]["id"].as_str().unwrap().to_owned();
    let mug_price = page["items"][0]["price"].as_i64().unwrap();
    let (s, order) = api
        .call(
            "POST",
            "/products/buy",
            Some(&ann),
            Some(json!({"ids": [lamp, mug, lamp]})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{order}");
    assert_eq!(order["user_id"], ann_id.as_str());
    assert_eq!(order["status"], "PENDING");
    assert_eq!(order["total"].as_i64().unwrap(), 2 * 2500 + mug_price);
    assert_eq!(order["items"][0]["quantity"], 2);
    assert_eq!(order["items"][1]["product_id"], mug.as_str());
    let order_id = order["id"].as_str().unwrap().to_owned();

    let (s, orders) = api.call("GET", "/orders", Some(&ann), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(orders["total"], 1);
    assert_eq!(orders["items"][0]["id"], order_id.as_str());
    let (s, me) = api.call("GET", "/auth/me", Some(&ann), None).await;
    assert_eq!(
        (s, me["id"].as_str()),
        (StatusCode::OK, Some(ann_id.as_str()))
    );

    // --- bad input ---
    let malformed = api
        .http
        .post(format!("{}/auth/register", api.base))
        .header("content-type", "application/json")
        .body("{\"email\": ");
    assert_eq!(
        api.send("malformed", malformed).await.0,
        StatusCode::BAD_REQUEST
    );
    let (s, p) = api
        .call(
            "POST",
            "/auth/register",
            None,
            Some(json!({"email": "nope", "password": "x", "name": "A"})),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(p["errors"].as_array().unwrap().len(), 2, "{p}");
    let (s, _) = api
        .call("POST", "/auth/register", None, Some(json!({"email": format!("ann.{tag}@example.com"), "password": "password1", "name": "A"})))
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (s, _) = api
        .call(
            "POST",
            "/auth/login",
            None,
            Some(json!({"email": format!("ann.{tag}@example.com"), "password": "wrong-pass"})),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = api
        .call(
            "POST",
            "/products",
            Some(&admin),
            Some(json!({"name": "Free", "price": 0})),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let (s, _) = api
        .call(
            "POST",
            "/products",
            Some(&admin),
            Some(json!({"name": "", "price": 100})),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let (s, p) = api
        .call(
            "POST",
            "/products/buy",
            Some(&ann),
            Some(json!({"ids": ["no-such-id"]})),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(p["detail"].as_str().unwrap().contains("no-such-id"), "{p}");
    let (s, _) = api
        .call(
            "POST",
            "/products/buy",
            Some(&ann),
            Some(json!({"ids": []})),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let (s, _) = api.call("GET", "/products?limit=1000", None, None).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);

    // Tokens: none, garbage, tampered, `alg: none`.
    let (s, _) = api.call("GET", "/orders", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = api
        .call("POST", "/products/buy", None, Some(json!({"ids": [mug]})))
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = api.call("GET", "/orders", Some("not-a-token"), None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let parts: Vec<&str> = ann.split('.').collect();
    let mut claims: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    claims["role"] = json!("admin");
    let forged = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
    let tampered = format!("{}.{forged}.{}", parts[0], parts[2]);
    let (s, _) = api
        .call(
            "POST",
            "/products",
            Some(&tampered),
            Some(json!({"name": "Hack", "price": 1})),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let none_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let alg_none = format!("{none_header}.{forged}.");
    let (s, _) = api
        .call(
            "POST",
            "/products",
            Some(&alg_none),
            Some(json!({"name": "Hack", "price": 1})),
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let spoofed = api
        .http
        .post(format!("{}/products", api.base))
        .header("x-user-role", "admin")
        .header("x-user-id", "someone")
        .json(&json!({"name": "Hack", "price": 1}));
    assert_eq!(
        api.send("spoofed identity headers", spoofed).await.0,
        StatusCode::UNAUTHORIZED
    );

    // Roles and ownership.
    let (s, _) = api
        .call(
            "POST",
            "/products",
            Some(&ann),
            Some(json!({"name": "Mine", "price": 100})),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = api
        .call("DELETE", &format!("/products/{lamp}"), Some(&ann), None)
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (bob, _) = api
        .register_and_login(&format!("bob.{tag}@example.com"))
        .await;
    let (s, _) = api
        .call("GET", &format!("/orders/{order_id}"), Some(&bob), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, bobs) = api.call("GET", "/orders", Some(&bob), None).await;
    assert_eq!((s, bobs["total"].as_i64()), (StatusCode::OK, Some(0)));
    let (s, _) = api
        .call("GET", &format!("/orders/{order_id}"), Some(&admin), None)
        .await;
    assert_eq!(s, StatusCode::OK);

    // Too large.
    let big = "x".repeat(2 * 1024 * 1024);
    let (s, _) = api
        .call(
            "POST",
            "/auth/register",
            None,
            Some(json!({"email": "big@example.com", "password": big, "name": "B"})),
        )
        .await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);

    // Unknown routes and products are 404 problems; what is not an id is 422.
    let (s, _) = api.call("GET", "/nowhere", None, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, p) = api
        .call(
            "GET",
            "/products/0193a5b2-7c3e-7000-8000-00000000abcd",
            None,
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(p["status"], 404);
    let (s, p) = api
        .call("GET", "/products/does-not-exist", None, None)
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(p["errors"][0]["field"], "id");

    // Admin writes still work, then the product is gone.
    let (s, _) = api
        .call(
            "PUT",
            &format!("/products/{lamp}"),
            Some(&admin),
            Some(json!({"name": "Lamp 2", "price": 2600})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = api
        .call("DELETE", &format!("/products/{lamp}"), Some(&admin), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (_, after) = api.call("GET", "/products?limit=5", None, None).await;
    assert_eq!(after["total"], page["total"]);
    let (s, _) = api
        .call("GET", &format!("/products/{lamp}"), None, None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    api.assert_no_5xx();
}

/// 20 users × 10 concurrent buys: every reply is the buyer's own order with
/// exactly the products asked for, and each user ends with exactly 10 orders.
async fn concurrent_buyers(gateway: &str) {
    let api = std::sync::Arc::new(Api::new(gateway));
    let (_, page) = api.call("GET", "/products?limit=24", None, None).await;
    let ids: Vec<String> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_owned())
        .collect();
    assert!(ids.len() >= 20);
    let tag = unique();
    let users = futures::future::join_all((0..20).map(|u| {
        let api = api.clone();
        let tag = tag.clone();
        async move {
            api.register_and_login(&format!("buyer{u}.{tag}@example.com"))
                .await
        }
    }))
    .await;

    let buys = users.iter().enumerate().flat_map(|(u, (token, user_id))| {
        let api = api.clone();
        let ids = ids.clone();
        (0..10).map(move |b| {
            let api = api.clone();
            let wanted: Vec<String> = vec![
                ids[(u + b) % ids.len()].clone(),
                ids[(u * 3 + b * 7 + 1) % ids.len()].clone(),
            ];
            let (token, user_id) = (token.clone(), user_id.clone());
            async move {
                let (s, order) = api
                    .call(
                        "POST",
                        "/products/buy",
                        Some(&token),
                        Some(json!({"ids": wanted})),
                    )
                    .await;
                assert_eq!(s, StatusCode::CREATED, "{order}");
                assert_eq!(
                    order["user_id"],
                    user_id.as_str(),
                    "a buyer got someone else's order"
                );
                let mut got: Vec<String> = order["items"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .flat_map(|i| {
                        std::iter::repeat_n(
                            i["product_id"].as_str().unwrap().to_owned(),
                            i["quantity"].as_u64().unwrap() as usize,
                        )
                    })
                    .collect();
                let mut want = wanted.clone();
                got.sort();
                want.sort();
                assert_eq!(got, want, "the order does not hold the products requested");
            }
        })
    });
    futures::future::join_all(buys).await;

    for (token, user_id) in &users {
        let (s, orders) = api.call("GET", "/orders?limit=50", Some(token), None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(orders["total"], 10);
        assert!(
            orders["items"]
                .as_array()
                .unwrap()
                .iter()
                .all(|o| o["user_id"] == user_id.as_str())
        );
    }
    api.assert_no_5xx();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_walkthrough() {
    let (system, dir) = embedded().await;
    wait_ready(&system.gateway_url).await;
    walkthrough(&system.gateway_url).await;
    system.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_concurrent_buyers_get_their_own_orders() {
    let (system, dir) = embedded().await;
    wait_ready(&system.gateway_url).await;
    concurrent_buyers(&system.gateway_url).await;
    system.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_with_replicas_spreads_requests() {
    let dir = std::env::temp_dir().join(format!("bazaar-test-{}", unique()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let replicas = bazaar::parse_replicas("catalog=3").unwrap();
    let system = bazaar::up(test_config(dir.clone()), &replicas, listener)
        .await
        .unwrap();
    wait_ready(&system.gateway_url).await;
    let http = reqwest::Client::new();
    let mut instances = std::collections::HashSet::new();
    for _ in 0..6 {
        // Past the gateway's cache, or one instance would answer them all.
        let res = http
            .get(format!("{}/api/v1/products?limit=1", system.gateway_url))
            .header("cache-control", "no-cache")
            .send()
            .await
            .unwrap();
        assert!(res.headers().contains_key("x-request-id"));
        instances.insert(res.headers()["x-instance-id"].to_str().unwrap().to_owned());
    }
    assert_eq!(
        instances.len(),
        3,
        "round-robin over three catalog instances: {instances:?}"
    );
    // Three replicas raced to seed: the demo catalog exists once.
    let page: Value = http
        .get(format!("{}/api/v1/products?limit=1", system.gateway_url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["total"], 24);
    system.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

// === serve mode: separate processes on RabbitMQ + PostgreSQL ===

/// A RabbitMQ vhost of the test's own (when `rabbitmqctl` is at hand), so
/// no other run's messages reach its services; deleted on drop.
struct Vhost {
    url: String,
    name: Option<String>,
}

impl Vhost {
    fn new(amqp: &str, name: &str) -> Self {
        let ctl = |args: &[&str]| {
            Command::new("rabbitmqctl")
                .arg("-q")
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if ctl(&["add_vhost", name])
            && ctl(&["set_permissions", "-p", name, "guest", ".*", ".*", ".*"])
        {
            let base = amqp.rsplit_once('/').map_or(amqp, |(b, _)| b);
            Self {
                url: format!("{base}/{name}"),
                name: Some(name.to_owned()),
            }
        } else {
            eprintln!("rabbitmqctl unavailable: the serve-mode test shares the given vhost");
            Self {
                url: amqp.to_owned(),
                name: None,
            }
        }
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        if let Some(name) = &self.name {
            let _ = Command::new("rabbitmqctl")
                .args(["-q", "delete_vhost", name])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

struct Processes(Vec<Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_mode_on_rabbitmq_and_postgres() {
    let Some((amqp, db)) = real_servers() else {
        return;
    };
    let names = bazaar::SERVICES;
    let ports: HashMap<&str, u16> = names.iter().map(|n| (*n, free_port())).collect();
    let prefix = format!("t{}_", unique());
    let vhost = Vhost::new(&amqp, &format!("bazaar-{prefix}"));
    let amqp = vhost.url.clone();
    let mut children = Processes(Vec::new());
    for name in names {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_bazaar"));
        cmd.args(["serve", name, "--port", &ports[name].to_string()])
            .env("BAZAAR_AMQP_URL", &amqp)
            .env("BAZAAR_DATABASE_URL", &db)
            .env("BAZAAR_DATABASE_SCHEMA_PREFIX", &prefix)
            .env("BAZAAR_REGISTRY", "static")
            .env("BAZAAR_ADMIN_EMAIL", ADMIN_EMAIL)
            .env("BAZAAR_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .env("BAZAAR_ARGON2_MEMORY_KIB", "256")
            .env("BAZAAR_ARGON2_ITERATIONS", "1")
            .env("BAZAAR_LOG_FORMAT", "json")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null());
        for other in names {
            cmd.env(
                format!("BAZAAR_SERVICES__{}", other.to_uppercase()),
                format!("http://127.0.0.1:{}", ports[other]),
            );
        }
        children
            .0
            .push(cmd.spawn().expect("cannot start bazaar serve"));
    }
    let gateway = format!("http://127.0.0.1:{}", ports["gateway"]);
    // Every process up (its queues declared) before the walkthrough.
    for name in names {
        wait_ok(&format!("http://127.0.0.1:{}/ready", ports[name])).await;
    }
    wait_ready(&gateway).await;
    walkthrough(&gateway).await;
    concurrent_buyers(&gateway).await;
    profiles_replicate(&gateway).await;

    // Every process still answers /ready against its real dependencies.
    let http = reqwest::Client::new();
    for name in names {
        let res = http
            .get(format!("http://127.0.0.1:{}/ready", ports[name]))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{name} not ready");
    }
    drop(children);

    // Leave PostgreSQL as we found it.
    bazaar_chassis::db::install_drivers();
    let pool = sqlx::AnyPool::connect(&db).await.unwrap();
    for name in bazaar::SERVICES {
        let drop_schema = format!("DROP SCHEMA IF EXISTS \"{prefix}{name}\" CASCADE");
        sqlx::raw_sql(sqlx::AssertSqlSafe(drop_schema))
            .execute(&pool)
            .await
            .unwrap();
    }
}

/// `bazaar dlq` straight against RabbitMQ: a dead letter is listed, then
/// replayed by id into its queue, and the dead-letter queue is empty after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_command_against_rabbitmq() {
    let Some((amqp, _)) = real_servers() else {
        return;
    };
    let vhost = Vhost::new(&amqp, &format!("bazaar-dlq{}", unique()));
    let bus = bazaar_bus::Bus::connect(&vhost.url).await.unwrap();
    let queue = bazaar_contracts::topics::PAYMENTS_QUEUE;
    bus.declare(&bazaar_bus::QueueSpec::new(queue))
        .await
        .unwrap();
    let mut dead = bazaar_bus::Outgoing {
        body: br#"{"not":"an envelope"}"#.to_vec(),
        message_id: Some("dead-1".into()),
        ..Default::default()
    };
    dead.headers
        .insert("x-dead-reason".into(), "failed 5 times".into());
    bus.transport()
        .publish("", &bazaar_bus::dead_letter_queue(queue), dead)
        .await
        .unwrap();
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_bazaar"))
            .arg("dlq")
            .args(args)
            .args(["--amqp", &vhost.url])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let listed: Value = serde_json::from_str(&cli(&["list"])).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["id"], "dead-1");
    assert_eq!(listed[0]["reason"], "failed 5 times");
    // Filters: by reason (any case) and by time; nothing else is chosen.
    let listed: Value = serde_json::from_str(&cli(&["list", "--reason", "5 TIMES"])).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    let listed: Value = serde_json::from_str(&cli(&["list", "--reason", "timeout"])).unwrap();
    assert_eq!(listed, json!([]));
    assert!(
        cli(&["replay", "--all", "--reason", "timeout", "--rate", "10"]).contains("replayed 0")
    );
    assert!(
        cli(&[
            "replay", "--queue", queue, "--all", "--reason", "5 times", "--rate", "10"
        ])
        .contains("replayed 1")
    );
    let back = bus.transport().browse(queue, 10).await.unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].message_id.as_deref(), Some("dead-1"));
    assert!(!back[0].headers.contains_key("x-dead-reason"));
    for d in back {
        d.ack().await.unwrap();
    }
    let listed: Value = serde_json::from_str(&cli(&["list"])).unwrap();
    assert_eq!(listed, json!([]));
}
