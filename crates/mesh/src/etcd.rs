//! etcd: the registry of the distributed mode, and the watched prefix the
//! live configuration reads.
//!
//! [`Mirror`] keeps a local copy of everything under a key prefix: it
//! lists the prefix, then watches it from the next revision. After a
//! disconnect the watch resumes from the last revision it saw; when that
//! revision has been compacted away, it lists again. While etcd is
//! unreachable the copy stays as it was (callers keep the last known
//! view) and the mirror keeps retrying.
//!
//! [`EtcdRegistry`] puts each instance under
//! `/bazaar/services/<name>/<id>` with a lease, kept alive while the
//! instance's own `/ready` answers 200 and revoked when it deregisters;
//! a killed instance disappears when its lease runs out. Lists come from
//! the mirror, so a call never waits for etcd.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
pub use etcd_client::Client;
use etcd_client::{ConnectOptions, EventType, GetOptions, PutOptions, WatchOptions};
use tokio::sync::{oneshot, watch};
use tokio::task::AbortHandle;

use crate::{Instance, MeshError, Registry, actions};

/// Where instances are registered.
pub const SERVICES_PREFIX: &str = "/bazaar/services/";
/// Where the live configuration is kept (one key per dotted setting).
pub const CONFIG_PREFIX: &str = "/bazaar/config/";

/// The longest wait between two tries to reach etcd.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// A client for `endpoints` (`http://host:port`, comma-separated in
/// configuration). Connecting is lazy: etcd may be down now and come
/// later; each request fails fast (2 s) while it is.
pub async fn connect(endpoints: &[String]) -> Result<Client, MeshError> {
    let endpoints: Vec<&str> = endpoints
        .iter()
        .map(|e| e.trim())
        .filter(|e| !e.is_empty())
        .collect();
    if endpoints.is_empty() {
        return Err(MeshError::Unavailable("no etcd endpoint configured".into()));
    }
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(1))
        .with_timeout(Duration::from_secs(2))
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
        .with_keep_alive_while_idle(true);
    Client::connect(endpoints, Some(options))
        .await
        .map_err(|e| MeshError::Unavailable(format!("etcd: {e}")))
}

/// What a [`Mirror`] holds at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot<T> {
    /// Key (without the prefix) → decoded value.
    pub entries: BTreeMap<String, T>,
    /// The etcd revision this copy reflects (0: not read yet).
    pub revision: i64,
}

impl<T> Default for Snapshot<T> {
    fn default() -> Self {
        Self {
            entries: BTreeMap::new(),
            revision: 0,
        }
    }
}

/// Turns a key (prefix removed) and its value into an entry; `None`
/// skips the entry (with a log line of the decoder's own).
pub type Decode<T> = fn(&str, &[u8]) -> Option<T>;

/// A local copy of an etcd prefix, kept current by a watch.
pub struct Mirror<T> {
    state: watch::Sender<Arc<Snapshot<T>>>,
    connected: Arc<AtomicBool>,
    task: AbortHandle,
}

