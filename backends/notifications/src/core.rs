//! What notifications does: turns each consumed event into a delivery job
//! ([`Notifications::plan`]), delivers jobs ([`Notifications::run_worker`])
//! with retries, provider hints, fallback to the next channel and rate
//! shaping, and serves preferences, Telegram linking, bots and the lists.
//!
//! **The queue.** A job is one message of one event to one recipient on
//! one channel: `jobs` is unique on (event id, channel, recipient), so a
//! redelivered event never queues a second message. A worker claims a due
//! job (`status = sending`, `claimed_by`, a lease), sends it, and records
//! the outcome under its claim (`claimed_by` and the attempt number must
//! still match, so a worker that lost its lease cannot overwrite the one
//! that took over). A crash between the provider's answer and that record
//! sends the message again once the lease ends (at least once; e-mails
//! carry the job id as `Message-ID`, the file sink overwrites): nothing is
//! ever lost.
//!
//! **Outcomes.** Sent: `sent` (Twilio's report later makes it `delivered`
//! or `failed`). A transient failure is retried after the provider's hint
//! (`retry_after`, `Retry-After`) or exponential backoff with jitter. A
//! permanent one (blocked bot, invalid number, SMTP 5xx) is not retried.
//! **Fallback**: a permanent failure, or a channel still failing
//! `queue.fallback_after` after the job was queued, hands the message to
//! the recipient's next channel (a new job with `fallback_of`); with no
//! channel left the job is `failed`, or `dead` after `queue.max_attempts`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::StatusCode;
use futures_util::StreamExt;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sqlx::AnyConnection;
use tokio::sync::Notify;

use backend_common::calendar::BusinessCalendar;
use backend_common::client::ServiceClient;
use backend_common::clock::Clock;
use backend_common::consumer::Applied;
use backend_common::db::Db;
use backend_common::metrics::HttpMetrics;
use backend_common::outbox::Event;
use backend_common::sealed::Sealer;
use backend_common::user_auth::UserClaims;
use backend_common::{ApiError, FieldError};

use crate::config::NotificationsConfig;
use crate::email::{File, MailError, Mailer};
use crate::prefs::{self, Channel, Preferences, QuietHours, TimeOfDay};
use crate::sms::{SmsError, Twilio};
use crate::storage::{self, Finish, JobRow, RecipientRow};
use crate::telegram::{self, BotHandle, Bots, SendError, Shaper, DEFAULT_BOT};
use crate::templates::Templates;

/// Who an event's message goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum To {
    /// The user (`user_id`), on the channels they chose.
    User,
    /// The address in this field of the event, by e-mail only (a
    /// verification link proves that address).
    EmailField(&'static str),
}

/// How an event type is notified.
#[derive(Debug, Clone, Copy)]
struct Spec {
    category: &'static str,
    /// Ignores category switches and quiet hours (verification, reset,
    /// security).
    critical: bool,
    to: To,
    /// The invoice PDF goes with the mail.
    attach_invoice: bool,
}

/// The events that are notified, and how.
fn spec(event_type: &str) -> Option<Spec> {
    let s = |category, critical, to, attach_invoice| {
        Some(Spec {
            category,
            critical,
            to,
            attach_invoice,
        })
    };
    match event_type {
        "user.registered" | "user.email_change_requested" => {
            s("account", true, To::EmailField("email"), false)
        }
        "user.email_changed" => s("account", true, To::EmailField("old_email"), false),
        "organization.invitation_created" => s("account", true, To::EmailField("email"), false),
        "user.password_reset_requested" => s("account", true, To::User, false),
        "invoice.issued" | "invoice.paid" => s("billing", false, To::User, true),
        "payment.pending" | "payment.expiring" | "payment.expired" | "payment.failed" => {
            s("billing", false, To::User, false)
        }
        "subscription.activated" | "subscription.past_due" | "subscription.ended" => {
            s("billing", false, To::User, false)
        }
        _ => None,
    }
}

/// Every event type notifications consumes (the templates' and the
/// payment outcomes that cancel a reminder), with its producers.
pub const CONSUMED: &[(&str, &[&str])] = &[
    ("user.registered", &["users"]),
    ("user.password_reset_requested", &["users"]),
    ("user.email_change_requested", &["users"]),
    ("user.email_changed", &["users"]),
    ("organization.invitation_created", &["users"]),
    ("invoice.issued", &["billing"]),
    ("invoice.paid", &["billing"]),
    ("payment.pending", &["payments"]),
    ("payment.settled", &["payments"]),
    ("payment.expired", &["payments"]),
    ("payment.failed", &["payments"]),
    ("payment.refunded", &["payments"]),
    ("subscription.activated", &["subscriptions"]),
    ("subscription.past_due", &["subscriptions"]),
    ("subscription.ended", &["subscriptions"]),
];

/// The service's counters.
#[derive(Clone)]
pub struct Metrics {
    attempts: IntCounterVec,
    fallbacks: IntCounterVec,
    latency: HistogramVec,
    provider: HistogramVec,
}

impl Metrics {
    fn new(m: &HttpMetrics) -> Result<Self, String> {
        let e = |e: prometheus::Error| e.to_string();
        let attempts = IntCounterVec::new(
            Opts::new(
                "notifications_attempts_total",
                "Delivery attempts, by channel and outcome (sent, retry, failed, dead)",
            ),
            &["channel", "outcome"],
        )
        .map_err(e)?;
        let fallbacks = IntCounterVec::new(
            Opts::new(
                "notifications_fallbacks_total",
                "Messages handed from one channel to the next",
            ),
            &["from", "to"],
        )
        .map_err(e)?;
        let buckets = vec![
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
            3600.0,
        ];
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "notifications_event_to_send_seconds",
                "From the event's commit to the provider's acceptance of its first message, by channel",
            )
            .buckets(buckets.clone()),
            &["channel"],
        )
        .map_err(e)?;
        let provider = HistogramVec::new(
            HistogramOpts::new(
                "notifications_provider_seconds",
                "Provider calls (SMTP, Telegram, Twilio), by channel",
            )
            .buckets(buckets),
            &["channel"],
        )
        .map_err(e)?;
        m.register(attempts.clone()).map_err(e)?;
        m.register(fallbacks.clone()).map_err(e)?;
        m.register(latency.clone()).map_err(e)?;
        m.register(provider.clone()).map_err(e)?;
        Ok(Self {
            attempts,
            fallbacks,
            latency,
            provider,
        })
    }
}

/// The service.
pub struct Notifications {
    pub db: Db,
    pub clock: Clock,
    pub client: ServiceClient,
    pub config: NotificationsConfig,
    pub calendar: BusinessCalendar,
    pub public_url: String,
    pub templates: Templates,
    pub mailer: Mailer,
    pub twilio: Option<Twilio>,
    pub bots: Arc<Bots>,
    /// Seals job payloads (`aad`: the job id) and bot tokens (the bot id).
    pub payloads: Sealer,
    pub tokens: Sealer,
    pub shaper: Shaper,
    pub wake: Notify,
    pub metrics: Metrics,
    /// This instance's name on its claims.
    pub worker: String,
}

