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
        registry.register_collector(Box::new(Process));
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

    /// Reports `db`'s connection pools at every scrape:
    /// `db_pool_connections{pool, state}` (`in_use`, `idle`) and
    /// `db_pool_max_connections{pool}`. (sqlx does not expose how many
    /// tasks wait for a connection; `in_use` at the maximum is the sign.)
    pub fn watch_pools(&self, db: &crate::db::Db) {
        self.registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .register_collector(Box::new(Pools {
                pools: vec![("read", db.read.clone()), ("write", db.write.clone())],
            }));
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

/// A response extension naming the route that answered, for the `route`
/// label, where the router's match says less (the gateway's table routes
/// all go through one `/api/{*rest}`).
#[derive(Clone, Debug)]
pub struct RouteLabel(pub String);

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
        let mut res = answer.await;
        self.active.dec();
        let route = match res.extensions_mut().remove::<RouteLabel>() {
            Some(RouteLabel(name)) => Cow::Owned(name),
            None => route,
        };
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
    // The request's span is named by its route, not its path.
    let span = tracing::Span::current();
    bazaar_mesh::trace::rename(&span, format!("{method} {route}"));
    span.record("http.route", route.as_ref());
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

/// The process, read from `/proc/self` at each scrape: the conventional
/// `process_*` families (Linux; elsewhere none).
#[derive(Debug)]
struct Process;

impl Process {
    /// (CPU seconds, resident bytes, open fds, start time in Unix seconds).
    fn read() -> Option<(f64, i64, i64, f64)> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the command name (which may hold spaces), 1-based
        // from field 3: utime is 14, stime 15, starttime 22, rss 24.
        let rest = stat.rsplit_once(')')?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
        let ticks = 100.0; // USER_HZ on Linux
        let page = 4096;
        let cpu = (field(14)? + field(15)?) as f64 / ticks;
        let rss = i64::try_from(field(24)?).ok()? * page;
        let fds = std::fs::read_dir("/proc/self/fd")
            .map(|d| i64::try_from(d.count()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        // The start time does not change: read the boot time once.
        static BOOT: std::sync::OnceLock<Option<f64>> = std::sync::OnceLock::new();
        let btime = (*BOOT.get_or_init(|| {
            std::fs::read_to_string("/proc/stat")
                .ok()?
                .lines()
                .find_map(|l| l.strip_prefix("btime "))?
                .trim()
                .parse::<f64>()
                .ok()
        }))?;
        let start = btime + field(22)? as f64 / ticks;
        Some((cpu, rss, fds, start))
    }
}

impl prometheus_client::collector::Collector for Process {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        let Some((cpu, rss, fds, start)) = Self::read() else {
            return Ok(());
        };
        let cpu = ConstCounter::new(cpu);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "User and system CPU time the process spent, in seconds",
            None,
            cpu.metric_type(),
        )?)?;
        let gauges: [(&str, &str, ConstGauge<f64>); 3] = [
            (
                "process_resident_memory_bytes",
                "Resident memory of the process, in bytes",
                ConstGauge::new(rss as f64),
            ),
            (
                "process_open_fds",
                "File descriptors the process has open",
                ConstGauge::new(fds as f64),
            ),
            (
                "process_start_time_seconds",
                "When the process started, in Unix seconds",
                ConstGauge::new(start),
            ),
        ];
        for (name, help, gauge) in gauges {
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        Ok(())
    }
}

/// A service's connection pools, read at each scrape.
#[derive(Debug)]
struct Pools {
    pools: Vec<(&'static str, sqlx::AnyPool)>,
}

impl prometheus_client::collector::Collector for Pools {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::gauge::ConstGauge;
        let connections = ConstGauge::new(0i64);
        let mut family = encoder.encode_descriptor(
            "db_pool_connections",
            "Database connections by pool and state (in_use, idle)",
            None,
            connections.metric_type(),
        )?;
        for (pool, p) in &self.pools {
            let idle = i64::try_from(p.num_idle()).unwrap_or(0);
            let size = i64::from(p.size());
            for (state, n) in [("in_use", size - idle), ("idle", idle)] {
                let labels = [("pool", *pool), ("state", state)];
                ConstGauge::new(n).encode(family.encode_family(&labels)?)?;
            }
        }
        let max = ConstGauge::new(0i64);
        let mut family = encoder.encode_descriptor(
            "db_pool_max_connections",
            "Most connections each pool opens",
            None,
            max.metric_type(),
        )?;
        for (pool, p) in &self.pools {
            let labels = [("pool", *pool)];
            ConstGauge::new(i64::from(p.options().get_max_connections()))
                .encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}
