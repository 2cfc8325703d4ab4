//! Bazaar's shared language: the DTOs clients see (API.md) and the messages
//! services exchange over the bus. This is the only crate services share to
//! talk; it holds data shapes, never behaviour.

use serde::{Deserialize, Serialize};

/// Exchange names and routing keys used on the bus.
pub mod topics {
    /// The exchange that carries commands, keyed `<service>.<command>`;
    /// the same as `bazaar_bus::COMMAND_EXCHANGE`, so a command that no
    /// queue takes is refused rather than lost.
    pub const COMMAND_EXCHANGE: &str = "command";
    /// Ask orders to create an order (request/reply).
    pub const ORDERS_CREATE: &str = "orders.create";
    /// Saga commands to inventory and payments.
    pub const INVENTORY_RESERVE: &str = "inventory.reserve";
    pub const INVENTORY_RELEASE: &str = "inventory.release";
    pub const INVENTORY_COMMIT: &str = "inventory.commit";
    pub const PAYMENTS_CHARGE: &str = "payments.charge";
    pub const PAYMENTS_REFUND: &str = "payments.refund";

    /// Topic exchanges, one per entity; events are keyed `<entity>.<event>`.
    pub const USER: &str = "user";
    pub const PRODUCT: &str = "product";
    pub const ORDER: &str = "order";
    pub const INVENTORY: &str = "inventory";
    pub const PAYMENT: &str = "payment";

    pub const USER_REGISTERED: &str = "user.registered";
    /// Payload: the [`crate::Profile`] as it now is.
    pub const USER_PROFILE_UPDATED: &str = "user.profile.updated";
    /// Payload: the [`crate::Profile`] as it was; its account goes too.
    pub const USER_PROFILE_DELETED: &str = "user.profile.deleted";
    /// Binds every profile event.
    pub const USER_PROFILE_ANY: &str = "user.profile.*";
    pub const PRODUCT_CREATED: &str = "product.created";
    /// Payload: the [`crate::Product`] as it now is.
    pub const PRODUCT_UPDATED: &str = "product.updated";
    /// Payload: [`crate::ProductRef`].
    pub const PRODUCT_DELETED: &str = "product.deleted";
    pub const ORDER_CREATED: &str = "order.created";
    pub const ORDER_CONFIRMED: &str = "order.confirmed";
    pub const ORDER_CANCELLED: &str = "order.cancelled";
    pub const INVENTORY_RESERVED: &str = "inventory.reserved";
    pub const INVENTORY_REJECTED: &str = "inventory.rejected";
    pub const INVENTORY_RELEASED: &str = "inventory.released";
    pub const PAYMENT_CHARGED: &str = "payment.charged";
    pub const PAYMENT_DECLINED: &str = "payment.declined";
    pub const PAYMENT_REFUNDED: &str = "payment.refunded";

    /// Consumer queues.
    pub const ORDERS_SAGA_QUEUE: &str = "orders.saga";
    pub const INVENTORY_QUEUE: &str = "inventory.commands";
    pub const INVENTORY_PRODUCTS_QUEUE: &str = "inventory.products";
    pub const PAYMENTS_QUEUE: &str = "payments.commands";
    pub const NOTIFICATIONS_QUEUE: &str = "notifications.events";
    /// Orders' saga reacting to products that change or go.
    pub const ORDERS_PRODUCTS_QUEUE: &str = "orders.products";
    /// Orders' replica of buyers' profiles.
    pub const ORDERS_USERS_QUEUE: &str = "orders.users";
    /// Users creating profiles from registrations.
    pub const USERS_QUEUE: &str = "users.accounts";
    /// Auth removing the accounts of deleted profiles.
    pub const AUTH_QUEUE: &str = "auth.profiles";

