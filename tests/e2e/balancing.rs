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

/// An upstream named `name` that holds every request until `release`
/// turns true, then answers `{"backend": name}`.
async fn held(
    name: &'static str,
    release: tokio::sync::watch::Receiver<bool>,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let app = axum::Router::new().fallback(move || {
        let mut release = release.clone();
        async move {
            let _ = release.wait_for(|r| *r).await;
            axum::Json(serde_json::json!({ "backend": name }))
        }
    });
    serve(app).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_least_inflight_avoids_the_busy_backend() {
    let (release, held_until) = tokio::sync::watch::channel(false);
    let (a, _ta) = held("a", held_until.clone()).await;
    let (b, _tb) = held("b", held_until).await;
    let gw = gateway(&format!(
        r#"
upstreams:
  pool:
    algorithm: least_inflight
    backends: [{{ address: "{a}" }}, {{ address: "{b}" }}]
routes:
  - {{ name: all, match: {{ path: {{ prefix: / }} }}, upstream: pool }}
"#
    ));
    let inflight = || {
        let snapshot = gw.snapshot();
        let members = snapshot.pools[0].members();
        members
            .backends
            .iter()
            .map(|b| b.inflight())
            .collect::<Vec<_>>()
    };
    // Park 4 requests, each once the one before is in flight: each goes
    // to the backend with fewer in flight, so they end up 2 and 2.
    let c = client();
    let mut parked = Vec::new();
    for i in 0..4 {
        let (c, url) = (c.clone(), gw.url("/x"));
        parked.push(tokio::spawn(async move {
            let v = json_of(c.get(&url)).await;
            backend_of(&v).to_owned()
        }));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while inflight().iter().sum::<usize>() < i + 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "request {i} not in flight"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let now = inflight();
        assert!(
            now[0].abs_diff(now[1]) <= 1,
            "after {} requests: {now:?}",
            i + 1
        );
    }
    assert_eq!(inflight(), [2, 2]);
    release.send(true).unwrap();
    let mut busy = Vec::new();
    for t in parked {
        busy.push(t.await.unwrap());
    }
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
