//! The users service through the gateway: profiles made from
//! registrations, changes replicated to orders and notifications, the
//! rights on profiles, deletion taking the account, and ids that cannot
//! steer a call to another service.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::*;
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_replicate_to_orders_and_notifications_embedded() {
    let (system, _dir) = embedded().await;
    wait_ready(&system.gateway_url).await;
    profiles_replicate(&system.gateway_url).await;
    system.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_are_the_owners_and_admins_and_deleting_one_closes_the_account() {
    let (system, _dir) = embedded().await;
    let gw = &system.gateway_url;
    wait_ready(gw).await;
    let api = Api::new(gw);
    let alice_email = format!("alice-{}@x.io", unique());
    let (alice, alice_id) = api.register_and_login(&alice_email).await;
    let bob_email = format!("bob-{}@x.io", unique());
    let (bob, bob_id) = api.register_and_login(&bob_email).await;
    let admin = api.login(ADMIN_EMAIL, ADMIN_PASSWORD).await;
    eventually(&api, "/users/me", &alice, |_| true).await;
    eventually(&api, "/users/me", &bob, |_| true).await;

    // No token, someone else's profile, bad input.
    let (s, _) = api.call("GET", "/users/me", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = api
        .call("GET", &format!("/users/{alice_id}"), Some(&bob), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = api
        .call("DELETE", &format!("/users/{alice_id}"), Some(&bob), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = api
        .call(
            "GET",
            &format!("/users/{alice_id}/orders"),
            Some(&bob),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, p) = api
        .call(
            "PATCH",
            "/users/me",
            Some(&alice),
            Some(json!({"phone": "call me"})),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{p}");
    assert_eq!(p["errors"][0]["field"], "phone");
    let (s, _) = api
        .call(
            "PATCH",
            "/users/me",
            Some(&alice),
            Some(json!({"role": "admin"})),
        )
        .await;
    assert!(s.is_client_error(), "unknown fields are refused: {s}");
    let res = api
        .http
        .patch(format!("{}/users/me", api.base))
        .bearer_auth(&alice)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);

    // The admin sees anyone.
    let (s, p) = api
        .call("GET", &format!("/users/{alice_id}"), Some(&admin), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{p}");
    assert_eq!(p["email"], alice_email.as_str());

    // Ids that would steer the call to another resource are refused
    // before any call is made.
    for bad in [
        "..%2Fhealth".to_owned(),
        "%2e%2e".to_owned(),
        "x%3Fa=1".to_owned(),
        format!("{alice_id}%3Fx=1"),
    ] {
        for path in [format!("/users/{bad}/orders"), format!("/users/{bad}")] {
            let s = raw_status(gw, "GET", &format!("/api/v1{path}"), &admin).await;
            assert_eq!(s, 422, "{path}");
        }
    }
    // Every proxied route whose path carries an id: the id reaches its
    // service as one segment, and is refused there.
    for route in ["orders", "products", "inventory", "payments", "users"] {
        for bad in [
            "..%2Fhealth",
            "%2e%2e",
            "x%3Fa=1",
            "%2E%2E%2F%2E%2E%2Fhealth",
        ] {
            let s = raw_status(gw, "GET", &format!("/api/v1/{route}/{bad}"), &admin).await;
            assert_eq!(s, 422, "/api/v1/{route}/{bad}");
        }
    }
    // A path that resolves elsewhere once `..` is applied reaches no
    // service as such: the gateway refuses or routes it as written.
    let s = raw_status(gw, "GET", "/api/v1/users/../health", &admin).await;
    assert!(s == 400 || s == 404, "{s}");
    for bad in ["../health", "%2e%2e", &format!("{alice_id}?x=1")] {
        let (s, p) = api
            .call(
                "POST",
                "/orders",
                Some(&bob),
                Some(json!({"items": [{"product_id": bad, "quantity": 1}]})),
            )
            .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {p}");
    }

    // Bob deletes himself: the profile goes, then the account.
    let (s, _) = api
        .call("DELETE", &format!("/users/{bob_id}"), Some(&bob), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = api.call("GET", "/users/me", Some(&bob), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    wait_account_gone(&api, &bob_email, "password1").await;
    // The admin deletes Alice.
    let (s, _) = api
        .call("DELETE", &format!("/users/{alice_id}"), Some(&admin), None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    api.assert_no_5xx();
    system.stop().await.unwrap();
}

/// A stand-in orders service on a fixed port: it answers, or hangs
/// while `hang` is set (switched in place: connections a client keeps
/// open see it too), and can be stopped (connections closed, the port
/// refusing) and started again on the same port.
struct StubOrders {
    port: u16,
    hang: Arc<AtomicBool>,
    running: Option<(
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    )>,
}

impl StubOrders {
    async fn start(port: u16) -> Self {
        let mut stub = Self {
            port,
            hang: Arc::new(AtomicBool::new(false)),
            running: None,
        };
        stub.resume().await;
        stub
    }

    async fn resume(&mut self) {
        use axum::routing::get;
        let hang = self.hang.clone();
        let app = axum::Router::new()
            .route("/health", get(|| async { "ok" }))
            .route(
                "/orders",
                get(move || async move {
                    if hang.load(Ordering::SeqCst) {
                        tokio::time::sleep(std::time::Duration::from_secs(30)).await;
                    }
                    axum::Json(json!({"items": [], "total": 0, "limit": 50, "offset": 0}))
                }),
            );
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await;
        });
        self.running = Some((stop, task));
    }

    async fn stop(&mut self) {
        if let Some((stop, task)) = self.running.take() {
            let _ = stop.send(());
            task.await.unwrap();
        }
    }
}

/// The seed's breaker scenario: users calls orders through the mesh
/// client. Orders stopped → 503 ("unreachable"), and after three
/// failures in a row the breaker opens: 503 "circuit open" at once (the
/// median of five such answers within 50 ms); orders back → after the
/// open time one probe closes the breaker and 200s return. Orders slow
/// past the timeout → 504. `/metrics` shows the breaker's state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_down_or_slow_is_503_or_504_fast_and_the_breaker_recovers() {
    use std::time::{Duration, Instant};
    let (system, dir) = embedded().await;
    wait_ready(&system.gateway_url).await;
    let api = Api::new(&system.gateway_url);
    let (token, id) = api
        .register_and_login(&format!("breaker-{}@x.io", unique()))
        .await;
    let auth = address_of(&system, "auth").await;

    let port = free_port();
    let mut orders = StubOrders::start(port).await;
    let mut config = test_config(dir.join("users-alone"));
    config.registry = "static".into();
    config.services = [
        ("auth".to_owned(), auth),
        ("orders".to_owned(), format!("http://127.0.0.1:{port}")),
    ]
    .into();
    config.calls.timeout_ms = 400;
    config.calls.breaker_open_ms = 1500;
    // Only the calls' outcomes move the breaker in this test.
    config.calls.health_interval_ms = 600_000;
    let users = bazaar::serve(config, "users").await.unwrap();
    let base = users.gateway_url.clone();
    wait_ok(&format!("{base}/health")).await;
    let http = reqwest::Client::new();
    let call = || async {
        let started = Instant::now();
        let res = http
            .get(format!("{base}/users/{id}/orders"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        let status = res.status();
        let body: serde_json::Value = res.json().await.unwrap();
        (status, body, started.elapsed())
    };
    let (s, body, _) = call().await;
    assert_eq!(s, StatusCode::OK, "{body}");

    // Stopped: 503 while the breaker counts, then the breaker opens.
    orders.stop().await;
    let mut unreachable = 0;
    loop {
        let (s, body, _) = call().await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        if body["detail"] == "orders is unavailable (circuit open)" {
            break;
        }
        assert_eq!(body["detail"], "orders is unreachable");
        unreachable += 1;
        assert!(unreachable <= 3, "3 failures in a row open the breaker");
    }
    let mut took = Vec::new();
    for _ in 0..5 {
        let (s, body, t) = call().await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["detail"], "orders is unavailable (circuit open)");
        took.push(t);
    }
    took.sort();
    eprintln!("breaker open: 503 in {took:?}");
    assert!(
        took[2] < Duration::from_millis(50),
        "the open breaker answered in {took:?}"
    );
    let scraped = metrics(&base).await;
    assert!(
        scraped.lines().any(|l| l.starts_with("mesh_breaker_state{")
            && l.contains("target=\"orders\"")
            && l.ends_with(" 2")),
        "{scraped}"
    );

    // Orders back: once the open time is up, the probe closes it.
    orders.resume().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (s, _, _) = call().await;
        if s == StatusCode::OK {
            break;
        }
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
        assert!(Instant::now() < deadline, "the breaker never closed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (s, _, _) = call().await;
    assert_eq!(s, StatusCode::OK);

    // Slow past the timeout: 504, and the breaker counts it.
    orders.hang.store(true, Ordering::SeqCst);
    let (s, body, took) = call().await;
    assert_eq!(s, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert_eq!(body["detail"], "orders did not answer in time");
    assert!(took >= Duration::from_millis(400), "{took:?}");
    let scraped = metrics(&base).await;
    assert!(
        scraped.lines().any(|l| l.starts_with("mesh_calls_total{")
            && l.contains("outcome=\"timeout\"")
            && l.contains("target=\"orders\"")),
        "{scraped}"
    );
    orders.hang.store(false, Ordering::SeqCst);
    users.stop().await.unwrap();
    system.stop().await.unwrap();
}
