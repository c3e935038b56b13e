//! Usage the gateway meters: batches of admitted requests per (subject,
//! user, route) arrive on `POST /internal/usage`; each batch is counted
//! once (its id is claimed in the same transaction that adds its rows)
//! and its rows are summed per business day. Reports answer a subject's
//! counts per route and day or month, its members' shares for an
//! organization, and, where the plan has a monthly quota, what is used,
//! what is left and where the month is heading.

use std::collections::BTreeMap;
use std::str::FromStr;

use jiff::civil::Date;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use backend_common::calendar::BusinessCalendar;
use backend_common::user_auth::Subject;
use backend_common::{ApiError, FieldError};

use crate::core::{subject_of, SubjectView, Subscriptions};
use crate::storage::{self, UsageAdd};

type Api<T> = Result<T, ApiError>;

/// Most rows one batch may carry.
pub const MAX_BATCH_ROWS: usize = 100_000;
/// Longest report range, in days.
const MAX_RANGE_DAYS: i64 = 366;
/// How long a batch id is remembered: a retry older than this would be
/// counted again (the gateway's backlog retries within minutes).
pub const BATCH_ID_RETENTION_MS: i64 = 35 * 24 * 3600 * 1000;

/// Whose usage a row counts.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct UsageSubject {
    /// `user` or `organization`.
    pub kind: String,
    /// Its id.
    pub id: String,
}

/// One aggregated row of a batch.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct UsageRow {
    /// The subject the requests count for.
    pub subject: UsageSubject,
    /// The caller.
    pub user_id: String,
    /// The gateway route's name.
    pub route: String,
    /// Admitted requests (1 or more).
    pub count: u64,
}

/// What the gateway sends.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct UsageBatch {
    /// Unique per batch; a retried batch has the same id and counts once.
    pub batch_id: String,
    /// The gateway's name.
    #[serde(default)]
    pub source: Option<String>,
    /// Start of the window counted (RFC 3339): its business day is the
    /// day the rows count for.
    pub from: String,
    /// End of the window (RFC 3339).
    pub to: String,
    /// The counts.
    pub rows: Vec<UsageRow>,
}

/// The answer to a batch.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Ingested {
    /// The batch's id.
    pub batch_id: String,
    /// Rows in it.
    pub rows: usize,
    /// Requests in it.
    pub requests: u64,
    /// The business day they count for.
    pub day: String,
    /// It had been counted before: nothing was added.
    pub duplicate: bool,
}

/// Requests on one route.
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq, Eq)]
pub struct RouteCount {
    /// The gateway route.
    pub route: String,
    /// Requests.
    pub requests: i64,
}

/// One day or month of a report.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct UsagePeriod {
    /// `2026-12-01` (day) or `2026-12` (month).
    pub period: String,
    /// Requests in it.
    pub requests: i64,
    /// Per route, most used first.
    pub routes: Vec<RouteCount>,
}

/// A member's share of an organization's usage.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct MemberShare {
    /// The member.
    pub user_id: String,
    /// Their requests.
    pub requests: i64,
    /// Their share of the organization's, in percent (one decimal).
    pub share_percent: f64,
}

/// The plan's monthly allowance this month.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Quota {
    /// The plan in force.
    pub plan: String,
    /// The month (`2026-12`, business time zone).
    pub month: String,
    /// Requests the plan includes a month.
    pub allowance: u64,
    /// Requests so far this month.
    pub used: i64,
    /// What is left (0 when over).
    pub remaining: i64,
    /// The month's total if the pace so far holds (linear, from at least
    /// one day of the month).
    pub projected: i64,
    /// The projection is above the allowance.
    pub projected_over: bool,
}

/// A usage report.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct UsageReport {
    /// Whose usage.
    pub subject: SubjectView,
    /// The business time zone days are counted in.
    pub time_zone: String,
    /// First day (inclusive).
    pub from: String,
    /// Last day (inclusive).
    pub to: String,
    /// `day` or `month`.
    pub granularity: String,
    /// Requests in the range.
    pub total: i64,
    /// Per route over the range, most used first.
    pub routes: Vec<RouteCount>,
    /// Per day or month (only those with requests).
    pub periods: Vec<UsagePeriod>,
    /// An organization's members' shares (a member who is not its admin
    /// sees only their own).
    pub members: Option<Vec<MemberShare>>,
    /// The monthly quota, when the plan has one.
    pub quota: Option<Quota>,
}

