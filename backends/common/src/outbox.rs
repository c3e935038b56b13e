//! The transactional outbox: events written in the same transaction as the
//! change they report, delivered at least once over HTTP by a dispatcher,
//! and applied once by consumers that dedupe on the event id.
//!
//! Delivery is `POST <subscriber URL>` with the [`Event`] as JSON and a
//! service token; any 2xx acknowledges it. Anything else (or no answer
//! within 5 s) is retried with exponential backoff and jitter, for ever:
//! a subscriber that is down gets its events when it returns, and a
//! process killed between commit and delivery delivers them on restart.
//! Order is not guaranteed across retries; consumers must not rely on it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::AnyConnection;
use sqlx::Row;
use tokio::sync::Notify;

use crate::db::{now_ms, Db};
use crate::metrics::HttpMetrics;
use crate::service_auth::ServiceTokens;

/// An event as delivered to subscribers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// Unique id (UUIDv7): the consumers' dedupe key.
    pub id: String,
    /// `user.registered`, `subscription.activated`, ...
    #[serde(rename = "type")]
    pub event_type: String,
    /// The producing service.
    pub source: String,
    /// When the change was committed (Unix milliseconds).
    pub occurred_at: i64,
    /// The event's data; its shape depends on the type.
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
}

/// Subscriber URLs per event type (`*` matches every type).
pub type Subscribers = BTreeMap<String, Vec<String>>;

/// Dispatcher tuning.
#[derive(Debug, Clone)]
pub struct DispatchSettings {
    /// How often the table is polled when nothing woke the dispatcher.
    pub poll_interval: Duration,
    /// First retry delay; doubled per failed attempt.
    pub base_backoff: Duration,
    /// Longest retry delay.
    pub max_backoff: Duration,
    /// Per-delivery HTTP timeout.
    pub timeout: Duration,
}

impl Default for DispatchSettings {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_secs(1),
            base_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(60),
            timeout: Duration::from_secs(5),
        }
    }
}

/// A service's outbox. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Outbox {
    source: &'static str,
    subscribers: Arc<Subscribers>,
    wake: Arc<Notify>,
}

impl Outbox {
    /// The outbox of service `source`, delivering to `subscribers`.
    pub fn new(source: &'static str, subscribers: Subscribers) -> Self {
        Self {
            source,
            subscribers: Arc::new(subscribers),
            wake: Arc::new(Notify::new()),
        }
    }

    /// Writes an event inside the caller's transaction, with one delivery
    /// row per subscriber of its type. Returns the event id. Call
    /// [`Outbox::notify`] after the commit for prompt delivery. An event
    /// nobody subscribes to is not stored (no one could ever receive it).
    pub async fn enqueue(
        &self,
        tx: &mut AnyConnection,
        event_type: &str,
        data: &impl Serialize,
    ) -> Result<String, sqlx::Error> {
        let id = uuid::Uuid::now_v7().to_string();
        let subscribers = self.subscribers_of(event_type);
        if subscribers.is_empty() {
            tracing::debug!(event_type, "no subscriber; event not stored");
            return Ok(id);
        }
        let now = now_ms();
        let payload = serde_json::to_string(data).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
        sqlx::query(
            "INSERT INTO outbox_events (id, event_type, payload, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(&id)
        .bind(event_type)
        .bind(payload)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        for url in subscribers {
            sqlx::query(
                "INSERT INTO outbox_deliveries (event_id, subscriber, attempts, next_attempt_at) \
                 VALUES ($1, $2, 0, $3)",
            )
            .bind(&id)
            .bind(url)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        Ok(id)
    }

    /// The subscribers of `event_type` (its own, then `*`), each once.
    fn subscribers_of(&self, event_type: &str) -> Vec<&str> {
        let exact = self.subscribers.get(event_type).into_iter().flatten();
        let any = self.subscribers.get("*").into_iter().flatten();
        let mut urls: Vec<&str> = Vec::new();
        for url in exact.chain(any) {
            if !urls.contains(&url.as_str()) {
                urls.push(url);
            }
        }
        urls
    }

    /// Wakes the dispatcher (after a commit that enqueued events).
    pub fn notify(&self) {
        self.wake.notify_one();
    }

    /// Runs the dispatcher until the task is dropped.
    pub async fn dispatch(
        self,
        db: Db,
        tokens: ServiceTokens,
        metrics: HttpMetrics,
        settings: DispatchSettings,
    ) {
        let client = match reqwest::Client::builder()
            .timeout(settings.timeout)
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
        {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "outbox dispatcher cannot build its HTTP client");
                return;
            }
        };
        let mut quiet_error = false;
        loop {
            match self.pass(&db, &client, &tokens, &metrics, &settings).await {
                Ok(full) => {
                    quiet_error = false;
                    if full {
                        continue;
                    }
                }
                Err(e) => {
                    if !quiet_error {
                        tracing::warn!(source = self.source, error = %e, "outbox dispatcher cannot read the outbox; retrying");
                        quiet_error = true;
                    }
                }
            }
            let _ = tokio::time::timeout(settings.poll_interval, self.wake.notified()).await;
        }
    }

