//! The HTTP bootstrap: the platform routes and layers every service shares,
//! registration in discovery, and graceful shutdown.

use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bazaar_bus::Bus;
use bazaar_mesh::Instance;
use sqlx::AnyPool;
use std::convert::Infallible;

use tokio::net::TcpListener;
use tower::util::BoxCloneSyncService;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::trace::TraceLayer;

use crate::{Problem, ServiceContext, Shutdown, metrics};

/// What `/ready` checks: each dependency given must be usable.
#[derive(Clone, Default)]
pub struct Readiness {
    pub db: Option<AnyPool>,
    pub bus: Option<Bus>,
    /// Services this one calls, each of which discovery must find.
    pub needs: Option<(bazaar_mesh::Discovery, Vec<&'static str>)>,
}

impl Readiness {
    async fn check(&self) -> Result<(), String> {
        if let Some((discovery, needs)) = &self.needs {
            for name in needs {
                let found = discovery.registry().list(name).await.map_err(|e| {
                    tracing::warn!(error = %e, service = name, "discovery failed");
                    "discovery: unavailable".to_owned()
                })?;
                if found.is_empty() {
                    return Err(format!("no instance of {name} can be found"));
                }
            }
        }
        if let Some(db) = &self.db {
            sqlx::query("SELECT 1").execute(db).await.map_err(|e| {
                tracing::warn!(error = %e, "readiness: database check failed");
                "database: unavailable".to_owned()
            })?;
        }
        if let Some(bus) = &self.bus
            && !bus.is_connected()
        {
            return Err("bus: not connected".into());
        }
        Ok(())
    }
}

const X_INSTANCE_ID: HeaderName = HeaderName::from_static("x-instance-id");
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Requests a service answers without its router, on event loops of its
/// own (see [`serve_fast`]).
#[derive(Clone)]
pub struct FastPath<H> {
    /// Which request paths it takes.
    pub claims: fn(&str) -> bool,
    /// The `route` label of a request it takes, from its path.
    pub route: fn(&str) -> &'static str,
    /// Answers a request from the given peer.
    pub handler: H,
    /// Event-loop threads (0: one per two cores, at least one).
    pub threads: usize,
    /// How long a client may take to send a request's head, idle
    /// keep-alive time included; `None`: no limit.
    pub header_timeout: Option<Duration>,
    /// Connections one client address may hold open at once (0: any);
    /// past it, a new one from that address is closed at once.
    pub max_connections_per_address: usize,
    /// Addresses exempt from that cap (trusted proxies).
    pub exempt: std::sync::Arc<dyn Fn(std::net::IpAddr) -> bool + Send + Sync>,
}

/// Open connections per client address, for
/// [`FastPath::max_connections_per_address`].
#[derive(Clone, Default)]
struct PerAddress(
    std::sync::Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
);

/// One connection's place in [`PerAddress`], given back when it closes.
struct Slot {
    counts: PerAddress,
    ip: std::net::IpAddr,
}

impl PerAddress {
    /// A place for one more connection from `ip`, if it holds fewer than `max`.
    fn take(&self, ip: std::net::IpAddr, max: usize) -> Option<Slot> {
        let mut counts = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let open = counts.entry(ip).or_insert(0);
        if *open >= max {
            return None;
        }
        *open += 1;
        Some(Slot {
            counts: self.clone(),
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self
            .counts
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(open) = counts.get_mut(&self.ip) {
            *open -= 1;
            if *open == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// Raises this process's soft limit on open files to its hard limit: a
/// server holding many client connections must not run out of
/// descriptors at the soft default (often 1,024).
pub fn raise_open_files_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current == limit.maximum {
        return;
    }
    let raised = rustix::process::Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => tracing::debug!(limit = ?limit.maximum, "raised the open-files limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-files limit"),
    }
}

/// Adds `/health`, `/ready`, `/metrics` and the shared layers to a service's routes.
/// `GET /_mesh/calls`: the instances this service calls, with their
/// health and breaker state as its mesh client sees them (the gateway's
/// `/_admin/services` gathers these).
async fn calls_handler(
    axum::extract::State(calls): axum::extract::State<bazaar_mesh::Client>,
) -> axum::Json<Vec<bazaar_mesh::upstream::InstanceView>> {
    axum::Json(calls.upstreams().seen())
}

/// `GET /_traces/{trace_id}`: the spans of a trace this process keeps
/// (the gateway's dashboard gathers them from every instance).
async fn traces_handler(
    axum::extract::Path(trace_id): axum::extract::Path<String>,
) -> Result<axum::Json<Vec<crate::traces::SpanRecord>>, Problem> {
    if !crate::traces::valid_trace_id(&trace_id) {
        return Err(Problem::invalid(
            "trace_id",
            "expected 32 lowercase hex digits",
        ));
    }
    Ok(axum::Json(
        crate::traces::recent().map_or_else(Vec::new, |r| r.trace(&trace_id)),
    ))
}

/// `GET /_timeline/{correlation_id}`: what this process saw of an
/// order's messages and saga steps (the gateway's dashboard gathers them).
async fn timeline_handler(
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<axum::Json<Vec<bazaar_bus::timeline::Event>>, Problem> {
    let id = crate::id::parse("correlation_id", &id)?;
    Ok(axum::Json(bazaar_bus::timeline::events(&id)))
}

/// What `/_traces/search` and `/_traces/edges` are asked.
#[derive(serde::Deserialize)]
struct TraceQuery {
    #[serde(default)]
    q: String,
    /// Trace ids, comma-separated.
    ids: Option<String>,
    limit: Option<usize>,
    seconds: Option<u64>,
}

/// `GET /_traces/search?q=&limit=`: the traces of this process's recent
/// spans (all, or those matching `q`: a trace, request, order or message
/// id), summed up, with this process's id; `?ids=a,b` sums up those
/// traces (at most 100).
async fn search_handler(
    axum::extract::Query(q): axum::extract::Query<TraceQuery>,
) -> axum::Json<serde_json::Value> {
    let limit = q.limit.unwrap_or(50).clamp(1, 500);
    let found = crate::traces::recent().map_or_else(Vec::new, |r| match &q.ids {
        Some(ids) => r.summaries(&ids.split(',').take(100).collect::<Vec<_>>()),
        None => r.search(&q.q, limit),
    });
    axum::Json(serde_json::json!({"process": crate::traces::process_id(), "traces": found}))
}

/// `GET /_traces/edges?seconds=`: who called whom in this process's
/// spans of the last `seconds` (default 60), with this process's id.
async fn edges_handler(
    axum::extract::Query(q): axum::extract::Query<TraceQuery>,
) -> axum::Json<serde_json::Value> {
    let since = bazaar_bus::timeline::now_us()
        .saturating_sub(q.seconds.unwrap_or(60).min(3600) * 1_000_000);
    let edges = crate::traces::recent().map_or_else(Vec::new, |r| r.edges(since));
    axum::Json(serde_json::json!({"process": crate::traces::process_id(), "edges": edges}))
}

/// `GET /_traces`: this process's 100 latest spans, newest first.
async fn latest_spans_handler() -> axum::Json<Vec<crate::traces::SpanRecord>> {
    axum::Json(crate::traces::recent().map_or_else(Vec::new, |r| r.latest(100)))
}

/// The diagnostic endpoints every instance serves to the gateway's
/// dashboard: `/_traces…`, `/_timeline/…`, `/_mesh/calls`. A service
/// serves them on its internal port; the gateway, whose port is public,
/// serves them itself behind its operator check.
pub fn diagnostics(calls: bazaar_mesh::Client) -> Router {
    Router::new()
        .route("/_traces", get(latest_spans_handler))
        .route("/_traces/search", get(search_handler))
        .route("/_traces/edges", get(edges_handler))
        .route("/_timeline/{correlation_id}", get(timeline_handler))
        .route("/_traces/{trace_id}", get(traces_handler))
        .route("/_mesh/calls", get(calls_handler).with_state(calls))
}

fn platform(ctx: &ServiceContext, app: Router, ready: Readiness, edge: bool) -> Platform {
    let instance = instance_header(ctx);
    let service = ctx.name;
    let mut platform = Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready_handler).with_state(ready))
        .route(
            "/metrics",
            get(metrics_handler).with_state(ctx.metrics.clone()),
        );
    if !edge {
        platform = platform.merge(diagnostics(ctx.calls.clone()));
    }
    let routed = app
        .merge(platform)
        .fallback(|| async { Problem::not_found("no such route") })
        .method_not_allowed_fallback(|| async {
            Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "method not allowed on this route",
            )
        })
        // Inside the router: it labels requests with the matched route.
        .layer(axum::middleware::from_fn_with_state(
            ctx.metrics.clone(),
            metrics::track,
        ));
    // The rest wraps the router once, as one static stack: applied with
    // `Router::layer`, each layer would box every route's service and
    // future again, on every request.
    let stack = tower::ServiceBuilder::new()
        .map_response(IntoResponse::into_response)
        .layer(SetRequestIdLayer::new(X_REQUEST_ID, FastRequestId))
        .layer(PropagateRequestIdLayer::new(X_REQUEST_ID))
        .layer(SetResponseHeaderLayer::if_not_present(
            X_INSTANCE_ID,
            instance,
        ))
        .map_request(|mut req: axum::extract::Request| {
            stamp_trace(&mut req);
            req
        })
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(move |req: &axum::http::Request<_>| server_span(service, req))
                .on_response(
                    |res: &axum::http::Response<_>, _latency: Duration, span: &tracing::Span| {
                        record_status(span, res.status());
                    },
                ),
        )
        .layer(CatchPanicLayer::custom(|_| {
            tracing::error!("handler panicked");
            Problem::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "an internal error occurred",
            )
            .into_response()
        }))
        .layer(DefaultBodyLimit::max(ctx.config.body_limit))
        .service(routed);
    BoxCloneSyncService::new(stack)
}

