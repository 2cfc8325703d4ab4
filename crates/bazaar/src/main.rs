//! `bazaar`: run the whole system (`up`), one service (`serve`), or tools.

use std::path::PathBuf;
use std::time::Duration;

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
        /// Every service as its own supervised child process on RabbitMQ,
        /// PostgreSQL and etcd (BAZAAR_AMQP_URL, BAZAAR_DATABASE_URL,
        /// BAZAAR_ETCD_ENDPOINTS): the production shape on one machine.
        /// A child that dies is restarted; logs go to <data-dir>/logs.
        #[arg(long)]
        distributed: bool,
    },
    /// Run one service (auth, users, catalog, orders, inventory, payments,
    /// notifications or gateway) against the configured RabbitMQ
    /// (BAZAAR_AMQP_URL), database (BAZAAR_DATABASE_URL) and registry
    /// (BAZAAR_REGISTRY=etcd with BAZAAR_ETCD_ENDPOINTS=URL, or
    /// BAZAAR_REGISTRY=static with BAZAAR_SERVICES__<NAME>=URL).
    Serve {
        /// The service to run.
        service: String,
        /// Port to bind (default: BAZAAR_PORT, else a free port; the gateway defaults to 8080).
        #[arg(long)]
        port: Option<u16>,
    },
    /// Simulated shoppers against a running gateway: checkouts with
    /// Idempotency-Keys (retried through outages), then a report of
    /// throughput, latency to CONFIRMED and any order not accounted for.
    Load {
        /// Gateway base URL.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        gateway: String,
        /// Concurrent shoppers.
        #[arg(long, default_value_t = 32)]
        shoppers: usize,
        /// Seconds of load.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Set every product's stock to this first (uses BAZAAR_ADMIN_EMAIL/PASSWORD).
        #[arg(long)]
        stock: Option<i64>,
        /// How many products to buy from.
        #[arg(long, default_value_t = 24)]
        products: usize,
        /// Seconds to wait for unfinished orders after the load.
        #[arg(long, default_value_t = 120)]
        settle: u64,
        /// Write the ids of all accepted orders to this file (one per line).
        #[arg(long)]
        ids: Option<PathBuf>,
        /// Orders per second in all; default: as fast as answers come.
        #[arg(long)]
        rate: Option<f64>,
        /// With --rate, when the shoppers buy: at random moments, each on
        /// its own (poisson: independent buyers), taking turns at even
        /// intervals (even), or all at once, in bursts (bursts).
        #[arg(long, value_enum, default_value_t = bazaar::load::Arrivals::Poisson)]
        arrivals: bazaar::load::Arrivals,
        /// Write a self-contained HTML report (throughput and latency over
        /// time, the latency histogram, the outcomes) to this file.
        #[arg(long, value_name = "FILE.html")]
        report: Option<PathBuf>,
    },
    /// Exit 0 if a Bazaar process answers 200, else 1: a container's
    /// health check (no curl in the image). Default URL: this process's
    /// configured port (BAZAAR_PORT, else the gateway port) on loopback,
    /// path /health.
    Probe {
        /// The URL to ask, e.g. http://127.0.0.1:8080/ready.
        url: Option<String>,
    },
    /// The live configuration in etcd, by the dotted keys of bazaar.toml
    /// (`bazaar config set features.v2_products false`).
    Config {
        #[command(subcommand)]
        action: ConfigAction,
        /// etcd endpoints, comma-separated (default: BAZAAR_ETCD_ENDPOINTS, else http://127.0.0.1:2379).
        #[arg(long, global = true)]
        etcd: Option<String>,
    },
    /// Dead letters: messages that failed every attempt or could not be
    /// parsed. Talks to RabbitMQ directly when BAZAAR_AMQP_URL is set (or
    /// --amqp is given), else to a running system's gateway (--gateway) as
    /// the admin (--token, or BAZAAR_ADMIN_EMAIL/PASSWORD).
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
        /// RabbitMQ URL (default: BAZAAR_AMQP_URL).
        #[arg(long, global = true)]
        amqp: Option<String>,
        /// Gateway base URL of a running system (default: http://127.0.0.1:<gateway_port>).
        #[arg(long, global = true)]
        gateway: Option<String>,
        /// Admin access token for the gateway.
        #[arg(long, global = true, env = "BAZAAR_TOKEN")]
        token: Option<String>,
    },
}

