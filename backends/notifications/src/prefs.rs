//! What a user wants to hear and where: the channels in order of
//! preference, per category which channels are on, quiet hours in their
//! time zone, their language and phone number.
//!
//! The rules ([`choose`]): a message goes to the first channel in the
//! user's order that is on for its category and that can reach them (a
//! linked Telegram chat, a phone number); the rest of that list is its
//! fallback. A critical message (verification, password reset, security)
//! ignores the category switches but keeps the order. Quiet hours hold
//! non-critical messages until they end ([`quiet_until`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A delivery channel.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    /// E-mail over SMTP.
    Email,
    /// A Telegram chat with a bot.
    Telegram,
    /// SMS through Twilio.
    Sms,
}

impl Channel {
    /// Every channel.
    pub const ALL: [Channel; 3] = [Channel::Email, Channel::Telegram, Channel::Sms];

    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Email => "email",
            Channel::Telegram => "telegram",
            Channel::Sms => "sms",
        }
    }

    /// The channel named `s`.
    pub fn parse(s: &str) -> Option<Channel> {
        Channel::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

/// A category of messages.
pub const CATEGORIES: [&str; 3] = ["account", "billing", "marketing"];

/// Quiet hours, local time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct QuietHours {
    /// `HH:MM`, when they begin.
    #[schema(value_type = String, example = "22:00")]
    pub start: TimeOfDay,
    /// `HH:MM`, when they end (before `start`: they span midnight).
    #[schema(value_type = String, example = "07:00")]
    pub end: TimeOfDay,
}

/// A time of day (`HH:MM`), as minutes after midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeOfDay {
    minutes: u16,
}

impl TimeOfDay {
    /// Minutes after midnight.
    pub fn minutes(self) -> u16 {
        self.minutes
    }

    /// From minutes after midnight (below 1440).
    pub fn from_minutes(minutes: u16) -> Option<Self> {
        (minutes < 1440).then_some(Self { minutes })
    }

    fn parse(s: &str) -> Option<Self> {
        let (h, m) = s.split_once(':')?;
        if h.len() != 2 || m.len() != 2 {
            return None;
        }
        let h: u16 = h.parse().ok()?;
        let m: u16 = m.parse().ok()?;
        (h < 24 && m < 60).then_some(Self {
            minutes: h * 60 + m,
        })
    }
}

impl Serialize for TimeOfDay {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!(
            "{:02}:{:02}",
            self.minutes / 60,
            self.minutes % 60
        ))
    }
}

impl<'de> Deserialize<'de> for TimeOfDay {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        TimeOfDay::parse(&s)
            .ok_or_else(|| serde::de::Error::custom("a time of day as HH:MM (00:00 to 23:59)"))
    }
}

/// A user's preferences (`GET/PUT /api/notifications/preferences`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Preferences {
    /// `id` (Bahasa Indonesia) or `en`.
    pub locale: String,
    /// The IANA time zone of the quiet hours (`Asia/Jakarta`).
    pub time_zone: String,
    /// E.164 (`08…` is taken as Indonesian and stored as `+628…`); null:
    /// no SMS.
    pub phone: Option<String>,
    /// The channels in order of preference; one not listed is never used.
    pub channels: Vec<Channel>,
    /// Per category (`account`, `billing`, `marketing`), which channels
    /// are on. Critical account messages ignore these switches.
    pub categories: BTreeMap<String, BTreeMap<Channel, bool>>,
    /// Non-critical messages wait until these end; null: none.
    pub quiet_hours: Option<QuietHours>,
}

/// The default channel order.
pub const DEFAULT_CHANNELS: [Channel; 3] = [Channel::Email, Channel::Telegram, Channel::Sms];

/// Whether `channel` is on for `category` by default: everything but
/// marketing, which needs consent (UU PDP).
pub fn default_on(category: &str, _channel: Channel) -> bool {
    category != "marketing"
}

