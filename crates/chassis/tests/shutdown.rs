//! Graceful shutdown: leave discovery, stop accepting, finish what is in flight.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use bazaar_bus::Bus;
use bazaar_chassis::http::{Readiness, bind, serve};
use bazaar_chassis::{Config, ServiceContext, Shutdown};
use bazaar_mesh::{Discovery, MemoryRegistry, Registry};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_deregisters_stops_accepting_and_drains() {
    let registry = MemoryRegistry::default();
    let ctx = ServiceContext::new(
        "svc",
        Arc::new(Config::default()),
        Bus::memory(),
        Discovery::new(Arc::new(registry.clone())),
    );
    let app = Router::new().route(
        "/slow",
        get(|| async {
            tokio::time::sleep(Duration::from_millis(400)).await;
            "done"
        }),
    );
    let listener = bind("127.0.0.1", 0).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = Shutdown::default();
    let signal = shutdown.clone();
    let server =
        tokio::spawn(async move { serve(&ctx, app, listener, Readiness::default(), signal).await });

    for _ in 0..50 {
        if !registry.list("svc").await.unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        registry.list("svc").await.unwrap().len(),
        1,
        "registered when serving"
    );

    let in_flight = tokio::spawn(reqwest::get(format!("http://{addr}/slow")));
    tokio::time::sleep(Duration::from_millis(100)).await;
    shutdown.trigger();
    tokio::time::sleep(Duration::from_millis(100)).await;

    assert!(
        registry.list("svc").await.unwrap().is_empty(),
        "deregistered on shutdown"
    );
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no longer accepting"
    );
    let res = in_flight
        .await
        .unwrap()
        .expect("the in-flight request was dropped");
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), "done");
    tokio::time::timeout(Duration::from_secs(2), server)
        .await
        .expect("server did not stop after draining")
        .unwrap()
        .unwrap();
}
