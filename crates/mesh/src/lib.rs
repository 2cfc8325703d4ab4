//! Service discovery and resilient calls: where each service's instances
//! are, and one way to call them ([`upstream::Upstreams`], with the
//! [`client::Client`] services use).
//!
//! [`Registry`] is the backend trait; [`MemoryRegistry`] serves the embedded
//! mode (every service registers the ephemeral port it bound),
//! [`etcd::EtcdRegistry`] the distributed one (leases, a watched prefix)
//! and [`StaticRegistry`] takes addresses from configuration (Kubernetes
//! Services). [`Discovery`] picks an instance round-robin.

pub mod actions;
pub mod balance;
pub mod breaker;
pub mod client;
pub mod error;
pub mod etcd;
pub mod trace;
pub mod upstream;

pub use client::Client;
pub use error::{CallError, ErrorKind};

/// A map keyed by the system's own values (addresses, service names,
/// instance ids, secret-keyed digests), never by what a client chooses:
/// hashed with foldhash, a fraction of SipHash's cost on every request,
/// where SipHash's resistance to chosen collisions buys nothing.
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// One running instance of a service.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    /// The service name, e.g. `catalog`.
    pub name: String,
    /// Unique per instance (UUIDv7 in embedded mode).
    pub id: String,
    /// Base URL, e.g. `http://127.0.0.1:41234`.
    pub address: String,
    pub version: String,
    #[serde(default)]
    pub tags: Vec<String>,
    /// Its readiness URL (`…/ready`): the etcd registry keeps the
    /// instance's lease alive only while it answers 200.
    #[serde(default)]
    pub health: String,
    /// The action patterns it answers (`POST /act` on the gateway).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub patterns: Vec<actions::Action>,
    /// Patterns refused at registration (taken by, or ambiguous with,
    /// another service's), shown in `/_admin/services`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<actions::Refused>,
}

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("no instance of service {0:?} is registered")]
    NoInstance(String),
    #[error("registry unavailable: {0}")]
    Unavailable(String),
}

/// A registry backend. Every backend passes the suite in
/// `tests/conformance.rs`.
#[async_trait]
pub trait Registry: Send + Sync + 'static {
    /// Adds the instance (replacing one with its name and id). Its action
    /// patterns are checked against the other services' first
    /// ([`actions::admit`]).
    async fn register(&self, instance: Instance) -> Result<(), MeshError>;
    async fn deregister(&self, name: &str, id: &str) -> Result<(), MeshError>;
    /// The instances of one service, in registration order.
    async fn list(&self, name: &str) -> Result<Vec<Instance>, MeshError>;
    /// Every registered instance.
    async fn all(&self) -> Result<Vec<Instance>, MeshError>;
    /// Ticks after each change of the registered instances (callers
    /// read their lists again at once instead of on their next poll).
    fn changes(&self) -> watch::Receiver<u64>;
}

// === impl MemoryRegistry ===

/// In-process registry: the embedded mode and tests.
#[derive(Debug, Clone)]
pub struct MemoryRegistry {
    services: Arc<RwLock<HashMap<String, Vec<Instance>>>>,
    changed: Arc<watch::Sender<u64>>,
}

impl Default for MemoryRegistry {
    fn default() -> Self {
        Self {
            services: Arc::default(),
            changed: Arc::new(watch::channel(0).0),
        }
    }
}

#[async_trait]
impl Registry for MemoryRegistry {
    async fn register(&self, mut instance: Instance) -> Result<(), MeshError> {
        {
            let mut services = self.services.write().unwrap_or_else(|e| e.into_inner());
            let others: Vec<Instance> = services.values().flatten().cloned().collect();
            actions::admit(&others, &mut instance);
            let list = services.entry(instance.name.clone()).or_default();
            list.retain(|i| i.id != instance.id);
            list.push(instance);
        }
        self.changed.send_modify(|n| *n += 1);
        Ok(())
    }

