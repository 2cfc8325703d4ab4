//! `[gateway]`: the gateway's route table and edge policies. Only the
//! gateway reads it; it re-reads it when the config file changes.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// `[gateway]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Routes, matched before the built-in ones; the longest matching
    /// prefix wins, and on a tie the one listed first.
    pub routes: Vec<RouteConfig>,
    /// Keep the built-in routes (every Bazaar API below `/api/v1`, and
    /// `/api/v2/products`). Default true.
    pub default_routes: bool,
    /// Origins allowed to call from a browser (`*` for any); empty: no
    /// CORS headers at all. Default empty.
    pub cors_origins: Vec<String>,
    /// Proxies whose `X-Forwarded-For` is believed (addresses or CIDR
    /// blocks, e.g. `10.0.0.0/8`); empty: the client is the peer address.
    pub trusted_proxies: Vec<String>,
    /// Failed logins allowed per account per minute before 429. Default 10.
    pub login_failures_per_account: u32,
    /// Failed logins allowed per client address per minute. Default 100.
    pub login_failures_per_ip: u32,
    /// Registrations allowed per client address per minute before 429.
    /// Loopback clients are exempt (tests, `bazaar load`); an address a
    /// trusted proxy names in `X-Forwarded-For` is not. Default 20.
    pub registrations_per_address_per_minute: u32,
    /// `POST /act` messages allowed per client address per minute before
    /// 429 (actions skip the route table's own limits). 0: no limit.
    /// Default 600.
    pub act_per_address_per_minute: u32,
    /// How long a client may take to send a whole request body, counted
    /// from when its head arrived, in ms; past it, 408 and the connection
    /// is closed. Default 30000.
    pub body_timeout_ms: u64,
    /// Connections one client address may hold open at once; past it,
    /// new ones from that address are closed at once. Trusted proxies
    /// are exempt. 0: no limit. Default 512. Read at start only.
    pub max_connections_per_address: usize,
    /// How often each upstream instance's `/health` is polled, in ms. Default 2000.
    pub health_interval_ms: u64,
    /// Consecutive failures (connection errors, timeouts) that eject an
    /// instance: its breaker opens. Default 3.
    pub eject_after: u32,
    /// How long an open breaker keeps its instance out before one probe
    /// request is let through, in ms. Default 5000.
    pub breaker_open_ms: u64,
    /// Retries allowed as a share of requests, in percent (the retry
    /// budget; 10 retries per second are always allowed). Default 20.
    pub retry_budget_percent: u32,
    /// Requests in flight to one service at most (the bulkhead); more
    /// get 503 at once. Default 4096.
    pub bulkhead: usize,
    /// One log line per request (target `access`). Default true.
    pub access_log: bool,
    /// Event-loop threads serving clients; each keeps its own upstream
    /// connections. 0 (the default): one per two cores, at least one.
    pub threads: usize,
    /// How long a client may take to send a request's head, counted from
    /// when the gateway starts waiting for it, in ms: a connection that
    /// trickles its headers (slowloris) or sits idle between requests
    /// for longer is closed. 0: no limit. Default 30000. Read at start only.
    pub header_timeout_ms: u64,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            routes: Vec::new(),
            default_routes: true,
            cors_origins: Vec::new(),
            trusted_proxies: Vec::new(),
            login_failures_per_account: 10,
            login_failures_per_ip: 100,
            registrations_per_address_per_minute: 20,
            act_per_address_per_minute: 600,
            body_timeout_ms: 30_000,
            max_connections_per_address: 512,
            threads: 0,
            header_timeout_ms: 30_000,
            health_interval_ms: 2000,
            eject_after: 3,
            breaker_open_ms: 5000,
            retry_budget_percent: 20,
            bulkhead: 4096,
            access_log: true,
        }
    }
}

/// One `[[gateway.routes]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Path prefix below `/api/<version>`, matched on whole segments
    /// (`/products` matches `/products/7`, not `/productsx`).
    pub prefix: String,
    /// The service in discovery that serves it.
    pub service: String,
    /// Methods matched; empty: any.
    #[serde(default)]
    pub methods: Vec<String>,
    /// API versions matched. Default `["v1"]`.
    #[serde(default = "v1")]
    pub versions: Vec<String>,
    /// A valid token is required. Default true.
    #[serde(default = "yes")]
    pub auth: bool,
    /// Roles allowed (403 otherwise); empty: any signed-in caller.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Token bucket per client address or per user.
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
    /// Seconds a public GET answer is cached; 0: not cached. Default 0.
    #[serde(default)]
    pub cache_ttl_secs: u64,
    /// Upstream timeout in ms; default: `upstream_timeout_ms`.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Times an idempotent request is retried on another instance. Default 1.
    #[serde(default = "one")]
    pub retries: u32,
    /// `round_robin` (default), `least_connections`, `ip_hash`, `weighted` or `p2c`.
    #[serde(default)]
    pub balance: Option<String>,
    /// Headers set on the request sent upstream.
    #[serde(default)]
    pub add_headers: HashMap<String, String>,
    /// Headers removed from the request sent upstream.
    #[serde(default)]
    pub remove_headers: Vec<String>,
    /// Replaces the matched prefix in the upstream path (e.g. `/items`).
    #[serde(default)]
    pub rewrite: Option<String>,
    /// A body transformation: `price_object` (v2 products).
    #[serde(default)]
    pub transform: Option<String>,
    /// Failed answers (401) count toward the login brute-force limits.
    #[serde(default)]
    pub login: bool,
    /// Requests count toward `registrations_per_address_per_minute`.
    #[serde(default)]
    pub register: bool,
}

impl RouteConfig {
    /// A route with every option at its default: any method, `v1`, token
    /// required, round-robin, one retry.
    pub fn new(prefix: &str, service: &str) -> Self {
        Self {
            prefix: prefix.into(),
            service: service.into(),
            methods: Vec::new(),
            versions: v1(),
            auth: true,
            roles: Vec::new(),
            rate_limit: None,
            cache_ttl_secs: 0,
            timeout_ms: None,
            retries: 1,
            balance: None,
            add_headers: HashMap::new(),
            remove_headers: Vec::new(),
            rewrite: None,
            transform: None,
            login: false,
            register: false,
        }
    }
}

/// `rate_limit = { requests = 100, per_secs = 60, key = "ip" }`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Requests allowed per period (also the burst).
    pub requests: u32,
    /// The period, in seconds. Default 1.
    #[serde(default = "one_u64")]
    pub per_secs: u64,
    /// `ip` (default) or `user` (the token's subject; the address when anonymous).
    #[serde(default = "ip")]
    pub key: String,
}

fn v1() -> Vec<String> {
    vec!["v1".into()]
}

fn yes() -> bool {
    true
}

fn one() -> u32 {
    1
}

fn one_u64() -> u64 {
    1
}

fn ip() -> String {
    "ip".into()
}
