//! What we send Midtrans for each payment method, and what the customer
//! needs from its answer: the contract's charge table (external-apis.md
//! §1) as pure functions.

use serde::Serialize;
use serde_json::{json, Value};

/// A payment method a client may choose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// Snap: Midtrans's hosted page, the customer picks there.
    Snap,
    /// A card, with the frontend's `token_id`.
    CreditCard,
    /// BCA virtual account.
    BcaVa,
    /// BNI virtual account.
    BniVa,
    /// BRI virtual account.
    BriVa,
    /// CIMB Niaga virtual account.
    CimbVa,
    /// Permata virtual account.
    PermataVa,
    /// Mandiri bill payment (`echannel`).
    MandiriBill,
    /// GoPay.
    Gopay,
    /// ShopeePay.
    Shopeepay,
    /// QRIS.
    Qris,
}

impl Method {
    /// Every method.
    pub const ALL: [Self; 11] = [
        Self::Snap,
        Self::CreditCard,
        Self::BcaVa,
        Self::BniVa,
        Self::BriVa,
        Self::CimbVa,
        Self::PermataVa,
        Self::MandiriBill,
        Self::Gopay,
        Self::Shopeepay,
        Self::Qris,
    ];

    /// As the API names it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Snap => "snap",
            Self::CreditCard => "credit_card",
            Self::BcaVa => "bca_va",
            Self::BniVa => "bni_va",
            Self::BriVa => "bri_va",
            Self::CimbVa => "cimb_va",
            Self::PermataVa => "permata_va",
            Self::MandiriBill => "mandiri_bill",
            Self::Gopay => "gopay",
            Self::Shopeepay => "shopeepay",
            Self::Qris => "qris",
        }
    }

    /// The method named `s`.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.as_str() == s)
    }

    /// The bank of a virtual account.
    pub fn bank(self) -> Option<&'static str> {
        match self {
            Self::BcaVa => Some("bca"),
            Self::BniVa => Some("bni"),
            Self::BriVa => Some("bri"),
            Self::CimbVa => Some("cimb"),
            Self::PermataVa => Some("permata"),
            _ => None,
        }
    }

    /// Whether `token_id` fits the method: a card needs one (1 to 200
    /// characters, not blank), every other method takes none.
    pub fn check_token(self, token_id: Option<&str>) -> Result<(), ChargeError> {
        match (self, token_id.map(str::trim)) {
            (Self::CreditCard, None | Some("")) => Err(ChargeError::TokenRequired),
            (Self::CreditCard, Some(t)) if t.len() > 200 => Err(ChargeError::TokenTooLong),
            (Self::CreditCard, Some(_)) | (_, None) => Ok(()),
            (_, Some(_)) => Err(ChargeError::TokenUnexpected),
        }
    }

    /// An e-wallet or QR: paid within minutes (`wallet_expiry`).
    pub fn is_wallet(self) -> bool {
        matches!(self, Self::Gopay | Self::Shopeepay | Self::Qris)
    }
}

/// Whether Midtrans refunds payments of `payment_type` (its answer's
/// field: what the customer actually paid with, also behind Snap).
/// Virtual accounts and bills are refunded by a bank transfer by hand.
pub fn refundable(payment_type: &str) -> bool {
    matches!(
        payment_type,
        "credit_card" | "gopay" | "shopeepay" | "qris" | "akulaku" | "kredivo" | "dana" | "ovo"
    )
}

/// Who pays, as `customer_details`.
#[derive(Debug, Clone, Serialize)]
pub struct Customer {
    /// Name.
    pub first_name: String,
    /// E-mail.
    pub email: String,
}

/// One charge: everything a body is made of.
#[derive(Debug, Clone)]
pub struct Charge<'a> {
    /// The method.
    pub method: Method,
    /// `INV-2026-11-000123-1`.
    pub order_id: &'a str,
    /// Whole rupiah.
    pub gross_amount: i64,
    /// The invoice number, for item and bill descriptions.
    pub invoice_number: &'a str,
    /// Who pays.
    pub customer: Option<Customer>,
    /// A card's single-use token.
    pub token_id: Option<&'a str>,
    /// Minutes it can be paid in.
    pub expiry_minutes: u64,
    /// `expiry.start_time` / `custom_expiry.order_time`:
    /// `2026-11-01 10:00:00 +0700`.
    pub order_time: &'a str,
    /// Snap's `callbacks.finish`.
    pub finish_url: Option<&'a str>,
}

