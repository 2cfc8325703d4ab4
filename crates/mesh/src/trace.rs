//! W3C trace context between `tracing` spans and the wire. A span made
//! with a `service` field is recorded as an OpenTelemetry span
//! ([`Recorded`], kept in the span's extensions by the layer
//! `bazaar_chassis::traces` installs); HTTP headers, gRPC metadata, AMQP
//! headers and envelopes carry its `traceparent`, so every hop continues
//! the same trace with a span of its own.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing_subscriber::registry::LookupSpan as _;

/// A recorded span: made when one of Bazaar's spans starts, kept in its
/// extensions while it runs, then handed to the store and the exporter.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    /// Not 0.
    pub trace_id: u128,
    /// Not 0.
    pub span_id: u64,
    /// 0 for a trace's root.
    pub parent_span_id: u64,
    /// The parent is another process's (it came in a `traceparent`).
    pub parent_is_remote: bool,
    pub name: Cow<'static, str>,
    pub kind: Kind,
    /// Unix nanoseconds.
    pub start_ns: u64,
    /// Unix nanoseconds; 0 until the span ends.
    pub end_ns: u64,
    /// The span's fields, in the order recorded (`otel.*` ones excepted:
    /// they set the name, kind and status).
    pub attributes: Vec<(&'static str, Value)>,
    pub status: Status,
}

/// OpenTelemetry's span kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kind {
    #[default]
    Internal,
    Server,
    Client,
    Producer,
    Consumer,
}

impl Kind {
    /// From an `otel.kind` field; `None` for another word.
    pub fn from_name(name: &str) -> Option<Self> {
        [
            Self::Internal,
            Self::Server,
            Self::Client,
            Self::Producer,
            Self::Consumer,
        ]
        .into_iter()
        .find(|kind| kind.name().eq_ignore_ascii_case(name))
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Internal => "internal",
            Self::Server => "server",
            Self::Client => "client",
            Self::Producer => "producer",
            Self::Consumer => "consumer",
        }
    }
}

/// A span's outcome (`otel.status_code`, or an error logged inside it).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Status {
    #[default]
    Unset,
    Ok,
    Error(String),
}

/// An attribute's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    I64(i64),
    Bool(bool),
    F64(f64),
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Str(s) => f.write_str(s),
            Self::I64(i) => write!(f, "{i}"),
            Self::Bool(b) => write!(f, "{b}"),
            Self::F64(x) => write!(f, "{x}"),
        }
    }
}

impl Recorded {
    /// A span starting now, with room for `fields` attributes: a child
    /// of `parent` (its trace and span id), else the root of a new trace.
    pub fn start(name: &'static str, parent: Option<(u128, u64)>, fields: usize) -> Self {
        let (trace_id, parent_span_id) = parent.unwrap_or_else(|| (new_trace_id(), 0));
        Self {
            trace_id,
            span_id: new_span_id(),
            parent_span_id,
            parent_is_remote: false,
            name: Cow::Borrowed(name),
            kind: Kind::Internal,
            start_ns: now_ns(),
            end_ns: 0,
            attributes: Vec::with_capacity(fields),
            status: Status::Unset,
        }
    }

    /// Takes a text field: `otel.name`, `otel.kind` and
    /// `otel.status_code` (`ERROR` or `OK`) set the span's name, kind and
    /// status; any other is an attribute.
    fn set_text(&mut self, key: &'static str, value: Cow<'_, str>) {
        match key {
            "otel.name" => self.name = Cow::Owned(value.into_owned()),
            "otel.kind" => {
                if let Some(kind) = Kind::from_name(&value) {
                    self.kind = kind;
                }
            }
            "otel.status_code" => {
                if value.eq_ignore_ascii_case("error") {
                    self.status = Status::Error(String::new());
                } else if value.eq_ignore_ascii_case("ok") {
                    self.status = Status::Ok;
                }
            }
            key => self.put(key, Value::Str(value.into_owned())),
        }
    }

    /// Sets attribute `key` (a field recorded again replaces its value).
    fn put(&mut self, key: &'static str, value: Value) {
        match self.attributes.iter_mut().find(|(k, _)| *k == key) {
            Some((_, old)) => *old = value,
            None => self.attributes.push((key, value)),
        }
    }