impl std::fmt::Debug for Notifications {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifications")
            .field("worker", &self.worker)
            .finish_non_exhaustive()
    }
}

/// What [`Notifications::new`] needs besides the platform's parts.
pub struct Parts {
    pub db: Db,
    pub clock: Clock,
    pub client: ServiceClient,
    pub config: NotificationsConfig,
    pub calendar: BusinessCalendar,
    pub public_url: String,
    pub data_dir: std::path::PathBuf,
    pub keys: backend_common::service_auth::ServiceKeys,
    pub metrics: HttpMetrics,
}

/// How an attempt ended.
#[derive(Debug)]
enum Outcome {
    Sent {
        provider_id: String,
        address: String,
    },
    Retry {
        after: Option<Duration>,
        why: String,
        address: Option<String>,
    },
    Permanent {
        why: String,
        address: Option<String>,
    },
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::internal(&e)
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4)
}

impl Notifications {
    /// The service, its channels built from the config.
    pub fn new(p: Parts) -> Result<Self, String> {
        let templates = Templates::new(p.calendar.clone())?;
        let mailer = match &p.config.email.smtp_url {
            Some(url) => Mailer::smtp(&p.config.email.from, url.expose(), p.config.email.timeout)?,
            None => Mailer::files(
                &p.config.email.from,
                crate::mail_dir(&p.config, &p.data_dir),
            )?,
        };
        let twilio = match p.config.sms.credentials() {
            Some((sid, token, from)) => Some(Twilio::new(
                &p.config.sms.api_url,
                sid,
                token.clone(),
                from,
                p.config.sms.timeout,
            )?),
            None => None,
        };
        let bots = Arc::new(Bots::new(
            &p.config.telegram.api_url,
            p.keys.derive("telegram webhook secrets"),
        )?);
        Ok(Self {
            templates,
            mailer,
            twilio,
            bots,
            payloads: Sealer::new(&p.keys, "notification payloads", "payload"),
            tokens: Sealer::new(&p.keys, "telegram bot tokens", "bot token"),
            shaper: Shaper::default(),
            wake: Notify::new(),
            metrics: Metrics::new(&p.metrics)?,
            worker: format!("{}-{}", std::process::id(), uuid::Uuid::now_v7()),
            db: p.db,
            clock: p.clock,
            client: p.client,
            config: p.config,
            calendar: p.calendar,
            public_url: p.public_url.trim_end_matches('/').to_owned(),
        })
    }

    async fn conn(&self) -> Result<sqlx::pool::PoolConnection<sqlx::Any>, ApiError> {
        Ok(self.db.pool().acquire().await?)
    }

    // ---- preferences

    fn zone_name<'a>(&'a self, r: &'a RecipientRow) -> &'a str {
        r.time_zone.as_deref().unwrap_or(self.calendar.zone_name())
    }

    /// A recipient row as preferences (defaults where unset).
    pub fn preferences_of(&self, r: Option<&RecipientRow>) -> Preferences {
        let default = RecipientRow::default();
        let r = r.unwrap_or(&default);
        let mut p = Preferences::defaults(
            r.locale.as_deref().unwrap_or(&self.config.default_locale),
            self.zone_name(r),
        );
        p.phone = r.phone.clone();
        if let Some(c) = &r.channels {
            p.channels = c.split(',').filter_map(Channel::parse).collect();
        }
        if let Some(json) = &r.categories {
            if let Ok(stored) =
                serde_json::from_str::<BTreeMap<String, BTreeMap<Channel, bool>>>(json)
            {
                for (cat, chans) in stored {
                    if let Some(m) = p.categories.get_mut(&cat) {
                        m.extend(chans);
                    }
                }
            }
        }
        let tod = |m: Option<i32>| TimeOfDay::from_minutes(u16::try_from(m?).ok()?);
        p.quiet_hours = match (tod(r.quiet_start), tod(r.quiet_end)) {
            (Some(start), Some(end)) => Some(QuietHours { start, end }),
            _ => None,
        };
        p
    }

    /// The caller's preferences.
    pub async fn preferences(&self, user: &UserClaims) -> Result<Preferences, ApiError> {
        let mut c = self.conn().await?;
        let r = storage::recipient(&mut c, &user.user_id).await?;
        Ok(self.preferences_of(r.as_ref()))
    }

