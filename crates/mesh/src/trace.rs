//! W3C trace context between `tracing` spans and the wire. A span made
//! with a `service` field becomes an OpenTelemetry span (through
//! tracing-opentelemetry, once `bazaar_chassis::traces` installed it);
//! HTTP headers, gRPC metadata, AMQP headers and envelopes carry its
//! `traceparent`, so every hop continues the same trace with a span of
//! its own.

use opentelemetry::Context;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

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
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(remote(b"00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none());
        assert!(remote(b"garbage").is_none());
        // No layer installed: nothing is recorded, nothing is made up.
        assert_eq!(traceparent_of(&tracing::info_span!("x")), None);
    }
}
