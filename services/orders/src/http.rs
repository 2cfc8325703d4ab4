//! The orders HTTP API: checkout (`POST /orders`, idempotent with an
//! `Idempotency-Key`) and a caller's own orders.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{FromRef, State};
use axum::http::{HeaderMap, StatusCode};
use bazaar_chassis::db::Db;
use bazaar_chassis::http::Trace;
use bazaar_chassis::id::PathId;
use bazaar_chassis::paging::Paging;
use bazaar_chassis::{AuthUser, Json, Problem, Verifier};
use bazaar_contracts::{Checkout, CreateOrder, Order, OrderItem, Page, Product, StockLine};

use crate::domain;
use crate::store::{self, NewOrder};
use crate::writer::OrderWriter;

#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    pub verifier: Arc<Verifier>,
    pub writer: OrderWriter,
    /// Calls catalog for prices.
    pub calls: bazaar_mesh::Client,
    pub prices: Arc<PriceCache>,
}

/// How long a product looked up in catalog is reused for pricing.
const PRICE_TTL: Duration = Duration::from_secs(2);

/// Products recently fetched from catalog: a checkout burst for the same
/// products costs one catalog call per product every [`PRICE_TTL`], not one
/// per order. Prices may so lag a catalog change by up to that long.
#[derive(Default)]
pub struct PriceCache {
    products: std::sync::Mutex<HashMap<String, (Instant, Product)>>,
}

impl PriceCache {
    fn get(&self, id: &str) -> Option<Product> {
        let products = self
            .products
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        products
            .get(id)
            .filter(|(at, _)| at.elapsed() < PRICE_TTL)
            .map(|(_, p)| p.clone())
    }

    /// Drops a product's price (catalog changed or deleted it).
    pub fn forget(&self, id: &str) {
        self.products
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(id);
    }

    fn put(&self, p: &Product) {
        let mut products = self
            .products
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if products.len() > 10_000 {
            products.retain(|_, (at, _)| at.elapsed() < PRICE_TTL);
        }
        products.insert(p.id.clone(), (Instant::now(), p.clone()));
    }
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
        .routes(routes!(list, checkout))
        .routes(routes!(fetch))
}

pub fn router(state: AppState) -> Router {
    api().with_state(state).split_for_parts().0
}

/// Orders' HTTP contract (OpenAPI 3.1), as the service serves it.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api().into_openapi()
}

fn internal(e: sqlx::Error) -> Problem {
    Problem::internal(&e)
}

/// A page of the caller's orders, newest first (an admin may name
/// another user with `user_id`).
#[utoipa::path(get, path = "/orders", tag = "orders", security(("bearer" = [])),
    params(Paging, ("user_id" = Option<String>, Query, description = "Whose orders (a UUID; default the caller's; another user's for admins only)")),
    responses(
        (status = 200, description = "A page of orders", body = Page<Order>),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Another user's orders, asked by a non-admin", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Bad paging values or user_id", body = Problem, content_type = "application/problem+json"),
    ))]
async fn list(
    State(s): State<AppState>,
    caller: AuthUser,
    paging: Paging,
    // `?user_id=`: whose orders (default the caller's; another user's
    // only for an admin). Read as pairs: that never fails to parse.
    axum::extract::Query(query): axum::extract::Query<Vec<(String, String)>>,
) -> Result<Json<Page<Order>>, Problem> {
    let whose = query
        .into_iter()
        .find(|(k, _)| k == "user_id")
        .map(|(_, v)| v);
    let user = match whose {
        None => caller.id.clone(),
        Some(raw) => {
            let id = bazaar_chassis::id::parse("user_id", &raw)?;
            if id != caller.id && !caller.is_admin() {
                return Err(Problem::not_found("no such user's orders"));
            }
            id
        }
    };
    let mut conn = s.db.read.acquire().await.map_err(internal)?;
    let (items, total) = store::list_for_user(&mut conn, &user, paging.limit, paging.offset)
        .await
        .map_err(internal)?;
    Ok(Json(Page {
        items,
        total,
        limit: paging.limit,
        offset: paging.offset,
    }))
}

/// One of the caller's orders (any order for an admin). Someone else's
/// order is 404, not 403: its existence is not revealed.
#[utoipa::path(get, path = "/orders/{id}", tag = "orders", security(("bearer" = [])),
    params(("id" = String, Path, format = Uuid, description = "The order's id (a UUID)")),
    responses(
        (status = 200, description = "The order", body = Order),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such order (or not yours)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The id is not a UUID", body = Problem, content_type = "application/problem+json"),
    ))]