/// The span a request is served in: a server span in the trace its
/// `traceparent` names (or a new one), named by the route once routing
/// found it ([`crate::metrics::track`], the gateway's route label).
fn server_span<B>(service: &'static str, req: &axum::http::Request<B>) -> tracing::Span {
    let headers = req.headers();
    // Not recorded: the caller's choice, or this trace's dice
    // ([`stamp_trace`]).
    if operational(req.uri().path())
        || bazaar_mesh::trace::declined(headers.get(TRACEPARENT).map(HeaderValue::as_bytes))
    {
        return tracing::Span::none();
    }
    let request_id = headers
        .get(X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let span = tracing::info_span!(
        "http",
        service,
        otel.name = %req.method(),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        method = %req.method(),
        path = %req.uri().path(),
        http.route = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
        request_id,
    );
    bazaar_mesh::trace::follow(&span, headers.get(TRACEPARENT).map(HeaderValue::as_bytes));
    span
}

/// Decides, for a request that starts a trace (it came without a valid
/// `traceparent`), whether that trace is recorded; one that is not gets
/// the context of a new trace with the sampled flag unset, to be served
/// under (no spans) and passed on (no spans after it either).
fn stamp_trace<B>(req: &mut axum::http::Request<B>) {
    let valid = req
        .headers()
        .get(TRACEPARENT)
        .is_some_and(|v| bazaar_mesh::trace::remote(v.as_bytes()).is_some());
    if valid || operational(req.uri().path()) {
        return;
    }
    if let Some(v) =
        bazaar_mesh::trace::unrecorded_root().and_then(|tp| HeaderValue::from_str(&tp).ok())
    {
        req.headers_mut().insert(TRACEPARENT, v);
    }
}

/// Whether a path is the platform's own (health, metrics, traces, the
/// gateway's operator views): such requests are not traced, so that
/// probes, scrapes and the dashboard's polling do not crowd out the
/// traces of the system's work.
fn operational(path: &str) -> bool {
    matches!(path, "/health" | "/ready" | "/metrics") || path.starts_with("/_")
}

/// Records an answer's status on its span; a 5xx is an error.
fn record_status(span: &tracing::Span, status: StatusCode) {
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
}

/// Request ids as random UUIDs from the thread's userspace generator:
/// tower-http's `MakeRequestUuid` asks the kernel (`getrandom`) on every
/// request.
#[derive(Clone, Copy)]
struct FastRequestId;

impl MakeRequestId for FastRequestId {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<RequestId> {
        Some(RequestId::new(new_request_id()))
    }
}

/// The `X-Instance-Id` value of a service instance.
fn instance_header(ctx: &ServiceContext) -> HeaderValue {
    HeaderValue::from_str(&ctx.instance_id).unwrap_or(HeaderValue::from_static("unknown"))
}

/// Turns Nagle's algorithm off: without `TCP_NODELAY` a message written in
/// two parts (head, then body) waits on the peer's delayed ACK, ~40 ms.
pub fn no_delay(tcp: &tokio::net::TcpStream) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
    }
}

