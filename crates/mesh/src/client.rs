//! The client services call each other with, by service name:
//! `client.get("catalog", &["products", id]).context(&headers).send()`.
//! Its transport is a pooled `reqwest` client; everything else (bulkhead,
//! discovery, balancing, breakers, timeout, retries) is
//! [`Upstreams::call`]. Paths are built from segments it escapes, and every
//! call carries `X-Request-Id` and a `traceparent`: its own span's (see
//! [`crate::trace`]).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::Instrument;

use crate::Discovery;
use crate::balance::Strategy;
use crate::error::{CallError, ErrorKind, Failure};
use crate::upstream::{CallOptions, Instruments, Probe, Settings, Upstreams};

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// Largest answer a call reads into memory; a longer one is a bad answer.
pub const MAX_ANSWER: usize = 8 * 1024 * 1024;

/// Calls other services by name.
#[derive(Clone)]
pub struct Client {
    upstreams: Arc<Upstreams>,
    instruments: Instruments,
    http: reqwest::Client,
    timeout: Duration,
    retries: u32,
    /// The calling service, for its calls' spans.
    caller: &'static str,
}

impl Client {
    /// A client over `discovery`; `timeout` bounds each attempt, whole
    /// answer included. Its metrics go to fresh [`Instruments`]: see
    /// [`Client::instruments`].
    pub fn new(discovery: Discovery, settings: Settings, timeout: Duration) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(1))
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .unwrap_or_default();
        let probing = http.clone();
        let probe: Probe = Arc::new(move |member| {
            let http = probing.clone();
            Box::pin(async move {
                let url = format!("http://{}/health", member.authority);
                matches!(http.get(url).send().await, Ok(r) if r.status() == StatusCode::OK)
            })
        });
        let instruments = Instruments::default();
        Self {
            upstreams: Upstreams::new(discovery, settings, probe, &instruments),
            instruments,
            http,
            timeout,
            retries: 1,
            caller: "",
        }
    }

    /// The same client, its calls' spans attributed to service `caller`.
    #[must_use]
    pub fn calling_as(mut self, caller: &'static str) -> Self {
        self.caller = caller;
        self
    }

    pub fn upstreams(&self) -> &Arc<Upstreams> {
        &self.upstreams
    }

    /// The metrics of this client's calls, to register once per service
    /// and to share with other [`Upstreams`] of the same service.
    pub fn instruments(&self) -> &Instruments {
        &self.instruments
    }

    /// A request to `service` at the path made of `segments`, each escaped.
    pub fn request(&self, method: Method, service: &str, segments: &[&str]) -> Request<'_> {
        Request {
            client: self,
            idempotent: idempotent(&method),
            method,
            service: service.to_owned(),
            path: path(segments),
            headers: HeaderMap::new(),
            body: Bytes::new(),
            timeout: self.timeout,
        }
    }

    pub fn get(&self, service: &str, segments: &[&str]) -> Request<'_> {
        self.request(Method::GET, service, segments)
    }
}

/// Whether a method may be sent twice (RFC 9110 section 9.2.2).
pub fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS | Method::TRACE
    )
}

/// One call being put together.
pub struct Request<'a> {
    client: &'a Client,
    method: Method,
    idempotent: bool,
    service: String,
    /// The escaped path and query, or why it cannot be sent.
    path: Result<String, &'static str>,
    headers: HeaderMap,
    body: Bytes,
    timeout: Duration,
}

/// The escaped path of `segments`. A segment that is empty, `.` or `..`
/// is refused: URL parsers drop or resolve those, which would send the
/// call to another resource than the one named.
fn path(segments: &[&str]) -> Result<String, &'static str> {
    let mut out = String::new();
    for s in segments {
        if s.is_empty() || *s == "." || *s == ".." {
            return Err("an empty, '.' or '..' path segment");
        }
        out.push('/');
        escape_into(&mut out, s);
    }
    if out.is_empty() {
        out.push('/');
    }
    Ok(out)
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
pub(crate) fn escape_into(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 15)]));
        }
    }
}

