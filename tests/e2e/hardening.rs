//! Edge hardening, one test per class of attack: what the gateway answers
//! and exactly what the upstream receives. Requests go out raw
//! ([`raw_http`]): HTTP clients normalise paths and refuse odd bytes
//! before sending, an attacker does not.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;
use crate::tokens;

/// `/api/users` (anonymous) and `/api/admin` (admins only) on one echo
/// upstream, plus `extra_server` lines under `server:`.
async fn two_routes(extra_server: &str) -> (Upstream, TestGateway) {
    let up = upstream("svc").await;
    let body = format!(
        "upstreams:\n  svc: {{ backends: [{{ address: \"{}\" }}] }}\nroutes:\n  \
         - {{ name: users, match: {{ path: {{ prefix: /api/users }} }}, upstream: svc }}\n  \
         - {{ name: admin, match: {{ path: {{ prefix: /api/admin }} }}, upstream: svc, auth: required, roles: [admin] }}\n",
        up.addr
    );
    let gw = gateway_with_server(
        extra_server,
        &body,
        &gateway::secret::Environment::default(),
    );
    (up, gw)
}

/// The path the echo upstream received, or the gateway's error code.
fn seen(r: &RawResponse) -> (u16, String) {
    let v = r.json();
    let what = match v["path"].as_str() {
        Some(p) => p.to_owned(),
        None => v["error"]["code"]
            .as_str()
            .unwrap_or("<no body>")
            .to_owned(),
    };
    (r.status, what)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_paths_are_routed_and_forwarded_in_one_canonical_form() {
    let (_up, gw) = two_routes("").await;
    let cases: &[(&str, u16, &str)] = &[
        // Dot segments resolve before routing: the admin route's policy
        // applies, and the upstream never sees the request.
        ("/api/users/../admin/x", 401, "missing_token"),
        ("/api/users/%2e%2e/admin/x", 401, "missing_token"),
        ("/api/users/.%2E/admin/x", 401, "missing_token"),
        ("/api/users/./7/../8", 200, "/api/users/8"),
        // Unreserved escapes decode, others are upper-cased; the query is
        // left alone.
        (
            "/api/users/%41%62c?q=%2e%2e",
            200,
            "/api/users/Abc?q=%2e%2e",
        ),
        ("/api/users/caf%c3%a9", 200, "/api/users/caf%C3%A9"),
        // Repeated slashes merge.
        ("//api///users//7", 200, "/api/users/7"),
        // Encoded slashes and backslashes are refused by default.
        ("/api/users/..%2Fadmin", 400, "invalid_path"),
        ("/api/users/..%5Cadmin", 400, "invalid_path"),
        ("/api/users\\..\\admin", 400, "invalid_path"),
        // Above the root, Tomcat-style dot segments, bad escapes.
        ("/api/../../etc/passwd", 400, "invalid_path"),
        ("/api/users/..;/admin", 400, "invalid_path"),
        ("/api/users/%zz", 400, "invalid_path"),
        ("/api/users/%4", 400, "invalid_path"),
        ("/api/users/%C3%28", 400, "invalid_path"),
        // Encoded control bytes.
        ("/api/users/a%00b", 400, "invalid_path"),
        ("/api/users/a%0d%0aX-Injected:1", 400, "invalid_path"),
    ];
    for (target, status, want) in cases {
        let r = raw_get(gw.addr, target, &[]).await;
        assert_eq!(
            seen(&r),
            (*status, (*want).to_owned()),
            "{target}: {}",
            r.head
        );
        if *status == 400 {
            let v = r.json();
            assert!(
                v["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty()),
                "{target}: {v}"
            );
        }
    }
    // Raw bytes a request line may not carry, refused with the JSON
    // envelope before any parsing.
    for target in [
        &b"/api/users/a\x00b"[..],
        b"/api/users/a\x01",
        b"/api/users/a\x7f",
        "/api/users/caf\u{e9}".as_bytes(),
    ] {
        let mut req = b"GET ".to_vec();
        req.extend_from_slice(target);
        req.extend_from_slice(b" HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n");
        let r = raw_http(gw.addr, &req).await;
        assert_eq!(r.status, 400, "{target:?}: {}", r.head);
        let code = r.json()["error"]["code"].as_str().unwrap_or("").to_owned();
        assert!(
            code == "invalid_request_line" || code == "invalid_path",
            "{target:?}: {code}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_escaped_slashes_can_be_kept_or_decoded() {
    let (_up, keep) = two_routes("  path: { escaped_slashes: keep, merge_slashes: false }\n").await;
    for (target, want) in [
        ("/api/users/a%2fb", "/api/users/a%2Fb"),
        ("/api/users/a%2Fb/../c", "/api/users/c"),
        ("/api/users//x", "/api/users//x"),
        ("/api/users/w\\x", "/api/users/w%5Cx"),
    ] {
        let r = raw_get(keep.addr, target, &[]).await;
        assert_eq!(seen(&r), (200, want.to_owned()), "keep: {target}");
    }
    let (_up, decode) = two_routes("  path: { escaped_slashes: decode }\n").await;
    let r = raw_get(decode.addr, "/api/users%2F..%2Fadmin", &[]).await;
    assert_eq!(
        seen(&r),
        (401, "missing_token".to_owned()),
        "decoded slashes are separators: this is /api/admin"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_oversized_request_heads_get_414_and_431_and_are_counted() {
    let (_up, gw) = two_routes("").await;
    let long_target = format!("/api/users/{}", "a".repeat(9 * 1024));
    let r = raw_get(gw.addr, &long_target, &[]).await;
    assert_eq!(
        (r.status, r.json()["error"]["code"].clone()),
        (414, "request_line_too_long".into())
    );
    // One 200 KB header: today's classic. Refused, never forwarded.
    let huge = format!("X-Big: {}", "b".repeat(200 * 1024));
    let r = raw_get(gw.addr, "/api/users/1", &[&huge]).await;
    assert_eq!(r.status, 431, "{}", r.head);
    assert_eq!(r.json()["error"]["code"], "header_too_large");
    assert_eq!(r.header("connection"), Some("close"));
    // Many small headers adding up past 32 KiB.
    let lines: Vec<String> = (0..40)
        .map(|i| format!("X-H{i}: {}", "c".repeat(1000)))
        .collect();
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let r = raw_get(gw.addr, "/api/users/1", &refs).await;
    assert_eq!(
        (r.status, r.json()["error"]["code"].clone()),
        (431, "headers_too_large".into())
    );
    // More than 100 header lines.
    let lines: Vec<String> = (0..101).map(|i| format!("X-N{i}: 1")).collect();
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let r = raw_get(gw.addr, "/api/users/1", &refs).await;
    assert_eq!(
        (r.status, r.json()["error"]["code"].clone()),
        (431, "too_many_headers".into())
    );
    // Within every limit: served.
    let lines: Vec<String> = (0..90)
        .map(|i| format!("X-N{i}: {}", "d".repeat(200)))
        .collect();
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let r = raw_get(gw.addr, "/api/users/1", &refs).await;
    assert_eq!(seen(&r), (200, "/api/users/1".to_owned()));
    for (reason, n) in [
        ("request_line_too_long", 1.0),
        ("header_line_too_long", 1.0),
        ("head_too_large", 1.0),
        ("too_many_headers", 1.0),
    ] {
        let line = format!("tiergate_downstream_refused_total{{reason=\"{reason}\"}}");
        assert_eq!(metric_value(gw.admin, &line).await, Some(n), "{line}");
    }
}

/// Sends `head` one byte every 50 ms until the server answers or closes;
/// returns what it answered. The first byte goes at once: a connection
/// that stays silent until the timeout is closed without an answer, and a
/// busy machine may well hold this task that long.
async fn drip(addr: SocketAddr, head: &[u8]) -> RawResponse {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&head[..1]).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    for &b in head.iter().cycle().skip(1) {
        tokio::select! {
            read = s.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            },
            _ = tokio::time::sleep(Duration::from_millis(50)) => {
                if s.write_all(&[b]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    parse_raw(&out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_slow_clients_are_cut_off_at_each_bound() {
    let (_up, gw) =
        two_routes("  client_timeouts: { request_head: 1s, body_idle: 1s, keepalive: 1s }\n").await;
    // Slowloris: a head dripped one byte at a time, forever.
    let r = drip(
        gw.addr,
        b"GET /api/users/1 HTTP/1.1\r\nHost: gw\r\nX-Slow: aaaaaaaaaaaaa",
    )
    .await;
    assert_eq!(r.status, 408, "{}", r.head);
    assert_eq!(r.json()["error"]["code"], "request_timeout");
    // A connection that never sends anything is closed, without an answer.
    let mut idle = TcpStream::connect(gw.addr).await.unwrap();
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(20), idle.read_to_end(&mut buf))
        .await
        .expect("the idle connection is closed")
        .unwrap_or(0);
    assert_eq!(n, 0, "no answer to a silent connection");
    // A body that stalls.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"POST /api/users/1 HTTP/1.1\r\nHost: gw\r\nContent-Length: 10\r\n\r\nab")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out)).await;
    let r = parse_raw(&out);
    assert_eq!(r.status, 408, "{}", r.head);
    // Keep-alive: served, then closed once idle.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET /api/users/1 HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out)).await;
    assert_eq!(parse_raw(&out).status, 200, "served, then closed when idle");
    for reason in ["head_timeout", "body_timeout"] {
        let line = format!("tiergate_downstream_refused_total{{reason=\"{reason}\"}}");
        let n = metric_value(gw.admin, &line).await.unwrap_or(0.0);
        assert!(n >= 1.0, "{line} = {n}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_connection_caps_refuse_cleanly_and_free_their_slots() {
    let (_up, gw) = two_routes("  limits: { connections: 3 }\n").await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(gw.addr).await.unwrap());
    }
    // The slots are taken when the gateway accepts: wait until it counts
    // three open connections.
    poll_until(|| async {
        metric_value(
            gw.admin,
            "tiergate_downstream_connections{listener=\"proxy\"}",
        )
        .await
            == Some(3.0)
    })
    .await;
    let r = raw_get(gw.addr, "/api/users/1", &[]).await;
    assert_eq!(r.status, 503, "{}", r.head);
    assert_eq!(r.json()["error"]["code"], "too_many_connections");
    assert_eq!(r.header("retry-after"), Some("1"));
    held.pop();
    poll_until(|| async { raw_get(gw.addr, "/api/users/1", &[]).await.status == 200 }).await;
    let line = "tiergate_downstream_refused_total{reason=\"connection_limit\"}";
    assert!(metric_value(gw.admin, line).await.unwrap_or(0.0) >= 1.0);

    let (_up, per_ip) = two_routes("  limits: { connections_per_ip: 2 }\n").await;
    let _a = TcpStream::connect(per_ip.addr).await.unwrap();
    let _b = TcpStream::connect(per_ip.addr).await.unwrap();
    poll_until(|| async {
        metric_value(
            per_ip.admin,
            "tiergate_downstream_connections{listener=\"proxy\"}",
        )
        .await
            == Some(2.0)
    })
    .await;
    let r = raw_get(per_ip.addr, "/api/users/1", &[]).await;
    assert_eq!(
        (r.status, r.json()["error"]["code"].clone()),
        (503, "too_many_connections".into())
    );
}

/// Polls `cond` every 20 ms for up to 10 s.
async fn poll_until<F, Fut>(mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met in 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_ambiguous_and_spoofed_headers_never_reach_a_service() {
    let (_up, gw) = two_routes("").await;
    for (extra, code) in [
        (
            &["Authorization: Bearer a", "Authorization: Bearer b"][..],
            "duplicate_header",
        ),
        (&["Host: other"][..], "duplicate_header"),
        (&["Host: evil.com/@x"][..], "duplicate_header"),
    ] {
        let r = raw_get(gw.addr, "/api/users/1", extra).await;
        assert_eq!(
            (r.status, r.json()["error"]["code"].clone()),
            (400, code.into()),
            "{extra:?}"
        );
    }
    let r = raw_http(
        gw.addr,
        b"GET /api/users/1 HTTP/1.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(
        (r.status, r.json()["error"]["code"].clone()),
        (400, "missing_host".into())
    );
    let r = raw_http(
        gw.addr,
        b"GET /api/users/1 HTTP/1.1\r\nHost: a b\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.head);
    // Identity headers in any spelling, also ones the gateway never sets,
    // and underscore names, are gone upstream.
    let r = raw_get(
        gw.addr,
        "/api/users/1",
        &[
            "X-User-Id: admin",
            "X-User-Tier: ENTERPRISE",
            "X-User-Email: root@example.com",
            "X_User_Roles: admin",
            "x_user-tenant: acme",
            "X_Custom: 1",
            "X-Fine: yes",
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    let headers = r.json()["headers"].clone();
    let names: Vec<&str> = headers
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert!(
        !names.iter().any(|n| n.contains("user") || n.contains('_')),
        "{names:?}"
    );
    assert_eq!(headers["x-fine"], "yes");
    // With underscores allowed, ordinary ones pass; identity ones still go.
    let (_up, allow) = two_routes("  underscores_in_headers: allow\n").await;
    let r = raw_get(
        allow.addr,
        "/api/users/1",
        &["X_Custom: 1", "X_User_Tier: ENTERPRISE"],
    )
    .await;
    let headers = r.json()["headers"].clone();
    assert_eq!(headers["x_custom"], "1");
    assert_eq!(headers["x_user_tier"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_forwarding_headers_are_believed_only_from_trusted_proxies() {
    let (_up, direct) = two_routes("").await;
    let spoof = [
        "X-Forwarded-For: 1.2.3.4",
        "X-Forwarded-Proto: https",
        "X-Forwarded-Host: bank.example",
    ];
    let h = raw_get(direct.addr, "/api/users/1", &spoof).await.json()["headers"].clone();
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "gw");
    let (_up, behind) = two_routes("  trusted_proxies: [127.0.0.1]\n").await;
    let h = raw_get(behind.addr, "/api/users/1", &spoof).await.json()["headers"].clone();
    assert_eq!(h["x-forwarded-for"], "1.2.3.4, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "https");
    assert_eq!(h["x-forwarded-host"], "bank.example");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_public_port_shows_a_landing_document_and_no_internals() {
    let (up, gw) = two_routes("").await;
    let c = client();
    let (status, doc) = get_json(&c, &gw.url("/")).await;
    assert_eq!(status, 200);
    assert_eq!(doc["name"], "tiergate");
    assert_eq!(doc["links"]["health"], "/health");
    let (_, public) = get_json(&c, &gw.url("/health/services")).await;
    let text = public.to_string();
    assert!(!text.contains(&up.addr.to_string()), "{text}");
    assert!(public.get("config").is_none(), "{text}");
    assert_eq!(public["pools"][0]["backends"], 1);
    let (_, admin) = get_json(&c, &gw.admin_url("/health/services")).await;
    assert_eq!(
        admin["pools"][0]["backends"][0]["address"],
        up.addr.to_string()
    );
    let (_, opted) = two_routes("  health_details: true\n").await;
    let (_, full) = get_json(&c, &opted.url("/health/services")).await;
    assert!(full["config"]["sha256"].is_string(), "{full}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_development_secret_and_open_admin_listener_refuse_to_start() {
    use gateway::secret::{Environment, Secret};
    use gateway::server::GatewayServer;
    let up = upstream("svc").await;
    let yaml = |extra: &str| {
        format!(
            "{extra}server: {{ listen: [\"127.0.0.1:{}\"] }}\nadmin: {{ listen: [] }}\nauth: {{ algorithms: [EdDSA, HS256] }}\n{}",
            free_port(),
            one_route(up.addr)
        )
    };
    let secret = Environment {
        dev_jwt_secret: Some(Secret::new(tokens::DEV_SECRET.into())),
        ..Environment::default()
    };
    let config = gateway::config::parse(&yaml("")).unwrap();
    let err = GatewayServer::build_with_env(&config, &secret)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("TIERGATE_DEV_JWT_SECRET") && err.contains("environment: development"),
        "{err}"
    );
    let dev = gateway::config::parse(&yaml("environment: development\n")).unwrap();
    assert!(GatewayServer::build_with_env(&dev, &secret).is_ok());
    // HS256 listed in a production config is a config error.
    let errors = gateway::config::parse(&yaml("environment: production\n")).unwrap_err();
    assert!(errors.to_string().contains("HS256"), "{errors}");
    // An admin listener off loopback needs a token.
    let open = gateway::config::parse(&format!(
        "server: {{ listen: [\"127.0.0.1:{}\"] }}\nadmin: {{ listen: [\"0.0.0.0:{}\"] }}\n{}",
        free_port(),
        free_port(),
        one_route(up.addr)
    ))
    .unwrap();
    let err = GatewayServer::build_with_env(&open, &Environment::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("TIERGATE_ADMIN_TOKEN"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_admin_token_is_required_when_set() {
    use base64::Engine as _;
    let up = upstream("svc").await;
    let env = gateway::secret::Environment {
        admin_token: Some(gateway::secret::Secret::new("s3cret-admin".into())),
        ..gateway::secret::Environment::default()
    };
    let gw = gateway_with_env(&one_route(up.addr), &env);
    let c = client();
    let resp = c.get(gw.admin_url("/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    assert!(resp.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .contains("Basic"));
    let wrong = c
        .get(gw.admin_url("/metrics"))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let ok = c
        .get(gw.admin_url("/metrics"))
        .bearer_auth("s3cret-admin")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let basic = base64::engine::general_purpose::STANDARD.encode("ops:s3cret-admin");
    let page = c
        .get(gw.admin_url("/"))
        .header("authorization", format!("Basic {basic}"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_rotating_ipv6_addresses_share_their_prefix_bucket() {
    let up = upstream("svc").await;
    let gw = gateway_with_server(
        "  trusted_proxies: [127.0.0.1]\n",
        &format!(
            "{}rate_limit:\n  anonymous: {{ per_minute: 5 }}\n  anonymous_keys: {{ max_tracked: 10 }}\n",
            one_route(up.addr)
        ),
        &gateway::secret::Environment::default(),
    );
    let c = client();
    let mut admitted = 0;
    for i in 0..1000u32 {
        let addr = format!("2001:db8:1:2:{:x}:{:x}::1", i >> 8, i & 0xff);
        let s = c
            .get(gw.url("/x"))
            .header("x-forwarded-for", addr)
            .send()
            .await
            .unwrap()
            .status();
        admitted += u32::from(s == 200);
    }
    assert_eq!(admitted, 5, "1,000 addresses of one /64 share one bucket");
    // Another /64 has its own bucket...
    let other = |net: u32, host: u32| format!("2001:db8:9:{net:x}::{host:x}");
    let status = |addr: String| {
        let c = &c;
        let url = gw.url("/x");
        async move {
            c.get(url)
                .header("x-forwarded-for", addr)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(status(other(0, 1)).await, 200);
    // ...until 10 keys are tracked: then new /64s share their /48's.
    for net in 1..9 {
        assert_eq!(status(other(net, 1)).await, 200, "/64 number {net}");
    }
    let mut overflow = 0;
    for net in 100..130 {
        overflow += u32::from(status(other(net, 1)).await == 200);
    }
    assert_eq!(overflow, 5, "30 new /64s past the cap share one /48 bucket");
    assert!(gw.snapshot().limiter.tracked_anonymous() <= 11);
}
