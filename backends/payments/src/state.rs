//! Our payment state machine over Midtrans's `transaction_status`
//! (external-apis.md §1, the status table), applied to the status
//! Midtrans *confirms* (`GET /v2/{order_id}/status`), never to a webhook
//! body alone.
//!
//! States only move forward: every state has a rank, a status that would
//! lower it is stale, one that names the current state is a duplicate.
//! `pending` after `settlement` changes nothing; terminal states
//! (`denied`, `cancelled`, `expired`, `failed`, `refunded`, `charged_back`,
//! `reversed`) stay terminal. A card `capture` with `fraud_status:
//! challenge` waits in `challenge` for Midtrans to approve (→ `captured`)
//! or deny. `settlement → deny` (Permata VA, Mandiri bill, within
//! minutes) is the one documented reversal: the payment becomes
//! `reversed`, unpaid.

use crate::midtrans::{FraudStatus, TransactionStatus};

/// A payment's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Recorded, not yet charged at Midtrans (or the charge's answer is
    /// not known: a retry looks the order up first).
    Created,
    /// Charged, waiting for the customer (VA, QR, 3DS, Snap).
    Pending,
    /// Card pre-authorised.
    Authorized,
    /// Card captured, held by fraud screening for a decision.
    Challenge,
    /// Card captured and accepted: the money is secured, settles later.
    Captured,
    /// Funds received.
    Settled,
    /// Part refunded (stays paid).
    PartiallyRefunded,
    /// Refunded in full.
    Refunded,
    /// Part charged back.
    PartiallyChargedBack,
    /// Charged back in full.
    ChargedBack,
    /// Settled, then denied by the bank (Permata VA, Mandiri bill):
    /// unpaid.
    Reversed,
    /// Denied by the bank or the fraud system.
    Denied,
    /// Cancelled by us or Midtrans.
    Cancelled,
    /// Not paid in time.
    Expired,
    /// Midtrans failed to process it.
    Failed,
}

impl State {
    /// Every state.
    pub const ALL: [Self; 15] = [
        Self::Created,
        Self::Pending,
        Self::Authorized,
        Self::Challenge,
        Self::Captured,
        Self::Settled,
        Self::PartiallyRefunded,
        Self::Refunded,
        Self::PartiallyChargedBack,
        Self::ChargedBack,
        Self::Reversed,
        Self::Denied,
        Self::Cancelled,
        Self::Expired,
        Self::Failed,
    ];

    /// As stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Pending => "pending",
            Self::Authorized => "authorized",
            Self::Challenge => "challenge",
            Self::Captured => "captured",
            Self::Settled => "settled",
            Self::PartiallyRefunded => "partially_refunded",
            Self::Refunded => "refunded",
            Self::PartiallyChargedBack => "partially_charged_back",
            Self::ChargedBack => "charged_back",
            Self::Reversed => "reversed",
            Self::Denied => "denied",
            Self::Cancelled => "cancelled",
            Self::Expired => "expired",
            Self::Failed => "failed",
        }
    }

    /// The stored name back.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// Nothing moves it any more.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Refunded
                | Self::ChargedBack
                | Self::Reversed
                | Self::Denied
                | Self::Cancelled
                | Self::Expired
                | Self::Failed
        )
    }

    /// The money is (or was) ours: captured or settled, refunds included.
    pub fn is_paid(self) -> bool {
        matches!(
            self,
            Self::Captured
                | Self::Settled
                | Self::PartiallyRefunded
                | Self::Refunded
                | Self::PartiallyChargedBack
                | Self::ChargedBack
        )
    }
}

/// What a confirmed status does to a payment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// It moves to this state.
    Move(State),
    /// It is the state already (a duplicate): nothing changes.
    Same,
    /// It would move the payment back or out of a terminal state (a late
    /// or reordered notification): nothing changes.
    Stale,
}

/// The state Midtrans's `status` (with `fraud` for cards) names.
pub fn target(status: TransactionStatus, fraud: Option<FraudStatus>) -> State {
    use TransactionStatus as T;
    match status {
        T::Pending => State::Pending,
        T::Authorize => State::Authorized,
        T::Capture => match fraud {
            Some(FraudStatus::Challenge) => State::Challenge,
            Some(FraudStatus::Deny) => State::Denied,
            _ => State::Captured,
        },
        T::Settlement => State::Settled,
        T::Deny => State::Denied,
        T::Cancel => State::Cancelled,
        T::Expire => State::Expired,
        T::Failure => State::Failed,
        T::Refund => State::Refunded,
        T::PartialRefund => State::PartiallyRefunded,
        T::Chargeback => State::ChargedBack,
        T::PartialChargeback => State::PartiallyChargedBack,
    }
}

