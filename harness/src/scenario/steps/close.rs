//! How a connection ends: `close` (the client closes), `expect_close` (the server does),
//! `expect_dropped` (it ends at all).

use serde::Deserialize;

use crate::duration::Dur;
use crate::runner::ctx::{DEFAULT_WITHIN, RunCtx, Skipped, deadline};
use crate::scenario::kind::{StepKind, about};
use crate::wire::client::Event;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct ExpectCloseStep {
    pub(crate) conn: Option<String>,
    /// The close code (absent: any code).
    pub(crate) code: Option<u16>,
    /// A substring of the close reason.
    pub(crate) reason: Option<String>,
    /// Deadline (default 5s).
    pub(crate) within: Option<Dur>,
    /// Fail on data frames before the close instead of skipping them.
    pub(crate) no_frames_before: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct ExpectDroppedStep {
    pub(crate) conn: Option<String>,
    /// true: a close frame must come first; false: none may; absent: either.
    pub(crate) close_frame: Option<bool>,
    /// Deadline (default 5s).
    pub(crate) within: Option<Dur>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct CloseStep {
    pub(crate) conn: Option<String>,
    /// The code the client sends (default 1000).
    pub(crate) code: Option<u16>,
    /// The reason the client sends.
    pub(crate) reason: Option<String>,
    /// The code the server must echo (default: the same code).
    pub(crate) expect_code: Option<u16>,
    /// Deadline for the echo (default 5s).
    pub(crate) within: Option<Dur>,
}

impl StepKind for ExpectCloseStep {
    about!(conn);

    async fn run(&self, ctx: &mut RunCtx<'_>) -> Result<(), String> {
        let s = self;
        let (until, within) = deadline(s.within);
        let state = ctx.reading(&s.conn)?;
        let wanted = match (s.code, &s.reason) {
            (Some(code), Some(r)) => format!("a close frame {code} with a reason containing {r:?}"),
            (Some(code), None) => format!("a close frame {code}"),
            (None, Some(r)) => format!("a close frame with a reason containing {r:?}"),
            (None, None) => "a close frame".to_string(),
        };
        let mut skipped = Skipped::default();
        let event = state.read_to_end(until, &mut skipped, |_| s.no_frames_before).await;
        let note = if skipped.count == 0 {
            String::new()
        } else {
            format!(" (after skipping {} data frames, the last: {})", skipped.count, skipped.last)
        };
        match event {
            None => Err(format!("expected {wanted} within {within}, got nothing{note}")),
            Some(Event::Close { code, reason }) => {
                let code_ok = s.code.is_none() || s.code == code;
                let reason_ok = s.reason.as_deref().is_none_or(|r| reason.contains(r));
                if code_ok && reason_ok {
                    return Ok(());
                }
                let got = Event::Close { code, reason }.describe();
                Err(format!("expected {wanted}, got {got}{note}"))
            }
            Some(event @ Event::Dropped { .. }) => Err(format!("expected {wanted}, got {}{note}", event.describe())),
            // A data frame, with `no_frames_before`.
            Some(event) => Err(format!("expected {wanted}, got {}", event.describe())),
        }
    }
}

impl StepKind for ExpectDroppedStep {
    about!(conn);

    async fn run(&self, ctx: &mut RunCtx<'_>) -> Result<(), String> {
        let s = self;
        let (until, within) = deadline(s.within);
        let state = ctx.reading(&s.conn)?;
        let wanted = match s.close_frame {
            Some(true) => "the connection to end with a close frame",
            Some(false) => "the connection to be dropped without a close frame",
            None => "the connection to end",
        };
        let mut skipped = Skipped::default();
        let Some(event) = state.read_to_end(until, &mut skipped, |_| false).await else {
            return Err(format!(
                "expected {wanted} within {within}; it is still open (skipped {} data frames)",
                skipped.count
            ));
        };
        let with_close_frame = matches!(event, Event::Close { .. });
        if s.close_frame.is_some_and(|want| want != with_close_frame) {
            return Err(format!("expected {wanted}, got {}", event.describe()));
        }
        Ok(())
    }
}

impl StepKind for CloseStep {
    about!(conn);

    async fn run(&self, ctx: &mut RunCtx<'_>) -> Result<(), String> {
        let s = self;
        let code = s.code.unwrap_or(1000);
        let want = s.expect_code.unwrap_or(code);
        let (until, within) = deadline(s.within);
        let state = ctx.reading(&s.conn)?;
        if let Err(e) = state.conn.close(code, s.reason.as_deref().unwrap_or(""), DEFAULT_WITHIN.0).await {
            // Say why: usually the server closed first.
            let already = state.conn.try_next_event().map(|e| format!(" ({})", e.describe())).unwrap_or_default();
            return Err(format!("cannot send the close frame: {e}{already}"));
        }
        let mut skipped = Skipped::default();
        match state.read_to_end(until, &mut skipped, |_| false).await {
            None => Err(format!("expected the server to answer with close {want} within {within}, got nothing")),
            Some(Event::Close { code: Some(c), .. }) if c == want => Ok(()),
            Some(other) => Err(format!(
                "expected the server to answer with close {want}, got {} (after skipping {} data frames)",
                other.describe(),
                skipped.count
            )),
        }
    }
}