impl Request<'_> {
    /// Adds `name=value` to the query, both escaped.
    #[must_use]
    pub fn query(mut self, name: &str, value: &str) -> Self {
        if let Ok(p) = &mut self.path {
            p.push(if p.contains('?') { '&' } else { '?' });
            escape_into(p, name);
            p.push('=');
            escape_into(p, value);
        }
        self
    }

    #[must_use]
    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// Carries on the request being served: its `X-Request-Id` and its
    /// trace (with a new span id).
    #[must_use]
    pub fn context(mut self, incoming: &HeaderMap) -> Self {
        if let Some(id) = incoming.get(X_REQUEST_ID) {
            self.headers.insert(X_REQUEST_ID, id.clone());
        }
        if let Some(tp) = incoming.get(TRACEPARENT) {
            self.headers.insert(TRACEPARENT, tp.clone());
        }
        self
    }

    /// Calls on the caller's behalf: its `Authorization` goes along, so
    /// the service called applies the caller's rights, not the service's.
    #[must_use]
    pub fn on_behalf_of(mut self, incoming: &HeaderMap) -> Self {
        if let Some(auth) = incoming.get(header::AUTHORIZATION) {
            self.headers.insert(header::AUTHORIZATION, auth.clone());
        }
        self
    }

    /// A JSON body.
    #[must_use]
    pub fn json<T: Serialize>(mut self, body: &T) -> Self {
        match serde_json::to_vec(body) {
            Ok(bytes) => {
                self.body = Bytes::from(bytes);
                self.headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
            }
            Err(_) => self.path = Err("a body that cannot be encoded"),
        }
        self
    }

    /// Bounds each attempt (default: the client's).
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sends the call and reads the whole answer.
    pub async fn send(mut self) -> Result<Reply, CallError> {
        let path = self.path.map_err(|why| {
            CallError::new(&self.service, ErrorKind::InvalidRequest, false).because(why)
        })?;
        if !self.headers.contains_key(X_REQUEST_ID) {
            let id = format!("{:032x}", rand::random::<u128>());
            if let Ok(v) = HeaderValue::from_str(&id) {
                self.headers.insert(X_REQUEST_ID, v);
            }
        }
        // The call's span carries the trace on; without recorded spans,
        // the caller's trace (or a new one) with a span id of this call.
        let span = if crate::trace::in_recorded_span() {
            tracing::info_span!(
                "call",
                service = self.client.caller,
                otel.name = %format_args!("{} {}", self.method, self.service),
                otel.kind = "client",
                peer.service = %self.service,
                url.path = %path,
                http.response.status_code = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
            )
        } else {
            tracing::Span::none()
        };
        match crate::trace::traceparent_of(&span).and_then(|tp| HeaderValue::from_str(&tp).ok()) {
            Some(tp) => {
                self.headers.insert(TRACEPARENT, tp);
            }
            // Outside a recorded trace, with none given: a trace not
            // recorded, so the callee does not start one of its own.
            None if crate::trace::recording()
                && !self
                    .headers
                    .get(TRACEPARENT)
                    .is_some_and(|v| valid_traceparent_bytes(v.as_bytes())) =>
            {
                if let Ok(v) = HeaderValue::from_str(&crate::trace::new_unrecorded()) {
                    self.headers.insert(TRACEPARENT, v);
                }
            }
            None => continue_trace(&mut self.headers),
        }
        let options = CallOptions {
            strategy: Strategy::RoundRobin,
            timeout: self.timeout,
            retries: self.client.retries,
            idempotent: self.idempotent,
            client: None,
        };
        let (http, method, headers, body) =
            (&self.client.http, &self.method, &self.headers, &self.body);
        let path = path.as_str();
        let (reply, _) = self
            .client
            .upstreams
            .call(&self.service, &options, |member, _| async move {
                let url = format!("http://{}{path}", member.authority);
                let response = http
                    .request(method.clone(), url)
                    .headers(headers.clone())
                    .body(body.clone())
                    .send()
                    .await
                    .map_err(|e| {
                        if e.is_connect() {
                            Failure::connect(e)
                        } else {
                            Failure::bad_answer(e)
                        }
                    })?;
                read(response).await
            })
            .instrument(span.clone())
            .await
            .inspect_err(|_| {
                span.record("otel.status_code", "ERROR");
            })?;
        span.record("http.response.status_code", reply.status.as_u16());
        if reply.status.is_server_error() {
            span.record("otel.status_code", "ERROR");
        }
        Ok(Reply {
            service: self.service,
            ..reply
        })
    }
}

