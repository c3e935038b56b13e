//! Load benchmark: tiergate vs. a bare Pingora proxy vs. nginx, side by side, loopback only.
//!
//! One run measures, one target after another (never concurrently), against the same trivial
//! upstream (`200`, `Content-Length: 2`, body `ok`; HTTP/1.1 keep-alive):
//!
//! * `direct`          – the load generator hitting the upstream itself (the added-latency baseline);
//! * `tiergate`        – the real gateway binary, `tiergate gateway -c <yaml>`, with the full
//!   chain on: bearer token required (HS256 dev secret, cached after the first request),
//!   tier rate limit shared through Redis at 127.0.0.1:6379 (limits far above the load),
//!   metrics, JSON access log of every request to a file, request id, trace context;
//! * `tiergate-plain`  – the same binary with auth, limits, access log and admin listener off
//!   (request ids, trace context and request metrics cannot be turned off);
//! * `pingora-bare`    – a minimal Pingora `ProxyHttp` (only `upstream_peer`) with tiergate's
//!   `ServerConf` tuning (`threads = N`, `work_stealing = false`), mimalloc allocator;
//! * `pingora-default` – the same proxy with Pingora's default `ServerConf` except `threads = N`
//!   (also mimalloc: the allocator is per binary and switching it at runtime needs `unsafe`);
//! * `nginx`           – nginx as a plain keep-alive reverse proxy, `worker_processes N`.
//!
//! Every target gets the same request, `GET /` with the bearer token (only `tiergate`
//! checks it). Two measurements per target:
//! 1. closed-loop throughput: `wrk -t1 -c32 -d5s --latency` after a discarded 1 s warm-up
//!    (req/s, p50, p99; non-2xx responses and socket errors are reported, never hidden);
//! 2. open-loop latency at a fixed moderate rate (default 2000 req/s over 16 keep-alive
//!    connections, built in since `wrk2` is not packaged): p50/p99/p99.9 and the p99 added
//!    on top of `direct`. A request is timed from its scheduled send time when its connection
//!    was still busy (queueing counts, no coordinated omission), else from its actual send
//!    time (client timer slack does not count).
//!
//! Every server runs as its own OS process: the upstream and the Pingora proxies re-execute
//! this bench binary with `TIERGATE_BENCH_ROLE=upstream|pingora-bare|pingora-default`;
//! tiergate and nginx run under `TIERGATE_BENCH_ROLE=supervise`. Every child watches its
//! stdin, a pipe from the harness: when the harness drops it (end of target, error, panic)
//! or dies (even SIGKILL), the child exits or stops its server, so nothing is left behind.
//!
//! Run on an otherwise idle machine (it measures and reports other CPU use beforehand):
//! `cargo bench --bench load`. It prints progress, then settings and two Markdown tables
//! ready for docs/BENCHMARKS.md. Environment overrides:
//! `LOAD_DURATION` (s, default 5), `LOAD_CONNECTIONS` (32), `LOAD_THREADS` (proxy worker
//! threads N, 1), `LOAD_WRK_THREADS` (1), `LOAD_TARGETS` (comma list, default all),
//! `UPSTREAM_THREADS` (1), `FIXED_RATE` (req/s, 2000), `FIXED_CONNECTIONS` (16).
//! Needs `wrk` and (optionally) `nginx`; as root, missing ones are installed with apt-get.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ROLE_ENV: &str = "TIERGATE_BENCH_ROLE";
const READY_TIMEOUT: Duration = Duration::from_secs(10);

mod support;
use support::{fixed, http1};

fn main() -> Result<()> {
    match std::env::var(ROLE_ENV) {
        Ok(role) => roles::run(&role),
        Err(_) => harness::run(),
    }
}

/// The benchmark request, the same for every target: a bearer token
/// (which only tiergate's full chain checks) and nothing else unusual.
pub fn get_request(addr: SocketAddr) -> Vec<u8> {
    format!(
        "GET / HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: tiergate-load\r\nAuthorization: Bearer {}\r\n\r\n",
        bench_token()
    )
    .into_bytes()
}

/// The dev HS256 secret the full-chain tiergate target verifies tokens with.
const BENCH_SECRET: &str = "tiergate-load-bench-secret";

/// A day-long token of tier BENCH, signed with [`BENCH_SECRET`]; the same
/// for the whole run.
fn bench_token() -> &'static str {
    static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TOKEN.get_or_init(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let claims = serde_json::json!({
            "sub": "bench-user", "tier": "BENCH", "iat": now, "exp": now + 86_400,
        });
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(BENCH_SECRET.as_bytes()),
        )
        .unwrap_or_default()
    })
}

