//! Limits shared by several gateway instances through Redis, without a Redis
//! round trip per request.
//!
//! Redis holds the authoritative bucket of each (caller, tier): one hash
//! with a level per window, refilled continuously by an atomic Lua script
//! that also *grants* a batch of tokens to the asking instance and deducts
//! it from every window at once. The instance keeps its grant in one atomic
//! counter (its *lease*); a request takes a token from the lease with a
//! compare-and-swap. When the lease is half spent, a refill is requested in
//! the background, so a key in steady use never waits on Redis. Only a key
//! with an empty lease waits, at most `cold_wait`, before deciding with the
//! local fallback buckets.
//!
//! The batch follows the key's local rate (what it uses in
//! [`LOOKAHEAD`]), capped at `min_limit / (2 × expected_instances)` so one
//! instance cannot sit on most of a small limit. Tokens unused for
//! `lease_idle` go back to Redis.
//!
//! Every admission the instance makes without a lease (Redis down, or a
//! cold key past `cold_wait`) is remembered as debt and deducted in Redis
//! with the next call, so the shared count catches up when Redis is back.
//!
//! Accuracy: Redis never grants more than its buckets hold, so leased
//! admissions never exceed `limit + refill` over any interval; the only
//! excess comes from fallback admissions made while Redis is unreachable
//! or slow (at most `limit / expected_instances` per instance per window).
//! Tokens can be under-used only while they sit in a lease: at most one
//! batch per instance, for at most `lease_idle`.
//! All of it all runs on the background runtime; the request path only
//! touches atomics and a channel.

use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::{mpsc, Notify};

use super::gcra::KeyState;
use super::{verdict_of, ClassPolicy, DecisionSource, PassThrough, Verdict};
use crate::background::Background;
use crate::config::{RedisSettings, RedisTarget};

/// A key's batch covers its local use over this long.
pub const LOOKAHEAD: Duration = Duration::from_millis(100);
/// While Redis is unreachable it is probed this often.
const PROBE_INTERVAL: Duration = Duration::from_millis(500);
/// The lease half of [`Entry::lease`].
const LEASE_MASK: u64 = 0xFFFF_FFFF;
/// Shared `Notify`s for cold-key waiters.
const STRIPES: usize = 64;
/// How long `start` waits for the first connection.
const FIRST_CONNECT_WAIT: Duration = Duration::from_secs(1);

/// Refills every window, grants up to `want` tokens (from all windows at
/// once), deducts `delta` first (debt when positive, returned tokens when
/// negative). Time is Redis's own, so instances' clocks do not matter.
/// Returns {granted, ms until one more token, tightest window index,
/// tokens left in it, ms until it is full, delta charged, 1 when this is
/// a replayed answer}.
///
/// Idempotent per call id: each instance keeps its last call's id and
/// answer in the key's hash (field `c:<instance>`). A call whose answer
/// was lost (a timeout after the script ran) is sent again with the same
/// id and gets the same answer back, so its grant is not lost and its
/// debt not charged twice.
const LEASE_SCRIPT: &str = r"
local n = tonumber(ARGV[3])
local field = ARGV[4 + 2 * n]
local cid = ARGV[5 + 2 * n]
local last = redis.call('HGET', KEYS[1], field)
if last then
  local id, g, w, ti, r, f, d = string.match(last, '^(%d+),(%-?%d+),(%-?%d+),(%-?%d+),(%-?%d+),(%-?%d+),(%-?%d+)$')
  if id == cid then
    return {tonumber(g), tonumber(w), tonumber(ti), tonumber(r), tonumber(f), tonumber(d), 1}
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local want = tonumber(ARGV[1])
local delta = tonumber(ARGV[2])
local fields = redis.call('HMGET', KEYS[1], 'ts', 'l1', 'l2', 'l3')
local ts = tonumber(fields[1]) or now
local elapsed = now - ts
if elapsed < 0 then elapsed = 0 end
local level, limit, period = {}, {}, {}
local grant = want
local maxp = 1
for i = 1, n do
  limit[i] = tonumber(ARGV[2 + 2 * i])
  period[i] = tonumber(ARGV[3 + 2 * i])
  if period[i] > maxp then maxp = period[i] end
  local l = tonumber(fields[i + 1]) or limit[i]
  l = math.min(limit[i], l + elapsed * limit[i] / period[i])
  l = math.max(-limit[i], math.min(limit[i], l - delta))
  level[i] = l
  local whole = math.floor(l)
  if whole < grant then grant = whole end
