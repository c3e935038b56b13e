//! Password hashing (Argon2id) and the password policy.
//!
//! Hashing costs tens of milliseconds of CPU (and 19 MiB) by design, so it
//! runs on the blocking pool, never on a reactor thread, through a bounded
//! gate ([`backend_common::blocking::Bounded`]): a burst of logins beyond
//! two per core plus as many waiting gets 503 with `Retry-After` rather
//! than unbounded memory.

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::{Algorithm, Argon2, Params, Version};
use backend_common::blocking::{Bounded, Saturated};

/// Shortest accepted password, in characters.
pub const MIN_LEN: usize = 10;
/// Longest accepted password, in characters (bounds hashing work).
pub const MAX_LEN: usize = 128;

/// What is wrong with a password, or `None` when it passes the policy:
/// 10 to 128 characters, at least one letter and one digit, and not the
/// e-mail address itself.
pub fn policy_violation(password: &str, email: &str) -> Option<String> {
    let len = password.chars().count();
    if len < MIN_LEN {
        return Some(format!("must be at least {MIN_LEN} characters"));
    }
    if len > MAX_LEN {
        return Some(format!("must be at most {MAX_LEN} characters"));
    }
    if !password.chars().any(char::is_alphabetic) || !password.chars().any(|c| c.is_ascii_digit()) {
        return Some("must contain at least one letter and one digit".to_owned());
    }
    if !email.is_empty() && password.eq_ignore_ascii_case(email) {
        return Some("must not be your email address".to_owned());
    }
    None
}

/// Hashes and verifies with fixed Argon2id parameters. Cheap to clone.
#[derive(Clone)]
pub struct Hasher {
    params: Params,
    gate: Bounded,
    /// A hash of a random password, verified against when an e-mail is
    /// unknown so that a login takes as long either way.
    dummy: String,
}

impl std::fmt::Debug for Hasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hasher")
            .field("m_cost", &self.params.m_cost())
            .field("t_cost", &self.params.t_cost())
            .finish()
    }
}

impl Hasher {
    /// Argon2id with `memory_kib` KiB and `iterations` passes, one lane.
    pub fn new(memory_kib: u32, iterations: u32) -> Result<Self, String> {
        let params = Params::new(memory_kib, iterations, 1, Some(32))
            .map_err(|e| format!("argon2 parameters: {e}"))?;
        let mut hasher = Self {
            params,
            gate: Bounded::per_core("password hashing"),
            dummy: String::new(),
        };
        let random = backend_common::random_token(18).map_err(|e| e.to_string())?;
        hasher.dummy = hasher.hash_now(&random)?;
        Ok(hasher)
    }

    fn argon2(&self) -> Argon2<'static> {
        Argon2::new(Algorithm::Argon2id, Version::V0x13, self.params.clone())
    }

    fn hash_now(&self, password: &str) -> Result<String, String> {
        self.argon2()
            .hash_password(password.as_bytes())
            .map(|h| h.to_string())
            .map_err(|e| format!("argon2: {e}"))
    }

    fn verify_now(&self, password: &str, hash: &str) -> bool {
        match PasswordHash::new(hash) {
            Ok(parsed) => self
                .argon2()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok(),
            Err(_) => false,
        }
    }

    /// The PHC string of `password`, computed on the blocking pool.
    pub async fn hash(&self, password: String) -> Result<Result<String, String>, Saturated> {
        let this = self.clone();
        self.gate.run(move || this.hash_now(&password)).await
    }

    /// Whether `password` matches `hash`; with `None` (unknown account) it
    /// verifies against a dummy hash and returns false, taking as long.
    pub async fn verify(&self, password: String, hash: Option<String>) -> Result<bool, Saturated> {
        let this = self.clone();
        self.gate
            .run(move || match hash {
                Some(h) => this.verify_now(&password, &h),
                None => {
                    let _ = this.verify_now(&password, &this.dummy);
                    false
                }
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_policy() {
        assert!(policy_violation("short1", "a@b.c")
            .unwrap()
            .contains("at least 10"));
        assert!(policy_violation(&"a1".repeat(65), "a@b.c")
            .unwrap()
            .contains("at most"));
        assert!(policy_violation("onlyletters", "a@b.c")
            .unwrap()
            .contains("digit"));
        assert!(policy_violation("1234567890", "a@b.c")
            .unwrap()
            .contains("letter"));
        assert!(policy_violation("me1@mail.com", "ME1@mail.com")
            .unwrap()
            .contains("email"));
        assert_eq!(policy_violation("correct horse 9", "a@b.c"), None);
    }

    #[tokio::test]
    async fn test_hash_verifies_and_unknown_account_is_false() {
        let h = Hasher::new(8 * 1024, 1).unwrap();
        let hash = h.hash("correct horse 9".into()).await.unwrap().unwrap();
        assert!(hash.starts_with("$argon2id$v=19$m=8192,t=1,p=1$"));
        assert!(h
            .verify("correct horse 9".into(), Some(hash.clone()))
            .await
            .unwrap());
        assert!(!h.verify("wrong horse 9".into(), Some(hash)).await.unwrap());
        assert!(!h.verify("correct horse 9".into(), None).await.unwrap());
        assert!(!h
            .verify("x".into(), Some("not a phc string".into()))
            .await
            .unwrap());
    }
}
