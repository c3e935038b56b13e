//! Config reload without a restart, under continuous load: a valid change
//! applies with no failed request; an invalid one changes
//! nothing and is counted; a removed pool's health checks stop; SIGHUP
//! reloads the real binary.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway::secret::Environment;
use gateway::server::{GatewayServer, RunningGateway};
use serde_json::Value;

use crate::common::{
    backend_of, client, free_port, json_of, metric_value, serve, upstream, wait_for_port,
};

struct Watched {
    running: RunningGateway,
    addr: SocketAddr,
    admin: SocketAddr,
    file: PathBuf,
}

impl Watched {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

fn head(port: u16, admin: u16) -> String {
    format!(
        "admin:\n  listen: [\"127.0.0.1:{admin}\"]\nserver:\n  listen: [\"127.0.0.1:{port}\"]\n  threads: 2\n  grace_period: 0s\n  graceful_shutdown_timeout: 0s\naccess_log: {{ enabled: false }}\n"
    )
}

/// Replaces the file atomically (as editors and config management do).
fn write(file: &Path, text: &str) {
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, file).unwrap();
}

fn start(body: &str) -> Watched {
    let dir = std::env::temp_dir().join(format!("tg-reload-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tiergate.yaml");
    let (port, admin) = (free_port(), free_port());
    let text = format!("{}{body}", head(port, admin));
    write(&file, &text);
    let config = gateway::config::load_file(&file).unwrap();
    let running = GatewayServer::build_with_env(&config, &Environment::default())
        .unwrap()
        .watch(&file, lua_free_plugins::Registry::with_builtins())
        .unwrap()
        .spawn();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    wait_for_port(addr);
    Watched {
        running,
        addr,
        admin,
        file,
    }
}

fn rewrite(w: &Watched, body: &str) {
    let port = w.addr.port();
    let admin = w.admin.port();
    write(&w.file, &format!("{}{body}", head(port, admin)));
}

/// Requests `path` from `clients` loops until stopped; counts failures.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    first_failure: Arc<std::sync::Mutex<Option<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(url: String, clients: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let first_failure = Arc::new(std::sync::Mutex::new(None));
        let tasks = (0..clients)
            .map(|_| {
                let (stop, ok, failed, first) = (
                    stop.clone(),
                    ok.clone(),
                    failed.clone(),
                    first_failure.clone(),
                );
                let url = url.clone();
                tokio::spawn(async move {
                    let c = client();
                    while !stop.load(Ordering::Relaxed) {
                        match c.get(&url).send().await {
                            Ok(r) if r.status() == 200 => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            other => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                let why = match other {
                                    Ok(r) => format!("HTTP {}", r.status()),
                                    Err(e) => e.to_string(),
                                };
                                first.lock().unwrap().get_or_insert(why);
                            }
                        }
                    }
                })
            })
            .collect();
        Self {
            stop,
            ok,
            failed,
            first_failure,
            tasks,
        }
    }

    async fn finish(self) -> (usize, usize, Option<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let first = self.first_failure.lock().unwrap().clone();
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            first,
        )
    }
}

async fn metric(w: &Watched, line_start: &str) -> Option<f64> {
    metric_value(w.admin, line_start).await
}

