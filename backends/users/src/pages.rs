//! The pages the links in e-mails open: `GET /verify-email?token=…`,
//! `GET /reset-password?token=…` and `GET /accept-invitation?token=…`,
//! routed through the gateway at the public URL. Each is one small self-contained HTML file (inline style
//! and script, no external resource) that calls the API the link is for,
//! so a person clicking the link sees what happened instead of a JSON
//! error. The Content-Security-Policy allows exactly that page's own
//! script (by its SHA-256) and requests to this origin only.

use std::sync::LazyLock;

use actix_web::{web, HttpResponse};
use base64::Engine as _;
use sha2::Digest as _;

const VERIFY_PAGE: &str = include_str!("pages/verify-email.html");
const RESET_PAGE: &str = include_str!("pages/reset-password.html");
const INVITATION_PAGE: &str = include_str!("pages/accept-invitation.html");

/// A page and its CSP.
struct Page {
    html: &'static str,
    csp: String,
}

impl Page {
    fn new(html: &'static str) -> Self {
        // Each page has one inline <script>; its hash is the only script
        // the browser will run.
        let script = html
            .split_once("<script>")
            .and_then(|(_, rest)| rest.split_once("</script>"))
            .map_or("", |(s, _)| s);
        let hash = base64::engine::general_purpose::STANDARD
            .encode(sha2::Sha256::digest(script.as_bytes()));
        Self {
            html,
            csp: format!(
                "default-src 'none'; script-src 'sha256-{hash}'; style-src 'unsafe-inline'; \
                 connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
            ),
        }
    }

    fn respond(&self) -> HttpResponse {
        HttpResponse::Ok()
            .content_type("text/html; charset=utf-8")
            .insert_header(("Content-Security-Policy", self.csp.as_str()))
            .insert_header(("X-Content-Type-Options", "nosniff"))
            .insert_header(("Referrer-Policy", "no-referrer"))
            .insert_header(("Cache-Control", "no-store"))
            .body(self.html)
    }
}

static VERIFY: LazyLock<Page> = LazyLock::new(|| Page::new(VERIFY_PAGE));
static RESET: LazyLock<Page> = LazyLock::new(|| Page::new(RESET_PAGE));
static INVITATION: LazyLock<Page> = LazyLock::new(|| Page::new(INVITATION_PAGE));

/// Registers the pages.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route(
        "/verify-email",
        web::get().to(|| async { VERIFY.respond() }),
    )
    .route(
        "/reset-password",
        web::get().to(|| async { RESET.respond() }),
    )
    .route(
        "/accept-invitation",
        web::get().to(|| async { INVITATION.respond() }),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_each_page_allows_only_its_own_script() {
        for html in [VERIFY_PAGE, RESET_PAGE, INVITATION_PAGE] {
            assert_eq!(html.matches("<script>").count(), 1, "one inline script");
            let page = Page::new(html);
            assert!(page.csp.contains("script-src 'sha256-"), "{}", page.csp);
            assert!(
                !page.csp.contains("script-src 'unsafe-inline'"),
                "{}",
                page.csp
            );
        }
        assert_ne!(Page::new(VERIFY_PAGE).csp, Page::new(RESET_PAGE).csp);
    }
}
