//! Literal durations (`"30s"`, `"1h30m"`) and sizes (`"10KiB"`) as written in policy files.

// One spelling for policy and scenario files; the grammar lives where the harness shares it.
pub use wsgate_grammar::duration::{format_duration, parse_duration};

/// Parses a size literal: a number of bytes with an optional unit `B`, `KiB`, `MiB`, `KB`, `MB`
/// (`"10KiB"`, `"1 MiB"`, `"512B"`). Returns `None` for anything else.
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 || digits > 15 {
        return None;
    }
    let number: u64 = text[..digits].parse().ok()?;
    let factor = match text[digits..].trim() {
        "" | "B" => 1,
        "KiB" => 1024,
        "MiB" => 1024 * 1024,
        "KB" => 1000,
        "MB" => 1000 * 1000,
        _ => return None,
    };
    number.checked_mul(factor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10KiB"), Some(10240));
        assert_eq!(parse_size("1 MiB"), Some(1 << 20));
        assert_eq!(parse_size("512B"), Some(512));
        assert_eq!(parse_size("10240"), Some(10240));
        assert_eq!(parse_size("10kb"), None);
        assert_eq!(parse_size("999999999999999MiB"), None);
    }

    proptest! {
        #[test]
        fn parsers_never_panic(s in ".{0,40}") {
            let _ = parse_duration(&s);
            let _ = parse_size(&s);
        }
    }
}
