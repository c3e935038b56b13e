//! E-mail through lettre: multipart (text + HTML), attachments, over SMTP
//! (plain, STARTTLS or TLS, with auth, per `TIERGATE_SMTP_URL`), or, with
//! no SMTP server configured, as an `.eml` file per message under the mail
//! directory (development: the verification link of `tiergate up` comes
//! from a real rendered mail).
//!
//! Each message's `Message-ID` is its job's id, and a file-sink message is
//! named after it and written atomically (a temporary file renamed), so a
//! job sent again after a crash replaces its file instead of adding one.

use std::path::PathBuf;
use std::time::Duration;

use lettre::message::header::{ContentTransferEncoding, ContentType};
use lettre::message::{Attachment, Body, Mailbox, MultiPart, SinglePart};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use crate::templates::Rendered;

/// A file attached to a mail.
#[derive(Debug, Clone)]
pub struct File {
    /// Its name (`INV-2026-12-000123.pdf`).
    pub name: String,
    /// Its MIME type.
    pub content_type: String,
    /// Its bytes.
    pub bytes: Vec<u8>,
}

/// Why a mail was not sent.
#[derive(Debug, thiserror::Error)]
pub enum MailError {
    /// The server refused for good (5xx) or the address is malformed: do
    /// not retry.
    #[error("{0}")]
    Permanent(String),
    /// The server or the network failed for now (4xx, a timeout, a refused
    /// connection): retry.
    #[error("{0}")]
    Transient(String),
}

enum Transport {
    /// Always `Some` until dropped: lettre's connection pool spawns a
    /// closing task when dropped, which panics outside a Tokio runtime (a
    /// service's runtime may be gone when its last handle drops at exit).
    /// See `Drop for Mailer`.
    Smtp(Option<AsyncSmtpTransport<Tokio1Executor>>),
    Files(PathBuf),
}

impl Drop for Mailer {
    fn drop(&mut self) {
        if let Transport::Smtp(transport) = &mut self.transport {
            if tokio::runtime::Handle::try_current().is_err() {
                // Outside a runtime the pooled connections are left to the
                // OS (the process or its runtime is ending).
                std::mem::forget(transport.take());
            }
        }
    }
}

/// Sends mail.
pub struct Mailer {
    from: Mailbox,
    transport: Transport,
}

impl std::fmt::Debug for Mailer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.transport {
            Transport::Smtp(_) => "Mailer(smtp)",
            Transport::Files(_) => "Mailer(files)",
        })
    }
}

/// The HTML part: the template's body in a plain, mail-client-safe shell.
fn html_document(subject_escaped: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{subject_escaped}</title></head>\
         <body style=\"font-family:Arial,Helvetica,sans-serif;font-size:15px;line-height:1.5;color:#1f2933;max-width:560px;margin:0 auto;padding:16px\">\n\
         {body}\n<p style=\"color:#7b8794;font-size:12px;margin-top:32px\">tiergate</p></body></html>\n"
    )
}

/// A text part sent as `8bit` (UTF-8 as is: links stay whole and
/// readable in the `.eml` and in the raw mail; every SMTP server we meet
/// takes 8BITMIME), or in the best 7-bit encoding when a line is too long
/// for 8bit (over 998 bytes).
fn text_part(content_type: ContentType, text: String) -> SinglePart {
    match Body::new_with_encoding(text, ContentTransferEncoding::EightBit) {
        Ok(body) => SinglePart::builder().header(content_type).body(body),
        Err(raw) => SinglePart::builder()
            .header(content_type)
            .body(String::from_utf8_lossy(&raw).into_owned()),
    }
}

impl Mailer {
    /// Over SMTP at `url` (a lettre URL), with `timeout` per message.
    pub fn smtp(from: &str, url: &str, timeout: Duration) -> Result<Self, String> {
        let from: Mailbox = from.parse().map_err(|e| format!("email.from: {e}"))?;
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
            .map_err(|e| format!("TIERGATE_SMTP_URL: {e}"))?
            .timeout(Some(timeout))
            .build();
        Ok(Self {
            from,
            transport: Transport::Smtp(Some(transport)),
        })
    }

    /// Into `.eml` files under `dir` (created).
    pub fn files(from: &str, dir: PathBuf) -> Result<Self, String> {
        let from: Mailbox = from.parse().map_err(|e| format!("email.from: {e}"))?;
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create the mail directory {}: {e}", dir.display()))?;
        Ok(Self {
            from,
            transport: Transport::Files(dir),
        })
    }

    /// Where mails go, for the log and `/health`.
    pub fn describe(&self) -> String {
        match &self.transport {
            Transport::Smtp(_) => "smtp".to_owned(),
            Transport::Files(dir) => format!("files in {}", dir.display()),
        }
    }

