//! The inventory HTTP API: read a product's stock; admins set it.

use axum::Router;
use axum::extract::State;
use bazaar_chassis::id::PathId;
use bazaar_chassis::{AuthUser, Json, Problem};
use bazaar_contracts::{SetStock, Stock};

use crate::store;

pub use bazaar_chassis::http::ServiceState as AppState;

/// The routes and their contract, from the same annotated handlers.
fn api() -> utoipa_axum::router::OpenApiRouter<AppState> {
    utoipa_axum::router::OpenApiRouter::new().routes(utoipa_axum::routes!(fetch, set))
}

pub fn router(state: AppState) -> Router {
    api().with_state(state).split_for_parts().0
}

/// Inventory's HTTP contract (OpenAPI 3.1), as the service serves it.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api().into_openapi()
}

/// A product's stock: available and held for orders in progress.
#[utoipa::path(get, path = "/inventory/{product_id}", tag = "inventory",
    params(("product_id" = String, Path, format = Uuid, description = "The product's id (a UUID)")),
    responses(
        (status = 200, description = "The stock", body = Stock),
        (status = 404, description = "No stock recorded for this product", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The id is not a UUID", body = Problem, content_type = "application/problem+json"),
    ))]
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

/// Sets a product's available units (admin).
#[utoipa::path(put, path = "/inventory/{product_id}", tag = "inventory", request_body = SetStock,
    params(("product_id" = String, Path, format = Uuid, description = "The product's id (a UUID)")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The stock as it is now", body = Stock),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid id or units", body = Problem, content_type = "application/problem+json"),
    ))]
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
