//! `publish` through the admin API, once, repeated, or `until` a connection receives it.

use std::net::SocketAddr;

use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::duration::Dur;
use crate::matching::{brief, matches_saving, valid_saved_name};
use crate::runner::ctx::{DEFAULT_WITHIN, RunCtx, Skipped, deadline, find_conn};
use crate::scenario::check::{CheckCtx, check_pattern, pick_conn};
use crate::scenario::kind::{StepKind, about};
use crate::scenario::steps::http::{AdminAuth, admin_headers, body_text};
use crate::wire::client::Event;
use crate::wire::http::{self, HttpRequest};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PublishStep {
    /// Which server's admin API.
    pub(crate) server: Option<String>,
    pub(crate) channel: String,
    /// The data (any JSON).
    pub(crate) data: Option<Value>,
    /// Instead of `data`: a string of this many bytes.
    pub(crate) data_size: Option<usize>,
    /// Publish this many times (default 1).
    pub(crate) repeat: Option<u32>,
    /// The admin credentials to present (default valid).
    #[serde(default)]
    pub(crate) auth: AdminAuth,
    /// The expected status (default 200, which also requires `{"id": …}`).
    pub(crate) expect_status: Option<u16>,
    /// Save the message id the server answered under this name, for `$saved:<name>` in later
    /// patterns (e.g. every instance delivers the message with that id).
    pub(crate) save_id: Option<String>,
    /// Publish again every `every` until a connection receives a matching frame, up to
    /// `within`: for deliveries that start working at some point (Redis coming back).
    pub(crate) until: Option<DeliveredStep>,
    /// With `until`: the deadline (default 5s).
    pub(crate) within: Option<Dur>,
    /// With `until`: how long each publish waits for the frame before the next (default 250ms).
    pub(crate) every: Option<Dur>,
}

/// `publish … until`: the frame a repeated publish waits for.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeliveredStep {
    pub(crate) conn: Option<String>,
    /// A frame holding JSON that matches this subset.
    pub(crate) json: Value,
}

/// The default pause between the publishes of `publish … until`.
pub(crate) const DEFAULT_PUBLISH_EVERY: Dur = Dur(std::time::Duration::from_millis(250));

impl StepKind for PublishStep {
    about!(server);

    fn check_keys(&mut self, ctx: &mut CheckCtx) -> Result<(), String> {
        let s = self;
        if s.data.is_some() && s.data_size.is_some() {
            return Err("give only one of `data`, `data_size`".into());
        }
        if s.repeat == Some(0) {
            return Err("`repeat` must be at least 1".into());
        }
        match &mut s.until {
            Some(until) => {
                if s.repeat.is_some() || s.save_id.is_some() || s.expect_status.is_some_and(|st| st != 200) {
                    return Err("`until` publishes as often as it takes (status 200 each time); it does not go with \
                                `repeat`, `save_id` or another `expect_status`"
                        .into());
                }
                pick_conn(&mut until.conn, &ctx.conns)?;
                check_pattern(&until.json, &mut ctx.saved)?;
            }
            None if s.within.is_some() || s.every.is_some() => {
                return Err("`within` and `every` go with `until`".into());
            }
            None => {}
        }
        if s.every.is_some_and(|d| d.0.is_zero()) {
            return Err("`every` must be more than 0ms".into());
        }
        if let Some(name) = &s.save_id {
            if s.expect_status.is_some_and(|st| st != 200) {
                return Err("`save_id` needs an accepted publish (status 200)".into());
            }
            if !valid_saved_name(name) {
                return Err(format!("`save_id: {name}`: use letters, digits, `-`, `_`, `.`"));
            }
            ctx.saved.insert(name.clone());
        }
        Ok(())
    }

