//! Observability: Prometheus metrics after a known request mix (exact
//! counts), the JSON access log, W3C trace context end to end.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use gateway::secret::Environment;
use serde_json::Value;

use crate::common::{client, gateway, gateway_with_env, json_of, upstream, TestGateway};
use crate::tokens::{auth_yaml, claims, jwks_server, rs256};

/// One sample of the text exposition: name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

/// Parses the text exposition (comments skipped).
fn parse_metrics(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').unwrap();
        let value: f64 = value.parse().unwrap();
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').unwrap();
                let mut labels = BTreeMap::new();
                // Label values here never contain `",`.
                for pair in body.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once("=\"").unwrap();
                    labels.insert(k.to_owned(), v.trim_end_matches('"').to_owned());
                }
                (name.to_owned(), labels)
            }
            None => (series.to_owned(), BTreeMap::new()),
        };
        out.push((name, labels, value));
    }
    out
}

/// The value of the series `name` with exactly `labels`, if present.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    samples
        .iter()
        .find(|(n, l, _)| n == name && *l == want)
        .map(|s| s.2)
}

/// Sum of every series of `name`.
fn total(samples: &[Sample], name: &str) -> f64 {
    samples.iter().filter(|s| s.0 == name).map(|s| s.2).sum()
}

/// Scrapes `/metrics` until `tiergate_requests_total` reaches `requests`
/// (metrics are recorded just after the response is sent).
async fn scrape_after(gw: &TestGateway, requests: f64) -> Vec<Sample> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let resp = client().get(gw.admin_url("/metrics")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
        let samples = parse_metrics(&resp.text().await.unwrap());
        let seen = total(&samples, "tiergate_requests_total");
        if seen >= requests || Instant::now() > deadline {
            assert_eq!(seen, requests, "requests counted");
            return samples;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_metrics_count_a_known_request_mix_exactly() {
    let up = upstream("svc").await;
    let jwks = jwks_server().await;
    jwks.serve_only(&["rsa-1"]);
    let body = format!(
        "upstreams:\n  svc: {{ backends: [{{ address: \"{up}\" }}] }}\n  dead: {{ backends: [{{ address: \"127.0.0.1:1\" }}] }}\n  half: {{ backends: [{{ address: \"127.0.0.1:1\" }}, {{ address: \"{up}\" }}] }}\n\
routes:\n\
  - {{ name: open, match: {{ path: {{ prefix: /open }} }}, upstream: svc, rate_limit: false }}\n\
  - {{ name: limited, match: {{ path: {{ prefix: /limited }} }}, upstream: svc }}\n\
  - {{ name: me, match: {{ path: {{ prefix: /me }} }}, upstream: svc, auth: required }}\n\
  - {{ name: broken, match: {{ path: {{ prefix: /broken }} }}, upstream: dead, rate_limit: false }}\n\
  - {{ name: half, match: {{ path: {{ prefix: /half }} }}, upstream: half, rate_limit: false }}\n\
rate_limit:\n  tiers:\n    - {{ name: FREE, per_minute: 10 }}\n    - {{ name: PREMIUM, per_minute: 100 }}\n  anonymous: {{ per_minute: 2 }}\n{auth}",
        auth = auth_yaml(&jwks),
        up = up.addr,
    );
    let gw = gateway_with_env(&body, &Environment::default());
    let c = client();
    let token = rs256(&claims("alice", "PREMIUM"), "rsa-1");
    let mut statuses = Vec::new();
    let send = |req: reqwest::RequestBuilder| {
        let req = req.build().unwrap();
        let c = c.clone();
        async move { c.execute(req).await.unwrap().status().as_u16() }
    };
    for _ in 0..3 {
        statuses.push(send(c.get(gw.url("/open"))).await);
    }
    for _ in 0..2 {
        statuses.push(send(c.post(gw.url("/open")).body("x")).await);
    }
    for _ in 0..3 {
        statuses.push(send(c.get(gw.url("/limited"))).await);
    }
    statuses.push(send(c.get(gw.url("/me"))).await);
    for _ in 0..2 {
        statuses.push(send(c.get(gw.url("/me")).bearer_auth(&token)).await);
    }
    statuses.push(send(c.get(gw.url("/nowhere"))).await);
    statuses.push(send(c.get(gw.url("/broken"))).await);
    for _ in 0..4 {
        statuses.push(send(c.get(gw.url("/half"))).await);
    }
    assert_eq!(
        statuses,
        [200, 200, 200, 200, 200, 200, 200, 429, 401, 200, 200, 404, 502, 200, 200, 200, 200]
    );
    let m = scrape_after(&gw, 17.0).await;
    let req = |route, method, class, tier| {
        value(
            &m,
            "tiergate_requests_total",
            &[
                ("route", route),
                ("method", method),
                ("status_class", class),
                ("tier", tier),
            ],
        )
    };
    assert_eq!(req("open", "GET", "2xx", "anonymous"), Some(3.0));
    assert_eq!(req("open", "POST", "2xx", "anonymous"), Some(2.0));
    assert_eq!(req("limited", "GET", "2xx", "anonymous"), Some(2.0));
    assert_eq!(req("limited", "GET", "4xx", "anonymous"), Some(1.0));
    assert_eq!(req("me", "GET", "4xx", "anonymous"), Some(1.0));
    assert_eq!(req("me", "GET", "2xx", "PREMIUM"), Some(2.0));
    assert_eq!(req("unmatched", "GET", "4xx", "anonymous"), Some(1.0));
    assert_eq!(req("broken", "GET", "5xx", "anonymous"), Some(1.0));
    assert_eq!(req("half", "GET", "2xx", "anonymous"), Some(4.0));
    // The histogram counts the same requests.
    assert_eq!(total(&m, "tiergate_request_duration_seconds_count"), 17.0);
    assert_eq!(
        value(
            &m,
            "tiergate_request_duration_seconds_bucket",
            &[
                ("route", "open"),
                ("method", "GET"),
                ("status_class", "2xx"),
                ("tier", "anonymous"),
                ("le", "+Inf")
            ],
        ),
        Some(3.0)
    );
    let rl = |route, tier, outcome| {
        value(
            &m,
            "tiergate_ratelimit_decisions_total",
            &[
                ("route", route),
                ("tier", tier),
                ("outcome", outcome),
                ("source", "local"),
            ],
        )
    };
    assert_eq!(rl("limited", "anonymous", "allowed"), Some(2.0));
    assert_eq!(rl("limited", "anonymous", "rejected"), Some(1.0));
    assert_eq!(rl("me", "PREMIUM", "allowed"), Some(2.0));
    assert_eq!(total(&m, "tiergate_ratelimit_decisions_total"), 5.0);
    // Upstream attempts: 9 answered by svc; the dead backend once for
    // /broken, and in pool `half` as often as its connect retries.
    let upstream_count = |pool, backend: &str| {
        value(
            &m,
            "tiergate_upstream_duration_seconds_count",
            &[("upstream", pool), ("backend", backend)],
        )
    };
    let svc = up.addr.to_string();
    assert_eq!(upstream_count("svc", &svc), Some(9.0));
    assert_eq!(upstream_count("dead", "127.0.0.1:1"), Some(1.0));
    assert_eq!(upstream_count("half", &svc), Some(4.0));
    let dead_in_half = upstream_count("half", "127.0.0.1:1").unwrap_or(0.0);
    assert!(dead_in_half >= 1.0, "round robin tried the dead backend");
    let retries = |pool, reason| {
        value(
            &m,
            "tiergate_upstream_retries_total",
            &[("upstream", pool), ("reason", reason)],
        )
    };
    assert_eq!(retries("half", "connect"), Some(dead_in_half));
    assert_eq!(retries("dead", "connect"), Some(0.0), "no other backend");
    assert_eq!(retries("svc", "status"), Some(0.0));
    // State read at scrape time.
    assert_eq!(value(&m, "tiergate_requests_in_flight", &[]), Some(0.0));
    let state = |name| value(&m, name, &[("upstream", "svc"), ("backend", &svc)]);
    assert_eq!(state("tiergate_backend_healthy"), Some(1.0));
    assert_eq!(state("tiergate_backend_circuit_state"), Some(0.0));
    assert_eq!(state("tiergate_backend_in_flight"), Some(0.0));
    assert!(
        value(
            &m,
            "tiergate_jwks_refreshes_total",
            &[("result", "success")]
        ) >= Some(1.0)
    );
    assert_eq!(value(&m, "tiergate_jwks_keys", &[]), Some(1.0));
    assert_eq!(
        value(
            &m,
            "tiergate_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(&m, "tiergate_config_reloads_total", &[("result", "error")]),
        Some(0.0)
    );
    assert_eq!(
        value(&m, "tiergate_access_log_dropped_total", &[]),
        Some(0.0)
    );
    assert!(
        value(&m, "tiergate_redis_up", &[]).is_none(),
        "no Redis configured"
    );
    // Bounded labels: no user id, no raw path anywhere.
    for (_, labels, _) in &m {
        for v in labels.values() {
            assert!(
                !v.contains("alice") && !v.starts_with('/'),
                "label value {v}"
            );
        }
    }
    // The status page's data agrees.
    let status = json_of(client().get(gw.admin_url("/api/status"))).await;
    assert_eq!(status["requests"]["total"], 17);
    assert_eq!(status["requests"]["errors"], 1);
    assert_eq!(status["requests"]["rate_limited"], 1);
    let row = |list: &str, name: &str| {
        status[list]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .cloned()
            .unwrap()
    };
    assert_eq!(row("routes", "limited")["requests"], 3);
    assert_eq!(row("routes", "limited")["rate_limited"], 1);
    assert_eq!(row("routes", "broken")["errors"], 1);
    assert_eq!(row("routes", "broken")["upstream"], "dead");
    assert_eq!(row("tiers", "PREMIUM")["requests"], 2);
    assert_eq!(row("tiers", "anonymous")["requests"], 15);
    assert_eq!(status["pools"].as_array().unwrap().len(), 3);
}

/// Reads the access log until it has `n` lines (the writer flushes as soon
/// as its queue runs empty).
async fn log_lines(path: &std::path::Path, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        if lines.len() >= n || Instant::now() > deadline {
            assert_eq!(lines.len(), n, "{text}");
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_access_log_lines_are_json_with_every_field_and_sampling_keeps_errors() {
    let up = upstream("svc").await;
    let jwks = jwks_server().await;
    jwks.serve_only(&["rsa-1"]);
    let dir = std::env::temp_dir().join(format!("tiergate-access-{}", crate::common::free_port()));
    let full = dir.join("full.log");
    let sampled = dir.join("sampled.log");
    let routes = format!(
        "upstreams:\n  svc: {{ backends: [{{ address: \"{}\" }}] }}\n  dead: {{ backends: [{{ address: \"127.0.0.1:1\" }}] }}\n\
routes:\n\
  - {{ name: me, match: {{ path: {{ prefix: /me }} }}, upstream: svc, auth: required }}\n\
  - {{ name: broken, match: {{ path: {{ prefix: /broken }} }}, upstream: dead }}\n\
  - {{ name: open, match: {{ path: {{ prefix: / }} }}, upstream: svc, rate_limit: false }}\n{}",
        up.addr,
        auth_yaml(&jwks)
    );
    let gw = gateway_with_env(
        &format!("{routes}access_log: {{ path: \"{}\" }}\n", full.display()),
        &Environment::default(),
    );
    let quiet = gateway_with_env(
        &format!(
            "{routes}access_log: {{ path: \"{}\", sample: 0.0 }}\n",
            sampled.display()
        ),
        &Environment::default(),
    );
    let c = client();
    let token = rs256(&claims("alice", "PREMIUM"), "rsa-1");
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let resp = c
        .get(gw.url("/me/orders?secret=1"))
        .bearer_auth(&token)
        .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
        .header("x-request-id", "req-123")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let sent_bytes = resp.bytes().await.unwrap().len() as u64;
    assert_eq!(c.get(gw.url("/me")).send().await.unwrap().status(), 401);
    assert_eq!(c.get(gw.url("/broken")).send().await.unwrap().status(), 502);
    let lines = log_lines(&full, 3).await;
    let ok = &lines[0];
    for key in [
        "time",
        "request_id",
        "trace_id",
        "client_ip",
        "method",
        "path",
        "route",
        "upstream",
        "backend",
        "status",
        "bytes",
        "duration_ms",
        "upstream_ms",
        "attempts",
        "user_id",
        "tier",
        "rate_limit",
        "error",
    ] {
        assert!(ok.get(key).is_some(), "missing {key}: {ok}");
    }
    assert_eq!(ok["request_id"], "req-123");
    assert_eq!(ok["trace_id"], trace);
    assert_eq!(ok["client_ip"], "127.0.0.1");
    assert_eq!(ok["method"], "GET");
    assert_eq!(ok["path"], "/me/orders", "no query string in the log");
    assert_eq!(ok["route"], "me");
    assert_eq!(ok["upstream"], "svc");
    assert_eq!(ok["backend"], up.addr.to_string());
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["bytes"], sent_bytes);
    assert_eq!(ok["attempts"], 1);
    assert_eq!(ok["user_id"], "alice");
    assert_eq!(ok["tier"], "PREMIUM");
    assert_eq!(ok["rate_limit"], "allowed");
    assert_eq!(ok["error"], Value::Null);
    let (total, upstream) = (
        ok["duration_ms"].as_f64().unwrap(),
        ok["upstream_ms"].as_f64().unwrap(),
    );
    assert!(upstream > 0.0 && upstream <= total, "{upstream} vs {total}");
    assert!(ok["time"].as_str().unwrap().ends_with('Z'));
    let denied = &lines[1];
    assert_eq!(denied["status"], 401);
    assert_eq!(denied["error"], "missing_token");
    assert_eq!(denied["upstream_ms"], Value::Null);
    assert_eq!(denied["attempts"], 0);
    assert_eq!(denied["user_id"], Value::Null);
    assert_eq!(denied["tier"], "anonymous");
    assert_eq!(lines[2]["status"], 502);
    assert_eq!(lines[2]["error"], "upstream_unavailable");
    assert_eq!(lines[2]["backend"], "127.0.0.1:1");
    assert_eq!(
        lines[2]["rate_limit"],
        Value::Null,
        "anonymous callers are unlimited here"
    );
    // sample 0.0: successes are not logged, errors still are.
    for _ in 0..5 {
        assert_eq!(c.get(quiet.url("/x")).send().await.unwrap().status(), 200);
    }
    assert_eq!(
        c.get(quiet.url("/broken")).send().await.unwrap().status(),
        502
    );
    let lines = log_lines(&sampled, 1).await;
    assert_eq!(lines[0]["status"], 502);
    drop((gw, quiet));
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_traceparent_is_continued_or_started_and_reaches_upstream_and_error_bodies() {
    let up = upstream("svc").await;
    let gw = gateway(&format!(
        "upstreams:\n  svc: {{ backends: [{{ address: \"{}\" }}] }}\nroutes:\n  - {{ name: api, match: {{ path: {{ prefix: /api }} }}, upstream: svc }}\n",
        up.addr
    ));
    let c = client();
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let incoming = format!("00-{trace}-00f067aa0ba902b7-00");
    let resp = c
        .get(gw.url("/api/x"))
        .header("traceparent", &incoming)
        .header("tracestate", "vendor=opaque")
        .send()
        .await
        .unwrap();
    let request_id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    let echoed: Value = resp.json().await.unwrap();
    let headers = &echoed["headers"];
    let sent = headers["traceparent"].as_str().unwrap();
    let parts: Vec<&str> = sent.split('-').collect();
    assert_eq!(parts.len(), 4, "{sent}");
    assert_eq!((parts[0], parts[1], parts[3]), ("00", trace, "00"));
    assert_eq!(parts[2].len(), 16);
    assert_ne!(
        parts[2], "00f067aa0ba902b7",
        "the gateway's own span is the parent"
    );
    assert_eq!(headers["tracestate"], "vendor=opaque");
    assert_eq!(headers["x-request-id"], request_id.as_str());

    // No (or a malformed) traceparent: a new sampled trace starts here.
    for bad in [None, Some("00-zz-00f067aa0ba902b7-01")] {
        let mut req = c.get(gw.url("/api/x"));
        if let Some(b) = bad {
            req = req.header("traceparent", b);
        }
        let echoed: Value = req.send().await.unwrap().json().await.unwrap();
        let sent = echoed["headers"]["traceparent"]
            .as_str()
            .unwrap()
            .to_owned();
        let parts: Vec<&str> = sent.split('-').collect();
        assert_eq!(parts[0], "00");
        assert_eq!(parts[1].len(), 32);
        assert!(parts[1]
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_ne!(parts[1], "0".repeat(32));
        assert_eq!(parts[3], "01");
    }

    // The gateway's own error bodies carry both ids.
    let resp = c
        .get(gw.url("/nowhere"))
        .header("traceparent", &incoming)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["request_id"], id.as_str());
    assert_eq!(body["error"]["trace_id"], trace);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_grafana_dashboard_queries_only_exported_metrics() {
    let up = upstream("svc").await;
    let jwks = jwks_server().await;
    jwks.serve_only(&["rsa-1"]);
    let gw = gateway(&format!(
        "upstreams:\n  svc: {{ backends: [{{ address: \"{}\" }}] }}\nroutes:\n  - {{ name: all, match: {{ path: {{ prefix: / }} }}, upstream: svc }}\n\
rate_limit:\n  anonymous: {{ per_minute: 1000 }}\n  redis: {{ url: \"{redis}\", key_prefix: \"dash:\" }}\n{}",
        up.addr,
        auth_yaml(&jwks),
        redis = crate::common::redis_url(),
    ));
    assert_eq!(
        client().get(gw.url("/x")).send().await.unwrap().status(),
        200
    );
    let exported: std::collections::BTreeSet<String> = scrape_after(&gw, 1.0)
        .await
        .into_iter()
        .map(|(name, _, _)| name)
        .collect();
    let dashboard: Value =
        serde_json::from_str(include_str!("../../conf/grafana-dashboard.json")).unwrap();
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 20, "{} queries", exprs.len());
    let mut used = std::collections::BTreeSet::new();
    for e in &exprs {
        let mut rest = e.as_str();
        while let Some(i) = rest.find("tiergate_") {
            let name: String = rest[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[i + name.len()..];
            used.insert(name);
        }
    }
    for name in &used {
        assert!(
            exported.contains(name),
            "the dashboard queries `{name}`, which /metrics does not export"
        );
    }
}

/// Every `expr` and `query` string in a Grafana dashboard.
fn collect_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", Value::String(s)) => out.push(s.clone()),
                    ("query", Value::String(s)) => out.push(s.clone()),
                    ("query", Value::Object(q)) => {
                        if let Some(Value::String(s)) = q.get("query") {
                            out.push(s.clone());
                        }
                    }
                    _ => collect_exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}
