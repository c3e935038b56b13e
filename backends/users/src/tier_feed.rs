//! The tier change feed: every change of a user's or an organization's
//! tier, numbered in commit order, for the gateways
//! (`GET /internal/tier-changes`). A paid upgrade or a lapse reaches
//! admission within a second instead of with the next access token.
//!
//! * Written by [`crate::core::TierEvents`] in the transaction that
//!   changes the tier ([`storage::set_tier`]); an event that names the
//!   tier the subject has already adds nothing.
//! * Read as a long poll: `after` = the last number the caller holds. With
//!   nothing newer the answer waits up to `wait` for a change (woken at
//!   once by a change this process commits, and re-reading the table every
//!   [`RECHECK`] for changes another instance commits).
//! * A caller without a number (a gateway that just started) gets every
//!   change of the last access-token lifetime (plus a minute of leeway):
//!   any older change is already in every token still valid.
//! * Kept for a day, purged by the housekeeping.
//! * Times are the system's, not the service clock's: they are compared
//!   with the `iat` of access tokens, which are signed on the system's.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Notify;

use crate::core::Users;
use crate::error::Error;
use crate::storage;

/// Most changes in one answer (`more` says when there are others).
pub const MAX_CHANGES: i64 = 1000;

/// Longest wait a caller may ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(25);

/// How often a waiting poll re-reads the table (for changes committed by
/// another instance of the service, which cannot wake it).
pub const RECHECK: Duration = Duration::from_millis(250);

/// How long feed rows are kept.
pub const KEPT: Duration = Duration::from_secs(24 * 3600);

/// Wakes the polls waiting in this process when a change commits.
#[derive(Debug, Default)]
pub struct Changed(Notify);

impl Changed {
    /// A change committed.
    pub fn notify(&self) {
        self.0.notify_waiters();
    }
}

/// Whose tier changed.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ChangedSubject {
    /// `user` or `organization`.
    pub kind: String,
    /// Its id.
    pub id: String,
}

/// One change.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TierChange {
    /// Its number: changes commit in this order.
    pub seq: i64,
    /// Whose tier.
    pub subject: ChangedSubject,
    /// The new tier.
    pub tier: String,
    /// When the users service applied it (Unix ms): access tokens issued
    /// before carry the old tier.
    pub applied_at: i64,
}

/// An answer of the feed.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TierChanges {
    /// The changes, oldest first.
    pub changes: Vec<TierChange>,
    /// The number to ask after next time.
    pub next: i64,
    /// More changes are waiting: ask again at once.
    pub more: bool,
    /// The number asked after is beyond the last change (the database was
    /// replaced): these are the recent changes, to replace what the
    /// caller holds.
    pub reset: bool,
}

impl From<storage::TierChangeRow> for TierChange {
    fn from(r: storage::TierChangeRow) -> Self {
        Self {
            seq: r.seq,
            subject: ChangedSubject {
                kind: r.subject_kind,
                id: r.subject_id,
            },
            tier: r.tier,
            applied_at: r.applied_at,
        }
    }
}

impl Users {
    /// The changes after `after` (see the module), waiting up to `wait`
    /// when there are none yet; without `after`, the recent ones.
    pub async fn tier_changes(
        &self,
        changed: &Arc<Changed>,
        after: Option<i64>,
        wait: Duration,
    ) -> Result<TierChanges, Error> {
        let Some(after) = after else {
            return self.recent_tier_changes().await;
        };
        if after < 0 {
            return Err(crate::core::field_error("after", "must not be negative"));
        }
        let deadline = tokio::time::Instant::now() + wait.min(MAX_WAIT);
        if after > storage::last_tier_change(&mut *self.conn().await?).await? {
            let mut recent = self.recent_tier_changes().await?;
            recent.reset = true;
            return Ok(recent);
        }
        loop {
            // Registered before the read, so a change committed between
            // the read and the wait still wakes it.
            let woken = changed.0.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let rows =
                storage::tier_changes_after(&mut *self.conn().await?, after, MAX_CHANGES).await?;
            if !rows.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(answer(rows, after));
            }
            let recheck = (tokio::time::Instant::now() + RECHECK).min(deadline);
            tokio::select! {
                _ = woken => {}
                _ = tokio::time::sleep_until(recheck) => {}
            }
        }
    }

    /// Every change a valid access token may predate.
    async fn recent_tier_changes(&self) -> Result<TierChanges, Error> {
        let mut conn = self.conn().await?;
        // The counter first: every change numbered up to it has committed,
        // and one committing later gets a larger number.
        let last = storage::last_tier_change(&mut conn).await?;
        let window = self.config.access_token_ttl + Duration::from_secs(60);
        let since = backend_common::clock::system_now_ms() - window.as_millis() as i64;
        let mut rows = storage::tier_changes_since(&mut conn, since, MAX_CHANGES).await?;
        rows.retain(|r| r.seq <= last);
        let mut recent = answer(rows, last);
        if !recent.more {
            // Everything up to the counter is seen: the next poll waits
            // for what commits after it.
            recent.next = last;
        }
        Ok(recent)
    }

    /// Deletes feed rows older than [`KEPT`].
    pub(crate) async fn purge_tier_changes(&self) -> Result<u64, Error> {
        let before = backend_common::clock::system_now_ms() - KEPT.as_millis() as i64;
        Ok(storage::purge_tier_changes(&mut *self.conn().await?, before).await?)
    }
}

fn answer(rows: Vec<storage::TierChangeRow>, after: i64) -> TierChanges {
    let more = rows.len() as i64 == MAX_CHANGES;
    TierChanges {
        next: rows.last().map_or(after, |r| r.seq),
        more,
        reset: false,
        changes: rows.into_iter().map(TierChange::from).collect(),
    }
}
