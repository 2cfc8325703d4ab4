//! Bazaar's shared language: the DTOs clients see (API.md) and the messages
//! services exchange over the bus. This is the only crate services share to
//! talk; it holds data shapes, never behaviour.

use serde::{Deserialize, Serialize};

/// Exchange names and routing keys used on the bus.
pub mod topics {
    /// The exchange that carries commands, keyed `<service>.<command>`.
    pub const COMMAND_EXCHANGE: &str = "command";
    /// Ask orders to create an order (request/reply).
    pub const ORDERS_CREATE: &str = "orders.create";
}

/// A page of results: `{items, total, limit, offset}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub total: i64,
    pub limit: i64,
    pub offset: i64,
}

/// A registered account, as `auth` returns it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct User {
    pub id: String,
    pub email: String,
    pub name: String,
    pub role: String,
    pub created_at: String,
}

/// Tokens returned by login and refresh.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenPair {
    pub access_token: String,
    pub refresh_token: String,
    pub token_type: String,
    /// Seconds until the access token expires.
    pub expires_in: i64,
}

/// A product in the catalog. `price` is in minor units of `currency`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Product {
    pub id: String,
    pub name: String,
    pub description: String,
    pub price: i64,
    pub currency: String,
    pub image_url: Option<String>,
    pub creator: String,
    pub created_at: String,
}

/// One line of an order; `unit_price` in minor units.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OrderItem {
    pub product_id: String,
    pub name: String,
    pub unit_price: i64,
    pub quantity: i64,
}

/// An order as clients see it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Order {
    pub id: String,
    pub user_id: String,
    pub user_email: String,
    pub items: Vec<OrderItem>,
    pub total: i64,
    pub currency: String,
    /// `PENDING`, `CONFIRMED` or `CANCELLED`.
    pub status: String,
    pub cancel_reason: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

/// Command `orders.create`: the buyer and the already-priced lines.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CreateOrder {
    pub user_id: String,
    pub user_email: String,
    pub currency: String,
    pub items: Vec<OrderItem>,
}

/// The reply to a command: the result or a problem that says why not.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Reply<T> {
    Ok { value: T },
    Err { status: u16, detail: String },
}
