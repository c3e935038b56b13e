//! The billing service's own section of `conf/services.yaml`
//! (`services.billing`, beside `server` and `database`).

use std::time::Duration;

use backend_common::config::{ConfigError, ServiceConfig};
use backend_common::failpoint::Failpoints;
use serde::Deserialize;

/// `services.billing.seller`: who issues the invoices (printed on each).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Seller {
    /// Legal name.
    pub name: String,
    /// Address (lines separated by `\n`).
    pub address: String,
    /// NPWP (16 digits).
    pub npwp: String,
    /// Whether the seller is a PKP and charges PPN (turnover above
    /// Rp 4.8 bn a year). Without it invoices carry no PPN.
    pub pkp: bool,
    /// Contact address printed on invoices.
    pub email: String,
}

impl Default for Seller {
    fn default() -> Self {
        Self {
            name: "PT Tiergate Teknologi Indonesia".to_owned(),
            address: "Jl. Jenderal Sudirman Kav. 52-53\nJakarta Selatan 12190".to_owned(),
            npwp: "0000000000000000".to_owned(),
            pkp: true,
            email: "billing@tiergate.example".to_owned(),
        }
    }
}

/// `services.billing.*` (every key optional).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct BillingConfig {
    /// The seller.
    pub seller: Seller,
    /// An invoice is due this long after issue unless the caller says
    /// (default 7 days).
    #[serde(with = "humantime_serde")]
    pub due_after: Duration,
    /// The prefix of invoice numbers: `INV` → `INV/2026/11/000123`.
    pub invoice_prefix: String,
    /// The prefix of credit-note numbers: `CN` → `CN/2026/000012`.
    pub credit_note_prefix: String,
    /// PDFs rendered at once (each on a blocking thread); more wait.
    pub render_threads: usize,
    /// The daily reconciliation closes a business day this long after it
    /// ends, so late payment events land first (default 1h).
    #[serde(with = "humantime_serde")]
    pub reconcile_delay: Duration,
    /// Fail points for crash tests, from `TIERGATE_BILLING_FAILPOINTS`
    /// only ([`backend_common::failpoint`]).
    #[serde(skip)]
    pub failpoints: Failpoints,
}

impl Default for BillingConfig {
    fn default() -> Self {
        Self {
            seller: Seller::default(),
            due_after: Duration::from_secs(7 * 24 * 3600),
            invoice_prefix: "INV".to_owned(),
            credit_note_prefix: "CN".to_owned(),
            render_threads: 2,
            reconcile_delay: Duration::from_secs(3600),
            failpoints: Failpoints::default(),
        }
    }
}

fn is_prefix(p: &str) -> bool {
    (1..=8).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_uppercase())
}

impl ServiceConfig for BillingConfig {
    fn read_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(spec) = env("TIERGATE_BILLING_FAILPOINTS") {
            self.failpoints = Failpoints::parse(&spec)
                .map_err(|e| ConfigError::one(format!("TIERGATE_BILLING_FAILPOINTS: {e}")))?;
        }
        Ok(())
    }

    fn problems(&self) -> Vec<String> {
        let mut errors = Vec::new();
        let mut check = |ok: bool, what: &str| {
            if !ok {
                errors.push(format!("services.billing.{what}"));
            }
        };
        let s = &self.seller;
        check(!s.name.trim().is_empty(), "seller.name: must not be empty");
        check(
            s.npwp.len() == 16 && s.npwp.bytes().all(|b| b.is_ascii_digit()),
            "seller.npwp: must be 16 digits",
        );
        check(
            self.due_after >= Duration::from_secs(3600),
            "due_after: must be at least 1h",
        );
        check(
            is_prefix(&self.invoice_prefix),
            "invoice_prefix: 1 to 8 capital letters (A-Z)",
        );
        check(
            is_prefix(&self.credit_note_prefix) && self.credit_note_prefix != self.invoice_prefix,
            "credit_note_prefix: 1 to 8 capital letters (A-Z), not the invoice prefix",
        );
        check(
            (1..=64).contains(&self.render_threads),
            "render_threads: 1 to 64",
        );
        check(
            self.reconcile_delay <= Duration::from_secs(7 * 24 * 3600),
            "reconcile_delay: at most 7d",
        );
        errors
    }
}
