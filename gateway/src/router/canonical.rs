//! The one canonical form of a request path: decoded and normalised once,
//! before routing, so routing, `min_tier`/`roles`, plugins, rewrites,
//! metrics, the access log and the upstream all see the same string
//! (Envoy's `normalize_path` + `merge_slashes`, RFC 3986 §6.2.2 and
//! §5.2.4).
//!
//! Each case, decided:
//!
//! | input | result |
//! |---|---|
//! | `%41` (an unreserved character: `A-Z a-z 0-9 - . _ ~`) | decoded: `A` |
//! | `%2f`, any other escape | kept encoded, hex upper-cased: `%2F` ... |
//! | `%2F` / `%5C` (an encoded `/` or `\`), a raw `\` | `reject` (default): 400; `keep`: sent as `%2F` / `%5C`, one segment; `decode`: becomes a `/` |
//! | `.` and `..` segments (also `%2E`, `%2e%2E`) | resolved; a `..` above `/` is 400 |
//! | `..;x`, `.;x` (dot segments with parameters, which Tomcat and Jetty resolve) | 400 |
//! | `//` | merged into one `/` (`merge_slashes: false` keeps them) |
//! | `%00`–`%1F`, `%7F` (encoded control bytes) | 400 |
//! | a bad escape (`%zz`, `%4`) | 400 |
//! | escapes that decode to invalid UTF-8 (`%C3%28`) | 400 |
//!
//! Raw control bytes and raw non-ASCII bytes anywhere in the target never
//! get this far: the connection layer refuses them with a 400 while the
//! request line is read. The query is not touched (it is the upstream's to
//! decode), and the case of the path is kept: paths are case-sensitive.
//!
//! A path already in canonical form (the common case) is recognised in one
//! scan and costs no allocation.

use std::borrow::Cow;

use crate::config::{EscapedSlashes, PathSettings};

/// Why a path was refused (each a 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadPath {
    /// It does not start with `/`.
    NotAbsolute,
    /// A `%` not followed by two hex digits.
    BadEscape,
    /// An escape decodes to a control byte.
    ControlByte,
    /// `%2F`, `%5C` or `\` with `escaped_slashes: reject`.
    EscapedSlash,
    /// More `..` than segments.
    AboveRoot,
    /// A dot segment with parameters (`..;x`).
    DotSegmentParameters,
    /// The decoded bytes are not UTF-8.
    InvalidUtf8,
    /// A byte the request line may not carry (the connection layer
    /// normally refuses these first).
    InvalidByte,
}

impl BadPath {
    /// The message of the 400 (for the client: never secret).
    pub fn message(self) -> &'static str {
        match self {
            BadPath::NotAbsolute => "the request path must start with `/`",
            BadPath::BadEscape => "the path has a `%` not followed by two hex digits",
            BadPath::ControlByte => "the path has an encoded control character",
            BadPath::EscapedSlash => "the path has an encoded `/` or `\\`, or a raw `\\`",
            BadPath::AboveRoot => "the path climbs above `/` with `..`",
            BadPath::DotSegmentParameters => "the path has a dot segment with parameters (`..;`)",
            BadPath::InvalidUtf8 => "the path's escapes do not decode to UTF-8",
            BadPath::InvalidByte => "the path has a byte that must be percent-encoded",
        }
    }
}

/// The canonical form of `path` (the part before `?`), borrowed when it
/// already is canonical.
pub fn canonical(path: &str, policy: PathSettings) -> Result<Cow<'_, str>, BadPath> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(BadPath::NotAbsolute);
    }
    if is_canonical(bytes, policy) {
        return Ok(Cow::Borrowed(path));
    }
    normalise(bytes, policy).map(Cow::Owned)
}

