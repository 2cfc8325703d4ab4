//! The live configuration: defaults < `bazaar.toml` < `BAZAAR_*` < etcd
//! keys under `/bazaar/config/` (one per dotted key of `bazaar.toml`,
//! each a JSON value: `/bazaar/config/features.v2_products` = `false`).
//!
//! [`LiveConfig`] holds the effective configuration and tells its readers when
//! it changes: when the file is edited (checked every second) or a key in
//! etcd is put or deleted (watched). A value that does not fit its key is
//! logged and ignored: the key keeps its last good value. Readers decide
//! what they apply live (the gateway's routes, limits and cache TTLs,
//! feature flags, the log level, the payment provider's failure rate);
//! the rest is read at start.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use figment::value::{Dict, Map};
use figment::{Figment, Metadata, Profile, Provider};
use serde_json::Value;
use tokio::sync::watch;

use crate::{Config, Shutdown};

/// Why a configuration (or one key of it) was not taken.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0:?} is not a configuration key")]
    UnknownKey(String),
    #[error("not JSON: {0}")]
    NotJson(String),
    #[error("{0}")]
    Invalid(String),
}

impl From<figment::Error> for ConfigError {
    fn from(e: figment::Error) -> Self {
        // figment names keys with their profile (`default.`): not ours.
        Self::Invalid(e.to_string().replace("key \"default.", "key \""))
    }
}

/// The configuration in effect, with where each value came from.
#[derive(Debug)]
pub struct Effective {
    pub config: Arc<Config>,
    /// Dotted key → `default`, `file`, `env`, `override` (a command-line
    /// flag, or the embedding program) or `etcd`.
    pub sources: BTreeMap<String, &'static str>,
}

/// The effective configuration, kept current.
#[derive(Clone)]
pub struct LiveConfig {
    rx: watch::Receiver<Arc<Effective>>,
}

impl LiveConfig {
    /// A configuration that never changes (tests, tools).
    pub fn fixed(config: Arc<Config>) -> Self {
        let sources = sources(&Layers::new(&config).base());
        let (tx, rx) = watch::channel(Arc::new(Effective { config, sources }));
        // The sender is dropped: readers keep the value, and see no change.
        drop(tx);
        Self { rx }
    }

    /// Follows the file `start.file` (if any) and, when `etcd` is given,
    /// the keys under `/bazaar/config/`, until `shutdown`.
    pub async fn start(
        start: Arc<Config>,
        etcd: Option<bazaar_mesh::etcd::Client>,
        shutdown: Shutdown,
    ) -> Self {
        let file = start.file.clone();
        let mut state = Layers::new(&start);
        let mirror = etcd.map(|client| {
            bazaar_mesh::etcd::Mirror::start(client, bazaar_mesh::etcd::CONFIG_PREFIX, |_, v| {
                Some(v.to_vec())
            })
        });
        // Subscribed before the first read: no change falls in between.
        let mut copies = mirror.as_ref().map(|m| m.subscribe());
        let mut keys = BTreeMap::new();
        if let Some(m) = &mirror {
            if m.synced(Duration::from_secs(3)).await {
                if let Some(c) = copies.as_mut() {
                    keys = c.borrow_and_update().entries.clone();
                }
            } else {
                tracing::warn!("etcd cannot be reached: starting without its configuration keys");
            }
        }
        // Taken before the file is read: an edit from now on is noticed.
        let mut stamp = file.as_deref().and_then(stamp_of);
        let first = state.build(&keys).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "configuration: keeping the values read at start");
            Effective {
                sources: sources(&state.base()),
                config: start,
            }
        });
        let (tx, rx) = watch::channel(Arc::new(first));
        tokio::spawn(async move {
            // The mirror lives as long as this task.
            let _mirror = mirror;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                let changed_keys = async {
                    match copies.as_mut() {
                        Some(c) => c.changed().await.is_ok(),
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = shutdown.wait() => return,
                    ok = changed_keys => {
                        if !ok {
                            copies = None;
                            continue;
                        }
                        if let Some(c) = &copies {
                            keys = c.borrow().entries.clone();
                        }
                    }
                    _ = tick.tick() => {
                        let now = file.as_deref().and_then(stamp_of);
                        if now == stamp {
                            continue;
                        }
                        stamp = now;
                    }
                }
                match state.build(&keys) {
                    Ok(next) => {
                        if *next.config != *tx.borrow().config {
                            tracing::info!("configuration changed");
                            tx.send_replace(Arc::new(next));
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "configuration not applied; the running one stays");
                    }
                }
            }
        });
        Self { rx }
    }

    /// The configuration now.
    pub fn current(&self) -> Arc<Config> {
        Arc::clone(&self.rx.borrow().config)
    }

    /// The configuration now, with each value's source.
    pub fn effective(&self) -> Arc<Effective> {
        Arc::clone(&self.rx.borrow())
    }

    /// Sees each change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Effective>> {
        self.rx.clone()
    }

    /// Runs `apply` with each new configuration (not the current one),
    /// until the configuration stops changing for good.
    pub fn on_change(&self, mut apply: impl FnMut(&Config) + Send + 'static) {
        let mut rx = self.subscribe();
        rx.mark_unchanged();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let now = Arc::clone(&rx.borrow_and_update().config);
                apply(&now);
            }
        });
    }
}