    /// One pass over due deliveries. `Ok(true)` when the batch was full
    /// (more may be due at once).
    async fn pass(
        &self,
        db: &Db,
        client: &reqwest::Client,
        tokens: &ServiceTokens,
        metrics: &HttpMetrics,
        settings: &DispatchSettings,
    ) -> Result<bool, sqlx::Error> {
        const BATCH: usize = 64;
        let now = now_ms();
        let rows = sqlx::query(
            "SELECT d.event_id, d.subscriber, d.attempts, e.event_type, e.payload, e.created_at \
             FROM outbox_deliveries d JOIN outbox_events e ON e.id = d.event_id \
             WHERE d.delivered_at IS NULL AND d.next_attempt_at <= $1 \
             ORDER BY d.next_attempt_at LIMIT $2",
        )
        .bind(now)
        .bind(BATCH as i64)
        .fetch_all(db.pool())
        .await?;
        let full = rows.len() == BATCH;
        for row in rows {
            let event_id: String = row.try_get("event_id")?;
            let subscriber: String = row.try_get("subscriber")?;
            let attempts: i64 = row.try_get("attempts")?;
            let event_type: String = row.try_get("event_type")?;
            let payload: String = row.try_get("payload")?;
            let event = Event {
                id: event_id.clone(),
                event_type: event_type.clone(),
                source: self.source.to_owned(),
                occurred_at: row.try_get("created_at")?,
                data: serde_json::from_str(&payload).unwrap_or(serde_json::Value::Null),
            };
            let outcome = client
                .post(&subscriber)
                .bearer_auth(tokens.issue())
                .json(&event)
                .send()
                .await;
            let error = match outcome {
                Ok(r) if r.status().is_success() => None,
                Ok(r) => Some(format!("HTTP {}", r.status().as_u16())),
                Err(e) => Some(e.without_url().to_string()),
            };
            match error {
                None => {
                    metrics
                        .outbox_deliveries
                        .with_label_values(&[event_type.as_str(), "delivered"])
                        .inc();
                    sqlx::query(
                        "UPDATE outbox_deliveries SET delivered_at = $1, attempts = attempts + 1, \
                         last_error = NULL WHERE event_id = $2 AND subscriber = $3",
                    )
                    .bind(now_ms())
                    .bind(&event_id)
                    .bind(&subscriber)
                    .execute(db.pool())
                    .await?;
                    forget_if_delivered(db, &event_id).await?;
                }
                Some(error) => {
                    metrics
                        .outbox_deliveries
                        .with_label_values(&[event_type.as_str(), "failed"])
                        .inc();
                    let delay = backoff(attempts, settings);
                    if attempts == 0 {
                        tracing::warn!(
                            event_id,
                            event_type,
                            subscriber,
                            error,
                            "event delivery failed; will retry"
                        );
                    }
                    sqlx::query(
                        "UPDATE outbox_deliveries SET attempts = attempts + 1, next_attempt_at = $1, \
                         last_error = $2 WHERE event_id = $3 AND subscriber = $4",
                    )
                    .bind(now_ms() + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX))
                    .bind(error)
                    .bind(&event_id)
                    .bind(&subscriber)
                    .execute(db.pool())
                    .await?;
                }
            }
        }
        let pending: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM outbox_deliveries WHERE delivered_at IS NULL")
                .fetch_one(db.pool())
                .await?;
        metrics.outbox_pending.set(pending);
        Ok(full)
    }
}

