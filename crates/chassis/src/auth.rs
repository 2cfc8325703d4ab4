//! Verifying access tokens: EdDSA JWTs checked against the auth service's
//! JWKS (fetched through discovery and cached; refetched when an unknown key
//! id appears), and the [`AuthUser`] extractor every service uses.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::extract::{FromRef, FromRequestParts};
use axum::http::header;
use axum::http::request::Parts;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

use crate::Problem;

/// What an access token says.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    pub email: String,
    /// `customer` or `admin`.
    pub role: String,
    pub iat: i64,
    pub exp: i64,
    /// Who issued it (`token_issuer`).
    pub iss: String,
    /// Whom it is for (`token_audience`).
    pub aud: String,
}

/// The `iss` and `aud` every access token must carry.
#[derive(Debug, Clone)]
pub struct Audience {
    pub issuer: String,
    pub audience: String,
    /// How often the keys are read again, in seconds.
    pub jwks_refresh_secs: i64,
}

impl Audience {
    pub fn of(config: &crate::Config) -> Self {
        Self {
            issuer: config.token_issuer.clone(),
            audience: config.token_audience.clone(),
            jwks_refresh_secs: i64::try_from(config.jwks_refresh_secs.max(1)).unwrap_or(60),
        }
    }
}

/// Checks access tokens.
pub struct Verifier {
    /// Calls auth for its keys (none: the keys were given).
    calls: Option<bazaar_mesh::Client>,
    validation: Validation,
    keys: RwLock<HashMap<String, DecodingKey>>,
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
    /// Tokens already verified, with their claims. A token's signature
    /// check costs tens of microseconds and the same token arrives on every
    /// call of a session, at every hop; its bytes decide the outcome, so a
    /// hit needs only the expiry checked again.
    verified: Mutex<HashMap<String, Arc<Claims>, TailHash>>,
    /// Unix time of the last JWKS read (or attempt): the keys are read
    /// again every `refresh_secs`, so a retired key stops verifying.
    fetched_at: std::sync::atomic::AtomicI64,
    refresh_secs: i64,
}

/// Hashes a token by its last bytes only: they are its signature, random
/// and unique to it, and hashing all ~350 bytes on every call costs more
/// than the rest of the lookup. Only verified tokens are stored, so the
/// tails cannot be chosen to collide.
#[derive(Default, Clone)]
struct TailHash(std::hash::RandomState);

impl std::hash::BuildHasher for TailHash {
    type Hasher = TailHasher;

    fn build_hasher(&self) -> TailHasher {
        TailHasher(self.0.build_hasher())
    }
}

struct TailHasher(std::hash::DefaultHasher);

impl std::hash::Hasher for TailHasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.write(&bytes[bytes.len().saturating_sub(16)..]);
    }

    fn finish(&self) -> u64 {
        self.0.finish()
    }
}

/// Most tokens remembered; the memory is dropped whole when full.
const VERIFIED_CAPACITY: usize = 10_000;

/// Seconds a token is still accepted after its `exp`, for clocks that
/// disagree a little.
const LEEWAY_SECS: i64 = 60;

/// Whether a token whose `exp` is `exp` has expired at the Unix time `now`.
fn expired_at(exp: i64, now: i64) -> bool {
    exp + LEEWAY_SECS < now
}

/// The PKCS#8 v1 prefix of an Ed25519 private key; the 32 secret bytes
/// follow it.
pub const ED25519_PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// Unknown key ids trigger at most one JWKS fetch per this interval.
const REFETCH_INTERVAL: Duration = Duration::from_secs(1);

impl Verifier {
    /// Keys come from the `auth` service, called through `calls`.
    pub fn remote(calls: bazaar_mesh::Client, audience: Audience) -> Self {
        Self {
            calls: Some(calls),
            validation: validation(&audience),
            keys: RwLock::default(),
            last_fetch: tokio::sync::Mutex::new(None),
            verified: Mutex::default(),
            fetched_at: std::sync::atomic::AtomicI64::new(0),
            refresh_secs: audience.jwks_refresh_secs,
        }
    }

