//! The transactional outbox: events written in the same transaction as the
//! change they report, delivered at least once over HTTP, and applied once
//! by consumers that dedupe on the event id ([`crate::consumer`]).
//!
//! **Delivery.** One loop per subscriber, so a slow or dead subscriber
//! delays only its own events. Each loop claims a batch of its due
//! deliveries (`claim`, `claimed_until`: another instance of the service
//! skips claimed rows, and takes over a claim that expired because its
//! holder died), sends each as `POST <url>` with the [`Event`] as JSON and
//! a fresh service token for the subscriber, and records the outcome. Any
//! 2xx acknowledges. A failure is retried with exponential backoff and
//! jitter; a permanent refusal (400, 404, 405, 410, 413, 415, 422) or
//! [`DispatchSettings::max_attempts`] failures park the delivery as dead:
//! counted (`outbox_dead_total`), listed by `tiergate events dead`, put
//! back by `tiergate events retry`. Order is not guaranteed across
//! retries; consumers must not rely on it.
//!
//! **At rest**, payloads are encrypted (XChaCha20-Poly1305, the key derived
//! from the service's own key, the event id as associated data): events
//! carry single-use links, and a copy of the database should not reveal
//! them. An event is deleted once every subscriber has acknowledged it.
//!
//! **Side effects that are not database writes** (a mail, a Telegram
//! message, an SMS) follow one pattern: claim the job in the database,
//! send it with the provider's idempotency key where the provider has one,
//! then mark it sent. A crash between sending and marking sends it again
//! (a duplicate); it never loses it. This dispatcher is that pattern for
//! HTTP deliveries.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::AnyConnection;
use sqlx::Row;
use tokio::sync::Notify;

use crate::clock::Clock;
use crate::db::Db;
use crate::metrics::HttpMetrics;
use crate::sealed::Sealer;
use crate::service_auth::ServiceKeys;

/// An event as delivered to subscribers. Fields a consumer does not know
/// are ignored: producers may add fields without breaking consumers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
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

/// Where one subscriber gets its events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscriber {
    /// What its deliveries are stored under: the service's name when the
    /// config names a service (so a new address in `peers` applies to
    /// deliveries already queued), else the URL.
    pub key: String,
    /// `POST` target.
    pub url: String,
    /// The service it is: the audience of its service tokens.
    pub audience: String,
}

impl Subscriber {
    /// A service subscriber: `name` reached at `base` (its
    /// `/internal/events`).
    pub fn service(name: &str, base: &str) -> Self {
        Self {
            key: name.to_owned(),
            url: format!("{}/internal/events", base.trim_end_matches('/')),
            audience: name.to_owned(),
        }
    }

    /// A subscriber at `url`, whose tokens are for `audience`.
    pub fn url(url: &str, audience: &str) -> Self {
        Self {
            key: url.to_owned(),
            url: url.to_owned(),
            audience: audience.to_owned(),
        }
    }
}

/// Subscribers per event type (`*` matches every type).
pub type Subscribers = BTreeMap<String, Vec<Subscriber>>;

/// Dispatcher tuning.
#[derive(Debug, Clone)]
pub struct DispatchSettings {
    /// How often a subscriber's loop looks for due deliveries when nothing
    /// woke it.
    pub poll_interval: Duration,
    /// First retry delay; doubled per failed attempt.
    pub base_backoff: Duration,
    /// Longest retry delay.
    pub max_backoff: Duration,
    /// Per-delivery HTTP timeout.
    pub timeout: Duration,
    /// Failed attempts after which a delivery is parked as dead.
    pub max_attempts: i64,
    /// Deliveries one loop claims at a time.
    pub batch: i64,
}

impl Default for DispatchSettings {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_secs(1),
            base_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(300),
            timeout: Duration::from_secs(5),
            // With the 5 min cap: about 8 hours of a subscriber being down.
            max_attempts: 100,
            batch: 16,
        }
    }
}

/// How often the pending/dead gauges are refreshed (a manual clock that
/// moves refreshes them at once).
const GAUGES_EVERY: Duration = Duration::from_secs(15);

/// A service's outbox. Cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    source: &'static str,
    subscribers: Arc<Subscribers>,
    wake: Arc<Notify>,
    /// Seals payloads (the current key; the previous one still opens).
    sealer: Sealer,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("source", &self.source)
            .field("subscribers", &self.subscribers)
            .finish_non_exhaustive()
    }
}

