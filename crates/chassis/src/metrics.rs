//! One Prometheus registry per service (never a global recorder), with the
//! HTTP metrics every service reports and room for its own.

use std::borrow::Cow;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Metric, Registry};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    method: Cow<'static, str>,
    route: Cow<'static, str>,
    status_code: u16,
}

/// A method's name, without allocating for the standard ones.
fn method_label(method: &Method) -> Cow<'static, str> {
    static STANDARD: [Method; 9] = [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::HEAD,
        Method::OPTIONS,
        Method::PATCH,
        Method::CONNECT,
        Method::TRACE,
    ];
    STANDARD.iter().find(|m| *m == method).map_or_else(
        || Cow::Owned(method.as_str().to_owned()),
        |m| Cow::Borrowed(m.as_str()),
    )
}

/// A service's metrics registry and its HTTP instruments.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
    requests: Family<HttpLabels, Counter>,
    duration: Family<HttpLabels, Histogram>,
    active: Gauge,
}

impl Metrics {
    /// A fresh registry labelled `service=<name>`.
    pub fn new(service: &str) -> Self {
        let mut registry = Registry::with_labels(
            [(
                std::borrow::Cow::Borrowed("service"),
                std::borrow::Cow::Owned(service.to_owned()),
            )]
            .into_iter(),
        );
        let requests = Family::<HttpLabels, Counter>::default();
        let duration = Family::<HttpLabels, Histogram>::new_with_constructor(|| {
            // 0.1 ms … ~3.3 s
            Histogram::new(exponential_buckets(0.0001, 2.0, 16))
        });
        let active = Gauge::default();
        registry.register("http_requests", "HTTP requests served", requests.clone());
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency in seconds",
            duration.clone(),
        );
        registry.register(
            "active_connections",
            "HTTP requests in flight",
            active.clone(),
        );
        Self {
            registry: Arc::new(Mutex::new(registry)),
            requests,
            duration,
            active,
        }
    }

    /// Registers a service's own metric.
    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        self.registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .register(name, help, metric);
    }

    /// The Prometheus text exposition of everything registered.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
            out.clear();
        }
        out
    }
}

impl Metrics {
    /// Counts and times one request: in flight while `answer` runs, then
    /// labelled with its method, route and status.
    pub async fn time(
        &self,
        method: &Method,
        route: Cow<'static, str>,
        answer: impl Future<Output = Response>,
    ) -> Response {
        let start = Instant::now();
        self.active.inc();
        let res = answer.await;
        self.active.dec();
        let labels = HttpLabels {
            method: method_label(method),
            route,
            status_code: res.status().as_u16(),
        };
        self.requests.get_or_create(&labels).inc();
        self.duration
            .get_or_create(&labels)
            .observe(start.elapsed().as_secs_f64());
        res
    }
}

/// Middleware: counts and times every request by method, matched route and status.
pub async fn track(State(m): State<Metrics>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or(Cow::Borrowed("unmatched"), |p| {
            Cow::Owned(p.as_str().to_owned())
        });
    m.time(&method, route, next.run(req)).await
}