    /// Keys are given (the auth service verifies its own tokens).
    pub fn local(jwks: &JwkSet, audience: Audience) -> Self {
        let v = Self {
            calls: None,
            validation: validation(&audience),
            keys: RwLock::default(),
            last_fetch: tokio::sync::Mutex::new(None),
            verified: Mutex::default(),
            fetched_at: std::sync::atomic::AtomicI64::new(0),
            refresh_secs: audience.jwks_refresh_secs,
        };
        v.set_keys(jwks);
        v
    }

    /// Replaces the cached keys.
    pub fn set_keys(&self, jwks: &JwkSet) {
        let keys: HashMap<String, DecodingKey> = jwks
            .keys
            .iter()
            .filter_map(|jwk| Some((jwk.common.key_id.clone()?, DecodingKey::from_jwk(jwk).ok()?)))
            .collect();
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = keys;
        self.fetched_at.store(
            time::OffsetDateTime::now_utc().unix_timestamp(),
            std::sync::atomic::Ordering::Relaxed,
        );
        self.verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    fn key(&self, kid: &str) -> Option<DecodingKey> {
        self.keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(kid)
            .cloned()
    }

    /// The claims of a valid token; 401 for anything else, 503 when the
    /// keys cannot be fetched.
    pub async fn verify(&self, token: &str) -> Result<Claims, Problem> {
        self.verify_shared(token).await.map(Arc::unwrap_or_clone)
    }

    /// [`Verifier::verify`], sharing the remembered claims.
    pub async fn verify_shared(&self, token: &str) -> Result<Arc<Claims>, Problem> {
        self.verify_at(token, time::OffsetDateTime::now_utc().unix_timestamp())
            .await
    }

    /// [`Verifier::verify_shared`] at the Unix time `now`.
    async fn verify_at(&self, token: &str, now: i64) -> Result<Arc<Claims>, Problem> {
        if self.calls.is_some()
            && now - self.fetched_at.load(std::sync::atomic::Ordering::Relaxed) >= self.refresh_secs
        {
            self.refresh_stale(now).await;
        }
        let remembered = self
            .verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(token)
            .cloned();
        if let Some(claims) = remembered {
            // Its bytes were verified: only the time can have changed.
            return if expired_at(claims.exp, now) {
                Err(expired())
            } else {
                Ok(claims)
            };
        }
        // An expired token is refused before its signature is checked:
        // clients that keep sending one (a tab left open, a retry loop)
        // would otherwise cost a signature check on every call. Refusing
        // on the unverified claims grants nothing.
        if jsonwebtoken::dangerous::insecure_decode_claims::<Expiry>(token)
            .is_ok_and(|c| expired_at(c.exp, now))
        {
            return Err(expired());
        }
        // Boxed: the first check of a token (and a key fetch) is rare, and
        // its future would otherwise swell every caller's.
        let claims = Arc::new(Box::pin(self.verify_signature(token)).await?);
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if verified.len() >= VERIFIED_CAPACITY {
            verified.clear();
        }
        verified.insert(token.to_owned(), Arc::clone(&claims));
        Ok(claims)
    }

    async fn verify_signature(&self, token: &str) -> Result<Claims, Problem> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| Problem::invalid_token("malformed token"))?;
        if header.alg != Algorithm::EdDSA {
            return Err(Problem::invalid_token("unsupported token algorithm"));
        }
        let kid = header
            .kid
            .ok_or_else(|| Problem::invalid_token("token has no key id"))?;
        let key = match self.key(&kid) {
            Some(k) => k,
            None => {
                self.refetch().await?;
                self.key(&kid)
                    .ok_or_else(|| Problem::invalid_token("token signed by an unknown key"))?
            }
        };
        jsonwebtoken::decode::<Claims>(token, &key, &self.validation)
            .map(|d| d.claims)
            .map_err(|e| {
                tracing::debug!(error = %e, "token refused");
                Problem::invalid_token("invalid token")
            })
    }

    /// Reads the keys again after `refresh_secs` (one caller does; the
    /// others go on with the keys they have). A failed read keeps them,
    /// and is tried again after another period.
    async fn refresh_stale(&self, now: i64) {
        let Ok(mut last) = self.last_fetch.try_lock() else {
            return;
        };
        self.fetched_at
            .store(now, std::sync::atomic::Ordering::Relaxed);
        *last = Some(Instant::now());
        if let Err(e) = self.fetch_keys().await {
            tracing::warn!(detail = %e.detail, "cannot read the signing keys again; keeping the ones known");
        }
    }

    /// For a token of an unknown key: reads the keys, at most once per
    /// [`REFETCH_INTERVAL`] (keys a client makes up cannot make it call
    /// auth more often). A caller that finds a read too recent waits for
    /// the interval to pass rather than refusing a key made a moment ago;
    /// callers that waited while another read are answered by that read.
    async fn refetch(&self) -> Result<(), Problem> {
        if self.calls.is_none() {
            return Ok(());
        }
        let asked = Instant::now();
        let mut last = self.last_fetch.lock().await;
        if let Some(t) = *last {
            if t > asked {
                return Ok(());
            }
            let since = t.elapsed();
            if since < REFETCH_INTERVAL {
                tokio::time::sleep(REFETCH_INTERVAL - since).await;
            }
        }
        *last = Some(Instant::now());
        self.fetch_keys().await
    }

    /// Reads auth's JWKS and takes its keys.
    async fn fetch_keys(&self) -> Result<(), Problem> {
        let Some(calls) = &self.calls else {
            return Ok(());
        };
        let fetched = async {
            let reply = calls
                .get("auth", &[".well-known", "jwks.json"])
                .timeout(Duration::from_secs(5))
                .send()
                .await?;
            if reply.status != http::StatusCode::OK {
                return Err(reply.unexpected());
            }
            reply.json::<JwkSet>()
        }
        .await;
        match fetched {
            Ok(jwks) => {
                self.set_keys(&jwks);
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "JWKS fetch failed");
                Err(Problem::unavailable(
                    "cannot verify tokens: the auth service is unavailable",
                ))
            }
        }
    }
}

