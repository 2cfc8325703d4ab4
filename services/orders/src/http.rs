//! The orders HTTP API: checkout (`POST /orders`, idempotent with an
//! `Idempotency-Key`) and a caller's own orders.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{FromRef, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use bazaar_chassis::db::Db;
use bazaar_chassis::http::Trace;
use bazaar_chassis::paging::Paging;
use bazaar_chassis::{AuthUser, Json, Problem, Verifier};
use bazaar_contracts::{Checkout, CreateOrder, Order, OrderItem, Page, Product};
use bazaar_mesh::Discovery;

use crate::domain;
use crate::store::{self, NewOrder};
use crate::writer::OrderWriter;

#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    pub verifier: Arc<Verifier>,
    pub writer: OrderWriter,
    pub discovery: Discovery,
    pub client: reqwest::Client,
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

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/orders", get(list).post(checkout))
        .route("/orders/{id}", get(fetch))
        .with_state(state)
}

fn internal(e: sqlx::Error) -> Problem {
    Problem::internal(&e)
}

async fn list(
    State(s): State<AppState>,
    caller: AuthUser,
    paging: Paging,
) -> Result<Json<Page<Order>>, Problem> {
    let mut conn = s.db.read.acquire().await.map_err(internal)?;
    let (items, total) = store::list_for_user(&mut conn, &caller.id, paging.limit, paging.offset)
        .await
        .map_err(internal)?;
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

/// Prices the items through catalog, stores the order and starts its saga.
/// The same `Idempotency-Key` from the same user returns the same order
/// (200) instead of a second one.
async fn checkout(
    State(s): State<AppState>,
    caller: AuthUser,
    trace: Trace,
    headers: HeaderMap,
    Json(body): Json<Checkout>,
) -> Result<(StatusCode, Json<Order>), Problem> {
    let key = idempotency_key(&headers)?;
    let request_id = match &key {
        Some(key) => format!("key:{}:{key}", caller.id),
        None => format!("http:{}", uuid::Uuid::now_v7()),
    };
    if key.is_some() {
        let mut conn = s.db.read.acquire().await.map_err(internal)?;
        if let Some(order) = store::by_request(&mut conn, &request_id)
            .await
            .map_err(internal)?
        {
            return Ok((StatusCode::OK, Json(order)));
        }
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
    let products = price(&s, &body).await?;
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
    // Lines of the same product are merged, in first-seen order.
    let mut items: Vec<OrderItem> = Vec::new();
    for line in &body.items {
        if let Some(item) = items.iter_mut().find(|i| i.product_id == line.product_id) {
            item.quantity += line.quantity;
            continue;
        }
        let p = &products[&line.product_id];
        items.push(OrderItem {
            product_id: p.id.clone(),
            name: p.name.clone(),
            unit_price: p.price,
            quantity: line.quantity,
        });
    }
    let cmd = CreateOrder {
        user_id: caller.id,
        user_email: caller.email,
        currency,
        items,
    };
    let total = domain::total(&cmd).map_err(|e| Problem::invalid("items", e.to_string()))?;
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
        .map_err(|e| Problem::unavailable(format!("the order could not be stored: {e}")))?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(order)))
}

/// The products of a checkout, from catalog; 422 naming unknown ids.
async fn price(s: &AppState, body: &Checkout) -> Result<HashMap<String, Product>, Problem> {
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
    let catalog = s
        .discovery
        .pick("catalog")
        .await
        .map_err(|e| Problem::unavailable(format!("catalog: {e}")))?;
    let lookups =
        ids.iter().map(|id| {
            let url = format!("{}/products/{id}", catalog.address);
            let client = &s.client;
            async move {
                let response =
                    client.get(&url).send().await.map_err(|e| {
                        Problem::unavailable(format!("catalog did not answer: {e}"))
                    })?;
                match response.status() {
                    StatusCode::OK => response.json::<Product>().await.map(Some).map_err(|e| {
                        Problem::unavailable(format!("unreadable catalog answer: {e}"))
                    }),
                    StatusCode::NOT_FOUND => Ok(None),
                    other => Err(Problem::unavailable(format!("catalog answered {other}"))),
                }
            }
        });
    let found = futures::future::try_join_all(lookups).await?;
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
    for p in found.into_iter().flatten() {
        s.prices.put(&p);
        known.insert(p.id.clone(), p);
    }
    Ok(known)
}
