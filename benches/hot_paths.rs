//! Criterion benches of the per-request hot paths: route matching over a
//! 100-route table, backend selection, request-id generation, the
//! rate-limit bucket decision.
//!
//! Run: `cargo bench --bench hot_paths`. Target (SPEC §6): < 0.5 µs each.

use std::fmt::Write as _;
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
    let Ok(pool) = Pool::build(spec) else {
        panic!("pool did not build");
    };
    let tried = Tried::default();
    c.bench_function("select_weighted_round_robin", |b| {
        b.iter(|| pool.select(black_box(&tried), None))
    });
    c.bench_function("request_id_uuidv7", |b| {
        b.iter(gateway::proxy::new_request_id)
    });
}

fn bench_buckets(c: &mut Criterion) {
    use gateway::ratelimit::gcra::{KeyState, Policy, Window};
    use std::time::{Duration, Instant};
    let window = |limit, secs| {
        Window::new(limit, Duration::from_secs(secs)).unwrap_or_else(|| panic!("bad window"))
    };
    // PREMIUM: 200/min, 5000/h, 50000/day — three windows per decision.
    let policy = Policy::new(vec![
        window(200, 60),
        window(5000, 3600),
        window(50000, 86400),
    ]);
    let base = Instant::now();
    let now = || base.elapsed().as_nanos() as u64 + 86_400_000_000_000;
    let hot = KeyState::default();
    c.bench_function("bucket_decision_hot_key_3_windows", |b| {
        b.iter(|| policy.check(black_box(&hot), now()))
    });
    c.bench_function("bucket_decision_cold_key_3_windows", |b| {
        b.iter(|| {
            let fresh = KeyState::default();
            policy.check(black_box(&fresh), now())
        })
    });
}

criterion_group!(benches, bench_router, bench_selection, bench_buckets);
criterion_main!(benches);
