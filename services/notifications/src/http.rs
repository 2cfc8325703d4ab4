//! The notifications HTTP API: the caller's notifications, newest first.

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use bazaar_chassis::paging::Paging;
use bazaar_chassis::{AuthUser, Json, Problem};
use bazaar_contracts::{Notification, Page};
use sqlx::Row;

pub use bazaar_chassis::http::ServiceState as AppState;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/notifications", get(list))
        .with_state(state)
}

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
