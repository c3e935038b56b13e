//! Shared by the service benchmarks (`users`, `billing`): real
//! `tiergate` processes on loopback in a temporary data directory, an
//! account registered and logged in through the gateway, result rows.

use std::fs;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::fixed::FixedResult;

/// `name` from the environment as a number, else `default`.
pub fn env_num<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
    match std::env::var(name) {
        Ok(v) => v.parse().map_err(|_| anyhow!("{name}={v} is not a number")),
        Err(_) => Ok(default),
    }
}

/// A free port on loopback.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `127.0.0.1:<a free port>`.
pub fn free_addr() -> Result<SocketAddr> {
    Ok(SocketAddr::from(([127, 0, 0, 1], free_port()?)))
}

/// A child process killed when dropped.
pub struct Proc(pub Child, pub &'static str);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    /// An error when it has exited.
    pub fn alive(&mut self) -> Result<()> {
        match self.0.try_wait()? {
            Some(status) => bail!("{} exited: {status}", self.1),
            None => Ok(()),
        }
    }

    /// Waits (20 s at most) until something listens on `addr`.
    pub fn wait_listening(&mut self, addr: SocketAddr) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            self.alive()?;
            if Instant::now() > deadline {
                bail!("{} did not listen on {addr}", self.1);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

/// A directory removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// `<tmp>/<prefix>-<pid>`, created.
    pub fn new(prefix: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
        fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The `tiergate` binary under test.
pub fn tiergate_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_tiergate"))
}

/// `tiergate serve <service>` in development mode in `dir`, listening on
/// `addr`, with `env`; its log goes to `<dir>/<service>.log`.
pub fn serve(
    dir: &Path,
    service: &'static str,
    addr: SocketAddr,
    env: &[(&str, &str)],
) -> Result<Proc> {
    let upper = service.to_ascii_uppercase();
    let mut cmd = Command::new(tiergate_bin());
    cmd.args(["serve", service])
        .env("TIERGATE_DATA_DIR", dir)
        .env("TIERGATE_ENV", "development")
        .env(format!("TIERGATE_{upper}_LISTEN"), addr.to_string())
        .env("RUST_LOG", "info")
        .env_remove(format!("TIERGATE_{upper}_DATABASE_URL"))
        .env_remove("TIERGATE_USERS_SIGNING_KEY")
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.join(format!("{service}.log")))?);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut p = Proc(
        cmd.spawn()
            .with_context(|| format!("tiergate serve {service}"))?,
        service,
    );
    p.wait_listening(addr)?;
    Ok(p)
}

/// The benchmarks' gateway: `/api/auth` anonymous to users, then
/// `/api/<name>` with a bearer token (verified against the users JWKS)
/// to each of `services` (users first), limits far above the load, a
/// JSON access-log line per request, the admin listener on; limits shared
/// through Redis when it answers.
const GATEWAY_YAML: &str = r#"server:
  listen: ["127.0.0.1:{port}"]
  threads: {threads}
admin:
  listen: ["127.0.0.1:{admin}"]
access_log:
  path: "{dir}/access.log"
upstreams:
{upstreams}auth:
  jwks: { url: "http://{users}/.well-known/jwks.json" }
  issuer: tiergate-users
  audience: tiergate
rate_limit:
  tiers:
    - { name: FREE, per_minute: 1000000000, per_hour: 10000000000, per_day: 100000000000 }
  anonymous: { per_minute: 1000000000, per_hour: 10000000000, per_day: 100000000000 }
{redis}
routes:
  - { name: auth, match: { path: { prefix: /api/auth } }, upstream: users }
{routes}"#;

