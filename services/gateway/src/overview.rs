//! Aggregation: `GET /api/v1/me/overview` answers with the caller's
//! profile, latest orders and notification count, fetched in parallel.
//! A part that fails is `null` and named in `errors`; the rest still comes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Extension;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderName, Method, header};
use axum::response::Response;
use bazaar_chassis::{Json, Problem};
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use serde_json::Value;

use crate::edge::{Edge, ServedBy};
use crate::proxy::{Call, Shared, set_identity};

/// The headers a call the gateway makes for a client carries: the
/// caller's token and identity, and the request's trace (the overview's
/// parts, `/act`'s forward).
pub(crate) fn part_headers(
    from: &HeaderMap,
    claims: Option<&Arc<bazaar_chassis::auth::Claims>>,
) -> HeaderMap {
    let mut h = HeaderMap::new();
    for name in [
        header::AUTHORIZATION,
        HeaderName::from_static("x-request-id"),
        HeaderName::from_static("traceparent"),
    ] {
        if let Some(v) = from.get(&name) {
            h.insert(name, v.clone());
        }
    }
    set_identity(&mut h, claims);
    h
}

/// One part: the JSON a service answers, or why it could not.
async fn part(
    g: &Shared,
    edge: &Edge,
    headers: &HeaderMap,
    service: &str,
    path: &str,
) -> Result<Value, String> {
    let call = Call {
        service,
        strategy: Default::default(),
        timeout: std::time::Duration::from_secs(3),
        retries: 1,
    };
    let answer = g
        .send(
            &call,
            edge.client,
            &Method::GET,
            headers.clone(),
            path,
            Bytes::new(),
        )
        .await
        .map_err(|p| p.detail)?;
    let status = answer.response.status();
    let body = Limited::new(answer.response.into_body(), 1024 * 1024)
        .collect()
        .await
        .map_err(|_| format!("{service} sent an answer that could not be read"))?
        .to_bytes();
    if !status.is_success() {
        return Err(format!("{service} answered {status}"));
    }
    serde_json::from_slice(&body).map_err(|_| format!("{service} sent malformed JSON"))
}

/// The caller's account, five latest orders and notification count,
/// fetched in parallel; a part that fails is `null`, named in `errors`,
/// and the rest still comes (`partial: true`).
#[utoipa::path(get, path = "/api/v1/me/overview", tag = "gateway", security(("bearer" = [])),
    responses(
        (status = 200, description = "The overview", body = Overview),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Too many requests", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn overview(
    State(g): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let g = &g;
    crate::edge::answer(g, peer, req, |edge, req| async move {
        aggregate(g, &edge, req.headers()).await
    })
    .await
}

async fn aggregate(
    g: &Shared,
    edge: &Edge,
    headers: &HeaderMap,
) -> Result<(Extension<ServedBy>, Json<Overview>), Problem> {
    let claims = g
        .claims(headers)
        .await?
        .ok_or_else(|| Problem::unauthorized("missing bearer token"))?;
    let h = part_headers(headers, Some(&claims));
    let (profile, orders, notifications) = tokio::join!(
        part(g, edge, &h, "auth", "/auth/me"),
        part(g, edge, &h, "orders", "/orders?limit=5"),
        part(g, edge, &h, "notifications", "/notifications?limit=1"),
    );
    let mut errors = BTreeMap::new();
    let mut take = |name: &str, r: Result<Value, String>| match r {
        Ok(v) => Some(v),
        Err(e) => {
            errors.insert(name.to_owned(), e);
            None
        }
    };
    let profile = take("profile", profile);
    let orders = take("orders", orders).map(|mut o| Latest {
        latest: o["items"].take(),
        total: o["total"].take(),
    });
    let notifications = take("notifications", notifications).map(|mut n| Count {
        total: n["total"].take(),
    });
    let body = Overview {
        profile,
        orders,
        notifications,
        partial: !errors.is_empty(),
        errors,
    };
    Ok((Extension(ServedBy("aggregate".into())), Json(body)))
}

/// `GET /api/v1/me/overview`. The parts are the services' own answers.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Overview {
    /// The caller's account (`null` when auth failed to answer).
    #[schema(value_type = Option<bazaar_contracts::User>)]
    profile: Option<Value>,
    orders: Option<Latest>,
    notifications: Option<Count>,
    /// Whether a part is missing.
    partial: bool,
    /// Why each missing part is missing.
    errors: BTreeMap<String, String>,
}

/// The caller's latest orders and how many there are in all.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Latest {
    #[schema(value_type = Vec<bazaar_contracts::Order>)]
    latest: Value,
    #[schema(value_type = i64)]
    total: Value,
}

/// How many notifications the caller has.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Count {
    #[schema(value_type = i64)]
    total: Value,
}
