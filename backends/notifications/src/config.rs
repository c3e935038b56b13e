//! The notifications service's own section of `conf/services.yaml`
//! (`services.notifications`, beside `server` and `database`). Provider
//! credentials come from the environment only (each also as `_FILE`).

use std::path::PathBuf;
use std::time::Duration;

use backend_common::config::{secret_from, ConfigError, ServiceConfig};
use backend_common::secret::Secret;
use serde::Deserialize;

/// `services.notifications.email`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmailConfig {
    /// The `From` of every mail.
    pub from: String,
    /// Where mails are written as `.eml` files when no SMTP server is
    /// configured; unset: `<data_dir>/mail`.
    pub mail_dir: Option<PathBuf>,
    /// Per-message SMTP timeout.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// The SMTP server as a lettre URL (`smtp://host:25`,
    /// `smtp://user:pass@host:587?tls=required` for STARTTLS,
    /// `smtps://user:pass@host:465`), from `TIERGATE_SMTP_URL` or `_FILE`
    /// only (it may hold a password). Unset: mails go to `mail_dir`.
    #[serde(skip)]
    pub smtp_url: Option<Secret<String>>,
}

impl Default for EmailConfig {
    fn default() -> Self {
        Self {
            from: "tiergate <no-reply@tiergate.example>".to_owned(),
            mail_dir: None,
            timeout: Duration::from_secs(30),
            smtp_url: None,
        }
    }
}

/// `services.notifications.telegram`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelegramConfig {
    /// The Bot API base URL. Env: `TIERGATE_TELEGRAM_API_URL`.
    pub api_url: String,
    /// The public base URL Telegram posts updates to
    /// (`<webhook_url>/api/notifications/telegram/webhook/<bot>`, with a
    /// per-bot secret token). Unset: each bot long-polls `getUpdates`
    /// (one instance only). Env: `TIERGATE_TELEGRAM_WEBHOOK_URL`.
    pub webhook_url: Option<String>,
    /// Messages a second per bot (Telegram allows about 30); 0: no
    /// shaping.
    pub per_bot_rate: u32,
    /// The least time between two messages to one chat (Telegram allows
    /// about 1 a second); 0s: no shaping.
    #[serde(with = "humantime_serde")]
    pub per_chat_interval: Duration,
    /// How long a link code (`/start <code>`) can be used.
    #[serde(with = "humantime_serde")]
    pub link_ttl: Duration,
    /// The default bot's token, from `TIERGATE_TELEGRAM_BOT_TOKEN` or
    /// `_FILE` only. Unset: no default bot (registered bots still work).
    #[serde(skip)]
    pub bot_token: Option<Secret<String>>,
}

impl Default for TelegramConfig {
    fn default() -> Self {
        Self {
            api_url: "https://api.telegram.org".to_owned(),
            webhook_url: None,
            per_bot_rate: 30,
            per_chat_interval: Duration::from_secs(1),
            link_ttl: Duration::from_secs(15 * 60),
            bot_token: None,
        }
    }
}

/// `services.notifications.sms` (Twilio).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SmsConfig {
    /// The Twilio REST base URL. Env: `TIERGATE_TWILIO_API_URL`.
    pub api_url: String,
    /// The sender: an E.164 number, or a Messaging Service SID (`MG…`).
    /// Env: `TIERGATE_TWILIO_FROM`.
    pub from: Option<String>,
    /// Ask Twilio for delivery reports at
    /// `<public_url>/api/notifications/twilio/status`.
    pub status_callback: bool,
    /// Per-call timeout.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// From `TIERGATE_TWILIO_ACCOUNT_SID` only.
    #[serde(skip)]
    pub account_sid: Option<String>,
    /// From `TIERGATE_TWILIO_AUTH_TOKEN` or `_FILE` only. Without it (or
    /// the SID, or `from`) SMS is off.
    #[serde(skip)]
    pub auth_token: Option<Secret<String>>,
}

impl Default for SmsConfig {
    fn default() -> Self {
        Self {
            api_url: "https://api.twilio.com".to_owned(),
            from: None,
            status_callback: true,
            timeout: Duration::from_secs(15),
            account_sid: None,
            auth_token: None,
        }
    }
}

/// `services.notifications.queue`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueConfig {
    /// Jobs one instance sends at once.
    pub concurrency: usize,
    /// Attempts before a job is dead.
    pub max_attempts: i32,
    /// The first retry's wait; each next one doubles (with jitter).
    #[serde(with = "humantime_serde")]
    pub backoff: Duration,
    /// The longest wait between two attempts.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// A channel still failing this long after the job was queued hands
    /// the message to the recipient's next channel.
    #[serde(with = "humantime_serde")]
    pub fallback_after: Duration,
    /// How long a worker holds a claimed job before another may take it
    /// (a worker that died).
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            concurrency: 16,
            max_attempts: 8,
            backoff: Duration::from_secs(5),
            max_backoff: Duration::from_secs(3600),
            fallback_after: Duration::from_secs(30 * 60),
            lease: Duration::from_secs(120),
        }
    }
}

/// `services.notifications.*` (every key optional).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct NotificationsConfig {
    /// E-mail.
    pub email: EmailConfig,
    /// Telegram.
    pub telegram: TelegramConfig,
    /// SMS.
    pub sms: SmsConfig,
    /// The delivery queue.
    pub queue: QueueConfig,
    /// A pending virtual account's reminder is sent this long before it
    /// expires (0s: none).
    #[serde(with = "humantime_serde")]
    pub payment_reminder_before: Duration,
    /// The language of a user who has not chosen one: `id` or `en`.
    pub default_locale: String,
}

