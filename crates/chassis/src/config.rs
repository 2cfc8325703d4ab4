//! Layered, typed configuration: defaults < `bazaar.toml` < `BAZAAR_*`
//! environment (nested keys with `__`, e.g. `BAZAAR_SERVICES__AUTH`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

mod gateway;
pub use gateway::{GatewayConfig, RateLimitConfig, RouteConfig};

/// Everything a Bazaar process can be told. Each field's unit and default is
/// documented; `bazaar.toml` at the repository root shows them all.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Address services bind. Default `127.0.0.1`.
    #[serde(deserialize_with = "lenient::text")]
    pub host: String,
    /// The host other instances reach this one at, when it is not the
    /// address bound (a container or pod listening on `0.0.0.0`: its pod
    /// IP, from the downward API). Registered with the bound port.
    /// Default unset: the bound address.
    #[serde(deserialize_with = "lenient::opt")]
    pub advertise_host: Option<String>,
    /// Port of the service `bazaar serve` runs; 0 picks a free one. Default 0.
    pub port: u16,
    /// Port of the gateway. Default 8080.
    pub gateway_port: u16,
    /// Folder for SQLite files in embedded mode. Default `./data`.
    pub data_dir: PathBuf,
    /// `postgres://…` (a schema per service) or `sqlite://…` (a file per
    /// service); unset: SQLite files under `data_dir`.
    #[serde(deserialize_with = "lenient::opt")]
    pub database_url: Option<String>,
    /// Prefix of each service's PostgreSQL schema (tests isolate runs with it). Default empty.
    #[serde(deserialize_with = "lenient::text")]
    pub database_schema_prefix: String,
    /// `amqp://…` for RabbitMQ; unset: the in-memory bus.
    #[serde(deserialize_with = "lenient::opt")]
    pub amqp_url: Option<String>,
    /// `memory` (embedded), `etcd` (instances under leases in etcd) or
    /// `static` (addresses from `services`). Default `memory`.
    #[serde(deserialize_with = "lenient::text")]
    pub registry: String,
    /// etcd's client URLs, comma-separated (`http://127.0.0.1:2379`). When
    /// set, the keys under `/bazaar/config/` are the top configuration
    /// layer, watched; `registry = "etcd"` needs it. Default unset.
    #[serde(deserialize_with = "lenient::opt")]
    pub etcd_endpoints: Option<String>,
    /// Lifetime of an instance's registration in etcd, in seconds, renewed
    /// while its `/ready` answers 200: how long a killed instance stays
    /// listed at most. Default 10.
    pub registry_ttl_secs: u64,
    /// Log filter when `RUST_LOG` is unset: a level (`debug`, `info`,
    /// `warn`…) or `tracing` directives. Live. Default `info`.
    #[serde(deserialize_with = "lenient::text")]
    pub log_level: String,
    /// Feature flags (`[features]`), live.
    pub features: FeaturesConfig,
    /// Static addresses: service name → comma-separated base URLs.
    #[serde(deserialize_with = "lenient::map")]
    pub services: HashMap<String, String>,
    /// `json` or `pretty`; unset: pretty on a terminal, JSON otherwise.
    #[serde(deserialize_with = "lenient::opt")]
    pub log_format: Option<String>,
    /// An OTLP/HTTP collector's base URL (e.g. `http://127.0.0.1:4318`;
    /// `/v1/traces` is added): spans are exported there. Unset: traces
    /// are only kept in memory, for the dashboard.
    #[serde(deserialize_with = "lenient::opt")]
    pub otlp_endpoint: Option<String>,
    /// The share of new traces recorded, 0 to 1 (parent-based: a trace
    /// started elsewhere is recorded when its caller recorded it). 0
    /// turns tracing off: no spans are made. Default 1.
    pub trace_sample_ratio: f64,
    /// Threads that run a process's tasks. 0 (the default): one for a
    /// `bazaar serve` process (one service, sharing the machine's cores
    /// with the others and the servers: one thread wakes fewer), one per
    /// core for everything else. Raise it for a service that has cores
    /// to itself and needs more than one.
    pub worker_threads: usize,
    /// Ended spans each process keeps in memory for the dashboard (and
    /// at most 4 MiB of them, whatever their fields). 0 (the default):
    /// 2 000 for a `bazaar serve` process, 20 000 for `bazaar up` (one
    /// process, every service).
    pub trace_keep_spans: usize,
    /// Milliseconds a message consumer waits, once a message is in, for
    /// more to handle with it in one transaction (at most 1000). Each
    /// adds up to that much latency per hop, for fewer transactions and
    /// broker round trips when messages come one by one. Unset: 4 for a
    /// `bazaar serve` process (measured at 200 orders/s: 27% less CPU per
    /// order, 15 ms more to CONFIRMED), none for everything else. 0:
    /// none, a batch is whatever has arrived. A consumer whose work no
    /// one waits on (notifications) lingers ten times as long, at most 1 s.
    pub consumer_linger_ms: Option<u64>,
    /// Largest request body accepted, in bytes. Default 1 MiB.
    pub body_limit: usize,
    /// Admin account created at first start.
    #[serde(deserialize_with = "lenient::opt")]
    pub admin_email: Option<String>,
    #[serde(deserialize_with = "lenient::opt")]
    pub admin_password: Option<String>,
    /// Access token lifetime in seconds. Default 900.
    pub access_token_ttl_secs: i64,
    /// Refresh token lifetime in seconds. Default 30 days.
    pub refresh_token_ttl_secs: i64,
    /// `iss` of access tokens, checked by the gateway and every service. Default `bazaar`.
    #[serde(deserialize_with = "lenient::text")]
    pub token_issuer: String,
    /// `aud` of access tokens, checked by the gateway and every service. Default `bazaar-api`.
    #[serde(deserialize_with = "lenient::text")]
    pub token_audience: String,
    /// How often every service reads auth's signing keys (JWKS) again, in
    /// seconds: a retired key stops verifying within this time. Default 60.
    pub jwks_refresh_secs: u64,
    /// Argon2id memory cost in KiB. Default 19456 (OWASP); tests use less.
    pub argon2_memory_kib: u32,
    /// Argon2id iterations. Default 2.
    pub argon2_iterations: u32,
    /// Password hashes computed at once (each takes `argon2_memory_kib`);
    /// 0: one per core. Default 0.
    pub argon2_concurrency: usize,
    /// Password checks that may wait for the hashing pool; past it, 503
    /// with `Retry-After`. Default 64.
    pub argon2_queue: usize,
    /// Timeout of a proxied or service-to-service HTTP call, in ms. Default 10000.
    pub upstream_timeout_ms: u64,
    /// Timeout of a bus request/reply, in ms. Default 5000.
    pub bus_request_timeout_ms: u64,
    /// Concurrent deliveries a consumer works on. Default 64.
    pub consumer_concurrency: u16,
    /// Time to finish in-flight requests after a shutdown signal, in ms. Default 10000.
    pub shutdown_grace_ms: u64,
    /// Seed the demo catalog on first start. Default true.
    pub seed_demo: bool,
    /// Delivery attempts of a failing message before it is dead-lettered. Default 5.
    pub retry_attempts: u32,
    /// Wait before the second attempt, in ms; doubles per attempt (capped at 30 s). Default 200.
    pub retry_first_delay_ms: u64,
    /// How long an order saga waits for one step's answer before it
    /// compensates and cancels the order (`timeout`), in ms. Default 30000.
    pub saga_step_timeout_ms: u64,
    /// Inventory settings (`[inventory]`, `BAZAAR_INVENTORY__…`).
    pub inventory: InventoryConfig,
    /// The simulated payment provider declines charges above this many
    /// minor units; unset: never.
    pub payments_decline_above: Option<i64>,
    /// Share of charges (0.0–1.0) the simulated provider fails transiently. Default 0.
    pub payments_failure_rate: f64,
    /// Simulated provider latency per charge, in ms. Default 0.
    pub payments_latency_ms: u64,
    /// Notifications are also POSTed as JSON to this URL, if set.
    #[serde(deserialize_with = "lenient::opt")]
    pub notify_webhook_url: Option<String>,
    /// Notifications are also mailed through this SMTP server
    /// (`smtp://host:port`, no TLS), if set.
    #[serde(deserialize_with = "lenient::opt")]
    pub smtp_url: Option<String>,
    /// Sender address of notification mail. Default `bazaar@localhost`.
    #[serde(deserialize_with = "lenient::text")]
    pub smtp_from: String,
    /// This instance's share of traffic under the `weighted` strategy
    /// (registered as a `weight=N` tag). Default 1.
    pub weight: u32,
    /// The gateway's routes and edge policies (`[gateway]`).
    pub gateway: GatewayConfig,
    /// Calls between services (`[calls]`, `BAZAAR_CALLS__…`).
    pub calls: CallsConfig,
    /// The file this configuration was read from, if any (the gateway
    /// watches it and reloads its routes when it changes).
    #[serde(skip)]
    pub file: Option<PathBuf>,
}

