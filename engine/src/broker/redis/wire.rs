//! What instances and backends send each other through Redis: messages on `wsgate:ch:*` and
//! control messages on `wsgate:control`. Both are JSON, parsed strictly enough that a stray
//! publish into one of our channels is dropped, never delivered half-formed.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use crate::broker::delivery::Delivery;

/// A message on `wsgate:ch:<channel>`: `{"id": "…", "data": …}`. Instances add `origin` (so
/// they skip their own publishes, which they delivered locally already) and the frame's other
/// keys; unknown keys are ignored.
#[derive(Debug, Deserialize)]
struct Envelope<'a> {
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    origin: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

/// Longest message id accepted from Redis (ids are echoed to every client).
pub(crate) const MAX_ID_LEN: usize = 128;

/// Why a payload on a message channel was dropped.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Dropped {
    /// Sent by this instance (delivered locally when it was published).
    Own,
    /// Not a JSON object of the documented shape.
    Malformed(String),
}

/// The payload this instance publishes for `delivery`: its frame with `origin` added. The
/// frame already holds `id` and `data`, so receivers read it as an envelope.
pub(crate) fn encode(delivery: &Delivery, origin: &str) -> String {
    let frame = delivery.frame.as_str();
    // The frame is a JSON object from `Delivery`: `{"channel":…}`.
    format!("{{\"origin\":{},{}", serde_json::Value::from(origin), &frame[1..])
}

/// Reads a payload from `wsgate:ch:<channel>` into a delivery for `channel`.
///
/// A payload without `id` (a backend that did not set one) gets one derived from its bytes, so
/// every instance gives it the same id: `r-` and 16 hex digits of its SHA-256. Backends should
/// set their own unique ids; two identical payloads without one share an id.
pub(crate) fn decode(channel: &str, payload: &[u8], own_origin: &str) -> Result<Delivery, Dropped> {
    let envelope: Envelope<'_> = serde_json::from_slice(payload).map_err(|e| Dropped::Malformed(e.to_string()))?;
    if envelope.origin.as_deref() == Some(own_origin) {
        return Err(Dropped::Own);
    }
    let id = match envelope.id {
        Some(id) if id.is_empty() || id.len() > MAX_ID_LEN || id.chars().any(char::is_control) => {
            return Err(Dropped::Malformed("`id` must be 1 to 128 bytes without control characters".into()));
        }
        Some(id) => id.into_owned(),
        None => derived_id(payload),
    };
    let null =
        serde_json::value::to_raw_value(&serde_json::Value::Null).map_err(|e| Dropped::Malformed(e.to_string()))?;
    let data = envelope.data.unwrap_or(&null);
    Ok(Delivery::from_raw(channel, id, data))
}

fn derived_id(payload: &[u8]) -> String {
    let digest = Sha256::digest(payload);
    let mut id = String::from("r-");
    for b in &digest[..8] {
        id.push_str(&format!("{b:02x}"));
    }
    id
}

/// An instruction from one instance to the others, on `wsgate:control`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum Control {
    /// Newer connections of `user` elsewhere displaced these sessions of instance `to`: close
    /// them with 4009.
    Replace {
        /// The instance (origin) holding the sessions.
        to: String,
        user: String,
        /// Session numbers on that instance.
        sessions: Vec<u64>,
    },
    /// `POST /v1/disconnect` on instance `from`: close every connection of `user` with 4010,
    /// and with `revoked_at_ms` refuse the user's tokens issued until then.
    Disconnect {
        /// The instance that took the call (it has acted already).
        from: String,
        user: String,
        reason: String,
        /// The revocation time, if tokens were revoked.
        #[serde(default)]
        revoked_at_ms: Option<u64>,
    },
}

impl Control {
    pub(crate) fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub(crate) fn decode(payload: &[u8]) -> Result<Control, String> {
        serde_json::from_slice(payload).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn an_instance_reads_another_ones_publish_as_the_same_frame() {
        let sent = Delivery::new("alerts", "abc-1".into(), &serde_json::json!({"sev": 2}));
        let payload = encode(&sent, "aaaa");
        let got = decode("alerts", payload.as_bytes(), "bbbb").unwrap();
        assert_eq!(got.frame, sent.frame);
        assert_eq!(got.id, "abc-1");
        assert_eq!(decode("alerts", payload.as_bytes(), "aaaa").unwrap_err(), Dropped::Own);
    }

    #[test]
    fn a_backend_payload_gets_its_id_or_one_derived_from_its_bytes() {
        let got = decode("alerts", br#"{"id":"b-1","data":{"x":1}}"#, "me").unwrap();
        assert_eq!(got.id, "b-1");
        assert_eq!(got.frame.as_str(), r#"{"channel":"alerts","data":{"x":1},"id":"b-1","type":"message"}"#);
        let a = decode("alerts", br#"{"data":1}"#, "me").unwrap();
        let b = decode("alerts", br#"{"data":1}"#, "other").unwrap();
        assert_eq!(a.id, b.id, "every instance derives the same id");
        assert!(a.id.starts_with("r-") && a.id.len() == 18);
        let empty = decode("alerts", b"{}", "me").unwrap();
        assert!(empty.frame.as_str().contains(r#""data":null"#));
    }

    #[test]
    fn malformed_payloads_are_dropped() {
        for bad in [&b"not json"[..], b"[1,2]", b"\"s\"", br#"{"id":""}"#, br#"{"id":5}"#, br#"{"id":"a\u0001"}"#] {
            assert!(
                matches!(decode("alerts", bad, "me"), Err(Dropped::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn control_messages_round_trip() {
        let c =
            Control::Disconnect { from: "a".into(), user: "u|1".into(), reason: "bye".into(), revoked_at_ms: Some(5) };
        assert_eq!(Control::decode(c.encode().as_bytes()).unwrap(), c);
        let r = Control::Replace { to: "b".into(), user: "u".into(), sessions: vec![1, 2] };
        assert_eq!(Control::decode(r.encode().as_bytes()).unwrap(), r);
        assert!(Control::decode(br#"{"kind":"reboot"}"#).is_err());
    }

    proptest! {
        #[test]
        fn any_payload_is_decoded_or_dropped_and_a_frame_is_valid_json(payload in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(d) = decode("c", &payload, "me") {
                let v: serde_json::Value = serde_json::from_str(d.frame.as_str()).unwrap();
                prop_assert_eq!(v["id"].as_str(), Some(d.id.as_str()));
            }
        }

        #[test]
        fn any_data_survives_the_trip(s in ".{0,40}", n in any::<i64>()) {
            let data = serde_json::json!({"s": s, "n": n});
            let sent = Delivery::new("c", "i".into(), &data);
            let got = decode("c", encode(&sent, "x").as_bytes(), "y").unwrap();
            prop_assert_eq!(got.frame, sent.frame);
        }
    }
}
