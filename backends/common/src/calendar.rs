//! The business calendar: instants are stored as UTC milliseconds, while
//! periods, invoice dates and "today" are read in the business time zone
//! (`Asia/Jakarta`, WIB, by default; any IANA zone, DST included, works).
//!
//! A monthly period runs from an anchor to the same day next month,
//! clamped to the month's last day, and every period is computed from the
//! anchor, not from the previous period: a subscription anchored on
//! January 31 renews February 28 (29 in a leap year), then March 31 —
//! not March 28.
//!
//! The time-zone database is compiled into the binary (jiff's bundled
//! tzdb, read explicitly, never the host's): results do not depend on the
//! host's `/usr/share/zoneinfo` or `TZDIR`.

use std::sync::LazyLock;

use jiff::civil::Date;
use jiff::tz::{TimeZone, TimeZoneDatabase};
use jiff::{Span, Timestamp, Zoned};

/// The bundled time-zone database.
static TZDB: LazyLock<TimeZoneDatabase> = LazyLock::new(TimeZoneDatabase::bundled);

/// The default business time zone.
pub const DEFAULT_ZONE: &str = "Asia/Jakarta";

/// Indonesian month names, January first.
pub const BULAN: [&str; 12] = [
    "Januari",
    "Februari",
    "Maret",
    "April",
    "Mei",
    "Juni",
    "Juli",
    "Agustus",
    "September",
    "Oktober",
    "November",
    "Desember",
];

/// An instant or a span of the calendar out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CalendarError(String);

/// The business calendar of one time zone. Cheap to clone.
#[derive(Debug, Clone)]
pub struct BusinessCalendar {
    tz: TimeZone,
    name: String,
}

impl Default for BusinessCalendar {
    fn default() -> Self {
        Self::jakarta()
    }
}

impl BusinessCalendar {
    /// The calendar of the IANA zone `name` (`Asia/Jakarta`,
    /// `Europe/Berlin`, …).
    pub fn new(name: &str) -> Result<Self, CalendarError> {
        let tz = TZDB
            .get(name)
            .map_err(|e| CalendarError(format!("unknown time zone `{name}`: {e}")))?;
        Ok(Self {
            tz,
            name: name.to_owned(),
        })
    }

    /// `Asia/Jakarta` (WIB, UTC+7, no DST).
    pub fn jakarta() -> Self {
        Self::new(DEFAULT_ZONE).unwrap_or_else(|_| Self {
            // The bundled database always has it; a fixed offset is the
            // same zone in every respect that matters for WIB.
            tz: TimeZone::fixed(jiff::tz::offset(7)),
            name: DEFAULT_ZONE.to_owned(),
        })
    }

    /// The zone's name.
    pub fn zone_name(&self) -> &str {
        &self.name
    }

    /// The instant `ms` in the business zone.
    pub fn zoned(&self, ms: i64) -> Result<Zoned, CalendarError> {
        let ts = Timestamp::from_millisecond(ms).map_err(|e| CalendarError(e.to_string()))?;
        Ok(ts.to_zoned(self.tz.clone()))
    }

    /// The business day of the instant `ms`.
    pub fn date(&self, ms: i64) -> Result<Date, CalendarError> {
        self.zoned(ms).map(|z| z.date())
    }

    /// The first instant of `date` in the business zone (its midnight, or
    /// the first instant after a DST gap at midnight).
    pub fn start_of_day(&self, date: Date) -> Result<i64, CalendarError> {
        let z = date
            .to_zoned(self.tz.clone())
            .map_err(|e| CalendarError(e.to_string()))?;
        Ok(z.timestamp().as_millisecond())
    }

    /// The instant `months` months after `anchor_ms` at the same local time
    /// of day, the day clamped to the target month's length (January 31 +
    /// 1 month = February 28/29). Always computed from the anchor, so
    /// period `n` of a subscription is `add_months(anchor, n)`.
    pub fn add_months(&self, anchor_ms: i64, months: i64) -> Result<i64, CalendarError> {
        let anchor = self.zoned(anchor_ms)?;
        let span = Span::new()
            .try_months(months)
            .map_err(|e| CalendarError(e.to_string()))?;
        let z = anchor
            .checked_add(span)
            .map_err(|e| CalendarError(e.to_string()))?;
        Ok(z.timestamp().as_millisecond())
    }

