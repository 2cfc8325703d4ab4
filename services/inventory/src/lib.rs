//! The inventory service: owns stock and reservations, through its outbox:
//!
//! - `order.created` (or the command `inventory.reserve`, which orders
//!   sends when it resumes a saga) holds the order's units, then passes
//!   the order's charge on to payments (`payments.charge`); refused, it
//!   answers `inventory.rejected`. (A reserve command without a charge,
//!   from an earlier version of orders, is answered `inventory.reserved`.)
//! - `order.confirmed` (or `inventory.commit`, from earlier versions)
//!   takes the held units out of stock for good.
//! - `inventory.release` returns them (`inventory.released`).
//! - `product.created` and `product.deleted` start and retire a stock.

mod http;
mod store;

use async_trait::async_trait;
use bazaar_bus::{Failure, QueueSpec, Received};
use bazaar_chassis::messaging::{self, Effects, Outbox, retry};
use bazaar_chassis::{ServiceContext, Shutdown};
use bazaar_contracts::topics::{
    COMMAND_EXCHANGE, INVENTORY, INVENTORY_COMMIT, INVENTORY_PRODUCTS_QUEUE, INVENTORY_QUEUE,
    INVENTORY_REJECTED, INVENTORY_RELEASE, INVENTORY_RELEASED, INVENTORY_RESERVE,
    INVENTORY_RESERVED, ORDER, ORDER_CONFIRMED, ORDER_CREATED, PAYMENTS_CHARGE, PRODUCT,
    PRODUCT_CREATED, PRODUCT_DELETED,
};
use bazaar_contracts::{Order, OrderRef, Product, ProductRef, ReserveStock};
use sqlx::AnyConnection;
use std::time::Duration;

use bazaar_chassis::db::Db;
use tokio::net::TcpListener;

use store::Outcome;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The action patterns inventory answers:
/// `{"role":"inventory","cmd":"stock","product_id":…}` is a product's stock.
pub fn actions() -> Vec<bazaar_chassis::Action> {
    vec![bazaar_chassis::Action::new(
        serde_json::json!({"role": "inventory", "cmd": "stock", "product_id": "*"}),
        "GET",
        "/inventory/{product_id}",
    )]
}

/// Inventory's HTTP contract (OpenAPI 3.1), paths as the service serves them.
pub fn openapi() -> utoipa::openapi::OpenApi {
    http::openapi()
}

/// A built inventory service, ready to serve.
pub struct Application {
    ctx: ServiceContext,
    state: http::AppState,
}

impl Application {
    pub async fn build(ctx: ServiceContext) -> anyhow::Result<Self> {
        let db = ctx.database(&MIGRATOR).await?;
        let state = http::AppState {
            db,
            verifier: ctx.verifier.clone(),
        };
        Ok(Self { ctx, state })
    }

    /// Consumes commands and serves HTTP until `shutdown`.
    pub async fn run_until_stopped(
        self,
        listener: TcpListener,
        shutdown: Shutdown,
    ) -> anyhow::Result<()> {
        let db = &self.state.db;
        let outbox = Outbox::spawn(db.clone(), self.ctx.bus.clone(), shutdown.clone());
        let effects = || Commands {
            default_stock: self.ctx.config.inventory.default_stock,
        };
        let commands = QueueSpec::new(INVENTORY_QUEUE)
            .bind(COMMAND_EXCHANGE, "inventory.*")
            .bind(ORDER, ORDER_CREATED)
            .bind(ORDER, ORDER_CONFIRMED);
        let products = QueueSpec::new(INVENTORY_PRODUCTS_QUEUE)
            .bind(PRODUCT, PRODUCT_CREATED)
            .bind(PRODUCT, PRODUCT_DELETED);
        let consumers = [
            messaging::spawn_consumer(&self.ctx, db, &outbox, commands, effects(), &shutdown)
                .await?,
            messaging::spawn_consumer(&self.ctx, db, &outbox, products, effects(), &shutdown)
                .await?,
        ];
        let ttl = self.ctx.config.inventory.reservation_ttl_ms.map_or(
            Duration::from_millis(self.ctx.config.saga_step_timeout_ms.saturating_mul(2)),
            Duration::from_millis,
        );
        spawn_expiry(db.clone(), outbox.clone(), ttl, shutdown.clone());
        let router = http::router(self.state.clone());
        bazaar_chassis::http::serve_consuming(
            &self.ctx,
            db,
            router,
            listener,
            shutdown,
            consumers.into(),
        )
        .await
    }
}

