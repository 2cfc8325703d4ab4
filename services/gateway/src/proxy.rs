//! The proxy pipeline, per request: route match (method, version, path) →
//! token check and identity headers → role check → rate limit → body
//! limit → login guard → cache → transform → pick an instance → forward
//! (timeout, one retry of idempotent requests elsewhere) → response.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bazaar_chassis::auth::{Claims, bearer};
use bazaar_chassis::{Problem, Verifier};
use bazaar_mesh::balance::Strategy;
use bazaar_mesh::error::Failure;
use bazaar_mesh::upstream::{CallOptions, Member, Upstreams};
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use tracing::Instrument as _;

use crate::cache::{self, Cache};
use crate::conn::{self, SendError};
use crate::edge::{Edge, ServedBy};
use crate::limit::{Buckets, Decision};
use crate::table::{LimitKey, Live, Transform};
use crate::transform;

/// Everything the gateway's handlers share.
pub struct Gateway {
    pub live: Live,
    /// The mesh's upstream core, sending on [`conn`]'s connections.
    pub upstreams: Arc<Upstreams>,
    pub verifier: Arc<Verifier>,
    pub buckets: Buckets,
    pub cache: Cache,
    pub body_limit: usize,
    /// Pooled h2c connections for gRPC calls.
    pub grpc: crate::grpc::Client,
    /// A gRPC call's time, unless its `grpc-timeout` asks for less.
    pub grpc_timeout: Duration,
    /// The process's live configuration (`/_admin/config`).
    pub config: bazaar_chassis::live::LiveConfig,
    /// The dashboard's bus, replays and last sample.
    pub board: crate::dashboard::Board,
}

pub type Shared = Arc<Gateway>;

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
/// Largest upstream answer the gateway buffers to transform or cache.
const BUFFER_CAP: usize = 8 * 1024 * 1024;

pub const X_USER_ID: HeaderName = HeaderName::from_static("x-user-id");
pub const X_USER_ROLE: HeaderName = HeaderName::from_static("x-user-role");
pub const X_USER_EMAIL: HeaderName = HeaderName::from_static("x-user-email");
const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named in `Connection` are hop-by-hop too.
    let named: Vec<HeaderName> = crate::tokens(headers, header::CONNECTION)
        .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
        .collect();
    for h in HOP_BY_HOP.iter().chain(named.iter()) {
        headers.remove(h);
    }
}

/// `/api/v1/products/7` → `("v1", "/products/7")`.
fn split_version(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix("/api/")?;
    match rest.split_once('/') {
        Some((v, _)) => Some((v, &rest[v.len()..])),
        None => Some((rest, "/")),
    }
}

fn is_write(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

fn too_large(limit: usize) -> Problem {
    Problem::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too-large",
        format!("request bodies are limited to {limit} bytes"),
    )
}

const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

fn rate_headers(headers: &mut HeaderMap, d: &Decision) {
    let [limit, remaining, reset] =
        numbers([u64::from(d.limit), u64::from(d.remaining), d.reset_secs]);
    headers.insert(RATELIMIT_LIMIT, limit);
    headers.insert(RATELIMIT_REMAINING, remaining);
    headers.insert(RATELIMIT_RESET, reset);
}

/// Numbers as header values. Each place remembers its last value per
/// thread: a limit stays the same, and so does its reset time for a
/// busy client, so most are not made again.
fn numbers(ns: [u64; 3]) -> [HeaderValue; 3] {
    thread_local! {
        static LAST: std::cell::RefCell<[Option<(u64, HeaderValue)>; 3]> =
            const { std::cell::RefCell::new([None, None, None]) };
    }
    LAST.with_borrow_mut(|last| {
        std::array::from_fn(|i| match &last[i] {
            Some((n, v)) if *n == ns[i] => v.clone(),
            _ => {
                let v = HeaderValue::from(ns[i]);
                last[i] = Some((ns[i], v.clone()));
                v
            }
        })
    })
}

/// 429 with `Retry-After` and the bucket's `RateLimit-*` headers.
fn limited(d: &Decision, detail: &str) -> Response {
    let mut res = Problem::new(StatusCode::TOO_MANY_REQUESTS, "too-many-requests", detail)
        .retry_after(d.retry_after_secs)
        .into_response();
    rate_headers(res.headers_mut(), d);
    res
}

/// The upstream's answer and the instance that gave it.
pub struct Answer {
    pub response: hyper::Response<conn::Pooled>,
    pub member: Arc<Member>,
}

