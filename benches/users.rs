//! Users-service benchmark (issue 6), loopback only, real binaries:
//!
//! * `tiergate serve users`: SQLite in a temporary data directory, the
//!   default Argon2id parameters (m = 19456 KiB, t = 2, p = 1), development
//!   mode so that the verification link is in its log;
//! * `tiergate gateway -c <yaml>`: `/api/auth` anonymous, `/api/users`
//!   with a bearer token verified against the service's JWKS (EdDSA), tier
//!   and anonymous limits far above the load, a JSON access-log line per
//!   request to a file, the admin listener on; limits shared through Redis
//!   when 127.0.0.1:6379 answers (reported).
//!
//! It registers an account through the gateway, verifies it with the link
//! from the service's log, logs in, then measures:
//! 1. `GET /api/users/me` (token check at the gateway, token check and one
//!    SQLite read at the service) at a fixed rate, open loop (the client of
//!    `benches/support`, no coordinated omission): p50/p99/p99.9 through
//!    the gateway and, for comparison, straight to the service;
//! 2. login throughput: `LOGIN_CONCURRENCY` clients in a closed loop, each
//!    `POST /api/auth/login` through the gateway (one Argon2id verify each):
//!    logins/s and latency percentiles.
//!
//! `cargo bench --bench users`. Environment: `ME_RATE` (req/s, 500),
//! `ME_CONNECTIONS` (16), `ME_DURATION` (s, 10), `LOGIN_CONCURRENCY` (4),
//! `LOGIN_DURATION` (s, 10), `GATEWAY_THREADS` (1).

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Result;
use support::fixed::{self, FixedResult};
use support::services::{self, env_num, free_addr, get_request, row, TempDir};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const PASSWORD: &str = "correct horse 9";
const EMAIL: &str = "bench@example.com";

fn post_request(addr: SocketAddr, path: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: tiergate-users-bench\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Closed-loop logins: successes and their latencies.
async fn logins(addr: SocketAddr, clients: usize, dur: Duration) -> Result<FixedResult> {
    let body = serde_json::json!({"email": EMAIL, "password": PASSWORD}).to_string();
    let req = post_request(addr, "/api/auth/login", &body);
    let end = tokio::time::Instant::now() + dur;
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let req = req.clone();
        set.spawn(async move {
            let mut res = FixedResult::default();
            let mut client = fixed::Client::connect(addr).await?;
            while tokio::time::Instant::now() < end {
                let t0 = Instant::now();
                match client.request(&req).await {
                    Ok((200, close)) => {
                        res.latencies_ns.push(t0.elapsed().as_nanos() as u64);
                        if close {
                            client = fixed::Client::connect(addr).await?;
                        }
                    }
                    Ok((status, _)) => {
                        res.non_200 += 1;
                        res.first_error.get_or_insert(format!("HTTP {status}"));
                        client = fixed::Client::connect(addr).await?;
                    }
                    Err(e) => {
                        res.errors += 1;
                        res.first_error.get_or_insert(format!("{e:#}"));
                        client = fixed::Client::connect(addr).await?;
                    }
                }
            }
            Ok::<_, anyhow::Error>(res)
        });
    }
    services::collect(set, "login").await
}

fn main() -> Result<()> {
    let rate: u32 = env_num("ME_RATE", 500)?;
    let conns: usize = env_num("ME_CONNECTIONS", 16)?;
    let me_secs: u64 = env_num("ME_DURATION", 10)?;
    let login_clients: usize = env_num("LOGIN_CONCURRENCY", 4)?;
    let login_secs: u64 = env_num("LOGIN_DURATION", 10)?;
    let threads: usize = env_num("GATEWAY_THREADS", 1)?;
    let dir = TempDir::new("tg-users-bench")?;
    let users_addr = free_addr()?;
    let gw_addr = free_addr()?;
    let mail_dir = dir.0.join("mail");

    eprintln!("starting the users service on {users_addr}");
    let (mut users, _mail) = services::serve_users(&dir.0, users_addr)?;
    let redis = services::redis_running();
    eprintln!("starting the gateway on {gw_addr} (Redis-shared limits: {redis})");
    let mut gateway =
        services::bench_gateway(&dir.0, gw_addr, threads, &[("users", users_addr)], &[])?;

    let (rt, client) = services::client_runtime()?;
    let base = format!("http://{gw_addr}");
    let token = rt.block_on(services::signed_up(
        &client, &base, &mail_dir, EMAIL, PASSWORD,
    ))?;
    let me_request = |addr: SocketAddr, token: &str| get_request(addr, "/api/users/me", token);

    let me_dur = Duration::from_secs(me_secs);
    eprintln!("warm-up: 1 s of GET /api/users/me through the gateway");
    rt.block_on(fixed::run(
        gw_addr,
        me_request(gw_addr, &token),
        rate,
        conns,
        Duration::from_secs(1),
    ))?;
    eprintln!("GET /api/users/me at {rate} req/s for {me_secs} s: through the gateway");
    let via_gateway = rt.block_on(fixed::run(
        gw_addr,
        me_request(gw_addr, &token),
        rate,
        conns,
        me_dur,
    ))?;
    eprintln!("GET /api/users/me at {rate} req/s for {me_secs} s: straight to the service");
    let direct = rt.block_on(fixed::run(
        users_addr,
        me_request(users_addr, &token),
        rate,
        conns,
        me_dur,
    ))?;
    eprintln!("logins: {login_clients} clients, closed loop, {login_secs} s, through the gateway");
    let login_dur = Duration::from_secs(login_secs);
    let started = Instant::now();
    let login = rt.block_on(logins(gw_addr, login_clients, login_dur))?;
    let login_elapsed = started.elapsed().as_secs_f64();
    users.alive()?;
    gateway.alive()?;

    println!();
    println!(
        "Settings: GET /api/users/me at {rate} req/s over {conns} keep-alive connections for \
         {me_secs} s (open loop); logins: {login_clients} clients, closed loop, {login_secs} s; \
         gateway threads {threads}; users service: 2 Actix workers, SQLite, Argon2id \
         m=19456 KiB t=2 p=1; Redis-shared limits: {redis}; {} CPUs.",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    println!("| measurement | req/s | p50 ms | p99 ms | p99.9 ms | non-2xx | errors |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let me_rate = via_gateway.latencies_ns.len() as f64 / me_secs as f64;
    row("GET /api/users/me via gateway", &via_gateway, me_rate);
    let direct_rate = direct.latencies_ns.len() as f64 / me_secs as f64;
    row("GET /api/users/me direct", &direct, direct_rate);
    let login_rate = login.latencies_ns.len() as f64 / login_elapsed;
    row("POST /api/auth/login via gateway", &login, login_rate);
    println!();
    println!(
        "p99 added by the gateway on /api/users/me: {:.2} ms",
        via_gateway.pct_ms(0.99) - direct.pct_ms(0.99)
    );
    Ok(())
}
