//! The public API contract: each service's OpenAPI paths as clients see
//! them, below `/api/<version>` wherever the built-in route table sends
//! that method and path to that service, merged into one document with
//! the bearer scheme. The gateway serves it at `/api/openapi.json`.
//!
//! v1 only for now: v2 reshapes the price (`transform = "price_object"`),
//! which needs a schema of its own.

use std::time::Duration;

use axum::http::Method;
use bazaar_chassis::config::{FeaturesConfig, GatewayConfig};
use utoipa::openapi::path::{Operation, PathItem};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Components, OpenApi};

use crate::table::Table;

/// The versions published.
const VERSIONS: [&str; 1] = ["v1"];

/// A path as the route table sees it: `{id}` becomes a sample segment.
fn concrete(path: &str) -> String {
    path.split('/')
        .map(|s| if s.starts_with('{') { "x" } else { s })
        .collect::<Vec<_>>()
        .join("/")
}

/// The operations of `item`, by method.
fn operations(item: &mut PathItem) -> [(Method, &mut Option<Operation>); 5] {
    [
        (Method::GET, &mut item.get),
        (Method::POST, &mut item.post),
        (Method::PUT, &mut item.put),
        (Method::PATCH, &mut item.patch),
        (Method::DELETE, &mut item.delete),
    ]
}

/// Merges `services` (name, contract as the service serves it) into the
/// public contract.
pub fn public(services: Vec<(&str, OpenApi)>) -> OpenApi {
    let table = Table::compile(
        &GatewayConfig::default(),
        &FeaturesConfig::default(),
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| unreachable!("the built-in routes compile: {e}"));
    let mut out = OpenApi::default();
    out.info.title = "Bazaar".into();
    out.info.version = env!("CARGO_PKG_VERSION").into();
    out.info.description = Some(
        "The public API, through the gateway. Errors are application/problem+json (RFC 9457)."
            .into(),
    );
    let mut components = Components::new();
    components.security_schemes.insert(
        "bearer".into(),
        utoipa::openapi::RefOr::T(SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .bearer_format("JWT")
                .build(),
        )),
    );
    for (service, spec) in services {
        for (path, item) in spec.paths.paths {
            let sample = concrete(&path);
            for version in VERSIONS {
                let mut public = item.clone();
                let mut any = false;
                for (method, op) in operations(&mut public) {
                    let routed = table
                        .find(&method, version, &sample)
                        .is_some_and(|r| r.service == service);
                    if routed {
                        any |= op.is_some();
                        // Operation ids must be unique in the document:
                        // services name their handlers alike (`fetch`).
                        if let Some(o) = op.as_mut() {
                            let id = o.operation_id.take().unwrap_or_else(|| method.to_string());
                            o.operation_id = Some(if version == "v1" {
                                format!("{service}_{id}")
                            } else {
                                format!("{service}_{id}_{version}")
                            });
                        }
                    } else {
                        *op = None;
                    }
                }
                if any {
                    out.paths
                        .paths
                        .insert(format!("/api/{version}{path}"), public);
                }
            }
        }
        if let Some(c) = spec.components {
            components.schemas.extend(c.schemas);
        }
    }
    out.components = Some(components);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_published_where_the_route_table_sends_them() {
        let mut spec = OpenApi::default();
        let mut item = PathItem::default();
        item.get = Some(Operation::default());
        item.delete = Some(Operation::default());
        spec.paths
            .paths
            .insert("/products/{id}".into(), item.clone());
        spec.paths.paths.insert("/internal".into(), item);
        let out = public(vec![("catalog", spec.clone()), ("orders", spec)]);
        let paths: Vec<&String> = out.paths.paths.keys().collect();
        assert_eq!(
            paths,
            ["/api/v1/products/{id}"],
            "orders does not own /products"
        );
        let p = &out.paths.paths["/api/v1/products/{id}"];
        assert!(p.get.is_some() && p.delete.is_some());
        assert_eq!(
            p.get.as_ref().and_then(|o| o.operation_id.as_deref()),
            Some("catalog_GET"),
            "ids are made unique per service"
        );
        assert!(
            out.components
                .unwrap()
                .security_schemes
                .contains_key("bearer")
        );
    }
}