/// How one upstream call is made.
pub struct Call<'a> {
    pub service: &'a str,
    pub strategy: Strategy,
    pub timeout: Duration,
    pub retries: u32,
}

impl Gateway {
    /// Verifies the bearer token, if any.
    pub async fn claims(&self, headers: &HeaderMap) -> Result<Option<Arc<Claims>>, Problem> {
        match bearer(headers)? {
            Some(token) => Ok(Some(self.verifier.verify_shared(token).await?)),
            None => Ok(None),
        }
    }

    /// Sends a request to an instance of `call.service` through the
    /// mesh's one call path (bulkhead, balancing, breakers, timeout,
    /// retries within the budget), on the gateway's own HTTP/1
    /// connections. Answers of any status are passed on as they are.
    pub async fn send(
        self: &Arc<Self>,
        call: &Call<'_>,
        client: IpAddr,
        method: &Method,
        headers: HeaderMap,
        path_and_query: &str,
        body: Bytes,
    ) -> Result<Answer, Problem> {
        if !conn::valid_target(path_and_query) {
            return Err(Problem::bad_request("the request path cannot be forwarded"));
        }
        let options = CallOptions {
            strategy: call.strategy,
            timeout: call.timeout,
            retries: call.retries,
            idempotent: conn::idempotent(method),
            client: Some(client),
        };
        let mut headers = headers;
        let span = if bazaar_mesh::trace::in_recorded_span() {
            tracing::info_span!(
                "call",
                service = "gateway",
                otel.name = %format_args!("{method} {}", call.service),
                otel.kind = "client",
                peer.service = call.service,
                http.response.status_code = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
            )
        } else {
            tracing::Span::none()
        };
        match bazaar_mesh::trace::traceparent_of(&span)
            .and_then(|tp| HeaderValue::from_str(&tp).ok())
        {
            Some(tp) => {
                headers.insert(bazaar_mesh::client::TRACEPARENT, tp);
            }
            None => bazaar_mesh::client::continue_trace(&mut headers),
        }
        let (headers, body) = (&headers, &body);
        let (response, member) = self
            .upstreams
            .call(
                call.service,
                &options,
                |member: Arc<Member>, started| async move {
                    let req = conn::Outgoing {
                        method,
                        target: path_and_query,
                        host: &member.host,
                        headers,
                        body,
                    };
                    conn::send(&member.authority, &req, started)
                        .await
                        .map_err(|e| match e {
                            SendError::Connect(..) => Failure::connect(e),
                            SendError::Failed(_) => Failure::bad_answer(e),
                        })
                },
            )
            .instrument(span.clone())
            .await
            .map_err(|e| {
                span.record("otel.status_code", "ERROR");
                Problem::from_call(&e)
            })?;
        let status = response.status();
        span.record("http.response.status_code", status.as_u16());
        if status.is_server_error() {
            span.record("otel.status_code", "ERROR");
        }
        Ok(Answer { response, member })
    }
}

/// The proxy without the router: `/api/…` requests the gateway does not
/// answer itself (see [`owns`]).
pub async fn handle(g: &Shared, peer: SocketAddr, req: Request) -> Response {
    if crate::grpc::owns(req.uri().path()) && crate::grpc::is_grpc(req.headers()) {
        return crate::grpc::handle(g, peer, req).await;
    }
    crate::edge::around(g, peer, req, |edge, req| async move {
        respond(forward(g, &edge, req).await)
    })
    .await
}

/// Whether a path goes straight to the proxy: everything below `/api/`
/// except the gateway's own endpoints, and gRPC methods.
pub fn owns(path: &str) -> bool {
    path.starts_with("/api/")
        && !matches!(
            path,
            "/api/v1/me/overview"
                | "/api/openapi.json"
                | "/api/v1/admin/dead-letters"
                | "/api/v1/admin/dead-letters/replay"
                | "/api/docs"
        )
        && !path.starts_with("/api/docs/")
        || crate::grpc::owns(path)
}