/// Whether `from` may become `to` (`from != to`). `created` takes any
/// confirmed status (our record of the charge was lost: Midtrans's word
/// is the truth); the rest follow the contract's status table.
fn allowed(from: State, to: State) -> bool {
    use State as S;
    match from {
        S::Created => to != S::Created,
        S::Pending => matches!(
            to,
            S::Authorized
                | S::Challenge
                | S::Captured
                | S::Settled
                | S::Denied
                | S::Cancelled
                | S::Expired
                | S::Failed
        ),
        S::Authorized => matches!(
            to,
            S::Challenge | S::Captured | S::Settled | S::Denied | S::Cancelled | S::Expired
        ),
        S::Challenge => matches!(to, S::Captured | S::Settled | S::Denied | S::Cancelled),
        S::Captured => matches!(to, S::Settled | S::Cancelled),
        S::Settled => matches!(
            to,
            S::PartiallyRefunded
                | S::Refunded
                | S::PartiallyChargedBack
                | S::ChargedBack
                | S::Reversed
        ),
        S::PartiallyRefunded => {
            matches!(to, S::Refunded | S::PartiallyChargedBack | S::ChargedBack)
        }
        S::PartiallyChargedBack => matches!(to, S::ChargedBack | S::Refunded),
        _ => false,
    }
}