struct Commands {
    default_stock: i64,
}

fn payload<T: serde::de::DeserializeOwned>(msg: &Received) -> Result<T, Failure> {
    msg.envelope
        .payload()
        .map_err(|e| Failure::Reject(format!("bad {} payload: {e}", msg.envelope.kind)))
}

#[async_trait]
impl Effects for Commands {
    // Every order touches the same few stock rows.
    const SERIAL: bool = true;

    async fn apply(&self, tx: &mut AnyConnection, msg: &Received) -> Result<(), Failure> {
        let env = &msg.envelope;
        let answer = match env.kind.as_str() {
            INVENTORY_RESERVE => return self.reserve(tx, env, payload(msg)?).await,
            ORDER_CREATED => {
                let order: Order = payload(msg)?;
                return self.reserve(tx, env, order.reservation()).await;
            }
            INVENTORY_RELEASE => {
                let cmd: OrderRef = payload(msg)?;
                let released = store::release(tx, &cmd.order_id).await.map_err(retry)?;
                released.then_some((INVENTORY_RELEASED, cmd.order_id))
            }
            INVENTORY_COMMIT => {
                let cmd: OrderRef = payload(msg)?;
                store::commit(tx, &cmd.order_id).await.map_err(retry)?;
                None
            }
            ORDER_CONFIRMED => {
                // Only the order's id: the rest of the order is not needed here.
                #[derive(serde::Deserialize)]
                struct Confirmed {
                    id: String,
                }
                let order: Confirmed = payload(msg)?;
                store::commit(tx, &order.id).await.map_err(retry)?;
                None
            }
            PRODUCT_CREATED => {
                let product: Product = payload(msg)?;
                store::ensure(tx, &product.id, self.default_stock)
                    .await
                    .map_err(retry)?;
                None
            }
            PRODUCT_DELETED => {
                let gone: ProductRef = payload(msg)?;
                store::retire(tx, &gone.product_id).await.map_err(retry)?;
                tracing::info!(product_id = %gone.product_id, "stock retired: the product was deleted");
                None
            }
            other => {
                return Err(Failure::Reject(format!(
                    "inventory does not handle {other}"
                )));
            }
        };
        match answer {
            Some((kind, order_id)) => {
                messaging::send_caused(tx, env, (INVENTORY, kind), &OrderRef { order_id }).await
            }
            None => Ok(()),
        }
    }
}

impl Commands {
    /// Holds an order's units; then sends its charge on to payments (or,
    /// with none, answers `inventory.reserved`), or answers
    /// `inventory.rejected`. A repeat gets the first outcome again.
    async fn reserve(
        &self,
        tx: &mut AnyConnection,
        env: &bazaar_bus::Envelope,
        cmd: ReserveStock,
    ) -> Result<(), Failure> {
        if cmd.items.is_empty() || cmd.items.iter().any(|l| l.quantity <= 0) {
            return Err(Failure::Reject(
                "a reservation needs lines with positive quantities".into(),
            ));
        }
        // The charge passed on is the reserved order's, never another's.
        if cmd
            .charge
            .as_ref()
            .is_some_and(|c| c.order_id != cmd.order_id)
        {
            return Err(Failure::Reject(
                "a reservation's charge must be for the same order".into(),
            ));
        }
        let outcome = store::reserve(tx, &cmd.order_id, &cmd.items, self.default_stock)
            .await
            .map_err(retry)?;
        let order = OrderRef {
            order_id: cmd.order_id,
        };
        match (outcome, cmd.charge) {
            (Outcome::Reserved | Outcome::Committed, Some(charge)) => {
                messaging::send_caused(tx, env, (COMMAND_EXCHANGE, PAYMENTS_CHARGE), &charge).await
            }
            (Outcome::Reserved | Outcome::Committed, None) => {
                messaging::send_caused(tx, env, (INVENTORY, INVENTORY_RESERVED), &order).await
            }
            (Outcome::Rejected | Outcome::Released, _) => {
                messaging::send_caused(tx, env, (INVENTORY, INVENTORY_REJECTED), &order).await
            }
        }
    }
}