impl Outbox {
    /// The outbox of service `source`, delivering to `subscribers`, its
    /// payloads sealed with a key derived from `keys` (and opened with it
    /// or with the one derived from its previous key).
    pub fn new(source: &'static str, subscribers: Subscribers, keys: &ServiceKeys) -> Self {
        Self {
            source,
            subscribers: Arc::new(subscribers),
            wake: Arc::new(Notify::new()),
            sealer: Sealer::new(keys, "outbox payloads", "payload"),
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
        now_ms: i64,
    ) -> Result<String, sqlx::Error> {
        let id = uuid::Uuid::now_v7().to_string();
        let subscribers = self.subscribers_of(event_type);
        if subscribers.is_empty() {
            tracing::debug!(event_type, "no subscriber; event not stored");
            return Ok(id);
        }
        let payload = serde_json::to_string(data).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
        let sealed = self.seal(&id, &payload)?;
        sqlx::query(
            "INSERT INTO outbox_events (id, event_type, payload, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(&id)
        .bind(event_type)
        .bind(sealed)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        for s in subscribers {
            sqlx::query(
                "INSERT INTO outbox_deliveries (event_id, subscriber, attempts, next_attempt_at) \
                 VALUES ($1, $2, 0, $3)",
            )
            .bind(&id)
            .bind(&s.key)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
        }
        Ok(id)
    }

    fn seal(&self, id: &str, payload: &str) -> Result<String, sqlx::Error> {
        self.sealer
            .seal(id, payload.as_bytes())
            .map_err(|e| sqlx::Error::Encode(e.into()))
    }

    /// The payload of event `id` as stored (sealed, or plain JSON written
    /// before payloads were sealed).
    fn open(&self, id: &str, stored: &str) -> Result<serde_json::Value, String> {
        let json = match self.sealer.open(id, stored) {
            None => stored.to_owned(),
            Some(plain) => {
                String::from_utf8(plain.map_err(|e| format!("{e}, then `tiergate events retry`"))?)
                    .map_err(|e| e.to_string())?
            }
        };
        serde_json::from_str(&json).map_err(|e| format!("payload is not JSON: {e}"))
    }

    /// The subscribers of `event_type` (its own, then `*`), each once.
    fn subscribers_of(&self, event_type: &str) -> Vec<&Subscriber> {
        let exact = self.subscribers.get(event_type).into_iter().flatten();
        let any = self.subscribers.get("*").into_iter().flatten();
        let mut out: Vec<&Subscriber> = Vec::new();
        for s in exact.chain(any) {
            if !out.iter().any(|o| o.key == s.key) {
                out.push(s);
            }
        }
        out
    }

    /// Every subscriber, each once.
    fn all_subscribers(&self) -> Vec<Subscriber> {
        let mut out: Vec<Subscriber> = Vec::new();
        for s in self.subscribers.values().flatten() {
            if !out.iter().any(|o| o.key == s.key) {
                out.push(s.clone());
            }
        }
        out
    }

    /// Wakes the dispatcher (after a commit that enqueued events).
    pub fn notify(&self) {
        self.wake.notify_waiters();
    }

    /// Runs the dispatcher until the task is dropped: one delivery loop per
    /// subscriber, and a gauge refresh every 15 s.
    pub async fn dispatch(
        self,
        db: Db,
        keys: ServiceKeys,
        metrics: HttpMetrics,
        settings: DispatchSettings,
        clock: Clock,
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
        let loop_of = |s: Subscriber| Loop {
            outbox: self.clone(),
            db: db.clone(),
            client: client.clone(),
            keys: keys.clone(),
            metrics: metrics.clone(),
            settings: settings.clone(),
            clock: clock.clone(),
            subscriber: s,
            claim: uuid::Uuid::now_v7().to_string(),
        };
        let subscribers = self.all_subscribers();
        if let Err(e) = park_orphans(&db, &subscribers, clock.now_ms()).await {
            tracing::warn!(error = %e, "cannot check the outbox for deliveries to removed subscribers");
        }
        let mut loops: Vec<_> = subscribers
            .into_iter()
            .map(|s| Box::pin(loop_of(s).run()))
            .collect();
        let gauges = async {
            let mut ticker = clock.ticker();
            loop {
                if let Ok((pending, dead)) = counts(&db).await {
                    metrics.outbox_pending.set(pending);
                    metrics.outbox_dead.set(dead);
                }
                ticker.tick(GAUGES_EVERY).await;
            }
        };
        // The loops never end; with no subscriber there are none, and the
        // gauges still run.
        let all = async {
            futures_util::future::join_all(loops.iter_mut()).await;
            std::future::pending::<()>().await
        };
        tokio::select! {
            _ = all => {}
            _ = gauges => {}
        }
    }
}

/// One subscriber's delivery loop.
struct Loop {
    outbox: Outbox,
    db: Db,
    client: reqwest::Client,
    keys: ServiceKeys,
    metrics: HttpMetrics,
    settings: DispatchSettings,
    clock: Clock,
    subscriber: Subscriber,
    /// This loop's claim token.
    claim: String,
}

/// What a delivery attempt came to.
enum Outcome {
    Delivered,
    Retry(String),
    Dead(String),
}

impl Loop {
    async fn run(self) {
        let mut quiet_error = false;
        let mut ticker = self.clock.ticker();
        loop {
            // Registered before the pass: an event committed while this
            // loop is busy delivering still wakes it (`notify_waiters`
            // only reaches registered waiters), instead of waiting for the
            // next poll.
            let wake = self.outbox.wake.notified();
            tokio::pin!(wake);
            wake.as_mut().enable();
            match self.pass().await {
                Ok(full) => {
                    quiet_error = false;
                    if full {
                        continue;
                    }
                }
                Err(e) => {
                    if !quiet_error {
                        tracing::warn!(source = self.outbox.source, subscriber = %self.subscriber.key,
                            error = %e, "outbox dispatcher cannot read the outbox; retrying");
                        quiet_error = true;
                    }
                }
            }
            tokio::select! {
                _ = wake => {}
                _ = ticker.tick(self.settings.poll_interval) => {}
            }
        }
    }

    /// Claims and delivers one batch. `Ok(true)` when the batch was full
    /// (more may be due at once).
    async fn pass(&self) -> Result<bool, sqlx::Error> {
        let now = self.clock.now_ms();
        let lease = i64::try_from(
            self.settings
                .timeout
                .saturating_mul(u32::try_from(self.settings.batch).unwrap_or(16))
                .as_millis(),
        )
        .unwrap_or(i64::MAX / 4)
        .saturating_add(30_000);
        // The outer conditions repeat the inner ones: on PostgreSQL a row
        // another instance claimed meanwhile fails the re-check and is
        // skipped; SQLite runs one writer at a time.
        let claimed = sqlx::query(
            "UPDATE outbox_deliveries SET claim = $1, claimed_until = $2 \
             WHERE subscriber = $3 AND delivered_at IS NULL AND dead_at IS NULL \
               AND next_attempt_at <= $4 AND (claimed_until IS NULL OR claimed_until < $4) \
               AND event_id IN (SELECT event_id FROM outbox_deliveries \
                 WHERE subscriber = $3 AND delivered_at IS NULL AND dead_at IS NULL \
                   AND next_attempt_at <= $4 AND (claimed_until IS NULL OR claimed_until < $4) \
                 ORDER BY next_attempt_at LIMIT $5)",
        )
        .bind(&self.claim)
        .bind(now.saturating_add(lease))
        .bind(&self.subscriber.key)
        .bind(now)
        .bind(self.settings.batch)
        .execute(self.db.pool())
        .await?
        .rows_affected();
        if claimed == 0 {
            return Ok(false);
        }
        let rows = sqlx::query(
            "SELECT d.event_id, d.attempts, e.event_type, e.payload, e.created_at \
             FROM outbox_deliveries d JOIN outbox_events e ON e.id = d.event_id \
             WHERE d.subscriber = $1 AND d.claim = $2 AND d.delivered_at IS NULL \
               AND d.dead_at IS NULL ORDER BY d.next_attempt_at",
        )
        .bind(&self.subscriber.key)
        .bind(&self.claim)
        .fetch_all(self.db.pool())
        .await?;
        for row in rows {
            let event_id: String = row.try_get("event_id")?;
            let attempts: i64 = row.try_get("attempts")?;
            let event_type: String = row.try_get("event_type")?;
            let stored: String = row.try_get("payload")?;
            let outcome = match self.outbox.open(&event_id, &stored) {
                Ok(data) => {
                    let event = Event {
                        id: event_id.clone(),
                        event_type: event_type.clone(),
                        source: self.outbox.source.to_owned(),
                        occurred_at: row.try_get("created_at")?,
                        data,
                    };
                    self.send(&event, attempts).await
                }
                Err(why) => Outcome::Dead(why),
            };
            self.record(&event_id, &event_type, attempts, outcome)
                .await?;
        }
        Ok(claimed >= u64::try_from(self.settings.batch).unwrap_or(16))
    }

    async fn send(&self, event: &Event, attempts: i64) -> Outcome {
        let sent = self
            .client
            .post(&self.subscriber.url)
            .bearer_auth(self.keys.issue(&self.subscriber.audience))
            .json(event)
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => Outcome::Delivered,
            Ok(r) => {
                let status = r.status().as_u16();
                let why = format!("HTTP {status}");
                if matches!(status, 400 | 404 | 405 | 410 | 413 | 415 | 422) {
                    Outcome::Dead(why)
                } else if attempts + 1 >= self.settings.max_attempts {
                    Outcome::Dead(format!("{why} after {} attempts", attempts + 1))
                } else {
                    Outcome::Retry(why)
                }
            }
            Err(e) => {
                let why = e.without_url().to_string();
                if attempts + 1 >= self.settings.max_attempts {
                    Outcome::Dead(format!("{why} after {} attempts", attempts + 1))
                } else {
                    Outcome::Retry(why)
                }
            }
        }
    }

    async fn record(
        &self,
        event_id: &str,
        event_type: &str,
        attempts: i64,
        outcome: Outcome,
    ) -> Result<(), sqlx::Error> {
        let now = self.clock.now_ms();
        let count = |result: &str| {
            self.metrics
                .outbox_deliveries
                .with_label_values(&[event_type, result])
                .inc();
        };
        match outcome {
            Outcome::Delivered => {
                count("delivered");
                // Recorded even if the claim was lost meanwhile: the
                // subscriber has it (a concurrent send is a duplicate).
                sqlx::query(
                    "UPDATE outbox_deliveries SET delivered_at = $1, attempts = attempts + 1, \
                     last_error = NULL, claim = NULL WHERE event_id = $2 AND subscriber = $3",
                )
                .bind(now)
                .bind(event_id)
                .bind(&self.subscriber.key)
                .execute(self.db.pool())
                .await?;
                forget_if_delivered(&self.db, event_id).await?;
            }
            Outcome::Retry(error) => {
                count("failed");
                if attempts == 0 {
                    tracing::warn!(event_id, event_type, subscriber = %self.subscriber.key,
                        error, "event delivery failed; will retry");
                }
                let delay = backoff(attempts, &self.settings);
                let due =
                    now.saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX / 4));
                self.release(
                    "UPDATE outbox_deliveries SET attempts = attempts + 1, next_attempt_at = $1, \
                     last_error = $2, claim = NULL, claimed_until = NULL \
                     WHERE event_id = $3 AND subscriber = $4 AND claim = $5",
                    due,
                    &error,
                    event_id,
                )
                .await?;
            }
            Outcome::Dead(error) => {
                count("dead");
                self.metrics
                    .outbox_dead_total
                    .with_label_values(&[event_type])
                    .inc();
                tracing::error!(event_id, event_type, subscriber = %self.subscriber.key, error,
                    "event delivery parked as dead; `tiergate events retry` sends it again");
                self.release(
                    "UPDATE outbox_deliveries SET attempts = attempts + 1, dead_at = $1, \
                     last_error = $2, claim = NULL, claimed_until = NULL \
                     WHERE event_id = $3 AND subscriber = $4 AND claim = $5",
                    now,
                    &error,
                    event_id,
                )
                .await?;
            }
        }
        Ok(())
    }

    /// Records a failed attempt (`sql` binds time, error, event, subscriber,
    /// claim) only while this loop still holds the claim: if it expired and
    /// another instance took the delivery over, that one's state stands.
    async fn release(
        &self,
        sql: &'static str,
        at: i64,
        error: &str,
        event_id: &str,
    ) -> Result<(), sqlx::Error> {
        let done = sqlx::query(sql)
            .bind(at)
            .bind(error)
            .bind(event_id)
            .bind(&self.subscriber.key)
            .bind(&self.claim)
            .execute(self.db.pool())
            .await?;
        if done.rows_affected() == 0 {
            tracing::debug!(event_id, subscriber = %self.subscriber.key,
                "the claim on this delivery was taken over; leaving its state to the new holder");
        }
        Ok(())
    }
}