/// Reads a numeric environment variable, falling back to `default` when unset or empty.
fn env_num<T>(name: &str, default: T) -> Result<T>
where
    T: std::str::FromStr + PartialOrd + Default,
    T::Err: std::fmt::Display,
{
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => {
            let n: T = v
                .trim()
                .parse()
                .map_err(|e| anyhow!("invalid {name}={v:?}: {e}"))?;
            if n <= T::default() {
                bail!("{name} must be > 0, got {v:?}");
            }
            Ok(n)
        }
        _ => Ok(default),
    }
}

/// Child-process roles: the trivial upstream, the two minimal Pingora proxies, `supervise`.
mod roles {
    use super::{env_num, http1, ROLE_ENV};
    use anyhow::{bail, Context, Result};
    use async_trait::async_trait;
    use pingora_core::server::configuration::{Opt, ServerConf};
    use pingora_core::server::Server;
    use pingora_core::upstreams::peer::HttpPeer;
    use pingora_proxy::{http_proxy_service, ProxyHttp, Session};
    use std::io::Read;
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok";
    const OK_CLOSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";
    const BAD: &[u8] =
        b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

    /// Blocks until the harness's end of our stdin pipe closes (harness exited or dropped us).
    fn wait_for_stdin_eof() {
        let mut buf = [0u8; 64];
        while matches!(std::io::stdin().read(&mut buf), Ok(n) if n > 0) {}
    }

    pub fn run(role: &str) -> Result<()> {
        if role == "supervise" {
            return supervise();
        }
        // Never outlive the harness, however it dies.
        std::thread::spawn(|| {
            wait_for_stdin_eof();
            std::process::exit(0);
        });
        let listen = std::env::var("BENCH_LISTEN").context("BENCH_LISTEN not set")?;
        let threads: usize = env_num("BENCH_THREADS", 1)?;
        match role {
            "upstream" => upstream(&listen, threads),
            "pingora-bare" | "pingora-default" => {
                let up = std::env::var("BENCH_UPSTREAM").context("BENCH_UPSTREAM not set")?;
                let upstream: SocketAddr = up.parse().context("bad BENCH_UPSTREAM")?;
                pingora(&listen, upstream, threads, role == "pingora-bare")
            }
            other => bail!("unknown {ROLE_ENV}={other:?}"),
        }
    }

    /// Runs argv[1..] (tiergate, nginx) and sends it `BENCH_STOP_SIGNAL` when our stdin closes,
    /// so external servers die with the harness even if it is SIGKILLed. Exits with its code.
    fn supervise() -> Result<()> {
        let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
        let (program, rest) = args.split_first().context("supervise: no command given")?;
        let mut cmd = std::process::Command::new(program);
        let mut child = cmd.args(rest).stdin(std::process::Stdio::null()).spawn()?;
        let pid = child.id().to_string();
        let signal = std::env::var("BENCH_STOP_SIGNAL").unwrap_or_else(|_| "TERM".into());
        std::thread::spawn(move || {
            wait_for_stdin_eof();
            let kill = |sig: &str| {
                std::process::Command::new("kill")
                    .args([sig, &pid])
                    .status()
            };
            let _ = kill(&format!("-{signal}"));
            std::thread::sleep(std::time::Duration::from_secs(5));
            let _ = kill("-KILL");
            std::process::exit(1);
        });
        std::process::exit(child.wait()?.code().unwrap_or(1))
    }

