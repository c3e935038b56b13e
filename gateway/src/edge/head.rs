//! Reading a request head under limits: the client's bytes pass through
//! [`Guarded`] on their way to Pingora's HTTP/1 parser, and no byte of a
//! head reaches the parser before the whole head has arrived and passed
//! [`Scan`]: its request line, header lines, count and total size, and the
//! bytes of the request line. A head that breaks a limit, or that does not
//! arrive within the head timeout, is answered here (431, 414, 400, 408,
//! the JSON envelope) and the connection closed; Pingora sees a client
//! that went away before sending anything, which it drops quietly.
//!
//! The common case costs one scan of the head and no copy: a head that
//! arrives in one read is scanned where Pingora's read put it. Only a head
//! split over several reads is kept aside (`stash`) until it is complete.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{refusal_bytes, EdgeCounters, Refusal};
use crate::config::EdgeSettings;

/// What [`Scan::feed`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scanned {
    /// The head is not complete yet, and within limits so far.
    Incomplete,
    /// The head ends after this many bytes of what was fed.
    Complete(usize),
    /// It breaks a limit.
    Refused(Refusal),
}

/// An incremental check of one request head. Feed it the head so far
/// (always from the head's first byte; it resumes where it stopped).
#[derive(Debug, Default, Clone)]
pub struct Scan {
    /// Where the line being read starts.
    line_start: usize,
    /// Whether the request line was read.
    request_line: bool,
    /// Header lines read.
    headers: usize,
    /// `Host` headers read.
    hosts: usize,
}

impl Scan {
    /// Checks `head` (the bytes of this head so far, from its start) under
    /// `limits`.
    pub fn feed(&mut self, head: &[u8], limits: &EdgeSettings) -> Scanned {
        while let Some(n) = memchr::memchr(b'\n', &head[self.line_start..]) {
            let end = self.line_start + n;
            let line = &head[self.line_start..end];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let next = end + 1;
            if next > limits.head_bytes {
                return Scanned::Refused(Refusal::HeadTooLarge);
            }
            if !self.request_line {
                if !line.is_empty() {
                    if line.len() > limits.request_line_bytes {
                        return Scanned::Refused(Refusal::RequestLineTooLong);
                    }
                    if let Some(why) = bad_request_line(line) {
                        return Scanned::Refused(why);
                    }
                    self.request_line = true;
                }
                // Empty lines before the request line are ignored (RFC
                // 9112 §2.2), counted in the head's size.
            } else if line.is_empty() {
                return Scanned::Complete(next);
            } else {
                if line.len() > limits.header_line_bytes {
                    return Scanned::Refused(Refusal::HeaderLineTooLong);
                }
                self.headers += 1;
                if self.headers > limits.headers {
                    return Scanned::Refused(Refusal::TooManyHeaders);
                }
                // Two `Host`s: which one routes and which one a backend
                // reads would be anybody's guess (RFC 9112 §3.2: 400).
                if line.len() >= 5 && line[..5].eq_ignore_ascii_case(b"host:") {
                    self.hosts += 1;
                    if self.hosts > 1 {
                        return Scanned::Refused(Refusal::DuplicateHost);
                    }
                }
            }
            self.line_start = next;
        }
        // The line being read is not complete: refuse as soon as it is
        // too long, without waiting for its end.
        let partial = head.len() - self.line_start;
        if head.len() > limits.head_bytes {
            return Scanned::Refused(Refusal::HeadTooLarge);
        }
        if !self.request_line && partial > limits.request_line_bytes {
            return Scanned::Refused(Refusal::RequestLineTooLong);
        }
        if self.request_line && partial > limits.header_line_bytes {
            return Scanned::Refused(Refusal::HeaderLineTooLong);
        }
        Scanned::Incomplete
    }
}

