//! The business loop's timing (issue 21): `tiergate up --sandbox` (the
//! release binary, SQLite, in a copy of the checkout's `conf/` with the
//! anonymous limits raised so many sign-ups fit in a minute), then `RUNS`
//! customers, one after the other, each through the gateway: register,
//! verify from the mail, log in, check out PREMIUM monthly, pay by BCA VA,
//! `sandbox pay` (answered once the webhook was delivered), then
//!
//! * **pay → PREMIUM**: from the sandbox's answer until a request with the
//!   token from before the payment is admitted on PREMIUM's limits
//!   (`x-ratelimit-limit: 200`), polled every 2 ms;
//! * **loop**: from the registration until the payment's confirmation
//!   mail ("Pembayaran diterima") is in the mailbox.
//!
//! `cargo bench --bench business_loop`. Environment: `RUNS` (50). It binds
//! the standard ports of `tiergate up` (8000, 8021–8025, 8029, 8090):
//! nothing else may run there.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use support::services::{self, env_num, tiergate_bin, Proc, TempDir};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BASE: &str = "http://127.0.0.1:8000";
const PASSWORD: &str = "correct horse 9";

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// `up --sandbox` in `dir` with the shipped config, anonymous limits
/// raised.
fn start(dir: &Path) -> Result<Proc> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::create_dir_all(dir.join("conf"))?;
    for name in ["services.yaml", "tiergate.yaml"] {
        let text = std::fs::read_to_string(root.join("conf").join(name))?;
        let text = text.replace(
            "anonymous: { per_minute: 30, per_hour: 300, per_day: 3000 }",
            "anonymous: { per_minute: 100000, per_hour: 1000000, per_day: 10000000 }",
        );
        std::fs::write(dir.join("conf").join(name), text)?;
    }
    let child = std::process::Command::new(tiergate_bin())
        .args(["up", "--sandbox"])
        .current_dir(dir)
        .env("RUST_LOG", "warn")
        .env_remove("TIERGATE_REDIS_URL")
        .env_remove("TIERGATE_SMTP_URL")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("up.log"))?)
        .spawn()
        .context("tiergate up --sandbox")?;
    let mut p = Proc(child, "up");
    p.wait_listening("127.0.0.1:8000".parse()?)?;
    p.wait_listening("127.0.0.1:8029".parse()?)?;
    Ok(p)
}

/// `POST path` with a token and an idempotency key; the JSON answer.
async fn keyed(
    client: &reqwest::Client,
    path: &str,
    token: &str,
    key: &str,
    body: serde_json::Value,
) -> Result<serde_json::Value> {
    let r = client
        .post(format!("{BASE}{path}"))
        .bearer_auth(token)
        .header("idempotency-key", key)
        .json(&body)
        .send()
        .await?;
    let status = r.status();
    let v: serde_json::Value = r.json().await.unwrap_or_default();
    if !status.is_success() {
        bail!("{path}: {status}: {v}");
    }
    Ok(v)
}

/// The limit a request as `token` is admitted with.
async fn limit(client: &reqwest::Client, token: &str) -> Result<u64> {
    let r = client
        .get(format!("{BASE}/api/users/me"))
        .bearer_auth(token)
        .send()
        .await?;
    Ok(r.headers()
        .get("x-ratelimit-limit")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0))
}

struct Timing {
    pay_to_premium_ms: f64,
    loop_ms: f64,
}

async fn customer(client: &reqwest::Client, mail_dir: &Path, i: usize) -> Result<Timing> {
    let email = format!("loop{i}@example.com");
    let started = Instant::now();
    let token = services::signed_up(client, BASE, mail_dir, &email, PASSWORD).await?;
    let checkout = keyed(
        client,
        "/api/subscriptions/checkout",
        &token,
        &format!("checkout-{i}"),
        serde_json::json!({"plan": "PREMIUM", "cycle": "monthly"}),
    )
    .await?;
    let invoice = checkout["invoice"]["id"]
        .as_str()
        .ok_or_else(|| anyhow!("no invoice in {checkout}"))?;
    let payment = keyed(
        client,
        "/api/payments",
        &token,
        &format!("pay-{i}"),
        serde_json::json!({"invoice_id": invoice, "method": "bca_va"}),
    )
    .await?;
    let order = payment["order_id"]
        .as_str()
        .ok_or_else(|| anyhow!("no order id in {payment}"))?;
    payments::sandbox::act("http://127.0.0.1:8029", order, "pay", false, false, None)
        .await
        .map_err(|e| anyhow!(e))?;
    let paid = Instant::now();
    let deadline = paid + Duration::from_secs(30);
    while limit(client, &token).await? != 200 {
        if Instant::now() > deadline {
            bail!("{email}: still not on PREMIUM limits 30 s after paying");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let pay_to_premium = paid.elapsed();
    let filter = notifications::mailbox::Filter {
        to: Some(email.clone()),
        subject: Some("Pembayaran diterima".into()),
    };
    loop {
        if notifications::mailbox::newest(mail_dir, &filter)
            .map_err(|e| anyhow!(e))?
            .is_some()
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("{email}: no payment confirmation mail");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(Timing {
        pay_to_premium_ms: pay_to_premium.as_secs_f64() * 1e3,
        loop_ms: started.elapsed().as_secs_f64() * 1e3,
    })
}

fn main() -> Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let runs: usize = env_num("RUNS", 50)?;
    let dir = TempDir::new("loop-bench")?;
    let mut up = start(&dir.0)?;
    let (runtime, client) = services::client_runtime()?;
    let mail_dir = dir.0.join("data/mail");
    let mut timings = Vec::with_capacity(runs);
    for i in 0..runs {
        up.alive()?;
        let t = runtime
            .block_on(customer(&client, &mail_dir, i))
            .with_context(|| format!("customer {i}; log in {}", dir.0.join("up.log").display()))?;
        timings.push(t);
    }
    let mut pay: Vec<f64> = timings.iter().map(|t| t.pay_to_premium_ms).collect();
    let mut whole: Vec<f64> = timings.iter().map(|t| t.loop_ms).collect();
    pay.sort_by(f64::total_cmp);
    whole.sort_by(f64::total_cmp);
    println!("business loop, {runs} customers one after the other (tiergate up --sandbox, SQLite)");
    println!(
        "{:<36} {:>9} {:>9} {:>9} {:>9}",
        "", "p50 ms", "p99 ms", "min ms", "max ms"
    );
    for (name, v) in [
        ("sandbox pay -> first PREMIUM request", &pay),
        ("register -> payment confirmation mail", &whole),
    ] {
        println!(
            "{name:<36} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
            percentile(v, 0.5),
            percentile(v, 0.99),
            v[0],
            v[v.len() - 1]
        );
    }
    Ok(())
}
