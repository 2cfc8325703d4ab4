//! `bazaar up --distributed`: every service as its own child process
//! (`bazaar serve <service>`) on RabbitMQ, PostgreSQL and etcd — the
//! production shape on one machine. A child that dies is started again
//! after a backoff (0.5 s, doubling to 30 s; back to 0.5 s once it has
//! run a minute); a terminal shows a live table of the children. Ctrl-C
//! stops them in reverse start order (the gateway first), each given the
//! drain's grace period before it is killed.

use std::collections::HashMap;
use std::io::{IsTerminal, Write as _};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bazaar_chassis::{Config, Shutdown};
use tokio::process::{Child, Command};

use crate::SERVICES;

/// Tells a child which process supervises it: the child stops (SIGTERM,
/// so it drains) when that process dies, even by SIGKILL.
pub const SUPERVISOR_PID: &str = "BAZAAR_SUPERVISOR_PID";

/// In a child: asks the kernel for SIGTERM when the supervisor dies, and
/// refuses to start if it is already gone (no orphan keeps serving).
pub fn follow_supervisor(pid: &str) -> anyhow::Result<()> {
    let expected: i32 = pid.parse().context("BAZAAR_SUPERVISOR_PID is not a pid")?;
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::TERM))
        .context("cannot follow the supervisor")?;
    let parent = rustix::process::Pid::as_raw(rustix::process::getppid());
    anyhow::ensure!(
        parent == expected,
        "the supervisor (pid {expected}) is gone"
    );
    Ok(())
}

/// One child as the table shows it.
#[derive(Debug, Clone)]
struct Row {
    name: String,
    port: u16,
    pid: Option<u32>,
    restarts: u32,
    health: &'static str,
    since: Instant,
}

type Table = Arc<Mutex<Vec<Row>>>;

/// What `--distributed` needs from the configuration, checked up front:
/// the message names each thing missing and how to give it.
pub fn check(config: &Config) -> anyhow::Result<()> {
    let mut missing = Vec::new();
    if config.amqp_url.is_none() {
        missing.push("RabbitMQ: amqp_url (BAZAAR_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f)");
    }
    if !config
        .database_url
        .as_deref()
        .is_some_and(|u| u.starts_with("postgres"))
    {
        missing.push("PostgreSQL: database_url (BAZAAR_DATABASE_URL=postgres://postgres@127.0.0.1:5432/bazaar)");
    }
    if config.etcd_endpoints().is_empty() {
        missing.push("etcd: etcd_endpoints (BAZAAR_ETCD_ENDPOINTS=http://127.0.0.1:2379)");
    }
    anyhow::ensure!(
        missing.is_empty(),
        "bazaar up --distributed runs every service as its own process on RabbitMQ, PostgreSQL and etcd; configure:\n  {}",
        missing.join("\n  ")
    );
    Ok(())
}

/// Whether each of the three answers a TCP connection: a clear message
/// now rather than children failing their readiness for ever.
pub async fn reachable(config: &Config) -> anyhow::Result<()> {
    let mut targets = vec![
        (
            "RabbitMQ",
            "amqp_url",
            config.amqp_url.clone().unwrap_or_default(),
            5672,
        ),
        (
            "PostgreSQL",
            "database_url",
            config.database_url.clone().unwrap_or_default(),
            5432,
        ),
    ];
    for e in config.etcd_endpoints() {
        targets.push(("etcd", "etcd_endpoints", e, 2379));
    }
    let mut down = Vec::new();
    for (what, key, url, default_port) in targets {
        let Ok(parsed) = reqwest::Url::parse(&url) else {
            down.push(format!("{what}: {key} is not a URL"));
            continue;
        };
        let host = parsed.host_str().unwrap_or("127.0.0.1").to_owned();
        let port = parsed.port().unwrap_or(default_port);
        let connect = tokio::net::TcpStream::connect((host.as_str(), port));
        if !matches!(
            tokio::time::timeout(Duration::from_secs(2), connect).await,
            Ok(Ok(_))
        ) {
            down.push(format!("{what} does not answer at {host}:{port} ({key})"));
        }
    }
    anyhow::ensure!(
        down.is_empty(),
        "bazaar up --distributed: {}",
        down.join("; ")
    );
    Ok(())
}

