//! `bazaar config get|set|unset|watch`: the live configuration in etcd.
//! Each key is a dotted key of `bazaar.toml` (`features.v2_products`,
//! `gateway.routes`, `payments_failure_rate`), stored under
//! `/bazaar/config/` as JSON; running services apply it within a second.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bazaar_chassis::Config;
use bazaar_chassis::live::{self, LiveConfig};
use bazaar_mesh::etcd::{self, CONFIG_PREFIX};
use serde_json::Value;

/// The etcd endpoints to use: `--etcd`, else `etcd_endpoints`, else the
/// local default.
pub fn endpoints(flag: Option<String>, config: &Config) -> Vec<String> {
    let from_config = config.etcd_endpoints();
    match flag {
        Some(f) => f.split(',').map(|s| s.trim().to_owned()).collect(),
        None if !from_config.is_empty() => from_config,
        None => vec!["http://127.0.0.1:2379".to_owned()],
    }
}

async fn client(endpoints: &[String]) -> anyhow::Result<etcd::Client> {
    let mut c = etcd::connect(endpoints).await?;
    c.status()
        .await
        .with_context(|| format!("cannot reach etcd at {}", endpoints.join(", ")))?;
    Ok(c)
}

/// A value as given on the command line: JSON (`false`, `0.5`, `[…]`,
/// `"text"`), or else the text itself.
pub fn parse_value(raw: &str) -> Value {
    serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_owned()))
}

/// Prints the effective value of `key` (every key below it, for a
/// section) and where each came from.
pub async fn get(config: Config, endpoints: &[String], key: &str) -> anyhow::Result<()> {
    live::check_key(key)?;
    let c = client(endpoints).await?;
    let live = LiveConfig::start(
        Arc::new(config),
        Some(c),
        bazaar_chassis::Shutdown::default(),
    )
    .await;
    let shown = live::shown(&live.effective());
    let section = format!("{key}.");
    let mut found = false;
    if let Value::Object(entries) = shown {
        for (k, v) in entries
            .iter()
            .filter(|(k, _)| *k == key || k.starts_with(&section))
        {
            found = true;
            println!(
                "{k} = {} ({})",
                v["value"],
                v["source"].as_str().unwrap_or("default")
            );
        }
    }
    if !found {
        println!("{key} is not set");
    }
    Ok(())
}

/// Checks `value` against `key` and puts it.
pub async fn set(endpoints: &[String], key: &str, raw: &str) -> anyhow::Result<()> {
    let value = parse_value(raw);
    live::check(key, &value).map_err(|e| anyhow::anyhow!("{key} cannot be {value}: {e}"))?;
    let mut c = client(endpoints).await?;
    c.put(format!("{CONFIG_PREFIX}{key}"), value.to_string(), None)
        .await
        .context("cannot write to etcd")?;
    println!("{key} = {value}");
    Ok(())
}

/// Removes `key` from etcd: the layers below decide it again.
pub async fn unset(endpoints: &[String], key: &str) -> anyhow::Result<()> {
    live::check_key(key)?;
    let mut c = client(endpoints).await?;
    let deleted = c
        .delete(format!("{CONFIG_PREFIX}{key}"), None)
        .await
        .context("cannot write to etcd")?
        .deleted();
    if deleted == 0 {
        println!("{key} was not set in etcd");
    } else {
        println!("{key} unset");
    }
    Ok(())
}

/// Prints each change of `key` (or of every key) in etcd until Ctrl-C.
pub async fn watch(endpoints: &[String], key: Option<&str>) -> anyhow::Result<()> {
    if let Some(k) = key {
        live::check_key(k)?;
    }
    let c = client(endpoints).await?;
    let mirror = etcd::Mirror::start(c, CONFIG_PREFIX, |_, v| Some(v.to_vec()));
    anyhow::ensure!(
        mirror.synced(Duration::from_secs(5)).await,
        "cannot read the configuration from etcd"
    );
    let wanted = |k: &str| key.is_none_or(|w| k == w || k.starts_with(&format!("{w}.")));
    let show = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
    let mut seen = mirror.current().entries.clone();
    for (k, v) in seen.iter().filter(|(k, _)| wanted(k)) {
        println!("{k} = {}", show(v));
    }
    eprintln!(
        "watching {CONFIG_PREFIX}{} (Ctrl-C to stop)",
        key.unwrap_or("")
    );
    let mut copies = mirror.subscribe();
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            changed = copies.changed() => changed.context("the etcd watch ended")?,
        }
        let now = copies.borrow_and_update().entries.clone();
        for (k, v) in now.iter().filter(|(k, _)| wanted(k)) {
            if seen.get(k) != Some(v) {
                println!("{k} = {}", show(v));
            }
        }
        for k in seen.keys().filter(|k| wanted(k) && !now.contains_key(*k)) {
            println!("{k} unset");
        }
        seen = now;
    }
}