/// What the confirmed `status` does to a payment in `from`.
pub fn step(from: State, status: TransactionStatus, fraud: Option<FraudStatus>) -> Step {
    let mut to = target(status, fraud);
    // The documented reversal: a settled VA or bill payment denied (a
    // card's late capture+deny after settlement is stale, not this).
    if from == State::Settled && status == TransactionStatus::Deny {
        to = State::Reversed;
    }
    if to == from {
        // A partial refund or chargeback again is a further one: the
        // caller compares amounts; the state stays.
        return Step::Same;
    }
    if allowed(from, to) {
        Step::Move(to)
    } else {
        Step::Stale
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::midtrans::FraudStatus as F;
    use crate::midtrans::TransactionStatus as T;
    use State as S;

    /// Every (state, status, fraud) triple against the table below: what
    /// is not listed as a move is `Same` when it names the state, else
    /// `Stale`.
    #[test]
    fn test_every_state_and_notification() {
        // `None` under a status other than capture: whatever the fraud
        // status says. `created` is checked apart (it takes any).
        let moves: &[(State, T, Option<F>, State)] = &[
            (S::Pending, T::Settlement, None, S::Settled),
            (S::Pending, T::Capture, Some(F::Accept), S::Captured),
            (S::Pending, T::Capture, None, S::Captured),
            (S::Pending, T::Capture, Some(F::Challenge), S::Challenge),
            (S::Pending, T::Capture, Some(F::Deny), S::Denied),
            (S::Pending, T::Authorize, None, S::Authorized),
            (S::Pending, T::Deny, None, S::Denied),
            (S::Pending, T::Cancel, None, S::Cancelled),
            (S::Pending, T::Expire, None, S::Expired),
            (S::Pending, T::Failure, None, S::Failed),
            (S::Authorized, T::Capture, Some(F::Accept), S::Captured),
            (S::Authorized, T::Capture, None, S::Captured),
            (S::Authorized, T::Capture, Some(F::Challenge), S::Challenge),
            (S::Authorized, T::Capture, Some(F::Deny), S::Denied),
            (S::Authorized, T::Settlement, None, S::Settled),
            (S::Authorized, T::Cancel, None, S::Cancelled),
            (S::Authorized, T::Expire, None, S::Expired),
            (S::Authorized, T::Deny, None, S::Denied),
            (S::Challenge, T::Capture, Some(F::Accept), S::Captured),
            (S::Challenge, T::Capture, None, S::Captured),
            (S::Challenge, T::Settlement, None, S::Settled),
            (S::Challenge, T::Deny, None, S::Denied),
            (S::Challenge, T::Capture, Some(F::Deny), S::Denied),
            (S::Challenge, T::Cancel, None, S::Cancelled),
            (S::Captured, T::Settlement, None, S::Settled),
            (S::Captured, T::Cancel, None, S::Cancelled),
            (S::Settled, T::Refund, None, S::Refunded),
            (S::Settled, T::PartialRefund, None, S::PartiallyRefunded),
            (S::Settled, T::Chargeback, None, S::ChargedBack),
            (
                S::Settled,
                T::PartialChargeback,
                None,
                S::PartiallyChargedBack,
            ),
            (S::Settled, T::Deny, None, S::Reversed),
            (S::PartiallyRefunded, T::Refund, None, S::Refunded),
            (S::PartiallyRefunded, T::Chargeback, None, S::ChargedBack),
            (
                S::PartiallyRefunded,
                T::PartialChargeback,
                None,
                S::PartiallyChargedBack,
            ),
            (S::PartiallyChargedBack, T::Chargeback, None, S::ChargedBack),
            (S::PartiallyChargedBack, T::Refund, None, S::Refunded),
        ];
        let frauds = [None, Some(F::Accept), Some(F::Challenge), Some(F::Deny)];
        let mut checked = 0;
        let mut unlisted = Vec::new();
        for status in T::ALL {
            for fraud in frauds {
                let to = target(status, fraud);
                assert_eq!(
                    step(S::Created, status, fraud),
                    Step::Move(to),
                    "created + {status:?}/{fraud:?}"
                );
            }
        }
        for from in State::ALL.into_iter().filter(|s| *s != S::Created) {
            for status in T::ALL {
                for fraud in frauds {
                    let got = step(from, status, fraud);
                    let listed = moves.iter().find(|(f, s, fr, _)| {
                        *f == from
                            && *s == status
                            && (*fr == fraud || (fr.is_none() && status != T::Capture))
                    });
                    if let Some((_, _, _, to)) = listed {
                        assert_eq!(got, Step::Move(*to), "{from:?} + {status:?}/{fraud:?}");
                    } else {
                        let named = target(status, fraud) == from;
                        let want = if named { Step::Same } else { Step::Stale };
                        if got != want {
                            unlisted.push(format!("({from:?}, {status:?}, {fraud:?}) -> {got:?}"));
                        }
                    }
                    if from.is_terminal() {
                        assert!(
                            !matches!(got, Step::Move(_)),
                            "{from:?} is terminal: {status:?}"
                        );
                    }
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 14 * 12 * 4);
        assert!(
            unlisted.is_empty(),
            "outcomes the table does not list:\n{}",
            unlisted.join("\n")
        );
    }

    #[test]
    fn test_never_backwards_and_duplicates_are_no_ops() {
        // A late pending after any later state changes nothing.
        for from in State::ALL
            .into_iter()
            .filter(|s| !matches!(s, S::Created | S::Pending))
        {
            assert_eq!(step(from, T::Pending, None), Step::Stale, "{from:?}");
        }
        assert_eq!(step(S::Pending, T::Pending, None), Step::Same);
        assert_eq!(step(S::Settled, T::Settlement, None), Step::Same);
        assert_eq!(
            step(S::Expired, T::Settlement, None),
            Step::Stale,
            "expired stays expired"
        );
        assert_eq!(step(S::Cancelled, T::Settlement, None), Step::Stale);
        assert_eq!(
            step(S::Settled, T::Capture, Some(F::Accept)),
            Step::Stale,
            "settled is after capture"
        );
        assert_eq!(step(S::Refunded, T::PartialRefund, None), Step::Stale);
        assert_eq!(
            step(S::PartiallyRefunded, T::PartialRefund, None),
            Step::Same,
            "a further partial refund: amounts decide"
        );
        assert_eq!(
            step(S::Reversed, T::Settlement, None),
            Step::Stale,
            "a reversal is final"
        );
        // A challenge waits: neither paid nor failed.
        assert_eq!(
            step(S::Pending, T::Capture, Some(F::Challenge)),
            Step::Move(S::Challenge)
        );
        assert!(!S::Challenge.is_paid() && !S::Challenge.is_terminal());
        // The reversal is unpaid.
        assert!(!S::Reversed.is_paid() && S::Reversed.is_terminal());
        for s in State::ALL {
            assert_eq!(State::parse(s.as_str()), Some(s));
        }
    }
}
