//! The orders HTTP API: a caller's own orders.

use std::sync::Arc;

use axum::Router;
use axum::extract::{FromRef, Path, State};
use axum::routing::get;
use bazaar_chassis::db::Db;
use bazaar_chassis::paging::Paging;
use bazaar_chassis::{AuthUser, Json, Problem, Verifier};
use bazaar_contracts::{Order, Page};

use crate::store;

#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    pub verifier: Arc<Verifier>,
}

impl FromRef<AppState> for Arc<Verifier> {
    fn from_ref(s: &AppState) -> Self {
        s.verifier.clone()
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/orders", get(list))
        .route("/orders/{id}", get(fetch))
        .with_state(state)
}

async fn list(
    State(s): State<AppState>,
    caller: AuthUser,
    paging: Paging,
) -> Result<Json<Page<Order>>, Problem> {
    let (items, total) = store::list_for_user(&s.db.read, &caller.id, paging.limit, paging.offset)
        .await
        .map_err(|e| Problem::internal(&e))?;
    Ok(Json(Page {
        items,
        total,
        limit: paging.limit,
        offset: paging.offset,
    }))
}

/// Someone else's order is 404, not 403: its existence is not revealed.
async fn fetch(
    State(s): State<AppState>,
    caller: AuthUser,
    Path(id): Path<String>,
) -> Result<Json<Order>, Problem> {
    match store::get(&s.db.read, &id)
        .await
        .map_err(|e| Problem::internal(&e))?
    {
        Some(order) if order.user_id == caller.id || caller.is_admin() => Ok(Json(order)),
        _ => Err(Problem::not_found("no such order")),
    }
}
