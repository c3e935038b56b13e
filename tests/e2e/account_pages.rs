//! The links in the users service's e-mails, opened in a real headless
//! Chromium through the gateway with the shipped routes
//! (`conf/tiergate.yaml`): the verification page verifies, the reset page
//! sets a new password; each link works once, keeps its token out of the
//! address bar and loads nothing from anywhere else.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;

use crate::browser::{header_of as header, Browser, Page};
use crate::common::{free_port, gateway_on, TestGateway};
use crate::platform::{post, Database, Inbox, World};
use crate::users::{settings as users_settings, PASSWORD};

const WAIT: Duration = Duration::from_secs(10);

/// The shipped gateway config's upstreams, auth, limits and routes on
/// `port`, with the users service at `users`.
fn shipped_gateway(port: u16, users: SocketAddr) -> TestGateway {
    let shipped = include_str!("../../conf/tiergate.yaml");
    let body = &shipped[shipped.find("\nupstreams:").unwrap()..];
    gateway_on(
        port,
        "",
        &body.replace("127.0.0.1:8021", &users.to_string()),
        &gateway::secret::Environment::default(),
    )
}

async fn wait_until(page: &Page, js: &str) {
    if let Err(e) = page.wait_for(js, WAIT).await {
        let text = page.eval("document.body.innerText").await;
        panic!("{e}\npage: {text:?}\nproblems: {:#?}", page.problems());
    }
}

/// Every request `page` made went to `origin`.
fn same_origin_only(page: &Page, origin: &str) {
    for url in page.requested_urls() {
        assert!(url.starts_with(origin), "{url} is not {origin}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_verification_and_reset_links_work_in_a_browser() {
    let world = World::new(Database::sqlite());
    let inbox = Inbox::start().await;
    // users first (the gateway checks its health), its links pointing at
    // the gateway about to start.
    let gw_port = free_port();
    let origin = format!("http://127.0.0.1:{gw_port}");
    let mut s = users_settings(&world, inbox.subscribers("notifications")).await;
    s.shared.public_url = origin.clone();
    let users = world.start::<users::UsersService>(s);
    let _gw = shipped_gateway(gw_port, users.addr());

    let email = "browser@example.com";
    let (status, body) = post(
        &origin,
        "/api/auth/register",
        json!({"email": email, "password": PASSWORD, "name": "Bea"}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let link = inbox.wait_for("user.registered", "email", email).await["data"]["verification_url"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        link.starts_with(&format!("{origin}/verify-email?token=")),
        "{link}"
    );

    let browser = Browser::launch().await;
    let page = browser.open(&link).await;
    wait_until(&page, "document.body.dataset.result === 'verified'").await;
    let doc = page.document_response().expect("no response for the page");
    assert_eq!(doc["status"], 200);
    assert!(header(&doc, "content-type").starts_with("text/html"));
    let csp = header(&doc, "content-security-policy");
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'sha256-"),
        "{csp}"
    );
    assert_eq!(header(&doc, "referrer-policy"), "no-referrer");
    assert_eq!(
        page.eval("location.search").await.unwrap(),
        "",
        "the token left the address bar"
    );
    assert!(page.problems().is_empty(), "{:#?}", page.problems());
    same_origin_only(&page, &origin);
    let (status, _) = post(
        &origin,
        "/api/auth/login",
        json!({"email": email, "password": PASSWORD}),
    )
    .await;
    assert_eq!(status, 200, "verified: the login works");

    // The same link again: it says it did not work.
    let again = browser.open(&link).await;
    wait_until(&again, "document.body.dataset.result === 'failed'").await;
    let text = again.eval("document.body.innerText").await.unwrap();
    assert!(text.as_str().unwrap().contains("did not work"), "{text}");
    // A link without its token.
    let bare = browser.open(&format!("{origin}/verify-email")).await;
    wait_until(&bare, "document.body.dataset.result === 'failed'").await;

    // Password reset: the form, a mismatch caught in the page, then the
    // new password set.
    let (status, _) = post(
        &origin,
        "/api/auth/password/forgot",
        json!({"email": email}),
    )
    .await;
    assert_eq!(status, 202);
    let reset_link = inbox
        .wait_for("user.password_reset_requested", "email", email)
        .await["data"]["reset_url"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        reset_link.starts_with(&format!("{origin}/reset-password?token=")),
        "{reset_link}"
    );
    let reset = browser.open(&reset_link).await;
    wait_until(&reset, "!!document.getElementById('form')").await;
    let fill = |password: &str, confirm: &str| {
        format!(
            "document.getElementById('password').value = {password:?}; \
             document.getElementById('confirm').value = {confirm:?}; \
             document.getElementById('form').requestSubmit(); true"
        )
    };
    reset
        .eval(&fill("new password 2026", "new password 2027"))
        .await
        .unwrap();
    wait_until(
        &reset,
        "document.getElementById('status').textContent.includes('differ')",
    )
    .await;
    reset
        .eval(&fill("new password 2026", "new password 2026"))
        .await
        .unwrap();
    wait_until(&reset, "document.body.dataset.result === 'reset'").await;
    assert!(reset.problems().is_empty(), "{:#?}", reset.problems());
    same_origin_only(&reset, &origin);
    let login = |password: &'static str| {
        let origin = origin.clone();
        async move {
            post(
                &origin,
                "/api/auth/login",
                json!({"email": email, "password": password}),
            )
            .await
            .0
        }
    };
    assert_eq!(login("new password 2026").await, 200);
    assert_eq!(login(PASSWORD).await, 401);
    // The reset link is single-use: the page says so and hides the form.
    let used = browser.open(&reset_link).await;
    used.eval(&fill("another pass 99", "another pass 99"))
        .await
        .unwrap();
    wait_until(&used, "document.body.dataset.result === 'failed'").await;
    assert_eq!(login("another pass 99").await, 401);
    users.stop().await;
}
