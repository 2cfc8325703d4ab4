//! The public API contract at `/api/openapi.json` (so far: catalog,
//! inventory, payments and notifications, below /api/v1): OpenAPI 3.1,
//! each operation with its problem+json errors and the bearer scheme where
//! a token is needed; and every operation it describes is a route the
//! service really has. (The other way round holds by construction: those
//! services' routers are built from the same annotated handlers as their
//! contracts.)
#![allow(clippy::unwrap_used)]

mod common;

use common::{ADMIN_EMAIL, ADMIN_PASSWORD, Api, address_of, embedded, wait_ready};
use serde_json::Value;

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
    for schema in ["Product", "Problem", "ProductBody", "BuyBody", "Order"] {
        assert!(
            spec["components"]["schemas"][schema].is_object(),
            "schema {schema}"
        );
    }
    let paths = spec["paths"].as_object().unwrap();
    let mut operations = Vec::new();
    for (path, item) in paths {
        for method in ["get", "post", "put", "patch", "delete"] {
            if let Some(op) = item.get(method) {
                operations.push((method.to_uppercase(), path.clone()));
                let responses = op["responses"].as_object().unwrap();
                assert!(!responses.is_empty(), "{method} {path} describes no answer");
                if op.get("security").is_some() {
                    assert!(responses.contains_key("401"), "{method} {path}: no 401");
                }
            }
        }
    }
    operations.sort();
    let expected = [
        ("DELETE", "/api/v1/products/{id}"),
        ("GET", "/api/v1/inventory/{product_id}"),
        ("GET", "/api/v1/notifications"),
        ("GET", "/api/v1/payments/{order_id}"),
        ("GET", "/api/v1/products"),
        ("GET", "/api/v1/products/{id}"),
        ("POST", "/api/v1/products"),
        ("POST", "/api/v1/products/buy"),
        ("PUT", "/api/v1/inventory/{product_id}"),
        ("PUT", "/api/v1/products/{id}"),
    ];
    let got: Vec<(&str, &str)> = operations
        .iter()
        .map(|(m, p)| (m.as_str(), p.as_str()))
        .collect();
    assert_eq!(got, expected);

    // Each is a route of the service's own: asked directly, with an admin
    // token, none falls through to "no such route" or 405.
    let admin = Api::new(&gw).login(ADMIN_EMAIL, ADMIN_PASSWORD).await;
    let http = reqwest::Client::new();
    for (method, path) in &operations {
        let service_path = path.trim_start_matches("/api/v1");
        let service = match service_path.split('/').nth(1).unwrap() {
            "products" => "catalog",
            other => other,
        };
        let base = address_of(&system, service).await;
        let mut service_path = service_path.to_owned();
        for param in ["{id}", "{product_id}", "{order_id}"] {
            service_path = service_path.replace(param, "0190c6a0-0000-7000-8000-000000000000");
        }
        let res = http
            .request(method.parse().unwrap(), format!("{base}{service_path}"))
            .bearer_auth(&admin)
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await
            .unwrap();
        let status = res.status().as_u16();
        let body: Value = res.json().await.unwrap_or(Value::Null);
        assert_ne!(status, 405, "{method} {path}");
        assert_ne!(body["detail"], "no such route", "{method} {path}");
        assert!(status < 500, "{method} {path}: {status} {body}");
    }
    system.shutdown.trigger();
}
