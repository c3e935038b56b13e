//! A minimal Chrome DevTools Protocol client for tests: starts a headless
//! Chromium, opens pages, evaluates JavaScript in them and collects what
//! they log, throw and request.
//!
//! One websocket to the browser; each page is a target attached with
//! `flatten: true`, so its commands and events carry its `sessionId`. A
//! background task reads the socket, hands each response to the command
//! with the same `id` and records every event. Every wait has a time limit,
//! so a broken browser fails a test in seconds instead of hanging it.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant, SystemTime};

use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Executables tried, in this order, in every `PATH` directory.
const BROWSERS: [&str; 4] = [
    "chromium",
    "chromium-browser",
    "google-chrome",
    "google-chrome-stable",
];
/// How long the browser may take to print its DevTools address.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one protocol command may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a page may take to load.
const LOAD_TIMEOUT: Duration = Duration::from_secs(15);
/// Stderr lines kept for failure messages.
const STDERR_LINES: usize = 40;

type Sink = SplitSink<WebSocketStream<MaybeTlsStream<TcpStream>>, Message>;
type Reply = Result<Value, String>;

/// An event the browser sent: its page session (none for browser-level
/// events), method and parameters.
#[derive(Debug, Clone)]
pub struct Event {
    /// The `sessionId` of the page it is about.
    pub session: Option<String>,
    /// E.g. `Runtime.consoleAPICalled`.
    pub method: String,
    /// The event's `params`.
    pub params: Value,
}

/// Commands waiting for their answer, and why the connection ended once it
/// has (after which nothing waits).
#[derive(Default)]
struct Waiting {
    replies: HashMap<u64, oneshot::Sender<Reply>>,
    closed: Option<String>,
}

/// What the reader task shares with the senders.
#[derive(Default)]
struct Shared {
    waiting: Mutex<Waiting>,
    events: Mutex<Vec<Event>>,
}

impl Shared {
    /// Routes one message: a response to its command, or an event to the log.
    fn dispatch(&self, text: &str) {
        let Ok(mut msg) = serde_json::from_str::<Value>(text) else {
            return;
        };
        if let Some(id) = msg.get("id").and_then(Value::as_u64) {
            let reply = match msg.get("error") {
                Some(e) => Err(format!("{} (code {})", e["message"], e["code"])),
                None => Ok(msg
                    .get_mut("result")
                    .map(Value::take)
                    .unwrap_or(Value::Null)),
            };
            let tx = lock(&self.waiting).replies.remove(&id);
            if let Some(tx) = tx {
                let _ = tx.send(reply);
            }
        } else if let Some(method) = msg.get("method").and_then(Value::as_str) {
            let event = Event {
                session: msg
                    .get("sessionId")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                method: method.to_owned(),
                params: msg
                    .get_mut("params")
                    .map(Value::take)
                    .unwrap_or(Value::Null),
            };
            lock(&self.events).push(event);
        }
    }

    /// Fails every waiting command and every later one with `why`.
    fn close(&self, why: String) {
        let mut waiting = lock(&self.waiting);
        waiting.closed = Some(why);
        waiting.replies.clear();
    }
}

/// Locks `m`, ignoring poisoning (a panicking test thread must not hide
/// the browser's state from the failure message).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The websocket connection to the browser.
struct Connection {
    sink: tokio::sync::Mutex<Sink>,
    next_id: AtomicU64,
    shared: Arc<Shared>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Connection {
    async fn open(ws_url: &str) -> Result<Self, String> {
        let (ws, _) = tokio::time::timeout(CALL_TIMEOUT, tokio_tungstenite::connect_async(ws_url))
            .await
            .map_err(|_| format!("connecting to {ws_url} took over {CALL_TIMEOUT:?}"))?
            .map_err(|e| format!("connecting to {ws_url}: {e}"))?;
        let (sink, mut stream) = ws.split();
        let shared = Arc::new(Shared::default());
        let reader_shared = shared.clone();
        let reader = tokio::spawn(async move {
            let why = loop {
                match stream.next().await {
                    Some(Ok(Message::Text(text))) => reader_shared.dispatch(text.as_str()),
                    Some(Ok(Message::Close(_))) | None => {
                        break "the browser closed the connection".to_owned()
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => break format!("websocket error: {e}"),
                }
            };
            reader_shared.close(why);
        });
        Ok(Self {
            sink: tokio::sync::Mutex::new(sink),
            next_id: AtomicU64::new(1),
            shared,
            reader,
        })
    }

    /// Sends `method` (to the page `session`, or to the browser) and waits
    /// for its result.
    async fn call(&self, session: Option<&str>, method: &str, params: Value) -> Reply {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let (tx, rx) = oneshot::channel();
        {
            let mut waiting = lock(&self.shared.waiting);
            if let Some(why) = &waiting.closed {
                return Err(format!("{method}: {why}"));
            }
            waiting.replies.insert(id, tx);
        }
        let forget = || lock(&self.shared.waiting).replies.remove(&id);
        let send = async {
            let mut sink = self.sink.lock().await;
            sink.send(Message::text(msg.to_string())).await
        };
        match tokio::time::timeout(CALL_TIMEOUT, send).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                forget();
                return Err(format!("{method}: sending: {e}"));
            }
            Err(_) => {
                forget();
                return Err(format!("{method}: sending took over {CALL_TIMEOUT:?}"));
            }
        }
        match tokio::time::timeout(CALL_TIMEOUT, rx).await {
            Ok(Ok(reply)) => reply.map_err(|e| format!("{method}: {e}")),
            Ok(Err(_)) => {
                let why = lock(&self.shared.waiting).closed.clone();
                Err(format!(
                    "{method}: {}",
                    why.unwrap_or_else(|| "connection closed".to_owned())
                ))
            }
            Err(_) => {
                forget();
                Err(format!("{method}: no answer within {CALL_TIMEOUT:?}"))
            }
        }
    }

