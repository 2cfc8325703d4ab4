//! The users service: owns profiles (name, phone, address; auth keeps the
//! credentials). A profile is made from `user.registered`; every change
//! is published on the `user` exchange as `user.profile.updated` or
//! `user.profile.deleted` (auth deletes the account; orders and
//! notifications keep replicas). `GET /users/{id}/orders` calls orders
//! through the mesh client. gRPC `user.UserService` (the same rights,
//! with health and reflection) is served on the same port over h2c.

mod domain;
mod grpc;
mod http;
mod store;

use async_trait::async_trait;
use bazaar_bus::{Failure, QueueSpec, Received};
use bazaar_chassis::messaging::{self, Effects, Outbox, retry};
use bazaar_chassis::{ServiceContext, Shutdown};
use bazaar_contracts::topics::{USER, USER_REGISTERED, USERS_QUEUE};
use bazaar_contracts::{Profile, User};
use sqlx::AnyConnection;
use tokio::net::TcpListener;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Users' HTTP contract (OpenAPI 3.1), paths as the service serves
/// them (the gateway publishes them below `/api/<version>`).
pub fn openapi() -> utoipa::openapi::OpenApi {
    http::openapi()
}

/// A built users service, ready to serve.
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
            calls: ctx.calls.clone(),
            outbox: Outbox::default(),
        };
        Ok(Self { ctx, state })
    }

    /// Consumes registrations and serves HTTP until `shutdown`.
    pub async fn run_until_stopped(
        self,
        listener: TcpListener,
        shutdown: Shutdown,
    ) -> anyhow::Result<()> {
        let db = &self.state.db;
        let outbox = self.state.outbox.clone();
        outbox.start(db.clone(), self.ctx.bus.clone(), shutdown.clone());
        let spec = QueueSpec::new(USERS_QUEUE).bind(USER, USER_REGISTERED);
        let consumer =
            messaging::spawn_consumer(&self.ctx, db, &outbox, spec, Registered, &shutdown).await?;
        // REST and gRPC (h2c) on one port.
        let router =
            http::router(self.state.clone()).merge(grpc::router(self.state.clone()).await?);
        bazaar_chassis::http::serve_consuming(
            &self.ctx,
            db,
            router,
            listener,
            shutdown,
            vec![consumer],
        )
        .await
    }
}

/// `user.registered`: the account's profile, once.
struct Registered;

#[async_trait]
impl Effects for Registered {
    async fn apply(&self, tx: &mut AnyConnection, msg: &Received) -> Result<(), Failure> {
        let env = &msg.envelope;
        if env.kind != USER_REGISTERED {
            return Err(Failure::Reject(format!(
                "users does not handle {}",
                env.kind
            )));
        }
        let user: User = env
            .payload()
            .map_err(|e| Failure::Reject(format!("bad {} payload: {e}", env.kind)))?;
        let profile = Profile {
            id: user.id,
            email: user.email,
            name: user.name,
            phone: None,
            address: None,
            updated_at: user.created_at.clone(),
            created_at: user.created_at,
        };
        store::create(tx, &profile).await.map_err(retry)?;
        Ok(())
    }
}
