//! Traces: every `tracing` span with a `service` field is recorded as an
//! OpenTelemetry span ([`Recorded`], by this module's layer). A trace is
//! recorded or not as a whole:
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

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bazaar_bus::bounded::Bounded;
pub use bazaar_mesh::trace::{Kind, Recorded, Status, Value};
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

    fn add(&mut self, s: &Recorded) {
        let service = service_of(s);
        if s.parent_span_id == 0 {
            self.root = Some(format!("{service}: {}", s.name));
        }
        let start_us = s.start_ns / 1000;
        let span_end = start_us + duration_us(s);
        let end = if self.spans == 0 {
            span_end
        } else {
            (self.start_us + self.duration_us).max(span_end)
        };
        self.start_us = self.start_us.min(start_us);
        self.duration_us = end.saturating_sub(self.start_us);
        self.spans += 1;
        self.errors += u64::from(failed(s));
        if !self.services.iter().any(|known| known == service) {
            self.services.push(service.to_owned());
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
    ID.get_or_init(|| hex16(rand::random::<u64>()))
}

/// The recent spans of this process, oldest first: at most `keep`, and
/// at most [`KEEP_BYTES`] of them (a span's size is mostly its fields'
/// text, which clients choose: a request id, a path). They are kept as
/// they ended and made into [`SpanRecord`]s only when asked for: most
/// are never looked at.
#[derive(Debug)]
pub struct Recent {
    spans: Mutex<Bounded<Arc<Recorded>>>,
}

/// The memory the spans of one process may take in all. Under load it
/// fills in seconds whatever its size (a checkout makes a few spans in
/// each service), so it is kept small: at the rates people look at
/// traces by hand it holds thousands of them, and an OTLP collector is
/// where traces are kept.
pub const KEEP_BYTES: usize = 4 << 20;

impl Recent {
    fn new(keep: usize) -> Self {
        Self {
            spans: Mutex::new(Bounded::new(keep, KEEP_BYTES)),
        }
    }

    fn push(&self, span: Arc<Recorded>) {
        let size = span.size();
        let gone = self
            .spans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(span, size);
        // Freed after the lock: other threads' spans need not wait.
        drop(gone);
    }

    /// The spans of one trace, in start order.
    pub fn trace(&self, trace_id: &str) -> Vec<SpanRecord> {
        let Some(id) = trace_id_from(trace_id) else {
            return Vec::new();
        };
        let spans = self.spans.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<SpanRecord> = spans
            .iter()
            .filter(|s| s.trace_id == id)
            .map(|s| record(s))
            .collect();
        drop(spans);
        out.sort_by_key(|s| s.start_us);
        out
    }

    /// The traces of the most recent spans, newest first, at most
    /// `limit`: all of them, or those whose trace id is `q` or that have
    /// a span with an attribute equal to `q` (a request id, an order id,
    /// a message id). Each is summed up from the spans this store keeps.
    pub fn search(&self, q: &str, limit: usize) -> Vec<TraceSummary> {
        let q = q.trim();
        let by_id = trace_id_from(q);
        let spans = self.spans.lock().unwrap_or_else(|e| e.into_inner());
        let mut order: Vec<u128> = Vec::new();
        let mut wanted: HashMap<u128, TraceSummary> = HashMap::new();
        for s in spans.iter().rev() {
            if order.len() >= limit {
                break;
            }
            let id = s.trace_id;
            if wanted.contains_key(&id) {
                continue;
            }
            let hit = q.is_empty()
                || by_id == Some(id)
                || s.attributes
                    .iter()
                    .any(|(k, v)| *k != "service" && text(v) == q);
            if hit {
                order.push(id);
                wanted.insert(id, TraceSummary::new(&hex32(id)));
            }
        }
        for s in spans.iter() {
            if let Some(t) = wanted.get_mut(&s.trace_id) {
                t.add(s);
            }
        }
        order.iter().filter_map(|id| wanted.remove(id)).collect()
    }

    /// The summaries of the traces `ids` from the spans this store keeps
    /// (a trace it has no span of is left out).
    pub fn summaries(&self, ids: &[&str]) -> Vec<TraceSummary> {
        let mut found: HashMap<u128, TraceSummary> = ids
            .iter()
            .filter_map(|id| Some((trace_id_from(id)?, TraceSummary::new(id))))
            .collect();
        let spans = self.spans.lock().unwrap_or_else(|e| e.into_inner());
        for s in spans.iter() {
            if let Some(t) = found.get_mut(&s.trace_id) {
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
            if s.start_ns / 1000 < since_us {
                break;
            }
            let (from, to, kind) = match s.kind {
                Kind::Client => match s.attribute("peer.service") {
                    Some(peer) => {
                        let kind = if s.attribute("rpc.system").is_some() {
                            "grpc"
                        } else {
                            "http"
                        };
                        (service_of(s).to_owned(), text(peer).into_owned(), kind)
                    }
                    None => continue,
                },
                Kind::Consumer => match s.attribute("messaging.source").map(text) {
                    Some(source) if !source.is_empty() => {
                        (source.into_owned(), service_of(s).to_owned(), "message")
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
            e.errors += u64::from(failed(s));
            e.total_us += duration_us(s);
        }
        edges.into_values().collect()
    }

    /// The most recent spans, newest first, at most `limit`.
    pub fn latest(&self, limit: usize) -> Vec<SpanRecord> {
        let spans = self.spans.lock().unwrap_or_else(|e| e.into_inner());
        spans.iter().rev().take(limit).map(|s| record(s)).collect()
    }
}

/// This process's store of recent spans, once [`layer`] installed it.
pub fn recent() -> Option<&'static Arc<Recent>> {
    RECENT.get()
}

static RECENT: OnceLock<Arc<Recent>> = OnceLock::new();

/// The layer that records Bazaar's spans ([`ours`]): a [`Recorded`] in
/// the span's extensions from its start, with its fields; at its close,
/// into the store and, with a collector, to the exporter.
///
/// Own code rather than tracing-opentelemetry and the SDK: those built
/// each span three times over (a builder, an SDK span, its export data),
/// and made a tenth of a traced checkout's CPU.
struct Record {
    recent: Arc<Recent>,
    export: Option<mpsc::Sender<Arc<Recorded>>>,
}

impl<S> tracing_subscriber::Layer<S> for Record
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if !ours(attrs.metadata()) {
            return;
        }
        let parent = if let Some(parent) = attrs.parent() {
            ctx.span(parent)
        } else if attrs.is_contextual() {
            ctx.lookup_current()
        } else {
            None
        };
        // The nearest recorded span above (others' spans are skipped).
        let parent = parent.and_then(|p| {
            p.scope().find_map(|s| {
                s.extensions()
                    .get::<Recorded>()
                    .map(|r| (r.trace_id, r.span_id))
            })
        });
        let mut span = Recorded::start(attrs.metadata().name(), parent, attrs.fields().len());
        attrs.record(&mut span);
        if let Some(this) = ctx.span(id) {
            this.extensions_mut().insert(span);
        }
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if let Some(span) = ctx.span(id)
            && let Some(recorded) = span.extensions_mut().get_mut::<Recorded>()
        {
            values.record(recorded);
        }
    }

    /// An error logged inside a recorded span marks it failed.
    fn on_event(&self, event: &tracing::Event<'_>, ctx: tracing_subscriber::layer::Context<'_, S>) {
        if *event.metadata().level() != tracing::Level::ERROR {
            return;
        }
        let Some(scope) = ctx.event_scope(event) else {
            return;
        };
        for span in scope {
            if let Some(recorded) = span.extensions_mut().get_mut::<Recorded>() {
                let mut message = Message(String::new());
                event.record(&mut message);
                recorded.status = Status::Error(message.0);
                return;
            }
        }
    }

    fn on_close(&self, id: tracing::span::Id, ctx: tracing_subscriber::layer::Context<'_, S>) {
        let Some(mut span) = ctx
            .span(&id)
            .and_then(|s| s.extensions_mut().remove::<Recorded>())
        else {
            return;
        };
        span.end_ns = bazaar_mesh::trace::now_ns();
        let span = Arc::new(span);
        if let Some(tx) = &self.export {
            // A full queue (the collector is slow or away) drops the span.
            let _ = tx.try_send(span.clone());
        }
        self.recent.push(span);
    }
}

/// An event's `message`.
struct Message(String);

impl tracing::field::Visit for Message {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

fn duration_us(span: &Recorded) -> u64 {
    (span.end_ns / 1000).saturating_sub(span.start_ns / 1000)
}

fn failed(span: &Recorded) -> bool {
    matches!(span.status, Status::Error(_))
}

/// A trace id as spans show it (see [`valid_trace_id`]).
fn trace_id_from(id: &str) -> Option<u128> {
    valid_trace_id(id)
        .then(|| u128::from_str_radix(id, 16).ok())
        .flatten()
}

/// A trace id in hex, as spans show it.
fn hex32(id: u128) -> String {
    format!("{id:032x}")
}

/// A span id in hex, as spans show it.
fn hex16(id: u64) -> String {
    format!("{id:016x}")
}

/// An attribute's value as text.
fn text(value: &Value) -> Cow<'_, str> {
    match value {
        Value::Str(s) => Cow::Borrowed(s.as_str()),
        other => Cow::Owned(other.to_string()),
    }
}

/// The `service` attribute every Bazaar span carries.
fn service_of(span: &Recorded) -> &str {
    match span.attribute("service") {
        Some(Value::Str(s)) => s.as_str(),
        _ => "bazaar",
    }
}

fn record(span: &Recorded) -> SpanRecord {
    let attributes = span
        .attributes
        .iter()
        .filter(|(k, _)| *k != "service")
        .map(|(k, v)| ((*k).to_owned(), text(v).into_owned()))
        .collect();
    SpanRecord {
        trace_id: hex32(span.trace_id),
        span_id: hex16(span.span_id),
        parent_span_id: (span.parent_span_id != 0).then(|| hex16(span.parent_span_id)),
        service: service_of(span).to_owned(),
        name: span.name.to_string(),
        kind: span.kind.name().to_owned(),
        start_us: span.start_ns / 1000,
        duration_us: duration_us(span),
        error: failed(span),
        attributes,
    }
}

/// At most this many spans go in one export request.
const EXPORT_BATCH: usize = 512;

/// Sends spans to the collector (OTLP/HTTP, protobuf) in batches, every
/// 200 ms at most, each service's under its own resource.
async fn export(endpoint: String, mut rx: mpsc::Receiver<Arc<Recorded>>) {
    let url = if endpoint.ends_with("/v1/traces") {
        endpoint
    } else {
        format!("{}/v1/traces", endpoint.trim_end_matches('/'))
    };
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
    {
        Ok(client) => client,
        Err(err) => {
            tracing::error!(error = %err, %url, "cannot export traces");
            return;
        }
    };
    let mut warned: Option<tokio::time::Instant> = None;
    let mut batch = Vec::with_capacity(EXPORT_BATCH);
    // One buffer for every request, taken back once a request is sent:
    // a new one each time came as fresh pages from the kernel, zeroed.
    let mut buf = bytes::BytesMut::new();
    let mut size_hint = 0;
    while let Some(first) = rx.recv().await {
        tokio::time::sleep(Duration::from_millis(200)).await;
        batch.push(first);
        // What waits goes in batches of EXPORT_BATCH: requests of a
        // bounded size, however many spans a burst made.
        loop {
            while batch.len() < EXPORT_BATCH {
                match rx.try_recv() {
                    Ok(span) => batch.push(span),
                    Err(_) => break,
                }
            }
            let drained = batch.len() < EXPORT_BATCH;
            buf.reserve(size_hint);
            otlp::request(&batch, &mut buf);
            size_hint = size_hint.max(buf.len());
            let body = buf.split().freeze();
            batch.clear();
            let sent = match client
                .post(&url)
                .header(reqwest::header::CONTENT_TYPE, "application/x-protobuf")
                .body(body)
                .send()
                .await
                .and_then(reqwest::Response::error_for_status)
            {
                // Read to its end, so that the connection is used again.
                Ok(answer) => answer.bytes().await.map(drop),
                Err(err) => Err(err),
            };
            // Once a minute at most: a collector away is not news.
            if let Err(err) = sent
                && warned.is_none_or(|at| at.elapsed() > Duration::from_secs(60))
            {
                tracing::warn!(error = %err, %url, "traces could not be exported; dropped");
                warned = Some(tokio::time::Instant::now());
            }
            if drained {
                break;
            }
        }
    }
}

/// Ended spans as an OTLP export request (`ExportTraceServiceRequest`),
/// written as protobuf straight from the SDK's spans: every service's
/// spans in one request, under its resource (`service.name`) and the
/// scope `bazaar`. Building the protocol's message types first took a
/// dozen allocations a span, a third of what exporting cost.
mod otlp {
    use std::borrow::Cow;

    use bazaar_mesh::trace::{Kind, Recorded, Status, Value};
    use bytes::{BufMut as _, BytesMut};
    use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

    /// Appends the request for `spans` to `out`.
    pub(super) fn request(spans: &[std::sync::Arc<Recorded>], out: &mut BytesMut) {
        let mut by_service: Vec<(&str, Vec<&Recorded>)> = Vec::new();
        for s in spans {
            let service = super::service_of(s);
            match by_service.iter_mut().find(|(name, _)| *name == service) {
                Some((_, group)) => group.push(s),
                None => by_service.push((service, vec![s])),
            }
        }
        for (service, group) in by_service {
            let service = Scalar::Str(Cow::Borrowed(service));
            // Resource { attributes: [service.name] }
            let attribute = key_value_len("service.name", &service);
            let resource = delimited(1, attribute);
            // ScopeSpans { scope: { name: "bazaar" }, spans }
            let scope = delimited(1, SCOPE.len());
            let lens: Vec<usize> = group.iter().map(|s| span_len(s)).collect();
            let scope_spans =
                delimited(1, scope) + lens.iter().map(|&len| delimited(2, len)).sum::<usize>();
            // ExportTraceServiceRequest { resource_spans: [ResourceSpans
            // { resource, scope_spans: [scope_spans] }] }
            field(out, 1, delimited(1, resource) + delimited(2, scope_spans));
            field(out, 1, resource);
            field(out, 1, attribute);
            put_key_value(out, "service.name", &service);
            field(out, 2, scope_spans);
            field(out, 1, scope);
            bytes(out, 1, SCOPE.as_bytes());
            for (s, len) in group.into_iter().zip(lens) {
                field(out, 2, len);
                put_span(out, s);
            }
        }
    }

    const SCOPE: &str = "bazaar";

    /// The size of a length-delimited field `tag` of `len` bytes.
    fn delimited(tag: u32, len: usize) -> usize {
        key_len(tag) + encoded_len_varint(len as u64) + len
    }

    /// The key and length of a length-delimited field; its bytes follow.
    fn field(out: &mut BytesMut, tag: u32, len: usize) {
        encode_key(tag, WireType::LengthDelimited, out);
        encode_varint(len as u64, out);
    }

    fn bytes(out: &mut BytesMut, tag: u32, b: &[u8]) {
        field(out, tag, b.len());
        out.put_slice(b);
    }

    fn varint(out: &mut BytesMut, tag: u32, v: u64) {
        encode_key(tag, WireType::Varint, out);
        encode_varint(v, out);
    }

    /// An attribute's value as OTLP's `AnyValue` has it.
    enum Scalar<'a> {
        Str(Cow<'a, str>),
        Bool(bool),
        Int(i64),
        Double(f64),
    }

    fn scalar(v: &Value) -> Scalar<'_> {
        match v {
            Value::Bool(b) => Scalar::Bool(*b),
            Value::I64(i) => Scalar::Int(*i),
            Value::F64(f) => Scalar::Double(*f),
            Value::Str(s) => Scalar::Str(Cow::Borrowed(s.as_str())),
        }
    }

    fn any_value_len(v: &Scalar<'_>) -> usize {
        match v {
            Scalar::Str(s) => delimited(1, s.len()),
            Scalar::Bool(_) => key_len(2) + 1,
            #[expect(clippy::cast_sign_loss, reason = "int64 goes on the wire as its bits")]
            Scalar::Int(i) => key_len(3) + encoded_len_varint(*i as u64),
            Scalar::Double(_) => key_len(4) + 8,
        }
    }

    fn put_any_value(out: &mut BytesMut, v: &Scalar<'_>) {
        match v {
            Scalar::Str(s) => bytes(out, 1, s.as_bytes()),
            Scalar::Bool(b) => varint(out, 2, u64::from(*b)),
            #[expect(clippy::cast_sign_loss, reason = "int64 goes on the wire as its bits")]
            Scalar::Int(i) => varint(out, 3, *i as u64),
            Scalar::Double(f) => {
                encode_key(4, WireType::SixtyFourBit, out);
                out.put_slice(&f.to_le_bytes());
            }
        }
    }

    /// KeyValue { key, value: AnyValue }
    fn key_value_len(key: &str, v: &Scalar<'_>) -> usize {
        delimited(1, key.len()) + delimited(2, any_value_len(v))
    }

    fn put_key_value(out: &mut BytesMut, key: &str, v: &Scalar<'_>) {
        bytes(out, 1, key.as_bytes());
        field(out, 2, any_value_len(v));
        put_any_value(out, v);
    }

    /// The attributes a span is sent with: the service is its resource's.
    fn attributes(s: &Recorded) -> impl Iterator<Item = (&str, Scalar<'_>)> {
        s.attributes
            .iter()
            .filter(|(k, _)| *k != "service")
            .map(|(k, v)| (*k, scalar(v)))
    }

    fn kind(s: &Recorded) -> u64 {
        match s.kind {
            Kind::Internal => 1,
            Kind::Server => 2,
            Kind::Client => 3,
            Kind::Producer => 4,
            Kind::Consumer => 5,
        }
    }

    /// Status { message = 2, code = 3 }: unset 0, ok 1, error 2.
    fn status(s: &Recorded) -> (&str, u64) {
        match &s.status {
            Status::Unset => ("", 0),
            Status::Ok => ("", 1),
            Status::Error(description) => (description, 2),
        }
    }

    fn status_len(message: &str, code: u64) -> usize {
        let message = if message.is_empty() {
            0
        } else {
            delimited(2, message.len())
        };
        let code = if code == 0 {
            0
        } else {
            key_len(3) + encoded_len_varint(code)
        };
        message + code
    }

    /// The span's flags (fixed32, tag 16): its W3C flags (sampled: it
    /// is recorded), and whether its parent is remote.
    fn flags(s: &Recorded) -> u32 {
        const SAMPLED: u32 = 0x1;
        const HAS_IS_REMOTE: u32 = 0x100;
        const IS_REMOTE: u32 = 0x200;
        let mut flags = SAMPLED | HAS_IS_REMOTE;
        if s.parent_is_remote {
            flags |= IS_REMOTE;
        }
        flags
    }

    /// Span { trace_id = 1, span_id = 2, parent_span_id = 4, name = 5,
    /// kind = 6, start = 7, end = 8, attributes = 9, status = 15,
    /// flags = 16 }
    fn span_len(s: &Recorded) -> usize {
        let parent = if s.parent_span_id == 0 {
            0
        } else {
            delimited(4, 8)
        };
        let (message, code) = status(s);
        delimited(1, 16)
            + delimited(2, 8)
            + parent
            + delimited(5, s.name.len())
            + key_len(6)
            + encoded_len_varint(kind(s))
            + 2 * (key_len(7) + 8)
            + attributes(s)
                .map(|(k, v)| delimited(9, key_value_len(k, &v)))
                .sum::<usize>()
            + delimited(15, status_len(message, code))
            + key_len(16)
            + 4
    }

    fn put_span(out: &mut BytesMut, s: &Recorded) {
        bytes(out, 1, &s.trace_id.to_be_bytes());
        bytes(out, 2, &s.span_id.to_be_bytes());
        if s.parent_span_id != 0 {
            bytes(out, 4, &s.parent_span_id.to_be_bytes());
        }
        bytes(out, 5, s.name.as_bytes());
        varint(out, 6, kind(s));
        for (tag, t) in [(7, s.start_ns), (8, s.end_ns)] {
            encode_key(tag, WireType::SixtyFourBit, out);
            out.put_slice(&t.to_le_bytes());
        }
        for (k, v) in attributes(s) {
            field(out, 9, key_value_len(k, &v));
            put_key_value(out, k, &v);
        }
        let (message, code) = status(s);
        field(out, 15, status_len(message, code));
        if !message.is_empty() {
            bytes(out, 2, message.as_bytes());
        }
        if code != 0 {
            varint(out, 3, code);
        }
        encode_key(16, WireType::ThirtyTwoBit, out);
        out.put_slice(&flags(s).to_le_bytes());
    }

    #[cfg(test)]
    mod tests {
        use std::sync::Arc;

        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
        use prost::Message as _;

        use super::*;

        fn span(service: &'static str, parent: u64, status: Status) -> Arc<Recorded> {
            Arc::new(Recorded {
                trace_id: 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736,
                span_id: rand::random::<u64>() | 1,
                parent_span_id: parent,
                parent_is_remote: parent != 0,
                kind: Kind::Consumer,
                name: "consume payments.charge".into(),
                start_ns: 1_796_161_575_085_328_123,
                end_ns: 1_796_161_575_085_400_000,
                attributes: vec![
                    ("service", Value::Str(service.into())),
                    ("messaging.message_id", Value::Str("m-1 \"é\"".into())),
                    ("attempt", Value::I64(-3)),
                    ("redelivered", Value::Bool(true)),
                    ("ratio", Value::F64(0.25)),
                    ("big", Value::I64(i64::MAX)),
                ],
                status,
            })
        }

        #[test]
        fn a_request_decodes_with_the_protocols_types() {
            let spans = [
                span("orders", 0x00f0_67aa_0ba9_02b7, Status::Unset),
                span("payments", 0, Status::Error("card declined".into())),
                span("orders", 7, Status::Ok),
            ];
            let mut out = BytesMut::new();
            request(&spans, &mut out);
            let req = ExportTraceServiceRequest::decode(out.freeze()).unwrap();
            assert_eq!(req.resource_spans.len(), 2);
            let mut seen = 0;
            for (rs, (service, n)) in req
                .resource_spans
                .iter()
                .zip([("orders", 2), ("payments", 1)])
            {
                let attrs = &rs.resource.as_ref().unwrap().attributes;
                assert_eq!(attrs[0].key, "service.name");
                assert_eq!(
                    attrs[0].value.as_ref().unwrap().value,
                    Some(Any::StringValue(service.into()))
                );
                assert_eq!(rs.scope_spans[0].scope.as_ref().unwrap().name, "bazaar");
                let got = &rs.scope_spans[0].spans;
                assert_eq!(got.len(), n);
                for g in got {
                    let want = spans
                        .iter()
                        .find(|s| s.span_id.to_be_bytes().as_slice() == g.span_id)
                        .unwrap();
                    assert_eq!(g.trace_id, want.trace_id.to_be_bytes());
                    let parent = if want.parent_span_id == 0 {
                        Vec::new()
                    } else {
                        want.parent_span_id.to_be_bytes().to_vec()
                    };
                    assert_eq!(g.parent_span_id, parent);
                    assert_eq!(g.name, "consume payments.charge");
                    assert_eq!(g.kind, 5);
                    assert_eq!(g.start_time_unix_nano, 1_796_161_575_085_328_123);
                    assert_eq!(g.end_time_unix_nano, 1_796_161_575_085_400_000);
                    assert_eq!(g.flags & 0xff, 1);
                    assert_eq!(g.flags & 0x200 != 0, want.parent_is_remote);
                    let values: Vec<(&str, Option<&Any>)> = g
                        .attributes
                        .iter()
                        .map(|kv| {
                            (
                                kv.key.as_str(),
                                kv.value.as_ref().and_then(|v| v.value.as_ref()),
                            )
                        })
                        .collect();
                    assert_eq!(
                        values,
                        [
                            (
                                "messaging.message_id",
                                Some(&Any::StringValue("m-1 \"é\"".into()))
                            ),
                            ("attempt", Some(&Any::IntValue(-3))),
                            ("redelivered", Some(&Any::BoolValue(true))),
                            ("ratio", Some(&Any::DoubleValue(0.25))),
                            ("big", Some(&Any::IntValue(i64::MAX))),
                        ]
                    );
                    let st = g.status.as_ref().unwrap();
                    let (message, code) = status(want);
                    assert_eq!((st.message.as_str(), st.code), (message, code as i32));
                    seen += 1;
                }
            }
            assert_eq!(seen, 3);
        }
    }
}

/// The layer that records spans for the process's subscriber, as
/// `settings` say; `None` after the first call, and when the ratio is 0.
/// Exporting needs a Tokio runtime: without one, spans are only kept in
/// memory.
pub fn layer<S>(settings: &Settings) -> Option<impl tracing_subscriber::Layer<S>>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    // 0 turns tracing off: no spans are made at all (the wire still
    // carries the callers' trace context on).
    if settings.sample_ratio <= 0.0 {
        return None;
    }
    let recent = Arc::new(Recent::new(settings.keep_spans));
    RECENT.set(recent.clone()).ok()?;
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
    // so the layer records every span of ours it sees. It has no filter
    // of its own: a per-layer filter is upset by libraries' `enabled!`
    // checks (sqlx makes them), which leave filter state on their thread
    // that disables the next span there. The process's one filter admits
    // Bazaar's spans ([`ours`]) whatever the log level.
    bazaar_mesh::trace::set_sample_ratio(settings.sample_ratio);
    Some(Record { recent, export })
}

