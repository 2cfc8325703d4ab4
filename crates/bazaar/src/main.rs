//! `bazaar`: run the whole system (`up`), one service (`serve`), or tools.

use std::path::PathBuf;

use anyhow::Context as _;
use bazaar_chassis::Config;
use clap::{Parser, Subcommand};

/// mimalloc: allocation was ~12% of CPU under load with the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Bazaar: a commerce backend built as microservices.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Configuration file (default: ./bazaar.toml if it exists). `BAZAAR_*` variables override it.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every service in this process on embedded defaults: SQLite under
    /// the data dir, in-memory bus and registry, the gateway on --port.
    Up {
        /// Gateway port.
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Folder for the SQLite databases.
        #[arg(long, default_value = "./data")]
        data_dir: PathBuf,
        /// Extra instances, e.g. `catalog=3,orders=2`.
        #[arg(long, default_value = "")]
        replicas: String,
    },
    /// Run one service (auth, catalog, orders or gateway) against the
    /// configured RabbitMQ (BAZAAR_AMQP_URL), database (BAZAAR_DATABASE_URL)
    /// and registry (BAZAAR_REGISTRY=static with BAZAAR_SERVICES__<NAME>=URL).
    Serve {
        /// The service to run.
        service: String,
        /// Port to bind (default: BAZAAR_PORT, else a free port; the gateway defaults to 8080).
        #[arg(long)]
        port: Option<u16>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut config =
        Config::load(cli.config.as_deref()).map_err(|e| anyhow::anyhow!("configuration: {e}"))?;
    bazaar_chassis::telemetry::init(config.log_format.as_deref());
    let system = match cli.command {
        Command::Up {
            port,
            data_dir,
            replicas,
        } => {
            config.gateway_port = port;
            config.data_dir = data_dir;
            let replicas = bazaar::parse_replicas(&replicas)?;
            let gateway = bazaar_chassis::http::bind(&config.host, port).await?;
            let system = bazaar::up(config, &replicas, gateway).await?;
            println!("Bazaar is up: {}/api/v1/products", system.gateway_url);
            system
        }
        Command::Serve { service, port } => {
            if let Some(p) = port {
                config.port = p;
                config.gateway_port = p;
            }
            let system = bazaar::serve(config, &service)
                .await
                .with_context(|| format!("cannot serve {service}"))?;
            println!("{service} is serving on {}", system.gateway_url);
            system
        }
    };
    system.shutdown.on_signals();
    system.wait().await
}
