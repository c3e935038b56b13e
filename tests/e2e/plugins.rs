//! Route plugins through a real gateway: each built-in's behaviour on the
//! wire, the order (core first, global plugins, then the route's), bad
//! plugin config at load, and a third-party plugin registered next to the
//! built-ins.

use std::net::SocketAddr;

use gateway::secret::Environment;
use gateway::server::GatewayServer;
use reqwest::StatusCode;
use serde_json::Value;

use crate::common::{
    client, free_port, gateway_with_env, json_of, upstream, wait_for_port, TestGateway,
};

#[path = "../../lua-free-plugins/examples/api_key/plugin.rs"]
#[allow(dead_code)] // `served` is shown off by the example's main
mod api_key;

const SECRET: &str = "plugins-test-secret";

fn env() -> Environment {
    crate::tokens::dev_env(SECRET)
}

fn token(sub: &str) -> String {
    let claims = serde_json::json!({"sub": sub, "tier": "FREE", "exp": 4_000_000_000u64});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn config(up: SocketAddr) -> String {
    format!(
        r#"auth:
  algorithms: [HS256]
plugins:
  - headers: {{ response: {{ set: {{ x-frame-options: DENY }} }} }}
upstreams:
  echo: {{ backends: [{{ address: "{up}" }}] }}
routes:
  - name: cors
    match: {{ path: {{ prefix: /cors }} }}
    upstream: echo
    auth: required
    plugins:
      - cors: {{ allow_origins: ["https://app.example.com"], allow_credentials: true, expose_headers: [x-request-id] }}
  - name: headers
    match: {{ path: {{ prefix: /headers }} }}
    upstream: echo
    plugins:
      - headers:
          request: {{ set: {{ x-api-version: "2" }}, remove: [x-debug] }}
          response: {{ add: {{ x-tag: edge }}, remove: [server] }}
  - name: ip
    match: {{ path: {{ prefix: /ip }} }}
    upstream: echo
    plugins:
      - ip-restriction: {{ allow: ["10.0.0.0/8", "::1/128"] }}
  - name: ip-ok
    match: {{ path: {{ prefix: /local }} }}
    upstream: echo
    plugins:
      - ip-restriction: {{ allow: ["127.0.0.0/8"], deny: ["10.0.0.0/8"] }}
  - name: size
    match: {{ path: {{ prefix: /upload }} }}
    upstream: echo
    plugins:
      - request-size-limit: {{ max_bytes: 1000 }}
  - name: rewrite
    match: {{ path: {{ prefix: /v1 }} }}
    upstream: echo
    plugins:
      - rewrite: {{ regex: "^/v1/users/(?P<id>[0-9]+)$", replacement: "/internal/accounts/${{id}}" }}
  - name: maintenance
    match: {{ path: {{ prefix: /maintenance }} }}
    upstream: echo
    auth: required
    plugins:
      - static-response: {{ status: 503, headers: {{ retry-after: "600" }}, content_type: application/json, body: '{{"maintenance":true}}' }}
  - name: redirect
    match: {{ path: {{ prefix: /docs }} }}
    upstream: echo
    plugins:
      - redirect: {{ regex: "^/docs/(.*)$", to: "https://docs.example.com/$1", status: 301 }}
"#
    )
}

async fn start() -> (TestGateway, crate::common::Upstream) {
    let up = upstream("echo").await;
    let gw = gateway_with_env(&config(up.addr), &env());
    (gw, up)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cors_preflight_skips_auth_and_responses_carry_cors_headers() {
    let (gw, _up) = start().await;
    let c = client();
    // A preflight carries no token: answered by the plugin, 204, no upstream.
    let r = c
        .request(reqwest::Method::OPTIONS, gw.url("/cors/items"))
        .header("origin", "https://app.example.com")
        .header("access-control-request-method", "PUT")
        .header("access-control-request-headers", "authorization")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let h = r.headers();
    assert_eq!(h["access-control-allow-origin"], "https://app.example.com");
    assert_eq!(h["access-control-allow-credentials"], "true");
    assert_eq!(h["access-control-allow-headers"], "authorization");
    assert!(h.contains_key("x-request-id"));
    assert_eq!(h["x-frame-options"], "DENY", "global plugins answer too");
    // The real request still needs the token (the core runs first).
    let r = c
        .get(gw.url("/cors/items"))
        .header("origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = c
        .get(gw.url("/cors/items"))
        .header("origin", "https://app.example.com")
        .bearer_auth(token("u1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert_eq!(r.headers()["access-control-expose-headers"], "x-request-id");
    // Another origin gets no CORS headers.
    let r = c
        .get(gw.url("/cors/items"))
        .header("origin", "https://evil.example")
        .bearer_auth(token("u1"))
        .send()
        .await
        .unwrap();
    assert!(!r.headers().contains_key("access-control-allow-origin"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_headers_rewrite_redirect_and_static_response_on_the_wire() {
    let (gw, _up) = start().await;
    let c = client();
    let r = c
        .get(gw.url("/headers/x"))
        .header("x-debug", "on")
        .header("x-api-version", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["x-tag"], "edge");
    assert_eq!(r.headers()["x-frame-options"], "DENY");
    assert!(!r.headers().contains_key("server"));
    let echo: Value = r.json().await.unwrap();
    assert_eq!(echo["headers"]["x-api-version"], "2");
    assert!(echo["headers"]["x-debug"].is_null());

    let echo = json_of(c.get(gw.url("/v1/users/42?full=1"))).await;
    assert_eq!(echo["path"], "/internal/accounts/42?full=1");

    let no_redirects = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = no_redirects
        .get(gw.url("/docs/guide/intro?lang=en"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::MOVED_PERMANENTLY);
    assert_eq!(
        r.headers()["location"],
        "https://docs.example.com/guide/intro?lang=en"
    );

    // Maintenance mode answers after auth (the core runs first).
    let r = c.get(gw.url("/maintenance")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = c
        .get(gw.url("/maintenance"))
        .bearer_auth(token("u2"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers()["retry-after"], "600");
    assert_eq!(r.headers()["content-type"], "application/json");
    assert_eq!(r.text().await.unwrap(), r#"{"maintenance":true}"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_ip_restriction_and_request_size_limit() {
    let (gw, _up) = start().await;
    let c = client();
    let r = c.get(gw.url("/ip")).send().await.unwrap();
    assert_eq!(
        r.status(),
        StatusCode::FORBIDDEN,
        "127.0.0.1 is not allowed"
    );
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "ip_forbidden");
    assert_eq!(c.get(gw.url("/local")).send().await.unwrap().status(), 200);

    // Announced size over the limit: refused before the upstream.
    let r = c
        .post(gw.url("/upload"))
        .body(vec![b'x'; 1001])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let r = c
        .post(gw.url("/upload"))
        .body(vec![b'x'; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // Streamed (chunked, no Content-Length): refused once past the limit.
    let chunks = futures_util::stream::iter(
        (0..8).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'y'; 400]))),
    );
    let r = c
        .post(gw.url("/upload"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let small = futures_util::stream::iter(
        (0..2).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'y'; 400]))),
    );
    let r = c
        .post(gw.url("/upload"))
        .body(reqwest::Body::wrap_stream(small))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap()["body_bytes"], 800);
}

#[test]
fn test_bad_plugin_config_is_reported_with_its_path_and_line() {
    let src = "upstreams:\n  a: { backends: [{ address: \"127.0.0.1:1\" }] }\nplugins:\n  - nope: {}\nroutes:\n  - name: r\n    match: { path: { prefix: / } }\n    upstream: a\n    plugins:\n      - cors:\n          allow_origin: ['*']\n      - redirect: { to: /x, status: 200 }\n";
    let errors = gateway::config::parse(src).unwrap_err().0;
    let found: Vec<(String, Option<usize>)> =
        errors.iter().map(|e| (e.path.clone(), e.line)).collect();
    assert_eq!(errors.len(), 3, "{errors:?}");
    assert_eq!(found[0], ("plugins[0].nope".to_owned(), Some(4)));
    assert!(errors[0].message.contains("unknown plugin `nope`"));
    assert_eq!(
        found[1],
        (
            "routes[0].plugins[0].cors.allow_origin".to_owned(),
            Some(11)
        )
    );
    assert!(errors[1].message.contains("unknown field `allow_origin`"));
    assert_eq!(found[2].0, "routes[0].plugins[1].redirect");
    assert!(errors[2].message.contains("status: 200"));
}

/// A third-party plugin (the crate's example) registered next to the
/// built-ins and run by a real gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_registered_third_party_plugin_runs_in_the_gateway() {
    let up = upstream("echo").await;
    let mut registry = lua_free_plugins::Registry::with_builtins();
    registry.register::<api_key::ApiKey>();
    let port = free_port();
    let src = format!(
        "admin: {{ listen: [] }}\nserver:\n  listen: [\"127.0.0.1:{port}\"]\n  threads: 1\n  grace_period: 0s\n  graceful_shutdown_timeout: 0s\nupstreams:\n  echo: {{ backends: [{{ address: \"{}\" }}] }}\nroutes:\n  - name: orders\n    match: {{ path: {{ prefix: /orders }} }}\n    upstream: echo\n    plugins:\n      - api-key: {{ consumers: {{ partner-a: k-77d0aa }} }}\n",
        up.addr
    );
    // The built-ins alone do not know it.
    let e = gateway::config::parse(&src).unwrap_err();
    assert!(e.to_string().contains("unknown plugin `api-key`"), "{e}");
    let config = gateway::config::parse_with(&src, &registry).unwrap();
    let running = GatewayServer::build_with_env(&config, &Environment::default())
        .unwrap()
        .spawn();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_for_port(addr);
    let c = client();
    let r = c.get(format!("http://{addr}/orders")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers()["www-authenticate"], "ApiKey");
    let r = c
        .get(format!("http://{addr}/orders"))
        .header("x-api-key", "k-77d0aa")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["x-consumer"], "partner-a");
    let echo: Value = r.json().await.unwrap();
    assert_eq!(echo["headers"]["x-consumer"], "partner-a");
    assert!(
        echo["headers"]["x-api-key"].is_null(),
        "the key stays at the edge"
    );
    running.shutdown();
}