/// Releases reservations held longer than `ttl`, until `shutdown`: a
/// reservation the saga neither committed nor released (a foreign
/// `inventory.reserve` for an order that does not exist, a saga that
/// died) must not hold stock for ever.
fn spawn_expiry(db: Db, outbox: Outbox, ttl: Duration, shutdown: Shutdown) {
    let every = (ttl / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
    shutdown.every(every, "reservation expiry", move || {
        let (db, outbox) = (db.clone(), outbox.clone());
        async move { expire(&db, &outbox, ttl).await }
    });
}

async fn expire(db: &Db, outbox: &Outbox, ttl: Duration) -> anyhow::Result<()> {
    const BATCH: i64 = 200;
    loop {
        let due = outbox.committing(release_expired(db, ttl, BATCH)).await?;
        if (due as i64) < BATCH {
            return Ok(());
        }
    }
}

/// Releases up to `batch` reservations held longer than `ttl`, in one
/// transaction; returns how many were due.
async fn release_expired(db: &Db, ttl: Duration, batch: i64) -> anyhow::Result<usize> {
    let before = bazaar_chassis::ago(ttl);
    let mut tx = db.write.begin().await?;
    let due = store::held_since(&mut tx, &before, batch).await?;
    for order_id in &due {
        if store::release(&mut tx, order_id).await? {
            let mut event = bazaar_bus::Envelope::new(
                INVENTORY_RELEASED,
                &OrderRef {
                    order_id: order_id.clone(),
                },
            )?;
            event.correlation_id = Some(order_id.clone());
            messaging::enqueue(&mut tx, &[(INVENTORY, INVENTORY_RELEASED, &event)]).await?;
            tracing::warn!(
                order_id = %order_id,
                ttl_ms = ttl.as_millis() as u64,
                "a reservation was neither committed nor released in time; released"
            );
        }
    }
    tx.commit().await?;
    Ok(due.len())
}

#[cfg(test)]
mod tests {
    use bazaar_bus::{Envelope, Failure, Received};
    use bazaar_chassis::messaging::Effects;
    use bazaar_contracts::topics::{INVENTORY_RESERVE, PAYMENTS_CHARGE};
    use bazaar_contracts::{ChargePayment, ReserveStock, StockLine};
    use sqlx::Row;

    fn received(kind: &str, payload: &impl serde::Serialize) -> Received {
        Received::first(Envelope::new(kind, payload).unwrap())
    }

    fn reserve(order_id: &str, charged: &str) -> ReserveStock {
        ReserveStock {
            order_id: order_id.into(),
            items: vec![StockLine {
                product_id: "p".into(),
                quantity: 2,
            }],
            charge: Some(ChargePayment {
                order_id: charged.into(),
                user_id: "u".into(),
                amount: 500,
                currency: "USD".into(),
            }),
        }
    }

    #[tokio::test]
    async fn held_units_pass_the_charge_on_and_only_the_orders_own() {
        let db = crate::store::tests::db().await;
        let commands = super::Commands { default_stock: 10 };
        let mut tx = db.write.begin().await.unwrap();
        // Another order's charge riding on this reservation is refused,
        // and nothing is held.
        let foreign = received(INVENTORY_RESERVE, &reserve("o1", "o2"));
        assert!(matches!(
            commands.apply(&mut tx, &foreign).await,
            Err(Failure::Reject(_))
        ));
        // Held: the charge goes to payments, for this order.
        let own = received(INVENTORY_RESERVE, &reserve("o1", "o1"));
        commands.apply(&mut tx, &own).await.unwrap();
        let rows = sqlx::query("SELECT routing_key, envelope FROM outbox")
            .fetch_all(&mut *tx)
            .await
            .unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].get::<String, _>("routing_key"), PAYMENTS_CHARGE);
        let sent: Envelope = serde_json::from_str(&rows[0].get::<String, _>("envelope")).unwrap();
        assert_eq!(sent.payload::<ChargePayment>().unwrap().order_id, "o1");
        assert_eq!(sent.causation_id.as_deref(), Some(own.envelope.id.as_str()));
        let stock = crate::store::get(&mut tx, "p").await.unwrap().unwrap();
        assert_eq!((stock.available, stock.reserved), (8, 2));
    }
}