impl<T> Drop for Mirror<T> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl<T: Clone + Send + Sync + 'static> Mirror<T> {
    /// Starts mirroring `prefix`.
    pub fn start(client: Client, prefix: &str, decode: Decode<T>) -> Self {
        let (state, _) = watch::channel(Arc::new(Snapshot::default()));
        let connected = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(follow(
            client,
            prefix.to_owned(),
            decode,
            state.clone(),
            Arc::clone(&connected),
        ))
        .abort_handle();
        Self {
            state,
            connected,
            task,
        }
    }

    /// The copy as it is now.
    pub fn current(&self) -> Arc<Snapshot<T>> {
        self.state.borrow().clone()
    }

    /// Sees each new copy.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot<T>>> {
        self.state.subscribe()
    }

    /// Whether the watch is established now.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Waits (at most `within`) until the prefix has been read once.
    pub async fn synced(&self, within: Duration) -> bool {
        let mut rx = self.state.subscribe();
        tokio::time::timeout(within, rx.wait_for(|s| s.revision > 0))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// The mirror's loop: list, watch from the next revision, apply; on a
/// broken watch resume from the last revision; on compaction list again.
async fn follow<T: Clone + Send + Sync + 'static>(
    mut client: Client,
    prefix: String,
    decode: Decode<T>,
    state: watch::Sender<Arc<Snapshot<T>>>,
    connected: Arc<AtomicBool>,
) {
    let mut backoff = FIRST_BACKOFF;
    let mut listed = false;
    // The newest revision known to hold no change for this prefix (the
    // watch's created and progress answers carry it).
    let mut seen = 0;
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        if connected.swap(false, Ordering::Relaxed) {
            tracing::warn!(prefix, error = %e, "etcd {what} failed; keeping the last known view and retrying");
        } else {
            tracing::debug!(prefix, error = %e, "etcd {what} failed");
        }
    };
    loop {
        if !listed {
            match client
                .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
                .await
            {
                Ok(resp) => {
                    let revision = resp.header().map_or(1, |h| h.revision()).max(1);
                    let entries = resp
                        .kvs()
                        .iter()
                        .filter_map(|kv| {
                            let key = kv.key_str().ok()?.strip_prefix(prefix.as_str())?;
                            Some((key.to_owned(), decode(key, kv.value())?))
                        })
                        .collect();
                    state.send_replace(Arc::new(Snapshot { entries, revision }));
                    listed = true;
                    seen = revision;
                }
                Err(e) => {
                    fail("list", &e);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            }
        }
        let from = seen.max(state.borrow().revision) + 1;
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(from)
            .with_progress_notify();
        let mut stream = match client.watch(prefix.as_str(), Some(options)).await {
            Ok(s) => s,
            Err(e) => {
                fail("watch", &e);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        loop {
            let resp = match stream.message().await {
                Ok(Some(r)) => r,
                Ok(None) => {
                    fail("watch", &"the stream ended");
                    break;
                }
                Err(e) => {
                    fail("watch", &e);
                    break;
                }
            };
            if resp.compact_revision() > 0 {
                tracing::warn!(
                    prefix,
                    from,
                    compacted = resp.compact_revision(),
                    "etcd compacted the revisions this watch needs; listing again"
                );
                listed = false;
                break;
            }
            if resp.canceled() {
                tracing::warn!(
                    prefix,
                    reason = resp.cancel_reason(),
                    "etcd cancelled the watch"
                );
                break;
            }
            if !connected.swap(true, Ordering::Relaxed) {
                tracing::info!(prefix, from, "watching etcd");
            }
            backoff = FIRST_BACKOFF;
            let header = resp.header().map_or(0, |h| h.revision());
            if resp.events().is_empty() {
                seen = seen.max(header);
                continue;
            }
            let mut next = (**state.borrow()).clone();
            for event in resp.events() {
                let Some(kv) = event.kv() else { continue };
                next.revision = next.revision.max(kv.mod_revision());
                let Some(key) = kv
                    .key_str()
                    .ok()
                    .and_then(|k| k.strip_prefix(prefix.as_str()))
                else {
                    continue;
                };
                match event.event_type() {
                    EventType::Put => match decode(key, kv.value()) {
                        Some(v) => {
                            next.entries.insert(key.to_owned(), v);
                        }
                        None => {
                            next.entries.remove(key);
                        }
                    },
                    EventType::Delete => {
                        next.entries.remove(key);
                    }
                }
            }
            seen = seen.max(next.revision);
            state.send_replace(Arc::new(next));
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

// === impl EtcdRegistry ===

/// Instances in etcd, each under a lease (see the module docs).
pub struct EtcdRegistry {
    client: Client,
    ttl: Duration,
    mirror: Mirror<Instance>,
    changes: watch::Sender<u64>,
    /// This process's registrations: their keepers, by key.
    mine: Mutex<BTreeMap<String, Keeper>>,
    http: reqwest::Client,
    forward: AbortHandle,
}

struct Keeper {
    task: AbortHandle,
    lease: Arc<std::sync::atomic::AtomicI64>,
}

impl Drop for EtcdRegistry {
    fn drop(&mut self) {
        self.forward.abort();
        for k in self
            .mine
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            k.task.abort();
        }
    }
}

fn decode_instance(key: &str, value: &[u8]) -> Option<Instance> {
    let parsed = serde_json::from_slice::<Instance>(value);
    match parsed {
        Ok(i) if key == format!("{}/{}", i.name, i.id) => Some(i),
        Ok(_) => {
            tracing::warn!(
                key,
                "registry entry names another instance than its key; ignored"
            );
            None
        }
        Err(e) => {
            tracing::warn!(key, error = %e, "registry entry is not an instance; ignored");
            None
        }
    }
}

fn key_of(name: &str, id: &str) -> String {
    format!("{SERVICES_PREFIX}{name}/{id}")
}

impl EtcdRegistry {
    /// A registry on `client`; instances' leases last `ttl` (at least 2 s).
    pub fn new(client: Client, ttl: Duration) -> Self {
        let mirror = Mirror::start(client.clone(), SERVICES_PREFIX, decode_instance);
        let (changes, _) = watch::channel(0);
        let mut copies = mirror.subscribe();
        let ticks = changes.clone();
        let forward = tokio::spawn(async move {
            while copies.changed().await.is_ok() {
                ticks.send_modify(|n| *n += 1);
            }
        })
        .abort_handle();
        Self {
            client,
            ttl: ttl.max(Duration::from_secs(2)),
            mirror,
            changes,
            mine: Mutex::default(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(1))
                .build()
                .unwrap_or_default(),
            forward,
        }
    }

    /// Whether the watch on etcd is established now.
    pub fn connected(&self) -> bool {
        self.mirror.connected()
    }

    /// The instances as last seen, once the first listing is in (at most
    /// a few seconds' wait at start; then never a wait).
    async fn view(&self) -> Result<Arc<Snapshot<Instance>>, MeshError> {
        let snap = self.mirror.current();
        if snap.revision > 0 || self.mirror.synced(Duration::from_secs(3)).await {
            return Ok(self.mirror.current());
        }
        Err(MeshError::Unavailable("etcd cannot be reached".into()))
    }
}

#[async_trait]
impl Registry for EtcdRegistry {
    async fn register(&self, mut instance: Instance) -> Result<(), MeshError> {
        if let Ok(snap) = self.view().await {
            let others: Vec<Instance> = snap.entries.values().cloned().collect();
            actions::admit(&others, &mut instance);
        }
        let key = key_of(&instance.name, &instance.id);
        let value = serde_json::to_vec(&instance)
            .map_err(|e| MeshError::Unavailable(format!("cannot encode the instance: {e}")))?;
        let lease = Arc::new(std::sync::atomic::AtomicI64::new(0));
        let (first, put) = oneshot::channel();
        let task = tokio::spawn(keep(
            self.client.clone(),
            key.clone(),
            value,
            self.ttl,
            instance.health.clone(),
            self.http.clone(),
            Arc::clone(&lease),
            first,
        ))
        .abort_handle();
        let old = self
            .mine
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone(), Keeper { task, lease });
        if let Some(old) = old {
            old.task.abort();
        }
        // Etcd down: the instance serves anyway, and its keeper
        // registers it when etcd is back.
        if tokio::time::timeout(Duration::from_secs(3), put)
            .await
            .is_err()
        {
            tracing::warn!(key, "etcd cannot be reached; registering when it is back");
        }
        Ok(())
    }

    async fn deregister(&self, name: &str, id: &str) -> Result<(), MeshError> {
        let key = key_of(name, id);
        let keeper = self
            .mine
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key);
        let mut client = self.client.clone();
        if let Some(k) = keeper {
            k.task.abort();
            let lease = k.lease.load(Ordering::Relaxed);
            if lease != 0 {
                // Revoking deletes the key: callers see it go at once.
                return client
                    .lease_revoke(lease)
                    .await
                    .map(|_| ())
                    .map_err(|e| MeshError::Unavailable(format!("etcd: {e}")));
            }
        }
        client
            .delete(key, None)
            .await
            .map(|_| ())
            .map_err(|e| MeshError::Unavailable(format!("etcd: {e}")))
    }

    async fn list(&self, name: &str) -> Result<Vec<Instance>, MeshError> {
        let snap = self.view().await?;
        let from = format!("{name}/");
        // In key order (by id): stable, as balancing wants.
        Ok(snap
            .entries
            .range(from.clone()..)
            .take_while(|(k, _)| k.starts_with(&from))
            .map(|(_, i)| i.clone())
            .collect())
    }

    async fn all(&self) -> Result<Vec<Instance>, MeshError> {
        Ok(self.view().await?.entries.values().cloned().collect())
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

/// Keeps one instance registered: a lease, the key under it, then a
/// keep-alive every third of the TTL while the instance answers its
/// readiness check. A lease found expired (etcd was away longer than the
/// TTL, or the instance was not ready) is replaced by a new one.
#[allow(clippy::too_many_arguments)]
async fn keep(
    mut client: Client,
    key: String,
    value: Vec<u8>,
    ttl: Duration,
    health: String,
    http: reqwest::Client,
    lease: Arc<std::sync::atomic::AtomicI64>,
    first: oneshot::Sender<()>,
) {
    let mut first = Some(first);
    let mut backoff = FIRST_BACKOFF;
    let ttl_secs = i64::try_from(ttl.as_secs()).unwrap_or(10).max(2);
    let beat = ttl / 3;
    loop {
        let granted = async {
            let id = client.lease_grant(ttl_secs, None).await?.id();
            lease.store(id, Ordering::Relaxed);
            client
                .put(
                    key.as_str(),
                    value.clone(),
                    Some(PutOptions::new().with_lease(id)),
                )
                .await?;
            client.lease_keep_alive(id).await
        }
        .await;
        let (mut keeper, mut answers) = match granted {
            Ok(k) => k,
            Err(e) => {
                tracing::debug!(key, error = %e, "cannot register in etcd");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        tracing::info!(key, ttl_secs, "registered in etcd");
        if let Some(f) = first.take() {
            let _ = f.send(());
        }
        backoff = FIRST_BACKOFF;
        let mut ready = true;
        loop {
            tokio::time::sleep(beat).await;
            let now_ready = health.is_empty()
                || http
                    .get(&health)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
            if now_ready != ready {
                if now_ready {
                    tracing::info!(key, "ready again: keeping the registration alive");
                } else {
                    tracing::warn!(key, "not ready: letting the registration lapse");
                }
                ready = now_ready;
            }
            if !ready {
                continue;
            }
            let alive = async {
                keeper.keep_alive().await?;
                answers.message().await
            }
            .await;
            match alive {
                Ok(Some(a)) if a.ttl() > 0 => {}
                Ok(_) => {
                    tracing::warn!(key, "the registration's lease expired; registering again");
                    break;
                }
                Err(e) => {
                    tracing::warn!(key, error = %e, "cannot renew the registration; retrying");
                    break;
                }
            }
        }
    }
}
