//! One client frame's path, in SPEC §4's order: size → frame kind → rate limit → JSON parse
//! (depth-limited) → content sanitising → the type's schema → the type's CEL rules.
//!
//! [`Pipeline::process`] reads top to bottom as that list. It decides; the session acts on
//! the decision (replies, closes, routes). A refused message never goes further, so it never
//! reaches another client.

use std::time::SystemTime;

use serde_json::Value;
use tokio::time::Instant;

use crate::close::{CloseCode, Ending, ErrorCode};
use crate::limits::window::SlidingWindow;
use crate::policy::decision::{ConnContext, Denial, MessageRefusal};
use crate::policy::{BinaryMode, ConnLimits, RuleAction};

/// A data frame as it arrived (control frames never reach the pipeline).
#[derive(Debug, Clone, Copy)]
pub enum Frame<'a> {
    /// A text frame (a whole message: fragments are reassembled before this).
    Text(&'a str),
    /// A binary frame.
    Binary(&'a [u8]),
}

/// What to do with a frame.
#[derive(Debug)]
pub enum Decision {
    /// Accepted: route it by its type.
    Accept {
        /// The parsed message.
        message: Value,
        /// Audit-mode rules that would have refused it.
        audit: Vec<Denial>,
    },
    /// An allowed binary frame: counted, nothing to route.
    Ignore,
    /// Refused: answer with an `error` frame.
    Refuse {
        /// The error code.
        code: ErrorCode,
        /// The message's `id`, when one could be read.
        id: Option<String>,
        /// The `reason` of the error frame: never a value from the message.
        reason: String,
        /// The rule that refused, if a rule did.
        rule: Option<Denial>,
        /// Audit-mode rules that would have refused it.
        audit: Vec<Denial>,
    },
    /// Close the connection.
    Close {
        /// The close code.
        code: CloseCode,
        /// The close frame's reason.
        reason: String,
        /// The rule that closed it, if a rule did.
        rule: Option<Denial>,
    },
}

/// One connection's message-processing state.
pub struct Pipeline {
    /// The connection's evaluation context (policy generation, claims, conn).
    pub ctx: ConnContext,
    /// The connection's limits under that policy.
    pub limits: ConnLimits,
    /// Messages admitted in the current rate window.
    rate: SlidingWindow,
    /// Invalid messages so far.
    invalid: u64,
}

impl Pipeline {
    /// A pipeline for a connection.
    pub fn new(ctx: ConnContext, limits: ConnLimits) -> Pipeline {
        Pipeline { ctx, limits, rate: SlidingWindow::default(), invalid: 0 }
    }

    /// Decides one frame.
    pub fn process(&mut self, frame: Frame<'_>, now: Instant, wall: SystemTime) -> Decision {
        let (max_bytes, max_depth) = (self.limits.max_bytes, self.limits.max_depth);
        // 1. Size (the WebSocket layer enforces it too; this keeps the rule when limits change).
        let len = match frame {
            Frame::Text(t) => t.len(),
            Frame::Binary(b) => b.len(),
        } as u64;
        if len > max_bytes {
            return close(Ending::TooBig { max: max_bytes }, None);
        }
        // 2. Frame kind.
        let text = match frame {
            Frame::Text(t) => Some(t),
            Frame::Binary(_) => match self.ctx.policy().messages.binary {
                BinaryMode::Close => return close(Ending::BinaryRefused, None),
                BinaryMode::Reject => None,
                BinaryMode::Allow => return self.rate_limited(now).unwrap_or(Decision::Ignore),
            },
        };
        // 3. Rate limit.
        if let Some(limited) = self.rate_limited(now) {
            return limited;
        }
        let Some(text) = text else {
            return self.invalid(
                ErrorCode::BinaryNotAllowed,
                None,
                "binary frames are not accepted".into(),
                None,
                vec![],
            );
        };
        // 4. JSON, depth-limited before parsing so a deep document never recurses.
        if let Err(reason) = check_depth(text, max_depth) {
            return self.invalid(ErrorCode::InvalidJson, None, reason, None, vec![]);
        }
        let message: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => return self.invalid(ErrorCode::InvalidJson, None, format!("not JSON: {e}"), None, vec![]),
        };
        let id = message.get("id").and_then(Value::as_str).map(str::to_string);
        // 5. Content sanitising.
        if let Err(reason) = sanitise(&message) {
            return self.invalid(ErrorCode::InvalidJson, id, reason, None, vec![]);
        }
        // 6–7. The type's schema, then its rules.
        let verdict = self.ctx.decide(&message, wall);
        match verdict.refused {
            None => Decision::Accept { message, audit: verdict.audit },
            Some(MessageRefusal::Invalid { code, reason }) => self.invalid(code, id, reason, None, verdict.audit),
            Some(MessageRefusal::Rule(denial)) if denial.action == RuleAction::Close => {
                close(Ending::RuleClosed(denial.reason.to_string()), Some(denial))
            }
            Some(MessageRefusal::Rule(denial)) => {
                let reason = denial.reason.to_string();
                self.invalid(ErrorCode::Forbidden, id, reason, Some(denial), verdict.audit)
            }
        }
    }

    /// A ping from the client: it counts toward the message rate like a message, so a flood of
    /// control frames is limited too. Over the rate it closes (4029) or counts as invalid.
    pub(crate) fn control_frame(&mut self, now: Instant) -> Option<Decision> {
        match self.rate_limited(now)? {
            Decision::Refuse { code, reason, .. } => Some(self.invalid(code, None, reason, None, vec![])),
            other => Some(other),
        }
    }

    fn rate_limited(&mut self, now: Instant) -> Option<Decision> {
        let limits = &self.limits;
        self.rate.admit(now, limits.rate_max, limits.rate_per).err()?;
        Some(match limits.rate_action {
            RuleAction::Close => close(Ending::RateExceeded, None),
            RuleAction::Reject => Decision::Refuse {
                code: ErrorCode::RateLimited,
                id: None,
                reason: "message rate exceeded".into(),
                rule: None,
                audit: vec![],
            },
        })
    }

    /// Counts an invalid message: an error frame for the first `max_invalid`, then 1008.
    fn invalid(
        &mut self,
        code: ErrorCode,
        id: Option<String>,
        reason: String,
        rule: Option<Denial>,
        audit: Vec<Denial>,
    ) -> Decision {
        self.invalid += 1;
        if self.invalid > self.limits.max_invalid {
            return close(Ending::TooManyInvalid, rule);
        }
        Decision::Refuse { code, id, reason, rule, audit }
    }
}

