//! Period arithmetic in the business calendar: period `n` of a
//! subscription anchored at an instant runs from `anchor + n cycles` to
//! `anchor + (n + 1) cycles`, each computed from the anchor (Jan 31 → Feb
//! 28/29 → Mar 31, never drifting to the 28th), at the anchor's local time
//! of day; and the credit for the unused part of a period, prorated by
//! whole seconds in integer arithmetic.

use backend_common::calendar::{BusinessCalendar, CalendarError};
use serde::Serialize;

use crate::config::Cycle;

/// A period: `[start, end)` in Unix milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period {
    /// First instant.
    pub start: i64,
    /// First instant after it.
    pub end: i64,
}

/// Period `n` (0 = the first) of a subscription anchored at `anchor`.
pub fn nth(
    cal: &BusinessCalendar,
    anchor: i64,
    cycle: Cycle,
    n: i64,
) -> Result<Period, CalendarError> {
    Ok(Period {
        start: cal.add_months(anchor, n.saturating_mul(cycle.months()))?,
        end: cal.add_months(anchor, n.saturating_add(1).saturating_mul(cycle.months()))?,
    })
}

/// The index and period holding `at` (the first one when `at` is before
/// the anchor).
pub fn containing(
    cal: &BusinessCalendar,
    anchor: i64,
    cycle: Cycle,
    at: i64,
) -> Result<(i64, Period), CalendarError> {
    // A period is at most 31 days a month (366 a year): start at or
    // before it and walk forward.
    let longest = match cycle {
        Cycle::Monthly => 31,
        Cycle::Yearly => 366,
    } * 24
        * 3600
        * 1000;
    let mut n = ((at - anchor) / longest - 1).max(0);
    loop {
        let p = nth(cal, anchor, cycle, n)?;
        if at < p.end || n > 100_000 {
            return Ok((n, p));
        }
        n += 1;
    }
}

/// The unused part of a period's price at an instant, and how it was
/// computed (shown to the customer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Credit {
    /// The plan credited.
    pub plan: String,
    /// What its period cost (before PPN).
    pub price: i64,
    /// The period's length in seconds.
    pub period_seconds: i64,
    /// The seconds of it left.
    pub unused_seconds: i64,
    /// `floor(price × unused_seconds / period_seconds)`, whole rupiah.
    pub amount: i64,
    /// The same, as text.
    pub formula: String,
}

