//! Tier rate limits: local buckets, Redis-shared buckets across three
//! gateway instances, and Redis dying mid-run. Real Redis on
//! TIERGATE_TEST_REDIS (default 127.0.0.1:6379) with a key prefix per test; the outage test runs its own
//! `redis-server` on a free port.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway::secret::Environment;
use serde_json::Value;

use crate::common::{
    client, free_port, gateway_with_env, gateway_with_server, redis_addr, redis_url, upstream,
    wait_for_port, TestGateway, Upstream,
};
use crate::tokens::{self, claims, hs256};

fn dev_env() -> Environment {
    tokens::dev_env(tokens::DEV_SECRET)
}

fn token(sub: &str, tier: &str) -> String {
    hs256(&claims(sub, tier), tokens::DEV_SECRET.as_bytes())
}

/// A key prefix no other test (or run) uses.
fn prefix(test: &str) -> String {
    format!("tgtest:{test}:{}:{}:", std::process::id(), fastrand_u64())
}

fn fastrand_u64() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now())
}

/// Fails with instructions when the machine's Redis is not running.
fn require_redis() {
    let ok = std::net::TcpStream::connect_timeout(&redis_addr(), Duration::from_secs(1)).is_ok();
    assert!(
        ok,
        "these tests need Redis at TIERGATE_TEST_REDIS (default 127.0.0.1:6379): run them with scripts/test, or start it with `redis-server --daemonize yes` \
         (or `service redis-server start`)"
    );
}

fn config(up: &Upstream, rate_limit: &str) -> String {
    format!(
        "upstreams:\n  svc: {{ backends: [{{ address: \"{}\" }}] }}\nroutes:\n\
  - {{ name: api, match: {{ path: {{ prefix: /api }} }}, upstream: svc, auth: required }}\n\
  - {{ name: login, match: {{ path: {{ prefix: /auth }} }}, upstream: svc }}\n\
auth: {{ algorithms: [HS256], issuer: {}, audience: {} }}\n{rate_limit}",
        up.addr,
        tokens::ISSUER,
        tokens::AUDIENCE
    )
}

async fn get(
    gw: &TestGateway,
    path: &str,
    token: Option<&str>,
    xff: Option<&str>,
) -> reqwest::Response {
    let mut req = client().get(gw.url(path));
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    if let Some(ip) = xff {
        req = req.header("x-forwarded-for", ip);
    }
    req.send().await.unwrap()
}

