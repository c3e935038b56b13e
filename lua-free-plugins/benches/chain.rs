//! Per-request cost of a plugin chain: empty, and five built-ins (cors,
//! headers, ip-restriction, request-size-limit, rewrite) on a request
//! they all act on. `cargo bench -p lua-free-plugins --bench chain`.

// Bench set-up: a failed unwrap is a broken bench, reported with its place.
#![allow(clippy::unwrap_used)]

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use lua_free_plugins::{build_chain, Chain, PluginCtx, Registry, RequestHeader, ResponseHeader};

const FIVE: &str = r#"
- cors: { allow_origins: ["https://app.example.com"], allow_credentials: true }
- headers: { request: { set: { x-api-version: "2" } }, response: { set: { x-frame-options: DENY } } }
- ip-restriction: { allow: [10.0.0.0/8, "2001:db8::/32"] }
- request-size-limit: { max_bytes: 1048576 }
- rewrite: { regex: "^/v1/(.*)$", replacement: "/api/$1" }
"#;

fn request() -> RequestHeader {
    let mut req = RequestHeader::build("GET", b"/v1/users/42?x=1", None).unwrap();
    req.insert_header("host", "api.example.com").unwrap();
    req.insert_header("origin", "https://app.example.com")
        .unwrap();
    req.insert_header("content-length", "0").unwrap();
    req
}

/// Every hook a proxied request goes through.
fn run(chain: &Chain, template: &RequestHeader) -> u16 {
    let mut req = template.clone();
    let mut ctx = PluginCtx::new("bench".into());
    ctx.client_ip = Some("10.1.2.3".parse().unwrap());
    if chain.request(&mut req, &mut ctx).is_some() {
        return 0;
    }
    chain.request_body(None, true, &mut ctx);
    let mut upstream = req.clone();
    chain.upstream_request(&mut upstream, &mut ctx);
    let mut resp = ResponseHeader::build(200, Some(4)).unwrap();
    chain.upstream_response(&mut resp, &mut ctx);
    chain.response(&req, &mut resp, &mut ctx);
    resp.status.as_u16()
}

fn bench(c: &mut Criterion) {
    let registry = Registry::with_builtins();
    let five = build_chain(&registry, &serde_yaml_ng::from_str(FIVE).unwrap()).unwrap();
    assert_eq!(five.names().len(), 5);
    let empty = Chain::default();
    let template = request();
    let mut g = c.benchmark_group("plugin_chain");
    g.bench_function("empty", |b| b.iter(|| run(black_box(&empty), &template)));
    g.bench_function("five_builtins", |b| {
        b.iter(|| run(black_box(&five), &template))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
