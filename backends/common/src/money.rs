//! Money: whole rupiah in an `i64`, never a float. Arithmetic is checked
//! (an overflow is an error, not a wrap); display is Indonesian,
//! `Rp 1.234.567` (a dot groups thousands; rupiah have no minor unit in
//! practice).

use std::fmt;

use serde::{Deserialize, Serialize};

/// An amount of Indonesian rupiah (may be negative: a credit line).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Rupiah(pub i64);

/// An arithmetic result out of `i64`'s range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the amount is out of range")]
pub struct Overflow;

impl Rupiah {
    /// Zero.
    pub const ZERO: Rupiah = Rupiah(0);

    /// The amount in whole rupiah.
    pub fn value(self) -> i64 {
        self.0
    }

    /// `self + other`.
    pub fn checked_add(self, other: Rupiah) -> Result<Rupiah, Overflow> {
        self.0.checked_add(other.0).map(Rupiah).ok_or(Overflow)
    }

    /// `self - other`.
    pub fn checked_sub(self, other: Rupiah) -> Result<Rupiah, Overflow> {
        self.0.checked_sub(other.0).map(Rupiah).ok_or(Overflow)
    }

    /// `self × n` (a unit price times a quantity).
    pub fn checked_mul(self, n: i64) -> Result<Rupiah, Overflow> {
        self.0.checked_mul(n).map(Rupiah).ok_or(Overflow)
    }

    /// The sum of `amounts`.
    pub fn sum(amounts: impl IntoIterator<Item = Rupiah>) -> Result<Rupiah, Overflow> {
        amounts
            .into_iter()
            .try_fold(Rupiah::ZERO, |acc, a| acc.checked_add(a))
    }

    /// Whether it is below zero.
    pub fn is_negative(self) -> bool {
        self.0 < 0
    }
}

impl fmt::Display for Rupiah {
    /// `Rp 1.234.567`; negative amounts `-Rp 1.234`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let digits = self.0.unsigned_abs().to_string();
        let mut grouped = String::with_capacity(digits.len() + digits.len() / 3 + 4);
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                grouped.push('.');
            }
            grouped.push(c);
        }
        if self.0 < 0 {
            write!(f, "-Rp {grouped}")
        } else {
            write!(f, "Rp {grouped}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_indonesian_formatting() {
        for (v, s) in [
            (0, "Rp 0"),
            (7, "Rp 7"),
            (999, "Rp 999"),
            (1_000, "Rp 1.000"),
            (99_000, "Rp 99.000"),
            (1_234_567, "Rp 1.234.567"),
            (100_000_000, "Rp 100.000.000"),
            (-1_234, "-Rp 1.234"),
            (i64::MIN, "-Rp 9.223.372.036.854.775.808"),
        ] {
            assert_eq!(Rupiah(v).to_string(), s);
        }
    }

    #[test]
    fn test_arithmetic_is_checked() {
        assert_eq!(Rupiah(2).checked_add(Rupiah(3)), Ok(Rupiah(5)));
        assert_eq!(Rupiah(99_000).checked_mul(12), Ok(Rupiah(1_188_000)));
        assert_eq!(Rupiah(i64::MAX).checked_add(Rupiah(1)), Err(Overflow));
        assert_eq!(Rupiah(i64::MIN).checked_sub(Rupiah(1)), Err(Overflow));
        assert_eq!(Rupiah(i64::MAX).checked_mul(2), Err(Overflow));
        assert_eq!(
            Rupiah::sum([Rupiah(10), Rupiah(-3), Rupiah(4)]),
            Ok(Rupiah(11))
        );
        assert_eq!(serde_json::to_string(&Rupiah(1_500)).unwrap(), "1500");
        assert_eq!(serde_json::from_str::<Rupiah>("-20").unwrap(), Rupiah(-20));
    }
}
