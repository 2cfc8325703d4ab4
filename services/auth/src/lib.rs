//! The auth service: owns credentials (argon2id hashes), refresh tokens and
//! the EdDSA signing keys. Issues short-lived access tokens and publishes
//! their public keys as a JWKS. Publishes nothing on the bus yet.

mod domain;
mod error;
mod http;
mod keys;
mod secrets;
mod store;

use std::sync::Arc;

use bazaar_chassis::http::Readiness;
use bazaar_chassis::{ServiceContext, Shutdown};
use tokio::net::TcpListener;

pub use error::AuthError;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A built auth service, ready to serve.
pub struct Application {
    ctx: ServiceContext,
    state: http::AppState,
}

impl Application {
    /// Opens the database, loads or creates the signing key and the admin account.
    pub async fn build(ctx: ServiceContext) -> anyhow::Result<Self> {
        let db = bazaar_chassis::db::connect(&ctx.config, ctx.name, &MIGRATOR).await?;
        let keys = Arc::new(keys::SigningKeys::load_or_create(&db.write).await?);
        ctx.verifier.set_keys(&keys::jwks(&db.read).await?);
        let hasher = Arc::new(secrets::Hasher::new(&ctx.config)?);
        store::ensure_admin(&db, &ctx.config, &hasher).await?;
        let dummy_hash = hasher.hash(secrets::random_token(16)).await?.into();
        let state = http::AppState {
            db,
            keys,
            verifier: ctx.verifier.clone(),
            config: ctx.config.clone(),
            dummy_hash,
            hasher,
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
            self.ctx.bus.clone(),
            shutdown.clone(),
        );
        let ready = Readiness {
            db: Some(self.state.db.read.clone()),
            bus: Some(self.ctx.bus.clone()),
            needs: None,
        };
        let router = http::router(self.state);
        bazaar_chassis::http::serve(&self.ctx, router, listener, ready, shutdown).await
    }
}
