//! The service runtime every Bazaar service stands on: layered config,
//! logs, the HTTP bootstrap (`/health`, `/ready`, `/metrics`, request and
//! instance ids, body limit, problem+json errors), graceful shutdown, the
//! token-verifying auth extractor and the per-service database.

pub mod auth;
pub mod config;
pub mod db;
pub mod h2c;
pub mod http;
pub mod id;
pub mod json;
pub mod live;
pub mod messaging;
pub mod metrics;
pub mod paging;
pub mod problem;
pub mod replica;
pub mod shutdown;
pub mod telemetry;
pub mod traces;

use std::sync::Arc;

use bazaar_bus::Bus;
use bazaar_mesh::Discovery;

pub use auth::{AuthUser, Verifier};
pub use bazaar_mesh::actions::Action;
pub use config::Config;
pub use json::Json;
pub use metrics::Metrics;
pub use problem::Problem;
pub use shutdown::Shutdown;

/// What one service instance is handed at start: its own config view,
/// metrics registry, bus and discovery handles. No globals, so any set of
/// services can share a process and still each report their own metrics.
#[derive(Clone)]
pub struct ServiceContext {
    /// The service name, e.g. `catalog`.
    pub name: &'static str,
    /// Unique per instance; sent back as `X-Instance-Id`.
    pub instance_id: String,
    pub config: Arc<Config>,
    pub metrics: Metrics,
    pub bus: Bus,
    pub discovery: Discovery,
    /// Calls other services by name (breakers, retries, bulkhead).
    pub calls: bazaar_mesh::Client,
    pub verifier: Arc<Verifier>,
    /// The configuration as it changes while running (`config` is the
    /// one read at start).
    pub live: live::LiveConfig,
    /// The action patterns this instance registers (`POST /act`).
    pub actions: Vec<bazaar_mesh::actions::Action>,
}

impl ServiceContext {
    /// A context for service `name` with a fresh instance id and metrics registry.
    pub fn new(name: &'static str, config: Arc<Config>, bus: Bus, discovery: Discovery) -> Self {
        let calls = bazaar_mesh::Client::new(
            discovery.clone(),
            config.calls.settings(),
            std::time::Duration::from_millis(config.calls.timeout_ms.max(1)),
        )
        .calling_as(name);
        let metrics = Metrics::new(name);
        let bus = bus.instrumented(name);
        metrics.with_registry(|r| {
            calls.instruments().register(r);
            bus.metrics().register(r);
        });
        let verifier = Arc::new(Verifier::remote(calls.clone(), auth::Audience::of(&config)));
        Self {
            name,
            instance_id: format!("{name}-{}", uuid::Uuid::now_v7()),
            live: live::LiveConfig::fixed(config.clone()),
            actions: Vec::new(),
            config,
            metrics,
            bus,
            discovery,
            calls,
            verifier,
        }
    }
}

impl ServiceContext {
    /// Opens the service's database ([`db::connect`]) and reports its
    /// connection pools in `/metrics`.
    pub async fn database(&self, migrator: &sqlx::migrate::Migrator) -> anyhow::Result<db::Db> {
        let db = db::connect(&self.config, self.name, migrator).await?;
        self.metrics.watch_pools(&db);
        Ok(db)
    }

    /// The same context, following `live` for what changes while running.
    #[must_use]
    pub fn with_live(mut self, live: live::LiveConfig) -> Self {
        self.live = live;
        self
    }
}

/// Now, UTC, as fixed-width RFC 3339 with microseconds, so that text order
/// is time order in every database.
pub fn now() -> String {
    timestamp(time::OffsetDateTime::now_utc())
}

/// `after` from now, in the format of [`now`].
pub fn from_now(after: std::time::Duration) -> String {
    let after = time::Duration::try_from(after).unwrap_or(time::Duration::MAX);
    timestamp(time::OffsetDateTime::now_utc().saturating_add(after))
}

/// `before` ago, in the format of [`now`].
pub fn ago(before: std::time::Duration) -> String {
    let before = time::Duration::try_from(before).unwrap_or(time::Duration::MAX);
    timestamp(time::OffsetDateTime::now_utc().saturating_sub(before))
}

/// A timestamp of [`now`]'s format, `by` later (the same text if it
/// does not parse).
pub fn timestamp_after(at: &str, by: std::time::Duration) -> String {
    let by = time::Duration::try_from(by).unwrap_or(time::Duration::MAX);
    time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
        .map_or_else(|_| at.to_owned(), |t| timestamp(t.saturating_add(by)))
}

fn timestamp(t: time::OffsetDateTime) -> String {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
    );
    t.format(&format).unwrap_or_default()
}
