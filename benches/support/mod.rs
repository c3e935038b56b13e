//! Shared by the load benchmarks (`load`, `users`, `billing`): minimal
//! HTTP/1.1 framing, an open-loop fixed-rate client, and real service
//! processes ([`services`]).
// Each bench uses a different subset.
#![allow(dead_code)]

use std::time::Duration;

pub mod services;

/// How long one request may take before it counts as an error.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Minimal HTTP/1.1 framing shared by the upstream server and the fixed-rate client.
pub mod http1 {
    use anyhow::{bail, Context, Result};

    /// One complete message at the start of a buffer.
    pub struct Message {
        pub len: usize,
        pub status: u16,
        pub keep_alive: bool,
    }

    struct Head<'a> {
        first_line: &'a [u8],
        content_length: Option<usize>,
        chunked: bool,
        close: bool,
        keep_alive: bool,
    }

    impl Head<'_> {
        /// HTTP/1.1 defaults to keep-alive, HTTP/1.0 to close.
        fn keeps_alive(&self) -> bool {
            let http10 = self.first_line.starts_with(b"HTTP/1.0") // response
                || self.first_line.ends_with(b"HTTP/1.0"); // request
            if http10 {
                self.keep_alive
            } else {
                !self.close
            }
        }
    }

    fn find(buf: &[u8], pat: &[u8], from: usize) -> Option<usize> {
        buf.get(from..)?
            .windows(pat.len())
            .position(|w| w == pat)
            .map(|p| p + from)
    }

    fn contains_ci(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len())
            .any(|w| w.eq_ignore_ascii_case(needle))
    }

    fn scan(head: &[u8]) -> Result<Head<'_>> {
        let mut lines = head
            .split(|&b| b == b'\n')
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
        let mut h = Head {
            first_line: lines.next().unwrap_or_default(),
            content_length: None,
            chunked: false,
            close: false,
            keep_alive: false,
        };
        for line in lines {
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                continue;
            };
            let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
            if name.eq_ignore_ascii_case(b"content-length") {
                let v = std::str::from_utf8(value).context("non-UTF-8 Content-Length")?;
                h.content_length = Some(v.parse().context("bad Content-Length")?);
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                h.chunked |= contains_ci(value, b"chunked");
            } else if name.eq_ignore_ascii_case(b"connection") {
                h.close |= contains_ci(value, b"close");
                h.keep_alive |= contains_ci(value, b"keep-alive");
            }
        }
        Ok(h)
    }

    /// Parses one request; `Ok(None)` while incomplete. Bodies are skipped by Content-Length.
    pub fn parse_request(buf: &[u8]) -> Result<Option<Message>> {
        let Some(end) = find(buf, b"\r\n\r\n", 0).map(|p| p + 4) else {
            return Ok(None);
        };
        let h = scan(&buf[..end])?;
        if h.chunked {
            bail!("chunked request bodies are not supported");
        }
        let len = end + h.content_length.unwrap_or(0);
        let keep_alive = h.keeps_alive();
        Ok((buf.len() >= len).then_some(Message {
            len,
            status: 0,
            keep_alive,
        }))
    }

    /// Parses one response (Content-Length or chunked body); `Ok(None)` while incomplete.
    pub fn parse_response(buf: &[u8]) -> Result<Option<Message>> {
        let Some(end) = find(buf, b"\r\n\r\n", 0).map(|p| p + 4) else {
            return Ok(None);
        };
        let h = scan(&buf[..end])?;
        let status: u16 = std::str::from_utf8(h.first_line)
            .ok()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .context("bad HTTP status line")?;
        let body = if status == 204 || status == 304 {
            Some(0)
        } else if h.chunked {
            chunked_len(&buf[end..])?
        } else {
            Some(
                h.content_length
                    .context("response has no Content-Length (unsupported)")?,
            )
        };
        Ok(body.filter(|b| buf.len() >= end + b).map(|b| Message {
            len: end + b,
            status,
            keep_alive: h.keeps_alive(),
        }))
    }

    /// Length of a complete chunked body (incl. trailers), or `None` if more bytes are needed.
    fn chunked_len(b: &[u8]) -> Result<Option<usize>> {
        let mut pos = 0;
        loop {
            let Some(eol) = find(b, b"\r\n", pos) else {
                return Ok(None);
            };
            let line = &b[pos..eol];
            let hex = line.split(|&c| c == b';').next().unwrap_or_default();
            let size = usize::from_str_radix(std::str::from_utf8(hex)?.trim(), 16)
                .context("bad chunk size")?;
            pos = eol + 2;
            if size == 0 {
                loop {
                    let Some(eol) = find(b, b"\r\n", pos) else {
                        return Ok(None);
                    };
                    if eol == pos {
                        return Ok(Some(pos + 2));
                    }
                    pos = eol + 2;
                }
            }
            pos += size + 2;
            if b.len() < pos {
                return Ok(None);
            }
        }
    }
}