/// One scan: nothing to decode, no backslash, no dot segment, no repeated
/// slash (when merging), no byte outside the path alphabet.
fn is_canonical(b: &[u8], policy: PathSettings) -> bool {
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' | b'\\' => return false,
            b'/' => match b.get(i + 1) {
                Some(b'/') if policy.merge_slashes => return false,
                Some(b'.') => {
                    // `/.`, `/..`, `/.;`, `/..;` start a dot segment.
                    let rest = &b[i + 2..];
                    let rest = rest.strip_prefix(b".").unwrap_or(rest);
                    if matches!(rest.first(), None | Some(b'/' | b';')) {
                        return false;
                    }
                }
                _ => {}
            },
            c if !c.is_ascii_graphic() => return false,
            _ => {}
        }
        i += 1;
    }
    true
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn unreserved(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~')
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// Decodes what may be decoded, then resolves the segments.
fn normalise(b: &[u8], policy: PathSettings) -> Result<String, BadPath> {
    // Pass 1: escapes. `segments` gets the path with unreserved escapes
    // decoded and the rest upper-cased; `decoded` every byte decoded, to
    // check UTF-8 once at the end.
    let mut text = String::with_capacity(b.len());
    let mut decoded: Vec<u8> = Vec::new();
    let mut high = false;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b'%' => {
                let (Some(h), Some(l)) = (
                    b.get(i + 1).copied().and_then(hex),
                    b.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(BadPath::BadEscape);
                };
                let v = h << 4 | l;
                i += 3;
                if v < 0x20 || v == 0x7F {
                    return Err(BadPath::ControlByte);
                }
                if v >= 0x80 {
                    high = true;
                }
                decoded.push(v);
                if v == b'/' || v == b'\\' {
                    match policy.escaped_slashes {
                        EscapedSlashes::Reject => return Err(BadPath::EscapedSlash),
                        EscapedSlashes::Decode => {
                            text.push('/');
                            continue;
                        }
                        EscapedSlashes::Keep => {}
                    }
                }
                if unreserved(v) {
                    text.push(char::from(v));
                } else {
                    text.push('%');
                    text.push(char::from(HEX[usize::from(v >> 4)]));
                    text.push(char::from(HEX[usize::from(v & 0xF)]));
                }
                continue;
            }
            b'\\' => match policy.escaped_slashes {
                EscapedSlashes::Reject => return Err(BadPath::EscapedSlash),
                EscapedSlashes::Decode => text.push('/'),
                EscapedSlashes::Keep => text.push_str("%5C"),
            },
            c if c.is_ascii_graphic() => text.push(char::from(c)),
            _ => return Err(BadPath::InvalidByte),
        }
        decoded.push(c);
        i += 1;
    }
    if high && std::str::from_utf8(&decoded).is_err() {
        return Err(BadPath::InvalidUtf8);
    }
    // Pass 2: segments (RFC 3986 §5.2.4, but `..` above the root is an
    // error rather than ignored).
    let mut out: Vec<&str> = Vec::new();
    let mut ends_in_dir = text.ends_with('/');
    let mut parts = text[1..].split('/').peekable();
    while let Some(seg) = parts.next() {
        let last = parts.peek().is_none();
        let (name, params) = match seg.split_once(';') {
            Some((n, _)) => (n, true),
            None => (seg, false),
        };
        if seg.is_empty() {
            if !policy.merge_slashes && !last {
                out.push(seg);
            }
            continue;
        }
        match name {
            "." | ".." if params => return Err(BadPath::DotSegmentParameters),
            "." => {
                if last {
                    ends_in_dir = true;
                }
            }
            ".." => {
                if out.pop().is_none() {
                    return Err(BadPath::AboveRoot);
                }
                if last {
                    ends_in_dir = true;
                }
            }
            _ => out.push(seg),
        }
    }
    let mut path = String::with_capacity(text.len());
    for seg in &out {
        path.push('/');
        path.push_str(seg);
    }
    if out.is_empty() || ends_in_dir {
        path.push('/');
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(policy: PathSettings, p: &str) -> Result<String, BadPath> {
        canonical(p, policy).map(Cow::into_owned)
    }

    fn c(p: &str) -> Result<String, BadPath> {
        with(PathSettings::default(), p)
    }

    #[test]
    fn test_canonical_paths_are_borrowed() {
        for p in [
            "/",
            "/api/users/7",
            "/.well-known/jwks.json",
            "/a/b/",
            "/a.b/..c/c..",
            "/a;b=c",
            "/x-y_z~",
        ] {
            assert!(
                matches!(canonical(p, PathSettings::default()), Ok(Cow::Borrowed(_))),
                "{p}"
            );
        }
    }

    #[test]
    fn test_each_case_of_the_table() {
        let cases: &[(&str, Result<&str, BadPath>)] = &[
            // Unreserved escapes are decoded, others upper-cased.
            ("/api/%75sers", Ok("/api/users")),
            ("/a%7e%2D%5f%2e", Ok("/a~-_.")),
            ("/a%3a%3F", Ok("/a%3A%3F")),
            ("/caf%C3%A9", Ok("/caf%C3%A9")),
            // Dot segments, also encoded.
            ("/api/users/../admin/x", Ok("/api/admin/x")),
            ("/api/users/%2e%2e/admin", Ok("/api/admin")),
            ("/api/users/.%2E/admin", Ok("/api/admin")),
            ("/a/./b", Ok("/a/b")),
            ("/a/b/.", Ok("/a/b/")),
            ("/a/b/..", Ok("/a/")),
            ("/a/..", Ok("/")),
            ("/..", Err(BadPath::AboveRoot)),
            ("/a/../../b", Err(BadPath::AboveRoot)),
            ("/%2e%2e/etc/passwd", Err(BadPath::AboveRoot)),
            ("/api/..;/admin", Err(BadPath::DotSegmentParameters)),
            ("/api/.;x/admin", Err(BadPath::DotSegmentParameters)),
            // Repeated slashes merge.
            ("//api///users//7", Ok("/api/users/7")),
            ("/a//", Ok("/a/")),
            // Slashes in disguise.
            ("/api/users%2F..%2Fadmin", Err(BadPath::EscapedSlash)),
            ("/api/users%5c..%5cadmin", Err(BadPath::EscapedSlash)),
            ("/api\\admin", Err(BadPath::EscapedSlash)),
            // Bytes.
            ("/a%00b", Err(BadPath::ControlByte)),
            ("/a%0Ab", Err(BadPath::ControlByte)),
            ("/a%7f", Err(BadPath::ControlByte)),
            ("/a%zz", Err(BadPath::BadEscape)),
            ("/a%4", Err(BadPath::BadEscape)),
            ("/a%", Err(BadPath::BadEscape)),
            ("/a%C3%28", Err(BadPath::InvalidUtf8)),
            ("/a%FF", Err(BadPath::InvalidUtf8)),
            ("/a b", Err(BadPath::InvalidByte)),
            ("api", Err(BadPath::NotAbsolute)),
            ("*", Err(BadPath::NotAbsolute)),
        ];
        for (input, want) in cases {
            let want = want.map(str::to_owned);
            assert_eq!(c(input), want, "{input}");
        }
    }

    #[test]
    fn test_escaped_slash_policies() {
        let keep = PathSettings {
            escaped_slashes: EscapedSlashes::Keep,
            ..PathSettings::default()
        };
        assert_eq!(
            with(keep, "/files/a%2fb/../c"),
            Ok("/files/c".to_owned()),
            "kept %2F is part of one segment, which `..` removes"
        );
        assert_eq!(with(keep, "/files/a%2fb"), Ok("/files/a%2Fb".to_owned()));
        assert_eq!(with(keep, "/w\\x"), Ok("/w%5Cx".to_owned()));
        let decode = PathSettings {
            escaped_slashes: EscapedSlashes::Decode,
            ..PathSettings::default()
        };
        assert_eq!(
            with(decode, "/api/users%2F..%2Fadmin"),
            Ok("/api/admin".to_owned())
        );
        assert_eq!(with(decode, "/a\\b"), Ok("/a/b".to_owned()));
        let unmerged = PathSettings {
            merge_slashes: false,
            ..PathSettings::default()
        };
        assert_eq!(with(unmerged, "/a//b"), Ok("/a//b".to_owned()));
        assert_eq!(with(unmerged, "/a//./b"), Ok("/a//b".to_owned()));
    }

    #[test]
    fn test_output_is_a_fixed_point() {
        // Canonicalising a canonical path changes nothing, for every input
        // of a small generated alphabet.
        let alphabet = [
            "/", ".", "..", "a", "%2e", "%41", "%2F", "//", ";", "%C3%A9",
        ];
        let mut inputs = vec![String::from("/")];
        for _ in 0..4 {
            let mut next = Vec::new();
            for p in &inputs {
                for a in alphabet {
                    next.push(format!("{p}{a}"));
                }
            }
            inputs = next;
        }
        for policy in [
            PathSettings::default(),
            PathSettings {
                escaped_slashes: EscapedSlashes::Keep,
                merge_slashes: false,
            },
            PathSettings {
                escaped_slashes: EscapedSlashes::Decode,
                merge_slashes: true,
            },
        ] {
            for p in &inputs {
                if let Ok(once) = with(policy, p) {
                    let twice = canonical(&once, policy).unwrap();
                    assert_eq!(twice, once.as_str(), "{p} under {policy:?}");
                    // Without escapes left, one scan recognises it.
                    assert!(
                        once.contains('%') || matches!(twice, Cow::Borrowed(_)),
                        "{once} (from {p}) is recognised as canonical"
                    );
                }
            }
        }
    }
}