/// EdDSA only; `exp`, `sub`, `iss` and `aud` required, the last two equal
/// to the configured ones.
fn validation(a: &Audience) -> Validation {
    let mut v = Validation::new(Algorithm::EdDSA);
    v.leeway = LEEWAY_SECS.unsigned_abs();
    v.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
    v.set_issuer(&[&a.issuer]);
    v.set_audience(&[&a.audience]);
    v
}

/// The expiry of a token not yet verified.
#[derive(Deserialize)]
struct Expiry {
    exp: i64,
}

fn expired() -> Problem {
    Problem::invalid_token("token expired")
}

/// The caller, from a verified `Authorization: Bearer` token. Rejects with 401.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthUser {
    pub id: String,
    pub email: String,
    pub role: String,
}

impl AuthUser {
    /// The caller of a request with these headers (HTTP, or gRPC
    /// metadata): its bearer token, verified. 401 without a valid one.
    pub async fn from_headers(
        verifier: &Verifier,
        headers: &axum::http::HeaderMap,
    ) -> Result<Self, Problem> {
        let token =
            bearer(headers)?.ok_or_else(|| Problem::unauthorized("missing bearer token"))?;
        let claims = verifier.verify(token).await?;
        Ok(AuthUser {
            id: claims.sub,
            email: claims.email,
            role: claims.role,
        })
    }

    pub fn is_admin(&self) -> bool {
        self.role == "admin"
    }

    /// 403 unless the caller is an admin.
    pub fn require_admin(&self) -> Result<(), Problem> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(Problem::forbidden("admin role required"))
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header, if there is one.
pub fn bearer(headers: &axum::http::HeaderMap) -> Result<Option<&str>, Problem> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| Problem::invalid_token("malformed Authorization header"))?;
    match value.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(Some(token.trim()))
        }
        _ => Err(Problem::unauthorized(
            "expected Authorization: Bearer <token>",
        )),
    }
}

