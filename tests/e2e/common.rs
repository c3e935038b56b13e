//! Shared test fixtures: echo upstreams, gateway start-up, HTTP client.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use gateway::secret::Environment;
use gateway::server::{GatewayServer, RunningGateway};
use serde_json::{json, Value};

/// The PostgreSQL server the tests use, `postgres://USER@HOST:PORT` without
/// a database: `TIERGATE_TEST_POSTGRES` (set by `scripts/test`), else the
/// local default.
pub fn postgres_server() -> String {
    std::env::var("TIERGATE_TEST_POSTGRES")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432".to_owned())
        .trim_end_matches('/')
        .to_owned()
}

/// The Redis the tests share, `redis://HOST:PORT`: `TIERGATE_TEST_REDIS`
/// (set by `scripts/test`), else the local default.
pub fn redis_url() -> String {
    std::env::var("TIERGATE_TEST_REDIS")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned())
}

/// [`redis_url`]'s `host:port`.
pub fn redis_addr() -> SocketAddr {
    let url = redis_url();
    let hostport = url.trim_start_matches("redis://").trim_end_matches('/');
    hostport
        .parse()
        .unwrap_or_else(|_| panic!("TIERGATE_TEST_REDIS `{url}` is not redis://IP:PORT"))
}

/// A free TCP port on 127.0.0.1, reserved for the rest of this process,
/// for a listener whose port must be known before it starts (written in a
/// config, given to a peer), or for an address where nothing listens.
///
/// A port that is bound and then released can be handed to another test
/// process (nextest runs many at once) before our listener binds it:
/// "Address already in use", or worse, our client talking to another
/// test's server. So the port stays bound, without listening, by a socket
/// with `SO_REUSEADDR` that is never closed: the kernel hands it to no
/// other `bind(…:0)` or outgoing connection, while a listener that also
/// sets `SO_REUSEADDR` (Pingora, std, tokio, actix, Redis all do) can
/// still bind and listen on it. Nothing listens on the reservation
/// itself: connecting to a port no listener took is refused.
pub fn free_port() -> u16 {
    static RESERVED: std::sync::Mutex<Vec<tokio::net::TcpSocket>> =
        std::sync::Mutex::new(Vec::new());
    let socket = tokio::net::TcpSocket::new_v4().expect("no socket");
    socket.set_reuseaddr(true).expect("SO_REUSEADDR");
    socket
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("no free port");
    let port = socket
        .local_addr()
        .expect("a bound socket's address")
        .port();
    RESERVED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(socket);
    port
}

/// Waits until something accepts on `addr`.
pub fn wait_for_port(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
        assert!(
            Instant::now() < deadline,
            "nothing listening on {addr} after 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running echo upstream.
pub struct Upstream {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts an echo upstream named `name` on an ephemeral port.
///
/// Every path answers. Query parameters steer it: `sleep_ms=N` waits first,
/// `download_mb=N` streams N MiB of zeros. Otherwise it reads the request
/// body as a stream (counting bytes, never buffering it) and answers JSON:
/// `{backend, method, path, headers, body_bytes}`.
pub async fn upstream(name: &'static str) -> Upstream {
    let (addr, task) = serve(echo_app(name)).await;
    Upstream { addr, task }
}

/// Serves `app` on an ephemeral 127.0.0.1 port until the task is aborted.
pub async fn serve(app: axum::Router) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (addr, task)
}

/// An echo upstream that can be killed (listener and every open
/// connection dropped at once, as when its process dies) and restarted on
/// the same port.
pub struct KillableUpstream {
    pub addr: SocketAddr,
    name: &'static str,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl KillableUpstream {
    /// Starts on an ephemeral port.
    pub async fn start(name: &'static str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut up = Self {
            addr,
            name,
            task: None,
        };
        up.serve(listener);
        up
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let app = echo_app(self.name);
        self.task = Some(tokio::spawn(async move {
            // Connections live in this set: aborting the task drops them.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let service = hyper_util::service::TowerToHyperService::new(app.clone());
                conns.spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
                });
                while conns.try_join_next().is_some() {}
            }
        }));
    }

    /// Closes the listener and resets every open connection.
    pub async fn kill(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }

    /// Listens again on the same port.
    pub async fn restart(&mut self) {
        let listener = tokio::net::TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }
}

