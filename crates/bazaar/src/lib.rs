//! Wiring: starts any set of Bazaar services in this process. `bazaar up`
//! starts them all on the in-memory bus and registry; `bazaar serve` starts
//! one against the configured RabbitMQ, database and registry.

pub mod dlq;
pub mod load;

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context as _;
use bazaar_bus::Bus;
use bazaar_chassis::{Config, ServiceContext, Shutdown};
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

/// Builds and starts one instance of `service`, on `listener`.
async fn start_one(
    service: &'static str,
    config: Arc<Config>,
    bus: Bus,
    discovery: Discovery,
    listener: TcpListener,
    shutdown: Shutdown,
) -> anyhow::Result<JoinHandle<anyhow::Result<()>>> {
    let ctx = ServiceContext::new(service, config, bus, discovery);
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
            let app = bazaar_gateway::Application::build(ctx).await?;
            tokio::spawn(app.run_until_stopped(listener, shutdown))
        }
        other => anyhow::bail!(
            "unknown service {other:?}; expected one of {}",
            SERVICES.join(", ")
        ),
    };
    Ok(task)
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
            let task = start_one(
                service,
                config.clone(),
                bus.clone(),
                discovery.clone(),
                listener,
                shutdown.clone(),
            )
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
    let registry: Arc<dyn Registry> = match config.registry.as_str() {
        "static" => Arc::new(StaticRegistry::new(&config.static_addresses())),
        "memory" => Arc::new(MemoryRegistry::default()),
        other => anyhow::bail!("unknown registry {other:?}: expected memory or static"),
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
    let task = start_one(
        service,
        config.clone(),
        bus.clone(),
        discovery.clone(),
        listener,
        shutdown.clone(),
    )
    .await?;
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
