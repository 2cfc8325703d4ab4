//! Wiring: starts any set of Bazaar services in this process. `bazaar up`
//! starts them all on the in-memory bus and registry; `bazaar serve` starts
//! one against the configured RabbitMQ, database and registry.

pub mod configure;
pub mod dlq;
pub mod load;
pub mod report;
pub mod supervise;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bazaar_bus::Bus;
use bazaar_chassis::live::LiveConfig;
use bazaar_chassis::{Config, ServiceContext, Shutdown};
use bazaar_mesh::etcd::EtcdRegistry;
use bazaar_mesh::{Discovery, MemoryRegistry, Registry, StaticRegistry};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Every service name `serve` accepts, in start order.
pub const SERVICES: [&str; 8] = [
    "auth",
    "users",
    "inventory",
    "payments",
    "notifications",
    "orders",
    "catalog",
    "gateway",
];

/// A running set of services.
pub struct System {
    /// The gateway's base URL, e.g. `http://127.0.0.1:8080`.
    pub gateway_url: String,
    pub shutdown: Shutdown,
    pub bus: Bus,
    pub discovery: Discovery,
    tasks: Vec<(String, JoinHandle<anyhow::Result<()>>)>,
}

impl System {
    /// Waits for every service to stop; the first failure is returned.
    pub async fn wait(self) -> anyhow::Result<()> {
        let mut result = Ok(());
        for (name, task) in self.tasks {
            let outcome = task
                .await
                .with_context(|| format!("{name} panicked"))
                .and_then(|r| r);
            if let Err(e) = outcome {
                tracing::error!(service = %name, error = format!("{e:#}"), "service failed");
                if result.is_ok() {
                    result = Err(e.context(format!("{name} failed")));
                }
            }
        }
        result
    }

    /// Triggers shutdown and waits for everything to drain.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.trigger();
        self.wait().await
    }
}

/// What every service of a process shares.
#[derive(Clone)]
struct Shared {
    config: Arc<Config>,
    live: LiveConfig,
    bus: Bus,
    discovery: Discovery,
}

/// Builds and starts one instance of `service`, on `listener`.
async fn start_one(
    service: &'static str,
    shared: &Shared,
    listener: TcpListener,
    shutdown: Shutdown,
) -> anyhow::Result<JoinHandle<anyhow::Result<()>>> {
    let mut ctx = ServiceContext::new(
        service,
        shared.config.clone(),
        shared.bus.clone(),
        shared.discovery.clone(),
    )
    .with_live(shared.live.clone());
    ctx.actions = actions(service);
    let task = match service {
        "auth" => {
            let app = bazaar_auth::Application::build(ctx).await?;
            tokio::spawn(app.run_until_stopped(listener, shutdown))
        }
        "catalog" => {
            let app = bazaar_catalog::Application::build(ctx).await?;
            tokio::spawn(app.run_until_stopped(listener, shutdown))
        }
        "orders" => {
            let app = bazaar_orders::Application::build(ctx).await?;
            tokio::spawn(app.run_until_stopped(listener, shutdown))
        }
        "inventory" => {
            let app = bazaar_inventory::Application::build(ctx).await?;
            tokio::spawn(app.run_until_stopped(listener, shutdown))
        }
        "payments" => {
            let app = bazaar_payments::Application::build(ctx).await?;
            tokio::spawn(app.run_until_stopped(listener, shutdown))
        }
        "users" => {
            let app = bazaar_users::Application::build(ctx).await?;
            tokio::spawn(app.run_until_stopped(listener, shutdown))
        }
        "notifications" => {
            let app = bazaar_notifications::Application::build(ctx).await?;
            tokio::spawn(app.run_until_stopped(listener, shutdown))
        }
        "gateway" => {
            let app = bazaar_gateway::Application::build(ctx)
                .await?
                .with_contract(&contract());
            tokio::spawn(app.run_until_stopped(listener, shutdown))
        }
        other => anyhow::bail!(
            "unknown service {other:?}; expected one of {}",
            SERVICES.join(", ")
        ),
    };
    Ok(task)
}

/// The public API contract: every service's, as the gateway publishes it.
pub fn contract() -> utoipa::openapi::OpenApi {
    bazaar_gateway::openapi::public(vec![
        ("auth", bazaar_auth::openapi()),
        ("users", bazaar_users::openapi()),
        ("orders", bazaar_orders::openapi()),
        ("catalog", bazaar_catalog::openapi()),
        ("inventory", bazaar_inventory::openapi()),
        ("payments", bazaar_payments::openapi()),
        ("notifications", bazaar_notifications::openapi()),
    ])
}

/// The action patterns each service answers (`POST /act`).
fn actions(service: &str) -> Vec<bazaar_mesh::actions::Action> {
    match service {
        "catalog" => bazaar_catalog::actions(),
        "orders" => bazaar_orders::actions(),
        "inventory" => bazaar_inventory::actions(),
        _ => Vec::new(),
    }
}

fn service_name(name: &str) -> anyhow::Result<&'static str> {
    SERVICES
        .iter()
        .copied()
        .find(|s| *s == name)
        .with_context(|| {
            format!(
                "unknown service {name:?}; expected one of {}",
                SERVICES.join(", ")
            )
        })
}

