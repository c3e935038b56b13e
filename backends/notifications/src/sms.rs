//! SMS through Twilio's Messages REST API (external-apis.md §3), with our
//! own client: `POST {base}/2010-04-01/Accounts/{sid}/Messages.json`,
//! form-encoded, HTTP Basic auth as `AccountSid:AuthToken`, a
//! `StatusCallback` for delivery reports, whose `X-Twilio-Signature`
//! ([`signature`]) is checked before a report is believed.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::Deserialize;

use backend_common::secret::Secret;

/// Why a message was not sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SmsError {
    /// Refused for this recipient or message (an invalid or unroutable
    /// number, an unsubscribed recipient): do not retry.
    #[error("Twilio {code}: {message}")]
    Permanent {
        /// Twilio's error code (21211, 21610, …).
        code: i64,
        /// Its message.
        message: String,
    },
    /// Failed for now (429 / 20429, 5xx, the network, our credentials):
    /// retry, after `retry_after` when Twilio said.
    #[error("{message}")]
    Transient {
        /// What happened.
        message: String,
        /// Twilio's `Retry-After`.
        retry_after: Option<Duration>,
    },
}

/// Twilio error codes that concern the recipient or the message: retrying
/// cannot help.
const PERMANENT_CODES: &[i64] = &[
    21211, // invalid To
    21408, // region not enabled
    21606, // From not SMS-capable
    21608, // unverified To (trial)
    21610, // unsubscribed (STOP)
    21612, // unroutable
    21614, // not a mobile number
    21617, // body too long
];

/// Twilio's error answer.
#[derive(Debug, Deserialize)]
struct TwilioError {
    code: Option<i64>,
    message: Option<String>,
}

/// Twilio's message resource (what we read of it).
#[derive(Debug, Deserialize)]
struct MessageResource {
    sid: String,
}

/// Sends SMS.
#[derive(Clone)]
pub struct Twilio {
    http: reqwest::Client,
    base: String,
    account_sid: String,
    auth_token: Secret<String>,
    from: String,
}

impl std::fmt::Debug for Twilio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Twilio")
            .field("base", &self.base)
            .field("account_sid", &self.account_sid)
            .finish_non_exhaustive()
    }
}

impl Twilio {
    /// A client for account `account_sid` at `base`, sending from `from`
    /// (a number, or a Messaging Service SID `MG…`).
    pub fn new(
        base: &str,
        account_sid: &str,
        auth_token: Secret<String>,
        from: &str,
        timeout: Duration,
    ) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| format!("cannot build the Twilio client: {e}"))?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
            account_sid: account_sid.to_owned(),
            auth_token,
            from: from.to_owned(),
        })
    }

    /// The auth token (to check callbacks' signatures).
    pub fn auth_token(&self) -> &Secret<String> {
        &self.auth_token
    }

    /// Sends `body` to `to` (E.164); `status_callback`: where Twilio
    /// reports delivery. Returns the message SID.
    pub async fn send(
        &self,
        to: &str,
        body: &str,
        status_callback: Option<&str>,
    ) -> Result<String, SmsError> {
        let url = format!(
            "{}/2010-04-01/Accounts/{}/Messages.json",
            self.base, self.account_sid
        );
        let mut form: Vec<(&str, &str)> = vec![("To", to), ("Body", body)];
        if self.from.starts_with("MG") {
            form.push(("MessagingServiceSid", &self.from));
        } else {
            form.push(("From", &self.from));
        }
        if let Some(cb) = status_callback {
            form.push(("StatusCallback", cb));
        }
        let res = self
            .http
            .post(&url)
            .basic_auth(&self.account_sid, Some(self.auth_token.expose()))
            .form(&form)
            .send()
            .await
            .map_err(|e| SmsError::Transient {
                message: format!("Twilio unreachable: {}", e.without_url()),
                retry_after: None,
            })?;
        let status = res.status().as_u16();
        let retry_after = res
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let bytes = res.bytes().await.map_err(|e| SmsError::Transient {
            message: format!("reading Twilio's answer: {}", e.without_url()),
            retry_after: None,
        })?;
        if (200..300).contains(&status) {
            let m: MessageResource =
                serde_json::from_slice(&bytes).map_err(|e| SmsError::Transient {
                    message: format!("Twilio's answer is not a message: {e}"),
                    retry_after: None,
                })?;
            return Ok(m.sid);
        }
        let err: TwilioError = serde_json::from_slice(&bytes).unwrap_or(TwilioError {
            code: None,
            message: None,
        });
        let code = err.code.unwrap_or(0);
        let message = err.message.unwrap_or_else(|| format!("HTTP {status}"));
        Err(classify(status, code, message, retry_after))
    }
}

