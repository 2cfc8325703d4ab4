//! gRPC through the gateway (HTTP/2, h2c): `/<package>.<Service>/<Method>`
//! is routed by its service name, the bearer token in the metadata is
//! checked at the edge as for REST, `grpc-timeout` bounds the call, and
//! the upstream's answer streams back with its trailers (`grpc-status`).
//! A call that cannot be made gets a gRPC status (UNAVAILABLE,
//! DEADLINE_EXCEEDED, UNAUTHENTICATED), never an HTTP error page. The
//! upstream leg goes through the mesh's one call path on pooled HTTP/2
//! connections.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Uri, header};
use axum::response::{IntoResponse, Response};
use bazaar_mesh::ErrorKind;
use bazaar_mesh::error::Failure;
use bazaar_mesh::upstream::{CallOptions, Member};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;

use crate::proxy::{Shared, strip_hop_by_hop};
use tracing::Instrument as _;

/// Pooled h2c connections to the services' gRPC servers.
pub type Client = HyperClient<HttpConnector, Body>;

pub fn client() -> Client {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(1)));
    HyperClient::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .timer(hyper_util::rt::TokioTimer::new())
        .pool_timer(hyper_util::rt::TokioTimer::new())
        .build(connector)
}

/// Where a gRPC service's calls go, and whether they need a token.
struct Route {
    /// `/<package>.<Service>/`.
    prefix: &'static str,
    service: &'static str,
    token: bool,
}

const ROUTES: [Route; 4] = [
    Route {
        prefix: "/user.UserService/",
        service: "users",
        token: true,
    },
    // Reflection and health describe the services behind the gateway:
    // a stock client (`grpcurl -plaintext gateway list`) finds them.
    Route {
        prefix: "/grpc.reflection.v1.ServerReflection/",
        service: "users",
        token: false,
    },
    Route {
        prefix: "/grpc.reflection.v1alpha.ServerReflection/",
        service: "users",
        token: false,
    },
    Route {
        prefix: "/grpc.health.v1.Health/",
        service: "users",
        token: false,
    },
];

/// Whether a request is a gRPC call.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// Whether a path names a gRPC method: `/<package>.<Service>/<Method>`.
/// Asked of every request: a REST path fails at its first segment, which
/// has no dot.
pub fn owns(path: &str) -> bool {
    let Some(rest) = path.as_bytes().strip_prefix(b"/") else {
        return false;
    };
    let Some(slash) = rest.iter().position(|&b| b == b'/') else {
        return false;
    };
    let (service, method) = (&rest[..slash], &rest[slash + 1..]);
    service.contains(&b'.') && !method.is_empty() && !method.contains(&b'/')
}

/// gRPC status codes the gateway answers with itself.
#[derive(Clone, Copy)]
enum Code {
    DeadlineExceeded = 4,
    Unimplemented = 12,
    Unavailable = 14,
    Unauthenticated = 16,
}

/// A trailers-only answer: HTTP 200 with the status in the headers.
fn status(code: Code, message: &str) -> Response {
    let mut res = Response::new(Body::empty());
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from(code as u16));
    if let Ok(v) = HeaderValue::from_str(&percent_encode(message)) {
        h.insert("grpc-message", v);
    }
    res
}

/// `grpc-message` is percent-encoded (the gRPC HTTP/2 spec).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `grpc-timeout`: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_timeout(v: &str) -> Option<Duration> {
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

const TE: HeaderName = header::TE;

/// `/package.Service/Method` as a span name: `package.Service/Method`.
fn target_method(path: &str) -> &str {
    path.trim_start_matches('/')
}

/// Proxies one gRPC call.
pub async fn handle(g: &Shared, peer: SocketAddr, req: Request) -> Response {
    let path = req.uri().path();
    let Some(route) = ROUTES.iter().find(|r| path.starts_with(r.prefix)) else {
        return status(Code::Unimplemented, "no such service");
    };
    if route.token {
        match g.claims(req.headers()).await {
            Ok(Some(_)) => {}
            Ok(None) => return status(Code::Unauthenticated, "a bearer token is required"),
            Err(p) if p.status == 401 => return status(Code::Unauthenticated, &p.detail),
            Err(p) => return status(Code::Unavailable, &p.detail),
        }
    }
    let mut timeout = g.grpc_timeout;
    if let Some(asked) = req
        .headers()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_timeout)
    {
        timeout = timeout.min(asked);
    }
    let target = req
        .uri()
        .path_and_query()
        .map_or_else(|| path.to_owned(), |p| p.as_str().to_owned());
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::HOST);
    let span = if bazaar_mesh::trace::in_recorded_span() {
        tracing::info_span!(
            "call",
            service = "gateway",
            otel.name = %target_method(&target),
            otel.kind = "client",
            rpc.system = "grpc",
            peer.service = route.service,
            otel.status_code = tracing::field::Empty,
        )
    } else {
        tracing::Span::none()
    };
    match bazaar_mesh::trace::traceparent_of(&span).and_then(|tp| HeaderValue::from_str(&tp).ok()) {
        Some(tp) => {
            parts.headers.insert(bazaar_mesh::client::TRACEPARENT, tp);
        }
        None => bazaar_mesh::client::continue_trace(&mut parts.headers),
    }
    // gRPC servers may insist on it; the stripping above took it out.
    parts
        .headers
        .insert(TE, HeaderValue::from_static("trailers"));
    let options = CallOptions {
        strategy: Default::default(),
        timeout,
        // The request streams: it cannot be sent twice.
        retries: 0,
        idempotent: false,
        client: Some(peer.ip()),
    };
    let mut body = Some(body);
    let (method, headers, target) = (&parts.method, &parts.headers, target.as_str());
    let client = &g.grpc;
    let answer = g
        .upstreams
        .call(route.service, &options, |member: Arc<Member>, _| {
            let body = body.take();
            async move {
                let body = body.ok_or_else(|| Failure::connect("the request was already sent"))?;
                let uri = Uri::builder()
                    .scheme("http")
                    .authority(member.authority.as_str())
                    .path_and_query(target)
                    .build()
                    .map_err(Failure::connect)?;
                let mut up = hyper::Request::new(body);
                *up.method_mut() = method.clone();
                *up.uri_mut() = uri;
                *up.headers_mut() = headers.clone();
                *up.version_mut() = http::Version::HTTP_2;
                client.request(up).await.map_err(|e| {
                    if e.is_connect() {
                        Failure::connect(e)
                    } else {
                        Failure::bad_answer(e)
                    }
                })
            }
        })
        .instrument(span.clone())
        .await;
    if answer.is_err() {
        span.record("otel.status_code", "ERROR");
    }
    match answer {
        Ok((res, _)) => {
            let (mut parts, body) = res.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, Body::new(body)).into_response()
        }
        Err(e) => {
            tracing::warn!(error = %e, "gRPC call failed");
            match e.kind {
                ErrorKind::Timeout => status(Code::DeadlineExceeded, &e.detail()),
                _ => status(Code::Unavailable, &e.detail()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_timeout("123456789m"), None, "at most 8 digits");
        assert_eq!(parse_timeout("m"), None);
        assert_eq!(parse_timeout("10x"), None);
        assert_eq!(parse_timeout(""), None);
    }

    #[test]
    fn grpc_paths_are_told_from_the_rest() {
        assert!(owns("/user.UserService/GetUser"));
        assert!(owns(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
        ));
        assert!(!owns("/api/v1/products"));
        assert!(!owns("/health"));
        assert!(!owns("/user.UserService/"));
        assert!(!owns("/a.b/c/d"));
    }

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(percent_encode("50% off\n"), "50%25 off%0A");
    }
}