    /// The events recorded so far for `session`, from index `from` of the
    /// whole log; and the log's length.
    fn events(&self, session: &str, from: usize) -> (Vec<Event>, usize) {
        let events = lock(&self.shared.events);
        let mine = events
            .iter()
            .skip(from)
            .filter(|e| e.session.as_deref() == Some(session))
            .cloned()
            .collect();
        (mine, events.len())
    }
}

/// The browser process and its profile directory; killed and removed when
/// dropped.
struct Process {
    child: Child,
    profile: PathBuf,
    stderr: Arc<Mutex<VecDeque<String>>>,
}

impl Process {
    /// The last lines the browser wrote to stderr.
    fn stderr_tail(&self) -> String {
        lock(&self.stderr)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // Its helper processes (renderer, GPU, zygote) exit when it does.
        let _ = self.child.kill();
        let _ = self.child.wait();
        for _ in 0..20 {
            if std::fs::remove_dir_all(&self.profile).is_ok() || !self.profile.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A headless Chromium with a fresh profile, killed when dropped.
pub struct Browser {
    connection: Arc<Connection>,
    process: Process,
}

impl Browser {
    /// Finds (or installs, see [`browser_executable`]) Chromium, starts it
    /// headless and connects to it. Panics, with the browser's stderr, if it
    /// does not come up.
    pub async fn launch() -> Browser {
        let exe = tokio::task::spawn_blocking(browser_executable)
            .await
            .unwrap_or_else(|e| panic!("looking for a browser: {e}"));
        let profile = std::env::temp_dir().join(format!(
            "tiergate-chromium-{}-{}",
            std::process::id(),
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        ));
        std::fs::create_dir_all(&profile)
            .unwrap_or_else(|e| panic!("creating {}: {e}", profile.display()));
        let mut child = Command::new(&exe)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--no-proxy-server",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", exe.display()));
        let stderr = child.stderr.take();
        let process = Process {
            child,
            profile,
            stderr: Arc::default(),
        };

        // Reads stderr to the end (so the browser never blocks on a full
        // pipe), keeping the last lines and passing on the DevTools address.
        let (tx, rx) = oneshot::channel::<String>();
        let tail = process.stderr.clone();
        std::thread::spawn(move || {
            let Some(stderr) = stderr else { return };
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(url) = line.trim().strip_prefix("DevTools listening on ") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(url.to_owned());
                    }
                }
                let mut tail = lock(&tail);
                if tail.len() == STDERR_LINES {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        });
        let ws_url = match tokio::time::timeout(START_TIMEOUT, rx).await {
            Ok(Ok(url)) => url,
            Ok(Err(_)) => panic!(
                "{} exited without a DevTools address; its stderr:\n{}",
                exe.display(),
                process.stderr_tail()
            ),
            Err(_) => panic!(
                "{} printed no DevTools address within {START_TIMEOUT:?}; its stderr:\n{}",
                exe.display(),
                process.stderr_tail()
            ),
        };
        let connection = Connection::open(&ws_url)
            .await
            .unwrap_or_else(|e| panic!("{e}; the browser's stderr:\n{}", process.stderr_tail()));
        Browser {
            connection: Arc::new(connection),
            process,
        }
    }

