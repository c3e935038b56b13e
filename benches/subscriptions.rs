//! Subscriptions-service benchmark (issue 19), loopback only, real
//! binaries: `tiergate serve users` and `tiergate serve billing`
//! (SQLite), `tiergate serve subscriptions` (SQLite, then PostgreSQL when
//! it answers at `TIERGATE_TEST_POSTGRES`, default
//! `postgres://postgres@127.0.0.1:5432`), `tiergate gateway` in front.
//!
//! A user checks out PREMIUM (a pending subscription and its change, the
//! invoice made at billing), then `GET /api/subscriptions/me` (the
//! subscription and the pending change read, the next renewal priced) is
//! asked at a fixed rate, open loop, through the gateway (JWT verified,
//! limits, access log) and straight to the service.
//!
//! Then the usage ingest: `USAGE_BATCHES` batches of `USAGE_BATCH_ROWS`
//! rows (the gateway's default batch size, 5000), sent one after the
//! other as one gateway does, straight to `POST /internal/usage` with the
//! gateway's service token; each row a (user, route) sum, 20 000 users ×
//! 5 routes, so later batches update the rows earlier ones made. The
//! first batch is then sent again and must be answered as a duplicate.
//!
//! `cargo bench --bench subscriptions`. Environment: `ME_RATE` (req/s,
//! 500), `ME_CONNECTIONS` (8), `ME_DURATION` (s, 10), `GATEWAY_THREADS`
//! (1), `USAGE_BATCHES` (40), `USAGE_BATCH_ROWS` (5000).

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use backend_common::service_auth::{KeySource, ServiceKeys};
use support::fixed::{self, FixedResult};
use support::services::{self, env_num, free_addr, get_request, row, TempDir};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Run {
    name: &'static str,
    via_gateway: FixedResult,
    direct: FixedResult,
    ingest: FixedResult,
    ingest_secs: f64,
}

const ROUTES: [&str; 5] = ["quotes", "orders", "account", "subscriptions", "billing"];

/// Sends `batches` batches of `rows` rows to `/internal/usage` one after
/// the other; the timings, and the seconds they took in all.
async fn ingest(
    client: &reqwest::Client,
    subs: SocketAddr,
    keys: &ServiceKeys,
    batches: usize,
    rows: usize,
) -> Result<(FixedResult, f64)> {
    let url = format!("http://{subs}/internal/usage");
    let batch = |i: usize| {
        let rows: Vec<serde_json::Value> = (0..rows)
            .map(|j| {
                let n = (i * rows + j) % (20_000 * ROUTES.len());
                let user = format!("0193a1b2-7c4d-7000-8000-{:012}", n / ROUTES.len());
                serde_json::json!({
                    "subject": {"kind": "user", "id": user},
                    "user_id": user,
                    "route": ROUTES[n % ROUTES.len()],
                    "count": 1 + (j % 7),
                })
            })
            .collect();
        serde_json::json!({
            "batch_id": uuid::Uuid::now_v7().to_string(),
            "source": "gateway",
            "from": "2026-12-02T03:00:00Z",
            "to": "2026-12-02T03:00:05Z",
            "rows": rows,
        })
    };
    let bodies: Vec<Vec<u8>> = (0..batches)
        .map(|i| serde_json::to_vec(&batch(i)))
        .collect::<Result<_, _>>()?;
    let mut res = FixedResult::default();
    let started = Instant::now();
    for body in &bodies {
        let t0 = Instant::now();
        let sent = client
            .post(&url)
            .bearer_auth(keys.issue("subscriptions"))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await;
        services::record(&mut res, sent, t0, |s| s.is_success()).await;
    }
    let took = started.elapsed().as_secs_f64();
    let again = client
        .post(&url)
        .bearer_auth(keys.issue("subscriptions"))
        .header("content-type", "application/json")
        .body(bodies[0].clone())
        .send()
        .await?
        .json::<serde_json::Value>()
        .await?;
    if again["duplicate"] != true {
        return Err(anyhow!("a batch sent again was counted again: {again}"));
    }
    res.latencies_ns.sort_unstable();
    Ok((res, took))
}

