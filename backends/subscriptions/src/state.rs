//! The subscription state machine (MONEY.md "Lifecycle"): what each input
//! does in each state. It never moves backwards: an input that does not
//! apply in a state changes nothing.
//!
//! ```text
//! pending ──paid──▶ active ──paid (renewal)──▶ active
//!                     │ period ended unpaid        │ period ended, cancel_at_period_end
//!                     ▼                            ▼
//!                  past_due ──paid──▶ active    canceled
//!                     │ grace over
//!                     ▼
//!                  expired ──paid (late)──▶ active (a new period from the payment)
//! ```

use serde::Serialize;

/// A subscription's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Its first invoice is unpaid: the subject is still on FREE.
    Pending,
    /// Paid for the current period.
    Active,
    /// The period ended with its renewal unpaid: the tier is kept during
    /// the grace period.
    PastDue,
    /// Ended at a period's end as the customer asked: FREE.
    Canceled,
    /// The grace period ended unpaid: FREE.
    Expired,
}

impl State {
    /// Its name in the API and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Active => "active",
            State::PastDue => "past_due",
            State::Canceled => "canceled",
            State::Expired => "expired",
        }
    }

    /// The state named `s`.
    pub fn parse(s: &str) -> Option<Self> {
        [
            State::Pending,
            State::Active,
            State::PastDue,
            State::Canceled,
            State::Expired,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }

    /// Whether the subject has the plan's tier in this state.
    pub fn grants_tier(self) -> bool {
        matches!(self, State::Active | State::PastDue)
    }
}

/// What happens to a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// An invoice of it was paid (checkout, renewal, or a late payment).
    Paid,
    /// Its period ended with the renewal unpaid.
    PeriodEndedUnpaid,
    /// Its period ended with `cancel_at_period_end` set.
    PeriodEndedCanceling,
    /// The grace period ended unpaid.
    GraceOver,
}

/// The state `input` moves `from` to, or `None` when it does not apply.
pub fn step(from: State, input: Input) -> Option<State> {
    use Input as I;
    use State as S;
    match (from, input) {
        (_, I::Paid) => Some(S::Active),
        (S::Active, I::PeriodEndedUnpaid) => Some(S::PastDue),
        (S::Active | S::PastDue, I::PeriodEndedCanceling) => Some(S::Canceled),
        (S::PastDue, I::GraceOver) => Some(S::Expired),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_every_state_and_input() {
        use Input as I;
        use State as S;
        let n = None;
        // rows: from; columns: Paid, PeriodEndedUnpaid, PeriodEndedCanceling, GraceOver
        let table = [
            (S::Pending, [Some(S::Active), n, n, n]),
            (
                S::Active,
                [Some(S::Active), Some(S::PastDue), Some(S::Canceled), n],
            ),
            (
                S::PastDue,
                [Some(S::Active), n, Some(S::Canceled), Some(S::Expired)],
            ),
            (S::Canceled, [Some(S::Active), n, n, n]),
            (S::Expired, [Some(S::Active), n, n, n]),
        ];
        let inputs = [
            I::Paid,
            I::PeriodEndedUnpaid,
            I::PeriodEndedCanceling,
            I::GraceOver,
        ];
        for (from, row) in table {
            for (input, want) in inputs.iter().zip(row) {
                assert_eq!(step(from, *input), want, "{from:?} + {input:?}");
            }
            assert_eq!(State::parse(from.as_str()), Some(from));
        }
        assert_eq!(
            [S::Pending, S::Active, S::PastDue, S::Canceled, S::Expired].map(State::grants_tier),
            [false, true, true, false, false]
        );
    }
}