    /// Replaces the caller's preferences (every field checked, each error
    /// named).
    pub async fn set_preferences(
        &self,
        user: &UserClaims,
        p: &Preferences,
    ) -> Result<Preferences, ApiError> {
        let mut errors = Vec::new();
        if !crate::templates::LOCALES.contains(&p.locale.as_str()) {
            errors.push(FieldError::new("locale", "`id` or `en`"));
        }
        if jiff::tz::TimeZone::get(&p.time_zone).is_err() {
            errors.push(FieldError::new(
                "time_zone",
                "an IANA time zone (Asia/Jakarta)",
            ));
        }
        let phone = match p.phone.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
            None => None,
            Some(raw) => match crate::phone::normalize(raw) {
                Ok(n) => Some(n),
                Err(why) => {
                    errors.push(FieldError::new("phone", why));
                    None
                }
            },
        };
        if p.channels.is_empty() {
            errors.push(FieldError::new("channels", "at least one channel"));
        }
        let mut seen = Vec::new();
        for c in &p.channels {
            if seen.contains(c) {
                errors.push(FieldError::new(
                    "channels",
                    format!("{} is listed twice", c.as_str()),
                ));
            }
            seen.push(*c);
        }
        for cat in p.categories.keys() {
            if !prefs::CATEGORIES.contains(&cat.as_str()) {
                errors.push(FieldError::new(
                    format!("categories.{cat}"),
                    "one of account, billing, marketing",
                ));
            }
        }
        if !errors.is_empty() {
            return Err(ApiError::validation(errors));
        }
        let row = RecipientRow {
            user_id: user.user_id.clone(),
            locale: Some(p.locale.clone()),
            time_zone: Some(p.time_zone.clone()),
            phone,
            channels: Some(
                p.channels
                    .iter()
                    .map(|c| c.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            categories: Some(serde_json::to_string(&p.categories).map_err(internal)?),
            quiet_start: p.quiet_hours.map(|q| i32::from(q.start.minutes())),
            quiet_end: p.quiet_hours.map(|q| i32::from(q.end.minutes())),
            updated_at: self.clock.now_ms(),
            ..RecipientRow::default()
        };
        let mut tx = self.db.begin_write().await?;
        storage::put_preferences(&mut tx, &row).await?;
        let stored = storage::recipient(&mut tx, &user.user_id).await?;
        tx.commit().await?;
        Ok(self.preferences_of(stored.as_ref()))
    }

    // ---- planning

    /// The bot that speaks to `user_id` for an event of `subject`: the
    /// organization's own bot when the user linked it, else the default
    /// bot when linked; with the chat.
    async fn bot_for(
        &self,
        c: &mut AnyConnection,
        user_id: &str,
        tenant: Option<&str>,
    ) -> Result<Option<(Arc<BotHandle>, i64)>, sqlx::Error> {
        let mut candidates = Vec::new();
        if let Some(t) = tenant {
            if let Some(b) = self.bots.of_tenant(t) {
                candidates.push(b);
            }
        }
        if let Some(b) = self.bots.get(DEFAULT_BOT) {
            candidates.push(b);
        }
        for b in candidates {
            if let Some(chat) = storage::chat_of(c, &b.id, user_id).await? {
                return Ok(Some((b, chat)));
            }
        }
        Ok(None)
    }

    /// Turns `event` into its jobs, in the consumer's transaction.
    pub async fn plan(&self, tx: &mut AnyConnection, event: &Event) -> Result<Applied, ApiError> {
        let now = self.clock.now_ms();
        let data = &event.data;
        let text = |k: &str| data.get(k).and_then(Value::as_str).map(str::to_owned);
        let user_id = text("user_id");
        // What users tells about an address is remembered for the events
        // that do not carry it.
        if event.event_type.starts_with("user.") {
            if let Some(uid) = &user_id {
                let email = match event.event_type.as_str() {
                    "user.registered" | "user.email_changed" => text("email"),
                    _ => None,
                };
                storage::put_contact(tx, uid, email.as_deref(), text("name").as_deref(), now)
                    .await?;
            }
        }
        if event.event_type.starts_with("payment.") && event.event_type != "payment.pending" {
            if let Some(pid) = text("payment_id") {
                storage::cancel_reminders(tx, &pid, &format!("{} first", event.event_type), now)
                    .await?;
            }
        }
        let Some(spec) = spec(&event.event_type) else {
            return Ok(Applied::Applied);
        };
        let tenant = (data["subject"]["kind"].as_str() == Some("organization"))
            .then(|| data["subject"]["id"].as_str().map(str::to_owned))
            .flatten();
        let recipient_row = match &user_id {
            Some(u) => storage::recipient(tx, u).await?,
            None => None,
        };
        let prefs = self.preferences_of(recipient_row.as_ref());
        let (channels, recipient, address, bot) = match spec.to {
            To::EmailField(field) => {
                let Some(addr) = text(field) else {
                    return Ok(Applied::rejected(
                        "invalid_event",
                        format!("{} without `{field}`", event.event_type),
                    ));
                };
                (vec![Channel::Email], addr.clone(), Some(addr), None)
            }
            To::User => {
                let Some(uid) = user_id.clone() else {
                    return Ok(Applied::rejected(
                        "invalid_event",
                        format!("{} without `user_id`", event.event_type),
                    ));
                };
                let bot = self.bot_for(tx, &uid, tenant.as_deref()).await?;
                let sms = self.twilio.is_some() && prefs.phone.is_some();
                let reach = |c: Channel| match c {
                    Channel::Email => true,
                    Channel::Telegram => bot.is_some(),
                    Channel::Sms => sms,
                };
                let chosen = prefs::choose(&prefs, spec.category, spec.critical, reach);
                (chosen, uid, None, bot.map(|(b, _)| b.id.clone()))
            }
        };
        let Some((first, rest)) = channels.split_first() else {
            tracing::debug!(event = %event.id, "no channel chosen: the user opted out");
            return Ok(Applied::Applied);
        };
        let zone =
            jiff::tz::TimeZone::get(&prefs.time_zone).unwrap_or_else(|_| self.calendar_zone());
        let next_at = if spec.critical {
            now
        } else {
            prefs::quiet_until(prefs.quiet_hours.as_ref(), &zone, now)
        };
        let payload = self.payload(event);
        let mut job = JobRow {
            id: uuid::Uuid::now_v7().to_string(),
            event_id: event.id.clone(),
            event_type: event.event_type.clone(),
            user_id: user_id.clone(),
            channel: first.as_str().to_owned(),
            recipient,
            address,
            bot_id: bot,
            category: spec.category.to_owned(),
            critical: i32::from(spec.critical),
            fallbacks: join(rest),
            fallback_of: None,
            payload: String::new(),
            ref_id: text("payment_id").or_else(|| text("invoice_id")),
            status: "queued".to_owned(),
            attempts: 0,
            next_at,
            claimed_until: None,
            claimed_by: None,
            last_error: None,
            provider_id: None,
            created_at: now,
            updated_at: now,
            sent_at: None,
            delivered_at: None,
        };
        job.payload = self.seal(&job.id, &payload)?;
        storage::insert_job(tx, &job).await?;
        // A pending payment with an expiry gets its reminder, canceled when
        // the payment ends first.
        if event.event_type == "payment.pending" && !self.config.payment_reminder_before.is_zero() {
            if let Some(expires) = data.get("expires_at").and_then(Value::as_i64) {
                let at = expires - ms(self.config.payment_reminder_before);
                if at > now {
                    let quiet = prefs::quiet_until(prefs.quiet_hours.as_ref(), &zone, at);
                    let mut reminder = job.clone();
                    reminder.id = uuid::Uuid::now_v7().to_string();
                    reminder.event_id = format!("{}:reminder", event.id);
                    reminder.event_type = "payment.expiring".to_owned();
                    reminder.next_at = if quiet < expires { quiet } else { at };
                    reminder.payload = self.seal(&reminder.id, &payload)?;
                    storage::insert_job(tx, &reminder).await?;
                }
            }
        }
        Ok(Applied::Applied)
    }

    fn calendar_zone(&self) -> jiff::tz::TimeZone {
        jiff::tz::TimeZone::get(self.calendar.zone_name()).unwrap_or(jiff::tz::TimeZone::UTC)
    }

    /// What a job keeps of its event.
    fn payload(&self, event: &Event) -> Value {
        json!({"occurred_at": event.occurred_at, "data": event.data})
    }

    fn seal(&self, job_id: &str, payload: &Value) -> Result<String, ApiError> {
        self.payloads
            .seal(job_id, payload.to_string().as_bytes())
            .map_err(internal)
    }

    fn open(&self, job: &JobRow) -> Result<Value, String> {
        let plain = match self.payloads.open(&job.id, &job.payload) {
            Some(p) => p?,
            None => job.payload.as_bytes().to_vec(),
        };
        serde_json::from_slice(&plain).map_err(|e| format!("payload: {e}"))
    }

    // ---- the worker

    /// Delivers due jobs until the service stops: claims a batch, sends it
    /// (`queue.concurrency` at once), then waits for the next due job, a
    /// new one, or a clock move.
    pub async fn run_worker(self: Arc<Self>) {
        let mut ticker = self.clock.ticker();
        loop {
            let batch = match self.claim_batch().await {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot claim jobs; retried shortly");
                    Vec::new()
                }
            };
            if batch.is_empty() {
                let wait = self.idle_wait().await;
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = ticker.tick(wait) => {}
                }
                continue;
            }
            futures_util::stream::iter(batch)
                .for_each_concurrent(self.config.queue.concurrency, |job| {
                    let me = self.clone();
                    async move { me.deliver(job).await }
                })
                .await;
        }
    }

    /// How long the worker may sleep: until the next due job, at most 1s
    /// (another instance's new jobs, expired leases).
    async fn idle_wait(&self) -> Duration {
        let cap = Duration::from_secs(1);
        let Ok(mut c) = self.db.pool().acquire().await else {
            return cap;
        };
        match storage::next_due(&mut c).await {
            Ok(Some(at)) => {
                let left = at - self.clock.now_ms();
                Duration::from_millis(u64::try_from(left.max(5)).unwrap_or(5)).min(cap)
            }
            _ => cap,
        }
    }

    async fn claim_batch(&self) -> Result<Vec<JobRow>, sqlx::Error> {
        let now = self.clock.now_ms();
        let limit = i64::try_from(self.config.queue.concurrency * 4).unwrap_or(64);
        let mut c = self.db.pool().acquire().await?;
        let ids = storage::due_jobs(&mut c, now, limit).await?;
        let until = now + ms(self.config.queue.lease);
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(job) = storage::claim(&mut c, &id, &self.worker, now, until).await? {
                out.push(job);
            }
        }
        Ok(out)
    }

    /// One attempt at `job`, and its outcome recorded.
    async fn deliver(&self, job: JobRow) {
        let started = std::time::Instant::now();
        let outcome = self.attempt(&job).await;
        let channel = job.channel.clone();
        tracing::debug!(job = %job.id, channel, attempt = job.attempts, ?outcome, "delivery attempt");
        self.metrics
            .provider
            .with_label_values(&[&channel])
            .observe(started.elapsed().as_secs_f64());
        if let Outcome::Sent { .. } = &outcome {
            if job.attempts == 1 && job.fallback_of.is_none() {
                if let Ok(p) = self.open(&job) {
                    if let Some(at) = p["occurred_at"].as_i64() {
                        let secs = (self.clock.now_ms() - at).max(0) as f64 / 1000.0;
                        self.metrics
                            .latency
                            .with_label_values(&[&channel])
                            .observe(secs);
                    }
                }
            }
        }
        if let Err(e) = self.record(&job, outcome).await {
            tracing::warn!(job = %job.id, error = %e, "cannot record a delivery attempt; the job is retried when its lease ends");
        }
    }

    fn backoff(&self, attempts: i32) -> Duration {
        let q = &self.config.queue;
        let exp = u32::try_from(attempts.saturating_sub(1).clamp(0, 20)).unwrap_or(0);
        let base = q.backoff.saturating_mul(1u32 << exp).min(q.max_backoff);
        // Full jitter in [base/2, base].
        let half = base / 2;
        half + half.mul_f64(fastrand::f64())
    }

    async fn record(&self, job: &JobRow, outcome: Outcome) -> Result<(), ApiError> {
        let now = self.clock.now_ms();
        let q = &self.config.queue;
        let channel = job.channel.as_str();
        let count = |o: &str| self.metrics.attempts.with_label_values(&[channel, o]).inc();
        let mut c = self.db.begin_write().await?;
        let (finish, fallback_why) = match &outcome {
            Outcome::Sent {
                provider_id,
                address,
            } => {
                count("sent");
                (
                    Finish {
                        status: "sent",
                        next_at: job.next_at,
                        error: None,
                        provider_id: Some(provider_id),
                        address: Some(address),
                        sent_at: Some(now),
                    },
                    None,
                )
            }
            Outcome::Permanent { why, address } => {
                count("failed");
                tracing::info!(job = %job.id, channel, error = %why, "delivery failed for good");
                (
                    Finish::unsent("failed", job.next_at, why, address.as_deref()),
                    Some(why.clone()),
                )
            }
            Outcome::Retry {
                after,
                why,
                address,
            } => {
                let stale = now - job.created_at >= ms(q.fallback_after);
                let exhausted = job.attempts >= q.max_attempts;
                if (stale || exhausted) && !job.fallbacks.is_empty() {
                    count("failed");
                    (
                        Finish::unsent("failed", job.next_at, why, address.as_deref()),
                        Some(format!(
                            "{why} (still failing after {} attempts)",
                            job.attempts
                        )),
                    )
                } else if exhausted {
                    count("dead");
                    tracing::warn!(job = %job.id, channel, error = %why, attempts = job.attempts, "delivery dead");
                    (
                        Finish::unsent("dead", job.next_at, why, address.as_deref()),
                        None,
                    )
                } else {
                    count("retry");
                    let wait = after.unwrap_or_else(|| self.backoff(job.attempts));
                    (
                        Finish::unsent("queued", now + ms(wait), why, address.as_deref()),
                        None,
                    )
                }
            }
        };
        if !storage::finish(&mut c, &job.id, &self.worker, job.attempts, &finish, now).await? {
            tracing::info!(job = %job.id, "lost the claim (the lease ran out); the other worker's outcome stands");
            return Ok(());
        }
        if let Some(why) = fallback_why {
            self.fall_back(&mut c, job, &why, now).await?;
        }
        c.commit().await?;
        if let Some(sid) = finish.provider_id.filter(|_| job.channel == "sms") {
            self.settle_early_report(sid).await?;
        }
        Ok(())
    }

    /// Hands `job`'s message to the next channel that can reach its user.
    async fn fall_back(
        &self,
        c: &mut AnyConnection,
        job: &JobRow,
        why: &str,
        now: i64,
    ) -> Result<(), ApiError> {
        let mut rest: Vec<Channel> = job
            .fallbacks
            .split(',')
            .filter_map(Channel::parse)
            .collect();
        let Some(uid) = job.user_id.clone() else {
            return Ok(());
        };
        let payload = self.open(job).map_err(internal)?;
        let tenant = (payload["data"]["subject"]["kind"].as_str() == Some("organization"))
            .then(|| payload["data"]["subject"]["id"].as_str().map(str::to_owned))
            .flatten();
        let r = storage::recipient(c, &uid).await?;
        let prefs = self.preferences_of(r.as_ref());
        while !rest.is_empty() {
            let next = rest.remove(0);
            let bot = match next {
                Channel::Telegram => match self.bot_for(c, &uid, tenant.as_deref()).await? {
                    Some((b, _)) => Some(b.id.clone()),
                    None => continue,
                },
                Channel::Sms if self.twilio.is_none() || prefs.phone.is_none() => continue,
                _ => None,
            };
            let mut j = job.clone();
            j.id = uuid::Uuid::now_v7().to_string();
            j.channel = next.as_str().to_owned();
            j.fallbacks = join(&rest);
            j.fallback_of = Some(job.id.clone());
            j.bot_id = bot;
            j.address = None;
            j.status = "queued".to_owned();
            j.next_at = now;
            j.created_at = now;
            j.payload = self.seal(&j.id, &payload)?;
            storage::insert_job(c, &j).await?;
            self.metrics
                .fallbacks
                .with_label_values(&[&job.channel, next.as_str()])
                .inc();
            tracing::info!(job = %job.id, next = %j.id, from = %job.channel, to = next.as_str(), why, "message handed to the next channel");
            // The caller wakes the worker once this commits (the worker's
            // own pass claims again when its batch is done).
            return Ok(());
        }
        Ok(())
    }

    /// Renders and sends `job`.
    async fn attempt(&self, job: &JobRow) -> Outcome {
        let payload = match self.open(job) {
            Ok(p) => p,
            Err(why) => return Outcome::Permanent { why, address: None },
        };
        let data = &payload["data"];
        let recipient = match &job.user_id {
            Some(u) => match self.conn().await {
                Ok(mut c) => storage::recipient(&mut c, u).await.ok().flatten(),
                Err(e) => {
                    return Outcome::Retry {
                        after: None,
                        why: e.to_string(),
                        address: None,
                    }
                }
            },
            None => None,
        };
        let prefs = self.preferences_of(recipient.as_ref());
        let mut ctx = data.clone();
        let name = data["name"]
            .as_str()
            .map(str::to_owned)
            .or_else(|| recipient.as_ref().and_then(|r| r.name.clone()));
        ctx["name"] = json!(name.unwrap_or_default());
        if let Some(inv) = data["invoice_id"].as_str() {
            ctx["invoice_url"] = json!(format!(
                "{}/api/billing/invoices/{inv}/pdf",
                self.public_url
            ));
        }
        if ctx.get("invoice_number").is_none() {
            if let Some(n) = data["number"].as_str() {
                ctx["invoice_number"] = json!(n);
            }
        }
        let message = match self.templates.render(&job.event_type, &prefs.locale, &ctx) {
            Ok(m) => m,
            Err(why) => return Outcome::Permanent { why, address: None },
        };
        match Channel::parse(&job.channel) {
            Some(Channel::Email) => {
                self.attempt_email(job, data, recipient.as_ref(), &message)
                    .await
            }
            Some(Channel::Telegram) => self.attempt_telegram(job, &message.telegram).await,
            Some(Channel::Sms) => {
                self.attempt_sms(job, prefs.phone.as_deref(), &message.text)
                    .await
            }
            None => Outcome::Permanent {
                why: format!("unknown channel {}", job.channel),
                address: None,
            },
        }
    }

    /// The address of `job`: the one it names, else what users told.
    async fn email_of(
        &self,
        job: &JobRow,
        data: &Value,
        recipient: Option<&RecipientRow>,
    ) -> Result<String, Outcome> {
        if job.recipient.contains('@') {
            return Ok(job.recipient.clone());
        }
        if let Some(e) = recipient.and_then(|r| r.email.clone()) {
            return Ok(e);
        }
        if let Some(e) = data["email"].as_str() {
            return Ok(e.to_owned());
        }
        #[derive(Deserialize)]
        struct User {
            email: String,
            name: String,
        }
        let uid = job.user_id.as_deref().unwrap_or_default();
        match self
            .client
            .get::<User>("users", &format!("/internal/users/{uid}"))
            .await
        {
            Ok(u) => {
                if let Ok(mut c) = self.db.begin_write().await {
                    let stored = storage::put_contact(
                        &mut c,
                        uid,
                        Some(&u.email),
                        Some(&u.name),
                        self.clock.now_ms(),
                    )
                    .await;
                    if stored.is_ok() {
                        let _ = c.commit().await;
                    }
                }
                Ok(u.email)
            }
            Err(e) if e.is_not_found() => Err(Outcome::Permanent {
                why: format!("no user {uid}"),
                address: None,
            }),
            Err(e) => Err(Outcome::Retry {
                after: None,
                why: format!("cannot look the address up: {e}"),
                address: None,
            }),
        }
    }

    async fn attempt_email(
        &self,
        job: &JobRow,
        data: &Value,
        recipient: Option<&RecipientRow>,
        message: &crate::templates::Rendered,
    ) -> Outcome {
        let to = match self.email_of(job, data, recipient).await {
            Ok(a) => a,
            Err(o) => return o,
        };
        let mut files = Vec::new();
        if spec(&job.event_type).is_some_and(|s| s.attach_invoice) {
            if let Some(inv) = data["invoice_id"].as_str() {
                match self
                    .client
                    .get_bytes("billing", &format!("/internal/invoices/{inv}/pdf"))
                    .await
                {
                    Ok(bytes) => files.push(File {
                        name: format!(
                            "{}.pdf",
                            data["number"].as_str().unwrap_or(inv).replace('/', "-")
                        ),
                        content_type: "application/pdf".to_owned(),
                        bytes: bytes.to_vec(),
                    }),
                    Err(e) if e.is_not_found() => {
                        tracing::info!(job = %job.id, invoice = inv, "no PDF for the invoice; the mail goes without it");
                    }
                    Err(e) => {
                        return Outcome::Retry {
                            after: None,
                            why: format!("cannot fetch the invoice PDF: {e}"),
                            address: Some(to),
                        }
                    }
                }
            }
        }
        let mail = match self.mailer.build(&job.id, &to, message, &files) {
            Ok(m) => m,
            Err(e) => {
                return Outcome::Permanent {
                    why: e.to_string(),
                    address: Some(to),
                }
            }
        };
        match self.mailer.send(&job.id, mail).await {
            Ok(id) => Outcome::Sent {
                provider_id: id,
                address: to,
            },
            Err(MailError::Permanent(why)) => Outcome::Permanent {
                why,
                address: Some(to),
            },
            Err(MailError::Transient(why)) => Outcome::Retry {
                after: None,
                why,
                address: Some(to),
            },
        }
    }

    async fn attempt_telegram(&self, job: &JobRow, html: &str) -> Outcome {
        let Some(bot) = job.bot_id.as_deref().and_then(|b| self.bots.get(b)) else {
            return Outcome::Permanent {
                why: "the bot is no longer registered".into(),
                address: None,
            };
        };
        let uid = job.user_id.as_deref().unwrap_or_default();
        let chat = match self.conn().await {
            Ok(mut c) => storage::chat_of(&mut c, &bot.id, uid).await,
            Err(e) => {
                return Outcome::Retry {
                    after: None,
                    why: e.to_string(),
                    address: None,
                }
            }
        };
        let chat = match chat {
            Ok(Some(c)) => c,
            Ok(None) => {
                return Outcome::Permanent {
                    why: "the user has no chat with the bot (unlinked)".into(),
                    address: None,
                }
            }
            Err(e) => {
                return Outcome::Retry {
                    after: None,
                    why: e.to_string(),
                    address: None,
                }
            }
        };
        let address = Some(chat.to_string());
        let tg = &self.config.telegram;
        if tg.per_bot_rate > 0 {
            let per_bot = Duration::from_secs(1) / tg.per_bot_rate;
            let chat_wait = self
                .shaper
                .reserve(&format!("{}:{chat}", bot.id), tg.per_chat_interval);
            let bot_wait = self.shaper.reserve(&bot.id, per_bot);
            let wait = chat_wait.max(bot_wait);
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        } else if !tg.per_chat_interval.is_zero() {
            let wait = self
                .shaper
                .reserve(&format!("{}:{chat}", bot.id), tg.per_chat_interval);
            tokio::time::sleep(wait).await;
        }
        match telegram::send(&bot, chat, html).await {
            Ok(id) => Outcome::Sent {
                provider_id: format!("{}:{chat}:{id}", bot.id),
                address: chat.to_string(),
            },
            Err(SendError::RetryAfter(d)) => Outcome::Retry {
                after: Some(d),
                why: format!("Telegram: too many requests, retry after {}s", d.as_secs()),
                address,
            },
            Err(SendError::Gone(why)) => {
                if let Ok(mut c) = self.db.begin_write().await {
                    if storage::unlink_chat(&mut c, &bot.id, chat).await.is_ok() {
                        let _ = c.commit().await;
                    }
                }
                tracing::info!(bot = %bot.username, chat, "unlinked: {why}");
                Outcome::Permanent {
                    why: format!("{why} (unlinked)"),
                    address,
                }
            }
            Err(SendError::Permanent(why)) => Outcome::Permanent { why, address },
            Err(SendError::Transient(why)) => Outcome::Retry {
                after: None,
                why,
                address,
            },
            Err(SendError::Migrated(to)) => {
                if let Ok(mut c) = self.db.begin_write().await {
                    if storage::link(&mut c, &bot.id, uid, to, self.clock.now_ms())
                        .await
                        .is_ok()
                    {
                        let _ = c.commit().await;
                    }
                }
                Outcome::Retry {
                    after: Some(Duration::ZERO),
                    why: format!("the chat moved to {to}"),
                    address,
                }
            }
        }
    }

    async fn attempt_sms(&self, job: &JobRow, phone: Option<&str>, text: &str) -> Outcome {
        let Some(twilio) = &self.twilio else {
            return Outcome::Permanent {
                why: "SMS is not configured".into(),
                address: None,
            };
        };
        let Some(phone) = phone else {
            return Outcome::Permanent {
                why: "the user has no phone number".into(),
                address: None,
            };
        };
        let callback = self
            .config
            .sms
            .status_callback
            .then(|| self.status_callback_url());
        let body: String = text.chars().take(1600).collect();
        let _ = job;
        match twilio.send(phone, &body, callback.as_deref()).await {
            Ok(sid) => Outcome::Sent {
                provider_id: sid,
                address: phone.to_owned(),
            },
            Err(SmsError::Permanent { code, message }) => Outcome::Permanent {
                why: format!("Twilio {code}: {message}"),
                address: Some(phone.to_owned()),
            },
            Err(SmsError::Transient {
                message,
                retry_after,
            }) => Outcome::Retry {
                after: retry_after,
                why: message,
                address: Some(phone.to_owned()),
            },
        }
    }

    /// Where Twilio reports delivery.
    pub fn status_callback_url(&self) -> String {
        format!("{}/api/notifications/twilio/status", self.public_url)
    }

    /// A Twilio delivery report (signature already checked).
    pub async fn twilio_report(
        &self,
        sid: &str,
        status: &str,
        error_code: Option<&str>,
    ) -> Result<(), ApiError> {
        let (new, error) = match status {
            "delivered" | "read" => ("delivered", None),
            "failed" | "undelivered" => (
                "failed",
                Some(format!(
                    "Twilio reports {status}{}",
                    error_code.map(|c| format!(" ({c})")).unwrap_or_default()
                )),
            ),
            _ => return Ok(()),
        };
        let now = self.clock.now_ms();
        let mut c = self.db.begin_write().await?;
        if self
            .apply_report(&mut c, sid, new, error.clone(), now)
            .await?
        {
            c.commit().await?;
            self.wake.notify_one();
            return Ok(());
        }
        // Early: the worker that sent it has not committed the message id.
        // Kept, then settled by whichever of the two commits last.
        tracing::debug!(
            sid,
            status = new,
            "delivery report before its job knows the message: kept"
        );
        storage::keep_early_report(&mut c, sid, new, error.as_deref(), now).await?;
        c.commit().await?;
        self.settle_early_report(sid).await
    }

    /// Moves `sid`'s sent job to `status` (`delivered`, or `failed` with
    /// `error`, then handed to the next channel); false when no sent job
    /// has that message id.
    async fn apply_report(
        &self,
        c: &mut AnyConnection,
        sid: &str,
        status: &str,
        error: Option<String>,
        now: i64,
    ) -> Result<bool, ApiError> {
        let Some(job) = storage::report(c, sid, status, error.as_deref(), now).await? else {
            return Ok(false);
        };
        if let Some(why) = error {
            self.fall_back(c, &job, &why, now).await?;
        }
        Ok(true)
    }

    /// Applies the report kept for `sid` once its job has recorded it
    /// (run by the report's handler and by the sending worker, each after
    /// its own commit, so the later of the two finds both).
    async fn settle_early_report(&self, sid: &str) -> Result<(), ApiError> {
        let now = self.clock.now_ms();
        let mut c = self.db.begin_write().await?;
        if let Some((status, error)) = storage::take_early_report(&mut c, sid).await? {
            let applied = self.apply_report(&mut c, sid, &status, error, now).await?;
            tracing::debug!(sid, status, applied, "early delivery report settled");
        }
        c.commit().await?;
        self.wake.notify_one();
        Ok(())
    }

    // ---- Telegram linking

    /// The bot a link request means: `bot_id`, else the caller's
    /// organization's bot, else the default one.
    fn link_bot(
        &self,
        user: &UserClaims,
        bot_id: Option<&str>,
    ) -> Result<Arc<BotHandle>, ApiError> {
        if let Some(id) = bot_id {
            let b = self
                .bots
                .get(id)
                .ok_or_else(|| ApiError::not_found("no such bot"))?;
            if let Some(t) = &b.tenant_id {
                if user.tenant.as_deref() != Some(t.as_str()) {
                    return Err(ApiError::not_found("no such bot"));
                }
            }
            return Ok(b);
        }
        if let Some(t) = &user.tenant {
            if let Some(b) = self.bots.of_tenant(t) {
                return Ok(b);
            }
        }
        self.bots.get(DEFAULT_BOT).ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "telegram_unavailable",
                "no Telegram bot is configured (TIERGATE_TELEGRAM_BOT_TOKEN), or Telegram has not answered getMe yet",
            )
        })
    }

    /// A one-time code and deep link that binds the caller's chat.
    pub async fn link_code(
        &self,
        user: &UserClaims,
        bot_id: Option<&str>,
    ) -> Result<LinkCode, ApiError> {
        let bot = self.link_bot(user, bot_id)?;
        let code = backend_common::random_token(18).map_err(internal)?;
        let now = self.clock.now_ms();
        let expires_at = now + ms(self.config.telegram.link_ttl);
        let mut tx = self.db.begin_write().await?;
        storage::insert_link_code(
            &mut tx,
            &backend_common::token_hash(&code),
            &bot.id,
            &user.user_id,
            expires_at,
        )
        .await?;
        tx.commit().await?;
        Ok(LinkCode {
            deep_link: format!("https://t.me/{}?start={code}", bot.username),
            code,
            bot_id: bot.id.clone(),
            bot_username: bot.username.clone(),
            expires_at,
        })
    }

    /// The caller's linked bots.
    pub async fn links(&self, user: &UserClaims) -> Result<Vec<Link>, ApiError> {
        let mut c = self.conn().await?;
        let rows = storage::links_of(&mut c, &user.user_id).await?;
        Ok(rows
            .into_iter()
            .map(|(bot_id, linked_at)| Link {
                bot_username: self.bots.get(&bot_id).map(|b| b.username.clone()),
                bot_id,
                linked_at,
            })
            .collect())
    }

    /// Unlinks the caller from `bot_id`.
    pub async fn unlink(&self, user: &UserClaims, bot_id: &str) -> Result<(), ApiError> {
        let mut tx = self.db.begin_write().await?;
        let gone = storage::unlink_user(&mut tx, bot_id, &user.user_id).await?;
        tx.commit().await?;
        if gone {
            Ok(())
        } else {
            Err(ApiError::not_found("not linked to that bot"))
        }
    }

    /// Acts on an update bot `bot` received.
    pub async fn on_update(&self, bot: &BotHandle, update: &teloxide::types::Update) {
        let Some(cmd) = telegram::command(update) else {
            return;
        };
        let reply = match self.apply_command(bot, &cmd).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(bot = %bot.username, error = %e, "cannot apply a Telegram command");
                return;
            }
        };
        let chat = match cmd {
            telegram::Command::Start { chat, .. } | telegram::Command::Stop { chat } => chat,
        };
        if let Err(e) = telegram::send(bot, chat, reply).await {
            tracing::info!(bot = %bot.username, error = ?e, "cannot answer a command");
        }
    }

    async fn apply_command(
        &self,
        bot: &BotHandle,
        cmd: &telegram::Command,
    ) -> Result<&'static str, ApiError> {
        let now = self.clock.now_ms();
        let mut tx = self.db.begin_write().await?;
        let reply = match cmd {
            telegram::Command::Start { code, .. } if code.is_empty() => {
                "Buka tautan dari aplikasi untuk menghubungkan akun Anda. / Open the link from the app to connect your account."
            }
            telegram::Command::Start { chat, code } => {
                match storage::use_link_code(&mut tx, &backend_common::token_hash(code), &bot.id, now).await? {
                    Some(user_id) => {
                        storage::link(&mut tx, &bot.id, &user_id, *chat, now).await?;
                        tracing::info!(bot = %bot.username, user_id, "Telegram chat linked");
                        "✅ Terhubung: notifikasi akan dikirim ke sini. Kirim /stop untuk berhenti. / Linked: notifications come here. Send /stop to stop."
                    }
                    None => "Kode tidak berlaku atau kedaluwarsa; minta tautan baru di aplikasi. / The code is invalid or expired; ask the app for a new link.",
                }
            }
            telegram::Command::Stop { chat } => {
                storage::unlink_chat(&mut tx, &bot.id, *chat).await?;
                "Tidak terhubung lagi; notifikasi tidak dikirim ke sini. / Unlinked: no more notifications here."
            }
        };
        tx.commit().await?;
        Ok(reply)
    }

    // ---- bots

    /// Loads the registered bots (tokens opened) and checks the default
    /// bot; a bot Telegram does not answer for yet is retried by
    /// [`Notifications::run_bots`].
    pub async fn load_bots(&self) -> Result<(), String> {
        let mut c = self.db.pool().acquire().await.map_err(|e| e.to_string())?;
        for b in storage::bots(&mut c).await.map_err(|e| e.to_string())? {
            match self.tokens.open(&b.id, &b.token) {
                Some(Ok(t)) => {
                    let token = String::from_utf8(t).map_err(|e| e.to_string())?;
                    self.bots.insert(
                        &b.id,
                        &token,
                        b.telegram_id,
                        &b.username,
                        b.tenant_id.clone(),
                    );
                }
                _ => {
                    tracing::warn!(bot = %b.username, "cannot open the bot's token (service key replaced?); the bot is skipped")
                }
            }
        }
        Ok(())
    }

    /// The bots' upkeep, for as long as the service runs: the default bot
    /// checked with `getMe` until Telegram answers; each bot's webhook set
    /// (with `telegram.webhook_url`) or its long polling started.
    pub async fn run_bots(self: Arc<Self>) {
        let mut started: Vec<String> = Vec::new();
        let mut default_wait = Duration::from_secs(1);
        loop {
            if let Some(token) = self.config.telegram.bot_token.clone() {
                if self.bots.get(DEFAULT_BOT).is_none() {
                    match self.bots.check(token.expose()).await {
                        Ok((id, username)) => {
                            self.bots
                                .insert(DEFAULT_BOT, token.expose(), id, &username, None);
                            tracing::info!(bot = %username, "Telegram bot ready");
                        }
                        Err(e) => {
                            tracing::warn!(error = %telegram::describe(&e), "Telegram getMe failed for the default bot; retried");
                            default_wait = (default_wait * 2).min(Duration::from_secs(60));
                        }
                    }
                }
            }
            for bot in self.bots.all() {
                if started.contains(&bot.id) {
                    continue;
                }
                started.push(bot.id.clone());
                self.start_updates(bot);
            }
            started.retain(|id| self.bots.get(id).is_some());
            tokio::time::sleep(default_wait.min(Duration::from_secs(2))).await;
        }
    }

    fn start_updates(self: &Arc<Self>, bot: Arc<BotHandle>) {
        let me = self.clone();
        match self.config.telegram.webhook_url.clone() {
            Some(base) => {
                actix_web::rt::spawn(async move {
                    let url = format!(
                        "{}/api/notifications/telegram/webhook/{}",
                        base.trim_end_matches('/'),
                        bot.id
                    );
                    let mut wait = Duration::from_secs(1);
                    while me.bots.get(&bot.id).is_some() {
                        match telegram::set_webhook(&bot, &url).await {
                            Ok(()) => {
                                tracing::info!(bot = %bot.username, url, "Telegram webhook set");
                                return;
                            }
                            Err(e) => {
                                tracing::warn!(bot = %bot.username, error = %e, "setWebhook failed; retried")
                            }
                        }
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(300));
                    }
                });
            }
            None => {
                let bots = self.bots.clone();
                actix_web::rt::spawn(async move {
                    let handler = me.clone();
                    telegram::poll(bots, bot.id.clone(), move |b, u| {
                        let h = handler.clone();
                        async move { h.on_update(&b, &u).await }
                    })
                    .await;
                });
            }
        }
    }

    /// Registers a bot by its token (checked with `getMe`), for the
    /// platform (an admin) or the caller's organization (its admin).
    pub async fn register_bot(
        &self,
        user: &UserClaims,
        token: &str,
        for_tenant: bool,
    ) -> Result<BotView, ApiError> {
        let token = token.trim();
        if token.is_empty() || token.len() > 100 || !token.contains(':') {
            return Err(ApiError::validation(vec![FieldError::new(
                "token",
                "a bot token from @BotFather (<id>:<secret>)",
            )]));
        }
        let tenant_id = if for_tenant {
            user.tenant.clone()
        } else {
            None
        };
        let (telegram_id, username) = self.bots.check(token).await.map_err(|e| match e {
            teloxide::RequestError::Api(_) => ApiError::validation(vec![FieldError::new(
                "token",
                "Telegram refused the token (getMe)",
            )]),
            other => ApiError::unavailable(
                format!(
                    "Telegram cannot be reached to check the token: {}",
                    telegram::describe(&other)
                ),
                5,
            ),
        })?;
        let id = uuid::Uuid::now_v7().to_string();
        let row = storage::BotRow {
            id: id.clone(),
            telegram_id,
            username: username.clone(),
            token: self.tokens.seal(&id, token.as_bytes()).map_err(internal)?,
            tenant_id: tenant_id.clone(),
            created_by: user.user_id.clone(),
            created_at: self.clock.now_ms(),
        };
        let mut tx = self.db.begin_write().await?;
        if let Err(e) = storage::insert_bot(&mut tx, &row).await {
            if backend_common::db::is_unique_violation(&e) {
                return Err(ApiError::conflict(
                    "bot_registered",
                    "that bot is registered already",
                ));
            }
            return Err(e.into());
        }
        tx.commit().await?;
        self.bots
            .insert(&id, token, telegram_id, &username, tenant_id);
        tracing::info!(bot = %username, "Telegram bot registered");
        Ok(BotView::from_row(&row))
    }

    /// The bots the caller administers: every one for an admin, the
    /// organization's for a tenant admin.
    pub async fn list_bots(&self, tenant: Option<&str>) -> Result<Vec<BotView>, ApiError> {
        let mut c = self.conn().await?;
        let rows = storage::bots(&mut c).await?;
        Ok(rows
            .iter()
            .filter(|b| tenant.is_none() || b.tenant_id.as_deref() == tenant)
            .map(BotView::from_row)
            .collect())
    }

    /// Removes a bot (its links go with it).
    pub async fn delete_bot(&self, id: &str, tenant: Option<&str>) -> Result<(), ApiError> {
        let mut tx = self.db.begin_write().await?;
        let rows = storage::bots(&mut tx).await?;
        let Some(b) = rows
            .iter()
            .find(|b| b.id == id && (tenant.is_none() || b.tenant_id.as_deref() == tenant))
        else {
            return Err(ApiError::not_found("no such bot"));
        };
        storage::delete_bot(&mut tx, &b.id).await?;
        tx.commit().await?;
        self.bots.remove(id);
        Ok(())
    }

    // ---- lists

    /// Jobs as shown to users and admins.
    pub async fn list(
        &self,
        f: &storage::JobFilter<'_>,
    ) -> Result<Vec<NotificationView>, ApiError> {
        let mut c = self.conn().await?;
        let rows = storage::jobs(&mut c, f).await?;
        Ok(rows.iter().map(NotificationView::from_row).collect())
    }

    /// Sends a job's message again, as a new job (admins).
    pub async fn resend(&self, id: &str) -> Result<NotificationView, ApiError> {
        let now = self.clock.now_ms();
        let mut tx = self.db.begin_write().await?;
        let job = storage::job(&mut tx, id)
            .await?
            .ok_or_else(|| ApiError::not_found("no such notification"))?;
        let payload = self.open(&job).map_err(internal)?;
        let mut j = job.clone();
        j.id = uuid::Uuid::now_v7().to_string();
        j.event_id = format!("{}:resend:{}", job.event_id, j.id);
        j.status = "queued".to_owned();
        j.next_at = now;
        j.created_at = now;
        j.fallback_of = None;
        j.payload = self.seal(&j.id, &payload)?;
        storage::insert_job(&mut tx, &j).await?;
        let stored = storage::job(&mut tx, &j.id)
            .await?
            .ok_or_else(|| internal("the job vanished"))?;
        tx.commit().await?;
        self.wake.notify_one();
        Ok(NotificationView::from_row(&stored))
    }

    /// Jobs per status.
    pub async fn counts(&self) -> Result<Vec<(String, i64)>, ApiError> {
        let mut c = self.conn().await?;
        Ok(storage::job_counts(&mut c).await?)
    }

    /// Forgets used and expired link codes.
    pub async fn purge(&self) -> Result<u64, ApiError> {
        let mut tx = self.db.begin_write().await?;
        let now = self.clock.now_ms();
        let n = storage::purge_link_codes(&mut tx, now).await?
            + storage::purge_early_reports(&mut tx, now - 86_400_000).await?;
        tx.commit().await?;
        Ok(n)
    }
}

