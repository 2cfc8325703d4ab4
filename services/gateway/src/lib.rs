//! The gateway: the one public edge. Routes `/api/v1/{auth,products,orders}/…`
//! to the services found through discovery, verifies tokens at the edge and
//! forwards the caller's identity, streams bodies both ways, and maps
//! upstream failures to 503 (unreachable) and 504 (too slow).

mod admin;
mod proxy;
mod routes;

use std::time::Duration;

use bazaar_chassis::http::Readiness;
use bazaar_chassis::{ServiceContext, Shutdown};
use tokio::net::TcpListener;

/// A built gateway, ready to serve.
pub struct Application {
    ctx: ServiceContext,
    state: proxy::GatewayState,
}

impl Application {
    pub async fn build(ctx: ServiceContext) -> anyhow::Result<Self> {
        let state = proxy::GatewayState::new(
            ctx.discovery.clone(),
            ctx.verifier.clone(),
            Duration::from_millis(ctx.config.upstream_timeout_ms),
            ctx.config.body_limit,
        );
        Ok(Self { ctx, state })
    }

    pub async fn run_until_stopped(
        self,
        listener: TcpListener,
        shutdown: Shutdown,
    ) -> anyhow::Result<()> {
        let admin = admin::router(admin::AdminState {
            bus: self.ctx.bus.clone(),
            verifier: self.ctx.verifier.clone(),
        });
        let router = admin.merge(proxy::router(self.state));
        bazaar_chassis::http::serve(&self.ctx, router, listener, Readiness::default(), shutdown)
            .await
    }
}
