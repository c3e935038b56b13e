//! The built-in plugins, and the config pieces they share.

pub mod cors;
pub mod headers;
pub mod ip_restriction;
pub mod redirect;
pub mod request_size_limit;
pub mod rewrite;
pub mod static_response;

use std::collections::BTreeMap;

use http::{HeaderName, HeaderValue, StatusCode};

/// Parses `name: value` pairs from a config mapping.
pub(crate) fn header_pairs(
    map: &BTreeMap<String, String>,
    what: &str,
) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
    map.iter()
        .map(|(k, v)| Ok((header_name(k, what)?, header_value(v, k, what)?)))
        .collect()
}

/// A header name from a config value.
pub(crate) fn header_name(name: &str, what: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("{what}: `{name}` is not a valid header name"))
}

/// A header value from a config value.
pub(crate) fn header_value(value: &str, name: &str, what: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_str(value)
        .map_err(|_| format!("{what}: the value of `{name}` is not a valid header value"))
}

/// A status code in `range`.
pub(crate) fn status_in(
    code: u16,
    range: std::ops::RangeInclusive<u16>,
    what: &str,
) -> Result<StatusCode, String> {
    if !range.contains(&code) {
        return Err(format!(
            "{what}: {code} is not between {} and {}",
            range.start(),
            range.end()
        ));
    }
    StatusCode::from_u16(code).map_err(|_| format!("{what}: {code} is not a status code"))
}

/// Checks that every `$n` / `${n}` / `${name}` in `replacement` names a
/// group of `re`.
pub(crate) fn check_replacement(re: &regex::Regex, replacement: &str) -> Result<(), String> {
    let names: Vec<&str> = re.capture_names().flatten().collect();
    let mut rest = replacement;
    while let Some(i) = rest.find('$') {
        rest = &rest[i + 1..];
        if let Some(stripped) = rest.strip_prefix('$') {
            rest = stripped;
            continue;
        }
        let (group, after) = if let Some(inner) = rest.strip_prefix('{') {
            match inner.find('}') {
                Some(end) => (&inner[..end], &inner[end + 1..]),
                None => return Err("unclosed `${` in the replacement".to_owned()),
            }
        } else {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            (&rest[..end], &rest[end..])
        };
        rest = after;
        if group.is_empty() {
            continue;
        }
        let ok = match group.parse::<usize>() {
            Ok(n) => n < re.captures_len(),
            Err(_) => names.contains(&group),
        };
        if !ok {
            return Err(format!(
                "the replacement refers to group `{group}`, which the regex does not have"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod test_util {
    use crate::{PluginBuilder, PluginCtx, RequestHeader};

    /// Builds plugin `P` from YAML text.
    pub fn build<P: PluginBuilder>(yaml: &str) -> Result<P, String> {
        let value: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(yaml).map_err(|e| e.to_string())?;
        let config = crate::from_yaml::<P::Config>(&value).map_err(|e| e.to_string())?;
        P::build(config)
    }

    /// A request with these headers.
    pub fn request(method: &str, path: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut req = RequestHeader::build(method, path.as_bytes(), None).unwrap();
        for (k, v) in headers {
            req.append_header(k.to_string(), *v).unwrap();
        }
        req
    }

    /// A context for route `r`.
    pub fn ctx() -> PluginCtx {
        PluginCtx::new("r".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_replacement_groups_are_checked() {
        let re = regex::Regex::new("^/a/(?P<id>[0-9]+)/(.*)$").unwrap();
        assert!(check_replacement(&re, "/b/$1/${2}/${id}/$$").is_ok());
        assert!(check_replacement(&re, "/b/$3").is_err());
        assert!(check_replacement(&re, "/b/${nope}").is_err());
        assert!(check_replacement(&re, "/b/${1").is_err());
    }
}
