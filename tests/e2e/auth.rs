//! JWT auth and tier/role access: real JWKS server, real tokens (RS256,
//! EdDSA, dev HS256), every attack a 401.

use std::sync::atomic::Ordering;
use std::time::Duration;

use gateway::secret::Environment;
use serde_json::{json, Value};

use crate::common::{client, gateway_with_env, upstream, TestGateway, Upstream};
use crate::tokens::{self, auth_yaml, claims, eddsa, hs256, jwks_server, rs256, JwksServer};

fn routes(up: &Upstream) -> String {
    format!(
        "upstreams:\n  svc: {{ backends: [{{ address: \"{}\" }}] }}\nroutes:\n\
  - {{ name: public, match: {{ path: {{ prefix: /public }} }}, upstream: svc, rate_limit: false }}\n\
  - {{ name: me, match: {{ path: {{ prefix: /api/me }} }}, upstream: svc, auth: required, rate_limit: false }}\n\
  - {{ name: opt, match: {{ path: {{ prefix: /opt }} }}, upstream: svc, auth: optional, rate_limit: false }}\n\
  - {{ name: reports, match: {{ path: {{ prefix: /api/reports }} }}, upstream: svc, auth: required, min_tier: BASIC, rate_limit: false }}\n\
  - {{ name: admin, match: {{ path: {{ prefix: /api/admin }} }}, upstream: svc, auth: required, roles: [admin], rate_limit: false }}\n",
        up.addr
    )
}

async fn setup(dev_secret: bool) -> (Upstream, JwksServer, TestGateway) {
    setup_with_keys(dev_secret, &["rsa-1", "ed-1"]).await
}

async fn setup_with_keys(dev_secret: bool, kids: &[&str]) -> (Upstream, JwksServer, TestGateway) {
    let up = upstream("svc").await;
    let jwks = jwks_server().await;
    jwks.serve_only(kids);
    let env = if dev_secret {
        tokens::dev_env(tokens::DEV_SECRET)
    } else {
        Environment::default()
    };
    let gw = gateway_with_env(&format!("{}{}", routes(&up), auth_yaml(&jwks)), &env);
    (up, jwks, gw)
}

