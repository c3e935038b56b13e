//! The gateway's own error responses: JSON envelope, status, request id.

use std::time::{Duration, Instant};

use crate::common::*;

fn assert_envelope(v: &serde_json::Value, code: &str, request_id: &str) {
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
    assert_eq!(v["error"]["request_id"], request_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_404_405_502_504_bodies_carry_the_request_id() {
    let up = upstream("svc").await;
    let dead = free_port();
    let gw = gateway(&format!(
        r#"
upstreams:
  svc: {{ backends: [{{ address: "{}" }}] }}
  dead: {{ backends: [{{ address: "127.0.0.1:{dead}" }}] }}
routes:
  - name: read-only
    match: {{ path: {{ prefix: /ro }}, methods: [GET, HEAD] }}
    upstream: svc
  - name: dead
    match: {{ path: {{ prefix: /dead }} }}
    upstream: dead
  - name: slow
    match: {{ path: {{ prefix: /slow }} }}
    upstream: svc
    timeouts: {{ read: 300ms }}
"#,
        up.addr
    ));
    let c = client();

    let resp = c.get(gw.url("/nowhere")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_envelope(&resp.json().await.unwrap(), "route_not_found", &id);

    let resp = c
        .delete(gw.url("/ro/x"))
        .header("x-request-id", "req-405")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    assert_eq!(resp.headers()["allow"], "GET, HEAD");
    assert_envelope(&resp.json().await.unwrap(), "method_not_allowed", "req-405");

    let resp = c.get(gw.url("/dead")).send().await.unwrap();
    assert_eq!(resp.status(), 502);
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_envelope(&resp.json().await.unwrap(), "upstream_unavailable", &id);

    let started = Instant::now();
    let resp = c.get(gw.url("/slow?sleep_ms=3000")).send().await.unwrap();
    let took = started.elapsed();
    assert_eq!(resp.status(), 504);
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_envelope(&resp.json().await.unwrap(), "upstream_timeout", &id);
    assert!(
        took < Duration::from_secs(2),
        "504 after {took:?}, read timeout is 300ms"
    );

    // HEAD gets the status without a body.
    let resp = c.head(gw.url("/nowhere")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_total_timeout_caps_the_read_timeout() {
    let up = upstream("svc").await;
    let gw = gateway(&format!(
        r#"
upstreams:
  svc: {{ backends: [{{ address: "{}" }}] }}
routes:
  - name: slow
    match: {{ path: {{ prefix: / }} }}
    upstream: svc
    timeouts: {{ read: 10s, total: 400ms }}
"#,
        up.addr
    ));
    let started = Instant::now();
    let resp = client()
        .get(gw.url("/x?sleep_ms=3000"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 504);
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_malformed_request_is_a_400_not_a_500() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = upstream("svc").await;
    let gw = gateway(&one_route(up.addr));
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
}
