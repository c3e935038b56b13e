//! Rate limiting: one policy per tier plus the anonymous class, a key per
//! caller (the token's subject, or the client IP), and per key the minute,
//! hour and day windows.
//!
//! Without Redis the decision is local: a lock-free map from key to
//! [`gcra::KeyState`] (three atomics), a compare-and-swap per window, and a
//! background sweep that forgets keys whose buckets are full again (which
//! loses nothing). With Redis, [`shared`] leases tokens from Redis-side
//! buckets so that several gateway instances share one limit without a
//! Redis round trip per request.

pub mod gcra;
pub mod shared;

use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, LazyLock, Weak};
use std::time::{Duration, Instant};

use http::HeaderValue;

use std::net::IpAddr;

use crate::background::Background;
use crate::config::{AnonymousKeys, LimitBy, Limits, RateLimitSettings};
use gcra::{KeyState, Policy, Window};
use shared::Shared;

/// How often idle keys are swept out.
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Process-wide random seed of limiter keys (so nobody can aim collisions).
static KEY_HASHER: LazyLock<foldhash::quality::RandomState> =
    LazyLock::new(foldhash::quality::RandomState::default);

/// The limiter key of an identity string (`u:<sub>`, `ip:<addr>`).
pub fn key_of(parts: &[&[u8]]) -> u64 {
    let mut h = KEY_HASHER.build_hasher();
    for p in parts {
        h.write(p);
        h.write_u8(0xff);
    }
    h.finish()
}

/// Keys are already uniformly random hashes; hashing them again is waste.
#[derive(Debug, Clone, Copy, Default)]
pub struct PassThrough;

/// Hasher of [`PassThrough`].
#[derive(Debug, Default)]
pub struct PassThroughHasher(u64);

impl Hasher for PassThroughHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

impl BuildHasher for PassThrough {
    type Hasher = PassThroughHasher;
    fn build_hasher(&self) -> PassThroughHasher {
        PassThroughHasher(0)
    }
}

/// The map key of (caller key, class), by the class's seed: a hash of its
/// tier name, so a key keeps its slot when a reload reorders the tiers.
fn slot(key: u64, seed: u64) -> u64 {
    key ^ seed
}

/// The seed of a class named `name` ([`slot`]).
fn seed_of(name: &str) -> u64 {
    use std::hash::BuildHasher as _;
    static SEEDS: LazyLock<foldhash::fast::FixedState> =
        LazyLock::new(|| foldhash::fast::FixedState::with_seed(0x5eed_c1a5));
    SEEDS.hash_one(name) | 1
}

/// The seed of the per-address count of failed token verifications.
static VERIFICATION_SEED: LazyLock<u64> = LazyLock::new(|| seed_of("\0verification"));

/// An anonymous caller's key: its address, or the prefix it is counted by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnonymousKey {
    /// The limiter key.
    pub key: u64,
    /// The network it stands for (a /32 for an IPv4 address).
    pub net: ipnet::IpNet,
}

impl AnonymousKey {
    fn of(net: ipnet::IpNet) -> Self {
        let net = net.trunc();
        let key = match net {
            ipnet::IpNet::V4(n) => key_of(&[b"ip", &n.addr().octets(), &[n.prefix_len()]]),
            ipnet::IpNet::V6(n) => key_of(&[b"ip6", &n.addr().octets(), &[n.prefix_len()]]),
        };
        Self { key, net }
    }

    /// How the key is named in Redis: `ip:<address>` for a whole IPv4
    /// address, `ip:<network>/<len>` for a prefix.
    pub fn redis_id(&self) -> String {
        match self.net {
            ipnet::IpNet::V4(n) if n.prefix_len() == 32 => format!("ip:{}", n.addr()),
            net => format!("ip:{net}"),
        }
    }
}

/// Whether buckets kept for `old` classes mean the same in `new`: the same
/// classes (tiers, then anonymous) in the same order, with the same window
/// periods; only limits may differ.
fn compatible(old: &[ClassPolicy], new: &[ClassPolicy]) -> bool {
    let periods = |c: &ClassPolicy| -> Vec<Duration> {
        c.policy.windows().iter().map(|w| w.period()).collect()
    };
    old.len() == new.len()
        && old
            .iter()
            .zip(new)
            .all(|(a, b)| a.name == b.name && periods(a) == periods(b))
}