#[derive(Subcommand)]
enum ConfigAction {
    /// Print a key's effective value and where it came from (default,
    /// file, env, override or etcd); a section prints every key in it.
    Get { key: String },
    /// Put a value in etcd (JSON: `false`, `0.5`, `["a"]`; other text is
    /// taken as a string). Checked against the key first; running
    /// services apply it within a second.
    Set { key: String, value: String },
    /// Remove a key from etcd: the file, environment and defaults decide
    /// it again.
    Unset { key: String },
    /// Print the keys in etcd (or one key, or a section), then each
    /// change, until Ctrl-C.
    Watch { key: Option<String> },
}

#[derive(Subcommand)]
enum DlqAction {
    /// List dead letters (of one queue, or of every queue).
    List {
        #[arg(long)]
        queue: Option<String>,
        #[command(flatten)]
        filter: DlqFilter,
    },
    /// Send dead letters back to their queue for a fresh set of attempts.
    Replay {
        #[arg(long)]
        queue: Option<String>,
        /// The message id to replay.
        #[arg(long, conflicts_with = "all", required_unless_present = "all")]
        id: Option<String>,
        /// Replay every dead letter (narrowed by --reason and --since).
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        filter: DlqFilter,
        /// Replays per second at most (1 to 1000); default: no limit.
        #[arg(long)]
        rate: Option<f64>,
    },
}

/// Which dead letters a `bazaar dlq` command chooses.
#[derive(clap::Args, Debug, Clone, Default)]
struct DlqFilter {
    /// Only those whose reason contains this (case-insensitive).
    #[arg(long)]
    reason: Option<String>,
    /// Only those dead-lettered at or after this time (RFC 3339, e.g.
    /// 2026-12-01T12:00:00Z).
    #[arg(long)]
    since: Option<String>,
}

fn main() -> anyhow::Result<()> {
    // No transparent huge pages: each 2 MiB page the allocator touched
    // stayed resident whole — 22 of an idle service's 23 MiB of its own
    // memory. mimalloc no longer asks for them (its `no_thp` feature);
    // this keeps a system that gives them unasked (THP `always`) from
    // doing so. Set before the runtime's threads allocate anything.
    #[cfg(target_os = "linux")]
    let _ = rustix::thread::disable_transparent_huge_pages(true);
    let cli = Cli::parse();
    let mut config =
        Config::load(cli.config.as_deref()).map_err(|e| anyhow::anyhow!("configuration: {e}"))?;
    config
        .validate()
        .map_err(|e| anyhow::anyhow!("configuration: {e}"))?;
    config.fill_command_defaults(matches!(cli.command, Command::Serve { .. }));
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if config.worker_threads > 0 {
        runtime.worker_threads(config.worker_threads);
    }
    runtime.enable_all().build()?.block_on(run(cli, config))
}

