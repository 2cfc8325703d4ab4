//! The gateway: the one public edge. Routes `/api/<version>/…` by a route
//! table that is configuration (`[[gateway.routes]]`, reloaded live) to
//! the instances discovery reports, balanced by a strategy per route and
//! shielded by health checks and per-instance breakers; verifies tokens
//! and roles at the edge; limits rates; caches public reads; transforms
//! v2 bodies; aggregates `/api/v1/me/overview`.

mod act;
mod admin;
mod cache;
mod conn;
mod dashboard;
mod edge;
mod grpc;
mod limit;
pub mod openapi;
mod overview;
mod proxy;
mod table;
mod transform;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::response::IntoResponse as _;
use axum::routing::get;
use bazaar_chassis::http::{FastPath, Readiness};
use bazaar_chassis::{ServiceContext, Shutdown};
use bazaar_mesh::breaker::BreakerSettings;
use tokio::net::TcpListener;

/// The gateway's own operations (beside the proxied ones) and their
/// contract, from the same annotated handlers.
fn own_api() -> utoipa_axum::router::OpenApiRouter<proxy::Shared> {
    use utoipa_axum::routes;
    utoipa_axum::router::OpenApiRouter::new()
        .routes(routes!(overview::overview))
        .routes(routes!(admin::services))
        .routes(routes!(admin::config))
        .routes(routes!(act::act))
        .routes(routes!(dashboard::trace))
        .routes(routes!(dashboard::timeline))
        .routes(routes!(dashboard::snapshot_now))
        .routes(routes!(dashboard::snapshot_stream))
        .routes(routes!(dashboard::search_traces))
        .routes(routes!(dashboard::dashboard_dead_letters))
        .routes(routes!(dashboard::replay_dead_letters))
        .routes(routes!(dashboard::dashboard_replays))
}

/// The contract of what the gateway serves itself (paths as clients see
/// them); [`openapi::public`] adds it to the services'.
pub fn own_openapi() -> utoipa::openapi::OpenApi {
    let mut doc = own_api().into_openapi();
    doc.merge(admin::api().into_openapi());
    doc
}

/// Swagger UI at `/api/docs`, its assets inside the binary, reading the
/// contract at `/api/openapi.json`.
fn docs() -> Router {
    use utoipa_swagger_ui::{Config, SwaggerUi};
    SwaggerUi::new(DOCS)
        .config(
            Config::from(CONTRACT)
                .try_it_out_enabled(true)
                .persist_authorization(true),
        )
        .into()
}

/// Where the contract and its Swagger UI are served.
const CONTRACT: &str = "/api/openapi.json";
const DOCS: &str = "/api/docs";

/// A built gateway, ready to serve.
pub struct Application {
    ctx: ServiceContext,
    table: table::Table,
    /// The public contract, served at `/api/openapi.json`.
    contract: bytes::Bytes,
}

impl Application {
    /// Checks the route table; a bad one stops the start with its reason.
    pub async fn build(ctx: ServiceContext) -> anyhow::Result<Self> {
        let start = ctx.live.current();
        let table = table::Table::compile(&start.gateway, &start.features, default_timeout(&ctx))
            .map_err(|e| anyhow::anyhow!("gateway route table: {e}"))?;
        Ok(Self {
            ctx,
            table,
            contract: bytes::Bytes::new(),
        })
    }

    /// Publishes `contract` (the services' merged by [`openapi::public`])
    /// at `/api/openapi.json`.
    #[must_use]
    pub fn with_contract(mut self, contract: &utoipa::openapi::OpenApi) -> Self {
        self.contract = serde_json::to_vec(contract).unwrap_or_default().into();
        self
    }