    /// Every queue a Bazaar service consumes; each has a `<queue>.dlq`.
    pub const QUEUES: [&str; 10] = [
        ORDERS_CREATE,
        ORDERS_SAGA_QUEUE,
        ORDERS_PRODUCTS_QUEUE,
        ORDERS_USERS_QUEUE,
        USERS_QUEUE,
        AUTH_QUEUE,
        INVENTORY_QUEUE,
        INVENTORY_PRODUCTS_QUEUE,
        PAYMENTS_QUEUE,
        NOTIFICATIONS_QUEUE,
    ];

    /// The queues `name` picks: one of [`QUEUES`], or all of them for `None`;
    /// `Err` lists the valid names.
    pub fn queues(name: Option<&str>) -> Result<Vec<&'static str>, String> {
        match name {
            None => Ok(QUEUES.to_vec()),
            Some(q) => QUEUES
                .iter()
                .find(|k| **k == q)
                .map(|k| vec![*k])
                .ok_or_else(|| {
                    format!("unknown queue {q:?}; expected one of {}", QUEUES.join(", "))
                }),
        }
    }
}

/// A product and a number of units: an order line as the buyer asks for it,
/// and a line of a stock reservation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct StockLine {
    #[schema(format = Uuid)]
    pub product_id: String,
    /// 1 to 10 000 in a checkout.
    #[schema(minimum = 1)]
    pub quantity: i64,
}

/// `POST /orders` body: 1 to 100 lines, each of 1 to 10 000 units.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[schema(examples(json!({"items": [{"product_id": "0190c6a0-5b1e-7c3a-9f00-3c1d2e4f5a6b", "quantity": 2}]})))]
pub struct Checkout {
    #[schema(min_items = 1, max_items = 100)]
    pub items: Vec<StockLine>,
}

/// Command `inventory.reserve`. With `charge`, the saga's next step rides
/// along: once the units are held, inventory sends `payments.charge` with
/// it instead of answering `inventory.reserved` (no round trip through
/// orders); refused, it answers `inventory.rejected` as ever.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReserveStock {
    pub order_id: String,
    pub items: Vec<StockLine>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub charge: Option<ChargePayment>,
}

/// Event `product.deleted`: which product is gone.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProductRef {
    pub product_id: String,
}

/// Commands `inventory.release`, `inventory.commit` (sent by earlier
/// versions: inventory now commits on `order.confirmed`), `payments.refund`,
/// and the inventory events: which order they are about.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OrderRef {
    pub order_id: String,
}

/// Command `payments.charge`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChargePayment {
    pub order_id: String,
    pub user_id: String,
    pub amount: i64,
    pub currency: String,
}

/// A payment as `GET /payments/{order_id}` returns it and as the
/// `payment.*` events carry it. `status`: `CHARGED`, `DECLINED`,
/// `REFUNDED`, or `VOIDED` (cancelled before any charge).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Payment {
    pub order_id: String,
    pub amount: i64,
    pub currency: String,
    pub status: String,
}

/// Stock of one product, `GET /inventory/{product_id}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Stock {
    pub product_id: String,
    pub available: i64,
    pub reserved: i64,
}

/// `PUT /inventory/{product_id}` body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct SetStock {
    #[schema(minimum = 0, maximum = 1_000_000_000)]
    pub available: i64,
}

/// A notification sent to a user.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Notification {
    pub id: String,
    pub kind: String,
    pub subject: String,
    pub body: String,
    pub created_at: String,
}

/// A page of results: `{items, total, limit, offset}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub total: i64,
    pub limit: i64,
    pub offset: i64,
}

/// A registered account, as `auth` returns it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[schema(examples(json!({"id": "0190c6a0-0000-7000-8000-0000000000a1", "email": "ada@example.com", "name": "Ada", "role": "customer", "created_at": "2026-12-01T12:00:00Z"})))]
pub struct User {
    pub id: String,
    pub email: String,
    pub name: String,
    pub role: String,
    pub created_at: String,
}

