//! The decision log: one structured line, at info level under the target `wsgate::decision`,
//! for every refused handshake, refused message and audit-mode "would deny". Fields: `kind`
//! (handshake | message), `outcome` (deny | would_deny), `rule`, `mode`, `user`, `ip`,
//! `session`, `status` or `code`, `reason`, and `error` when a rule failed closed.
//!
//! Nothing here ever receives a token, a secret or a query string: callers pass decisions,
//! not requests. Each decision is also counted here (`wsgate_policy_decisions_total`,
//! `wsgate_handshakes_total`, `wsgate_messages_rejected_total`), so the log and the metrics
//! cannot disagree.

use std::net::IpAddr;

use crate::close::{CloseCode, ErrorCode};
use crate::handshake::Refused;
use crate::metrics::Metrics;
use crate::policy::RuleMode;
use crate::policy::decision::Denial;

/// Where decision lines go (`RUST_LOG=wsgate::decision=info`).
pub const TARGET: &str = "wsgate::decision";

fn mode(d: Option<&Denial>) -> &'static str {
    match d.map(|d| d.mode) {
        Some(RuleMode::Audit) => "audit",
        _ => "enforce",
    }
}

/// A refused handshake.
pub fn handshake_refused(metrics: &Metrics, refused: &Refused, ip: IpAddr) {
    let rule = refused.rule.as_ref();
    metrics.handshake(refused.refusal.error());
    if let Some(r) = rule {
        metrics.decision(&r.rule, r.mode == RuleMode::Audit, "deny");
    }
    tracing::info!(
        target: TARGET,
        kind = "handshake",
        outcome = "deny",
        status = refused.refusal.status(),
        rule = rule.map_or(refused.refusal.error(), |r| &*r.rule),
        mode = mode(rule),
        user = refused.user.as_deref().unwrap_or(""),
        %ip,
        reason = %refused.refusal.reason(),
        error = rule.and_then(|r| r.error.as_deref()).unwrap_or(""),
        "handshake refused"
    );
}

/// Audit-mode rules that would have refused a handshake or message that went through.
pub fn would_deny(metrics: &Metrics, kind: &'static str, audit: &[Denial], user: &str, ip: IpAddr, session: &str) {
    for d in audit {
        metrics.decision(&d.rule, true, "would_deny");
        tracing::info!(
            target: TARGET,
            kind,
            outcome = "would_deny",
            rule = &*d.rule,
            mode = "audit",
            user,
            %ip,
            session,
            reason = &*d.reason,
            error = d.error.as_deref().unwrap_or(""),
            "audit rule would deny"
        );
    }
}

/// A refused message (error frame) or a message that closed its connection.
pub fn message_refused(
    metrics: &Metrics,
    code: Result<ErrorCode, CloseCode>,
    rule: Option<&Denial>,
    reason: &str,
    user: &str,
    ip: IpAddr,
    session: &str,
) {
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
pub fn subscription_ended(metrics: &Metrics, denial: &Denial, generation: u64, user: &str, ip: IpAddr, session: &str) {
    metrics.decision(&denial.rule, false, "deny");
    tracing::info!(
        target: TARGET,
        kind = "reload",
        outcome = "unsubscribe",
        rule = &*denial.rule,
        mode = "enforce",
        generation,
        user,
        %ip,
        session,
        reason = &*denial.reason,
        error = denial.error.as_deref().unwrap_or(""),
        "the reloaded policy no longer allows a subscription"
    );
}