    fn upstream(listen: &str, threads: usize) -> Result<()> {
        let mut builder = if threads <= 1 {
            tokio::runtime::Builder::new_current_thread()
        } else {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(threads);
            b
        };
        let rt = builder.enable_all().build().context("tokio runtime")?;
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("upstream bind {listen}"))?;
            loop {
                match listener.accept().await {
                    Ok((sock, _)) => {
                        tokio::spawn(async move {
                            let _ = serve(sock).await;
                        });
                    }
                    Err(e) => {
                        eprintln!("upstream accept: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    }
                }
            }
        })
    }

    /// Keep-alive loop: answers every complete request in the buffer with one write.
    async fn serve(mut sock: tokio::net::TcpStream) -> Result<()> {
        sock.set_nodelay(true)?;
        let (mut buf, mut out) = (Vec::with_capacity(4096), Vec::with_capacity(4096));
        loop {
            buf.reserve(4096);
            if sock.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
            let (mut used, mut close) = (0, false);
            loop {
                match http1::parse_request(&buf[used..]) {
                    Ok(Some(m)) => {
                        used += m.len;
                        close = !m.keep_alive;
                        out.extend_from_slice(if close { OK_CLOSE } else { OK });
                        if close {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(_) => {
                        out.extend_from_slice(BAD);
                        close = true;
                        break;
                    }
                }
            }
            buf.drain(..used);
            if !out.is_empty() {
                sock.write_all(&out).await?;
                out.clear();
            }
            if close || buf.len() > 64 * 1024 {
                return Ok(());
            }
        }
    }

    struct BareProxy {
        upstream: SocketAddr,
    }

    #[async_trait]
    impl ProxyHttp for BareProxy {
        type CTX = ();
        fn new_ctx(&self) {}
        async fn upstream_peer(
            &self,
            _session: &mut Session,
            _ctx: &mut (),
        ) -> pingora_core::Result<Box<HttpPeer>> {
            Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
        }
    }

    fn pingora(listen: &str, upstream: SocketAddr, threads: usize, bare: bool) -> Result<()> {
        let mut conf = ServerConf {
            threads,
            ..ServerConf::default()
        };
        if bare {
            conf.work_stealing = false; // tiergate's tuning
        }
        let mut server = Server::new_with_opt_and_conf(None::<Opt>, conf);
        server.bootstrap();
        let mut service = http_proxy_service(&server.configuration, BareProxy { upstream });
        service.add_tcp(listen);
        server.add_service(service);
        server.run_forever()
    }
}

/// wrk invocation and output parsing.
mod wrk {
    use anyhow::{bail, Context, Result};

    #[derive(Debug, Default)]
    pub struct WrkResult {
        pub rps: f64,
        pub p50_ms: f64,
        pub p99_ms: f64,
        pub requests: u64,
        pub non_2xx: u64,
        pub socket_errors: u64,
        pub socket_detail: String,
    }

    impl WrkResult {
        pub fn has_errors(&self) -> bool {
            self.non_2xx > 0 || self.socket_errors > 0
        }
    }

    /// "312.45us" / "1.20ms" / "2.00s" / "1.00m" -> milliseconds.
    fn to_ms(s: &str) -> Result<f64> {
        let split = s
            .find(|c: char| c.is_ascii_alphabetic())
            .context("latency without unit")?;
        let (num, unit) = s.split_at(split);
        let v: f64 = num.parse().with_context(|| format!("bad latency {s:?}"))?;
        Ok(v * match unit {
            "us" => 1e-3,
            "ms" => 1.0,
            "s" => 1e3,
            "m" => 60e3,
            "h" => 3600e3,
            _ => bail!("unknown latency unit in {s:?}"),
        })
    }

    pub fn parse(out: &str) -> Result<WrkResult> {
        let mut r = WrkResult::default();
        let (mut in_dist, mut got_rps, mut got_p99) = (false, false, false);
        for line in out.lines().map(str::trim) {
            let mut words = line.split_whitespace();
            if line.starts_with("Latency Distribution") {
                in_dist = true;
            } else if let Some(v) = line.strip_prefix("Requests/sec:") {
                r.rps = v.trim().parse().context("bad Requests/sec")?;
                got_rps = true;
            } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
                r.non_2xx = v.trim().parse().context("bad Non-2xx count")?;
            } else if let Some(v) = line.strip_prefix("Socket errors:") {
                r.socket_detail = v.trim().to_string();
                for part in v.split(',') {
                    let n = part.split_whitespace().nth(1).unwrap_or("0");
                    r.socket_errors += n.parse::<u64>().context("bad socket error count")?;
                }
            } else if in_dist && line.starts_with("50%") {
                r.p50_ms = to_ms(words.nth(1).unwrap_or_default())?;
            } else if in_dist && line.starts_with("99%") {
                r.p99_ms = to_ms(words.nth(1).unwrap_or_default())?;
                got_p99 = true;
            } else if line.contains(" requests in ") {
                r.requests = words.next().unwrap_or_default().parse().unwrap_or(0);
            }
        }
        if !got_rps || !got_p99 {
            bail!("could not find Requests/sec and the 99% latency line in wrk output:\n{out}");
        }
        Ok(r)
    }
}

/// Orchestration: processes, targets, reporting.
mod harness {
    use super::fixed::{self, FixedResult};
    use super::wrk::{self, WrkResult};
    use super::*;

    const TARGETS: [&str; 6] = [
        "direct",
        "tiergate",
        "tiergate-plain",
        "pingora-bare",
        "pingora-default",
        "nginx",
    ];

