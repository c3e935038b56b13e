//! The access log: one JSON line per request, written off the request path.
//!
//! A request formats its line (one allocation) and hands it to a bounded
//! queue; a dedicated thread drains the queue every [`DRAIN_INTERVAL`],
//! writes the lines through a buffer and flushes, so lines reach the file
//! within milliseconds and a busy gateway writes them in large batches.
//! The writer never sleeps *on* the queue: a sleeping receiver would make
//! every request's send a futex wake and a context switch (the first
//! profile of the full chain spent a quarter of its CPU there). When the
//! writer falls behind and the queue is full the line is dropped and
//! counted (`tiergate_access_log_dropped_total`): the log never slows
//! requests down.

use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::{BufWriter, Write};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::time::SystemTime;

use prometheus::IntCounter;

use crate::config::{AccessLogSettings, LogTarget};

/// How often the writer drains the queue.
pub const DRAIN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(10);

/// An open access log; dropping the last handle flushes and ends the writer.
pub struct AccessLog {
    tx: SyncSender<String>,
    sample: f64,
    always_log_errors: bool,
    dropped: IntCounter,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("sample", &self.sample)
            .finish_non_exhaustive()
    }
}

/// One request, as logged.
#[derive(Debug)]
pub struct Entry<'a> {
    /// When the response ended.
    pub time: SystemTime,
    /// `X-Request-Id`.
    pub request_id: &'a str,
    /// W3C trace id (32 hex digits).
    pub trace_id: &'a str,
    /// The client's address (after trusted proxies).
    pub client_ip: Option<IpAddr>,
    /// Request method.
    pub method: &'a str,
    /// Request path, without the query string (it may carry secrets).
    pub path: &'a str,
    /// Matched route name.
    pub route: Option<&'a str>,
    /// Pool name.
    pub upstream: Option<&'a str>,
    /// Address of the last backend tried.
    pub backend: Option<&'a str>,
    /// Response status; 0 when none was sent.
    pub status: u16,
    /// Response body bytes sent.
    pub bytes: usize,
    /// From the request header to the end of the response.
    pub duration_ms: f64,
    /// The last upstream attempt: until its response header (or failure).
    pub upstream_ms: Option<f64>,
    /// Upstream attempts made.
    pub attempts: usize,
    /// The token's subject.
    pub user_id: Option<&'a str>,
    /// The caller's tier (`anonymous` without a token).
    pub tier: &'a str,
    /// `allowed`, `rejected`, or none when the route is not limited.
    pub rate_limit: Option<&'static str>,
    /// What went wrong, when the gateway made the response itself.
    pub error: Option<&'a str>,
}

impl AccessLog {
    /// Opens the target and starts the writer thread.
    pub fn open(settings: &AccessLogSettings, dropped: IntCounter) -> std::io::Result<Self> {
        let out: Box<dyn Write + Send> = match &settings.target {
            LogTarget::Stdout => Box::new(std::io::stdout()),
            LogTarget::Stderr => Box::new(std::io::stderr()),
            LogTarget::File(path) => Box::new(open_file(path)?),
        };
        let (tx, rx) = mpsc::sync_channel(settings.buffer);
        std::thread::Builder::new()
            .name("tiergate-access-log".into())
            .spawn(move || write_loop(&rx, out))?;
        Ok(Self {
            tx,
            sample: settings.sample,
            always_log_errors: settings.always_log_errors,
            dropped,
        })
    }

    /// Whether a request with this status is logged (sampling).
    pub fn wants(&self, status: u16) -> bool {
        (self.always_log_errors && (status >= 500 || status == 0))
            || self.sample >= 1.0
            || (self.sample > 0.0 && fastrand::f64() < self.sample)
    }

