//! Notifications-service benchmark (issue 20), loopback only, real
//! binaries: `tiergate serve notifications` (SQLite, then PostgreSQL when
//! it answers at `TIERGATE_TEST_POSTGRES`, default
//! `postgres://postgres@127.0.0.1:5432`) and the Telegram Bot API and
//! Twilio stand-ins (`notifications::standin`, the ones the tests use) in
//! this process.
//!
//! Each run starts a fresh service, writes `USERS` recipients straight
//! into its database (their channel, and for Telegram the chat linked to
//! the default bot, as `/start` would have left it: linking is measured
//! by the tests, not here), then sends one `subscription.activated` event
//! per user to `POST /internal/events`, signed as the subscriptions
//! service, from `CALLERS` callers in a closed loop. Measured:
//!
//! - **intake**: events/s and the consumer's latency (the event recorded
//!   once and its job planned in one transaction);
//! - **delivery**: jobs/s from the first event to the last message the
//!   provider received, and each message's **event → provider** latency
//!   (the stand-in's arrival time minus the moment its event was sent):
//!   under a burst this is mostly time queued.
//!
//! Runs: e-mail into the development file sink, Telegram with rate
//! shaping off (`per_bot_rate: 0`, `per_chat_interval: 0s`), SMS to the
//! Twilio stand-in (signed delivery reports back), and Telegram with the
//! default shaping (30 messages/s per bot) on `SHAPED` users, whose rate
//! must come out at 30/s.
//!
//! `cargo bench --bench notifications`. Environment: `USERS` (1000),
//! `SHAPED` (300), `CALLERS` (8).

mod support;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use backend_common::clock::system_now_ms;
use backend_common::service_auth::{KeySource, ServiceKeys};
use notifications::standin::{TelegramStandin, TwilioStandin};
use serde_json::{json, Value};
use support::fixed::FixedResult;
use support::services::{self, env_num, free_addr, TempDir};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BOT_TOKEN: &str = "7100000001:AAbenchbenchbenchbenchbenchbenchbe";
const TWILIO_SID: &str = "AC00000000000000000000000000000bench";
const TWILIO_TOKEN: &str = "bench-twilio-auth-token";
const FIRST_CHAT: i64 = 500_000;

#[derive(Clone, Copy, PartialEq)]
enum Channel {
    Email,
    Telegram { shaped: bool },
    Sms,
}

impl Channel {
    fn name(self) -> &'static str {
        match self {
            Channel::Email => "e-mail (file sink)",
            Channel::Telegram { shaped: false } => "Telegram, shaping off",
            Channel::Telegram { shaped: true } => "Telegram, 30/s per bot",
            Channel::Sms => "SMS (Twilio)",
        }
    }
}

struct Run {
    name: String,
    users: usize,
    intake: FixedResult,
    intake_secs: f64,
    /// Seconds from the first event sent to the last message received.
    drain_secs: f64,
    /// Event → provider latencies, ms, sorted.
    latency_ms: Vec<f64>,
}

struct Providers {
    tg: TelegramStandin,
    tw: TwilioStandin,
}

