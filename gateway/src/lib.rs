//! # gateway
//!
//! tiergate's Pingora-based gateway: YAML config ([`config`]) compiled into an
//! immutable [`snapshot::Snapshot`] (route table + upstream pools) that the
//! [`proxy::Gateway`] reads on every request through an `ArcSwap`.
//!
//! ```no_run
//! let config = gateway::config::load_file("conf/tiergate.yaml".as_ref())?;
//! gateway::server::GatewayServer::build(&config)?.run();
//! # Ok::<(), gateway::error::GatewayError>(())
//! ```
#![deny(missing_docs)]

pub mod access_log;
pub mod admin;
pub mod auth;
pub mod background;
pub mod config;
pub mod edge;
pub mod error;
pub mod exposition;
pub mod forward;
pub mod guard;
pub mod health;
pub mod hygiene;
pub mod metrics;
pub mod proxy;
pub mod ratelimit;
pub mod reload;
pub mod request_id;
pub mod respond;
pub mod router;
pub mod secret;
pub mod server;
pub mod snapshot;
pub mod tier_feed;
pub mod trace;
pub mod upstream;
pub mod usage;
