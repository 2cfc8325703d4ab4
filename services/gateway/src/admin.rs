//! Operator endpoints the gateway serves itself (admin only): dead letters
//! of every Bazaar queue, listed and replayed through the gateway's bus —
//! the in-memory bus of an embedded system, or RabbitMQ.

use std::sync::Arc;

use axum::Router;
use axum::extract::{FromRef, Query, State};
use bazaar_bus::{Bus, DeadLetter};
use bazaar_chassis::{AuthUser, Json, Problem, Verifier};
use bazaar_contracts::topics;
use serde::{Deserialize, Serialize};

#[derive(Clone)]
pub struct AdminState {
    pub bus: Bus,
    pub verifier: Arc<Verifier>,
    pub replays: Arc<Replays>,
}

/// One replay of dead letters: who asked, when, for what, how many.
#[derive(Clone, Serialize, utoipa::ToSchema)]
pub struct Replay {
    /// RFC 3339.
    at: String,
    /// The admin's email, or `loopback` for an operator on the machine.
    by: String,
    /// The queue, or `*` for every queue.
    queue: String,
    id: Option<String>,
    reason: Option<String>,
    since: Option<String>,
    rate: Option<f64>,
    replayed: usize,
}

/// The replays this gateway made, newest last (the last 1000), beside
/// the `audit` log line each also writes.
#[derive(Default)]
pub struct Replays(std::sync::Mutex<std::collections::VecDeque<Replay>>);

impl Replays {
    fn record(&self, replay: Replay) {
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if all.len() >= 1000 {
            all.pop_front();
        }
        all.push_back(replay);
    }

    /// Newest first.
    pub fn list(&self) -> Vec<Replay> {
        let all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        all.iter().rev().cloned().collect()
    }
}

impl FromRef<AdminState> for Arc<Verifier> {
    fn from_ref(s: &AdminState) -> Self {
        s.verifier.clone()
    }
}

/// The dead-letter API and its contract, from the same annotated handlers.
pub fn api() -> utoipa_axum::router::OpenApiRouter<AdminState> {
    use utoipa_axum::routes;
    utoipa_axum::router::OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(replay))
}

pub fn router(state: AdminState) -> Router {
    api().with_state(state).split_for_parts().0
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct Which {
    /// One queue (e.g. `orders.saga`); default every Bazaar queue.
    queue: Option<String>,
    /// Only letters whose reason contains this (case-insensitive).
    reason: Option<String>,
    /// Only letters dead-lettered at or after this time (RFC 3339).
    since: Option<String>,
}

/// The letters a request chooses, checked.
fn chosen(
    id: Option<&str>,
    reason: Option<&str>,
    since: Option<&str>,
    rate: Option<f64>,
) -> Result<bazaar_bus::Redrive, Problem> {
    bazaar_bus::Redrive::checked(
        id.map(str::to_owned),
        reason.map(str::to_owned),
        since,
        rate,
    )
    .map_err(|(field, why)| Problem::invalid(field, why))
}

/// The queues a request names: one known queue, or all of them.
fn queues(queue: Option<&str>) -> Result<Vec<&'static str>, Problem> {
    topics::queues(queue).map_err(|e| Problem::invalid("queue", e))
}

fn unavailable(e: bazaar_bus::BusError) -> Problem {
    tracing::warn!(error = %e, "dead-letter request failed");
    Problem::unavailable("the message bus is unavailable")
}

/// The dead letters of one queue or of every Bazaar queue (admin).
#[utoipa::path(get, path = "/api/v1/admin/dead-letters", tag = "gateway", security(("bearer" = [])),
    params(Which),
    responses(
        (status = 200, description = "The dead letters", body = Vec<DeadLetter>),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Unknown queue, or a bad reason or time", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The message bus is unavailable", body = Problem, content_type = "application/problem+json"),
    ))]
async fn list(
    State(s): State<AdminState>,
    caller: AuthUser,
    Query(which): Query<Which>,
) -> Result<Json<Vec<DeadLetter>>, Problem> {
    caller.require_admin()?;
    letters(&s.bus, &which).await.map(Json)
}

/// The dead letters `which` chooses.
pub(crate) async fn letters(bus: &Bus, which: &Which) -> Result<Vec<DeadLetter>, Problem> {
    let filter = chosen(None, which.reason.as_deref(), which.since.as_deref(), None)?;
    let mut out = Vec::new();
    for q in queues(which.queue.as_deref())? {
        out.extend(
            bus.dead_letters_matching(q, &filter)
                .await
                .map_err(unavailable)?,
        );
    }
    Ok(out)
}

