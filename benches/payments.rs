//! Payments-service benchmark (issue 18), loopback only, real binaries:
//! `tiergate serve users`, `tiergate serve billing` (SQLite),
//! `tiergate serve payments` (SQLite, then PostgreSQL when it answers at
//! `TIERGATE_TEST_POSTGRES`, default `postgres://postgres@127.0.0.1:5432`),
//! `tiergate gateway` in front, and the local Midtrans sandbox
//! (`payments::sandbox`, the one `tiergate sandbox` runs) in this process.
//!
//! 1. **`POST /api/payments`** through the gateway (JWT verified, limits,
//!    access log): `CALLERS` callers in a closed loop, each paying the
//!    next of `PAYMENTS` fresh invoices by BCA virtual account with a fresh
//!    `Idempotency-Key`: the idempotency row, billing's
//!    `GET /internal/invoices/{id}`, the payment row committed, the
//!    Midtrans charge (the sandbox), the answer stored. The Midtrans leg
//!    is read from the service's own `payments_midtrans_request_seconds`
//!    histogram, and subtracted to give the service's own cost.
//! 2. **Webhook intake**: every one of those orders paid at the sandbox
//!    (no notification sent), then its signed notification (the body
//!    Midtrans sends, `signature_key` = SHA-512 of order, status code,
//!    amount and key) POSTed through the gateway by `CALLERS` callers:
//!    signature checked, the notification stored, `GET /v2/{order}/status`
//!    asked of the sandbox, the payment settled with its outbox event.
//!    Then the same notifications again (duplicates: checked, stored,
//!    confirmed, no move). Every payment must be settled at the end.
//!
//! `cargo bench --bench payments`. Environment: `PAYMENTS` (1000),
//! `CALLERS` (8), `GATEWAY_THREADS` (1).

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use backend_common::service_auth::{KeySource, ServiceKeys};
use payments::midtrans::{authorization, signature};
use payments::sandbox::{self, SandboxConfig, SANDBOX_CLIENT_KEY, SANDBOX_SERVER_KEY};
use serde_json::{json, Value};
use support::fixed::FixedResult;
use support::services::{self, env_num, free_addr, row, TempDir};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const PASSWORD: &str = "correct horse 9";
const EMAIL: &str = "bench@example.com";

/// `callers` tasks in a closed loop over `items`, each call `send(item)`
/// timed; a 2xx counts, anything else is a failure. The 2xx answers'
/// JSON bodies come back too.
async fn closed_loop<F, Fut>(
    callers: usize,
    items: Vec<Value>,
    send: F,
) -> Result<(FixedResult, Vec<Value>)>
where
    F: Fn(Value) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = reqwest::Result<reqwest::Response>> + Send,
{
    let items = Arc::new(items);
    let next = Arc::new(AtomicUsize::new(0));
    let answers = Arc::new(std::sync::Mutex::new(Vec::with_capacity(items.len())));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..callers {
        let (items, next, send) = (items.clone(), next.clone(), send.clone());
        let answers = answers.clone();
        set.spawn(async move {
            let mut res = FixedResult::default();
            while let Some(item) = items.get(next.fetch_add(1, Ordering::Relaxed)) {
                let t0 = Instant::now();
                let sent = send(item.clone()).await;
                if let Some(body) = services::record(&mut res, sent, t0, |s| s.is_success()).await {
                    let answer = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    answers
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(answer);
                }
            }
            Ok::<_, anyhow::Error>(res)
        });
    }
    let total = services::collect(set, "closed-loop").await?;
    let answers = std::mem::take(&mut *answers.lock().unwrap_or_else(|p| p.into_inner()));
    Ok((total, answers))
}

/// The `payments_midtrans_request_seconds` histogram of one operation
/// (outcome `ok`): cumulative bucket counts by upper bound, sum, count.
struct Leg {
    buckets: Vec<(f64, f64)>,
    sum: f64,
    count: f64,
}