fn respond(result: Result<Response, Problem>) -> Response {
    match result {
        Ok(res) => res,
        Err(problem) => {
            let refused_body = matches!(problem.status, 408 | 413);
            let mut res = problem.into_response();
            if refused_body {
                // The body may be left unread: the connection cannot carry
                // another request, so tell the client not to reuse it.
                res.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            res
        }
    }
}

/// Reads the request body, refusing more than `limit` bytes with 413.
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, Problem> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        // Read and discard the body (up to a cap) before answering, so the
        // client sees the 413 instead of a broken pipe mid-upload.
        let mut body = body;
        let mut read = 0usize;
        while read <= DRAIN_CAP {
            match body.frame().await {
                Some(Ok(frame)) => read += frame.data_ref().map_or(0, Bytes::len),
                _ => break,
            }
        }
        return Err(too_large(limit));
    }
    if axum::body::HttpBody::is_end_stream(&body) {
        // No body (most GETs): nothing to gather.
        return Ok(Bytes::new());
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large(limit)),
        Err(_) => Err(Problem::bad_request("the request body could not be read")),
    }
}

/// Identity comes only from a verified token, never from the client.
/// An upstream's answer that broke off or ran past the size read.
pub fn unreadable(service: &str) -> Problem {
    Problem::new(
        StatusCode::BAD_GATEWAY,
        "bad-gateway",
        format!("{service} sent an answer that could not be read"),
    )
}

pub fn set_identity(headers: &mut HeaderMap, claims: Option<&Arc<Claims>>) {
    for h in [X_USER_ID, X_USER_ROLE, X_USER_EMAIL] {
        headers.remove(h);
    }
    if let Some(c) = claims {
        for (name, value) in &identity(c).headers {
            headers.insert(name, value.clone());
        }
    }
}

/// A caller's identity headers and rate-limit key, made once per verified
/// token and thread.
struct Identity {
    /// The claims that make valid header values.
    headers: Vec<(HeaderName, HeaderValue)>,
    /// `user:<id>`.
    key: String,
}

/// A remembered identity, with the claims it was made from.
type Known = (Arc<Claims>, Arc<Identity>);

/// Most identities a thread remembers; the memory is dropped whole when full.
const IDENTITIES: usize = 10_000;

thread_local! {
    /// By the address of the verifier's shared claims. Each entry holds
    /// its claims, so the address cannot be reused while it is here.
    static IDENTITY: std::cell::RefCell<bazaar_mesh::FastMap<usize, Known>> =
        std::cell::RefCell::default();
}

fn identity(c: &Arc<Claims>) -> Arc<Identity> {
    let at = Arc::as_ptr(c) as usize;
    IDENTITY.with_borrow_mut(|known| {
        if let Some((_, id)) = known.get(&at) {
            return Arc::clone(id);
        }
        if known.len() >= IDENTITIES {
            known.clear();
        }
        let id = Arc::new(Identity {
            headers: [
                (X_USER_ID, &c.sub),
                (X_USER_ROLE, &c.role),
                (X_USER_EMAIL, &c.email),
            ]
            .into_iter()
            .filter_map(|(name, value)| Some((name, HeaderValue::from_str(value).ok()?)))
            .collect(),
            key: format!("user:{}", c.sub),
        });
        known.insert(at, (Arc::clone(c), Arc::clone(&id)));
        id
    })
}

/// Hop-by-hop headers out; `X-Forwarded-*` in. A client's own
/// `X-Forwarded-For` is kept only when it came through a trusted proxy.
fn set_forwarding(headers: &mut HeaderMap, edge: &Edge) {
    strip_hop_by_hop(headers);
    if let Some(host) = headers.remove(header::HOST) {
        headers.insert(X_FORWARDED_HOST, host);
    }
    let prior = headers
        .get(X_FORWARDED_FOR)
        .and_then(|v| v.to_str().ok())
        .filter(|_| edge.table.trusts(edge.peer));
    let chain = match prior {
        Some(prior) => {
            HeaderValue::from_maybe_shared(Bytes::from(format!("{prior}, {}", edge.peer))).ok()
        }
        None => Some(address_value(edge.peer)),
    };
    if let Some(v) = chain {
        headers.insert(X_FORWARDED_FOR, v);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
}

/// An address as a header value; the last one is remembered per thread
/// (a client's requests come one connection, one address, at a time).
fn address_value(ip: IpAddr) -> HeaderValue {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(IpAddr, HeaderValue)>> = const { std::cell::RefCell::new(None) };
    }
    LAST.with_borrow_mut(|last| match last {
        Some((at, v)) if *at == ip => v.clone(),
        _ => {
            let v = HeaderValue::from_maybe_shared(Bytes::from(ip.to_string()))
                .unwrap_or(HeaderValue::from_static("unknown"));
            *last = Some((ip, v.clone()));
            v
        }
    })
}

