//! Traces: every `tracing` span with a `service` field is an OpenTelemetry
//! span (tracing-opentelemetry). A trace is recorded or not as a whole:
//! decided once where it enters a process (`trace_sample_ratio` for a new
//! one, else its sender's sampled flag; [`bazaar_mesh::trace::recorded`]),
//! and no span is made for one that is not. Ended spans go to a
//! bounded in-memory store (the dashboard reads recent traces from it)
//! and, when `otlp_endpoint` is set, to an OTLP/HTTP collector (protobuf),
//! each span under the resource of the service that made it, so the
//! embedded mode's one process shows as its seven services there too.
//!
//! The wire side (what `traceparent` each hop sends) is
//! [`bazaar_mesh::trace`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{SpanKind, Status, TracerProvider as _};
use opentelemetry::{Context, Value};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    Sampler, SdkTracerProvider, Span, SpanData, SpanExporter as _, SpanProcessor,
};
use serde::Serialize;
use tokio::sync::mpsc;

/// How traces are recorded and where they go.
#[derive(Debug, Clone)]
pub struct Settings {
    /// An OTLP/HTTP collector's base URL (`/v1/traces` is added), or none.
    pub otlp_endpoint: Option<String>,
    /// The share of new traces recorded, 0 to 1.
    pub sample_ratio: f64,
    /// How many ended spans the in-memory store keeps.
    pub keep_spans: usize,
}

/// An ended span as the dashboard shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct SpanRecord {
    pub trace_id: String,
    pub span_id: String,
    /// `None` for a trace's root.
    pub parent_span_id: Option<String>,
    pub service: String,
    pub name: String,
    /// `server`, `client`, `producer`, `consumer` or `internal`.
    pub kind: String,
    /// Unix microseconds.
    pub start_us: u64,
    pub duration_us: u64,
    pub error: bool,
    pub attributes: BTreeMap<String, String>,
}

/// A trace in a list, summed up from the spans one store keeps (the
/// dashboard merges the stores' summaries of one trace).
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct TraceSummary {
    pub trace_id: String,
    /// The root span's name (`service: name`), when this store has it.
    pub root: Option<String>,
    /// Unix microseconds of the earliest span.
    pub start_us: u64,
    /// From the earliest start to the latest end.
    pub duration_us: u64,
    pub spans: u64,
    pub errors: u64,
    pub services: Vec<String>,
}

impl TraceSummary {
    fn new(trace_id: &str) -> Self {
        Self {
            trace_id: trace_id.to_owned(),
            root: None,
            start_us: u64::MAX,
            duration_us: 0,
            spans: 0,
            errors: 0,
            services: Vec::new(),
        }
    }

    fn add(&mut self, s: &SpanRecord) {
        if s.parent_span_id.is_none() {
            self.root = Some(format!("{}: {}", s.service, s.name));
        }
        let span_end = s.start_us + s.duration_us;
        let end = if self.spans == 0 {
            span_end
        } else {
            (self.start_us + self.duration_us).max(span_end)
        };
        self.start_us = self.start_us.min(s.start_us);
        self.duration_us = end.saturating_sub(self.start_us);
        self.spans += 1;
        self.errors += u64::from(s.error);
        if !self.services.contains(&s.service) {
            self.services.push(s.service.clone());
        }
    }

    /// Adds another store's summary of the same trace.
    pub fn merge(&mut self, other: Self) {
        let end = (self.start_us + self.duration_us).max(other.start_us + other.duration_us);
        self.start_us = self.start_us.min(other.start_us);
        self.duration_us = end.saturating_sub(self.start_us);
        self.spans += other.spans;
        self.errors += other.errors;
        if self.root.is_none() {
            self.root = other.root;
        }
        for s in other.services {
            if !self.services.contains(&s) {
                self.services.push(s);
            }
        }
    }
}