/// Which dead letters to replay: one (`id`) or all (`all: true`), of one
/// queue or of every queue, narrowed by `reason` and `since`, at `rate`
/// per second at most.
#[derive(Deserialize, utoipa::ToSchema)]
#[schema(examples(json!({"queue": "payments.commands", "all": true, "reason": "timeout", "since": "2026-12-01T12:00:00Z", "rate": 50})))]
pub(crate) struct ReplayBody {
    queue: Option<String>,
    id: Option<String>,
    #[serde(default)]
    all: bool,
    /// Only letters whose reason contains this (case-insensitive).
    reason: Option<String>,
    /// Only letters dead-lettered at or after this time (RFC 3339).
    since: Option<String>,
    /// Replays per second at most, 1 to 1000 (default: no limit). The
    /// answer comes when all are replayed.
    #[schema(minimum = 1, maximum = 1000)]
    rate: Option<f64>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct Replayed {
    replayed: usize,
}

/// Replays one dead letter (`id`) or all of them (`all: true`), in one
/// queue or every queue (admin).
#[utoipa::path(post, path = "/api/v1/admin/dead-letters/replay", tag = "gateway", security(("bearer" = [])),
    request_body = ReplayBody,
    responses(
        (status = 200, description = "How many were replayed", body = Replayed),
        (status = 400, description = "The body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No dead letter with that id", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Unknown queue, neither or both of id and all, or a bad reason, time or rate", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The message bus is unavailable", body = Problem, content_type = "application/problem+json"),
    ))]
async fn replay(
    State(s): State<AdminState>,
    caller: AuthUser,
    Json(body): Json<ReplayBody>,
) -> Result<Json<Replayed>, Problem> {
    caller.require_admin()?;
    redrive(&s.bus, &s.replays, &body, &caller.email)
        .await
        .map(Json)
}