/// One class of callers: a tier, or the anonymous class (the last one).
#[derive(Debug)]
pub struct ClassPolicy {
    /// Tier name (`anonymous` for the anonymous class).
    pub name: String,
    /// Its slot seed ([`slot`]).
    seed: u64,
    /// The full limits.
    pub policy: Policy,
    /// Each instance's share while Redis is unreachable.
    pub fallback: Policy,
    /// `RateLimit-Policy` header value; `None` when unlimited.
    pub policy_header: Option<HeaderValue>,
    /// Names of the windows in `policy`, in order.
    pub window_names: Vec<&'static str>,
    /// `X-User-Tier` header value.
    pub tier_header: HeaderValue,
    /// Whose budget its requests draw from.
    pub limit_by: LimitBy,
    /// (limit, period in ms) per window: the Redis script's arguments.
    pub redis_args: Arc<[(u64, u64)]>,
}

impl ClassPolicy {
    fn new(name: &str, limits: &Limits, limit_by: LimitBy, instances: u32) -> Self {
        let mut windows = Vec::new();
        let mut fallback = Vec::new();
        let mut names = Vec::new();
        let mut header = Vec::new();
        for (window_name, limit, period) in limits.windows() {
            if let Some(w) = Window::new(limit, period) {
                windows.push(w);
                let share = limit.div_ceil(u64::from(instances.max(1))).max(1);
                fallback.extend(Window::new(share, period));
                names.push(window_name);
                header.push(format!(
                    "\"{window_name}\";q={limit};w={}",
                    period.as_secs()
                ));
            }
        }
        let redis_args = windows
            .iter()
            .map(|w| (w.limit(), w.period().as_millis() as u64))
            .collect();
        Self {
            name: name.to_owned(),
            seed: seed_of(name),
            redis_args,
            policy: Policy::new(windows),
            fallback: Policy::new(fallback),
            policy_header: (!header.is_empty())
                .then(|| HeaderValue::from_str(&header.join(", ")).ok())
                .flatten(),
            window_names: names,
            tier_header: HeaderValue::from_str(name)
                .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
            limit_by,
        }
    }

    /// Whether this class has no limits at all.
    pub fn unlimited(&self) -> bool {
        self.policy.windows().is_empty()
    }
}

/// The outcome of a rate-limit check, with what the headers report (the
/// tightest window).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Admitted (and counted) or not.
    pub allowed: bool,
    /// The tightest window's limit.
    pub limit: u64,
    /// Requests left in it.
    pub remaining: u64,
    /// Until it is full again.
    pub reset: Duration,
    /// When refused: how long to wait.
    pub retry_after: Duration,
    /// Index of the tightest window in the class's policy.
    pub window: usize,
    /// How the decision was made.
    pub source: DecisionSource,
}

/// Where a decision came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecisionSource {
    /// Local buckets (no Redis configured).
    Local,
    /// A token leased from Redis (or Redis's refusal).
    Leased,
    /// Local fallback buckets (Redis down or slower than `cold_wait`).
    Fallback,
}

/// All rate-limit state of a gateway.
#[derive(Debug)]
pub struct RateLimiter {
    classes: Vec<ClassPolicy>,
    default_tier: usize,
    anonymous_keys: AnonymousKeys,
    /// Local buckets of the tiers; shared with the limiter a reload
    /// replaces when its tiers are compatible (see
    /// [`RateLimiter::after_reload`]).
    local: Arc<LocalMap>,
    /// Local buckets of anonymous callers and their failed token
    /// verifications: kept apart so their number can be capped.
    local_anonymous: Arc<LocalMap>,
    shared: Option<Arc<Shared>>,
    epoch: Instant,
}

type LocalMap = papaya::HashMap<u64, KeyState, PassThrough>;

fn local_map() -> Arc<LocalMap> {
    Arc::new(
        papaya::HashMap::builder()
            .hasher(PassThrough)
            // Incremental: a resize is spread over later inserts. Blocking
            // made a cold key 3× cheaper on average but stalled one request
            // ~130 ms when a 1 M-key table grew (limiter_memory bench);
            // this keeps the worst single decision ~0.5 ms.
            .resize_mode(papaya::ResizeMode::Incremental(64))
            .build(),
    )
}

impl RateLimiter {
    /// Builds the limiter; with a Redis target (from the config, or
    /// `redis_url` which overrides it) limits are shared through Redis.
    pub fn new(
        settings: &RateLimitSettings,
        redis_url: Option<&crate::config::RedisUrl>,
        bg: Option<&Background>,
    ) -> Arc<Self> {
        Self::after_reload(settings, redis_url, bg, None)
    }

