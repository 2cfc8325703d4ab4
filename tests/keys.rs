//! Rotating the signing keys through the gateway: a new key signs at once
//! while tokens of the old one keep working; retiring the old key is
//! refused while its tokens may live, forced it is not, and then its
//! tokens stop working everywhere within the JWKS refresh.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{ADMIN_EMAIL, ADMIN_PASSWORD, Api, embedded_with, unique, wait_ready};
use reqwest::StatusCode;
use serde_json::{Value, json};

fn kid(token: &str) -> String {
    let header = token.split('.').next().unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .unwrap();
    serde_json::from_slice::<Value>(&bytes).unwrap()["kid"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn keys_rotate_without_logging_anyone_out_and_retire_when_safe() {
    let (system, _dir) = embedded_with(|c| c.jwks_refresh_secs = 1).await;
    let gw = system.gateway_url.clone();
    wait_ready(&gw).await;
    let api = Api::new(&gw);
    let admin = api.login(ADMIN_EMAIL, ADMIN_PASSWORD).await;
    let (old_user, _) = api
        .register_and_login(&format!("k-{}@keys.test", unique()))
        .await;
    let old_kid = kid(&old_user);

    let (s, keys) = api.call("GET", "/auth/keys", Some(&admin), None).await;
    assert_eq!(s, StatusCode::OK, "{keys}");
    assert_eq!(keys.as_array().unwrap().len(), 1);
    assert_eq!(keys[0]["kid"], old_kid.as_str());
    assert_eq!(keys[0]["signing"], true);
    assert!(
        keys[0].get("private_der").is_none(),
        "no secret in the list"
    );

    assert_eq!(
        api.call("POST", "/auth/keys/rotate", None, None).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        api.call("POST", "/auth/keys/rotate", Some(&old_user), None)
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    let (s, rotated) = api
        .call("POST", "/auth/keys/rotate", Some(&admin), None)
        .await;
    assert_eq!(s, StatusCode::CREATED, "{rotated}");
    let new_kid = rotated["kid"].as_str().unwrap().to_owned();
    assert_ne!(new_kid, old_kid);

    // New tokens carry the new key; the old token still works.
    let (new_user, _) = api
        .register_and_login(&format!("n-{}@keys.test", unique()))
        .await;
    assert_eq!(kid(&new_user), new_kid);
    assert_eq!(
        api.call("GET", "/orders", Some(&old_user), None).await.0,
        StatusCode::OK
    );
    assert_eq!(
        api.call("GET", "/orders", Some(&new_user), None).await.0,
        StatusCode::OK
    );
    let (_, keys) = api.call("GET", "/auth/keys", Some(&admin), None).await;
    let signing: Vec<bool> = keys
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["signing"].as_bool().unwrap())
        .collect();
    assert_eq!(signing, [false, true]);

    // The old key's tokens may live another access-token lifetime.
    let (s, refused) = api
        .call("POST", "/auth/keys/retire", Some(&admin), None)
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{refused}");
    assert!(refused["detail"].as_str().unwrap().contains(&old_kid));
    let bad = api
        .http
        .post(format!("{}/auth/keys/retire", api.base))
        .bearer_auth(&admin)
        .header("content-type", "application/json")
        .body("{force")
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(bad, StatusCode::BAD_REQUEST);
    let (s, _) = api
        .call(
            "POST",
            "/auth/keys/retire",
            Some(&admin),
            Some(json!({"force": "yes"})),
        )
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let (s, retired) = api
        .call(
            "POST",
            "/auth/keys/retire",
            Some(&admin),
            Some(json!({"force": true})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{retired}");
    assert_eq!(retired["retired"], json!([old_kid]));

    // Within the refresh (1 s here), the old key's tokens stop working at
    // the gateway and at the services; the new key's keep working.
    let start = Instant::now();
    loop {
        let at_gateway = api.call("GET", "/orders", Some(&old_user), None).await.0;
        let at_auth = api.call("GET", "/auth/me", Some(&old_user), None).await.0;
        if at_gateway == StatusCode::UNAUTHORIZED && at_auth == StatusCode::UNAUTHORIZED {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the retired key still verifies"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        api.call("GET", "/orders", Some(&new_user), None).await.0,
        StatusCode::OK
    );
    api.assert_no_5xx();
    system.shutdown.trigger();
}