    /// Queues one line; drops (and counts) it when the writer is behind.
    pub fn log(&self, entry: &Entry<'_>) {
        match self.tx.try_send(entry.to_json()) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.dropped.inc(),
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

fn open_file(path: &PathBuf) -> std::io::Result<std::fs::File> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    OpenOptions::new().create(true).append(true).open(path)
}

fn write_loop(rx: &Receiver<String>, out: Box<dyn Write + Send>) {
    let mut out = BufWriter::with_capacity(64 * 1024, out);
    let mut failing = false;
    loop {
        let mut result = Ok(());
        let mut wrote = false;
        loop {
            match rx.try_recv() {
                Ok(line) => {
                    wrote = true;
                    result = result.and_then(|()| out.write_all(line.as_bytes()));
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    let _ = out.flush();
                    return;
                }
            }
        }
        if !wrote {
            std::thread::sleep(DRAIN_INTERVAL);
            continue;
        }
        result = result.and_then(|()| out.flush());
        match result {
            Err(e) if !failing => {
                failing = true;
                tracing::error!(error = %e, "access log: cannot write; lines are lost until it works again");
            }
            Ok(()) if failing => {
                failing = false;
                tracing::info!("access log: writing again");
            }
            _ => {}
        }
    }
}

impl Entry<'_> {
    /// The JSON line, newline included. Hand-written: this runs for every
    /// request, and `core::fmt` made it the costliest part of the log.
    pub fn to_json(&self) -> String {
        let mut s = String::with_capacity(400);
        s.push_str("{\"time\":\"");
        push_time(&mut s, self.time);
        s.push_str("\",\"request_id\":");
        json_str(&mut s, self.request_id);
        s.push_str(",\"trace_id\":");
        json_str(&mut s, self.trace_id);
        s.push_str(",\"client_ip\":");
        match self.client_ip {
            Some(ip) => {
                s.push('"');
                push_ip(&mut s, ip);
                s.push('"');
            }
            None => s.push_str("null"),
        }
        s.push_str(",\"method\":");
        json_str(&mut s, self.method);
        s.push_str(",\"path\":");
        json_str(&mut s, self.path);
        s.push_str(",\"route\":");
        json_opt(&mut s, self.route);
        s.push_str(",\"upstream\":");
        json_opt(&mut s, self.upstream);
        s.push_str(",\"backend\":");
        json_opt(&mut s, self.backend);
        let mut b = itoa::Buffer::new();
        s.push_str(",\"status\":");
        s.push_str(b.format(self.status));
        s.push_str(",\"bytes\":");
        s.push_str(b.format(self.bytes));
        s.push_str(",\"duration_ms\":");
        push_millis(&mut s, self.duration_ms);
        s.push_str(",\"upstream_ms\":");
        match self.upstream_ms {
            Some(ms) => push_millis(&mut s, ms),
            None => s.push_str("null"),
        }
        s.push_str(",\"attempts\":");
        s.push_str(b.format(self.attempts));
        s.push_str(",\"user_id\":");
        json_opt(&mut s, self.user_id);
        s.push_str(",\"tier\":");
        json_str(&mut s, self.tier);
        s.push_str(",\"rate_limit\":");
        json_opt(&mut s, self.rate_limit);
        s.push_str(",\"error\":");
        json_opt(&mut s, self.error);
        s.push_str("}\n");
        s
    }
}

/// Appends an address as text (IPv4 without `core::fmt`).
pub fn push_ip(s: &mut String, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            let mut b = itoa::Buffer::new();
            for (i, o) in v4.octets().iter().enumerate() {
                if i > 0 {
                    s.push('.');
                }
                s.push_str(b.format(*o));
            }
        }
        IpAddr::V6(v6) => {
            let _ = write!(s, "{v6}");
        }
    }
}

/// RFC 3339 UTC with milliseconds. The part up to the seconds is formatted
/// once per second per thread.
fn push_time(s: &mut String, t: SystemTime) {
    thread_local! {
        static SECOND: std::cell::RefCell<(u64, String)> =
            const { std::cell::RefCell::new((u64::MAX, String::new())) };
    }
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    SECOND.with_borrow_mut(|(cached, text)| {
        if *cached != secs {
            *cached = secs;
            text.clear();
            let whole = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs);
            let _ = write!(text, "{}", humantime::format_rfc3339_seconds(whole));
            text.pop(); // the `Z`
        }
        s.push_str(text);
    });
    let ms = since.subsec_millis();
    s.push('.');
    push_digits(s, ms, 3);
    s.push('Z');
}