/// The live configuration of this process (the file, and etcd's keys
/// when it is given); the log level follows it.
async fn follow_config(
    config: &Arc<Config>,
    etcd: Option<bazaar_mesh::etcd::Client>,
    shutdown: &Shutdown,
) -> LiveConfig {
    let live = LiveConfig::start(config.clone(), etcd, shutdown.clone()).await;
    let mut level = config.log_level.clone();
    let first = live.current();
    if first.log_level != level {
        level.clone_from(&first.log_level);
        if let Err(e) = bazaar_chassis::telemetry::set_level(&level) {
            tracing::error!(error = %e, "log level not applied");
        }
    }
    live.on_change(move |c| {
        if c.log_level != level {
            level.clone_from(&c.log_level);
            if let Err(e) = bazaar_chassis::telemetry::set_level(&level) {
                tracing::error!(error = %e, "log level not applied");
            }
        }
    });
    live
}

/// RabbitMQ when `amqp_url` is set, else the in-memory bus.
async fn connect_bus(config: &Config) -> anyhow::Result<Bus> {
    match &config.amqp_url {
        Some(url) => Bus::connect(url)
            .await
            .with_context(|| format!("cannot connect to RabbitMQ at {url}")),
        None => Ok(Bus::memory()),
    }
}

/// Parses `catalog=3,orders=2`.
pub fn parse_replicas(spec: &str) -> anyhow::Result<HashMap<&'static str, usize>> {
    let mut out = HashMap::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, n) = part
            .split_once('=')
            .with_context(|| format!("expected NAME=N, got {part:?}"))?;
        let n: usize = n
            .trim()
            .parse()
            .with_context(|| format!("replica count of {name} must be a number"))?;
        anyhow::ensure!(
            (1..=16).contains(&n),
            "replica count of {name} must be 1 to 16"
        );
        out.insert(service_name(name.trim())?, n);
    }
    Ok(out)
}

/// The whole system in this process: in-memory bus and registry, SQLite
/// under the data dir (unless the config names another database),
/// services on ephemeral loopback ports, the gateway on `gateway`.
pub async fn up(
    config: Config,
    replicas: &HashMap<&'static str, usize>,
    gateway: TcpListener,
) -> anyhow::Result<System> {
    let config = Arc::new(config);
    let bus = connect_bus(&config).await?;
    let discovery = Discovery::new(Arc::new(MemoryRegistry::default()));
    let shutdown = Shutdown::default();
    let live = follow_config(&config, None, &shutdown).await;
    let shared = Shared {
        config: config.clone(),
        live,
        bus: bus.clone(),
        discovery: discovery.clone(),
    };
    let gateway_url = format!("http://{}", gateway.local_addr()?);
    let mut tasks = Vec::new();
    let mut gateway = Some(gateway);
    for service in SERVICES {
        let count = replicas.get(service).copied().unwrap_or(1);
        for _ in 0..count {
            let listener = match (service, gateway.take()) {
                ("gateway", Some(l)) => l,
                (_, g) => {
                    gateway = g;
                    bazaar_chassis::http::bind(&config.host, 0).await?
                }
            };
            let task = start_one(service, &shared, listener, shutdown.clone())
                .await
                .with_context(|| format!("cannot start {service}"))?;
            tasks.push((service.to_owned(), task));
        }
    }
    Ok(System {
        gateway_url,
        shutdown,
        bus,
        discovery,
        tasks,
    })
}

/// One service in this process, against the configured bus and registry.
pub async fn serve(config: Config, service: &str) -> anyhow::Result<System> {
    let service = service_name(service)?;
    let config = Arc::new(config);
    if config.amqp_url.is_none() {
        tracing::warn!(
            "no amqp_url configured: using an in-memory bus, which reaches no other process"
        );
    }
    let bus = connect_bus(&config).await?;
    let etcd = match config.etcd_endpoints() {
        e if e.is_empty() => None,
        endpoints => Some(
            bazaar_mesh::etcd::connect(&endpoints)
                .await
                .context("etcd_endpoints")?,
        ),
    };
    let registry: Arc<dyn Registry> = match config.registry.as_str() {
        "static" => Arc::new(StaticRegistry::new(&config.static_addresses())),
        "memory" => Arc::new(MemoryRegistry::default()),
        "etcd" => {
            let client = etcd.clone().context(
                "registry = \"etcd\" needs etcd_endpoints (BAZAAR_ETCD_ENDPOINTS), e.g. http://127.0.0.1:2379",
            )?;
            Arc::new(EtcdRegistry::new(
                client,
                Duration::from_secs(config.registry_ttl_secs),
            ))
        }
        other => anyhow::bail!("unknown registry {other:?}: expected memory, etcd or static"),
    };
    let discovery = Discovery::new(registry);
    let port = if service == "gateway" && config.port == 0 {
        config.gateway_port
    } else {
        config.port
    };
    let listener = bazaar_chassis::http::bind(&config.host, port).await?;
    let url = format!("http://{}", listener.local_addr()?);
    let shutdown = Shutdown::default();
    let live = follow_config(&config, etcd, &shutdown).await;
    let shared = Shared {
        config: config.clone(),
        live,
        bus: bus.clone(),
        discovery: discovery.clone(),
    };
    let task = start_one(service, &shared, listener, shutdown.clone()).await?;
    Ok(System {
        gateway_url: url,
        shutdown,
        bus,
        discovery,
        tasks: vec![(service.to_owned(), task)],
    })
}

#[cfg(test)]
mod tests {
    /// Commands must reach a queue only if the bus knows them as commands.
    #[test]
    fn contracts_send_commands_on_the_bus_command_exchange() {
        assert_eq!(
            bazaar_contracts::topics::COMMAND_EXCHANGE,
            bazaar_bus::COMMAND_EXCHANGE
        );
    }
}
