//! The order saga end to end, embedded: each path (confirmed, out of
//! stock, declined, timeout), idempotent checkout, contention for the last
//! units, every message delivered twice, and a restart mid-saga.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bazaar_bus::{Envelope, Outgoing, QueueSpec};
use bazaar_contracts::topics;
use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};

use common::*;

struct Shop {
    api: Api,
    admin: String,
}

impl Shop {
    async fn open(gateway: &str) -> Self {
        wait_ready(gateway).await;
        let api = Api::new(gateway);
        let admin = api.login(ADMIN_EMAIL, ADMIN_PASSWORD).await;
        Self { api, admin }
    }

    async fn customer(&self) -> (String, String) {
        self.api
            .register_and_login(&format!("{}@shop.test", unique()))
            .await
    }

    /// A new product with `stock` units.
    async fn product(&self, price: i64, stock: i64) -> String {
        let (s, p) = self
            .api
            .call(
                "POST",
                "/products",
                Some(&self.admin),
                Some(json!({"name": format!("P{}", unique()), "description": "d", "price": price})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{p}");
        let id = p["id"].as_str().unwrap().to_owned();
        let (s, body) = self
            .api
            .call(
                "PUT",
                &format!("/inventory/{id}"),
                Some(&self.admin),
                Some(json!({"available": stock})),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{body}");
        id
    }

    async fn checkout(&self, token: &str, items: Value, key: Option<&str>) -> (StatusCode, Value) {
        let mut req = self
            .api
            .http
            .post(format!("{}/orders", self.api.base))
            .bearer_auth(token)
            .json(&json!({ "items": items }));
        if let Some(k) = key {
            req = req.header("Idempotency-Key", k);
        }
        self.api.send("POST /orders", req).await
    }

    async fn order(&self, token: &str, items: Value) -> String {
        let (s, order) = self.checkout(token, items, None).await;
        assert_eq!(s, StatusCode::CREATED, "{order}");
        assert_eq!(order["status"], "PENDING");
        order["id"].as_str().unwrap().to_owned()
    }

    /// Polls the order until the saga has finished with it.
    async fn settled(&self, token: &str, id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (s, order) = self
                .api
                .call("GET", &format!("/orders/{id}"), Some(token), None)
                .await;
            assert_eq!(s, StatusCode::OK, "{order}");
            if order["status"] != "PENDING" {
                return order;
            }
            assert!(
                Instant::now() < deadline,
                "order {id} still PENDING: {order}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn stock(&self, product: &str) -> (i64, i64) {
        let (s, st) = self
            .api
            .call("GET", &format!("/inventory/{product}"), None, None)
            .await;
        assert_eq!(s, StatusCode::OK, "{st}");
        (
            st["available"].as_i64().unwrap(),
            st["reserved"].as_i64().unwrap(),
        )
    }

    /// Waits for stock to reach `want` (the last saga step lands after the
    /// order's final status).
    async fn stock_becomes(&self, product: &str, want: (i64, i64)) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let now = self.stock(product).await;
            if now == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "stock of {product} is {now:?}, want {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn payment(&self, token: &str, order: &str) -> (StatusCode, Value) {
        self.api
            .call("GET", &format!("/payments/{order}"), Some(token), None)
            .await
    }

    async fn notifications(&self, token: &str, want: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let (s, page) = self
                .api
                .call("GET", "/notifications", Some(token), None)
                .await;
            assert_eq!(s, StatusCode::OK, "{page}");
            let items = page["items"].as_array().unwrap().clone();
            if items.len() >= want {
                return items;
            }
            assert!(Instant::now() < deadline, "notifications: {items:?}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

fn line(product: &str, quantity: i64) -> Value {
    json!([{ "product_id": product, "quantity": quantity }])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_saga_path_and_idempotent_checkout() {
    let (system, dir) = embedded_with(|c| c.payments_decline_above = Some(50_000)).await;
    let shop = Shop::open(&system.gateway_url).await;
    let (alice, _) = shop.customer().await;

    // Confirmed: stock leaves `available`, nothing stays reserved, one charge.
    // The trace context and request id of the checkout ride the saga's messages.
    let cheap = shop.product(1_250, 10).await;
    // The saga's first message: inventory holds the units on it.
    let tap = QueueSpec::new(format!("tap.created.{}", unique()))
        .bind(topics::ORDER, topics::ORDER_CREATED)
        .expires_after(Duration::from_secs(60));
    let mut reserves = system.bus.subscribe(&tap, 10).await.unwrap();
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let res = shop
        .api
        .http
        .post(format!("{}/orders", shop.api.base))
        .bearer_auth(&alice)
        .header("traceparent", traceparent)
        .header("x-request-id", "req-saga-1")
        .json(&json!({ "items": line(&cheap, 3) }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let order: Value = res.json().await.unwrap();
    let id = order["id"].as_str().unwrap().to_owned();
    let reserve = tokio::time::timeout(Duration::from_secs(5), reserves.next())
        .await
        .unwrap()
        .unwrap();
    // The client's trace: the gateway's call to orders has a span id of
    // its own, and the event carries that trace on.
    let carried = reserve.headers.get("traceparent").unwrap();
    assert!(
        carried.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-")
            && bazaar_chassis::http::valid_traceparent(carried),
        "{carried}"
    );
    assert_eq!(
        reserve.headers.get("x-request-id").map(String::as_str),
        Some("req-saga-1")
    );
    let env = reserve.envelope().unwrap();
    assert_eq!(env.correlation_id.as_deref(), Some(id.as_str()));
    reserve.ack().await.unwrap();
    let order = shop.settled(&alice, &id).await;
    assert_eq!(order["status"], "CONFIRMED", "{order}");
    assert_eq!(order["cancel_reason"], Value::Null);
    assert_eq!(order["total"], 3_750);
    shop.stock_becomes(&cheap, (7, 0)).await;
    let (s, pay) = shop.payment(&alice, &id).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        pay,
        json!({"order_id": id, "amount": 3_750, "currency": "USD", "status": "CHARGED"})
    );

    // Out of stock: cancelled, nothing held, nothing charged.
    let scarce = shop.product(500, 1).await;
    let id = shop.order(&alice, line(&scarce, 2)).await;
    let order = shop.settled(&alice, &id).await;
    assert_eq!(order["status"], "CANCELLED");
    assert_eq!(order["cancel_reason"], "out_of_stock");
    shop.stock_becomes(&scarce, (1, 0)).await;
    assert_eq!(shop.payment(&alice, &id).await.0, StatusCode::NOT_FOUND);

    // All or nothing: one short line rejects the whole order and the
    // lines that fit are given back.
    let id = shop
        .order(
            &alice,
            json!([{"product_id": cheap, "quantity": 1}, {"product_id": scarce, "quantity": 5}]),
        )
        .await;
    assert_eq!(
        shop.settled(&alice, &id).await["cancel_reason"],
        "out_of_stock"
    );
    shop.stock_becomes(&cheap, (7, 0)).await;
    shop.stock_becomes(&scarce, (1, 0)).await;

    // Declined: cancelled and the reserved stock released.
    let dear = shop.product(60_000, 4).await;
    let id = shop.order(&alice, line(&dear, 1)).await;
    let order = shop.settled(&alice, &id).await;
    assert_eq!(order["status"], "CANCELLED");
    assert_eq!(order["cancel_reason"], "payment_declined");
    shop.stock_becomes(&dear, (4, 0)).await;
    assert_eq!(shop.payment(&alice, &id).await.1["status"], "DECLINED");

    // Idempotency-Key: the same key from the same user is the same order.
    let (s, first) = shop.checkout(&alice, line(&cheap, 1), Some("key-1")).await;
    assert_eq!(s, StatusCode::CREATED, "{first}");
    let (s, again) = shop.checkout(&alice, line(&cheap, 1), Some("key-1")).await;
    assert_eq!(s, StatusCode::OK, "{again}");
    assert_eq!(again["id"], first["id"]);
    let (bob, _) = shop.customer().await;
    let (s, bobs) = shop.checkout(&bob, line(&cheap, 1), Some("key-1")).await;
    assert_eq!(
        s,
        StatusCode::CREATED,
        "another user's key is another order"
    );
    assert_ne!(bobs["id"], first["id"]);
    for (token, order) in [(&alice, &first), (&bob, &bobs)] {
        let id = order["id"].as_str().unwrap();
        assert_eq!(shop.settled(token, id).await["status"], "CONFIRMED");
    }
    shop.stock_becomes(&cheap, (5, 0)).await;
    // Someone else's payment is not found.
    assert_eq!(
        shop.payment(&bob, first["id"].as_str().unwrap()).await.0,
        StatusCode::NOT_FOUND
    );

    // POST /products/buy runs the same saga.
    let (s, bought) = shop
        .api
        .call(
            "POST",
            "/products/buy",
            Some(&bob),
            Some(json!({"ids": [cheap, cheap]})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{bought}");
    let order = shop.settled(&bob, bought["id"].as_str().unwrap()).await;
    assert_eq!(order["status"], "CONFIRMED");
    shop.stock_becomes(&cheap, (3, 0)).await;

    // Bad checkouts are refused before anything is stored.
    let bad = [
        (json!([]), StatusCode::UNPROCESSABLE_ENTITY),
        (line(&cheap, 0), StatusCode::UNPROCESSABLE_ENTITY),
        (line(&cheap, -1), StatusCode::UNPROCESSABLE_ENTITY),
        (line("no-such-product", 1), StatusCode::UNPROCESSABLE_ENTITY),
    ];
    for (items, want) in bad {
        let (s, body) = shop.checkout(&alice, items.clone(), None).await;
        assert_eq!(s, want, "{items} → {body}");
    }
    let (s, body) = shop
        .checkout(&alice, line(&cheap, 1), Some("bad key with spaces"))
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let raw = shop
        .api
        .http
        .post(format!("{}/orders", shop.api.base))
        .bearer_auth(&alice)
        .header("content-type", "application/json")
        .body("{\"items\": [")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), StatusCode::BAD_REQUEST);
    let (s, _) = shop
        .api
        .call("POST", "/orders", None, Some(json!({"items": []})))
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    shop.stock_becomes(&cheap, (3, 0)).await;

    // Notifications: a welcome, then one per order outcome, newest first.
    let notes = shop.notifications(&alice, 6).await;
    let kinds: Vec<&str> = notes.iter().map(|n| n["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds.last(), Some(&"user.registered"), "{kinds:?}");
    assert_eq!(
        kinds.iter().filter(|k| **k == "order.confirmed").count(),
        2,
        "{kinds:?}"
    );
    assert_eq!(
        kinds.iter().filter(|k| **k == "order.cancelled").count(),
        3,
        "{kinds:?}"
    );

    // The saga's metrics agree (other shoppers' orders included): every
    // saga started ended, confirmed or cancelled for its reason, and was
    // timed from checkout to outcome.
    let metrics = reqwest::get(format!("{}/metrics", address_of(&system, "orders").await))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let sum = |family: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(&format!("{family}{{")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let started = sum("saga_started_total");
    assert!(started >= 5.0, "{metrics}");
    assert!(sum("saga_confirmed_total") >= 2.0, "{metrics}");
    assert_eq!(
        sum("saga_confirmed_total") + sum("saga_cancelled_total"),
        started,
        "{metrics}"
    );
    assert_eq!(sum("saga_duration_seconds_count"), started, "{metrics}");
    for reason in ["out_of_stock", "payment_declined"] {
        assert!(
            metrics.contains(&format!(
                "saga_cancelled_total{{service=\"orders\",reason=\"{reason}\"}}"
            )),
            "{reason}: {metrics}"
        );
    }
    assert!(sum("bus_consumed_total") > 0.0, "{metrics}");

    shop.api.assert_no_5xx();
    system.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_buyers_for_five_units() {
    let (system, dir) = embedded().await;
    let shop = Arc::new(Shop::open(&system.gateway_url).await);
    let product = shop.product(999, 5).await;
    let mut buyers = Vec::new();
    for _ in 0..10 {
        buyers.push(shop.customer().await.0);
    }
    let placed = futures::future::join_all(buyers.iter().map(|token| {
        let shop = Arc::clone(&shop);
        let product = product.clone();
        async move { (token.clone(), shop.order(token, line(&product, 1)).await) }
    }))
    .await;
    let mut outcomes: HashMap<String, usize> = HashMap::new();
    let mut charged = 0;
    for (token, id) in &placed {
        let order = shop.settled(token, id).await;
        let outcome = format!("{}/{}", order["status"], order["cancel_reason"]);
        *outcomes.entry(outcome).or_default() += 1;
        let (s, pay) = shop.payment(token, id).await;
        if s == StatusCode::OK && pay["status"] == "CHARGED" {
            charged += 1;
        }
    }
    assert_eq!(outcomes.get("\"CONFIRMED\"/null"), Some(&5), "{outcomes:?}");
    assert_eq!(
        outcomes.get("\"CANCELLED\"/\"out_of_stock\""),
        Some(&5),
        "{outcomes:?}"
    );
    assert_eq!(charged, 5);
    shop.stock_becomes(&product, (0, 0)).await;
    shop.api.assert_no_5xx();
    system.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_step_times_out_and_is_compensated() {
    // The provider fails every charge: retries run out, the charge is
    // dead-lettered, and the step's deadline cancels the order.
    let (system, dir) = embedded_with(|c| {
        c.payments_failure_rate = 1.0;
        c.saga_step_timeout_ms = 1_500;
        c.retry_first_delay_ms = 50;
        c.retry_attempts = 3;
    })
    .await;
    let shop = Shop::open(&system.gateway_url).await;
    let (alice, _) = shop.customer().await;
    let product = shop.product(700, 3).await;
    let id = shop.order(&alice, line(&product, 2)).await;
    let order = shop.settled(&alice, &id).await;
    assert_eq!(order["status"], "CANCELLED");
    assert_eq!(order["cancel_reason"], "timeout");
    // The reservation is released and nothing can be charged any more.
    shop.stock_becomes(&product, (3, 0)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (s, pay) = shop.payment(&alice, &id).await;
        if s == StatusCode::OK {
            assert_eq!(pay["status"], "VOIDED", "{pay}");
            assert_eq!(pay["amount"], 0);
            break;
        }
        assert!(Instant::now() < deadline, "no voided payment");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The charge that kept failing waits in the dead-letter queue.
    let letters = system
        .bus
        .dead_letters(topics::PAYMENTS_QUEUE)
        .await
        .unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert!(
        letters[0]
            .reason
            .as_deref()
            .unwrap()
            .contains("failed 3 times")
    );
    assert!(letters[0].body.contains(&id));
    // Operators see it through the gateway (admins only) and with `bazaar dlq`.
    let (s, _) = shop
        .api
        .call("GET", "/admin/dead-letters", Some(&alice), None)
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, listed) = shop
        .api
        .call(
            "GET",
            "/admin/dead-letters?queue=payments.commands",
            Some(&shop.admin),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{listed}");
    assert_eq!(listed[0]["id"].as_str(), letters[0].id.as_deref());
    // Filtered by reason and time; bad filters are refused with the reason.
    let reason: String = letters[0]
        .reason
        .as_deref()
        .unwrap()
        .chars()
        .take(6)
        .collect::<String>()
        .to_uppercase();
    for (query, n) in [
        (format!("reason={}", reason.replace(' ', "%20")), 1),
        ("reason=no-such-reason".to_owned(), 0),
        ("since=2999-01-01T00:00:00Z".to_owned(), 0),
        ("since=2000-01-01T00:00:00Z".to_owned(), 1),
    ] {
        let (s, listed) = shop
            .api
            .call(
                "GET",
                &format!("/admin/dead-letters?queue=payments.commands&{query}"),
                Some(&shop.admin),
                None,
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{query}: {listed}");
        assert_eq!(listed.as_array().unwrap().len(), n, "{query}: {listed}");
    }
    for bad in [
        json!({"all": true, "since": "yesterday"}),
        json!({"all": true, "rate": 5000}),
        json!({"all": true, "reason": ""}),
    ] {
        let (s, body) = shop
            .api
            .call(
                "POST",
                "/admin/dead-letters/replay",
                Some(&shop.admin),
                Some(bad.clone()),
            )
            .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {body}");
    }
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_bazaar"))
            .args(["dlq"])
            .args(args)
            .args(["--gateway", &system.gateway_url])
            .env("BAZAAR_ADMIN_EMAIL", ADMIN_EMAIL)
            .env("BAZAAR_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .env_remove("BAZAAR_AMQP_URL")
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
    // A replay finds the order voided and charges nothing.
    let id_arg = letters[0].id.clone().unwrap();
    assert!(cli(&["replay", "--id", &id_arg]).contains("replayed 1"));
    // The replay is on the dashboard's record: who, which, how many.
    let replays: Value = reqwest::Client::new()
        .get(format!("{}/_dashboard/api/replays", system.gateway_url))
        .bearer_auth(&shop.admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(replays[0]["by"], ADMIN_EMAIL, "{replays}");
    assert_eq!(
        replays[0]["id"].as_str(),
        Some(id_arg.as_str()),
        "{replays}"
    );
    assert_eq!(replays[0]["replayed"], 1, "{replays}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(shop.payment(&alice, &id).await.1["status"], "VOIDED");
    assert!(
        system
            .bus
            .dead_letters(topics::PAYMENTS_QUEUE)
            .await
            .unwrap()
            .is_empty()
    );
    let (s, body) = shop
        .api
        .call(
            "POST",
            "/admin/dead-letters/replay",
            Some(&shop.admin),
            Some(json!({"all": true})),
        )
        .await;
    assert_eq!((s, body), (StatusCode::OK, json!({"replayed": 0})));
    shop.api.assert_no_5xx();
    system.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

/// Copies every message on `exchange` back onto it twice: once as it was
/// (the same id: the inbox must drop it) and once as a new message with
/// the same content (a new id: the step must be idempotent by order id).
async fn duplicate_everything(bus: bazaar_bus::Bus, exchange: &'static str, fresh_copy: bool) {
    let spec = QueueSpec::new(format!("tap.{exchange}.{}", unique()))
        .bind(exchange, "#")
        .expires_after(Duration::from_secs(60));
    let mut deliveries = bus.subscribe(&spec, 64).await.unwrap();
    tokio::spawn(async move {
        while let Some(d) = deliveries.next().await {
            let copied = d.headers.contains_key("x-test-copy");
            let env: Envelope = d.envelope().unwrap();
            let key = d.routing_key.clone();
            d.ack().await.unwrap();
            if copied {
                continue;
            }
            let copy = |env: &Envelope| {
                let mut msg = Outgoing::envelope(env).unwrap();
                msg.headers.insert("x-test-copy".into(), "1".into());
                msg
            };
            bus.transport()
                .publish(exchange, &key, copy(&env))
                .await
                .unwrap();
            if fresh_copy {
                let mut fresh = env.clone();
                fresh.id = uuid::Uuid::now_v7().to_string();
                bus.transport()
                    .publish(exchange, &key, copy(&fresh))
                    .await
                    .unwrap();
            }
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_delivered_twice_changes_nothing() {
    let (system, dir) = embedded_with(|c| c.payments_decline_above = Some(5_000)).await;
    for exchange in [topics::INVENTORY, topics::PAYMENT, topics::ORDER] {
        duplicate_everything(system.bus.clone(), exchange, true).await;
    }
    // Commands too; `orders.create` only with its own id, since a new id
    // is a new request.
    duplicate_everything(system.bus.clone(), topics::COMMAND_EXCHANGE, false).await;
    let shop = Shop::open(&system.gateway_url).await;
    let (alice, _) = shop.customer().await;
    let cheap = shop.product(1_000, 6).await;
    let dear = shop.product(9_000, 6).await;
    let mut ids = Vec::new();
    for (product, qty) in [(&cheap, 2), (&cheap, 2), (&dear, 1), (&cheap, 5)] {
        ids.push(shop.order(&alice, line(product, qty)).await);
    }
    let mut outcomes = Vec::new();
    for id in &ids {
        let o = shop.settled(&alice, id).await;
        outcomes.push(format!("{}/{}", o["status"], o["cancel_reason"]));
    }
    assert_eq!(
        outcomes,
        [
            "\"CONFIRMED\"/null",
            "\"CONFIRMED\"/null",
            "\"CANCELLED\"/\"payment_declined\"",
            "\"CANCELLED\"/\"out_of_stock\"",
        ]
    );
    // Let the duplicates drain, then: each unit counted once, one payment each.
    tokio::time::sleep(Duration::from_millis(500)).await;
    shop.stock_becomes(&cheap, (2, 0)).await;
    shop.stock_becomes(&dear, (6, 0)).await;
    for (id, want) in ids.iter().zip([Some(2_000), Some(2_000), None, None]) {
        let (s, pay) = shop.payment(&alice, id).await;
        match want {
            Some(amount) => {
                assert_eq!(pay["status"], "CHARGED", "{pay}");
                assert_eq!(pay["amount"], amount);
            }
            None => assert!(
                s == StatusCode::NOT_FOUND || pay["status"] == "DECLINED",
                "{pay}"
            ),
        }
    }
    // One notification per outcome, not two.
    let notes = shop.notifications(&alice, 5).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let again = shop.notifications(&alice, 5).await;
    assert_eq!(notes.len(), 5, "{notes:?}");
    assert_eq!(again.len(), 5);
    shop.api.assert_no_5xx();
    system.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_mid_saga_resumes_every_order() {
    // Slow payments, so the system stops while sagas are in flight. The
    // in-memory bus dies with the process: whatever was in it is gone, and
    // the restarted orders service must pick the sagas up from its database.
    let (system, dir) = embedded_with(|c| c.payments_latency_ms = 150).await;
    let shop = Shop::open(&system.gateway_url).await;
    let (alice, _) = shop.customer().await;
    let product = shop.product(100, 50).await;
    let mut ids = Vec::new();
    for _ in 0..8 {
        ids.push(shop.order(&alice, line(&product, 1)).await);
    }
    let (_, page) = shop.api.call("GET", "/orders", Some(&alice), None).await;
    let pending = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["status"] == "PENDING")
        .count();
    assert!(pending > 0, "the restart should interrupt sagas: {page}");
    system.stop().await.unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let system = bazaar::up(test_config(dir.clone()), &HashMap::new(), listener)
        .await
        .unwrap();
    let shop = Shop::open(&system.gateway_url).await;
    let alice = shop
        .api
        .login(&shop_email(&shop, &alice).await, "password1")
        .await;
    for id in &ids {
        assert_eq!(shop.settled(&alice, id).await["status"], "CONFIRMED");
        assert_eq!(shop.payment(&alice, id).await.1["status"], "CHARGED");
    }
    shop.stock_becomes(&product, (42, 0)).await;
    shop.api.assert_no_5xx();
    system.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

/// The email behind a token (tokens outlive a restart, but log in afresh).
async fn shop_email(shop: &Shop, token: &str) -> String {
    let (s, me) = shop.api.call("GET", "/auth/me", Some(token), None).await;
    assert_eq!(s, StatusCode::OK, "{me}");
    me["email"].as_str().unwrap().to_owned()
}