/// A user's profile, owned by the users service (`GET /users/me`), and
/// the payload of the `user.profile.*` events.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[schema(examples(json!({"id": "0190c6a0-0000-7000-8000-0000000000a1", "email": "ada@example.com", "name": "Ada", "phone": null, "address": "1 Analytical Way", "created_at": "2026-12-01T12:00:00Z", "updated_at": "2026-12-01T12:05:00Z"})))]
pub struct Profile {
    pub id: String,
    pub email: String,
    pub name: String,
    pub phone: Option<String>,
    pub address: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

/// `POST /auth/register` body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Register {
    pub email: String,
    pub password: String,
    pub name: String,
}

/// Tokens returned by login and refresh.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[schema(examples(json!({"access_token": "eyJhbGciOiJFZERTQSIsImtpZCI6IjEifQ.e30.c2ln", "refresh_token": "q8Xk3lS2vN0pYbW7", "token_type": "Bearer", "expires_in": 900})))]
pub struct TokenPair {
    pub access_token: String,
    pub refresh_token: String,
    pub token_type: String,
    /// Seconds until the access token expires.
    pub expires_in: i64,
}

/// A product in the catalog. `price` is in minor units of `currency`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[schema(examples(json!({"id": "0190c6a0-5b1e-7c3a-9f00-3c1d2e4f5a6b", "name": "Teapot", "description": "Holds 1.2 l", "price": 1299, "currency": "EUR", "image_url": null, "creator": "0190c6a0-0000-7000-8000-0000000000ad", "created_at": "2026-12-01T12:00:00Z"})))]
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
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct OrderItem {
    pub product_id: String,
    pub name: String,
    pub unit_price: i64,
    pub quantity: i64,
}

/// An order as clients see it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[schema(examples(json!({"id": "0190c6a1-0000-7000-8000-00000000000f", "user_id": "0190c6a0-0000-7000-8000-0000000000a1", "user_email": "ada@example.com", "user_name": "Ada", "items": [{"product_id": "0190c6a0-5b1e-7c3a-9f00-3c1d2e4f5a6b", "name": "Teapot", "unit_price": 1299, "quantity": 2}], "total": 2598, "currency": "EUR", "status": "CONFIRMED", "cancel_reason": null, "created_at": "2026-12-01T12:00:00Z", "updated_at": "2026-12-01T12:00:00Z"})))]
pub struct Order {
    pub id: String,
    pub user_id: String,
    pub user_email: String,
    /// The buyer's name as orders' replica of profiles has it now (null
    /// until the first profile event about the buyer arrived).
    #[serde(default)]
    pub user_name: Option<String>,
    pub items: Vec<OrderItem>,
    pub total: i64,
    pub currency: String,
    /// `PENDING`, `CONFIRMED` or `CANCELLED`.
    pub status: String,
    pub cancel_reason: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

impl Order {
    /// The saga's first step for this order: its units, and the charge
    /// that follows once they are held.
    pub fn reservation(&self) -> ReserveStock {
        ReserveStock {
            order_id: self.id.clone(),
            items: self
                .items
                .iter()
                .map(|i| StockLine {
                    product_id: i.product_id.clone(),
                    quantity: i.quantity,
                })
                .collect(),
            charge: Some(self.charge()),
        }
    }

    /// What paying for this order asks of payments.
    pub fn charge(&self) -> ChargePayment {
        ChargePayment {
            order_id: self.id.clone(),
            user_id: self.user_id.clone(),
            amount: self.total,
            currency: self.currency.clone(),
        }
    }
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

/// The gRPC contracts, compiled from `proto/` at build time (protox: no
/// `protoc` needed): messages, client and server stubs.
pub mod grpc {
    /// `package user`: `UserService`.
    #[allow(clippy::all, clippy::pedantic, missing_docs)]
    pub mod user {
        tonic::include_proto!("user");
    }

    /// Every `.proto` here as a `FileDescriptorSet`, for server reflection.
    pub const DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));
}