    /// Opens `url` in a new tab and waits for its load event. Every event
    /// of the tab is recorded from before the navigation on. Panics if the
    /// page cannot be loaded (a 404 still loads: see
    /// [`Page::document_response`]).
    pub async fn open(&self, url: &str) -> Page {
        let c = &self.connection;
        let target = c
            .call(None, "Target.createTarget", json!({"url": "about:blank"}))
            .await
            .unwrap_or_else(|e| self.fail(url, e));
        let target_id = target["targetId"].clone();
        let attached = c
            .call(
                None,
                "Target.attachToTarget",
                json!({"targetId": target_id, "flatten": true}),
            )
            .await
            .unwrap_or_else(|e| self.fail(url, e));
        let Some(session) = attached["sessionId"].as_str() else {
            self.fail(url, format!("no sessionId in {attached}"))
        };
        let page = Page {
            connection: c.clone(),
            session: session.to_owned(),
        };
        for domain in ["Runtime", "Log", "Network", "Page"] {
            page.call(&format!("{domain}.enable"), json!({}))
                .await
                .unwrap_or_else(|e| self.fail(url, e));
        }
        let (_, mark) = c.events(&page.session, 0);
        let nav = page
            .call("Page.navigate", json!({"url": url}))
            .await
            .unwrap_or_else(|e| self.fail(url, e));
        if let Some(err) = nav["errorText"].as_str().filter(|e| !e.is_empty()) {
            self.fail(url, err.to_owned());
        }
        let deadline = Instant::now() + LOAD_TIMEOUT;
        while !c
            .events(&page.session, mark)
            .0
            .iter()
            .any(|e| e.method == "Page.loadEventFired")
        {
            if Instant::now() > deadline {
                self.fail(url, format!("no load event within {LOAD_TIMEOUT:?}"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        page
    }

    /// Fails opening `url`, with the browser's stderr.
    fn fail(&self, url: &str, e: String) -> ! {
        panic!(
            "opening {url}: {e}; the browser's stderr:\n{}",
            self.process.stderr_tail()
        )
    }
}

/// A tab, attached to with its own session.
pub struct Page {
    connection: Arc<Connection>,
    session: String,
}

impl Page {
    /// Sends a protocol command to this page and returns its result.
    pub async fn call(&self, method: &str, params: Value) -> Result<Value, String> {
        self.connection
            .call(Some(&self.session), method, params)
            .await
    }

    /// Evaluates `js` in the page (awaiting a promise) and returns its
    /// value as JSON (`undefined` is null); an exception is an error.
    pub async fn eval(&self, js: &str) -> Result<Value, String> {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": js, "returnByValue": true, "awaitPromise": true}),
            )
            .await?;
        if let Some(ex) = r.get("exceptionDetails") {
            let what = ex["exception"]["description"]
                .as_str()
                .or(ex["text"].as_str())
                .unwrap_or("an exception");
            return Err(format!("`{js}` threw {what}"));
        }
        Ok(r["result"]["value"].clone())
    }

    /// Evaluates `js` every 100 ms until its value is truthy and returns
    /// it; after `limit`, an error with the last value.
    pub async fn wait_for(&self, js: &str, limit: Duration) -> Result<Value, String> {
        let deadline = Instant::now() + limit;
        loop {
            let last = self.eval(js).await;
            if let Ok(v) = &last {
                if truthy(v) {
                    return Ok(v.clone());
                }
            }
            if Instant::now() >= deadline {
                return Err(format!("`{js}` not true after {limit:?}; last: {last:?}"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every event of this page so far.
    pub fn events(&self) -> Vec<Event> {
        self.connection.events(&self.session, 0).0
    }

    /// The main document's `Network.Response` (`status`, `headers`,
    /// `mimeType`, …) of the last navigation, if one arrived.
    pub fn document_response(&self) -> Option<Value> {
        self.events()
            .into_iter()
            .filter(|e| e.method == "Network.responseReceived" && e.params["type"] == "Document")
            .map(|e| e.params["response"].clone())
            .next_back()
    }

    /// Every URL the page requested, in order.
    pub fn requested_urls(&self) -> Vec<String> {
        self.events()
            .into_iter()
            .filter(|e| e.method == "Network.requestWillBeSent")
            .filter_map(|e| e.params["request"]["url"].as_str().map(str::to_owned))
            .collect()
    }

    /// Uncaught exceptions, `console.error`/`warn`/`assert` calls and
    /// browser log entries of level error (failed loads, CSP violations),
    /// one line each.
    pub fn problems(&self) -> Vec<String> {
        self.events()
            .into_iter()
            .filter_map(|e| {
                let p = &e.params;
                match e.method.as_str() {
                    "Runtime.exceptionThrown" => {
                        let d = &p["exceptionDetails"];
                        let what = d["exception"]["description"]
                            .as_str()
                            .or(d["text"].as_str())
                            .unwrap_or_default();
                        Some(format!("uncaught exception: {what}"))
                    }
                    "Runtime.consoleAPICalled"
                        if matches!(p["type"].as_str(), Some("error" | "warning" | "assert")) =>
                    {
                        let args: Vec<String> = p["args"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|a| match a.get("value") {
                                Some(Value::String(s)) => s.clone(),
                                Some(v) => v.to_string(),
                                None => a["description"].as_str().unwrap_or("?").to_owned(),
                            })
                            .collect();
                        Some(format!(
                            "console.{}: {}",
                            p["type"].as_str().unwrap_or("?"),
                            args.join(" ")
                        ))
                    }
                    "Log.entryAdded" if p["entry"]["level"] == "error" => {
                        let entry = &p["entry"];
                        Some(format!(
                            "log ({}): {} {}",
                            entry["source"].as_str().unwrap_or("?"),
                            entry["text"].as_str().unwrap_or_default(),
                            entry["url"].as_str().unwrap_or_default()
                        ))
                    }
                    _ => None,
                }
            })
            .collect()
    }
}

/// The value of header `name` (any case) of a `Network.Response`, or "".
pub fn header_of(response: &Value, name: &str) -> String {
    response["headers"]
        .as_object()
        .and_then(|h| h.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)))
        .and_then(|(_, v)| v.as_str())
        .unwrap_or_default()
        .to_owned()
}

/// JavaScript truthiness of a JSON value.
fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(_) | Value::Object(_) => true,
    }
}

/// Installs Chromium at most once per test process.
static INSTALL: Once = Once::new();

/// The browser to run: `$CHROME_PATH` if set, else the first of
/// [`BROWSERS`] on `PATH`. If there is none and this is a root user on a
/// system with `apt-get`, installs Chromium first. Panics, saying how to
/// install one, if there still is none.
pub fn browser_executable() -> PathBuf {
    if let Some(path) = std::env::var_os("CHROME_PATH").filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    if let Some(exe) = find_browser() {
        return exe;
    }
    INSTALL.call_once(install_chromium);
    find_browser().unwrap_or_else(|| {
        panic!(
            "no headless browser for the end-to-end tests: none of {BROWSERS:?} is on PATH. \
             Install Chromium (Debian/Ubuntu: `sudo apt-get install chromium`; Fedora: \
             `sudo dnf install chromium`; macOS: `brew install --cask chromium`) or point \
             CHROME_PATH at a Chrome/Chromium executable."
        )
    })
}

fn find_browser() -> Option<PathBuf> {
    BROWSERS.iter().find_map(|name| find_in_path(name))
}

/// The executable `name` in a `PATH` directory.
fn find_in_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Whether this process runs as root (from `/proc/self/status`).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().next())
            == Some("0")
    })
}

