//! The payments HTTP API: an order's payment, for its owner or an admin.

use axum::Router;
use axum::extract::State;
use bazaar_chassis::id::PathId;
use bazaar_chassis::{AuthUser, Json, Problem};
use bazaar_contracts::Payment;

pub use bazaar_chassis::http::ServiceState as AppState;

/// The routes and their contract, from the same annotated handlers.
fn api() -> utoipa_axum::router::OpenApiRouter<AppState> {
    utoipa_axum::router::OpenApiRouter::new().routes(utoipa_axum::routes!(fetch))
}

pub fn router(state: AppState) -> Router {
    api().with_state(state).split_for_parts().0
}

/// Payments' HTTP contract (OpenAPI 3.1), as the service serves it.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api().into_openapi()
}

/// An order's payment, for its owner or an admin. Someone else's
/// payment is 404: its existence is not revealed.
#[utoipa::path(get, path = "/payments/{order_id}", tag = "payments",
    params(("order_id" = String, Path, format = Uuid, description = "The order's id (a UUID)")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The payment", body = Payment),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No payment for this order (or not yours)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The id is not a UUID", body = Problem, content_type = "application/problem+json"),
    ))]
async fn fetch(
    State(s): State<AppState>,
    caller: AuthUser,
    PathId(order_id): PathId,
) -> Result<Json<Payment>, Problem> {
    let mut conn =
        s.db.read
            .acquire()
            .await
            .map_err(|e| Problem::internal(&e))?;
    match crate::find(&mut conn, &order_id)
        .await
        .map_err(|e| Problem::internal(&e))?
    {
        Some((owner, payment)) if owner == caller.id || caller.is_admin() => Ok(Json(payment)),
        _ => Err(Problem::not_found("no payment for this order")),
    }
}
