//! Upstream resilience: the per-backend circuit breaker, against real
//! upstream servers on ephemeral ports.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::response::IntoResponse;

use gateway::upstream::breaker::BreakerState;

use crate::common::{backend_of, client, gateway, upstream};

/// An upstream answering 503 while `failing` is set, else 200 JSON
/// `{"backend": "flaky"}`; counts the requests it gets.
struct Flaky {
    addr: std::net::SocketAddr,
    failing: Arc<AtomicBool>,
    hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Flaky {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn flaky() -> Flaky {
    let failing = Arc::new(AtomicBool::new(true));
    let hits = Arc::new(AtomicUsize::new(0));
    let (f, h) = (failing.clone(), hits.clone());
    let app = axum::Router::new().fallback(move || {
        let (f, h) = (f.clone(), h.clone());
        async move {
            h.fetch_add(1, Ordering::SeqCst);
            if f.load(Ordering::SeqCst) {
                StatusCode::SERVICE_UNAVAILABLE.into_response()
            } else {
                axum::Json(serde_json::json!({"backend": "flaky"})).into_response()
            }
        }
    });
    let (addr, task) = crate::common::serve(app).await;
    Flaky {
        addr,
        failing,
        hits,
        task,
    }
}

/// The circuit state of the backend at `addr` (of the first pool).
fn circuit(gw: &crate::common::TestGateway, addr: std::net::SocketAddr) -> BreakerState {
    let snapshot = gw.snapshot();
    let members = snapshot.pools[0].members();
    let backend = members.backends.iter().find(|b| b.addr == addr).unwrap();
    backend.breaker.state()
}

/// Sends requests until `done` holds (to a 10 s deadline); every answer
/// must be a 200 (a failed attempt is retried on the other backend).
async fn requests_until(gw: &crate::common::TestGateway, what: &str, done: impl Fn() -> bool) {
    let c = client();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        let status = c.get(gw.url("/x")).send().await.unwrap().status();
        assert_eq!(status, 200, "while waiting for {what}");
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
    }
}

/// The breaker through the gateway, by state rather than by timing (the
/// exact counts under a manual clock are the breaker's unit tests).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_breaker_opens_on_503s_moves_traffic_probes_and_closes() {
    let good = upstream("good").await;
    let bad = flaky().await;
    let gw = gateway(&format!(
        "upstreams:\n  p:\n    backends: [{{address: \"{}\"}}, {{address: \"{}\"}}]\n    circuit_breaker: {{consecutive_failures: 3, open_for: 300ms, half_open_probes: 2}}\nroutes:\n  - {{name: r, match: {{path: {{prefix: /}}}}, upstream: p}}\n",
        good.addr, bad.addr
    ));
    // Each 503 is retried on the good backend (the client never sees it);
    // the flaky backend's 3rd consecutive 503 opens its circuit.
    requests_until(&gw, "the circuit open", || {
        circuit(&gw, bad.addr) == BreakerState::Open
    })
    .await;
    assert!(bad.hits.load(Ordering::SeqCst) >= 3);

    // Still failing when the circuit half-opens: the probe fails and the
    // circuit opens again.
    let at_open = bad.hits.load(Ordering::SeqCst);
    requests_until(&gw, "a probe", || bad.hits.load(Ordering::SeqCst) > at_open).await;
    requests_until(&gw, "the circuit open again", || {
        circuit(&gw, bad.addr) == BreakerState::Open
    })
    .await;

