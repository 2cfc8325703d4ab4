//! The payments HTTP API: an order's payment, for its owner or an admin.

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use bazaar_chassis::id::PathId;
use bazaar_chassis::{AuthUser, Json, Problem};
use bazaar_contracts::Payment;

pub use bazaar_chassis::http::ServiceState as AppState;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/payments/{order_id}", get(fetch))
        .with_state(state)
}

/// Someone else's payment is 404: its existence is not revealed.
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
