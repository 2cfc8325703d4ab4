//! The service's own database: SQLite (a file per service, WAL) or
//! PostgreSQL (a schema per service), through sqlx's `Any` driver so one
//! set of SQL and migrations serves both. Migrations run at start.

use std::sync::Once;
use std::time::Duration;

use anyhow::Context as _;
use sqlx::any::AnyPoolOptions;
use sqlx::migrate::Migrator;
use sqlx::{AnyPool, Executor};

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
            .acquire_timeout(Duration::from_secs(10));
        let options = match backend {
            Backend::Sqlite => options.after_connect(|conn, _| {
                Box::pin(async move {
                    conn.execute("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=5000; PRAGMA foreign_keys=ON;")
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
            Db {
                read: open(4).await.with_context(context)?,
                write,
            }
        }
        Backend::Postgres => {
            let pool = open(16).await.with_context(context)?;
            Db {
                read: pool.clone(),
                write: pool,
            }
        }
    };
    migrator
        .run(&db.write)
        .await
        .with_context(|| format!("migrating the {service} database"))?;
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