impl Leg {
    async fn read(client: &reqwest::Client, payments: SocketAddr, operation: &str) -> Result<Leg> {
        let text = client
            .get(format!("http://{payments}/metrics"))
            .send()
            .await?
            .text()
            .await?;
        let labels = format!("operation=\"{operation}\",outcome=\"ok\"");
        let mut leg = Leg {
            buckets: Vec::new(),
            sum: 0.0,
            count: 0.0,
        };
        for line in text.lines().filter(|l| l.contains(&labels)) {
            let Some((name, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let value: f64 = value.parse()?;
            if name.starts_with("payments_midtrans_request_seconds_sum") {
                leg.sum = value;
            } else if name.starts_with("payments_midtrans_request_seconds_count") {
                leg.count = value;
            } else if let Some(le) = name.split("le=\"").nth(1) {
                let le = le.trim_end_matches("\"}");
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse()?
                };
                leg.buckets.push((bound, value));
            }
        }
        Ok(leg)
    }

    /// What was added since `before`: mean ms, and the upper bound (ms) of
    /// the bucket holding the 99th percentile.
    fn since(&self, before: &Leg) -> (f64, f64, f64) {
        let count = self.count - before.count;
        let mean = (self.sum - before.sum) / count.max(1.0) * 1e3;
        let p99 = self
            .buckets
            .iter()
            .map(|(le, n)| {
                let was = before
                    .buckets
                    .iter()
                    .find(|(b, _)| b == le)
                    .map_or(0.0, |(_, n)| *n);
                (*le, n - was)
            })
            .find(|(_, n)| *n >= count * 0.99)
            .map_or(f64::NAN, |(le, _)| le * 1e3);
        (count, mean, p99)
    }
}

struct DbRun {
    name: &'static str,
    create: FixedResult,
    create_secs: f64,
    /// (calls, mean ms, p99 bucket bound ms) of the charge leg.
    charge_leg: (f64, f64, f64),
    first: FixedResult,
    first_secs: f64,
    duplicate: FixedResult,
    duplicate_secs: f64,
    /// (calls, mean ms, p99 bucket bound ms) of the status leg.
    status_leg: (f64, f64, f64),
}

struct Setup<'a> {
    rt: &'a tokio::runtime::Runtime,
    client: &'a reqwest::Client,
    dir: &'a Path,
    sandbox: &'a str,
    users: SocketAddr,
    billing: SocketAddr,
    payments: SocketAddr,
    gw: SocketAddr,
    user: &'a str,
    token: &'a str,
    keys: &'a ServiceKeys,
}

/// `n` fresh invoices of the user: their ids.
async fn invoices(s: &Setup<'_>, run: &str, n: usize) -> Result<Vec<String>> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let body = json!({
            "reference": {"kind": "bench", "run": run, "pid": std::process::id(), "n": i},
            "subject": {"kind": "user", "id": s.user},
            "user_id": s.user,
            "plan": "PREMIUM", "cycle": "monthly",
            "lines": [{"description": "PREMIUM, bulanan", "quantity": 1, "unit_price": 249_000}]
        });
        let r = s
            .client
            .post(format!("http://{}/internal/invoices", s.billing))
            .bearer_auth(s.keys.issue("billing"))
            .json(&body)
            .send()
            .await?;
        let status = r.status();
        let v: Value = r.json().await?;
        match v["id"].as_str() {
            Some(id) if status.is_success() => ids.push(id.to_owned()),
            _ => bail!("creating an invoice: {status}: {v}"),
        }
    }
    Ok(ids)
}

/// The notification Midtrans sends for `order_id` as it stands at the
/// sandbox: its status answer, signed.
async fn notification(s: &Setup<'_>, order_id: &str) -> Result<Value> {
    let mut body: Value = s
        .client
        .get(format!("{}/v2/{order_id}/status", s.sandbox))
        .header("authorization", authorization(SANDBOX_SERVER_KEY))
        .header("accept", "application/json")
        .send()
        .await?
        .json()
        .await?;
    let sig = signature(
        order_id,
        body["status_code"].as_str().unwrap_or_default(),
        body["gross_amount"].as_str().unwrap_or_default(),
        SANDBOX_SERVER_KEY,
    );
    body["signature_key"] = json!(sig);
    Ok(body)
}