/// Whether a callsite is one of Bazaar's spans: they name their service.
pub fn ours(meta: &tracing::Metadata<'_>) -> bool {
    meta.is_span() && meta.fields().field("service").is_some()
}

/// The trace and span ids of a span, when it is recorded.
pub fn ids_of<S>(span: &tracing_subscriber::registry::SpanRef<'_, S>) -> Option<(String, String)>
where
    S: for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    span.extensions()
        .get::<Recorded>()
        .map(|r| (hex32(r.trace_id), hex16(r.span_id)))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_are_recorded_as_one_tree() {
        use tracing_subscriber::layer::SubscriberExt as _;
        let recent = Arc::new(Recent::new(100));
        let subscriber = tracing_subscriber::registry().with(Record {
            recent: recent.clone(),
            export: None,
        });
        let tp = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let (sent, root_sent) = tracing::subscriber::with_default(subscriber, || {
            let server = tracing::info_span!(
                "http",
                service = "orders",
                otel.name = "GET",
                otel.kind = "server",
                otel.status_code = tracing::field::Empty,
                http.response.status_code = tracing::field::Empty,
                attempt = 3_u32,
            );
            bazaar_mesh::trace::follow(&server, Some(tp));
            bazaar_mesh::trace::rename(&server, "GET /orders/{id}".into());
            let sent = bazaar_mesh::trace::traceparent_of(&server).unwrap();
            server.in_scope(|| {
                // Not one of ours: not recorded, and its child is the
                // server span's.
                tracing::info_span!("library").in_scope(|| {
                    tracing::info_span!("store", service = "orders", otel.name = "INSERT orders")
                        .in_scope(|| tracing::error!("disk full"));
                });
            });
            server.record("http.response.status_code", 500);
            server.record("otel.status_code", "ERROR");
            drop(server);
            let root = tracing::info_span!("call", service = "gateway", otel.kind = "client");
            let root_sent = bazaar_mesh::trace::traceparent_of(&root).unwrap();
            (sent, root_sent)
        });
        let spans: Vec<Arc<Recorded>> = recent.spans.lock().unwrap().iter().cloned().collect();
        assert_eq!(spans.len(), 3, "{spans:#?}");
        let (store, server, root) = (&spans[0], &spans[1], &spans[2]);

        assert_eq!(server.trace_id, 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736);
        assert_eq!(server.parent_span_id, 0x00f0_67aa_0ba9_02b7);
        assert!(server.parent_is_remote);
        assert_eq!(server.name, "GET /orders/{id}");
        assert_eq!(server.kind, Kind::Server);
        assert_eq!(server.status, Status::Error(String::new()));
        assert_eq!(
            server.attributes,
            [
                ("service", Value::Str("orders".into())),
                ("attempt", Value::I64(3)),
                ("http.response.status_code", Value::I64(500)),
            ]
        );
        assert!(server.start_ns > 0 && server.end_ns >= server.start_ns);
        assert_eq!(
            sent,
            format!(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-{:016x}-01",
                server.span_id
            )
        );

        assert_eq!(store.trace_id, server.trace_id);
        assert_eq!(store.parent_span_id, server.span_id);
        assert!(!store.parent_is_remote);
        assert_ne!(store.span_id, server.span_id);
        assert_eq!(store.name, "INSERT orders");
        assert_eq!(store.kind, Kind::Internal);
        assert_eq!(store.status, Status::Error("disk full".into()));

        assert_ne!(root.trace_id, server.trace_id);
        assert_eq!(root.parent_span_id, 0);
        assert_eq!(root.kind, Kind::Client);
        assert_eq!(
            root_sent,
            format!("00-{:032x}-{:016x}-01", root.trace_id, root.span_id)
        );

        let shown = recent.trace("4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(shown.len(), 2);
        assert_eq!(shown[0].span_id, format!("{:016x}", server.span_id));
        assert_eq!(shown[1].parent_span_id, Some(shown[0].span_id.clone()));
        assert_eq!(shown[0].attributes["http.response.status_code"], "500");
        assert!(shown[0].error && shown[1].error);
    }

    #[test]
    fn the_store_is_bounded_by_count_and_by_bytes() {
        let span = |request_id: String| {
            let mut s = Recorded::start("http", None, 2);
            s.attributes.push(("request_id", Value::Str(request_id)));
            Arc::new(s)
        };
        let recent = Recent::new(3);
        for _ in 0..5 {
            recent.push(span("r".into()));
        }
        assert_eq!(recent.spans.lock().unwrap().len(), 3);
        // Spans whose fields are big (a client's 64 KiB request id) are
        // kept to the byte budget, not the count.
        let recent = Recent::new(100_000);
        for _ in 0..1_000 {
            recent.push(span("x".repeat(64 << 10)));
        }
        // About KEEP_BYTES / 64 KiB of them.
        let kept = recent.spans.lock().unwrap().len();
        let most = KEEP_BYTES / (64 << 10);
        assert!((most * 3 / 4..=most).contains(&kept), "{kept} kept");
        let bytes: usize = recent.spans.lock().unwrap().iter().map(|s| s.size()).sum();
        assert!(bytes <= KEEP_BYTES, "{bytes}");
        assert_eq!(recent.spans.lock().unwrap().bytes(), bytes);
    }
}
