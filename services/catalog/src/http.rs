//! The catalog HTTP API.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{FromRef, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bazaar_bus::{Bus, BusError, Envelope};
use bazaar_chassis::db::Db;
use bazaar_chassis::id::PathId;
use bazaar_chassis::paging::Paging;
use bazaar_chassis::{AuthUser, Config, Json, Problem, Verifier};
use bazaar_contracts::topics::{COMMAND_EXCHANGE, ORDERS_CREATE};
use bazaar_contracts::{CreateOrder, Order, OrderItem, Page, Product, Reply};
use bytes::Bytes;
use serde::Deserialize;

use crate::domain::{ProductBody, ProductInput};
use crate::lists::Lists;
use crate::store;

#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    pub bus: Bus,
    pub verifier: Arc<Verifier>,
    pub config: Arc<Config>,
    pub lists: Arc<Lists>,
    pub outbox: bazaar_chassis::messaging::Outbox,
}

impl FromRef<AppState> for Arc<Verifier> {
    fn from_ref(s: &AppState) -> Self {
        s.verifier.clone()
    }
}

/// The routes and their contract, from one source: each handler's
/// `#[utoipa::path]` makes both (a route cannot exist without its spec).
fn api() -> utoipa_axum::router::OpenApiRouter<AppState> {
    use utoipa_axum::routes;
    utoipa_axum::router::OpenApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(buy))
        .routes(routes!(fetch, replace, remove))
}

pub fn router(state: AppState) -> Router {
    api().with_state(state).split_for_parts().0
}

/// Catalog's HTTP contract (OpenAPI 3.1), as the service serves it.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api().into_openapi()
}

fn db_error(e: sqlx::Error) -> Problem {
    Problem::internal(&e)
}

/// A page of products, newest first (`q` searches names and descriptions).
#[utoipa::path(get, path = "/products", tag = "catalog", params(Paging),
    responses(
        (status = 200, description = "A page of products", body = Page<Product>),
        (status = 422, description = "Bad paging values", body = Problem, content_type = "application/problem+json"),
    ))]
async fn list(State(s): State<AppState>, paging: Paging) -> Result<Response, Problem> {
    let version = store::version(&s.db.read).await.map_err(db_error)?;
    let key = (paging.q.clone(), paging.limit, paging.offset);
    let body = match s.lists.get(&key, version) {
        Some(body) => body,
        None => {
            let (items, total) =
                store::list(&s.db.read, paging.q.as_deref(), paging.limit, paging.offset)
                    .await
                    .map_err(db_error)?;
            let page = Page {
                items,
                total,
                limit: paging.limit,
                offset: paging.offset,
            };
            let body = Bytes::from(serde_json::to_vec(&page).map_err(|e| Problem::internal(&e))?);
            s.lists.put(key, version, body.clone());
            body
        }
    };
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// One product.
#[utoipa::path(get, path = "/products/{id}", tag = "catalog",
    params(("id" = String, Path, format = Uuid, description = "The product's id (a UUID)")),
    responses(
        (status = 200, description = "The product", body = Product),
        (status = 404, description = "No such product", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The id is not a UUID", body = Problem, content_type = "application/problem+json"),
    ))]
async fn fetch(State(s): State<AppState>, PathId(id): PathId) -> Result<Json<Product>, Problem> {
    store::get(&s.db.read, &id)
        .await
        .map_err(db_error)?
        .map(Json)
        .ok_or_else(|| Problem::not_found("no such product"))
}

/// Adds a product (admin).
#[utoipa::path(post, path = "/products", tag = "catalog", request_body = ProductBody,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "The product added", body = Product),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid fields", body = Problem, content_type = "application/problem+json"),
    ))]
async fn create(
    State(s): State<AppState>,
    caller: AuthUser,
    Json(body): Json<ProductBody>,
) -> Result<(StatusCode, Json<Product>), Problem> {
    caller.require_admin()?;
    let input = ProductInput::try_from(body)?;
    let product = Product {
        id: uuid::Uuid::now_v7().to_string(),
        name: input.name,
        description: input.description,
        price: input.price,
        currency: input.currency,
        image_url: input.image_url,
        creator: caller.id,
        created_at: bazaar_chassis::now(),
    };
    s.outbox
        .committing(store::insert(&s.db.write, &product))
        .await
        .map_err(db_error)?;
    Ok((StatusCode::CREATED, Json(product)))
}

/// Replaces a product's fields (admin).
#[utoipa::path(put, path = "/products/{id}", tag = "catalog", request_body = ProductBody,
    params(("id" = String, Path, format = Uuid, description = "The product's id (a UUID)")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The product as it is now", body = Product),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such product", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid fields", body = Problem, content_type = "application/problem+json"),
    ))]
async fn replace(
    State(s): State<AppState>,
    caller: AuthUser,
    PathId(id): PathId,
    Json(body): Json<ProductBody>,
) -> Result<Json<Product>, Problem> {
    caller.require_admin()?;
    let input = ProductInput::try_from(body)?;
    let product = s
        .outbox
        .committing(store::update(&s.db.write, &id, &input))
        .await
        .map_err(db_error)?
        .ok_or_else(|| Problem::not_found("no such product"))?;
    Ok(Json(product))
}