/// `[features]`: switches read live (a change in etcd applies within a
/// second, without a restart).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FeaturesConfig {
    /// Serve `/api/v2/products` (prices as objects). Default true.
    pub v2_products: bool,
}

impl Default for FeaturesConfig {
    fn default() -> Self {
        Self { v2_products: true }
    }
}

/// `[inventory]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct InventoryConfig {
    /// Units a new product starts with. Default 100.
    pub default_stock: i64,
    /// A reservation neither committed nor released within this many ms
    /// is released (`inventory.released`, and a log line): units held
    /// for an order that does not exist, or whose saga died, come back.
    /// Default: twice `saga_step_timeout_ms`.
    pub reservation_ttl_ms: Option<u64>,
}

impl Default for InventoryConfig {
    fn default() -> Self {
        Self {
            default_stock: 100,
            reservation_ttl_ms: None,
        }
    }
}

/// `[calls]`: how a service calls another (the mesh client). The
/// gateway's own upstream calls take the `[gateway]` settings instead.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CallsConfig {
    /// Time for one attempt, whole answer included, in ms. Default 5000.
    pub timeout_ms: u64,
    /// Calls in flight to one target service at most; more are refused
    /// at once (503). Default 256.
    pub bulkhead: usize,
    /// Connection failures or timeouts in a row that open an instance's
    /// breaker. Default 3.
    pub eject_after: u32,
    /// How long an open breaker fails calls fast before one probe, in ms.
    /// Default 5000.
    pub breaker_open_ms: u64,
    /// How often each target instance's `/health` is polled, in ms. Default 2000.
    pub health_interval_ms: u64,
    /// Retries allowed as a share of calls, in percent (10 a second are
    /// always allowed). Default 20.
    pub retry_budget_percent: u32,
}

