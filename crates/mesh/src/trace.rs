//! W3C trace context between `tracing` spans and the wire. A span made
//! with a `service` field becomes an OpenTelemetry span (through
//! tracing-opentelemetry, once `bazaar_chassis::traces` installed it);
//! HTTP headers, gRPC metadata, AMQP headers and envelopes carry its
//! `traceparent`, so every hop continues the same trace with a span of
//! its own.

use std::sync::atomic::{AtomicU64, Ordering};

use opentelemetry::Context;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

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

/// The remote span a `traceparent` names, when it is well-formed.
pub fn remote(tp: &[u8]) -> Option<SpanContext> {
    if !crate::client::valid_traceparent_bytes(tp) {
        return None;
    }
    let text = std::str::from_utf8(tp).ok()?;
    let trace = u128::from_str_radix(&text[3..35], 16).ok()?;
    let span = u64::from_str_radix(&text[36..52], 16).ok()?;
    let flags = u8::from_str_radix(&text[53..55], 16).ok()?;
    let cx = SpanContext::new(
        TraceId::from(trace),
        SpanId::from(span),
        TraceFlags::new(flags),
        true,
        TraceState::default(),
    );
    cx.is_valid().then_some(cx)
}

/// Makes the span `tp` names the parent of `span` (not yet entered).
/// Without a valid `traceparent` the span starts a trace, or continues
/// the one it is inside.
pub fn follow(span: &tracing::Span, tp: Option<&[u8]>) {
    if let Some(cx) = tp.and_then(remote) {
        let _ = span.set_parent(Context::new().with_remote_span_context(cx));
    }
}

/// Names `span` (once routing knows what the request was). Recording
/// `otel.name` would be lost on a span already started.
pub fn rename(span: &tracing::Span, name: String) {
    span.context().span().update_name(name);
}

/// The `traceparent` of `span`: its trace and its own span id. `None`
/// when spans are not recorded (no OpenTelemetry layer, or the span is
/// disabled).
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let span_ref = cx.span();
    let sc = span_ref.span_context();
    sc.is_valid().then(|| {
        crate::client::traceparent_of_ids(
            u128::from_be_bytes(sc.trace_id().to_bytes()),
            u64::from_be_bytes(sc.span_id().to_bytes()),
            sc.trace_flags().to_u8(),
        )
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
        assert_eq!(
            cx.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(cx.span_id().to_string(), "00f067aa0ba902b7");
        assert!(cx.is_sampled() && cx.is_remote());
        let written = crate::client::traceparent_of_ids(
            u128::from_be_bytes(cx.trace_id().to_bytes()),
            u64::from_be_bytes(cx.span_id().to_bytes()),
            cx.trace_flags().to_u8(),
        );
        assert_eq!(written.as_bytes(), tp);
        assert!(remote(b"00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none());
        assert!(remote(b"garbage").is_none());
        // No layer installed: nothing is recorded, nothing is made up.
        assert_eq!(traceparent_of(&tracing::info_span!("x")), None);
    }
}