/// A request line's bytes: no control byte or DEL anywhere, and no byte
/// outside ASCII in the target's path (the query is the upstream's to
/// decode; the path must be percent-encoded).
fn bad_request_line(line: &[u8]) -> Option<Refusal> {
    if line.iter().any(|&b| b < 0x20 || b == 0x7F) {
        return Some(Refusal::ControlInRequestLine);
    }
    let target = line.split(|&b| b == b' ').nth(1).unwrap_or_default();
    let path = target.split(|&b| b == b'?').next().unwrap_or_default();
    if !path.is_ascii() {
        return Some(Refusal::RawNonAsciiPath);
    }
    None
}

/// Where the head of the current request stands.
enum Phase {
    /// Reading a head; nothing of it given to the reader yet.
    Head,
    /// The head (and maybe more) waits in `stash` from `offset`, to be read.
    Deliver(usize),
    /// Past the head: bytes flow through.
    Body,
    /// Writing the refusal from `offset`, then end of stream.
    Refusing(Refusal, usize),
    /// The refusal is out and our side closed: reading (and dropping) what
    /// the client still sends, so closing does not reset the connection
    /// before the client read the refusal (a "lingering close").
    Lingering(usize),
    /// Refused: end of stream from now on.
    Done,
}

/// Longest a refused connection lingers.
const LINGER: Duration = Duration::from_secs(2);
/// Most bytes read while lingering.
const LINGER_BYTES: usize = 1 << 20;

/// A client connection whose request heads are read under
/// [`EdgeSettings`] limits (see the module docs). Everything else is the
/// wrapped stream's.
pub struct Guarded {
    inner: Stream,
    limits: EdgeSettings,
    counters: Arc<EdgeCounters>,
    phase: Phase,
    scan: Scan,
    /// A head that came in several reads, kept until complete.
    stash: Vec<u8>,
    /// The refusal's bytes while it is written.
    refusal: Vec<u8>,
    /// The head timeout, armed at the head's first byte (or at the
    /// connection's start for its first request).
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl std::fmt::Debug for Guarded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guarded")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl Guarded {
    /// Wraps a new connection; its first head must arrive within the head
    /// timeout from now.
    pub fn new(inner: Stream, limits: EdgeSettings, counters: Arc<EdgeCounters>) -> Self {
        Self {
            inner,
            limits,
            counters,
            phase: Phase::Head,
            scan: Scan::default(),
            stash: Vec::new(),
            refusal: Vec::new(),
            timer: Some(Box::pin(tokio::time::sleep(limits.head_timeout))),
        }
    }

    /// The connection is reused: the next bytes are a new request head,
    /// whose timeout starts with its first byte.
    pub fn next_request(&mut self) {
        if matches!(
            self.phase,
            Phase::Refusing(..) | Phase::Lingering(_) | Phase::Done
        ) {
            return;
        }
        self.phase = Phase::Head;
        self.scan = Scan::default();
        self.stash.clear();
        self.timer = None;
    }

    fn arm_timer(&mut self) {
        if self.timer.is_none() {
            self.timer = Some(Box::pin(tokio::time::sleep(self.limits.head_timeout)));
        }
    }

    fn refuse(&mut self, why: Refusal) {
        self.counters.refused(why);
        self.refusal = refusal_bytes(why);
        self.phase = Phase::Refusing(why, 0);
        self.timer = None;
        self.stash = Vec::new();
    }

    /// Polls the head timer; `true` when it fired.
    fn timed_out(&mut self, cx: &mut Context<'_>) -> bool {
        self.timer
            .as_mut()
            .is_some_and(|t| t.as_mut().poll(cx).is_ready())
    }

