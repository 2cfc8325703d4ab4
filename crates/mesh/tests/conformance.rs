//! One suite, every registry backend: `memory` (embedded), `etcd` (a real
//! etcd) and `static` (configured addresses: what it can do of it).
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bazaar_mesh::actions::Action;
use bazaar_mesh::etcd::EtcdRegistry;
use bazaar_mesh::{Instance, MemoryRegistry, Registry, StaticRegistry};
use serde_json::json;
use support::within;

fn instance(name: &str, id: &str, port: u16) -> Instance {
    Instance {
        name: name.into(),
        id: id.into(),
        address: format!("http://127.0.0.1:{port}"),
        version: "1.2.3".into(),
        tags: vec!["weight=2".into()],
        health: String::new(),
        patterns: vec![Action::new(
            json!({"role": name, "cmd": "get", "id": "*"}),
            "GET",
            "/x/{id}",
        )],
        refused: vec![],
    }
}

async fn ids(r: &dyn Registry, name: &str) -> Vec<String> {
    let mut ids: Vec<String> = r
        .list(name)
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    ids.sort();
    ids
}

/// What every backend that takes registrations must do. Lists may lag a
/// registration by the backend's propagation (etcd: its watch; how long,
/// `bench/discovery.sh` measures).
async fn dynamic_suite(r: Arc<dyn Registry>) {
    let settle = Duration::from_secs(5);
    assert!(r.list("catalog").await.unwrap().is_empty());
    let mut changes = r.changes();
    changes.mark_unchanged();

    r.register(instance("catalog", "a", 7001)).await.unwrap();
    r.register(instance("catalog", "b", 7002)).await.unwrap();
    r.register(instance("orders", "c", 7003)).await.unwrap();
    within(settle, "three registered", || async {
        r.all().await.unwrap().len() == 3
    })
    .await;
    assert!(changes.has_changed().unwrap(), "a change is announced");
    assert_eq!(ids(&*r, "catalog").await, ["a", "b"]);
    assert_eq!(ids(&*r, "orders").await, ["c"]);
    let a = r
        .list("catalog")
        .await
        .unwrap()
        .into_iter()
        .find(|i| i.id == "a")
        .unwrap();
    assert_eq!(a, instance("catalog", "a", 7001), "every field round-trips");

    // Registering an id again replaces it.
    r.register(instance("catalog", "a", 7009)).await.unwrap();
    within(settle, "a replaced", || async {
        r.list("catalog")
            .await
            .unwrap()
            .iter()
            .any(|i| i.address.ends_with(":7009"))
    })
    .await;
    assert_eq!(ids(&*r, "catalog").await, ["a", "b"]);

    // Another service's pattern is refused, and the refusal kept.
    let mut rogue = instance("rogue", "r", 7004);
    rogue.patterns = vec![Action::new(
        json!({"role": "catalog", "cmd": "get", "id": "*"}),
        "GET",
        "/y",
    )];
    r.register(rogue).await.unwrap();
    within(settle, "rogue listed", || async {
        !r.list("rogue").await.unwrap().is_empty()
    })
    .await;
    let rogue = r.list("rogue").await.unwrap().remove(0);
    assert!(rogue.patterns.is_empty());
    assert_eq!(rogue.refused.len(), 1);
    assert_eq!(rogue.refused[0].reason, "already registered by catalog");

    changes.mark_unchanged();
    r.deregister("catalog", "b").await.unwrap();
    r.deregister("rogue", "r").await.unwrap();
    within(settle, "b deregistered", || async {
        ids(&*r, "catalog").await == ["a"]
    })
    .await;
    within(settle, "the change announced", || async {
        changes.has_changed().unwrap()
    })
    .await;
    r.deregister("catalog", "nobody").await.unwrap();
    assert!(r.list("nothing").await.unwrap().is_empty());
}

#[tokio::test]
async fn memory_registry() {
    dynamic_suite(Arc::new(MemoryRegistry::default())).await;
}

#[tokio::test]
async fn etcd_registry() {
    let Some(etcd) = support::Etcd::start().await else {
        return;
    };
    let client = bazaar_mesh::etcd::connect(&[etcd.url()]).await.unwrap();
    dynamic_suite(Arc::new(EtcdRegistry::new(client, Duration::from_secs(5)))).await;
}

/// The static table: the addresses configured, fixed.
#[tokio::test]
async fn static_registry() {
    let mut table = HashMap::new();
    table.insert(
        "catalog".to_owned(),
        vec![
            "http://127.0.0.1:7001".to_owned(),
            "http://127.0.0.1:7002/ weight=3".to_owned(),
        ],
    );
    let r = StaticRegistry::new(&table);
    let list = r.list("catalog").await.unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[1].address, "http://127.0.0.1:7002");
    assert_eq!(list[1].health, "http://127.0.0.1:7002/ready");
    assert!(list[1].tags.contains(&"weight=3".to_owned()));
    assert!(r.list("orders").await.unwrap().is_empty());
    let changes = r.changes();
    r.register(instance("orders", "c", 7003)).await.unwrap();
    r.deregister("catalog", "http://127.0.0.1:7001")
        .await
        .unwrap();
    assert_eq!(
        r.all().await.unwrap().len(),
        2,
        "the table is configuration"
    );
    assert!(!changes.has_changed().unwrap());
}
