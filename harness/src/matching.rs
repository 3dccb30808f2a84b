//! JSON subset matching: does a frame or response body the server sent contain what a
//! scenario expects? Mismatches are described by path so a failure says exactly where.

use serde_json::Value;

/// Matches `actual` against the pattern `expected`:
///
/// * an object matches when every key of the pattern is present in `actual` and matches
///   (extra keys in `actual` are fine);
/// * an array matches an array of the same length, element by element;
/// * numbers compare by value (`1` matches `1.0`); other scalars compare exactly;
/// * the strings `"$any"` (present, any value), `"$absent"` (as an object value: the key must
///   not be there), `"$string"`, `"$number"`, `"$nonempty"` (a non-empty string) are
///   wildcards; `"$$x"` stands for the literal string `"$x"`.
///
/// Returns a description of the first mismatch.
pub fn matches(expected: &Value, actual: &Value) -> Result<(), String> {
    match_at(expected, Some(actual), "")
}

fn show_path(path: &str) -> &str {
    if path.is_empty() { "the top level" } else { path }
}

fn match_at(expected: &Value, actual: Option<&Value>, path: &str) -> Result<(), String> {
    if let Value::String(s) = expected
        && let Some(wild) = s.strip_prefix('$')
        && !wild.starts_with('$')
    {
        return match (wild, actual) {
            ("absent", None) => Ok(()),
            ("absent", Some(v)) => Err(format!("at {}: expected no such key, got {}", show_path(path), brief(v))),
            (_, None) => Err(format!("at {}: missing", show_path(path))),
            ("any", Some(_)) => Ok(()),
            ("string", Some(Value::String(_))) => Ok(()),
            ("number", Some(Value::Number(_))) => Ok(()),
            ("nonempty", Some(Value::String(v))) if !v.is_empty() => Ok(()),
            ("string" | "number" | "nonempty", Some(v)) => {
                Err(format!("at {}: expected {wild}, got {}", show_path(path), brief(v)))
            }
            (other, _) => Err(format!("at {}: unknown wildcard `${other}`", show_path(path))),
        };
    }
    let Some(actual) = actual else {
        return Err(format!("at {}: missing", show_path(path)));
    };
    match (expected, actual) {
        (Value::Object(want), Value::Object(got)) => {
            for (key, want_value) in want {
                match_at(want_value, got.get(key), &format!("{path}.{key}"))?;
            }
            Ok(())
        }
        (Value::Array(want), Value::Array(got)) => {
            if want.len() != got.len() {
                return Err(format!(
                    "at {}: expected an array of {} elements, got {}",
                    show_path(path),
                    want.len(),
                    got.len()
                ));
            }
            for (i, (w, g)) in want.iter().zip(got).enumerate() {
                match_at(w, Some(g), &format!("{path}[{i}]"))?;
            }
            Ok(())
        }
        (Value::Number(w), Value::Number(g)) if w.as_f64() == g.as_f64() => Ok(()),
        (Value::String(w), Value::String(g)) if literal(w) == g => Ok(()),
        (w, g) if w == g => Ok(()),
        (w, g) => Err(format!("at {}: expected {}, got {}", show_path(path), brief(w), brief(g))),
    }
}

/// The literal a pattern string stands for (`$$x` → `$x`).
fn literal(pattern: &str) -> &str {
    if pattern.starts_with("$$") { &pattern[1..] } else { pattern }
}

/// A short rendering of a value for failure messages (long values are cut).
pub fn brief(v: &Value) -> String {
    clip(&v.to_string(), 300)
}

/// Cuts `text` to at most `max` bytes on a character boundary, saying how much was left out.
pub fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes in all)", &text[..end], text.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn object_subset_ignores_extra_keys() {
        let got = json!({"type": "welcome", "user": "alice", "session": "s1", "heartbeat_ms": 30000});
        assert!(matches(&json!({"type": "welcome", "user": "alice"}), &got).is_ok());
        let err = matches(&json!({"type": "welcome", "user": "bob"}), &got).unwrap_err();
        assert!(err.contains(".user") && err.contains("\"bob\"") && err.contains("\"alice\""), "{err}");
    }

    #[test]
    fn nested_and_arrays() {
        let got = json!({"a": {"b": [1, {"c": true, "d": 2}]}});
        assert!(matches(&json!({"a": {"b": [1, {"c": true}]}}), &got).is_ok());
        let err = matches(&json!({"a": {"b": [1]}}), &got).unwrap_err();
        assert!(err.contains(".a.b") && err.contains("1 elements, got 2"), "{err}");
        let err = matches(&json!({"a": {"b": [1, {"c": false}]}}), &got).unwrap_err();
        assert!(err.contains(".a.b[1].c"), "{err}");
    }

    #[test]
    fn null_must_be_present_and_null() {
        assert!(matches(&json!({"ref": null}), &json!({"ref": null})).is_ok());
        assert!(matches(&json!({"ref": null}), &json!({})).unwrap_err().contains("missing"));
        assert!(matches(&json!({"ref": null}), &json!({"ref": "1"})).is_err());
    }

    #[test]
    fn numbers_compare_by_value() {
        assert!(matches(&json!({"n": 1}), &json!({"n": 1.0})).is_ok());
        assert!(matches(&json!({"n": 1}), &json!({"n": 2})).is_err());
        assert!(matches(&json!({"n": 1}), &json!({"n": "1"})).is_err());
    }

    #[test]
    fn wildcards() {
        let got = json!({"id": "m-1", "n": 3, "empty": ""});
        assert!(matches(&json!({"id": "$any", "n": "$number", "x": "$absent"}), &got).is_ok());
        assert!(matches(&json!({"id": "$string"}), &got).is_ok());
        assert!(matches(&json!({"id": "$nonempty"}), &got).is_ok());
        assert!(matches(&json!({"empty": "$nonempty"}), &got).is_err());
        assert!(matches(&json!({"x": "$any"}), &got).unwrap_err().contains("missing"));
        assert!(matches(&json!({"id": "$absent"}), &got).unwrap_err().contains("expected no such key"));
        assert!(matches(&json!({"n": "$string"}), &got).is_err());
        assert!(matches(&json!({"n": "$bogus"}), &got).unwrap_err().contains("unknown wildcard"));
    }

    #[test]
    fn dollar_escape_is_literal() {
        assert!(matches(&json!({"p": "$$any"}), &json!({"p": "$any"})).is_ok());
        assert!(matches(&json!({"p": "$$any"}), &json!({"p": "x"})).is_err());
    }

    #[test]
    fn clip_respects_char_boundaries() {
        assert_eq!(clip("abc", 10), "abc");
        let s = "ééééé";
        let c = clip(s, 3);
        assert!(c.starts_with('é') && c.contains("10 bytes"), "{c}");
    }
}
