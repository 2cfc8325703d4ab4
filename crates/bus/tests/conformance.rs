//! One conformance suite, run against every backend: the in-memory bus
//! always, RabbitMQ when `BAZAAR_TEST_AMQP_URL` is set (required with `CI=true`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bazaar_bus::{Bus, Envelope, QueueSpec};
use futures::StreamExt;

const WAIT: Duration = Duration::from_secs(5);

/// A queue the broker deletes a minute after the run stops using it.
fn test_queue(prefix: &str) -> QueueSpec {
    QueueSpec::new(unique(prefix)).expires_after(Duration::from_secs(60))
}

fn unique(prefix: &str) -> String {
    format!("{prefix}.{}", uuid_like())
}

fn uuid_like() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{nanos:x}{:x}", std::process::id())
}

async fn amqp() -> Option<Bus> {
    match std::env::var("BAZAAR_TEST_AMQP_URL") {
        Ok(url) => Some(
            Bus::connect(&url)
                .await
                .expect("BAZAAR_TEST_AMQP_URL is set but RabbitMQ is unreachable"),
        ),
        Err(_) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true requires BAZAAR_TEST_AMQP_URL"
            );
            eprintln!("skipping the amqp conformance run: BAZAAR_TEST_AMQP_URL is not set");
            None
        }
    }
}

async fn next_payload(d: &mut bazaar_bus::Deliveries) -> (String, bazaar_bus::Delivery) {
    let delivery = tokio::time::timeout(WAIT, d.next())
        .await
        .expect("no delivery in time")
        .expect("stream ended");
    let text: String = delivery.envelope().unwrap().payload().unwrap();
    (text, delivery)
}

async fn nothing_more(d: &mut bazaar_bus::Deliveries) {
    let more = tokio::time::timeout(Duration::from_millis(300), d.next()).await;
    assert!(more.is_err(), "unexpected extra delivery");
}

async fn topic_bindings(bus: &Bus) {
    let ex = unique("ex");
    let one = test_queue("q.one").bind(&ex, "user.*");
    let all = test_queue("q.all").bind(&ex, "user.#");
    let mut one_d = bus.subscribe(&one, 10).await.unwrap();
    let mut all_d = bus.subscribe(&all, 10).await.unwrap();
    bus.publish(&ex, "user.registered", &Envelope::new("t", &"a").unwrap())
        .await
        .unwrap();
    bus.publish(
        &ex,
        "user.profile.updated",
        &Envelope::new("t", &"b").unwrap(),
    )
    .await
    .unwrap();
    bus.publish(&ex, "order.created", &Envelope::new("t", &"c").unwrap())
        .await
        .unwrap();

    let (p, d) = next_payload(&mut one_d).await;
    assert_eq!(p, "a");
    d.ack().await.unwrap();
    nothing_more(&mut one_d).await;

    let mut got = Vec::new();
    for _ in 0..2 {
        let (p, d) = next_payload(&mut all_d).await;
        got.push(p);
        d.ack().await.unwrap();
    }
    got.sort();
    assert_eq!(got, ["a", "b"]);
    nothing_more(&mut all_d).await;
}

async fn durable_queue_keeps_messages_until_consumed(bus: &Bus) {
    let ex = unique("ex");
    let spec = test_queue("q.durable").bind(&ex, "k");
    bus.transport().declare_queue(&spec).await.unwrap();
    for i in 0..3 {
        bus.publish(&ex, "k", &Envelope::new("t", &format!("m{i}")).unwrap())
            .await
            .unwrap();
    }
    let mut d = bus.subscribe(&spec, 10).await.unwrap();
    for i in 0..3 {
        let (p, delivery) = next_payload(&mut d).await;
        assert_eq!(p, format!("m{i}"));
        delivery.ack().await.unwrap();
    }
    nothing_more(&mut d).await;
}

async fn nack_requeues_or_drops(bus: &Bus) {
    let ex = unique("ex");
    let spec = test_queue("q.nack").bind(&ex, "k");
    let mut d = bus.subscribe(&spec, 10).await.unwrap();
    bus.publish(&ex, "k", &Envelope::new("t", &"x").unwrap())
        .await
        .unwrap();

    let (p, first) = next_payload(&mut d).await;
    assert_eq!(p, "x");
    assert!(!first.redelivered);
    first.nack(true).await.unwrap();

    let (p, again) = next_payload(&mut d).await;
    assert_eq!(p, "x");
    assert!(
        again.redelivered,
        "a requeued message is marked redelivered"
    );
    again.nack(false).await.unwrap();
    nothing_more(&mut d).await;
}

async fn dropped_delivery_is_redelivered(bus: &Bus) {
    let ex = unique("ex");
    let spec = test_queue("q.drop").bind(&ex, "k");
    let mut d = bus.subscribe(&spec, 10).await.unwrap();
    bus.publish(&ex, "k", &Envelope::new("t", &"y").unwrap())
        .await
        .unwrap();
    let (_, first) = next_payload(&mut d).await;
    drop(first); // a consumer that died before acking
    let (p, again) = next_payload(&mut d).await;
    assert_eq!(p, "y");
    assert!(again.redelivered);
    again.ack().await.unwrap();
}

async fn request_reply_matches_every_caller(bus: &Bus) {
    let ex = unique("cmd");
    let spec = test_queue("q.echo").bind(&ex, "echo");
    let mut requests = bus.subscribe(&spec, 64).await.unwrap();
    let responder = bus.clone();
    tokio::spawn(async move {
        while let Some(d) = requests.next().await {
            let env = d.envelope().unwrap();
            let n: u32 = env.payload().unwrap();
            let reply = env.caused("echo.reply", &(n * 10)).unwrap();
            responder.reply(&d, &reply).await.unwrap();
            d.ack().await.unwrap();
        }
    });
    let calls = (0..200u32).map(|n| {
        let bus = bus.clone();
        let ex = ex.clone();
        async move {
            let reply = bus
                .request(&ex, "echo", &Envelope::new("echo", &n).unwrap(), WAIT)
                .await
                .unwrap();
            (n, reply.payload::<u32>().unwrap())
        }
    });
    for (n, answer) in futures::future::join_all(calls).await {
        assert_eq!(answer, n * 10, "request {n} got someone else's reply");
    }
}

async fn request_without_responder_times_out(bus: &Bus) {
    let ex = unique("cmd");
    let spec = test_queue("q.silent").bind(&ex, "silent");
    bus.transport().declare_queue(&spec).await.unwrap();
    let r = bus
        .request(
            &ex,
            "silent",
            &Envelope::new("x", &1).unwrap(),
            Duration::from_millis(200),
        )
        .await;
    assert!(matches!(r, Err(bazaar_bus::BusError::Timeout(_))), "{r:?}");
}

async fn suite(bus: Bus) {
    topic_bindings(&bus).await;
    durable_queue_keeps_messages_until_consumed(&bus).await;
    nack_requeues_or_drops(&bus).await;
    dropped_delivery_is_redelivered(&bus).await;
    request_reply_matches_every_caller(&bus).await;
    request_without_responder_times_out(&bus).await;
}

#[tokio::test]
async fn memory_backend_conforms() {
    suite(Bus::memory()).await;
}

#[tokio::test]
async fn amqp_backend_conforms() {
    if let Some(bus) = amqp().await {
        assert!(bus.is_connected());
        suite(bus).await;
    }
}
