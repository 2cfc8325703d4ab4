//! The public API contract at `/api/openapi.json` and its Swagger UI at
//! `/api/docs`. Both ways round:
//!
//! - every operation it describes is a route that really answers through
//!   the gateway (no "no such route", no 405, no 5xx);
//! - every route of the gateway's built-in table has operations in it (a
//!   route the contract does not describe fails here). Inside each
//!   service the same holds by construction: routers are built from the
//!   same annotated handlers as the contracts.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;

use common::{ADMIN_EMAIL, ADMIN_PASSWORD, Api, embedded, wait_ready};
use serde_json::Value;

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

/// The built-in route table, as the gateway compiles it.
fn route_table() -> Vec<toml::Value> {
    let text = include_str!("../services/gateway/src/defaults.toml");
    let table: toml::Value = toml::from_str(text).unwrap();
    table["routes"].as_array().unwrap().clone()
}

fn strings(v: Option<&toml::Value>) -> Vec<String> {
    v.and_then(toml::Value::as_array)
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn the_contract_describes_the_routes_and_only_them() {
    let (system, _dir) = embedded().await;
    let gw = system.gateway_url.clone();
    wait_ready(&gw).await;
    let spec: Value = reqwest::get(format!("{gw}/api/openapi.json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        spec["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        spec["openapi"]
    );
    assert_eq!(
        spec["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    let schemas = &spec["components"]["schemas"];
    for schema in [
        "Product",
        "ProductV2",
        "Price",
        "Problem",
        "Order",
        "Checkout",
        "TokenPair",
        "Profile",
        "DeadLetter",
        "Overview",
    ] {
        assert!(schemas[schema].is_object(), "schema {schema}");
    }
    // v2 products carry a price object and no separate currency.
    assert_eq!(
        schemas["ProductV2"]["properties"]["price"]["$ref"],
        "#/components/schemas/Price"
    );
    assert!(schemas["ProductV2"]["properties"]["currency"].is_null());
    assert_eq!(
        spec["paths"]["/api/v2/products/{id}"]["get"]["responses"]["200"]["content"]["application/json"]
            ["schema"]["$ref"],
        "#/components/schemas/ProductV2"
    );
    assert!(
        schemas["Product"]["examples"].is_array(),
        "schemas carry examples"
    );

    let paths = spec["paths"].as_object().unwrap();
    let mut operations = Vec::new();
    let mut operation_ids = HashSet::new();
    for (path, item) in paths {
        for method in METHODS {
            if let Some(op) = item.get(method) {
                operations.push((method.to_uppercase(), path.clone()));
                if let Some(id) = op["operationId"].as_str() {
                    assert!(
                        operation_ids.insert(id.to_owned()),
                        "{method} {path}: operationId {id} is not unique"
                    );
                }
                let responses = op["responses"].as_object().unwrap();
                assert!(!responses.is_empty(), "{method} {path} describes no answer");
                if op.get("security").is_some() {
                    assert!(responses.contains_key("401"), "{method} {path}: no 401");
                }
                for (status, r) in responses {
                    if status.starts_with('4') || status.starts_with('5') {
                        assert!(
                            r["content"]["application/problem+json"].is_object(),
                            "{method} {path} {status} is not problem+json"
                        );
                    }
                }
            }
        }
    }

    // Every route of the table has operations in the contract, for each
    // of its versions and methods.
    for route in route_table() {
        let prefix = route["prefix"].as_str().unwrap();
        let mut versions = strings(route.get("versions"));
        if versions.is_empty() {
            versions.push("v1".into());
        }
        let methods = strings(route.get("methods"));
        for version in &versions {
            let base = format!("/api/{version}{prefix}");
            let described = operations.iter().any(|(m, p)| {
                (p == &base || p.starts_with(&format!("{base}/")))
                    && (methods.is_empty() || methods.iter().any(|x| x == m))
            });
            assert!(
                described,
                "the route {version} {methods:?} {prefix} is not in the contract"
            );
        }
    }

    // Each operation is a route that answers through the gateway, asked
    // as an admin with an empty JSON body: none falls through to "no such
    // route" or 405, none fails with a 5xx.
    let admin = Api::new(&gw).login(ADMIN_EMAIL, ADMIN_PASSWORD).await;
    let http = reqwest::Client::new();
    for (method, path) in &operations {
        let mut concrete = path.clone();
        for param in ["{id}", "{product_id}", "{order_id}"] {
            concrete = concrete.replace(param, "0190c6a0-0000-7000-8000-000000000000");
        }
        let res = http
            .request(method.parse().unwrap(), format!("{gw}{concrete}"))
            .bearer_auth(&admin)
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await
            .unwrap();
        let status = res.status().as_u16();
        // A live stream is not read to its end (it has none).
        let streams = res
            .headers()
            .get("content-type")
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        let body: Value = if streams {
            Value::Null
        } else {
            res.json().await.unwrap_or(Value::Null)
        };
        assert_ne!(status, 405, "{method} {path}");
        assert_ne!(body["detail"], "no such route", "{method} {path}");
        assert!(status < 500, "{method} {path}: {status} {body}");
    }
    assert!(operations.len() >= 30, "{} operations", operations.len());

    // Swagger UI, from the binary, reading that contract.
    let docs = reqwest::get(format!("{gw}/api/docs/")).await.unwrap();
    assert_eq!(docs.status(), 200);
    assert!(docs.text().await.unwrap().contains("swagger-ui"));
    let init = reqwest::get(format!("{gw}/api/docs/swagger-initializer.js"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(init.contains("/api/openapi.json"), "{init}");
    system.shutdown.trigger();
}
