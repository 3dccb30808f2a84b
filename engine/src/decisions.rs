//! The decision log: one structured line, at info level under the target `wsgate::decision`,
//! for every refused handshake, refused message, audit-mode "would deny", live connection a
//! reload or a re-authentication no longer admits, and disconnect (here or relayed from another
//! instance). Fields: `kind` (handshake | message | reload | reauth | admin), `outcome` (deny |
//! would_deny | unsubscribe | disconnect), `rule`, `mode`, `user`, `ip`, `session`, `status` or
//! `code` or `close`, `reason`, and `error` when a rule failed closed.
//!
//! Nothing here ever receives a token, a secret or a query string: callers pass decisions,
//! not requests. Each decision is also counted here (`wsgate_policy_decisions_total`,
//! `wsgate_handshakes_total`, `wsgate_messages_rejected_total`), so the log and the metrics
//! cannot disagree.

use std::net::IpAddr;

use crate::close::{CloseCode, ErrorCode, Refusal};
use crate::metrics::Metrics;
use crate::policy::decision::Denial;
use crate::policy::model::RuleMode;

/// Where decision lines go (`RUST_LOG=wsgate::decision=info`).
pub const TARGET: &str = "wsgate::decision";

fn mode(d: Option<&Denial>) -> &'static str {
    match d.map(|d| d.mode) {
        Some(RuleMode::Audit) => "audit",
        _ => "enforce",
    }
}

/// The connection a decision is about.
#[derive(Debug, Clone, Copy)]
pub struct Who<'a> {
    /// The user id.
    pub user: &'a str,
    /// The client's address.
    pub ip: IpAddr,
    /// The session id (`<instance>.<number>`).
    pub session: &'a str,
}

/// A refused handshake: `rule` is the connect rule (or failed key) behind `refusal`, if any.
pub fn handshake_refused(metrics: &Metrics, refusal: &Refusal, rule: Option<&Denial>, user: Option<&str>, ip: IpAddr) {
    metrics.handshake(refusal.error());
    if let Some(r) = rule {
        metrics.decision(&r.rule, r.mode == RuleMode::Audit, "deny");
    }
    tracing::info!(
        target: TARGET,
        kind = "handshake",
        outcome = "deny",
        status = refusal.status(),
        rule = rule.map_or(refusal.error(), |r| &*r.rule),
        mode = mode(rule),
        user = user.unwrap_or(""),
        %ip,
        reason = %refusal.reason(),
        error = rule.and_then(|r| r.error.as_deref()).unwrap_or(""),
        "handshake refused"
    );
}

/// Audit-mode rules that would have refused a handshake or message that went through.
pub fn would_deny(metrics: &Metrics, kind: &'static str, audit: &[Denial], who: Who<'_>) {
    for d in audit {
        metrics.decision(&d.rule, true, "would_deny");
        rule_line(kind, "would_deny", d, "audit", None, who, "audit rule would deny");
    }
}

/// A refused message (error frame) or a message that closed its connection.
pub fn message_refused(
    metrics: &Metrics,
    code: Result<ErrorCode, CloseCode>,
    rule: Option<&Denial>,
    reason: &str,
    who: Who<'_>,
) {
    let Who { user, ip, session } = who;
    metrics.rejected(code);
    if let Some(r) = rule {
        metrics.decision(&r.rule, false, "deny");
    }
    let (code_name, close) = match code {
        Ok(c) => (c.as_str(), 0),
        Err(c) => ("close", c.code()),
    };
    tracing::info!(
        target: TARGET,
        kind = "message",
        outcome = "deny",
        code = code_name,
        close,
        rule = rule.map_or(code_name, |r| &*r.rule),
        mode = mode(rule),
        user,
        %ip,
        session,
        reason,
        error = rule.and_then(|r| r.error.as_deref()).unwrap_or(""),
        "message refused"
    );
}

/// A live subscription a reloaded policy no longer allows: ended with `unsubscribed`. The
/// channel is not logged (a client chose its name); the rule that refused it is.
pub fn subscription_ended(metrics: &Metrics, denial: &Denial, generation: u64, who: Who<'_>) {
    metrics.decision(&denial.rule, false, "deny");
    let message = "the reloaded policy no longer allows a subscription";
    rule_line("reload", "unsubscribe", denial, "enforce", Some(generation), who, message);
}

/// The line of one rule's decision about a live connection. `generation` is logged only when
/// set (a field that records `None` is left out of the line).
fn rule_line(
    kind: &'static str,
    outcome: &'static str,
    d: &Denial,
    mode: &'static str,
    generation: Option<u64>,
    who: Who<'_>,
    message: &str,
) {
    let Who { user, ip, session } = who;
    tracing::info!(
        target: TARGET,
        kind,
        outcome,
        rule = &*d.rule,
        mode,
        generation,
        user,
        %ip,
        session,
        reason = &*d.reason,
        error = d.error.as_deref().unwrap_or(""),
        "{message}"
    );
}

/// A live connection a reloaded policy no longer admits: its close (`code`) is booked, paced
/// with the others the reload denied.
pub fn reload_denied(
    metrics: &Metrics,
    rule: Option<&Denial>,
    code: CloseCode,
    generation: u64,
    reason: &str,
    who: Who<'_>,
) {
    if let Some(r) = rule {
        metrics.decision(&r.rule, false, "deny");
    }
    let message = "the reloaded policy no longer admits this connection";
    close_line("reload", code, Some(generation), reason, who, message);
}

/// A live connection its periodic re-authentication refused: closed with `code`.
pub fn reauth_denied(metrics: &Metrics, rule: Option<&Denial>, code: CloseCode, reason: &str, who: Who<'_>) {
    if let Some(r) = rule {
        metrics.decision(&r.rule, false, "deny");
    }
    close_line("reauth", code, None, reason, who, "re-authentication failed");
}

/// The line of a live connection closed because it is no longer admitted; `generation` as in
/// [`rule_line`].
fn close_line(kind: &'static str, code: CloseCode, generation: Option<u64>, reason: &str, who: Who<'_>, message: &str) {
    let Who { user, ip, session } = who;
    tracing::info!(
        target: TARGET,
        kind,
        outcome = "deny",
        close = code.code(),
        generation,
        user,
        %ip,
        session,
        reason,
        "{message}"
    );
}

/// `POST /v1/disconnect`: `closed` connections of `user` here, `everywhere` whether the other
/// instances were told.
pub fn admin_disconnect(user: &str, closed: usize, revoke: bool, everywhere: bool) {
    tracing::info!(target: TARGET, kind = "admin", outcome = "disconnect", user, closed, revoke, everywhere, "user disconnected");
}

/// A disconnect (`POST /v1/disconnect`) taken by another instance and relayed here: the
/// sessions of `user` it closed on this instance. Not counted: the admin disconnect it relays
/// is no rule decision, and SPEC §8 has no counter for either.
pub fn relayed_disconnect(user: &str, closed: usize, revoked: bool) {
    tracing::info!(target: TARGET, kind = "admin", outcome = "disconnect", user, closed, revoke = revoked, "user disconnected by another instance");
}