/// Longest email address (RFC 5321's path limit): a longer one is no
/// account, and must not become a limiter key.
const MAX_EMAIL: usize = 254;

/// The login brute-force keys of a login body: per account (when the
/// body names one) and per client address; 422 for an email too long to
/// be one.
fn login_keys(body: &[u8], client: IpAddr) -> Result<(Option<String>, String), Problem> {
    let email = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("email")?.as_str().map(|e| e.trim().to_owned()));
    if email.as_ref().is_some_and(|e| e.len() > MAX_EMAIL) {
        return Err(Problem::invalid(
            "email",
            format!("must be at most {MAX_EMAIL} bytes"),
        ));
    }
    let account = email
        .filter(|e| !e.is_empty())
        .map(|e| format!("login-account|{}", e.to_lowercase()));
    Ok((account, format!("login-ip|{client}")))
}

/// Registrations per client address (loopback clients exempt, unless a
/// trusted proxy named the address).
fn registration_limit(g: &Gateway, edge: &Edge) -> Option<Response> {
    let direct_loopback = edge.client == edge.peer && edge.peer.is_loopback();
    if direct_loopback {
        return None;
    }
    let key = format!("register|{}", edge.client);
    let d = g.buckets.take(
        &key,
        edge.table.registrations_per_address_per_minute,
        MINUTE,
        1.0,
    );
    (!d.allowed).then(|| {
        limited(
            &d,
            "too many registrations from this address; try again later",
        )
    })
}

/// `POST /act`'s own limit per client address (429 past it).
pub fn act_limit(g: &Gateway, edge: &Edge) -> Option<Response> {
    let per_minute = edge.table.act_per_address_per_minute;
    if per_minute == 0 {
        return None;
    }
    let d = g
        .buckets
        .take(&format!("act|{}", edge.client), per_minute, MINUTE, 1.0);
    (!d.allowed).then(|| limited(&d, "too many actions from this address; try again later"))
}

const MINUTE: Duration = Duration::from_secs(60);

async fn forward(g: &Shared, edge: &Edge, req: Request) -> Result<Response, Problem> {
    let (parts, body) = req.into_parts();
    let uri = parts.uri.clone();
    let (version, path) =
        split_version(uri.path()).ok_or_else(|| Problem::not_found("no such route"))?;
    let table = &edge.table;
    let Some(route) = table.find(&parts.method, version, path) else {
        return Ok(no_route(table, version, path));
    };
    // Every answer of the route, refusals included, is labelled with it.
    let mut res = respond(through(g, edge, route, parts, body, &uri, version, path).await);
    res.extensions_mut()
        .insert(bazaar_chassis::metrics::RouteLabel(route.name.clone()));
    Ok(res)
}