/// Calls from one service to another seen in one store's spans.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Edge {
    pub from: String,
    pub to: String,
    /// `http`, `grpc` or `message`.
    pub kind: String,
    pub calls: u64,
    pub errors: u64,
    /// The calls' durations summed (client side; for a message, its handling).
    pub total_us: u64,
}

/// This process's id, so that instances sharing a process (the embedded
/// mode) are counted once.
pub fn process_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| format!("{:016x}", rand::random::<u64>()))
}

/// The recent spans of this process, oldest first, at most `keep`.
#[derive(Debug)]
pub struct Recent {
    spans: Mutex<VecDeque<SpanRecord>>,
    keep: usize,
}

impl Recent {
    fn push(&self, span: SpanRecord) {
        let mut spans = self.spans.lock().unwrap_or_else(|e| e.into_inner());
        if spans.len() >= self.keep {
            spans.pop_front();
        }
        spans.push_back(span);
    }

    /// The spans of one trace, in start order.
    pub fn trace(&self, trace_id: &str) -> Vec<SpanRecord> {
        let spans = self.spans.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<SpanRecord> = spans
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect();
        out.sort_by_key(|s| s.start_us);
        out
    }

    /// The traces of the most recent spans, newest first, at most
    /// `limit`: all of them, or those whose trace id is `q` or that have
    /// a span with an attribute equal to `q` (a request id, an order id,
    /// a message id). Each is summed up from the spans this store keeps.
    pub fn search(&self, q: &str, limit: usize) -> Vec<TraceSummary> {
        let spans = self.spans.lock().unwrap_or_else(|e| e.into_inner());
        let q = q.trim();
        let mut order: Vec<&str> = Vec::new();
        let mut wanted: HashMap<&str, TraceSummary> = HashMap::new();
        for s in spans.iter().rev() {
            if order.len() >= limit {
                break;
            }
            let hit = q.is_empty() || s.trace_id == q || s.attributes.values().any(|v| v == q);
            if hit && !wanted.contains_key(s.trace_id.as_str()) {
                order.push(&s.trace_id);
                wanted.insert(&s.trace_id, TraceSummary::new(&s.trace_id));
            }
        }
        for s in spans.iter() {
            if let Some(t) = wanted.get_mut(s.trace_id.as_str()) {
                t.add(s);
            }
        }
        order.iter().filter_map(|id| wanted.remove(id)).collect()
    }

    /// The summaries of the traces `ids` from the spans this store keeps
    /// (a trace it has no span of is left out).
    pub fn summaries(&self, ids: &[&str]) -> Vec<TraceSummary> {
        let spans = self.spans.lock().unwrap_or_else(|e| e.into_inner());
        let mut found: HashMap<&str, TraceSummary> =
            ids.iter().map(|id| (*id, TraceSummary::new(id))).collect();
        for s in spans.iter() {
            if let Some(t) = found.get_mut(s.trace_id.as_str()) {
                t.add(s);
            }
        }
        found.into_values().filter(|t| t.spans > 0).collect()
    }

