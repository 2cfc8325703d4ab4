//! The orders service: owns orders and their lines. Consumes `orders.create`
//! requests from the bus (exchange `command`), stores each order with its
//! lines and total in one transaction, and replies with the order. Serves a
//! caller their own orders over HTTP.

mod domain;
mod events;
mod http;
mod store;
mod writer;

use bazaar_bus::QueueSpec;
use bazaar_chassis::http::Readiness;
use bazaar_chassis::{ServiceContext, Shutdown};
use bazaar_contracts::topics::{COMMAND_EXCHANGE, ORDERS_CREATE};
use tokio::net::TcpListener;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A built orders service, ready to serve.
pub struct Application {
    ctx: ServiceContext,
    state: http::AppState,
}

impl Application {
    pub async fn build(ctx: ServiceContext) -> anyhow::Result<Self> {
        let db = bazaar_chassis::db::connect(&ctx.config, ctx.name, &MIGRATOR).await?;
        let state = http::AppState {
            db,
            verifier: ctx.verifier.clone(),
        };
        Ok(Self { ctx, state })
    }

    /// Consumes order requests and serves HTTP until `shutdown`.
    pub async fn run_until_stopped(
        self,
        listener: TcpListener,
        shutdown: Shutdown,
    ) -> anyhow::Result<()> {
        let spec = QueueSpec::new(ORDERS_CREATE).bind(COMMAND_EXCHANGE, ORDERS_CREATE);
        let concurrency = self.ctx.config.consumer_concurrency.max(1);
        let deliveries = self.ctx.bus.subscribe(&spec, concurrency).await?;
        let consumer = tokio::spawn(events::consume(
            self.ctx.bus.clone(),
            writer::OrderWriter::spawn(self.state.db.write.clone()),
            deliveries,
            usize::from(concurrency),
            shutdown.clone(),
        ));
        let ready = Readiness {
            db: Some(self.state.db.read.clone()),
            bus: Some(self.ctx.bus.clone()),
        };
        let router = http::router(self.state);
        let served =
            bazaar_chassis::http::serve(&self.ctx, router, listener, ready, shutdown).await;
        // The consumer stops taking deliveries on shutdown and finishes those in hand.
        if let Err(e) = consumer.await {
            tracing::error!(error = %e, "order consumer crashed");
        }
        served
    }
}
