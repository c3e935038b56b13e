//! Fail points: named places on the dangerous lines of a money service
//! (after a number is taken, after a provider answered, before a commit)
//! where a test makes the service fail or die, to prove that a crash there
//! loses nothing and charges nothing twice.
//!
//! A service reads its points from `TIERGATE_<SERVICE>_FAILPOINTS`
//! (`name=action,…`) or a test sets them on its settings. Actions:
//! `error` (the operation fails with a 500 and rolls back), `error*N`
//! (the first N times only), `abort` (the process dies on the spot, as a
//! crash or `kill -9` would). With none set, [`Failpoints::hit`] is one
//! branch on an empty map.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crate::error::ApiError;

#[derive(Debug)]
enum Action {
    /// Fail this many more times (`u32::MAX`: always).
    Error(AtomicU32),
    Abort,
}

/// A service's fail points. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Failpoints(Arc<HashMap<String, Action>>);

impl Failpoints {
    /// Parses `name=action,…`; an empty string is none.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut points = HashMap::new();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let Some((name, action)) = item.split_once('=') else {
                return Err(format!("{item:?}: expected name=action"));
            };
            let action = match action.trim() {
                "abort" => Action::Abort,
                "error" => Action::Error(AtomicU32::new(u32::MAX)),
                other => match other.strip_prefix("error*").map(str::parse::<u32>) {
                    Some(Ok(n)) => Action::Error(AtomicU32::new(n)),
                    _ => return Err(format!("{item:?}: the action is error, error*N or abort")),
                },
            };
            points.insert(name.trim().to_owned(), action);
        }
        Ok(Self(Arc::new(points)))
    }

    /// Passes `name`: fails or aborts there when told to.
    pub fn hit(&self, name: &str) -> Result<(), ApiError> {
        if self.0.is_empty() {
            return Ok(());
        }
        match self.0.get(name) {
            None => Ok(()),
            Some(Action::Abort) => {
                tracing::error!(failpoint = name, "fail point: aborting the process");
                std::process::abort();
            }
            Some(Action::Error(left)) => {
                let fired = left
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| match n {
                        0 => None,
                        u32::MAX => Some(u32::MAX),
                        n => Some(n - 1),
                    })
                    .is_ok();
                if fired {
                    tracing::warn!(failpoint = name, "fail point: failing");
                    Err(ApiError::internal(&format!("fail point {name}")))
                } else {
                    Ok(())
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_points_fail_as_told() {
        let none = Failpoints::default();
        assert!(none.hit("a").is_ok());
        let p = Failpoints::parse("a=error*2, b=error").unwrap();
        assert!(p.hit("a").is_err());
        assert!(p.hit("a").is_err());
        assert!(p.hit("a").is_ok(), "only twice");
        for _ in 0..5 {
            assert!(p.hit("b").is_err());
        }
        assert!(p.hit("c").is_ok());
        for bad in ["a", "a=explode", "a=error*x"] {
            assert!(Failpoints::parse(bad).is_err(), "{bad}");
        }
        assert!(Failpoints::parse("").unwrap().hit("a").is_ok());
    }
}