/// Deletes an event once every subscriber has acknowledged it: payloads
/// can carry single-use links, which should not outlive their delivery.
async fn forget_if_delivered(db: &Db, event_id: &str) -> Result<(), sqlx::Error> {
    let mut tx = db.pool().begin().await?;
    let pending: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM outbox_deliveries WHERE event_id = $1 AND delivered_at IS NULL",
    )
    .bind(event_id)
    .fetch_one(&mut *tx)
    .await?;
    if pending == 0 {
        sqlx::query("DELETE FROM outbox_deliveries WHERE event_id = $1")
            .bind(event_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM outbox_events WHERE id = $1")
            .bind(event_id)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await
}

/// Housekeeping, run periodically by each service: deletes events every
/// subscriber acknowledged but that are still stored (the deletion right
/// after the last delivery failed), and forgets which events
/// `processed_events` saw more than `older_than` ago (a producer retries
/// for at most that long in practice, so a later redelivery is not
/// expected). Returns the number of rows deleted.
pub async fn purge(db: &Db, older_than: Duration) -> Result<u64, sqlx::Error> {
    let cutoff = now_ms() - i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX);
    let processed = sqlx::query("DELETE FROM processed_events WHERE processed_at < $1")
        .bind(cutoff)
        .execute(db.pool())
        .await?;
    let mut tx = db.pool().begin().await?;
    let deliveries = sqlx::query(
        "DELETE FROM outbox_deliveries WHERE event_id NOT IN \
         (SELECT event_id FROM outbox_deliveries WHERE delivered_at IS NULL)",
    )
    .execute(&mut *tx)
    .await?;
    let events = sqlx::query(
        "DELETE FROM outbox_events WHERE id NOT IN (SELECT event_id FROM outbox_deliveries)",
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(processed.rows_affected() + deliveries.rows_affected() + events.rows_affected())
}

/// The delay before retry number `attempts + 1`: `base · 2^attempts`,
/// capped, with ±20% jitter so a returning subscriber is not hit by every
/// producer at once.
pub fn backoff(attempts: i64, settings: &DispatchSettings) -> Duration {
    let exp = u32::try_from(attempts.clamp(0, 20)).unwrap_or(20);
    let raw = settings
        .base_backoff
        .saturating_mul(2u32.saturating_pow(exp))
        .min(settings.max_backoff);
    let mut byte = [0u8; 1];
    let _ = getrandom::fill(&mut byte);
    let jitter = 0.8 + 0.4 * f64::from(byte[0]) / 255.0;
    raw.mul_f64(jitter)
}

/// Records that `consumer` applied `event`, inside the transaction that
/// applies it. `Ok(true)` the first time, `Ok(false)` for a redelivery
/// (the caller then skips the change and still answers 2xx).
pub async fn consume_once(
    tx: &mut AnyConnection,
    consumer: &str,
    event: &Event,
) -> Result<bool, sqlx::Error> {
    // ON CONFLICT DO NOTHING (SQLite and PostgreSQL alike) instead of
    // catching the unique violation: on PostgreSQL a failed statement
    // would abort the surrounding transaction.
    let done = sqlx::query(
        "INSERT INTO processed_events (consumer, event_id, event_type, processed_at) \
         VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
    )
    .bind(consumer)
    .bind(&event.id)
    .bind(&event.event_type)
    .bind(now_ms())
    .execute(&mut *tx)
    .await?;
    Ok(done.rows_affected() == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_backoff_doubles_then_caps_with_bounded_jitter() {
        let s = DispatchSettings::default();
        for (attempts, nominal) in [(0, 500), (1, 1000), (3, 4000), (7, 60_000), (60, 60_000)] {
            let d = backoff(attempts, &s).as_millis() as f64;
            let n = nominal as f64;
            assert!(
                d >= n * 0.79 && d <= n * 1.21,
                "attempt {attempts}: {d} vs {n}"
            );
        }
        assert!(backoff(-5, &s) <= Duration::from_millis(605));
    }

    #[test]
    fn test_subscribers_of_a_type_include_the_wildcard() {
        let mut subs = Subscribers::new();
        subs.insert("user.registered".into(), vec!["http://a/e".into()]);
        subs.insert(
            "*".into(),
            vec!["http://audit/e".into(), "http://a/e".into()],
        );
        let outbox = Outbox::new("users", subs);
        // A URL under both the type and `*` is delivered to once.
        assert_eq!(
            outbox.subscribers_of("user.registered"),
            ["http://a/e", "http://audit/e"]
        );
        assert_eq!(
            outbox.subscribers_of("other"),
            ["http://audit/e", "http://a/e"]
        );
    }
}
