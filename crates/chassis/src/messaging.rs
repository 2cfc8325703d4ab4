//! Exactly-once effects over at-least-once delivery, in each service's own
//! database:
//!
//! - **Outbox.** A service never publishes from a handler. It writes the
//!   message into `outbox` in the same transaction as the state change
//!   ([`enqueue`]); the relay ([`Outbox::spawn`]) publishes pending rows with
//!   publisher confirms and deletes them only once confirmed. A crash, or a
//!   broker that is down, leaves rows in place to be sent later.
//! - **Inbox.** A consumer applies a message's effects and records its id in
//!   `inbox` in one transaction ([`Inbox`]); a redelivered id is acked
//!   without effect.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bazaar_bus::{BatchHandler, Bus, Envelope, Failure, Outgoing, Received};
use sqlx::{AnyConnection, AssertSqlSafe, Row};
use tokio::sync::Notify;
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
/// How often the relay looks for rows nobody told it about (other
/// replicas' leftovers, rows left by a crash).
const RELAY_POLL: Duration = Duration::from_millis(500);
/// How long handled message ids are remembered.
const INBOX_RETENTION: &str = "7 days";

/// Puts messages in the outbox inside the caller's transaction.
pub async fn enqueue(
    conn: &mut AnyConnection,
    messages: &[(&str, &str, &Envelope)],
) -> Result<(), sqlx::Error> {
    if messages.is_empty() {
        return Ok(());
    }
    let now = crate::now();
    let rows: Vec<String> = (0..messages.len())
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
        rows.join(", ")
    );
    let mut query = sqlx::query(AssertSqlSafe(sql));
    for (exchange, key, env) in messages {
        let body = serde_json::to_string(env).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
        query = query
            .bind(env.id.clone())
            .bind((*exchange).to_owned())
            .bind((*key).to_owned())
            .bind(body)
            .bind(now.clone());
    }
    query.execute(conn).await?;
    Ok(())
}

/// A handle to the outbox relay: poke it after a commit that enqueued.
#[derive(Clone)]
pub struct Outbox {
    wake: Arc<Notify>,
}

impl Default for Outbox {
    fn default() -> Self {
        Self {
            wake: Arc::new(Notify::new()),
        }
    }
}

impl Outbox {
    /// Starts the relay of `db`'s outbox onto `bus`; it stops with `shutdown`.
    pub fn spawn(db: Db, bus: Bus, shutdown: Shutdown) -> Self {
        let outbox = Self::default();
        outbox.start(db, bus, shutdown);
        outbox
    }

    /// Starts the relay for a handle made earlier (services that enqueue
    /// before they run, such as catalog seeding).
    pub fn start(&self, db: Db, bus: Bus, shutdown: Shutdown) {
        let wake = Arc::clone(&self.wake);
        tokio::spawn(async move {
            let mut pruned = tokio::time::Instant::now();
            loop {
                let failed = match relay_pass(&db, &bus).await {
                    Ok(more) if more => continue,
                    Ok(_) => false,
                    Err(e) => {
                        tracing::warn!(error = %e, "outbox relay pass failed; rows stay for the next");
                        true
                    }
                };
                if pruned.elapsed() > Duration::from_secs(3600) {
                    prune_inbox(&db).await;
                    pruned = tokio::time::Instant::now();
                }
                let pause = if failed {
                    Duration::from_millis(200)
                } else {
                    RELAY_POLL
                };
                tokio::select! {
                    () = wake.notified(), if !failed => {}
                    () = tokio::time::sleep(pause) => {}
                    () = shutdown.wait() => {
                        // One last pass so messages of the final commits go out.
                        let _ = relay_pass(&db, &bus).await;
                        return;
                    }
                }
            }
        });
    }

    /// Tells the relay there are new rows.
    pub fn poke(&self) {
        self.wake.notify_one();
    }
}

/// Publishes one batch of pending rows; `Ok(true)` if there may be more.
async fn relay_pass(db: &Db, bus: &Bus) -> anyhow::Result<bool> {
    let mut tx = db.write.begin().await?;
    // On PostgreSQL, replicas of a service share the outbox: each row is
    // taken by one relay. (SQLite has one writer, so no one else is looking.)
    let lock = match db.backend {
        Backend::Postgres => " FOR UPDATE SKIP LOCKED",
        Backend::Sqlite => "",
    };
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT id, exchange, routing_key, envelope FROM outbox ORDER BY id LIMIT {RELAY_BATCH}{lock}"
    )))
    .fetch_all(&mut *tx)
    .await?;
    if rows.is_empty() {
        return Ok(false);
    }
    let mut sends = Vec::with_capacity(rows.len());
    for row in &rows {
        let id: String = row.try_get("id")?;
        let exchange: String = row.try_get("exchange")?;
        let key: String = row.try_get("routing_key")?;
        let body: String = row.try_get("envelope")?;
        let msg = match serde_json::from_str::<Envelope>(&body) {
            Ok(env) => Outgoing::envelope(&env)?,
            // Written by this code, so never; keep the row rather than lose it.
            Err(e) => {
                tracing::error!(id, error = %e, "outbox row is not an envelope");
                continue;
            }
        };
        sends.push(async move {
            let sent = bus.transport().publish(&exchange, &key, msg).await;
            (id, sent)
        });
    }
    let outcomes = futures::future::join_all(sends).await;
    let mut sent = Vec::with_capacity(outcomes.len());
    let mut failure = None;
    for (id, outcome) in outcomes {
        match outcome {
            Ok(()) => sent.push(id),
            Err(e) => failure = Some(e),
        }
    }
    for chunk in sent.chunks(RELAY_BATCH) {
        let marks: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
        let sql = format!("DELETE FROM outbox WHERE id IN ({})", marks.join(", "));
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for id in chunk {
            query = query.bind(id.clone());
        }
        query.execute(&mut *tx).await?;
    }
    tx.commit().await?;
    if let Some(e) = failure {
        return Err(e.into());
    }
    Ok(rows.len() == RELAY_BATCH)
}

