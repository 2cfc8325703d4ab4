//! The route table and edge policies, compiled from `[gateway]` (plus the
//! built-in routes) and swapped whole when the configuration file changes:
//! a request keeps the table it started with.

use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue, Method};
use bazaar_chassis::config::{FeaturesConfig, GatewayConfig, RouteConfig};
use bazaar_mesh::balance::Strategy;
use serde::Deserialize;

const DEFAULTS: &str = include_str!("defaults.toml");

/// Who a rate limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKey {
    Ip,
    User,
}

#[derive(Debug, Clone)]
pub struct RateLimit {
    pub requests: u32,
    pub per: Duration,
    pub key: LimitKey,
}

/// A body transformation between API versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transform {
    /// v2 products: `price: {amount, currency}` outside, `price` (minor
    /// units) + `currency` inside.
    PriceObject,
}

/// One compiled route.
#[derive(Debug, Clone)]
pub struct Route {
    /// `v1,v2 GET,HEAD /products`: names the route in logs and rate-limit keys.
    pub name: String,
    methods: Vec<Method>,
    prefix: String,
    versions: Vec<String>,
    pub service: String,
    pub auth: bool,
    pub roles: Vec<String>,
    pub rate_limit: Option<RateLimit>,
    pub cache_ttl: Duration,
    pub timeout: Duration,
    pub retries: u32,
    pub strategy: Strategy,
    pub add_headers: Vec<(HeaderName, HeaderValue)>,
    pub remove_headers: Vec<HeaderName>,
    rewrite: Option<String>,
    pub transform: Option<Transform>,
    pub login: bool,
    pub register: bool,
}

impl Route {
    fn matches(&self, method: &Method, version: &str, path: &str) -> bool {
        (self.methods.is_empty() || self.methods.contains(method))
            && self.versions.iter().any(|v| v == version)
            && under(path, &self.prefix)
    }

    /// The path the upstream is asked for.
    pub fn upstream_path<'a>(&self, path: &'a str) -> std::borrow::Cow<'a, str> {
        match &self.rewrite {
            Some(to) => {
                let rest = if self.prefix == "/" {
                    path
                } else {
                    &path[self.prefix.len()..]
                };
                format!("{}{rest}", to.trim_end_matches('/')).into()
            }
            None => path.into(),
        }
    }
}

