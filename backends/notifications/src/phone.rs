//! Phone numbers in E.164 (`+` and 8 to 15 digits, the first not 0), with
//! the forms Indonesians write normalised: `08…` and `628…` become
//! `+628…`; spaces, dashes, dots and parentheses are dropped.

/// `raw` as an E.164 number, or why it is not one.
pub fn normalize(raw: &str) -> Result<String, &'static str> {
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        return Err("a phone number is required");
    }
    let plus = trimmed.starts_with('+');
    let mut digits = String::with_capacity(trimmed.len());
    for (i, c) in trimmed.chars().enumerate() {
        match c {
            '0'..='9' => digits.push(c),
            '+' if i == 0 => {}
            ' ' | '-' | '.' | '(' | ')' => {}
            _ => return Err("only digits, spaces, dashes, dots, parentheses and a leading +"),
        }
    }
    let national = if plus {
        digits
    } else if let Some(rest) = digits.strip_prefix("00") {
        // The international prefix dialled from Indonesia.
        rest.to_owned()
    } else if let Some(rest) = digits.strip_prefix('0') {
        // An Indonesian national number (`0812…`).
        format!("62{rest}")
    } else if digits.starts_with("62") {
        digits
    } else {
        return Err("start with +<country code>, or 0 for an Indonesian number");
    };
    if national.starts_with('0') {
        return Err("a country code does not start with 0");
    }
    if !(8..=15).contains(&national.len()) {
        return Err("E.164 numbers have 8 to 15 digits");
    }
    if let Some(subscriber) = national.strip_prefix("62") {
        // Indonesian mobile numbers: 8xx and 9 to 12 digits after 62.
        if subscriber.starts_with('0') {
            return Err("no 0 after +62 (write +62812…, not +620812…)");
        }
        if !(8..=12).contains(&subscriber.len()) {
            return Err("an Indonesian number has 8 to 12 digits after +62");
        }
    }
    Ok(format!("+{national}"))
}

#[cfg(test)]
mod tests {
    use super::normalize;

    #[test]
    fn test_indonesian_and_international_forms() {
        let table: &[(&str, Result<&str, ()>)] = &[
            ("081234567890", Ok("+6281234567890")),
            ("0812-3456-7890", Ok("+6281234567890")),
            ("0812 3456 7890", Ok("+6281234567890")),
            ("(0812) 3456.7890", Ok("+6281234567890")),
            ("6281234567890", Ok("+6281234567890")),
            ("+62 812 3456 7890", Ok("+6281234567890")),
            ("006281234567890", Ok("+6281234567890")),
            ("+14155550100", Ok("+14155550100")),
            ("+442071838750", Ok("+442071838750")),
            ("+6208123456789", Err(())),
            ("+62812", Err(())),
            ("+6281234567890123", Err(())),
            ("1234567", Err(())),
            ("", Err(())),
            ("   ", Err(())),
            ("+62812abc4567", Err(())),
            ("++6281234567890", Err(())),
            ("0812+34567890", Err(())),
            ("+0812345678", Err(())),
            ("+1234567890123456", Err(())),
        ];
        for (raw, want) in table {
            let got = normalize(raw);
            match want {
                Ok(w) => assert_eq!(got.as_deref(), Ok(*w), "{raw}"),
                Err(()) => assert!(got.is_err(), "{raw} gave {got:?}"),
            }
        }
    }

    #[test]
    fn test_normalized_numbers_are_fixed_points() {
        for raw in ["081234567890", "+14155550100", "6285712345678"] {
            let once = normalize(raw).unwrap();
            assert_eq!(normalize(&once).unwrap(), once);
        }
    }
}