/// A random UUID, formatted without a heap string.
fn new_request_id() -> HeaderValue {
    let id = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let text = id.hyphenated().encode_lower(&mut buf);
    HeaderValue::from_str(text).unwrap_or(HeaderValue::from_static("-"))
}

async fn ready_handler(State(ready): State<Readiness>) -> Response {
    match ready.check().await {
        Ok(()) => (StatusCode::OK, "ready").into_response(),
        Err(e) => Problem::unavailable(e).into_response(),
    }
}

/// `/metrics`: OpenMetrics when the scraper asks for it (Prometheus
/// does), the classic text format 0.0.4 otherwise.
async fn metrics_handler(
    State(m): State<crate::Metrics>,
    headers: axum::http::HeaderMap,
) -> Response {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let (text, kind) = m.exposition(accept);
    ([(header::CONTENT_TYPE, kind)], text).into_response()
}

/// Binds `host:port` (0 = a free port).
pub async fn bind(host: &str, port: u16) -> anyhow::Result<TcpListener> {
    TcpListener::bind((host, port))
        .await
        .with_context(|| format!("cannot bind {host}:{port}"))
}

/// Serves `app` on `listener`: registers the instance, serves until
/// `shutdown`, then deregisters, stops accepting and drains in-flight
/// requests for at most the grace period.
pub async fn serve(
    ctx: &ServiceContext,
    app: Router,
    listener: TcpListener,
    ready: Readiness,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    let app = platform(ctx, app, ready, false);
    let stopping = register(ctx, addr, &shutdown).await?;
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| no_delay(tcp));
    let server = axum::serve(
        listener,
        axum::ServiceExt::<axum::extract::Request>::into_make_service_with_connect_info::<
            std::net::SocketAddr,
        >(app),
    )
    .with_graceful_shutdown(stopping);
    let grace = Duration::from_millis(ctx.config.shutdown_grace_ms);
    tokio::select! {
        r = server => r.context("server failed")?,
        () = async { shutdown.wait().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(service = ctx.name, "grace period over; dropping in-flight requests");
        }
    }
    tracing::info!(service = ctx.name, "stopped");
    Ok(())
}