/// A heavy user.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TopUser {
    /// The user.
    pub user_id: String,
    /// Their requests over every subject (personal and organizations).
    pub requests: i64,
}

/// The heaviest users of a range.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TopUsers {
    /// First day.
    pub from: String,
    /// Last day.
    pub to: String,
    /// Most requests first.
    pub users: Vec<TopUser>,
}

/// A report's range and granularity, as asked.
#[derive(Debug, Clone, Default)]
pub struct Range {
    /// `YYYY-MM-DD`; default the first of this month.
    pub from: Option<String>,
    /// `YYYY-MM-DD`; default today.
    pub to: Option<String>,
    /// `day` (default) or `month`.
    pub granularity: Option<String>,
}

/// A checked range.
struct Days {
    from: Date,
    to: Date,
    monthly: bool,
}

fn date_field(field: &str, v: &str) -> Result<Date, FieldError> {
    Date::from_str(v).map_err(|_| FieldError::new(field, "must be a date as YYYY-MM-DD"))
}

fn day_text(d: Date) -> String {
    d.strftime("%Y-%m-%d").to_string()
}

fn month_text(d: Date) -> String {
    d.strftime("%Y-%m").to_string()
}

/// Checks `range` against `today` (the business day now).
fn days(range: &Range, today: Date) -> Api<Days> {
    let mut errors = Vec::new();
    let from = match &range.from {
        Some(v) => date_field("from", v).map_err(|e| errors.push(e)).ok(),
        None => Some(today.first_of_month()),
    };
    let to = match &range.to {
        Some(v) => date_field("to", v).map_err(|e| errors.push(e)).ok(),
        None => Some(today),
    };
    let monthly = match range.granularity.as_deref() {
        None | Some("day") => false,
        Some("month") => true,
        Some(_) => {
            errors.push(FieldError::new("granularity", "must be `day` or `month`"));
            false
        }
    };
    if let (Some(from), Some(to)) = (from, to) {
        if from > to {
            errors.push(FieldError::new("to", "must not be before `from`"));
        } else if from
            .checked_add(jiff::Span::new().days(MAX_RANGE_DAYS))
            .is_ok_and(|last| to > last)
        {
            errors.push(FieldError::new(
                "to",
                format!("a report covers at most {MAX_RANGE_DAYS} days"),
            ));
        }
        if errors.is_empty() {
            return Ok(Days { from, to, monthly });
        }
    }
    Err(ApiError::validation(errors))
}

/// Checks a batch; the merged sums per (subject, user, route).
fn checked(batch: &UsageBatch) -> Api<BTreeMap<(String, String, String, String), i64>> {
    let mut errors = Vec::new();
    let id_ok = |s: &str, max: usize| {
        !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_graphic())
    };
    if !id_ok(&batch.batch_id, 100) {
        errors.push(FieldError::new(
            "batch_id",
            "must be 1-100 printable characters",
        ));
    }
    if batch.rows.is_empty() || batch.rows.len() > MAX_BATCH_ROWS {
        errors.push(FieldError::new(
            "rows",
            format!("must hold 1 to {MAX_BATCH_ROWS} rows"),
        ));
    }
    let mut sums: BTreeMap<(String, String, String, String), i64> = BTreeMap::new();
    for (i, r) in batch.rows.iter().enumerate() {
        let at = |f: &str| format!("rows[{i}].{f}");
        if r.subject.kind != "user" && r.subject.kind != "organization" {
            errors.push(FieldError::new(
                at("subject.kind"),
                "must be `user` or `organization`",
            ));
        }
        if !id_ok(&r.subject.id, 200) {
            errors.push(FieldError::new(
                at("subject.id"),
                "must be 1-200 printable characters",
            ));
        }
        if !id_ok(&r.user_id, 200) {
            errors.push(FieldError::new(
                at("user_id"),
                "must be 1-200 printable characters",
            ));
        }
        if !id_ok(&r.route, 64) {
            errors.push(FieldError::new(
                at("route"),
                "must be 1-64 printable characters",
            ));
        }
        if r.count == 0 || r.count > 1_000_000_000 {
            errors.push(FieldError::new(at("count"), "must be 1 to 1000000000"));
        }
        if errors.len() >= 20 {
            break;
        }
        let key = (
            r.subject.kind.clone(),
            r.subject.id.clone(),
            r.user_id.clone(),
            r.route.clone(),
        );
        *sums.entry(key).or_default() += r.count.min(1_000_000_000) as i64;
    }
    if errors.is_empty() {
        Ok(sums)
    } else {
        Err(ApiError::validation(errors))
    }
}

