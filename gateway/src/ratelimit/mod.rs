//! Rate limiting. So far the per-key bucket math ([`gcra`]); the key map,
//! tier table, Redis leases and the proxy wiring build on it.

pub mod gcra;