/// A non-negative duration in ms with three decimals (microseconds).
fn push_millis(s: &mut String, ms: f64) {
    let micros = (ms.max(0.0) * 1000.0).round() as u64;
    s.push_str(itoa::Buffer::new().format(micros / 1000));
    s.push('.');
    push_digits(s, (micros % 1000) as u32, 3);
}

/// `n` zero-padded to `width` digits.
fn push_digits(s: &mut String, n: u32, width: u32) {
    for i in (0..width).rev() {
        let d = (n / 10u32.pow(i)) % 10;
        s.push(char::from(b'0' + d as u8));
    }
}

fn json_opt(s: &mut String, v: Option<&str>) {
    match v {
        Some(v) => json_str(s, v),
        None => s.push_str("null"),
    }
}

/// A JSON string literal (quotes, backslashes and control characters escaped).
fn json_str(s: &mut String, v: &str) {
    s.push('"');
    if !v.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
        s.push_str(v);
        s.push('"');
        return;
    }
    for c in v.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            '\r' => s.push_str("\\r"),
            '\t' => s.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(s, "\\u{:04x}", c as u32);
            }
            c => s.push(c),
        }
    }
    s.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry<'static> {
        Entry {
            time: SystemTime::UNIX_EPOCH,
            request_id: "r\"1",
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736",
            client_ip: Some(IpAddr::from([10, 0, 0, 1])),
            method: "GET",
            path: "/a\\b\u{1}\n",
            route: Some("users"),
            upstream: Some("users"),
            backend: None,
            status: 200,
            bytes: 12,
            duration_ms: 1.23456,
            upstream_ms: Some(0.5),
            attempts: 1,
            user_id: Some("u-1"),
            tier: "FREE",
            rate_limit: Some("allowed"),
            error: None,
        }
    }

    #[test]
    fn test_line_is_json_with_every_field() {
        let line = entry().to_json();
        assert!(line.ends_with("}\n"));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["time"], "1970-01-01T00:00:00.000Z");
        assert_eq!(v["request_id"], "r\"1");
        assert_eq!(v["path"], "/a\\b\u{1}\n");
        assert_eq!(v["client_ip"], "10.0.0.1");
        assert_eq!(v["backend"], serde_json::Value::Null);
        assert_eq!(v["duration_ms"], 1.235);
        assert_eq!(v["upstream_ms"], 0.5);
        assert_eq!(v["rate_limit"], "allowed");
        assert_eq!(v.as_object().unwrap().len(), 18);
    }

    #[test]
    fn test_time_and_millis_formatting() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_795_556_361_007);
        let mut s = String::new();
        push_time(&mut s, t);
        push_time(&mut s, t + std::time::Duration::from_millis(1_000));
        assert_eq!(s, "2026-11-24T21:39:21.007Z2026-11-24T21:39:22.007Z");
        let mut s = String::new();
        for ms in [0.0, 0.0004, 1234.5678, -1.0] {
            push_millis(&mut s, ms);
            s.push(' ');
        }
        assert_eq!(s, "0.000 0.000 1234.568 0.000 ");
        let mut s = String::new();
        json_str(&mut s, "plain");
        json_str(&mut s, "é\u{7f}");
        assert_eq!(s, "\"plain\"\"é\u{7f}\"");
    }

    #[test]
    fn test_sampling_keeps_errors_and_respects_the_ratio() {
        let (tx, _rx) = mpsc::sync_channel(1);
        let counter = IntCounter::new("d", "d").unwrap();
        let log = AccessLog {
            tx,
            sample: 0.0,
            always_log_errors: true,
            dropped: counter.clone(),
        };
        assert!(!log.wants(200));
        assert!(log.wants(502));
        assert!(log.wants(0));
        let half = AccessLog { sample: 0.5, ..log };
        let kept = (0..10_000).filter(|_| half.wants(200)).count();
        assert!((4_500..5_500).contains(&kept), "{kept}");
        // A full queue drops and counts instead of blocking.
        half.log(&entry());
        half.log(&entry());
        assert_eq!(counter.get(), 1);
    }
}
