//! `POST /act`: a JSON message goes to the service whose registered
//! pattern matches it most specifically (Seneca's mesh), through the same
//! call path as every proxied request. The message names no port and no
//! service: `{"role":"catalog","cmd":"get","id":"…"}`.

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bazaar_chassis::Problem;
use bazaar_mesh::actions::{self, NoRoute};
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use serde_json::Value;

use crate::edge::{Edge, ServedBy};
use crate::proxy::{Call, Shared};

/// Largest message accepted.
const MAX_MESSAGE: usize = 64 * 1024;
/// Largest answer passed back.
const MAX_ANSWER: usize = 8 * 1024 * 1024;

/// Sends a JSON message to the service whose registered pattern matches
/// it most specifically, e.g. `{"role":"catalog","cmd":"get","id":"…"}`;
/// the answer is that service's. A pattern may ask for a token or a role.
#[utoipa::path(post, path = "/act", tag = "gateway", security((), ("bearer" = [])),
    request_body(content = serde_json::Map<String, serde_json::Value>, description = "A JSON object of at most 64 KiB",
        example = json!({"role": "catalog", "cmd": "get", "id": "0190c6a0-5b1e-7c3a-9f00-3c1d2e4f5a6b"})),
    responses(
        (status = 200, description = "The answer of the service that took the message", body = serde_json::Value),
        (status = 400, description = "The body is not a JSON object", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "The pattern needs a token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The pattern needs another role", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No pattern matches, or the service found nothing", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Several patterns match equally", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "The message is too large", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The message lacks what the pattern needs", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Too many messages from this address", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Discovery or the service is unavailable", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn act(
    State(g): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let g = &g;
    crate::edge::answer(g, peer, req, |edge, req| async move {
        route(g, &edge, req).await
    })
    .await
}

/// Read, resolve, authorise, forward: each a stage below.
async fn route(g: &Shared, edge: &Edge, req: Request) -> Result<Response, Problem> {
    let (parts, body) = req.into_parts();
    if let Some(refused) = crate::proxy::act_limit(g, edge) {
        return Ok(refused);
    }
    let message = read_message(&parts.headers, body).await?;
    let instances = g
        .upstreams
        .discovery()
        .registry()
        .all()
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "cannot list instances for /act");
            Problem::unavailable("service discovery is unavailable")
        })?;
    let found = actions::resolve(&instances, &message).map_err(|e| match e {
        NoRoute::Unmatched => Problem::not_found("no registered pattern matches the message"),
        NoRoute::Ambiguous(which) => Problem::new(
            StatusCode::CONFLICT,
            "ambiguous-action",
            format!("the message matches {which} equally; add a key to choose"),
        ),
    })?;
    let claims = g.claims(&parts.headers).await?;
    authorise(&found.action, claims.as_deref())?;
    let target = found
        .action
        .target(&message)
        .map_err(|e| Problem::invalid("message", e.to_string()))?;
    let headers = crate::overview::part_headers(&parts.headers, claims.as_ref());
    forward(g, edge, &found, &target, headers).await
}

/// The message: a JSON object of at most [`MAX_MESSAGE`] bytes.
async fn read_message(
    headers: &HeaderMap,
    body: axum::body::Body,
) -> Result<serde_json::Map<String, Value>, Problem> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/json")
        });
    if !json {
        return Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "send the message as application/json",
        ));
    }
    let bytes = Limited::new(body, MAX_MESSAGE)
        .collect()
        .await
        .map_err(|_| {
            Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload-too-large",
                format!("a message is at most {MAX_MESSAGE} bytes"),
            )
        })?
        .to_bytes();
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(Problem::invalid(
            "message",
            "the message must be a JSON object",
        )),
        Err(_) => Err(Problem::bad_request("the message is not valid JSON")),
    }
}

/// The pattern's own rule: a token, and one of its roles.
fn authorise(
    action: &actions::Action,
    claims: Option<&bazaar_chassis::auth::Claims>,
) -> Result<(), Problem> {
    if !action.auth {
        return Ok(());
    }
    let Some(c) = claims else {
        return Err(Problem::unauthorized("this action needs a bearer token"));
    };
    if !action.roles.is_empty() && !action.roles.contains(&c.role) {
        return Err(Problem::forbidden(format!(
            "this action needs the role {}",
            action.roles.join(" or ")
        )));
    }
    Ok(())
}

/// Sends the request through the gateway's call path and passes the
/// service's answer back as it is.
async fn forward(
    g: &Shared,
    edge: &Edge,
    found: &actions::Route,
    target: &str,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let method = match found.action.method.as_str() {
        "POST" => Method::POST,
        _ => Method::GET,
    };
    let call = Call {
        service: &found.service,
        strategy: Default::default(),
        timeout: Duration::from_secs(10),
        retries: u32::from(method == Method::GET),
    };
    let answer = g
        .send(&call, edge.client, &method, headers, target, Bytes::new())
        .await?;
    let status = answer.response.status();
    let content_type = answer.response.headers().get(header::CONTENT_TYPE).cloned();
    let body = Limited::new(answer.response.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|_| crate::proxy::unreadable(&found.service))?
        .to_bytes();
    let mut res = (status, body).into_response();
    if let Some(ct) = content_type {
        res.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    res.extensions_mut()
        .insert(ServedBy(answer.member.instance.id.clone()));
    Ok(res)
}