impl Default for CallsConfig {
    fn default() -> Self {
        Self {
            timeout_ms: 5000,
            bulkhead: 256,
            eject_after: 3,
            breaker_open_ms: 5000,
            health_interval_ms: 2000,
            retry_budget_percent: 20,
        }
    }
}

impl CallsConfig {
    /// The mesh settings these values make.
    pub fn settings(&self) -> bazaar_mesh::upstream::Settings {
        bazaar_mesh::upstream::Settings {
            breaker: bazaar_mesh::breaker::BreakerSettings {
                consecutive: self.eject_after.max(1),
                open_for: std::time::Duration::from_millis(self.breaker_open_ms),
                ..Default::default()
            },
            health_interval: std::time::Duration::from_millis(self.health_interval_ms.max(100)),
            budget_percent: self.retry_budget_percent,
            bulkhead: self.bulkhead.max(1),
        }
    }
}

/// Most worker threads a process may be given (`worker_threads`).
pub const MAX_WORKER_THREADS: usize = 256;
/// The longest a consumer may linger for a batch (`consumer_linger_ms`).
pub const MAX_CONSUMER_LINGER_MS: u64 = 1000;
/// Spans kept by a process that runs every service (`trace_keep_spans`).
const KEEP_SPANS_ALL_SERVICES: usize = 20_000;