    /// The full chain as a production config runs it: bearer token required
    /// (HS256 with the dev secret; a cached token costs the same whatever
    /// its algorithm), tier rate limits shared through Redis (leases; limits
    /// far above the load so nothing is refused), metrics (always on; the
    /// admin listener serves them), JSON access log of every request to a
    /// file, request ids and trace context. `environment: development`
    /// only because the HS256 dev secret needs it (`tiergate gateway`
    /// refuses the secret in production); it changes nothing else.
    /// `{port}`, `{n}`, `{admin}`, `{dir}` are substituted; followed by
    /// [`TIERGATE_ROUTE_YAML`].
    const TIERGATE_YAML: &str = r#"environment: development
server:
  listen: ["127.0.0.1:{port}"]
  threads: {n}
admin:
  listen: ["127.0.0.1:{admin}"]
auth:
  algorithms: [HS256]
rate_limit:
  tiers:
    - { name: BENCH, per_minute: 1000000000, per_hour: 10000000000, per_day: 100000000000 }
  redis: { url: "redis://127.0.0.1:6379" }
access_log:
  path: "{dir}/access.log"
"#;

    /// tiergate with every optional filter off: no auth, no limits, no
    /// access log, no admin listener (request ids, trace context and
    /// request metrics stay: they cannot be turned off).
    /// `{port}`, `{n}` are substituted; followed by [`TIERGATE_ROUTE_YAML`].
    const TIERGATE_PLAIN_YAML: &str = r#"server:
  listen: ["127.0.0.1:{port}"]
  threads: {n}
admin:
  listen: []
access_log:
  enabled: false
"#;

    /// The pool and the one route of both tiergate targets; the route's
    /// last key (`auth`/`rate_limit`) is appended per target.
    const TIERGATE_ROUTE_YAML: &str = r#"upstreams:
  bench:
    backends:
      - address: "127.0.0.1:{up}"
routes:
  - name: all
    match:
      path: { prefix: / }
    upstream: bench
"#;

