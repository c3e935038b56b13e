//! The development mailbox: the `.eml` files the e-mail channel writes
//! when no SMTP server is configured, read back decoded
//! (`tiergate mail`), so a newcomer follows a verification link without a
//! mail client and a test reads what a customer would.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mailparse::{MailHeaderMap, ParsedMail};

/// One mail, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mail {
    /// Its file.
    pub path: PathBuf,
    /// `To`.
    pub to: String,
    /// `Subject`, decoded.
    pub subject: String,
    /// The text part, decoded.
    pub text: String,
    /// Names of its attachments.
    pub attachments: Vec<String>,
}

impl Mail {
    /// The first http(s) link of its text.
    pub fn link(&self) -> Option<&str> {
        let start = self
            .text
            .find("http://")
            .or_else(|| self.text.find("https://"))?;
        let rest = &self.text[start..];
        let end = rest
            .find(|c: char| c.is_whitespace() || matches!(c, '>' | ')' | '"' | '<'))
            .unwrap_or(rest.len());
        Some(&rest[..end])
    }
}

/// What to look for.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// The address it went to (case-insensitive).
    pub to: Option<String>,
    /// Text in its subject (case-insensitive).
    pub subject: Option<String>,
}

impl Filter {
    fn matches(&self, m: &Mail) -> bool {
        let has = |hay: &str, needle: &Option<String>| {
            needle
                .as_ref()
                .is_none_or(|n| hay.to_lowercase().contains(&n.to_lowercase()))
        };
        has(&m.to, &self.to) && has(&m.subject, &self.subject)
    }
}

/// Reads one `.eml` file.
pub fn read(path: &Path) -> Result<Mail, String> {
    let raw = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let parsed = mailparse::parse_mail(&raw)
        .map_err(|e| format!("{} is not a mail: {e}", path.display()))?;
    let header = |name: &str| parsed.headers.get_first_value(name).unwrap_or_default();
    let mut text = None;
    let mut attachments = Vec::new();
    walk(&parsed, &mut text, &mut attachments)?;
    Ok(Mail {
        path: path.to_owned(),
        to: header("To"),
        subject: header("Subject"),
        text: text.unwrap_or_default(),
        attachments,
    })
}

fn walk(
    part: &ParsedMail<'_>,
    text: &mut Option<String>,
    attachments: &mut Vec<String>,
) -> Result<(), String> {
    let disposition = part.get_content_disposition();
    if let Some(name) = disposition.params.get("filename") {
        attachments.push(name.clone());
    } else if part.subparts.is_empty() {
        if text.is_none() && part.ctype.mimetype == "text/plain" {
            *text = Some(
                part.get_body()
                    .map_err(|e| format!("undecodable text: {e}"))?,
            );
        }
    } else {
        for sub in &part.subparts {
            walk(sub, text, attachments)?;
        }
    }
    Ok(())
}

/// The `.eml` files of `dir`, oldest first (file names are UUIDv7: they
/// sort by time); none when it does not exist yet.
fn files(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("cannot read {}: {e}", dir.display())),
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "eml"))
        .collect();
    files.sort();
    Ok(files)
}

/// The newest mail in `dir` that `filter` matches.
pub fn newest(dir: &Path, filter: &Filter) -> Result<Option<Mail>, String> {
    for path in files(dir)?.iter().rev() {
        let mail = read(path)?;
        if filter.matches(&mail) {
            return Ok(Some(mail));
        }
    }
    Ok(None)
}

/// Every mail in `dir` that `filter` matches, oldest first.
pub fn all(dir: &Path, filter: &Filter) -> Result<Vec<Mail>, String> {
    let mut out = Vec::new();
    for path in files(dir)? {
        let mail = read(&path)?;
        if filter.matches(&mail) {
            out.push(mail);
        }
    }
    Ok(out)
}

/// [`newest`], waiting up to `wait` for one to be written.
pub fn wait_for(dir: &Path, filter: &Filter, wait: Duration) -> Result<Option<Mail>, String> {
    let deadline = Instant::now() + wait;
    loop {
        if let Some(m) = newest(dir, filter)? {
            return Ok(Some(m));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, to: &str, subject: &str, body: &str) {
        use lettre::message::{header::ContentType, Attachment, MultiPart, SinglePart};
        let m = lettre::Message::builder()
            .from("tiergate <no-reply@tiergate.local>".parse().unwrap())
            .to(to.parse().unwrap())
            .subject(subject)
            .multipart(
                MultiPart::mixed()
                    .multipart(
                        MultiPart::alternative()
                            .singlepart(SinglePart::plain(body.to_owned()))
                            .singlepart(SinglePart::html(format!("<p>{body}</p>"))),
                    )
                    .singlepart(Attachment::new("INV-1.pdf".to_owned()).body(
                        b"%PDF-1.7".to_vec(),
                        ContentType::parse("application/pdf").unwrap(),
                    )),
            )
            .unwrap();
        std::fs::write(dir.join(name), m.formatted()).unwrap();
    }

    #[test]
    fn test_mails_are_read_back_decoded_newest_first() {
        let dir = std::env::temp_dir().join(format!("tg-mailbox-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let long = "a".repeat(120);
        write(&dir, "01-a.eml", "ann@example.com", "Verifikasi alamat e-mail Anda",
            &format!("Buka http://localhost:8000/verify-email?token={long} untuk memverifikasi. Terima kasih — é"));
        write(
            &dir,
            "02-b.eml",
            "budi@example.com",
            "Tagihan INV/2026/12/000001: Rp 276.390",
            "Lihat lampiran.",
        );
        let newest_any = newest(&dir, &Filter::default()).unwrap().unwrap();
        assert_eq!(newest_any.subject, "Tagihan INV/2026/12/000001: Rp 276.390");
        assert_eq!(newest_any.attachments, vec!["INV-1.pdf".to_owned()]);
        let ann = Filter {
            to: Some("ANN@example.com".into()),
            subject: None,
        };
        let m = wait_for(&dir, &ann, Duration::ZERO).unwrap().unwrap();
        assert_eq!(m.subject, "Verifikasi alamat e-mail Anda");
        assert!(m.text.ends_with("Terima kasih — é"), "{}", m.text);
        // The long link survives quoted-printable's soft line breaks.
        assert_eq!(
            m.link(),
            Some(format!("http://localhost:8000/verify-email?token={long}").as_str())
        );
        assert_eq!(all(&dir, &Filter::default()).unwrap().len(), 2);
        assert_eq!(
            all(&dir, &ann).unwrap()[0].subject,
            "Verifikasi alamat e-mail Anda"
        );
        let none = Filter {
            to: None,
            subject: Some("nothing like it".into()),
        };
        assert_eq!(newest(&dir, &none).unwrap(), None);
        assert_eq!(newest(&dir.join("missing"), &none).unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