impl Preferences {
    /// The defaults for a user.
    pub fn defaults(locale: &str, time_zone: &str) -> Self {
        let categories = CATEGORIES
            .iter()
            .map(|c| {
                (
                    (*c).to_owned(),
                    Channel::ALL
                        .iter()
                        .map(|ch| (*ch, default_on(c, *ch)))
                        .collect(),
                )
            })
            .collect();
        Self {
            locale: locale.to_owned(),
            time_zone: time_zone.to_owned(),
            phone: None,
            channels: DEFAULT_CHANNELS.to_vec(),
            categories,
            quiet_hours: None,
        }
    }

    /// Whether `channel` is on for `category`.
    pub fn is_on(&self, category: &str, channel: Channel) -> bool {
        self.categories
            .get(category)
            .and_then(|m| m.get(&channel))
            .copied()
            .unwrap_or_else(|| default_on(category, channel))
    }
}

/// The channels to try, in order, for a message of `category`; `reachable`
/// says which channels can reach the user at all.
pub fn choose(
    prefs: &Preferences,
    category: &str,
    critical: bool,
    reachable: impl Fn(Channel) -> bool,
) -> Vec<Channel> {
    prefs
        .channels
        .iter()
        .copied()
        .filter(|c| critical || prefs.is_on(category, *c))
        .filter(|c| reachable(*c))
        .collect()
}

/// When quiet hours `q` (local minutes after midnight `start..end`, wrapping
/// at midnight when `end < start`) hold a message at local time `minute`:
/// the minutes to wait, 0 when outside them.
pub fn quiet_wait(q: (u16, u16), minute: u16) -> u16 {
    let (start, end) = q;
    if start == end {
        return 0;
    }
    let inside = if start < end {
        (start..end).contains(&minute)
    } else {
        minute >= start || minute < end
    };
    if !inside {
        return 0;
    }
    ((end + 1440 - minute) % 1440).max(1)
}

