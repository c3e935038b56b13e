//! The messages: one template file per event type under
//! `backends/notifications/templates/<event>.j2`, rendered with minijinja,
//! each holding the blocks `subject`, `text` (the mail's plain part and
//! SMS), `html` (the mail's HTML part) and `telegram` (HTML as Telegram
//! parses it), each in Bahasa Indonesia and English (`lang` is `id` or
//! `en`).
//!
//! Every file is registered twice: as `<event>.txt` (no escaping: subject,
//! text) and as `<event>.html` (HTML escaping of every value: html,
//! telegram), so a name like `<b>` in a value is shown, never parsed, on
//! either side. Filters: `rupiah` (`Rp 1.234.567`), `datetime` and `date`
//! (in the business time zone, with its abbreviation: `2 Desember 2026
//! 14.05 WIB`).

use std::collections::BTreeMap;

use backend_common::calendar::BusinessCalendar;
use backend_common::money::Rupiah;
use minijinja::{AutoEscape, Environment, Value};

/// The languages there are templates in.
pub const LOCALES: &[&str] = &["id", "en"];

/// The event types there is a template for, and the template.
const TEMPLATES: &[(&str, &str)] = &[
    (
        "user.registered",
        include_str!("../templates/user.registered.j2"),
    ),
    (
        "user.password_reset_requested",
        include_str!("../templates/user.password_reset_requested.j2"),
    ),
    (
        "user.email_change_requested",
        include_str!("../templates/user.email_change_requested.j2"),
    ),
    (
        "user.email_changed",
        include_str!("../templates/user.email_changed.j2"),
    ),
    (
        "organization.invitation_created",
        include_str!("../templates/organization.invitation_created.j2"),
    ),
    (
        "invoice.issued",
        include_str!("../templates/invoice.issued.j2"),
    ),
    ("invoice.paid", include_str!("../templates/invoice.paid.j2")),
    (
        "payment.pending",
        include_str!("../templates/payment.pending.j2"),
    ),
    (
        "payment.expiring",
        include_str!("../templates/payment.expiring.j2"),
    ),
    (
        "payment.expired",
        include_str!("../templates/payment.expired.j2"),
    ),
    (
        "payment.failed",
        include_str!("../templates/payment.failed.j2"),
    ),
    (
        "subscription.activated",
        include_str!("../templates/subscription.activated.j2"),
    ),
    (
        "subscription.past_due",
        include_str!("../templates/subscription.past_due.j2"),
    ),
    (
        "subscription.ended",
        include_str!("../templates/subscription.ended.j2"),
    ),
];

/// A message, rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// The mail's subject.
    pub subject: String,
    /// Plain text (the mail's text part; SMS).
    pub text: String,
    /// The mail's HTML part.
    pub html: String,
    /// Telegram's message (HTML parse mode).
    pub telegram: String,
}

/// The templates, compiled once.
pub struct Templates {
    env: Environment<'static>,
}

impl std::fmt::Debug for Templates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Templates")
    }
}

/// English month names, January first (Indonesian: `calendar::BULAN`).
const MONTHS_EN: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

fn format_instant(cal: &BusinessCalendar, ms: i64, lang: &str, with_time: bool) -> String {
    let Ok(z) = cal.zoned(ms) else {
        return ms.to_string();
    };
    let months = if lang == "en" {
        &MONTHS_EN
    } else {
        &backend_common::calendar::BULAN
    };
    let month = months[usize::try_from(z.month() - 1).unwrap_or(0).min(11)];
    let date = format!("{} {month} {}", z.day(), z.year());
    if !with_time {
        return date;
    }
    let abbr = z.strftime("%Z").to_string();
    // Indonesian writes the time with a dot (14.05), English with a colon.
    let sep = if lang == "en" { ':' } else { '.' };
    format!("{date} {:02}{sep}{:02} {abbr}", z.hour(), z.minute())
}