    async fn deregister(&self, name: &str, id: &str) -> Result<(), MeshError> {
        {
            let mut services = self.services.write().unwrap_or_else(|e| e.into_inner());
            if let Some(list) = services.get_mut(name) {
                list.retain(|i| i.id != id);
            }
        }
        self.changed.send_modify(|n| *n += 1);
        Ok(())
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    async fn list(&self, name: &str) -> Result<Vec<Instance>, MeshError> {
        let services = self.services.read().unwrap_or_else(|e| e.into_inner());
        Ok(services.get(name).cloned().unwrap_or_default())
    }

    async fn all(&self) -> Result<Vec<Instance>, MeshError> {
        let services = self.services.read().unwrap_or_else(|e| e.into_inner());
        Ok(services.values().flatten().cloned().collect())
    }
}

// === impl StaticRegistry ===

/// Addresses from configuration (`name → [base URL]`, each optionally
/// followed by ` weight=N`); registering is a no-op because something else
/// (Compose, a Kubernetes Service) owns the addresses.
#[derive(Debug, Clone)]
pub struct StaticRegistry {
    services: HashMap<String, Vec<Instance>>,
    /// Never sends: the table does not change.
    unchanging: Arc<watch::Sender<u64>>,
}

impl StaticRegistry {
    pub fn new(addresses: &HashMap<String, Vec<String>>) -> Self {
        let services = addresses
            .iter()
            .map(|(name, urls)| {
                let instances = urls
                    .iter()
                    .map(|entry| {
                        let mut words = entry.split_whitespace();
                        let url = words.next().unwrap_or_default();
                        let mut tags = vec!["static".to_owned()];
                        tags.extend(words.map(str::to_owned));
                        let address = url.trim_end_matches('/').to_owned();
                        Instance {
                            name: name.clone(),
                            id: url.to_owned(),
                            health: format!("{address}/ready"),
                            address,
                            tags,
                            ..Instance::default()
                        }
                    })
                    .collect();
                (name.clone(), instances)
            })
            .collect();
        Self {
            services,
            unchanging: Arc::new(watch::channel(0).0),
        }
    }
}

#[async_trait]
impl Registry for StaticRegistry {
    async fn register(&self, _instance: Instance) -> Result<(), MeshError> {
        Ok(())
    }

    async fn deregister(&self, _name: &str, _id: &str) -> Result<(), MeshError> {
        Ok(())
    }

    async fn list(&self, name: &str) -> Result<Vec<Instance>, MeshError> {
        Ok(self.services.get(name).cloned().unwrap_or_default())
    }

    async fn all(&self) -> Result<Vec<Instance>, MeshError> {
        Ok(self.services.values().flatten().cloned().collect())
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.unchanging.subscribe()
    }
}

// === impl Discovery ===

/// Finds a service instance to call, round-robin over the registered ones.
#[derive(Clone)]
pub struct Discovery {
    registry: Arc<dyn Registry>,
    next: Arc<AtomicUsize>,
}

impl Discovery {
    pub fn new(registry: Arc<dyn Registry>) -> Self {
        Self {
            registry,
            next: Arc::default(),
        }
    }

    pub fn registry(&self) -> &Arc<dyn Registry> {
        &self.registry
    }

    /// One instance of `name`, rotating through them.
    pub async fn pick(&self, name: &str) -> Result<Instance, MeshError> {
        let list = self.registry.list(name).await?;
        if list.is_empty() {
            return Err(MeshError::NoInstance(name.to_owned()));
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % list.len();
        Ok(list[i].clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(name: &str, id: &str) -> Instance {
        Instance {
            name: name.into(),
            id: id.into(),
            address: format!("http://{id}"),
            version: "1".into(),
            ..Instance::default()
        }
    }

    #[tokio::test]
    async fn memory_register_list_deregister() {
        let r = MemoryRegistry::default();
        r.register(inst("catalog", "a")).await.unwrap();
        r.register(inst("catalog", "b")).await.unwrap();
        r.register(inst("catalog", "a")).await.unwrap();
        r.register(inst("orders", "c")).await.unwrap();
        let ids: Vec<_> = r
            .list("catalog")
            .await
            .unwrap()
            .into_iter()
            .map(|i| i.id)
            .collect();
        assert_eq!(ids, ["b", "a"]);
        r.deregister("catalog", "b").await.unwrap();
        assert_eq!(r.list("catalog").await.unwrap().len(), 1);
        assert_eq!(r.all().await.unwrap().len(), 2);
        assert!(r.list("nope").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn discovery_round_robins_and_reports_missing() {
        let r = MemoryRegistry::default();
        let d = Discovery::new(Arc::new(r.clone()));
        assert!(matches!(
            d.pick("catalog").await,
            Err(MeshError::NoInstance(_))
        ));
        r.register(inst("catalog", "a")).await.unwrap();
        r.register(inst("catalog", "b")).await.unwrap();
        let picks: Vec<_> = futures_picks(&d, 4).await;
        assert_eq!(picks.iter().filter(|id| *id == "a").count(), 2);
        assert_eq!(picks.iter().filter(|id| *id == "b").count(), 2);
    }

    async fn futures_picks(d: &Discovery, n: usize) -> Vec<String> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(d.pick("catalog").await.unwrap().id);
        }
        out
    }

    #[tokio::test]
    async fn static_registry_lists_configured_addresses() {
        let mut m = HashMap::new();
        m.insert(
            "auth".to_string(),
            vec![
                "http://127.0.0.1:7001/".to_string(),
                "http://127.0.0.1:7002 weight=3".to_string(),
            ],
        );
        let r = StaticRegistry::new(&m);
        let list = r.list("auth").await.unwrap();
        assert_eq!(list[0].address, "http://127.0.0.1:7001");
        assert_eq!(list[1].address, "http://127.0.0.1:7002");
        assert_eq!(balance::weight(&list[1]), 3);
        r.register(inst("x", "y")).await.unwrap();
        assert!(r.list("x").await.unwrap().is_empty());
    }
}
