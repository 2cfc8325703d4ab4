//! The inventory HTTP API: read a product's stock; admins set it.

use axum::Router;
use axum::extract::{Path, State};
use axum::routing::get;
use bazaar_chassis::{AuthUser, Json, Problem};
use bazaar_contracts::{SetStock, Stock};

use crate::store;

pub use bazaar_chassis::http::ServiceState as AppState;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/inventory/{product_id}", get(fetch).put(set))
        .with_state(state)
}

async fn fetch(State(s): State<AppState>, Path(id): Path<String>) -> Result<Json<Stock>, Problem> {
    let mut conn =
        s.db.read
            .acquire()
            .await
            .map_err(|e| Problem::internal(&e))?;
    store::get(&mut conn, &id)
        .await
        .map_err(|e| Problem::internal(&e))?
        .map(Json)
        .ok_or_else(|| Problem::not_found("no stock recorded for this product"))
}

async fn set(
    State(s): State<AppState>,
    caller: AuthUser,
    Path(id): Path<String>,
    Json(body): Json<SetStock>,
) -> Result<Json<Stock>, Problem> {
    caller.require_admin()?;
    if body.available < 0 {
        return Err(Problem::invalid("available", "must be 0 or more"));
    }
    let mut conn =
        s.db.write
            .acquire()
            .await
            .map_err(|e| Problem::internal(&e))?;
    store::set_available(&mut conn, &id, body.available)
        .await
        .map(Json)
        .map_err(|e| Problem::internal(&e))
}
