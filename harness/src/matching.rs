//! JSON subset matching: does a frame or response body the server sent contain what a
//! scenario expects? Mismatches are described by path so a failure says exactly where. A
//! pattern can also save a value it matched (`$save:NAME`) and require one saved earlier
//! (`$saved:NAME`), so a scenario can say "the same message id on every instance".

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

/// Values saved by earlier steps (`$save:NAME` in a pattern, `save_id` of `publish`), by name.
pub(crate) type Saved = BTreeMap<String, Value>;

/// The wildcards that stand for a kind of value.
const WILDCARDS: [&str; 5] = ["any", "absent", "string", "number", "nonempty"];

/// Whether `name` may name a saved value: letters, digits, `-`, `_`, `.`.
pub(crate) fn valid_saved_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// Checks a pattern before anything runs: every `$…` string is a known wildcard, and every
/// `$saved:NAME` names something in `saved`. Returns the names the pattern saves (`$save:NAME`).
pub(crate) fn check_pattern(pattern: &Value, saved: &BTreeSet<String>) -> Result<Vec<String>, String> {
    let mut saves = Vec::new();
    check_at(pattern, "", saved, &mut saves)?;
    Ok(saves)
}

fn check_at(pattern: &Value, path: &str, saved: &BTreeSet<String>, saves: &mut Vec<String>) -> Result<(), String> {
    match pattern {
        Value::String(s) => {
            let Some(wild) = s.strip_prefix('$').filter(|w| !w.starts_with('$')) else {
                return Ok(());
            };
            let at = show_path(path);
            if let Some(name) = wild.strip_prefix("save:") {
                if !valid_saved_name(name) {
                    return Err(format!("at {at}: `$save:{name}`: use letters, digits, `-`, `_`, `.` in the name"));
                }
                saves.push(name.to_string());
            } else if let Some(name) = wild.strip_prefix("saved:") {
                if !saved.contains(name) {
                    return Err(format!("at {at}: `$saved:{name}`: no earlier step saved a value as `{name}`"));
                }
            } else if !WILDCARDS.contains(&wild) {
                return Err(format!(
                    "at {at}: unknown wildcard `${wild}` (wildcards: $any, $absent, $string, $number, $nonempty, \
                     $save:NAME, $saved:NAME; write `$${wild}` for the literal text)"
                ));
            }
            Ok(())
        }
        Value::Object(map) => map.iter().try_for_each(|(k, v)| check_at(v, &format!("{path}.{k}"), saved, saves)),
        Value::Array(items) => {
            items.iter().enumerate().try_for_each(|(i, v)| check_at(v, &format!("{path}[{i}]"), saved, saves))
        }
        _ => Ok(()),
    }
}

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
pub(crate) fn matches(expected: &Value, actual: &Value) -> Result<(), String> {
    matches_saving(expected, actual, &mut Saved::new())
}

/// [`matches`], plus `"$save:NAME"` (present, any value; saved under NAME when the whole
/// pattern matches — nothing is saved from a mismatch) and `"$saved:NAME"` (equal to the value
/// saved under NAME; numbers by value).
pub(crate) fn matches_saving(expected: &Value, actual: &Value, saved: &mut Saved) -> Result<(), String> {
    let mut captured = Saved::new();
    match_at(expected, Some(actual), "", saved, &mut captured)?;
    saved.extend(captured);
    Ok(())
}

fn show_path(path: &str) -> &str {
    if path.is_empty() { "the top level" } else { path }
}

