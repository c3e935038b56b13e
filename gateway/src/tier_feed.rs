//! Tier changes from the users service, applied in admission before the
//! token's own `tier` claim: a paid upgrade gets its limits on the next
//! request, and a lapsed subscription loses them, without waiting for the
//! next access token.
//!
//! * **Feed** ([`run`], on the background thread): a long poll of the
//!   users service's `GET /internal/tier-changes` (`tier_changes.endpoint`,
//!   a fresh service token per call). Each answer carries the changes
//!   after the last number held, in commit order; with none, the answer
//!   waits up to `tier_changes.wait`. A gateway that starts (or whose
//!   endpoint changed on reload) first asks for every change a valid
//!   token may predate.
//! * **Table** ([`TierOverrides`]): the latest change per user and per
//!   organization, replaced whole (copy on write) after each answer;
//!   requests read it through an `ArcSwap` guard and one hash lookup by
//!   borrowed bytes. Entries older than `tier_changes.retain` (longer
//!   than any access token lives) are dropped, and at most
//!   `tier_changes.max_entries` are kept (the oldest go first, counted).
//!   It lives with the process, not the config: a reload keeps it.
//! * **Which tier wins**: the change, when it may be newer than the token
//!   — applied no earlier than a second before the token's `iat` (whole
//!   seconds, so a token issued in the same second is covered, as is a
//!   second of clock difference between users instances). A token issued
//!   later carries that change or a later one, and its own claim wins.
//!   The subject is the token's verified `sub`, or its `tenant` for a
//!   token acting for an organization (whose tier is the organization's).
//!   So an override only ever gives a subject the tier the users service
//!   recorded for it last; a downgrade applies at once like an upgrade.
//! * **Channel down**: while answers fail the table keeps serving for
//!   `tier_changes.stale_after` after the last good answer, then is set
//!   aside (token claims only) until the feed answers again, which resumes
//!   from the last number held: nothing in between is missed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Deserialize;

use crate::auth::Identity;
use crate::config::TierChangesSettings;
use crate::snapshot::Snapshot;
use crate::usage::{lock, now_ms, service_client, Signer, SERVICE_NAME};

/// A change may be newer than a token issued up to this long after it
/// (the token's `iat` is in whole seconds; users instances' clocks may
/// differ a little).
const MARGIN_MS: u64 = 1000;

/// The latest change of one subject.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Change {
    tier: Box<str>,
    applied_ms: u64,
    seq: i64,
}

type Map = HashMap<Box<[u8]>, Change, foldhash::fast::RandomState>;

/// The overrides one answer left.
#[derive(Debug, Default)]
struct Table {
    /// Applied in admission (the feed answered within `stale_after`).
    active: bool,
    users: Map,
    orgs: Map,
}

impl Table {
    fn len(&self) -> usize {
        self.users.len() + self.orgs.len()
    }
}

/// Counters of the feed, read by `/metrics` and the status page.
#[derive(Debug, Default)]
pub struct FeedStats {
    /// Changes received.
    pub changes: AtomicU64,
    /// Polls that failed.
    pub failures: AtomicU64,
    /// Requests admitted with an override's tier instead of the claim's.
    pub applied: AtomicU64,
    /// Entries dropped beyond `max_entries`.
    pub evicted: AtomicU64,
    /// Entries held.
    pub entries: AtomicU64,
    /// The overrides are applied (1) or set aside (0).
    pub up: AtomicBool,
    /// The last number held (0: none yet).
    pub cursor: AtomicU64,
    /// Unix ms of the last good answer; 0: none.
    pub last_answer_ms: AtomicU64,
}

/// The process's tier overrides; kept across reloads.
#[derive(Debug, Default)]
pub struct TierOverrides {
    table: ArcSwap<Table>,
    last_error: Mutex<Option<String>>,
    /// Its counters.
    pub stats: FeedStats,
}

/// One change as the users service sends it.
#[derive(Debug, Clone, Deserialize)]
pub struct FeedChange {
    /// Its number.
    pub seq: i64,
    /// Whose tier.
    pub subject: FeedSubject,
    /// The new tier.
    pub tier: String,
    /// When it was applied (Unix ms).
    pub applied_at: i64,
}

