//! The Midtrans contract (external-apis.md §1) as pure functions.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use sha2::{Digest, Sha512};

/// `Authorization: Basic base64(server_key + ":")` (the password is
/// empty).
pub fn authorization(server_key: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{server_key}:")))
}

/// A notification's `signature_key`: lowercase hex of
/// `SHA512(order_id + status_code + gross_amount + server_key)`, over the
/// raw strings of the body (`gross_amount` as sent, `"100000.00"`).
pub fn signature(
    order_id: &str,
    status_code: &str,
    gross_amount: &str,
    server_key: &str,
) -> String {
    let mut h = Sha512::new();
    for part in [order_id, status_code, gross_amount, server_key] {
        h.update(part.as_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `given` is the signature of the other fields, compared in
/// constant time (a byte at a time, every byte, whatever differs first).
/// Upper-case hex is refused: Midtrans sends lower case.
pub fn signature_valid(
    given: &str,
    order_id: &str,
    status_code: &str,
    gross_amount: &str,
    server_key: &str,
) -> bool {
    let want = signature(order_id, status_code, gross_amount, server_key);
    constant_time_eq(given.as_bytes(), want.as_bytes())
}

pub use backend_common::constant_time_eq;

/// The longest `order_id` Midtrans takes.
pub const ORDER_ID_MAX: usize = 50;

/// Why an `order_id` cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrderIdError {
    /// The invoice number has a character Midtrans refuses (after `/`
    /// became `-`).
    #[error("invoice number `{0}` has a character an order_id may not contain")]
    Character(String),
    /// Longer than [`ORDER_ID_MAX`].
    #[error("order_id `{0}` is longer than 50 characters")]
    Length(String),
    /// Attempts count from 1.
    #[error("payment attempts count from 1")]
    Attempt,
}

/// The `order_id` of attempt `attempt` (1, 2, …) to pay invoice `number`:
/// `INV/2026/11/000123`, attempt 1 → `INV-2026-11-000123-1`. Midtrans
/// allows `[A-Za-z0-9-_~.]` (no `/`) and never reuses an order id, so
/// each attempt has its own, derived, not random: after a crash between
/// the charge and our commit the retry finds the same order at Midtrans.
pub fn order_id(number: &str, attempt: u32) -> Result<String, OrderIdError> {
    if attempt == 0 {
        return Err(OrderIdError::Attempt);
    }
    let base = number.replace('/', "-");
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '~' | '.');
    if base.is_empty() || !base.chars().all(allowed) {
        return Err(OrderIdError::Character(number.to_owned()));
    }
    let id = format!("{base}-{attempt}");
    if id.len() > ORDER_ID_MAX {
        return Err(OrderIdError::Length(id));
    }
    Ok(id)
}

/// The invoice number and attempt of one of our `order_id`s.
pub fn parse_order_id(order_id: &str) -> Option<(String, u32)> {
    let (base, attempt) = order_id.rsplit_once('-')?;
    let attempt: u32 = attempt.parse().ok().filter(|a| *a > 0)?;
    if attempt.to_string().len() != order_id.len() - base.len() - 1 {
        return None;
    }
    Some((base.replace('-', "/"), attempt))
}

/// A Midtrans amount (`"44000.00"`, also `"44000"`) as whole rupiah.
/// Rupiah have no cents here: anything but `.00` (or `.0`) is refused,
/// as are signs, spaces and exponents.
pub fn parse_amount(s: &str) -> Option<i64> {
    let (whole, cents) = match s.split_once('.') {
        Some((w, c)) => (w, Some(c)),
        None => (s, None),
    };
    if whole.is_empty() || whole.len() > 15 || !whole.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if let Some(c) = cents {
        if c.is_empty() || c.len() > 2 || !c.bytes().all(|b| b == b'0') {
            return None;
        }
    }
    whole.parse().ok()
}

/// An amount as Midtrans echoes it: `44000` → `"44000.00"`.
pub fn format_amount(rupiah: i64) -> String {
    format!("{rupiah}.00")
}

/// Midtrans's `transaction_status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransactionStatus {
    Pending,
    Authorize,
    Capture,
    Settlement,
    Deny,
    Cancel,
    Expire,
    Failure,
    Refund,
    PartialRefund,
    Chargeback,
    PartialChargeback,
}

impl TransactionStatus {
    /// Every status, in the contract's order.
    pub const ALL: [Self; 12] = [
        Self::Pending,
        Self::Authorize,
        Self::Capture,
        Self::Settlement,
        Self::Deny,
        Self::Cancel,
        Self::Expire,
        Self::Failure,
        Self::Refund,
        Self::PartialRefund,
        Self::Chargeback,
        Self::PartialChargeback,
    ];

    /// The status Midtrans names `s`; `None` for one it added since.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// As Midtrans writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Authorize => "authorize",
            Self::Capture => "capture",
            Self::Settlement => "settlement",
            Self::Deny => "deny",
            Self::Cancel => "cancel",
            Self::Expire => "expire",
            Self::Failure => "failure",
            Self::Refund => "refund",
            Self::PartialRefund => "partial_refund",
            Self::Chargeback => "chargeback",
            Self::PartialChargeback => "partial_chargeback",
        }
    }
}

/// Midtrans's `fraud_status` (card payments).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FraudStatus {
    Accept,
    Challenge,
    Deny,
}