impl Drop for KillableUpstream {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// The echo app of [`upstream`], answering as `name`.
pub fn echo_app(name: &'static str) -> axum::Router {
    axum::Router::new().fallback(move |req: Request| echo(name, req))
}

fn query_param(req: &Request, key: &str) -> Option<u64> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.parse().ok()).flatten()
    })
}

async fn echo(name: &'static str, req: Request) -> Response {
    if let Some(ms) = query_param(&req, "sleep_ms") {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let Some(mb) = query_param(&req, "download_mb") {
        let chunk = bytes::Bytes::from(vec![0u8; 64 * 1024]);
        let chunks = mb * 16;
        let stream = futures_util::stream::iter(
            (0..chunks).map(move |_| Ok::<_, std::io::Error>(chunk.clone())),
        );
        return Response::builder()
            .header("content-length", (chunks * 64 * 1024).to_string())
            .body(Body::from_stream(stream))
            .unwrap();
    }
    let method = req.method().to_string();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let headers: BTreeMap<String, String> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    let mut body = req.into_body().into_data_stream();
    let mut body_bytes = 0usize;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(c) => body_bytes += c.len(),
            Err(_) => break,
        }
    }
    axum::Json(json!({
        "backend": name,
        "method": method,
        "path": path,
        "headers": headers,
        "body_bytes": body_bytes,
    }))
    .into_response()
}

/// A gateway running in this process on an ephemeral port.
pub struct TestGateway {
    pub addr: SocketAddr,
    /// The admin listener.
    pub admin: SocketAddr,
    running: RunningGateway,
}

impl TestGateway {
    /// The snapshot requests currently use.
    pub fn snapshot(&self) -> std::sync::Arc<gateway::snapshot::Snapshot> {
        self.running.state.load_full()
    }

    /// `http://127.0.0.1:PORT` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Stops it gracefully and waits until it has.
    pub fn shutdown(self) {
        self.running.shutdown();
    }

    /// The admin listener's `http://127.0.0.1:PORT` + `path`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }
}

/// Starts the gateway with `body` (upstreams + routes YAML) and a listener
/// on a free port; no secrets, no Redis override from the environment.
pub fn gateway(body: &str) -> TestGateway {
    gateway_with_env(body, &Environment::default())
}

/// [`gateway`] with the given environment (dev JWT secret, Redis URL).
pub fn gateway_with_env(body: &str, env: &Environment) -> TestGateway {
    gateway_with_server("", body, env)
}

/// [`gateway_with_env`] with extra `server:` lines (indented two spaces).
pub fn gateway_with_server(server_extra: &str, body: &str, env: &Environment) -> TestGateway {
    gateway_on(free_port(), server_extra, body, env)
}

/// [`gateway_with_server`] listening on `port` (known before it starts).
pub fn gateway_on(port: u16, server_extra: &str, body: &str, env: &Environment) -> TestGateway {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_test_writer()
        .try_init();
    let admin_port = free_port();
    let src = format!(
        "admin:\n  listen: [\"127.0.0.1:{admin_port}\"]\nserver:\n  listen: [\"127.0.0.1:{port}\"]\n  threads: 2\n  grace_period: 0s\n  graceful_shutdown_timeout: 0s\n{server_extra}{body}"
    );
    let config = gateway::config::parse(&src).unwrap_or_else(|e| panic!("{e}"));
    let running = GatewayServer::build_with_env(&config, env).unwrap().spawn();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    wait_for_port(addr);
    wait_for_port(admin);
    TestGateway {
        addr,
        admin,
        running,
    }
}

/// An HTTP client that never uses a proxy from the environment.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// GET `url` as bearer `token`: the status, the `x-ratelimit-limit` it
/// was admitted under (0 when absent) and the JSON body.
pub async fn limited_get(url: &str, token: &str) -> (reqwest::StatusCode, u64, Value) {
    let r = client().get(url).bearer_auth(token).send().await.unwrap();
    let status = r.status();
    let limit = r
        .headers()
        .get("x-ratelimit-limit")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (status, limit, r.json().await.unwrap_or(Value::Null))
}

