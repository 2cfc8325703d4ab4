//! The database pool against a real PostgreSQL (`BAZAAR_TEST_DATABASE_URL`;
//! required with `CI=true`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bazaar_chassis::Config;
use bazaar_chassis::db;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("tests/migrations");

/// Connections are not pinged each time they are taken (that costs a round
/// trip per query), so one the server dropped while it sat idle must still
/// be found out before a query is sent on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_dropped_while_idle_is_replaced_not_used() {
    let Ok(url) = std::env::var("BAZAAR_TEST_DATABASE_URL") else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true requires BAZAAR_TEST_DATABASE_URL"
        );
        eprintln!("skipping: BAZAAR_TEST_DATABASE_URL not set");
        return;
    };
    let unique = uuid::Uuid::now_v7().simple().to_string();
    let app = format!("bazaar-idle-{unique}");
    let sep = if url.contains('?') { '&' } else { '?' };
    let config = Config {
        database_url: Some(format!("{url}{sep}application_name={app}")),
        database_schema_prefix: format!("p{unique}_"),
        ..Config::default()
    };
    let db = db::connect(&config, "pool", &MIGRATOR).await.unwrap();
    let one = || async { sqlx::query("SELECT 1").execute(&db.read).await };
    one().await.expect("a first query");

    // The server ends every connection of the pool (as a restart would).
    let admin = sqlx::AnyPool::connect(&url).await.unwrap();
    let ended = sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
    )
    .bind(&app)
    .fetch_all(&admin)
    .await
    .unwrap();
    assert!(!ended.is_empty(), "the pool had no connection to end");

    tokio::time::sleep(Duration::from_millis(1_500)).await;
    one()
        .await
        .expect("a query after the server dropped the idle connections");

    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS \"p{unique}_pool\" CASCADE"
    )))
    .execute(&admin)
    .await
    .unwrap();
}
