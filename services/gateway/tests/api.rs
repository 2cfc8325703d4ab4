//! The gateway against stand-in upstreams: what it forwards, and how
//! upstream failures reach the client (503 unreachable, 504 too slow).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::HeaderMap;
use axum::routing::get;
use bazaar_bus::Bus;
use bazaar_chassis::{Config, ServiceContext, Shutdown};
use bazaar_mesh::{Discovery, Instance, MemoryRegistry, Registry};

struct TestApp {
    url: String,
    registry: MemoryRegistry,
    shutdown: Shutdown,
}

async fn spawn_gateway() -> TestApp {
    let registry = MemoryRegistry::default();
    let config = Config {
        upstream_timeout_ms: 300,
        ..Config::default()
    };
    let ctx = ServiceContext::new(
        "gateway",
        Arc::new(config),
        Bus::memory(),
        Discovery::new(Arc::new(registry.clone())),
    );
    let app = bazaar_gateway::Application::build(ctx).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = Shutdown::default();
    tokio::spawn(app.run_until_stopped(listener, shutdown.clone()));
    TestApp {
        url,
        registry,
        shutdown,
    }
}

/// Serves `router` on a free port and registers it as `catalog`.
async fn upstream(app: &TestApp, router: Router) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    register(app, &address).await;
}

async fn register(app: &TestApp, address: &str) {
    let instance = Instance {
        name: "catalog".into(),
        id: address.into(),
        address: address.into(),
        version: "test".into(),
        ..Instance::default()
    };
    app.registry.register(instance).await.unwrap();
}

#[tokio::test]
async fn no_instance_is_503() {
    let app = spawn_gateway().await;
    let res = reqwest::get(format!("{}/api/v1/products", app.url))
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    app.shutdown.trigger();
}

#[tokio::test]
async fn unreachable_instance_is_503() {
    let app = spawn_gateway().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    register(&app, &format!("http://{closed}")).await;
    let res = reqwest::get(format!("{}/api/v1/products", app.url))
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    app.shutdown.trigger();
}

#[tokio::test]
async fn slow_upstream_is_504() {
    let app = spawn_gateway().await;
    let slow = Router::new().route(
        "/products",
        get(|| async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            "late"
        }),
    );
    upstream(&app, slow).await;
    let res = reqwest::get(format!("{}/api/v1/products", app.url))
        .await
        .unwrap();
    assert_eq!(res.status(), 504);
    app.shutdown.trigger();
}

#[tokio::test]
async fn forwards_path_query_and_request_headers() {
    let app = spawn_gateway().await;
    let echo = Router::new().route(
        "/products/{id}",
        get(
            |axum::extract::Path(id): axum::extract::Path<String>,
             uri: axum::http::Uri,
             headers: HeaderMap| async move {
                let h = |n: &str| {
                    headers
                        .get(n)
                        .map(|v| v.to_str().unwrap().to_owned())
                        .unwrap_or_default()
                };
                format!(
                    "{id}|{}|{}|{}|{}",
                    uri.query().unwrap_or(""),
                    h("x-forwarded-for"),
                    h("x-request-id"),
                    h("x-user-id")
                )
            },
        ),
    );
    upstream(&app, echo).await;
    let res = reqwest::Client::new()
        .get(format!("{}/api/v1/products/42?color=red", app.url))
        .header("x-request-id", "req-1")
        .header("x-user-id", "spoofed")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-request-id"], "req-1");
    assert_eq!(
        res.text().await.unwrap(),
        "42|color=red|127.0.0.1|req-1|",
        "a client-sent identity is dropped"
    );
    app.shutdown.trigger();
}