/// `apt-get install chromium`, if this is root on a system with apt-get.
/// Test processes starting together take turns (see [`InstallLock`]); the
/// later ones find it installed.
fn install_chromium() {
    if find_in_path("apt-get").is_none() || !is_root() {
        return;
    }
    let _lock = InstallLock::acquire();
    if find_browser().is_some() {
        return;
    }
    eprintln!("no browser found: installing Chromium with apt-get for the end-to-end tests");
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let install = [
        "-o",
        "DPkg::Lock::Timeout=300",
        "install",
        "-y",
        "-qq",
        "chromium",
    ];
    // No package lists yet (a fresh container): fetch them and try again.
    if !apt(&install) && apt(&["update", "-qq"]) {
        apt(&install);
    }
}

/// A lock directory in the temp dir, shared by concurrent test processes;
/// removed when dropped.
struct InstallLock(PathBuf);

impl InstallLock {
    /// Waits (up to 10 minutes, or until a browser appears) for the lock.
    /// A lock older than 15 minutes is left over from a killed process and
    /// taken over. `None` if it could not be taken.
    fn acquire() -> Option<Self> {
        let dir = std::env::temp_dir().join("tiergate-chromium-install.lock");
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            match std::fs::create_dir(&dir) {
                Ok(()) => return Some(Self(dir)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(_) => return None,
            }
            if is_stale(&dir, Duration::from_secs(900)) {
                let _ = std::fs::remove_dir(&dir);
                continue;
            }
            if Instant::now() > deadline || find_browser().is_some() {
                return None;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

fn is_stale(path: &Path, age: Duration) -> bool {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|a| a > age)
}

impl Drop for InstallLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}
