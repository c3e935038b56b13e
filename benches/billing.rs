//! Billing-service benchmark (issue 17), loopback only, real binaries:
//! `tiergate serve users`, `tiergate serve billing` (SQLite, then
//! PostgreSQL when it answers at `TIERGATE_TEST_POSTGRES`, default
//! `postgres://postgres@127.0.0.1:5432`) and `tiergate gateway` in front.
//!
//! 1. **Issue throughput**: `ISSUE_CONCURRENCY` callers in a closed loop,
//!    each `POST /internal/invoices` (as the subscriptions service) with a
//!    fresh reference: one transaction inserts the invoice and its lines,
//!    takes the year's number, writes `invoice.issued` to the outbox; the
//!    buyer is read from the users service first. Invoices/s and latency.
//! 2. **`GET /api/billing/invoices`** (a page of 20 with lines, of 40
//!    invoices whose PDFs are rendered first) at a fixed rate, open loop,
//!    through the gateway (JWT verified, limits, access log) and straight
//!    to the service: p50/p99/p99.9. Measured before the issue run, whose
//!    PDFs the background renderer keeps rendering afterwards.
//! 3. **PDF render time** in this process (`billing::pdf::render`, the
//!    renderer the service runs in `spawn_blocking`): a 3-line invoice and
//!    a 60-line one (two pages), p50/p99 over `PDF_RENDERS` renders each.
//!
//! `cargo bench --bench billing`. Environment: `ISSUE_CONCURRENCY` (8),
//! `ISSUE_DURATION` (s, 10), `LIST_RATE` (req/s, 200), `LIST_CONNECTIONS`
//! (8), `LIST_DURATION` (s, 10), `PDF_RENDERS` (200), `GATEWAY_THREADS` (1).

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use backend_common::service_auth::{KeySource, ServiceKeys};
use support::fixed::{self, FixedResult};
use support::services::{self, env_num, free_addr, get_request, row, TempDir};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const PASSWORD: &str = "correct horse 9";
const EMAIL: &str = "bench@example.com";

/// A renewal invoice of `user` with a unique reference.
fn invoice_body(user: &str, n: u64) -> serde_json::Value {
    serde_json::json!({
        "reference": {"kind": "bench", "run": std::process::id(), "n": n},
        "subject": {"kind": "user", "id": user},
        "user_id": user,
        "plan": "PREMIUM", "cycle": "monthly",
        "lines": [
            {"description": "PREMIUM, bulanan", "quantity": 1, "unit_price": 249_000},
            {"description": "Kuota tambahan 100.000 permintaan", "quantity": 2, "unit_price": 50_000},
            {"description": "Kredit sisa periode BASIC", "quantity": 1, "unit_price": -33_000}
        ]
    })
}

/// Closed-loop invoice creation for `dur`: the latencies of the 201s.
async fn issue_loop(
    billing: SocketAddr,
    keys: ServiceKeys,
    user: String,
    callers: usize,
    dur: Duration,
    first: u64,
) -> Result<FixedResult> {
    let client = reqwest::Client::builder().no_proxy().build()?;
    let url = format!("http://{billing}/internal/invoices");
    let end = tokio::time::Instant::now() + dur;
    let mut set = tokio::task::JoinSet::new();
    for c in 0..callers {
        let (client, url, keys, user) = (client.clone(), url.clone(), keys.clone(), user.clone());
        set.spawn(async move {
            let mut res = FixedResult::default();
            let mut n = first + (c as u64) * 1_000_000_000;
            while tokio::time::Instant::now() < end {
                n += 1;
                let t0 = Instant::now();
                let sent = client
                    .post(&url)
                    .bearer_auth(keys.issue("billing"))
                    .json(&invoice_body(&user, n))
                    .send()
                    .await;
                services::record(&mut res, sent, t0, |s| s == reqwest::StatusCode::CREATED).await;
            }
            Ok::<_, anyhow::Error>(res)
        });
    }
    services::collect(set, "issue").await
}

/// p50/p99 in ms of `n` renders of `sheet`.
fn render_times(sheet: &billing::pdf::Sheet, n: usize) -> Result<(f64, f64, usize)> {
    let mut ns = Vec::with_capacity(n);
    let mut bytes = 0;
    for _ in 0..n {
        let t0 = Instant::now();
        let pdf = billing::pdf::render(sheet).map_err(|e| anyhow!("{e}"))?;
        ns.push(t0.elapsed().as_nanos() as u64);
        bytes = pdf.len();
    }
    ns.sort_unstable();
    let pct = |p: f64| ns[((ns.len() - 1) as f64 * p).round() as usize] as f64 / 1e6;
    Ok((pct(0.5), pct(0.99), bytes))
}

