//! The gateway crate's error type (start-up and reload; request-time errors
//! become HTTP responses in [`crate::proxy`]).

use crate::config::{ConfigErrors, LoadError};

/// Everything that can stop a gateway from being built or started.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The config is invalid.
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    /// The config file could not be read, or is invalid.
    #[error("{0}")]
    Load(#[from] LoadError),
    /// A backend host name could not be resolved.
    #[error("upstream `{pool}`: cannot resolve `{address}`: {reason}")]
    Resolve {
        /// Pool name.
        pool: String,
        /// The configured address.
        address: String,
        /// Resolver message.
        reason: String,
    },
    /// A pool ended up with no backends or too many.
    #[error("upstream `{pool}` has {count} backends after resolution (1 to 256 allowed)")]
    PoolSize {
        /// Pool name.
        pool: String,
        /// How many it had.
        count: usize,
    },
    /// The config and environment together would run unsafely (the
    /// development secret in production, an open admin listener without a
    /// token).
    #[error("refusing to start: {0}")]
    Unsafe(String),
    /// The Pingora server could not be created or run.
    #[error("server: {0}")]
    Server(String),
}