/// Whose tier changed.
#[derive(Debug, Clone, Deserialize)]
pub struct FeedSubject {
    /// `user` or `organization`.
    pub kind: String,
    /// Its id.
    pub id: String,
}

/// An answer of `GET /internal/tier-changes`.
#[derive(Debug, Clone, Deserialize)]
pub struct FeedAnswer {
    /// The changes, oldest first.
    pub changes: Vec<FeedChange>,
    /// The number to ask after next.
    pub next: i64,
    /// More are waiting.
    #[serde(default)]
    pub more: bool,
    /// The changes replace what is held.
    #[serde(default)]
    pub reset: bool,
}

impl TierOverrides {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// `f` of the tier `id` is admitted with when a change newer than its
    /// token applies; `None`: the token's own claim.
    pub fn resolve<R>(&self, id: &Identity, f: impl FnOnce(&str) -> R) -> Option<R> {
        let table = self.table.load();
        if !table.active {
            return None;
        }
        let change = match &id.tenant {
            Some(tenant) => table.orgs.get(tenant.as_bytes()),
            None => table.users.get(id.subject.as_bytes()),
        }?;
        if change.applied_ms + MARGIN_MS <= id.issued_at.saturating_mul(1000) {
            return None;
        }
        self.stats.applied.fetch_add(1, Ordering::Relaxed);
        Some(f(&change.tier))
    }

    /// Takes an answer in: the new table, with entries applied before
    /// `now_ms - retain` dropped and at most `max_entries` kept.
    pub fn apply(&self, answer: &FeedAnswer, settings: &TierChangesSettings, now_ms: u64) {
        let old = self.table.load();
        if answer.changes.is_empty() && !answer.reset && old.active {
            // Nothing new (a long poll's wait ran out): the table stands;
            // `maintain` drops what ages out.
            self.answered(answer, now_ms);
            return;
        }
        let (mut users, mut orgs) = if answer.reset {
            (Map::default(), Map::default())
        } else {
            (old.users.clone(), old.orgs.clone())
        };
        for c in &answer.changes {
            let map = match c.subject.kind.as_str() {
                "user" => &mut users,
                "organization" => &mut orgs,
                other => {
                    tracing::debug!(
                        kind = other,
                        "tier change of an unknown kind of subject; ignored"
                    );
                    continue;
                }
            };
            let change = Change {
                tier: c.tier.as_str().into(),
                applied_ms: c.applied_at.max(0) as u64,
                seq: c.seq,
            };
            let key: Box<[u8]> = c.subject.id.as_bytes().into();
            match map.get(&key) {
                Some(held) if held.seq >= change.seq => {}
                _ => {
                    map.insert(key, change);
                }
            }
        }
        let mut table = Table {
            active: true,
            users,
            orgs,
        };
        self.prune(&mut table, settings, now_ms);
        self.store(table);
        self.answered(answer, now_ms);
    }

    /// Counts a good answer.
    fn answered(&self, answer: &FeedAnswer, now_ms: u64) {
        self.stats
            .changes
            .fetch_add(answer.changes.len() as u64, Ordering::Relaxed);
        self.stats
            .cursor
            .store(answer.next.max(0) as u64, Ordering::Relaxed);
        self.stats.last_answer_ms.store(now_ms, Ordering::Relaxed);
        self.set_error(None);
    }

    fn prune(&self, table: &mut Table, settings: &TierChangesSettings, now_ms: u64) {
        let horizon = now_ms.saturating_sub(settings.retain.as_millis() as u64);
        table.users.retain(|_, c| c.applied_ms >= horizon);
        table.orgs.retain(|_, c| c.applied_ms >= horizon);
        let over = table.len().saturating_sub(settings.max_entries);
        if over == 0 {
            return;
        }
        // The `over` oldest go: a token that predates them is the oldest
        // still valid, or expired.
        let mut times: Vec<u64> = table
            .users
            .values()
            .chain(table.orgs.values())
            .map(|c| c.applied_ms)
            .collect();
        times.sort_unstable();
        let cut = times[over - 1];
        let mut left = over;
        for map in [&mut table.users, &mut table.orgs] {
            map.retain(|_, c| {
                if left > 0 && c.applied_ms <= cut {
                    left -= 1;
                    false
                } else {
                    true
                }
            });
        }
        self.stats
            .evicted
            .fetch_add((over - left) as u64, Ordering::Relaxed);
    }

