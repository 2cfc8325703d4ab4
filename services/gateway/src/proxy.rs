//! The proxy: authenticate, pick an instance, forward, stream back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use bazaar_chassis::{Problem, Verifier, auth::bearer};
use bazaar_mesh::Discovery;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::routes;

#[derive(Clone)]
pub struct GatewayState {
    discovery: Discovery,
    verifier: Arc<Verifier>,
    client: Client<HttpConnector, Body>,
    timeout: Duration,
    body_limit: usize,
}

impl GatewayState {
    pub fn new(
        discovery: Discovery,
        verifier: Arc<Verifier>,
        timeout: Duration,
        body_limit: usize,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(256)
            .build(connector);
        Self {
            discovery,
            verifier,
            client,
            timeout,
            body_limit,
        }
    }
}

pub fn router(state: GatewayState) -> Router {
    Router::new()
        .route("/api/v1/{*rest}", any(proxy))
        .with_state(state)
}

const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Most bytes of an oversized body read and discarded before answering 413.
const DRAIN_CAP: usize = 16 * 1024 * 1024;

const X_USER_ID: HeaderName = HeaderName::from_static("x-user-id");
const X_USER_ROLE: HeaderName = HeaderName::from_static("x-user-role");
const X_USER_EMAIL: HeaderName = HeaderName::from_static("x-user-email");

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named in `Connection` are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for h in HOP_BY_HOP.iter().chain(named.iter()) {
        headers.remove(h);
    }
}

async fn proxy(
    State(s): State<GatewayState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    match forward(&s, peer, req).await {
        Ok(res) => res,
        Err(problem) => {
            let too_large = problem.status == 413;
            let mut res = problem.into_response();
            if too_large {
                // The body was refused unread: the connection cannot carry
                // another request, so tell the client not to reuse it.
                res.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            res
        }
    }
}

async fn forward(s: &GatewayState, peer: SocketAddr, req: Request) -> Result<Response, Problem> {
    let (mut parts, body) = req.into_parts();
    let path = parts
        .uri
        .path()
        .strip_prefix("/api/v1")
        .unwrap_or("")
        .to_owned();
    let route =
        routes::route(&parts.method, &path).ok_or_else(|| Problem::not_found("no such route"))?;

    // Identity comes only from a verified token, never from the client's headers.
    for h in [X_USER_ID, X_USER_ROLE, X_USER_EMAIL] {
        parts.headers.remove(h);
    }
    let claims = match bearer(&parts.headers)? {
        Some(token) => Some(s.verifier.verify(token).await?),
        None => None,
    };
    if !route.public && claims.is_none() {
        return Err(Problem::unauthorized("missing bearer token"));
    }
    if let Some(c) = &claims {
        for (name, value) in [
            (X_USER_ID, &c.sub),
            (X_USER_ROLE, &c.role),
            (X_USER_EMAIL, &c.email),
        ] {
            if let Ok(v) = HeaderValue::from_str(value) {
                parts.headers.insert(name, v);
            }
        }
    }
    let too_large = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        .is_some_and(|n| n > s.body_limit);
    if too_large {
        // Read and discard the body (up to a cap) before answering, so the
        // client sees the 413 instead of a broken pipe mid-upload.
        let mut body = body;
        let mut read = 0usize;
        while read <= DRAIN_CAP {
            match http_body_util::BodyExt::frame(&mut body).await {
                Some(Ok(frame)) => read += frame.data_ref().map_or(0, |d| d.len()),
                _ => break,
            }
        }
        return Err(Problem::new(
            axum::http::StatusCode::PAYLOAD_TOO_LARGE,
            "too-large",
            format!("request bodies are limited to {} bytes", s.body_limit),
        ));
    }

    let instance = s
        .discovery
        .pick(route.service)
        .await
        .map_err(|e| Problem::unavailable(format!("{} is unavailable: {e}", route.service)))?;
    let query = parts
        .uri
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    parts.uri = format!("{}{path}{query}", instance.address)
        .parse::<Uri>()
        .map_err(|_| Problem::bad_request("the request path cannot be forwarded"))?;

    strip_hop_by_hop(&mut parts.headers);
    if let Some(host) = parts.headers.remove(header::HOST) {
        parts
            .headers
            .insert(HeaderName::from_static("x-forwarded-host"), host);
    }
    let forwarded_for = match parts
        .headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
    {
        Some(prior) => format!("{prior}, {}", peer.ip()),
        None => peer.ip().to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&forwarded_for) {
        parts
            .headers
            .insert(HeaderName::from_static("x-forwarded-for"), v);
    }
    parts.headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static("http"),
    );

    let upstream = Request::from_parts(parts, body);
    let res = match tokio::time::timeout(s.timeout, s.client.request(upstream)).await {
        Err(_) => {
            return Err(Problem::timeout(format!(
                "{} did not answer in time",
                route.service
            )));
        }
        Ok(Err(e)) if e.is_connect() => {
            return Err(Problem::unavailable(format!(
                "{} is unreachable",
                route.service
            )));
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, service = route.service, "upstream call failed");
            return Err(Problem::new(
                axum::http::StatusCode::BAD_GATEWAY,
                "bad-gateway",
                format!("{} failed to answer", route.service),
            ));
        }
        Ok(Ok(res)) => res,
    };
    let (mut parts, body) = res.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Ok(Response::from_parts(parts, Body::new(body)))
}