/// The credit for `plan` at `price` over `period`, at `at`.
pub fn credit(plan: &str, price: i64, period: Period, at: i64) -> Credit {
    let period_seconds = ((period.end - period.start) / 1000).max(1);
    let unused_seconds = ((period.end - at.max(period.start)) / 1000).clamp(0, period_seconds);
    let amount = i128::from(price) * i128::from(unused_seconds) / i128::from(period_seconds);
    let amount = i64::try_from(amount).unwrap_or(price).clamp(0, price);
    Credit {
        plan: plan.to_owned(),
        price,
        period_seconds,
        unused_seconds,
        amount,
        formula: format!("floor({price} × {unused_seconds} / {period_seconds}) = {amount}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cal() -> BusinessCalendar {
        BusinessCalendar::jakarta()
    }

    /// `YYYY-MM-DDTHH:MM:SS` in WIB, as Unix ms.
    fn wib(s: &str) -> i64 {
        let dt: jiff::civil::DateTime = s.parse().unwrap();
        dt.to_zoned(jiff::tz::TimeZone::fixed(jiff::tz::offset(7)))
            .unwrap()
            .timestamp()
            .as_millisecond()
    }

    fn show(ms: i64) -> String {
        cal()
            .zoned(ms)
            .unwrap()
            .strftime("%Y-%m-%dT%H:%M:%S")
            .to_string()
    }

    #[test]
    fn test_periods_are_anchored_and_clamped_to_month_end() {
        // (anchor, cycle, n, start, end) in WIB.
        let table = [
            (
                "2026-01-31T10:00:00",
                Cycle::Monthly,
                0,
                "2026-01-31T10:00:00",
                "2026-02-28T10:00:00",
            ),
            (
                "2026-01-31T10:00:00",
                Cycle::Monthly,
                1,
                "2026-02-28T10:00:00",
                "2026-03-31T10:00:00",
            ),
            (
                "2026-01-31T10:00:00",
                Cycle::Monthly,
                2,
                "2026-03-31T10:00:00",
                "2026-04-30T10:00:00",
            ),
            (
                "2028-01-31T10:00:00",
                Cycle::Monthly,
                1,
                "2028-02-29T10:00:00",
                "2028-03-31T10:00:00",
            ),
            // A leap day anchor: Feb 28 in common years, back to 29 in 2032.
            (
                "2028-02-29T00:00:00",
                Cycle::Yearly,
                0,
                "2028-02-29T00:00:00",
                "2029-02-28T00:00:00",
            ),
            (
                "2028-02-29T00:00:00",
                Cycle::Yearly,
                3,
                "2031-02-28T00:00:00",
                "2032-02-29T00:00:00",
            ),
            (
                "2026-12-15T23:59:59",
                Cycle::Monthly,
                0,
                "2026-12-15T23:59:59",
                "2027-01-15T23:59:59",
            ),
        ];
        for (anchor, cycle, n, start, end) in table {
            let p = nth(&cal(), wib(anchor), cycle, n).unwrap();
            assert_eq!(
                (show(p.start), show(p.end)),
                (start.to_owned(), end.to_owned()),
                "{anchor} {cycle:?} #{n}"
            );
        }
    }

    #[test]
    fn test_a_period_boundary_at_midnight_wib_is_five_pm_utc_the_day_before() {
        let p = nth(&cal(), wib("2026-11-01T00:00:00"), Cycle::Monthly, 0).unwrap();
        let utc = jiff::Timestamp::from_millisecond(p.end)
            .unwrap()
            .to_string();
        assert_eq!(utc, "2026-11-30T17:00:00Z");
        // One millisecond before the boundary is in the first period, the
        // boundary itself in the second.
        let anchor = wib("2026-11-01T00:00:00");
        assert_eq!(
            containing(&cal(), anchor, Cycle::Monthly, p.end - 1)
                .unwrap()
                .0,
            0
        );
        assert_eq!(
            containing(&cal(), anchor, Cycle::Monthly, p.end).unwrap().0,
            1
        );
    }

    #[test]
    fn test_containing_finds_the_period_of_any_instant() {
        let mut rng = fastrand::Rng::with_seed(7);
        let anchor = wib("2026-01-31T08:30:00");
        for _ in 0..500 {
            let cycle = if rng.bool() {
                Cycle::Monthly
            } else {
                Cycle::Yearly
            };
            let at = anchor + rng.i64(0..20 * 365 * 24 * 3600 * 1000);
            let (n, p) = containing(&cal(), anchor, cycle, at).unwrap();
            assert!(p.start <= at && at < p.end, "{n}: {p:?} holds {at}");
            assert_eq!(nth(&cal(), anchor, cycle, n).unwrap(), p);
        }
        assert_eq!(
            containing(&cal(), anchor, Cycle::Monthly, anchor - 5)
                .unwrap()
                .0,
            0
        );
    }

    #[test]
    fn test_credits_are_prorated_by_whole_seconds() {
        let p = Period {
            start: 0,
            end: 30 * 24 * 3600 * 1000,
        };
        let half = credit("BASIC", 99_000, p, p.end / 2);
        assert_eq!(
            (half.unused_seconds, half.period_seconds, half.amount),
            (1_296_000, 2_592_000, 49_500)
        );
        assert_eq!(half.formula, "floor(99000 × 1296000 / 2592000) = 49500");
        // The last second of a period credits nothing; its first, all.
        assert_eq!(credit("BASIC", 99_000, p, p.end - 1).amount, 0);
        assert_eq!(credit("BASIC", 99_000, p, p.end - 1000).amount, 0);
        assert_eq!(credit("BASIC", 99_000, p, p.start).amount, 99_000);
        assert_eq!(credit("BASIC", 99_000, p, p.start - 10).amount, 99_000);
        assert_eq!(credit("BASIC", 99_000, p, p.end + 10).amount, 0);
        // One third: floored.
        assert_eq!(
            credit(
                "X",
                100,
                Period {
                    start: 0,
                    end: 3000
                },
                1000
            )
            .amount,
            66
        );
        let mut rng = fastrand::Rng::with_seed(3);
        for _ in 0..1000 {
            let len = rng.i64(1000..400 * 24 * 3600 * 1000);
            let p = Period { start: 0, end: len };
            let price = rng.i64(0..100_000_000);
            let c = credit("X", price, p, rng.i64(-len..2 * len));
            assert!((0..=price).contains(&c.amount), "{c:?}");
        }
    }
}
