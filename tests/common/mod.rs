//! Helpers the whole-system tests share: a recording API client, the test
//! config, an embedded system, waiting for readiness.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bazaar_chassis::Config;
use reqwest::StatusCode;
use serde_json::{Value, json};

pub const ADMIN_EMAIL: &str = "admin@test.local";
pub const ADMIN_PASSWORD: &str = "admin-password";

pub fn unique() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{nanos:x}{:x}", std::process::id())
}

pub fn test_config(data_dir: PathBuf) -> Config {
    Config {
        data_dir,
        admin_email: Some(ADMIN_EMAIL.into()),
        admin_password: Some(ADMIN_PASSWORD.into()),
        // Cheap hashing: the tests log many users in.
        argon2_memory_kib: 256,
        argon2_iterations: 1,
        ..Config::default()
    }
}

/// A client that remembers every status it saw, so a test can assert no 5xx.
pub struct Api {
    pub base: String,
    pub http: reqwest::Client,
    statuses: std::sync::Mutex<Vec<(String, u16)>>,
}

impl Api {
    pub fn new(gateway: &str) -> Self {
        Self {
            base: format!("{gateway}/api/v1"),
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(64)
                .build()
                .unwrap(),
            statuses: Default::default(),
        }
    }

    pub async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self
            .http
            .request(method.parse().unwrap(), format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        self.send(&format!("{method} {path}"), req).await
    }

