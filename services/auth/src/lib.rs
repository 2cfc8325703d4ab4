//! The auth service: owns credentials (argon2id hashes), refresh tokens and
//! the EdDSA signing keys. Issues short-lived access tokens and publishes
//! their public keys as a JWKS. Publishes `user.registered`; consumes
//! `user.profile.deleted` (the users service deleted a profile: its
//! account, credentials and refresh tokens go too).

mod domain;
mod error;
mod http;
mod keys;
mod secrets;
mod store;

use std::sync::Arc;

use bazaar_bus::{Failure, QueueSpec, Received};
use bazaar_chassis::messaging;
use bazaar_chassis::{ServiceContext, Shutdown};
use bazaar_contracts::Profile;
use bazaar_contracts::topics::{AUTH_QUEUE, USER, USER_PROFILE_DELETED};
use sqlx::AnyConnection;
use tokio::net::TcpListener;

pub use error::AuthError;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Auth' HTTP contract (OpenAPI 3.1), paths as the service serves
/// them (the gateway publishes them below `/api/<version>`).
pub fn openapi() -> utoipa::openapi::OpenApi {
    http::openapi()
}

/// A built auth service, ready to serve.
pub struct Application {
    ctx: ServiceContext,
    state: http::AppState,
}

impl Application {
    /// Opens the database, loads or creates the signing key and the admin account.
    pub async fn build(ctx: ServiceContext) -> anyhow::Result<Self> {
        let db = ctx.database(&MIGRATOR).await?;
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
        let db = self.state.db.clone();
        // A rotation on another replica reaches this one.
        let (keys, read) = (self.state.keys.clone(), db.read.clone());
        shutdown.every(keys::RELOAD_EVERY, "reloading the signing key", move || {
            let (keys, read) = (keys.clone(), read.clone());
            async move { keys.reload(&read).await }
        });
        let outbox = self.state.outbox.clone();
        outbox.start(db.clone(), self.ctx.bus.clone(), shutdown.clone());
        let spec = QueueSpec::new(AUTH_QUEUE).bind(USER, USER_PROFILE_DELETED);
        let consumer =
            messaging::spawn_consumer(&self.ctx, &db, &outbox, spec, ProfileGone, &shutdown)
                .await?;
        let router = http::router(self.state);
        bazaar_chassis::http::serve_consuming(
            &self.ctx,
            &db,
            router,
            listener,
            shutdown,
            vec![consumer],
        )
        .await
    }
}

/// `user.profile.deleted`: the account goes, with its refresh tokens (its
/// access tokens live out their short lifetime).
struct ProfileGone;

#[async_trait::async_trait]
impl messaging::Effects for ProfileGone {
    async fn apply(&self, tx: &mut AnyConnection, msg: &Received) -> Result<(), Failure> {
        let env = &msg.envelope;
        if env.kind != USER_PROFILE_DELETED {
            return Err(Failure::Reject(format!(
                "auth does not handle {}",
                env.kind
            )));
        }
        let profile: Profile = env
            .payload()
            .map_err(|e| Failure::Reject(format!("bad {} payload: {e}", env.kind)))?;
        store::delete_account(tx, &profile.id)
            .await
            .map_err(messaging::retry)?;
        tracing::info!(user = %profile.id, "account deleted with its profile");
        Ok(())
    }
}
