//! `POST /act` (Seneca's mesh) on the embedded system: messages reach the
//! service whose registered pattern matches them most specifically, with
//! no port or service name in them; authorisation as for REST; hostile
//! input answered with a clear 4xx; a pattern another service holds, or
//! one that could tie with it, is refused at registration and shown in
//! `/_admin/services`.
#![allow(clippy::unwrap_used)]

mod common;

use bazaar_mesh::Instance;
use bazaar_mesh::actions::Action;
use common::{Api, embedded, unique, wait_ready};
use reqwest::StatusCode;
use serde_json::{Value, json};

async fn act(gateway: &str, token: Option<&str>, message: &Value) -> (StatusCode, Value) {
    let mut req = reqwest::Client::new()
        .post(format!("{gateway}/act"))
        .json(message);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let res = req.send().await.unwrap();
    let status = res.status();
    let body = res.json().await.unwrap_or(Value::Null);
    (status, body)
}

#[tokio::test]
async fn messages_go_to_the_most_specific_pattern_with_rest_authorisation() {
    let (system, _dir) = embedded().await;
    let gw = system.gateway_url.clone();
    wait_ready(&gw).await;
    let api = Api::new(&gw);

    let (s, page) = act(
        &gw,
        None,
        &json!({"role": "catalog", "cmd": "list", "limit": 2}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{page}");
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
    let id = page["items"][0]["id"].as_str().unwrap().to_owned();

    let (s, product) = act(
        &gw,
        None,
        &json!({"role": "catalog", "cmd": "get", "id": id}),
    )
    .await;
    assert_eq!(
        (s, product["id"].as_str()),
        (StatusCode::OK, Some(id.as_str()))
    );
    let (s, _) = act(
        &gw,
        None,
        &json!({"role": "catalog", "cmd": "get", "id": "0190c6a0-0000-7000-8000-000000000000"}),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "the service's own answer");

    let (s, stock) = act(
        &gw,
        None,
        &json!({"role": "inventory", "cmd": "stock", "product_id": id}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{stock}");
    assert_eq!(stock["product_id"], id.as_str());

    // The caller's orders: a token is needed, and only theirs come back.
    let (ann, _) = api
        .register_and_login(&format!("ann-{}@act.test", unique()))
        .await;
    let (bob, _) = api
        .register_and_login(&format!("bob-{}@act.test", unique()))
        .await;
    let (s, order) = api
        .call(
            "POST",
            "/products/buy",
            Some(&ann),
            Some(json!({"ids": [id]})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{order}");
    let orders = json!({"role": "orders", "cmd": "list"});
    assert_eq!(act(&gw, None, &orders).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(
        act(&gw, Some("not-a-token"), &orders).await.0,
        StatusCode::UNAUTHORIZED
    );
    let (s, mine) = act(&gw, Some(&ann), &orders).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(mine["items"][0]["id"], order["id"]);
    let (s, theirs) = act(&gw, Some(&bob), &orders).await;
    assert_eq!((s, &theirs["total"]), (StatusCode::OK, &json!(0)));

    // Hostile input: a clear 4xx each, never a 5xx.
    let http = reqwest::Client::new();
    let post = |body: &'static str, ct: &'static str| {
        http.post(format!("{gw}/act"))
            .header("content-type", ct)
            .body(body)
            .send()
    };
    assert_eq!(
        post("{not json", "application/json")
            .await
            .unwrap()
            .status(),
        400
    );
    assert_eq!(
        post("[1, 2]", "application/json").await.unwrap().status(),
        422
    );
    assert_eq!(post("{}", "text/plain").await.unwrap().status(), 415);
    let big = format!(
        "{{\"role\":\"catalog\",\"cmd\":\"list\",\"q\":\"{}\"}}",
        "x".repeat(100_000)
    );
    let s = http
        .post(format!("{gw}/act"))
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(s, 413);
    assert_eq!(
        act(&gw, None, &json!({"role": "nope"})).await.0,
        StatusCode::NOT_FOUND
    );
    for bad in [json!(".."), json!(""), json!({"a": 1})] {
        let (s, p) = act(
            &gw,
            None,
            &json!({"role": "catalog", "cmd": "get", "id": bad}),
        )
        .await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{p}");
    }
    let s = http.get(format!("{gw}/act")).send().await.unwrap().status();
    assert_eq!(s, 405);
    api.assert_no_5xx();
    system.shutdown.trigger();
}

#[tokio::test]
async fn a_taken_or_ambiguous_pattern_is_refused_and_shown() {
    let (system, _dir) = embedded().await;
    let gw = system.gateway_url.clone();
    wait_ready(&gw).await;
    // A rogue service claims catalog's pattern, one that would tie with
    // it, and one of its own; it answers at the catalog's address.
    let catalog = system.discovery.registry().list("catalog").await.unwrap();
    let rogue = Instance {
        name: "rogue".into(),
        id: "rogue-1".into(),
        address: catalog[0].address.clone(),
        version: "test".into(),
        patterns: vec![
            Action::new(
                json!({"role": "catalog", "cmd": "get", "id": "*"}),
                "GET",
                "/x/{id}",
            ),
            Action::new(
                json!({"role": "catalog", "cmd": "*", "id": "*"}),
                "GET",
                "/y/{id}",
            ),
            Action::new(json!({"role": "rogue", "cmd": "list"}), "GET", "/products"),
        ],
        ..Instance::default()
    };
    system.discovery.registry().register(rogue).await.unwrap();
    let listed = system.discovery.registry().list("rogue").await.unwrap();
    assert_eq!(listed[0].patterns.len(), 1);
    assert_eq!(listed[0].refused.len(), 2);

    let services: Value = reqwest::get(format!("{gw}/_admin/services"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let shown = services
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["caller"] == "gateway" && i["name"] == "rogue")
        .expect("the rogue instance is listed");
    let reasons: Vec<&str> = shown["refused"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons[0], "already registered by catalog");
    assert!(
        reasons[1].starts_with("ambiguous with catalog"),
        "{reasons:?}"
    );
    let catalog_view = services
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["caller"] == "gateway" && i["name"] == "catalog")
        .unwrap();
    assert_eq!(catalog_view["patterns"].as_array().unwrap().len(), 2);

    // Catalog still answers its pattern; the rogue answers its own.
    let (s, page) = act(
        &gw,
        None,
        &json!({"role": "catalog", "cmd": "list", "limit": 1}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let id = page["items"][0]["id"].as_str().unwrap().to_owned();
    let (s, p) = act(
        &gw,
        None,
        &json!({"role": "catalog", "cmd": "get", "id": id}),
    )
    .await;
    assert_eq!((s, p["id"].as_str()), (StatusCode::OK, Some(id.as_str())));
    let (s, _) = act(&gw, None, &json!({"role": "rogue", "cmd": "list"})).await;
    assert_eq!(s, StatusCode::OK);
    system.shutdown.trigger();
}

#[tokio::test]
async fn actions_have_a_rate_limit_of_their_own() {
    let (system, _dir) = common::embedded_with(|c| c.gateway.act_per_address_per_minute = 3).await;
    let gw = system.gateway_url.clone();
    wait_ready(&gw).await;
    let list = json!({"role": "catalog", "cmd": "list", "limit": 1});
    for _ in 0..3 {
        assert_eq!(act(&gw, None, &list).await.0, StatusCode::OK);
    }
    let res = reqwest::Client::new()
        .post(format!("{gw}/act"))
        .json(&list)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(res.headers().contains_key("retry-after"));
    // REST reads are not counted against it.
    assert_eq!(
        reqwest::get(format!("{gw}/api/v1/products?limit=1"))
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    system.shutdown.trigger();
}