/// Deletes a product (admin).
#[utoipa::path(delete, path = "/products/{id}", tag = "catalog",
    params(("id" = String, Path, format = Uuid, description = "The product's id (a UUID)")),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such product", body = Problem, content_type = "application/problem+json"),
    ))]
async fn remove(
    State(s): State<AppState>,
    caller: AuthUser,
    PathId(id): PathId,
) -> Result<StatusCode, Problem> {
    caller.require_admin()?;
    if s.outbox
        .committing(store::delete(&s.db.write, &id))
        .await
        .map_err(db_error)?
    {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(Problem::not_found("no such product"))
    }
}

/// The products to buy, one id per unit (an id twice buys two).
#[derive(Deserialize, utoipa::ToSchema)]
#[schema(examples(json!({"ids": ["0190c6a0-5b1e-7c3a-9f00-3c1d2e4f5a6b", "0190c6a0-5b1e-7c3a-9f00-3c1d2e4f5a6b"]})))]
struct BuyBody {
    /// 1 to 100 product ids.
    #[schema(min_items = 1, max_items = 100)]
    ids: Vec<String>,
}

/// Most lines a single buy may carry.
const MAX_BUY_IDS: usize = 100;

/// Prices the products and asks orders, over the bus, to create the order.
#[utoipa::path(post, path = "/products/buy", tag = "catalog", request_body = BuyBody,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "The order, PENDING", body = Order),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Unknown or invalid ids", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Orders cannot take it now", body = Problem, content_type = "application/problem+json"),
    ))]
async fn buy(
    State(s): State<AppState>,
    caller: AuthUser,
    trace: bazaar_chassis::http::Trace,
    Json(body): Json<BuyBody>,
) -> Result<(StatusCode, Json<Order>), Problem> {
    if body.ids.is_empty() {
        return Err(Problem::invalid("ids", "must name at least one product"));
    }
    if body.ids.len() > MAX_BUY_IDS {
        return Err(Problem::invalid(
            "ids",
            format!("at most {MAX_BUY_IDS} ids per purchase"),
        ));
    }
    let ids = body
        .ids
        .iter()
        .enumerate()
        .map(|(i, id)| bazaar_chassis::id::parse(&format!("ids[{i}]"), id))
        .collect::<Result<Vec<String>, Problem>>()?;
    // Quantity per id, in first-seen order.
    let mut order: Vec<&str> = Vec::new();
    let mut quantity: HashMap<&str, i64> = HashMap::new();
    for id in &ids {
        *quantity.entry(id.as_str()).or_insert_with(|| {
            order.push(id.as_str());
            0
        }) += 1;
    }
    let products = store::get_many(&s.db.read, &order)
        .await
        .map_err(db_error)?;
    let by_id: HashMap<&str, &Product> = products.iter().map(|p| (p.id.as_str(), p)).collect();
    let unknown: Vec<&str> = order
        .iter()
        .copied()
        .filter(|id| !by_id.contains_key(id))
        .collect();
    if !unknown.is_empty() {
        return Err(Problem::invalid(
            "ids",
            format!("unknown product ids: {}", unknown.join(", ")),
        ));
    }
    let currency = by_id[order[0]].currency.clone();
    if products.iter().any(|p| p.currency != currency) {
        return Err(Problem::invalid(
            "ids",
            "all products of one purchase must share a currency",
        ));
    }
    let items = order
        .iter()
        .map(|id| {
            let p = by_id[id];
            OrderItem {
                product_id: p.id.clone(),
                name: p.name.clone(),
                unit_price: p.price,
                quantity: quantity[id],
            }
        })
        .collect();
    let command = CreateOrder {
        user_id: caller.id,
        user_email: caller.email,
        currency,
        items,
    };
    let mut env = Envelope::new(ORDERS_CREATE, &command).map_err(|e| Problem::internal(&e))?;
    trace.stamp(&mut env);
    let timeout = Duration::from_millis(s.config.bus_request_timeout_ms);
    let reply = s
        .bus
        .request(COMMAND_EXCHANGE, ORDERS_CREATE, &env, timeout)
        .await
        .map_err(|e| match e {
            BusError::Timeout(_) => Problem::timeout("the orders service did not answer in time"),
            BusError::Unroutable { .. } => {
                Problem::unavailable("the orders service is not running")
            }
            BusError::Unavailable(_) | BusError::NotConfirmed => {
                Problem::unavailable("the message bus is unavailable")
            }
            other => Problem::internal(&other),
        })?;
    match reply.payload::<Reply<Order>>() {
        Ok(Reply::Ok { value }) => Ok((StatusCode::CREATED, Json(value))),
        Ok(Reply::Err { status, detail }) => Err(Problem::new(
            StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
            "order-rejected",
            detail,
        )),
        Err(e) => {
            tracing::error!(error = %e, "unreadable reply from orders");
            Err(Problem::new(
                StatusCode::BAD_GATEWAY,
                "bad-reply",
                "the orders service sent an unreadable reply",
            ))
        }
    }
}
