//! Criterion benches of the per-request hot paths: route matching over a
//! 100-route table, backend selection, request-id generation, the
//! rate-limit bucket decision (hot and cold key, through the key map), JWT
//! checks (cached, and uncached HS256 / EdDSA / RS256 verification), and
//! usage metering (counting one admitted request per caller and route).
//!
//! Run: `cargo bench --bench hot_paths`. Target (SPEC §6): < 0.5 µs each.

use std::fmt::Write as _;

// The allocator the `tiergate` binary uses, so the figures match it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use gateway::config;
use gateway::router::{RouteMatch, Router};
use gateway::upstream::select::Tried;
use gateway::upstream::Pool;
use http::{HeaderMap, Method};

/// 100 routes: 60 prefixes two segments deep, 20 exact paths, 10 regexes,
/// 10 host-bound prefixes — a realistic mix for a SaaS API edge.
fn hundred_routes() -> config::Config {
    let mut yaml = String::from(
        "upstreams:\n  p:\n    backends:\n      - { address: \"127.0.0.1:9001\", weight: 3 }\n      - { address: \"127.0.0.1:9002\", weight: 1 }\nroutes:\n",
    );
    // (name, count, match with `#` standing for the route's number)
    let kinds = [
        ("prefix", 60, "path: { prefix: /api/svc#/v1 }"),
        (
            "exact",
            20,
            "path: { exact: /exact/#/status }, methods: [GET]",
        ),
        ("regex", 10, "path: { regex: \"^/items#/[0-9]+/detail$\" }"),
        (
            "host",
            10,
            "hosts: [\"tenant#.example.com\"], path: { prefix: /api }",
        ),
    ];
    for (kind, count, matcher) in kinds {
        for i in 0..count {
            let matcher = matcher.replace('#', &i.to_string());
            let _ = writeln!(
                yaml,
                "  - {{ name: {kind}-{i}, match: {{ {matcher} }}, upstream: p }}"
            );
        }
    }
    config::parse(&yaml).unwrap_or_else(|e| panic!("{e}"))
}

fn bench_router(c: &mut Criterion) {
    let config = hundred_routes();
    assert_eq!(config.routes.len(), 100);
    let router = Router::new(&config.routes);
    let headers = HeaderMap::new();
    let mut g = c.benchmark_group("route_match_100_routes");
    let cases = [
        (
            "prefix_hit",
            "api.example.com",
            "/api/svc42/v1/users/123/orders",
        ),
        ("exact_hit", "api.example.com", "/exact/7/status"),
        ("host_hit", "tenant3.example.com:8000", "/api/anything"),
        ("miss_404", "api.example.com", "/nothing/here"),
    ];
    for (name, host, path) in cases {
        assert!(
            matches!(
                router.find(host, path, &Method::GET, &headers),
                RouteMatch::Found(_)
            ) || name == "miss_404"
        );
        g.bench_function(name, |b| {
            b.iter(|| router.find(black_box(host), black_box(path), &Method::GET, &headers))
        });
    }
    // Regex routes are tried before prefixes: the worst case for a path
    // that reaches the prefix trie.
    g.bench_function("regex_hit", |b| {
        b.iter(|| {
            router.find(
                black_box("api.example.com"),
                black_box("/items9/123/detail"),
                &Method::GET,
                &headers,
            )
        })
    });
    g.finish();
}

fn bench_selection(c: &mut Criterion) {
    let config = hundred_routes();
    let Some(spec) = config.upstreams.first() else {
        panic!("no pool");
    };
    let resolver = gateway::upstream::discovery::Resolver::new(&config.dns);
    let Ok(pool) = Pool::build(spec, &resolver) else {
        panic!("pool did not build");
    };
    let tried = Tried::default();
    // What a request does: load the current members, then pick.
    c.bench_function("select_weighted_round_robin", |b| {
        b.iter(|| pool.members().select(black_box(&tried), None))
    });
    c.bench_function("request_id_uuidv7", |b| {
        b.iter(gateway::request_id::new_request_id)
    });
}

/// The tier table of the shipped config, local limits (no Redis).
fn limiter() -> std::sync::Arc<gateway::ratelimit::RateLimiter> {
    let yaml = "upstreams: {p: {backends: [{address: \"127.0.0.1:1\"}]}}\nroutes: [{name: r, match: {}, upstream: p}]\n";
    let config = config::parse(yaml).unwrap_or_else(|e| panic!("{e}"));
    gateway::ratelimit::RateLimiter::new(&config.rate_limit, None, None)
}