impl Templates {
    /// Every template compiled, dates in `calendar`'s zone. Fails on a
    /// template that does not parse (a bug caught by the tests).
    pub fn new(calendar: BusinessCalendar) -> Result<Self, String> {
        let mut env = Environment::new();
        env.set_auto_escape_callback(|name| {
            if name.ends_with(".html") {
                AutoEscape::Html
            } else {
                AutoEscape::None
            }
        });
        // HTML escaping as Telegram's parser reads it (and mail clients
        // too): `<`, `>`, `&`, `"` only. minijinja's default also escapes
        // `/` and `'` as hex entities, which Telegram does not take in a
        // link's URL.
        env.set_formatter(|out, state, value| {
            if state.auto_escape() == AutoEscape::Html && !value.is_safe() {
                if value.is_undefined() || value.is_none() {
                    return Ok(());
                }
                let escaped = telegram_html_escape(&value.to_string());
                return out.write_str(&escaped).map_err(minijinja::Error::from);
            }
            minijinja::escape_formatter(out, state, value)
        });
        env.set_keep_trailing_newline(false);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_filter("rupiah", |v: i64| Rupiah(v).to_string());
        env.add_filter("method", |v: String| method_name(&v));
        let cal = calendar.clone();
        env.add_filter(
            "datetime",
            move |v: i64, state: &minijinja::State| -> String {
                let lang = state
                    .lookup("lang")
                    .map(|l| l.to_string())
                    .unwrap_or_default();
                format_instant(&cal, v, &lang, true)
            },
        );
        let cal = calendar;
        env.add_filter("date", move |v: i64, state: &minijinja::State| -> String {
            let lang = state
                .lookup("lang")
                .map(|l| l.to_string())
                .unwrap_or_default();
            format_instant(&cal, v, &lang, false)
        });
        for (event, source) in TEMPLATES {
            for suffix in ["txt", "html"] {
                env.add_template_owned(format!("{event}.{suffix}"), (*source).to_owned())
                    .map_err(|e| format!("template {event}: {e}"))?;
            }
        }
        Ok(Self { env })
    }

    /// Whether there is a template for `event_type`.
    pub fn has(event_type: &str) -> bool {
        TEMPLATES.iter().any(|(e, _)| *e == event_type)
    }

    /// The message of `event_type` in `lang` (`id` unless `en`) with
    /// `context` (the event's data and the recipient's name).
    pub fn render(
        &self,
        event_type: &str,
        lang: &str,
        context: &serde_json::Value,
    ) -> Result<Rendered, String> {
        let lang = if lang == "en" { "en" } else { "id" };
        let mut ctx: BTreeMap<String, Value> = match context {
            serde_json::Value::Object(m) => m
                .iter()
                .map(|(k, v)| (k.clone(), Value::from_serialize(v)))
                .collect(),
            _ => BTreeMap::new(),
        };
        ctx.insert("lang".to_owned(), Value::from(lang));
        let ctx = Value::from(ctx);
        let blocks = |suffix: &str, names: [&str; 2]| -> Result<[String; 2], String> {
            let t = self
                .env
                .get_template(&format!("{event_type}.{suffix}"))
                .map_err(|e| format!("template {event_type}: {e}"))?;
            let mut captured = t
                .render_captured(ctx.clone())
                .map_err(|e| format!("template {event_type}: {e}"))?;
            let mut out = [String::new(), String::new()];
            for (slot, name) in out.iter_mut().zip(names) {
                *slot = captured
                    .with_state_mut(|state| state.render_block(name))
                    .map(|s| s.trim().to_owned())
                    .map_err(|e| format!("template {event_type} block {name}: {e}"))?;
            }
            Ok(out)
        };
        let [subject, text] = blocks("txt", ["subject", "text"])?;
        let [html, telegram] = blocks("html", ["html", "telegram"])?;
        Ok(Rendered {
            subject: subject.replace(['\r', '\n'], " "),
            text,
            html,
            telegram,
        })
    }
}

/// A payment method's name as customers know it (`bca_va` → `BCA
/// Virtual Account`); an unknown one as it is.
pub fn method_name(method: &str) -> String {
    let name = match method {
        "bca_va" => "BCA Virtual Account",
        "bni_va" => "BNI Virtual Account",
        "bri_va" => "BRI Virtual Account",
        "permata_va" => "Permata Virtual Account",
        "cimb_va" => "CIMB Niaga Virtual Account",
        "mandiri_bill" | "echannel" => "Mandiri Bill Payment",
        "gopay" => "GoPay",
        "shopeepay" => "ShopeePay",
        "qris" => "QRIS",
        "credit_card" | "card" => "kartu kredit/debit",
        "snap" => "Midtrans Snap",
        other => other,
    };
    name.to_owned()
}

/// Escapes text for Telegram's HTML parse mode (`<`, `>`, `&`; `"` in
/// attributes): what a value placed in a message needs.
pub fn telegram_html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            _ => out.push(c),
        }
    }
    out
}

