-- The notifications service's tables. Instants are Unix milliseconds (UTC).

-- Each recipient's settings and last known contact. A user without a row
-- has the defaults (docs/CONFIG.md, "Notification preferences").
CREATE TABLE recipients (
    user_id TEXT PRIMARY KEY,
    -- the last address the users service told (events, or GET /internal/users)
    email TEXT,
    name TEXT,
    -- id | en; NULL: services.notifications.default_locale
    locale TEXT,
    -- IANA zone of the quiet hours; NULL: the business time zone
    time_zone TEXT,
    -- E.164
    phone TEXT,
    -- the channels in the order of preference, comma-separated; NULL: default
    channels TEXT,
    -- JSON {category: {channel: bool}}; what is absent is the default
    categories TEXT,
    -- minutes after local midnight; both NULL: no quiet hours
    quiet_start INTEGER,
    quiet_end INTEGER,
    updated_at BIGINT NOT NULL
);

-- Telegram bots besides the default one (TIERGATE_TELEGRAM_BOT_TOKEN).
CREATE TABLE bots (
    id TEXT PRIMARY KEY,
    -- Telegram's id of the bot (getMe)
    telegram_id BIGINT NOT NULL,
    username TEXT NOT NULL,
    -- the token, sealed (XChaCha20-Poly1305, the bot id as associated data)
    token TEXT NOT NULL,
    -- the organization whose bot it is; NULL: a platform bot
    tenant_id TEXT,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    CONSTRAINT bots_telegram_id UNIQUE (telegram_id)
);

-- A user's chat with a bot.
CREATE TABLE telegram_links (
    bot_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    chat_id BIGINT NOT NULL,
    linked_at BIGINT NOT NULL,
    PRIMARY KEY (bot_id, user_id)
);
CREATE INDEX telegram_links_chat ON telegram_links (bot_id, chat_id);

-- One-time link codes (`/start <code>`), stored as their SHA-256.
CREATE TABLE link_codes (
    code_hash TEXT PRIMARY KEY,
    bot_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT
);
CREATE INDEX link_codes_user ON link_codes (user_id);

-- The delivery queue: one job per (event, channel, recipient).
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    event_id TEXT NOT NULL,
    -- the template: the event's type (payment.expiring for a reminder)
    event_type TEXT NOT NULL,
    user_id TEXT,
    -- email | telegram | sms
    channel TEXT NOT NULL,
    -- the user id, or the address the event names (a verification mail)
    recipient TEXT NOT NULL,
    -- the address used at the last attempt (mail, chat id, phone)
    address TEXT,
    bot_id TEXT,
    -- account | billing | marketing
    category TEXT NOT NULL,
    critical INTEGER NOT NULL,
    -- the channels still to try after this one, comma-separated
    fallbacks TEXT NOT NULL,
    -- the job this one took over from
    fallback_of TEXT,
    -- the event's data, sealed (it may hold single-use links)
    payload TEXT NOT NULL,
    -- what the job is about (a payment id): a reminder is canceled by it
    ref_id TEXT,
    -- queued | sending | sent | delivered | failed | dead | canceled
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at BIGINT NOT NULL,
    claimed_until BIGINT,
    claimed_by TEXT,
    last_error TEXT,
    -- the provider's message id (SMTP Message-ID, Telegram message id, Twilio SID)
    provider_id TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    sent_at BIGINT,
    delivered_at BIGINT,
    CONSTRAINT jobs_unique UNIQUE (event_id, channel, recipient)
);
CREATE INDEX jobs_due ON jobs (status, next_at);
CREATE INDEX jobs_user ON jobs (user_id, created_at);
CREATE INDEX jobs_ref ON jobs (ref_id);
CREATE INDEX jobs_provider ON jobs (provider_id);

-- A provider's delivery report that arrived before its job recorded the
-- provider's message id (Twilio may call back before the worker's
-- transaction commits); applied by that transaction, forgotten after a day.
CREATE TABLE early_reports (
    provider_id TEXT PRIMARY KEY,
    -- delivered | failed
    status TEXT NOT NULL,
    error TEXT,
    received_at BIGINT NOT NULL
);