/// [`GATEWAY_YAML`] for `services` (`users` among them), run listening
/// on `addr` with `threads` threads; `public` routes (path prefix,
/// service) come first, without a token or limits.
pub fn bench_gateway(
    dir: &Path,
    addr: SocketAddr,
    threads: usize,
    services: &[(&str, SocketAddr)],
    public: &[(&str, &str)],
) -> Result<Proc> {
    let users = services
        .iter()
        .find(|(name, _)| *name == "users")
        .map(|(_, a)| *a)
        .ok_or_else(|| anyhow!("the gateway needs the users service for its JWKS"))?;
    let (mut upstreams, mut routes) = (String::new(), String::new());
    for (i, (prefix, service)) in public.iter().enumerate() {
        routes.push_str(&format!(
            "  - {{ name: public-{i}, match: {{ path: {{ prefix: {prefix} }} }}, upstream: {service}, rate_limit: false }}\n"
        ));
    }
    for (name, upstream) in services {
        upstreams.push_str(&format!(
            "  {name}: {{ backends: [{{ address: \"{upstream}\" }}] }}\n"
        ));
        routes.push_str(&format!(
            "  - {{ name: {name}, match: {{ path: {{ prefix: /api/{name} }} }}, upstream: {name}, auth: required }}\n"
        ));
    }
    let yaml = GATEWAY_YAML
        .replace("{port}", &addr.port().to_string())
        .replace("{threads}", &threads.to_string())
        .replace("{admin}", &free_port()?.to_string())
        .replace("{dir}", &dir.display().to_string())
        .replace("{upstreams}", &upstreams)
        .replace("{routes}", &routes)
        .replace("{users}", &users.to_string())
        .replace("{redis}", redis_yaml());
    gateway(dir, &yaml, addr)
}

/// A one-worker runtime for the load clients and an HTTP client that
/// ignores proxies.
pub fn client_runtime() -> Result<(tokio::runtime::Runtime, reqwest::Client)> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    Ok((rt, reqwest::Client::builder().no_proxy().build()?))
}

/// The closed-loop tasks' results added up, latencies sorted.
pub async fn collect(
    mut set: tokio::task::JoinSet<Result<FixedResult>>,
    what: &str,
) -> Result<FixedResult> {
    let mut total = FixedResult::default();
    while let Some(r) = set.join_next().await {
        let r = r.with_context(|| format!("a {what} task panicked"))??;
        total.latencies_ns.extend(r.latencies_ns);
        total.non_200 += r.non_200;
        total.errors += r.errors;
        total.first_error = total.first_error.or(r.first_error);
    }
    total.latencies_ns.sort_unstable();
    Ok(total)
}

/// Adds one timed call to `res`: its latency (from `t0`, the body read)
/// when `ok` holds for its status, else a failure (the first one kept).
/// The body of an accepted answer.
pub async fn record(
    res: &mut FixedResult,
    sent: reqwest::Result<reqwest::Response>,
    t0: Instant,
    ok: impl Fn(reqwest::StatusCode) -> bool,
) -> Option<Vec<u8>> {
    match sent {
        Ok(r) if ok(r.status()) => {
            let body = r.bytes().await.unwrap_or_default().to_vec();
            res.latencies_ns.push(t0.elapsed().as_nanos() as u64);
            Some(body)
        }
        Ok(r) => {
            res.non_200 += 1;
            let status = r.status();
            let text = r.text().await.unwrap_or_default();
            res.first_error
                .get_or_insert(format!("HTTP {status}: {text}"));
            None
        }
        Err(e) => {
            res.errors += 1;
            res.first_error.get_or_insert(format!("{e:#}"));
            None
        }
    }
}

/// `tiergate gateway -c <dir>/gateway.yaml` with `yaml`, listening on
/// `addr`.
pub fn gateway(dir: &Path, yaml: &str, addr: SocketAddr) -> Result<Proc> {
    let path = dir.join("gateway.yaml");
    fs::write(&path, yaml)?;
    let mut p = Proc(
        Command::new(tiergate_bin())
            .arg("gateway")
            .arg("-c")
            .arg(&path)
            .env("RUST_LOG", "warn")
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("gateway.log"))?)
            .spawn()
            .context("tiergate gateway")?,
        "gateway",
    );
    p.wait_listening(addr)?;
    Ok(p)
}

/// A fresh PostgreSQL database `<name>_<pid>`, if the server at
/// `TIERGATE_TEST_POSTGRES` (default `postgres://postgres@127.0.0.1:5432`)
/// answers: its URL.
pub async fn postgres_database(name: &str) -> Option<String> {
    sqlx::any::install_default_drivers();
    let server = std::env::var("TIERGATE_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned());
    let admin = sqlx::AnyPool::connect(&format!("{server}/postgres"))
        .await
        .ok()?;
    let name = format!("{name}_{}", std::process::id());
    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name}"
    )))
    .execute(&admin)
    .await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin)
        .await
        .ok()?;
    admin.close().await;
    Some(format!("{server}/{name}"))
}

/// Drops the database [`postgres_database`] made at `url`.
pub async fn drop_database(url: &str) {
    let Some((server, name)) = url.rsplit_once('/') else {
        return;
    };
    if let Ok(admin) = sqlx::AnyPool::connect(&format!("{server}/postgres")).await {
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&admin)
        .await;
    }
}