    /// Builds the message of job `id` to `to`.
    pub fn build(
        &self,
        id: &str,
        to: &str,
        message: &Rendered,
        files: &[File],
    ) -> Result<Message, MailError> {
        let to: Mailbox = to
            .parse()
            .map_err(|e| MailError::Permanent(format!("not a mail address ({e})")))?;
        let domain = self.from.email.domain().to_owned();
        let subject_escaped = crate::templates::telegram_html_escape(&message.subject);
        let alternative = MultiPart::alternative()
            .singlepart(text_part(ContentType::TEXT_PLAIN, message.text.clone()))
            .singlepart(text_part(
                ContentType::TEXT_HTML,
                html_document(&subject_escaped, &message.html),
            ));
        let body = if files.is_empty() {
            alternative
        } else {
            let mut mixed = MultiPart::mixed().multipart(alternative);
            for f in files {
                let ct = ContentType::parse(&f.content_type)
                    .map_err(|e| MailError::Permanent(format!("attachment type: {e}")))?;
                mixed = mixed.singlepart(Attachment::new(f.name.clone()).body(f.bytes.clone(), ct));
            }
            mixed
        };
        Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(message.subject.clone())
            .message_id(Some(format!("<{id}@{domain}>")))
            .multipart(body)
            .map_err(|e| MailError::Permanent(format!("cannot build the mail: {e}")))
    }

    /// Sends `mail` (job `id`). Returns the `Message-ID`, or the file it
    /// was written to.
    pub async fn send(&self, id: &str, mail: Message) -> Result<String, MailError> {
        match &self.transport {
            Transport::Smtp(t) => {
                let Some(t) = t else {
                    return Err(MailError::Transient("the mailer is closing".to_owned()));
                };
                t.send(mail).await.map_err(|e| {
                    if e.is_permanent() {
                        MailError::Permanent(format!("the SMTP server refused: {e}"))
                    } else {
                        MailError::Transient(format!("SMTP: {e}"))
                    }
                })?;
                Ok(id.to_owned())
            }
            Transport::Files(dir) => {
                let bytes = mail.formatted();
                let path = dir.join(format!("{id}.eml"));
                let tmp = dir.join(format!(".{id}.eml.tmp"));
                let written = tokio::fs::write(&tmp, &bytes).await;
                let renamed = match written {
                    Ok(()) => tokio::fs::rename(&tmp, &path).await,
                    Err(e) => Err(e),
                };
                renamed.map_err(|e| {
                    MailError::Transient(format!("cannot write {}: {e}", path.display()))
                })?;
                tracing::info!(path = %path.display(), "development: mail written (no SMTP server configured)");
                Ok(path.display().to_string())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rendered() -> Rendered {
        Rendered {
            subject: "Tagihan INV/2026/12/000001: Rp 276.390".into(),
            text: "Halo Siti,\nTotal: Rp 276.390".into(),
            html: "<p>Halo Siti &amp; Co</p>".into(),
            telegram: String::new(),
        }
    }

    #[test]
    fn test_a_mail_is_multipart_with_its_attachment() {
        let m = Mailer::files(
            "tiergate <no-reply@tiergate.example>",
            std::env::temp_dir().join("tg-mail-unit"),
        )
        .unwrap();
        let pdf = File {
            name: "INV-2026-12-000001.pdf".into(),
            content_type: "application/pdf".into(),
            bytes: b"%PDF-1.7 test".to_vec(),
        };
        let mail = m
            .build("job-1", "siti@example.id", &rendered(), &[pdf])
            .unwrap();
        let raw = String::from_utf8(mail.formatted()).unwrap();
        assert!(
            raw.contains("Message-ID: <job-1@tiergate.example>"),
            "{raw}"
        );
        assert!(raw.contains("multipart/mixed") && raw.contains("multipart/alternative"));
        assert!(raw.contains("text/plain") && raw.contains("text/html"));
        assert!(raw.contains("application/pdf") && raw.contains("INV-2026-12-000001.pdf"));
        assert!(raw.contains("To: siti@example.id"));
        assert!(
            raw.contains("Content-Transfer-Encoding: 8bit") && raw.contains("Total: Rp 276.390"),
            "{raw}"
        );
    }

    #[test]
    fn test_a_bad_address_is_permanent() {
        let m = Mailer::files(
            "no-reply@tiergate.example",
            std::env::temp_dir().join("tg-mail-unit"),
        )
        .unwrap();
        assert!(matches!(
            m.build("j", "not an address", &rendered(), &[]),
            Err(MailError::Permanent(_))
        ));
    }
}