async fn prune_inbox(db: &Db) {
    let cutoff = time::OffsetDateTime::now_utc() - time::Duration::days(7);
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
    );
    let Ok(cutoff) = cutoff.format(&format) else {
        return;
    };
    if let Err(e) = sqlx::query("DELETE FROM inbox WHERE received_at < $1")
        .bind(cutoff)
        .execute(&db.write)
        .await
    {
        tracing::warn!(error = %e, retention = INBOX_RETENTION, "pruning the inbox failed");
    }
}

/// What one message does to a service's state, inside its transaction.
/// Outgoing messages go through [`enqueue`] on the same connection.
#[async_trait]
pub trait Effects: Send + Sync + 'static {
    async fn apply(&self, tx: &mut AnyConnection, msg: &Received) -> Result<(), Failure>;
}

/// A [`BatchHandler`] that applies a batch's effects in one transaction,
/// skipping ids already in the inbox. If any message fails, the batch is
/// rolled back and its messages are applied one transaction each, so one
/// bad message fails alone.
pub struct Inbox<E> {
    db: Db,
    outbox: Outbox,
    effects: E,
}

impl<E: Effects> Inbox<E> {
    pub fn new(db: Db, outbox: Outbox, effects: E) -> Arc<Self> {
        Arc::new(Self {
            db,
            outbox,
            effects,
        })
    }

    async fn apply_all(&self, batch: &[Received]) -> Result<(), Failure> {
        let mut tx = self.db.write.begin().await.map_err(retry)?;
        // One statement records the whole batch; only ids it had not seen come back.
        let ids: Vec<&str> = batch.iter().map(|m| m.envelope.id.as_str()).collect();
        let mut fresh = first_times(&mut tx, &ids).await.map_err(retry)?;
        for msg in batch {
            // `remove`: an id twice in one batch is applied once.
            if !fresh.remove(msg.envelope.id.as_str()) {
                tracing::debug!(id = %msg.envelope.id, "duplicate message skipped");
                continue;
            }
            self.effects
                .apply(&mut tx, msg)
                .instrument(message_span(msg))
                .await?;
        }
        tx.commit().await.map_err(retry)
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
        let outcomes = match self.apply_all(batch).await {
            Ok(()) => vec![Ok(()); batch.len()],
            Err(e) if batch.len() == 1 => vec![Err(e)],
            Err(_) => {
                let mut outcomes = Vec::with_capacity(batch.len());
                for msg in batch {
                    outcomes.push(self.apply_all(std::slice::from_ref(msg)).await);
                }
                outcomes
            }
        };
        if outcomes.iter().any(Result::is_ok) {
            self.outbox.poke();
        }
        outcomes
    }
}

/// A database error: worth another try.
pub fn retry(e: impl std::fmt::Display) -> Failure {
    Failure::Retry(e.to_string())
}

/// The span a message is handled in: its kind, id, request id and trace id.
pub fn message_span(msg: &Received) -> tracing::Span {
    let trace_id = msg
        .envelope
        .traceparent
        .as_deref()
        .and_then(|tp| tp.split('-').nth(1))
        .unwrap_or("");
    tracing::info_span!(
        "message",
        kind = %msg.envelope.kind,
        id = %msg.envelope.id,
        request_id = msg.envelope.request_id.as_deref().unwrap_or(""),
        trace_id,
    )
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
    // SQLite has one writer, so more batches at once would only queue.
    let concurrency = match db.backend {
        Backend::Sqlite => 2,
        Backend::Postgres => 4,
    };
    let stop = shutdown.clone();
    let run = bazaar_bus::Consumer::new(ctx.bus.clone(), spec)
        .with_policy(ctx.config.retry_policy())
        .with_limits(512, 128, concurrency)
        .start(
            Inbox::new(db.clone(), outbox.clone(), effects),
            async move {
                stop.wait().await;
            },
        )
        .await?;
    Ok(tokio::spawn(run))
}