/// Registers the instance serving at `addr`; the future returned resolves
/// on `shutdown`, once the instance has left discovery.
async fn register(
    ctx: &ServiceContext,
    addr: std::net::SocketAddr,
    shutdown: &Shutdown,
) -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
    let instance = Instance {
        name: ctx.name.to_owned(),
        id: ctx.instance_id.clone(),
        address: ctx.config.advertised_url(addr),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        tags: if ctx.config.weight > 1 {
            vec![format!("weight={}", ctx.config.weight)]
        } else {
            Vec::new()
        },
        // The instance's own keeper asks it: the bound address is right.
        health: format!("http://{addr}/ready"),
        patterns: ctx.actions.clone(),
        refused: Vec::new(),
    };
    let registry = ctx.discovery.registry().clone();
    registry
        .register(instance)
        .await
        .context("cannot register")?;
    tracing::info!(service = ctx.name, %addr, instance = %ctx.instance_id, "listening");
    let (name, id) = (ctx.name, ctx.instance_id.clone());
    let signal = shutdown.clone();
    Ok(async move {
        signal.wait().await;
        // Leave the rotation first, so no new calls are routed here.
        if let Err(e) = registry.deregister(name, &id).await {
            tracing::warn!(error = %e, "deregister failed");
        }
    })
}

