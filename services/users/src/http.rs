//! The users REST API: the caller's profile, a profile by id (self or an
//! admin), deleting one (its account goes too), and a user's orders,
//! asked of the orders service through the mesh client.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{FromRef, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bazaar_chassis::db::Db;
use bazaar_chassis::id::PathId;
use bazaar_chassis::paging::Paging;
use bazaar_chassis::{AuthUser, Json, Problem, Verifier};
use bazaar_contracts::{Order, Page, Profile};

use crate::domain::{Change, PatchBody};
use crate::store;

#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    pub verifier: Arc<Verifier>,
    /// Calls orders (a user's orders) and auth (accounts made by gRPC).
    pub calls: bazaar_mesh::Client,
    /// Poked after a change commits, so its event goes out at once.
    pub outbox: bazaar_chassis::messaging::Outbox,
}

impl FromRef<AppState> for Arc<Verifier> {
    fn from_ref(s: &AppState) -> Self {
        s.verifier.clone()
    }
}

/// The routes and their contract, from the same annotated handlers.
fn api() -> utoipa_axum::router::OpenApiRouter<AppState> {
    use utoipa_axum::routes;
    utoipa_axum::router::OpenApiRouter::new()
        .routes(routes!(me, patch_me))
        .routes(routes!(fetch, remove))
        .routes(routes!(orders))
}

pub fn router(state: AppState) -> Router {
    api().with_state(state).split_for_parts().0
}

/// Users' HTTP contract (OpenAPI 3.1), as the service serves it.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api().into_openapi()
}

fn internal(e: sqlx::Error) -> Problem {
    Problem::internal(&e)
}

/// The caller may see and change `id`: themselves, or anyone as an admin.
/// Anyone else's profile is 404, not 403: its existence is not revealed.
pub fn allowed(caller: &AuthUser, id: &str) -> Result<(), Problem> {
    if caller.id == id || caller.is_admin() {
        Ok(())
    } else {
        Err(Problem::not_found("no such user"))
    }
}

fn no_profile() -> Problem {
    Problem::not_found("no such user")
}

/// The caller's profile.
#[utoipa::path(get, path = "/users/me", tag = "users", security(("bearer" = [])),
    responses(
        (status = 200, description = "The profile", body = Profile),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No profile (yet) for this account", body = Problem, content_type = "application/problem+json"),
    ))]
async fn me(State(s): State<AppState>, caller: AuthUser) -> Result<Json<Profile>, Problem> {
    let p = store::get(&s.db.read, &caller.id).await.map_err(internal)?;
    p.map(Json).ok_or_else(no_profile)
}

/// Changes the caller's name, phone or address (`null` clears phone or
/// address; fields not sent stay as they are).
#[utoipa::path(patch, path = "/users/me", tag = "users", security(("bearer" = [])),
    request_body = PatchBody,
    responses(
        (status = 200, description = "The profile as it is now", body = Profile),
        (status = 400, description = "The body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No profile (yet) for this account", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid or unknown fields", body = Problem, content_type = "application/problem+json"),
    ))]
async fn patch_me(
    State(s): State<AppState>,
    caller: AuthUser,
    Json(body): Json<PatchBody>,
) -> Result<Json<Profile>, Problem> {
    let change = Change::try_from(body)?;
    let p = s
        .outbox
        .committing(store::update(&s.db.write, &caller.id, &change))
        .await
        .map_err(internal)?;
    p.map(Json).ok_or_else(no_profile)
}

/// A profile: the caller's own, or anyone's for an admin (anyone else's
/// is 404: its existence is not revealed).
#[utoipa::path(get, path = "/users/{id}", tag = "users", security(("bearer" = [])),
    params(("id" = String, Path, format = Uuid, description = "The user's id (a UUID)")),
    responses(
        (status = 200, description = "The profile", body = Profile),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such user (or not yours)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The id is not a UUID", body = Problem, content_type = "application/problem+json"),
    ))]
async fn fetch(
    State(s): State<AppState>,
    caller: AuthUser,
    PathId(id): PathId,
) -> Result<Json<Profile>, Problem> {
    allowed(&caller, &id)?;
    let p = store::get(&s.db.read, &id).await.map_err(internal)?;
    p.map(Json).ok_or_else(no_profile)
}

/// Deletes a profile and its account (the caller's own, or anyone's for
/// an admin).
#[utoipa::path(delete, path = "/users/{id}", tag = "users", security(("bearer" = [])),
    params(("id" = String, Path, format = Uuid, description = "The user's id (a UUID)")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such user (or not yours)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The id is not a UUID", body = Problem, content_type = "application/problem+json"),
    ))]
async fn remove(
    State(s): State<AppState>,
    caller: AuthUser,
    PathId(id): PathId,
) -> Result<StatusCode, Problem> {
    allowed(&caller, &id)?;
    match s
        .outbox
        .committing(store::delete(&s.db.write, &id))
        .await
        .map_err(internal)?
    {
        Some(_) => Ok(StatusCode::NO_CONTENT),
        None => Err(no_profile()),
    }
}

/// A user's orders, from the orders service on the caller's behalf: its
/// answer is passed on; orders down or slow is 503 or 504 at once (the
/// client's breaker and timeout), never a hang.
#[utoipa::path(get, path = "/users/{id}/orders", tag = "users", security(("bearer" = [])),
    params(("id" = String, Path, format = Uuid, description = "The user's id (a UUID)"), Paging),
    responses(
        (status = 200, description = "A page of the user's orders, newest first", body = Page<Order>),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such user (or not yours)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Bad id or paging values", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Orders is unavailable", body = Problem, content_type = "application/problem+json"),
        (status = 504, description = "Orders did not answer in time", body = Problem, content_type = "application/problem+json"),
    ))]
async fn orders(
    State(s): State<AppState>,
    caller: AuthUser,
    PathId(id): PathId,
    paging: Paging,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    allowed(&caller, &id)?;
    let reply = s
        .calls
        .get("orders", &["orders"])
        .query("user_id", &id)
        .query("limit", &paging.limit.to_string())
        .query("offset", &paging.offset.to_string())
        .context(&headers)
        .on_behalf_of(&headers)
        .send()
        .await?;
    if reply.status.is_server_error() {
        return Err(Problem::from_call(&reply.unexpected()));
    }
    let json = HeaderValue::from_static("application/json");
    let content_type = reply.headers.get(header::CONTENT_TYPE).cloned();
    Ok((
        reply.status,
        [(header::CONTENT_TYPE, content_type.unwrap_or(json))],
        Body::from(reply.body),
    )
        .into_response())
}
