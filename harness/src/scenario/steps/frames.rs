//! The frame steps on an open connection: `send`, `expect`, `expect_no_frame`, and
//! `pause_reading` / `resume_reading`.

use serde::Deserialize;
use serde_json::Value;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::duration::Dur;
use crate::matching::{brief, clip, matches_saving};
use crate::runner::ctx::{DEFAULT_WITHIN, RunCtx, deadline, find_conn, parse_json};
use crate::scenario::check::{CheckCtx, check_pattern, exactly_one, pick_conn};
use crate::scenario::kind::{StepKind, about};
use crate::wire::client::Event;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct SendStep {
    pub(crate) conn: Option<String>,
    /// A text frame, verbatim.
    pub(crate) text: Option<String>,
    /// A text frame holding this value as JSON.
    pub(crate) json: Option<Value>,
    /// With `json` (an object): add a `pad` string so the frame is exactly this many bytes.
    pub(crate) pad_to: Option<usize>,
    /// A binary frame of this many bytes.
    pub(crate) binary: Option<usize>,
    /// A text frame of this many bytes (`x` repeated).
    pub(crate) text_size: Option<usize>,
    /// Send it this many times (default 1).
    pub(crate) repeat: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct ExpectStep {
    pub(crate) conn: Option<String>,
    /// The next frame is text holding JSON that matches this subset.
    pub(crate) json: Option<Value>,
    /// The next frame is exactly this text.
    pub(crate) text: Option<String>,
    /// The next frames match these subsets, one each, in any order.
    pub(crate) unordered: Option<Vec<Value>>,
    /// Expect this many frames matching `json` (or `text`) in a row (default 1).
    pub(crate) repeat: Option<u32>,
    /// Deadline (default 5s).
    pub(crate) within: Option<Dur>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct ExpectNoFrameStep {
    pub(crate) conn: Option<String>,
    /// How long to watch (default 1s).
    #[serde(rename = "for")]
    pub(crate) duration: Option<Dur>,
}

/// `pause_reading: <conn>` (`READING` false) and `resume_reading: <conn>` (true): they name
/// their connection outright, so the check only confirms it exists.
#[derive(Debug, Clone, Deserialize)]
#[serde(transparent)]
pub(crate) struct ReadingStep<const READING: bool>(pub(crate) String);

pub(crate) type PauseReadingStep = ReadingStep<false>;
pub(crate) type ResumeReadingStep = ReadingStep<true>;

impl StepKind for SendStep {
    about!(conn);

    fn check_keys(&mut self, _: &mut CheckCtx) -> Result<(), String> {
        let s = self;
        exactly_one(&[
            ("text", s.text.is_some()),
            ("json", s.json.is_some()),
            ("binary", s.binary.is_some()),
            ("text_size", s.text_size.is_some()),
        ])?;
        if s.pad_to.is_some() && !s.json.as_ref().is_some_and(Value::is_object) {
            return Err("`pad_to` needs `json` holding a mapping".into());
        }
        if s.repeat == Some(0) {
            return Err("`repeat` must be at least 1".into());
        }
        Ok(())
    }

    async fn run(&self, ctx: &mut RunCtx<'_>) -> Result<(), String> {
        let s = self;
        let message = match (&s.text, &s.json, s.binary, s.text_size) {
            (Some(text), ..) => Message::text(text.clone()),
            (_, Some(value), ..) => match s.pad_to {
                Some(size) => Message::text(padded_json(value, size)?),
                None => Message::text(value.to_string()),
            },
            (_, _, Some(n), _) => Message::binary(vec![0xA5u8; n]),
            (_, _, _, Some(n)) => Message::text("x".repeat(n)),
            _ => return Err("nothing to send".into()),
        };
        let repeat = s.repeat.unwrap_or(1);
        let state = ctx.conn(&s.conn)?;
        for n in 1..=repeat {
            state.conn.send(message.clone(), DEFAULT_WITHIN.0).await.map_err(|e| {
                let which = if repeat > 1 { format!(" (message {n} of {repeat})") } else { String::new() };
                format!("cannot send{which}: {e}")
            })?;
        }
        Ok(())
    }
}

/// A JSON object padded with a `pad` string so that it serialises to exactly `size` bytes.
fn padded_json(value: &Value, size: usize) -> Result<String, String> {
    let mut object = value.clone();
    object["pad"] = Value::String(String::new());
    let base = serde_json::to_string(&object).map_err(|e| e.to_string())?.len();
    if base > size {
        return Err(format!("`pad_to: {size}` is smaller than the message itself ({base} bytes)"));
    }
    object["pad"] = Value::String("x".repeat(size - base));
    serde_json::to_string(&object).map_err(|e| e.to_string())
}

impl StepKind for ExpectStep {
    about!(conn);

    fn check_keys(&mut self, ctx: &mut CheckCtx) -> Result<(), String> {
        let s = self;
        exactly_one(&[("json", s.json.is_some()), ("text", s.text.is_some()), ("unordered", s.unordered.is_some())])?;
        if s.unordered.as_ref().is_some_and(Vec::is_empty) {
            return Err("`unordered` needs at least one pattern".into());
        }
        if s.repeat == Some(0) || (s.repeat.is_some() && s.unordered.is_some()) {
            return Err("`repeat` must be at least 1, and goes with `json` or `text`".into());
        }
        for pattern in s.json.iter().chain(s.unordered.iter().flatten()) {
            check_pattern(pattern, &mut ctx.saved)?;
        }
        Ok(())
    }

    async fn run(&self, ctx: &mut RunCtx<'_>) -> Result<(), String> {
        let repeat = self.repeat.unwrap_or(1);
        for n in 1..=repeat {
            self.expect_once(ctx)
                .await
                .map_err(|e| if repeat > 1 { format!("frame {n} of {repeat}: {e}") } else { e })?;
        }
        Ok(())
    }
}

impl ExpectStep {
    async fn expect_once(&self, ctx: &mut RunCtx<'_>) -> Result<(), String> {
        let s = self;
        let (until, within) = deadline(s.within);
        let state = find_conn(&mut ctx.conns, &s.conn)?;
        let saved = &mut ctx.saved;
        state.conn.set_reading(true);
        let mut remaining: Vec<&Value> = match (&s.json, &s.unordered) {
            (Some(pattern), _) => vec![pattern],
            (_, Some(patterns)) => patterns.iter().collect(),
            _ => Vec::new(),
        };
        if let Some(want) = &s.text {
            return match state.conn.next_event(until).await {
                Some(Event::Text(text)) if &text == want => Ok(()),
                Some(other) => {
                    state.ended = other.is_end();
                    Err(format!("expected text frame {}, got {}", clip(want, 300), other.describe()))
                }
                None => Err(format!("expected text frame {}, got nothing within {within}", clip(want, 300))),
            };
        }
        let total = remaining.len();
        while !remaining.is_empty() {
            let seen = total - remaining.len();
            let wanted = || match remaining.as_slice() {
                [one] if total == 1 => format!("a frame matching {}", brief(one)),
                many => format!(
                    "{} more frame(s) matching, in any order, {}",
                    many.len(),
                    many.iter().map(|v| brief(v)).collect::<Vec<_>>().join(" | ")
                ),
            };
            let event = match state.conn.next_event(until).await {
                None => {
                    return Err(format!("expected {}, got nothing within {within} (after {seen} matched)", wanted()));
                }
                Some(e) => e,
            };
            let Event::Text(text) = &event else {
                state.ended = event.is_end();
                return Err(format!("expected {}, got {}", wanted(), event.describe()));
            };
            let value = parse_json(text).map_err(|e| format!("expected {}, got {e}", wanted()))?;
            let mut errors = Vec::new();
            let mut hit = None;
            for (i, pattern) in remaining.iter().enumerate() {
                match matches_saving(pattern, &value, saved) {
                    Ok(()) => {
                        hit = Some(i);
                        break;
                    }
                    Err(e) => errors.push(e),
                }
            }
            match hit {
                Some(i) => {
                    remaining.remove(i);
                }
                None if total == 1 => {
                    return Err(format!("expected {}, got {} ({})", wanted(), brief(&value), errors.join("; ")));
                }
                None => return Err(format!("expected {}, got {} which matches none of them", wanted(), brief(&value))),
            }
        }
        Ok(())
    }
}

impl StepKind for ExpectNoFrameStep {
    about!(conn);

    async fn run(&self, ctx: &mut RunCtx<'_>) -> Result<(), String> {
        let duration = self.duration.unwrap_or(Dur::secs(1));
        let start = Instant::now();
        let state = ctx.reading(&self.conn)?;
        match state.conn.next_event(start + duration.0).await {
            None => Ok(()),
            Some(event) => {
                state.ended = event.is_end();
                Err(format!(
                    "expected nothing for {duration}, got {} after {}ms",
                    event.describe(),
                    start.elapsed().as_millis()
                ))
            }
        }
    }
}

impl<const READING: bool> StepKind for ReadingStep<READING> {
    fn conn(&self) -> Option<&str> {
        Some(&self.0)
    }

    fn check_keys(&mut self, ctx: &mut CheckCtx) -> Result<(), String> {
        pick_conn(&mut Some(self.0.clone()), &ctx.conns)
    }

    async fn run(&self, ctx: &mut RunCtx<'_>) -> Result<(), String> {
        ctx.conn(&Some(self.0.clone()))?.conn.set_reading(READING);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pads_json_to_an_exact_size() {
        let text = padded_json(&json!({"type": "ping"}), 20480).unwrap();
        assert_eq!(text.len(), 20480);
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["type"], "ping");
        assert!(padded_json(&json!({"type": "ping"}), 5).is_err());
    }
}
