//! W3C Trace Context (`traceparent`): a request's trace is continued when
//! the client sent a valid `traceparent`, else started here. The gateway is
//! one hop of the trace: the upstream gets the same trace id with a new
//! parent id (the gateway's span), so its spans hang below the gateway's.
//! `tracestate` passes through untouched.

use http::HeaderValue;

/// `traceparent`.
pub static TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");

/// The sampled flag.
const SAMPLED: u8 = 0x01;
/// The flags defined so far (sampled; random trace id, Trace Context
/// level 2). Others are reserved and must be propagated as zero.
const KNOWN_FLAGS: u8 = 0x03;

/// One request's place in a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    /// The trace, 16 bytes, never all zero.
    pub trace_id: [u8; 16],
    /// The gateway's span id for this request (the upstream's parent).
    pub span_id: [u8; 8],
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
}

impl TraceContext {
    /// Continues the client's trace when `header` is a valid `traceparent`,
    /// else starts a new sampled one. Either way the span id is new.
    pub fn continue_or_start(header: Option<&HeaderValue>) -> Self {
        let (trace_id, flags) = match header.and_then(|h| parse(h.as_bytes())) {
            Some((trace_id, _parent, flags)) => (trace_id, flags & KNOWN_FLAGS),
            None => (random_nonzero(), SAMPLED),
        };
        Self {
            trace_id,
            span_id: random_nonzero(),
            flags,
        }
    }

    /// The trace id as 32 lowercase hex digits.
    pub fn trace_id_hex(&self) -> TraceIdHex {
        let mut out = [0u8; 32];
        hex_into(&self.trace_id, &mut out);
        TraceIdHex(out)
    }

    /// The `traceparent` to send upstream: version 00, this trace, the
    /// gateway's span as parent, the flags.
    pub fn header(&self) -> HeaderValue {
        let mut out = [0u8; 55];
        out[..3].copy_from_slice(b"00-");
        hex_into(&self.trace_id, &mut out[3..35]);
        out[35] = b'-';
        hex_into(&self.span_id, &mut out[36..52]);
        out[52] = b'-';
        hex_into(&[self.flags], &mut out[53..55]);
        HeaderValue::from_bytes(&out).unwrap_or_else(|_| HeaderValue::from_static(""))
    }
}

/// A trace id as text, on the stack (for bodies and log lines).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceIdHex([u8; 32]);

impl TraceIdHex {
    /// All zeros: the W3C "no trace" value, for logs of untraced requests.
    pub const NONE: Self = Self([b'0'; 32]);

    /// The 32 hex digits.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or("")
    }
}

/// Parses `version-traceid-parentid-flags`. Version `ff` and all-zero ids
/// are invalid; a future version (not 00) is read by its first four fields,
/// as the spec asks, and may carry more after a dash.
fn parse(v: &[u8]) -> Option<([u8; 16], [u8; 8], u8)> {
    if v.len() < 55 {
        return None;
    }
    let version = unhex::<1>(&v[0..2])?[0];
    if version == 0xff || (version == 0 && v.len() != 55) || (v.len() > 55 && v[55] != b'-') {
        return None;
    }
    if v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let trace_id = unhex::<16>(&v[3..35])?;
    let parent = unhex::<8>(&v[36..52])?;
    let flags = unhex::<1>(&v[53..55])?[0];
    if trace_id == [0; 16] || parent == [0; 8] {
        return None;
    }
    Some((trace_id, parent, flags))
}

/// Lowercase hex only (the spec forbids uppercase).
fn unhex<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    fn digit(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

fn hex_into(bytes: &[u8], out: &mut [u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = HEX[usize::from(b >> 4)];
        out[2 * i + 1] = HEX[usize::from(b & 0xf)];
    }
}

fn random_nonzero<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    while out.iter().all(|&b| b == 0) {
        fastrand::fill(&mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn test_valid_traceparent_is_continued_with_a_new_span() {
        let t = TraceContext::continue_or_start(Some(&HeaderValue::from_static(SAMPLE)));
        assert_eq!(
            t.trace_id_hex().as_str(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(t.flags, 1);
        let out = t.header();
        let out = out.to_str().unwrap();
        assert_eq!(out.len(), 55);
        assert!(out.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(out.ends_with("-01"));
        assert_ne!(
            &out[36..52],
            "00f067aa0ba902b7",
            "the upstream's parent is our span"
        );
        // Round trip.
        assert_eq!(parse(out.as_bytes()).map(|p| p.0), Some(t.trace_id));
    }

    #[test]
    fn test_unsampled_flag_is_kept() {
        let h = HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00");
        let t = TraceContext::continue_or_start(Some(&h));
        assert_eq!(t.flags, 0);
        assert!(t.header().to_str().unwrap().ends_with("-00"));
        // Reserved flags are not passed on.
        let h = HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-ff");
        assert!(TraceContext::continue_or_start(Some(&h))
            .header()
            .to_str()
            .unwrap()
            .ends_with("-03"));
    }

    #[test]
    fn test_invalid_traceparents_start_a_new_trace() {
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
        ] {
            assert_eq!(parse(bad.as_bytes()), None, "{bad}");
            let t = TraceContext::continue_or_start(HeaderValue::from_str(bad).ok().as_ref());
            assert_eq!(t.flags, SAMPLED);
            assert_ne!(t.trace_id, [0; 16]);
        }
        let t = TraceContext::continue_or_start(None);
        assert_ne!(TraceContext::continue_or_start(None).trace_id, t.trace_id);
    }

    #[test]
    fn test_future_versions_are_read_by_their_first_fields() {
        let h = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-ever";
        assert!(parse(h.as_bytes()).is_some());
        let h = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert!(parse(h.as_bytes()).is_some());
    }
}