/// Whether Redis answers on 127.0.0.1:6379.
pub fn redis_running() -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], 6379));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// The gateway's `redis:` line when Redis answers, else nothing.
pub fn redis_yaml() -> &'static str {
    if redis_running() {
        "  redis: { url: \"redis://127.0.0.1:6379\" }"
    } else {
        ""
    }
}

/// The users service in `dir` on `addr`, its `user.registered` events
/// going to a notifications service (started first, on a free port) that
/// writes each mail into `<dir>/mail`, where [`link_token`] finds the
/// verification link: the two processes, users first.
pub fn serve_users(dir: &Path, addr: SocketAddr) -> Result<(Proc, Proc)> {
    fs::create_dir_all(dir.join("conf"))?;
    fs::write(
        dir.join("conf/services.yaml"),
        "events:\n  user.registered: [notifications]\n",
    )?;
    let mail_addr = free_addr()?;
    let mail = serve(dir, "notifications", mail_addr, &[])?;
    let url = format!("http://{mail_addr}");
    let users = serve(
        dir,
        "users",
        addr,
        &[("TIERGATE_NOTIFICATIONS_URL", url.as_str())],
    )?;
    Ok((users, mail))
}

/// The verification token from the newest mail to `email` in `mail_dir`
/// (the notifications service's development file sink), read decoded.
pub fn link_token(mail_dir: &Path, email: &str) -> Result<String> {
    let filter = notifications::mailbox::Filter {
        to: Some(email.to_owned()),
        subject: None,
    };
    let mail = notifications::mailbox::wait_for(mail_dir, &filter, Duration::from_secs(10))
        .map_err(|e| anyhow!(e))?
        .ok_or_else(|| anyhow!("no mail to {email} in {}", mail_dir.display()))?;
    mail.link()
        .and_then(|l| l.split("token=").nth(1))
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no link with a token in {}", mail.path.display()))
}

/// `POST url` with a JSON body; the JSON answer, an error unless 2xx.
pub async fn call(
    client: &reqwest::Client,
    url: String,
    body: serde_json::Value,
) -> Result<serde_json::Value> {
    let r = client.post(&url).json(&body).send().await?;
    let status = r.status();
    let text = r.text().await?;
    if !status.is_success() {
        bail!("{url}: {status}: {text}");
    }
    Ok(serde_json::from_str(&text).unwrap_or(serde_json::Value::Null))
}

/// Registers `email` through the gateway at `base`, verifies it with the
/// link of the mail in `mail_dir` ([`serve_users`]), logs in; the access
/// token.
pub async fn signed_up(
    client: &reqwest::Client,
    base: &str,
    mail_dir: &Path,
    email: &str,
    password: &str,
) -> Result<String> {
    call(
        client,
        format!("{base}/api/auth/register"),
        serde_json::json!({"email": email, "password": password, "name": "Bench"}),
    )
    .await?;
    let link = link_token(mail_dir, email)?;
    call(
        client,
        format!("{base}/api/auth/verify-email"),
        serde_json::json!({ "token": link }),
    )
    .await?;
    let pair = call(
        client,
        format!("{base}/api/auth/login"),
        serde_json::json!({"email": email, "password": password}),
    )
    .await?;
    pair["access_token"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no access token in {pair}"))
}

/// The id of the user `token` belongs to (`GET /api/users/me` at `base`).
pub async fn user_id(client: &reqwest::Client, base: &str, token: &str) -> Result<String> {
    let me: serde_json::Value = client
        .get(format!("{base}/api/users/me"))
        .bearer_auth(token)
        .send()
        .await?
        .json()
        .await?;
    me["id"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no id in {me}"))
}

/// `GET <path>` with a bearer token, as raw HTTP/1.1 bytes.
pub fn get_request(addr: SocketAddr, path: &str, token: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: tiergate-bench\r\n\
         Authorization: Bearer {token}\r\n\r\n"
    )
    .into_bytes()
}

/// One Markdown row: name, rate, p50/p99/p99.9 ms, non-2xx, errors.
pub fn row(name: &str, r: &FixedResult, per_s: f64) {
    println!(
        "| {name} | {per_s:.0} | {:.2} | {:.2} | {:.2} | {} | {} |",
        r.pct_ms(0.5),
        r.pct_ms(0.99),
        r.pct_ms(0.999),
        r.non_200,
        r.errors
    );
    if let Some(e) = &r.first_error {
        println!("|   first failure: {e} | | | | | | |");
    }
}
