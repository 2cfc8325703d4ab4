//! The service's own database: SQLite (a file per service, WAL) or
//! PostgreSQL (a schema per service), through sqlx's `Any` driver so one
//! set of SQL and migrations serves both. Migrations run at start.

use std::sync::{Arc, Once};
use std::time::Duration;

use anyhow::Context as _;
use sqlx::any::AnyPoolOptions;
use sqlx::migrate::Migrator;
use sqlx::{AnyPool, Executor, Row};

use crate::Config;

/// Which database a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Installs sqlx's `Any` drivers once per process.
pub fn install_drivers() {
    static DRIVERS: Once = Once::new();
    DRIVERS.call_once(sqlx::any::install_default_drivers);
}

/// A service's database: `read` for queries, `write` for changes.
///
/// SQLite allows one writer at a time, and a writer that finds the lock
/// taken sleeps in SQLite's busy handler (1, 2, 5 … 100 ms steps), which
/// shows up as a long latency tail. So on SQLite `write` is a pool of one
/// connection: writers queue in the process and never sleep in SQLite.
/// On PostgreSQL both are the same pool.
#[derive(Clone)]
pub struct Db {
    pub read: AnyPool,
    pub write: AnyPool,
    pub backend: Backend,
    _checkpointer: Option<Arc<AbortOnDrop>>,
}

/// How often the SQLite WAL is checkpointed in the background.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

/// WAL frames (4 KiB pages) past which the writer restarts the WAL.
const WAL_RESTART_FRAMES: i64 = 16_384;

/// A pooled connection idle this long is pinged before it is handed out.
const PING_IF_IDLE: Duration = Duration::from_secs(1);

/// Stops the checkpoint task when the last [`Db`] handle goes.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// SQLite's automatic checkpoint runs inside whichever commit crosses the
/// WAL threshold, and its fsync stalls that writer (and everyone queued
/// behind it) for milliseconds, many times a second under load. Instead,
/// a reader connection checkpoints PASSIVE-ly every [`CHECKPOINT_EVERY`],
/// which copies pages without blocking writers. Under sustained writes a
/// passive checkpoint never catches up fully, so the WAL would never
/// restart; once it passes [`WAL_RESTART_FRAMES`] the writer restarts it,
/// which is quick because the passive runs did most of the copying.
fn spawn_checkpointer(read: AnyPool, write: AnyPool) -> Arc<AbortOnDrop> {
    Arc::new(AbortOnDrop(tokio::spawn(async move {
        let mut every = tokio::time::interval(CHECKPOINT_EVERY);
        loop {
            every.tick().await;
            let passive = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                .fetch_one(&read)
                .await;
            let frames: i64 = match passive.and_then(|row| row.try_get(1)) {
                Ok(frames) => frames,
                Err(e) => {
                    tracing::warn!(error = %e, "WAL checkpoint failed");
                    continue;
                }
            };
            if frames > WAL_RESTART_FRAMES
                && let Err(e) = write.execute("PRAGMA wal_checkpoint(RESTART)").await
            {
                tracing::warn!(error = %e, "WAL restart failed");
            }
        }
    })))
}

/// Opens service `service`'s database and applies its migrations.
pub async fn connect(config: &Config, service: &str, migrator: &Migrator) -> anyhow::Result<Db> {
    install_drivers();

    let (url, backend) = match config.database_url.as_deref() {
        None => {
            std::fs::create_dir_all(&config.data_dir)
                .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
            let path = config.data_dir.join(format!("{service}.db"));
            (
                format!("sqlite://{}?mode=rwc", path.display()),
                Backend::Sqlite,
            )
        }
        Some(u) if u.starts_with("sqlite:") => (u.replace("{service}", service), Backend::Sqlite),
        Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => {
            let schema = format!("{}{service}", config.database_schema_prefix);
            (postgres_schema(u, &schema).await?, Backend::Postgres)
        }
        Some(u) => {
            anyhow::bail!("unsupported database url {u:?}: expected sqlite:… or postgres://…")
        }
    };

    let open = |max: u32| {
        let options = AnyPoolOptions::new()
            .max_connections(max)
            .acquire_timeout(Duration::from_secs(10))
            // sqlx pings a connection when it is taken and again when it
            // is given back: two extra round trips per query (to
            // PostgreSQL over the network; on SQLite to the connection's
            // worker thread and back, four context switches). The ping
            // on return stays, and drops a connection that broke in use;
            // the one on taking is kept only for connections that sat
            // idle, which is when a restarted server leaves them dead.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= PING_IF_IDLE {
                        sqlx::Connection::ping(conn).await?;
                    }
                    Ok(true)
                })
            });
        let options = match backend {
            Backend::Sqlite => options.after_connect(|conn, _| {
                Box::pin(async move {
                    conn.execute("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=5000; PRAGMA foreign_keys=ON; PRAGMA wal_autocheckpoint=0;")
                        .await?;
                    Ok(())
                })
            }),
            Backend::Postgres => options,
        };
        options.connect(&url)
    };
    let context = || format!("cannot open the {service} database");
    let db = match backend {
        Backend::Sqlite => {
            let write = open(1).await.with_context(context)?;
            let read = open(4).await.with_context(context)?;
            let checkpointer = Some(spawn_checkpointer(read.clone(), write.clone()));
            Db {
                read,
                write,
                backend,
                _checkpointer: checkpointer,
            }
        }
        Backend::Postgres => {
            let pool = open(16).await.with_context(context)?;
            Db {
                read: pool.clone(),
                write: pool,
                backend,
                _checkpointer: None,
            }
        }
    };
    migrator
        .run(&db.write)
        .await
        .with_context(|| format!("migrating the {service} database"))?;
    sqlx::raw_sql(crate::messaging::TABLES)
        .execute(&db.write)
        .await
        .with_context(|| format!("creating the outbox and inbox of {service}"))?;
    Ok(db)
}

/// Creates `schema` if needed and returns a URL whose connections use it.
async fn postgres_schema(url: &str, schema: &str) -> anyhow::Result<String> {
    anyhow::ensure!(
        schema
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_'),
        "schema name {schema:?} must be letters, digits and _"
    );
    let admin = AnyPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await
        .context("cannot reach PostgreSQL")?;
    let create = format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\"");
    let created = sqlx::raw_sql(sqlx::AssertSqlSafe(create))
        .execute(&admin)
        .await;
    // Two processes racing to create the schema: one loses with a unique violation, and that is fine.
    if let Err(e) = created {
        let exists: Option<(String,)> = sqlx::query_as(
            "SELECT schema_name::text FROM information_schema.schemata WHERE schema_name = $1",
        )
        .bind(schema)
        .fetch_optional(&admin)
        .await?;
        anyhow::ensure!(exists.is_some(), "cannot create schema {schema}: {e}");
    }
    admin.close().await;
    let sep = if url.contains('?') { '&' } else { '?' };
    Ok(format!("{url}{sep}options=-c%20search_path%3D{schema}"))
}
