//! `user.UserService` over gRPC with a stock tonic client built from the
//! proto in `contracts`: every call with and without a valid token,
//! straight to the users service and through the gateway (h2c), with
//! health and reflection.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bazaar_contracts::grpc::user::user_service_client::UserServiceClient;
use bazaar_contracts::grpc::user::{
    CreateUserRequest, DeleteUserRequest, GetUserRequest, UpdateUserRequest,
};
use common::*;
use reqwest::StatusCode;
use tonic::Code;
use tonic::transport::Channel;

fn with_token<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

async fn channel(url: &str) -> Channel {
    Channel::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// The services reflection lists at `url`.
async fn reflected_services(url: &str) -> Vec<String> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut client = ServerReflectionClient::new(channel(url).await);
    let ask = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = client
        .server_reflection_info(futures::stream::iter([ask]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.message().await.unwrap().unwrap();
    match answer.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection answer: {other:?}"),
    }
}

/// Get, Create, Update and Delete at `url` (users itself, or the
/// gateway), with and without a valid token.
async fn exercise(url: &str, api: &Api) {
    let admin = api.login(ADMIN_EMAIL, ADMIN_PASSWORD).await;
    let email = format!("grpc-{}@x.io", unique());
    let (token, id) = api.register_and_login(&email).await;
    let (other, other_id) = api
        .register_and_login(&format!("grpc-other-{}@x.io", unique()))
        .await;
    eventually(api, "/users/me", &token, |_| true).await;
    eventually(api, "/users/me", &other, |_| true).await;
    let mut client = UserServiceClient::new(channel(url).await);

    // No token, on every method; a bad token.
    let e = client
        .get_user(GetUserRequest { id: id.clone() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = client
        .create_user(CreateUserRequest {
            name: "Nobody".into(),
            email: format!("nobody-{}@x.io", unique()),
            password: "no-token-here".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = client
        .update_user(UpdateUserRequest {
            id: id.clone(),
            name: Some("Hijacked".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = client
        .delete_user(DeleteUserRequest { id: id.clone() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = client
        .get_user(with_token(GetUserRequest { id: id.clone() }, "not-a-token"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");

    // Get: self, someone else (not revealed), a malformed id.
    let me = client
        .get_user(with_token(GetUserRequest { id: id.clone() }, &token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(me.email, email);
    assert_eq!(me.name, "Shopper");
    let e = client
        .get_user(with_token(
            GetUserRequest {
                id: other_id.clone(),
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = client
        .get_user(with_token(
            GetUserRequest {
                id: "../health".into(),
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // Create: admin only; the account is real.
    let new_email = format!("grpc-made-{}@x.io", unique());
    let create = || CreateUserRequest {
        name: "Made By Grpc".into(),
        email: new_email.clone(),
        password: "grpc-password".into(),
        phone: "+44 20 7946 0000".into(),
        address: String::new(),
    };
    let e = client
        .create_user(with_token(create(), &token))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let made = client
        .create_user(with_token(create(), &admin))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(made.email, new_email);
    assert_eq!(made.phone, "+44 20 7946 0000");
    let made_token = api.login(&new_email, "grpc-password").await;
    let again = client
        .get_user(with_token(
            GetUserRequest {
                id: made.id.clone(),
            },
            &made_token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.name, "Made By Grpc");
    let e = client
        .create_user(with_token(create(), &admin))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    let e = client
        .create_user(with_token(
            CreateUserRequest {
                email: format!("short-{}@x.io", unique()),
                password: "short".into(),
                ..create()
            },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // Update: self; bad values; someone else's.
    let changed = client
        .update_user(with_token(
            UpdateUserRequest {
                id: id.clone(),
                name: Some("Grpc Renamed".into()),
                phone: None,
                address: Some("2 Wharf Rd".into()),
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(changed.name, "Grpc Renamed");
    assert_eq!(changed.address, "2 Wharf Rd");
    let (_, rest) = api.call("GET", "/users/me", Some(&token), None).await;
    assert_eq!(rest["name"], "Grpc Renamed");
    let e = client
        .update_user(with_token(
            UpdateUserRequest {
                id: id.clone(),
                phone: Some("not a phone".into()),
                ..Default::default()
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = client
        .update_user(with_token(
            UpdateUserRequest {
                id: other_id.clone(),
                name: Some("x".into()),
                ..Default::default()
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // Delete: the made account, by itself; then it cannot log in.
    let gone = client
        .delete_user(with_token(
            DeleteUserRequest {
                id: made.id.clone(),
            },
            &made_token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(gone.success);
    let e = client
        .get_user(with_token(
            GetUserRequest {
                id: made.id.clone(),
            },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    wait_account_gone(api, &new_email, "grpc-password").await;

    // Health and reflection.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel(url).await);
    let serving = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "user.UserService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(serving.status, 1, "SERVING");
    let services = reflected_services(url).await;
    assert!(
        services.iter().any(|s| s == "user.UserService"),
        "{services:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_service_over_grpc_directly() {
    let (system, _dir) = embedded().await;
    wait_ready(&system.gateway_url).await;
    let users = address_of(&system, "users").await;
    exercise(&users, &Api::new(&system.gateway_url)).await;
    system.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_service_over_grpc_through_the_gateway() {
    let (system, _dir) = embedded().await;
    wait_ready(&system.gateway_url).await;
    exercise(&system.gateway_url, &Api::new(&system.gateway_url)).await;
    // The gateway counts gRPC calls as such, and its calls to users.
    let metrics = metrics(&system.gateway_url).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("http_requests_total{") && l.contains("route=\"grpc\"")),
        "{metrics}"
    );
    assert!(
        metrics.lines().any(|l| l.starts_with("mesh_calls_total{")
            && l.contains("target=\"users\"")
            && l.contains("outcome=\"ok\"")),
        "{metrics}"
    );
    system.stop().await.unwrap();
}

/// A gateway whose users instance is gone or hangs answers with gRPC
/// statuses: UNAVAILABLE, and DEADLINE_EXCEEDED once the call's
/// `grpc-timeout` is up; a call without a token never leaves the edge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_answers_grpc_failures_with_grpc_statuses() {
    let (system, dir) = embedded().await;
    wait_ready(&system.gateway_url).await;
    let api = Api::new(&system.gateway_url);
    let (token, id) = api
        .register_and_login(&format!("grpc-edge-{}@x.io", unique()))
        .await;
    let auth = address_of(&system, "auth").await;
    // Accepts connections and never answers.
    let hang = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hang_addr = hang.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((tcp, _)) = hang.accept().await {
            open.push(tcp);
        }
    });
    let dead = free_port();
    let gateway = |users: String| {
        let mut config = test_config(dir.join(format!("gw-{}", unique())));
        config.registry = "static".into();
        config.port = free_port();
        config.services = [
            ("auth".to_owned(), auth.clone()),
            ("users".to_owned(), users),
        ]
        .into();
        bazaar::serve(config, "gateway")
    };

    let down = gateway(format!("http://127.0.0.1:{dead}")).await.unwrap();
    wait_ok(&format!("{}/health", down.gateway_url)).await;
    let mut client = UserServiceClient::new(channel(&down.gateway_url).await);
    let e = client
        .get_user(GetUserRequest { id: id.clone() })
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::Unauthenticated,
        "checked at the edge: {e:?}"
    );
    let e = client
        .get_user(with_token(GetUserRequest { id: id.clone() }, &token))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(!e.message().contains("127.0.0.1"), "{e:?}");
    down.stop().await.unwrap();

    let slow = gateway(format!("http://{hang_addr}")).await.unwrap();
    wait_ok(&format!("{}/health", slow.gateway_url)).await;
    // Sent by hand: a stock client gives up at its own deadline, and the
    // point is what the gateway answers at that moment.
    let message = prost::Message::encode_to_vec(&GetUserRequest { id: id.clone() });
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(&message);
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let res = h2
        .post(format!("{}/user.UserService/GetUser", slow.gateway_url))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "300m")
        .bearer_auth(&token)
        .body(frame)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["grpc-status"], "4", "DEADLINE_EXCEEDED");
    slow.stop().await.unwrap();
    held.abort();
    system.stop().await.unwrap();
}

/// REST over HTTP/2 through the gateway: with prior knowledge, and by
/// HTTP/1.1 upgrade as stock curl does it (`curl --http2`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_speaks_http2_by_prior_knowledge_and_by_upgrade() {
    let (system, _dir) = embedded().await;
    let gw = system.gateway_url.clone();
    wait_ready(&gw).await;
    let url = format!("{gw}/api/v1/products?limit=2");
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let res = h2.get(&url).send().await.unwrap();
    assert_eq!(res.version(), reqwest::Version::HTTP_2);
    assert_eq!(res.status(), StatusCode::OK);
    let page: serde_json::Value = res.json().await.unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 2);

    let curl = std::process::Command::new("curl")
        .args([
            "-s",
            "--http2",
            "-w",
            "\n%{http_version} %{http_code}",
            &url,
        ])
        .output();
    let out = match curl {
        Ok(out) => String::from_utf8_lossy(&out.stdout).into_owned(),
        Err(e) => {
            assert!(std::env::var("CI").as_deref() != Ok("true"), "curl: {e}");
            eprintln!("skipping the upgrade half: no curl ({e})");
            return;
        }
    };
    let (body, tail) = out.rsplit_once('\n').unwrap();
    assert_eq!(tail, "2 200", "upgraded to HTTP/2 and answered");
    let page: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
    system.stop().await.unwrap();
}