/// Answers a request `route` takes: identity, limits, body, then the
/// cache or the upstream.
#[allow(clippy::too_many_arguments)]
async fn through(
    g: &Shared,
    edge: &Edge,
    route: &crate::table::Route,
    mut parts: axum::http::request::Parts,
    body: Body,
    uri: &axum::http::Uri,
    version: &str,
    path: &str,
) -> Result<Response, Problem> {
    let table = &edge.table;
    let claims = g.claims(&parts.headers).await?;
    if route.auth && claims.is_none() {
        return Err(Problem::unauthorized("missing bearer token"));
    }
    if !route.roles.is_empty() {
        match &claims {
            None => return Err(Problem::unauthorized("missing bearer token")),
            Some(c) if !route.roles.contains(&c.role) => {
                return Err(Problem::forbidden(format!(
                    "this call needs the role {}",
                    route.roles.join(" or ")
                )));
            }
            Some(_) => {}
        }
    }
    set_identity(&mut parts.headers, claims.as_ref());

    let mut quota = None;
    if let Some(rl) = &route.rate_limit {
        let key = match (rl.key, &claims) {
            (LimitKey::User, Some(c)) => [route.name.as_str(), "|", &identity(c).key].concat(),
            _ => format!("{}|ip:{}", route.name, edge.client),
        };
        let d = g.buckets.take(&key, rl.requests, rl.per, 1.0);
        if !d.allowed {
            return Ok(limited(&d, "rate limit reached; try again later"));
        }
        quota = Some(d);
    }

    if route.register
        && let Some(refused) = registration_limit(g, edge)
    {
        return Ok(refused);
    }

    // The whole body within the body timeout (a client trickling one
    // byte at a time would otherwise hold its connection for ever). No
    // timer for a request without one (most GETs).
    let mut bytes = if axum::body::HttpBody::is_end_stream(&body) {
        Bytes::new()
    } else {
        tokio::time::timeout(
            table.body_timeout,
            read_body(&parts.headers, body, g.body_limit),
        )
        .await
        .map_err(|_| {
            Problem::new(
                StatusCode::REQUEST_TIMEOUT,
                "request-timeout",
                "the request body did not arrive in time",
            )
        })??
    };

    let login = route
        .login
        .then(|| login_keys(&bytes, edge.client))
        .transpose()?;
    if let Some((account, ip)) = &login {
        let checks = account
            .iter()
            .map(|a| (a, table.login_failures_per_account))
            .chain([(ip, table.login_failures_per_ip)]);
        for (key, limit) in checks {
            let d = g.buckets.take(key, limit, MINUTE, 0.0);
            if !d.allowed {
                return Ok(limited(&d, "too many failed logins; try again later"));
            }
        }
    }

    if route.transform == Some(Transform::PriceObject)
        && is_write(&parts.method)
        && !bytes.is_empty()
    {
        let mut v: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| Problem::bad_request(format!("malformed JSON: {e}")))?;
        transform::price_from_object(&mut v).map_err(|e| Problem::invalid("price", e))?;
        bytes = Bytes::from(serde_json::to_vec(&v).unwrap_or_default());
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    }

    let query = uri.query();
    let cache_key = (parts.method == Method::GET && !route.auth && !route.cache_ttl.is_zero())
        .then(|| Cache::key(version, path, query));
    if let Some(key) = &cache_key
        && !cache::bypass(&parts.headers)
        && let Some(entry) = g.cache.get(key)
    {
        return Ok(cached(&entry, &parts.headers, quota.as_ref()));
    }

    let upstream_path = route.upstream_path(path);
    let path_and_query = match query {
        Some(q) => std::borrow::Cow::Owned(format!("{upstream_path}?{q}")),
        None => upstream_path,
    };
    // The client's validators, for a 304 once the answer is in.
    let validators: HeaderMap = match cache_key {
        Some(_) => parts
            .headers
            .get_all(header::IF_NONE_MATCH)
            .iter()
            .map(|v| (header::IF_NONE_MATCH, v.clone()))
            .collect(),
        None => HeaderMap::new(),
    };
    set_forwarding(&mut parts.headers, edge);
    for h in &route.remove_headers {
        parts.headers.remove(h);
    }
    for (k, v) in &route.add_headers {
        parts.headers.insert(k.clone(), v.clone());
    }
    let call = Call {
        service: &route.service,
        strategy: route.strategy,
        timeout: route.timeout,
        retries: route.retries,
    };
    let answer = g
        .send(
            &call,
            edge.client,
            &parts.method,
            std::mem::take(&mut parts.headers),
            &path_and_query,
            bytes,
        )
        .await?;
    let (mut res_parts, body) = answer.response.into_parts();
    strip_hop_by_hop(&mut res_parts.headers);
    let status = res_parts.status;

    if let Some((account, ip)) = &login
        && status == StatusCode::UNAUTHORIZED
    {
        if let Some(a) = account {
            g.buckets
                .charge(a, table.login_failures_per_account, MINUTE);
        }
        g.buckets.charge(ip, table.login_failures_per_ip, MINUTE);
    }
    if is_write(&parts.method) && status.is_success() {
        g.cache.invalidate(path);
    }

    let transform = route.transform.filter(|_| status.is_success());
    let mut res = if cache_key.is_some() || transform.is_some() {
        let mut bytes = Limited::new(body, BUFFER_CAP)
            .collect()
            .await
            .map_err(|_| unreadable(&route.service))?
            .to_bytes();
        if transform == Some(Transform::PriceObject)
            && let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&bytes)
        {
            transform::price_to_object(&mut v);
            bytes = Bytes::from(serde_json::to_vec(&v).unwrap_or_default());
            res_parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        }
        match cache_key {
            Some(key) if status == StatusCode::OK && bytes.len() <= cache::MAX_BODY => {
                let tag = cache::etag(&bytes);
                res_parts.headers.insert(header::ETAG, tag.clone());
                let storable = !res_parts
                    .headers
                    .get_all(header::CACHE_CONTROL)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .any(|v| v.contains("no-store") || v.contains("private"));
                if storable {
                    let mut stored = res_parts.headers.clone();
                    stored.remove(header::SET_COOKIE);
                    g.cache.put(
                        key,
                        path,
                        status,
                        stored,
                        bytes.clone(),
                        tag.clone(),
                        route.cache_ttl,
                    );
                }
                res_parts
                    .headers
                    .insert(X_CACHE, HeaderValue::from_static("MISS"));
                if cache::not_modified(&validators, &tag) {
                    not_modified_response(&res_parts.headers)
                } else {
                    Response::from_parts(res_parts, Body::from(bytes))
                }
            }
            _ => Response::from_parts(res_parts, Body::from(bytes)),
        }
    } else {
        Response::from_parts(res_parts, Body::new(body))
    };
    if let Some(d) = &quota {
        rate_headers(res.headers_mut(), d);
    }
    if table.access_log {
        res.extensions_mut()
            .insert(ServedBy(answer.member.instance.id.clone()));
    }
    Ok(res)
}

