//! JSON → CEL values. Ours rather than `cel::to_value`, which turns every JSON whole number
//! into `uint`, so that `claims.exp + 1` would fail (uint + int). Whole numbers that fit an
//! `i64` become `int`; larger ones `uint`; the rest `double`.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use cel::Value;
use cel::objects::{Key, Map};

/// Converts a JSON value to a CEL value.
///
/// Recursion follows the JSON's depth, which every caller has already bounded: messages by
/// the policy's `max_depth`, tokens and requests by serde_json's own recursion limit.
pub fn json_to_cel(json: &serde_json::Value) -> Value {
    match json {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::Int(i)
            } else if let Some(u) = n.as_u64() {
                Value::UInt(u)
            } else {
                Value::Float(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        serde_json::Value::String(s) => Value::String(Arc::new(s.clone())),
        serde_json::Value::Array(items) => Value::List(Arc::new(items.iter().map(json_to_cel).collect())),
        serde_json::Value::Object(fields) => {
            let map: HashMap<Key, Value> = fields.iter().map(|(k, v)| (key(k), json_to_cel(v))).collect();
            Value::Map(Map { map: Arc::new(map) })
        }
    }
}

/// Map keys every connection binds (claims, `conn`, `request`), allocated once and shared:
/// each connection keeps its claims and `conn` bound for its whole life, and two small
/// allocations per key add up at tens of thousands of connections.
const SHARED_KEYS: [&str; 20] = [
    "sub",
    "exp",
    "iat",
    "nbf",
    "iss",
    "aud",
    "jti",
    "roles",
    "scope",
    "tenant",
    "team",
    "id",
    "user",
    "ip",
    "instance",
    "connected_at",
    "origin",
    "path",
    "query",
    "headers",
];

static KEYS: LazyLock<Vec<Arc<String>>> =
    LazyLock::new(|| SHARED_KEYS.iter().map(|k| Arc::new(k.to_string())).collect());

fn key(name: &str) -> Key {
    match SHARED_KEYS.iter().position(|k| *k == name) {
        Some(i) => Key::String(KEYS[i].clone()),
        None => Key::String(Arc::new(name.to_string())),
    }
}

/// A CEL map with string keys, built from pairs.
pub fn cel_map<'a>(pairs: impl IntoIterator<Item = (&'a str, Value)>) -> Value {
    let map: HashMap<Key, Value> = pairs.into_iter().map(|(k, v)| (key(k), v)).collect();
    Value::Map(Map { map: Arc::new(map) })
}

/// A CEL string.
pub fn cel_string(s: &str) -> Value {
    Value::String(Arc::new(s.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn integers_stay_int_so_arithmetic_with_literals_works() {
        let claims = json_to_cel(&json!({"exp": 1_700_000_000, "big": u64::MAX, "f": 1.5, "roles": ["a"]}));
        let mut ctx = cel::Context::with_env(Arc::new(cel::Env::stdlib()));
        ctx.add_variable_from_value("claims", claims);
        let run = |src: &str| cel::Program::compile(src).unwrap().execute(&ctx).unwrap();
        assert_eq!(run("claims.exp + 1"), Value::Int(1_700_000_001));
        assert_eq!(run("claims.big"), Value::UInt(u64::MAX));
        assert_eq!(run("claims.f * 2.0"), Value::Float(3.0));
        assert_eq!(run("'a' in claims.roles"), Value::Bool(true));
    }
}