fn close(ending: Ending, rule: Option<Denial>) -> Decision {
    let (code, reason) = ending.close();
    Decision::Close { code, reason, rule }
}

/// Refuses JSON nested deeper than `max` without parsing it (a scan, no recursion).
pub(crate) fn check_depth(text: &str, max: u64) -> Result<(), String> {
    let (mut depth, mut in_string, mut escaped) = (0u64, false, false);
    for b in text.bytes() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return Err(format!("nested deeper than {max} levels"));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// Refuses strings (values and keys) with control characters other than tab, CR and LF:
/// they have no place in an alert and are a classic way to break logs and terminals.
pub(crate) fn sanitise(value: &Value) -> Result<(), String> {
    let bad = |s: &str| s.chars().any(|c| c.is_control() && !matches!(c, '\t' | '\r' | '\n'));
    // Depth is already bounded by `check_depth`, so plain recursion is safe here.
    match value {
        Value::String(s) if bad(s) => Err("a string contains a control character".into()),
        Value::Array(items) => items.iter().try_for_each(sanitise),
        Value::Object(fields) => fields
            .iter()
            .try_for_each(|(k, v)| if bad(k) { Err("a key contains a control character".into()) } else { sanitise(v) }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_is_checked_without_recursion() {
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(check_depth(&deep, 32).is_err());
        assert!(check_depth(r#"{"a":[[1]],"s":"[[[[[[\"[["}"#, 3).is_ok());
        assert!(check_depth(r#"{"a":[[[1]]]}"#, 3).is_err());
    }

    #[test]
    fn control_characters_are_refused_but_whitespace_is_fine() {
        assert!(sanitise(&serde_json::json!({"text": "line\nnext\ttab\r"})).is_ok());
        assert!(sanitise(&serde_json::json!({"text": "bell\u{7}"})).is_err());
        assert!(sanitise(&serde_json::json!({"a": ["\u{1b}[31m"]})).is_err());
        assert!(sanitise(&serde_json::json!({"k\u{0}": 1})).is_err());
        assert!(sanitise(&serde_json::json!({"t": "\u{85}"})).is_err(), "C1 controls too");
    }
}