async fn fetch(
    State(s): State<AppState>,
    caller: AuthUser,
    PathId(id): PathId,
) -> Result<Json<Order>, Problem> {
    let mut conn = s.db.read.acquire().await.map_err(internal)?;
    match store::get(&mut conn, &id).await.map_err(internal)? {
        Some(order) if order.user_id == caller.id || caller.is_admin() => Ok(Json(order)),
        _ => Err(Problem::not_found("no such order")),
    }
}

/// Most lines one checkout may carry, and most units of one line.
const MAX_LINES: usize = 100;
const MAX_QUANTITY: i64 = 10_000;

/// `Idempotency-Key`: 1 to 255 visible ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, Problem> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value.to_str().unwrap_or("");
    if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Problem::invalid(
            "Idempotency-Key",
            "must be 1 to 255 visible ASCII characters",
        ));
    }
    Ok(Some(key.to_owned()))
}

/// Checkout: prices the items through catalog, stores the order
/// (`PENDING`) and starts its saga; it ends `CONFIRMED` or `CANCELLED`.
/// The same `Idempotency-Key` from the same user returns the same order
/// (200) instead of a second one.
#[utoipa::path(post, path = "/orders", tag = "orders", security(("bearer" = [])),
    request_body = Checkout,
    params(("Idempotency-Key" = Option<String>, Header, description = "1 to 255 visible ASCII characters; a retry with the same key returns the same order")),
    responses(
        (status = 201, description = "The order, PENDING", body = Order),
        (status = 200, description = "The order this Idempotency-Key made before", body = Order),
        (status = 400, description = "The body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid token", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid items, an unknown product, or a key reused with other items", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Catalog or the order store is unavailable", body = Problem, content_type = "application/problem+json"),
    ))]
async fn checkout(
    State(s): State<AppState>,
    caller: AuthUser,
    trace: Trace,
    headers: HeaderMap,
    Json(mut body): Json<Checkout>,
) -> Result<(StatusCode, Json<Order>), Problem> {
    let key = idempotency_key(&headers)?;
    for (i, item) in body.items.iter_mut().enumerate() {
        item.product_id =
            bazaar_chassis::id::parse(&format!("items[{i}].product_id"), &item.product_id)?;
    }
    if body.items.is_empty() {
        return Err(Problem::invalid("items", "must hold at least one item"));
    }
    if body.items.len() > MAX_LINES {
        return Err(Problem::invalid(
            "items",
            format!("at most {MAX_LINES} items"),
        ));
    }
    if let Some(bad) = body
        .items
        .iter()
        .position(|i| !(1..=MAX_QUANTITY).contains(&i.quantity))
    {
        return Err(Problem::invalid(
            &format!("items[{bad}].quantity"),
            format!("must be 1 to {MAX_QUANTITY}"),
        ));
    }
    let wanted = merged(&body.items);
    let request_id = match &key {
        Some(key) => format!("key:{}:{key}", caller.id),
        None => format!("http:{}", uuid::Uuid::now_v7()),
    };
    // A key used before is answered with its order: the writer's insert
    // finds it. It is looked up here only when the checkout cannot be
    // priced now (a product deleted since, catalog unreachable), as the
    // order it made is still the answer.
    let (cmd, total) = match priced(&s, &headers, &body, &wanted, caller).await {
        Ok(priced) => priced,
        Err(problem) => {
            let Some(key) = &key else {
                return Err(problem);
            };
            let mut conn = s.db.read.acquire().await.map_err(internal)?;
            return match store::by_request(&mut conn, &request_id)
                .await
                .map_err(internal)?
            {
                Some(order) => replayed(order, &wanted, key),
                None => Err(problem),
            };
        }
    };
    let (order, created) = s
        .writer
        .create(NewOrder {
            request_id,
            cmd,
            total,
            traceparent: Some(trace.traceparent),
            http_request_id: trace.request_id,
        })
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "an order could not be stored");
            Problem::unavailable("the order could not be stored; try again")
        })?;
    match (created, &key) {
        (true, _) => Ok((StatusCode::CREATED, Json(order))),
        // The same key came in concurrently and stored first.
        (false, Some(key)) => replayed(order, &wanted, key),
        (false, None) => Ok((StatusCode::OK, Json(order))),
    }
}