    /// About how much memory the span takes: itself, its attributes and
    /// their text.
    pub fn size(&self) -> usize {
        let text = |v: &Value| match v {
            Value::Str(s) => s.capacity(),
            _ => 0,
        };
        let name = match &self.name {
            Cow::Owned(s) => s.capacity(),
            Cow::Borrowed(_) => 0,
        };
        let status = match &self.status {
            Status::Error(message) => message.capacity(),
            _ => 0,
        };
        std::mem::size_of::<Self>()
            + self.attributes.capacity() * std::mem::size_of::<(&str, Value)>()
            + self.attributes.iter().map(|(_, v)| text(v)).sum::<usize>()
            + name
            + status
    }

    /// The value of attribute `key`.
    pub fn attribute(&self, key: &str) -> Option<&Value> {
        self.attributes
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }
}

/// Unix nanoseconds now.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn new_trace_id() -> u128 {
    rand::random::<u128>().max(1)
}

fn new_span_id() -> u64 {
    rand::random::<u64>().max(1)
}

/// Puts every field of a span or record into a [`Recorded`].
impl tracing::field::Visit for Recorded {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.set_text(field.name(), Cow::Borrowed(value));
    }

    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.put(field.name(), Value::I64(value));
    }

    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        let value = i64::try_from(value).map_or_else(|_| Value::Str(value.to_string()), Value::I64);
        self.put(field.name(), value);
    }

    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.put(field.name(), Value::Bool(value));
    }

    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        self.put(field.name(), Value::F64(value));
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.set_text(field.name(), Cow::Owned(format!("{value:?}")));
    }
}

/// Runs `f` on the record of `span`, when it is recorded (a layer keeps
/// records in this process's subscriber, and the span is enabled).
fn with_recorded<R>(span: &tracing::Span, f: impl FnOnce(&mut Recorded) -> R) -> Option<R> {
    span.with_subscriber(|(id, dispatch)| {
        let registry = dispatch.downcast_ref::<tracing_subscriber::Registry>()?;
        let data = registry.span(id)?;
        let mut extensions = data.extensions_mut();
        extensions.get_mut::<Recorded>().map(f)
    })
    .flatten()
}

/// `trace_sample_ratio` as f64 bits; 0 while traces are not recorded.
static RATIO: AtomicU64 = AtomicU64::new(0);

/// Sets the share of new traces recorded (`bazaar_chassis::traces`
/// does, when it installs the recording).
pub fn set_sample_ratio(ratio: f64) {
    RATIO.store(ratio.clamp(0.0, 1.0).to_bits(), Ordering::Relaxed);
}

fn ratio() -> f64 {
    f64::from_bits(RATIO.load(Ordering::Relaxed))
}

/// Whether a trace arriving with `tp` (a request's or a message's
/// `traceparent`) is recorded here: as its sender decided (the sampled
/// flag), else by `trace_sample_ratio`'s dice for a new trace. The one
/// decision is made where work enters a process; the spans of a trace
/// not recorded are not made at all, only its context passed on (with
/// the flag unset, so that the next hops do not record it either).
pub fn recorded(tp: Option<&[u8]>) -> bool {
    let ratio = ratio();
    if ratio <= 0.0 {
        return false;
    }
    match tp.and_then(remote) {
        Some(cx) => cx.is_sampled(),
        None => ratio >= 1.0 || rand::random::<f64>() < ratio,
    }
}

/// For a request arriving without a valid `traceparent`: `None` when its
/// new trace is recorded (its spans start it), else the `traceparent` of
/// a new trace not recorded, to serve it under and pass on.
pub fn unrecorded_root() -> Option<String> {
    let ratio = ratio();
    // Off: nothing is recorded and hops start their own contexts as ever.
    if ratio <= 0.0 || ratio >= 1.0 || rand::random::<f64>() < ratio {
        return None;
    }
    Some(new_unrecorded())
}

/// Whether traces are recorded in this process at all.
pub fn recording() -> bool {
    ratio() > 0.0
}

/// The `traceparent` of a new trace, not recorded (sampled flag unset).
pub fn new_unrecorded() -> String {
    let mut tp = crate::client::new_traceparent();
    tp.replace_range(53..55, "00");
    tp
}