/// The moment (Unix ms) each of `n` users' messages reached the provider,
/// by user index, once all have (60 s + 1 s per 10 messages at most).
/// The stand-ins live across runs: messages before `since` (Unix ms) are
/// an earlier run's.
async fn arrivals(
    p: &Providers,
    dir: &Path,
    channel: Channel,
    n: usize,
    since: i64,
) -> Result<Vec<i64>> {
    let deadline = Instant::now() + Duration::from_secs(60 + n as u64 / 10);
    loop {
        let mut at = vec![0i64; n];
        let mut seen = 0;
        match channel {
            Channel::Telegram { .. } => {
                for m in p.tg.messages() {
                    let (Some(chat), Some(t)) = (m["chat_id"].as_i64(), m["at_ms"].as_i64()) else {
                        continue;
                    };
                    let i = usize::try_from(chat - FIRST_CHAT).unwrap_or(usize::MAX);
                    let premium = m["text"].as_str().is_some_and(|s| s.contains("PREMIUM"));
                    if i < n && premium && at[i] == 0 && t >= since {
                        at[i] = t;
                        seen += 1;
                    }
                }
            }
            Channel::Sms => {
                for m in p.tw.messages() {
                    let (Some(to), Some(t)) = (m["to"].as_str(), m["at_ms"].as_i64()) else {
                        continue;
                    };
                    let i = to
                        .strip_prefix("+62811")
                        .and_then(|s| s.parse::<usize>().ok())
                        .unwrap_or(usize::MAX);
                    if i < n && m["sid"].is_string() && at[i] == 0 && t >= since {
                        at[i] = t;
                        seen += 1;
                    }
                }
            }
            Channel::Email => {
                for e in std::fs::read_dir(dir.join("mail"))?.flatten() {
                    let name = e.file_name();
                    if !name.to_string_lossy().ends_with(".eml") {
                        continue;
                    }
                    let text = std::fs::read_to_string(e.path())?;
                    let Some(i) = text
                        .split("bench-user-")
                        .nth(1)
                        .and_then(|s| s.split('@').next())
                        .and_then(|s| s.parse::<usize>().ok())
                    else {
                        continue;
                    };
                    let modified = e.metadata()?.modified()?;
                    let t = modified.duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64;
                    if i < n && at[i] == 0 {
                        at[i] = t;
                        seen += 1;
                    }
                }
            }
        }
        if seen == n {
            return Ok(at);
        }
        if Instant::now() > deadline {
            bail!(
                "{}: {seen} of {n} messages reached the provider",
                channel.name()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The recipients (and Telegram links) of `n` users, as the service
/// keeps them.
async fn fixtures(database_url: &str, channel: Channel, n: usize) -> Result<()> {
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(database_url).await?;
    let now = system_now_ms();
    let channels = match channel {
        Channel::Email => "email",
        Channel::Telegram { .. } => "telegram,email",
        Channel::Sms => "sms,email",
    };
    for i in 0..n {
        let mut tx = pool.begin().await?;
        sqlx::query(
            "INSERT INTO recipients (user_id, email, name, phone, channels, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(format!("bench-user-{i}"))
        .bind(format!("bench-user-{i}@example.com"))
        .bind(format!("Bench {i}"))
        .bind(format!("+62811{i:07}"))
        .bind(channels)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if let Channel::Telegram { .. } = channel {
            sqlx::query(
                "INSERT INTO telegram_links (bot_id, user_id, chat_id, linked_at) \
                 VALUES ('default', $1, $2, $3)",
            )
            .bind(format!("bench-user-{i}"))
            .bind(FIRST_CHAT + i as i64)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
    }
    pool.close().await;
    Ok(())
}

fn run(
    rt: &tokio::runtime::Runtime,
    client: &reqwest::Client,
    p: &Providers,
    root: &Path,
    db: (&'static str, Option<&str>),
    channel: Channel,
    n: usize,
) -> Result<Run> {
    let callers: usize = env_num("CALLERS", 8)?;
    let (db_name, pg_url) = db;
    let dir = root.join(format!(
        "{}-{}",
        db_name,
        channel.name().replace([' ', ',', '(', ')', '/'], "")
    ));
    std::fs::create_dir_all(dir.join("conf"))?;
    let shaping = match channel {
        Channel::Telegram { shaped: true } => "",
        _ => "    telegram: { per_bot_rate: 0, per_chat_interval: 0s }\n",
    };
    std::fs::write(
        dir.join("conf/services.yaml"),
        format!("services:\n  notifications:\n{shaping}    queue: {{ concurrency: 16 }}\n"),
    )?;
    let addr = free_addr()?;
    let base = format!("http://{addr}");
    let (tg, tw) = (p.tg.base(), p.tw.base());
    let mut env = vec![("TIERGATE_PUBLIC_URL", base.as_str()), ("RUST_LOG", "warn")];
    match channel {
        Channel::Telegram { .. } => env.extend([
            ("TIERGATE_TELEGRAM_API_URL", tg.as_str()),
            ("TIERGATE_TELEGRAM_BOT_TOKEN", BOT_TOKEN),
        ]),
        Channel::Sms => env.extend([
            ("TIERGATE_TWILIO_API_URL", tw.as_str()),
            ("TIERGATE_TWILIO_ACCOUNT_SID", TWILIO_SID),
            ("TIERGATE_TWILIO_AUTH_TOKEN", TWILIO_TOKEN),
            ("TIERGATE_TWILIO_FROM", "+15005550006"),
        ]),
        Channel::Email => {}
    }
    let sqlite_url = format!("sqlite://{}", dir.join("notifications.db").display());
    let database_url = pg_url.unwrap_or(&sqlite_url);
    if let Some(url) = pg_url {
        env.push(("TIERGATE_NOTIFICATIONS_DATABASE_URL", url));
    }
    eprintln!("{db_name}, {}: {n} users", channel.name());
    let mut service = services::serve(&dir, "notifications", addr, &env)?;
    rt.block_on(fixtures(database_url, channel, n))?;
    if let Channel::Telegram { .. } = channel {
        rt.block_on(async {
            for i in 0..n {
                p.tg.user_writes(BOT_TOKEN, FIRST_CHAT + i as i64, "hi")
                    .await;
            }
            // The bot is ready once it answered getMe: a link code then.
            let deadline = Instant::now() + Duration::from_secs(20);
            while !p.tg.calls().iter().any(|c| c["method"] == "getUpdates") {
                if Instant::now() > deadline {
                    bail!("the service never polled the bot");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(())
        })?;
    }
    let keys = ServiceKeys::load(&KeySource::development("subscriptions", &dir))
        .map_err(|e| anyhow!(e))?;
    let keys = Arc::new(keys);
    let next = Arc::new(AtomicUsize::new(0));
    let sent_at = Arc::new(std::sync::Mutex::new(vec![0i64; n]));
    let url = format!("{base}/internal/events");
    let started = system_now_ms();
    let t0 = Instant::now();
    let intake = rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..callers {
            let (keys, next, sent_at) = (keys.clone(), next.clone(), sent_at.clone());
            let (client, url) = (client.clone(), url.clone());
            set.spawn(async move {
                let mut res = FixedResult::default();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let now = system_now_ms();
                    let user = format!("bench-user-{i}");
                    let event = json!({"id": format!("bench-{i}"), "type": "subscription.activated",
                        "source": "subscriptions", "occurred_at": now,
                        "data": {"user_id": user, "subject": {"kind": "user", "id": user},
                            "subscription_id": format!("s-{i}"), "tier": "PREMIUM", "plan": "PREMIUM",
                            "period_start": now, "period_end": now + 30 * 86_400_000i64}});
                    sent_at.lock().unwrap_or_else(|p| p.into_inner())[i] = now;
                    let t = Instant::now();
                    let r = client
                        .post(&url)
                        .bearer_auth(keys.issue("notifications"))
                        .json(&event)
                        .send()
                        .await;
                    if let Some(body) = services::record(&mut res, r, t, |s| s.is_success()).await {
                        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        if v["status"] != "applied" {
                            res.first_error.get_or_insert(format!("not applied: {v}"));
                        }
                    }
                }
                Ok::<_, anyhow::Error>(res)
            });
        }
        services::collect(set, "event").await
    })?;
    let intake_secs = t0.elapsed().as_secs_f64();
    if let Some(e) = &intake.first_error {
        bail!("{}: {e}", channel.name());
    }
    let at = rt.block_on(arrivals(p, &dir, channel, n, started))?;
    service.alive()?;
    let sent_at = sent_at.lock().unwrap_or_else(|p| p.into_inner());
    let mut latency_ms: Vec<f64> = at
        .iter()
        .zip(sent_at.iter())
        .map(|(a, s)| (a - s) as f64)
        .collect();
    latency_ms.sort_by(f64::total_cmp);
    let last = at.iter().copied().max().unwrap_or(started);
    Ok(Run {
        name: format!("{db_name}: {}", channel.name()),
        users: n,
        intake,
        intake_secs,
        drain_secs: (last - started) as f64 / 1e3,
        latency_ms,
    })
}

fn pct(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

fn main() -> Result<()> {
    let n: usize = env_num("USERS", 1000)?;
    let shaped: usize = env_num("SHAPED", 300)?;
    let root = TempDir::new("tg-bench-notifications")?;
    let (rt, client) = services::client_runtime()?;
    let tg = TelegramStandin::start("127.0.0.1:0".parse()?)?;
    tg.add_bot(BOT_TOKEN, "BenchBot");
    let tw = TwilioStandin::start("127.0.0.1:0".parse()?, TWILIO_SID, TWILIO_TOKEN)?;
    let p = Providers { tg, tw };
    let postgres = match rt.block_on(services::postgres_database("tg_bench_notifications")) {
        Some(url) => {
            rt.block_on(services::drop_database(&url));
            true
        }
        None => {
            eprintln!("PostgreSQL does not answer: SQLite only");
            false
        }
    };
    let mut runs = Vec::new();
    for db in ["SQLite", "PostgreSQL"] {
        if db == "PostgreSQL" && !postgres {
            continue;
        }
        for channel in [
            Channel::Email,
            Channel::Telegram { shaped: false },
            Channel::Sms,
        ] {
            // A fresh database for every run.
            let url = match db {
                "PostgreSQL" => rt.block_on(services::postgres_database(&format!(
                    "tg_bench_notifications_{}",
                    runs.len()
                ))),
                _ => None,
            };
            runs.push(run(
                &rt,
                &client,
                &p,
                &root.0,
                (db, url.as_deref()),
                channel,
                n,
            )?);
            if let Some(url) = url {
                rt.block_on(services::drop_database(&url));
            }
        }
    }
    runs.push(run(
        &rt,
        &client,
        &p,
        &root.0,
        ("SQLite", None),
        Channel::Telegram { shaped: true },
        shaped,
    )?);

    println!();
    println!(
        "Settings: {n} users ({shaped} for the shaped run), one subscription.activated event \
         each from {} callers in a closed loop to POST /internal/events; queue concurrency 16; \
         the stand-ins in the bench process; {} CPUs.",
        env_num("CALLERS", 8usize)?,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    println!("| run | events/s in | intake p50 ms | intake p99 ms | jobs/s out (first event → last message) | event → provider p50 ms | p99 ms | max ms |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in &runs {
        println!(
            "| {} | {:.0} | {:.2} | {:.2} | {:.0} | {:.0} | {:.0} | {:.0} |",
            r.name,
            r.intake.latencies_ns.len() as f64 / r.intake_secs,
            r.intake.pct_ms(0.5),
            r.intake.pct_ms(0.99),
            r.users as f64 / r.drain_secs,
            pct(&r.latency_ms, 0.5),
            pct(&r.latency_ms, 0.99),
            pct(&r.latency_ms, 1.0),
        );
    }
    rt.block_on(async {
        p.tg.stop().await;
        p.tw.stop().await;
    });
    Ok(())
}