    /// Who called whom among the spans that started at or after
    /// `since_us`: a client span's `peer.service` (HTTP or gRPC), a
    /// consumer span's `messaging.source` (a message).
    pub fn edges(&self, since_us: u64) -> Vec<Edge> {
        let spans = self.spans.lock().unwrap_or_else(|e| e.into_inner());
        let mut edges: BTreeMap<(String, String, &'static str), Edge> = BTreeMap::new();
        for s in spans.iter().rev() {
            if s.start_us < since_us {
                break;
            }
            let (from, to, kind) = match s.kind.as_str() {
                "client" => match s.attributes.get("peer.service") {
                    Some(peer) => {
                        let kind = if s.attributes.contains_key("rpc.system") {
                            "grpc"
                        } else {
                            "http"
                        };
                        (s.service.clone(), peer.clone(), kind)
                    }
                    None => continue,
                },
                "consumer" => match s.attributes.get("messaging.source") {
                    Some(source) if !source.is_empty() => {
                        (source.clone(), s.service.clone(), "message")
                    }
                    _ => continue,
                },
                _ => continue,
            };
            let e = edges
                .entry((from.clone(), to.clone(), kind))
                .or_insert_with(|| Edge {
                    from,
                    to,
                    kind: kind.to_owned(),
                    calls: 0,
                    errors: 0,
                    total_us: 0,
                });
            e.calls += 1;
            e.errors += u64::from(s.error);
            e.total_us += s.duration_us;
        }
        edges.into_values().collect()
    }

    /// The most recent spans, newest first, at most `limit`.
    pub fn latest(&self, limit: usize) -> Vec<SpanRecord> {
        let spans = self.spans.lock().unwrap_or_else(|e| e.into_inner());
        spans.iter().rev().take(limit).cloned().collect()
    }
}

/// This process's store of recent spans, once [`layer`] installed it.
pub fn recent() -> Option<&'static Arc<Recent>> {
    STATE.get().map(|s| &s.recent)
}

struct State {
    recent: Arc<Recent>,
    /// Kept alive: dropping the provider would stop it.
    _provider: SdkTracerProvider,
}

static STATE: OnceLock<State> = OnceLock::new();

/// Ended spans are put in the store and, with a collector, sent on.
#[derive(Debug)]
struct Keep {
    recent: Arc<Recent>,
    export: Option<mpsc::Sender<SpanData>>,
}

impl SpanProcessor for Keep {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        self.recent.push(record(&span));
        if let Some(tx) = &self.export {
            // A full queue (the collector is slow or away) drops the span.
            let _ = tx.try_send(span);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

fn micros(t: SystemTime) -> u64 {
    u64::try_from(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_micros()).unwrap_or(0)
}

/// The `service` attribute every Bazaar span carries.
fn service_of(span: &SpanData) -> String {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == "service")
        .map(|kv| kv.value.to_string())
        .unwrap_or_else(|| "bazaar".into())
}

fn record(span: &SpanData) -> SpanRecord {
    let attributes = span
        .attributes
        .iter()
        .filter(|kv| kv.key.as_str() != "service")
        .map(|kv| {
            let v = match &kv.value {
                Value::String(s) => s.to_string(),
                other => other.to_string(),
            };
            (kv.key.to_string(), v)
        })
        .collect();
    SpanRecord {
        trace_id: span.span_context.trace_id().to_string(),
        span_id: span.span_context.span_id().to_string(),
        parent_span_id: (span.parent_span_id != opentelemetry::trace::SpanId::INVALID)
            .then(|| span.parent_span_id.to_string()),
        service: service_of(span),
        name: span.name.to_string(),
        kind: match span.span_kind {
            SpanKind::Server => "server",
            SpanKind::Client => "client",
            SpanKind::Producer => "producer",
            SpanKind::Consumer => "consumer",
            SpanKind::Internal => "internal",
        }
        .to_owned(),
        start_us: micros(span.start_time),
        duration_us: micros(span.end_time).saturating_sub(micros(span.start_time)),
        error: matches!(span.status, Status::Error { .. }),
        attributes,
    }
}

/// Sends spans to the collector in batches (every 200 ms at most), each
/// service's under its own resource.
async fn export(endpoint: String, mut rx: mpsc::Receiver<SpanData>) {
    let url = if endpoint.ends_with("/v1/traces") {
        endpoint
    } else {
        format!("{}/v1/traces", endpoint.trim_end_matches('/'))
    };
    let mut exporters: HashMap<String, opentelemetry_otlp::SpanExporter> = HashMap::new();
    let mut warned: Option<tokio::time::Instant> = None;
    while let Some(first) = rx.recv().await {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut by_service: HashMap<String, Vec<SpanData>> = HashMap::new();
        by_service
            .entry(service_of(&first))
            .or_default()
            .push(first);
        let mut n = 1;
        while n < 4096 {
            let Ok(span) = rx.try_recv() else { break };
            by_service.entry(service_of(&span)).or_default().push(span);
            n += 1;
        }
        for (service, spans) in by_service {
            let exporter = match exporters.entry(service.clone()) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    use opentelemetry_otlp::WithExportConfig as _;
                    let built = opentelemetry_otlp::SpanExporter::builder()
                        .with_http()
                        .with_endpoint(url.clone())
                        .with_timeout(Duration::from_secs(5))
                        .build();
                    match built {
                        Ok(mut exporter) => {
                            exporter.set_resource(
                                &opentelemetry_sdk::Resource::builder_empty()
                                    .with_service_name(service)
                                    .build(),
                            );
                            e.insert(exporter)
                        }
                        Err(err) => {
                            tracing::error!(error = %err, %url, "cannot export traces");
                            return;
                        }
                    }
                }
            };
            if let Err(err) = exporter.export(spans).await {
                // Once a minute at most: a collector away is not news.
                if warned.is_none_or(|at| at.elapsed() > Duration::from_secs(60)) {
                    tracing::warn!(error = %err, %url, "traces could not be exported; dropped");
                    warned = Some(tokio::time::Instant::now());
                }
            }
        }
    }
}

