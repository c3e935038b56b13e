//! Values encrypted at rest (XChaCha20-Poly1305) under a key derived from
//! the service's own key for one purpose, with a caller-chosen associated
//! datum (the row's id), so a sealed value copied to another row does not
//! open. What the outbox stores and what notifications keeps of bot tokens.
//!
//! A sealed value is `enc1:` + base64(nonce ‖ ciphertext). It opens with
//! the current key's cipher or the previous key's (a rotation leaves what
//! was sealed before readable).

use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

use crate::service_auth::ServiceKeys;

/// Marks an encrypted value.
pub const SEALED: &str = "enc1:";

/// Seals and opens values for one purpose. Cheap to clone.
#[derive(Clone)]
pub struct Sealer {
    /// The current key's cipher first (it seals), then the previous key's.
    ciphers: Arc<Vec<XChaCha20Poly1305>>,
    /// What a value is called in errors (`sealed payload: …`).
    noun: &'static str,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer([redacted])")
    }
}

impl Sealer {
    /// A sealer whose keys are derived from `keys` for `purpose`; its
    /// errors call a value `sealed <noun>`.
    pub fn new(keys: &ServiceKeys, purpose: &str, noun: &'static str) -> Self {
        let ciphers = keys
            .derive_all(purpose)
            .iter()
            .map(|key| XChaCha20Poly1305::new(key.into()))
            .collect();
        Self {
            ciphers: Arc::new(ciphers),
            noun,
        }
    }

    /// `plain` sealed, bound to `aad`.
    pub fn seal(&self, aad: &str, plain: &[u8]) -> Result<String, String> {
        let mut nonce = [0u8; 24];
        getrandom::fill(&mut nonce).map_err(|e| e.to_string())?;
        let cipher = self.ciphers.first().ok_or("no sealing key")?;
        let ct = cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plain,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| "cannot seal the value".to_owned())?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ct);
        Ok(format!("{SEALED}{}", B64.encode(out)))
    }

    /// What `sealed` holds, when it was sealed with one of these keys for
    /// this `aad`. A value without the `enc1:` mark is `None` (stored
    /// before values were sealed: the caller decides).
    pub fn open(&self, aad: &str, sealed: &str) -> Option<Result<Vec<u8>, String>> {
        let b64 = sealed.strip_prefix(SEALED)?;
        Some(self.open_b64(aad, b64))
    }

    fn open_b64(&self, aad: &str, b64: &str) -> Result<Vec<u8>, String> {
        let noun = self.noun;
        let raw = B64.decode(b64).map_err(|e| format!("sealed {noun}: {e}"))?;
        if raw.len() < 24 {
            return Err(format!("sealed {noun} too short"));
        }
        let (nonce, ct) = raw.split_at(24);
        self.ciphers
            .iter()
            .find_map(|c| {
                c.decrypt(
                    XNonce::from_slice(nonce),
                    Payload {
                        msg: ct,
                        aad: aad.as_bytes(),
                    },
                )
                .ok()
            })
            .ok_or_else(|| {
                format!(
                    "sealed {noun}: no key opens it (sealed under a service key since replaced? \
                     set TIERGATE_<SERVICE>_SERVICE_KEY_PREVIOUS to that key)"
                )
            })
    }
}