/// The business day of an RFC 3339 instant.
fn business_day(calendar: &BusinessCalendar, field: &str, v: &str) -> Api<Date> {
    let bad = || {
        ApiError::validation(vec![FieldError::new(
            field,
            "must be an RFC 3339 instant (2026-12-02T10:00:00Z)",
        )])
    };
    let ts = jiff::Timestamp::from_str(v).map_err(|_| bad())?;
    calendar.date(ts.as_millisecond()).map_err(|_| bad())
}

/// Sums per key, most first (ties by name).
fn ranked(map: BTreeMap<String, i64>) -> Vec<RouteCount> {
    let mut v: Vec<RouteCount> = map
        .into_iter()
        .map(|(route, requests)| RouteCount { route, requests })
        .collect();
    v.sort_by(|a, b| b.requests.cmp(&a.requests).then(a.route.cmp(&b.route)));
    v
}

impl Subscriptions {
    /// Counts a batch from the gateway once.
    pub async fn ingest_usage(&self, caller: &str, batch: &UsageBatch) -> Api<Ingested> {
        let sums = checked(batch)?;
        let day = business_day(&self.calendar, "from", &batch.from)?;
        business_day(&self.calendar, "to", &batch.to)?;
        let day_s = day_text(day);
        let requests: i64 = sums.values().sum();
        let adds: Vec<UsageAdd> = sums
            .into_iter()
            .map(|((kind, id, user, route), n)| UsageAdd {
                subject_kind: kind,
                subject_id: id,
                day: day_s.clone(),
                user_id: user,
                route,
                requests: n,
            })
            .collect();
        let mut tx = self.db.begin_write().await.map_err(ApiError::from)?;
        let fresh = storage::claim_batch(
            &mut tx,
            &batch.batch_id,
            caller,
            batch.rows.len() as i64,
            requests,
            self.clock.now_ms(),
        )
        .await
        .map_err(ApiError::from)?;
        if fresh {
            storage::add_usage(&mut tx, &adds)
                .await
                .map_err(ApiError::from)?;
        }
        tx.commit().await.map_err(ApiError::from)?;
        Ok(Ingested {
            batch_id: batch.batch_id.clone(),
            rows: batch.rows.len(),
            requests: requests as u64,
            day: day_s,
            duplicate: !fresh,
        })
    }