fn header(resp: &reqwest::Response, name: &str) -> String {
    resp.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// FREE: 10 per minute; the 11th is a 429 with the headers; PREMIUM is
/// not limited at 11; a token upgraded to PREMIUM gets through at once.
async fn free_user_scenario(gw: &TestGateway) {
    let free = token("alice", "FREE");
    for i in 0..10u64 {
        let r = get(gw, "/api/data", Some(&free), None).await;
        assert_eq!(r.status(), 200, "request {}", i + 1);
        assert_eq!(header(&r, "x-ratelimit-limit"), "10");
        assert_eq!(header(&r, "x-ratelimit-remaining"), (9 - i).to_string());
        assert!(header(&r, "ratelimit-policy").contains("\"minute\";q=10;w=60"));
    }
    let r = get(gw, "/api/data", Some(&free), None).await;
    assert_eq!(r.status(), 429);
    let retry: u64 = header(&r, "retry-after").parse().unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    assert_eq!(header(&r, "x-ratelimit-limit"), "10");
    assert_eq!(header(&r, "x-ratelimit-remaining"), "0");
    let reset: u64 = header(&r, "x-ratelimit-reset").parse().unwrap();
    assert!((1..=60).contains(&reset), "reset {reset}");
    assert_eq!(
        header(&r, "ratelimit-policy"),
        "\"minute\";q=10;w=60, \"hour\";q=100;w=3600, \"day\";q=1000;w=86400"
    );
    assert!(header(&r, "ratelimit").starts_with("\"minute\";r=0;t="));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");

    // The same user with an upgraded token: PREMIUM's limits at once.
    let premium = token("alice", "PREMIUM");
    for _ in 0..15 {
        let r = get(gw, "/api/data", Some(&premium), None).await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-ratelimit-limit"), "200");
    }
    // The FREE token is still limited.
    assert_eq!(get(gw, "/api/data", Some(&free), None).await.status(), 429);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_free_user_is_limited_at_11_local() {
    let up = upstream("svc").await;
    let gw = gateway_with_env(&config(&up, ""), &dev_env());
    free_user_scenario(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_free_user_is_limited_at_11_through_redis() {
    require_redis();
    let up = upstream("svc").await;
    let rl = format!(
        "rate_limit:\n  redis: {{ url: \"{}\", key_prefix: \"{}\" }}\n",
        redis_url(),
        prefix("free")
    );
    let gw = gateway_with_env(&config(&up, &rl), &dev_env());
    assert!(gw.snapshot().limiter.shared().unwrap().is_up());
    free_user_scenario(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_anonymous_routes_are_limited_per_client_ip() {
    let up = upstream("svc").await;
    // The test client is 127.0.0.1, a trusted proxy here, so X-Forwarded-For
    // stands for distinct clients.
    let rl = "rate_limit:\n  anonymous: { per_minute: 3 }\n";
    let gw = gateway_with_server(
        "  trusted_proxies: [127.0.0.1]\n",
        &config(&up, rl),
        &dev_env(),
    );
    for _ in 0..3 {
        assert_eq!(
            get(&gw, "/auth/login", None, Some("203.0.113.1"))
                .await
                .status(),
            200
        );
    }
    let r = get(&gw, "/auth/login", None, Some("203.0.113.1")).await;
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "x-ratelimit-limit"), "3");
    // Another client is not affected.
    assert_eq!(
        get(&gw, "/auth/login", None, Some("203.0.113.2"))
            .await
            .status(),
        200
    );
    // A forged hop to the left of the real client changes nothing.
    let r = get(&gw, "/auth/login", None, Some("198.51.100.7, 203.0.113.1")).await;
    assert_eq!(r.status(), 429);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_untrusted_peers_cannot_pick_their_ip_with_x_forwarded_for() {
    let up = upstream("svc").await;
    let gw = gateway_with_env(
        &config(&up, "rate_limit:\n  anonymous: { per_minute: 2 }\n"),
        &dev_env(),
    );
    assert_eq!(
        get(&gw, "/auth/login", None, Some("10.1.1.1"))
            .await
            .status(),
        200
    );
    assert_eq!(
        get(&gw, "/auth/login", None, Some("10.1.1.2"))
            .await
            .status(),
        200
    );
    assert_eq!(
        get(&gw, "/auth/login", None, Some("10.1.1.3"))
            .await
            .status(),
        429
    );
}

/// Three gateway instances share one Redis; clients hammer one user's key
/// through all three at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_three_instances_share_one_limit_within_1_percent() {
    require_redis();
    const LIMIT: u64 = 1200;
    let up = upstream("svc").await;
    let rl = format!(
        "rate_limit:\n  tiers:\n    - {{ name: FREE, per_minute: 10 }}\n    - {{ name: BULK, per_hour: {LIMIT} }}\n  redis: {{ url: \"{}\", key_prefix: \"{}\", expected_instances: 3 }}\n",
        redis_url(),
        prefix("three")
    );
    let body = config(&up, &rl);
    let gws: Vec<TestGateway> = (0..3)
        .map(|_| gateway_with_env(&body, &dev_env()))
        .collect();
    let tok = token("bulk-user", "BULK");
    let admitted = Arc::new(AtomicU64::new(0));
    let rejected = Arc::new(AtomicU64::new(0));
    let other = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let run_for = Duration::from_secs(4);
    let mut tasks = Vec::new();
    for gw in &gws {
        for _ in 0..6 {
            let url = gw.url("/api/data");
            let (tok, a, r, o) = (
                tok.clone(),
                admitted.clone(),
                rejected.clone(),
                other.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let c = client();
                while started.elapsed() < run_for {
                    let resp = c
                        .get(&url)
                        .header("authorization", format!("Bearer {tok}"))
                        .send()
                        .await
                        .unwrap();
                    match resp.status().as_u16() {
                        200 => a.fetch_add(1, Ordering::Relaxed),
                        429 => r.fetch_add(1, Ordering::Relaxed),
                        _ => o.fetch_add(1, Ordering::Relaxed),
                    };
                    let _ = resp.bytes().await;
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let admitted = admitted.load(Ordering::Relaxed);
    let rejected = rejected.load(Ordering::Relaxed);
    let total = admitted + rejected;
    let mut calls = 0;
    let mut fallback = 0;
    for gw in &gws {
        let snap = gw.snapshot();
        let s = &snap.limiter.shared().unwrap().stats;
        calls += s.calls.load(Ordering::Relaxed);
        fallback += s.fallback.load(Ordering::Relaxed);
    }
    // The hour bucket refills LIMIT/3600 per second during the run.
    let refill = (LIMIT as f64 * elapsed / 3600.0).ceil() as u64;
    println!(
        "3 instances, {elapsed:.1} s: {total} requests, {admitted} admitted (limit {LIMIT} + refill {refill}), \
         {rejected} rejected, {calls} Redis calls = {:.4} per request ({:.4} per admitted), {fallback} fallback decisions",
        calls as f64 / total as f64,
        calls as f64 / admitted.max(1) as f64
    );
    assert_eq!(other.load(Ordering::Relaxed), 0, "no other statuses");
    assert!(rejected > 0, "the limit was reached");
    let upper = ((LIMIT + refill) as f64 * 1.01) as u64;
    let lower = (LIMIT as f64 * 0.95) as u64;
    assert!(admitted <= upper, "admitted {admitted} > {upper}");
    assert!(admitted >= lower, "admitted {admitted} < {lower}");
}

/// A `redis-server` of this test's own, on a free port.
struct OwnRedis {
    port: u16,
    child: Child,
}

impl OwnRedis {
    fn start(port: u16) -> Self {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (apt-get install redis-server)");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        wait_for_port(addr);
        Self { port, child }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_redis_killed_mid_run_falls_back_locally_and_recovers() {
    let port = free_port();
    let mut redis = OwnRedis::start(port);
    let up = upstream("svc").await;
    let rl = format!(
        "rate_limit:\n  tiers:\n    - {{ name: FREE, per_day: 100000 }}\n  redis: {{ url: \"redis://127.0.0.1:{port}\", key_prefix: \"t:\", timeout: 50ms }}\n"
    );
    let gw = gateway_with_env(&config(&up, &rl), &dev_env());
    let shared = gw.snapshot().limiter.shared().unwrap().clone();
    assert!(shared.is_up());
    let tok = token("steady", "FREE");
    let mut slowest = Duration::ZERO;
    let mut statuses = Vec::new();
    for i in 0..600 {
        if i == 200 {
            redis.kill();
        }
        if i == 400 {
            let stats = &shared.stats;
            assert!(!shared.is_up(), "Redis marked down");
            assert!(stats.fallback.load(Ordering::Relaxed) > 0, "fallback used");
            redis = OwnRedis::start(port);
        }
        let t = Instant::now();
        let r = get(&gw, "/api/x", Some(&tok), None).await;
        slowest = slowest.max(t.elapsed());
        statuses.push(r.status().as_u16());
        if i >= 400 && !shared.is_up() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    assert!(
        statuses.iter().all(|&s| s == 200),
        "every request served: {:?}",
        statuses.iter().filter(|&&s| s != 200).count()
    );
    // Back in shared mode, with the outage's admissions charged to Redis.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !shared.is_up() {
        assert!(
            Instant::now() < deadline,
            "Redis not used again after restart"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let leased_before = shared.stats.leased.load(Ordering::Relaxed);
    for _ in 0..50 {
        assert_eq!(get(&gw, "/api/x", Some(&tok), None).await.status(), 200);
    }
    assert!(
        shared.stats.leased.load(Ordering::Relaxed) > leased_before,
        "leases resumed"
    );
    let mut conn = redis::Client::open(format!("redis://127.0.0.1:{}", redis.port))
        .unwrap()
        .get_connection()
        .unwrap();
    let level: f64 = redis::cmd("HGET")
        .arg("t:u:steady:FREE")
        .arg("l1")
        .query::<String>(&mut conn)
        .unwrap()
        .parse()
        .unwrap();
    // The restarted Redis started empty; every request admitted by the
    // fallback during the outage was charged to it when it returned, on
    // top of the leases taken since. The day bucket refills 1.16 tokens a
    // second: allow 10 for the seconds this test takes.
    let fallback = shared.stats.fallback.load(Ordering::Relaxed) as f64;
    assert!(
        level <= 100_000.0 - fallback + 10.0,
        "level {level}, fallback {}, calls {}, leased {}",
        shared.stats.fallback.load(Ordering::Relaxed),
        shared.stats.calls.load(Ordering::Relaxed),
        shared.stats.leased.load(Ordering::Relaxed)
    );
    println!(
        "slowest request across the outage: {slowest:?}; outages {}, errors {}, fallback decisions {}",
        shared.stats.outages.load(Ordering::Relaxed),
        shared.stats.errors.load(Ordering::Relaxed),
        shared.stats.fallback.load(Ordering::Relaxed)
    );
    assert!(
        slowest < Duration::from_secs(1),
        "no request waited on the dead Redis: {slowest:?}"
    );
}

/// A three-node Redis Cluster of this test's own (no replicas).
struct OwnCluster {
    nodes: Vec<OwnRedis>,
    dir: std::path::PathBuf,
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A free port whose cluster bus port (port + 10000) is valid and free.
fn cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

fn start_cluster() -> OwnCluster {
    let dir = std::env::temp_dir().join(format!("tiergate-cluster-{}", free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut nodes = Vec::new();
    for _ in 0..3 {
        let port = cluster_port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                &format!("nodes-{port}.conf"),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                dir.to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed");
        wait_for_port(format!("127.0.0.1:{port}").parse().unwrap());
        nodes.push(OwnRedis { port, child });
    }
    let mut args = vec!["--cluster".to_owned(), "create".to_owned()];
    args.extend(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)));
    args.extend(["--cluster-replicas", "0", "--cluster-yes"].map(String::from));
    let out = Command::new("redis-cli").args(&args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Wait until every node agrees the cluster is up.
    let deadline = Instant::now() + Duration::from_secs(10);
    for n in &nodes {
        loop {
            let info = Command::new("redis-cli")
                .args(["-p", &n.port.to_string(), "cluster", "info"])
                .output()
                .unwrap();
            if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                break;
            }
            assert!(Instant::now() < deadline, "cluster did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    OwnCluster { nodes, dir }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_limits_work_on_redis_cluster() {
    let cluster = start_cluster();
    let up = upstream("svc").await;
    let seeds: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| format!("\"redis://127.0.0.1:{}\"", n.port))
        .collect();
    let rl = format!(
        "rate_limit:\n  redis: {{ cluster: [{}] }}\n",
        seeds.join(", ")
    );
    let gw = gateway_with_env(&config(&up, &rl), &dev_env());
    let shared = gw.snapshot().limiter.shared().unwrap().clone();
    assert!(shared.is_up(), "connected to the cluster");
    free_user_scenario(&gw).await;
    // Many users: their keys spread over the three nodes' slots.
    for i in 0..30 {
        let t = token(&format!("cluster-user-{i}"), "FREE");
        assert_eq!(get(&gw, "/api/data", Some(&t), None).await.status(), 200);
    }
    assert_eq!(shared.stats.errors.load(Ordering::Relaxed), 0);
    assert!(shared.stats.calls.load(Ordering::Relaxed) >= 30);
}

/// A TCP proxy in front of the machine's Redis that stalls every reply
/// for `stall` once every `every`: calls time out after Redis ran them.
struct StallingProxy {
    addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for StallingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl StallingProxy {
    async fn start(stall: Duration, every: Duration) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let epoch = Instant::now();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let Ok(server) = tokio::net::TcpStream::connect(redis_addr()).await else {
                    continue;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut cr, &mut sw).await;
                });
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        // Inside a stall window: hold the reply until it ends.
                        let phase = epoch.elapsed().as_nanos() % every.as_nanos();
                        if phase < stall.as_nanos() {
                            let left = stall.as_nanos() - phase;
                            tokio::time::sleep(Duration::from_nanos(left as u64)).await;
                        }
                        if cw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Self { addr, task }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_calls_timing_out_after_redis_ran_them_lose_no_grant_and_charge_no_debt_twice() {
    require_redis();
    const LIMIT: u64 = 3000;
    let up = upstream("svc").await;
    let key_prefix = prefix("stall");
    // Each instance talks to Redis through its own proxy, which holds the
    // replies for 150 ms in every 400 ms: longer than the 60 ms timeout,
    // after Redis has run the script.
    let mut proxies = Vec::new();
    let mut gws = Vec::new();
    for _ in 0..3 {
        let p = StallingProxy::start(Duration::from_millis(100), Duration::from_millis(400)).await;
        let rl = format!(
            "rate_limit:\n  tiers:\n    - {{ name: FREE, per_minute: 10 }}\n    - {{ name: BULK, per_hour: {LIMIT} }}\n  redis: {{ url: \"redis://{}\", key_prefix: \"{key_prefix}\", expected_instances: 3, timeout: 60ms, lease_idle: 200ms }}\n",
            p.addr
        );
        gws.push(gateway_with_env(&config(&up, &rl), &dev_env()));
        proxies.push(p);
    }
    // Each has connected (its first PING may have met a stall).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gws
        .iter()
        .all(|g| g.snapshot().limiter.shared().unwrap().is_up())
    {
        assert!(
            Instant::now() < deadline,
            "Redis not reachable through the proxies"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let outages_before: u64 = gws
        .iter()
        .map(|g| {
            g.snapshot()
                .limiter
                .shared()
                .unwrap()
                .stats
                .outages
                .load(Ordering::Relaxed)
        })
        .sum();
    let tok = token("stalled-user", "BULK");
    let admitted = Arc::new(AtomicU64::new(0));
    let rejected = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    // At least 4 s, and on until the limit is reached (a loaded machine
    // sends fewer requests a second), 30 s at most.
    let run_for = Duration::from_secs(4);
    let at_most = Duration::from_secs(30);
    let mut tasks = Vec::new();
    for gw in &gws {
        for _ in 0..4 {
            let url = gw.url("/api/data");
            let (tok, a, r) = (tok.clone(), admitted.clone(), rejected.clone());
            tasks.push(tokio::spawn(async move {
                let c = client();
                while started.elapsed() < run_for
                    || (r.load(Ordering::Relaxed) == 0 && started.elapsed() < at_most)
                {
                    let resp = c
                        .get(&url)
                        .header("authorization", format!("Bearer {tok}"))
                        .send()
                        .await
                        .unwrap();
                    match resp.status().as_u16() {
                        200 => a.fetch_add(1, Ordering::Relaxed),
                        429 => r.fetch_add(1, Ordering::Relaxed),
                        other => panic!("status {other}"),
                    };
                    let _ = resp.bytes().await;
                    // ~250 req/s per client: the limit runs out mid-run.
                    tokio::time::sleep(Duration::from_millis(4)).await;
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let admitted = admitted.load(Ordering::Relaxed);
    let rejected = rejected.load(Ordering::Relaxed);
    let (mut timeouts, mut replays, mut fallback) = (0, 0, 0);
    for gw in &gws {
        let snap = gw.snapshot();
        let s = &snap.limiter.shared().unwrap().stats;
        timeouts += s.timeouts.load(Ordering::Relaxed);
        replays += s.replays.load(Ordering::Relaxed);
        fallback += s.fallback.load(Ordering::Relaxed);
    }
    println!(
        "stalling Redis: {admitted} admitted, {rejected} rejected (limit {LIMIT}); {timeouts} timeouts, {replays} replayed answers, {fallback} fallback decisions"
    );
    assert!(
        timeouts > 0 && replays > 0,
        "calls timed out and were replayed"
    );
    let outages: u64 = gws
        .iter()
        .map(|g| {
            g.snapshot()
                .limiter
                .shared()
                .unwrap()
                .stats
                .outages
                .load(Ordering::Relaxed)
        })
        .sum();
    assert_eq!(
        outages, outages_before,
        "stalls shorter than the outage rule are not outages"
    );
    assert!(rejected > 0, "the limit was reached");
    // Nothing over-admitted...
    let refill = |elapsed: Duration| (LIMIT as f64 * elapsed.as_secs_f64() / 3600.0).ceil();
    let upper = (LIMIT as f64 + refill(started.elapsed())) * 1.01;
    assert!((admitted as f64) <= upper, "admitted {admitted} > {upper}");
    // ...and every admission charged exactly once, every grant used or
    // returned: once the idle leases are back, Redis holds exactly the
    // limit less what was admitted (plus the hour's refill). A lost grant
    // or a debt charged twice leaves it lower.
    let key = format!("{key_prefix}u:stalled-user:BULK");
    let mut conn = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let level: Option<String> = redis::cmd("HGET")
            .arg(&key)
            .arg("l1")
            .query_async(&mut conn)
            .await
            .unwrap();
        let level: f64 = level.unwrap().parse().unwrap();
        let accounted = level + admitted as f64;
        let expected = LIMIT as f64;
        if accounted >= expected - 1.0 && accounted <= expected + refill(started.elapsed()) + 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Redis level {level} + admitted {admitted} = {accounted}, expected {expected} (+ refill)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
