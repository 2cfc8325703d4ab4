//! The catalog service: owns products. Public reads, admin-only writes, a
//! demo catalog seeded on first start, and `POST /products/buy`, which asks
//! orders (bus request `orders.create`) to create the buyer's order.

mod domain;
mod http;
mod lists;
mod store;

use bazaar_chassis::http::Readiness;
use bazaar_chassis::{ServiceContext, Shutdown};
use tokio::net::TcpListener;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Catalog's HTTP contract (OpenAPI 3.1), paths as the service serves
/// them (the gateway publishes them below `/api/<version>`).
pub fn openapi() -> utoipa::openapi::OpenApi {
    http::openapi()
}

/// The action patterns catalog answers (`POST /act` on the gateway):
/// `{"role":"catalog","cmd":"get","id":…}` is one product,
/// `{"role":"catalog","cmd":"list"}` a page of them (other keys are the
/// list's query: `limit`, `offset`, `q`).
pub fn actions() -> Vec<bazaar_chassis::Action> {
    use bazaar_chassis::Action;
    use serde_json::json;
    vec![
        Action::new(
            json!({"role": "catalog", "cmd": "get", "id": "*"}),
            "GET",
            "/products/{id}",
        ),
        Action::new(
            json!({"role": "catalog", "cmd": "list"}),
            "GET",
            "/products",
        ),
    ]
}

/// A built catalog service, ready to serve.
pub struct Application {
    ctx: ServiceContext,
    state: http::AppState,
}

impl Application {
    /// Opens the database and seeds the demo catalog on first start.
    pub async fn build(ctx: ServiceContext) -> anyhow::Result<Self> {
        let db = ctx.database(&MIGRATOR).await?;
        if ctx.config.seed_demo {
            store::seed_demo(&db.write).await?;
        }
        let state = http::AppState {
            db,
            bus: ctx.bus.clone(),
            verifier: ctx.verifier.clone(),
            config: ctx.config.clone(),
            lists: Default::default(),
            outbox: Default::default(),
        };
        Ok(Self { ctx, state })
    }

    /// Serves on `listener` until `shutdown`.
    pub async fn run_until_stopped(
        self,
        listener: TcpListener,
        shutdown: Shutdown,
    ) -> anyhow::Result<()> {
        self.state.outbox.start(
            self.state.db.clone(),
            self.state.bus.clone(),
            shutdown.clone(),
        );
        let ready = Readiness {
            db: Some(self.state.db.read.clone()),
            bus: Some(self.state.bus.clone()),
            needs: None,
        };
        let router = http::router(self.state);
        bazaar_chassis::http::serve(&self.ctx, router, listener, ready, shutdown).await
    }
}