fn free_port(host: &str) -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind((host, 0)).context("cannot find a free port")?;
    Ok(l.local_addr()?.port())
}

/// Runs the children until `shutdown`, then stops them in order.
pub async fn run(
    config: Config,
    config_file: Option<PathBuf>,
    gateway_port: u16,
    replicas: &HashMap<&'static str, usize>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    check(&config)?;
    reachable(&config).await?;
    let exe = std::env::current_exe().context("cannot find the bazaar binary")?;
    let logs = config.data_dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let table: Table = Arc::default();
    let grace = Duration::from_millis(config.shutdown_grace_ms) + Duration::from_secs(2);
    let mut children = Vec::new();
    for service in SERVICES {
        for n in 1..=replicas.get(service).copied().unwrap_or(1) {
            let port = if service == "gateway" {
                gateway_port
            } else {
                free_port(&config.host)?
            };
            let name = if n == 1 {
                service.to_owned()
            } else {
                format!("{service}-{n}")
            };
            let index = {
                let mut t = table.lock().unwrap_or_else(|e| e.into_inner());
                t.push(Row {
                    name: name.clone(),
                    port,
                    pid: None,
                    restarts: 0,
                    health: "starting",
                    since: Instant::now(),
                });
                t.len() - 1
            };
            let spec = Spec {
                exe: exe.clone(),
                config_file: config_file.clone(),
                service,
                name,
                host: config.host.clone(),
                port,
                log: logs.join(format!("{service}-{n}.log")),
            };
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            let task = tokio::spawn(keep(spec, index, table.clone(), stop_rx, grace));
            children.push((stop_tx, task));
            // Start in order: each service's dependencies first.
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }
    let health = tokio::spawn(check_health(table.clone(), config.host.clone()));
    let show = std::io::stdout()
        .is_terminal()
        .then(|| tokio::spawn(render(table.clone(), logs.clone())));
    bazaar_chassis::telemetry::say(&format!(
        "Bazaar is up (distributed): http://{}:{gateway_port}/api/v1/products — logs in {}",
        config.host,
        logs.display()
    ));
    shutdown.wait().await;
    if let Some(s) = show {
        s.abort();
    }
    health.abort();
    // Reverse start order: the gateway stops taking requests first.
    for (stop, task) in children.into_iter().rev() {
        let _ = stop.send(true);
        let _ = task.await;
    }
    bazaar_chassis::telemetry::say("Bazaar stopped");
    Ok(())
}

struct Spec {
    exe: PathBuf,
    config_file: Option<PathBuf>,
    service: &'static str,
    name: String,
    host: String,
    port: u16,
    log: PathBuf,
}

impl Spec {
    fn spawn(&self) -> anyhow::Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("cannot open {}", self.log.display()))?;
        let mut cmd = Command::new(&self.exe);
        if let Some(f) = &self.config_file {
            cmd.arg("--config").arg(f);
        }
        cmd.args(["serve", self.service, "--port", &self.port.to_string()])
            .env("BAZAAR_REGISTRY", "etcd")
            .env("BAZAAR_HOST", &self.host)
            .env("BAZAAR_LOG_FORMAT", "json")
            .env(SUPERVISOR_PID, std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        cmd.spawn()
            .with_context(|| format!("cannot start {}", self.name))
    }
}

fn update(table: &Table, index: usize, f: impl FnOnce(&mut Row)) {
    if let Some(row) = table
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_mut(index)
    {
        f(row);
    }
}