    /// [`RateLimiter::new`] for a reload that changed `rate_limit`. The
    /// local buckets of `old` carry over when the tiers kept their names,
    /// order and window periods (only limits changed): an unchanged tier
    /// keeps its exact state, a tier whose limits changed keeps its
    /// callers' debt (read against the new limits). Otherwise — tiers
    /// added, removed, renamed or reordered, windows added or removed —
    /// every bucket starts full (slots are numbered by class, so they
    /// would mean something else). Counts in Redis carry on either way
    /// (same keys).
    pub fn after_reload(
        settings: &RateLimitSettings,
        redis_url: Option<&crate::config::RedisUrl>,
        bg: Option<&Background>,
        old: Option<&RateLimiter>,
    ) -> Arc<Self> {
        let instances = settings.redis.expected_instances;
        let mut classes: Vec<ClassPolicy> = settings
            .tiers
            .iter()
            .map(|t| ClassPolicy::new(&t.name, &t.limits, t.limit_by, instances))
            .collect();
        classes.push(ClassPolicy::new(
            "anonymous",
            &settings.anonymous,
            LimitBy::User,
            instances,
        ));
        let target = match redis_url {
            Some(u) => Some(crate::config::RedisTarget::Single(u.clone())),
            None => settings.redis.target.clone(),
        };
        let carried = old.filter(|old| compatible(&old.classes, &classes));
        let epoch = carried.map_or_else(Instant::now, |old| old.epoch);
        // The Redis side (leases, debt still to charge) carries over
        // whenever the target is the same, whatever else changed.
        let kept_shared = old
            .and_then(|o| o.shared.as_ref())
            .zip(target.as_ref())
            .filter(|(s, t)| s.serves(t, &settings.redis))
            .map(|(s, _)| {
                s.retune(&settings.redis);
                s.clone()
            });
        let shared = match (kept_shared, target, bg) {
            (Some(kept), _, _) => Some(kept),
            (None, Some(target), Some(bg)) => {
                Some(Shared::start(target, &settings.redis, Instant::now(), bg))
            }
            _ => None,
        };
        let limiter = Arc::new(Self {
            classes,
            default_tier: settings.default_tier,
            anonymous_keys: settings.anonymous_keys,
            local: carried.map_or_else(local_map, |old| old.local.clone()),
            local_anonymous: carried.map_or_else(local_map, |old| old.local_anonymous.clone()),
            shared,
            epoch,
        });
        if let Some(bg) = bg {
            bg.spawn(sweep_loop(Arc::downgrade(&limiter)));
        }
        limiter
    }

    /// The class of a token's `tier` claim (missing or unknown: the default tier).
    pub fn tier_of(&self, claim: Option<&str>) -> usize {
        let tiers = &self.classes[..self.classes.len() - 1];
        claim
            .and_then(|c| tiers.iter().position(|t| t.name.eq_ignore_ascii_case(c)))
            .unwrap_or(self.default_tier)
    }

    /// The anonymous class.
    pub fn anonymous(&self) -> usize {
        self.classes.len() - 1
    }

    /// A class's policy.
    pub fn class(&self, class: usize) -> &ClassPolicy {
        &self.classes[class.min(self.classes.len() - 1)]
    }

    /// The Redis side, when configured.
    pub fn shared(&self) -> Option<&Arc<Shared>> {
        self.shared.as_ref()
    }

    /// Nanoseconds on the limiter's clock.
    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Decides one request of `key` in `class`; `redis_id` names the key in
    /// Redis (`u:<sub>`, `ip:<addr>`) and is only called for a key the
    /// limiter has not seen yet. `None` when the class is unlimited.
    pub async fn check(
        &self,
        class: usize,
        key: u64,
        redis_id: impl FnOnce() -> String,
    ) -> Option<Verdict> {
        let class_policy = self.class(class);
        if class_policy.unlimited() {
            return None;
        }
        let slot = slot(key, class_policy.seed);
        let anonymous = class >= self.anonymous();
        match &self.shared {
            Some(shared) => Some(
                shared
                    .check(class_policy, slot, anonymous, || {
                        format!("{}:{}", redis_id(), class_policy.name)
                    })
                    .await,
            ),
            None => Some(self.decide_local(class_policy, slot, anonymous)),
        }
    }

    /// The local decision for `key` in `class`, whether or not Redis is
    /// configured (what [`RateLimiter::check`] does without Redis); `None`
    /// when the class is unlimited.
    pub fn check_local(&self, class: usize, key: u64) -> Option<Verdict> {
        let class_policy = self.class(class);
        if class_policy.unlimited() {
            return None;
        }
        let anonymous = class >= self.anonymous();
        Some(self.decide_local(class_policy, slot(key, class_policy.seed), anonymous))
    }