impl FraudStatus {
    /// `accept`, `challenge` or `deny`; `None` for anything else (absent
    /// on methods without fraud screening).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "accept" => Some(Self::Accept),
            "challenge" => Some(Self::Challenge),
            "deny" => Some(Self::Deny),
            _ => None,
        }
    }
}

/// Whether an answer's body `status_code` is an error, as every official
/// SDK decides: ≥ 401 and not 407 (`expire` answers 407 and succeeds).
/// 400 with `validation_messages` is an error too (HTTP 400).
pub fn is_error_code(status_code: &str) -> bool {
    match status_code.parse::<u16>() {
        Ok(407) => false,
        Ok(c) => c >= 400,
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_authorization_header_vector() {
        assert_eq!(
            authorization("SB-Mid-server-abc123cde456"),
            "Basic U0ItTWlkLXNlcnZlci1hYmMxMjNjZGU0NTY6"
        );
    }

    #[test]
    fn test_signature_vector_and_forgeries() {
        let key = "askvnoibnosifnboseofinbofinfgbiufglnbfg";
        let want = "edc076b21793ebe3e17926350f5b8ae67d902fe657b3d0aa31b932d5c127e2375d308a2bc94f3265ac2d80a1f181a79b997ac178a236fcff35af263fc4d4c231";
        assert_eq!(signature("1111", "200", "100000.00", key), want);
        assert!(signature_valid(want, "1111", "200", "100000.00", key));
        // Any field changed, the amount reformatted, the hex in upper
        // case, cut short or empty: refused.
        for (sig, order, code, amount) in [
            (want, "1112", "200", "100000.00"),
            (want, "1111", "201", "100000.00"),
            (want, "1111", "200", "100000"),
            (want, "1111", "200", "100001.00"),
            (&want.to_uppercase()[..], "1111", "200", "100000.00"),
            (&want[..127], "1111", "200", "100000.00"),
            ("", "1111", "200", "100000.00"),
        ] {
            assert!(
                !signature_valid(sig, order, code, amount, key),
                "{sig} {order} {code} {amount}"
            );
        }
        assert!(!signature_valid(
            want,
            "1111",
            "200",
            "100000.00",
            "another-key"
        ));
    }

    #[test]
    fn test_order_ids() {
        assert_eq!(
            order_id("INV/2026/11/000123", 1).as_deref(),
            Ok("INV-2026-11-000123-1")
        );
        assert_eq!(
            order_id("INV/2026/11/000123", 12).as_deref(),
            Ok("INV-2026-11-000123-12")
        );
        assert_eq!(
            order_id("INV/2026/11/000123", 0),
            Err(OrderIdError::Attempt)
        );
        assert!(matches!(
            order_id("INV 2026", 1),
            Err(OrderIdError::Character(_))
        ));
        assert!(matches!(order_id("", 1), Err(OrderIdError::Character(_))));
        assert!(matches!(
            order_id("INV/2026/11/00é", 1),
            Err(OrderIdError::Character(_))
        ));
        let long = "A".repeat(48);
        assert!(order_id(&long, 1).is_ok());
        assert!(matches!(order_id(&long, 10), Err(OrderIdError::Length(_))));
        assert_eq!(
            parse_order_id("INV-2026-11-000123-1"),
            Some(("INV/2026/11/000123".to_owned(), 1))
        );
        assert_eq!(
            parse_order_id("INV-2026-11-000123-12"),
            Some(("INV/2026/11/000123".to_owned(), 12))
        );
        for bad in [
            "INV-2026-11-000123-0",
            "INV-2026-11-000123-01",
            "INV-2026-11-000123-",
            "nodash",
            "INV-2026-x",
        ] {
            assert_eq!(parse_order_id(bad), None, "{bad}");
        }
        for n in 1..=30 {
            let id = order_id("INV/2026/12/000042", n).unwrap();
            assert_eq!(
                parse_order_id(&id),
                Some(("INV/2026/12/000042".to_owned(), n))
            );
        }
    }

    #[test]
    fn test_amounts() {
        for (s, want) in [
            ("44000.00", Some(44_000)),
            ("44000", Some(44_000)),
            ("44000.0", Some(44_000)),
            ("0.00", Some(0)),
            ("44000.50", None),
            ("44000.", None),
            ("-1.00", None),
            ("+1.00", None),
            ("1e5", None),
            (" 1.00", None),
            ("1.000", None),
            ("", None),
            (".00", None),
            ("9999999999999999.00", None),
        ] {
            assert_eq!(parse_amount(s), want, "{s:?}");
        }
        assert_eq!(format_amount(10_000), "10000.00");
        assert_eq!(parse_amount(&format_amount(123_456_789)), Some(123_456_789));
    }

    #[test]
    fn test_statuses_and_codes() {
        for t in TransactionStatus::ALL {
            assert_eq!(TransactionStatus::parse(t.as_str()), Some(t));
        }
        assert_eq!(TransactionStatus::parse("settled"), None);
        assert_eq!(
            FraudStatus::parse("challenge"),
            Some(FraudStatus::Challenge)
        );
        assert_eq!(FraudStatus::parse(""), None);
        for (code, error) in [
            ("200", false),
            ("201", false),
            ("202", false),
            ("407", false),
            ("400", true),
            ("401", true),
            ("404", true),
            ("406", true),
            ("412", true),
            ("500", true),
            ("x", true),
        ] {
            assert_eq!(is_error_code(code), error, "{code}");
        }
    }
}
