//! Route matching precedence, host wildcards, regex, rewrites, forwarding
//! headers.

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_routing_precedence_host_path_method_headers() {
    let any_prefix = upstream("any_prefix").await;
    let deep_prefix = upstream("deep_prefix").await;
    let exact = upstream("exact").await;
    let regex = upstream("regex").await;
    let host_exact = upstream("host_exact").await;
    let host_wild = upstream("host_wild").await;
    let post_only = upstream("post_only").await;
    let config = format!(
        r#"
upstreams:
  any_prefix: {{ backends: [{{ address: "{}" }}] }}
  deep_prefix: {{ backends: [{{ address: "{}" }}] }}
  exact: {{ backends: [{{ address: "{}" }}] }}
  regex: {{ backends: [{{ address: "{}" }}] }}
  host_exact: {{ backends: [{{ address: "{}" }}] }}
  host_wild: {{ backends: [{{ address: "{}" }}] }}
  post_only: {{ backends: [{{ address: "{}" }}] }}
routes:
  - name: api
    match: {{ path: {{ prefix: /api }} }}
    upstream: any_prefix
  - name: users
    match: {{ path: {{ prefix: /api/users }} }}
    upstream: deep_prefix
  - name: me
    match: {{ path: {{ exact: /api/users/me }} }}
    upstream: exact
  - name: by-id
    match: {{ path: {{ regex: "^/api/users/[0-9]+$" }} }}
    upstream: regex
  - name: host-exact
    match: {{ hosts: [admin.example.com], path: {{ prefix: / }} }}
    upstream: host_exact
  - name: host-wild
    match: {{ hosts: ["*.example.com"], path: {{ prefix: /api }} }}
    upstream: host_wild
  - name: create-order
    match: {{ path: {{ prefix: /api/orders }}, methods: [POST] }}
    upstream: post_only
"#,
        any_prefix.addr,
        deep_prefix.addr,
        exact.addr,
        regex.addr,
        host_exact.addr,
        host_wild.addr,
        post_only.addr
    );
    let gw = gateway(&config);
    let c = client();
    let case = |host: &'static str, path: &'static str| {
        let c = c.clone();
        let url = gw.url(path);
        async move {
            let resp = c.get(&url).header("host", host).send().await.unwrap();
            let v: serde_json::Value = resp.json().await.unwrap();
            backend_of(&v).to_owned()
        }
    };
    // Exact beats regex beats the longest prefix beats a shorter prefix.
    assert_eq!(case("h", "/api/users/me").await, "exact");
    assert_eq!(case("h", "/api/users/42").await, "regex");
    assert_eq!(case("h", "/api/users/42/orders").await, "deep_prefix");
    assert_eq!(case("h", "/api/users").await, "deep_prefix");
    assert_eq!(case("h", "/api/other").await, "any_prefix");
    // Prefixes match whole segments.
    assert_eq!(case("h", "/api/usersx").await, "any_prefix");
    // An exact host beats a wildcard, which beats host-less routes.
    assert_eq!(
        case("admin.example.com", "/api/users/me").await,
        "host_exact"
    );
    assert_eq!(
        case("shop.example.com:8000", "/api/users/me").await,
        "host_wild"
    );
    assert_eq!(case("a.b.example.com", "/api").await, "host_wild");
    // The wildcard needs a label before the suffix.
    assert_eq!(case("example.com", "/api/x").await, "any_prefix");
    // A wildcard host route only covers its own paths; others fall through.
    assert_eq!(case("shop.example.com", "/other").await, "<none>");
    // Methods: GET on a POST-only prefix falls back to the shorter prefix.
    assert_eq!(case("h", "/api/orders/1").await, "any_prefix");
    let v = json_of(c.post(gw.url("/api/orders/1")).body("x")).await;
    assert_eq!(backend_of(&v), "post_only");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_header_match_selects_route_in_file_order() {
    let stable = upstream("stable").await;
    let canary = upstream("canary").await;
    let gw = gateway(&format!(
        r#"
upstreams:
  stable: {{ backends: [{{ address: "{}" }}] }}
  canary: {{ backends: [{{ address: "{}" }}] }}
routes:
  - name: canary
    match: {{ path: {{ prefix: /api }}, headers: {{ x-canary: "1" }} }}
    upstream: canary
  - name: stable
    match: {{ path: {{ prefix: /api }} }}
    upstream: stable
"#,
        stable.addr, canary.addr
    ));
    let c = client();
    let (_, v) = get_json(&c, &gw.url("/api/x")).await;
    assert_eq!(backend_of(&v), "stable");
    let v = json_of(c.get(gw.url("/api/x")).header("x-canary", "1")).await;
    assert_eq!(backend_of(&v), "canary");
    let v = json_of(c.get(gw.url("/api/x")).header("x-canary", "2")).await;
    assert_eq!(backend_of(&v), "stable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_strip_prefix_and_rewrites_reach_upstream() {
    let up = upstream("svc").await;
    let gw = gateway(&format!(
        r#"
upstreams:
  svc: {{ backends: [{{ address: "{a}" }}] }}
routes:
  - name: strip
    match: {{ path: {{ prefix: /svc }} }}
    upstream: svc
    strip_prefix: true
  - name: prefix-rewrite
    match: {{ path: {{ prefix: /old }} }}
    upstream: svc
    rewrite: {{ prefix: /new/v2 }}
  - name: regex-rewrite
    match: {{ path: {{ regex: "^/u/([0-9]+)$" }} }}
    upstream: svc
    rewrite: {{ regex: {{ pattern: "^/u/([0-9]+)$", replacement: "/users/$1/profile" }} }}
  - name: host-set
    match: {{ path: {{ prefix: /set-host }} }}
    upstream: svc
    upstream_host: internal.example
  - name: host-backend
    match: {{ path: {{ prefix: /backend-host }} }}
    upstream: svc
    upstream_host: backend
"#,
        a = up.addr
    ));
    let c = client();
    let (_, v) = get_json(&c, &gw.url("/svc/echo/x?q=1")).await;
    assert_eq!(v["path"], "/echo/x?q=1");
    let (_, v) = get_json(&c, &gw.url("/svc")).await;
    assert_eq!(v["path"], "/");
    let (_, v) = get_json(&c, &gw.url("/old/a/b")).await;
    assert_eq!(v["path"], "/new/v2/a/b");
    let (_, v) = get_json(&c, &gw.url("/u/42")).await;
    assert_eq!(v["path"], "/users/42/profile");
    // Host: preserved by default, set, or the backend's address.
    let (_, v) = get_json(&c, &gw.url("/svc/h")).await;
    assert_eq!(v["headers"]["host"], gw.addr.to_string());
    let (_, v) = get_json(&c, &gw.url("/set-host")).await;
    assert_eq!(v["headers"]["host"], "internal.example");
    assert_eq!(v["headers"]["x-forwarded-host"], gw.addr.to_string());
    let (_, v) = get_json(&c, &gw.url("/backend-host")).await;
    assert_eq!(v["headers"]["host"], up.addr.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_request_id_and_forwarding_headers() {
    let up = upstream("svc").await;
    let gw = gateway(&one_route(up.addr));
    let c = client();
    // Generated: a UUIDv7, the same upstream and back.
    let resp = c.get(gw.url("/x")).send().await.unwrap();
    let returned = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["headers"]["x-request-id"], returned.as_str());
    assert_eq!(returned.len(), 36);
    assert_eq!(&returned[14..15], "7", "UUID version 7: {returned}");
    // Client-supplied ids pass through unchanged; unsafe ones are replaced.
    let resp = c
        .get(gw.url("/x"))
        .header("x-request-id", "client-abc-123")
        .header("x-forwarded-for", "203.0.113.9")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "client-abc-123");
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["headers"]["x-request-id"], "client-abc-123");
    // The peer is not a trusted proxy: what it says about earlier hops is
    // replaced by its own address.
    assert_eq!(v["headers"]["x-forwarded-for"], "127.0.0.1");
    assert_eq!(v["headers"]["x-forwarded-proto"], "http");
    let resp = c
        .get(gw.url("/x"))
        .header("x-request-id", "has \"quotes\"")
        .send()
        .await
        .unwrap();
    assert_ne!(resp.headers()["x-request-id"], "has \"quotes\"");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_repeated_headers_survive_both_ways() {
    // The header filters move the `http` parts out of Pingora's header
    // type and back: repeated headers must stay repeated in both
    // directions, and the gateway's own headers must be added once.
    use axum::http::{HeaderMap, HeaderValue};
    let app = axum::Router::new().fallback(|headers: HeaderMap| async move {
        let seen: Vec<String> = headers
            .get_all("x-multi")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect();
        let mut out = HeaderMap::new();
        out.append("set-cookie", HeaderValue::from_static("a=1"));
        out.append("set-cookie", HeaderValue::from_static("b=2"));
        out.insert("x-request-id", HeaderValue::from_static("from-upstream"));
        (out, seen.join("|"))
    });
    let (addr, task) = serve(app).await;
    let gw = gateway(&one_route(addr));
    let resp = client()
        .get(gw.url("/x"))
        .header("x-multi", "one")
        .header("x-multi", "two")
        .header("x-request-id", "mine-1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let cookies: Vec<&str> = resp
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(cookies, ["a=1", "b=2"]);
    let ids: Vec<&str> = resp
        .headers()
        .get_all("x-request-id")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(ids, ["mine-1"], "the gateway's id replaces the upstream's");
    assert_eq!(resp.text().await.unwrap(), "one|two");
    task.abort();
}