/// Replays the dead letters `body` chooses, and records who (`by`) did.
pub(crate) async fn redrive(
    bus: &Bus,
    replays: &Replays,
    body: &ReplayBody,
    by: &str,
) -> Result<Replayed, Problem> {
    if body.id.is_some() == body.all {
        return Err(Problem::invalid("id", "give either an id or all: true"));
    }
    let filter = chosen(
        body.id.as_deref(),
        body.reason.as_deref(),
        body.since.as_deref(),
        body.rate,
    )?;
    let chosen_queues = queues(body.queue.as_deref())?;
    let mut replayed = 0;
    let mut failed = None;
    for q in chosen_queues {
        match bus.redrive(q, &filter).await {
            Ok(n) => replayed += n,
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    // Who replayed what, and when; also what a failure had replayed.
    tracing::info!(
        target: "audit",
        by,
        queue = body.queue.as_deref().unwrap_or("*"),
        id = body.id.as_deref().unwrap_or(""),
        reason = body.reason.as_deref().unwrap_or(""),
        since = body.since.as_deref().unwrap_or(""),
        rate = body.rate.unwrap_or(0.0),
        replayed,
        "dead letters replayed"
    );
    replays.record(Replay {
        at: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        by: by.to_owned(),
        queue: body.queue.clone().unwrap_or_else(|| "*".into()),
        id: body.id.clone(),
        reason: body.reason.clone(),
        since: body.since.clone(),
        rate: body.rate,
        replayed,
    });
    if let Some(e) = failed {
        return Err(unavailable(e));
    }
    if body.id.is_some() && replayed == 0 {
        return Err(Problem::not_found("no dead letter with that id"));
    }
    Ok(Replayed { replayed })
}

/// `GET /_admin/services`: every service's instances with their health
/// and breaker state as the gateway sees them (`caller: "gateway"`), then
/// as each service's mesh client sees the instances it calls (`caller`:
/// that service, `caller_instance`: which of its instances). From
/// loopback, or with an admin token.
#[utoipa::path(get, path = "/_admin/services", tag = "operations", security((), ("bearer" = [])),
    responses(
        (status = 200, description = "Every instance as each caller sees it: caller, caller_instance, name, id, address, healthy, breaker, patterns, refused", body = Vec<serde_json::Value>),
        (status = 401, description = "Not from loopback, and no valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Service discovery is unavailable", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn services(
    State(g): State<crate::proxy::Shared>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    req: axum::extract::Request,
) -> axum::response::Response {
    operator_view(&g, peer, req, || list_services(&g)).await
}

/// One instance as one caller sees it.
#[derive(serde::Serialize)]
pub struct Seen {
    caller: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    caller_instance: Option<String>,
    #[serde(flatten)]
    view: bazaar_mesh::upstream::InstanceView,
}

/// The operator views are for loopback callers and admins; who it is:
/// the admin's email (a token is checked from loopback too), else
/// `loopback`.
async fn operator(
    g: &crate::proxy::Shared,
    edge: &crate::edge::Edge,
    headers: &axum::http::HeaderMap,
) -> Result<String, Problem> {
    let claims =
        if edge.client.is_loopback() && !headers.contains_key(axum::http::header::AUTHORIZATION) {
            None
        } else {
            g.claims(headers).await?
        };
    match claims {
        Some(c) if c.role == "admin" => Ok(c.email.clone()),
        Some(_) => Err(Problem::forbidden("admin role required")),
        None if edge.client.is_loopback() => Ok("loopback".into()),
        None => Err(Problem::unauthorized("an admin token is required")),
    }
}

/// `GET /_admin/config`: the gateway's effective configuration, each
/// dotted key with its value and where it came from (`default`, `file`,
/// `env`, `etcd`); passwords, and the passwords in URLs, masked. From
/// loopback, or with an admin token.
#[utoipa::path(get, path = "/_admin/config", tag = "operations", security((), ("bearer" = [])),
    responses(
        (status = 200, description = "Each dotted key with its value and source", body = std::collections::BTreeMap<String, ConfigEntry>),
        (status = 401, description = "Not from loopback, and no valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn config(
    State(g): State<crate::proxy::Shared>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    req: axum::extract::Request,
) -> axum::response::Response {
    operator_view(&g, peer, req, || async {
        Ok(Json(bazaar_chassis::live::shown(&g.config.effective())))
    })
    .await
}

/// Answers an operator view: the edge's checks, then loopback or an
/// admin token, then `view`.
pub(crate) async fn operator_view<F, Fut, R>(
    g: &crate::proxy::Shared,
    peer: std::net::SocketAddr,
    req: axum::extract::Request,
    view: F,
) -> axum::response::Response
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<R, Problem>>,
    R: axum::response::IntoResponse,
{
    operator_acts(g, peer, req, |_, _| view()).await
}

/// Middleware: the routes it wraps answer loopback callers and admins
/// only (the diagnostics every instance serves, on the gateway's public
/// port).
pub(crate) async fn operator_only(
    axum::extract::State(g): axum::extract::State<crate::proxy::Shared>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    operator_acts(&g, peer, req, |_, req| async move {
        Ok::<_, Problem>(next.run(req).await)
    })
    .await
}

/// [`operator_view`] for a view that needs who asks and the request.
pub(crate) async fn operator_acts<F, Fut, R>(
    g: &crate::proxy::Shared,
    peer: std::net::SocketAddr,
    req: axum::extract::Request,
    act: F,
) -> axum::response::Response
where
    F: FnOnce(String, axum::extract::Request) -> Fut,
    Fut: std::future::Future<Output = Result<R, Problem>>,
    R: axum::response::IntoResponse,
{
    crate::edge::answer(g, peer, req, |edge, req| async move {
        let who = operator(g, &edge, req.headers()).await?;
        act(who, req).await
    })
    .await
}

async fn list_services(g: &crate::proxy::Shared) -> Result<Json<Vec<Seen>>, Problem> {
    let own = g.upstreams.view().await.map_err(|e| {
        tracing::warn!(error = %e, "cannot list instances");
        Problem::unavailable("service discovery is unavailable")
    })?;
    let all = g
        .upstreams
        .discovery()
        .registry()
        .all()
        .await
        .unwrap_or_default();
    let mut seen: Vec<Seen> = own
        .into_iter()
        .map(|view| Seen {
            caller: "gateway".into(),
            caller_instance: None,
            view,
        })
        .collect();
    // Each instance's own client, asked in parallel; one that does not
    // answer within a second is left out.
    let asked = all.into_iter().map(|instance| async move {
        let views = tokio::time::timeout(std::time::Duration::from_secs(1), calls_of(&instance))
            .await
            .ok()
            .flatten()
            .unwrap_or_default();
        views.into_iter().map(move |view| Seen {
            caller: instance.name.clone(),
            caller_instance: Some(instance.id.clone()),
            view,
        })
    });
    for views in futures::future::join_all(asked).await {
        seen.extend(views);
    }
    Ok(Json(seen))
}

/// What `instance`'s mesh client knows of the instances it calls.
async fn calls_of(
    instance: &bazaar_mesh::Instance,
) -> Option<Vec<bazaar_mesh::upstream::InstanceView>> {
    ask(instance, "/_mesh/calls").await
}

/// An instance's JSON answer to `GET target` (a platform endpoint), or
/// `None` if it gave none.
pub(crate) async fn ask<T: serde::de::DeserializeOwned>(
    instance: &bazaar_mesh::Instance,
    target: &str,
) -> Option<T> {
    serde_json::from_slice(&fetch(instance, target).await?).ok()
}

/// An instance's answer to `GET target` (1 MiB at most; a 2xx only), or
/// `None`.
pub(crate) async fn fetch(instance: &bazaar_mesh::Instance, target: &str) -> Option<bytes::Bytes> {
    let authority = bazaar_mesh::upstream::authority(&instance.address);
    let host = axum::http::HeaderValue::from_str(&authority).ok()?;
    let req = crate::conn::Outgoing {
        method: &axum::http::Method::GET,
        target,
        host: &host,
        headers: &axum::http::HeaderMap::new(),
        body: &bytes::Bytes::new(),
    };
    let res = crate::conn::send(&authority, &req, std::time::Instant::now())
        .await
        .ok()?;
    if !res.status().is_success() {
        return None;
    }
    let body = http_body_util::Limited::new(res.into_body(), 1024 * 1024);
    Some(
        http_body_util::BodyExt::collect(body)
            .await
            .ok()?
            .to_bytes(),
    )
}

/// One key of `/_admin/config`.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // the shape of `live::shown`'s entries, for the contract
pub struct ConfigEntry {
    /// The value in effect (secrets masked).
    value: serde_json::Value,
    /// `default`, `file`, `env`, `override` or `etcd`.
    source: String,
}