/// Escapes text for Telegram's MarkdownV2: every one of
/// `_*[]()~`>#+-=|{}.!` and `\` is preceded by `\`.
pub fn telegram_markdown_v2_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if "_*[]()~`>#+-=|{}.!\\".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn templates() -> Templates {
        Templates::new(BusinessCalendar::jakarta()).unwrap()
    }

    /// 2026-12-02 07:05 UTC = 14:05 WIB.
    const AT: i64 = 1_796_195_100_000;

    fn sample(event: &str) -> serde_json::Value {
        let mut d = json!({
            "user_id": "u1", "name": "Siti <Admin> & Co", "email": "siti@example.id",
            "verification_url": "http://localhost:8000/verify-email?token=abc",
            "reset_url": "http://localhost:8000/reset-password?token=abc",
            "accept_url": "http://localhost:8000/accept-invitation?token=abc",
            "organization": "PT Maju <Jaya>", "invited_by": "Budi", "role": "admin",
            "invoice_number": "INV/2026/12/000123", "paid_at": AT, "biller_code": "70012",
            "expires_at": AT, "number": "INV/2026/12/000123", "invoice_id": "inv1",
            "subtotal": 249000, "ppn": 27390, "total": 276390, "due_at": AT + 7 * 86_400_000,
            "plan": "PREMIUM", "tier": "PREMIUM", "period_start": AT, "period_end": AT + 31 * 86_400_000,
            "amount": 276390, "amount_paid": 276390, "method": "bca_va", "va_number": "12345678901",
            "bank": "bca", "pay_url": "http://localhost:8000/billing/invoices/inv1",
            "invoice_url": "http://localhost:8000/billing/invoices/inv1", "old_email": "old@example.id",
            "new_email": "siti@example.id",
        });
        d["event"] = json!(event);
        d
    }

    #[test]
    fn test_every_template_renders_in_both_languages() {
        let t = templates();
        for (event, _) in TEMPLATES {
            for lang in LOCALES {
                let r = t.render(event, lang, &sample(event)).unwrap();
                assert!(!r.subject.is_empty(), "{event} {lang} subject");
                assert!(!r.text.is_empty(), "{event} {lang} text");
                assert!(r.html.contains('<'), "{event} {lang} html");
                assert!(!r.telegram.is_empty(), "{event} {lang} telegram");
                assert!(
                    r.text.chars().count() <= 1600,
                    "{event} {lang}: an SMS is at most 1600 chars"
                );
                assert!(
                    r.telegram.chars().count() <= 4096,
                    "{event} {lang}: Telegram's limit"
                );
                // A value is escaped on the HTML sides and verbatim in text.
                assert!(!r.html.contains("<Admin>"), "{event} {lang} html escapes");
                assert!(
                    !r.telegram.contains("<Admin>"),
                    "{event} {lang} telegram escapes"
                );
            }
        }
    }

    #[test]
    fn test_snapshots() {
        let t = templates();
        let mut all = String::new();
        for (event, _) in TEMPLATES {
            for lang in LOCALES {
                let r = t.render(event, lang, &sample(event)).unwrap();
                all.push_str(&format!(
                    "==== {event} [{lang}]\n-- subject\n{}\n-- text\n{}\n-- html\n{}\n-- telegram\n{}\n",
                    r.subject, r.text, r.html, r.telegram
                ));
            }
        }
        insta::assert_snapshot!("messages", all);
    }

    #[test]
    fn test_amounts_and_dates() {
        let cal = BusinessCalendar::jakarta();
        assert_eq!(
            format_instant(&cal, AT, "id", true),
            "2 Desember 2026 14.05 WIB"
        );
        assert_eq!(
            format_instant(&cal, AT, "en", true),
            "2 December 2026 14:05 WIB"
        );
        assert_eq!(format_instant(&cal, AT, "id", false), "2 Desember 2026");
        let r = templates()
            .render("invoice.issued", "id", &sample("invoice.issued"))
            .unwrap();
        assert!(r.text.contains("Rp 276.390"), "{}", r.text);
    }

    #[test]
    fn test_telegram_escaping() {
        assert_eq!(
            telegram_html_escape("a<b>&\"c\""),
            "a&lt;b&gt;&amp;&quot;c&quot;"
        );
        assert_eq!(
            telegram_markdown_v2_escape("Rp 1.234.567 (PPN 11%) - _ok_!"),
            "Rp 1\\.234\\.567 \\(PPN 11%\\) \\- \\_ok\\_\\!"
        );
        assert_eq!(telegram_markdown_v2_escape("a\\b"), "a\\\\b");
    }
}
