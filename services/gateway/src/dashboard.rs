//! The dashboard's JSON API (loopback or admin), which scripts can use
//! too. `GET /_dashboard/api/traces/{trace_id}`: a trace's spans, from
//! this process's store and every registered instance's (`/_traces/…`).

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
    let g = &g;
    crate::edge::answer(g, peer, req, |edge, req| async move {
        crate::admin::operator(g, &edge, req.headers()).await?;
        gather(g, &trace_id).await.map(Json)
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
    let instances = g
        .upstreams
        .discovery()
        .registry()
        .all()
        .await
        .unwrap_or_default();
    let target = format!("/_traces/{trace_id}");
    let asked = instances.iter().map(|i| {
        tokio::time::timeout(
            std::time::Duration::from_secs(1),
            crate::admin::ask::<Vec<SpanRecord>>(i, &target),
        )
    });
    for found in futures::future::join_all(asked).await {
        spans.extend(found.ok().flatten().unwrap_or_default());
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
