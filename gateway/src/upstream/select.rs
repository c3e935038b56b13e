//! Backend selection algorithms. All are lock-free: a pick is a few atomic
//! operations over data precomputed when the pool is built.
//!
//! Retries pass the set of backends already tried; every algorithm then
//! picks among the remaining ones *with their weights still applied*
//! (Pingora's own weighted selection ignores weights on retry).

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::config::validate::MAX_BACKENDS;

/// Backends already tried by one request (indices into the pool).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tried([u64; MAX_BACKENDS / 64]);

impl Tried {
    /// Marks backend `i` as tried.
    pub fn insert(&mut self, i: usize) {
        if let Some(word) = self.0.get_mut(i / 64) {
            *word |= 1 << (i % 64);
        }
    }

    /// Whether backend `i` was tried.
    pub fn contains(&self, i: usize) -> bool {
        self.0.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    /// How many were tried.
    pub fn len(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Whether none was tried.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The smooth weighted round-robin order of one cycle (nginx's algorithm):
/// weights 3:1 give `A A B A`, so every cycle of `sum(weights)` picks is
/// exact and picks of one backend are spread out.
pub fn smooth_wrr_cycle(weights: &[u32]) -> Vec<u16> {
    let g = weights.iter().copied().fold(0, gcd).max(1);
    let w: Vec<i64> = weights.iter().map(|&x| i64::from(x / g)).collect();
    let total: i64 = w.iter().sum();
    let mut current = vec![0i64; w.len()];
    let mut cycle = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for _ in 0..total {
        let mut best = 0;
        for i in 0..w.len() {
            current[i] += w[i];
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        cycle.push(best as u16);
    }
    cycle
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Walks a precomputed cycle from a shared cursor.
#[derive(Debug)]
pub struct RoundRobin {
    cycle: Box<[u16]>,
    cursor: AtomicUsize,
}

impl RoundRobin {
    /// A cycle over backends with these weights.
    pub fn new(weights: &[u32]) -> Self {
        Self {
            cycle: smooth_wrr_cycle(weights).into_boxed_slice(),
            cursor: AtomicUsize::new(0),
        }
    }

    /// The next backend in the cycle that is not in `tried`. Tried ones
    /// are skipped by taking further slots, so retries still follow the
    /// weights of the backends that are left.
    pub fn pick(&self, tried: &Tried) -> Option<usize> {
        let n = self.cycle.len();
        for _ in 0..n {
            let slot = self.cursor.fetch_add(1, Ordering::Relaxed) % n;
            let i = usize::from(self.cycle[slot]);
            if !tried.contains(i) {
                return Some(i);
            }
        }
        self.first_untried(tried)
    }

    /// A weighted random backend not in `tried` (used by p2c).
    pub fn random(&self, tried: &Tried) -> Option<usize> {
        let n = self.cycle.len();
        for _ in 0..n.min(16) {
            let i = usize::from(self.cycle[fastrand::usize(..n)]);
            if !tried.contains(i) {
                return Some(i);
            }
        }
        self.first_untried(tried)
    }

    fn first_untried(&self, tried: &Tried) -> Option<usize> {
        self.cycle
            .iter()
            .map(|&i| usize::from(i))
            .find(|&i| !tried.contains(i))
    }
}

/// A ketama-style ring: each backend owns points in proportion to its weight.
#[derive(Debug)]
pub struct HashRing {
    points: Box<[(u64, u16)]>,
}

/// Ring points per backend at average weight.
const POINTS_PER_BACKEND: u64 = 160;

impl HashRing {
    /// A ring over backends named by `ids` (stable across processes and
    /// restarts, e.g. `ip:port`) with these weights.
    pub fn new(ids: &[String], weights: &[u32]) -> Self {
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum::<u64>().max(1);
        let n = ids.len() as u64;
        let mut points = Vec::new();
        for (i, (id, &w)) in ids.iter().zip(weights).enumerate() {
            let count = (POINTS_PER_BACKEND * n * u64::from(w) / total).max(1);
            for k in 0..count {
                let h = hash_bytes(format!("{id}#{k}").as_bytes());
                points.push((h, i as u16));
            }
        }
        points.sort_unstable();
        Self {
            points: points.into_boxed_slice(),
        }
    }

    /// The owner of `key`, or the next owner clockwise not in `tried`.
    pub fn pick(&self, key: &[u8], tried: &Tried) -> Option<usize> {
        let n = self.points.len();
        if n == 0 {
            return None;
        }
        let h = hash_bytes(key);
        let start = self.points.partition_point(|&(p, _)| p < h);
        (0..n)
            .map(|k| usize::from(self.points[(start + k) % n].1))
            .find(|&i| !tried.contains(i))
    }
}

/// FNV-1a followed by a 64-bit finalizer: stable everywhere, well mixed.
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Picks the backend with the fewest in-flight requests per unit of weight.
/// Ties go to the first one from `start` on; callers draw `start` by weight,
/// so an idle pool still splits by weight.
pub fn least_loaded(
    inflight: impl Fn(usize) -> usize,
    weights: &[u32],
    tried: &Tried,
    start: usize,
) -> Option<usize> {
    let n = weights.len();
    let mut best: Option<(usize, u64, u64)> = None;
    for k in 0..n {
        let i = (start + k) % n;
        if tried.contains(i) {
            continue;
        }
        let load = inflight(i) as u64;
        let w = u64::from(weights[i]);
        // load_i / w_i < load_b / w_b  ⇔  load_i * w_b < load_b * w_i
        match best {
            Some((_, bl, bw)) if load * bw >= bl * w => {}
            _ => best = Some((i, load, w)),
        }
    }
    best.map(|(i, _, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_smooth_wrr_is_exact_and_interleaved() {
        assert_eq!(smooth_wrr_cycle(&[3, 1]), vec![0, 0, 1, 0]);
        assert_eq!(smooth_wrr_cycle(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
        // gcd reduction keeps the cycle short.
        assert_eq!(smooth_wrr_cycle(&[300, 100]).len(), 4);
        assert_eq!(smooth_wrr_cycle(&[1]), vec![0]);
    }

    #[test]
    fn test_round_robin_skips_tried_keeping_weights() {
        let rr = RoundRobin::new(&[2, 1, 1]);
        let mut tried = Tried::default();
        tried.insert(0);
        let mut counts = [0i32; 3];
        for _ in 0..400 {
            counts[rr.pick(&tried).unwrap()] += 1;
        }
        assert_eq!(counts[0], 0);
        assert_eq!(counts[1] + counts[2], 400);
        assert!((counts[1] - counts[2]).abs() <= 100);
        tried.insert(1);
        tried.insert(2);
        assert_eq!(rr.pick(&tried), None);
    }

    #[test]
    fn test_tried_bitset_bounds() {
        let mut t = Tried::default();
        t.insert(255);
        t.insert(300); // out of range: ignored, never panics
        assert!(t.contains(255));
        assert!(!t.contains(300));
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn test_hash_ring_is_sticky_and_moves_only_on_tried() {
        let ids: Vec<String> = (0..4).map(|i| format!("10.0.0.{i}:80")).collect();
        let ring = HashRing::new(&ids, &[1, 1, 1, 1]);
        let none = Tried::default();
        let mut seen = [0; 4];
        for k in 0..1000 {
            let key = format!("user-{k}");
            let a = ring.pick(key.as_bytes(), &none).unwrap();
            assert_eq!(ring.pick(key.as_bytes(), &none), Some(a));
            seen[a] += 1;
            let mut tried = Tried::default();
            tried.insert(a);
            assert_ne!(ring.pick(key.as_bytes(), &tried), Some(a));
        }
        assert!(seen.iter().all(|&c| c > 150), "{seen:?}");
    }

    #[test]
    fn test_least_loaded_respects_weight() {
        let inflight = [4usize, 1, 0];
        let weights = [4, 1, 1];
        let pick = least_loaded(|i| inflight[i], &weights, &Tried::default(), 0);
        // 4/4 = 1, 1/1 = 1, 0/1 = 0 → backend 2.
        assert_eq!(pick, Some(2));
        let mut tried = Tried::default();
        tried.insert(2);
        assert_eq!(least_loaded(|i| inflight[i], &weights, &tried, 0), Some(0));
    }
}
