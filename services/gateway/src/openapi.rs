//! The public API contract: each service's OpenAPI paths as clients see
//! them, below `/api/<version>` wherever the built-in route table sends
//! that method and path to that service, plus the gateway's own
//! operations, merged into one document with the bearer scheme. The
//! gateway serves it at `/api/openapi.json`.
//!
//! v2 routes that reshape the price (`transform = "price_object"`) get
//! v2 schemas made from v1's: `price` becomes `{amount, currency}`.

use std::time::Duration;

use axum::http::Method;
use bazaar_chassis::config::{FeaturesConfig, GatewayConfig};
use serde_json::{Value, json};
use utoipa::openapi::path::{Operation, ParameterIn, PathItem};
use utoipa::openapi::response::{ResponseBuilder, Responses};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Components, Content, OpenApi, Ref, RefOr};

use crate::table::{Table, Transform};

/// The versions published.
const VERSIONS: [&str; 2] = ["v1", "v2"];

/// v1 schemas and their v2 counterparts under `price_object`.
const V2_SCHEMAS: [(&str, &str); 3] = [
    ("Product", "ProductV2"),
    ("ProductBody", "ProductBodyV2"),
    ("Page_Product", "Page_ProductV2"),
];

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

/// A problem+json response described as `description`.
fn problem(description: &str) -> RefOr<utoipa::openapi::Response> {
    RefOr::T(
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/problem+json",
                Content::new(Some(Ref::from_schema_name("Problem"))),
            )
            .build(),
    )
}

/// Adds each `(status, description)` not described yet.
fn add_answers(responses: &mut Responses, answers: &[(&str, &str)]) {
    for (status, description) in answers {
        responses
            .responses
            .entry((*status).into())
            .or_insert_with(|| problem(description));
    }
}

/// What the gateway itself may answer on any proxied route.
const EDGE_ANSWERS: [(&str, &str); 3] = [
    ("429", "Too many requests (the gateway's rate limit)"),
    ("503", "No healthy instance of the service"),
    ("504", "The service did not answer in time"),
];

/// What any operation may answer to a malformed request, whatever its
/// handler: the extractors' and the edge's refusals.
fn add_request_answers(op: &mut Operation) {
    let located = |at: ParameterIn| {
        op.parameters.iter().flatten().any(|p| match p {
            RefOr::T(p) => p.parameter_in == at,
            RefOr::Ref(_) => false,
        })
    };
    let (query, path) = (located(ParameterIn::Query), located(ParameterIn::Path));
    if op.request_body.is_some() {
        add_answers(
            &mut op.responses,
            &[
                ("400", "The body is not valid JSON"),
                ("413", "The body is too large"),
                ("415", "The body is not application/json"),
            ],
        );
    }
    if query {
        add_answers(
            &mut op.responses,
            &[("400", "The query string is malformed (e.g. a key twice)")],
        );
    }
    if path {
        add_answers(&mut op.responses, &[("422", "A path id is not a UUID")]);
    }
}

/// `op` as v2 shows it: its product schemas swapped for the v2 ones.
fn to_v2(op: &Operation) -> Operation {
    let mut text = serde_json::to_string(op).unwrap_or_default();
    for (v1, v2) in V2_SCHEMAS {
        text = text.replace(
            &format!("\"#/components/schemas/{v1}\""),
            &format!("\"#/components/schemas/{v2}\""),
        );
    }
    serde_json::from_str(&text).unwrap_or_else(|_| op.clone())
}

