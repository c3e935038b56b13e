//! The vocabulary every section's validation shares: the list errors are
//! collected in, and the naming rule of pools, routes, tiers and roles.
//! A leaf module, so the section validators (`validate`, `access`) depend
//! on it and not on each other.

/// Errors as (path, message).
pub(crate) type Errors = Vec<(String, String)>;

/// 1-64 characters of `A-Z a-z 0-9 - _`.
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}