    /// The usage report of `subject` over `range`. `only_member`: an
    /// organization's member who is not its admin sees only their own
    /// share.
    pub async fn usage_report(
        &self,
        subject: &Subject,
        range: &Range,
        only_member: Option<&str>,
    ) -> Api<UsageReport> {
        let now = self.clock.now_ms();
        let today = self
            .calendar
            .date(now)
            .map_err(|e| ApiError::internal(&e))?;
        let d = days(range, today)?;
        let (from, to) = (day_text(d.from), day_text(d.to));
        let month_start = today.first_of_month();
        let mut c = self.db.pool().acquire().await.map_err(ApiError::from)?;
        let rows = storage::usage_of(&mut c, subject.kind(), subject.id(), &from, &to)
            .await
            .map_err(ApiError::from)?;
        let this_month = if d.from <= month_start && d.to >= today {
            None
        } else {
            Some(
                storage::usage_of(
                    &mut c,
                    subject.kind(),
                    subject.id(),
                    &day_text(month_start),
                    &day_text(today),
                )
                .await
                .map_err(ApiError::from)?,
            )
        };
        drop(c);
        let mut total = 0;
        let mut routes: BTreeMap<String, i64> = BTreeMap::new();
        let mut periods: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
        let mut members: BTreeMap<String, i64> = BTreeMap::new();
        let month_prefix = month_text(today);
        let mut used_this_month = 0;
        for (day, user, route, n) in &rows {
            total += n;
            *routes.entry(route.clone()).or_default() += n;
            let period = if d.monthly {
                day.get(..7).unwrap_or(day).to_owned()
            } else {
                day.clone()
            };
            *periods
                .entry(period)
                .or_default()
                .entry(route.clone())
                .or_default() += n;
            *members.entry(user.clone()).or_default() += n;
            if this_month.is_none() && day.starts_with(&month_prefix) && *day <= day_text(today) {
                used_this_month += n;
            }
        }
        if let Some(month_rows) = &this_month {
            used_this_month = month_rows.iter().map(|r| r.3).sum();
        }
        let members = matches!(subject, Subject::Organization(_)).then(|| {
            let mut v: Vec<MemberShare> = members
                .into_iter()
                .filter(|(user, _)| only_member.is_none_or(|me| me == user))
                .map(|(user_id, requests)| MemberShare {
                    share_percent: if total > 0 {
                        (requests as f64 * 1000.0 / total as f64).round() / 10.0
                    } else {
                        0.0
                    },
                    user_id,
                    requests,
                })
                .collect();
            v.sort_by(|a, b| b.requests.cmp(&a.requests).then(a.user_id.cmp(&b.user_id)));
            v
        });
        let plan = self.me(subject).await?.plan;
        let quota = match self.config.plan(&plan).and_then(|(_, p)| p.quota) {
            Some(allowance) => Some(self.quota(&plan, allowance, used_this_month, today, now)?),
            None => None,
        };
        Ok(UsageReport {
            subject: subject_of(subject),
            time_zone: self.calendar.zone_name().to_owned(),
            from,
            to,
            granularity: if d.monthly { "month" } else { "day" }.to_owned(),
            total,
            routes: ranked(routes),
            periods: periods
                .into_iter()
                .map(|(period, routes)| UsagePeriod {
                    period,
                    requests: routes.values().sum(),
                    routes: ranked(routes),
                })
                .collect(),
            members,
            quota,
        })
    }

    /// This month's quota figures.
    fn quota(&self, plan: &str, allowance: u64, used: i64, today: Date, now: i64) -> Api<Quota> {
        let start_day = today.first_of_month();
        let next = start_day
            .checked_add(jiff::Span::new().months(1))
            .map_err(|e| ApiError::internal(&e))?;
        let start = self
            .calendar
            .start_of_day(start_day)
            .map_err(|e| ApiError::internal(&e))?;
        let end = self
            .calendar
            .start_of_day(next)
            .map_err(|e| ApiError::internal(&e))?;
        let projected = project(used, now - start, end - start);
        let allowance_i = i64::try_from(allowance).unwrap_or(i64::MAX);
        Ok(Quota {
            plan: plan.to_owned(),
            month: month_text(today),
            allowance,
            used,
            remaining: (allowance_i - used).max(0),
            projected,
            projected_over: projected > allowance_i,
        })
    }

    /// The `limit` heaviest users over `range`.
    pub async fn top_users(&self, range: &Range, limit: i64) -> Api<TopUsers> {
        let today = self
            .calendar
            .date(self.clock.now_ms())
            .map_err(|e| ApiError::internal(&e))?;
        let d = days(range, today)?;
        let (from, to) = (day_text(d.from), day_text(d.to));
        let mut c = self.db.pool().acquire().await.map_err(ApiError::from)?;
        let rows = storage::top_users(&mut c, &from, &to, limit)
            .await
            .map_err(ApiError::from)?;
        Ok(TopUsers {
            from,
            to,
            users: rows
                .into_iter()
                .map(|(user_id, requests)| TopUser { user_id, requests })
                .collect(),
        })
    }

    /// Forgets batch ids past their retention.
    pub async fn purge_usage_batches(&self) -> Result<u64, sqlx::Error> {
        let mut c = self.db.pool().acquire().await?;
        storage::purge_batches(&mut c, self.clock.now_ms() - BATCH_ID_RETENTION_MS).await
    }
}