/// The file's modification time and size, to notice an edit.
fn stamp_of(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// What a rebuild needs: the file, the values the process was started
/// with that no layer gave (command-line flags, an embedding program's
/// settings), and each etcd key's last good value.
struct Layers {
    file: Option<PathBuf>,
    overrides: BTreeMap<String, Value>,
    last_good: BTreeMap<String, Value>,
}

impl Layers {
    fn new(start: &Config) -> Self {
        let file = start.file.clone();
        let layered: Config = Config::layers(file.as_deref())
            .extract()
            .unwrap_or_default();
        let layered = flatten(&serde_json::to_value(&layered).unwrap_or_default());
        let given = flatten(&serde_json::to_value(start).unwrap_or_default());
        let overrides = given
            .into_iter()
            .filter(|(k, v)| layered.get(k) != Some(v))
            .collect();
        Self {
            file,
            overrides,
            last_good: BTreeMap::new(),
        }
    }

    /// Defaults < file < environment < the start's own values.
    fn base(&self) -> Figment {
        let mut fig = Config::layers(self.file.as_deref());
        for (k, v) in &self.overrides {
            fig = fig.merge(Named::new("override", k, v));
        }
        fig
    }

    /// The layers below etcd, then each etcd key that fits (a key that
    /// does not keeps its last good value, if it had one).
    fn build(&mut self, keys: &BTreeMap<String, Vec<u8>>) -> Result<Effective, ConfigError> {
        let mut fig = self.base();
        let mut config: Config = fig.extract().map_err(ConfigError::from)?;
        self.last_good.retain(|k, _| keys.contains_key(k));
        for (key, raw) in keys {
            let value = serde_json::from_slice::<Value>(raw)
                .map_err(|e| ConfigError::NotJson(e.to_string()));
            let applied = value.and_then(|v| {
                check_key(key)?;
                let next = fig.clone().merge(Named::new("etcd", key, &v));
                let c: Config = next.extract().map_err(ConfigError::from)?;
                c.validate().map_err(ConfigError::Invalid)?;
                Ok((next, c, v))
            });
            match applied {
                Ok((next, c, v)) => {
                    fig = next;
                    config = c;
                    self.last_good.insert(key.clone(), v);
                }
                Err(e) => {
                    tracing::error!(key, error = %e, "bad configuration value in etcd; ignored");
                    if let Some(good) = self.last_good.get(key) {
                        let next = fig.clone().merge(Named::new("etcd", key, good));
                        if let Ok(c) = next.extract::<Config>() {
                            fig = next;
                            config = c;
                        }
                    }
                }
            }
        }
        config.file.clone_from(&self.file);
        Ok(Effective {
            sources: sources(&fig),
            config: Arc::new(config),
        })
    }
}

/// One key as a figment layer, named after where it came from.
struct Named {
    source: &'static str,
    key: String,
    value: Value,
}

impl Named {
    fn new(source: &'static str, key: &str, value: &Value) -> Self {
        Self {
            source,
            key: key.to_owned(),
            value: value.clone(),
        }
    }
}

impl Provider for Named {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.source)
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        figment::providers::Serialized::default(&self.key, &self.value).data()
    }
}