/// The OpenTelemetry layer for the process's subscriber, recording spans
/// as `settings` says; `None` after the first call. Exporting needs a
/// Tokio runtime: without one, spans are only kept in memory.
pub fn layer<S>(settings: &Settings) -> Option<impl tracing_subscriber::Layer<S>>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    // 0 turns tracing off: no spans are made at all (the wire still
    // carries the callers' trace context on).
    if STATE.get().is_some() || settings.sample_ratio <= 0.0 {
        return None;
    }
    let recent = Arc::new(Recent {
        spans: Mutex::new(VecDeque::new()),
        keep: settings.keep_spans.max(1),
    });
    let export = match (
        &settings.otlp_endpoint,
        tokio::runtime::Handle::try_current(),
    ) {
        (Some(endpoint), Ok(rt)) => {
            let (tx, rx) = mpsc::channel(16_384);
            rt.spawn(export(endpoint.clone(), rx));
            Some(tx)
        }
        _ => None,
    };
    // Which traces are recorded is decided where work enters a process
    // ([`bazaar_mesh::trace::recorded`]); a span is made only for those,
    // so the provider keeps every span it sees.
    bazaar_mesh::trace::set_sample_ratio(settings.sample_ratio);
    let provider = SdkTracerProvider::builder()
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)))
        .with_span_processor(Keep {
            recent: recent.clone(),
            export,
        })
        .build();
    let tracer = provider.tracer("bazaar");
    STATE
        .set(State {
            recent,
            _provider: provider,
        })
        .ok()?;
    // No filter of its own: a per-layer filter is upset by libraries'
    // `enabled!` checks (sqlx makes them), which leave filter state on
    // their thread that disables the next span there. The process's one
    // filter admits Bazaar's spans ([`ours`]) whatever the log level.
    Some(
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            // The source location of each span is the same for every
            // trace: three attributes per span not worth their cost.
            .with_location(false)
            .with_tracked_inactivity(false)
            .with_context_activation(false),
    )
}

/// Whether a callsite is one of Bazaar's spans: they name their service.
pub fn ours(meta: &tracing::Metadata<'_>) -> bool {
    meta.is_span() && meta.fields().field("service").is_some()
}

/// The trace and span ids of the span `id`, when it is recorded.
pub fn ids_of(id: &tracing::span::Id) -> Option<(String, String)> {
    use opentelemetry::trace::TraceContextExt as _;
    let cx = tracing::dispatcher::get_default(|d| tracing_opentelemetry::get_otel_context(id, d))?;
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid()
        .then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
}

/// Whether `id` is a trace id as spans show it: 32 lowercase hex digits,
/// not all zero.
pub fn valid_trace_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && id.bytes().any(|b| b != b'0')
}