/// [`serve`] for an edge (whose port is public: the [`diagnostics`] are
/// the edge's to serve, guarded): requests `fast.claims` go to `fast.handler`
/// with only the platform's essentials around them (request id, instance
/// id, trace span, panic guard, metrics), the rest to the router with its
/// full stack. Accepted connections are dealt in turn to `fast.threads`
/// event loops, each a single-threaded runtime: a request, its upstream
/// calls and its answer then stay on one thread, with no hand-over
/// between threads (the proxy keeps its upstream connections per thread
/// too). HTTP/1.1, and HTTP/2 with prior knowledge (h2c: gRPC).
pub async fn serve_fast<H, Fut>(
    ctx: &ServiceContext,
    app: Router,
    fast: FastPath<H>,
    listener: TcpListener,
    ready: Readiness,
    shutdown: Shutdown,
) -> anyhow::Result<()>
where
    H: Fn(axum::extract::Request, std::net::SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response> + Send + 'static,
{
    let addr = listener.local_addr()?;
    let edge = Edge {
        router: platform(ctx, app, ready, true),
        fast,
        metrics: ctx.metrics.clone(),
        service: ctx.name,
        instance: instance_header(ctx),
    };
    let stopping = register(ctx, addr, &shutdown).await?;
    let stop = Shutdown::default();
    let grace = Duration::from_millis(ctx.config.shutdown_grace_ms);
    // By default half the cores: a gateway shares its machine with the
    // services behind it (and on a laptop with everything), and a loop
    // kept busy handles several ready connections per wakeup. On 2 cores
    // shared with its upstream and the load, one loop served ~30% more
    // requests per second than two, at less CPU per request (README).
    let threads = match edge.fast.threads {
        0 => (std::thread::available_parallelism().map_or(1, std::num::NonZero::get) / 2).max(1),
        n => n,
    };
    let mut loops = Vec::with_capacity(threads);
    let mut deal = Vec::with_capacity(threads);
    for i in 0..threads {
        let (edge, stop) = (edge.clone(), stop.clone());
        let (give, take) = tokio::sync::mpsc::unbounded_channel();
        let (done, finished) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name(format!("{}-http-{i}", ctx.name))
            .spawn(move || {
                let served = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(anyhow::Error::from)
                    .and_then(|rt| rt.block_on(edge.run(take, stop, grace)));
                let _ = done.send(served);
            })
            .context("cannot start an event loop")?;
        loops.push(finished);
        deal.push(give);
    }
    // Connections are dealt to the loops in turn: an even spread, where
    // loops racing to accept would leave it to chance.
    tokio::pin!(stopping);
    let mut next = 0usize;
    let per_address = PerAddress::default();
    loop {
        let accepted = tokio::select! {
            () = &mut stopping => break,
            a = listener.accept() => a,
        };
        match accepted.and_then(|(tcp, peer)| Ok((tcp.into_std()?, peer))) {
            Ok((tcp, peer)) => {
                let max = edge.fast.max_connections_per_address;
                let slot = if max == 0 || (edge.fast.exempt)(peer.ip()) {
                    None
                } else {
                    let Some(slot) = per_address.take(peer.ip(), max) else {
                        // Closed at once (dropped): one address may not
                        // take every descriptor while others wait.
                        tracing::debug!(service = ctx.name, client = %peer.ip(), "too many connections from one address");
                        continue;
                    };
                    Some(slot)
                };
                if deal[next % threads].send((tcp, peer, slot)).is_err() {
                    anyhow::bail!("an event loop stopped early");
                }
                next = next.wrapping_add(1);
            }
            Err(e) => {
                // Out of descriptors and the like: wait, then go on.
                tracing::warn!(service = ctx.name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    drop(listener);
    drop(deal);
    stop.trigger();
    for finished in loops {
        finished.await.context("an event loop died")??;
    }
    tracing::info!(service = ctx.name, "stopped");
    Ok(())
}

/// The HTTP/2 connection preface (RFC 9113 section 3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether a new connection opens with the HTTP/2 preface (h2c with
/// prior knowledge), judged from its first bytes without taking them.
/// An HTTP/1 request differs by its second byte at the latest.
async fn speaks_h2(tcp: &tokio::net::TcpStream) -> std::io::Result<bool> {
    let mut buf = [0u8; 24];
    loop {
        let n = tcp.peek(&mut buf).await?;
        if n == 0 || buf[..n] != H2_PREFACE[..n] {
            return Ok(false);
        }
        if n == H2_PREFACE.len() {
            return Ok(true);
        }
        // Part of a preface: the rest is on its way.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Serves a hyper connection until it ends, or until `stop`, then lets it
/// finish what it has begun.
macro_rules! drive {
    ($conn:expr, $stop:expr) => {{
        let conn = $conn;
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => r,
            () = $stop.wait() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    }};
}

/// Answers an h2c upgrade request (see [`crate::h2c`]) with `101` and
/// serves the connection on as HTTP/2, that request first; any other
/// request comes back to be served as it is.
#[allow(clippy::result_large_err)]
fn h2c_upgrade<H, Fut>(
    (edge, stop): &(Edge<H>, Shutdown),
    mut req: hyper::Request<hyper::body::Incoming>,
    peer: std::net::SocketAddr,
) -> Result<Response, hyper::Request<hyper::body::Incoming>>
where
    H: Fn(axum::extract::Request, std::net::SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response> + Send + 'static,
{
    if !crate::h2c::wanted(&req) {
        return Err(req);
    }
    let Some(frame) = crate::h2c::stream_one(&req) else {
        return Err(req);
    };
    let upgraded = hyper::upgrade::on(&mut req);
    let (edge, stop) = (edge.clone(), stop.clone());
    tokio::spawn(async move {
        let io = match upgraded.await {
            Ok(io) => io,
            Err(e) => {
                tracing::debug!(error = %e, "h2c upgrade failed");
                return;
            }
        };
        let io = hyper_util::rt::TokioIo::new(crate::h2c::Injected::new(
            hyper_util::rt::TokioIo::new(io),
            frame,
        ));
        let service = hyper::service::service_fn(move |req| edge.call(req, peer));
        let conn = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .serve_connection(io, service);
        if let Err(e) = drive!(conn, stop) {
            tracing::debug!(error = %e, "h2c connection ended with an error");
        }
    });
    let mut switching = Response::new(axum::body::Body::empty());
    *switching.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = switching.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
    Ok(switching)
}

/// A router with the platform's routes and layers.
type Platform = BoxCloneSyncService<axum::extract::Request, Response, Infallible>;

/// One event loop's share of [`serve_fast`].
#[derive(Clone)]
struct Edge<H> {
    router: Platform,
    fast: FastPath<H>,
    metrics: crate::Metrics,
    service: &'static str,
    instance: HeaderValue,
}

impl<H, Fut> Edge<H>
where
    H: Fn(axum::extract::Request, std::net::SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response> + Send + 'static,
{
    /// Accepts and serves connections until `stop`, then lets them finish
    /// for at most `grace`.
    async fn run(
        self,
        mut dealt: tokio::sync::mpsc::UnboundedReceiver<(
            std::net::TcpStream,
            std::net::SocketAddr,
            Option<Slot>,
        )>,
        stop: Shutdown,
        grace: Duration,
    ) -> anyhow::Result<()> {
        let mut http = hyper::server::conn::http1::Builder::new();
        // Without a timer hyper sets no header timeout at all.
        http.timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(self.fast.header_timeout);
        let mut conns = tokio::task::JoinSet::new();
        while let Some((tcp, peer, slot)) = dealt.recv().await {
            let tcp = match tokio::net::TcpStream::from_std(tcp) {
                Ok(tcp) => tcp,
                Err(e) => {
                    tracing::warn!(service = self.service, error = %e, "cannot serve a connection");
                    continue;
                }
            };
            no_delay(&tcp);
            let (edge, stop, http) = (self.clone(), stop.clone(), http.clone());
            let header_timeout = self.fast.header_timeout;
            conns.spawn(async move {
                // Held while the connection lives.
                let _slot = slot;
                let upgrades = (edge.clone(), stop.clone());
                let service = hyper::service::service_fn(move |req| {
                    match h2c_upgrade(&upgrades, req, peer) {
                        Ok(switching) => {
                            futures::future::Either::Left(std::future::ready(Ok(switching)))
                        }
                        Err(req) => futures::future::Either::Right(edge.call(req, peer)),
                    }
                });
                let io = hyper_util::rt::TokioIo::new(tcp);
                let h2 = match header_timeout {
                    Some(t) => tokio::time::timeout(t, speaks_h2(io.inner()))
                        .await
                        .unwrap_or(Ok(false)),
                    None => speaks_h2(io.inner()).await,
                };
                let served = match h2 {
                    Ok(true) => {
                        let conn = hyper::server::conn::http2::Builder::new(
                            hyper_util::rt::TokioExecutor::new(),
                        )
                        .timer(hyper_util::rt::TokioTimer::new())
                        .serve_connection(io, service);
                        drive!(conn, stop)
                    }
                    Ok(false) => drive!(http.serve_connection(io, service).with_upgrades(), stop),
                    Err(_) => return,
                };
                if let Err(e) = served {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
            });
            while conns.try_join_next().is_some() {}
        }
        let drained = async { while conns.join_next().await.is_some() {} };
        if tokio::time::timeout(grace, drained).await.is_err() {
            tracing::warn!(
                service = self.service,
                "grace period over; dropping in-flight requests"
            );
        }
        Ok(())
    }

    fn call(
        &self,
        req: hyper::Request<hyper::body::Incoming>,
        peer: std::net::SocketAddr,
    ) -> futures::future::Either<
        impl Future<Output = Result<Response, Infallible>> + Send + use<H, Fut>,
        tower::util::Oneshot<Platform, axum::extract::Request>,
    > {
        let mut req = req.map(axum::body::Body::new);
        if !(self.fast.claims)(req.uri().path()) {
            req.extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
            return futures::future::Either::Right(tower::ServiceExt::oneshot(
                self.router.clone(),
                req,
            ));
        }
        let request_id = match req.headers().get(X_REQUEST_ID) {
            Some(id) => id.clone(),
            None => {
                let id = new_request_id();
                req.headers_mut().insert(X_REQUEST_ID, id.clone());
                id
            }
        };
        let method = req.method().clone();
        let route = (self.fast.route)(req.uri().path());
        stamp_trace(&mut req);
        let span = server_span(self.service, &req);
        let answer = (self.fast.handler)(req, peer);
        let (recorded, verb) = (span.clone(), method.clone());
        let answer = async move {
            let res = answer.await;
            if let Some(crate::metrics::RouteLabel(name)) = res.extensions().get() {
                bazaar_mesh::trace::rename(&recorded, format!("{verb} {name}"));
                recorded.record("http.route", name.as_str());
            }
            record_status(&recorded, res.status());
            res
        };

        let (metrics, route, instance) = (self.metrics.clone(), route, self.instance.clone());
        futures::future::Either::Left(async move {
            let answer = async {
                match futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(answer)).await {
                    Ok(res) => res,
                    Err(_) => {
                        tracing::error!("handler panicked");
                        Problem::new(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "internal",
                            "an internal error occurred",
                        )
                        .into_response()
                    }
                }
            };
            let mut res = metrics
                .time(
                    &method,
                    std::borrow::Cow::Borrowed(route),
                    tracing::Instrument::instrument(answer, span),
                )
                .await;
            let headers = res.headers_mut();
            headers.entry(X_INSTANCE_ID).or_insert(instance);
            headers.entry(X_REQUEST_ID).or_insert(request_id);
            Ok(res)
        })
    }
}

/// The W3C trace context header.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

pub use bazaar_mesh::client::{new_traceparent, valid_traceparent};

/// A request's trace context, for the messages it causes: its
/// `traceparent` (a new one if it came without a valid one) and its
/// request id.
#[derive(Debug, Clone)]
pub struct Trace {
    pub traceparent: String,
    pub request_id: Option<String>,
}

impl Trace {
    /// Stamps an envelope with this context.
    pub fn stamp(&self, env: &mut bazaar_bus::Envelope) {
        env.traceparent = Some(self.traceparent.clone());
        env.request_id.clone_from(&self.request_id);
    }
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Trace {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        let text = |name: &HeaderName| {
            parts
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        // The span serving the request, when spans are recorded; else the
        // caller's trace context, or a new one.
        let traceparent = bazaar_mesh::trace::traceparent_of(&tracing::Span::current())
            .or_else(|| text(&TRACEPARENT).filter(|tp| valid_traceparent(tp)))
            .unwrap_or_else(new_traceparent);
        Ok(Self {
            traceparent,
            request_id: text(&X_REQUEST_ID),
        })
    }
}

/// The state most service routers need: their database and the token
/// verifier the [`crate::AuthUser`] extractor uses.
#[derive(Clone)]
pub struct ServiceState {
    pub db: crate::db::Db,
    pub verifier: std::sync::Arc<crate::Verifier>,
}

impl axum::extract::FromRef<ServiceState> for std::sync::Arc<crate::Verifier> {
    fn from_ref(s: &ServiceState) -> Self {
        s.verifier.clone()
    }
}

/// Serves `router` (ready when its database and the bus are) until
/// `shutdown`, then waits for `consumers` to settle the batches in hand,
/// for at most the grace period: a consumer that cannot settle (its
/// broker connection lost mid-batch) must not keep the process from
/// exiting; what it did not acknowledge is delivered again.
pub async fn serve_consuming(
    ctx: &ServiceContext,
    db: &crate::db::Db,
    router: Router,
    listener: TcpListener,
    shutdown: Shutdown,
    consumers: Vec<tokio::task::JoinHandle<()>>,
) -> anyhow::Result<()> {
    let ready = Readiness {
        db: Some(db.read.clone()),
        bus: Some(ctx.bus.clone()),
        needs: None,
    };
    let served = serve(ctx, router, listener, ready, shutdown).await;
    let settled = async {
        for c in consumers {
            if let Err(e) = c.await {
                tracing::error!(service = ctx.name, error = %e, "a consumer crashed");
            }
        }
    };
    let grace = Duration::from_millis(ctx.config.shutdown_grace_ms);
    if tokio::time::timeout(grace, settled).await.is_err() {
        tracing::error!(
            service = ctx.name,
            "consumers did not settle within the grace period; what they did not acknowledge will be delivered again"
        );
    }
    served
}
