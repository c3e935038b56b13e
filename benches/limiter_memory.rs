//! Memory of the rate limiter's key map: 1 M distinct callers, each with
//! minute/hour/day buckets, locally and in Redis mode (entries of the Redis
//! mode carry their lease state; Redis itself is not needed for the
//! measurement: an unreachable one puts every decision on the fallback path,
//! which creates the same entries).
//!
//! Run: `cargo bench --bench limiter_memory`. Target (SPEC §6): < 256 MB.

use std::sync::Arc;

// The allocator the `tiergate` binary uses, so the figures match it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use gateway::background::Background;
use gateway::ratelimit::{key_of, RateLimiter};

const KEYS: u64 = 1_000_000;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn limiter(extra: &str, bg: Option<&Background>) -> Arc<RateLimiter> {
    let yaml = format!(
        "upstreams: {{p: {{backends: [{{address: \"127.0.0.1:1\"}}]}}}}\nroutes: [{{name: r, match: {{}}, upstream: p}}]\n{extra}"
    );
    let config = gateway::config::parse(&yaml).unwrap_or_else(|e| panic!("{e}"));
    RateLimiter::new(&config.rate_limit, None, bg)
}

fn measure(name: &str, limiter: &RateLimiter, runtime: &tokio::runtime::Runtime) {
    let free = limiter.tier_of(Some("FREE"));
    let before = rss_bytes();
    let start = std::time::Instant::now();
    // The slowest single decision: a new key that lands on a table resize.
    let slowest = runtime.block_on(async {
        let mut slowest = std::time::Duration::ZERO;
        for i in 0..KEYS {
            let sub = format!("user-{i}");
            let key = key_of(&[b"u:", sub.as_bytes()]);
            let t = std::time::Instant::now();
            let v = limiter.check(free, key, || format!("u:{sub}")).await;
            slowest = slowest.max(t.elapsed());
            assert!(v.is_some_and(|v| v.allowed));
        }
        slowest
    });
    let took = start.elapsed();
    let after = rss_bytes();
    let delta = after.saturating_sub(before);
    println!(
        "{name}: {} keys tracked, RSS +{:.1} MiB ({} bytes per key), inserted in {:.2} s, slowest decision {slowest:?}",
        limiter.tracked_keys(),
        delta as f64 / (1024.0 * 1024.0),
        delta / KEYS,
        took.as_secs_f64()
    );
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let local = limiter("", None);
    measure("local buckets (FREE: 3 windows)", &local, &runtime);
    drop(local);
    let bg = Background::start().unwrap_or_else(|e| panic!("{e}"));
    let shared = limiter(
        "rate_limit:\n  redis: { url: \"redis://127.0.0.1:1\", timeout: 10ms }\n",
        Some(&bg),
    );
    measure("Redis mode entries (FREE: 3 windows)", &shared, &runtime);
}