impl Default for Config {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            advertise_host: None,
            port: 0,
            gateway_port: 8080,
            data_dir: PathBuf::from("./data"),
            database_url: None,
            database_schema_prefix: String::new(),
            amqp_url: None,
            registry: "memory".into(),
            etcd_endpoints: None,
            registry_ttl_secs: 10,
            log_level: "info".into(),
            features: FeaturesConfig::default(),
            services: HashMap::new(),
            log_format: None,
            otlp_endpoint: None,
            trace_sample_ratio: 1.0,
            worker_threads: 0,
            trace_keep_spans: 0,
            consumer_linger_ms: None,
            body_limit: 1024 * 1024,
            admin_email: None,
            admin_password: None,
            access_token_ttl_secs: 900,
            refresh_token_ttl_secs: 30 * 24 * 3600,
            token_issuer: "bazaar".into(),
            token_audience: "bazaar-api".into(),
            jwks_refresh_secs: 60,
            argon2_memory_kib: 19456,
            argon2_iterations: 2,
            argon2_concurrency: 0,
            argon2_queue: 64,
            upstream_timeout_ms: 10_000,
            bus_request_timeout_ms: 5_000,
            consumer_concurrency: 64,
            shutdown_grace_ms: 10_000,
            seed_demo: true,
            retry_attempts: 5,
            retry_first_delay_ms: 200,
            saga_step_timeout_ms: 30_000,
            inventory: InventoryConfig::default(),
            payments_decline_above: None,
            payments_failure_rate: 0.0,
            payments_latency_ms: 0,
            notify_webhook_url: None,
            smtp_url: None,
            smtp_from: "bazaar@localhost".into(),
            weight: 1,
            gateway: GatewayConfig::default(),
            calls: CallsConfig::default(),
            file: None,
        }
    }
}

impl Config {
    /// Defaults < the TOML file (if it exists) < `BAZAAR_*` environment.
    /// (The etcd layer on top is [`crate::live`]'s.)
    pub fn load(file: Option<&Path>) -> Result<Self, Box<figment::Error>> {
        let path = file.map_or_else(|| PathBuf::from("bazaar.toml"), Path::to_path_buf);
        let found = path.exists();
        if !found && file.is_some() {
            return Err(Box::new(figment::Error::from(format!(
                "config file {} does not exist",
                path.display()
            ))));
        }
        let file = found.then_some(path);
        let mut config: Config = Self::layers(file.as_deref()).extract().map_err(Box::new)?;
        config.file = file;
        Ok(config)
    }