/// Waits (to a 10 s deadline) until the sample `line_start` is `value`.
async fn wait_metric(w: &Watched, line_start: &str, value: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = metric(w, line_start).await;
        if now == Some(value) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{line_start} is {now:?}, not {value}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (to a 10 s deadline) until `check` holds.
async fn wait_until(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn services(w: &Watched) -> Value {
    json_of(client().get(format!("http://{}/health/services", w.admin))).await
}

fn sha256_of(file: &Path) -> String {
    gateway::config::sha256_hex(&std::fs::read(file).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_reloads_under_load_apply_valid_changes_and_keep_serving_through_invalid_ones() {
    let (a, b, c) = (
        upstream("a").await,
        upstream("b").await,
        upstream("c").await,
    );
    let v1 = format!(
        "upstreams:\n  main:\n    backends:\n      - {{ address: \"{}\", weight: 9 }}\n      - {{ address: \"{}\", weight: 1 }}\nroutes:\n  - {{ name: api, match: {{ path: {{ prefix: /api }} }}, upstream: main }}\n",
        a.addr, b.addr
    );
    let w = start(&v1);
    let load = Load::start(w.url("/api/x"), 4);
    let ok = load.ok.clone();
    wait_until("the load running", || ok.load(Ordering::Relaxed) >= 20).await;

    // Valid: a new route and pool, and the weights flipped.
    let v2 = format!(
        "upstreams:\n  main:\n    backends:\n      - {{ address: \"{}\", weight: 1 }}\n      - {{ address: \"{}\", weight: 9 }}\n  extra:\n    backends: [{{ address: \"{}\" }}]\nroutes:\n  - {{ name: api, match: {{ path: {{ prefix: /api }} }}, upstream: main }}\n  - {{ name: new, match: {{ path: {{ prefix: /new }} }}, upstream: extra }}\n",
        a.addr, b.addr, c.addr
    );
    rewrite(&w, &v2);
    let written = Instant::now();
    loop {
        let r = client().get(w.url("/new/y")).send().await.unwrap();
        if r.status() == 200 {
            let v: Value = r.json().await.unwrap();
            assert_eq!(backend_of(&v), "c");
            break;
        }
        assert!(
            written.elapsed() < Duration::from_secs(10),
            "the new route did not answer"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = written.elapsed();
    let mut to_b = 0;
    for _ in 0..100 {
        let v = json_of(client().get(w.url("/api/z"))).await;
        to_b += usize::from(backend_of(&v) == "b");
    }
    assert!(
        to_b >= 75,
        "weight 9 of 10 should take ~90 of 100, got {to_b}"
    );
    assert_eq!(
        metric(&w, "tiergate_config_reloads_total{result=\"success\"}").await,
        Some(1.0)
    );
    let doc = services(&w).await;
    assert_eq!(doc["config"]["sha256"], sha256_of(&w.file).as_str());

    // Invalid: nothing changes, the error is counted, the old routes answer.
    let good_sha = sha256_of(&w.file);
    let errors = "tiergate_config_reloads_total{result=\"error\"}";
    rewrite(&w, "routes:\n  - name: [unclosed\n");
    wait_metric(&w, errors, 1.0).await;
    // The same bytes written again (a new modification time) are not
    // tried again: the next error counted is the next file's.
    rewrite(&w, "routes:\n  - name: [unclosed\n");
    assert_eq!(
        client().get(w.url("/new/y")).send().await.unwrap().status(),
        200
    );
    assert_eq!(services(&w).await["config"]["sha256"], good_sha.as_str());
    // A config that parses but is invalid (unknown upstream) is refused too.
    rewrite(
        &w,
        "upstreams: {}\nroutes:\n  - { name: api, match: { path: { prefix: /api } }, upstream: nope }\n",
    );
    wait_metric(&w, errors, 2.0).await;
    assert_eq!(
        metric(&w, "tiergate_config_reloads_total{result=\"success\"}").await,
        Some(1.0)
    );
    assert_eq!(
        client().get(w.url("/api/q")).send().await.unwrap().status(),
        200
    );

    let (ok, failed, first) = load.finish().await;
    assert_eq!(failed, 0, "failed requests during reloads: first {first:?}");
    assert!(ok > 100, "the load ran ({ok} requests)");
    eprintln!("reload applied {took:?} after the write; {ok} requests, 0 failed");
    w.running.shutdown();
}

/// An upstream answering everything 200, counting its requests.
async fn counting() -> (SocketAddr, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let app = axum::Router::new().fallback(move || {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::Relaxed);
            "ok"
        }
    });
    let (addr, task) = serve(app).await;
    (addr, hits, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_removed_pools_health_checks_stop_and_a_kept_pool_keeps_its_state() {
    let (removed, removed_hits, _t1) = counting().await;
    let (kept, kept_hits, _t2) = counting().await;
    let check = "health_check: { path: /health, interval: 100ms, timeout: 50ms }";
    let body = |with_removed: bool| {
        let mut s = format!(
            "upstreams:\n  kept:\n    backends: [{{ address: \"{kept}\" }}]\n    {check}\n"
        );
        if with_removed {
            s.push_str(&format!(
                "  removed:\n    backends: [{{ address: \"{removed}\" }}]\n    {check}\n"
            ));
        }
        s.push_str("routes:\n  - { name: p, match: { path: { prefix: / } }, upstream: kept }\n");
        s
    };
    let w = start(&body(true));
    wait_until("the checks running", || {
        removed_hits.load(Ordering::Relaxed) >= 2
    })
    .await;
    let pools_before = w.running.state.load_full().pools.clone();
    let gone = pools_before
        .iter()
        .find(|p| p.name == "removed")
        .map(Arc::downgrade)
        .unwrap();
    rewrite(&w, &body(false));
    wait_until("the reload applied", || {
        w.running.state.load_full().pools.len() == 1
    })
    .await;
    // The unchanged pool is the same object (its state carried over).
    let kept_pool = &w.running.state.load_full().pools[0];
    assert!(pools_before.iter().any(|p| Arc::ptr_eq(p, kept_pool)));
    drop(pools_before);
    // The removed pool is freed (its checker holds it weakly and ends), so
    // no check of it can start; three more rounds of the kept pool's
    // checks show none did.
    wait_until("the removed pool freed", || gone.strong_count() == 0).await;
    let after = removed_hits.load(Ordering::Relaxed);
    let kept_now = kept_hits.load(Ordering::Relaxed);
    wait_until("three more checks of the kept pool", || {
        kept_hits.load(Ordering::Relaxed) >= kept_now + 3
    })
    .await;
    assert_eq!(
        removed_hits.load(Ordering::Relaxed),
        after,
        "health checks of the removed pool still run"
    );
    w.running.shutdown();
}

/// The real binary: SIGHUP reloads (even an unchanged file) and does not
/// stop the process; the log says what triggered it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_sighup_reloads_the_binary_and_keeps_it_running() {
    let up = upstream("up").await;
    let dir = std::env::temp_dir().join(format!("tg-hup-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tiergate.yaml");
    let port = free_port();
    let admin = free_port();
    let body = format!(
        "upstreams:\n  up:\n    backends: [{{ address: \"{}\" }}]\nroutes:\n  - {{ name: r, match: {{ path: {{ prefix: / }} }}, upstream: up }}\n",
        up.addr
    );
    write(&file, &format!("{}{body}", head(port, admin)));
    let log = dir.join("stderr.log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tiergate"))
        .args(["gateway", "-c"])
        .arg(&file)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_for_port(addr);
    // The watcher says so once its SIGHUP handler is installed.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("reloading the config on change and on SIGHUP")
    {
        assert!(Instant::now() < deadline, "no watcher");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let kill = std::process::Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("config reloaded") {
            assert!(text.contains("\"trigger\":\"SIGHUP\""), "{text}");
            break;
        }
        assert!(Instant::now() < deadline, "no reload after SIGHUP: {text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP stopped the process"
    );
    assert_eq!(
        client()
            .get(format!("http://{addr}/x"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(dir);
}

/// A reload that changes the tiers and limits but not Redis keeps the
/// Redis side of the limiter: the same leases (used on after the reload,
/// not stranded) and any debt still to charge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_rate_limit_reload_keeps_the_shared_lease_state() {
    let up = upstream("svc").await;
    let prefix = format!("tgtest:reload-lease:{}:", uuid::Uuid::now_v7());
    let body = |tiers: &str, anonymous: u64| {
        format!(
            "upstreams:\n  svc: {{ backends: [{{ address: \"{}\" }}] }}\nroutes:\n  - {{ name: all, match: {{ path: {{ prefix: / }} }}, upstream: svc }}\nrate_limit:\n  tiers: [{tiers}]\n  anonymous: {{ per_hour: {anonymous} }}\n  redis: {{ url: \"{}\", key_prefix: \"{prefix}\", lease_idle: 60s }}\n",
            up.addr,
            crate::common::redis_url()
        )
    };
    let w = start(&body("{ name: FREE, per_minute: 10 }", 100_000));
    let c = client();
    for _ in 0..50 {
        assert_eq!(c.get(w.url("/x")).send().await.unwrap().status(), 200);
    }
    let before = w.running.state.load_full();
    let shared = before.limiter.shared().unwrap().clone();
    let calls = shared.stats.calls.load(Ordering::Relaxed);
    let leased = shared.stats.leased.load(Ordering::Relaxed);
    assert!(leased >= 49, "requests were admitted from leases");
    // New limits and a new tier; the same Redis.
    rewrite(
        &w,
        &body(
            "{ name: FREE, per_minute: 20 }, { name: PRO, per_minute: 100 }",
            200_000,
        ),
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while w.running.state.load_full().config_sha256 == before.config_sha256 {
        assert!(Instant::now() < deadline, "the reload did not apply");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after = w.running.state.load_full();
    let kept = after.limiter.shared().unwrap();
    assert!(Arc::ptr_eq(&shared, kept), "the Redis side carried over");
    assert!(kept.tracked_keys() >= 1, "with its keys");
    for _ in 0..5 {
        assert_eq!(c.get(w.url("/x")).send().await.unwrap().status(), 200);
    }
    assert_eq!(
        kept.stats.leased.load(Ordering::Relaxed),
        leased + 5,
        "the lease taken before the reload serves after it"
    );
    assert!(kept.stats.calls.load(Ordering::Relaxed) >= calls);
    w.running.shutdown();
}