/// Why a charge body cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChargeError {
    /// A card payment needs the token the frontend got from Midtrans.
    #[error("credit_card needs the token_id the frontend got from Midtrans (GET /v2/token)")]
    TokenRequired,
    /// Only cards take a token.
    #[error("token_id is for credit_card only")]
    TokenUnexpected,
    /// Longer than any token Midtrans issues.
    #[error("token_id has at most 200 characters")]
    TokenTooLong,
}

impl Charge<'_> {
    fn item(&self) -> Value {
        // One item: its price is the gross amount, so the sum Midtrans
        // checks holds by construction.
        json!([{
            "id": self.invoice_number,
            "price": self.gross_amount,
            "quantity": 1,
            "name": format!("Invoice {}", self.invoice_number).chars().take(50).collect::<String>(),
        }])
    }

    /// The Snap request (`POST /snap/v1/transactions`).
    pub fn snap_body(&self) -> Value {
        let mut body = json!({
            "transaction_details": {"order_id": self.order_id, "gross_amount": self.gross_amount},
            "item_details": self.item(),
            "credit_card": {"secure": true},
            "expiry": {"start_time": self.order_time, "unit": "minute", "duration": self.expiry_minutes},
        });
        if let Some(c) = &self.customer {
            body["customer_details"] = json!(c);
        }
        if let Some(f) = self.finish_url {
            body["callbacks"] = json!({"finish": f});
        }
        body
    }

    /// The Core API request (`POST /v2/charge`); not for Snap.
    pub fn core_body(&self) -> Result<Value, ChargeError> {
        self.method.check_token(self.token_id)?;
        let mut body = json!({
            "transaction_details": {"order_id": self.order_id, "gross_amount": self.gross_amount},
            "item_details": self.item(),
            "custom_expiry": {"order_time": self.order_time, "expiry_duration": self.expiry_minutes, "unit": "minute"},
        });
        if let Some(c) = &self.customer {
            body["customer_details"] = json!(c);
        }
        let (payment_type, extra) = match self.method {
            Method::CreditCard => (
                "credit_card",
                Some((
                    "credit_card",
                    json!({"token_id": self.token_id, "authentication": true}),
                )),
            ),
            Method::BcaVa | Method::BniVa | Method::BriVa | Method::CimbVa | Method::PermataVa => (
                "bank_transfer",
                Some(("bank_transfer", json!({"bank": self.method.bank()}))),
            ),
            Method::MandiriBill => (
                "echannel",
                Some((
                    "echannel",
                    json!({"bill_info1": "Pembayaran:", "bill_info2": self.invoice_number}),
                )),
            ),
            Method::Gopay => ("gopay", Some(("gopay", json!({"enable_callback": false})))),
            Method::Shopeepay => ("shopeepay", None),
            Method::Qris => ("qris", Some(("qris", json!({"acquirer": "gopay"})))),
            Method::Snap => ("snap", None),
        };
        body["payment_type"] = json!(payment_type);
        if let Some((key, value)) = extra {
            body[key] = value;
        }
        Ok(body)
    }
}

/// What the customer needs to pay, from a charge or status answer (or a
/// Snap token).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Instructions {
    /// A virtual account's bank.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bank: Option<String>,
    /// A virtual account's number.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub va_number: Option<String>,
    /// Mandiri bill: the bill key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bill_key: Option<String>,
    /// Mandiri bill: the biller code (`70012`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub biller_code: Option<String>,
    /// QRIS: the QR payload to render.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qr_string: Option<String>,
    /// GoPay / QRIS: an image of the QR code.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qr_code_url: Option<String>,
    /// GoPay / ShopeePay: opens the app.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deeplink_url: Option<String>,
    /// Card 3-D Secure or Snap: where to send the customer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redirect_url: Option<String>,
    /// Snap: for `snap.pay(token)`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

impl Instructions {
    /// From a charge or status answer.
    pub fn from_answer(a: &Value) -> Self {
        let s = |v: &Value| v.as_str().filter(|s| !s.is_empty()).map(str::to_owned);
        let action = |name: &str| {
            a["actions"].as_array().and_then(|list| {
                list.iter()
                    .find(|x| x["name"].as_str() == Some(name))
                    .and_then(|x| s(&x["url"]))
            })
        };
        let (bank, va_number) = match a["va_numbers"].as_array().and_then(|v| v.first()) {
            Some(va) => (s(&va["bank"]), s(&va["va_number"])),
            None => match s(&a["permata_va_number"]) {
                Some(n) => (Some("permata".to_owned()), Some(n)),
                None => (None, None),
            },
        };
        Self {
            bank,
            va_number,
            bill_key: s(&a["bill_key"]),
            biller_code: s(&a["biller_code"]),
            qr_string: s(&a["qr_string"]),
            qr_code_url: action("generate-qr-code"),
            deeplink_url: action("deeplink-redirect"),
            redirect_url: s(&a["redirect_url"]),
            token: None,
        }
    }