    fn local_map(&self, anonymous: bool) -> &LocalMap {
        if anonymous {
            &self.local_anonymous
        } else {
            &self.local
        }
    }

    fn decide_local(&self, class: &ClassPolicy, slot: u64, anonymous: bool) -> Verdict {
        let now = self.now_ns();
        let map = self.local_map(anonymous).pin();
        let state = map.get_or_insert_with(slot, KeyState::default);
        let d = class.policy.check(state, now);
        verdict_of(&d, DecisionSource::Local)
    }

    /// The key of an anonymous caller at `ip`: the address (IPv4), or its
    /// `ipv6_prefix` (IPv6). Once `max_tracked` anonymous keys are tracked,
    /// a caller not tracked yet gets the key of its overflow prefix
    /// instead, shared with its neighbours: rotating addresses can neither
    /// reset a limit nor grow memory (and Redis traffic) without bound.
    pub fn anonymous_key(&self, ip: Option<IpAddr>) -> AnonymousKey {
        let k = &self.anonymous_keys;
        let ip = match ip.unwrap_or(IpAddr::from([0, 0, 0, 0])) {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        let net = |v4_len: u8, v6_len: u8| match ip {
            IpAddr::V4(a) => ipnet::IpNet::new(IpAddr::V4(a), v4_len),
            IpAddr::V6(a) => ipnet::IpNet::new(IpAddr::V6(a), v6_len),
        };
        let own = AnonymousKey::of(net(32, k.ipv6_prefix).unwrap_or_else(|_| ip.into()));
        if self.tracked_anonymous() < k.max_tracked || self.is_tracked_anonymous(own.key) {
            return own;
        }
        net(k.overflow_ipv4_prefix, k.overflow_ipv6_prefix).map_or(own, AnonymousKey::of)
    }

    /// Anonymous keys held now (local buckets, and Redis-side entries).
    pub fn tracked_anonymous(&self) -> usize {
        self.local_anonymous.len() + self.shared.as_ref().map_or(0, |s| s.tracked_anonymous())
    }

    fn is_tracked_anonymous(&self, key: u64) -> bool {
        let slot = slot(key, self.class(self.anonymous()).seed);
        match &self.shared {
            Some(s) => s.tracks_anonymous(slot),
            None => self.local_anonymous.pin().contains_key(&slot),
        }
    }

    /// Whether the client at `ip_key` may have a token verified now: each
    /// token that failed verification costs one request of the anonymous
    /// limits, per instance (it protects this instance's CPU: a failed
    /// EdDSA/RSA check costs 50–170 µs). `Err(retry_after)` when spent.
    pub fn verification_allowed(&self, ip_key: u64) -> Result<(), Duration> {
        let anonymous = self.class(self.anonymous());
        if anonymous.unlimited() {
            return Ok(());
        }
        let map = self.local_anonymous.pin();
        let Some(state) = map.get(&slot(ip_key, *VERIFICATION_SEED)) else {
            return Ok(());
        };
        let wait = anonymous.policy.wait_time(state, self.now_ns());
        if wait.is_zero() {
            Ok(())
        } else {
            Err(wait)
        }
    }

    /// Counts a failed token verification from `ip_key`.
    pub fn record_failed_verification(&self, ip_key: u64) {
        let anonymous = self.class(self.anonymous());
        if anonymous.unlimited() {
            return;
        }
        let _ = self.decide_local(anonymous, slot(ip_key, *VERIFICATION_SEED), true);
    }

    /// Keys tracked (local and shared).
    pub fn tracked_keys(&self) -> usize {
        self.local.len()
            + self.local_anonymous.len()
            + self.shared.as_ref().map_or(0, |s| s.tracked_keys())
    }

    /// Forgets every local key whose buckets are full again.
    pub fn sweep(&self) {
        let now = self.now_ns();
        self.local.pin().retain(|_, state| !state.is_idle(now));
        self.local_anonymous
            .pin()
            .retain(|_, state| !state.is_idle(now));
        if let Some(shared) = &self.shared {
            shared.sweep();
        }
    }
}

/// A [`Verdict`] from a GCRA decision.
pub(crate) fn verdict_of(d: &gcra::Decision, source: DecisionSource) -> Verdict {
    let (limit, remaining, reset, window) = d.tightest.map_or((0, 0, Duration::ZERO, 0), |t| {
        (t.limit, t.remaining, t.reset, t.index)
    });
    Verdict {
        allowed: d.allowed,
        limit,
        remaining,
        reset,
        retry_after: d.retry_after,
        window,
        source,
    }
}

async fn sweep_loop(limiter: Weak<RateLimiter>) {
    loop {
        tokio::time::sleep(SWEEP_INTERVAL).await;
        let Some(l) = limiter.upgrade() else { return };
        l.sweep();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(yaml: &str) -> Arc<RateLimiter> {
        let c = crate::config::parse(&format!(
            "upstreams: {{p: {{backends: [{{address: \"127.0.0.1:1\"}}]}}}}\nroutes: [{{name: r, match: {{}}, upstream: p}}]\n{yaml}"
        ))
        .unwrap();
        RateLimiter::new(&c.rate_limit, None, None)
    }

    #[test]
    fn test_tier_claims_resolve_case_insensitively_with_free_as_default() {
        let l = limiter("");
        assert_eq!(l.class(l.tier_of(Some("premium"))).name, "PREMIUM");
        assert_eq!(l.class(l.tier_of(Some("GOLD"))).name, "FREE");
        assert_eq!(l.class(l.tier_of(None)).name, "FREE");
        assert_eq!(l.class(l.anonymous()).name, "anonymous");
        assert!(
            l.class(l.anonymous()).unlimited(),
            "anonymous is unlimited by default"
        );
        assert_eq!(
            l.class(0).policy_header.as_ref().unwrap(),
            "\"minute\";q=10;w=60, \"hour\";q=100;w=3600, \"day\";q=1000;w=86400"
        );
    }

    fn reloaded(old: &RateLimiter, yaml: &str) -> Arc<RateLimiter> {
        let c = crate::config::parse(&format!(
            "upstreams: {{p: {{backends: [{{address: \"127.0.0.1:1\"}}]}}}}\nroutes: [{{name: r, match: {{}}, upstream: p}}]\n{yaml}"
        ))
        .unwrap();
        RateLimiter::after_reload(&c.rate_limit, None, None, Some(old))
    }

    #[test]
    fn test_buckets_survive_a_reload_for_unchanged_tiers() {
        let v1 = "rate_limit:\n  tiers:\n    - {name: FREE, per_minute: 3}\n    - {name: PRO, per_minute: 100}\n";
        let l = limiter(v1);
        for _ in 0..3 {
            assert!(l.check_local(0, 42).unwrap().allowed);
        }
        assert!(!l.check_local(0, 42).unwrap().allowed);
        // Only PRO's limit changes: FREE keeps its state.
        let v2 = "rate_limit:\n  tiers:\n    - {name: FREE, per_minute: 3}\n    - {name: PRO, per_minute: 200}\n";
        let l2 = reloaded(&l, v2);
        assert!(
            !l2.check_local(0, 42).unwrap().allowed,
            "FREE key 42 is still spent"
        );
        assert!(l2.check_local(0, 43).unwrap().allowed);
        // A tier added: the classes are numbered anew, buckets start full.
        let added = "rate_limit:\n  tiers:\n    - {name: FREE, per_minute: 3}\n    - {name: PRO, per_minute: 200}\n    - {name: MAX, per_minute: 1000}\n";
        assert!(reloaded(&l2, added).check_local(0, 42).unwrap().allowed);
        // Tiers reordered: buckets start full.
        let v3 = "rate_limit:\n  tiers:\n    - {name: PRO, per_minute: 200}\n    - {name: FREE, per_minute: 3}\n";
        let l3 = reloaded(&l2, v3);
        assert!(l3.check_local(1, 42).unwrap().allowed);
        // A window added to a tier: buckets start full too.
        let v4 = "rate_limit:\n  tiers:\n    - {name: PRO, per_minute: 200, per_hour: 1000}\n    - {name: FREE, per_minute: 3}\n";
        let spent = reloaded(&l3, v3);
        for _ in 0..3 {
            spent.check_local(1, 7);
        }
        assert!(!spent.check_local(1, 7).unwrap().allowed);
        let l4 = reloaded(&spent, v4);
        assert!(l4.check_local(1, 7).unwrap().allowed);
    }

    #[test]
    fn test_idle_keys_are_swept_and_busy_ones_kept() {
        // 600 per minute: one request's debt is 100 ms.
        let l = limiter("rate_limit:\n  tiers: [{name: FREE, per_minute: 600}]\n");
        for key in 0..1000u64 {
            assert!(l.check_local(0, key).unwrap().allowed);
        }
        assert_eq!(l.tracked_keys(), 1000);
        l.sweep();
        assert_eq!(l.tracked_keys(), 1000, "buckets not full yet");
        std::thread::sleep(Duration::from_millis(150));
        assert!(l.check_local(0, 7).unwrap().allowed);
        l.sweep();
        assert_eq!(l.tracked_keys(), 1, "only the key used just now remains");
    }
}
