//! Load-balancing strategies over a service's instances: round-robin,
//! least-connections, IP-hash (rendezvous hashing: sticky per client, and
//! only the clients of a departed instance move), smooth weighted
//! round-robin (weights from a `weight=N` tag), and power-of-two-choices on
//! latency. A pick returns a [`Lease`] that counts the request in flight
//! until it is dropped and records its latency when finished.

use std::net::IpAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng as _;

use crate::Instance;

/// How to choose among a service's instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    #[default]
    RoundRobin,
    LeastConnections,
    IpHash,
    Weighted,
    PowerOfTwo,
}

impl FromStr for Strategy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "round_robin" | "round-robin" => Self::RoundRobin,
            "least_connections" | "least-connections" => Self::LeastConnections,
            "ip_hash" | "ip-hash" => Self::IpHash,
            "weighted" => Self::Weighted,
            "p2c" | "power_of_two" => Self::PowerOfTwo,
            other => {
                return Err(format!(
                    "unknown balancing strategy {other:?}: expected round_robin, least_connections, ip_hash, weighted or p2c"
                ));
            }
        })
    }
}

/// What the balancer knows of one instance.
#[derive(Default)]
struct Stats {
    in_flight: AtomicUsize,
    /// Exponentially weighted moving average of latency, in microseconds
    /// (0: no sample yet).
    ewma_us: AtomicU64,
    /// Smooth weighted round-robin's running weight.
    current: Mutex<i64>,
}

/// Picks instances, keeping per-instance state (requests in flight,
/// latency, weighted round-robin's running weights) shared by every
/// strategy, so routes with different strategies see the same load.
#[derive(Default)]
pub struct Balancer {
    next: AtomicUsize,
    stats: Mutex<crate::FastMap<String, Arc<Stats>>>,
}

/// A chosen instance (its index in the list picked from). Counts as in
/// flight until dropped; call [`Lease::finish`] with the request's latency
/// to feed the latency-aware strategies.
pub struct Lease {
    pub index: usize,
    stats: Arc<Stats>,
}