impl<S> FromRequestParts<S> for AuthUser
where
    Arc<Verifier>: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        AuthUser::from_headers(&Arc::<Verifier>::from_ref(state), &parts.headers).await
    }
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::jwk::{Jwk, JwkSet};
    use jsonwebtoken::{EncodingKey, Header};

    use super::*;

    /// A PKCS#8 Ed25519 key from a fixed secret.
    fn key(secret: u8) -> EncodingKey {
        let mut der = ED25519_PKCS8_PREFIX.to_vec();
        der.extend_from_slice(&[secret; 32]);
        EncodingKey::from_ed_der(&der)
    }

    fn verifier() -> Verifier {
        let mut jwk = Jwk::from_encoding_key(&key(7), Algorithm::EdDSA).expect("jwk");
        jwk.common.key_id = Some("k1".into());
        Verifier::local(&JwkSet { keys: vec![jwk] }, audience())
    }

    fn audience() -> Audience {
        Audience {
            issuer: "bazaar".into(),
            audience: "bazaar-api".into(),
            jwks_refresh_secs: 60,
        }
    }

    fn token(secret: u8, exp: i64) -> String {
        token_for(secret, exp, "bazaar", "bazaar-api")
    }

    fn token_for(secret: u8, exp: i64, iss: &str, aud: &str) -> String {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some("k1".into());
        let claims = Claims {
            sub: "u1".into(),
            email: "u1@example.com".into(),
            role: "customer".into(),
            iat: exp - 900,
            exp,
            iss: iss.into(),
            aud: aud.into(),
        };
        jsonwebtoken::encode(&header, &claims, &key(secret)).expect("sign")
    }

    fn now() -> i64 {
        time::OffsetDateTime::now_utc().unix_timestamp()
    }

    #[tokio::test]
    async fn a_remembered_token_is_refused_once_it_expires() {
        let v = verifier();
        let exp = now() + 900;
        let t = token(7, exp);
        assert_eq!(v.verify(&t).await.expect("valid").sub, "u1");
        // Within the leeway it still passes; past it, the remembered claims
        // refuse it (the signature check, run at the real time, would pass).
        assert!(v.verify_at(&t, exp + LEEWAY_SECS).await.is_ok());
        let refused = v
            .verify_at(&t, exp + LEEWAY_SECS + 1)
            .await
            .expect_err("expired");
        assert_eq!(refused.status, 401);
        assert_eq!(refused.detail, "token expired");
    }

    #[tokio::test]
    async fn an_expired_token_is_refused_before_its_signature_is_checked() {
        let v = verifier();
        // Signed by another key: a signature check would call it invalid.
        let forged_and_old = token(9, now() - LEEWAY_SECS - 10);
        let refused = v.verify(&forged_and_old).await.expect_err("expired");
        assert_eq!(refused.detail, "token expired");
        let forged = token(9, now() + 900);
        let refused = v.verify(&forged).await.expect_err("forged");
        assert!(
            refused.detail.starts_with("invalid token"),
            "{}",
            refused.detail
        );
        // Expired, but within the leeway: still accepted.
        assert!(v.verify(&token(7, now() - 5)).await.is_ok());
    }

    #[tokio::test]
    async fn tokens_carry_no_iss_or_aud_is_fixed_both_are_checked() {
        let v = verifier();
        let exp = now() + 900;
        assert!(v.verify(&token(7, exp)).await.is_ok());
        for (iss, aud) in [("evil", "bazaar-api"), ("bazaar", "other-api"), ("", "")] {
            let refused = v
                .verify(&token_for(7, exp, iss, aud))
                .await
                .expect_err("wrong iss or aud");
            assert_eq!(refused.status, 401, "{iss}/{aud}");
        }
        // A token without the claims at all (as issued before) is refused.
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some("k1".into());
        let bare = serde_json::json!({"sub": "u1", "email": "e", "role": "admin", "iat": exp - 900, "exp": exp});
        let bare = jsonwebtoken::encode(&header, &bare, &key(7)).expect("sign");
        assert_eq!(v.verify(&bare).await.expect_err("bare").status, 401);
    }
}