async fn read(mut response: reqwest::Response) -> Result<Reply, Failure> {
    let status = response.status();
    let headers = std::mem::take(response.headers_mut());
    if response
        .content_length()
        .is_some_and(|n| n > MAX_ANSWER as u64)
    {
        return Err(Failure::bad_answer("the answer is too large"));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(Failure::bad_answer)? {
        if body.len() + chunk.len() > MAX_ANSWER {
            return Err(Failure::bad_answer("the answer is too large"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Reply {
        service: String::new(),
        status,
        headers,
        body: Bytes::from(body),
    })
}

/// Whether `tp` is a well-formed `traceparent` (W3C Trace Context: four
/// fields, any version but `ff`) with a trace id that is not all zeros.
pub fn valid_traceparent(tp: &str) -> bool {
    valid_traceparent_bytes(tp.as_bytes())
}

/// [`valid_traceparent`] on the field's bytes: `vv-<32 hex>-<16 hex>-ff`,
/// 55 bytes exactly.
pub(crate) fn valid_traceparent_bytes(tp: &[u8]) -> bool {
    tp.len() == 55
        && tp.iter().enumerate().all(|(i, &b)| match i {
            2 | 35 | 52 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
        && !tp[..2].eq_ignore_ascii_case(b"ff")
        && tp[3..35].iter().any(|&b| b != b'0')
}

/// Gives an outgoing call a `traceparent` in the trace of the one
/// `headers` carry (a new trace without one, or when it is malformed),
/// with a span id of its own. The gateway does this on every request, so
/// it is built on the stack and allocates once.
pub fn continue_trace(headers: &mut HeaderMap) {
    // One lookup for the read and the write.
    match headers.entry(TRACEPARENT) {
        header::Entry::Occupied(mut e) => {
            let child = child_traceparent(Some(e.get().as_bytes()));
            e.insert(child);
        }
        header::Entry::Vacant(e) => {
            e.insert(child_traceparent(None));
        }
    }
}

/// A `traceparent` in the trace of `parent` (a new trace without one, or
/// when it is malformed), with a new span id.
pub fn child_traceparent(parent: Option<&[u8]>) -> HeaderValue {
    // Hex digits and dashes: always a valid field value.
    HeaderValue::from_bytes(&traceparent(parent)).unwrap_or(HeaderValue::from_static(""))
}

/// A new root `traceparent`: random trace and span ids, sampled.
pub fn new_traceparent() -> String {
    traceparent(None).iter().map(|&b| char::from(b)).collect()
}

/// [`child_traceparent`]'s 55 bytes, built on the stack.
fn traceparent(parent: Option<&[u8]>) -> [u8; 55] {
    let mut out = *b"00-00000000000000000000000000000000-0000000000000000-01";
    match parent.filter(|p| valid_traceparent_bytes(p)) {
        Some(p) => {
            out[3..35].copy_from_slice(&p[3..35]);
            out[53..55].copy_from_slice(&p[53..55]);
            out.make_ascii_lowercase();
        }
        None => hex(&mut out[3..35], rand::random::<u128>() | 1),
    }
    hex(&mut out[36..52], u128::from(rand::random::<u64>() | 1));
    out
}

/// The `traceparent` naming the span `span` of trace `trace`, with `flags`.
pub(crate) fn traceparent_of_ids(trace: u128, span: u64, flags: u8) -> String {
    let mut out = *b"00-00000000000000000000000000000000-0000000000000000-00";
    hex(&mut out[3..35], trace);
    hex(&mut out[36..52], u128::from(span));
    hex(&mut out[53..55], u128::from(flags));
    out.iter().map(|&b| char::from(b)).collect()
}

/// Writes the low `out.len() / 2` bytes of `v` as lowercase hex.
fn hex(out: &mut [u8], v: u128) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let bytes = v.to_be_bytes();
    let bytes = &bytes[bytes.len() - out.len() / 2..];
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0xf)];
    }
}

/// A whole answer.
#[derive(Debug)]
pub struct Reply {
    service: String,
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON; one that does not parse is a bad answer.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, CallError> {
        serde_json::from_slice(&self.body)
            .map_err(|e| CallError::new(&self.service, ErrorKind::BadAnswer, false).because(e))
    }

    /// A bad answer naming an unexpected status, for the caller's error.
    pub fn unexpected(&self) -> CallError {
        CallError::new(&self.service, ErrorKind::BadAnswer, false)
            .because(format!("unexpected status {}", self.status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_escaped_and_dot_segments_refused() {
        assert_eq!(
            path(&["products", "../health?x=1#f"]).as_deref(),
            Ok("/products/..%2Fhealth%3Fx%3D1%23f")
        );
        assert_eq!(
            path(&["products", "%2e%2e"]).as_deref(),
            Ok("/products/%252e%252e")
        );
        assert!(path(&["users", ".."]).is_err());
        assert!(path(&["users", "."]).is_err());
        assert!(path(&["users", ""]).is_err());
        assert_eq!(path(&[]).as_deref(), Ok("/"));
    }

    #[test]
    fn traceparents_keep_the_trace_and_get_a_new_span() {
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let child = child_traceparent(Some(parent.as_bytes()));
        let child = child.to_str().unwrap();
        assert!(child.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(child.ends_with("-01"));
        assert_ne!(child, parent);
        assert!(valid_traceparent(child));
        let upper = "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-0A";
        let child = child_traceparent(Some(upper.as_bytes()));
        assert!(
            child
                .to_str()
                .unwrap()
                .starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-")
        );
        assert!(child.to_str().unwrap().ends_with("-0a"));
        assert!(!valid_traceparent(
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        assert!(!valid_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1"
        ));
        assert!(!valid_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7+01"
        ));
        assert!(!valid_traceparent(
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01"
        ));
        assert!(!valid_traceparent(&format!("{parent}-extra")));
        let fresh = child_traceparent(Some(b"garbage"));
        assert!(valid_traceparent(fresh.to_str().unwrap()));
        assert_ne!(fresh, child_traceparent(None));
    }
}
