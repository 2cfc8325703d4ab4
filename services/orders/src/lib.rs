//! The orders service: owns orders, their lines and the order saga.
//! Orders come from `POST /orders` (priced through catalog) and from
//! `orders.create` bus requests (catalog's buy); either way the order and
//! its saga's first command are committed together, and the saga
//! (`saga.rs`) drives it to CONFIRMED or CANCELLED.

mod domain;
mod events;
mod http;
mod metrics;
mod saga;
mod store;
mod writer;

use std::sync::Arc;
use std::time::Duration;

use bazaar_bus::{Consumer, QueueSpec};
use bazaar_chassis::db::Db;
use bazaar_chassis::http::Readiness;
use bazaar_chassis::messaging::{self, Outbox};
use bazaar_chassis::{ServiceContext, Shutdown};
use bazaar_contracts::topics::{
    COMMAND_EXCHANGE, INVENTORY, INVENTORY_REJECTED, INVENTORY_RESERVED, ORDERS_CREATE,
    ORDERS_PRODUCTS_QUEUE, ORDERS_SAGA_QUEUE, PAYMENT, PAYMENT_CHARGED, PAYMENT_DECLINED, PRODUCT,
    PRODUCT_DELETED, PRODUCT_UPDATED,
};
use bazaar_contracts::topics::{ORDERS_USERS_QUEUE, USER, USER_PROFILE_ANY};
use tokio::net::TcpListener;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Orders' HTTP contract (OpenAPI 3.1), paths as the service serves
/// them (the gateway publishes them below `/api/<version>`).
pub fn openapi() -> utoipa::openapi::OpenApi {
    http::openapi()
}

/// The action patterns orders answers: `{"role":"orders","cmd":"list"}`
/// is the caller's orders (a token is needed).
pub fn actions() -> Vec<bazaar_chassis::Action> {
    vec![
        bazaar_chassis::Action::new(
            serde_json::json!({"role": "orders", "cmd": "list"}),
            "GET",
            "/orders",
        )
        .authenticated(&[]),
    ]
}

/// A built orders service, ready to serve.
pub struct Application {
    ctx: ServiceContext,
    db: Db,
}

impl Application {
    pub async fn build(ctx: ServiceContext) -> anyhow::Result<Self> {
        let db = ctx.database(&MIGRATOR).await?;
        Ok(Self { ctx, db })
    }

    /// Resumes unfinished sagas, consumes order requests and saga events,
    /// and serves HTTP until `shutdown`.
    pub async fn run_until_stopped(
        self,
        listener: TcpListener,
        shutdown: Shutdown,
    ) -> anyhow::Result<()> {
        let ctx = &self.ctx;
        let db = &self.db;
        let step_timeout = Duration::from_millis(ctx.config.saga_step_timeout_ms.max(1));
        let outbox = Outbox::spawn(db.clone(), ctx.bus.clone(), shutdown.clone());
        let saga_metrics = metrics::SagaMetrics::new(&ctx.metrics);
        saga_metrics.sample(db.clone(), &shutdown);
        let writer = writer::OrderWriter::spawn(
            db.write.clone(),
            outbox.clone(),
            step_timeout,
            saga_metrics.clone(),
        );

        let resumed = saga::resume(db, &outbox, step_timeout).await?;
        if resumed > 0 {
            tracing::info!(resumed, "resumed unfinished order sagas");
        }
        saga::spawn_sweeper(
            db.clone(),
            outbox.clone(),
            step_timeout,
            saga_metrics.clone(),
            shutdown.clone(),
        );

        let events = QueueSpec::new(ORDERS_SAGA_QUEUE)
            .bind(INVENTORY, INVENTORY_RESERVED)
            .bind(INVENTORY, INVENTORY_REJECTED)
            .bind(PAYMENT, PAYMENT_CHARGED)
            .bind(PAYMENT, PAYMENT_DECLINED);
        let saga_consumer = messaging::spawn_consumer(
            ctx,
            db,
            &outbox,
            events,
            saga::Saga {
                step_timeout,
                metrics: saga_metrics.clone(),
            },
            &shutdown,
        )
        .await?;

        let products = QueueSpec::new(ORDERS_PRODUCTS_QUEUE)
            .bind(PRODUCT, PRODUCT_UPDATED)
            .bind(PRODUCT, PRODUCT_DELETED);
        let products_consumer = messaging::spawn_consumer(
            ctx,
            db,
            &outbox,
            products,
            saga::Products {
                metrics: saga_metrics.clone(),
            },
            &shutdown,
        )
        .await?;
        let buyers = QueueSpec::new(ORDERS_USERS_QUEUE).bind(USER, USER_PROFILE_ANY);
        let buyers_consumer =
            messaging::spawn_consumer(ctx, db, &outbox, buyers, events::Buyers, &shutdown).await?;
        let prices: Arc<http::PriceCache> = Arc::default();
        events::forget_prices(ctx, prices.clone(), shutdown.clone()).await?;

        let requests = QueueSpec::new(ORDERS_CREATE).bind(COMMAND_EXCHANGE, ORDERS_CREATE);
        let concurrency = ctx.config.consumer_concurrency.max(1);
        let stop = shutdown.clone();
        let create_consumer = Consumer::new(ctx.bus.clone(), requests)
            .with_policy(ctx.config.retry_policy())
            .with_limits(concurrency.saturating_mul(4), 128, 4)
            .start(
                Arc::new(events::CreateRequests {
                    bus: ctx.bus.clone(),
                    writer: writer.clone(),
                }),
                async move { stop.wait().await },
            )
            .await?;
        let create_consumer = tokio::spawn(create_consumer);

        let state = http::AppState {
            db: db.clone(),
            verifier: ctx.verifier.clone(),
            writer,
            prices,
            calls: ctx.calls.clone(),
        };
        let ready = Readiness {
            db: Some(db.read.clone()),
            bus: Some(ctx.bus.clone()),
            // Checkout prices through catalog.
            needs: Some((ctx.discovery.clone(), vec!["catalog"])),
        };
        let served =
            bazaar_chassis::http::serve(ctx, http::router(state), listener, ready, shutdown).await;
        // The consumers stop taking deliveries on shutdown and finish those in hand.
        for c in [
            saga_consumer,
            products_consumer,
            buyers_consumer,
            create_consumer,
        ] {
            if let Err(e) = c.await {
                tracing::error!(error = %e, "an orders consumer crashed");
            }
        }
        served
    }
}