fn run_on(s: &Setup<'_>, name: &'static str, database_url: Option<&str>) -> Result<DbRun> {
    let n: usize = env_num("PAYMENTS", 1000)?;
    let callers: usize = env_num("CALLERS", 8)?;
    let env_of = |k: &'static str, v: String| (k, v);
    let mut env = vec![
        env_of("TIERGATE_BILLING_URL", format!("http://{}", s.billing)),
        env_of("TIERGATE_USERS_URL", format!("http://{}", s.users)),
        env_of(
            "TIERGATE_MIDTRANS_SERVER_KEY",
            SANDBOX_SERVER_KEY.to_owned(),
        ),
        env_of(
            "TIERGATE_MIDTRANS_CLIENT_KEY",
            SANDBOX_CLIENT_KEY.to_owned(),
        ),
        env_of("TIERGATE_MIDTRANS_API_URL", s.sandbox.to_owned()),
        env_of("TIERGATE_MIDTRANS_SNAP_URL", s.sandbox.to_owned()),
        env_of("RUST_LOG", "warn".to_owned()),
    ];
    if let Some(url) = database_url {
        env.push(env_of("TIERGATE_PAYMENTS_DATABASE_URL", url.to_owned()));
    }
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    eprintln!("{name}: starting payments on {}", s.payments);
    let mut payments = services::serve(s.dir, "payments", s.payments, &env)?;
    eprintln!("{name}: {n} invoices");
    let ids = s.rt.block_on(invoices(s, name, n))?;

    eprintln!("{name}: POST /api/payments, {callers} callers, {n} payments");
    let charges_before = s.rt.block_on(Leg::read(s.client, s.payments, "charge"))?;
    let pay = {
        let (client, url, token) = (
            s.client.clone(),
            format!("http://{}/api/payments", s.gw),
            s.token.to_owned(),
        );
        move |invoice: Value| {
            client
                .post(&url)
                .bearer_auth(&token)
                .header("idempotency-key", uuid::Uuid::new_v4().to_string())
                .json(&json!({"invoice_id": invoice, "method": "bca_va"}))
                .send()
        }
    };
    let started = Instant::now();
    let (create, made) = s.rt.block_on(closed_loop(
        callers,
        ids.iter().map(|id| json!(id)).collect(),
        pay,
    ))?;
    let create_secs = started.elapsed().as_secs_f64();
    if let Some(e) = &create.first_error {
        bail!("POST /api/payments failed: {e}");
    }
    let charge_leg =
        s.rt.block_on(Leg::read(s.client, s.payments, "charge"))?
            .since(&charges_before);

    // The orders, paid at the sandbox without a notification.
    let bodies = s.rt.block_on(async {
        let mut bodies = Vec::with_capacity(made.len());
        for p in made.iter().filter(|p| p["status"] == "pending") {
            let order = p["order_id"]
                .as_str()
                .ok_or_else(|| anyhow!("no order_id in {p}"))?;
            sandbox::act(s.sandbox, order, "pay", false, false, None)
                .await
                .map_err(|e| anyhow!(e))?;
            bodies.push(notification(s, order).await?);
        }
        Ok::<_, anyhow::Error>(bodies)
    })?;
    if bodies.len() != n {
        bail!("{} pending payments made, {n} expected", bodies.len());
    }
    let notify = {
        let (client, url) = (
            s.client.clone(),
            format!("http://{}/api/payments/webhooks/midtrans", s.gw),
        );
        move |body: Value| client.post(&url).json(&body).send()
    };
    eprintln!("{name}: {n} notifications that settle, then {n} duplicates");
    let status_before = s.rt.block_on(Leg::read(s.client, s.payments, "status"))?;
    let started = Instant::now();
    let (first, seen) =
        s.rt.block_on(closed_loop(callers, bodies.clone(), notify.clone()))?;
    let first_secs = started.elapsed().as_secs_f64();
    let status_leg =
        s.rt.block_on(Leg::read(s.client, s.payments, "status"))?
            .since(&status_before);
    let started = Instant::now();
    let (duplicate, _) = s.rt.block_on(closed_loop(callers, bodies, notify))?;
    let duplicate_secs = started.elapsed().as_secs_f64();
    if let Some(e) = first
        .first_error
        .as_ref()
        .or(duplicate.first_error.as_ref())
    {
        bail!("a notification failed: {e}");
    }

    let settled = s.rt.block_on(async {
        let text = s
            .client
            .get(format!("http://{}/metrics", s.payments))
            .send()
            .await?
            .text()
            .await?;
        Ok::<_, anyhow::Error>(
            text.lines()
                .find(|l| l.starts_with("payments_transitions_total{state=\"settled\""))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0),
        )
    })?;
    if settled as usize != n {
        let text = s.rt.block_on(async {
            s.client
                .get(format!("http://{}/metrics", s.payments))
                .send()
                .await?
                .text()
                .await
        })?;
        let ours: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("payments_"))
            .collect();
        bail!(
            "{settled} payments settled, {n} expected: {}; an answer: {:?}",
            ours.join("\n"),
            seen.first()
        );
    }
    payments.alive()?;
    Ok(DbRun {
        name,
        create,
        create_secs,
        charge_leg,
        first,
        first_secs,
        duplicate,
        duplicate_secs,
        status_leg,
    })
}