fn sheet(lines: usize) -> billing::pdf::Sheet {
    use billing::pdf::{Row, Sheet, Stamp};
    Sheet {
        title: "FAKTUR".to_owned(),
        seller: vec![
            "PT Tiergate Teknologi Indonesia".to_owned(),
            "Jl. Jenderal Sudirman Kav. 52-53".to_owned(),
            "Jakarta Selatan 12190".to_owned(),
            "NPWP 0000000000000000".to_owned(),
        ],
        buyer: vec![
            "PT Acme Indonesia (u.p. Budi Santoso)".to_owned(),
            "NPWP 0012345678901000".to_owned(),
            "Jl. Sudirman 1, Jakarta".to_owned(),
            "budi@acme.co.id".to_owned(),
        ],
        facts: vec![
            ("Nomor".to_owned(), "INV/2026/12/000123".to_owned()),
            ("Tanggal".to_owned(), "2 Desember 2026".to_owned()),
            ("Jatuh tempo".to_owned(), "9 Desember 2026".to_owned()),
            ("Status".to_owned(), "Lunas".to_owned()),
        ],
        rows: (0..lines)
            .map(|i| Row {
                description: format!("Konsultasi integrasi API, sesi {}", i + 1),
                quantity: "1".to_owned(),
                unit_price: "Rp 150.000".to_owned(),
                amount: "Rp 150.000".to_owned(),
            })
            .collect(),
        totals: vec![
            ("Subtotal".to_owned(), "Rp 450.000".to_owned()),
            ("DPP (11/12)".to_owned(), "Rp 412.500".to_owned()),
            ("PPN 12%".to_owned(), "Rp 49.500".to_owned()),
            ("Total".to_owned(), "Rp 499.500".to_owned()),
        ],
        notes: vec!["Dibayar dengan BCA Virtual Account pada 2 Desember 2026.".to_owned()],
        stamp: Stamp::Paid,
        pdf_title: "INV/2026/12/000123".to_owned(),
    }
}

struct DbRun {
    name: &'static str,
    issue: FixedResult,
    issue_secs: f64,
    via_gateway: FixedResult,
    direct: FixedResult,
}