    /// Drops entries past `retain` while the feed is quiet, and sets the
    /// table aside when the last good answer is older than `stale_after`.
    fn maintain(&self, settings: &TierChangesSettings, now_ms: u64) {
        let old = self.table.load();
        let last = self.stats.last_answer_ms.load(Ordering::Relaxed);
        let fresh =
            last > 0 && now_ms.saturating_sub(last) <= settings.stale_after.as_millis() as u64;
        if fresh == old.active {
            let horizon = now_ms.saturating_sub(settings.retain.as_millis() as u64);
            let expired = old
                .users
                .values()
                .chain(old.orgs.values())
                .any(|c| c.applied_ms < horizon);
            if !expired {
                return;
            }
        }
        if old.active && !fresh {
            tracing::warn!(
                stale_after = ?settings.stale_after,
                "tier change feed: no answer for too long; admission uses the tokens' own tiers \
                 until it answers again"
            );
        }
        let mut table = Table {
            active: fresh,
            users: old.users.clone(),
            orgs: old.orgs.clone(),
        };
        self.prune(&mut table, settings, now_ms);
        self.store(table);
    }

    /// Forgets everything (the feed was turned off or moved).
    fn clear(&self) {
        self.store(Table::default());
        self.stats.last_answer_ms.store(0, Ordering::Relaxed);
    }

    fn store(&self, table: Table) {
        self.stats
            .entries
            .store(table.len() as u64, Ordering::Relaxed);
        self.stats.up.store(table.active, Ordering::Relaxed);
        self.table.store(Arc::new(table));
    }

    /// Why the last poll failed, while it is the latest outcome.
    pub fn last_error(&self) -> Option<String> {
        lock(&self.last_error).clone()
    }

    fn set_error(&self, e: Option<String>) {
        *lock(&self.last_error) = e;
    }
}

/// One poll: the changes after `after` (all recent ones without it).
async fn poll(
    client: &reqwest::Client,
    settings: &TierChangesSettings,
    signer: &Signer,
    after: Option<i64>,
) -> Result<FeedAnswer, String> {
    let token = signer.token(SERVICE_NAME, &settings.audience)?;
    let wait = if after.is_some() {
        settings.wait.as_secs()
    } else {
        0
    };
    let mut request = client
        .get(&settings.endpoint)
        .bearer_auth(token)
        .timeout(Duration::from_secs(wait) + settings.timeout)
        .query(&[("wait", wait)]);
    if let Some(after) = after {
        request = request.query(&[("after", after)]);
    }
    let resp = request
        .send()
        .await
        .map_err(|e| format!("{}: {e}", settings.endpoint))?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        return Err(format!("{}: {status}: {}", settings.endpoint, body.trim()));
    }
    resp.json::<FeedAnswer>()
        .await
        .map_err(|e| format!("{}: not a tier change answer: {e}", settings.endpoint))
}

