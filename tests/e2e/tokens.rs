//! Test tokens and a JWKS server. The keys under `tests/fixtures/jwt/` are
//! test-only keys generated for this suite (never used anywhere else).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use axum::response::IntoResponse;
use base64_helpers::b64url;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

pub const ISSUER: &str = "tiergate-users";
pub const AUDIENCE: &str = "tiergate";
pub const DEV_SECRET: &str = "dev-only-secret-for-tests";

fn fixture(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/jwt")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Standard claims for `sub` in `tier`, valid for 10 minutes.
pub fn claims(sub: &str, tier: &str) -> Value {
    json!({
        "sub": sub, "tier": tier, "roles": ["user"],
        "iss": ISSUER, "aud": AUDIENCE,
        "iat": now(), "exp": now() + 600,
    })
}

pub fn rs256(claims: &Value, kid: &str) -> String {
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some(kid.to_owned());
    let key = EncodingKey::from_rsa_pem(&fixture("rsa_private.pem")).unwrap();
    encode(&h, claims, &key).unwrap()
}

pub fn eddsa(claims: &Value, kid: &str) -> String {
    let mut h = Header::new(Algorithm::EdDSA);
    h.kid = Some(kid.to_owned());
    let key = EncodingKey::from_ed_pem(&fixture("ed25519_private.pem")).unwrap();
    encode(&h, claims, &key).unwrap()
}

pub fn hs256(claims: &Value, secret: &[u8]) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

/// The RSA public key PEM (what a key-confusion attacker would sign with).
pub fn rsa_public_pem() -> Vec<u8> {
    fixture("rsa_public.pem")
}

/// An unsigned token (`alg: none`).
pub fn unsigned(claims: &Value) -> String {
    format!(
        "{}.{}.",
        b64url(br#"{"alg":"none","typ":"JWT"}"#),
        b64url(claims.to_string().as_bytes())
    )
}

/// Minimal base64url without padding (test-side, to forge tokens).
pub mod base64_helpers {
    pub fn b64url(data: &[u8]) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in data.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..=chunk.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        out
    }
}

/// A JWKS endpoint whose document and availability a test controls.
pub struct JwksServer {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    pub failing: Arc<AtomicBool>,
    pub body: Arc<Mutex<Value>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl JwksServer {
    pub fn url(&self) -> String {
        format!("http://{}/.well-known/jwks.json", self.addr)
    }

    /// Serves only the keys whose `kid` is listed.
    pub fn serve_only(&self, kids: &[&str]) {
        let all: Value = serde_json::from_slice(&fixture("jwks.json")).unwrap();
        let keys: Vec<Value> = all["keys"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|k| kids.contains(&k["kid"].as_str().unwrap()))
            .cloned()
            .collect();
        *self.body.lock().unwrap() = json!({ "keys": keys });
    }
}

/// Starts a JWKS server with both fixture keys (`rsa-1`, `ed-1`).
pub async fn jwks_server() -> JwksServer {
    let body = Arc::new(Mutex::new(
        serde_json::from_slice::<Value>(&fixture("jwks.json")).unwrap(),
    ));
    let hits = Arc::new(AtomicUsize::new(0));
    let failing = Arc::new(AtomicBool::new(false));
    let (b, h, f) = (body.clone(), hits.clone(), failing.clone());
    let app = axum::Router::new().route(
        "/.well-known/jwks.json",
        axum::routing::get(move || {
            let (b, h, f) = (b.clone(), h.clone(), f.clone());
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                if f.load(Ordering::SeqCst) {
                    return StatusCode::SERVICE_UNAVAILABLE.into_response();
                }
                let v = b.lock().unwrap().clone();
                axum::Json(v).into_response()
            }
        }),
    );
    let (addr, task) = crate::common::serve(app).await;
    JwksServer {
        addr,
        hits,
        failing,
        body,
        task,
    }
}

/// The `auth:` section for a JWKS server.
pub fn auth_yaml(jwks: &JwksServer) -> String {
    format!(
        "auth:\n  jwks: {{url: \"{}\", min_refetch_interval: 1s, timeout: 1s}}\n  algorithms: [EdDSA, RS256, HS256]\n  issuer: {ISSUER}\n  audience: {AUDIENCE}\n  leeway: 5s\n",
        jwks.url()
    )
}

/// A development environment whose HS256 secret is `secret` (the gateway
/// runs as `tiergate up` would: development unless the config says
/// otherwise).
pub fn dev_env(secret: &str) -> gateway::secret::Environment {
    gateway::secret::Environment {
        dev_jwt_secret: Some(gateway::secret::Secret::new(secret.to_owned())),
        default_mode: gateway::config::RunMode::Development,
        ..gateway::secret::Environment::default()
    }
}
