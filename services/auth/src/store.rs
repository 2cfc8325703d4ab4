//! Users and refresh tokens in the auth database.

use bazaar_chassis::Config;
use bazaar_chassis::db::Db;
use bazaar_contracts::User;
use bazaar_contracts::topics::{USER, USER_REGISTERED};
use sqlx::{AnyPool, Row};

use crate::AuthError;

/// A stored user with its password hash.
pub struct Credentials {
    pub user: User,
    pub password_hash: String,
}

fn user_from(row: &sqlx::any::AnyRow) -> Result<User, sqlx::Error> {
    Ok(User {
        id: row.try_get("id")?,
        email: row.try_get("email")?,
        name: row.try_get("name")?,
        role: row.try_get("role")?,
        created_at: row.try_get("created_at")?,
    })
}

/// Inserts a user; 409 if the email is taken. Returns whether it was created.
/// Stores a new user and, in the same transaction, the `user.registered`
/// event for the outbox.
pub async fn insert_user(db: &AnyPool, user: &User, password_hash: &str) -> Result<(), AuthError> {
    let mut tx = db.begin().await?;
    let r = sqlx::query(
        "INSERT INTO users (id, email, name, role, password_hash, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&user.id)
    .bind(&user.email)
    .bind(&user.name)
    .bind(&user.role)
    .bind(password_hash)
    .bind(&user.created_at)
    .execute(&mut *tx)
    .await;
    match r {
        Ok(_) => {}
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
            return Err(AuthError::EmailTaken);
        }
        Err(e) => return Err(e.into()),
    }
    let event = bazaar_bus::Envelope::new(USER_REGISTERED, user)
        .map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    bazaar_chassis::messaging::enqueue(&mut tx, &[(USER, USER_REGISTERED, &event)]).await?;
    tx.commit().await?;
    Ok(())
}

/// Removes an account and its refresh tokens (nothing if it is gone).
pub async fn delete_account(tx: &mut sqlx::AnyConnection, id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM refresh_tokens WHERE user_id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM users WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

pub async fn by_email(db: &AnyPool, email: &str) -> Result<Option<Credentials>, AuthError> {
    let row = sqlx::query(
        "SELECT id, email, name, role, created_at, password_hash FROM users WHERE email = $1",
    )
    .bind(email)
    .fetch_optional(db)
    .await?;
    row.map(|r| {
        Ok(Credentials {
            user: user_from(&r)?,
            password_hash: r.try_get("password_hash")?,
        })
    })
    .transpose()
}

pub async fn by_id(db: &AnyPool, id: &str) -> Result<Option<User>, AuthError> {
    let row = sqlx::query("SELECT id, email, name, role, created_at FROM users WHERE id = $1")
        .bind(id)
        .fetch_optional(db)
        .await?;
    Ok(row.map(|r| user_from(&r)).transpose()?)
}

/// Stores a refresh token (by its hash) in `family`.
pub async fn insert_refresh(
    db: &AnyPool,
    hash: &str,
    user_id: &str,
    family: &str,
    expires_at: i64,
) -> Result<(), AuthError> {
    sqlx::query("INSERT INTO refresh_tokens (token_hash, user_id, expires_at, revoked, family) VALUES ($1, $2, $3, 0, $4)")
        .bind(hash)
        .bind(user_id)
        .bind(expires_at)
        .bind(family)
        .execute(db)
        .await
        .map_err(|e| match e {
            // The account was deleted (user.profile.deleted) while the
            // password was being checked: as if it never existed.
            sqlx::Error::Database(d) if d.is_foreign_key_violation() => {
                AuthError::InvalidCredentials
            }
            other => other.into(),
        })?;
    Ok(())
}

/// What presenting a refresh token did.
#[derive(Debug, PartialEq, Eq)]
pub enum Refresh {
    /// It was live; now it is spent. The next token joins its family.
    Spent { user_id: String, family: String },
    /// It was spent before: it leaked. Its whole family is revoked.
    Reused,
    /// Unknown or expired.
    Invalid,
}

/// Spends a live refresh token: each token works once, and presenting a
/// spent one revokes every token descended from the same login.
pub async fn consume_refresh(db: &AnyPool, hash: &str, now: i64) -> Result<Refresh, AuthError> {
    let spent = sqlx::query(
        "UPDATE refresh_tokens SET revoked = 1 WHERE token_hash = $1 AND revoked = 0 AND expires_at > $2 RETURNING user_id, family",
    )
    .bind(hash)
    .bind(now)
    .fetch_optional(db)
    .await?;
    if let Some(r) = spent {
        return Ok(Refresh::Spent {
            user_id: r.try_get("user_id")?,
            family: r.try_get("family")?,
        });
    }
    let reused =
        sqlx::query("SELECT family FROM refresh_tokens WHERE token_hash = $1 AND revoked = 1")
            .bind(hash)
            .fetch_optional(db)
            .await?;
    let Some(row) = reused else {
        return Ok(Refresh::Invalid);
    };
    let family: String = row.try_get("family")?;
    let revoked =
        sqlx::query("UPDATE refresh_tokens SET revoked = 1 WHERE family = $1 AND revoked = 0")
            .bind(&family)
            .execute(db)
            .await?
            .rows_affected();
    tracing::warn!(
        revoked,
        "a spent refresh token was presented again; its family is revoked"
    );
    Ok(Refresh::Reused)
}

/// Creates the admin account on first start. Without a configured password
/// one is generated and printed once, when the account is created.
pub async fn ensure_admin(
    db: &Db,
    config: &Config,
    hasher: &crate::secrets::Hasher,
) -> anyhow::Result<()> {
    let email = config
        .admin_email
        .clone()
        .unwrap_or_else(|| "admin@bazaar.local".into())
        .trim()
        .to_lowercase();
    if by_email(&db.read, &email).await?.is_some() {
        return Ok(());
    }
    let (password, generated) = match &config.admin_password {
        Some(p) => (p.clone(), false),
        None => (crate::secrets::random_token(18), true),
    };
    anyhow::ensure!(
        password.chars().count() >= crate::domain::MIN_PASSWORD,
        "the admin password must be at least 8 characters"
    );
    let hash = hasher.hash(password.clone()).await?;
    let user = User {
        id: uuid::Uuid::now_v7().to_string(),
        email: email.clone(),
        name: "Administrator".into(),
        role: "admin".into(),
        created_at: bazaar_chassis::now(),
    };
    match insert_user(&db.write, &user, &hash).await {
        Ok(()) => {
            if generated {
                bazaar_chassis::telemetry::say(&format!(
                    "admin account: {email} / password: {password}  (shown once; set BAZAAR_ADMIN_PASSWORD to choose it)"
                ));
            }
            tracing::info!(%email, "admin account created");
            Ok(())
        }
        // Another replica created it first.
        Err(AuthError::EmailTaken) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A login whose account was deleted while its password was checked
    /// gets 401, not a database error (the refresh token's user is gone).
    #[tokio::test]
    async fn a_refresh_token_for_a_deleted_account_is_refused_as_credentials() {
        let dir = std::env::temp_dir().join(format!("auth-store-{}", uuid::Uuid::now_v7()));
        let config = bazaar_chassis::Config {
            data_dir: dir.clone(),
            ..Default::default()
        };
        let db = bazaar_chassis::db::connect(&config, "auth", &crate::MIGRATOR)
            .await
            .expect("database");
        let outcome = insert_refresh(&db.write, "hash", "no-such-user", "family", i64::MAX).await;
        assert!(
            matches!(outcome, Err(AuthError::InvalidCredentials)),
            "{outcome:?}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