/// `used` over `elapsed` of a month `length` long (ms), extended to the
/// whole month; the pace is taken over at least one day.
fn project(used: i64, elapsed: i64, length: i64) -> i64 {
    const DAY: i64 = 24 * 3600 * 1000;
    let elapsed = elapsed.clamp(DAY.min(length), length.max(1));
    let p = i128::from(used) * i128::from(length) / i128::from(elapsed.max(1));
    i64::try_from(p).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Date {
        Date::from_str(s).unwrap()
    }

    fn range(from: Option<&str>, to: Option<&str>, g: Option<&str>) -> Range {
        Range {
            from: from.map(Into::into),
            to: to.map(Into::into),
            granularity: g.map(Into::into),
        }
    }

    #[test]
    fn test_report_ranges_default_to_this_month_and_are_checked() {
        let today = d("2026-12-17");
        let r = days(&Range::default(), today).unwrap();
        assert_eq!((r.from, r.to, r.monthly), (d("2026-12-01"), today, false));
        let r = days(
            &range(Some("2026-01-01"), Some("2026-12-31"), Some("month")),
            today,
        )
        .unwrap();
        assert!(r.monthly);
        for bad in [
            range(Some("2026-13-01"), None, None),
            range(Some("2026-12-10"), Some("2026-12-09"), None),
            range(Some("2025-01-01"), Some("2026-12-31"), None),
            range(None, None, Some("week")),
        ] {
            assert!(days(&bad, today).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn test_the_projection_extends_the_pace_to_the_month() {
        const DAY: i64 = 24 * 3600 * 1000;
        let month = 30 * DAY;
        let table = [
            // (used, elapsed, projected)
            (1_000, 10 * DAY, 3_000),
            (1_000, 15 * DAY, 2_000),
            (1_000, month, 1_000),
            // The first hours are paced over a whole day.
            (100, DAY / 24, 3_000),
            (0, 5 * DAY, 0),
            // Past the end (a clock ahead): the month's figure.
            (500, month + DAY, 500),
        ];
        for (used, elapsed, want) in table {
            assert_eq!(
                project(used, elapsed, month),
                want,
                "{used} after {elapsed}"
            );
        }
    }

    fn batch(rows: Vec<(&str, &str, &str, &str, u64)>) -> UsageBatch {
        UsageBatch {
            batch_id: "b-1".into(),
            source: Some("gateway".into()),
            from: "2026-12-01T16:59:59Z".into(),
            to: "2026-12-01T17:00:04Z".into(),
            rows: rows
                .into_iter()
                .map(|(kind, id, user, route, count)| UsageRow {
                    subject: UsageSubject {
                        kind: kind.into(),
                        id: id.into(),
                    },
                    user_id: user.into(),
                    route: route.into(),
                    count,
                })
                .collect(),
        }
    }

    #[test]
    fn test_a_batch_is_checked_and_its_repeated_keys_merged() {
        let sums = checked(&batch(vec![
            ("user", "ann", "ann", "api", 2),
            ("user", "ann", "ann", "api", 3),
            ("organization", "acme", "ann", "api", 1),
        ]))
        .unwrap();
        assert_eq!(sums.len(), 2);
        assert_eq!(
            sums[&("user".into(), "ann".into(), "ann".into(), "api".into())],
            5
        );
        for bad in [
            batch(vec![]),
            batch(vec![("team", "x", "ann", "api", 1)]),
            batch(vec![("user", "", "ann", "api", 1)]),
            batch(vec![("user", "ann", "ann", "api", 0)]),
            batch(vec![("user", "ann", "ann", "a route", 1)]),
        ] {
            assert!(checked(&bad).is_err(), "{:?}", bad.rows);
        }
    }

    #[test]
    fn test_a_window_counts_on_the_business_day_it_opened() {
        let jakarta = BusinessCalendar::jakarta();
        // 16:59:59 UTC is 23:59:59 WIB on the 1st; 17:00 UTC is the 2nd.
        let first = business_day(&jakarta, "from", "2026-12-01T16:59:59Z").unwrap();
        let second = business_day(&jakarta, "from", "2026-12-01T17:00:00Z").unwrap();
        assert_eq!(
            (day_text(first), day_text(second)),
            ("2026-12-01".into(), "2026-12-02".into())
        );
        assert!(business_day(&jakarta, "from", "yesterday").is_err());
    }
}
