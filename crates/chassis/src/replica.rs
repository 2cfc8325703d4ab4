//! A service's replica of another's records, fed by events (event-carried
//! state): rows of `(user_id, email, name, updated_at, deleted)` in a
//! table the service owns. Events may come late, twice or out of order
//! (retries, redelivery): a row keeps the newest version it has seen, and
//! a deletion is a tombstone, so a late update cannot bring a deleted
//! record back (ids are never reused).

use sqlx::{AnyConnection, AssertSqlSafe};

/// One version of a record: who, and as of when.
pub struct Version<'a> {
    pub id: &'a str,
    pub email: &'a str,
    pub name: &'a str,
    /// RFC 3339 UTC, fixed width: text order is time order.
    pub updated_at: &'a str,
}

/// Keeps `v` in `table` unless a newer version, or a deletion, is held.
pub async fn keep(
    tx: &mut AnyConnection,
    table: &'static str,
    v: &Version<'_>,
) -> Result<(), sqlx::Error> {
    let sql = format!(
        "INSERT INTO {table} (user_id, email, name, updated_at, deleted) VALUES ($1, $2, $3, $4, 0)
         ON CONFLICT (user_id) DO UPDATE SET email = excluded.email, name = excluded.name,
           updated_at = excluded.updated_at
         WHERE {table}.deleted = 0 AND {table}.updated_at <= excluded.updated_at"
    );
    sqlx::query(AssertSqlSafe(sql))
        .bind(v.id)
        .bind(v.email)
        .bind(v.name)
        .bind(v.updated_at)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Marks `id` deleted in `table` for good, its name and address gone.
pub async fn forget(
    tx: &mut AnyConnection,
    table: &'static str,
    v: &Version<'_>,
) -> Result<(), sqlx::Error> {
    let sql = format!(
        "INSERT INTO {table} (user_id, email, name, updated_at, deleted) VALUES ($1, '', '', $2, 1)
         ON CONFLICT (user_id) DO UPDATE SET email = '', name = '', deleted = 1"
    );
    sqlx::query(AssertSqlSafe(sql))
        .bind(v.id)
        .bind(v.updated_at)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use sqlx::{Connection, Row};

    use super::*;

    fn v<'a>(name: &'a str, at: &'a str) -> Version<'a> {
        Version {
            id: "u1",
            email: "u1@x.io",
            name,
            updated_at: at,
        }
    }

    async fn name(c: &mut AnyConnection) -> (String, i64) {
        let r = sqlx::query("SELECT name, deleted FROM people WHERE user_id = 'u1'")
            .fetch_one(&mut *c)
            .await
            .expect("row");
        (
            r.try_get("name").expect("name"),
            r.try_get("deleted").expect("deleted"),
        )
    }

    #[tokio::test]
    async fn the_newest_version_wins_and_a_deletion_is_for_good() {
        crate::db::install_drivers();
        let mut c = AnyConnection::connect("sqlite::memory:")
            .await
            .expect("sqlite");
        sqlx::query(
            "CREATE TABLE people (user_id TEXT PRIMARY KEY, email TEXT NOT NULL, name TEXT NOT NULL,
             updated_at TEXT NOT NULL, deleted INTEGER NOT NULL DEFAULT 0)",
        )
        .execute(&mut c)
        .await
        .expect("table");
        keep(&mut c, "people", &v("Two", "2026-01-02"))
            .await
            .expect("keep");
        keep(&mut c, "people", &v("One", "2026-01-01"))
            .await
            .expect("keep");
        assert_eq!(
            name(&mut c).await,
            ("Two".into(), 0),
            "a late, older version changes nothing"
        );
        keep(&mut c, "people", &v("Three", "2026-01-03"))
            .await
            .expect("keep");
        assert_eq!(name(&mut c).await, ("Three".into(), 0));
        forget(&mut c, "people", &v("Three", "2026-01-03"))
            .await
            .expect("forget");
        keep(&mut c, "people", &v("Four", "2026-01-04"))
            .await
            .expect("keep");
        assert_eq!(
            name(&mut c).await,
            (String::new(), 1),
            "no update brings it back"
        );
    }
}
