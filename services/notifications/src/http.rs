//! The notifications HTTP API: the caller's notifications, newest first.

use axum::Router;
use axum::extract::State;
use bazaar_chassis::paging::Paging;
use bazaar_chassis::{AuthUser, Json, Problem};
use bazaar_contracts::{Notification, Page};
use sqlx::Row;

pub use bazaar_chassis::http::ServiceState as AppState;

/// The routes and their contract, from the same annotated handlers.
fn api() -> utoipa_axum::router::OpenApiRouter<AppState> {
    utoipa_axum::router::OpenApiRouter::new().routes(utoipa_axum::routes!(list))
}

pub fn router(state: AppState) -> Router {
    api().with_state(state).split_for_parts().0
}

/// Notifications' HTTP contract (OpenAPI 3.1), as the service serves it.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api().into_openapi()
}

/// The caller's notifications, newest first.
#[utoipa::path(get, path = "/notifications", tag = "notifications", params(Paging),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A page of notifications", body = Page<Notification>),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Bad paging values", body = Problem, content_type = "application/problem+json"),
    ))]
async fn list(
    State(s): State<AppState>,
    caller: AuthUser,
    paging: Paging,
) -> Result<Json<Page<Notification>>, Problem> {
    let internal = |e: sqlx::Error| Problem::internal(&e);
    let rows = sqlx::query(
        "SELECT id, kind, subject, body, created_at FROM notifications WHERE user_id = $1
         ORDER BY created_at DESC, id DESC LIMIT $2 OFFSET $3",
    )
    .bind(&caller.id)
    .bind(paging.limit)
    .bind(paging.offset)
    .fetch_all(&s.db.read)
    .await
    .map_err(internal)?;
    let items = rows
        .iter()
        .map(|r| {
            Ok(Notification {
                id: r.try_get("id")?,
                kind: r.try_get("kind")?,
                subject: r.try_get("subject")?,
                body: r.try_get("body")?,
                created_at: r.try_get("created_at")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()
        .map_err(internal)?;
    let total: i64 = sqlx::query("SELECT COUNT(*) AS n FROM notifications WHERE user_id = $1")
        .bind(&caller.id)
        .fetch_one(&s.db.read)
        .await
        .and_then(|r| r.try_get("n"))
        .map_err(internal)?;
    Ok(Json(Page {
        items,
        total,
        limit: paging.limit,
        offset: paging.offset,
    }))
}