    /// Writes the refusal; ready (end of stream) once it is out.
    fn poll_refusal(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Phase::Refusing(why, offset) = self.phase {
            if offset < self.refusal.len() {
                match Pin::new(&mut self.inner).poll_write(cx, &self.refusal[offset..]) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => self.phase = Phase::Done,
                    Poll::Ready(Ok(n)) => self.phase = Phase::Refusing(why, offset + n),
                    Poll::Pending => return Poll::Pending,
                }
            } else {
                match Pin::new(&mut self.inner).poll_flush(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(_)) => self.phase = Phase::Done,
                    Poll::Ready(Ok(())) => {
                        if Pin::new(&mut self.inner).poll_shutdown(cx).is_pending() {
                            return Poll::Pending;
                        }
                        self.timer = Some(Box::pin(tokio::time::sleep(LINGER)));
                        self.phase = Phase::Lingering(0);
                    }
                }
            }
        }
        while let Phase::Lingering(read) = self.phase {
            let mut scratch = [0u8; 4096];
            let mut rb = ReadBuf::new(&mut scratch);
            match Pin::new(&mut self.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if !rb.filled().is_empty() && read < LINGER_BYTES => {
                    self.phase = Phase::Lingering(read + rb.filled().len());
                }
                Poll::Ready(_) => self.phase = Phase::Done,
                Poll::Pending => {
                    if !self.timed_out(cx) {
                        return Poll::Pending;
                    }
                    self.phase = Phase::Done;
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Copies what is stashed into `buf`.
    fn deliver(&mut self, offset: usize, buf: &mut ReadBuf<'_>) {
        let n = buf.remaining().min(self.stash.len() - offset);
        buf.put_slice(&self.stash[offset..offset + n]);
        if offset + n == self.stash.len() {
            self.stash.clear();
            self.phase = Phase::Body;
        } else {
            self.phase = Phase::Deliver(offset + n);
        }
    }

    /// A head arrived complete: stop the timer; bytes after it flow.
    fn head_done(&mut self) {
        self.timer = None;
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            match this.phase {
                Phase::Body => return Pin::new(&mut this.inner).poll_read(cx, buf),
                Phase::Deliver(offset) => {
                    this.deliver(offset, buf);
                    return Poll::Ready(Ok(()));
                }
                Phase::Refusing(..) | Phase::Lingering(_) => return this.poll_refusal(cx),
                Phase::Done => return Poll::Ready(Ok(())),
                Phase::Head => {}
            }
            let before = buf.filled().len();
            match Pin::new(&mut this.inner).poll_read(cx, buf) {
                Poll::Pending => {
                    if this.timed_out(cx) {
                        if this.stash.is_empty() {
                            // Nothing of a request came: close quietly.
                            this.counters.refused(Refusal::HeadTimeout);
                            this.phase = Phase::Done;
                        } else {
                            this.refuse(Refusal::HeadTimeout);
                        }
                        continue;
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            let new = buf.filled().len() - before;
            if new == 0 {
                // End of stream. A partial head is dropped, unseen.
                this.phase = Phase::Done;
                buf.set_filled(before);
                return Poll::Ready(Ok(()));
            }
            if this.stash.is_empty() {
                // The usual case: scan where the read put the bytes.
                let scanned = this.scan.feed(&buf.filled()[before..], &this.limits);
                match scanned {
                    Scanned::Complete(_) => {
                        this.head_done();
                        this.phase = Phase::Body;
                        return Poll::Ready(Ok(()));
                    }
                    Scanned::Incomplete => {
                        this.stash.extend_from_slice(&buf.filled()[before..]);
                        buf.set_filled(before);
                        this.arm_timer();
                    }
                    Scanned::Refused(why) => {
                        buf.set_filled(before);
                        this.refuse(why);
                    }
                }
            } else {
                this.stash.extend_from_slice(&buf.filled()[before..]);
                buf.set_filled(before);
                match this.scan.feed(&this.stash, &this.limits) {
                    Scanned::Complete(_) => {
                        this.head_done();
                        this.deliver(0, buf);
                        return Poll::Ready(Ok(()));
                    }
                    Scanned::Incomplete => {}
                    Scanned::Refused(why) => this.refuse(why),
                }
            }
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for Guarded {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await;
    }
}

impl UniqueID for Guarded {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Guarded {
    fn get_ssl(&self) -> Option<&pingora_core::protocols::tls::TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<pingora_core::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for Guarded {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for Guarded {
    fn get_proxy_digest(&self) -> Option<Arc<pingora_core::protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: pingora_core::protocols::raw_connect::ProxyDigest) {
        self.inner.set_proxy_digest(digest);
    }
}

impl GetSocketDigest for Guarded {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest);
    }
}

#[async_trait]
impl Peek for Guarded {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> EdgeSettings {
        crate::config::parse(
            "upstreams: {p: {backends: [{address: \"127.0.0.1:1\"}]}}\nroutes: [{name: r, match: {}, upstream: p}]\nserver: {limits: {request_line_bytes: 300, header_line_bytes: 300, head_bytes: 1024, headers: 4}}\n",
        )
        .unwrap()
        .server
        .edge
    }

    fn scan_whole(head: &[u8]) -> Scanned {
        Scan::default().feed(head, &limits())
    }

    #[test]
    fn test_heads_within_limits_complete_where_they_end() {
        let head = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nBODY";
        assert_eq!(scan_whole(head), Scanned::Complete(head.len() - 4));
        // Bare LF line ends and leading empty lines are accepted.
        let head = b"\r\n\nGET / HTTP/1.1\nHost: x\n\n";
        assert_eq!(scan_whole(head), Scanned::Complete(head.len()));
        assert_eq!(
            scan_whole(b"GET / HTTP/1.1\r\nHost: x\r\n"),
            Scanned::Incomplete
        );
    }

    #[test]
    fn test_a_head_fed_a_byte_at_a_time_gives_the_same_answers() {
        let limits = limits();
        for head in [
            &b"GET /a HTTP/1.1\r\nHost: x\r\nA: b\r\n\r\n"[..],
            b"GET /a HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\nE: 5\r\n\r\n",
        ] {
            let whole = Scan::default().feed(head, &limits);
            let mut scan = Scan::default();
            let mut last = Scanned::Incomplete;
            for end in 1..=head.len() {
                last = scan.feed(&head[..end], &limits);
                if last != Scanned::Incomplete {
                    break;
                }
            }
            assert_eq!(last, whole);
        }
    }

    #[test]
    fn test_each_limit_refuses_with_its_reason() {
        let long_target = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(400));
        let long_header = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "b".repeat(400));
        let many = "GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\nE: 5\r\n\r\n".to_owned();
        let big = format!(
            "GET / HTTP/1.1\r\n{}\r\n",
            (0..4)
                .map(|i| format!("H{i}: {}\r\n", "c".repeat(280)))
                .collect::<String>()
        );
        let cases = [
            (long_target.as_bytes(), Refusal::RequestLineTooLong),
            (long_header.as_bytes(), Refusal::HeaderLineTooLong),
            (many.as_bytes(), Refusal::TooManyHeaders),
            (big.as_bytes(), Refusal::HeadTooLarge),
            (b"GET /a\0b HTTP/1.1\r\n\r\n", Refusal::ControlInRequestLine),
            (
                b"GET /a\x7f HTTP/1.1\r\n\r\n",
                Refusal::ControlInRequestLine,
            ),
            (b"GET /a\tb HTTP/1.1\r\n\r\n", Refusal::ControlInRequestLine),
            (
                b"GET / HTTP/1.1\r\nHost: a\r\nhOST: b\r\n\r\n",
                Refusal::DuplicateHost,
            ),
            (
                "GET /caf\u{e9} HTTP/1.1\r\n\r\n".as_bytes(),
                Refusal::RawNonAsciiPath,
            ),
        ];
        for (head, why) in cases {
            assert_eq!(
                scan_whole(head),
                Scanned::Refused(why),
                "{}",
                String::from_utf8_lossy(head)
            );
        }
        // Non-ASCII in the query is the upstream's business.
        assert!(matches!(
            scan_whole("GET /a?q=caf\u{e9} HTTP/1.1\r\n\r\n".as_bytes()),
            Scanned::Complete(_)
        ));
        // A line that is already too long is refused before it ends.
        let partial = format!("GET /{}", "a".repeat(400));
        assert_eq!(
            scan_whole(partial.as_bytes()),
            Scanned::Refused(Refusal::RequestLineTooLong)
        );
    }
}
