//! The outbox and inbox conformance suite, run on the in-memory bus with
//! SQLite and on RabbitMQ with PostgreSQL (when `BAZAAR_TEST_AMQP_URL` and
//! `BAZAAR_TEST_DATABASE_URL` are set; required with `CI=true`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bazaar_bus::{BatchHandler, Bus, Consumer, Envelope, Failure, QueueSpec, Received};
use bazaar_chassis::db::{self, Db};
use bazaar_chassis::messaging::{self, Effects, Inbox, Outbox, retry};
use bazaar_chassis::{Config, Shutdown};
use futures::StreamExt;
use sqlx::{AnyConnection, Row};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("tests/migrations");

fn unique() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

/// Records each message's payload in `effects`; `"poison"` is rejected.
struct Record;

#[async_trait]
impl Effects for Record {
    async fn apply(&self, tx: &mut AnyConnection, msg: &Received) -> Result<(), Failure> {
        let text: String = msg
            .envelope
            .payload()
            .map_err(|e| Failure::Reject(e.to_string()))?;
        if text == "poison" {
            return Err(Failure::Reject("poison".into()));
        }
        insert_effect(tx, text).await
    }
}

async fn insert_effect(tx: &mut AnyConnection, payload: String) -> Result<(), Failure> {
    sqlx::query("INSERT INTO effects (id, payload) VALUES ($1, $2)")
        .bind(uuid::Uuid::now_v7().to_string())
        .bind(payload)
        .execute(tx)
        .await
        .map_err(retry)?;
    Ok(())
}

/// Applies a batch with one statement: one `effects` row, its payloads
/// joined by `+`. A batch with `"alone"` in it is left to `apply`, one
/// by one; `"bad"` is rejected, alone or in a batch.
struct Together;

#[async_trait]
impl Effects for Together {
    async fn apply(&self, tx: &mut AnyConnection, msg: &Received) -> Result<(), Failure> {
        let text: String = msg.envelope.payload().unwrap();
        if text.ends_with("bad") {
            return Err(Failure::Reject("bad".into()));
        }
        insert_effect(tx, text).await
    }

    async fn apply_many(
        &self,
        tx: &mut AnyConnection,
        msgs: &[&Received],
    ) -> Option<Result<(), Failure>> {
        let texts: Vec<String> = msgs.iter().map(|m| m.envelope.payload().unwrap()).collect();
        if texts.iter().any(|t| t.ends_with("alone")) {
            return None;
        }
        if texts.iter().any(|t| t.ends_with("bad")) {
            return Some(Err(Failure::Reject("bad".into())));
        }
        Some(insert_effect(tx, texts.join("+")).await)
    }
}

async fn count(db: &Db, sql: &str) -> i64 {
    sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(&db.read)
        .await
        .unwrap()
        .try_get(0)
        .unwrap()
}

async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn queue(prefix: &str) -> QueueSpec {
    QueueSpec::new(format!("{prefix}.{}", unique())).expires_after(Duration::from_secs(60))
}

/// A committed outbox row is published once the relay runs — even if it
/// was not running at commit time (a crash, a broker outage) — and then
/// removed; a rolled-back one never is.
async fn outbox_publishes_committed_rows_only(bus: &Bus, db: &Db) {
    let bus = &bus.instrumented("test");
    let ex = format!("ex.outbox.{}", unique());
    let spec = queue("q.outbox").bind(&ex, "#");
    let mut deliveries = bus.subscribe(&spec, 10).await.unwrap();

    let rolled_back = Envelope::new("t", &"never").unwrap();
    let mut tx = db.write.begin().await.unwrap();
    messaging::enqueue(&mut tx, &[(&ex, "a.b", &rolled_back)])
        .await
        .unwrap();
    tx.rollback().await.unwrap();

    let sent: Vec<Envelope> = (0..3)
        .map(|i| Envelope::new("t", &format!("m{i}")).unwrap())
        .collect();
    let mut tx = db.write.begin().await.unwrap();
    let rows: Vec<(&str, &str, &Envelope)> = sent.iter().map(|e| (ex.as_str(), "a.b", e)).collect();
    messaging::enqueue(&mut tx, &rows).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(count(db, "SELECT COUNT(*) FROM outbox").await, 3);

    let shutdown = Shutdown::default();
    let outbox = Outbox::spawn(db.clone(), bus.clone(), shutdown.clone());
    outbox.poke();
    let mut got = Vec::new();
    for _ in 0..3 {
        let d = tokio::time::timeout(Duration::from_secs(5), deliveries.next())
            .await
            .expect("outbox row not published")
            .unwrap();
        let env = d.envelope().unwrap();
        d.ack().await.unwrap();
        got.push(env.id);
    }
    got.sort();
    let mut want: Vec<String> = sent.iter().map(|e| e.id.clone()).collect();
    want.sort();
    assert_eq!(got, want);
    let more = tokio::time::timeout(Duration::from_millis(300), deliveries.next()).await;
    assert!(more.is_err(), "the rolled-back message was published");
    eventually("outbox emptied", async || {
        count(db, "SELECT COUNT(*) FROM outbox").await == 0
    })
    .await;
    let published = bus
        .metrics()
        .published
        .get_or_create(&bazaar_bus::metrics::KeyLabel {
            routing_key: "a.b".into(),
        })
        .clone();
    eventually("published counted", async || published.get() == 3).await;
    shutdown.trigger();
}

