//! End-to-end tests: real upstream HTTP servers on ephemeral ports, the
//! gateway started in-process (or as the real binary where the test is about
//! the process), plain HTTP between them. One test binary, one module per
//! capability.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod account_pages;
mod auth;
mod balancing;
mod billing;
mod browser;
mod business_loop;
mod check_config;
mod common;
mod discovery;
mod errors;
mod hardening;
mod health_checks;
mod notifications;
mod observability;
mod orgs;
mod payments;
mod platform;
mod plugins;
mod process;
mod quick_start;
mod ratelimit;
mod reload;
mod resilience;
mod routing;
mod service_platform;
mod status_page;
mod streaming;
mod subscriptions;
mod tier_changes;
mod tokens;
mod upgrade;
mod usage;
mod users;
