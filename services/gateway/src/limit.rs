//! Token buckets: route rate limits (per client address or user) and the
//! login brute-force guard (failures per account and per address).

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const SHARDS: usize = 16;
/// Buckets per shard before full (idle) ones are dropped.
const SHARD_CAP: usize = 8192;

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
    hasher: RandomState,
    shards: Vec<Mutex<HashMap<String, Bucket>>>,
}

impl Default for Buckets {
    fn default() -> Self {
        Self {
            hasher: RandomState::new(),
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
        let shard = &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS];
        let mut map = shard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() >= SHARD_CAP && !map.contains_key(key) {
            map.retain(|_, b| {
                b.tokens + now.duration_since(b.at).as_secs_f64() * rate < b.capacity
            });
        }
        // Copied out and back: the key is copied only for a new bucket.
        let mut bucket = map.get(key).copied().unwrap_or(Bucket {
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
        match map.get_mut(key) {
            Some(b) => *b = bucket,
            None => {
                map.insert(key.to_owned(), bucket);
            }
        }
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
}
