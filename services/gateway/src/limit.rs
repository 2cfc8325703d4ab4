//! Token buckets: route rate limits (per client address or user) and the
//! login brute-force guard (failures per account and per address).
//!
//! What a client sends can become a key (an email it tries to log in
//! as), so a key is kept as a fixed-size digest, never as its text, and a
//! shard holds at most [`SHARD_CAP`] buckets: past it, full buckets (the
//! same as none) go first, then the least recently used.

use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bazaar_mesh::FastMap;

const SHARDS: usize = 16;
/// Buckets per shard before full (idle) ones are dropped.
const SHARD_CAP: usize = 8192;

/// A key's digest: 128 bits, a keyed SipHash's 64 (keys a client picks
/// cannot be made to collide in them without the secret key) and a seeded
/// foldhash's 64 (making a chance collision rarer still, at a fraction of
/// a second SipHash's cost on every request).
type Digest = u128;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
    capacity: f64,
}

/// What a bucket said.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    pub allowed: bool,
    pub limit: u32,
    pub remaining: u32,
    /// Seconds until the bucket is full again.
    pub reset_secs: u64,
    /// Seconds until one more request is allowed (0 when allowed now).
    pub retry_after_secs: u64,
}

pub struct Buckets {
    hashers: (RandomState, foldhash::fast::RandomState),
    shards: Vec<Mutex<FastMap<Digest, Bucket>>>,
}

impl Default for Buckets {
    fn default() -> Self {
        Self {
            hashers: (RandomState::new(), foldhash::fast::RandomState::default()),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }
}

impl Buckets {
    /// Takes `cost` tokens (0: only looks) from the bucket `key`, which
    /// holds `limit` tokens and refills them all over `per`. A request is
    /// allowed while at least one token is left.
    pub fn take(&self, key: &str, limit: u32, per: Duration, cost: f64) -> Decision {
        self.update(key, limit, per, cost, false)
    }

    /// Takes one token even when the bucket is empty (it goes no lower
    /// than empty): counting failures that already happened.
    pub fn charge(&self, key: &str, limit: u32, per: Duration) {
        self.update(key, limit, per, 1.0, true);
    }

    /// Refills the bucket, then takes `cost` if a request is allowed (or
    /// regardless, with `force`).
    fn update(&self, key: &str, limit: u32, per: Duration, cost: f64, force: bool) -> Decision {
        let capacity = f64::from(limit.max(1));
        let rate = capacity / per.as_secs_f64().max(0.001);
        let now = Instant::now();
        let key = (u128::from(self.hashers.0.hash_one(key)) << 64)
            | u128::from(self.hashers.1.hash_one(key));
        let shard = &self.shards[(key as usize) % SHARDS];
        let mut map = shard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() >= SHARD_CAP && !map.contains_key(&key) {
            evict(&mut map, now, rate);
        }
        let mut bucket = map.get(&key).copied().unwrap_or(Bucket {
            tokens: capacity,
            at: now,
            capacity,
        });
        bucket.capacity = capacity;
        bucket.tokens =
            (bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * rate).min(capacity);
        bucket.at = now;
        let allowed = bucket.tokens >= 1.0;
        if allowed || force {
            bucket.tokens = (bucket.tokens - cost).max(0.0);
        }
        map.insert(key, bucket);
        let tokens = bucket.tokens;
        Decision {
            allowed,
            limit,
            remaining: tokens.floor() as u32,
            reset_secs: ((capacity - tokens) / rate).ceil() as u64,
            retry_after_secs: if allowed {
                0
            } else {
                ((1.0 - tokens) / rate).ceil().max(1.0) as u64
            },
        }
    }
}

/// Makes room in a full shard: drops the buckets that have refilled
/// (forgetting them changes nothing), then, if a quarter is still not
/// free, the least recently used down to three quarters.
fn evict(map: &mut FastMap<Digest, Bucket>, now: Instant, rate: f64) {
    map.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < b.capacity);
    let keep = SHARD_CAP * 3 / 4;
    if map.len() > keep {
        let mut ages: Vec<Instant> = map.values().map(|b| b.at).collect();
        let cut = ages.len() - keep;
        let (_, oldest_kept, _) = ages.select_nth_unstable(cut);
        let oldest_kept = *oldest_kept;
        map.retain(|_, b| b.at >= oldest_kept);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_the_limit_then_refuses_with_a_wait() {
        let b = Buckets::default();
        let per = Duration::from_secs(60);
        for i in 0..5 {
            let d = b.take("k", 5, per, 1.0);
            assert!(d.allowed, "request {i}");
            assert_eq!(d.remaining, 4 - i);
        }
        let d = b.take("k", 5, per, 1.0);
        assert!(!d.allowed);
        assert!((1..=12).contains(&d.retry_after_secs), "{d:?}");
        assert_eq!(d.reset_secs, 60);
        assert!(b.take("other", 5, per, 1.0).allowed, "buckets are per key");
    }

    #[test]
    fn looking_costs_nothing_and_charges_count() {
        let b = Buckets::default();
        let per = Duration::from_secs(60);
        for _ in 0..10 {
            assert!(b.take("k", 2, per, 0.0).allowed);
        }
        b.charge("k", 2, per);
        b.charge("k", 2, per);
        assert!(!b.take("k", 2, per, 0.0).allowed);
        let fast = Duration::from_millis(20);
        b.charge("f", 1, fast);
        assert!(!b.take("f", 1, fast, 0.0).allowed);
        std::thread::sleep(Duration::from_millis(30));
        assert!(b.take("f", 1, fast, 0.0).allowed, "refills");
    }

    #[test]
    fn login_limiter_memory_is_bounded_the_oldest_keys_go_first() {
        let b = Buckets::default();
        let per = Duration::from_secs(3600);
        // A key an attacker keeps using, then far more new ones than fit.
        b.charge("hot", 5, per);
        for i in 0..SHARDS * SHARD_CAP * 3 {
            if i % 1000 == 0 {
                b.charge("hot", 5, per);
            }
            b.charge(&format!("login-account|{i}{}", "x".repeat(64)), 5, per);
        }
        let held: usize = b
            .shards
            .iter()
            .map(|s| s.lock().map(|m| m.len()).unwrap_or(0))
            .sum();
        assert!(held <= SHARDS * SHARD_CAP, "{held} buckets");
        // The recently used key kept its count.
        assert!(b.take("hot", 5, per, 0.0).remaining < 5);
        // Recent keys are still limited; the oldest were forgotten.
        let last = SHARDS * SHARD_CAP * 3 - 1;
        let recent = format!("login-account|{last}{}", "x".repeat(64));
        assert_eq!(b.take(&recent, 5, per, 0.0).remaining, 4);
        let first = format!("login-account|0{}", "x".repeat(64));
        assert_eq!(b.take(&first, 5, per, 0.0).remaining, 5);
    }
}