async fn run(cli: Cli, mut config: Config) -> anyhow::Result<()> {
    // The tools print their results; only warnings of their own are news.
    let tool = matches!(
        cli.command,
        Command::Config { .. } | Command::Dlq { .. } | Command::Probe { .. }
    );
    let level = if tool {
        "warn"
    } else {
        config.log_level.as_str()
    };
    // The supervisor's live table owns the terminal: its log goes to a file.
    if let Command::Up {
        distributed: true,
        data_dir,
        ..
    } = &cli.command
        && std::io::IsTerminal::is_terminal(&std::io::stdout())
    {
        let logs = data_dir.join("logs");
        std::fs::create_dir_all(&logs)
            .and_then(|()| bazaar_chassis::telemetry::log_to_file(&logs.join("supervisor.log")))
            .with_context(|| format!("cannot write logs to {}", logs.display()))?;
    }
    // Tools record no spans; the system does.
    let traces = (!tool && !matches!(cli.command, Command::Load { .. })).then(|| config.traces());
    bazaar_chassis::telemetry::init(config.log_format.as_deref(), level, traces.as_ref());
    bazaar_chassis::http::raise_open_files_limit();
    let system = match cli.command {
        Command::Load {
            gateway,
            shoppers,
            seconds,
            stock,
            products,
            settle,
            ids,
            rate,
            arrivals,
            report: report_file,
        } => {
            let report = bazaar::load::run(bazaar::load::LoadOptions {
                gateway,
                shoppers,
                duration: Duration::from_secs(seconds),
                stock,
                products,
                admin_email: config.admin_email.clone(),
                admin_password: config.admin_password.clone(),
                settle: Duration::from_secs(settle),
                retry_for: Duration::from_secs(90),
                rate,
                arrivals,
            })
            .await?;
            if let Some(path) = ids {
                std::fs::write(&path, report.order_ids.join("\n"))
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            if let Some(path) = report_file {
                std::fs::write(&path, bazaar::report::html(&report))
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            println!("{}", report.summary());
            let mut reasons: Vec<_> = report.cancelled.iter().collect();
            reasons.sort();
            for (reason, n) in reasons {
                println!("  cancelled {reason}: {n}");
            }
            anyhow::ensure!(
                report.lost == 0 && report.pending == 0,
                "{} orders lost, {} still pending",
                report.lost,
                report.pending
            );
            return Ok(());
        }
        Command::Probe { url } => {
            let port = if config.port == 0 {
                config.gateway_port
            } else {
                config.port
            };
            let url = url.unwrap_or_else(|| format!("http://127.0.0.1:{port}/health"));
            let answered = reqwest::Client::builder()
                .timeout(Duration::from_secs(3))
                .build()?
                .get(&url)
                .send()
                .await;
            match answered {
                Ok(r) if r.status().is_success() => return Ok(()),
                Ok(r) => anyhow::bail!("{url} answered {}", r.status()),
                Err(e) => anyhow::bail!("{url} did not answer: {e}"),
            }
        }
        Command::Config { action, etcd } => {
            let endpoints = bazaar::configure::endpoints(etcd, &config);
            match action {
                ConfigAction::Get { key } => {
                    bazaar::configure::get(config, &endpoints, &key).await?
                }
                ConfigAction::Set { key, value } => {
                    bazaar::configure::set(&endpoints, &key, &value).await?;
                }
                ConfigAction::Unset { key } => bazaar::configure::unset(&endpoints, &key).await?,
                ConfigAction::Watch { key } => {
                    bazaar::configure::watch(&endpoints, key.as_deref()).await?;
                }
            }
            return Ok(());
        }
        Command::Dlq {
            action,
            amqp,
            gateway,
            token,
        } => {
            let amqp = amqp
                .or(config.amqp_url.clone())
                .filter(|_| gateway.is_none());
            let target = match amqp {
                Some(url) => bazaar::dlq::Target::Bus(
                    bazaar_bus::Bus::connect(&url)
                        .await
                        .with_context(|| format!("cannot connect to RabbitMQ at {url}"))?,
                ),
                None => bazaar::dlq::Target::Gateway {
                    url: gateway
                        .unwrap_or_else(|| format!("http://127.0.0.1:{}", config.gateway_port)),
                    token,
                    admin: (config.admin_email.clone(), config.admin_password.clone()),
                },
            };
            match action {
                DlqAction::List { queue, filter } => {
                    let chosen = bazaar::dlq::Chosen::new(None, filter.reason, filter.since, None)?;
                    let letters = target.list(queue.as_deref(), &chosen).await?;
                    println!("{}", serde_json::to_string_pretty(&letters)?);
                    let n = letters.as_array().map_or(0, Vec::len);
                    eprintln!("{n} dead letter(s)");
                }
                DlqAction::Replay {
                    queue,
                    id,
                    all,
                    filter,
                    rate,
                } => {
                    let chosen = bazaar::dlq::Chosen::new(id, filter.reason, filter.since, rate)?;
                    let n = target.replay(queue.as_deref(), &chosen, all).await?;
                    println!("replayed {n} message(s)");
                }
            }
            return Ok(());
        }
        Command::Up {
            port,
            data_dir,
            replicas,
            distributed,
        } => {
            config.gateway_port = port;
            config.data_dir = data_dir;
            let replicas = bazaar::parse_replicas(&replicas)?;
            if distributed {
                let shutdown = bazaar_chassis::Shutdown::default();
                shutdown.on_signals();
                let file = config.file.clone();
                return bazaar::supervise::run(config, file, port, &replicas, shutdown).await;
            }
            let gateway = bazaar_chassis::http::bind(&config.host, port).await?;
            let system = bazaar::up(config, &replicas, gateway).await?;
            bazaar_chassis::telemetry::say(&format!(
                "Bazaar is up: {}/api/v1/products",
                system.gateway_url
            ));
            system
        }
        Command::Serve { service, port } => {
            if let Ok(pid) = std::env::var(bazaar::supervise::SUPERVISOR_PID) {
                bazaar::supervise::follow_supervisor(&pid)?;
            }
            if let Some(p) = port {
                config.port = p;
                config.gateway_port = p;
            }
            let system = bazaar::serve(config, &service)
                .await
                .with_context(|| format!("cannot serve {service}"))?;
            bazaar_chassis::telemetry::say(&format!(
                "{service} is serving on {}",
                system.gateway_url
            ));
            system
        }
    };
    system.shutdown.on_signals();
    system.wait().await
}