fn bench_buckets(c: &mut Criterion) {
    use std::time::{Duration, Instant};
    let limiter = limiter();
    // PREMIUM: 200/min, 5000/h, 50000/day — three windows per decision,
    // through the key map, as the proxy calls it.
    let premium = limiter.tier_of(Some("PREMIUM"));
    let hot_key = gateway::ratelimit::key_of(&[b"u:", b"user-42"]);
    c.bench_function("bucket_decision_hot_key_3_windows", |b| {
        b.iter(|| limiter.check_local(premium, black_box(hot_key)))
    });
    // A key never seen: map insert + fresh buckets. A new limiter per
    // sample so the map does not grow without bound.
    c.bench_function("bucket_decision_cold_key_3_windows", |b| {
        b.iter_custom(|iters| {
            let fresh = self::limiter();
            let start = Instant::now();
            for i in 0..iters {
                black_box(fresh.check_local(premium, i.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
            }
            let took = start.elapsed();
            drop(fresh);
            took.max(Duration::from_nanos(1))
        })
    });
}

fn fixture(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/jwt")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn bench_jwt(c: &mut Criterion) {
    use gateway::auth::jwks::KeySet;
    use gateway::auth::Authenticator;
    use gateway::secret::Secret;
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    let yaml = "upstreams: {p: {backends: [{address: \"127.0.0.1:1\"}]}}\nroutes: [{name: r, match: {}, upstream: p}]\nenvironment: development\nauth: {jwks: {url: \"http://127.0.0.1:1/jwks\"}, issuer: iss, audience: aud, algorithms: [EdDSA, RS256, HS256]}\n";
    let config = config::parse(yaml).unwrap_or_else(|e| panic!("{e}"));
    let secret = Secret::new("bench-secret".into());
    let auth = Authenticator::new(&config.auth, Some(&secret), None);
    let Some(jwks) = auth.jwks() else {
        panic!("no jwks")
    };
    jwks.replace_keys(KeySet::parse(&fixture("jwks.json")).unwrap_or_else(|e| panic!("{e}")));
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        + 3600;
    let claims = serde_json::json!({"sub": "user-42", "tier": "PREMIUM", "roles": ["user"],
        "iss": "iss", "aud": "aud", "exp": exp});
    let hs = encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(b"bench-secret"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some("ed-1".into());
    let ed_key =
        EncodingKey::from_ed_pem(&fixture("ed25519_private.pem")).unwrap_or_else(|e| panic!("{e}"));
    let ed = encode(&header, &claims, &ed_key).unwrap_or_else(|e| panic!("{e}"));
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("rsa-1".into());
    let rsa_key =
        EncodingKey::from_rsa_pem(&fixture("rsa_private.pem")).unwrap_or_else(|e| panic!("{e}"));
    let rs = encode(&header, &claims, &rsa_key).unwrap_or_else(|e| panic!("{e}"));
    for t in [&hs, &ed, &rs] {
        assert!(auth.verify_uncached(t).is_ok());
    }
    // Warm the cache the way a first request does.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(runtime.block_on(auth.verify(ed.as_bytes())).is_ok());
    let mut g = c.benchmark_group("jwt");
    g.bench_function("cached_check_eddsa_token", |b| {
        b.iter(|| auth.cached(black_box(ed.as_bytes())))
    });
    g.bench_function("uncached_verify_hs256", |b| {
        b.iter(|| auth.verify_uncached(black_box(&hs)))
    });
    g.bench_function("uncached_verify_eddsa", |b| {
        b.iter(|| auth.verify_uncached(black_box(&ed)))
    });
    g.bench_function("uncached_verify_rs256", |b| {
        b.iter(|| auth.verify_uncached(black_box(&rs)))
    });
    g.finish();
}

/// Counting one admitted request: a caller already in the window (the
/// steady state), and across 10 000 callers × 5 routes (map misses in
/// cache, not in the map). Target (issue 19): < 100 ns.
fn bench_usage(c: &mut Criterion) {
    let meter = gateway::usage::Meter::new();
    let users: Vec<String> = (0..10_000)
        .map(|i| format!("0193a1b2-7c4d-7000-8000-{i:012}"))
        .collect();
    let routes = ["quotes", "orders", "account", "subscriptions", "billing"];
    for u in &users {
        for r in routes {
            meter.count(u.as_bytes(), None, r);
        }
    }
    let mut g = c.benchmark_group("usage");
    g.bench_function("record_hot_caller", |b| {
        b.iter(|| meter.count(black_box(users[7].as_bytes()), None, black_box("quotes")))
    });
    let mut i = 0usize;
    g.bench_function("record_10k_callers_5_routes", |b| {
        b.iter(|| {
            i = (i + 7919) % (users.len() * routes.len());
            meter.count(
                black_box(users[i / routes.len()].as_bytes()),
                Some(b"0193a1b2-7c4d-7000-8000-org000000001".as_slice())
                    .filter(|_| i.is_multiple_of(3)),
                black_box(routes[i % routes.len()]),
            )
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    bench_router,
    bench_selection,
    bench_buckets,
    bench_jwt,
    bench_usage
);
criterion_main!(benches);