/// An error answer as [`SmsError`].
fn classify(status: u16, code: i64, message: String, retry_after: Option<Duration>) -> SmsError {
    if status == 429 || code == 20429 || status >= 500 {
        return SmsError::Transient {
            message: format!("Twilio {status} {code}: {message}"),
            retry_after,
        };
    }
    if PERMANENT_CODES.contains(&code) || (status == 400 && code != 20003) {
        return SmsError::Permanent { code, message };
    }
    // 401 (20003: our credentials), 404 (20404: our account), anything
    // else: ours to fix, not the recipient's; retried until it is.
    SmsError::Transient {
        message: format!("Twilio {status} {code}: {message}"),
        retry_after,
    }
}

/// `X-Twilio-Signature` of a callback to `url` with form `params`:
/// base64(HMAC-SHA1(auth token, url + each key and value, sorted by key)).
pub fn signature(auth_token: &str, url: &str, params: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    sorted.sort();
    let mut data = url.to_owned();
    for (k, v) in sorted {
        data.push_str(k);
        data.push_str(v);
    }
    let Ok(mut mac) = Hmac::<sha1::Sha1>::new_from_slice(auth_token.as_bytes()) else {
        return String::new();
    };
    mac.update(data.as_bytes());
    B64.encode(mac.finalize().into_bytes())
}

/// Whether `given` is the signature of the callback (constant time).
pub fn verify(auth_token: &str, url: &str, params: &[(String, String)], given: &str) -> bool {
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    sorted.sort();
    let Ok(mut mac) = Hmac::<sha1::Sha1>::new_from_slice(auth_token.as_bytes()) else {
        return false;
    };
    mac.update(url.as_bytes());
    for (k, v) in sorted {
        mac.update(k.as_bytes());
        mac.update(v.as_bytes());
    }
    let Ok(given) = B64.decode(given.trim()) else {
        return false;
    };
    mac.verify_slice(&given).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_signature_matches_twilio_rubys_spec_vector() {
        // twilio-ruby spec/util/request_validator_spec.rb ("a Twilio Voice request").
        let params: Vec<(String, String)> = [
            ("ToState", "California"),
            ("CalledState", "California"),
            ("Direction", "inbound"),
            ("FromState", "CA"),
            ("AccountSid", "ACba8bc05eacf94afdae398e642c9cc32d"),
            ("Caller", "+14153595711"),
            ("CallerZip", "94108"),
            ("CallerCountry", "US"),
            ("From", "+14153595711"),
            ("FromCity", "SAN FRANCISCO"),
            ("CallerCity", "SAN FRANCISCO"),
            ("To", "+14157669926"),
            ("FromZip", "94108"),
            ("FromCountry", "US"),
            ("ToCity", ""),
            ("CallStatus", "ringing"),
            ("CalledCity", ""),
            ("CallerState", "CA"),
            ("CalledZip", ""),
            ("ToZip", ""),
            ("ToCountry", "US"),
            ("CallSid", "CA136d09cd59a3c0ec8dbff44da5c03f31"),
            ("CalledCountry", "US"),
            ("Called", "+14157669926"),
            ("ApiVersion", "2010-04-01"),
            ("ApplicationSid", "AP44efecad51364e80b133bb7c07eb8204"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        let token = "2bd9e9638872de601313dc77410d3b23";
        let url = "http://twiliotests.heroku.com/validate/voice";
        let sig = signature(token, url, &params);
        assert_eq!(sig, "oVb2kXoVy8GEfwBDjR8bk/ZZ6eA=");
        assert!(verify(token, url, &params, &sig));
        assert!(!verify(token, url, &params, "oVb2kXoVy8GEfwBDjR8bk/ZZ6eB="));
        assert!(!verify("another-token", url, &params, &sig));
        assert!(!verify(
            token,
            "http://twiliotests.heroku.com/validate/sms",
            &params,
            &sig
        ));
        assert!(!verify(token, url, &params[1..], &sig));
        assert!(!verify(token, url, &params, "not base64!"));
    }

    #[test]
    fn test_error_classes() {
        let table = [
            (400, 21211, false),
            (400, 21610, false),
            (400, 21614, false),
            (429, 20429, true),
            (401, 20003, true),
            (404, 20404, true),
            (500, 0, true),
            (503, 0, true),
            (400, 99999, false),
        ];
        for (status, code, transient) in table {
            let e = classify(status, code, "m".into(), None);
            assert_eq!(
                matches!(e, SmsError::Transient { .. }),
                transient,
                "{status} {code}"
            );
        }
    }
}
