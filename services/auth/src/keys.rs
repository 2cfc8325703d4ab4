//! Ed25519 signing keys, kept in the database so that restarts and
//! replicas keep accepting tokens already issued.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bazaar_chassis::auth::ED25519_PKCS8_PREFIX;
use jsonwebtoken::jwk::{Jwk, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use std::sync::Arc;

use sqlx::{AnyPool, Row};

/// The key this instance signs with: the newest stored one, read again
/// every [`RELOAD_EVERY`] so that a rotation made on one replica reaches
/// the others.
pub struct SigningKeys {
    current: std::sync::RwLock<Arc<SigningKey>>,
}

/// One private key and its id.
pub struct SigningKey {
    pub kid: String,
    key: EncodingKey,
}

/// How often every auth instance reads the newest key again.
pub const RELOAD_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// A stored key, as `GET /auth/keys` lists it (no secret in it).
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct KeyInfo {
    pub kid: String,
    pub created_at: String,
    /// Whether new tokens are signed with it (the newest).
    pub signing: bool,
}

/// Why a retirement was refused.
#[derive(Debug, thiserror::Error)]
pub enum RetireError {
    #[error("no key is old enough to retire: {0} still has tokens that may be in use until {1}")]
    TooSoon(String, String),
    #[error(transparent)]
    Db(#[from] anyhow::Error),
}

impl SigningKeys {
    /// The newest stored key, or a new one stored now.
    pub async fn load_or_create(db: &AnyPool) -> anyhow::Result<Self> {
        let key = match newest(db).await? {
            Some(k) => k,
            None => {
                insert(db).await?;
                newest(db)
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("signing key vanished"))?
            }
        };
        Ok(Self {
            current: std::sync::RwLock::new(Arc::new(key)),
        })
    }

    /// Reads the newest key again (after a rotation, here or elsewhere).
    pub async fn reload(&self, db: &AnyPool) -> anyhow::Result<()> {
        if let Some(k) = newest(db).await? {
            let mut cur = self.current.write().unwrap_or_else(|e| e.into_inner());
            if cur.kid != k.kid {
                tracing::info!(kid = %k.kid, "signing with a new key");
                *cur = Arc::new(k);
            }
        }
        Ok(())
    }

    fn current(&self) -> Arc<SigningKey> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Signs claims as an EdDSA JWT carrying the current key's id.
    pub fn sign(
        &self,
        claims: &impl serde::Serialize,
    ) -> Result<String, jsonwebtoken::errors::Error> {
        let key = self.current();
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(key.kid.clone());
        jsonwebtoken::encode(&header, claims, &key.key)
    }
}

/// Stores a new key; it signs from now on (every instance within
/// [`RELOAD_EVERY`]). The older keys stay in the JWKS, so tokens they
/// signed are still accepted until they are retired.
pub async fn rotate(db: &AnyPool) -> anyhow::Result<String> {
    insert(db).await
}

/// Deletes every key but the newest whose tokens can no longer be in use:
/// a key stopped signing when the next one was made, and its last tokens
/// expire `token_ttl` (plus the reload interval and the verifiers' leeway)
/// later. `force` retires them all at once, logging out everyone who
/// holds a token they signed. Returns the retired key ids.
pub async fn retire(
    db: &AnyPool,
    token_ttl: std::time::Duration,
    force: bool,
) -> Result<Vec<String>, RetireError> {
    let keys = list(db).await?;
    let margin = token_ttl + RELOAD_EVERY + std::time::Duration::from_secs(60);
    let cutoff = bazaar_chassis::ago(margin);
    let mut retired = Vec::new();
    let mut blocked = None;
    // Each key but the newest, with the time its successor was made.
    for pair in keys.windows(2) {
        let (old, successor) = (&pair[0], &pair[1]);
        if force || successor.created_at <= cutoff {
            sqlx::query("DELETE FROM signing_keys WHERE kid = $1")
                .bind(&old.kid)
                .execute(db)
                .await
                .map_err(anyhow::Error::from)?;
            retired.push(old.kid.clone());
        } else if blocked.is_none() {
            let until = bazaar_chassis::timestamp_after(&successor.created_at, margin);
            blocked = Some((old.kid.clone(), until));
        }
    }
    match blocked {
        Some((kid, until)) if retired.is_empty() => Err(RetireError::TooSoon(kid, until)),
        _ => Ok(retired),
    }
}

/// Every stored key, oldest first.
pub async fn list(db: &AnyPool) -> anyhow::Result<Vec<KeyInfo>> {
    let rows = sqlx::query("SELECT kid, created_at FROM signing_keys ORDER BY created_at, kid")
        .fetch_all(db)
        .await?;
    let n = rows.len();
    rows.into_iter()
        .enumerate()
        .map(|(i, row)| {
            Ok(KeyInfo {
                kid: row.try_get("kid")?,
                created_at: row.try_get("created_at")?,
                signing: i + 1 == n,
            })
        })
        .collect()
}

async fn insert(db: &AnyPool) -> anyhow::Result<String> {
    let secret: [u8; 32] = rand::random();
    let mut der = ED25519_PKCS8_PREFIX.to_vec();
    der.extend_from_slice(&secret);
    let kid = uuid::Uuid::now_v7().to_string();
    sqlx::query("INSERT INTO signing_keys (kid, private_der, created_at) VALUES ($1, $2, $3)")
        .bind(&kid)
        .bind(STANDARD.encode(&der))
        .bind(bazaar_chassis::now())
        .execute(db)
        .await?;
    Ok(kid)
}

async fn newest(db: &AnyPool) -> anyhow::Result<Option<SigningKey>> {
    let row = sqlx::query(
        "SELECT kid, private_der FROM signing_keys ORDER BY created_at DESC, kid DESC LIMIT 1",
    )
    .fetch_optional(db)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let der = STANDARD.decode(row.try_get::<String, _>("private_der")?)?;
    Ok(Some(SigningKey {
        kid: row.try_get("kid")?,
        key: EncodingKey::from_ed_der(&der),
    }))
}

/// The public halves of every stored key.
pub async fn jwks(db: &AnyPool) -> anyhow::Result<JwkSet> {
    let rows = sqlx::query("SELECT kid, private_der FROM signing_keys ORDER BY created_at, kid")
        .fetch_all(db)
        .await?;
    let mut keys = Vec::with_capacity(rows.len());
    for row in rows {
        let der = STANDARD.decode(row.try_get::<String, _>("private_der")?)?;
        let mut jwk = Jwk::from_encoding_key(&EncodingKey::from_ed_der(&der), Algorithm::EdDSA)?;
        jwk.common.key_id = Some(row.try_get("kid")?);
        jwk.common.public_key_use = Some(PublicKeyUse::Signature);
        jwk.common.key_algorithm = Some(KeyAlgorithm::EdDSA);
        keys.push(jwk);
    }
    Ok(JwkSet { keys })
}