/// A command whose service has not declared its queue yet stays in the
/// outbox (nothing is lost, nothing else waits for it) and goes out once
/// the queue exists.
async fn outbox_keeps_a_command_until_its_queue_exists(bus: &Bus, db: &Db) {
    let key = format!("late.{}", unique());
    let ex = format!("ex.events.{}", unique());
    let mut events = bus
        .subscribe(&queue("q.events").bind(&ex, "#"), 10)
        .await
        .unwrap();
    let command = Envelope::new("t", &"command").unwrap();
    let event = Envelope::new("t", &"event").unwrap();
    let mut tx = db.write.begin().await.unwrap();
    messaging::enqueue(
        &mut tx,
        &[
            (bazaar_bus::COMMAND_EXCHANGE, key.as_str(), &command),
            (ex.as_str(), "e", &event),
        ],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();

    let shutdown = Shutdown::default();
    let outbox = Outbox::spawn(db.clone(), bus.clone(), shutdown.clone());
    outbox.poke();
    let d = tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .expect("the event waited for the command")
        .unwrap();
    assert_eq!(d.envelope().unwrap().id, event.id);
    d.ack().await.unwrap();
    // Several relay passes later the command is still kept.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let kept: Vec<String> = sqlx::query("SELECT routing_key FROM outbox")
        .fetch_all(&db.read)
        .await
        .unwrap()
        .iter()
        .map(|r| r.try_get("routing_key").unwrap())
        .collect();
    assert_eq!(kept, vec![key.clone()]);

    let spec = queue("q.late").bind(bazaar_bus::COMMAND_EXCHANGE, &key);
    let mut commands = bus.subscribe(&spec, 10).await.unwrap();
    let d = tokio::time::timeout(Duration::from_secs(5), commands.next())
        .await
        .expect("the kept command was not sent once its queue existed")
        .unwrap();
    assert_eq!(d.envelope().unwrap().id, command.id);
    d.ack().await.unwrap();
    eventually("outbox emptied", async || {
        count(db, "SELECT COUNT(*) FROM outbox").await == 0
    })
    .await;
    shutdown.trigger();
}

/// The inbox: a duplicate id has no second effect; a rejected message goes
/// to the dead-letter queue with nothing applied; a message whose effects
/// were committed but whose consumer died before the ack is redelivered
/// and applied once. The bus's instruments count it all.
async fn inbox_applies_each_message_once(bus: &Bus, db: &Db) {
    let bus = &bus.instrumented("test");
    let ex = format!("ex.inbox.{}", unique());
    let spec = queue("q.inbox").bind(&ex, "#");
    let shutdown = Shutdown::default();
    let outbox = Outbox::spawn(db.clone(), bus.clone(), shutdown.clone());
    let inbox = Inbox::new(db.clone(), outbox, Record, bus);

    // A consumer that dies after the commit, before the ack.
    let mut raw = bus.subscribe(&spec, 10).await.unwrap();
    let crash = Envelope::new("t", &"crash").unwrap();
    bus.publish(&ex, "k", &crash).await.unwrap();
    let d = tokio::time::timeout(Duration::from_secs(5), raw.next())
        .await
        .unwrap()
        .unwrap();
    let received = Received {
        envelope: d.envelope().unwrap(),
        correlation_id: None,
        reply_to: None,
        headers: d.headers.clone(),
        attempt: 1,
    };
    assert_eq!(inbox.handle(&[received]).await, vec![Ok(())]);
    drop(d);
    drop(raw);

    // The real consumer takes over: the redelivery, a duplicate, and poison.
    let stop = shutdown.clone();
    let run = Consumer::new(bus.clone(), spec.clone())
        .start(Arc::clone(&inbox), async move { stop.wait().await })
        .await
        .unwrap();
    let run = tokio::spawn(run);
    let twice = Envelope::new("t", &"twice").unwrap();
    bus.publish(&ex, "k", &twice).await.unwrap();
    bus.publish(&ex, "k", &twice).await.unwrap();
    bus.publish(&ex, "k", &Envelope::new("t", &"poison").unwrap())
        .await
        .unwrap();
    let after = Envelope::new("t", &"after").unwrap();
    bus.publish(&ex, "k", &after).await.unwrap();

    eventually("the last message applied", async || {
        count(db, "SELECT COUNT(*) FROM effects WHERE payload = 'after'").await == 1
    })
    .await;
    eventually("poison dead-lettered", async || {
        bus.dead_letters(&spec.name).await.unwrap().len() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    for (payload, n) in [("crash", 1), ("twice", 1), ("poison", 0), ("after", 1)] {
        let got = count(
            db,
            &format!("SELECT COUNT(*) FROM effects WHERE payload = '{payload}'"),
        )
        .await;
        assert_eq!(got, n, "effects of {payload}");
    }
    let letters = bus.dead_letters(&spec.name).await.unwrap();
    assert!(letters[0].reason.as_deref().unwrap().contains("poison"));
    // The crash's redelivery and the second "twice" were dropped; the
    // consumer settled four (those two, "twice" and "after") and
    // dead-lettered one.
    let m = bus.metrics();
    let q = bazaar_bus::metrics::QueueLabel {
        queue: spec.name.clone(),
    };
    assert_eq!(m.inbox_duplicates.get(), 2);
    assert_eq!(m.consumed.get_or_create(&q).get(), 4);
    assert_eq!(m.dead_lettered.get_or_create(&q).get(), 1);
    assert_eq!(m.retried.get_or_create(&q).get(), 0);
    shutdown.trigger();
    run.await.unwrap();
}

/// What a transaction enqueued in an `Outbox::committing` block goes out
/// as soon as it commits, and its row is deleted once confirmed; a row
/// nobody sent (a crash right after the commit) is left to the relay,
/// which takes it once it is `FALLBACK_AFTER` old; a rolled-back block
/// sends nothing.
async fn outbox_sends_at_commit_and_relays_what_was_left(bus: &Bus, db: &Db) {
    let bus = &bus.instrumented("test");
    let ex = format!("ex.direct.{}", unique());
    let mut deliveries = bus
        .subscribe(&queue("q.direct").bind(&ex, "#"), 10)
        .await
        .unwrap();
    let shutdown = Shutdown::default();
    let outbox = Outbox::spawn(db.clone(), bus.clone(), shutdown.clone());
    // The relay's first pass (everything left behind) is over.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(count(db, "SELECT COUNT(*) FROM outbox").await, 0);
    let commit = async |payload: &str, fail: bool| {
        let env = Envelope::new("t", &payload).unwrap();
        let result = outbox
            .committing(async {
                let mut tx = db.write.begin().await?;
                messaging::enqueue(&mut tx, &[(&ex, "a.b", &env)]).await?;
                if fail {
                    return Err(sqlx::Error::RowNotFound);
                }
                tx.commit().await
            })
            .await;
        assert_eq!(result.is_ok(), !fail);
        env.id
    };
    let next = async |deliveries: &mut bazaar_bus::Deliveries, within: Duration| {
        let d = tokio::time::timeout(within, deliveries.next())
            .await
            .ok()??;
        let env = d.envelope().unwrap();
        d.ack().await.unwrap();
        Some(env.id)
    };

    let _ = commit("rolled back", true).await;
    let started = tokio::time::Instant::now();
    let sent = commit("at once", false).await;
    let got = next(&mut deliveries, Duration::from_secs(5)).await;
    assert_eq!(got.as_deref(), Some(sent.as_str()));
    assert!(
        started.elapsed() < messaging::FALLBACK_AFTER,
        "published by the relay, not at commit: {:?}",
        started.elapsed()
    );
    eventually("the sent row deleted", async || {
        count(db, "SELECT COUNT(*) FROM outbox").await == 0
    })
    .await;

    // Committed, but not sent: the relay leaves it while it is young.
    let left = Envelope::new("t", &"left").unwrap();
    let mut tx = db.write.begin().await.unwrap();
    messaging::enqueue(&mut tx, &[(&ex, "a.b", &left)])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let written = tokio::time::Instant::now();
    let early = next(&mut deliveries, messaging::FALLBACK_AFTER / 2).await;
    assert_eq!(early, None, "the relay took a row being sent from memory");
    let got = next(&mut deliveries, Duration::from_secs(5)).await;
    assert_eq!(got.as_deref(), Some(left.id.as_str()));
    assert!(written.elapsed() >= messaging::FALLBACK_AFTER);
    eventually("the relayed row deleted", async || {
        count(db, "SELECT COUNT(*) FROM outbox").await == 0
    })
    .await;
    assert_eq!(
        next(&mut deliveries, Duration::from_millis(300)).await,
        None,
        "the rolled-back message (or a duplicate) was published"
    );
    shutdown.trigger();
}

/// The inbox hands a batch's fresh messages to `apply_many` together (a
/// duplicate left out), applies them one by one where it declines, and
/// takes a failed batch apart so that the bad message fails alone.
async fn inbox_applies_a_batch_together_where_the_effects_can(bus: &Bus, db: &Db) {
    let bus = &bus.instrumented("test");
    let shutdown = Shutdown::default();
    let outbox = Outbox::spawn(db.clone(), bus.clone(), shutdown.clone());
    let inbox = Inbox::new(db.clone(), outbox, Together, bus);
    let tag = unique();
    let msg = |text: &str| Received::first(Envelope::new("t", &format!("{tag}-{text}")).unwrap());
    let rows = async || -> Vec<String> {
        let mut rows: Vec<String> =
            sqlx::query("SELECT payload FROM effects WHERE payload LIKE $1")
                .bind(format!("{tag}%"))
                .fetch_all(&db.read)
                .await
                .unwrap()
                .iter()
                .map(|r| {
                    r.get::<String, _>("payload")
                        .replace(&format!("{tag}-"), "")
                })
                .collect();
        rows.sort();
        rows
    };
    let a = msg("a");
    let ok = vec![Ok(()); 3];
    assert_eq!(inbox.handle(&[a.clone(), msg("b"), a]).await, ok);
    assert_eq!(rows().await, ["a+b"]);
    assert_eq!(inbox.handle(&[msg("c"), msg("alone")]).await, ok[..2]);
    assert_eq!(rows().await, ["a+b", "alone", "c"]);
    let outcomes = inbox.handle(&[msg("d"), msg("bad")]).await;
    assert_eq!(outcomes[0], Ok(()));
    assert!(
        matches!(outcomes[1], Err(Failure::Reject(_))),
        "{outcomes:?}"
    );
    assert_eq!(rows().await, ["a+b", "alone", "c", "d"]);
    shutdown.trigger();
}

async fn suite(bus: Bus, db: Db) {
    inbox_applies_a_batch_together_where_the_effects_can(&bus, &db).await;
    outbox_publishes_committed_rows_only(&bus, &db).await;
    outbox_sends_at_commit_and_relays_what_was_left(&bus, &db).await;
    outbox_keeps_a_command_until_its_queue_exists(&bus, &db).await;
    inbox_applies_each_message_once(&bus, &db).await;
}

/// On PostgreSQL the relay vacuums its outbox itself once it moved some
/// thousands of rows: a queue table's dead rows would otherwise pile up
/// where autovacuum is off or late, and each pass's scan walk them all.
async fn the_relay_vacuums_its_outbox(bus: &Bus, db: &Db) {
    let ex = format!("ex.vacuum.{}", unique());
    let spec = queue("q.vacuum").bind(&ex, "#");
    let _deliveries = bus.subscribe(&spec, 10).await.unwrap();
    let vacuums = "SELECT vacuum_count FROM pg_stat_user_tables
                   WHERE relname = 'outbox' AND schemaname = current_schema()";
    let before = count(db, vacuums).await;
    let sent: Vec<Envelope> = (0..5_000)
        .map(|i| Envelope::new("t", &i).unwrap())
        .collect();
    let mut tx = db.write.begin().await.unwrap();
    for chunk in sent.chunks(1_000) {
        let rows: Vec<(&str, &str, &Envelope)> =
            chunk.iter().map(|e| (ex.as_str(), "a.b", e)).collect();
        messaging::enqueue(&mut tx, &rows).await.unwrap();
    }
    tx.commit().await.unwrap();
    let shutdown = Shutdown::default();
    Outbox::spawn(db.clone(), bus.clone(), shutdown.clone()).poke();
    eventually("outbox emptied", async || {
        count(db, "SELECT COUNT(*) FROM outbox").await == 0
    })
    .await;
    eventually("outbox vacuumed", async || {
        count(db, vacuums).await > before
    })
    .await;
    shutdown.trigger();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_bus_and_sqlite_conform() {
    let dir = std::env::temp_dir().join(format!("bazaar-messaging-{}", unique()));
    let config = Config {
        data_dir: dir.clone(),
        ..Config::default()
    };
    let db = db::connect(&config, "messaging", &MIGRATOR).await.unwrap();
    suite(Bus::memory(), db).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_and_postgres_conform() {
    let (Ok(amqp), Ok(url)) = (
        std::env::var("BAZAAR_TEST_AMQP_URL"),
        std::env::var("BAZAAR_TEST_DATABASE_URL"),
    ) else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true requires BAZAAR_TEST_AMQP_URL and BAZAAR_TEST_DATABASE_URL"
        );
        eprintln!("skipping: BAZAAR_TEST_AMQP_URL / BAZAAR_TEST_DATABASE_URL not set");
        return;
    };
    let prefix = format!("m{}_", unique());
    let config = Config {
        database_url: Some(url.clone()),
        database_schema_prefix: prefix.clone(),
        ..Config::default()
    };
    let db = db::connect(&config, "messaging", &MIGRATOR).await.unwrap();
    let bus = Bus::connect(&amqp).await.unwrap();
    suite(bus.clone(), db.clone()).await;
    the_relay_vacuums_its_outbox(&bus, &db).await;
    let pool = sqlx::AnyPool::connect(&url).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS \"{prefix}messaging\" CASCADE"
    )))
    .execute(&pool)
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_cannot_settle_does_not_keep_the_service_from_stopping() {
    let dir = std::env::temp_dir().join(format!("bazaar-stuck-{}", unique()));
    let config = Arc::new(Config {
        data_dir: dir.clone(),
        shutdown_grace_ms: 200,
        ..Config::default()
    });
    let db = db::connect(&config, "messaging", &MIGRATOR).await.unwrap();
    let ctx = bazaar_chassis::ServiceContext::new(
        "stuck",
        config,
        Bus::memory(),
        bazaar_mesh::Discovery::new(Arc::new(bazaar_mesh::MemoryRegistry::default())),
    );
    // A consumer whose batch never settles (as when its broker connection
    // is lost mid-batch).
    let stuck = tokio::spawn(std::future::pending::<()>());
    let listener = bazaar_chassis::http::bind("127.0.0.1", 0).await.unwrap();
    let shutdown = Shutdown::default();
    let signal = shutdown.clone();
    let served = tokio::spawn(async move {
        bazaar_chassis::http::serve_consuming(
            &ctx,
            &db,
            axum::Router::new(),
            listener,
            signal,
            vec![stuck],
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    shutdown.trigger();
    tokio::time::timeout(Duration::from_secs(3), served)
        .await
        .expect("the service kept waiting for a consumer that cannot settle")
        .unwrap()
        .unwrap();
    let _ = std::fs::remove_dir_all(dir);
}
