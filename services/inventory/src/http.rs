//! The inventory HTTP API: read a product's stock; admins set it.

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use bazaar_chassis::id::PathId;
use bazaar_chassis::{AuthUser, Json, Problem};
use bazaar_contracts::{SetStock, Stock};

use crate::store;

pub use bazaar_chassis::http::ServiceState as AppState;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/inventory/{product_id}", get(fetch).put(set))
        .with_state(state)
}

async fn fetch(State(s): State<AppState>, PathId(id): PathId) -> Result<Json<Stock>, Problem> {
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
    PathId(id): PathId,
    Json(body): Json<SetStock>,
) -> Result<Json<Stock>, Problem> {
    caller.require_admin()?;
    if !(0..=store::MAX_STOCK).contains(&body.available) {
        return Err(Problem::invalid(
            "available",
            format!("must be 0 to {}", store::MAX_STOCK),
        ));
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
