//! PPN (Indonesian VAT) on an invoice, in whole rupiah.
//!
//! Since 1 January 2025 PPN is 12% (UU HPP 7/2021), charged on a *DPP
//! nilai lain* of 11/12 of the price for everything that is not a luxury
//! good (PMK 131/2024): an effective 11%. The rule, applied once per
//! invoice (never per line):
//!
//! ```text
//! subtotal = Σ line amounts            (credit lines are negative)
//! dpp      = round(subtotal × 11 / 12)
//! ppn      = round(dpp × 12 / 100)
//! total    = subtotal + ppn
//! ```
//!
//! `round` is half up (0.5 rupiah goes up), done in integers: no float
//! is ever involved. A seller that is not a PKP (`billing.seller.pkp:
//! false`) charges no PPN: dpp and ppn are 0, total = subtotal.
//!
//! A credit note of `amount` (what the buyer gets back, PPN included)
//! reverses PPN in proportion: `ppn = round(invoice.ppn × amount /
//! invoice.total)`, and the rest is the price part.

use serde::Serialize;

/// The totals of an invoice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Totals {
    /// Σ line amounts, before PPN.
    pub subtotal: i64,
    /// The tax base: 11/12 of the subtotal (0 when not a PKP).
    pub dpp: i64,
    /// PPN: 12% of the DPP.
    pub ppn: i64,
    /// subtotal + PPN.
    pub total: i64,
}

/// Why totals cannot be computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TotalsError {
    /// The credits exceed the charges.
    #[error("the lines add up to less than zero")]
    Negative,
    /// An amount out of range.
    #[error("an amount is out of range")]
    Overflow,
}

/// `round(n / d)` half up, for `n >= 0`, `d > 0`.
pub fn div_round(n: i128, d: i128) -> i128 {
    (n + d / 2) / d
}

/// PPN's fixed rates.
const DPP_NUM: i128 = 11;
const DPP_DEN: i128 = 12;
const PPN_PERCENT: i128 = 12;

impl Totals {
    /// The totals of a subtotal (`pkp`: whether the seller charges PPN).
    pub fn of_subtotal(subtotal: i64, pkp: bool) -> Result<Self, TotalsError> {
        if subtotal < 0 {
            return Err(TotalsError::Negative);
        }
        let (dpp, ppn) = if pkp {
            let dpp = div_round(i128::from(subtotal) * DPP_NUM, DPP_DEN);
            let ppn = div_round(dpp * PPN_PERCENT, 100);
            (dpp, ppn)
        } else {
            (0, 0)
        };
        let dpp = i64::try_from(dpp).map_err(|_| TotalsError::Overflow)?;
        let ppn = i64::try_from(ppn).map_err(|_| TotalsError::Overflow)?;
        let total = subtotal.checked_add(ppn).ok_or(TotalsError::Overflow)?;
        Ok(Self {
            subtotal,
            dpp,
            ppn,
            total,
        })
    }

    /// The totals of lines, each `quantity × unit_price`.
    pub fn of_lines(
        lines: impl IntoIterator<Item = (i64, i64)>,
        pkp: bool,
    ) -> Result<Self, TotalsError> {
        let mut subtotal: i64 = 0;
        for (quantity, unit_price) in lines {
            let amount = quantity
                .checked_mul(unit_price)
                .ok_or(TotalsError::Overflow)?;
            subtotal = subtotal.checked_add(amount).ok_or(TotalsError::Overflow)?;
        }
        Self::of_subtotal(subtotal, pkp)
    }

    /// What a credit note of `amount` (PPN included, `0 < amount <=
    /// total`) reverses: `(price part, ppn part)`.
    pub fn credit(&self, amount: i64) -> (i64, i64) {
        if self.total <= 0 {
            return (amount, 0);
        }
        let ppn = div_round(
            i128::from(self.ppn) * i128::from(amount),
            i128::from(self.total),
        );
        // ppn <= self.ppn <= i64::MAX, so the conversion holds.
        let ppn = i64::try_from(ppn).unwrap_or(self.ppn);
        (amount - ppn, ppn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_known_amounts() {
        // (subtotal, dpp, ppn, total)
        let cases = [
            (0, 0, 0, 0),
            (1, 1, 0, 1),
            (6, 6, 1, 7),
            (12, 11, 1, 13),
            (99_000, 90_750, 10_890, 109_890),
            (249_000, 228_250, 27_390, 276_390),
            (1_000_000, 916_667, 110_000, 1_110_000),
            (100_000_000, 91_666_667, 11_000_000, 111_000_000),
        ];
        for (subtotal, dpp, ppn, total) in cases {
            assert_eq!(
                Totals::of_subtotal(subtotal, true).unwrap(),
                Totals {
                    subtotal,
                    dpp,
                    ppn,
                    total
                },
                "{subtotal}"
            );
        }
        assert_eq!(
            Totals::of_subtotal(99_000, false).unwrap(),
            Totals {
                subtotal: 99_000,
                dpp: 0,
                ppn: 0,
                total: 99_000
            }
        );
        assert_eq!(
            Totals::of_subtotal(-1, true),
            Err(TotalsError::Negative),
            "credits above charges"
        );
        assert_eq!(
            Totals::of_lines([(1, 249_000), (1, -66_400)], true)
                .unwrap()
                .subtotal,
            182_600
        );
        assert_eq!(
            Totals::of_lines([(2, i64::MAX)], true),
            Err(TotalsError::Overflow)
        );
    }

    /// Every amount from Rp 1 to Rp 100.000.000 at a sample of points
    /// (all of the first 100.000, then a stride of 997 and random ones):
    /// total = subtotal + PPN, and PPN is 11% within a rupiah.
    #[test]
    fn test_total_is_subtotal_plus_ppn_and_effectively_eleven_percent() {
        let mut check = |s: i64| {
            let t = Totals::of_subtotal(s, true).unwrap();
            assert_eq!(t.total, t.subtotal + t.ppn, "{s}");
            // |ppn − 0.11·s| ≤ 0.5 + 0.06 < 1 rupiah.
            let off = (i128::from(t.ppn) * 100 - i128::from(s) * 11).abs();
            assert!(off < 100, "Rp {s}: PPN {} is {off}/100 off 11%", t.ppn);
            assert!(t.dpp <= s && t.ppn <= t.dpp, "{s}");
        };
        (1..=100_000).for_each(&mut check);
        (100_000..=100_000_000).step_by(997).for_each(&mut check);
        check(100_000_000);
        let mut rng = fastrand::Rng::with_seed(17);
        for _ in 0..100_000 {
            check(rng.i64(1..=100_000_000));
        }
    }

    #[test]
    fn test_credit_reverses_ppn_in_proportion() {
        let t = Totals::of_subtotal(1_000_000, true).unwrap();
        assert_eq!(t.credit(t.total), (1_000_000, 110_000), "all of it");
        assert_eq!(t.credit(555_000), (500_000, 55_000), "half");
        assert_eq!(t.credit(1), (1, 0));
        let free = Totals::of_subtotal(0, true).unwrap();
        assert_eq!(free.credit(0), (0, 0));
    }
}