impl Default for NotificationsConfig {
    fn default() -> Self {
        Self {
            email: EmailConfig::default(),
            telegram: TelegramConfig::default(),
            sms: SmsConfig::default(),
            queue: QueueConfig::default(),
            payment_reminder_before: Duration::from_secs(3 * 3600),
            default_locale: "id".to_owned(),
        }
    }
}

fn is_http_url(u: &str) -> bool {
    (u.starts_with("http://") || u.starts_with("https://")) && u.len() > "https://".len()
}

impl ServiceConfig for NotificationsConfig {
    fn read_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let mut errors = Vec::new();
        let non_empty = |s: Option<Secret<String>>| s.filter(|s| !s.expose().trim().is_empty());
        match secret_from(env, "TIERGATE_SMTP_URL") {
            Ok(v) => self.email.smtp_url = non_empty(v),
            Err(e) => errors.extend(e.0),
        }
        match secret_from(env, "TIERGATE_TELEGRAM_BOT_TOKEN") {
            Ok(v) => self.telegram.bot_token = non_empty(v),
            Err(e) => errors.extend(e.0),
        }
        match secret_from(env, "TIERGATE_TWILIO_AUTH_TOKEN") {
            Ok(v) => self.sms.auth_token = non_empty(v),
            Err(e) => errors.extend(e.0),
        }
        if let Some(v) = env("TIERGATE_TWILIO_ACCOUNT_SID").filter(|v| !v.is_empty()) {
            self.sms.account_sid = Some(v);
        }
        if let Some(v) = env("TIERGATE_TWILIO_FROM").filter(|v| !v.is_empty()) {
            self.sms.from = Some(v);
        }
        if let Some(v) = env("TIERGATE_TWILIO_API_URL") {
            self.sms.api_url = v;
        }
        if let Some(v) = env("TIERGATE_TELEGRAM_API_URL") {
            self.telegram.api_url = v;
        }
        if let Some(v) = env("TIERGATE_TELEGRAM_WEBHOOK_URL") {
            self.telegram.webhook_url = Some(v).filter(|v| !v.is_empty());
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError(errors))
        }
    }

    fn problems(&self) -> Vec<String> {
        let mut errors = Vec::new();
        let mut check = |ok: bool, what: &str| {
            if !ok {
                errors.push(format!("services.notifications.{what}"));
            }
        };
        check(
            self.email.from.parse::<lettre::message::Mailbox>().is_ok(),
            &format!("email.from: a mailbox (`{}`)", self.email.from),
        );
        check(
            (Duration::from_secs(1)..=Duration::from_secs(600)).contains(&self.email.timeout),
            "email.timeout: 1s to 10m",
        );
        check(
            is_http_url(&self.telegram.api_url),
            &format!(
                "telegram.api_url: an http(s) URL (`{}`)",
                self.telegram.api_url
            ),
        );
        if let Some(u) = &self.telegram.webhook_url {
            check(
                u.starts_with("https://") || u.starts_with("http://127.") || u.starts_with("http://localhost"),
                &format!("telegram.webhook_url: an https URL (Telegram posts only to https; http only for a local stand-in) (`{u}`)"),
            );
        }
        check(
            self.telegram.per_bot_rate <= 1000,
            "telegram.per_bot_rate: 0 to 1000",
        );
        check(
            self.telegram.per_chat_interval <= Duration::from_secs(60),
            "telegram.per_chat_interval: at most 60s",
        );
        check(
            (Duration::from_secs(60)..=Duration::from_secs(7 * 24 * 3600))
                .contains(&self.telegram.link_ttl),
            "telegram.link_ttl: 1m to 7days",
        );
        check(
            is_http_url(&self.sms.api_url),
            &format!("sms.api_url: an http(s) URL (`{}`)", self.sms.api_url),
        );
        if let Some(from) = &self.sms.from {
            check(
                crate::phone::normalize(from).is_ok()
                    || (from.starts_with("MG") && from.len() == 34),
                &format!("sms.from: an E.164 number or a Messaging Service SID (`{from}`)"),
            );
        }
        check(
            (Duration::from_secs(1)..=Duration::from_secs(120)).contains(&self.sms.timeout),
            "sms.timeout: 1s to 2m",
        );
        let q = &self.queue;
        check(
            (1..=1024).contains(&q.concurrency),
            "queue.concurrency: 1 to 1024",
        );
        check(
            (1..=100).contains(&q.max_attempts),
            "queue.max_attempts: 1 to 100",
        );
        check(
            q.backoff >= Duration::from_millis(10) && q.backoff <= q.max_backoff,
            "queue.backoff: at least 10ms and at most queue.max_backoff",
        );
        check(
            q.max_backoff <= Duration::from_secs(24 * 3600),
            "queue.max_backoff: at most 24h",
        );
        check(
            q.fallback_after >= Duration::from_secs(1),
            "queue.fallback_after: at least 1s",
        );
        check(
            (Duration::from_secs(5)..=Duration::from_secs(3600)).contains(&q.lease),
            "queue.lease: 5s to 1h",
        );
        check(
            self.payment_reminder_before <= Duration::from_secs(7 * 24 * 3600),
            "payment_reminder_before: at most 7days",
        );
        check(
            crate::templates::LOCALES.contains(&self.default_locale.as_str()),
            &format!("default_locale: `id` or `en` (`{}`)", self.default_locale),
        );
        errors
    }
}

/// Whether SMS can be sent: account SID, auth token and sender known.
impl SmsConfig {
    /// The credentials and sender, when all are set.
    pub fn credentials(&self) -> Option<(&str, &Secret<String>, &str)> {
        Some((
            self.account_sid.as_deref()?,
            self.auth_token.as_ref()?,
            self.from.as_deref()?,
        ))
    }
}