    /// `{port}`, `{up}`, `{n}`, `{dir}` are substituted.
    const NGINX_CONF: &str = r#"worker_processes {n};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path {dir}/client_body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  upstream bench { server 127.0.0.1:{up}; keepalive 64; }
  server {
    listen 127.0.0.1:{port};
    location / {
      proxy_pass http://bench;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
"#;

    struct Settings {
        duration: u64,
        connections: u32,
        threads: usize,
        wrk_threads: u32,
        upstream_threads: usize,
        rate: u32,
        rate_conns: usize,
        targets: Vec<&'static str>,
    }

    impl Settings {
        fn from_env() -> Result<Self> {
            let list = std::env::var("LOAD_TARGETS").unwrap_or_default();
            let targets = if list.trim().is_empty() {
                TARGETS.to_vec()
            } else {
                let find = |n: &str| TARGETS.into_iter().find(|t| *t == n.trim());
                list.split(',')
                    .map(|n| {
                        find(n).ok_or_else(|| {
                            anyhow!("unknown LOAD_TARGETS entry {n:?}; known: {TARGETS:?}")
                        })
                    })
                    .collect::<Result<_>>()?
            };
            Ok(Settings {
                duration: env_num("LOAD_DURATION", 5)?,
                connections: env_num("LOAD_CONNECTIONS", 32)?,
                threads: env_num("LOAD_THREADS", 1)?,
                wrk_threads: env_num("LOAD_WRK_THREADS", 1)?,
                upstream_threads: env_num("UPSTREAM_THREADS", 1)?,
                rate: env_num("FIXED_RATE", 2000)?,
                rate_conns: env_num("FIXED_CONNECTIONS", 16)?,
                targets,
            })
        }

        fn wrk_args(&self, secs: u64) -> Vec<String> {
            let (t, c) = (self.wrk_threads, self.connections.max(self.wrk_threads));
            let args = format!("-t{t} -c{c} -d{secs}s --latency --timeout 2s");
            let mut args: Vec<String> = args.split(' ').map(String::from).collect();
            args.extend([
                "-H".to_owned(),
                format!("Authorization: Bearer {}", bench_token()),
            ]);
            args
        }

        fn command(&self) -> String {
            let targets = if self.targets == TARGETS {
                String::new()
            } else {
                format!(" LOAD_TARGETS={}", self.targets.join(","))
            };
            format!(
                "LOAD_DURATION={} LOAD_CONNECTIONS={} LOAD_THREADS={} LOAD_WRK_THREADS={} UPSTREAM_THREADS={} FIXED_RATE={} FIXED_CONNECTIONS={}{targets} cargo bench --bench load",
                self.duration, self.connections, self.threads, self.wrk_threads, self.upstream_threads, self.rate, self.rate_conns
            )
        }
    }

    /// Temp directory, removed on drop (after the children, which are declared later).
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Result<Self> {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let p =
                std::env::temp_dir().join(format!("tiergate-load-{}-{nanos}", std::process::id()));
            fs::create_dir_all(&p).with_context(|| format!("create {}", p.display()))?;
            Ok(TempDir(p))
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// A server child process, stopped and reaped on drop: closing its stdin makes it exit
    /// (role children) or stop its server (`supervise`); SIGKILL if that takes over 5 s.
    struct ChildGuard {
        name: String,
        child: Child,
        stdin: Option<ChildStdin>,
        log: PathBuf,
    }

    impl ChildGuard {
        fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Result<Self> {
            let out = File::create(&log).with_context(|| format!("create {}", log.display()))?;
            cmd.stdin(Stdio::piped())
                .stdout(out.try_clone()?)
                .stderr(out);
            let mut child = cmd
                .spawn()
                .with_context(|| format!("spawn {name}: {cmd:?}"))?;
            let stdin = child.stdin.take();
            Ok(ChildGuard {
                name: name.into(),
                child,
                stdin,
                log,
            })
        }

        fn ensure_alive(&mut self) -> Result<()> {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited ({status}); its log ends with:\n{}",
                    self.name,
                    tail(&self.log, 15)
                );
            }
            Ok(())
        }

        fn wait_ready(&mut self, port: u16) -> Result<()> {
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let deadline = Instant::now() + READY_TIMEOUT;
            loop {
                self.ensure_alive()?;
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    return Ok(());
                }
                if Instant::now() > deadline {
                    let log = tail(&self.log, 15);
                    bail!("{} did not accept connections on {addr} within {READY_TIMEOUT:?}; its log ends with:\n{log}", self.name);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    impl Drop for ChildGuard {
        fn drop(&mut self) {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return; // already reaped: its pid may be reused, do not signal it
            }
            drop(self.stdin.take());
            let deadline = Instant::now() + Duration::from_secs(6);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn tail(path: &Path, n: usize) -> String {
        let text = fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Runs a command to completion within `limit`; returns its status and combined output.
    fn run_bounded(cmd: &mut Command, limit: Duration, log: &Path) -> Result<(ExitStatus, String)> {
        let out = File::create(log).with_context(|| format!("create {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let mut child = cmd.spawn().with_context(|| format!("spawn {cmd:?}"))?;
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{cmd:?} did not finish within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Ok((status, fs::read_to_string(log).unwrap_or_default()))
    }

    fn free_port() -> Result<u16> {
        let l = TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
        Ok(l.local_addr()?.port())
    }

    fn find_tool(name: &str) -> Option<PathBuf> {
        let path = std::env::var("PATH").unwrap_or_default();
        let dirs: Vec<&str> = path
            .split(':')
            .chain(["/usr/sbin", "/usr/bin", "/sbin"])
            .collect();
        dirs.iter()
            .map(|d| Path::new(d).join(name))
            .find(|p| p.is_file())
    }

    /// Finds `name`, or installs Debian `package` with apt-get when running as root.
    fn ensure_tool(name: &str, package: &str, tmp: &Path) -> Result<PathBuf> {
        if let Some(p) = find_tool(name) {
            return Ok(p);
        }
        let log = tmp.join(format!("apt-{package}.log"));
        let uid = run_bounded(Command::new("id").arg("-u"), Duration::from_secs(5), &log)?.1;
        if uid.trim() != "0" {
            bail!("`{name}` is not on PATH and we are not root, so `apt-get install {package}` was not tried");
        }
        println!("`{name}` not found: running apt-get install -y {package} ...");
        let apt = |args: &[&str]| {
            let mut cmd = Command::new("apt-get");
            cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
            run_bounded(&mut cmd, Duration::from_secs(300), &log)
        };
        let install = ["install", "-y", "--no-install-recommends", package];
        if !apt(&install).is_ok_and(|(s, _)| s.success()) {
            let _ = apt(&["update"]);
            let _ = apt(&install);
        }
        find_tool(name).ok_or_else(|| {
            anyhow!(
                "`apt-get install {package}` failed: {}",
                tail(&log, 3).replace('\n', " | ")
            )
        })
    }

    fn version(cmd: &mut Command, tmp: &Path, strip: &str) -> String {
        match run_bounded(cmd, Duration::from_secs(10), &tmp.join("version.log")) {
            Ok((_, out)) => {
                let line = out.lines().next().unwrap_or("?").replace(strip, "");
                line.split(" Copyright")
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_string()
            }
            Err(e) => format!("unknown ({e})"),
        }
    }

    enum Outcome {
        Done(WrkResult, FixedResult),
        Skipped(String),
        Failed(String),
    }

    struct Ctx<'a> {
        s: &'a Settings,
        tmp: &'a Path,
        wrk: &'a Path,
        nginx: &'a std::result::Result<PathBuf, String>,
        upstream_port: u16,
        rt: &'a tokio::runtime::Runtime,
    }

    impl Ctx<'_> {
        /// Re-executes this bench binary in a child role.
        fn spawn_role(&self, role: &str, port: u16, threads: usize) -> Result<ChildGuard> {
            let mut cmd = Command::new(std::env::current_exe().context("current_exe")?);
            cmd.env(ROLE_ENV, role)
                .env("BENCH_LISTEN", format!("127.0.0.1:{port}"))
                .env(
                    "BENCH_UPSTREAM",
                    format!("127.0.0.1:{}", self.upstream_port),
                )
                .env("BENCH_THREADS", threads.to_string());
            ChildGuard::spawn(role, cmd, self.tmp.join(format!("{role}.log")))
        }

        /// Starts an external server under the `supervise` role, stopped with `signal`.
        /// Only the full-chain `tiergate` gets the dev secret (a production gateway
        /// refuses to start with it set).
        fn supervised(
            &self,
            name: &str,
            program: &Path,
            args: &[&OsStr],
            signal: &str,
        ) -> Result<ChildGuard> {
            let mut cmd = Command::new(std::env::current_exe().context("current_exe")?);
            cmd.env(ROLE_ENV, "supervise")
                .env("BENCH_STOP_SIGNAL", signal)
                .env_remove("TIERGATE_DEV_JWT_SECRET")
                .env_remove("TIERGATE_REDIS_URL")
                .env("RUST_LOG", "warn");
            if name == "tiergate" {
                cmd.env("TIERGATE_DEV_JWT_SECRET", BENCH_SECRET);
            }
            cmd.arg(program).args(args);
            ChildGuard::spawn(name, cmd, self.tmp.join(format!("{name}.log")))
        }

        fn fill(&self, template: &str, port: u16, dir: &Path) -> String {
            template
                .replace("{port}", &port.to_string())
                .replace("{up}", &self.upstream_port.to_string())
                .replace("{n}", &self.s.threads.to_string())
                .replace("{dir}", &dir.display().to_string())
        }

        fn start(&self, target: &str, port: u16) -> Result<ChildGuard> {
            match target {
                "pingora-bare" | "pingora-default" => self.spawn_role(target, port, self.s.threads),
                "tiergate" | "tiergate-plain" => {
                    let yaml = self.tmp.join(format!("{target}.yaml"));
                    let template = if target == "tiergate" {
                        format!("{TIERGATE_YAML}{TIERGATE_ROUTE_YAML}    auth: required\n")
                    } else {
                        format!("{TIERGATE_PLAIN_YAML}{TIERGATE_ROUTE_YAML}    rate_limit: false\n")
                    };
                    let config = self
                        .fill(&template, port, self.tmp)
                        .replace("{admin}", &free_port()?.to_string());
                    fs::write(&yaml, config)?;
                    let bin = Path::new(env!("CARGO_BIN_EXE_tiergate"));
                    let args = [OsStr::new("gateway"), OsStr::new("-c"), yaml.as_os_str()];
                    self.supervised(target, bin, &args, "KILL")
                }
                "nginx" => {
                    let bin = self.nginx.as_ref().map_err(|e| anyhow!("{e}"))?;
                    let dir = self.tmp.join("nginx");
                    fs::create_dir_all(&dir)?;
                    let conf = dir.join("nginx.conf");
                    fs::write(&conf, self.fill(NGINX_CONF, port, &dir))?;
                    let (log, d, c) = (dir.join("error.log"), dir.as_os_str(), conf.as_os_str());
                    let args: [&OsStr; 8] = [
                        "-p".as_ref(),
                        d,
                        "-c".as_ref(),
                        c,
                        "-e".as_ref(),
                        log.as_os_str(),
                        "-g".as_ref(),
                        "daemon off;".as_ref(),
                    ];
                    // SIGTERM: the master stops its workers (SIGKILL would orphan them).
                    self.supervised(target, bin, &args, "TERM")
                }
                other => bail!("no way to start target {other:?}"),
            }
        }

        fn wrk(&self, port: u16, secs: u64) -> Result<WrkResult> {
            let mut cmd = Command::new(self.wrk);
            cmd.args(self.s.wrk_args(secs))
                .arg(format!("http://127.0.0.1:{port}/"));
            let log = self.tmp.join("wrk.log");
            let (status, out) = run_bounded(&mut cmd, Duration::from_secs(secs + 20), &log)?;
            if !status.success() {
                bail!("wrk failed ({status}):\n{out}");
            }
            wrk::parse(&out)
        }

        fn run_target(&self, target: &str) -> Result<Outcome> {
            if let ("nginx", Err(why)) = (target, self.nginx) {
                return Ok(Outcome::Skipped(why.clone()));
            }
            let direct = target == "direct";
            let port = if direct {
                self.upstream_port
            } else {
                free_port()?
            };
            let mut guard = if direct {
                None
            } else {
                Some(self.start(target, port)?)
            };
            if let Some(g) = guard.as_mut() {
                g.wait_ready(port)?;
            }
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let sanity = self.rt.block_on(async {
                let req = super::get_request(addr);
                let one = async { fixed::Client::connect(addr).await?.request(&req).await };
                tokio::time::timeout(Duration::from_secs(5), one)
                    .await
                    .context("timed out")?
            });
            match sanity.context("sanity GET / failed")? {
                (200, _) => {}
                (status, _) => bail!("sanity GET / returned HTTP {status}, expected 200"),
            }
            self.wrk(port, 1).context("warm-up")?;
            let w = self.wrk(port, self.s.duration)?;
            let dur = Duration::from_secs(self.s.duration);
            let f = self.rt.block_on(fixed::run(
                addr,
                super::get_request(addr),
                self.s.rate,
                self.s.rate_conns,
                dur,
            ))?;
            if let Some(g) = guard.as_mut() {
                g.ensure_alive()?;
            }
            if target == "tiergate" {
                // Proof the chain was on: one access-log line per request.
                let lines = fs::read(self.tmp.join("access.log"))
                    .map(|b| b.iter().filter(|&&c| c == b'\n').count())
                    .unwrap_or(0);
                eprintln!("   tiergate access log: {lines} lines");
            }
            Ok(Outcome::Done(w, f))
        }
    }

    pub fn run() -> Result<()> {
        let s = Settings::from_env()?;
        let tmp = TempDir::new()?;
        let wrk =
            ensure_tool("wrk", "wrk", &tmp.0).context("wrk is required (Debian package `wrk`)")?;
        let nginx = if s.targets.contains(&"nginx") {
            ensure_tool("nginx", "nginx-light", &tmp.0).map_err(|e| format!("{e:#}"))
        } else {
            Err("not in LOAD_TARGETS".into())
        };
        if let (true, Err(why)) = (s.targets.contains(&"nginx"), &nginx) {
            println!("nginx: SKIPPED: {why}");
        }
        let versions = [
            version(Command::new(&wrk).arg("-v"), &tmp.0, ""),
            nginx.as_ref().map_or("nginx n/a".into(), |p| {
                version(Command::new(p).arg("-v"), &tmp.0, "nginx version: ")
            }),
        ];
        let busy = host_busy_percent();
        if busy > 10.0 {
            println!("WARNING: {busy:.0}% of all CPUs were busy with other work just before the run: the numbers will be skewed");
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let upstream_port = free_port()?;
        let ctx = Ctx {
            s: &s,
            tmp: &tmp.0,
            wrk: &wrk,
            nginx: &nginx,
            upstream_port,
            rt: &rt,
        };
        let mut upstream = ctx.spawn_role("upstream", upstream_port, s.upstream_threads)?;
        upstream
            .wait_ready(upstream_port)
            .context("starting the upstream")?;

        let mut results = Vec::new();
        for &t in &s.targets {
            println!("== {t} ...");
            let outcome = ctx
                .run_target(t)
                .unwrap_or_else(|e| Outcome::Failed(format!("{e:#}")));
            match &outcome {
                Outcome::Done(w, f) => println!(
                    "   wrk: {:.0} req/s, p99 {:.3} ms; fixed rate: p99 {:.3} ms over {} ok requests",
                    w.rps, w.p99_ms, f.pct_ms(0.99), f.latencies_ns.len()
                ),
                Outcome::Skipped(why) => println!("   SKIPPED: {why}"),
                Outcome::Failed(why) => println!("   FAILED: {why}"),
            }
            results.push((t, outcome));
            upstream.ensure_alive().context("the upstream died")?;
        }
        report(&s, &versions, busy, &results);
        Ok(())
    }

    /// Share of all CPUs busy over one second, from /proc/stat (the harness itself sleeps).
    fn host_busy_percent() -> f64 {
        let sample = || -> Option<(u64, u64)> {
            let stat = fs::read_to_string("/proc/stat").ok()?;
            let fields: Vec<u64> = stat
                .lines()
                .next()?
                .split_whitespace()
                .skip(1)
                .filter_map(|f| f.parse().ok())
                .collect();
            let idle = fields.get(3)? + fields.get(4).unwrap_or(&0); // idle + iowait
            Some((fields.iter().sum(), idle))
        };
        let first = sample();
        std::thread::sleep(Duration::from_secs(1));
        match (first, sample()) {
            (Some((t0, i0)), Some((t1, i1))) if t1 > t0 => {
                100.0 * (1.0 - i1.saturating_sub(i0) as f64 / (t1 - t0) as f64)
            }
            _ => 0.0,
        }
    }

    fn row(cells: &[String]) {
        let cells: Vec<String> = cells.iter().map(|c| c.replace(['\n', '|'], " ")).collect();
        println!("| {} |", cells.join(" | "));
    }

    fn not_done(target: &str, o: &Outcome, columns: usize) -> Option<Vec<String>> {
        let (what, why) = match o {
            Outcome::Done(..) => return None,
            Outcome::Skipped(why) => ("SKIPPED", why),
            Outcome::Failed(why) => ("FAILED", why),
        };
        let mut cells = vec![target.to_string(), what.to_string()];
        cells.resize(columns - 1, String::new());
        cells.push(why.chars().take(300).collect());
        Some(cells)
    }

    fn report(s: &Settings, versions: &[String], busy: f64, results: &[(&str, Outcome)]) {
        let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .unwrap_or("?")
            .trim();
        println!("\n---- results (paste into docs/BENCHMARKS.md) ----\n");
        println!("Command: `{}`\n", s.command());
        println!(
            "- closed loop: `wrk {} http://127.0.0.1:<port>/`, after a discarded 1 s warm-up",
            s.wrk_args(s.duration)
                .iter()
                .map(|a| if a.starts_with("Authorization") {
                    "'Authorization: Bearer <HS256 token, tier BENCH>'"
                } else {
                    a
                })
                .collect::<Vec<_>>()
                .join(" ")
        );
        println!(
            "- open loop: {} req/s over {} keep-alive connections for {} s (built-in client)",
            s.rate, s.rate_conns, s.duration
        );
        println!(
            "- threads: proxy workers N={} (nginx worker_processes N), upstream {}, wrk {}",
            s.threads, s.upstream_threads, s.wrk_threads
        );
        println!(
            "- host: nproc={nproc}, CPU {cpu}, {busy:.0}% busy with other work just before the run; loopback only"
        );
        println!(
            "- versions: {}, {}, pingora 0.9.1, tiergate {}\n",
            versions[0],
            versions[1],
            env!("CARGO_PKG_VERSION")
        );

        let done = |name: &str| {
            results.iter().find_map(|(t, o)| match o {
                Outcome::Done(w, f) if *t == name => Some((w, f)),
                _ => None,
            })
        };
        let ratio = |rps: f64, name: &str| {
            done(name).map_or("n/a".into(), |(w, _)| {
                format!("{:.1}%", 100.0 * rps / w.rps)
            })
        };
        println!("| target | req/s | p50 ms | p99 ms | vs pingora-bare | vs nginx | errors |");
        println!("|---|---:|---:|---:|---:|---:|---|");
        let mut flagged = false;
        for (t, o) in results {
            let Outcome::Done(w, _) = o else {
                row(&not_done(t, o, 7).unwrap_or_default());
                continue;
            };
            flagged |= w.has_errors();
            let (mark, errors) = if w.has_errors() {
                (
                    " (!)",
                    format!(
                        "**{} non-2xx, {} socket ({})** of {} requests",
                        w.non_2xx, w.socket_errors, w.socket_detail, w.requests
                    ),
                )
            } else {
                ("", "0".into())
            };
            row(&[
                t.to_string(),
                format!("{:.0}{mark}", w.rps),
                format!("{:.3}", w.p50_ms),
                format!("{:.3}", w.p99_ms),
                ratio(w.rps, "pingora-bare"),
                ratio(w.rps, "nginx"),
                errors,
            ]);
        }
        if flagged {
            println!("\n(!) wrk counts failed responses in req/s: such a row is not a valid throughput figure.");
        }

        println!(
            "\nFixed rate {} req/s, {} connections, {} s, open loop:\n",
            s.rate, s.rate_conns, s.duration
        );
        println!("| target | p50 ms | p99 ms | p99.9 ms | added p99 vs direct | errors |");
        println!("|---|---:|---:|---:|---:|---|");
        let direct_p99 = done("direct").map(|(_, f)| f.pct_ms(0.99));
        for (t, o) in results {
            let Outcome::Done(_, f) = o else {
                row(&not_done(t, o, 6).unwrap_or_default());
                continue;
            };
            let added = match (*t, direct_p99) {
                ("direct", _) => "baseline".into(),
                (_, Some(d)) => format!("{:+.3} ms", f.pct_ms(0.99) - d),
                (_, None) => "n/a".into(),
            };
            let failed = f.non_200 + f.errors;
            let errors = match f.first_error.as_deref() {
                Some(first) if failed > 0 => format!(
                    "**{} non-200, {} failed** of {} (first: {first})",
                    f.non_200,
                    f.errors,
                    f.latencies_ns.len() as u64 + failed
                ),
                _ => "0".into(),
            };
            let pct = |q: f64| format!("{:.3}", f.pct_ms(q));
            row(&[
                t.to_string(),
                pct(0.5),
                pct(0.99),
                pct(0.999),
                added,
                errors,
            ]);
        }
    }
}