impl Lease {
    /// Records how long the request took.
    pub fn finish(self, latency: Duration) {
        let sample = u64::try_from(latency.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let old = self.stats.ewma_us.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            (old * 4 + sample) / 5
        };
        self.stats.ewma_us.store(new, Ordering::Relaxed);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The weight an instance's tags give it (`weight=N`, default 1).
pub fn weight(instance: &Instance) -> i64 {
    instance
        .tags
        .iter()
        .find_map(|t| t.strip_prefix("weight=")?.parse::<i64>().ok())
        .filter(|w| *w > 0)
        .unwrap_or(1)
}

/// FNV-1a: a hash that is the same in every process, so gateway replicas
/// agree on where a client goes.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in *part {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // A final mix (splitmix64's), so near-equal inputs compare at random.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

impl Balancer {
    fn stats(&self, id: &str) -> Arc<Stats> {
        let mut stats = self
            .stats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Looked up first: `entry` would copy the id on every call.
        if let Some(s) = stats.get(id) {
            return Arc::clone(s);
        }
        Arc::clone(stats.entry(id.to_owned()).or_default())
    }

    /// Chooses one of `instances` by `strategy` for a request from
    /// `client`; `None` if there are none.
    pub fn pick(
        &self,
        strategy: Strategy,
        instances: &[Instance],
        client: Option<IpAddr>,
    ) -> Option<Lease> {
        if instances.is_empty() {
            return None;
        }
        let rr = self.next.fetch_add(1, Ordering::Relaxed);
        // Round-robin and IP-hash need no per-instance state to choose.
        let index = match strategy {
            Strategy::RoundRobin => Some(rr % instances.len()),
            Strategy::IpHash => Some(match client {
                Some(ip) => {
                    let ip = ip.to_string();
                    (0..instances.len())
                        .max_by_key(|i| fnv1a(&[ip.as_bytes(), instances[*i].id.as_bytes()]))
                        .unwrap_or(0)
                }
                None => rr % instances.len(),
            }),
            _ => None,
        };
        if let Some(index) = index {
            let chosen = self.stats(&instances[index].id);
            chosen.in_flight.fetch_add(1, Ordering::Relaxed);
            return Some(Lease {
                index,
                stats: chosen,
            });
        }
        let stats: Vec<Arc<Stats>> = instances.iter().map(|i| self.stats(&i.id)).collect();
        let index = match strategy {
            // Chosen above.
            Strategy::RoundRobin | Strategy::IpHash => rr % instances.len(),
            Strategy::LeastConnections => {
                // Fewest in flight; ties broken by rotation.
                (0..instances.len())
                    .map(|k| (rr + k) % instances.len())
                    .min_by_key(|i| stats[*i].in_flight.load(Ordering::Relaxed))
                    .unwrap_or(0)
            }
            Strategy::Weighted => {
                // nginx's smooth weighted round-robin: each pick adds every
                // weight to its running total, takes the largest, and
                // subtracts the sum from the one taken.
                let total: i64 = instances.iter().map(weight).sum();
                let mut best = 0;
                let mut best_current = i64::MIN;
                for (i, inst) in instances.iter().enumerate() {
                    let mut current = stats[i]
                        .current
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    *current += weight(inst);
                    if *current > best_current {
                        best_current = *current;
                        best = i;
                    }
                }
                *stats[best]
                    .current
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) -= total;
                best
            }
            Strategy::PowerOfTwo => {
                if instances.len() == 1 {
                    0
                } else {
                    let mut rng = rand::thread_rng();
                    let a = rng.gen_range(0..instances.len());
                    let mut b = rng.gen_range(0..instances.len() - 1);
                    if b >= a {
                        b += 1;
                    }
                    // Expected wait: latency times the queue ahead, plus one.
                    let cost = |i: usize| {
                        let ewma = stats[i].ewma_us.load(Ordering::Relaxed).max(1);
                        let queued = stats[i].in_flight.load(Ordering::Relaxed) as u64 + 1;
                        ewma.saturating_mul(queued)
                    };
                    if cost(a) <= cost(b) { a } else { b }
                }
            }
        };
        let chosen = Arc::clone(&stats[index]);
        chosen.in_flight.fetch_add(1, Ordering::Relaxed);
        Some(Lease {
            index,
            stats: chosen,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instances(weights: &[i64]) -> Vec<Instance> {
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| Instance {
                name: "catalog".into(),
                id: format!("catalog-{i}"),
                address: format!("http://127.0.0.1:{}", 7000 + i),
                version: "1".into(),
                tags: vec![format!("weight={w}")],
                ..Instance::default()
            })
            .collect()
    }

    fn spread(
        b: &Pick,
        list: &[Instance],
        n: usize,
        client: impl Fn(usize) -> Option<IpAddr>,
    ) -> Vec<usize> {
        let mut counts = vec![0; list.len()];
        for k in 0..n {
            let lease = b.pick(list, client(k)).unwrap();
            counts[lease.index] += 1;
        }
        counts
    }

    /// A balancer bound to one strategy.
    struct Pick(Balancer, Strategy);

    impl Pick {
        fn new(strategy: Strategy) -> Self {
            Self(Balancer::default(), strategy)
        }

        fn pick(&self, list: &[Instance], client: Option<IpAddr>) -> Option<Lease> {
            self.0.pick(self.1, list, client)
        }
    }

    #[test]
    fn round_robin_is_even() {
        let list = instances(&[1, 1, 1]);
        let counts = spread(&Pick::new(Strategy::RoundRobin), &list, 300, |_| None);
        assert_eq!(counts, vec![100, 100, 100]);
    }

    #[test]
    fn ip_hash_is_sticky_and_spreads_clients() {
        let list = instances(&[1, 1, 1]);
        let b = Pick::new(Strategy::IpHash);
        let one: IpAddr = "10.0.0.7".parse().unwrap();
        let counts = spread(&b, &list, 50, |_| Some(one));
        assert_eq!(counts.iter().filter(|c| **c > 0).count(), 1, "{counts:?}");
        let counts = spread(&b, &list, 3000, |k| {
            Some(IpAddr::from([10, (k / 256) as u8, (k % 256) as u8, 1]))
        });
        for c in &counts {
            assert!((700..=1300).contains(c), "{counts:?}");
        }
        // A departing instance moves only its own clients.
        let before: Vec<String> = (0..250)
            .map(|k| {
                list[b
                    .pick(&list, Some(IpAddr::from([192, 168, 1, k as u8])))
                    .unwrap()
                    .index]
                    .id
                    .clone()
            })
            .collect();
        let fewer = &list[..2];
        for (k, was) in before.iter().enumerate() {
            let now = fewer[b
                .pick(fewer, Some(IpAddr::from([192, 168, 1, k as u8])))
                .unwrap()
                .index]
                .id
                .clone();
            if *was != list[2].id {
                assert_eq!(&now, was, "client {k} moved needlessly");
            }
        }
    }

    #[test]
    fn weighted_three_to_one() {
        let list = instances(&[3, 1]);
        let counts = spread(&Pick::new(Strategy::Weighted), &list, 400, |_| None);
        assert!((270..=330).contains(&counts[0]), "{counts:?}");
        assert!((90..=110).contains(&counts[1]), "{counts:?}");
    }

    #[test]
    fn least_connections_avoids_a_busy_instance() {
        let list = instances(&[1, 1, 1]);
        let b = Pick::new(Strategy::LeastConnections);
        // Instance 0 is slow: five of its requests are still running.
        let held: Vec<Lease> = (0..5).map(|_| b.pick(&list[..1], None).unwrap()).collect();
        let counts = spread(&b, &list, 300, |_| None);
        assert!(counts[0] < counts[1] / 2, "{counts:?}");
        drop(held);
    }

    #[test]
    fn power_of_two_prefers_the_fast_instances() {
        let list = instances(&[1, 1, 1]);
        let b = Pick::new(Strategy::PowerOfTwo);
        for _ in 0..30 {
            for (i, _) in list.iter().enumerate() {
                let lease = b.pick(&[list[i].clone()], None).unwrap();
                let ms = if i == 0 { 50 } else { 2 };
                lease.finish(Duration::from_millis(ms));
            }
        }
        let counts = spread(&b, &list, 300, |_| None);
        assert!(counts[0] < 300 / 10, "{counts:?}");
        assert!(counts[1] > 100 && counts[2] > 100, "{counts:?}");
    }

    #[test]
    fn strategies_parse() {
        assert_eq!("ip_hash".parse::<Strategy>().unwrap(), Strategy::IpHash);
        assert!("random".parse::<Strategy>().is_err());
    }
}
