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
}

impl Readiness {
    async fn check(&self) -> Result<(), String> {
        if let Some(db) = &self.db {
            sqlx::query("SELECT 1")
                .execute(db)
                .await
                .map_err(|e| format!("database: {e}"))?;
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

/// A service's front door: every request goes to `router`, except those
/// `fast.claims` matches, which skip the router's per-route machinery and
/// go straight to `fast.service` (the gateway's proxy). Both are metered.
#[derive(Clone)]
struct Front {
    router: Router,
    fast: Option<FastPath>,
    metrics: crate::Metrics,
}

/// Requests a service answers without its router.
#[derive(Clone)]
pub struct FastPath {
    /// Which request paths it takes.
    pub claims: fn(&str) -> bool,
    /// The `route` label of its requests in the metrics.
    pub route: &'static str,
    pub service: BoxCloneSyncService<axum::extract::Request, Response, Infallible>,
}

impl tower::Service<axum::extract::Request> for Front {
    type Response = Response;
    type Error = Infallible;
    type Future = futures::future::Either<
        futures::future::BoxFuture<'static, Result<Response, Infallible>>,
        axum::routing::future::RouteFuture<Infallible>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: axum::extract::Request) -> Self::Future {
        match &self.fast {
            Some(fast) if (fast.claims)(req.uri().path()) => {
                let (mut service, metrics, route) =
                    (fast.service.clone(), self.metrics.clone(), fast.route);
                futures::future::Either::Left(Box::pin(async move {
                    let method = req.method().clone();
                    let answer = async {
                        match tower::Service::call(&mut service, req).await {
                            Ok(res) => res,
                            Err(never) => match never {},
                        }
                    };
                    Ok(metrics.time(method.as_str(), route, answer).await)
                }))
            }
            _ => futures::future::Either::Right(tower::Service::call(&mut self.router, req)),
        }
    }
}

/// Adds `/health`, `/ready`, `/metrics` and the shared layers to a service's routes.
fn platform(
    ctx: &ServiceContext,
    app: Router,
    ready: Readiness,
    fast: Option<FastPath>,
) -> BoxCloneSyncService<axum::extract::Request, Response, Infallible> {
    let instance =
        HeaderValue::from_str(&ctx.instance_id).unwrap_or(HeaderValue::from_static("unknown"));
    let service = ctx.name;
    let platform = Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready_handler).with_state(ready))
        .route(
            "/metrics",
            get(metrics_handler).with_state(ctx.metrics.clone()),
        );
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
        .layer(SetResponseHeaderLayer::if_not_present(X_INSTANCE_ID, instance))
        .layer(TraceLayer::new_for_http().make_span_with(move |req: &axum::http::Request<_>| {
            let request_id = req.headers().get(X_REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or("");
            tracing::info_span!("http", service, method = %req.method(), path = %req.uri().path(), request_id)
        }))
        .layer(CatchPanicLayer::custom(|_| {
            tracing::error!("handler panicked");
            Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "an internal error occurred").into_response()
        }))
        .layer(DefaultBodyLimit::max(ctx.config.body_limit))
        .service(Front {
            router: routed,
            fast,
            metrics: ctx.metrics.clone(),
        });
    BoxCloneSyncService::new(stack)
}

/// Request ids as random UUIDs from the thread's userspace generator:
/// tower-http's `MakeRequestUuid` asks the kernel (`getrandom`) on every
/// request.
#[derive(Clone, Copy)]
struct FastRequestId;

impl MakeRequestId for FastRequestId {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<RequestId> {
        let id = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
        HeaderValue::from_str(&id.hyphenated().to_string())
            .ok()
            .map(RequestId::new)
    }
}

async fn ready_handler(State(ready): State<Readiness>) -> Response {
    match ready.check().await {
        Ok(()) => (StatusCode::OK, "ready").into_response(),
        Err(e) => Problem::unavailable(e).into_response(),
    }
}

async fn metrics_handler(State(m): State<crate::Metrics>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.encode(),
    )
        .into_response()
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
    serve_with(ctx, app, None, listener, ready, shutdown).await
}

/// [`serve`], with some requests answered without the router.
pub async fn serve_with(
    ctx: &ServiceContext,
    app: Router,
    fast: Option<FastPath>,
    listener: TcpListener,
    ready: Readiness,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    let app = platform(ctx, app, ready, fast);
    let instance = Instance {
        name: ctx.name.to_owned(),
        id: ctx.instance_id.clone(),
        address: format!("http://{addr}"),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        tags: if ctx.config.weight > 1 {
            vec![format!("weight={}", ctx.config.weight)]
        } else {
            Vec::new()
        },
    };
    let registry = ctx.discovery.registry().clone();
    registry
        .register(instance)
        .await
        .context("cannot register")?;
    tracing::info!(service = ctx.name, %addr, instance = %ctx.instance_id, "listening");

    let (name, id) = (ctx.name, ctx.instance_id.clone());
    let signal = shutdown.clone();
    let stopping = async move {
        signal.wait().await;
        // Leave the rotation first, so no new calls are routed here.
        if let Err(e) = registry.deregister(name, &id).await {
            tracing::warn!(error = %e, "deregister failed");
        }
    };
    // Without TCP_NODELAY a response written in two parts (headers, then a
    // streamed body) waits on the client's delayed ACK: ~40 ms stalls.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
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

/// The W3C trace context header.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// A new root `traceparent`: random trace and span ids, sampled.
pub fn new_traceparent() -> String {
    let trace = uuid::Uuid::new_v4().simple().to_string();
    let span = &uuid::Uuid::new_v4().simple().to_string()[..16];
    format!("00-{trace}-{span}-01")
}

/// Whether `tp` is a well-formed version-00 `traceparent`.
pub fn valid_traceparent(tp: &str) -> bool {
    let parts: Vec<&str> = tp.split('-').collect();
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    parts.len() == 4
        && hex(parts[0], 2)
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2)
        && parts[1] != "00000000000000000000000000000000"
}

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
        let traceparent = text(&TRACEPARENT)
            .filter(|tp| valid_traceparent(tp))
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
/// `shutdown`, then waits for `consumers` to settle the batches in hand.
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
    };
    let served = serve(ctx, router, listener, ready, shutdown).await;
    for c in consumers {
        if let Err(e) = c.await {
            tracing::error!(service = ctx.name, error = %e, "a consumer crashed");
        }
    }
    served
}