    async fn run(&self, ctx: &mut RunCtx<'_>) -> Result<(), String> {
        let s = self;
        let admin = ctx.server(&s.server).server.admin_addr;
        let data = match (&s.data, s.data_size) {
            (_, Some(n)) => Value::String("d".repeat(n)),
            (Some(v), None) => v.clone(),
            (None, None) => Value::Null,
        };
        let body = serde_json::to_vec(&json!({"channel": s.channel, "data": data})).map_err(|e| e.to_string())?;
        let want = s.expect_status.unwrap_or(200);
        let repeat = s.repeat.unwrap_or(1);
        let req = HttpRequest {
            method: "POST",
            path: "/v1/publish",
            headers: admin_headers(&ctx.credentials, s.auth),
            body: Some(("application/json", body)),
        };
        if let Some(until) = &s.until {
            return s.publish_until(ctx, until, admin, &req).await;
        }
        for n in 1..=repeat {
            let which = if repeat > 1 { format!(" (publish {n} of {repeat})") } else { String::new() };
            let id = publish_once(admin, &req, want, &which).await?;
            if let (Some(name), Some(id)) = (&s.save_id, id) {
                ctx.saved.insert(name.clone(), Value::String(id));
            }
        }
        Ok(())
    }
}

impl PublishStep {
    /// `publish … until`: publishes every `every` until `until.conn` receives a frame matching
    /// `until.json`, up to `within`. Other frames on the connection are skipped.
    async fn publish_until(
        &self,
        ctx: &mut RunCtx<'_>,
        until: &DeliveredStep,
        admin: SocketAddr,
        req: &HttpRequest<'_>,
    ) -> Result<(), String> {
        let (give_up, within) = deadline(self.within);
        let every = self.every.unwrap_or(DEFAULT_PUBLISH_EVERY);
        let name = until.conn.clone().unwrap_or_default();
        let state = find_conn(&mut ctx.conns, &until.conn)?;
        let saved = &mut ctx.saved;
        state.conn.set_reading(true);
        let wanted = format!("a frame matching {} on `{name}`", brief(&until.json));
        let mut published = 0usize;
        let mut skipped = Skipped::default();
        let mut delivered = |event: &Event| match event {
            Event::Text(text) => {
                serde_json::from_str::<Value>(text).is_ok_and(|v| matches_saving(&until.json, &v, saved).is_ok())
            }
            _ => false,
        };
        loop {
            published += 1;
            publish_once(admin, req, 200, &format!(" (publish {published})")).await?;
            let next = (Instant::now() + every.0).min(give_up);
            match state.read_to_end(next, &mut skipped, &mut delivered).await {
                Some(end) if end.is_end() => {
                    return Err(format!("expected {wanted}, got {} (after {published} publishes)", end.describe()));
                }
                Some(_) => return Ok(()),
                None => {}
            }
            if Instant::now() >= give_up {
                let note = if skipped.count == 0 {
                    String::new()
                } else {
                    format!("; skipped {} other frames, the last: {}", skipped.count, skipped.last)
                };
                return Err(format!("expected {wanted} within {within}; none came after {published} publishes{note}"));
            }
        }
    }
}

/// One `POST /v1/publish` that must answer `want`; with 200 the answer must carry the message
/// id, which is returned. `which` says which publish of several it was, for messages.
async fn publish_once(
    admin: SocketAddr,
    req: &HttpRequest<'_>,
    want: u16,
    which: &str,
) -> Result<Option<String>, String> {
    let resp = http::send(admin, None, req, DEFAULT_WITHIN.0).await.map_err(|e| format!("{e}{which}"))?;
    if resp.status != want {
        return Err(format!("expected status {want}{which}, got {} {}", resp.status, body_text(&resp)));
    }
    if want != 200 {
        return Ok(None);
    }
    let value: Value = serde_json::from_slice(&resp.body)
        .map_err(|_| format!("expected a JSON answer{which}, got {}", body_text(&resp)))?;
    match value.get("id") {
        Some(Value::String(id)) if !id.is_empty() => Ok(Some(id.clone())),
        _ => Err(format!("expected {{\"id\": \"<message id>\"}}{which}, got {}", brief(&value))),
    }
}