/// Parks as dead every waiting delivery to a subscriber that is no longer
/// configured (removed from `events`, or renamed): no loop would ever send
/// it, and `tiergate events dead` shows it.
async fn park_orphans(db: &Db, configured: &[Subscriber], now_ms: i64) -> Result<(), sqlx::Error> {
    let keys: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT subscriber FROM outbox_deliveries \
         WHERE delivered_at IS NULL AND dead_at IS NULL",
    )
    .fetch_all(db.pool())
    .await?;
    for key in keys {
        if configured.iter().any(|s| s.key == key) {
            continue;
        }
        let parked = sqlx::query(
            "UPDATE outbox_deliveries SET dead_at = $1, last_error = $2, claim = NULL, \
             claimed_until = NULL WHERE subscriber = $3 AND delivered_at IS NULL AND dead_at IS NULL",
        )
        .bind(now_ms)
        .bind("the subscriber is no longer configured in `events`")
        .bind(&key)
        .execute(db.pool())
        .await?
        .rows_affected();
        tracing::warn!(subscriber = %key, deliveries = parked,
            "deliveries to a subscriber no longer in `events` parked as dead");
    }
    Ok(())
}

/// Deliveries waiting, and parked as dead (for the gauges; run every
/// 15 s, not per pass).
async fn counts(db: &Db) -> Result<(i64, i64), sqlx::Error> {
    let row = sqlx::query(
        "SELECT \
           COALESCE(SUM(CASE WHEN dead_at IS NULL THEN 1 ELSE 0 END), 0) AS pending, \
           COALESCE(SUM(CASE WHEN dead_at IS NOT NULL THEN 1 ELSE 0 END), 0) AS dead \
         FROM outbox_deliveries WHERE delivered_at IS NULL",
    )
    .fetch_one(db.pool())
    .await?;
    Ok((row.try_get("pending")?, row.try_get("dead")?))
}

