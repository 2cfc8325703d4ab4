//! One conformance suite, run against every backend: the in-memory bus
//! always, RabbitMQ when `BAZAAR_TEST_AMQP_URL` is set (required with `CI=true`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bazaar_bus::{
    BatchHandler, Bus, Consumer, Envelope, Failure, Outgoing, QueueSpec, Received, RetryPolicy,
};
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

/// Messages larger than a frame (the AMQP transport asks for 16 KiB
/// frames) arrive whole, in order with small ones.
async fn messages_larger_than_a_frame_arrive_whole(bus: &Bus) {
    let ex = unique("ex");
    let spec = test_queue("q.large").bind(&ex, "k");
    bus.transport().declare_queue(&spec).await.unwrap();
    let large: String = (0..300_000u32)
        .map(|i| char::from(b'a' + u8::try_from(i % 26).unwrap()))
        .collect();
    for text in [large.as_str(), "small", &large[..16 * 1024]] {
        bus.publish(&ex, "k", &Envelope::new("t", &text).unwrap())
            .await
            .unwrap();
    }
    let mut d = bus.subscribe(&spec, 10).await.unwrap();
    for want in [large.as_str(), "small", &large[..16 * 1024]] {
        let (got, delivery) = next_payload(&mut d).await;
        assert_eq!(got.len(), want.len());
        assert!(got == want, "a message changed on its way");
        delivery.ack().await.unwrap();
    }
    nothing_more(&mut d).await;
}

async fn queue_stats_count_messages_and_consumers(bus: &Bus) {
    let missing = unique("q.missing");
    assert!(
        matches!(
            bus.queue_stats(&missing).await,
            Err(bazaar_bus::BusError::NoQueue(q)) if q == missing
        ),
        "a missing queue is NoQueue"
    );
    let ex = unique("ex");
    let spec = test_queue("q.stats").bind(&ex, "k");
    bus.transport().declare_queue(&spec).await.unwrap();
    let stats = bus.queue_stats(&spec.name).await.unwrap();
    assert_eq!((stats.messages, stats.consumers), (0, 0));
    for i in 0..3 {
        bus.publish(&ex, "k", &Envelope::new("t", &format!("m{i}")).unwrap())
            .await
            .unwrap();
    }
    // RabbitMQ counts a moment after the confirm.
    let mut stats = bus.queue_stats(&spec.name).await.unwrap();
    for _ in 0..50 {
        if stats.messages == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        stats = bus.queue_stats(&spec.name).await.unwrap();
    }
    assert_eq!((stats.messages, stats.consumers), (3, 0));
    let mut d = bus.subscribe(&spec, 10).await.unwrap();
    for _ in 0..3 {
        let (_, delivery) = next_payload(&mut d).await;
        delivery.ack().await.unwrap();
    }
    let stats = bus.queue_stats(&spec.name).await.unwrap();
    assert_eq!((stats.messages, stats.consumers), (0, 1));
    drop(d);
    let mut stats = bus.queue_stats(&spec.name).await.unwrap();
    for _ in 0..50 {
        if stats.consumers == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        stats = bus.queue_stats(&spec.name).await.unwrap();
    }
    assert_eq!(stats.consumers, 0, "a dropped consumer is gone");
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

/// A command no queue takes is refused, not dropped; an event may go unheard.
async fn unroutable_command_is_refused(bus: &Bus) {
    let key = unique("nobody.listens");
    let env = Envelope::new("x", &1).unwrap();
    let r = bus.publish(bazaar_bus::COMMAND_EXCHANGE, &key, &env).await;
    assert!(
        matches!(r, Err(bazaar_bus::BusError::Unroutable { .. })),
        "{r:?}"
    );
    bus.publish(&unique("events"), &key, &env).await.unwrap();
    // Once a queue is bound, the same command goes through.
    let spec = test_queue("q.late").bind(bazaar_bus::COMMAND_EXCHANGE, &key);
    bus.transport().declare_queue(&spec).await.unwrap();
    bus.publish(bazaar_bus::COMMAND_EXCHANGE, &key, &env)
        .await
        .unwrap();
}

/// A request sent before its service has a queue waits for the service
/// (until its timeout) instead of vanishing; with no service at all it
/// fails as unroutable.
async fn request_waits_for_a_starting_service(bus: &Bus) {
    let ex = unique("cmd");
    let r = bus
        .request(
            &ex,
            "late",
            &Envelope::new("x", &1).unwrap(),
            Duration::from_millis(300),
        )
        .await;
    assert!(
        matches!(r, Err(bazaar_bus::BusError::Unroutable { .. })),
        "{r:?}"
    );
    let responder = bus.clone();
    let spec = test_queue("q.late").bind(&ex, "late");
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let mut requests = responder.subscribe(&spec, 8).await.unwrap();
        let d = requests.next().await.unwrap();
        let reply = d.envelope().unwrap().caused("late.reply", &7).unwrap();
        responder.reply(&d, &reply).await.unwrap();
        d.ack().await.unwrap();
    });
    let reply = bus
        .request(&ex, "late", &Envelope::new("x", &1).unwrap(), WAIT)
        .await
        .unwrap();
    assert_eq!(reply.payload::<u32>().unwrap(), 7);
}