/// GET `url` and parse the JSON body; returns (status, body).
pub async fn get_json(client: &reqwest::Client, url: &str) -> (u16, Value) {
    let resp = client.get(url).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Which echo upstream answered.
pub fn backend_of(v: &Value) -> &str {
    v["backend"].as_str().unwrap_or("<none>")
}

/// Sends `req` and parses the JSON body.
pub async fn json_of(req: reqwest::RequestBuilder) -> Value {
    req.send().await.unwrap().json().await.unwrap()
}

/// Sends `req` and returns the body as text.
pub async fn text_of(req: reqwest::RequestBuilder) -> String {
    req.send().await.unwrap().text().await.unwrap()
}

/// Upstreams and routes YAML: pool `svc` of one backend, one route `all`
/// sending every path to it.
pub fn one_route(upstream: SocketAddr) -> String {
    format!(
        "upstreams:\n  svc: {{ backends: [{{ address: \"{upstream}\" }}] }}\nroutes:\n  - {{ name: all, match: {{ path: {{ prefix: / }} }}, upstream: svc }}\n"
    )
}

/// Writes a one-route config (everything → `upstream`) for the real binary.
pub fn write_config(port: u16, threads: usize, upstream: SocketAddr) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tiergate-e2e-{port}"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tiergate.yaml");
    std::fs::write(
        &file,
        format!(
            "admin: {{ listen: [] }}\nserver:\n  listen: [\"127.0.0.1:{port}\"]\n  threads: {threads}\n{}",
            one_route(upstream)
        ),
    )
    .unwrap();
    file
}

/// The real `tiergate` binary running `args` + `-c <one-route config>`;
/// killed and cleaned up when dropped.
pub struct BinaryGateway {
    pub child: Child,
    pub addr: SocketAddr,
    config: PathBuf,
}

impl Drop for BinaryGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(dir) = self.config.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Starts `tiergate <command> -c FILE` proxying everything to `upstream`,
/// and waits until it accepts.
pub fn binary_gateway(command: &str, threads: usize, upstream: SocketAddr) -> BinaryGateway {
    let port = free_port();
    let config = write_config(port, threads, upstream);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tiergate"));
    cmd.args([command, "-c"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(dir) = config.parent() {
        // `up` keeps its databases and keys under ./data: the config's
        // own temporary directory, not the checkout.
        cmd.current_dir(dir);
    }
    let child = cmd.spawn().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_for_port(addr);
    BinaryGateway {
        child,
        addr,
        config,
    }
}

/// A response read off a raw connection.
#[derive(Debug)]
pub struct RawResponse {
    /// Its status, 0 when the connection closed before a status line.
    pub status: u16,
    /// The head as text (status line and headers).
    pub head: String,
    /// The body (everything after the head).
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// A header's value (name in lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Sends `request` as is on a new connection (nothing normalises it on
/// the way: dot segments, odd bytes and duplicate headers reach the
/// gateway as written) and reads until the server closes the connection,
/// at most 20 s.
pub async fn raw_http(addr: SocketAddr, request: &[u8]) -> RawResponse {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(request).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out)).await;
    parse_raw(&out)
}

/// A raw response's parts.
pub fn parse_raw(bytes: &[u8]) -> RawResponse {
    let split = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(bytes.len(), |i| i + 4);
    let head = String::from_utf8_lossy(&bytes[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    RawResponse {
        status,
        head,
        body: bytes[split..].to_vec(),
    }
}

/// `GET <target>` with `Host` and `Connection: close` plus `extra` header
/// lines, sent raw (see [`raw_http`]).
pub async fn raw_get(addr: SocketAddr, target: &str, extra: &[&str]) -> RawResponse {
    let mut req = format!("GET {target} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n");
    for line in extra {
        req.push_str(line);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    raw_http(addr, req.as_bytes()).await
}

/// The value of the first Prometheus sample whose line starts with
/// `line_start` (e.g. `tiergate_downstream_refused_total{reason="x"}`)
/// on the admin listener at `admin`, if present.
pub async fn metric_value(admin: SocketAddr, line_start: &str) -> Option<f64> {
    let text = text_of(client().get(format!("http://{admin}/metrics"))).await;
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