fn match_at(
    expected: &Value,
    actual: Option<&Value>,
    path: &str,
    saved: &Saved,
    captured: &mut Saved,
) -> Result<(), String> {
    if let Value::String(s) = expected
        && let Some(wild) = s.strip_prefix('$')
        && !wild.starts_with('$')
    {
        if let Some(name) = wild.strip_prefix("save:") {
            let actual = actual.ok_or_else(|| format!("at {}: missing", show_path(path)))?;
            captured.insert(name.to_string(), actual.clone());
            return Ok(());
        }
        if let Some(name) = wild.strip_prefix("saved:") {
            let want = captured
                .get(name)
                .or_else(|| saved.get(name))
                .ok_or_else(|| format!("at {}: nothing was saved as `{name}`", show_path(path)))?;
            let actual = actual.ok_or_else(|| format!("at {}: missing", show_path(path)))?;
            return match (want, actual) {
                (Value::Number(w), Value::Number(g)) if w.as_f64() == g.as_f64() => Ok(()),
                (w, g) if w == g => Ok(()),
                (w, g) => {
                    Err(format!("at {}: expected {} (saved as `{name}`), got {}", show_path(path), brief(w), brief(g)))
                }
            };
        }
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
                match_at(want_value, got.get(key), &format!("{path}.{key}"), saved, captured)?;
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
                match_at(w, Some(g), &format!("{path}[{i}]"), saved, captured)?;
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
pub(crate) fn brief(v: &Value) -> String {
    clip(&v.to_string(), 300)
}

/// Cuts `text` to at most `max` bytes on a character boundary, saying how much was left out.
pub(crate) fn clip(text: &str, max: usize) -> String {
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
    fn save_then_require_the_same_value() {
        let mut saved = Saved::new();
        let frame = json!({"type": "message", "id": "m-7", "data": {"n": 1}});
        // A mismatch saves nothing.
        assert!(matches_saving(&json!({"type": "pong", "id": "$save:id"}), &frame, &mut saved).is_err());
        assert!(saved.is_empty());
        matches_saving(&json!({"type": "message", "id": "$save:id"}), &frame, &mut saved).unwrap();
        assert_eq!(saved["id"], json!("m-7"));
        matches_saving(&json!({"id": "$saved:id"}), &frame, &mut saved).unwrap();
        let other = json!({"id": "m-8"});
        let e = matches_saving(&json!({"id": "$saved:id"}), &other, &mut saved).unwrap_err();
        assert!(e.contains(".id") && e.contains("\"m-7\" (saved as `id`)") && e.contains("\"m-8\""), "{e}");
        assert!(matches_saving(&json!({"x": "$saved:id"}), &frame, &mut saved).unwrap_err().contains("missing"));
        let e = matches_saving(&json!({"id": "$saved:nope"}), &frame, &mut saved).unwrap_err();
        assert!(e.contains("nothing was saved as `nope`"), "{e}");
        // Plain `matches` keeps nothing.
        assert!(matches(&json!({"id": "$save:x"}), &frame).is_ok());
    }

    #[test]
    fn patterns_are_checked_before_anything_runs() {
        let mut saved = BTreeSet::new();
        let saves = check_pattern(&json!({"id": "$save:m1", "a": ["$any", "$$lit", {"b": "$nonempty"}]}), &saved);
        assert_eq!(saves.unwrap(), vec!["m1".to_string()]);
        saved.insert("m1".to_string());
        assert!(check_pattern(&json!({"id": "$saved:m1"}), &saved).is_ok());
        let e = check_pattern(&json!({"id": "$saved:m2"}), &saved).unwrap_err();
        assert!(e.contains("at .id") && e.contains("no earlier step saved"), "{e}");
        let e = check_pattern(&json!({"a": [{"b": "$bogus"}]}), &saved).unwrap_err();
        assert!(e.contains("at .a[0].b") && e.contains("unknown wildcard `$bogus`"), "{e}");
        assert!(check_pattern(&json!("$save:a b"), &saved).unwrap_err().contains("letters"));
    }

    #[test]
    fn clip_respects_char_boundaries() {
        assert_eq!(clip("abc", 10), "abc");
        let s = "ééééé";
        let c = clip(s, 3);
        assert!(c.starts_with('é') && c.contains("10 bytes"), "{c}");
    }
}
