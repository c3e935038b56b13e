//! `X-Request-Id`: the client's when it is sane, else a new UUIDv7. The
//! same id goes upstream, back to the client, into error bodies and into
//! the access log.

use std::time::{SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderName, HeaderValue};

/// Longest client-supplied `X-Request-Id` we pass on unchanged.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// `X-Request-Id`.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The request's id: the client's `X-Request-Id` when
/// [acceptable](acceptable), else a new one.
pub fn of_request(headers: &HeaderMap) -> HeaderValue {
    match headers.get(&X_REQUEST_ID) {
        Some(v) if acceptable(v) => v.clone(),
        _ => new_request_id(),
    }
}

/// A new UUIDv7 request id. Not `Uuid::now_v7()`: that takes a global mutex
/// per call; uniqueness here comes from 74 random bits per millisecond.
pub fn new_request_id() -> HeaderValue {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut random = [0u8; 10];
    fastrand::fill(&mut random);
    let id = uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid();
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let text = id.hyphenated().encode_lower(&mut buf);
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// Client ids are kept if short and made of visible ASCII without quotes or
/// backslashes (they end up in JSON and logs).
pub fn acceptable(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_REQUEST_ID_LEN
        && b.iter()
            .all(|&c| c.is_ascii_graphic() && c != b'"' && c != b'\\')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_request_id_is_uuidv7_and_client_ids_are_checked() {
        let id = new_request_id();
        let parsed = uuid::Uuid::parse_str(id.to_str().unwrap()).unwrap();
        assert_eq!(parsed.get_version_num(), 7);
        assert_ne!(new_request_id(), id);
        assert!(acceptable(&HeaderValue::from_static("abc-123")));
        assert!(!acceptable(&HeaderValue::from_static("a\"b")));
        assert!(!acceptable(&HeaderValue::from_static("a b")));
        let long = "x".repeat(MAX_REQUEST_ID_LEN + 1);
        assert!(!acceptable(&HeaderValue::from_str(&long).unwrap()));
        let mut h = HeaderMap::new();
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("mine-1"));
        assert_eq!(of_request(&h), "mine-1");
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("bad id"));
        assert_ne!(of_request(&h), "bad id");
    }
}