/// The v2 schemas, made from the v1 ones in `components`: `price` is a
/// `Price` object and `currency` goes inside it.
fn add_v2_schemas(components: &mut Components) {
    let schema = |name: &str| -> Option<Value> {
        components
            .schemas
            .get(name)
            .and_then(|s| serde_json::to_value(s).ok())
    };
    let price_object = |mut v: Value, price: &str| -> Value {
        if let Some(props) = v["properties"].as_object_mut() {
            props.remove("currency");
            props.insert(
                "price".into(),
                json!({ "$ref": format!("#/components/schemas/{price}") }),
            );
        }
        if let Some(required) = v["required"].as_array_mut() {
            required.retain(|r| r != "currency");
        }
        v.as_object_mut().map(|o| o.remove("examples"));
        v
    };
    let mut made = Vec::new();
    if let Some(p) = schema("Product") {
        made.push(("ProductV2", price_object(p, "Price")));
    }
    if let Some(p) = schema("ProductBody") {
        made.push(("ProductBodyV2", price_object(p, "PriceInput")));
    }
    if let Some(mut page) = schema("Page_Product") {
        page["properties"]["items"]["items"] = json!({ "$ref": "#/components/schemas/ProductV2" });
        made.push(("Page_ProductV2", page));
    }
    made.push((
        "Price",
        json!({
            "type": "object",
            "description": "An amount in minor units of a currency (API v2).",
            "required": ["amount", "currency"],
            "properties": {
                "amount": { "type": "integer", "format": "int64" },
                "currency": { "type": "string" }
            },
            "examples": [{ "amount": 1299, "currency": "EUR" }]
        }),
    ));
    made.push((
        "PriceInput",
        json!({
            "type": "object",
            "description": "A price as a v2 client writes it: `currency` defaults to the catalog's.",
            "required": ["amount"],
            "properties": {
                "amount": { "type": "integer", "format": "int64" },
                "currency": { "type": ["string", "null"] }
            }
        }),
    ));
    for (name, v) in made {
        if let Ok(s) = serde_json::from_value(v) {
            components.schemas.insert(name.into(), s);
        }
    }
}

/// Merges `services` (name, contract as the service serves it) and the
/// gateway's own operations into the public contract.
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
        "The public API, through the gateway. Errors are application/problem+json (RFC 9457). \
         API v2 differs from v1 in prices only: `{amount, currency}` objects."
            .into(),
    );
    let mut components = Components::new();
    components.security_schemes.insert(
        "bearer".into(),
        RefOr::T(SecurityScheme::Http(
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
                    let route = table
                        .find(&method, version, &sample)
                        .filter(|r| r.service == service);
                    let (Some(route), Some(o)) = (route, op.as_mut()) else {
                        *op = None;
                        continue;
                    };
                    any = true;
                    if route.transform == Some(Transform::PriceObject) {
                        *o = to_v2(o);
                    }
                    add_answers(&mut o.responses, &EDGE_ANSWERS);
                    add_request_answers(o);
                    // Operation ids must be unique in the document:
                    // services name their handlers alike (`fetch`).
                    let id = o.operation_id.take().unwrap_or_else(|| method.to_string());
                    o.operation_id = Some(if version == "v1" {
                        format!("{service}_{id}")
                    } else {
                        format!("{service}_{id}_{version}")
                    });
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
    let mut own = crate::own_openapi();
    for item in own.paths.paths.values_mut() {
        for (_, op) in operations(item) {
            if let Some(o) = op {
                add_request_answers(o);
                let id = o.operation_id.take().unwrap_or_default();
                o.operation_id = Some(format!("gateway_{id}"));
            }
        }
    }
    out.paths.paths.extend(own.paths.paths);
    if let Some(c) = own.components {
        components.schemas.extend(c.schemas);
    }
    add_v2_schemas(&mut components);
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
        let paths: Vec<&String> = out
            .paths
            .paths
            .keys()
            .filter(|p| p.contains("/products") || p.contains("/internal"))
            .collect();
        assert_eq!(
            paths,
            ["/api/v1/products/{id}", "/api/v2/products/{id}"],
            "orders does not own /products; /internal is not routed"
        );
        let p = &out.paths.paths["/api/v1/products/{id}"];
        assert!(p.get.is_some() && p.delete.is_some());
        assert_eq!(
            p.get.as_ref().and_then(|o| o.operation_id.as_deref()),
            Some("catalog_GET"),
            "ids are made unique per service"
        );
        let v2 = &out.paths.paths["/api/v2/products/{id}"];
        assert_eq!(
            v2.get.as_ref().and_then(|o| o.operation_id.as_deref()),
            Some("catalog_GET_v2")
        );
        assert!(
            out.paths.paths.contains_key("/api/v1/me/overview"),
            "the gateway's own operations are in"
        );
        assert!(
            out.components
                .unwrap()
                .security_schemes
                .contains_key("bearer")
        );
    }
}