/// The instant a non-critical message queued at `now_ms` may go, given the
/// user's quiet hours in `zone`: `now_ms` outside them, else their end
/// (measured on the local wall clock, so a zone with DST is honoured).
pub fn quiet_until(q: Option<&QuietHours>, zone: &jiff::tz::TimeZone, now_ms: i64) -> i64 {
    let Some(q) = q else {
        return now_ms;
    };
    let Ok(ts) = jiff::Timestamp::from_millisecond(now_ms) else {
        return now_ms;
    };
    let local = ts.to_zoned(zone.clone());
    let minute =
        u16::try_from(i32::from(local.hour()) * 60 + i32::from(local.minute())).unwrap_or(0);
    let wait = quiet_wait((q.start.minutes(), q.end.minutes()), minute);
    if wait == 0 {
        return now_ms;
    }
    // The end, at the start of its minute, on the local calendar.
    let end_minute = q.end.minutes();
    let mut date = local.date();
    if end_minute <= minute {
        date = date.tomorrow().unwrap_or(date);
    }
    let end = date
        .at(
            i8::try_from(end_minute / 60).unwrap_or(0),
            i8::try_from(end_minute % 60).unwrap_or(0),
            0,
            0,
        )
        .to_zoned(zone.clone());
    match end {
        Ok(z) => z.timestamp().as_millisecond().max(now_ms),
        Err(_) => now_ms + i64::from(wait) * 60_000,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hm(s: &str) -> u16 {
        TimeOfDay::parse(s).unwrap().minutes()
    }

    #[test]
    fn test_quiet_wait_table() {
        let table = [
            // (start, end, now, wait minutes)
            ("22:00", "07:00", "21:59", 0),
            ("22:00", "07:00", "22:00", 540),
            ("22:00", "07:00", "23:30", 450),
            ("22:00", "07:00", "00:00", 420),
            ("22:00", "07:00", "06:59", 1),
            ("22:00", "07:00", "07:00", 0),
            ("13:00", "14:00", "13:30", 30),
            ("13:00", "14:00", "14:00", 0),
            ("13:00", "14:00", "12:59", 0),
            ("08:00", "08:00", "08:00", 0),
        ];
        for (s, e, now, want) in table {
            assert_eq!(
                quiet_wait((hm(s), hm(e)), hm(now)),
                want,
                "{s}-{e} at {now}"
            );
        }
    }

    #[test]
    fn test_quiet_until_in_the_users_zone() {
        let jakarta = jiff::tz::TimeZone::get("Asia/Jakarta").unwrap();
        let q = QuietHours {
            start: TimeOfDay::parse("22:00").unwrap(),
            end: TimeOfDay::parse("07:00").unwrap(),
        };
        // 2026-12-02 16:00 UTC = 23:00 WIB: held until 07:00 WIB = 00:00 UTC.
        let at = jiff::Timestamp::from_second(1_796_227_200).unwrap();
        assert_eq!(at.to_string(), "2026-12-02T16:00:00Z");
        let until = quiet_until(Some(&q), &jakarta, at.as_millisecond());
        assert_eq!(
            jiff::Timestamp::from_millisecond(until)
                .unwrap()
                .to_string(),
            "2026-12-03T00:00:00Z"
        );
        // 10:00 WIB: not held.
        let day = at.as_millisecond() - 13 * 3_600_000;
        assert_eq!(quiet_until(Some(&q), &jakarta, day), day);
        assert_eq!(
            quiet_until(None, &jakarta, at.as_millisecond()),
            at.as_millisecond()
        );
        // A zone with DST: New York on the night clocks go back
        // (2026-11-01 02:00 EDT -> 01:00 EST): quiet 00:30-01:30 local.
        let ny = jiff::tz::TimeZone::get("America/New_York").unwrap();
        let q = QuietHours {
            start: TimeOfDay::parse("00:30").unwrap(),
            end: TimeOfDay::parse("07:00").unwrap(),
        };
        // 2026-11-01 05:00 UTC = 01:00 EDT (inside).
        let at = jiff::Timestamp::from_second(1_793_509_200).unwrap();
        let until = quiet_until(Some(&q), &ny, at.as_millisecond());
        // 07:00 EST = 12:00 UTC.
        assert_eq!(
            jiff::Timestamp::from_millisecond(until)
                .unwrap()
                .to_string(),
            "2026-11-01T12:00:00Z"
        );
    }

    #[test]
    fn test_choose_follows_order_switches_and_reach() {
        let mut p = Preferences::defaults("id", "Asia/Jakarta");
        p.channels = vec![Channel::Telegram, Channel::Email, Channel::Sms];
        let all = |_| true;
        assert_eq!(
            choose(&p, "billing", false, all),
            vec![Channel::Telegram, Channel::Email, Channel::Sms]
        );
        // Not linked to Telegram, no phone.
        assert_eq!(
            choose(&p, "billing", false, |c| c == Channel::Email),
            vec![Channel::Email]
        );
        // Billing over e-mail switched off.
        p.categories
            .get_mut("billing")
            .unwrap()
            .insert(Channel::Email, false);
        assert_eq!(
            choose(&p, "billing", false, all),
            vec![Channel::Telegram, Channel::Sms]
        );
        // Marketing is off by default; account messages that are critical ignore switches.
        assert!(choose(&p, "marketing", false, all).is_empty());
        p.categories
            .get_mut("account")
            .unwrap()
            .insert(Channel::Telegram, false);
        assert_eq!(
            choose(&p, "account", true, all),
            vec![Channel::Telegram, Channel::Email, Channel::Sms]
        );
        // ... but not the channel choice.
        p.channels = vec![Channel::Email];
        assert_eq!(choose(&p, "account", true, all), vec![Channel::Email]);
    }

    #[test]
    fn test_times_of_day_parse_strictly() {
        assert_eq!(hm("00:00"), 0);
        assert_eq!(hm("23:59"), 1439);
        for bad in [
            "24:00", "7:00", "07:0", "07:60", "0700", "", "aa:bb", "-1:00",
        ] {
            assert!(TimeOfDay::parse(bad).is_none(), "{bad}");
        }
    }
}