end
if grant < 0 then grant = 0 end
local wait, tight, tight_rem, tight_reset = 0, 1, -1, 0
local set = {'ts', now}
for i = 1, n do
  level[i] = level[i] - grant
  set[#set + 1] = 'l' .. i
  set[#set + 1] = tostring(level[i])
  if level[i] < 1 then
    local w = math.ceil((1 - level[i]) * period[i] / limit[i])
    if w > wait then wait = w end
  end
  local rem = math.floor(level[i])
  if rem < 0 then rem = 0 end
  if tight_rem < 0 or rem < tight_rem then
    tight, tight_rem = i, rem
    tight_reset = math.ceil((limit[i] - level[i]) * period[i] / limit[i])
  end
end
set[#set + 1] = field
set[#set + 1] = table.concat({cid, grant, wait, tight - 1, tight_rem, tight_reset, delta}, ',')
redis.call('HSET', KEYS[1], unpack(set))
redis.call('PEXPIRE', KEYS[1], maxp * 2)
return {grant, wait, tight - 1, tight_rem, tight_reset, delta, 0}
";

/// Counters of the Redis side (exported as metrics).
#[derive(Debug, Default)]
pub struct SharedStats {
    /// Script calls made.
    pub calls: AtomicU64,
    /// Calls that failed or timed out.
    pub errors: AtomicU64,
    /// Requests admitted from a lease.
    pub leased: AtomicU64,
    /// Requests decided by the fallback buckets.
    pub fallback: AtomicU64,
    /// Requests that waited for a cold key's first lease.
    pub cold_waits: AtomicU64,
    /// Times Redis was declared unreachable.
    pub outages: AtomicU64,
    /// Calls that timed out (their answer may come again on a replay).
    pub timeouts: AtomicU64,
    /// Answers Redis gave again for a call whose first answer was lost.
    pub replays: AtomicU64,
}

/// One (caller, tier) key's shared state.
#[derive(Debug)]
///
/// Kept small (a million keys must fit in well under 256 MB): the script
/// arguments are shared per class, the key prefix is added per call, and
/// waiters park on one of [`STRIPES`] shared `Notify`s.
struct Entry {
    /// `<id>:<tier>`; the Redis key is the configured prefix + this.
    id: Box<str>,
    /// (limit, period in ms) per window, the script's arguments (shared by
    /// every key of the class).
    windows: Arc<[(u64, u64)]>,
    /// The lease (low 32 bits: tokens held here) and what Redis reported
    /// left after its last grant (high 32 bits), in one atomic so that
    /// `remaining = lease + redis left` is never read half-updated.
    lease: AtomicU64,
    /// Admissions made without a lease, not yet charged in Redis;
    /// negative when leased tokens are being handed back.
    debt: AtomicI64,
    /// The id of a call whose answer never arrived (0: none): the next
    /// call sends it again, so Redis answers it instead of running twice.
    unacked: AtomicU64,
    /// Redis answered for this key at least once.
    heard: AtomicBool,
    in_flight: AtomicBool,
    /// Which of the shared `Notify`s waiters of this key park on.
    stripe: u8,
    /// From the last reply: the tightest window.
    tight_window: AtomicU8,
    /// Tokens to ask for in the next call.
    want: AtomicU32,
    /// Redis said "empty" until then (limiter clock, ns).
    denied_until: AtomicU64,
    last_seen: AtomicU64,
    /// Requests since `rate_since` (for the batch size).
    rate_count: AtomicU32,
    rate_since: AtomicU64,
    /// From the last reply: when the tightest window is full.
    full_at: AtomicU64,
    fallback: KeyState,
}

enum Conn {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Clone for Conn {
    fn clone(&self) -> Self {
        match self {
            Conn::Single(c) => Conn::Single(c.clone()),
            Conn::Cluster(c) => Conn::Cluster(c.clone()),
        }
    }
}

/// A key's state in this instance, by slot.
type Entries = papaya::HashMap<u64, Arc<Entry>, PassThrough>;

/// A lease call to make: the key, and its class's current windows (a
/// reload may have changed the limits since the key was first seen).
type Call = (Arc<Entry>, Arc<[(u64, u64)]>);

/// The Redis side of the limiter. Kept across reloads while the Redis
/// target and key prefix stay the same ([`Shared::serves`]), so leases and
/// debt still to charge survive a change of tiers or limits.
pub struct Shared {
    target: RedisTarget,
    key_prefix: String,
    /// The tunables a reload may change ([`Shared::retune`]).
    instances: AtomicU64,
    cold_wait_ns: AtomicU64,
    timeout_ns: AtomicU64,
    lease_idle: AtomicU64,
    /// This instance's field in each key's hash (`c:<random id>`).
    field: String,
    /// The last call id used.
    call_ids: AtomicU64,
    /// When the first call timed out since Redis last answered (our clock,
    /// ns; 0: none did).
    timing_out_since: AtomicU64,
    entries: Entries,
    /// Anonymous callers' keys, apart so their number can be capped.
    anonymous: Entries,
    tx: mpsc::UnboundedSender<Call>,
    /// Cold-key waiters park here, by key.
    stripes: Box<[Notify]>,
    conn: Mutex<Option<Conn>>,
    up: AtomicBool,
    script: redis::Script,
    epoch: Instant,
    /// Counters.
    pub stats: SharedStats,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("target", &self.target)
            .field("up", &self.up)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// Starts the Redis tasks on `bg` and waits (briefly) for the first
    /// connection, so a freshly started gateway shares limits at once.
    pub(super) fn start(
        target: RedisTarget,
        settings: &RedisSettings,
        epoch: Instant,
        bg: &Background,
    ) -> Arc<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let entries = || {
            papaya::HashMap::builder()
                .hasher(PassThrough)
                // Incremental: a resize is spread over later inserts. Blocking
                // made a cold key 3× cheaper on average but stalled one
                // request ~130 ms when a 1 M-key table grew (limiter_memory
                // bench); this keeps the worst single decision ~0.5 ms.
                .resize_mode(papaya::ResizeMode::Incremental(64))
                .build()
        };
        let shared = Arc::new(Self {
            target,
            key_prefix: settings.key_prefix.clone(),
            instances: AtomicU64::new(0),
            cold_wait_ns: AtomicU64::new(0),
            timeout_ns: AtomicU64::new(0),
            lease_idle: AtomicU64::new(0),
            field: format!("c:{:016x}", fastrand::u64(..)),
            call_ids: AtomicU64::new(0),
            timing_out_since: AtomicU64::new(0),
            entries: entries(),
            anonymous: entries(),
            tx,
            stripes: (0..STRIPES).map(|_| Notify::new()).collect(),
            conn: Mutex::new(None),
            up: AtomicBool::new(false),
            script: redis::Script::new(LEASE_SCRIPT),
            epoch,
            stats: SharedStats::default(),
        });
        shared.retune(settings);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        bg.spawn(probe_loop(Arc::downgrade(&shared), ready_tx));
        bg.spawn(lease_loop(Arc::downgrade(&shared), rx));
        let _ = ready_rx.recv_timeout(FIRST_CONNECT_WAIT);
        shared
    }

    /// Whether this serves `target` under `settings`' key prefix (then a
    /// reload keeps it).
    pub fn serves(&self, target: &RedisTarget, settings: &RedisSettings) -> bool {
        self.target == *target && self.key_prefix == settings.key_prefix
    }

    /// Takes a reload's tunables: instances, cold wait, timeout, lease idle.
    pub fn retune(&self, settings: &RedisSettings) {
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.instances.store(
            u64::from(settings.expected_instances.max(1)),
            Ordering::Relaxed,
        );
        self.cold_wait_ns
            .store(ns(settings.cold_wait), Ordering::Relaxed);
        self.timeout_ns
            .store(ns(settings.timeout), Ordering::Relaxed);
        self.lease_idle
            .store(ns(settings.lease_idle), Ordering::Relaxed);
    }

    fn timeout(&self) -> Duration {
        Duration::from_nanos(self.timeout_ns.load(Ordering::Relaxed))
    }

    /// Whether Redis is currently used (not in fallback).
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Keys tracked.
    pub fn tracked_keys(&self) -> usize {
        self.entries.len() + self.anonymous.len()
    }

    /// Anonymous callers' keys tracked.
    pub fn tracked_anonymous(&self) -> usize {
        self.anonymous.len()
    }

    /// Whether an anonymous caller's key is tracked.
    pub(super) fn tracks_anonymous(&self, slot: u64) -> bool {
        self.anonymous.pin().contains_key(&slot)
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    pub(super) async fn check(
        &self,
        class: &ClassPolicy,
        slot: u64,
        anonymous: bool,
        redis_id: impl FnOnce() -> String,
    ) -> Verdict {
        let now = self.now();
        let entries = if anonymous {
            &self.anonymous
        } else {
            &self.entries
        };
        let entry = {
            let map = entries.pin();
            map.get_or_insert_with(slot, || Arc::new(self.entry(class, redis_id(), slot, now)))
                .clone()
        };
        entry.last_seen.store(now, Ordering::Relaxed);
        entry.rate_count.fetch_add(1, Ordering::Relaxed);
        if !self.is_up() {
            return self.fallback(&entry, class, now);
        }
        if let Some(v) = self.take(&entry, class, now) {
            return v;
        }
        if let Some(v) = self.denied(&entry, class, now) {
            return v;
        }
        // Cold (or exhausted) key: ask Redis and wait a little. The
        // stripe is shared, so a wake-up may be another key's: re-check.
        self.stats.cold_waits.fetch_add(1, Ordering::Relaxed);
        let deadline = tokio::time::Instant::now()
            + Duration::from_nanos(self.cold_wait_ns.load(Ordering::Relaxed));
        let stripe = &self.stripes[usize::from(entry.stripe)];
        self.request(&entry, class, now);
        loop {
            let mut notified = pin!(stripe.notified());
            notified.as_mut().enable();
            if !entry.in_flight.load(Ordering::Acquire) {
                break;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                break;
            }
        }
        let now = self.now();
        if let Some(v) = self.take(&entry, class, now) {
            return v;
        }
        if self.is_up() {
            if let Some(v) = self.denied(&entry, class, now) {
                return v;
            }
        }
        self.fallback(&entry, class, now)
    }

    fn entry(&self, class: &ClassPolicy, id: String, slot: u64, now: u64) -> Entry {
        Entry {
            id: id.into(),
            windows: class.redis_args.clone(),
            lease: AtomicU64::new(0),
            debt: AtomicI64::new(0),
            unacked: AtomicU64::new(0),
            heard: AtomicBool::new(false),
            in_flight: AtomicBool::new(false),
            stripe: (slot % STRIPES as u64) as u8,
            tight_window: AtomicU8::new(0),
            want: AtomicU32::new(1),
            denied_until: AtomicU64::new(0),
            last_seen: AtomicU64::new(now),
            rate_count: AtomicU32::new(0),
            rate_since: AtomicU64::new(now),
            full_at: AtomicU64::new(now),
            fallback: KeyState::default(),
        }
    }

    /// Takes a leased token, asking for more when half the batch is gone.
    fn take(&self, entry: &Arc<Entry>, class: &ClassPolicy, now: u64) -> Option<Verdict> {
        let prev = entry
            .lease
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                (s & LEASE_MASK > 0).then(|| s - 1)
            })
            .ok()?;
        let left = (prev & LEASE_MASK) - 1;
        if left <= u64::from(entry.want.load(Ordering::Relaxed) / 2) {
            self.request(entry, class, now);
        }
        self.stats.leased.fetch_add(1, Ordering::Relaxed);
        let window = usize::from(entry.tight_window.load(Ordering::Relaxed));
        Some(Verdict {
            allowed: true,
            limit: window_limit(class, window),
            // Admissions not yet charged in Redis (a cold wait that timed
            // out) are already spent.
            remaining: (left + (prev >> 32))
                .saturating_sub(entry.debt.load(Ordering::Acquire).max(0) as u64),
            reset: Duration::from_nanos(entry.full_at.load(Ordering::Relaxed).saturating_sub(now)),
            retry_after: Duration::ZERO,
            window,
            source: DecisionSource::Leased,
        })
    }

    /// A refusal while Redis says the bucket is empty.
    fn denied(&self, entry: &Entry, class: &ClassPolicy, now: u64) -> Option<Verdict> {
        let until = entry.denied_until.load(Ordering::Acquire);
        if until <= now {
            return None;
        }
        let window = usize::from(entry.tight_window.load(Ordering::Relaxed));
        Some(Verdict {
            allowed: false,
            limit: window_limit(class, window),
            remaining: 0,
            reset: Duration::from_nanos(entry.full_at.load(Ordering::Relaxed).saturating_sub(now)),
            retry_after: Duration::from_nanos(until - now),
            window,
            source: DecisionSource::Leased,
        })
    }

    /// The local decision at `limit / expected_instances`, remembered as debt.
    fn fallback(&self, entry: &Entry, class: &ClassPolicy, now: u64) -> Verdict {
        self.stats.fallback.fetch_add(1, Ordering::Relaxed);
        // Redis is only slow (up, no answer in time) and has answered for
        // this key before: admit no more than this instance's share of what
        // it last said was left, so stalls near the limit cannot overspend
        // it across instances. A key Redis never answered for is decided by
        // the fallback buckets alone, as while Redis is down.
        let slow_cap = (self.is_up() && entry.heard.load(Ordering::Acquire)).then(|| {
            let s = entry.lease.load(Ordering::Acquire);
            let instances = self.instances.load(Ordering::Relaxed).max(1);
            (s & LEASE_MASK) + (s >> 32) / instances
        });
        let owed = entry.debt.load(Ordering::Acquire).max(0) as u64;
        if slow_cap.is_some_and(|cap| owed >= cap) {
            let window = usize::from(entry.tight_window.load(Ordering::Relaxed));
            return Verdict {
                allowed: false,
                limit: window_limit(class, window),
                remaining: 0,
                reset: Duration::from_nanos(
                    entry.full_at.load(Ordering::Relaxed).saturating_sub(now),
                ),
                retry_after: Duration::from_secs(1),
                window,
                source: DecisionSource::Fallback,
            };
        }
        let d = class.fallback.check(&entry.fallback, now);
        let debt = if d.allowed {
            entry.debt.fetch_add(1, Ordering::AcqRel) + 1
        } else {
            entry.debt.load(Ordering::Acquire)
        };
        let mut v = verdict_of(&d, DecisionSource::Fallback);
        if let Some(cap) = slow_cap {
            v.remaining = v.remaining.min(cap.saturating_sub(debt.max(0) as u64));
        }
        v
    }

    /// Queues a lease call for `entry` unless one is pending.
    fn request(&self, entry: &Arc<Entry>, class: &ClassPolicy, now: u64) {
        if entry.in_flight.swap(true, Ordering::AcqRel) {
            return;
        }
        let since = entry.rate_since.swap(now, Ordering::Relaxed);
        let count = u64::from(entry.rate_count.swap(0, Ordering::Relaxed).max(1));
        let elapsed = now.saturating_sub(since).max(1_000_000);
        let per_lookahead =
            (u128::from(count) * LOOKAHEAD.as_nanos()).div_ceil(u128::from(elapsed));
        let min_limit = class.redis_args.iter().map(|w| w.0).min().unwrap_or(1);
        let instances = self.instances.load(Ordering::Relaxed).max(1);
        let cap = (min_limit / (2 * instances)).clamp(1, u64::from(u32::MAX));
        let want = u64::try_from(per_lookahead)
            .unwrap_or(u64::MAX)
            .clamp(1, cap);
        entry
            .want
            .store(u32::try_from(want).unwrap_or(u32::MAX), Ordering::Relaxed);
        if self
            .tx
            .send((entry.clone(), class.redis_args.clone()))
            .is_err()
        {
            entry.in_flight.store(false, Ordering::Release);
        }
    }

    /// One script call for `entry` with its class's `windows` (on the
    /// background runtime).
    async fn sync(&self, entry: Arc<Entry>, want: u64, windows: Arc<[(u64, u64)]>) {
        // The debt stays on the entry until Redis has charged it, so
        // `remaining` (lease + Redis left - debt) never counts it as free
        // while the call is in flight.
        let delta = entry.debt.load(Ordering::Acquire);
        let call_id = match entry.unacked.load(Ordering::Acquire) {
            0 => self.call_ids.fetch_add(1, Ordering::Relaxed) + 1,
            lost => lost,
        };
        let key = format!("{}{}", self.key_prefix, entry.id);
        let conn = self.conn.lock().ok().and_then(|c| c.clone());
        let timeout = self.timeout();
        let result = match conn {
            Some(mut conn) => {
                self.stats.calls.fetch_add(1, Ordering::Relaxed);
                let mut call = self.script.key(&key);
                call.arg(want).arg(delta).arg(windows.len());
                for (limit, period_ms) in windows.iter() {
                    call.arg(*limit).arg(*period_ms);
                }
                call.arg(&self.field).arg(call_id);
                let fut = async {
                    match &mut conn {
                        Conn::Single(c) => call.invoke_async::<Vec<i64>>(c).await,
                        Conn::Cluster(c) => call.invoke_async::<Vec<i64>>(c).await,
                    }
                };
                match tokio::time::timeout(timeout, fut).await {
                    Ok(Ok(reply)) if reply.len() == 7 => Ok(reply),
                    Ok(Ok(_)) => Err(Failed::Other("unexpected script reply".to_owned())),
                    Ok(Err(e)) => Err(Failed::Other(e.to_string())),
                    Err(_) => Err(Failed::Timeout(timeout)),
                }
            }
            None => Err(Failed::Other("not connected".to_owned())),
        };
        let now = self.now();
        match result {
            Ok(r) => {
                self.timing_out_since.store(0, Ordering::Relaxed);
                entry.unacked.store(0, Ordering::Release);
                entry.heard.store(true, Ordering::Release);
                if r[6] == 1 {
                    self.stats.replays.fetch_add(1, Ordering::Relaxed);
                }
                let granted = r[0].max(0);
                let wait_ms = r[1].max(0) as u64;
                entry
                    .tight_window
                    .store(u8::try_from(r[2].max(0)).unwrap_or(0), Ordering::Relaxed);
                entry
                    .full_at
                    .store(now + r[4].max(0) as u64 * 1_000_000, Ordering::Relaxed);
                let until = if granted == 0 && want > 0 {
                    now + wait_ms.max(1) * 1_000_000
                } else {
                    0
                };
                entry.denied_until.store(until, Ordering::Release);
                let redis_left = (r[3].max(0) as u64).min(LEASE_MASK);
                let _ = entry
                    .lease
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                        let lease = ((s & LEASE_MASK) + granted as u64).min(LEASE_MASK);
                        Some((redis_left << 32) | lease)
                    });
                // What this call charged: `delta` for a first answer, the
                // lost call's for a replay.
                entry.debt.fetch_sub(r[5], Ordering::AcqRel);
            }
            Err(failed) => {
                // The script may have run: the next call sends this id
                // again, and gets this call's answer if it did. The debt
                // stays for it: still owed, or tokens still to hand back.
                entry.unacked.store(call_id, Ordering::Release);
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                match failed {
                    // A slow answer is not an outage: calls that keep
                    // timing out for another timeout's length, with no
                    // answer between, are.
                    Failed::Timeout(t) => {
                        self.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                        let since = match self.timing_out_since.compare_exchange(
                            0,
                            now,
                            Ordering::AcqRel,
                            Ordering::Acquire,
                        ) {
                            Ok(_) => now,
                            Err(first) => first,
                        };
                        if now.saturating_sub(since)
                            >= u64::try_from(t.as_nanos()).unwrap_or(u64::MAX)
                        {
                            self.mark_down(&format!("calls keep timing out (timeout {t:?})"));
                        }
                    }
                    Failed::Other(why) => self.mark_down(&why),
                }
            }
        }
        entry.in_flight.store(false, Ordering::Release);
        self.stripes[usize::from(entry.stripe)].notify_waiters();
    }

    fn mark_down(&self, why: &str) {
        if self.up.swap(false, Ordering::AcqRel) {
            self.stats.outages.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(redis = %self.target_name(), error = why,
                "Redis unreachable: rate limits are local (limit / expected_instances) until it returns");
        }
    }

    /// The Redis node(s) as configured, for logs and the status page.
    pub fn target_name(&self) -> String {
        match &self.target {
            RedisTarget::Single(u) => u.to_string(),
            RedisTarget::Cluster(nodes) => nodes
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
        }
    }

    /// Returns idle leases and forgets keys that hold nothing.
    pub(super) fn sweep(&self) {
        let now = self.now();
        self.sweep_map(&self.entries, now);
        self.sweep_map(&self.anonymous, now);
    }

    fn sweep_map(&self, entries: &Entries, now: u64) {
        let lease_idle = self.lease_idle.load(Ordering::Relaxed);
        let map = entries.pin();
        map.retain(|_, e| {
            let idle = now.saturating_sub(e.last_seen.load(Ordering::Relaxed));
            if idle < lease_idle || e.in_flight.load(Ordering::Acquire) {
                return true;
            }
            let lease = (e.lease.fetch_and(!LEASE_MASK, Ordering::AcqRel) & LEASE_MASK) as i64;
            let debt = e.debt.load(Ordering::Acquire);
            if (lease > 0 || debt != 0) && self.is_up() {
                e.debt.fetch_sub(lease, Ordering::AcqRel);
                if !e.in_flight.swap(true, Ordering::AcqRel) {
                    e.want.store(0, Ordering::Relaxed);
                    let _ = self.tx.send((e.clone(), e.windows.clone()));
                }
                return true;
            }
            if lease > 0 {
                e.lease.fetch_add(lease as u64, Ordering::AcqRel);
                return true;
            }
            // Nothing leased or owed, and the fallback buckets are full.
            debt != 0 || !e.fallback.is_idle(now) || e.denied_until.load(Ordering::Relaxed) > now
        });
    }

    async fn connect(&self) -> Result<Conn, String> {
        let fut = async {
            match &self.target {
                RedisTarget::Single(url) => {
                    let client = redis::Client::open(url.expose()).map_err(|e| e.to_string())?;
                    // The response timeout is a backstop: `sync` times out
                    // first and keeps the call's id for a replay.
                    let config = ConnectionManagerConfig::new()
                        .set_connection_timeout(Some(self.timeout()))
                        .set_response_timeout(Some(self.timeout() * 4))
                        .set_number_of_retries(1);
                    ConnectionManager::new_with_config(client, config)
                        .await
                        .map(Conn::Single)
                        .map_err(|e| e.to_string())
                }
                RedisTarget::Cluster(nodes) => {
                    let client = redis::cluster::ClusterClient::builder(
                        nodes.iter().map(|u| u.expose().to_owned()),
                    )
                    .connection_timeout(self.timeout())
                    .response_timeout(self.timeout() * 4)
                    .build()
                    .map_err(|e| e.to_string())?;
                    client
                        .get_async_connection()
                        .await
                        .map(Conn::Cluster)
                        .map_err(|e| e.to_string())
                }
            }
        };
        tokio::time::timeout(self.timeout() * 5, fut)
            .await
            .map_err(|_| "connect timed out".to_owned())?
    }

    async fn ping(&self, conn: &mut Conn) -> bool {
        let cmd = redis::cmd("PING");
        let fut = async {
            match conn {
                Conn::Single(c) => cmd.query_async::<String>(c).await,
                Conn::Cluster(c) => cmd.query_async::<String>(c).await,
            }
        };
        matches!(tokio::time::timeout(self.timeout(), fut).await, Ok(Ok(_)))
    }
}

fn window_limit(class: &ClassPolicy, window: usize) -> u64 {
    class
        .policy
        .windows()
        .get(window)
        .or(class.policy.windows().first())
        .map_or(0, |w| w.limit())
}

/// Why a lease call got no answer.
enum Failed {
    /// None within the timeout (the script may still have run).
    Timeout(Duration),
    /// An error (not connected, connection lost, a script error).
    Other(String),
}

async fn lease_loop(shared: Weak<Shared>, mut rx: mpsc::UnboundedReceiver<Call>) {
    while let Some((entry, windows)) = rx.recv().await {
        let Some(s) = shared.upgrade() else { return };
        let want = u64::from(entry.want.load(Ordering::Relaxed));
        tokio::spawn(async move { s.sync(entry, want, windows).await });
    }
}

/// Connects, and while Redis is marked down checks it until it answers.
async fn probe_loop(shared: Weak<Shared>, ready: std::sync::mpsc::Sender<()>) {
    let mut first = Some(ready);
    loop {
        let Some(s) = shared.upgrade() else { return };
        if !s.is_up() {
            let existing = s.conn.lock().ok().and_then(|c| c.clone());
            let conn = match existing {
                Some(c) => Ok(c),
                None => s.connect().await,
            };
            match conn {
                Ok(mut c) => {
                    if s.ping(&mut c).await {
                        if let Ok(mut slot) = s.conn.lock() {
                            *slot = Some(c);
                        }
                        s.timing_out_since.store(0, Ordering::Relaxed);
                        s.up.store(true, Ordering::Release);
                        if first.is_none() {
                            tracing::info!(redis = %s.target_name(),
                                "Redis reachable again: rate limits are shared again");
                        }
                    }
                }
                Err(why) => {
                    if first.is_some() {
                        tracing::warn!(redis = %s.target_name(), error = %why,
                            "Redis unreachable at start: rate limits are local until it answers");
                        s.stats.outages.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            if let Some(ready) = first.take() {
                let _ = ready.send(());
            }
        }
        drop(s);
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}
