//! Load for `user.UserService/GetUser` (bench/grpc.sh): at a fixed rate
//! (open loop: calls go out on schedule whatever the answers do), or as
//! fast as `--concurrency` callers can go. Prints one line:
//! `calls=N errors=E seconds=S rate=R p50_ms=… p99_ms=…`.
//!
//! cargo run --release --example grpc_load -- URL TOKEN USER_ID RATE|max SECONDS [CONCURRENCY]

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bazaar_contracts::grpc::user::GetUserRequest;
use bazaar_contracts::grpc::user::user_service_client::UserServiceClient;
use tokio::sync::Mutex;
use tonic::transport::Channel;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    assert!(
        args.len() >= 5,
        "usage: grpc_load URL TOKEN USER_ID RATE|max SECONDS [CONCURRENCY]"
    );
    let (url, token, id) = (args[0].clone(), args[1].clone(), args[2].clone());
    let seconds: f64 = args[4].parse().expect("SECONDS");
    let concurrency: usize = args.get(5).map_or(32, |c| c.parse().expect("CONCURRENCY"));
    let channel = Channel::from_shared(url).unwrap().connect().await.unwrap();
    let client = UserServiceClient::new(channel);
    let auth: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    let call = move |mut client: UserServiceClient<Channel>| {
        let (auth, id) = (auth.clone(), id.clone());
        async move {
            let mut req = tonic::Request::new(GetUserRequest { id });
            req.metadata_mut().insert("authorization", auth);
            client.get_user(req).await.is_ok()
        }
    };
    let samples = Arc::new(Mutex::new(Vec::<(Duration, bool)>::new()));
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(seconds);
    if args[3] == "max" {
        let workers = (0..concurrency).map(|_| {
            let (client, samples, call) = (client.clone(), samples.clone(), call.clone());
            tokio::spawn(async move {
                let mut mine = Vec::new();
                while Instant::now() < until {
                    let t = Instant::now();
                    let ok = call(client.clone()).await;
                    mine.push((t.elapsed(), ok));
                }
                samples.lock().await.extend(mine);
            })
        });
        for w in workers.collect::<Vec<_>>() {
            w.await.unwrap();
        }
    } else {
        let rate: f64 = args[3].parse().expect("RATE");
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut calls = Vec::new();
        while Instant::now() < until {
            let due = tick.tick().await;
            let (client, samples, call) = (client.clone(), samples.clone(), call.clone());
            calls.push(tokio::spawn(async move {
                let ok = call(client).await;
                // From when it was due: a late start counts against it.
                samples.lock().await.push((due.into_std().elapsed(), ok));
            }));
        }
        for c in calls {
            c.await.unwrap();
        }
    }
    let took = started.elapsed().as_secs_f64();
    let samples = samples.lock().await;
    let mut ms: Vec<f64> = samples
        .iter()
        .filter(|(_, ok)| *ok)
        .map(|(d, _)| d.as_secs_f64() * 1000.0)
        .collect();
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| {
        ms.get(((ms.len() as f64 * q) as usize).min(ms.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    let errors = samples.iter().filter(|(_, ok)| !ok).count();
    println!(
        "calls={} errors={} seconds={:.1} rate={:.0} p50_ms={:.3} p99_ms={:.3}",
        samples.len(),
        errors,
        took,
        samples.len() as f64 / took,
        at(0.50),
        at(0.99)
    );
}