    /// The layers below etcd's: defaults < `file` < `BAZAAR_*`.
    pub fn layers(file: Option<&Path>) -> Figment {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            fig = fig.merge(Toml::file(path));
        }
        fig.merge(Env::prefixed("BAZAAR_").split("__").ignore(&[
            "test_amqp_url",
            "test_database_url",
            "test_etcd_url",
            "supervisor_pid",
        ]))
    }

    /// What the types cannot say: a `log_level` that is a level, a
    /// failure rate between 0 and 1.
    pub fn validate(&self) -> Result<(), String> {
        crate::telemetry::check_level(&self.log_level)?;
        if !(0.0..=1.0).contains(&self.payments_failure_rate) {
            return Err(format!(
                "payments_failure_rate must be between 0 and 1, not {}",
                self.payments_failure_rate
            ));
        }
        if !(0.0..=1.0).contains(&self.trace_sample_ratio) {
            return Err(format!(
                "trace_sample_ratio must be between 0 and 1, not {}",
                self.trace_sample_ratio
            ));
        }
        if let Some(ms) = self.consumer_linger_ms
            && ms > MAX_CONSUMER_LINGER_MS
        {
            return Err(format!(
                "consumer_linger_ms must be at most {MAX_CONSUMER_LINGER_MS}, not {ms}"
            ));
        }
        if self.worker_threads > MAX_WORKER_THREADS {
            return Err(format!(
                "worker_threads must be at most {MAX_WORKER_THREADS} (0: chosen by the command), not {}",
                self.worker_threads
            ));
        }
        // No TLS in the binary: a collector on the node or in the pod
        // (the usual OpenTelemetry agent) takes plain HTTP.
        if let Some(url) = self.otlp_endpoint.as_deref().filter(|u| !u.is_empty())
            && url.strip_prefix("http://").is_none_or(str::is_empty)
        {
            return Err(format!(
                "otlp_endpoint must be an http:// URL (a collector nearby; https is not supported), not {url:?}"
            ));
        }
        Ok(())
    }

    /// How this process records traces.
    pub fn traces(&self) -> crate::traces::Settings {
        crate::traces::Settings {
            otlp_endpoint: self.otlp_endpoint.clone().filter(|u| !u.is_empty()),
            sample_ratio: self.trace_sample_ratio,
            keep_spans: match self.trace_keep_spans {
                0 => KEEP_SPANS_ALL_SERVICES,
                n => n,
            },
        }
    }

    /// Sets what was left to the command (`worker_threads`,
    /// `trace_keep_spans`, `consumer_linger_ms`). A `bazaar serve`
    /// process runs one service, sharing the machine's cores with the
    /// others and the servers: one worker thread does its work with fewer
    /// wake-ups between threads (15% less CPU per order, measured); it
    /// keeps 2 000 spans, not 20 000 (they were most of what a busy
    /// service's memory grew by); and its consumers wait 4 ms for more
    /// messages to share a transaction with (at 200 orders/s arriving at
    /// random, 3.7 ms of CPU per order instead of 5.1, CONFIRMED in 21 ms
    /// instead of 6). Everything else (the embedded system, the load
    /// tool, the tools) takes a thread per core, 20 000 spans, no wait.
    pub fn fill_command_defaults(&mut self, serve: bool) {
        if serve && self.worker_threads == 0 {
            self.worker_threads = 1;
        }
        if self.trace_keep_spans == 0 {
            self.trace_keep_spans = if serve {
                2_000
            } else {
                KEEP_SPANS_ALL_SERVICES
            };
        }
        self.consumer_linger_ms
            .get_or_insert(if serve { 4 } else { 0 });
    }

    /// The base URL other instances call this one at, listening on `bound`.
    pub fn advertised_url(&self, bound: std::net::SocketAddr) -> String {
        match self.advertise_host.as_deref().map(str::trim) {
            Some(h) if !h.is_empty() => {
                if h.contains(':') && !h.starts_with('[') {
                    format!("http://[{h}]:{}", bound.port())
                } else {
                    format!("http://{h}:{}", bound.port())
                }
            }
            _ => format!("http://{bound}"),
        }
    }

    /// `etcd_endpoints` as a list.
    pub fn etcd_endpoints(&self) -> Vec<String> {
        self.etcd_endpoints
            .as_deref()
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    }

    /// The retry policy of every reliable consumer.
    pub fn retry_policy(&self) -> bazaar_bus::RetryPolicy {
        bazaar_bus::RetryPolicy {
            max_attempts: self.retry_attempts.max(1),
            first_delay: std::time::Duration::from_millis(self.retry_first_delay_ms),
            max_delay: std::time::Duration::from_secs(30),
        }
    }

    /// Static addresses of one service, from `services`.
    pub fn static_addresses(&self) -> HashMap<String, Vec<String>> {
        self.services
            .iter()
            .map(|(k, v)| {
                let urls = v
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect();
                (k.clone(), urls)
            })
            .collect()
    }
}

/// Environment values are parsed (`12345678` becomes a number); text
/// settings take them back as text, so a numeric password still works.
mod lenient {
    use std::collections::HashMap;

    use serde::{Deserialize, Deserializer, de};

    struct Text(String);

