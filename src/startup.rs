//! The table `tiergate up` prints once everything answers: each service,
//! its URL and health (with what its `/health` details say: Midtrans mode,
//! where mails go), the sandbox, the gateway and its status page.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// What the table lists.
pub struct Startup {
    /// (name, address) of each business service started.
    pub services: Vec<(&'static str, SocketAddr)>,
    /// The Midtrans sandbox, when `--sandbox` started it.
    pub sandbox: Option<SocketAddr>,
    /// The gateway's listeners.
    pub gateway: Vec<SocketAddr>,
    /// The admin listeners.
    pub admin: Vec<SocketAddr>,
}

/// The status code and body of `GET path` on `addr` (HTTP/1.0, so the
/// body is not chunked), within two seconds.
fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let timeout = Duration::from_secs(2);
    let mut s = TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.set_write_timeout(Some(timeout)).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

/// A service's health as one cell: `ok`, `degraded (database down)` or
/// `not answering`, then its details (`midtrans: sandbox (...)`).
fn health(addr: SocketAddr) -> (String, serde_json::Map<String, serde_json::Value>) {
    let Some((_, body)) = get(addr, "/health") else {
        return ("not answering".to_owned(), serde_json::Map::new());
    };
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let status = v["status"].as_str().unwrap_or("?").to_owned();
    let status = match v["database"].as_str() {
        Some("down") => format!("{status} (database down)"),
        _ => status,
    };
    let details = v["details"].as_object().cloned().unwrap_or_default();
    (status, details)
}

/// Where a listener is reached from this machine (`0.0.0.0` → localhost).
fn url(addr: &SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        format!("http://localhost:{}", addr.port())
    } else {
        format!("http://{addr}")
    }
}

impl Startup {
    /// Waits (up to 30 s) for the gateway to answer, then renders the
    /// table.
    pub fn render_when_up(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        let gateway = || {
            let a = self.gateway.first()?;
            let local = if a.ip().is_unspecified() {
                SocketAddr::from(([127, 0, 0, 1], a.port()))
            } else {
                *a
            };
            get(local, "/health").map(|(status, _)| status)
        };
        let mut answer = gateway();
        while answer.is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            answer = gateway();
        }
        self.render(answer)
    }

    /// The table; `gateway`: the status of the gateway's `GET /health`.
    fn render(&self, gateway: Option<u16>) -> String {
        let mut rows: Vec<[String; 3]> = Vec::new();
        let mut mail = None;
        for (name, addr) in &self.services {
            let (status, details) = health(*addr);
            let mut cell = status;
            for (k, v) in &details {
                let v = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
                if *name == "notifications" && k == "email" {
                    mail = Some(v.clone());
                }
                cell.push_str(&format!(" · {k}: {v}"));
                if *name == "payments" && k == "midtrans" && v == "disabled" {
                    cell.push_str(
                        " (503 until TIERGATE_MIDTRANS_SERVER_KEY is set; \
                         `tiergate up --sandbox` for the local sandbox)",
                    );
                }
            }
            rows.push([(*name).to_owned(), url(addr), cell]);
        }
        if let Some(addr) = self.sandbox {
            rows.push([
                "midtrans sandbox".to_owned(),
                url(&addr),
                "ok · pay with `tiergate sandbox pay <order_id>`".to_owned(),
            ]);
        }
        for addr in &self.gateway {
            let mut cell = match gateway {
                Some(200) => "ok".to_owned(),
                Some(status) => format!("degraded (GET /health: {status}; see the status page)"),
                None => "not answering".to_owned(),
            };
            if let Some(admin) = self.admin.first() {
                cell.push_str(&format!(" · status page {}/status", url(admin)));
            }
            rows.push(["gateway".to_owned(), url(addr), cell]);
        }
        let width = |i: usize| rows.iter().map(|r| r[i].len()).max().unwrap_or(0);
        let (w0, w1) = (width(0).max(7), width(1).max(3));
        let mut out = format!("\n  {:<w0$}  {:<w1$}  HEALTH\n", "SERVICE", "URL");
        for [name, url, cell] in &rows {
            out.push_str(&format!("  {name:<w0$}  {url:<w1$}  {cell}\n"));
        }
        out.push_str(&format!(
            "\n  mail: {}\n",
            mail.unwrap_or_else(|| "notifications is not answering".to_owned())
        ));
        out
    }
}