/// Keeps one child running until told to stop.
async fn keep(
    spec: Spec,
    index: usize,
    table: Table,
    mut stop: tokio::sync::watch::Receiver<bool>,
    grace: Duration,
) {
    let mut backoff = Duration::from_millis(500);
    loop {
        let mut child = match spec.spawn() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(child = %spec.name, error = format!("{e:#}"), "cannot start");
                update(&table, index, |r| r.health = "failed");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        let started = Instant::now();
        let pid = child.id();
        update(&table, index, |r| {
            r.pid = pid;
            r.health = "starting";
            r.since = started;
        });
        tracing::info!(child = %spec.name, pid, port = spec.port, "started");
        let exited = tokio::select! {
            status = child.wait() => Some(status),
            _ = stop.wait_for(|s| *s) => None,
        };
        let Some(status) = exited else {
            terminate(&mut child, &spec.name, grace).await;
            update(&table, index, |r| {
                r.pid = None;
                r.health = "stopped";
            });
            return;
        };
        let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
        if started.elapsed() > Duration::from_secs(60) {
            backoff = Duration::from_millis(500);
        }
        tracing::warn!(child = %spec.name, pid, %status, restart_in = ?backoff, "exited; restarting");
        update(&table, index, |r| {
            r.pid = None;
            r.health = "restarting";
            r.restarts += 1;
        });
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// SIGTERM, then the grace period, then SIGKILL.
async fn terminate(child: &mut Child, name: &str, grace: Duration) {
    if let Some(pid) = child
        .id()
        .and_then(|p| rustix::process::Pid::from_raw(p as i32))
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        tracing::warn!(child = %name, "did not stop within the grace period; killing it");
        let _ = child.kill().await;
    }
    tracing::info!(child = %name, "stopped");
}

/// Asks each child's `/ready` every second.
async fn check_health(table: Table, host: String) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap_or_default();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rows: Vec<(usize, u16, bool)> = table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .enumerate()
            .map(|(i, r)| (i, r.port, r.pid.is_some()))
            .collect();
        for (i, port, running) in rows {
            if !running {
                continue;
            }
            let ready = http
                .get(format!("http://{host}:{port}/ready"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            update(&table, i, |r| {
                if r.pid.is_some() {
                    r.health = if ready { "ready" } else { "not ready" };
                }
            });
        }
    }
}

/// Redraws the table on the terminal every second.
async fn render(table: Table, logs: PathBuf) {
    loop {
        let rows = table.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut out = String::from("\x1b[2J\x1b[H");
        out.push_str(&format!(
            "{:<16} {:>8} {:>6} {:>9} {:<11} {:>8}\n",
            "SERVICE", "PID", "PORT", "RESTARTS", "HEALTH", "UP"
        ));
        for r in rows {
            let pid = r.pid.map_or_else(|| "-".to_owned(), |p| p.to_string());
            out.push_str(&format!(
                "{:<16} {:>8} {:>6} {:>9} {:<11} {:>7}s\n",
                r.name,
                pid,
                r.port,
                r.restarts,
                r.health,
                r.since.elapsed().as_secs()
            ));
        }
        out.push_str(&format!(
            "\nLogs: {} (the supervisor's in supervisor.log).\nCtrl-C stops every service, the gateway first.\n",
            logs.display()
        ));
        {
            let mut stdout = std::io::stdout().lock();
            let _ = stdout
                .write_all(out.as_bytes())
                .and_then(|()| stdout.flush());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_names_each_thing_missing() {
        let e = check(&Config::default()).unwrap_err().to_string();
        for needed in [
            "RabbitMQ",
            "BAZAAR_AMQP_URL",
            "PostgreSQL",
            "BAZAAR_DATABASE_URL",
            "etcd",
            "BAZAAR_ETCD_ENDPOINTS",
        ] {
            assert!(e.contains(needed), "{needed} in {e}");
        }
        let sqlite = Config {
            amqp_url: Some("amqp://127.0.0.1".into()),
            database_url: Some("sqlite://x.db".into()),
            etcd_endpoints: Some("http://127.0.0.1:2379".into()),
            ..Config::default()
        };
        let e = check(&sqlite).unwrap_err().to_string();
        assert!(e.contains("database_url") && !e.contains("amqp_url"), "{e}");
    }

    #[tokio::test]
    async fn a_server_that_does_not_answer_is_named() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or(1);
        let config = Config {
            amqp_url: Some(format!("amqp://guest:guest@127.0.0.1:{port}/%2f")),
            database_url: Some(format!("postgres://postgres@127.0.0.1:{port}/x")),
            etcd_endpoints: Some(format!("http://127.0.0.1:{port}")),
            ..Config::default()
        };
        let e = reachable(&config).await.unwrap_err().to_string();
        assert!(
            e.contains(&format!(
                "RabbitMQ does not answer at 127.0.0.1:{port} (amqp_url)"
            )),
            "{e}"
        );
        assert!(e.contains("etcd does not answer"), "{e}");
    }
}