/// Deletes an event once every subscriber has acknowledged it: payloads
/// can carry single-use links, which should not outlive their delivery.
async fn forget_if_delivered(db: &Db, event_id: &str) -> Result<(), sqlx::Error> {
    let mut tx = db.begin_write().await?;
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

/// A delivery parked as dead.
#[derive(Debug, Clone, Serialize)]
pub struct DeadDelivery {
    /// The event.
    pub event_id: String,
    /// Its type.
    pub event_type: String,
    /// Where it was to go.
    pub subscriber: String,
    /// Attempts made.
    pub attempts: i64,
    /// Why the last one failed.
    pub last_error: Option<String>,
    /// When it was parked (Unix ms).
    pub dead_at: i64,
}

/// Every dead delivery, oldest first (`tiergate events dead`).
pub async fn dead(db: &Db) -> Result<Vec<DeadDelivery>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT d.event_id, e.event_type, d.subscriber, d.attempts, d.last_error, d.dead_at \
         FROM outbox_deliveries d JOIN outbox_events e ON e.id = d.event_id \
         WHERE d.dead_at IS NOT NULL AND d.delivered_at IS NULL ORDER BY d.dead_at",
    )
    .fetch_all(db.pool())
    .await?;
    rows.iter()
        .map(|r| {
            Ok(DeadDelivery {
                event_id: r.try_get("event_id")?,
                event_type: r.try_get("event_type")?,
                subscriber: r.try_get("subscriber")?,
                attempts: r.try_get("attempts")?,
                last_error: r.try_get("last_error")?,
                dead_at: r.try_get("dead_at")?,
            })
        })
        .collect()
}

