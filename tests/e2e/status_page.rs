//! The operator status page on the admin listener, in a real headless
//! Chromium: it renders the gateway's live state, follows it without a
//! reload, logs nothing and loads nothing from anywhere else.

use std::net::SocketAddr;
use std::time::Duration;

use crate::browser::{Browser, Page};
use crate::common::{client, gateway, KillableUpstream};

/// How long the page may take to show a change (it polls every 2 s).
const WAIT: Duration = Duration::from_secs(10);

/// JavaScript for the backend row of `addr` in pool `svc`.
fn backend_row(addr: SocketAddr) -> String {
    format!("document.querySelector('tr[data-pool=\"svc\"][data-backend=\"{addr}\"]')")
}

/// JavaScript for that row's `data-health`.
fn health(addr: SocketAddr) -> String {
    format!("{}?.dataset.health", backend_row(addr))
}

/// What the page shows, for failure messages.
async fn dump(page: &Page) -> String {
    let state = page
        .eval(
            "JSON.stringify({status: document.body.dataset.status, polls: document.body.dataset.polls, \
             banner: document.getElementById('banner')?.textContent, text: document.body.innerText})",
        )
        .await;
    format!(
        "page: {}\nproblems: {:#?}",
        match state {
            Ok(v) => v.as_str().unwrap_or_default().to_owned(),
            Err(e) => e,
        },
        page.problems()
    )
}

/// Waits for `js` to be true, failing the test with what the page shows.
async fn wait_until(page: &Page, js: &str) {
    if let Err(e) = page.wait_for(js, WAIT).await {
        panic!("{e}\n{}", dump(page).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_status_page_shows_live_state_and_follows_a_backend_going_down() {
    let mut a = KillableUpstream::start("a").await;
    let b = KillableUpstream::start("b").await;
    let gw = gateway(&format!(
        "upstreams:\n  svc:\n    backends: [{{address: \"{}\"}}, {{address: \"{}\"}}]\n    health_check: {{path: /health, interval: 200ms, timeout: 100ms, healthy_threshold: 1, unhealthy_threshold: 1}}\nroutes:\n  - {{name: api, match: {{path: {{prefix: /}}}}, upstream: svc}}\n",
        a.addr, b.addr
    ));
    let c = client();
    for i in 0..20 {
        let r = c.get(gw.url(&format!("/items/{i}"))).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }

    let browser = Browser::launch().await;
    let page = browser.open(&gw.admin_url("/")).await;
    let doc = page.document_response().expect("no response for the page");
    assert_eq!(doc["status"], 200, "GET / on the admin listener: {doc:#}");
    let header = |name: &str| crate::browser::header_of(&doc, name);
    assert!(header("content-type").starts_with("text/html"), "{doc:#}");
    assert!(
        header("content-security-policy").contains("default-src 'none'"),
        "the page is served under a strict CSP: {doc:#}"
    );

    // The first poll shows both backends healthy and the requests so far.
    wait_until(
        &page,
        &format!(
            "Number(document.body.dataset.polls) >= 1 && {} === 'healthy' && {} === 'healthy'",
            health(a.addr),
            health(b.addr)
        ),
    )
    .await;
    wait_until(
        &page,
        "Number(document.querySelector('tr[data-route=\"api\"] .requests-total')?.textContent) >= 20",
    )
    .await;
    wait_until(&page, "document.body.dataset.status === 'ok'").await;
    wait_until(
        &page,
        "document.getElementById('redis')?.textContent.includes('not configured')",
    )
    .await;
    let polls_before = page
        .eval("Number(document.body.dataset.polls)")
        .await
        .unwrap();
    // Gone if the page reloads itself.
    page.eval("window.sameDocument = true").await.unwrap();

    // Killed: the same page marks it unhealthy and the gateway degraded.
    a.kill().await;
    wait_until(
        &page,
        &format!(
            "{} === 'unhealthy' && document.body.dataset.status === 'degraded'",
            health(a.addr)
        ),
    )
    .await;
    let state = page
        .eval(&format!(
            "({{b: {}, sameDocument: window.sameDocument === true, polls: Number(document.body.dataset.polls), \
              error: {}?.querySelector('.err')?.textContent}})",
            health(b.addr),
            backend_row(a.addr)
        ))
        .await
        .unwrap();
    assert_eq!(state["b"], "healthy", "{state}\n{}", dump(&page).await);
    assert_eq!(state["sameDocument"], true, "the page reloaded: {state}");
    assert!(
        state["polls"].as_u64() > polls_before.as_u64(),
        "{state}, before: {polls_before}"
    );
    let error = state["error"].as_str().unwrap_or_default();
    assert!(
        !error.is_empty() && error != "–",
        "the failed check's error is shown: {state}"
    );

    // Each route and tier row draws its recent request and error rates
    // (an inline SVG, once two polls have rates).
    wait_until(
        &page,
        "document.querySelectorAll('#routes td.trend svg.spark polyline').length > 0 && \
         document.querySelectorAll('#tiers td.trend svg.spark polyline').length > 0",
    )
    .await;
    let feed = page
        .eval("document.getElementById('tier-feed').textContent")
        .await
        .unwrap();
    assert_eq!(feed, "Tier changes: off (tokens' own tiers)", "{feed}");

    // Nothing logged or thrown, nothing loaded from elsewhere.
    let problems = page.problems();
    assert!(problems.is_empty(), "the page logged: {problems:#?}");
    let origin = format!("http://{}/", gw.admin);
    let urls = page.requested_urls();
    let foreign: Vec<&String> = urls
        .iter()
        .filter(|u| !u.starts_with(&origin) && !u.starts_with("data:"))
        .collect();
    assert!(
        foreign.is_empty(),
        "requests off the admin origin {origin}: {foreign:#?}"
    );
    let polled = urls
        .iter()
        .filter(|u| **u == format!("{origin}api/status"))
        .count();
    assert!(polled >= 2, "the page polls /api/status: {urls:#?}");
}