async fn call(
    gw: &TestGateway,
    path: &str,
    token: Option<&str>,
    extra: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut req = client().get(gw.url(path));
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_rs256_eddsa_and_dev_hs256_tokens_carry_identity_upstream() {
    let (_up, _jwks, gw) = setup(true).await;
    let mut c = claims("user-42", "premium");
    c["roles"] = json!(["user", "admin"]);
    c["tenant"] = json!("acme");
    for token in [
        rs256(&c, "rsa-1"),
        eddsa(&c, "ed-1"),
        hs256(&c, tokens::DEV_SECRET.as_bytes()),
    ] {
        // Spoofed identity headers are replaced by the token's.
        let (status, _, body) = call(
            &gw,
            "/api/me",
            Some(&token),
            &[("x-user-tier", "ENTERPRISE"), ("x-user-id", "root")],
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let h = &body["headers"];
        assert_eq!(h["x-user-id"], "user-42");
        assert_eq!(
            h["x-user-tier"], "PREMIUM",
            "claim resolved to the tier's name"
        );
        assert_eq!(h["x-user-roles"], "user,admin");
        assert_eq!(h["x-user-tenant"], "acme");
    }
    // Without a token on a public or optional route: no identity at all,
    // whatever the client sends.
    for path in ["/public", "/opt"] {
        let (status, _, body) = call(
            &gw,
            path,
            None,
            &[
                ("x-user-tier", "PREMIUM"),
                ("x-user-id", "root"),
                ("x-user-roles", "admin"),
            ],
        )
        .await;
        assert_eq!(status, 200);
        let h = body["headers"].as_object().unwrap();
        for name in ["x-user-tier", "x-user-id", "x-user-roles"] {
            assert!(
                !h.contains_key(name),
                "{path}: spoofed {name} reached upstream"
            );
        }
    }
    // A missing tier claim is FREE.
    let mut no_tier = claims("user-7", "x");
    no_tier.as_object_mut().unwrap().remove("tier");
    let (_, _, body) = call(&gw, "/api/me", Some(&rs256(&no_tier, "rsa-1")), &[]).await;
    assert_eq!(body["headers"]["x-user-tier"], "FREE");
    let (_, _, body) = call(
        &gw,
        "/api/me",
        Some(&rs256(&claims("u", "GOLD"), "rsa-1")),
        &[],
    )
    .await;
    assert_eq!(
        body["headers"]["x-user-tier"], "FREE",
        "unknown tier is FREE"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_token_attacks_are_401_and_never_crash_the_gateway() {
    // No dev secret: HS256 must not be accepted by any means.
    let (_up, _jwks, gw) = setup(false).await;
    let good = claims("victim", "ENTERPRISE");
    let mut expired = good.clone();
    expired["exp"] = json!(tokens::now() - 3600);
    let mut not_yet = good.clone();
    not_yet["nbf"] = json!(tokens::now() + 3600);
    let mut wrong_iss = good.clone();
    wrong_iss["iss"] = json!("evil");
    let mut wrong_aud = good.clone();
    wrong_aud["aud"] = json!("someone-else");
    let valid = rs256(&good, "rsa-1");
    let mut tampered = valid.clone();
    tampered.insert_str(valid.find('.').unwrap() + 1, "eyJ0aWVyIjoiRU5URVJQUklTRSJ9");
    let attacks: Vec<(&str, String)> = vec![
        ("alg none", tokens::unsigned(&good)),
        (
            "HS256 signed with the RSA public key",
            hs256(&good, &tokens::rsa_public_pem()),
        ),
        ("HS256 with a guessed secret", hs256(&good, b"secret")),
        ("expired", rs256(&expired, "rsa-1")),
        ("not yet valid", eddsa(&not_yet, "ed-1")),
        ("wrong issuer", rs256(&wrong_iss, "rsa-1")),
        ("wrong audience", eddsa(&wrong_aud, "ed-1")),
        ("unknown kid", rs256(&good, "no-such-key")),
        ("EdDSA token naming the RSA key", eddsa(&good, "rsa-1")),
        ("tampered payload", tampered),
        ("bad base64", "@@@.###.$$$".to_owned()),
        ("not a JWT", "hello".to_owned()),
        ("7 KB token", "a".repeat(7 * 1024)),
    ];
    // Longer than a header line may be (8 KiB by default): refused before
    // any parsing.
    let (status, _, body) = call(&gw, "/api/me", Some(&"a".repeat(100 * 1024)), &[]).await;
    assert_eq!(status, 431, "100 KB token: {body}");
    assert_eq!(body["error"]["code"], "header_too_large");
    for (name, token) in &attacks {
        let (status, headers, body) = call(&gw, "/api/me", Some(token), &[]).await;
        assert_eq!(status, 401, "{name}: {body}");
        assert_eq!(body["error"]["code"], "invalid_token", "{name}");
        let challenge = headers["www-authenticate"].to_str().unwrap();
        assert!(
            challenge.contains("error=\"invalid_token\""),
            "{name}: {challenge}"
        );
        assert!(body["error"]["request_id"].is_string());
    }
    // No token at all: 401 with a plain challenge.
    let (status, headers, body) = call(&gw, "/api/me", None, &[]).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "missing_token");
    assert!(headers.contains_key("www-authenticate"));
    // Optional routes refuse a bad token rather than ignore it.
    let (status, _, _) = call(&gw, "/opt", Some("junk.junk.junk"), &[]).await;
    assert_eq!(status, 401);
    // And the gateway is still fine.
    let (status, _, _) = call(&gw, "/api/me", Some(&valid), &[]).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_min_tier_and_roles_give_403_not_401() {
    let (_up, _jwks, gw) = setup(false).await;
    let free = rs256(&claims("f", "FREE"), "rsa-1");
    let basic = rs256(&claims("b", "BASIC"), "rsa-1");
    let enterprise = eddsa(&claims("e", "ENTERPRISE"), "ed-1");
    let mut admin_claims = claims("a", "FREE");
    admin_claims["roles"] = json!(["user", "admin"]);
    let admin = rs256(&admin_claims, "rsa-1");

    let (status, _, body) = call(&gw, "/api/reports", Some(&free), &[]).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("insufficient_tier"))
    );
    assert_eq!(call(&gw, "/api/reports", Some(&basic), &[]).await.0, 200);
    assert_eq!(
        call(&gw, "/api/reports", Some(&enterprise), &[]).await.0,
        200
    );
    assert_eq!(call(&gw, "/api/reports", None, &[]).await.0, 401);

    let (status, _, body) = call(&gw, "/api/admin/users", Some(&enterprise), &[]).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("insufficient_role"))
    );
    assert_eq!(
        call(&gw, "/api/admin/users", Some(&admin), &[]).await.0,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_unknown_kid_refetch_is_rate_limited_and_a_dead_jwks_keeps_the_last_keys() {
    // Only the RSA key is published at first.
    let (_up, jwks, gw) = setup_with_keys(false, &["rsa-1"]).await;
    let rsa = rs256(&claims("r", "FREE"), "rsa-1");
    assert_eq!(call(&gw, "/api/me", Some(&rsa), &[]).await.0, 200);
    let ed = eddsa(&claims("e", "FREE"), "ed-1");
    let before = jwks.hits.load(Ordering::SeqCst);
    // A burst of unknown-kid tokens: all 401, at most one fetch for them.
    for _ in 0..20 {
        assert_eq!(call(&gw, "/api/me", Some(&ed), &[]).await.0, 401);
    }
    let fetched = jwks.hits.load(Ordering::SeqCst) - before;
    assert!(
        fetched <= 1,
        "20 unknown-kid requests caused {fetched} JWKS fetches"
    );

    // The key is published (rotation): after the refetch interval the next
    // request fetches the set and is admitted, without waiting for the
    // periodic refresh.
    jwks.serve_only(&["rsa-1", "ed-1"]);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, _, body) = call(&gw, "/api/me", Some(&ed), &[]).await;
    assert_eq!(status, 200, "{body}");

    // The JWKS endpoint dies: known keys keep verifying (new tokens too,
    // which are not in the verified-token cache).
    jwks.failing.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let fresh = rs256(&claims("new-user", "BASIC"), "rsa-1");
    assert_eq!(call(&gw, "/api/me", Some(&fresh), &[]).await.0, 200);
    let unknown = rs256(&claims("x", "BASIC"), "rsa-2");
    assert_eq!(call(&gw, "/api/me", Some(&unknown), &[]).await.0, 401);
    let fresh_ed = eddsa(&claims("new-ed", "BASIC"), "ed-1");
    assert_eq!(call(&gw, "/api/me", Some(&fresh_ed), &[]).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_client_sending_bad_tokens_is_throttled_before_verification() {
    let up = upstream("svc").await;
    let jwks = jwks_server().await;
    let body = format!(
        "{}{}rate_limit:\n  anonymous: {{ per_minute: 3 }}\n",
        routes(&up),
        auth_yaml(&jwks)
    );
    // 127.0.0.1 is trusted, so X-Forwarded-For stands for distinct clients.
    let gw = crate::common::gateway_with_server(
        "  trusted_proxies: [127.0.0.1]\n",
        &body,
        &Environment::default(),
    );
    let good = rs256(&claims("early", "FREE"), "rsa-1");
    let attacker = [("x-forwarded-for", "203.0.113.66")];
    assert_eq!(call(&gw, "/api/me", Some(&good), &attacker).await.0, 200);
    let forged = |i: usize| {
        let mut c = claims("victim", "ENTERPRISE");
        c["jti"] = json!(i);
        tokens::hs256(&c, &tokens::rsa_public_pem())
    };
    for i in 0..3 {
        assert_eq!(
            call(&gw, "/api/me", Some(&forged(i)), &attacker).await.0,
            401
        );
    }
    // The budget of failed verifications is spent: refused without a check.
    let (status, headers, body) = call(&gw, "/api/me", Some(&forged(9)), &attacker).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "too_many_invalid_tokens");
    assert!(headers.contains_key("retry-after"));
    // A token verified before still works (cached); other clients are not affected.
    assert_eq!(call(&gw, "/api/me", Some(&good), &attacker).await.0, 200);
    let other = [("x-forwarded-for", "203.0.113.67")];
    let fresh = rs256(&claims("someone", "FREE"), "rsa-1");
    assert_eq!(call(&gw, "/api/me", Some(&fresh), &other).await.0, 200);
    assert_eq!(call(&gw, "/api/me", Some(&forged(10)), &other).await.0, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cached_tokens_of_a_key_that_left_the_jwks_are_refused_after_the_refresh() {
    let (_up, jwks, gw) = setup_with_keys(false, &["rsa-1", "ed-1"]).await;
    let ed = eddsa(&claims("e", "FREE"), "ed-1");
    let rsa = rs256(&claims("r", "FREE"), "rsa-1");
    assert_eq!(call(&gw, "/api/me", Some(&ed), &[]).await.0, 200);
    assert_eq!(call(&gw, "/api/me", Some(&rsa), &[]).await.0, 200);
    assert!(gw.snapshot().auth.cached(ed.as_bytes()).is_some());
    // `ed-1` is withdrawn (rotated out, or compromised). An unknown kid
    // makes the gateway fetch the set again, once the refetch interval
    // has passed: poll until it did.
    jwks.serve_only(&["rsa-1"]);
    let before = jwks.hits.load(Ordering::SeqCst);
    let unknown = rs256(&claims("x", "FREE"), "rsa-9");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while jwks.hits.load(Ordering::SeqCst) == before {
        assert!(
            std::time::Instant::now() < deadline,
            "no JWKS refetch in 10 s"
        );
        call(&gw, "/api/me", Some(&unknown), &[]).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, _, body) = call(&gw, "/api/me", Some(&ed), &[]).await;
    assert_eq!(status, 401, "the cached token of a withdrawn key: {body}");
    assert_eq!(body["error"]["code"], "invalid_token");
    assert_eq!(
        call(&gw, "/api/me", Some(&rsa), &[]).await.0,
        200,
        "other keys' tokens stay"
    );
}