    pub async fn send(&self, what: &str, req: reqwest::RequestBuilder) -> (StatusCode, Value) {
        let res = req.send().await.unwrap();
        let status = res.status();
        let text = res.text().await.unwrap();
        self.statuses
            .lock()
            .unwrap()
            .push((what.to_owned(), status.as_u16()));
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub fn assert_no_5xx(&self) {
        let bad: Vec<_> = self
            .statuses
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, s)| *s >= 500)
            .cloned()
            .collect();
        assert!(bad.is_empty(), "server errors: {bad:?}");
    }

    pub async fn register_and_login(&self, email: &str) -> (String, String) {
        let (s, user) = self
            .call(
                "POST",
                "/auth/register",
                None,
                Some(json!({"email": email, "password": "password1", "name": "Shopper"})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{user}");
        (
            self.login(email, "password1").await,
            user["id"].as_str().unwrap().to_owned(),
        )
    }

    pub async fn login(&self, email: &str, password: &str) -> String {
        let (s, t) = self
            .call(
                "POST",
                "/auth/login",
                None,
                Some(json!({"email": email, "password": password})),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{t}");
        assert_eq!(t["token_type"], "Bearer");
        t["access_token"].as_str().unwrap().to_owned()
    }
}

/// Waits until the gateway lists products (every service up).
pub async fn wait_ready(gateway: &str) {
    wait_ok(&format!("{gateway}/api/v1/products?limit=1")).await;
}

/// Waits (up to a minute) until `url` answers with a success status.
pub async fn wait_ok(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let http = reqwest::Client::new();
    while !http
        .get(url)
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(Instant::now() < deadline, "nothing came up at {url}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn embedded() -> (bazaar::System, PathBuf) {
    embedded_with(|_| {}).await
}

/// An embedded system on a fresh data dir, with `tweak` applied to the test config.
pub async fn embedded_with(tweak: impl FnOnce(&mut Config)) -> (bazaar::System, PathBuf) {
    let dir = std::env::temp_dir().join(format!("bazaar-test-{}", unique()));
    let mut config = test_config(dir.clone());
    tweak(&mut config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let system = bazaar::up(config, &HashMap::new(), listener).await.unwrap();
    (system, dir)
}

/// The RabbitMQ and PostgreSQL URLs of the real-server tests, or `None`
/// (they skip) when unset; with `CI=true` a missing one is a failure.
pub fn real_servers() -> Option<(String, String)> {
    match (
        std::env::var("BAZAAR_TEST_AMQP_URL"),
        std::env::var("BAZAAR_TEST_DATABASE_URL"),
    ) {
        (Ok(a), Ok(d)) => Some((a, d)),
        _ => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true requires BAZAAR_TEST_AMQP_URL and BAZAAR_TEST_DATABASE_URL"
            );
            eprintln!(
                "skipping serve-mode test: BAZAAR_TEST_AMQP_URL / BAZAAR_TEST_DATABASE_URL not set"
            );
            None
        }
    }
}

/// A loopback port free at the moment of asking.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `path` as `token` until `done` holds for its 200 answer (up to
/// 30 s); returns that answer.
pub async fn eventually(
    api: &Api,
    path: &str,
    token: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (s, v) = api.call("GET", path, Some(token), None).await;
        if s == StatusCode::OK && done(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "GET {path} never got there: {s} {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Profile replication through the gateway: a registration makes a
/// profile; `PATCH /users/me` changes it, and the order view and the next
/// notification show the new name with no call to users (their replicas
/// are fed by `user.profile.updated`).
pub async fn profiles_replicate(gateway: &str) {
    let api = Api::new(gateway);
    let email = format!("replica-{}@x.io", unique());
    let (token, id) = api.register_and_login(&email).await;
    let me = eventually(&api, "/users/me", &token, |p| p["id"] == id.as_str()).await;
    assert_eq!(me["email"], email.as_str());
    assert_eq!(me["name"], "Shopper");
    assert!(me["phone"].is_null());

    let (s, p) = api
        .call(
            "PATCH",
            "/users/me",
            Some(&token),
            Some(json!({"name": "Renamed Shopper", "phone": "+1 555 0100", "address": "1 Market St"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{p}");
    assert_eq!(p["name"], "Renamed Shopper");
    assert_eq!(p["phone"], "+1 555 0100");
    assert!(p["updated_at"].as_str() > me["updated_at"].as_str());

    // An order after the change: its view and its notification use the
    // replicas' name.
    let (_, products) = api.call("GET", "/products?limit=1", None, None).await;
    let product = products["items"][0]["id"].as_str().unwrap().to_owned();
    let (s, order) = api
        .call(
            "POST",
            "/orders",
            Some(&token),
            Some(json!({"items": [{"product_id": product, "quantity": 1}]})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{order}");
    let order_id = order["id"].as_str().unwrap().to_owned();
    let seen = eventually(&api, &format!("/orders/{order_id}"), &token, |o| {
        o["status"] != "PENDING" && o["user_name"] == "Renamed Shopper"
    })
    .await;
    assert_eq!(seen["user_id"], id.as_str());
    let notes = eventually(&api, "/notifications", &token, |n| {
        n["items"].as_array().is_some_and(|items| {
            items
                .iter()
                .any(|i| i["subject"].as_str().is_some_and(|s| s.contains(&order_id)))
        })
    })
    .await;
    let note = notes["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["subject"].as_str().unwrap().contains(&order_id))
        .unwrap();
    assert!(
        note["body"]
            .as_str()
            .unwrap()
            .starts_with("Hello Renamed Shopper,"),
        "{note}"
    );

    // The user's orders, through users → orders.
    let (s, page) = api
        .call("GET", &format!("/users/{id}/orders"), Some(&token), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{page}");
    assert_eq!(page["items"][0]["id"], order_id.as_str());
    api.assert_no_5xx();
}

/// The status of `method path` sent byte for byte, as a hostile client
/// would: HTTP clients resolve `%2e%2e` segments before sending.
pub async fn raw_status(base: &str, method: &str, path: &str, token: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let authority = base.trim_start_matches("http://");
    let mut tcp = tokio::net::TcpStream::connect(authority).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: {authority}\r\nauthorization: Bearer {token}\r\nconnection: close\r\n\r\n"
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut head = [0u8; 12];
    tcp.read_exact(&mut head).await.unwrap();
    std::str::from_utf8(&head[9..12]).unwrap().parse().unwrap()
}

/// Waits (up to 30 s) until `email` can no longer log in: its account was
/// deleted through the `user.profile.deleted` event.
pub async fn wait_account_gone(api: &Api, email: &str, password: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (s, _) = api
            .call(
                "POST",
                "/auth/login",
                None,
                Some(json!({"email": email, "password": password})),
            )
            .await;
        if s == StatusCode::UNAUTHORIZED {
            return;
        }
        assert!(Instant::now() < deadline, "{email} can still log in");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The base URL of the first registered instance of `service` in an
/// embedded system.
pub async fn address_of(system: &bazaar::System, service: &str) -> String {
    system.discovery.registry().list(service).await.unwrap()[0]
        .address
        .clone()
}

/// The text of `base`'s `/metrics`.
pub async fn metrics(base: &str) -> String {
    reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}