fn join(channels: &[Channel]) -> String {
    channels
        .iter()
        .map(|c| c.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// `POST /api/notifications/telegram/link` answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LinkCode {
    /// The one-time code (`/start <code>`).
    pub code: String,
    /// Opens the bot with the code: `https://t.me/<bot>?start=<code>`.
    pub deep_link: String,
    /// The bot.
    pub bot_id: String,
    /// Its username.
    pub bot_username: String,
    /// Unix ms after which the code no longer links.
    pub expires_at: i64,
}

/// A linked bot.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Link {
    /// The bot.
    pub bot_id: String,
    /// Its username, when this instance knows the bot.
    pub bot_username: Option<String>,
    /// Unix ms.
    pub linked_at: i64,
}

/// A registered bot (never its token).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct BotView {
    /// Our id.
    pub id: String,
    /// `@username` without the `@`.
    pub username: String,
    /// Telegram's id of the bot.
    pub telegram_id: i64,
    /// The organization whose bot it is; null: a platform bot.
    pub tenant_id: Option<String>,
    /// Unix ms.
    pub created_at: i64,
}

impl BotView {
    fn from_row(b: &storage::BotRow) -> Self {
        Self {
            id: b.id.clone(),
            username: b.username.clone(),
            telegram_id: b.telegram_id,
            tenant_id: b.tenant_id.clone(),
            created_at: b.created_at,
        }
    }
}

