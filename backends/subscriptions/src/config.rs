//! The subscriptions service's own section of `conf/services.yaml`
//! (`services.subscriptions`, beside `server` and `database`): the plans
//! and the lifecycle's durations.

use std::path::PathBuf;
use std::time::Duration;

use backend_common::config::{ConfigError, ServiceConfig};
use backend_common::failpoint::Failpoints;
use serde::{Deserialize, Serialize};

/// The tiers the gateway and the users service know, lowest first.
pub const TIERS: [&str; 4] = ["FREE", "BASIC", "PREMIUM", "ENTERPRISE"];

/// One plan of `services.subscriptions.plans`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Its name (`PREMIUM`): capital letters, digits, `_`.
    pub name: String,
    /// The tier it grants (one of [`TIERS`]); the plan's name by default.
    #[serde(default)]
    pub tier: Option<String>,
    /// Monthly price in whole rupiah, before PPN.
    pub monthly: i64,
    /// Yearly price in whole rupiah, before PPN (at most 12 × monthly).
    pub yearly: i64,
    /// Requests a month it includes (shown in quota reports); none: no
    /// quota.
    #[serde(default)]
    pub quota: Option<u64>,
    /// One line for the pricing page.
    #[serde(default)]
    pub description: String,
}

impl Plan {
    /// The tier it grants.
    pub fn tier(&self) -> &str {
        self.tier.as_deref().unwrap_or(&self.name)
    }

    /// The price of one `cycle`.
    pub fn price(&self, cycle: Cycle) -> i64 {
        match cycle {
            Cycle::Monthly => self.monthly,
            Cycle::Yearly => self.yearly,
        }
    }

    fn new(name: &str, monthly: i64, yearly: i64, quota: Option<u64>, description: &str) -> Self {
        Self {
            name: name.to_owned(),
            tier: None,
            monthly,
            yearly,
            quota,
            description: description.to_owned(),
        }
    }
}

/// A billing cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Cycle {
    /// One month from the anchor day.
    Monthly,
    /// Twelve months from the anchor day.
    Yearly,
}

impl Cycle {
    /// `monthly` or `yearly`.
    pub fn as_str(self) -> &'static str {
        match self {
            Cycle::Monthly => "monthly",
            Cycle::Yearly => "yearly",
        }
    }

    /// The cycle named `s`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "monthly" => Some(Cycle::Monthly),
            "yearly" => Some(Cycle::Yearly),
            _ => None,
        }
    }

    /// Months in one period.
    pub fn months(self) -> i64 {
        match self {
            Cycle::Monthly => 1,
            Cycle::Yearly => 12,
        }
    }
}

/// `services.subscriptions.*` (every key optional).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct SubscriptionsConfig {
    /// The plans, lowest first (an upgrade goes to a later one). FREE
    /// (price 0) is the plan of a subject without a subscription.
    pub plans: Vec<Plan>,
    /// How long an unpaid renewal keeps its tier after the period ended
    /// (`past_due`) before the subscription expires (default 3 days).
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
    /// How long before a period's end its renewal invoice is issued
    /// (default 3 days).
    #[serde(with = "humantime_serde")]
    pub renewal_lead: Duration,
    /// The gateway's config file, whose `rate_limit.tiers` table gives
    /// each plan's limits on `GET /plans` (also
    /// `TIERGATE_SUBSCRIPTIONS_GATEWAY_CONFIG`); default
    /// `conf/tiergate.yaml`.
    pub gateway_config: PathBuf,
    /// Fail points for crash tests, from `TIERGATE_SUBSCRIPTIONS_FAILPOINTS`
    /// only ([`backend_common::failpoint`]).
    #[serde(skip)]
    pub failpoints: Failpoints,
}

impl Default for SubscriptionsConfig {
    fn default() -> Self {
        Self {
            plans: vec![
                Plan::new(
                    "FREE",
                    0,
                    0,
                    Some(10_000),
                    "Untuk mencoba: 10.000 permintaan sebulan",
                ),
                Plan::new(
                    "BASIC",
                    99_000,
                    990_000,
                    Some(100_000),
                    "Untuk aplikasi kecil: 100.000 permintaan sebulan",
                ),
                Plan::new(
                    "PREMIUM",
                    249_000,
                    2_490_000,
                    Some(1_000_000),
                    "Untuk produksi: 1 juta permintaan sebulan",
                ),
                Plan::new(
                    "ENTERPRISE",
                    1_999_000,
                    19_990_000,
                    None,
                    "Untuk tim: tanpa kuota, admin tenant",
                ),
            ],
            grace: Duration::from_secs(3 * 24 * 3600),
            renewal_lead: Duration::from_secs(3 * 24 * 3600),
            gateway_config: PathBuf::from("conf/tiergate.yaml"),
            failpoints: Failpoints::default(),
        }
    }
}