/// The lines of a checkout with each product once, in first-seen order:
/// what its order's items hold.
fn merged(lines: &[StockLine]) -> Vec<(&str, i64)> {
    let mut merged: Vec<(&str, i64)> = Vec::new();
    for line in lines {
        match merged.iter_mut().find(|(id, _)| *id == line.product_id) {
            Some((_, q)) => *q = q.saturating_add(line.quantity),
            None => merged.push((&line.product_id, line.quantity)),
        }
    }
    merged
}

/// The order an `Idempotency-Key` already made: 200 when this request
/// asks for the same items, else 422 naming the key (the IETF
/// Idempotency-Key draft: a key reused with another payload is a client
/// error, not a second order and not the first one).
fn replayed(
    order: Order,
    wanted: &[(&str, i64)],
    key: &str,
) -> Result<(StatusCode, Json<Order>), Problem> {
    let same = order.items.len() == wanted.len()
        && order
            .items
            .iter()
            .zip(wanted)
            .all(|(i, (id, q))| i.product_id == *id && i.quantity == *q);
    if same {
        Ok((StatusCode::OK, Json(order)))
    } else {
        Err(Problem::invalid(
            "Idempotency-Key",
            format!("the key {key:?} was already used for a checkout with other items"),
        ))
    }
}

/// The order `caller` checks out, priced, and its total.
async fn priced(
    s: &AppState,
    headers: &HeaderMap,
    body: &Checkout,
    wanted: &[(&str, i64)],
    caller: AuthUser,
) -> Result<(CreateOrder, i64), Problem> {
    let products = price(s, headers, body).await?;
    let currency = products
        .values()
        .next()
        .map(|p| p.currency.clone())
        .unwrap_or_default();
    if products.values().any(|p| p.currency != currency) {
        return Err(Problem::invalid(
            "items",
            "all products of one order must share a currency",
        ));
    }
    // One item per product (the lines merged), in first-seen order.
    let items = wanted
        .iter()
        .map(|(id, quantity)| {
            let p = products
                .get(*id)
                .ok_or_else(|| Problem::invalid("items", "a product could not be priced"))?;
            Ok(OrderItem {
                product_id: p.id.clone(),
                name: p.name.clone(),
                unit_price: p.price,
                quantity: *quantity,
            })
        })
        .collect::<Result<Vec<_>, Problem>>()?;
    let cmd = CreateOrder {
        user_id: caller.id,
        user_email: caller.email,
        currency,
        items,
    };
    let total = domain::total(&cmd).map_err(|e| Problem::invalid("items", e.to_string()))?;
    Ok((cmd, total))
}

/// The products of a checkout, from catalog; 422 naming unknown ids.
async fn price(
    s: &AppState,
    headers: &HeaderMap,
    body: &Checkout,
) -> Result<HashMap<String, Product>, Problem> {
    let mut ids: Vec<&str> = body.items.iter().map(|i| i.product_id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    let mut known: HashMap<String, Product> = HashMap::new();
    ids.retain(|id| match s.prices.get(id) {
        Some(p) => {
            known.insert(p.id.clone(), p);
            false
        }
        None => true,
    });
    if ids.is_empty() {
        return Ok(known);
    }
    let lookups = ids.iter().map(|id| async move {
        let reply = s
            .calls
            .get("catalog", &["products", id])
            .context(headers)
            .send()
            .await?;
        match reply.status {
            StatusCode::OK => reply.json::<Product>().map(Some),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(reply.unexpected()),
        }
    });
    let found = futures::future::try_join_all(lookups)
        .await
        .map_err(|e| Problem::from_call(&e))?;
    let unknown: Vec<&str> = ids
        .iter()
        .zip(&found)
        .filter(|(_, p)| p.is_none())
        .map(|(id, _)| *id)
        .collect();
    if !unknown.is_empty() {
        return Err(Problem::invalid(
            "items",
            format!("unknown product ids: {}", unknown.join(", ")),
        ));
    }
    for (id, p) in ids.iter().zip(found) {
        let Some(p) = p else { continue };
        if p.id != *id {
            // Catalog answered for another product than asked: never price with it.
            tracing::error!(asked = %id, got = %p.id, "catalog answered with another product");
            return Err(Problem::unavailable(
                "the catalog is unavailable; try again",
            ));
        }
        s.prices.put(&p);
        known.insert(p.id.clone(), p);
    }
    Ok(known)
}
