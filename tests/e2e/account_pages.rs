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
        // Its `usage` block needs the gateway's key (nothing listens at the
        // usage endpoint here: the batches wait in the backlog).
        &crate::platform::gateway_key_env(),
    )
}

/// The users service behind the shipped gateway, its links pointing at
/// the gateway, its events in an inbox.
struct Site {
    world: World,
    inbox: Inbox,
    users: crate::platform::Running,
    gateway: TestGateway,
    /// The gateway's `http://127.0.0.1:PORT`.
    origin: String,
}

async fn site() -> Site {
    let world = World::new(Database::sqlite());
    let inbox = Inbox::start().await;
    // users first (the gateway checks its health), its links pointing at
    // the gateway about to start.
    let gw_port = free_port();
    let origin = format!("http://127.0.0.1:{gw_port}");
    let mut s = users_settings(&world, inbox.subscribers("notifications")).await;
    s.shared.public_url = origin.clone();
    let users = world.start::<users::UsersService>(s);
    let gateway = shipped_gateway(gw_port, users.addr());
    Site {
        world,
        inbox,
        users,
        gateway,
        origin,
    }
}

/// The link in the newest `kind` event to `email` (its `data.<field>`),
/// which must start with `prefix`.
async fn link_in(inbox: &Inbox, kind: &str, email: &str, field: &str, prefix: &str) -> String {
    let event = inbox.wait_for(kind, "email", email).await;
    let link = event["data"][field].as_str().unwrap().to_owned();
    assert!(
        link.starts_with(prefix),
        "{link} does not start with {prefix}"
    );
    link
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
    let Site {
        world: _world,
        inbox,
        users,
        gateway: _gw,
        origin,
    } = site().await;

    let email = "browser@example.com";
    let (status, body) = post(
        &origin,
        "/api/auth/register",
        json!({"email": email, "password": PASSWORD, "name": "Bea"}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let link = link_in(
        &inbox,
        "user.registered",
        email,
        "verification_url",
        &format!("{origin}/verify-email?token="),
    )
    .await;

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
    let reset_link = link_in(
        &inbox,
        "user.password_reset_requested",
        email,
        "reset_url",
        &format!("{origin}/reset-password?token="),
    )
    .await;
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

/// The invitation link: the page shows the offer, logs the invited person
/// in and joins them; another invitation is declined without an account.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_invitation_links_work_in_a_browser() {
    let Site {
        world: _world,
        inbox,
        users,
        gateway: _gw,
        origin,
    } = site().await;
    let direct = users.base.clone();
    let owner = crate::users::signed_up(&direct, &inbox, "owner@example.com").await;
    crate::users::signed_up(&direct, &inbox, "bea@example.com").await;
    let owner_token = owner["access_token"].as_str().unwrap();
    let (status, org) = crate::platform::as_user(
        reqwest::Method::POST,
        &direct,
        "/api/orgs",
        owner_token,
        Some(json!({"name": "Warung Bea"})),
    )
    .await;
    assert_eq!(status, 201, "{org}");
    let org_id = org["id"].as_str().unwrap();
    let invite = |email: &'static str| {
        let (direct, token) = (direct.clone(), owner_token.to_owned());
        let path = format!("/api/orgs/{org_id}/invitations");
        async move {
            let (status, body) = crate::platform::as_user(
                reqwest::Method::POST,
                &direct,
                &path,
                &token,
                Some(json!({"email": email})),
            )
            .await;
            assert_eq!(status, 201, "{body}");
        }
    };
    invite("bea@example.com").await;
    let link = link_in(
        &inbox,
        "organization.invitation_created",
        "bea@example.com",
        "accept_url",
        &format!("{origin}/accept-invitation?token="),
    )
    .await;

    let browser = Browser::launch().await;
    let page = browser.open(&link).await;
    wait_until(&page, "document.body.dataset.ready === 'yes'").await;
    let offer = page
        .eval("document.getElementById('offer').textContent")
        .await
        .unwrap();
    assert!(
        offer.as_str().unwrap().contains("Warung Bea")
            && offer.as_str().unwrap().contains("bea@example.com"),
        "{offer}"
    );
    assert_eq!(page.eval("location.search").await.unwrap(), "");
    // A wrong password: said on the page, nothing joined.
    page.eval(
        "document.getElementById('password').value = 'wrong password 1'; \
         document.getElementById('form').requestSubmit(); true",
    )
    .await
    .unwrap();
    wait_until(
        &page,
        "document.getElementById('status').textContent.includes('wrong')",
    )
    .await;
    page.eval(&format!(
        "document.getElementById('password').value = {PASSWORD:?}; \
         document.getElementById('form').requestSubmit(); true"
    ))
    .await
    .unwrap();
    wait_until(&page, "document.body.dataset.result === 'accepted'").await;
    let csp = header(
        &page.document_response().unwrap(),
        "content-security-policy",
    );
    assert!(csp.contains("script-src 'sha256-"), "{csp}");
    same_origin_only(&page, &origin);
    // The login here produced problems only for the expected 401.
    let problems: Vec<String> = page
        .problems()
        .into_iter()
        .filter(|p| !p.contains("401"))
        .collect();
    assert!(problems.is_empty(), "{problems:#?}");
    let (_, bea) = post(
        &direct,
        "/api/auth/login",
        json!({"email": "bea@example.com", "password": PASSWORD}),
    )
    .await;
    let (status, members) = crate::platform::as_user(
        reqwest::Method::GET,
        &direct,
        &format!("/api/orgs/{org_id}/members"),
        bea["access_token"].as_str().unwrap(),
        None,
    )
    .await;
    assert_eq!(status, 200, "{members}");
    assert_eq!(members.as_array().unwrap().len(), 2);

    // Declined by someone without an account.
    invite("zed@example.com").await;
    let link = link_in(
        &inbox,
        "organization.invitation_created",
        "zed@example.com",
        "accept_url",
        &format!("{origin}/accept-invitation?token="),
    )
    .await;
    let page = browser.open(&link).await;
    wait_until(&page, "document.body.dataset.ready === 'yes'").await;
    page.eval("document.getElementById('decline').click(); true")
        .await
        .unwrap();
    wait_until(&page, "document.body.dataset.result === 'declined'").await;
    // The used link now says so.
    let again = browser.open(&link).await;
    wait_until(&again, "document.body.dataset.result === 'failed'").await;
    users.stop().await;
}