/// What [`retry`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Retried {
    /// Deliveries queued again.
    pub queued: u64,
    /// Dead deliveries left alone because their event is older than the
    /// cutoff.
    pub too_old: u64,
}

/// Puts dead deliveries back in the queue, attempts reset: one event's
/// (`Some(id)`) or all, of events created at or after `created_since`
/// (Unix ms; consumers forget the events they saw after a while, so a
/// much older event could be applied twice). They are due at once
/// (`next_attempt_at = 0`) whatever the clock of the host running the
/// command says (`tiergate events retry`).
pub async fn retry(
    db: &Db,
    event_id: Option<&str>,
    created_since: i64,
) -> Result<Retried, sqlx::Error> {
    let id = event_id.unwrap_or("");
    let too_old: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM outbox_deliveries d JOIN outbox_events e ON e.id = d.event_id \
         WHERE d.dead_at IS NOT NULL AND d.delivered_at IS NULL \
           AND ($1 = '' OR d.event_id = $1) AND e.created_at < $2",
    )
    .bind(id)
    .bind(created_since)
    .fetch_one(db.pool())
    .await?;
    let queued = sqlx::query(
        "UPDATE outbox_deliveries SET dead_at = NULL, attempts = 0, next_attempt_at = 0, \
         claim = NULL, claimed_until = NULL \
         WHERE dead_at IS NOT NULL AND delivered_at IS NULL AND ($1 = '' OR event_id = $1) \
           AND event_id IN (SELECT id FROM outbox_events WHERE created_at >= $2)",
    )
    .bind(id)
    .bind(created_since)
    .execute(db.pool())
    .await?
    .rows_affected();
    Ok(Retried {
        queued,
        too_old: u64::try_from(too_old).unwrap_or(0),
    })
}