#[allow(clippy::too_many_arguments)]
fn run_on(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    name: &'static str,
    database_url: Option<&str>,
    addrs: (SocketAddr, SocketAddr, SocketAddr),
    user: &str,
    token: &str,
    keys: &ServiceKeys,
) -> Result<DbRun> {
    let (users, billing_addr, gw) = addrs;
    let callers: usize = env_num("ISSUE_CONCURRENCY", 8)?;
    let issue_secs: u64 = env_num("ISSUE_DURATION", 10)?;
    let rate: u32 = env_num("LIST_RATE", 200)?;
    let conns: usize = env_num("LIST_CONNECTIONS", 8)?;
    let list_secs: u64 = env_num("LIST_DURATION", 10)?;
    let users_url = format!("http://{users}");
    let mut env = vec![
        ("TIERGATE_USERS_URL", users_url.as_str()),
        ("RUST_LOG", "warn"),
    ];
    if let Some(url) = database_url {
        env.push(("TIERGATE_BILLING_DATABASE_URL", url));
    }
    eprintln!("{name}: starting billing on {billing_addr}");
    let mut billing = services::serve(dir, "billing", billing_addr, &env)?;
    // 40 invoices for the page, and their PDFs rendered before the page
    // is measured (the renderer shares the 2 cores).
    eprintln!("{name}: 40 invoices for the list");
    rt.block_on(async {
        let client = reqwest::Client::builder().no_proxy().build()?;
        for n in 0..40u64 {
            let r = client
                .post(format!("http://{billing_addr}/internal/invoices"))
                .bearer_auth(keys.issue("billing"))
                .json(&invoice_body(user, n))
                .send()
                .await?;
            if !r.status().is_success() {
                return Err(anyhow!("creating an invoice: {}", r.status()));
            }
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        Ok::<_, anyhow::Error>(())
    })?;
    let dur = Duration::from_secs(list_secs);
    eprintln!("{name}: GET /api/billing/invoices at {rate} req/s for {list_secs} s, via the gateway then direct");
    let list = |addr: SocketAddr| get_request(addr, "/api/billing/invoices", token);
    rt.block_on(fixed::run(
        gw,
        list(gw),
        rate,
        conns,
        Duration::from_secs(1),
    ))?;
    let via_gateway = rt.block_on(fixed::run(gw, list(gw), rate, conns, dur))?;
    let direct = rt.block_on(fixed::run(
        billing_addr,
        list(billing_addr),
        rate,
        conns,
        dur,
    ))?;
    eprintln!("{name}: {callers} callers issuing for {issue_secs} s");
    let started = Instant::now();
    let issue = rt.block_on(issue_loop(
        billing_addr,
        keys.clone(),
        user.to_owned(),
        callers,
        Duration::from_secs(issue_secs),
        1 << 40,
    ))?;
    let issue_secs = started.elapsed().as_secs_f64();
    billing.alive()?;
    Ok(DbRun {
        name,
        issue,
        issue_secs,
        via_gateway,
        direct,
    })
}

fn main() -> Result<()> {
    let threads: usize = env_num("GATEWAY_THREADS", 1)?;
    let renders: usize = env_num("PDF_RENDERS", 200)?;
    let list_secs: u64 = env_num("LIST_DURATION", 10)?;
    let dir = TempDir::new("tg-billing-bench")?;
    let (users_addr, billing_addr, gw_addr) = (free_addr()?, free_addr()?, free_addr()?);
    eprintln!("starting the users service on {users_addr}");
    let (mut users, _mail) = services::serve_users(&dir.0, users_addr)?;
    eprintln!("starting the gateway on {gw_addr}");
    let mut gateway = services::bench_gateway(
        &dir.0,
        gw_addr,
        threads,
        &[("users", users_addr), ("billing", billing_addr)],
        &[],
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

    let mut runs = vec![run_on(
        &rt,
        &dir.0,
        "SQLite",
        None,
        (users_addr, billing_addr, gw_addr),
        &user,
        &token,
        &keys,
    )?];
    let pg = rt.block_on(services::postgres_database("tg_bench_billing"));
    match &pg {
        Some(url) => runs.push(run_on(
            &rt,
            &dir.0,
            "PostgreSQL",
            Some(url),
            (users_addr, billing_addr, gw_addr),
            &user,
            &token,
            &keys,
        )?),
        None => eprintln!("PostgreSQL does not answer: SQLite only"),
    }
    eprintln!("rendering {renders} PDFs of 3 lines and of 60 lines");
    let small = render_times(&sheet(3), renders)?;
    let large = render_times(&sheet(60), renders.div_ceil(4))?;
    users.alive()?;
    gateway.alive()?;

    println!();
    println!(
        "Settings: {} issuing callers (closed loop); GET /api/billing/invoices (20 per page) at the \
         fixed rate over keep-alive connections for {list_secs} s, open loop; gateway threads \
         {threads}; Redis-shared limits: {}; {} CPUs.",
        env_num("ISSUE_CONCURRENCY", 8usize)?,
        services::redis_running(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    println!("| measurement | per s | p50 ms | p99 ms | p99.9 ms | non-2xx | errors |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in &runs {
        row(
            &format!("{}: POST /internal/invoices (create + issue)", r.name),
            &r.issue,
            r.issue.latencies_ns.len() as f64 / r.issue_secs,
        );
        row(
            &format!("{}: GET /api/billing/invoices via gateway", r.name),
            &r.via_gateway,
            r.via_gateway.latencies_ns.len() as f64 / list_secs as f64,
        );
        row(
            &format!("{}: GET /api/billing/invoices direct", r.name),
            &r.direct,
            r.direct.latencies_ns.len() as f64 / list_secs as f64,
        );
    }
    println!();
    println!("| PDF | renders | p50 ms | p99 ms | bytes |");
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| invoice, 3 lines, 1 page | {renders} | {:.2} | {:.2} | {} |",
        small.0, small.1, small.2
    );
    println!(
        "| invoice, 60 lines, 2 pages | {} | {:.2} | {:.2} | {} |",
        renders.div_ceil(4),
        large.0,
        large.1,
        large.2
    );
    if let Some(url) = pg {
        rt.block_on(services::drop_database(&url));
    }
    Ok(())
}