    /// Nothing to show.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// `self`, with what `newer` adds (a status answer repeats less than
    /// the charge answer did).
    pub fn merged(mut self, newer: Self) -> Self {
        macro_rules! keep {
            ($($f:ident),*) => { $( if newer.$f.is_some() { self.$f = newer.$f; } )* };
        }
        keep!(
            bank,
            va_number,
            bill_key,
            biller_code,
            qr_string,
            qr_code_url,
            deeplink_url,
            redirect_url,
            token
        );
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn charge(method: Method) -> Charge<'static> {
        Charge {
            method,
            order_id: "INV-2026-11-000123-1",
            gross_amount: 276_390,
            invoice_number: "INV/2026/11/000123",
            customer: Some(Customer {
                first_name: "Ayu".into(),
                email: "ayu@example.id".into(),
            }),
            token_id: (method == Method::CreditCard).then_some("481111-1114-a901971f"),
            expiry_minutes: 1440,
            order_time: "2026-11-01 10:00:00 +0700",
            finish_url: None,
        }
    }

    /// Each Core method's body, field by field, as the contract's charge
    /// table has it.
    #[test]
    fn test_every_core_body_matches_the_contract() {
        let common = |b: &Value| {
            assert_eq!(
                b["transaction_details"],
                json!({"order_id": "INV-2026-11-000123-1", "gross_amount": 276_390})
            );
            // Integer rupiah, the item sum equal to the gross amount.
            let items = b["item_details"].as_array().unwrap();
            let sum: i64 = items
                .iter()
                .map(|i| i["price"].as_i64().unwrap() * i["quantity"].as_i64().unwrap())
                .sum();
            assert_eq!(sum, 276_390);
            assert!(items
                .iter()
                .all(|i| i["name"].as_str().unwrap().len() <= 50));
            assert_eq!(
                b["custom_expiry"],
                json!({"order_time": "2026-11-01 10:00:00 +0700", "expiry_duration": 1440, "unit": "minute"})
            );
            assert_eq!(
                b["customer_details"],
                json!({"first_name": "Ayu", "email": "ayu@example.id"})
            );
        };
        type Row = (Method, &'static str, Option<(&'static str, Value)>);
        let table: &[Row] = &[
            (
                Method::CreditCard,
                "credit_card",
                Some((
                    "credit_card",
                    json!({"token_id": "481111-1114-a901971f", "authentication": true}),
                )),
            ),
            (
                Method::BcaVa,
                "bank_transfer",
                Some(("bank_transfer", json!({"bank": "bca"}))),
            ),
            (
                Method::BniVa,
                "bank_transfer",
                Some(("bank_transfer", json!({"bank": "bni"}))),
            ),
            (
                Method::BriVa,
                "bank_transfer",
                Some(("bank_transfer", json!({"bank": "bri"}))),
            ),
            (
                Method::CimbVa,
                "bank_transfer",
                Some(("bank_transfer", json!({"bank": "cimb"}))),
            ),
            (
                Method::PermataVa,
                "bank_transfer",
                Some(("bank_transfer", json!({"bank": "permata"}))),
            ),
            (
                Method::MandiriBill,
                "echannel",
                Some((
                    "echannel",
                    json!({"bill_info1": "Pembayaran:", "bill_info2": "INV/2026/11/000123"}),
                )),
            ),
            (
                Method::Gopay,
                "gopay",
                Some(("gopay", json!({"enable_callback": false}))),
            ),
            (Method::Shopeepay, "shopeepay", None),
            (
                Method::Qris,
                "qris",
                Some(("qris", json!({"acquirer": "gopay"}))),
            ),
        ];
        for (method, payment_type, extra) in table {
            let b = charge(*method).core_body().unwrap();
            common(&b);
            assert_eq!(b["payment_type"], *payment_type, "{method:?}");
            let mut keys: Vec<&str> = b.as_object().unwrap().keys().map(String::as_str).collect();
            keys.sort_unstable();
            let mut want = vec![
                "custom_expiry",
                "customer_details",
                "item_details",
                "payment_type",
                "transaction_details",
            ];
            if let Some((k, v)) = extra {
                assert_eq!(b[*k], *v, "{method:?}");
                want.push(k);
            }
            want.sort_unstable();
            assert_eq!(
                keys, want,
                "{method:?}: no field the contract does not name"
            );
        }
        let mut no_token = charge(Method::CreditCard);
        no_token.token_id = None;
        assert_eq!(no_token.core_body(), Err(ChargeError::TokenRequired));
        let mut stray = charge(Method::BcaVa);
        stray.token_id = Some("t");
        assert_eq!(stray.core_body(), Err(ChargeError::TokenUnexpected));
    }

    #[test]
    fn test_snap_body() {
        let mut c = charge(Method::Snap);
        c.finish_url = Some("https://app.example.id/paid");
        let b = c.snap_body();
        assert_eq!(
            b["transaction_details"],
            json!({"order_id": "INV-2026-11-000123-1", "gross_amount": 276_390})
        );
        assert_eq!(
            b["expiry"],
            json!({"start_time": "2026-11-01 10:00:00 +0700", "unit": "minute", "duration": 1440})
        );
        assert_eq!(
            b["callbacks"],
            json!({"finish": "https://app.example.id/paid"})
        );
        assert_eq!(b["credit_card"], json!({"secure": true}));
        assert!(b.get("payment_type").is_none());
    }

    /// The contract's answer shapes (bank transfer, Permata, Mandiri bill,
    /// GoPay actions, QRIS, 3-D Secure).
    #[test]
    fn test_instructions_from_documented_answers() {
        let va = json!({"status_code": "201", "va_numbers": [{"bank": "bca", "va_number": "12345678901"}],
            "transaction_status": "pending", "expiry_time": "2026-11-02 10:00:00"});
        assert_eq!(
            Instructions::from_answer(&va),
            Instructions {
                bank: Some("bca".into()),
                va_number: Some("12345678901".into()),
                ..Default::default()
            }
        );
        let permata = json!({"permata_va_number": "8562000087926752"});
        assert_eq!(
            Instructions::from_answer(&permata).va_number.as_deref(),
            Some("8562000087926752")
        );
        assert_eq!(
            Instructions::from_answer(&permata).bank.as_deref(),
            Some("permata")
        );
        let bill = json!({"bill_key": "990000000260", "biller_code": "70012"});
        let b = Instructions::from_answer(&bill);
        assert_eq!(
            (b.bill_key.as_deref(), b.biller_code.as_deref()),
            (Some("990000000260"), Some("70012"))
        );
        let gopay = json!({"actions": [
            {"name": "generate-qr-code", "method": "GET", "url": "https://api.sandbox.midtrans.com/v2/gopay/x/qr-code"},
            {"name": "deeplink-redirect", "method": "GET", "url": "https://simulator.sandbox.midtrans.com/gopay/partner/app/payment-pin?id=x"},
            {"name": "get-status", "method": "GET", "url": "https://api.sandbox.midtrans.com/v2/x/status"},
            {"name": "cancel", "method": "POST", "url": "https://api.sandbox.midtrans.com/v2/x/cancel"}]});
        let g = Instructions::from_answer(&gopay);
        assert!(g.qr_code_url.unwrap().ends_with("/qr-code"));
        assert!(g.deeplink_url.unwrap().contains("payment-pin"));
        let qris = json!({"qr_string": "00020101021226620014COM.GO-JEK.WWW", "acquirer": "gopay",
            "actions": [{"name": "generate-qr-code", "method": "GET", "url": "https://x/qr"}]});
        assert_eq!(
            Instructions::from_answer(&qris).qr_string.as_deref(),
            Some("00020101021226620014COM.GO-JEK.WWW")
        );
        let three_ds = json!({"status_code": "201", "redirect_url": "https://api.sandbox.midtrans.com/v2/token/rba/redirect/x"});
        assert!(Instructions::from_answer(&three_ds).redirect_url.is_some());
        let kept = Instructions::from_answer(&va).merged(Instructions::default());
        assert_eq!(kept.va_number.as_deref(), Some("12345678901"));
        assert!(Instructions::from_answer(&json!({})).is_empty());
    }

    #[test]
    fn test_methods() {
        for m in Method::ALL {
            assert_eq!(Method::parse(m.as_str()), Some(m));
        }
        assert_eq!(Method::parse("paypal"), None);
        assert!(refundable("credit_card") && refundable("qris"));
        assert!(!refundable("bank_transfer") && !refundable("echannel"));
    }
}