impl SubscriptionsConfig {
    /// The plan named `name` (any case) and its rank (0 = FREE).
    pub fn plan(&self, name: &str) -> Option<(usize, &Plan)> {
        self.plans
            .iter()
            .enumerate()
            .find(|(_, p)| p.name.eq_ignore_ascii_case(name))
    }

    /// The plan of a subject without a subscription.
    pub fn free(&self) -> &Plan {
        &self.plans[0]
    }
}

impl ServiceConfig for SubscriptionsConfig {
    fn read_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(path) = env("TIERGATE_SUBSCRIPTIONS_GATEWAY_CONFIG") {
            self.gateway_config = PathBuf::from(path);
        }
        if let Some(spec) = env("TIERGATE_SUBSCRIPTIONS_FAILPOINTS") {
            self.failpoints = Failpoints::parse(&spec)
                .map_err(|e| ConfigError::one(format!("TIERGATE_SUBSCRIPTIONS_FAILPOINTS: {e}")))?;
        }
        Ok(())
    }

    fn problems(&self) -> Vec<String> {
        let mut errors = Vec::new();
        let mut check = |ok: bool, what: String| {
            if !ok {
                errors.push(format!("services.subscriptions.{what}"));
            }
        };
        check(
            !self.plans.is_empty(),
            "plans: at least FREE is needed".to_owned(),
        );
        for (i, p) in self.plans.iter().enumerate() {
            let at = format!("plans[{i}]");
            let name_ok = !p.name.is_empty()
                && p.name.len() <= 32
                && p.name
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
            check(
                name_ok,
                format!("{at}.name: 1 to 32 capital letters, digits or _"),
            );
            check(
                self.plans.iter().filter(|q| q.name == p.name).count() == 1,
                format!("{at}.name: `{}` is named twice", p.name),
            );
            check(
                TIERS.contains(&p.tier()),
                format!(
                    "{at}.tier: `{}` is not one of {}",
                    p.tier(),
                    TIERS.join(", ")
                ),
            );
            check(
                (0..=1_000_000_000_000).contains(&p.monthly)
                    && (0..=1_000_000_000_000).contains(&p.yearly),
                format!("{at}: prices are whole rupiah from 0 to 1,000,000,000,000"),
            );
            check(
                p.yearly <= p.monthly.saturating_mul(12),
                format!("{at}.yearly: at most 12 × monthly"),
            );
            if i == 0 {
                check(
                    p.monthly == 0 && p.yearly == 0 && p.tier() == "FREE",
                    format!("{at}: the first plan is the free one (tier FREE, price 0)"),
                );
            } else {
                check(
                    p.monthly > 0 && p.yearly > 0,
                    format!("{at}: only the first plan is free"),
                );
            }
        }
        check(
            self.grace <= Duration::from_secs(60 * 24 * 3600),
            "grace: at most 60days".to_owned(),
        );
        check(
            self.renewal_lead >= Duration::from_secs(60)
                && self.renewal_lead <= Duration::from_secs(28 * 24 * 3600),
            "renewal_lead: 1m to 28days".to_owned(),
        );
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_the_defaults_are_valid_and_ordered() {
        let c = SubscriptionsConfig::default();
        assert_eq!(c.problems(), Vec::<String>::new());
        let names: Vec<&str> = c.plans.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, TIERS);
        assert_eq!(
            c.plan("premium").map(|(r, p)| (r, p.monthly)),
            Some((2, 249_000))
        );
        for p in &c.plans[1..] {
            assert!(p.yearly < p.monthly * 12, "a yearly discount on {}", p.name);
        }
    }

    #[test]
    fn test_every_bad_plan_is_reported() {
        let mut c = SubscriptionsConfig::default();
        c.plans[1].name = "basic".into();
        c.plans[2].tier = Some("GOLD".into());
        c.plans[3].yearly = c.plans[3].monthly * 13;
        c.plans[0].monthly = 1;
        c.renewal_lead = Duration::ZERO;
        let p = c.problems();
        for want in [
            "plans[1].name",
            "plans[2].tier",
            "plans[3].yearly",
            "plans[0]: the first plan",
            "renewal_lead",
        ] {
            assert!(
                p.iter().any(|e| e.contains(want)),
                "{want} missing in {p:?}"
            );
        }
    }
}