/// Whether `tp` is a valid `traceparent` whose sender chose not to record
/// its trace.
pub fn declined(tp: Option<&[u8]>) -> bool {
    tp.and_then(remote).is_some_and(|cx| !cx.is_sampled())
}

/// Whether the span current here is recorded: a child span (a call, a
/// saga step, a write) is made only inside one, so that a trace not
/// recorded makes none, and none starts a trace of its own.
pub fn in_recorded_span() -> bool {
    !tracing::Span::current().is_disabled()
}

/// The span a `traceparent` names, as another process sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Remote {
    pub trace_id: u128,
    pub span_id: u64,
    pub flags: u8,
}

impl Remote {
    pub fn is_sampled(&self) -> bool {
        self.flags & 1 == 1
    }
}

/// The remote span a `traceparent` names, when it is well-formed.
pub fn remote(tp: &[u8]) -> Option<Remote> {
    if !crate::client::valid_traceparent_bytes(tp) {
        return None;
    }
    let text = std::str::from_utf8(tp).ok()?;
    let cx = Remote {
        trace_id: u128::from_str_radix(&text[3..35], 16).ok()?,
        span_id: u64::from_str_radix(&text[36..52], 16).ok()?,
        flags: u8::from_str_radix(&text[53..55], 16).ok()?,
    };
    (cx.trace_id != 0 && cx.span_id != 0).then_some(cx)
}

/// Makes the span `tp` names the parent of `span` (not yet entered).
/// Without a valid `traceparent` the span starts a trace, or continues
/// the one it is inside.
pub fn follow(span: &tracing::Span, tp: Option<&[u8]>) {
    if let Some(cx) = tp.and_then(remote) {
        with_recorded(span, |r| {
            r.trace_id = cx.trace_id;
            r.parent_span_id = cx.span_id;
            r.parent_is_remote = true;
        });
    }
}

/// Names `span` (once routing knows what the request was).
pub fn rename(span: &tracing::Span, name: String) {
    with_recorded(span, |r| r.name = Cow::Owned(name));
}

/// The `traceparent` of `span`: its trace and its own span id. `None`
/// when spans are not recorded (no recording layer, or the span is
/// disabled).
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    with_recorded(span, |r| {
        crate::client::traceparent_of_ids(r.trace_id, r.span_id, 1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sender_decides_else_the_ratio() {
        // One test: the ratio is process-wide.
        set_sample_ratio(0.0);
        let sampled = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let unsampled = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        assert!(!recorded(Some(sampled)), "off: nothing is recorded");
        assert_eq!(unrecorded_root(), None, "off: no context is made up");
        set_sample_ratio(0.01);
        assert!(recorded(Some(sampled)));
        assert!(!recorded(Some(unsampled)));
        let kept = (0..20_000).filter(|_| recorded(None)).count();
        assert!((100..=300).contains(&kept), "{kept} of 20 000 at 0.01");
        let roots: Vec<Option<String>> = (0..1000).map(|_| unrecorded_root()).collect();
        let unrecorded = roots.iter().flatten().count();
        assert!(
            unrecorded > 950,
            "{unrecorded} of 1000 not recorded at 0.01"
        );
        for tp in roots.iter().flatten() {
            assert!(
                tp.ends_with("-00") && !recorded(Some(tp.as_bytes())),
                "{tp}"
            );
        }
        set_sample_ratio(1.0);
        assert!(recorded(None));
        assert!(!recorded(Some(unsampled)), "the sender's word holds");
        assert_eq!(unrecorded_root(), None);
    }

    #[test]
    fn a_traceparent_names_its_span() {
        let tp = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = remote(tp).unwrap();
        assert_eq!(cx.trace_id, 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736);
        assert_eq!(cx.span_id, 0x00f0_67aa_0ba9_02b7);
        assert!(cx.is_sampled());
        let written = crate::client::traceparent_of_ids(cx.trace_id, cx.span_id, cx.flags);
        assert_eq!(written.as_bytes(), tp);
        assert!(remote(b"00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none());
        assert!(remote(b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01").is_none());
        assert!(remote(b"garbage").is_none());
        // No layer installed: nothing is recorded, nothing is made up.
        assert_eq!(traceparent_of(&tracing::info_span!("x")), None);
    }
}