/// Every dotted key of `value`'s leaves (arrays and empty tables are
/// leaves), with the leaf.
pub fn flatten(value: &Value) -> BTreeMap<String, Value> {
    fn walk(prefix: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
        match v {
            Value::Object(m) if !m.is_empty() => {
                for (k, v) in m {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            leaf => {
                out.insert(prefix.to_owned(), leaf.clone());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk("", value, &mut out);
    out
}

/// Whether `key` is a key of `bazaar.toml`: a setting, a whole section,
/// or an entry of a table of names (`services.auth`).
pub fn check_key(key: &str) -> Result<(), ConfigError> {
    // The keys of the defaults, flattened once: every etcd key of every
    // rebuild is checked against them.
    static KNOWN: std::sync::OnceLock<BTreeMap<String, Value>> = std::sync::OnceLock::new();
    let known =
        KNOWN.get_or_init(|| flatten(&serde_json::to_value(Config::default()).unwrap_or_default()));
    let fits = known.contains_key(key)
        || known.keys().any(|k| k.starts_with(&format!("{key}.")))
        || key.rsplit_once('.').is_some_and(
            |(parent, _)| matches!(known.get(parent), Some(Value::Object(m)) if m.is_empty()),
        );
    if fits {
        Ok(())
    } else {
        Err(ConfigError::UnknownKey(key.to_owned()))
    }
}

/// Checks that `value` fits `key` (on the defaults).
pub fn check(key: &str, value: &Value) -> Result<(), ConfigError> {
    check_key(key)?;
    Figment::from(figment::providers::Serialized::defaults(Config::default()))
        .merge(Named::new("etcd", key, value))
        .extract::<Config>()
        .map_err(ConfigError::from)?
        .validate()
        .map_err(ConfigError::Invalid)
}

/// Where each leaf of the effective configuration came from.
fn sources(fig: &Figment) -> BTreeMap<String, &'static str> {
    let config: Config = fig.extract().unwrap_or_default();
    let flat = flatten(&serde_json::to_value(&config).unwrap_or_default());
    flat.keys()
        .map(|k| {
            let source = fig.find_metadata(k).map_or("default", |m| {
                if m.name == "etcd" {
                    "etcd"
                } else if m.name == "override" {
                    "override"
                } else if m.name.contains("TOML") {
                    "file"
                } else if m.name.contains("environment") {
                    "env"
                } else {
                    "default"
                }
            });
            (k.clone(), source)
        })
        .collect()
}

/// The configuration as `/_admin/config` shows it: each dotted key's
/// value and source, secrets masked (passwords, and the password in any
/// URL).
pub fn shown(effective: &Effective) -> Value {
    let flat = flatten(&serde_json::to_value(&*effective.config).unwrap_or_default());
    let entries = flat
        .into_iter()
        .map(|(k, v)| {
            let source = effective.sources.get(&k).copied().unwrap_or("default");
            let secret = k
                .rsplit('.')
                .next()
                .is_some_and(|last| last.contains("password") || last.contains("secret"));
            let value = match v {
                Value::String(s) if secret && !s.is_empty() => Value::from("********"),
                Value::String(s) => Value::from(mask_url(&s)),
                other => other,
            };
            (k, serde_json::json!({ "value": value, "source": source }))
        })
        .collect::<serde_json::Map<_, _>>();
    Value::Object(entries)
}

/// `scheme://user:password@host…` → `scheme://user:********@host…`.
pub fn mask_url(s: &str) -> String {
    let Some((scheme, rest)) = s.split_once("://") else {
        return s.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or_default();
            if userinfo.contains(':') {
                format!("{scheme}://{user}:********@{host}{path}")
            } else {
                s.to_owned()
            }
        }
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn keys_are_checked_against_the_configuration() {
        assert!(check("features.v2_products", &json!(false)).is_ok());
        assert!(check("payments_failure_rate", &json!(0.5)).is_ok());
        assert!(check("services.auth", &json!("http://a:1")).is_ok());
        assert!(check("gateway.routes", &json!([])).is_ok());
        assert!(check("features.v2_products", &json!("maybe")).is_err());
        assert!(check("log_level", &json!("verbose")).is_err());
        assert!(check("log_level", &json!("debug")).is_ok());
        assert!(check("payments_failure_rate", &json!(1.5)).is_err());
        assert!(check("no_such_key", &json!(1)).is_err());
        assert!(check("gateway.no_such_key", &json!(1)).is_err());
    }

    #[test]
    #[allow(clippy::result_large_err)]
    fn etcd_is_the_top_layer_and_a_bad_value_keeps_the_last_good_one() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "bazaar.toml",
                "payments_failure_rate = 0.1\nbody_limit = 10\n",
            )?;
            jail.set_env("BAZAAR_BODY_LIMIT", "20");
            let start = Config {
                gateway_port: 9999,
                ..Config::load(None).map_err(|e| e.to_string())?
            };
            let mut layers = Layers::new(&start);
            let mut keys = BTreeMap::new();
            keys.insert("payments_failure_rate".to_owned(), b"0.5".to_vec());
            let e = layers.build(&keys).map_err(|e| e.to_string())?;
            assert_eq!(e.config.payments_failure_rate, 0.5);
            assert_eq!(e.sources["payments_failure_rate"], "etcd");
            assert_eq!(e.config.body_limit, 20);
            assert_eq!(e.sources["body_limit"], "env");
            assert_eq!(e.sources["access_token_ttl_secs"], "default");
            assert_eq!(e.config.gateway_port, 9999, "a flag stays");
            assert_eq!(e.sources["gateway_port"], "override");
            keys.insert("payments_failure_rate".to_owned(), b"\"lots\"".to_vec());
            keys.insert("log_level".to_owned(), b"not json".to_vec());
            let e = layers.build(&keys).map_err(|e| e.to_string())?;
            assert_eq!(
                e.config.payments_failure_rate, 0.5,
                "the last good value stays"
            );
            assert_eq!(e.config.log_level, "info");
            keys.clear();
            let e = layers.build(&keys).map_err(|e| e.to_string())?;
            assert_eq!(
                e.config.payments_failure_rate, 0.1,
                "deleted: the file's again"
            );
            assert_eq!(e.sources["payments_failure_rate"], "file");
            Ok(())
        });
    }

    /// An edit of the file reaches the readers within about a second.
    #[tokio::test]
    async fn an_edited_file_applies_while_running() {
        let dir = std::env::temp_dir().join(format!("bazaar-live-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_default();
        let file = dir.join("bazaar.toml");
        std::fs::write(&file, "payments_failure_rate = 0.0\n").unwrap_or_default();
        let start = Arc::new(Config::load(Some(&file)).unwrap_or_default());
        let shutdown = Shutdown::default();
        let live = LiveConfig::start(start, None, shutdown.clone()).await;
        assert_eq!(live.current().payments_failure_rate, 0.0);
        let mut changes = live.subscribe();
        std::fs::write(&file, "payments_failure_rate = 0.75\nlog_level = 'warn'\n")
            .unwrap_or_default();
        tokio::time::timeout(Duration::from_secs(3), changes.changed())
            .await
            .ok();
        assert_eq!(live.current().payments_failure_rate, 0.75);
        assert_eq!(live.effective().sources["payments_failure_rate"], "file");
        // A broken edit leaves the running configuration in place.
        std::fs::write(&file, "payments_failure_rate = 'lots'\n").unwrap_or_default();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(live.current().payments_failure_rate, 0.75);
        shutdown.trigger();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn secrets_are_masked() {
        assert_eq!(
            mask_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:********@127.0.0.1:5672/%2f"
        );
        assert_eq!(mask_url("http://127.0.0.1:2379"), "http://127.0.0.1:2379");
        let config = Config {
            admin_password: Some("hunter22".into()),
            ..Config::default()
        };
        let shown = shown(&Effective {
            config: Arc::new(config),
            sources: BTreeMap::new(),
        });
        assert_eq!(shown["admin_password"]["value"], "********");
        assert_eq!(shown["gateway_port"]["value"], 8080);
    }
}
