//! Exactly-once effects over at-least-once delivery, in each service's own
//! database:
//!
//! - **Outbox.** A service never publishes from a handler. It writes the
//!   message into `outbox` in the same transaction as the state change
//!   ([`enqueue`]). Once that transaction commits, the rows it wrote are
//!   published at once from memory ([`Outbox::committing`], and every
//!   [`Inbox`] batch), with publisher confirms, and deleted in bulk
//!   moments after the broker confirmed them. The relay
//!   ([`Outbox::spawn`]) is the fallback: it publishes rows still there
//!   [`FALLBACK_AFTER`] after they were written (a crash between commit
//!   and confirm, a broker that was down, another replica's leftovers).
//!   Either way a row is deleted only once confirmed; a message may so go
//!   out twice, never not at all.
//! - **Inbox.** A consumer applies a message's effects and records its id in
//!   `inbox` in one transaction ([`Inbox`]); a redelivered id is acked
//!   without effect.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use bazaar_bus::{BatchHandler, Bus, BusError, Envelope, Failure, Outgoing, Received};
use sqlx::{AnyConnection, AssertSqlSafe, Row};
use tokio::sync::{Notify, Semaphore};
use tracing::Instrument;

use crate::Shutdown;
use crate::db::{Backend, Db};

/// The tables behind the outbox and inbox; created by [`crate::db::connect`].
pub(crate) const TABLES: &str = "
CREATE TABLE IF NOT EXISTS outbox (
    id          TEXT PRIMARY KEY,
    exchange    TEXT NOT NULL,
    routing_key TEXT NOT NULL,
    envelope    TEXT NOT NULL,
    created_at  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS inbox (
    message_id  TEXT PRIMARY KEY,
    received_at TEXT NOT NULL
);
";

/// Rows one relay pass publishes.
const RELAY_BATCH: usize = 256;
/// How often the relay looks for rows left behind.
const RELAY_POLL: Duration = Duration::from_millis(500);
/// How old a row must be before the relay takes it: a row younger than
/// this is still being published from memory, or is confirmed and about
/// to be deleted. (Taking it anyway only sends it twice.)
pub const FALLBACK_AFTER: Duration = Duration::from_secs(2);
/// Rows published from memory and not yet confirmed, at most; past it,
/// the relay sends the rest (a broker that is slow or down must not make
/// them pile up in memory).
const MAX_IN_FLIGHT: usize = 4096;
/// How long confirmed ids are gathered before one statement deletes them.
const DELETE_EVERY: Duration = Duration::from_millis(500);
/// Relay passes in flight at once on PostgreSQL.
const RELAY_PASSES: usize = 4;
/// How often the outbox's backlog is measured for `/metrics`.
const OUTBOX_SAMPLE: Duration = Duration::from_secs(5);
/// The outbox is a queue: each row is deleted moments after it was
/// written. On PostgreSQL every delete leaves a dead row version, and an
/// index entry at the front of the id order, which each pass's scan from
/// the oldest id walks until a vacuum removes them: with autovacuum off
/// (or slow to come round), 200 orders/s for 4 minutes left 225 000 in
/// orders' outbox (128 MB), that scan became most of PostgreSQL's work,
/// and a checkout took 400 ms. So the relay vacuums its outbox itself,
/// after this many rows…
const VACUUM_AFTER_ROWS: usize = 5_000;
/// …or this long after it last did, if it moved any row since.
const VACUUM_EVERY: Duration = Duration::from_secs(30);
/// How long handled message ids are remembered.
const INBOX_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

tokio::task_local! {
    /// The outbox rows of the transaction being written in an
    /// [`Outbox::committing`] block, to publish once it commits.
    static SENDING: std::cell::RefCell<Vec<OutboxRow>>;
    /// What is to happen once the transaction being written commits.
    static AFTER_COMMIT: std::cell::RefCell<Vec<Hook>>;
    /// The outbox rows an inbox batch's handlers enqueued, written
    /// together before the batch commits.
    static BATCH_ROWS: std::cell::RefCell<Vec<OutboxRow>>;
}

type Hook = Box<dyn FnOnce() + Send>;

/// Runs `hook` once the transaction of the message handler (or of the
/// [`committing`] block) it is called in has committed; never if that
/// rolls back. Metrics of what a transaction did are counted so, once.
/// Called outside both, it runs at once.
pub fn after_commit(hook: impl FnOnce() + Send + 'static) {
    let mut hook = Some(hook);
    let _ = AFTER_COMMIT.try_with(|hooks| {
        if let Some(h) = hook.take() {
            hooks.borrow_mut().push(Box::new(h));
        }
    });
    if let Some(h) = hook {
        h();
    }
}

/// Runs `work`, which writes and commits a transaction; if it succeeds,
/// the hooks it registered with [`after_commit`] run.
pub async fn committing<T, E>(
    work: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let (result, hooks) = AFTER_COMMIT
        .scope(std::cell::RefCell::new(Vec::new()), async {
            let result = work.await;
            (result, AFTER_COMMIT.with(std::cell::RefCell::take))
        })
        .await;
    if result.is_ok() {
        for hook in hooks {
            hook();
        }
    }
    result
}

/// An outbox row: id, exchange, routing key, envelope (JSON).
type OutboxRow = (String, String, String, String);

/// Puts messages in the outbox inside the caller's transaction. Inside a
/// message handler of an [`Inbox`] they are written with the rest of the
/// batch's, in one statement just before it commits. Inside an
/// [`Outbox::committing`] block, or an inbox batch, they are published
/// as soon as the transaction commits; elsewhere the caller pokes the
/// relay after the commit ([`Outbox::poke`]).
pub async fn enqueue(
    conn: &mut AnyConnection,
    messages: &[(&str, &str, &Envelope)],
) -> Result<(), sqlx::Error> {
    if messages.is_empty() {
        return Ok(());
    }
    // A message continues the trace of the span that causes it.
    let current = bazaar_mesh::trace::traceparent_of(&tracing::Span::current());
    let mut rows = Vec::with_capacity(messages.len());
    for (exchange, key, env) in messages {
        let body = match &current {
            Some(tp) if env.traceparent.as_ref() != Some(tp) => {
                let mut env = (*env).clone();
                env.traceparent = Some(tp.clone());
                serde_json::to_string(&env)
            }
            _ => serde_json::to_string(env),
        }
        .map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
        rows.push((
            env.id.clone(),
            (*exchange).to_owned(),
            (*key).to_owned(),
            body,
        ));
    }
    // In an inbox batch the rows wait for it (and none are left here).
    let _ = BATCH_ROWS.try_with(|batch| batch.borrow_mut().append(&mut rows));
    insert(conn, &rows).await?;
    let _ = SENDING.try_with(|sending| sending.borrow_mut().append(&mut rows));
    Ok(())
}

/// Enqueues one message caused by `cause` (same correlation and trace) on
/// `exchange`, with `kind` as its type and routing key: a handler's answer.
pub async fn send_caused(
    tx: &mut AnyConnection,
    cause: &Envelope,
    (exchange, kind): (&str, &str),
    payload: &impl serde::Serialize,
) -> Result<(), Failure> {
    let message = cause
        .caused(kind, payload)
        .map_err(|e| Failure::Reject(e.to_string()))?;
    enqueue(tx, &[(exchange, kind, &message)])
        .await
        .map_err(retry)
}

/// Writes outbox rows, a few hundred per statement.
async fn insert(conn: &mut AnyConnection, rows: &[OutboxRow]) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let now = crate::now();
    for chunk in rows.chunks(200) {
        let values: Vec<String> = (0..chunk.len())
            .map(|i| {
                let b = i * 5;
                format!(
                    "(${}, ${}, ${}, ${}, ${})",
                    b + 1,
                    b + 2,
                    b + 3,
                    b + 4,
                    b + 5
                )
            })
            .collect();
        let sql = format!(
            "INSERT INTO outbox (id, exchange, routing_key, envelope, created_at) VALUES {}",
            values.join(", ")
        );
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for (id, exchange, key, body) in chunk {
            query = query
                .bind(id.as_str())
                .bind(exchange.as_str())
                .bind(key.as_str())
                .bind(body.as_str())
                .bind(now.as_str());
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

/// A service's outbox: publishes what its transactions enqueued, once
/// they commit ([`Outbox::committing`]), and runs the relay for the rows
/// that were not (see the module's doc).
#[derive(Clone, Default)]
pub struct Outbox {
    wake: Arc<Notify>,
    /// Set by [`Outbox::poke`]: the next pass takes every row, however young.
    everything: Arc<AtomicBool>,
    /// Set once the outbox is started; until then rows wait for the relay.
    direct: Arc<OnceLock<Direct>>,
}

/// What publishing from memory needs.
#[derive(Clone)]
struct Direct {
    bus: Bus,
    /// One permit per row being published.
    in_flight: Arc<Semaphore>,
    /// Ids the broker confirmed, to delete.
    confirmed: Arc<Mutex<Vec<String>>>,
    /// Wakes the task that deletes them.
    to_delete: Arc<Notify>,
}

impl Outbox {
    /// Starts the relay of `db`'s outbox onto `bus`; it stops with `shutdown`.
    pub fn spawn(db: Db, bus: Bus, shutdown: Shutdown) -> Self {
        let outbox = Self::default();
        outbox.start(db, bus, shutdown);
        outbox
    }

    /// Runs `work`, which writes and commits one transaction; once it
    /// has, publishes what it [`enqueue`]d (and runs its
    /// [`after_commit`] hooks).
    pub async fn committing<T, E>(
        &self,
        work: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let (result, rows) = SENDING
            .scope(std::cell::RefCell::new(Vec::new()), async {
                let result = committing(work).await;
                (result, SENDING.with(std::cell::RefCell::take))
            })
            .await;
        if result.is_ok() {
            self.send(rows);
        }
        result
    }

    /// Publishes committed outbox rows from memory; the broker's confirm
    /// has them deleted. Rows it cannot take (not started yet, too many
    /// in flight) stay for the relay.
    fn send(&self, rows: Vec<OutboxRow>) {
        if rows.is_empty() {
            return;
        }
        let Some(direct) = self.direct.get() else {
            self.poke();
            return;
        };
        let n = u32::try_from(rows.len()).unwrap_or(u32::MAX);
        let Ok(permits) = Arc::clone(&direct.in_flight).try_acquire_many_owned(n) else {
            return;
        };
        let direct = direct.clone();
        tokio::spawn(async move {
            // Rows this process wrote moments ago parse; if not, they stay.
            let Ok(outcomes) = publish(&direct.bus, rows).await else {
                return;
            };
            let mut confirmed = lock(&direct.confirmed);
            for (id, outcome) in outcomes {
                // A failed one stays for the relay.
                if outcome.is_ok() {
                    confirmed.push(id);
                }
            }
            drop(confirmed);
            direct.to_delete.notify_one();
            drop(permits);
        });
    }

    /// Starts the relay for a handle made earlier (services that enqueue
    /// before they run, such as catalog seeding), and publishing from
    /// memory.
    ///
    /// Relay passes overlap: a pass holds its rows until the broker
    /// confirms them, so the next pass starts without waiting for it (on
    /// PostgreSQL, up to [`RELAY_PASSES`] at once, each taking rows the
    /// others have not locked; SQLite's single writer allows one).
    pub fn start(&self, db: Db, bus: Bus, shutdown: Shutdown) {
        let direct = Direct {
            bus: bus.clone(),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            confirmed: Arc::default(),
            to_delete: Arc::default(),
        };
        if self.direct.set(direct.clone()).is_err() {
            tracing::warn!("the outbox was started twice; the second start is ignored");
            return;
        }
        // Rows relayed or deleted since the last vacuum (PostgreSQL).
        let moved = Arc::new(AtomicUsize::new(0));
        tokio::spawn(delete_confirmed(
            db.clone(),
            direct.clone(),
            Arc::clone(&moved),
            shutdown.clone(),
        ));
        let wake = Arc::clone(&self.wake);
        // The first pass takes everything: rows a crash left behind.
        let everything = Arc::clone(&self.everything);
        everything.store(true, Ordering::Relaxed);
        let passes = match db.backend {
            Backend::Postgres => RELAY_PASSES,
            Backend::Sqlite => 1,
        };
        let slots = Arc::new(tokio::sync::Semaphore::new(passes));
        tokio::spawn(async move {
            let mut pruned = tokio::time::Instant::now();
            let mut sampled = tokio::time::Instant::now() - OUTBOX_SAMPLE;
            let mut vacuumed = tokio::time::Instant::now();
            loop {
                let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                    return;
                };
                let (pass_db, pass_bus, again) = (db.clone(), bus.clone(), Arc::clone(&wake));
                let (pass_moved, pass_everything) = (Arc::clone(&moved), Arc::clone(&everything));
                let all = everything.swap(false, Ordering::Relaxed);
                tokio::spawn(async move {
                    let before = (!all).then(|| crate::ago(FALLBACK_AFTER));
                    match relay_pass(&pass_db, &pass_bus, &pass_moved, before.as_deref()).await {
                        // More may be waiting: go again at once.
                        Ok(true) => {
                            if all {
                                pass_everything.store(true, Ordering::Relaxed);
                            }
                            again.notify_one();
                        }
                        Ok(false) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "outbox relay pass failed; rows stay for the next");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                    drop(slot);
                });
                if pruned.elapsed() > Duration::from_secs(3600) {
                    prune_inbox(&db).await;
                    pruned = tokio::time::Instant::now();
                }
                if sampled.elapsed() >= OUTBOX_SAMPLE {
                    sample_outbox(&db, bus.metrics()).await;
                    sampled = tokio::time::Instant::now();
                }
                let n = moved.load(Ordering::Relaxed);
                // (One still running makes the next skip the table.)
                if db.backend == Backend::Postgres
                    && (n >= VACUUM_AFTER_ROWS || (n > 0 && vacuumed.elapsed() >= VACUUM_EVERY))
                {
                    moved.store(0, Ordering::Relaxed);
                    vacuumed = tokio::time::Instant::now();
                    let db = db.clone();
                    tokio::spawn(async move { vacuum(&db, "VACUUM (SKIP_LOCKED) outbox").await });
                }
                tokio::select! {
                    () = wake.notified() => {}
                    () = tokio::time::sleep(RELAY_POLL) => {}
                    () = shutdown.wait() => {
                        // Let what is in flight finish (publishes wait for
                        // the broker only so long), delete what was
                        // confirmed, then one last pass so messages of the
                        // final commits go out.
                        let _ = slots.acquire_many(u32::try_from(passes).unwrap_or(1)).await;
                        let _ = tokio::time::timeout(
                            Duration::from_secs(10),
                            direct.in_flight.acquire_many(u32::try_from(MAX_IN_FLIGHT).unwrap_or(u32::MAX)),
                        )
                        .await;
                        delete(&db, &direct, &moved).await;
                        let _ = relay_pass(&db, &bus, &moved, None).await;
                        return;
                    }
                }
            }
        });
    }

    /// Tells the relay to take every row now: for rows committed outside
    /// an [`Outbox::committing`] block.
    pub fn poke(&self) {
        self.everything.store(true, Ordering::Relaxed);
        self.wake.notify_one();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Deletes confirmed rows, [`DELETE_EVERY`] at most, until `shutdown`
/// (the relay deletes the last ones).
async fn delete_confirmed(db: Db, direct: Direct, moved: Arc<AtomicUsize>, shutdown: Shutdown) {
    loop {
        tokio::select! {
            () = direct.to_delete.notified() => {}
            () = shutdown.wait() => return,
        }
        tokio::time::sleep(DELETE_EVERY).await;
        delete(&db, &direct, &moved).await;
    }
}

/// Deletes the rows confirmed so far. If that fails they stay, and the
/// relay sends them again: a duplicate, which inboxes drop.
async fn delete(db: &Db, direct: &Direct, moved: &AtomicUsize) {
    let ids = std::mem::take(&mut *lock(&direct.confirmed));
    for chunk in ids.chunks(500) {
        let marks: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
        let sql = format!("DELETE FROM outbox WHERE id IN ({})", marks.join(", "));
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for id in chunk {
            query = query.bind(id.as_str());
        }
        match query.execute(&db.write).await {
            Ok(_) => {
                moved.fetch_add(chunk.len(), Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!(error = %e, "deleting sent outbox rows failed; the relay sends them again");
            }
        }
    }
}

/// Publishes outbox rows, each with a producer span in its message's
/// trace, and waits for the broker's confirms; counts and records those
/// confirmed. Fails if a row does not parse.
/// Returns each row's id with its outcome, in order.
async fn publish(
    bus: &Bus,
    rows: Vec<OutboxRow>,
) -> anyhow::Result<Vec<(String, Result<(), BusError>)>> {
    let mut sends = Vec::with_capacity(rows.len());
    let mut sent = Vec::with_capacity(rows.len());
    for (id, exchange, key, body) in rows {
        let (mut msg, head) = Outgoing::envelope_json_head(body.into_bytes())?;
        sent.push((id, key.clone(), head));
        // A producer span in the message's trace, until the broker
        // confirms; consumers continue from it.
        let tp = msg
            .headers
            .get(bazaar_bus::header::TRACEPARENT)
            .map(String::as_bytes);
        let span = if bazaar_mesh::trace::recorded(tp) {
            let span = tracing::info_span!(
                "publish",
                service = bus.service(),
                otel.name = %format_args!("publish {key}"),
                otel.kind = "producer",
                messaging.destination = %exchange,
                messaging.routing_key = %key,
                messaging.message_id = msg.message_id.as_deref().unwrap_or(""),
            );
            bazaar_mesh::trace::follow(&span, tp);
            span
        } else {
            // A message that starts a trace not recorded says so, so
            // that its consumers do not record it either.
            if bazaar_mesh::trace::recording() && tp.and_then(bazaar_mesh::trace::remote).is_none()
            {
                msg.headers.insert(
                    bazaar_bus::header::TRACEPARENT.into(),
                    bazaar_mesh::trace::new_unrecorded(),
                );
            }
            tracing::Span::none()
        };
        if let Some(tp) = bazaar_mesh::trace::traceparent_of(&span) {
            msg.headers
                .insert(bazaar_bus::header::TRACEPARENT.into(), tp);
        }
        if !bus.service().is_empty() {
            msg.headers
                .insert(bazaar_bus::header::SOURCE.into(), bus.service().into());
        }
        sends.push(
            async move { bus.transport().publish(&exchange, &key, msg).await }.instrument(span),
        );
    }
    let outcomes = futures::future::join_all(sends).await;
    let now = bazaar_bus::timeline::now_us();
    let published = &bus.metrics().published;
    let mut ids = Vec::with_capacity(outcomes.len());
    for ((id, key, head), outcome) in sent.into_iter().zip(outcomes) {
        if outcome.is_ok() {
            bazaar_bus::timeline::published(bus.service(), head, now);
            published
                .get_or_create(&bazaar_bus::metrics::KeyLabel { routing_key: key })
                .inc();
        }
        ids.push((id, outcome));
    }
    Ok(ids)
}

/// Publishes one batch of rows written before `before` (all rows if
/// `None`); `true` if the batch was full, so more may be waiting.
async fn relay_pass(
    db: &Db,
    bus: &Bus,
    moved: &AtomicUsize,
    before: Option<&str>,
) -> anyhow::Result<bool> {
    // Rows are taken (deleted) in a transaction that commits only once the
    // broker confirmed every one of them; any failure rolls the whole batch
    // back, to be sent again (the confirmed part twice, which inboxes drop).
    // On PostgreSQL, replicas of a service share the outbox: SKIP LOCKED
    // gives each row to one relay. (SQLite has one writer.)
    let lock = match db.backend {
        Backend::Postgres => " FOR UPDATE SKIP LOCKED",
        Backend::Sqlite => "",
    };
    let filter = if before.is_some() {
        " WHERE created_at < $1"
    } else {
        ""
    };
    let mut tx = db.write.begin().await?;
    let sql = format!(
        "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox{filter} ORDER BY id LIMIT {RELAY_BATCH}{lock})
         RETURNING id, exchange, routing_key, envelope, created_at"
    );
    let mut query = sqlx::query(AssertSqlSafe(sql));
    if let Some(before) = before {
        query = query.bind(before);
    }
    let mut rows = query.fetch_all(&mut *tx).await?;
    if rows.is_empty() {
        return Ok(false);
    }
    rows.sort_by_cached_key(|r| r.try_get::<String, _>("id").unwrap_or_default());
    let mut taken = Vec::with_capacity(rows.len());
    for row in &rows {
        taken.push((
            row.try_get::<String, _>("id")?,
            row.try_get::<String, _>("exchange")?,
            row.try_get::<String, _>("routing_key")?,
            row.try_get::<String, _>("envelope")?,
        ));
    }
    // Written by this code, so it parses; if not, the batch stays put.
    let outcomes = publish(bus, taken).await?;
    let mut kept = 0;
    for (row, (_, outcome)) in rows.iter().zip(outcomes) {
        match outcome {
            Ok(()) => {}
            // A command whose service has not declared its queue yet: it
            // stays in the outbox for a later pass, the rest are done. It
            // goes to the back (a new row id; the message id is in the
            // envelope), so kept commands never crowd out newer rows.
            Err(e @ BusError::Unroutable { .. }) => {
                if kept == 0 {
                    tracing::warn!(error = %e, "commands kept in the outbox until their service is up");
                }
                sqlx::query(
                    "INSERT INTO outbox (id, exchange, routing_key, envelope, created_at)
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(uuid::Uuid::now_v7().to_string())
                .bind(row.try_get::<String, _>("exchange")?)
                .bind(row.try_get::<String, _>("routing_key")?)
                .bind(row.try_get::<String, _>("envelope")?)
                .bind(row.try_get::<String, _>("created_at")?)
                .execute(&mut *tx)
                .await?;
                kept += 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
    tx.commit().await?;
    moved.fetch_add(rows.len(), Ordering::Relaxed);
    // Go on at once only when this batch was full of rows that went out.
    Ok(kept == 0 && rows.len() == RELAY_BATCH)
}

/// Sets the outbox gauges: rows waiting, and the oldest one's age.
async fn sample_outbox(db: &Db, metrics: &bazaar_bus::BusMetrics) {
    let row = sqlx::query("SELECT COUNT(*) AS n, MIN(created_at) AS oldest FROM outbox")
        .fetch_one(&db.read)
        .await;
    match row {
        Ok(row) => {
            let n: i64 = row.try_get("n").unwrap_or(0);
            let oldest: Option<String> = row.try_get("oldest").unwrap_or(None);
            let age = oldest
                .and_then(|t| {
                    time::OffsetDateTime::parse(&t, &time::format_description::well_known::Rfc3339)
                        .ok()
                })
                .map_or(0.0, |t| {
                    (time::OffsetDateTime::now_utc() - t)
                        .as_seconds_f64()
                        .max(0.0)
                });
            metrics.outbox_waiting.set(n);
            metrics.outbox_oldest_seconds.set(age);
        }
        Err(e) => tracing::debug!(error = %e, "outbox sample failed"),
    }
}

async fn prune_inbox(db: &Db) {
    if let Err(e) = sqlx::query("DELETE FROM inbox WHERE received_at < $1")
        .bind(crate::ago(INBOX_RETENTION))
        .execute(&db.write)
        .await
    {
        tracing::warn!(error = %e, "pruning the inbox failed");
        return;
    }
    if db.backend == Backend::Postgres {
        vacuum(db, "VACUUM (SKIP_LOCKED) inbox").await;
    }
}

/// Vacuums one of the service's own tables on PostgreSQL (see
/// [`VACUUM_AFTER_ROWS`]): `sql` is `VACUUM (SKIP_LOCKED) <table>`
/// (when another replica's relay is vacuuming it already, that is
/// enough). Not in a transaction (VACUUM cannot run in one), and by the
/// simple protocol.
async fn vacuum(db: &Db, sql: &'static str) {
    if let Err(e) = sqlx::raw_sql(sql).execute(&db.write).await {
        tracing::warn!(error = %e, sql, "vacuuming failed");
    }
}

/// What one message does to a service's state, inside its transaction.
/// Outgoing messages go through [`enqueue`] on the same connection.
#[async_trait]
pub trait Effects: Send + Sync + 'static {
    /// Whether batches must run one at a time. Set it when messages update
    /// the same hot rows (stock counts): concurrent batches would queue on
    /// each other's row locks and, locking in different orders, deadlock.
    const SERIAL: bool = false;

    /// Whether nothing anyone waits on follows from these messages (an
    /// order's outcome is decided before its notification is written).
    /// Such a consumer lingers [`BACKGROUND_LINGER_TIMES`] the configured
    /// `consumer_linger_ms` for its batches: more messages per
    /// transaction, for latency no one sees.
    const BACKGROUND: bool = false;

    async fn apply(&self, tx: &mut AnyConnection, msg: &Received) -> Result<(), Failure>;

    /// Applies several fresh messages at once, in order, with statements
    /// they share (one lookup, one multi-row insert). `None` (the
    /// default), having touched nothing: the inbox applies them one by
    /// one with [`Effects::apply`].
    async fn apply_many(
        &self,
        _tx: &mut AnyConnection,
        _msgs: &[&Received],
    ) -> Option<Result<(), Failure>> {
        None
    }
}

/// A [`BatchHandler`] that applies a batch's effects in one transaction,
/// skipping ids already in the inbox. If any message fails, the batch is
/// rolled back and its messages are applied one transaction each, so one
/// bad message fails alone.
pub struct Inbox<E> {
    db: Db,
    outbox: Outbox,
    effects: E,
    /// Its instruments and service name, for metrics and spans.
    bus: Bus,
}

impl<E: Effects> Inbox<E> {
    /// Counts into `bus`'s instruments.
    pub fn new(db: Db, outbox: Outbox, effects: E, bus: &Bus) -> Arc<Self> {
        Arc::new(Self {
            db,
            outbox,
            effects,
            bus: bus.clone(),
        })
    }

    async fn apply_all(&self, batch: &[Received]) -> Result<(), Failure> {
        committing(self.apply_in_one(batch)).await
    }

    async fn apply_in_one(&self, batch: &[Received]) -> Result<(), Failure> {
        let mut tx = self.db.write.begin().await.map_err(retry)?;
        // One statement records the whole batch; only ids it had not seen come back.
        let ids: Vec<&str> = batch.iter().map(|m| m.envelope.id.as_str()).collect();
        let mut fresh = first_times(&mut tx, &ids).await.map_err(retry)?;
        let (duplicates, rows) = BATCH_ROWS
            .scope(std::cell::RefCell::new(Vec::new()), async {
                let duplicates = self.apply_fresh(&mut tx, batch, &mut fresh).await?;
                Ok::<_, Failure>((duplicates, BATCH_ROWS.with(std::cell::RefCell::take)))
            })
            .await?;
        insert(&mut tx, &rows).await.map_err(retry)?;
        if duplicates > 0 {
            let counter = self.bus.metrics().inbox_duplicates.clone();
            after_commit(move || {
                counter.inc_by(duplicates);
            });
        }
        tx.commit().await.map_err(retry)?;
        self.outbox.send(rows);
        Ok(())
    }

    /// Applies the effects of the messages of `batch` that are `fresh`;
    /// returns how many were not (duplicates).
    async fn apply_fresh(
        &self,
        tx: &mut AnyConnection,
        batch: &[Received],
        fresh: &mut std::collections::HashSet<String>,
    ) -> Result<u64, Failure> {
        let mut duplicates = 0;
        let mut first = Vec::with_capacity(batch.len());
        for msg in batch {
            // `remove`: an id twice in one batch is applied once.
            if fresh.remove(msg.envelope.id.as_str()) {
                first.push(msg);
                continue;
            }
            tracing::debug!(id = %msg.envelope.id, "duplicate message skipped");
            duplicates += 1;
            let (service, env) = (self.bus.service(), msg.envelope.clone());
            after_commit(move || {
                bazaar_bus::timeline::message(service, "duplicate", &env, None, None, None);
            });
        }
        if first.len() > 1 {
            // Each message's span covers the batch it was applied in.
            let spans: Vec<_> = first
                .iter()
                .map(|m| message_span(self.bus.service(), m))
                .collect();
            let applied = self.effects.apply_many(tx, &first).await;
            drop(spans);
            if let Some(applied) = applied {
                return applied.map(|()| duplicates);
            }
        }
        for msg in first {
            self.effects
                .apply(tx, msg)
                .instrument(message_span(self.bus.service(), msg))
                .await?;
        }
        Ok(duplicates)
    }
}

/// Records message ids as handled; returns those not handled before.
pub async fn first_times(
    conn: &mut AnyConnection,
    ids: &[&str],
) -> Result<std::collections::HashSet<String>, sqlx::Error> {
    let mut fresh = std::collections::HashSet::with_capacity(ids.len());
    let now = crate::now();
    for chunk in ids.chunks(500) {
        let rows: Vec<String> = (0..chunk.len())
            .map(|i| format!("(${}, ${})", 2 * i + 1, 2 * i + 2))
            .collect();
        let sql = format!(
            "INSERT INTO inbox (message_id, received_at) VALUES {} ON CONFLICT (message_id) DO NOTHING RETURNING message_id",
            rows.join(", ")
        );
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for id in chunk {
            query = query.bind((*id).to_owned()).bind(now.clone());
        }
        for row in query.fetch_all(&mut *conn).await? {
            fresh.insert(row.try_get("message_id")?);
        }
    }
    Ok(fresh)
}

#[async_trait]
impl<E: Effects> BatchHandler for Inbox<E> {
    async fn handle(&self, batch: &[Received]) -> Vec<Result<(), Failure>> {
        match self.apply_all(batch).await {
            Ok(()) => vec![Ok(()); batch.len()],
            Err(e) if batch.len() == 1 => vec![Err(e)],
            Err(_) => {
                let mut outcomes = Vec::with_capacity(batch.len());
                for msg in batch {
                    outcomes.push(self.apply_all(std::slice::from_ref(msg)).await);
                }
                outcomes
            }
        }
    }
}

/// A database error: worth another try.
pub fn retry(e: impl std::fmt::Display) -> Failure {
    Failure::Retry(e.to_string())
}

/// The span a message is handled in, by `service`: a consumer span in
/// the message's trace (its publish span's, else its envelope's), with
/// its id and request id (the kind is in its name).
pub fn message_span(service: &'static str, msg: &Received) -> tracing::Span {
    let tp = msg
        .headers
        .get(bazaar_bus::header::TRACEPARENT)
        .or(msg.envelope.traceparent.as_ref());
    if !bazaar_mesh::trace::recorded(tp.map(String::as_bytes)) {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        "message",
        service,
        otel.name = %format_args!("consume {}", msg.envelope.kind),
        otel.kind = "consumer",
        messaging.message_id = %msg.envelope.id,
        request_id = msg.envelope.request_id.as_deref().unwrap_or(""),
        attempt = msg.attempt,
        messaging.source = msg
            .headers
            .get(bazaar_bus::header::SOURCE)
            .map_or("", String::as_str),
    );
    bazaar_mesh::trace::follow(&span, tp.map(String::as_bytes));
    span
}

/// How many times `consumer_linger_ms` a [`Effects::BACKGROUND`] consumer
/// lingers (at most [`crate::config::MAX_CONSUMER_LINGER_MS`]): 40 ms for a
/// `bazaar serve` process, where 200 orders/s fill its batches with about
/// eight messages.
pub const BACKGROUND_LINGER_TIMES: u64 = 10;

/// How long a consumer of `E` lingers for a batch, given `consumer_linger_ms`.
fn linger<E: Effects>(configured_ms: Option<u64>) -> Duration {
    let ms = configured_ms.unwrap_or(0);
    Duration::from_millis(if E::BACKGROUND {
        ms.saturating_mul(BACKGROUND_LINGER_TIMES)
            .min(crate::config::MAX_CONSUMER_LINGER_MS)
    } else {
        ms
    })
}

/// Starts a reliable consumer of `spec` whose messages apply `effects`
/// through the inbox; it runs until `shutdown` and finishes its batches.
pub async fn spawn_consumer<E: Effects>(
    ctx: &crate::ServiceContext,
    db: &Db,
    outbox: &Outbox,
    spec: bazaar_bus::QueueSpec,
    effects: E,
    shutdown: &Shutdown,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    // Two batches at once: one in the database while the next is taken in.
    let concurrency = if E::SERIAL { 1 } else { 2 };
    let stop = shutdown.clone();
    let run = bazaar_bus::Consumer::new(ctx.bus.clone(), spec)
        .with_policy(ctx.config.retry_policy())
        .with_limits(512, 128, concurrency)
        .with_linger(linger::<E>(ctx.config.consumer_linger_ms))
        .start(
            Inbox::new(db.clone(), outbox.clone(), effects, &ctx.bus),
            async move {
                stop.wait().await;
            },
        )
        .await?;
    Ok(tokio::spawn(run))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    use async_trait::async_trait;
    use bazaar_bus::{Failure, Received};
    use sqlx::AnyConnection;

    use super::{Effects, after_commit, committing, linger};

    struct OnThePath;
    struct Background;

    #[async_trait]
    impl Effects for OnThePath {
        async fn apply(&self, _: &mut AnyConnection, _: &Received) -> Result<(), Failure> {
            Ok(())
        }
    }

    #[async_trait]
    impl Effects for Background {
        const BACKGROUND: bool = true;

        async fn apply(&self, _: &mut AnyConnection, _: &Received) -> Result<(), Failure> {
            Ok(())
        }
    }

    #[test]
    fn background_consumers_linger_longer_and_never_past_the_cap() {
        let ms = Duration::from_millis;
        assert_eq!(linger::<OnThePath>(Some(4)), ms(4));
        assert_eq!(linger::<Background>(Some(4)), ms(40));
        // No linger stays no linger: a batch is whatever has arrived.
        assert_eq!(linger::<OnThePath>(None), Duration::ZERO);
        assert_eq!(linger::<Background>(None), Duration::ZERO);
        assert_eq!(linger::<Background>(Some(0)), Duration::ZERO);
        assert_eq!(linger::<Background>(Some(500)), ms(1000));
        assert_eq!(linger::<OnThePath>(Some(1000)), ms(1000));
    }

    #[tokio::test]
    async fn hooks_run_after_a_commit_only() {
        let ran = Arc::new(AtomicU32::new(0));
        let hook = |ran: &Arc<AtomicU32>| {
            let ran = Arc::clone(ran);
            move || {
                ran.fetch_add(1, Ordering::SeqCst);
            }
        };
        let committed: Result<(), ()> = committing(async {
            after_commit(hook(&ran));
            assert_eq!(ran.load(Ordering::SeqCst), 0, "not before the commit");
            Ok(())
        })
        .await;
        assert!(committed.is_ok());
        assert_eq!(ran.load(Ordering::SeqCst), 1);
        let rolled_back: Result<(), ()> = committing(async {
            after_commit(hook(&ran));
            Err(())
        })
        .await;
        assert!(rolled_back.is_err());
        assert_eq!(ran.load(Ordering::SeqCst), 1, "not after a rollback");
        after_commit(hook(&ran));
        assert_eq!(
            ran.load(Ordering::SeqCst),
            2,
            "at once outside a transaction"
        );
    }
}