/// `path` is `prefix` or below it, on whole segments.
pub fn under(path: &str, prefix: &str) -> bool {
    prefix == "/"
        || path
            .strip_prefix(prefix.trim_end_matches('/'))
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// An address or a CIDR block.
#[derive(Debug, Clone, Copy)]
struct Net {
    addr: IpAddr,
    bits: u8,
}

impl Net {
    fn parse(s: &str) -> Result<Self, String> {
        let (addr, bits) = match s.split_once('/') {
            Some((a, b)) => (a, Some(b)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("trusted_proxies: {s:?} is not an address or CIDR block"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            Some(b) => b
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|b| *b <= max)
                .ok_or_else(|| format!("trusted_proxies: bad prefix length in {s:?}"))?,
            None => max,
        };
        Ok(Self { addr, bits })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.bits)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.bits))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// Everything the edge decides per request, from one configuration.
#[derive(Debug)]
pub struct Table {
    routes: Vec<Route>,
    pub cors_any: bool,
    pub cors_origins: Vec<String>,
    trusted: Vec<Net>,
    pub login_failures_per_account: u32,
    pub login_failures_per_ip: u32,
    pub registrations_per_address_per_minute: u32,
    pub act_per_address_per_minute: u32,
    pub body_timeout: Duration,
    pub access_log: bool,
}

#[derive(Deserialize)]
struct Defaults {
    routes: Vec<RouteConfig>,
}

fn builtin() -> Vec<RouteConfig> {
    use figment::providers::{Format, Toml};
    figment::Figment::from(Toml::string(DEFAULTS))
        .extract::<Defaults>()
        .map(|d| d.routes)
        .unwrap_or_else(|e| unreachable!("the built-in routes parse: {e}"))
}

fn compile_route(r: &RouteConfig, default_timeout: Duration) -> Result<Route, String> {
    if !r.prefix.starts_with('/') {
        return Err(format!("prefix {:?} must start with '/'", r.prefix));
    }
    if r.service.is_empty() {
        return Err("service is empty".into());
    }
    let methods = r
        .methods
        .iter()
        .map(|m| {
            Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                .map_err(|_| format!("bad method {m:?}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if r.versions.is_empty() || r.versions.iter().any(|v| v.contains('/') || v.is_empty()) {
        return Err("versions must name API versions such as \"v1\"".into());
    }
    let rate_limit = match &r.rate_limit {
        None => None,
        Some(l) => {
            if l.requests == 0 || l.per_secs == 0 {
                return Err("rate_limit needs requests > 0 and per_secs > 0".into());
            }
            let key = match l.key.as_str() {
                "ip" => LimitKey::Ip,
                "user" => LimitKey::User,
                other => return Err(format!("rate_limit key {other:?}: expected ip or user")),
            };
            Some(RateLimit {
                requests: l.requests,
                per: Duration::from_secs(l.per_secs),
                key,
            })
        }
    };
    let strategy = match &r.balance {
        Some(b) => b.parse::<Strategy>()?,
        None => Strategy::default(),
    };
    let mut add_headers = r
        .add_headers
        .iter()
        .map(|(k, v)| {
            Ok((
                HeaderName::from_bytes(k.as_bytes())
                    .map_err(|_| format!("bad header name {k:?}"))?,
                HeaderValue::from_str(v).map_err(|_| format!("bad value of header {k:?}"))?,
            ))
        })
        .collect::<Result<Vec<_>, String>>()?;
    add_headers.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
    let remove_headers = r
        .remove_headers
        .iter()
        .map(|k| HeaderName::from_bytes(k.as_bytes()).map_err(|_| format!("bad header name {k:?}")))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(to) = &r.rewrite
        && !to.starts_with('/')
    {
        return Err(format!("rewrite {to:?} must start with '/'"));
    }
    let transform = match r.transform.as_deref() {
        None => None,
        Some("price_object") => Some(Transform::PriceObject),
        Some(other) => {
            return Err(format!(
                "unknown transform {other:?}: expected price_object"
            ));
        }
    };
    let method_names: Vec<&str> = methods.iter().map(Method::as_str).collect();
    Ok(Route {
        name: format!(
            "{} {} {}",
            r.versions.join(","),
            if method_names.is_empty() {
                "*".to_owned()
            } else {
                method_names.join(",")
            },
            r.prefix
        ),
        methods,
        prefix: match r.prefix.trim_end_matches('/') {
            "" => "/".to_owned(),
            p => p.to_owned(),
        },
        versions: r.versions.clone(),
        service: r.service.clone(),
        auth: r.auth,
        roles: r.roles.clone(),
        rate_limit,
        cache_ttl: Duration::from_secs(r.cache_ttl_secs),
        timeout: r.timeout_ms.map_or(default_timeout, Duration::from_millis),
        retries: r.retries,
        strategy,
        add_headers,
        remove_headers,
        rewrite: r.rewrite.clone(),
        transform,
        login: r.login,
        register: r.register,
    })
}

impl Table {
    /// Compiles `[gateway]` (and the feature flags that switch built-in
    /// routes); the message names the route at fault.
    pub fn compile(
        g: &GatewayConfig,
        features: &FeaturesConfig,
        default_timeout: Duration,
    ) -> Result<Self, String> {
        let mut routes = Vec::new();
        for (i, r) in g.routes.iter().enumerate() {
            routes.push(
                compile_route(r, default_timeout)
                    .map_err(|e| format!("gateway.routes[{i}] ({}): {e}", r.prefix))?,
            );
        }
        if g.default_routes {
            let switched_off = |r: &RouteConfig| {
                !features.v2_products
                    && r.service == "catalog"
                    && r.prefix == "/products"
                    && r.versions.iter().any(|v| v == "v2")
            };
            for r in builtin().into_iter().filter(|r| !switched_off(r)) {
                routes.push(compile_route(&r, default_timeout)?);
            }
        }
        let trusted = g
            .trusted_proxies
            .iter()
            .map(|s| Net::parse(s))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            routes,
            cors_any: g.cors_origins.iter().any(|o| o == "*"),
            cors_origins: g.cors_origins.clone(),
            trusted,
            login_failures_per_account: g.login_failures_per_account,
            login_failures_per_ip: g.login_failures_per_ip,
            registrations_per_address_per_minute: g.registrations_per_address_per_minute,
            act_per_address_per_minute: g.act_per_address_per_minute,
            body_timeout: Duration::from_millis(g.body_timeout_ms.max(1)),
            access_log: g.access_log,
        })
    }

    /// The route for a request: the longest matching prefix, the first
    /// listed on a tie.
    pub fn find(&self, method: &Method, version: &str, path: &str) -> Option<&Route> {
        let mut best: Option<&Route> = None;
        for r in &self.routes {
            if r.matches(method, version, path)
                && best.is_none_or(|b| r.prefix.len() > b.prefix.len())
            {
                best = Some(r);
            }
        }
        best
    }

    /// The methods routes allow for a path no route takes with the
    /// request's method (for 405 and `Allow`); empty when no route
    /// matches the path at all.
    pub fn allowed(&self, version: &str, path: &str) -> Vec<Method> {
        let mut allowed: Vec<Method> = Vec::new();
        for r in &self.routes {
            if r.versions.iter().any(|v| v == version) && under(path, &r.prefix) {
                for m in &r.methods {
                    if !allowed.contains(m) {
                        allowed.push(m.clone());
                    }
                }
            }
        }
        allowed
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// Whether browsers from `origin` may call.
    pub fn origin_allowed(&self, origin: &str) -> bool {
        self.cors_any || self.cors_origins.iter().any(|o| o == origin)
    }

    pub fn trusts(&self, peer: IpAddr) -> bool {
        self.trusted.iter().any(|n| n.contains(peer))
    }

    /// The client's address: the peer, unless the peer is a trusted proxy,
    /// in which case the nearest untrusted address in `X-Forwarded-For`.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.trusts(peer) {
            return peer;
        }
        let chain: Vec<IpAddr> = crate::tokens(headers, "x-forwarded-for")
            .filter_map(|a| a.parse().ok())
            .collect();
        let mut client = peer;
        for ip in chain.into_iter().rev() {
            client = ip;
            if !self.trusts(ip) {
                break;
            }
        }
        client
    }
}

/// The live table, replaced when the configuration changes.
#[derive(Clone)]
pub struct Live(Arc<RwLock<Arc<Table>>>);

impl Live {
    pub fn new(table: Table) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(table))))
    }

    pub fn current(&self) -> Arc<Table> {
        Arc::clone(
            &self
                .0
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    fn replace(&self, table: Table) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(table);
    }

    /// Follows the live configuration: when `[gateway]` or `[features]`
    /// changes (the file edited, a key put in etcd), the new table is
    /// swapped in. One that does not compile leaves the running table.
    pub fn follow(&self, config: &bazaar_chassis::live::LiveConfig, default_timeout: Duration) {
        let live = self.clone();
        let start = config.current();
        let mut running = (start.gateway.clone(), start.features.clone());
        config.on_change(move |c| {
            if running.0 == c.gateway && running.1 == c.features {
                return;
            }
            match Table::compile(&c.gateway, &c.features, default_timeout) {
                Ok(table) => {
                    tracing::info!(routes = table.len(), "route table reloaded");
                    live.replace(table);
                    running = (c.gateway.clone(), c.features.clone());
                }
                Err(e) => tracing::error!(
                    error = %e,
                    "the changed gateway configuration is invalid; keeping the running route table"
                ),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(extra: &str) -> Table {
        use figment::providers::{Format, Toml};
        let g: GatewayConfig = figment::Figment::from(Toml::string(extra))
            .extract()
            .unwrap();
        Table::compile(&g, &FeaturesConfig::default(), Duration::from_secs(10)).unwrap()
    }

    #[test]
    fn builtin_routes_and_policies() {
        let t = table("");
        let find =
            |m: Method, v: &str, p: &str| t.find(&m, v, p).map(|r| (r.service.as_str(), r.auth));
        assert_eq!(
            find(Method::GET, "v1", "/products"),
            Some(("catalog", false))
        );
        assert_eq!(
            find(Method::GET, "v1", "/products/abc"),
            Some(("catalog", false))
        );
        assert_eq!(
            find(Method::POST, "v1", "/products"),
            Some(("catalog", true))
        );
        assert_eq!(
            t.find(&Method::POST, "v1", "/products").unwrap().roles,
            ["admin"]
        );
        let buy = t.find(&Method::POST, "v1", "/products/buy").unwrap();
        assert!(buy.auth && buy.roles.is_empty());
        assert_eq!(
            find(Method::POST, "v1", "/auth/login"),
            Some(("auth", false))
        );
        assert!(t.find(&Method::POST, "v1", "/auth/login").unwrap().login);
        assert_eq!(find(Method::GET, "v1", "/auth/me"), Some(("auth", true)));
        assert_eq!(find(Method::GET, "v1", "/orders/1"), Some(("orders", true)));
        assert_eq!(find(Method::GET, "v1", "/productsx"), None);
        assert_eq!(find(Method::GET, "v1", "/admin"), None);
        assert_eq!(find(Method::GET, "v3", "/products"), None);
        assert_eq!(
            t.find(&Method::GET, "v2", "/products/1").unwrap().transform,
            Some(Transform::PriceObject)
        );
        assert_eq!(
            t.find(&Method::GET, "v1", "/products/1").unwrap().transform,
            None
        );
    }

    #[test]
    fn configured_routes_come_first_and_rewrite() {
        let t = table(
            r#"
            [[routes]]
            prefix = "/products"
            methods = ["GET"]
            service = "catalog"
            auth = false
            balance = "ip_hash"
            rate_limit = { requests = 5, per_secs = 60 }

            [[routes]]
            prefix = "/shop/"
            service = "catalog"
            rewrite = "/products"
            "#,
        );
        let r = t.find(&Method::GET, "v1", "/products/1").unwrap();
        assert_eq!(r.strategy, Strategy::IpHash);
        assert_eq!(r.rate_limit.as_ref().unwrap().requests, 5);
        let r = t.find(&Method::GET, "v1", "/shop/7").unwrap();
        assert_eq!(r.upstream_path("/shop/7"), "/products/7");
        assert_eq!(r.upstream_path("/shop"), "/products");
    }

    #[test]
    fn bad_routes_are_named() {
        use figment::providers::{Format, Toml};
        for (toml, needle) in [
            (
                "[[routes]]\nprefix = \"x\"\nservice = \"a\"",
                "must start with",
            ),
            (
                "[[routes]]\nprefix = \"/x\"\nservice = \"a\"\nbalance = \"random\"",
                "unknown balancing",
            ),
            (
                "[[routes]]\nprefix = \"/x\"\nservice = \"a\"\nrate_limit = { requests = 0 }",
                "rate_limit",
            ),
            (
                "[[routes]]\nprefix = \"/x\"\nservice = \"a\"\ntransform = \"nope\"",
                "transform",
            ),
            ("trusted_proxies = [\"10.0.0.0/99\"]", "prefix length"),
        ] {
            let g: GatewayConfig = figment::Figment::from(Toml::string(toml))
                .extract()
                .unwrap();
            let e =
                Table::compile(&g, &FeaturesConfig::default(), Duration::from_secs(1)).unwrap_err();
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn forwarded_for_only_from_trusted_proxies() {
        let t = table("trusted_proxies = [\"10.0.0.0/8\"]");
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("203.0.113.9, 10.1.1.1"),
        );
        let proxy: IpAddr = "10.2.2.2".parse().unwrap();
        let stranger: IpAddr = "198.51.100.1".parse().unwrap();
        assert_eq!(
            t.client_ip(proxy, &h),
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
        assert_eq!(t.client_ip(stranger, &h), stranger);
        let untrusting = table("");
        assert_eq!(untrusting.client_ip(proxy, &h), proxy);
    }
}