/// 405 with `Allow` when routes take the path with other methods, else 404.
fn no_route(table: &crate::table::Table, version: &str, path: &str) -> Response {
    let allowed = table.allowed(version, path);
    if allowed.is_empty() {
        return Problem::not_found("no such route").into_response();
    }
    let allow = allowed
        .iter()
        .map(Method::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    let mut res = Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "method not allowed on this route",
    )
    .into_response();
    if let Ok(v) = HeaderValue::from_str(&allow) {
        res.headers_mut().insert(header::ALLOW, v);
    }
    res
}

/// 304 with the validators and caching headers of the full answer.
fn not_modified_response(headers: &HeaderMap) -> Response {
    let mut res = StatusCode::NOT_MODIFIED.into_response();
    for name in [header::ETAG, header::CACHE_CONTROL, X_CACHE, header::AGE] {
        if let Some(v) = headers.get(&name) {
            res.headers_mut().insert(name, v.clone());
        }
    }
    if let Some(v) = headers.get("x-instance-id") {
        res.headers_mut().insert("x-instance-id", v.clone());
    }
    res
}

/// An answer from the cache: 304 when the client already holds it.
fn cached(entry: &cache::Entry, request: &HeaderMap, quota: Option<&Decision>) -> Response {
    let mut headers = entry.headers.clone();
    headers.insert(X_CACHE, HeaderValue::from_static("HIT"));
    headers.insert(header::AGE, HeaderValue::from(entry.age().as_secs()));
    let mut res = if cache::not_modified(request, &entry.etag) {
        not_modified_response(&headers)
    } else {
        let mut res = Response::new(Body::from(entry.body.clone()));
        *res.status_mut() = entry.status;
        *res.headers_mut() = headers;
        res
    };
    if let Some(d) = quota {
        rate_headers(res.headers_mut(), d);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fast_path_leaves_the_gateways_own_endpoints_to_the_router() {
        assert!(owns("/api/v1/products/1"));
        assert!(owns("/api/v2/products"));
        assert!(!owns("/api/v1/me/overview"));
        assert!(!owns("/api/v1/admin/dead-letters"));
        assert!(!owns("/_admin/services"));
        assert!(!owns("/health"));
    }

    #[test]
    fn remembered_numbers_follow_their_values() {
        assert_eq!(numbers([10, 9, 60]), ["10", "9", "60"]);
        assert_eq!(numbers([10, 8, 60]), ["10", "8", "60"]);
        assert_eq!(numbers([0, 8, 61]), ["0", "8", "61"]);
    }

    #[test]
    fn versions_split_from_paths() {
        assert_eq!(
            split_version("/api/v1/products/7"),
            Some(("v1", "/products/7"))
        );
        assert_eq!(split_version("/api/v2"), Some(("v2", "/")));
        assert_eq!(split_version("/other"), None);
    }

    #[test]
    fn login_keys_name_the_account_in_lower_case() {
        let ip: IpAddr = "10.0.0.1".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let (a, i) = login_keys(br#"{"email":" Ann@X.org ","password":"p"}"#, ip).unwrap();
        assert_eq!(a.as_deref(), Some("login-account|ann@x.org"));
        assert_eq!(i, "login-ip|10.0.0.1");
        assert_eq!(login_keys(b"not json", ip).unwrap().0, None);
        let long = serde_json::json!({"email": format!("{}@x.org", "a".repeat(250))});
        let refused = login_keys(long.to_string().as_bytes(), ip).unwrap_err();
        assert_eq!(refused.status, 422);
    }
}