    // Fixed: the next probes succeed and it closes; it takes its share again.
    bad.failing.store(false, Ordering::SeqCst);
    requests_until(&gw, "the circuit closed", || {
        circuit(&gw, bad.addr) == BreakerState::Closed
    })
    .await;
    let c = client();
    let mut served_by_flaky = 0;
    for _ in 0..20 {
        let v: serde_json::Value = c
            .get(gw.url("/x"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if backend_of(&v) == "flaky" {
            served_by_flaky += 1;
        }
    }
    assert!(
        served_by_flaky >= 8,
        "closed again: flaky served {served_by_flaky}/20"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_all_circuits_open_answers_503_at_once_with_retry_after() {
    // An upstream slower than the route's read timeout, counting requests.
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let app = axum::Router::new().fallback(move || {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_secs(2)).await;
            "late"
        }
    });
    let (slow, _task) = crate::common::serve(app).await;
    let gw = gateway(&format!(
        "upstreams:\n  p:\n    backends: [{{address: \"{slow}\"}}]\n    circuit_breaker: {{consecutive_failures: 3, open_for: 5s}}\nroutes:\n  - {{name: r, match: {{path: {{prefix: /}}}}, upstream: p, timeouts: {{read: 200ms}}}}\n"
    ));
    let c = client();
    for _ in 0..3 {
        let r = c.get(gw.url("/x")).send().await.unwrap();
        assert_eq!(r.status(), 504);
    }
    let t = Instant::now();
    let r = c.get(gw.url("/x")).send().await.unwrap();
    let took = t.elapsed();
    assert_eq!(r.status(), 503);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=5).contains(&retry), "Retry-After {retry}");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "no_backend_available");
    println!("open circuit answered in {took:?} (read timeout 200 ms)");
    assert_eq!(
        hits.load(Ordering::SeqCst),
        3,
        "the open circuit answered without trying the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_health_services_reports_circuits_ok_degraded_down() {
    let good = upstream("good").await;
    let dead_a = crate::common::free_port();
    let dead_b = crate::common::free_port();
    let breaker = "circuit_breaker: {consecutive_failures: 2, open_for: 30s}";
    let gw = gateway(&format!(
        "upstreams:\n  mixed:\n    backends: [{{address: \"{g}\"}}, {{address: \"127.0.0.1:{dead_a}\"}}]\n    {breaker}\n  lonely:\n    backends: [{{address: \"127.0.0.1:{dead_b}\"}}]\n    {breaker}\nroutes:\n  - {{name: m, match: {{path: {{prefix: /m}}}}, upstream: mixed}}\n  - {{name: l, match: {{path: {{prefix: /l}}}}, upstream: lonely}}\n",
        g = good.addr
    ));
    let c = client();
    let (status, v) = crate::common::get_json(&c, &gw.url("/health")).await;
    assert_eq!((status, v["status"].as_str()), (200, Some("ok")));
    let services = || async {
        let (status, v) = crate::common::get_json(&c, &gw.admin_url("/health/services")).await;
        (status, v)
    };
    let (status, v) = services().await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["status"], "ok");
    let mixed = &v["pools"][0];
    assert_eq!(mixed["name"], "lonely", "pools are listed by name");
    assert_eq!(
        v["pools"][1]["backends"][0]["address"],
        good.addr.to_string()
    );
    assert_eq!(v["pools"][1]["backends"][0]["circuit"], "closed");
    assert_eq!(v["pools"][1]["backends"][0]["weight"], 1);

    // Connect failures on the mixed pool's dead backend open its circuit
    // (requests still succeed, retried on the good backend).
    for _ in 0..6 {
        assert_eq!(c.get(gw.url("/m")).send().await.unwrap().status(), 200);
    }
    let (status, v) = services().await;
    assert_eq!(
        (status, v["status"].as_str()),
        (200, Some("degraded")),
        "{v}"
    );
    let mixed = &v["pools"][1];
    assert_eq!(mixed["status"], "degraded");
    let dead = mixed["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == format!("127.0.0.1:{dead_a}"))
        .unwrap();
    assert_eq!(dead["circuit"], "open");
    assert!(dead["consecutive_failures"].as_u64().unwrap() >= 2);

    // The lonely pool's only backend opens too: down, 503.
    for _ in 0..2 {
        assert_eq!(c.get(gw.url("/l")).send().await.unwrap().status(), 502);
    }
    assert_eq!(c.get(gw.url("/l")).send().await.unwrap().status(), 503);
    let (status, v) = services().await;
    assert_eq!((status, v["status"].as_str()), (503, Some("down")), "{v}");
    assert_eq!(v["pools"][0]["status"], "down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_idempotent_requests_are_retried_on_503_within_the_budget() {
    let good = flaky().await;
    good.failing.store(false, Ordering::SeqCst);
    let bad = flaky().await;
    let config = |ratio: &str, burst: u32| {
        format!(
            "upstreams:\n  p:\n    backends: [{{address: \"{}\"}}, {{address: \"{}\"}}]\n    circuit_breaker: {{enabled: false}}\n    retry_budget: {{ratio: {ratio}, burst: {burst}}}\nroutes:\n  - {{name: r, match: {{path: {{prefix: /}}}}, upstream: p}}\n",
            good.addr, bad.addr
        )
    };
    let c = client();
    // Both gateways up front (starting a Pingora server after another one
    // in this process has shut down does not bind again).
    let gw = gateway(&config("1.0", 100));
    let tight = gateway(&config("0.1", 2));
    {
        for _ in 0..40 {
            assert_eq!(c.get(gw.url("/x")).send().await.unwrap().status(), 200);
        }
        // A PUT with a body is resent whole; a POST is never retried.
        let mut put_503 = 0;
        let mut post_503 = 0;
        for _ in 0..10 {
            let r = c.put(gw.url("/x")).body("payload").send().await.unwrap();
            put_503 += u32::from(r.status() == 503);
            let r = c.post(gw.url("/x")).body("payload").send().await.unwrap();
            post_503 += u32::from(r.status() == 503);
        }
        assert_eq!(put_503, 0);
        assert!(
            post_503 > 0,
            "POSTs that hit the failing backend get its 503"
        );
    }
    // A tight budget: at most burst + ratio × requests retries.
    good.hits.store(0, Ordering::SeqCst);
    bad.hits.store(0, Ordering::SeqCst);
    let mut seen_503 = 0;
    for _ in 0..100 {
        seen_503 += u32::from(c.get(tight.url("/x")).send().await.unwrap().status() == 503);
    }
    let upstream_requests = good.hits.load(Ordering::SeqCst) + bad.hits.load(Ordering::SeqCst);
    let retries = upstream_requests - 100;
    println!("100 GETs, half to a failing backend: {retries} retries, {seen_503} 503s passed on");
    assert!(retries >= 2, "the burst was used");
    assert!(retries <= 2 + 10, "budget: {retries} retries");
    assert_eq!(seen_503 as usize, bad.hits.load(Ordering::SeqCst) - retries);
}
