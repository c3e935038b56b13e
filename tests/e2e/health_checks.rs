//! Active health checks, slow backends and the admin listener, against
//! real upstream servers on ephemeral ports.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{
    backend_of, client, free_port, gateway, get_json, one_route, serve, upstream, KillableUpstream,
    TestGateway,
};

/// The admin listener's `/health/services` entry for the backend at `addr`.
async fn backend_entry(gw: &TestGateway, addr: SocketAddr) -> Value {
    let (_, v) = get_json(&client(), &gw.admin_url("/health/services")).await;
    v["pools"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["backends"].as_array().cloned().unwrap_or_default())
        .find(|b| b["address"] == addr.to_string())
        .unwrap_or(Value::Null)
}

/// Polls until the backend's `health` is `want`; returns how long it took.
async fn wait_health(gw: &TestGateway, addr: SocketAddr, want: &str, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let b = backend_entry(gw, addr).await;
        if b["health"] == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "{addr} not {want} after {limit:?}: {b}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_killed_backend_is_checked_out_under_load_and_returns_when_restarted() {
    let a = upstream("a").await;
    let mut b = KillableUpstream::start("b").await;
    let (interval, threshold) = (200u64, 2u64);
    let gw = gateway(&format!(
        "upstreams:\n  svc:\n    backends: [{{address: \"{}\"}}, {{address: \"{}\"}}]\n    health_check: {{path: /health, interval: {interval}ms, timeout: 100ms, unhealthy_threshold: {threshold}, healthy_threshold: 2}}\nroutes:\n  - {{name: all, match: {{path: {{prefix: /}}}}, upstream: svc}}\n",
        a.addr, b.addr
    ));
    wait_health(&gw, a.addr, "healthy", Duration::from_secs(2)).await;
    wait_health(&gw, b.addr, "healthy", Duration::from_secs(2)).await;

    // Continuous load: 4 clients, each GET in a loop.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let served: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
    let total = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (stop, failures, served, total) = (
            stop.clone(),
            failures.clone(),
            served.clone(),
            total.clone(),
        );
        let url = gw.url("/api/items");
        load.push(tokio::spawn(async move {
            let c = client();
            while !stop.load(Ordering::Relaxed) {
                total.fetch_add(1, Ordering::Relaxed);
                match c.get(&url).send().await {
                    Ok(r) if r.status() == 200 => {
                        let v: Value = r.json().await.unwrap_or(Value::Null);
                        *served
                            .lock()
                            .unwrap()
                            .entry(backend_of(&v).to_owned())
                            .or_default() += 1;
                    }
                    Ok(r) => failures.lock().unwrap().push(r.status().to_string()),
                    Err(e) => failures.lock().unwrap().push(e.to_string()),
                }
            }
        }));
    }
    let served_by_b = || served.lock().unwrap().get("b").copied().unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(served_by_b() > 0, "both serve before the kill");

    b.kill().await;
    let marked = wait_health(&gw, b.addr, "unhealthy", Duration::from_secs(3)).await;
    let bound = Duration::from_millis(interval * threshold);
    println!("killed backend marked unhealthy after {marked:?} (interval × threshold = {bound:?})");
    // A check round may be just starting when the backend dies, so allow
    // one more interval, plus scheduling slack.
    assert!(
        marked <= bound + Duration::from_millis(interval + 150),
        "{marked:?}"
    );
    let entry = backend_entry(&gw, b.addr).await;
    assert!(
        entry["last_error"].as_str().unwrap().contains("connect"),
        "{entry}"
    );
    assert!(entry["failed_checks"].as_u64().unwrap() >= threshold);
    let (status, doc) = get_json(&client(), &gw.admin_url("/health/services")).await;
    assert_eq!((status, doc["status"].as_str()), (200, Some("degraded")));

    // Checked out: no request reaches it (nor fails) while it is down.
    let before = served_by_b();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(served_by_b(), before);

    b.restart().await;
    let back = wait_health(&gw, b.addr, "healthy", Duration::from_secs(3)).await;
    println!("restarted backend healthy again after {back:?}");
    let deadline = Instant::now() + Duration::from_secs(3);
    while served_by_b() == before {
        assert!(
            Instant::now() < deadline,
            "b never got traffic back: {}",
            backend_entry(&gw, b.addr).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Its circuit (opened by the connect failures) closes once the
    // half-open probes succeed.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let entry = backend_entry(&gw, b.addr).await;
        if entry["circuit"] == "closed" {
            break;
        }
        assert!(Instant::now() < deadline, "circuit not closed: {entry}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    println!(
        "{} requests, served {:?}, failed {}",
        total.load(Ordering::Relaxed),
        served.lock().unwrap(),
        failures.len()
    );
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    let entry = backend_entry(&gw, b.addr).await;
    assert!(entry["latency_ms"].as_f64().unwrap() >= 0.0);
    assert!(entry["last_check"].as_str().unwrap().ends_with('Z'));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_all_backends_unhealthy_answers_503_at_once() {
    let dead = free_port();
    let gw = gateway(&format!(
        "upstreams:\n  svc:\n    backends: [{{address: \"127.0.0.1:{dead}\"}}]\n    health_check: {{type: tcp, interval: 2s, timeout: 100ms}}\nroutes:\n  - {{name: all, match: {{path: {{prefix: /}}}}, upstream: svc}}\n"
    ));
    let addr: SocketAddr = format!("127.0.0.1:{dead}").parse().unwrap();
    // The first check decides an unknown backend's state.
    let took = wait_health(&gw, addr, "unhealthy", Duration::from_secs(1)).await;
    println!("first check marked a dead backend unhealthy after {took:?}");
    let t = Instant::now();
    let r = client().get(gw.url("/x")).send().await.unwrap();
    let took = t.elapsed();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "2", "the check interval");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "no_backend_available");
    assert!(took < Duration::from_millis(100), "{took:?}");
    let (status, doc) = get_json(&client(), &gw.admin_url("/health/services")).await;
    assert_eq!(
        (status, doc["status"].as_str()),
        (503, Some("down")),
        "{doc}"
    );
    let (status, _) = get_json(&client(), &gw.url("/health/services")).await;
    assert_eq!(status, 503, "the public listener reports the same");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_http_check_uses_method_path_host_and_expected_statuses() {
    // An upstream whose /ready answers 418 unless Host is right.
    let hits: Arc<Mutex<Vec<(String, String, String)>>> = Arc::default();
    let h = hits.clone();
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let h = h.clone();
        async move {
            let host = req.headers()["host"].to_str().unwrap_or("").to_owned();
            h.lock().unwrap().push((
                req.method().to_string(),
                req.uri().path().to_owned(),
                host.clone(),
            ));
            if host == "ready.internal" {
                axum::http::StatusCode::NO_CONTENT
            } else {
                axum::http::StatusCode::IM_A_TEAPOT
            }
        }
    });
    let (addr, server) = serve(app).await;
    let gw = gateway(&format!(
        "upstreams:\n  good:\n    backends: [{{address: \"{addr}\"}}]\n    health_check: {{method: HEAD, path: /ready, host: ready.internal, expected_statuses: [200, 204], interval: 100ms, timeout: 100ms}}\n  bad:\n    backends: [{{address: \"{addr}\"}}]\n    health_check: {{path: /ready, interval: 100ms, timeout: 100ms}}\nroutes:\n  - {{name: g, match: {{path: {{prefix: /g}}}}, upstream: good}}\n  - {{name: b, match: {{path: {{prefix: /b}}}}, upstream: bad}}\n"
    ));
    let (_, doc) = loop {
        let (s, doc) = get_json(&client(), &gw.admin_url("/health/services")).await;
        let states: Vec<&str> = doc["pools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["backends"][0]["health"].as_str().unwrap())
            .collect();
        if !states.contains(&"unknown") {
            break (s, doc);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Pools are listed by name: bad, good.
    assert_eq!(
        doc["pools"][0]["backends"][0]["health"], "unhealthy",
        "{doc}"
    );
    assert_eq!(
        doc["pools"][0]["backends"][0]["last_error"], "status 418",
        "{doc}"
    );
    assert_eq!(doc["pools"][1]["backends"][0]["health"], "healthy", "{doc}");
    let seen = hits.lock().unwrap().clone();
    assert!(seen.contains(&("HEAD".into(), "/ready".into(), "ready.internal".into())));
    assert!(seen.contains(&("GET".into(), "/ready".into(), addr.to_string())));
    server.abort();
}

/// An upstream that sleeps `delay` before answering, counting requests.
async fn slow(delay: Duration) -> (SocketAddr, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let app = axum::Router::new().fallback(move || {
        let h = h.clone();
        async move {
            h.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(delay).await;
            "late"
        }
    });
    let (addr, task) = serve(app).await;
    (addr, hits, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_slow_backends_give_504_at_the_read_timeout_and_the_budget_caps_retries() {
    let (a, hits_a, ta) = slow(Duration::from_secs(2)).await;
    let (b, hits_b, tb) = slow(Duration::from_secs(2)).await;
    // One backend: 504 at the read timeout, no retry possible.
    // Two backends: a timed-out GET is retried once on the other backend
    // while the pool's budget (10% of requests + a burst of 2) allows.
    let breaker = "circuit_breaker: {enabled: false}";
    let gw = gateway(&format!(
        "upstreams:\n  one:\n    backends: [{{address: \"{a}\"}}]\n    {breaker}\n  two:\n    backends: [{{address: \"{a}\"}}, {{address: \"{b}\"}}]\n    {breaker}\n    retry_budget: {{ratio: 0.1, burst: 2}}\nroutes:\n  - {{name: one, match: {{path: {{prefix: /one}}}}, upstream: one, timeouts: {{read: 200ms}}}}\n  - {{name: two, match: {{path: {{prefix: /two}}}}, upstream: two, timeouts: {{read: 200ms}}, retry: {{attempts: 1}}}}\n"
    ));
    let c = client();
    let t = Instant::now();
    let r = c.get(gw.url("/one")).send().await.unwrap();
    let took = t.elapsed();
    assert_eq!(r.status(), 504);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "upstream_timeout", "{body}");
    println!("504 after {took:?} (read timeout 200 ms)");
    assert!(took >= Duration::from_millis(190) && took < Duration::from_millis(600));
    assert_eq!(hits_a.load(Ordering::SeqCst), 1);

    hits_a.store(0, Ordering::SeqCst);
    let n = 30;
    for _ in 0..n {
        let t = Instant::now();
        let r = c.get(gw.url("/two")).send().await.unwrap();
        assert_eq!(r.status(), 504);
        assert!(
            t.elapsed() < Duration::from_millis(900),
            "{:?}",
            t.elapsed()
        );
    }
    let sent = hits_a.load(Ordering::SeqCst) + hits_b.load(Ordering::SeqCst);
    let retries = sent - n;
    println!("{n} requests → {sent} upstream attempts ({retries} retries)");
    // Budget: burst 2 + 10% of 30 = 5 retries at most; without it, 30.
    assert!(
        (2..=5).contains(&retries),
        "retries {retries} outside the budget"
    );
    ta.abort();
    tb.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_admin_listener_serves_health_services_only() {
    let up = upstream("up").await;
    let gw = gateway(&one_route(up.addr));
    let c = client();
    let (status, doc) = get_json(&c, &gw.admin_url("/health/services")).await;
    assert_eq!(status, 200);
    assert_eq!(doc["status"], "ok");
    let backend = &doc["pools"][0]["backends"][0];
    assert_eq!(backend["health"], "unchecked", "no health_check configured");
    assert_eq!(backend["last_check"], Value::Null);
    let (status, doc) = get_json(&c, &gw.admin_url("/health")).await;
    assert_eq!((status, doc["status"].as_str()), (200, Some("ok")));
    // Nothing is proxied from the admin port.
    let (status, doc) = get_json(&c, &gw.admin_url("/api/anything")).await;
    assert_eq!(status, 404);
    assert_eq!(doc["error"]["code"], "not_found");
    let r = c
        .post(gw.admin_url("/health/services"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}
