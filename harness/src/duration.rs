//! Durations as scenario files write them (`500ms`, `2s`, `1m30s`), in the same spelling as
//! policy files, so a security engineer writes one syntax everywhere.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use wsgate_grammar::duration::parse_duration;

/// A duration read from a scenario file, in the policy files' grammar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Dur(pub(crate) Duration);

impl Dur {
    /// Shorthand for a whole number of seconds.
    pub(crate) const fn secs(s: u64) -> Self {
        Dur(Duration::from_secs(s))
    }

    /// Shorthand for a number of milliseconds.
    #[cfg(test)]
    pub(crate) const fn millis(ms: u64) -> Self {
        Dur(Duration::from_millis(ms))
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms.is_multiple_of(1000) { write!(f, "{}s", ms / 1000) } else { write!(f, "{ms}ms") }
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        parse_duration(&text)
            .map(Dur)
            .ok_or_else(|| serde::de::Error::custom(format!("`{text}` is not a duration (write e.g. 500ms, 2s, 1m)")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_compactly() {
        assert_eq!(Dur::secs(5).to_string(), "5s");
        assert_eq!(Dur::millis(1500).to_string(), "1500ms");
    }
}
