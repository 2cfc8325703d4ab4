//! Operator endpoints the gateway serves itself (admin only): dead letters
//! of every Bazaar queue, listed and replayed through the gateway's bus —
//! the in-memory bus of an embedded system, or RabbitMQ.

use std::sync::Arc;

use axum::Router;
use axum::extract::{FromRef, Query, State};
use axum::routing::{get, post};
use bazaar_bus::{Bus, DeadLetter};
use bazaar_chassis::{AuthUser, Json, Problem, Verifier};
use bazaar_contracts::topics;
use serde::{Deserialize, Serialize};

#[derive(Clone)]
pub struct AdminState {
    pub bus: Bus,
    pub verifier: Arc<Verifier>,
}

impl FromRef<AdminState> for Arc<Verifier> {
    fn from_ref(s: &AdminState) -> Self {
        s.verifier.clone()
    }
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/api/v1/admin/dead-letters", get(list))
        .route("/api/v1/admin/dead-letters/replay", post(replay))
        .with_state(state)
}

#[derive(Deserialize)]
struct Which {
    queue: Option<String>,
}

/// The queues a request names: one known queue, or all of them.
fn queues(queue: Option<&str>) -> Result<Vec<&'static str>, Problem> {
    topics::queues(queue).map_err(|e| Problem::invalid("queue", e))
}

fn unavailable(e: bazaar_bus::BusError) -> Problem {
    tracing::warn!(error = %e, "dead-letter request failed");
    Problem::unavailable("the message bus is unavailable")
}

async fn list(
    State(s): State<AdminState>,
    caller: AuthUser,
    Query(which): Query<Which>,
) -> Result<Json<Vec<DeadLetter>>, Problem> {
    caller.require_admin()?;
    let mut out = Vec::new();
    for q in queues(which.queue.as_deref())? {
        out.extend(s.bus.dead_letters(q).await.map_err(unavailable)?);
    }
    Ok(Json(out))
}

#[derive(Deserialize)]
struct ReplayBody {
    queue: Option<String>,
    id: Option<String>,
    #[serde(default)]
    all: bool,
}

#[derive(Serialize)]
struct Replayed {
    replayed: usize,
}

/// Replays one dead letter (`id`) or all of them (`all: true`), in one
/// queue or every queue.
async fn replay(
    State(s): State<AdminState>,
    caller: AuthUser,
    Json(body): Json<ReplayBody>,
) -> Result<Json<Replayed>, Problem> {
    caller.require_admin()?;
    if body.id.is_some() == body.all {
        return Err(Problem::invalid("id", "give either an id or all: true"));
    }
    let mut replayed = 0;
    for q in queues(body.queue.as_deref())? {
        replayed += s
            .bus
            .replay(q, body.id.as_deref())
            .await
            .map_err(unavailable)?;
    }
    if body.id.is_some() && replayed == 0 {
        return Err(Problem::not_found("no dead letter with that id"));
    }
    Ok(Json(Replayed { replayed }))
}

/// `GET /_admin/services`: every service's instances with their health
/// and breaker state. From loopback, or with an admin token.
pub async fn services(
    State(g): State<crate::proxy::Shared>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    req: axum::extract::Request,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let g = &g;
    crate::edge::around(g, peer, req, |edge, req| async move {
        list_services(g, &edge, req.headers()).await.into_response()
    })
    .await
}

async fn list_services(
    g: &crate::proxy::Shared,
    edge: &crate::edge::Edge,
    headers: &axum::http::HeaderMap,
) -> Result<Json<Vec<bazaar_mesh::upstream::InstanceView>>, Problem> {
    if !edge.client.is_loopback() {
        match g.claims(headers).await? {
            None => return Err(Problem::unauthorized("an admin token is required")),
            Some(c) if c.role != "admin" => return Err(Problem::forbidden("admin role required")),
            Some(_) => {}
        }
    }
    g.upstreams.view().await.map(Json).map_err(|e| {
        tracing::warn!(error = %e, "cannot list instances");
        Problem::unavailable("service discovery is unavailable")
    })
}