    impl<'de> Deserialize<'de> for Text {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl de::Visitor<'_> for V {
                type Value = Text;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("text")
                }
                fn visit_str<E: de::Error>(self, v: &str) -> Result<Text, E> {
                    Ok(Text(v.to_owned()))
                }
                fn visit_i64<E: de::Error>(self, v: i64) -> Result<Text, E> {
                    Ok(Text(v.to_string()))
                }
                fn visit_u64<E: de::Error>(self, v: u64) -> Result<Text, E> {
                    Ok(Text(v.to_string()))
                }
                fn visit_f64<E: de::Error>(self, v: f64) -> Result<Text, E> {
                    Ok(Text(v.to_string()))
                }
                fn visit_bool<E: de::Error>(self, v: bool) -> Result<Text, E> {
                    Ok(Text(v.to_string()))
                }
            }
            d.deserialize_any(V)
        }
    }

    pub fn text<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        Ok(Text::deserialize(d)?.0)
    }

    pub fn opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        Ok(Option::<Text>::deserialize(d)?.map(|t| t.0))
    }

    pub fn map<'de, D: Deserializer<'de>>(d: D) -> Result<HashMap<String, String>, D::Error> {
        Ok(HashMap::<String, Text>::deserialize(d)?
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::result_large_err)]
    fn defaults_then_file_then_env() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("bazaar.toml", "gateway_port = 9000\nbody_limit = 10\n")?;
            jail.set_env("BAZAAR_BODY_LIMIT", "20");
            jail.set_env("BAZAAR_ADMIN_PASSWORD", "12345678");
            jail.set_env("BAZAAR_SERVICES__AUTH", "http://a:1, http://b:2");
            let c = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(c.gateway_port, 9000);
            assert_eq!(c.body_limit, 20);
            assert_eq!(c.port, 0);
            assert_eq!(c.admin_password.as_deref(), Some("12345678"));
            assert_eq!(
                c.static_addresses()["auth"],
                vec!["http://a:1", "http://b:2"]
            );
            Ok(())
        });
    }

    /// The commented `bazaar.toml` at the root is what `bazaar up` reads
    /// from a fresh clone: it must parse, and (all commented) change nothing.
    #[test]
    fn the_shipped_bazaar_toml_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bazaar.toml");
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(!text.is_empty(), "{} is missing", path.display());
        let parsed = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string(&text))
            .extract::<Config>();
        assert_eq!(parsed.map_err(|e| e.to_string()), Ok(Config::default()));
    }

    #[test]
    fn the_advertised_url_takes_the_bound_port() {
        let bound: std::net::SocketAddr = "0.0.0.0:7001".parse().unwrap_or_else(|_| unreachable!());
        let mut c = Config::default();
        assert_eq!(c.advertised_url(bound), "http://0.0.0.0:7001");
        c.advertise_host = Some("10.1.2.3".into());
        assert_eq!(c.advertised_url(bound), "http://10.1.2.3:7001");
        c.advertise_host = Some("fd00::5".into());
        assert_eq!(c.advertised_url(bound), "http://[fd00::5]:7001");
        c.advertise_host = Some("catalog-0.catalog".into());
        assert_eq!(c.advertised_url(bound), "http://catalog-0.catalog:7001");
    }

    #[test]
    fn the_command_fills_what_was_left_to_it() {
        let mut serve = Config::default();
        serve.fill_command_defaults(true);
        assert_eq!(
            (
                serve.worker_threads,
                serve.trace_keep_spans,
                serve.consumer_linger_ms
            ),
            (1, 2_000, Some(4))
        );
        let mut up = Config::default();
        up.fill_command_defaults(false);
        assert_eq!(
            (
                up.worker_threads,
                up.trace_keep_spans,
                up.consumer_linger_ms
            ),
            (0, 20_000, Some(0))
        );
        let mut set = Config {
            worker_threads: 3,
            trace_keep_spans: 50,
            consumer_linger_ms: Some(0),
            ..Config::default()
        };
        set.fill_command_defaults(true);
        assert_eq!(
            (
                set.worker_threads,
                set.trace_keep_spans,
                set.consumer_linger_ms
            ),
            (3, 50, Some(0)),
            "what was set stays"
        );
    }

    #[test]
    fn worker_threads_are_bounded() {
        let mut c = Config::default();
        for ok in [0, 1, 8, super::MAX_WORKER_THREADS] {
            c.worker_threads = ok;
            assert_eq!(c.validate(), Ok(()), "{ok}");
        }
        c.worker_threads = super::MAX_WORKER_THREADS + 1;
        assert!(c.validate().is_err());
        c.worker_threads = 0;
        c.consumer_linger_ms = Some(1000);
        assert_eq!(c.validate(), Ok(()));
        c.consumer_linger_ms = Some(1001);
        assert!(c.validate().is_err(), "a linger past a second is refused");
    }

    #[test]
    fn an_otlp_endpoint_is_plain_http() {
        let mut c = Config::default();
        for ok in [
            "",
            "http://127.0.0.1:4318",
            "http://collector:4318/v1/traces",
        ] {
            c.otlp_endpoint = Some(ok.into());
            assert_eq!(c.validate(), Ok(()), "{ok}");
        }
        for bad in ["https://collector:4318", "collector:4318", "http://"] {
            c.otlp_endpoint = Some(bad.into());
            assert!(c.validate().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_named_file_must_exist() {
        assert!(Config::load(Some(Path::new("/nonexistent/bazaar.toml"))).is_err());
    }
}