/// Housekeeping, run periodically by each service: deletes events every
/// subscriber acknowledged but that are still stored (the deletion right
/// after the last delivery failed), and forgets which events
/// `processed_events` saw more than `older_than` ago (a producer retries
/// for at most that long in practice, so a later redelivery is not
/// expected). Returns the number of rows deleted.
pub async fn purge(db: &Db, older_than: Duration, now_ms: i64) -> Result<u64, sqlx::Error> {
    let cutoff = now_ms - i64::try_from(older_than.as_millis()).unwrap_or(i64::MAX);
    let processed = sqlx::query("DELETE FROM processed_events WHERE processed_at < $1")
        .bind(cutoff)
        .execute(db.pool())
        .await?;
    let mut tx = db.begin_write().await?;
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
    Duration::try_from_secs_f64(raw.as_secs_f64() * jitter).unwrap_or(raw)
}

/// Records that `consumer` applied `event`, inside the transaction that
/// applies it. `Ok(true)` the first time, `Ok(false)` for a redelivery
/// (the caller then skips the change and still answers 2xx).
pub async fn consume_once(
    tx: &mut AnyConnection,
    consumer: &str,
    event: &Event,
    now_ms: i64,
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
    .bind(now_ms)
    .execute(&mut *tx)
    .await?;
    Ok(done.rows_affected() == 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sealed::SEALED;

    fn outbox(subs: Subscribers) -> Outbox {
        let dir = std::env::temp_dir().join(format!("tg-outbox-{}", uuid::Uuid::now_v7()));
        let keys =
            ServiceKeys::load(&crate::service_auth::KeySource::development("users", &dir)).unwrap();
        Outbox::new("users", subs, &keys)
    }

    fn sub(url: &str) -> Subscriber {
        Subscriber::url(url, "x")
    }

    #[test]
    fn test_backoff_doubles_then_caps_with_bounded_jitter() {
        let s = DispatchSettings::default();
        for (attempts, nominal) in [(0, 500), (1, 1000), (3, 4000), (10, 300_000), (60, 300_000)] {
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
        subs.insert("user.registered".into(), vec![sub("http://a/e")]);
        subs.insert("*".into(), vec![sub("http://audit/e"), sub("http://a/e")]);
        let outbox = outbox(subs);
        // A URL under both the type and `*` is delivered to once.
        let urls = |t: &str| -> Vec<String> {
            outbox
                .subscribers_of(t)
                .iter()
                .map(|s| s.url.clone())
                .collect()
        };
        assert_eq!(urls("user.registered"), ["http://a/e", "http://audit/e"]);
        assert_eq!(urls("other"), ["http://audit/e", "http://a/e"]);
        assert_eq!(outbox.all_subscribers().len(), 2);
    }

    #[test]
    fn test_payloads_are_sealed_bound_to_their_event_and_old_plain_ones_open() {
        let o = outbox(Subscribers::new());
        let sealed = o
            .seal("e1", r#"{"link":"https://x/verify?token=secret"}"#)
            .unwrap();
        assert!(sealed.starts_with(SEALED) && !sealed.contains("secret"));
        assert_eq!(
            o.open("e1", &sealed).unwrap()["link"],
            "https://x/verify?token=secret"
        );
        assert!(o.open("e2", &sealed).is_err(), "bound to its event id");
        assert!(
            outbox(Subscribers::new()).open("e1", &sealed).is_err(),
            "another key"
        );
        assert_eq!(o.open("e3", r#"{"a":1}"#).unwrap()["a"], 1);
    }

    #[test]
    fn test_wire_events_accept_unknown_fields() {
        let e: Event = serde_json::from_str(
            r#"{"id":"1","type":"t","source":"s","occurred_at":1,"data":{},"trace":"x"}"#,
        )
        .unwrap();
        assert_eq!(e.event_type, "t");
    }
}
