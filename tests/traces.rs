//! Traces: one checkout is one trace, a tree of spans across the
//! services (gateway → orders → catalog; the saga's messages through the
//! outbox to inventory and payments and back; notifications), exported
//! over OTLP/HTTP (protobuf) to a stand-in collector that decodes every
//! request with the OpenTelemetry protocol's own types. In both modes:
//! the embedded one (one process, each span under its service's
//! resource) and `bazaar up --distributed` (a process per service).
#![allow(clippy::unwrap_used)]

mod common;
#[path = "../crates/mesh/tests/support/mod.rs"]
mod support;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message as _;
use reqwest::StatusCode;
use serde_json::{Value, json};

/// A span as the collector received it.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    trace_id: String,
    span_id: String,
    parent: String,
    name: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A stand-in OTLP/HTTP collector: `POST /v1/traces`, protobuf.
struct Collector {
    url: String,
    spans: Arc<Mutex<Vec<Got>>>,
}

impl Collector {
    async fn start() -> Self {
        let spans: Arc<Mutex<Vec<Got>>> = Arc::default();
        let kept = spans.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |headers: axum::http::HeaderMap, body: bytes::Bytes| {
                let kept = kept.clone();
                async move {
                    assert_eq!(headers["content-type"], "application/x-protobuf");
                    let req = ExportTraceServiceRequest::decode(body).unwrap();
                    let mut kept = kept.lock().unwrap();
                    for rs in req.resource_spans {
                        let service = rs
                            .resource
                            .iter()
                            .flat_map(|r| &r.attributes)
                            .find(|kv| kv.key == "service.name")
                            .and_then(|kv| kv.value.as_ref())
                            .and_then(|v| match &v.value {
                                Some(opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s)) => Some(s.clone()),
                                _ => None,
                            })
                            .unwrap_or_default();
                        for ss in rs.scope_spans {
                            for s in ss.spans {
                                kept.push(Got {
                                    service: service.clone(),
                                    trace_id: hex(&s.trace_id),
                                    span_id: hex(&s.span_id),
                                    parent: hex(&s.parent_span_id),
                                    name: s.name,
                                });
                            }
                        }
                    }
                    (
                        [("content-type", "application/x-protobuf")],
                        Vec::<u8>::new(),
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { url, spans }
    }

    fn trace(&self, trace_id: &str) -> Vec<Got> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect()
    }
}

const CLIENT_SPAN: &str = "00f067aa0ba902b7";

/// A checkout sent with a trace context of the test's own, followed to
/// CONFIRMED; returns the trace id and the order's id.
async fn checkout(gateway: &str) -> (String, String) {
    checkout_flagged(gateway, "01").await
}

/// [`checkout`] with the client's `traceparent` flags: `00` asks that
/// the trace not be recorded.
async fn checkout_flagged(gateway: &str, flags: &str) -> (String, String) {
    let api = Api::new(gateway);
    let admin = api.login(ADMIN_EMAIL, ADMIN_PASSWORD).await;
    let (s, product) = api
        .call(
            "POST",
            "/products",
            Some(&admin),
            Some(json!({"name": "Traced teapot", "price": 1500, "currency": "EUR"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{product}");
    let id = product["id"].as_str().unwrap().to_owned();
    let (s, _) = api
        .call(
            "PUT",
            &format!("/inventory/{id}"),
            Some(&admin),
            Some(json!({"available": 10})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (token, _) = api
        .register_and_login(&format!("{}@traces.test", unique()))
        .await;
    let trace_id = format!("{:032x}", rand_u128());
    let res = reqwest::Client::new()
        .post(format!("{gateway}/api/v1/orders"))
        .bearer_auth(&token)
        .header(
            "traceparent",
            format!("00-{trace_id}-{CLIENT_SPAN}-{flags}"),
        )
        .json(&json!({"items": [{"product_id": id, "quantity": 1}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let order: Value = res.json().await.unwrap();
    let order_id = order["id"].as_str().unwrap().to_owned();
    eventually(&api, &format!("/orders/{order_id}"), &token, |o| {
        o["status"] == "CONFIRMED"
    })
    .await;
    (trace_id, order_id)
}

fn rand_u128() -> u128 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    t ^ (u128::from(std::process::id()) << 64) | 1
}

/// The trace's spans once every service named has sent its share (and
/// the notification went out), within 15 s.
async fn collected(collector: &Collector, trace_id: &str, services: &[&str]) -> Vec<Got> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let spans = collector.trace(trace_id);
        let seen: HashSet<&str> = spans.iter().map(|s| s.service.as_str()).collect();
        if services.iter().all(|s| seen.contains(s)) {
            // Late spans of the same trace: give them a moment.
            tokio::time::sleep(Duration::from_millis(600)).await;
            return collector.trace(trace_id);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "trace {trace_id}: spans only from {seen:?}: {spans:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One tree: every span's parent is a span of the trace, but one whose
/// parent is the client's span; a new span id per hop.
fn assert_one_tree(spans: &[Got]) {
    let ids: HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    assert_eq!(ids.len(), spans.len(), "span ids repeat: {spans:#?}");
    let roots: Vec<&Got> = spans
        .iter()
        .filter(|s| !ids.contains(s.parent.as_str()))
        .collect();
    assert_eq!(roots.len(), 1, "more than one root: {roots:#?}");
    assert_eq!(roots[0].parent, CLIENT_SPAN, "{roots:#?}");
    assert_eq!(roots[0].service, "gateway");
    // The path a checkout takes, as spans.
    let has = |service: &str, name: &str| {
        spans
            .iter()
            .any(|s| s.service == service && s.name.contains(name))
    };
    for (service, name) in [
        ("gateway", "POST v1 * /orders"),
        ("gateway", "POST orders"),
        ("orders", "POST /orders"),
        ("orders", "GET catalog"),
        ("catalog", "GET /products/{id}"),
        ("orders", "publish order.created"),
        ("inventory", "consume order.created"),
        ("inventory", "publish payments.charge"),
        ("payments", "consume payments.charge"),
        ("orders", "saga reserving → CONFIRMED"),
        ("notifications", "consume order.confirmed"),
        ("inventory", "consume order.confirmed"),
    ] {
        assert!(has(service, name), "no {service} span {name:?}: {spans:#?}");
    }
    // Depth: the confirmation sits below the request, several hops down.
    let by_id: HashMap<&str, &Got> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let confirmed = spans
        .iter()
        .find(|s| s.name.contains("saga reserving → CONFIRMED"))
        .unwrap();
    let mut depth = 0;
    let mut at = confirmed;
    while let Some(parent) = by_id.get(at.parent.as_str()) {
        depth += 1;
        at = parent;
    }
    assert!(depth >= 6, "the confirmation is only {depth} spans deep");
}

const SERVICES: [&str; 6] = [
    "gateway",
    "orders",
    "catalog",
    "inventory",
    "payments",
    "notifications",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkout_is_one_trace_in_the_embedded_mode() {
    let collector = Collector::start().await;
    bazaar_chassis::telemetry::init(
        Some("json"),
        "warn",
        Some(&bazaar_chassis::traces::Settings {
            otlp_endpoint: Some(collector.url.clone()),
            sample_ratio: 1.0,
            keep_spans: 20_000,
        }),
    );
    let (system, _dir) = embedded().await;
    wait_ready(&system.gateway_url).await;
    let (trace_id, order_id) = checkout(&system.gateway_url).await;
    let spans = collected(&collector, &trace_id, &SERVICES).await;
    assert_one_tree(&spans);

    // The gateway's dashboard API shows the same spans, from memory.
    let api = Api::new(&system.gateway_url);
    let admin = api.login(ADMIN_EMAIL, ADMIN_PASSWORD).await;
    let shown: Value = reqwest::Client::new()
        .get(format!(
            "{}/_dashboard/api/traces/{trace_id}",
            system.gateway_url
        ))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let shown = shown["spans"].as_array().unwrap();
    let shown_ids: HashSet<&str> = shown
        .iter()
        .map(|s| s["span_id"].as_str().unwrap())
        .collect();
    for s in &spans {
        assert!(shown_ids.contains(s.span_id.as_str()), "{s:?} not shown");
    }
    for field in [
        "trace_id",
        "span_id",
        "parent_span_id",
        "service",
        "name",
        "start_us",
        "duration_us",
        "attributes",
    ] {
        assert!(shown[0].get(field).is_some(), "{field}: {}", shown[0]);
    }
    assert_timeline(&system.gateway_url, &order_id, &trace_id).await;
    assert_dashboard(&system.gateway_url, &order_id, &trace_id).await;
    assert_not_recorded(&system.gateway_url, &collector).await;
    system.shutdown.trigger();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkout_is_one_trace_across_processes() {
    let Some((amqp, db)) = real_servers() else {
        return;
    };
    let Some(etcd) = support::Etcd::start().await else {
        return;
    };
    let collector = Collector::start().await;
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("bazaar-traces-{}", unique()));
    let up = std::process::Command::new(env!("CARGO_BIN_EXE_bazaar"))
        .args(["up", "--distributed", "--port", &port.to_string()])
        .arg("--data-dir")
        .arg(&dir)
        .env("BAZAAR_AMQP_URL", &amqp)
        .env("BAZAAR_DATABASE_URL", &db)
        .env("BAZAAR_DATABASE_SCHEMA_PREFIX", format!("tr{}_", unique()))
        .env("BAZAAR_ETCD_ENDPOINTS", etcd.url())
        .env("BAZAAR_OTLP_ENDPOINT", &collector.url)
        .env("BAZAAR_ADMIN_EMAIL", ADMIN_EMAIL)
        .env("BAZAAR_ADMIN_PASSWORD", ADMIN_PASSWORD)
        .env("BAZAAR_LOG_FORMAT", "json")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Stopped (SIGTERM: its children stop too) however the test ends.
    struct Stop(std::process::Child);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = std::process::Command::new("kill")
                .arg(self.0.id().to_string())
                .status();
            let _ = self.0.wait();
        }
    }
    let up = Stop(up);
    let gateway = format!("http://127.0.0.1:{port}");
    wait_ok(&format!("{gateway}/ready")).await;
    let (trace_id, order_id) = checkout(&gateway).await;
    let spans = collected(&collector, &trace_id, &SERVICES).await;
    assert_one_tree(&spans);
    // The gateway's log lines inside the trace carry its ids.
    let log = std::fs::read_to_string(dir.join("logs").join("gateway-1.log")).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains(&format!("\"trace_id\":\"{trace_id}\"")))
        .unwrap_or_else(|| panic!("no gateway log line in trace {trace_id}"));
    let line: Value = serde_json::from_str(line).unwrap();
    assert_eq!(line["span_id"].as_str().unwrap().len(), 16, "{line}");
    assert_timeline(&gateway, &order_id, &trace_id).await;
    assert_dashboard(&gateway, &order_id, &trace_id).await;
    assert_not_recorded(&gateway, &collector).await;
    drop(up);
    let _ = std::fs::remove_dir_all(dir);
}

/// An admin's token on the gateway.
async fn admin_token(gateway: &str) -> String {
    Api::new(gateway).login(ADMIN_EMAIL, ADMIN_PASSWORD).await
}

/// `GET path` on the gateway with `admin`'s token: the status and the
/// JSON answer.
async fn as_admin(gateway: &str, admin: &str, path: &str) -> (StatusCode, Value) {
    let api = Api::new(gateway);
    let req = api.http.get(format!("{gateway}{path}")).bearer_auth(admin);
    api.send(path, req).await
}

/// The order's timeline: the saga's steps in order, each message of it
/// written, published, delivered and handled, in time order, in the
/// checkout's trace.
async fn assert_timeline(gateway: &str, order_id: &str, trace_id: &str) {
    let admin = admin_token(gateway).await;
    let (_, timeline) = as_admin(
        gateway,
        &admin,
        &format!("/_dashboard/api/orders/{order_id}/timeline"),
    )
    .await;
    assert_eq!(timeline["trace_ids"], json!([trace_id]), "{timeline:#}");
    let events = timeline["events"].as_array().unwrap();
    let times: Vec<u64> = events
        .iter()
        .map(|e| e["at_us"].as_u64().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "not in time order");
    let steps: Vec<&str> = events
        .iter()
        .filter(|e| e["what"] == "saga")
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        ["placed → reserving", "reserving → CONFIRMED"],
        "{timeline:#}"
    );
    for kind in ["order.created", "payments.charge", "order.confirmed"] {
        let seen: Vec<&str> = events
            .iter()
            .filter(|e| e["kind"] == kind)
            .map(|e| e["what"].as_str().unwrap())
            .collect();
        for what in ["written", "published", "delivered", "handled"] {
            assert!(seen.contains(&what), "{kind}: no {what} in {seen:?}");
        }
    }
    // Inventory asks for the charge once it has held the units.
    let at = |kind: &str, what: &str| {
        events
            .iter()
            .find(|e| e["kind"] == kind && e["what"] == what)
            .and_then(|e| e["at_us"].as_u64())
            .unwrap()
    };
    assert!(at("order.created", "delivered") <= at("payments.charge", "written"));
}

/// The dashboard's page and API: every service with its health; the
/// checkout's calls and messages on the service map; requests per route;
/// the queues with their consumers; the checkout's trace found by its
/// order id, its request id and its own id; the live stream; a replay
/// recorded with who made it. Tokens are checked even from loopback.
async fn assert_dashboard(gateway: &str, order_id: &str, trace_id: &str) {
    let api = Api::new(gateway);
    let admin = api.login(ADMIN_EMAIL, ADMIN_PASSWORD).await;
    let http = reqwest::Client::new();
    let get = |path: String, token: Option<String>| {
        let mut req = http.get(format!("{gateway}{path}"));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send()
    };
    // The page and its assets, with a policy that forbids inline code.
    for (path, kind) in [
        ("/_dashboard", "text/html"),
        ("/_dashboard/app.js", "text/javascript"),
        ("/_dashboard/app.css", "text/css"),
    ] {
        let res = get(path.into(), None).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{path}");
        let ct = res.headers()["content-type"].to_str().unwrap();
        assert!(ct.starts_with(kind), "{path}: {ct}");
        let csp = res.headers()["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("script-src 'self'"), "{csp}");
    }
    let (customer, _) = api
        .register_and_login(&format!("{}@dash.test", unique()))
        .await;
    let status = get("/_dashboard/api/snapshot".into(), Some(customer))
        .await
        .unwrap()
        .status();
    assert_eq!(status, StatusCode::FORBIDDEN, "a customer's token");
    let status = get(
        "/_dashboard/api/snapshot".into(),
        Some("not-a-token".into()),
    )
    .await
    .unwrap()
    .status();
    assert_eq!(status, StatusCode::UNAUTHORIZED, "a bad token");

    // Two snapshots: the second has rates over the time between them.
    let snapshot = || async {
        let res = get("/_dashboard/api/snapshot".into(), Some(admin.clone()))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        res.json::<Value>().await.unwrap()
    };
    snapshot().await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let snap = snapshot().await;
    assert!(snap["window_s"].as_f64().unwrap() > 0.0, "{snap}");
    let services: HashSet<&str> = snap["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["answering"] == true)
        .map(|i| i["service"].as_str().unwrap())
        .collect();
    for s in SERVICES.iter().chain(&["users", "auth"]) {
        assert!(services.contains(s), "{s} missing from {services:?}");
    }
    let edges: HashSet<(String, String, String)> = snap["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let f = |k: &str| e[k].as_str().unwrap().to_owned();
            (f("from"), f("to"), f("kind"))
        })
        .collect();
    for (from, to, kind) in [
        ("gateway", "orders", "http"),
        ("orders", "catalog", "http"),
        ("orders", "inventory", "message"),
        ("inventory", "payments", "message"),
        ("payments", "orders", "message"),
        ("orders", "notifications", "message"),
    ] {
        assert!(
            edges.contains(&(from.into(), to.into(), kind.into())),
            "no {from} → {to} ({kind}) in {edges:?}"
        );
    }
    let routes = snap["routes"].as_array().unwrap();
    assert!(
        routes.iter().any(|r| r["service"] == "orders"
            && r["method"] == "POST"
            && r["total"].as_f64() >= Some(1.0)
            && r["p99_ms"].as_f64().is_some()),
        "{routes:?}"
    );
    let saga = snap["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["queue"] == "orders.saga")
        .unwrap();
    assert!(saga["consumers"].as_u64() >= Some(1), "{saga}");
    assert_eq!(saga["dead_letters"], 0, "{saga}");

    // The checkout's trace, found by its order id, request id and own id.
    let search = |q: String| {
        let admin = admin.clone();
        async move {
            let res = get(format!("/_dashboard/api/traces?q={q}"), Some(admin))
                .await
                .unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            res.json::<Vec<Value>>().await.unwrap()
        }
    };
    let by_order = search(order_id.to_owned()).await;
    assert_eq!(by_order[0]["trace_id"], trace_id, "{by_order:?}");
    assert!(by_order[0]["spans"].as_u64() >= Some(10), "{by_order:?}");
    assert!(
        by_order[0]["services"].as_array().unwrap().len() >= 5,
        "{by_order:?}"
    );
    assert_eq!(search(trace_id.to_owned()).await[0]["trace_id"], trace_id);
    let spans: Value = get(
        format!("/_dashboard/api/traces/{trace_id}"),
        Some(admin.clone()),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let request_id = spans["spans"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|s| {
            s["attributes"]["request_id"]
                .as_str()
                .filter(|r| !r.is_empty())
        })
        .unwrap()
        .to_owned();
    assert_eq!(search(request_id).await[0]["trace_id"], trace_id);
    assert!(!search(String::new()).await.is_empty(), "the latest traces");
    let long = "x".repeat(101);
    let status = get(
        format!("/_dashboard/api/traces?q={long}"),
        Some(admin.clone()),
    )
    .await
    .unwrap()
    .status();
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);

    // The live stream sends a snapshot at once.
    let mut res = get("/_dashboard/api/stream".into(), Some(admin.clone()))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut seen = String::new();
    while !seen.contains("\n\n") {
        let chunk = tokio::time::timeout(Duration::from_secs(5), res.chunk())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(seen.starts_with("event: snapshot\ndata: {"), "{seen}");
    drop(res);

    // A replay through the dashboard is recorded with who made it.
    let replay = |body: Value| {
        http.post(format!("{gateway}/_dashboard/api/dead-letters/replay"))
            .bearer_auth(&admin)
            .json(&body)
            .send()
    };
    let res = replay(json!({"queue": "payments.commands", "all": true, "rate": 10}))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.json::<Value>().await.unwrap(), json!({"replayed": 0}));
    let res = replay(json!({"queue": "no.such.queue", "all": true}))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let replays: Vec<Value> = get("/_dashboard/api/replays".into(), Some(admin.clone()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(replays[0]["by"], ADMIN_EMAIL, "{replays:?}");
    assert_eq!(replays[0]["queue"], "payments.commands", "{replays:?}");
    assert_eq!(replays[0]["rate"], 10.0, "{replays:?}");
    let letters = get(
        "/_dashboard/api/dead-letters?queue=orders.saga".into(),
        Some(admin.clone()),
    )
    .await
    .unwrap();
    assert_eq!(letters.status(), StatusCode::OK);
    assert_eq!(letters.json::<Value>().await.unwrap(), json!([]));
}

/// A checkout whose client asks that its trace not be recorded: no
/// service makes a span of it — not the gateway, nor orders, nor any
/// consumer of its messages — while the order is confirmed as ever, and
/// its timeline links to no trace.
async fn assert_not_recorded(gateway: &str, collector: &Collector) {
    let (trace_id, order_id) = checkout_flagged(gateway, "00").await;
    // The saga's last messages (notifications) are handled a moment later.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let admin = admin_token(gateway).await;
    let (status, _) = as_admin(
        gateway,
        &admin,
        &format!("/_dashboard/api/traces/{trace_id}"),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "spans were kept");
    let (_, timeline) = as_admin(
        gateway,
        &admin,
        &format!("/_dashboard/api/orders/{order_id}/timeline"),
    )
    .await;
    assert_eq!(timeline["trace_ids"], json!([]), "{timeline:#}");
    let steps = timeline["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["what"] == "saga")
        .count();
    assert_eq!(steps, 2, "{timeline:#}");
    assert!(
        collector
            .spans
            .lock()
            .unwrap()
            .iter()
            .all(|s| s.trace_id != trace_id),
        "spans were exported"
    );
}