    pub async fn run_until_stopped(
        self,
        listener: TcpListener,
        shutdown: Shutdown,
    ) -> anyhow::Result<()> {
        let config = &self.ctx.config;
        let live = table::Live::new(self.table);
        live.follow(&self.ctx.live, default_timeout(&self.ctx));
        let g = &config.gateway;
        let probe: bazaar_mesh::upstream::Probe = Arc::new(|member| {
            Box::pin(async move { conn::healthy(&member.authority, &member.host).await })
        });
        let upstreams = bazaar_mesh::upstream::Upstreams::new(
            self.ctx.discovery.clone(),
            bazaar_mesh::upstream::Settings {
                breaker: BreakerSettings {
                    consecutive: g.eject_after.max(1),
                    open_for: Duration::from_millis(g.breaker_open_ms),
                    ..BreakerSettings::default()
                },
                health_interval: Duration::from_millis(g.health_interval_ms.max(100)),
                budget_percent: g.retry_budget_percent,
                bulkhead: g.bulkhead.max(1),
            },
            probe,
            self.ctx.calls.instruments(),
        );
        let replays = Arc::new(admin::Replays::default());
        let state: proxy::Shared = Arc::new(proxy::Gateway {
            live,
            upstreams,
            verifier: self.ctx.verifier.clone(),
            buckets: limit::Buckets::default(),
            cache: cache::Cache::default(),
            body_limit: config.body_limit,
            grpc: grpc::client(),
            grpc_timeout: default_timeout(&self.ctx),
            config: self.ctx.live.clone(),
            board: dashboard::Board::new(self.ctx.bus.clone(), replays.clone()),
        });
        // The admin API takes the edge as middleware; the gateway's own
        // handlers call it directly (no extra boxed layer on the hot path).
        let admin = admin::router(admin::AdminState {
            bus: self.ctx.bus.clone(),
            verifier: self.ctx.verifier.clone(),
            replays,
        })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            edge::edge,
        ));
        let contract = self.contract.clone();
        let edge = own_api()
            .split_for_parts()
            .0
            .route(
                CONTRACT,
                get(move || {
                    let contract = contract.clone();
                    async move {
                        if contract.is_empty() {
                            return bazaar_chassis::Problem::not_found(
                                "no API contract is published",
                            )
                            .into_response();
                        }
                        (
                            [(axum::http::header::CONTENT_TYPE, "application/json")],
                            contract,
                        )
                            .into_response()
                    }
                }),
            )
            .with_state(state.clone())
            .route("/_dashboard", get(dashboard::page))
            .route("/_dashboard/", get(dashboard::page))
            .route("/_dashboard/app.js", get(dashboard::page))
            .route("/_dashboard/app.css", get(dashboard::page))
            .merge(admin)
            .merge(
                // Every instance's diagnostics; on this public port for
                // operators only.
                bazaar_chassis::http::diagnostics(self.ctx.calls.clone()).layer(
                    axum::middleware::from_fn_with_state(state.clone(), admin::operator_only),
                ),
            )
            .merge(docs());
        // The proxied requests skip the router (its per-route machinery
        // costs several boxed futures per request).
        let trusted = state.live.clone();
        let fast = FastPath {
            claims: proxy::owns,
            route: |path| {
                if path.starts_with("/api/") {
                    "/api/{*rest}"
                } else {
                    "grpc"
                }
            },
            handler: move |req: Request, peer: SocketAddr| {
                let g = state.clone();
                // Boxed once here, the proxy's large future is not copied
                // again on each hand-over on the way into the connection.
                Box::pin(async move { proxy::handle(&g, peer, req).await })
            },
            threads: config.gateway.threads,
            header_timeout: (config.gateway.header_timeout_ms > 0)
                .then(|| Duration::from_millis(config.gateway.header_timeout_ms)),
            max_connections_per_address: config.gateway.max_connections_per_address,
            exempt: Arc::new(move |ip| trusted.current().trusts(ip)),
        };
        bazaar_chassis::http::serve_fast(
            &self.ctx,
            edge,
            fast,
            listener,
            Readiness::default(),
            shutdown,
        )
        .await
    }
}

/// The comma-separated tokens of every value of a header, trimmed; a
/// value that is not text counts as one empty token.
fn tokens(
    headers: &axum::http::HeaderMap,
    name: impl axum::http::header::AsHeaderName,
) -> impl Iterator<Item = &str> {
    headers
        .get_all(name)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("").split(','))
        .map(str::trim)
}

fn default_timeout(ctx: &ServiceContext) -> Duration {
    Duration::from_millis(ctx.config.upstream_timeout_ms)
}