/// Fails each message as many times as its payload says (`"fail:N"`), or
/// rejects it (`"reject"`); records every attempt.
#[derive(Default)]
struct Flaky {
    attempts: Mutex<HashMap<String, Vec<u32>>>,
    done: Mutex<Vec<String>>,
}

#[async_trait]
impl BatchHandler for Flaky {
    async fn handle(&self, batch: &[Received]) -> Vec<Result<(), Failure>> {
        batch
            .iter()
            .map(|r| {
                let text: String = r.envelope.payload().unwrap();
                self.attempts
                    .lock()
                    .unwrap()
                    .entry(text.clone())
                    .or_default()
                    .push(r.attempt);
                if text == "reject" {
                    return Err(Failure::Reject("never valid".into()));
                }
                let fails: u32 = text.strip_prefix("fail:").map_or(0, |n| n.parse().unwrap());
                if r.attempt <= fails {
                    Err(Failure::Retry(format!("attempt {} failed", r.attempt)))
                } else {
                    self.done.lock().unwrap().push(text);
                    Ok(())
                }
            })
            .collect()
    }
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn retry_dead_letter_and_replay(bus: &Bus) {
    let ex = unique("ex.retry");
    let spec = test_queue("q.retry").bind(&ex, "job.#");
    let queue = spec.name.clone();
    let policy = RetryPolicy {
        max_attempts: 3,
        first_delay: Duration::from_millis(50),
        max_delay: Duration::from_millis(200),
    };
    let flaky = Arc::new(Flaky::default());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let run = Consumer::new(bus.clone(), spec)
        .with_policy(policy)
        .with_limits(16, 4, 2)
        .start(Arc::clone(&flaky), async move {
            let _ = stop_rx.await;
        })
        .await
        .unwrap();
    let run = tokio::spawn(run);

    let mut sent = HashMap::new();
    for text in ["ok", "fail:2", "fail:5", "reject"] {
        let mut env = Envelope::new("job", &text).unwrap();
        env.traceparent = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
        bus.publish(&ex, "job.run", &env).await.unwrap();
        sent.insert(text, env.id.clone());
    }
    // Not JSON at all: dead-lettered at once, never handed to the handler.
    bus.transport()
        .publish(
            &ex,
            "job.run",
            Outgoing {
                body: b"{not json".to_vec(),
                message_id: Some("garbage-1".into()),
                ..Outgoing::default()
            },
        )
        .await
        .unwrap();

    eventually("ok and fail:2 succeed", || {
        let done = flaky.done.lock().unwrap();
        done.contains(&"ok".to_owned()) && done.contains(&"fail:2".to_owned())
    })
    .await;
    eventually("three dead letters", || {
        flaky.attempts.lock().unwrap().get("fail:5").map(Vec::len) == Some(3)
    })
    .await;
    let attempts = flaky.attempts.lock().unwrap().clone();
    assert_eq!(attempts["ok"], vec![1]);
    assert_eq!(
        attempts["fail:2"],
        vec![1, 2, 3],
        "retried with the attempt counted"
    );
    assert_eq!(
        attempts["fail:5"],
        vec![1, 2, 3],
        "no more than max_attempts"
    );
    assert_eq!(
        attempts["reject"],
        vec![1],
        "a rejected message is not retried"
    );

    let mut letters = Vec::new();
    for _ in 0..100 {
        letters = bus.dead_letters(&queue).await.unwrap();
        if letters.len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(letters.len(), 3, "{letters:?}");
    let by_id = |id: &str| {
        letters
            .iter()
            .find(|l| l.id.as_deref() == Some(id))
            .unwrap()
    };
    let exhausted = by_id(&sent["fail:5"]);
    assert!(
        exhausted
            .reason
            .as_deref()
            .unwrap()
            .contains("failed 3 times")
    );
    assert_eq!(exhausted.queue, queue);
    assert_eq!(exhausted.routing_key.as_deref(), Some("job.run"));
    assert!(exhausted.dead_at.is_some());
    assert!(
        by_id(&sent["reject"])
            .reason
            .as_deref()
            .unwrap()
            .contains("never valid")
    );
    assert!(
        by_id("garbage-1")
            .reason
            .as_deref()
            .unwrap()
            .contains("unparseable")
    );
    assert_eq!(by_id("garbage-1").body, "{not json");
    // Listing leaves them in place.
    assert_eq!(bus.dead_letters(&queue).await.unwrap().len(), 3);

    // Replay one by id: it goes back with a fresh set of attempts (it fails
    // them all again, since it fails its first five), then back to the DLQ.
    let replayed = bus.replay(&queue, Some(&sent["fail:5"])).await.unwrap();
    assert_eq!(replayed, 1);
    eventually("replayed message handled again", || {
        flaky.attempts.lock().unwrap()["fail:5"].len() == 6
    })
    .await;
    assert_eq!(
        flaky.attempts.lock().unwrap()["fail:5"][3],
        1,
        "attempts restart at 1"
    );
    dead_letters_come_to(bus, &queue, 3).await;

    // Filters: by reason (case-insensitive), by time; listing and
    // replaying choose the same letters.
    let never = bazaar_bus::Redrive {
        reason: Some("NEVER VALID".into()),
        ..Default::default()
    };
    let chosen = bus.dead_letters_matching(&queue, &never).await.unwrap();
    assert_eq!(chosen.len(), 1);
    assert_eq!(chosen[0].id.as_deref(), Some(sent["reject"].as_str()));
    let later = bazaar_bus::Redrive {
        since: Some(time::OffsetDateTime::now_utc() + time::Duration::hours(1)),
        ..Default::default()
    };
    assert!(
        bus.dead_letters_matching(&queue, &later)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(bus.redrive(&queue, &later).await.unwrap(), 0);
    assert_eq!(bus.redrive(&queue, &never).await.unwrap(), 1);
    eventually("reject handled twice", || {
        flaky.attempts.lock().unwrap()["reject"].len() == 2
    })
    .await;
    dead_letters_come_to(bus, &queue, 3).await;

    // Replay all, at 10 a second: every dead letter goes back, none is
    // lost, and the three take at least 0.2 s.
    let started = std::time::Instant::now();
    let at_ten = bazaar_bus::Redrive {
        rate: Some(10.0),
        ..Default::default()
    };
    let replayed = bus.redrive(&queue, &at_ten).await.unwrap();
    assert_eq!(replayed, 3);
    assert!(
        started.elapsed() >= Duration::from_millis(190),
        "{:?}",
        started.elapsed()
    );
    eventually("reject handled three times", || {
        flaky.attempts.lock().unwrap()["reject"].len() == 3
    })
    .await;
    let _ = stop_tx.send(());
    run.await.unwrap();
}

/// Waits (5 s at most) until `queue` holds `n` dead letters.
async fn dead_letters_come_to(bus: &Bus, queue: &str, n: usize) {
    let mut count = 0;
    for _ in 0..100 {
        count = bus.dead_letters(queue).await.unwrap().len();
        if count == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(count, n, "dead letters of {queue}");
}

async fn headers_travel(bus: &Bus) {
    let ex = unique("ex.hdr");
    let spec = test_queue("q.hdr").bind(&ex, "#");
    let mut d = bus.subscribe(&spec, 10).await.unwrap();
    let mut env = Envelope::new("t", &"x").unwrap();
    env.traceparent = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
    env.request_id = Some("req-42".into());
    bus.publish(&ex, "a.b", &env).await.unwrap();
    let (_, delivery) = next_payload(&mut d).await;
    assert_eq!(
        delivery.headers.get("traceparent").map(String::as_str),
        env.traceparent.as_deref()
    );
    assert_eq!(
        delivery.headers.get("x-request-id").map(String::as_str),
        Some("req-42")
    );
    let back = delivery.envelope().unwrap();
    assert_eq!(back.request_id.as_deref(), Some("req-42"));
    delivery.ack().await.unwrap();
}

async fn delayed_publish_arrives_later(bus: &Bus) {
    let spec = test_queue("q.delay");
    let mut d = bus.subscribe(&spec, 10).await.unwrap();
    let started = std::time::Instant::now();
    let env = Envelope::new("t", &"later").unwrap();
    bus.transport()
        .publish_delayed(
            &spec.name,
            Outgoing::envelope(&env).unwrap(),
            Duration::from_millis(300),
        )
        .await
        .unwrap();
    let (text, delivery) = next_payload(&mut d).await;
    assert_eq!(text, "later");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
    delivery.ack().await.unwrap();
}

async fn suite(bus: Bus) {
    headers_travel(&bus).await;
    delayed_publish_arrives_later(&bus).await;
    retry_dead_letter_and_replay(&bus).await;
    topic_bindings(&bus).await;
    durable_queue_keeps_messages_until_consumed(&bus).await;
    messages_larger_than_a_frame_arrive_whole(&bus).await;
    queue_stats_count_messages_and_consumers(&bus).await;
    nack_requeues_or_drops(&bus).await;
    dropped_delivery_is_redelivered(&bus).await;
    request_reply_matches_every_caller(&bus).await;
    request_without_responder_times_out(&bus).await;
    unroutable_command_is_refused(&bus).await;
    request_waits_for_a_starting_service(&bus).await;
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