/// A notification (one job) as listed.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct NotificationView {
    /// Its id.
    pub id: String,
    /// The event it tells of.
    pub event_id: String,
    /// Its type (its template).
    pub event_type: String,
    /// The user it is for.
    pub user_id: Option<String>,
    /// `email`, `telegram` or `sms`.
    pub channel: String,
    /// `queued`, `sending`, `sent`, `delivered` (where the provider
    /// reports it), `failed`, `dead` or `canceled`.
    pub status: String,
    /// Attempts made.
    pub attempts: i32,
    /// The last failure.
    pub last_error: Option<String>,
    /// The notification this one took over from (fallback).
    pub fallback_of: Option<String>,
    /// The channels left to fall back to.
    pub fallbacks: Vec<String>,
    /// Unix ms.
    pub created_at: i64,
    /// When the next attempt is due (queued).
    pub next_at: i64,
    /// When the provider accepted it.
    pub sent_at: Option<i64>,
    /// When the provider reported delivery.
    pub delivered_at: Option<i64>,
}

impl NotificationView {
    fn from_row(j: &JobRow) -> Self {
        Self {
            id: j.id.clone(),
            event_id: j.event_id.clone(),
            event_type: j.event_type.clone(),
            user_id: j.user_id.clone(),
            channel: j.channel.clone(),
            status: j.status.clone(),
            attempts: j.attempts,
            last_error: j.last_error.clone(),
            fallback_of: j.fallback_of.clone(),
            fallbacks: j
                .fallbacks
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
            created_at: j.created_at,
            next_at: j.next_at,
            sent_at: j.sent_at,
            delivered_at: j.delivered_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_every_notified_event_has_a_template_and_is_consumed() {
        for (t, _) in CONSUMED {
            if spec(t).is_some() {
                assert!(Templates::has(t), "{t} has no template");
            }
        }
        assert!(Templates::has("payment.expiring"));
        assert!(
            spec("payment.settled").is_none(),
            "settled only cancels reminders"
        );
        assert!(
            spec("user.registered").is_some_and(|s| s.critical && s.to == To::EmailField("email"))
        );
        assert!(spec("invoice.issued").is_some_and(|s| s.attach_invoice && !s.critical));
    }
}
