//! What every request passes first and last: the route table it will use
//! (so a reload mid-request changes nothing), the client's address, CORS
//! (preflight answered here, allowed origins echoed) and the access log.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bazaar_chassis::Problem;

use crate::proxy::Shared;
use crate::table::Table;

/// Per request: the table in force when it arrived and who sent it.
#[derive(Clone)]
pub struct Edge {
    pub table: Arc<Table>,
    /// The client (through trusted proxies, if any).
    pub client: IpAddr,
    /// The address the request came from.
    pub peer: IpAddr,
}

/// The upstream instance that answered (for the access log).
#[derive(Clone)]
pub struct ServedBy(pub String);

const EXPOSED: &str = "x-request-id, x-instance-id, x-cache, etag, retry-after, ratelimit-limit, ratelimit-remaining, ratelimit-reset";
const ALLOWED_METHODS: &str = "GET, HEAD, POST, PUT, DELETE, OPTIONS";

/// The edge as middleware, for routes that are not the gateway's own
/// handlers (the admin dead-letter API); the handlers call [`around`].
pub async fn edge(
    State(g): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    around(&g, peer, req, |edge, mut req| {
        req.extensions_mut().insert(edge);
        next.run(req)
    })
    .await
}

/// [`around`] for a handler of the gateway's own: its problem is the answer.
pub async fn answer<F, Fut, R>(g: &Shared, peer: SocketAddr, req: Request, inner: F) -> Response
where
    F: FnOnce(Edge, Request) -> Fut,
    Fut: Future<Output = Result<R, Problem>>,
    R: IntoResponse,
{
    around(g, peer, req, |edge, req| async move {
        inner(edge, req).await.into_response()
    })
    .await
}

/// Runs `inner` with the request's [`Edge`], answering CORS preflights
/// itself and adding CORS headers and the access log line around it.
pub async fn around<F, Fut>(g: &Shared, peer: SocketAddr, req: Request, inner: F) -> Response
where
    F: FnOnce(Edge, Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let started = Instant::now();
    let table = g.live.current();
    let client = table.client_ip(peer.ip(), req.headers());
    let method = req.method().clone();
    let path = table.access_log.then(|| req.uri().path().to_owned());
    let origin = req.headers().get(header::ORIGIN).cloned();
    let allowed = origin
        .as_ref()
        .filter(|o| o.to_str().is_ok_and(|o| table.origin_allowed(o)))
        .cloned();
    let preflight = method == Method::OPTIONS
        && origin.is_some()
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
        && !table.cors_origins.is_empty();

    let mut res = if preflight {
        match &allowed {
            Some(_) => {
                let mut res = StatusCode::NO_CONTENT.into_response();
                let h = res.headers_mut();
                h.insert(
                    header::ACCESS_CONTROL_ALLOW_METHODS,
                    HeaderValue::from_static(ALLOWED_METHODS),
                );
                let asked = req
                    .headers()
                    .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
                    .cloned()
                    .unwrap_or(HeaderValue::from_static("authorization, content-type"));
                h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked);
                h.insert(
                    header::ACCESS_CONTROL_MAX_AGE,
                    HeaderValue::from_static("600"),
                );
                res
            }
            None => Problem::forbidden("this origin may not call the API").into_response(),
        }
    } else {
        let edge = Edge {
            table: Arc::clone(&table),
            client,
            peer: peer.ip(),
        };
        inner(edge, req).await
    };

    if let Some(origin) = allowed {
        let h = res.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static(EXPOSED),
        );
        h.append(header::VARY, HeaderValue::from_static("origin"));
    }
    if table.access_log {
        let upstream = res
            .extensions()
            .get::<ServedBy>()
            .map_or("-", |s| s.0.as_str());
        tracing::info!(
            target: "access",
            %method,
            path = path.as_deref().unwrap_or(""),
            status = res.status().as_u16(),
            latency_ms = started.elapsed().as_secs_f64() * 1000.0,
            upstream,
            client = %client,
            "request"
        );
    }
    res
}