fn main() -> Result<()> {
    let threads: usize = env_num("GATEWAY_THREADS", 1)?;
    let rate: u32 = env_num("ME_RATE", 500)?;
    let conns: usize = env_num("ME_CONNECTIONS", 8)?;
    let secs: u64 = env_num("ME_DURATION", 10)?;
    let batches: usize = env_num("USAGE_BATCHES", 40)?;
    let batch_rows: usize = env_num("USAGE_BATCH_ROWS", 5000)?;
    let dir = TempDir::new("tg-subscriptions-bench")?;
    let (users_addr, billing_addr, subs_addr, gw_addr) =
        (free_addr()?, free_addr()?, free_addr()?, free_addr()?);
    let (mut users, _mail) = services::serve_users(&dir.0, users_addr)?;
    let users_url = format!("http://{users_addr}");
    let billing_url = format!("http://{billing_addr}");
    let mut billing = services::serve(
        &dir.0,
        "billing",
        billing_addr,
        &[
            ("TIERGATE_USERS_URL", users_url.as_str()),
            ("RUST_LOG", "warn"),
        ],
    )?;
    let mut gateway = services::bench_gateway(
        &dir.0,
        gw_addr,
        threads,
        &[("users", users_addr), ("subscriptions", subs_addr)],
        &[],
    )?;
    let (rt, client) = services::client_runtime()?;
    let base = format!("http://{gw_addr}");
    let token = rt.block_on(services::signed_up(
        &client,
        &base,
        &dir.0.join("mail"),
        "bench@example.com",
        "correct horse 9",
    ))?;
    // The gateway's key: the services of this data directory trust it.
    let gateway_keys = ServiceKeys::load(&KeySource::development("gateway", &dir.0))
        .map_err(|e| anyhow!("the gateway's key: {e}"))?;
    let pg = rt.block_on(services::postgres_database("tg_bench_subscriptions"));
    let mut runs = Vec::new();
    for (name, url) in [("SQLite", None), ("PostgreSQL", pg.as_deref())] {
        if name == "PostgreSQL" && url.is_none() {
            eprintln!("PostgreSQL does not answer: SQLite only");
            continue;
        }
        let mut env = vec![
            ("TIERGATE_USERS_URL", users_url.as_str()),
            ("TIERGATE_BILLING_URL", billing_url.as_str()),
            ("RUST_LOG", "warn"),
        ];
        if let Some(u) = url {
            env.push(("TIERGATE_SUBSCRIPTIONS_DATABASE_URL", u));
        }
        eprintln!("{name}: starting subscriptions on {subs_addr}");
        let mut subs = services::serve(&dir.0, "subscriptions", subs_addr, &env)?;
        rt.block_on(async {
            let r = client
                .post(format!("{base}/api/subscriptions/checkout"))
                .bearer_auth(&token)
                .header("idempotency-key", format!("bench-{name}"))
                .json(&serde_json::json!({"plan": "PREMIUM", "cycle": "monthly"}))
                .send()
                .await?;
            if !r.status().is_success() {
                return Err(anyhow!("checkout: {} {}", r.status(), r.text().await?));
            }
            Ok(())
        })?;
        let me = |addr: SocketAddr| get_request(addr, "/api/subscriptions/me", &token);
        eprintln!("{name}: GET /api/subscriptions/me at {rate} req/s for {secs} s, via the gateway then direct");
        rt.block_on(fixed::run(
            gw_addr,
            me(gw_addr),
            rate,
            conns,
            Duration::from_secs(1),
        ))?;
        let dur = Duration::from_secs(secs);
        let via_gateway = rt.block_on(fixed::run(gw_addr, me(gw_addr), rate, conns, dur))?;
        let direct = rt.block_on(fixed::run(subs_addr, me(subs_addr), rate, conns, dur))?;
        eprintln!("{name}: {batches} usage batches of {batch_rows} rows");
        let (ingest, ingest_secs) = rt.block_on(ingest(
            &client,
            subs_addr,
            &gateway_keys,
            batches,
            batch_rows,
        ))?;
        subs.alive()?;
        runs.push(Run {
            name,
            via_gateway,
            direct,
            ingest,
            ingest_secs,
        });
    }
    users.alive()?;
    billing.alive()?;
    gateway.alive()?;
    println!();
    println!(
        "Settings: GET /api/subscriptions/me (a pending PREMIUM checkout) at {rate} req/s over \
         {conns} keep-alive connections for {secs} s, open loop; gateway threads {threads}; \
         Redis-shared limits: {}; {} CPUs.",
        services::redis_running(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    println!("| measurement | per s | p50 ms | p99 ms | p99.9 ms | non-2xx | errors |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in &runs {
        let per_s = |f: &FixedResult| f.latencies_ns.len() as f64 / secs as f64;
        row(
            &format!("{}: GET /api/subscriptions/me via gateway", r.name),
            &r.via_gateway,
            per_s(&r.via_gateway),
        );
        row(
            &format!("{}: GET /api/subscriptions/me direct", r.name),
            &r.direct,
            per_s(&r.direct),
        );
    }
    println!();
    println!(
        "Usage ingest: {batches} batches of {batch_rows} rows, one after the other, to POST /internal/usage."
    );
    println!();
    println!("| database | rows/s | batches/s | batch p50 ms | batch p99 ms | failed |");
    println!("|---|---:|---:|---:|---:|---:|");
    for r in &runs {
        let ok = r.ingest.latencies_ns.len();
        println!(
            "| {} | {:.0} | {:.1} | {:.1} | {:.1} | {} |",
            r.name,
            (ok * batch_rows) as f64 / r.ingest_secs,
            ok as f64 / r.ingest_secs,
            r.ingest.pct_ms(0.5),
            r.ingest.pct_ms(0.99),
            r.ingest.non_200 + r.ingest.errors,
        );
        if let Some(e) = &r.ingest.first_error {
            println!("  first failure: {e}");
        }
    }
    if let Some(url) = pg {
        rt.block_on(services::drop_database(&url));
    }
    Ok(())
}
