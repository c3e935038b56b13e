//! Weighted round robin, consistent hashing, least-inflight, p2c, and
//! connect-failure retry on another backend.

use std::collections::HashMap;

use crate::common::*;

async fn counts(
    gw: &TestGateway,
    n: usize,
    header: Option<(&str, String)>,
) -> HashMap<String, usize> {
    let c = client();
    let mut out = HashMap::new();
    for _ in 0..n {
        let mut req = c.get(gw.url("/x"));
        if let Some((k, v)) = &header {
            req = req.header(*k, v.as_str());
        }
        let v = json_of(req).await;
        *out.entry(backend_of(&v).to_owned()).or_default() += 1;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_weights_3_to_1_split_within_2_percent_over_4000_requests() {
    let a = upstream("a").await;
    let b = upstream("b").await;
    let gw = gateway(&format!(
        r#"
upstreams:
  pool:
    backends:
      - {{ address: "{}", weight: 3 }}
      - {{ address: "{}", weight: 1 }}
routes:
  - {{ name: all, match: {{ path: {{ prefix: / }} }}, upstream: pool }}
"#,
        a.addr, b.addr
    ));
    // Concurrent clients, as in production: the cycle is shared.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let c = client();
        let url = gw.url("/x");
        tasks.push(tokio::spawn(async move {
            let mut local: HashMap<String, usize> = HashMap::new();
            for _ in 0..500 {
                let v = json_of(c.get(&url)).await;
                *local.entry(backend_of(&v).to_owned()).or_default() += 1;
            }
            local
        }));
    }
    let mut total: HashMap<String, usize> = HashMap::new();
    for t in tasks {
        for (k, v) in t.await.unwrap() {
            *total.entry(k).or_default() += v;
        }
    }
    let a_share = total["a"] as f64 / 4000.0;
    assert!((a_share - 0.75).abs() <= 0.02, "{total:?}");
    assert_eq!(total["a"] + total["b"], 4000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_consistent_hash_keeps_each_key_on_its_backend() {
    let a = upstream("a").await;
    let b = upstream("b").await;
    let c = upstream("c").await;
    let gw = gateway(&format!(
        r#"
upstreams:
  pool:
    algorithm: consistent_hash
    hash_on: header
    hash_header: x-user
    backends: [{{ address: "{}" }}, {{ address: "{}" }}, {{ address: "{}" }}]
routes:
  - {{ name: all, match: {{ path: {{ prefix: / }} }}, upstream: pool }}
"#,
        a.addr, b.addr, c.addr
    ));
    let mut used = HashMap::new();
    for user in 0..60 {
        let seen = counts(&gw, 5, Some(("x-user", format!("user-{user}")))).await;
        assert_eq!(seen.len(), 1, "user-{user} moved: {seen:?}");
        let backend = seen.keys().next().unwrap().clone();
        *used.entry(backend).or_insert(0) += 1;
    }
    // The keys spread over all three backends.
    assert_eq!(used.len(), 3, "{used:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_least_inflight_avoids_the_busy_backend() {
    let a = upstream("a").await;
    let b = upstream("b").await;
    let gw = gateway(&format!(
        r#"
upstreams:
  pool:
    algorithm: least_inflight
    backends: [{{ address: "{}" }}, {{ address: "{}" }}]
routes:
  - {{ name: all, match: {{ path: {{ prefix: / }} }}, upstream: pool }}
"#,
        a.addr, b.addr
    ));
    let c = client();
    // Park 4 slow requests: they spread 2/2 or sit on whichever was idle.
    let mut slow = Vec::new();
    for _ in 0..4 {
        let c = c.clone();
        let url = gw.url("/x?sleep_ms=1500");
        slow.push(tokio::spawn(async move {
            let v = json_of(c.get(&url)).await;
            backend_of(&v).to_owned()
        }));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let mut busy = Vec::new();
    for t in slow {
        busy.push(t.await.unwrap());
    }
    // Each slow request went to the backend with fewer in flight.
    assert_eq!(busy.iter().filter(|b| *b == "a").count(), 2, "{busy:?}");
    // While idle, requests alternate.
    let seen = counts(&gw, 20, None).await;
    assert_eq!(seen.len(), 2, "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_p2c_spreads_by_weight() {
    let a = upstream("a").await;
    let b = upstream("b").await;
    let gw = gateway(&format!(
        r#"
upstreams:
  pool:
    algorithm: p2c
    backends: [{{ address: "{}", weight: 3 }}, {{ address: "{}", weight: 1 }}]
routes:
  - {{ name: all, match: {{ path: {{ prefix: / }} }}, upstream: pool }}
"#,
        a.addr, b.addr
    ));
    let seen = counts(&gw, 400, None).await;
    let a_share = seen["a"] as f64 / 400.0;
    assert!((0.65..=0.85).contains(&a_share), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_refused_connection_is_retried_on_another_backend() {
    let live = upstream("live").await;
    let dead = free_port();
    let gw = gateway(&format!(
        r#"
upstreams:
  pool:
    backends: [{{ address: "127.0.0.1:{dead}" }}, {{ address: "{}" }}]
routes:
  - {{ name: all, match: {{ path: {{ prefix: / }} }}, upstream: pool }}
"#,
        live.addr
    ));
    let seen = counts(&gw, 20, None).await;
    assert_eq!(seen.get("live"), Some(&20), "{seen:?}");
}