    /// `add_months(anchor_ms, 12 × years)`.
    pub fn add_years(&self, anchor_ms: i64, years: i64) -> Result<i64, CalendarError> {
        self.add_months(anchor_ms, years.saturating_mul(12))
    }

    /// `date` in Indonesian: `1 Desember 2026`.
    pub fn format_id(date: Date) -> String {
        let month = usize::try_from(date.month() - 1).unwrap_or(0);
        format!("{} {} {}", date.day(), BULAN[month.min(11)], date.year())
    }

    /// `date` in English: `1 December 2026`.
    pub fn format_en(date: Date) -> String {
        date.strftime("%-d %B %Y").to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(s: &str) -> i64 {
        s.parse::<Timestamp>().unwrap().as_millisecond()
    }

    fn local(cal: &BusinessCalendar, ms: i64) -> String {
        cal.zoned(ms)
            .unwrap()
            .strftime("%Y-%m-%d %H:%M")
            .to_string()
    }

    #[test]
    fn test_months_are_anchored_and_clamped_to_month_end() {
        let cal = BusinessCalendar::jakarta();
        // 31 January 2026, 10:00 WIB.
        let anchor = ms("2026-01-31T03:00:00Z");
        let expected = [
            (0, "2026-01-31 10:00"),
            (1, "2026-02-28 10:00"),
            (2, "2026-03-31 10:00"),
            (3, "2026-04-30 10:00"),
            (12, "2027-01-31 10:00"),
            (25, "2028-02-29 10:00"), // a leap year
        ];
        for (n, want) in expected {
            assert_eq!(
                local(&cal, cal.add_months(anchor, n).unwrap()),
                want,
                "+{n}"
            );
        }
        // A leap day anchor: February 28 in common years, 29 in leap ones.
        let leap = ms("2028-02-29T05:00:00Z");
        assert_eq!(
            local(&cal, cal.add_years(leap, 1).unwrap()),
            "2029-02-28 12:00"
        );
        assert_eq!(
            local(&cal, cal.add_years(leap, 4).unwrap()),
            "2032-02-29 12:00"
        );
    }

    #[test]
    fn test_midnight_wib_is_five_pm_utc_the_day_before() {
        let cal = BusinessCalendar::jakarta();
        let midnight = cal.start_of_day(jiff::civil::date(2026, 12, 1)).unwrap();
        assert_eq!(midnight, ms("2026-11-30T17:00:00Z"));
        assert_eq!(cal.date(midnight).unwrap(), jiff::civil::date(2026, 12, 1));
        assert_eq!(
            cal.date(midnight - 1).unwrap(),
            jiff::civil::date(2026, 11, 30)
        );
        // The last millisecond of a year in UTC is already the next year in
        // Jakarta: year boundaries of the invoice series follow WIB.
        assert_eq!(
            cal.date(ms("2026-12-31T17:00:00Z")).unwrap(),
            jiff::civil::date(2027, 1, 1)
        );
    }

    #[test]
    fn test_zones_with_dst_keep_the_local_time_of_day() {
        let cal = BusinessCalendar::new("America/New_York").unwrap();
        // 15 February, 09:00 EST; a month later DST has begun (EDT).
        let anchor = ms("2026-02-15T14:00:00Z");
        let next = cal.add_months(anchor, 1).unwrap();
        assert_eq!(local(&cal, next), "2026-03-15 09:00");
        assert_eq!(next - anchor, (28 * 24 - 1) * 3_600_000, "one hour shorter");
        assert!(BusinessCalendar::new("Mars/Olympus").is_err());
    }

    #[test]
    fn test_dates_in_indonesian_and_english() {
        let d = jiff::civil::date(2026, 12, 1);
        assert_eq!(BusinessCalendar::format_id(d), "1 Desember 2026");
        assert_eq!(BusinessCalendar::format_en(d), "1 December 2026");
        assert_eq!(
            BusinessCalendar::format_id(jiff::civil::date(2027, 8, 17)),
            "17 Agustus 2027"
        );
    }
}
