//! Secrets at rest: argon2id password hashes (computed off the async
//! threads) and random tokens, stored only as hashes.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bazaar_chassis::Config;
use sha2::{Digest, Sha256};

use crate::AuthError;

/// `n` random bytes, base64url.
pub fn random_token(n: usize) -> String {
    let bytes: Vec<u8> = (0..n).map(|_| rand::random::<u8>()).collect();
    URL_SAFE_NO_PAD.encode(bytes)
}

/// SHA-256, base64url: how refresh tokens are stored.
pub fn sha256(s: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(s.as_bytes()))
}

fn argon2(config: &Config) -> Result<Argon2<'static>, AuthError> {
    let params = Params::new(config.argon2_memory_kib, config.argon2_iterations, 1, None)
        .map_err(|e| AuthError::Internal(format!("argon2 parameters: {e}")))?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
}

/// Password hashing on a bounded pool: argon2 is deliberately slow and
/// takes `argon2_memory_kib` per hash, so at most `argon2_concurrency`
/// run at once, at most `argon2_queue` more wait, and the rest are
/// refused (503 with `Retry-After`) instead of taking memory and cores
/// from everything else.
///
/// The hashes run on a fixed set of threads of the pool's own rather
/// than tokio's blocking pool, which starts a new thread whenever none is
/// idle at the instant a task arrives: few threads, few per-thread
/// allocator caches holding 19 MiB blocks.
pub struct Hasher {
    argon: Argon2<'static>,
    jobs: std::sync::mpsc::Sender<Job>,
    permits: tokio::sync::Semaphore,
    waiting: std::sync::atomic::AtomicUsize,
    queue: usize,
}

type Job = Box<dyn FnOnce() + Send>;

/// A place in the queue, given back however the wait ends.
struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Hasher {
    pub fn new(config: &Config) -> Result<Self, AuthError> {
        let concurrency = match config.argon2_concurrency {
            0 => std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
            n => n,
        };
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        let queue = std::sync::Arc::new(std::sync::Mutex::new(queue));
        for i in 0..concurrency {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("argon2-{i}"))
                .spawn(move || {
                    loop {
                        // Ends when the hasher (the sender) is gone.
                        let job = match queue.lock() {
                            Ok(q) => q.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    }
                })
                .map_err(|e| AuthError::Internal(format!("cannot start a hashing thread: {e}")))?;
        }
        Ok(Self {
            argon: argon2(config)?,
            jobs,
            permits: tokio::sync::Semaphore::new(concurrency),
            waiting: std::sync::atomic::AtomicUsize::new(0),
            queue: config.argon2_queue,
        })
    }

    /// Runs `work` on the pool, or refuses when the queue is full.
    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, AuthError> {
        let permit = match self.permits.try_acquire() {
            Ok(permit) => permit,
            Err(_) => {
                use std::sync::atomic::Ordering::Relaxed;
                let place = Waiting(&self.waiting);
                if self.waiting.fetch_add(1, Relaxed) >= self.queue {
                    return Err(AuthError::Busy);
                }
                let permit = self
                    .permits
                    .acquire()
                    .await
                    .map_err(|e| AuthError::Internal(e.to_string()))?;
                drop(place);
                permit
            }
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(work());
            }))
            .map_err(|_| AuthError::Internal("the hashing pool has stopped".into()))?;
        let done = rx
            .await
            .map_err(|_| AuthError::Internal("a hashing thread failed".into()));
        drop(permit);
        done
    }

    /// An argon2id hash of `password`.
    pub async fn hash(&self, password: String) -> Result<String, AuthError> {
        let argon = self.argon.clone();
        self.run(move || {
            let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
            argon
                .hash_password(password.as_bytes(), &salt)
                .map(|h| h.to_string())
        })
        .await?
        .map_err(|e| AuthError::Internal(e.to_string()))
    }

    /// Checks a password with the parameters stored in its hash.
    pub async fn verify(&self, password: String, hash: String) -> Result<bool, AuthError> {
        self.run(move || {
            let parsed =
                PasswordHash::new(&hash).map_err(|e| AuthError::Internal(e.to_string()))?;
            Ok(Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok())
        })
        .await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn password_hashing_floods_wait_in_a_bounded_queue_then_are_refused() {
        let config = Config {
            argon2_memory_kib: 256,
            argon2_iterations: 1,
            argon2_concurrency: 1,
            argon2_queue: 2,
            ..Config::default()
        };
        let hasher = std::sync::Arc::new(Hasher::new(&config).expect("hasher"));
        // Hold the one permit so that every caller queues.
        let held = hasher.permits.acquire().await.expect("permit");
        let queued: Vec<_> = (0..2)
            .map(|_| {
                let h = hasher.clone();
                tokio::spawn(async move { h.hash("password1".into()).await })
            })
            .collect();
        while hasher.waiting.load(std::sync::atomic::Ordering::Relaxed) < 2 {
            tokio::task::yield_now().await;
        }
        assert!(matches!(
            hasher.hash("password1".into()).await,
            Err(AuthError::Busy)
        ));
        drop(held);
        for q in queued {
            let hash = q.await.expect("task").expect("hashed");
            assert!(
                hasher
                    .verify("password1".into(), hash)
                    .await
                    .expect("verify")
            );
        }
        assert_eq!(hasher.waiting.load(std::sync::atomic::Ordering::Relaxed), 0);
    }
}
