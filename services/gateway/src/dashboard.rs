//! The dashboard's JSON API (loopback or admin), which scripts can use
//! too, gathered from this process and every registered instance:
//! `GET /_dashboard/api/traces/{trace_id}`, a trace's spans (each
//! instance's `/_traces/…`), and
//! `GET /_dashboard/api/orders/{order_id}/timeline`, an order's saga
//! steps and its messages' events on one time axis (`/_timeline/…`).

use std::collections::HashSet;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, Request, State};
use axum::response::Response;
use bazaar_chassis::traces::{self, SpanRecord};
use bazaar_chassis::{Json, Problem};
use serde::Serialize;

use crate::proxy::Shared;

/// A trace as the dashboard draws it.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Trace {
    trace_id: String,
    /// In start order.
    spans: Vec<SpanRecord>,
}

/// One trace's spans: its id, each span's id, parent, service, name,
/// start, duration and attributes.
#[utoipa::path(get, path = "/_dashboard/api/traces/{trace_id}", tag = "operations",
    security((), ("bearer" = [])),
    params(("trace_id" = String, Path, description = "32 lowercase hex digits")),
    responses(
        (status = 200, description = "The trace", body = Trace),
        (status = 401, description = "Not from loopback, and no valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No span of that trace is kept", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Not a trace id", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn trace(
    State(g): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(trace_id): Path<String>,
    req: Request,
) -> Response {
    crate::admin::operator_view(&g, peer, req, || async {
        gather(&g, &trace_id).await.map(Json)
    })
    .await
}

async fn gather(g: &Shared, trace_id: &str) -> Result<Trace, Problem> {
    if !traces::valid_trace_id(trace_id) {
        return Err(Problem::invalid(
            "trace_id",
            "expected 32 lowercase hex digits",
        ));
    }
    let mut spans = traces::recent().map_or_else(Vec::new, |r| r.trace(trace_id));
    let target = format!("/_traces/{trace_id}");
    for found in ask_all::<Vec<SpanRecord>>(g, &target).await {
        spans.extend(found);
    }
    // Instances of one process share its store: each span once.
    let mut seen = HashSet::new();
    spans.retain(|s| seen.insert(s.span_id.clone()));
    if spans.is_empty() {
        return Err(Problem::not_found("no span of that trace is kept"));
    }
    spans.sort_by_key(|s| s.start_us);
    Ok(Trace {
        trace_id: trace_id.to_owned(),
        spans,
    })
}

/// An order's timeline: its saga's steps and what happened to each of
/// its messages, in time order, with the traces they belong to.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Timeline {
    order_id: String,
    /// The traces the events belong to (the checkout's, usually one).
    trace_ids: Vec<String>,
    events: Vec<bazaar_bus::timeline::Event>,
}

/// An order's timeline: every saga step with the messages underneath
/// (written to an outbox, published and confirmed, delivered, handled,
/// dropped as a duplicate, retried, dead-lettered), in time order.
#[utoipa::path(get, path = "/_dashboard/api/orders/{order_id}/timeline", tag = "operations",
    security((), ("bearer" = [])),
    params(("order_id" = String, Path, format = Uuid, description = "The order's id")),
    responses(
        (status = 200, description = "The timeline", body = Timeline),
        (status = 401, description = "Not from loopback, and no valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Nothing of that order is kept", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Not a UUID", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn timeline(
    State(g): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(order_id): Path<String>,
    req: Request,
) -> Response {
    crate::admin::operator_view(&g, peer, req, || async {
        let g = &g;
        let order_id = bazaar_chassis::id::parse("order_id", &order_id)?;
        let mut events = bazaar_bus::timeline::events(&order_id);
        let target = format!("/_timeline/{order_id}");
        for found in ask_all::<Vec<bazaar_bus::timeline::Event>>(g, &target).await {
            events.extend(found);
        }
        // Instances of one process share its store: each event once.
        let mut seen = HashSet::new();
        events.retain(|e| {
            seen.insert((
                e.at_us,
                e.service.clone(),
                e.what.clone(),
                e.kind.clone(),
                e.message_id.clone(),
            ))
        });
        if events.is_empty() {
            return Err(Problem::not_found("nothing of that order is kept"));
        }
        events.sort_by_key(|e| e.at_us);
        let mut trace_ids: Vec<String> = Vec::new();
        for t in events.iter().filter_map(|e| e.trace_id.as_ref()) {
            if !trace_ids.contains(t) {
                trace_ids.push(t.clone());
            }
        }
        Ok(Json(Timeline {
            order_id,
            trace_ids,
            events,
        }))
    })
    .await
}

/// Every registered instance's JSON answer to `GET target` (1 s each at
/// most; one that does not answer is left out).
async fn ask_all<T: serde::de::DeserializeOwned>(g: &Shared, target: &str) -> Vec<T> {
    let instances = g
        .upstreams
        .discovery()
        .registry()
        .all()
        .await
        .unwrap_or_default();
    let asked = instances.iter().map(|i| {
        tokio::time::timeout(
            std::time::Duration::from_secs(1),
            crate::admin::ask::<T>(i, target),
        )
    });
    futures::future::join_all(asked)
        .await
        .into_iter()
        .filter_map(|r| r.ok().flatten())
        .collect()
}
