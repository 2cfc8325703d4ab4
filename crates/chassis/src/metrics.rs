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

    /// Gives `add` the registry, to register metrics of a shared part
    /// (the mesh client's).
    pub fn with_registry(&self, add: impl FnOnce(&mut Registry)) {
        add(&mut self.registry.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Everything registered, in the format `accept` asks for: OpenMetrics
    /// when it names `application/openmetrics-text`, else the classic
    /// Prometheus text format 0.0.4. Returns the text and its content type.
    pub fn exposition(&self, accept: &str) -> (String, &'static str) {
        let text = self.encode();
        if accept.contains("application/openmetrics-text") {
            (text, OPENMETRICS)
        } else {
            (classic(&text), CLASSIC)
        }
    }

    /// The OpenMetrics text exposition of everything registered.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Content type of the OpenMetrics text format.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of the classic Prometheus text format.
pub const CLASSIC: &str = "text/plain; version=0.0.4; charset=utf-8";

/// OpenMetrics text as the classic Prometheus text format 0.0.4: a
/// counter's `HELP` and `TYPE` name its `_total` samples, an info metric
/// is a gauge named `…_info`, types 0.0.4 lacks are `untyped`; `_created`
/// samples, exemplars, `# UNIT` and `# EOF` are dropped.
pub fn classic(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<(&str, &str)> = None;
    // The family being written: its OpenMetrics name and type.
    let mut family: (&str, &str) = ("", "");
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = rest.split_once(' ').or(Some((rest, "")));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            family = (name, kind);
            let (exposed, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "info" => (format!("{name}_info"), "gauge"),
                "gauge" | "histogram" | "summary" => (name.to_owned(), kind),
                "stateset" => (name.to_owned(), "gauge"),
                _ => (name.to_owned(), "untyped"),
            };
            if let Some((h, text)) = help.take()
                && h == name
            {
                out.push_str(&format!("# HELP {exposed} {text}\n"));
            }
            out.push_str(&format!("# TYPE {exposed} {kind}\n"));
            continue;
        }
        if line.starts_with('#') {
            // `# UNIT`, `# EOF`.
            continue;
        }
        let sample = without_exemplar(line);
        let name = sample.split(['{', ' ']).next().unwrap_or("");
        if name.strip_prefix(family.0) == Some("_created") {
            continue;
        }
        out.push_str(sample);
        out.push('\n');
    }
    out
}

/// A sample line without its exemplar (` # {…} value`), which may follow
/// the value; a `#` inside a quoted label value is not one.
fn without_exemplar(line: &str) -> &str {
    let mut quoted = false;
    let mut escaped = false;
    let mut labels_done = !line.contains('{');
    for (i, c) in line.char_indices() {
        if labels_done {
            if c == '#' {
                return line[..i].trim_end();
            }
            continue;
        }
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '}' if !quoted => labels_done = true,
            _ => {}
        }
    }
    line
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_fail_promtool_check_no_more_the_classic_format_names_counters_by_their_samples() {
        let m = Metrics::new("svc");
        let info = prometheus_client::metrics::info::Info::new(vec![("version", "1")]);
        m.register("build", "Build of the binary", info);
        let text = m.exposition("text/plain").0;
        let m2 = Metrics::new("svc");
        m2.requests
            .get_or_create(&HttpLabels {
                method: "GET".into(),
                route: "/a#b".into(),
                status_code: 200,
            })
            .inc();
        let (counted, kind) = m2.exposition("*/*");
        assert_eq!(kind, CLASSIC);
        assert!(
            counted.contains("# HELP http_requests_total HTTP requests served"),
            "{counted}"
        );
        assert!(counted.contains("# TYPE http_requests_total counter\n"));
        assert!(counted.contains(r#"route="/a#b""#), "{counted}");
        assert!(!counted.contains("# EOF"));
        assert!(text.contains("# TYPE build_info gauge"), "{text}");
        assert!(text.contains("# HELP build_info Build of the binary"));
        let (om, kind) =
            m2.exposition("application/openmetrics-text;version=1.0.0,text/plain;q=0.5");
        assert_eq!(kind, OPENMETRICS);
        assert!(om.ends_with("# EOF\n"));
    }

    #[test]
    fn exemplars_and_created_samples_are_dropped() {
        let om = "# HELP c Calls.\n# TYPE c counter\nc_total{a=\"x # y\"} 3 # {trace_id=\"1\"} 1.0\nc_created{a=\"x\"} 17\n# EOF\n";
        assert_eq!(
            classic(om),
            "# HELP c_total Calls.\n# TYPE c_total counter\nc_total{a=\"x # y\"} 3\n"
        );
    }
}