/// Open-loop fixed-rate latency measurement with a raw HTTP/1.1 keep-alive client.
pub mod fixed {
    use super::{http1, REQUEST_TIMEOUT};
    use anyhow::{bail, Context, Result};
    use std::net::SocketAddr;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::time::{sleep_until, timeout, Instant};

    pub struct Client {
        stream: TcpStream,
        buf: Vec<u8>,
    }

    impl Client {
        pub async fn connect(addr: SocketAddr) -> Result<Self> {
            let stream = timeout(Duration::from_secs(1), TcpStream::connect(addr))
                .await
                .context("connect timed out")?
                .with_context(|| format!("connect {addr}"))?;
            stream.set_nodelay(true)?;
            Ok(Client {
                stream,
                buf: Vec::with_capacity(4096),
            })
        }

        /// Sends one request, returns (status, server wants to close).
        pub async fn request(&mut self, req: &[u8]) -> Result<(u16, bool)> {
            self.stream.write_all(req).await?;
            loop {
                if let Some(m) = http1::parse_response(&self.buf)? {
                    self.buf.drain(..m.len);
                    return Ok((m.status, !m.keep_alive));
                }
                self.buf.reserve(4096);
                if self.stream.read_buf(&mut self.buf).await? == 0 {
                    bail!("connection closed mid-response");
                }
            }
        }
    }

    #[derive(Default)]
    pub struct FixedResult {
        pub latencies_ns: Vec<u64>,
        pub non_200: u64,
        pub errors: u64,
        pub first_error: Option<String>,
    }

    impl FixedResult {
        /// Percentile in ms (`q` in 0..=1) of successful requests.
        pub fn pct_ms(&self, q: f64) -> f64 {
            let n = self.latencies_ns.len();
            if n == 0 {
                return f64::NAN;
            }
            let idx = ((q * n as f64).ceil() as usize).clamp(1, n) - 1;
            self.latencies_ns[idx] as f64 / 1e6
        }

        fn merge(&mut self, other: FixedResult) {
            self.latencies_ns.extend(other.latencies_ns);
            self.non_200 += other.non_200;
            self.errors += other.errors;
            self.first_error = self.first_error.take().or(other.first_error);
        }
    }

    /// Sends `req` over `conns` keep-alive connections at `rate` req/s in
    /// total for `dur`; a 200 counts as success.
    pub async fn run(
        addr: SocketAddr,
        req: Vec<u8>,
        rate: u32,
        conns: usize,
        dur: Duration,
    ) -> Result<FixedResult> {
        let interval = Duration::from_secs_f64(conns as f64 / f64::from(rate));
        let start = Instant::now() + Duration::from_millis(200);
        let end = start + dur;
        let mut set = tokio::task::JoinSet::new();
        for i in 0..conns {
            let first = start + interval.mul_f64(i as f64 / conns as f64);
            set.spawn(connection(addr, req.clone(), first, interval, end));
        }
        let mut total = FixedResult::default();
        let all = async {
            while let Some(r) = set.join_next().await {
                total.merge(r.context("fixed-rate task panicked")?);
            }
            Ok::<_, anyhow::Error>(())
        };
        timeout(dur + Duration::from_secs(10), all)
            .await
            .context("fixed-rate run did not finish in time")??;
        total.latencies_ns.sort_unstable();
        Ok(total)
    }

    async fn connection(
        addr: SocketAddr,
        req: Vec<u8>,
        first: Instant,
        every: Duration,
        end: Instant,
    ) -> FixedResult {
        let mut res = FixedResult::default();
        // Connect before the schedule starts so connection setup is not timed.
        let mut client = Client::connect(addr).await.ok();
        let (mut next, mut prev_done) = (first, Instant::now());
        while next < end {
            sleep_until(next).await;
            // Busy at the scheduled time => count the queueing; else ignore client timer slack.
            let t0 = if prev_done > next {
                next
            } else {
                Instant::now()
            };
            let outcome = timeout(REQUEST_TIMEOUT, async {
                if client.is_none() {
                    client = Some(Client::connect(addr).await?);
                }
                match client.as_mut() {
                    Some(c) => c.request(&req).await,
                    None => bail!("no connection"),
                }
            })
            .await;
            let done = Instant::now();
            match outcome {
                Ok(Ok((200, close))) => {
                    res.latencies_ns.push((done - t0).as_nanos() as u64);
                    if close {
                        client = None;
                    }
                }
                Ok(Ok((status, _))) => {
                    res.non_200 += 1;
                    res.first_error
                        .get_or_insert(format!("HTTP status {status}"));
                    client = None;
                }
                Ok(Err(e)) => {
                    res.errors += 1;
                    res.first_error.get_or_insert(format!("{e:#}"));
                    client = None;
                }
                Err(_) => {
                    res.errors += 1;
                    res.first_error
                        .get_or_insert("request timed out (2 s)".into());
                    client = None;
                }
            }
            prev_done = done;
            next += every;
        }
        res
    }
}