/// The feed: long-polls the live config's `tier_changes.endpoint` and
/// keeps `overrides` current, backing off while it fails. Runs until the
/// background runtime stops.
pub async fn run(
    overrides: Arc<TierOverrides>,
    state: Arc<ArcSwap<Snapshot>>,
    signer: Option<Arc<Signer>>,
) {
    let Some(client) = service_client("tier change feed: tokens' own tiers only") else {
        return;
    };
    let mut cursor: Option<i64> = None;
    let mut endpoint: Option<String> = None;
    let mut backoff = Duration::ZERO;
    loop {
        let settings = state.load().tier_changes.clone();
        let (Some(settings), Some(signer)) = (settings, signer.as_deref()) else {
            if endpoint.take().is_some() {
                overrides.clear();
                cursor = None;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        if endpoint.as_deref() != Some(settings.endpoint.as_str()) {
            // Another users service: its numbers are not ours.
            if endpoint.is_some() {
                overrides.clear();
            }
            cursor = None;
            endpoint = Some(settings.endpoint.clone());
        }
        let started = tokio::time::Instant::now();
        match poll(&client, &settings, signer, cursor).await {
            Ok(answer) => {
                backoff = Duration::ZERO;
                if answer.changes.is_empty()
                    && cursor.is_some()
                    && started.elapsed() < Duration::from_millis(100)
                {
                    // A service that does not wait: do not spin on it.
                    backoff = Duration::from_millis(250);
                }
                if !answer.changes.is_empty() {
                    tracing::debug!(
                        changes = answer.changes.len(),
                        next = answer.next,
                        "tier changes received"
                    );
                }
                overrides.apply(&answer, &settings, now_ms());
                cursor = Some(answer.next);
            }
            Err(why) => {
                overrides.stats.failures.fetch_add(1, Ordering::Relaxed);
                if overrides.last_error().as_deref() != Some(why.as_str()) {
                    tracing::warn!(error = %why, "tier change feed: poll failed; retrying");
                }
                overrides.set_error(Some(why));
                backoff = (backoff * 2).clamp(Duration::from_millis(100), settings.max_backoff);
            }
        }
        overrides.maintain(&settings, now_ms());
        if !backoff.is_zero() {
            tokio::time::sleep(backoff).await;
            if overrides.last_error().is_none() {
                backoff = Duration::ZERO;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn settings(max_entries: usize) -> TierChangesSettings {
        TierChangesSettings {
            endpoint: "http://127.0.0.1:1/internal/tier-changes".into(),
            audience: "users".into(),
            wait: Duration::from_secs(20),
            timeout: Duration::from_secs(5),
            stale_after: Duration::from_secs(30),
            retain: Duration::from_secs(3600),
            max_entries,
            max_backoff: Duration::from_secs(5),
        }
    }

    fn identity(sub: &str, tenant: Option<&str>, tier: &str, issued_at: u64) -> Identity {
        Identity {
            subject: HeaderValue::from_str(sub).unwrap(),
            tier: Some(tier.into()),
            roles: Vec::new(),
            roles_header: None,
            tenant: tenant.map(|t| HeaderValue::from_str(t).unwrap()),
            tenant_key: None,
            expires_at: issued_at + 900,
            issued_at,
            key: 0,
        }
    }

    fn change(seq: i64, kind: &str, id: &str, tier: &str, applied_at: i64) -> FeedChange {
        FeedChange {
            seq,
            subject: FeedSubject {
                kind: kind.into(),
                id: id.into(),
            },
            tier: tier.into(),
            applied_at,
        }
    }

    fn answer(changes: Vec<FeedChange>) -> FeedAnswer {
        let next = changes.last().map_or(0, |c| c.seq);
        FeedAnswer {
            changes,
            next,
            more: false,
            reset: false,
        }
    }

    fn tier(o: &TierOverrides, id: &Identity) -> Option<String> {
        o.resolve(id, |t| t.to_owned())
    }

    const NOW: u64 = 1_800_000_000_000;

    #[test]
    fn test_a_change_applies_to_tokens_issued_before_it_and_not_after() {
        let o = TierOverrides::new();
        // Half a second into a second: tokens carry whole seconds.
        let at = NOW as i64 - 60_000 + 500;
        o.apply(
            &answer(vec![change(1, "user", "u1", "PREMIUM", at)]),
            &settings(10),
            NOW,
        );
        let secs = |ms: i64| (ms / 1000) as u64;
        // (token issued at, expected tier): before, the same second, one
        // second of clock difference, then clearly after.
        for (iat, want) in [
            (secs(at) - 600, Some("PREMIUM")),
            (secs(at), Some("PREMIUM")),
            (secs(at) + 1, Some("PREMIUM")),
            (secs(at) + 2, None),
            (secs(at) + 300, None),
        ] {
            let id = identity("u1", None, "FREE", iat);
            assert_eq!(tier(&o, &id).as_deref(), want, "iat {iat}");
        }
        // Another user, and the same id acting for an organization, are
        // not touched.
        assert_eq!(tier(&o, &identity("u2", None, "FREE", secs(at) - 5)), None);
        assert_eq!(
            tier(&o, &identity("u1", Some("o1"), "FREE", secs(at) - 5)),
            None
        );
    }

    #[test]
    fn test_an_organization_change_applies_to_its_members_tokens() {
        let o = TierOverrides::new();
        let at = NOW as i64 - 1000;
        o.apply(
            &answer(vec![change(7, "organization", "o1", "ENTERPRISE", at)]),
            &settings(10),
            NOW,
        );
        let iat = (at / 1000) as u64 - 10;
        for member in ["u1", "u2"] {
            assert_eq!(
                tier(&o, &identity(member, Some("o1"), "FREE", iat)).as_deref(),
                Some("ENTERPRISE")
            );
        }
        // The member's personal token keeps its own tier.
        assert_eq!(tier(&o, &identity("u1", None, "FREE", iat)), None);
        assert_eq!(o.stats.applied.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn test_the_latest_change_wins_whatever_order_answers_hold() {
        let o = TierOverrides::new();
        let s = settings(10);
        let at = NOW as i64 - 10_000;
        o.apply(
            &answer(vec![
                change(1, "user", "u1", "PREMIUM", at),
                change(2, "user", "u1", "FREE", at + 1),
            ]),
            &s,
            NOW,
        );
        let id = identity("u1", None, "PREMIUM", (at / 1000) as u64 - 60);
        assert_eq!(
            tier(&o, &id).as_deref(),
            Some("FREE"),
            "a downgrade applies at once"
        );
        // An old change seen again (a reset answer overlapping) does not
        // undo it.
        o.apply(
            &answer(vec![change(1, "user", "u1", "PREMIUM", at)]),
            &s,
            NOW,
        );
        assert_eq!(tier(&o, &id).as_deref(), Some("FREE"));
        // A reset replaces everything.
        let mut reset = answer(vec![change(1, "user", "u9", "BASIC", at)]);
        reset.reset = true;
        o.apply(&reset, &s, NOW);
        assert_eq!(tier(&o, &id), None);
        assert_eq!(o.stats.entries.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn test_the_table_is_bounded_by_age_and_size() {
        let o = TierOverrides::new();
        let s = settings(3);
        let old = NOW as i64 - 2 * 3600 * 1000;
        let recent = NOW as i64 - 1000;
        o.apply(
            &answer(vec![
                change(1, "user", "gone", "PREMIUM", old),
                change(2, "user", "a", "PREMIUM", recent - 40),
                change(3, "user", "b", "PREMIUM", recent - 30),
                change(4, "organization", "c", "PREMIUM", recent - 20),
                change(5, "user", "d", "PREMIUM", recent - 10),
            ]),
            &s,
            NOW,
        );
        // Past `retain`: dropped, not counted as evicted; beyond
        // `max_entries`: the oldest ("a") goes.
        assert_eq!(o.stats.entries.load(Ordering::Relaxed), 3);
        assert_eq!(o.stats.evicted.load(Ordering::Relaxed), 1);
        let iat = (old / 1000) as u64;
        for (who, want) in [
            ("gone", None),
            ("a", None),
            ("b", Some("PREMIUM")),
            ("d", Some("PREMIUM")),
        ] {
            assert_eq!(
                tier(&o, &identity(who, None, "FREE", iat)).as_deref(),
                want,
                "{who}"
            );
        }
        assert_eq!(
            tier(&o, &identity("x", Some("c"), "FREE", iat)).as_deref(),
            Some("PREMIUM")
        );
    }

    #[test]
    fn test_a_silent_feed_is_set_aside_then_resumes() {
        let o = TierOverrides::new();
        let s = settings(10);
        let at = NOW as i64 - 1000;
        o.apply(
            &answer(vec![change(1, "user", "u1", "PREMIUM", at)]),
            &s,
            NOW,
        );
        let id = identity("u1", None, "FREE", (at / 1000) as u64 - 1);
        o.maintain(&s, NOW + 29_000);
        assert_eq!(tier(&o, &id).as_deref(), Some("PREMIUM"));
        o.maintain(&s, NOW + 31_000);
        assert_eq!(
            tier(&o, &id),
            None,
            "the token's claim once the feed is stale"
        );
        assert!(!o.stats.up.load(Ordering::Relaxed));
        o.apply(&answer(Vec::new()), &s, NOW + 32_000);
        assert_eq!(
            tier(&o, &id).as_deref(),
            Some("PREMIUM"),
            "kept while set aside"
        );
    }
}