fn main() -> Result<()> {
    let threads: usize = env_num("GATEWAY_THREADS", 1)?;
    let dir = TempDir::new("tg-payments-bench")?;
    let (users_addr, billing_addr, payments_addr, gw_addr) =
        (free_addr()?, free_addr()?, free_addr()?, free_addr()?);
    let sandbox = sandbox::start(SandboxConfig {
        listen: free_addr()?,
        ..Default::default()
    })?;
    eprintln!("the Midtrans sandbox on {}", sandbox.addr);
    eprintln!("starting users on {users_addr}, billing on {billing_addr}");
    let (mut users, _mail) = services::serve_users(&dir.0, users_addr)?;
    let users_url = format!("http://{users_addr}");
    let mut billing = services::serve(
        &dir.0,
        "billing",
        billing_addr,
        &[
            ("TIERGATE_USERS_URL", users_url.as_str()),
            ("RUST_LOG", "warn"),
        ],
    )?;
    eprintln!("starting the gateway on {gw_addr}");
    let mut gateway = services::bench_gateway(
        &dir.0,
        gw_addr,
        threads,
        &[
            ("users", users_addr),
            ("billing", billing_addr),
            ("payments", payments_addr),
        ],
        &[("/api/payments/webhooks", "payments")],
    )?;
    let (rt, client) = services::client_runtime()?;
    let base = format!("http://{gw_addr}");
    let token = rt.block_on(services::signed_up(
        &client,
        &base,
        &dir.0.join("mail"),
        EMAIL,
        PASSWORD,
    ))?;
    let user = rt.block_on(services::user_id(&client, &base, &token))?;
    let keys = ServiceKeys::load(&KeySource::development("subscriptions", &dir.0))
        .map_err(|e| anyhow!(e))?;
    let base_sandbox = sandbox.base();
    let setup = Setup {
        rt: &rt,
        client: &client,
        dir: &dir.0,
        sandbox: &base_sandbox,
        users: users_addr,
        billing: billing_addr,
        payments: payments_addr,
        gw: gw_addr,
        user: &user,
        token: &token,
        keys: &keys,
    };
    let mut runs = vec![run_on(&setup, "SQLite", None)?];
    let pg = rt.block_on(services::postgres_database("tg_bench_payments"));
    match &pg {
        Some(url) => runs.push(run_on(&setup, "PostgreSQL", Some(url))?),
        None => eprintln!("PostgreSQL does not answer: SQLite only"),
    }
    users.alive()?;
    billing.alive()?;
    gateway.alive()?;

    println!();
    println!(
        "Settings: {} payments, {} callers in a closed loop, through the gateway ({threads} \
         thread(s), Redis-shared limits: {}); users and billing on SQLite; the sandbox in the \
         bench process; {} CPUs.",
        env_num("PAYMENTS", 1000usize)?,
        env_num("CALLERS", 8usize)?,
        services::redis_running(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    println!("| measurement | per s | p50 ms | p99 ms | p99.9 ms | non-2xx | errors |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in &runs {
        let rate = |f: &FixedResult, secs: f64| f.latencies_ns.len() as f64 / secs;
        row(
            &format!("{}: POST /api/payments (bca_va)", r.name),
            &r.create,
            rate(&r.create, r.create_secs),
        );
        row(
            &format!("{}: webhook, first delivery (settles)", r.name),
            &r.first,
            rate(&r.first, r.first_secs),
        );
        row(
            &format!("{}: webhook, duplicate (no move)", r.name),
            &r.duplicate,
            rate(&r.duplicate, r.duplicate_secs),
        );
    }
    println!();
    println!("| Midtrans leg (service histogram) | calls | mean ms | p99 bucket ≤ ms | POST /api/payments p99 minus the mean leg, ms |");
    println!("|---|---:|---:|---:|---:|");
    for r in &runs {
        let (calls, mean, p99) = r.charge_leg;
        println!(
            "| {}: charge | {calls:.0} | {mean:.2} | {p99} | {:.2} |",
            r.name,
            r.create.pct_ms(0.99) - mean
        );
        let (calls, mean, p99) = r.status_leg;
        println!(
            "| {}: status (first deliveries) | {calls:.0} | {mean:.2} | {p99} | |",
            r.name
        );
    }
    if let Some(url) = pg {
        rt.block_on(services::drop_database(&url));
    }
    rt.block_on(sandbox.stop());
    Ok(())
}
