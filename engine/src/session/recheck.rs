//! Checking a live connection again — at an `auth` message, at every `reauth_interval`, and when
//! a reload makes a new policy generation active — and moving it to what the check admitted:
//! the new policy's rules, limits and timers, its token, and the subscriptions it still allows.

use std::sync::Arc;
use std::time::SystemTime;

use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use super::event_loop::{Session, Step};
use super::timers::instant_of;
use crate::auth::{self, Admission, NotAdmitted};
use crate::close::{Ending, Readmission};
use crate::decisions;
use crate::policy::decision::Denial;
use crate::policy::{ConnContext, ConnInfo, Policy};

/// Why a connection is no longer admitted (a re-authentication, an `auth` message or a reload).
pub(super) enum Denied {
    /// The origin is no longer allowed.
    Origin(String),
    /// The token no longer admits it.
    Token(NotAdmitted),
}

impl Denied {
    pub(super) fn readmission(&self) -> Readmission {
        match self {
            Denied::Origin(_) => Readmission::Refused,
            Denied::Token(not) => not.readmission(),
        }
    }

    pub(super) fn reason(&self) -> String {
        match self {
            Denied::Origin(reason) => reason.clone(),
            Denied::Token(not) => not.reason(),
        }
    }

    fn rule(&self) -> Option<&Denial> {
        match self {
            Denied::Origin(_) => None,
            Denied::Token(not) => not.rule(),
        }
    }
}

impl<S> Session<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    /// Whether `token` admits this connection under `policy`, as the handshake would decide
    /// (origin, then [`auth::admit`] for the same user); the per-address and per-user counts
    /// are left to new handshakes.
    pub(super) fn admit(&self, policy: &Policy, token: &str, kind: &'static str) -> Result<Admission, Denied> {
        policy.check_origin(self.request.origin.as_deref()).map_err(|d| Denied::Origin(d.reason.to_string()))?;
        let now = SystemTime::now();
        let (admitted, audit) = auth::admit(policy, token, &self.request, Some(&self.user), &self.gw.revocations, now);
        decisions::would_deny(&self.gw.metrics, kind, &audit, self.who());
        admitted.map_err(Denied::Token)
    }

    /// Moves the connection to `policy` (and a new token, if given): its rules, limits,
    /// timers and frame limits from the next event on.
    pub(super) fn adopt(&mut self, policy: Arc<Policy>, token: Option<String>, admission: Admission) {
        let Admission { claims, expires, limits, .. } = admission;
        let conn = ConnInfo {
            id: self.name.clone(),
            user: self.user.clone(),
            ip: self.ip,
            instance: self.gw.options.instance_id.clone(),
            connected_at: self.connected_at,
        };
        self.ws.set_max_bytes(usize::try_from(limits.max_bytes).unwrap_or(usize::MAX));
        let new_generation = policy.generation != self.pipeline.ctx.policy().generation;
        self.pipeline.ctx = ConnContext::new(policy, &claims, &conn);
        if new_generation {
            self.recheck_subscriptions();
        }
        self.pipeline.limits = limits;
        if let Some(token) = token {
            self.token = token;
        }
        self.timers.expires = expires.map(instant_of);
        // A later policy that admits the connection again lifts a pending close.
        self.timers.revoked = None;
    }

    /// A new policy generation: re-check the connection under it and adopt it, or schedule
    /// the 4003 close (paced across connections).
    pub(super) fn on_policy(&mut self) -> Step {
        let policy = self.policy.borrow_and_update().clone();
        if policy.generation == self.pipeline.ctx.policy().generation {
            return Step::Continue;
        }
        match self.admit(&policy, &self.token, "reload") {
            Ok(admission) => self.adopt(policy, None, admission),
            Err(denied) => {
                if self.timers.revoked.is_none() {
                    let (code, reason) = Ending::Reloaded(denied.readmission(), denied.reason()).close();
                    let generation = policy.generation;
                    decisions::reload_denied(
                        &self.gw.metrics,
                        denied.rule(),
                        code,
                        generation,
                        &denied.reason(),
                        self.who(),
                    );
                    let at = self.gw.limits.reload_closes.slot(Instant::now());
                    self.timers.revoked = Some((at, code, reason.into()));
                }
            }
        }
        Step::Continue
    }

    /// Ends every subscription the connection's (new) policy no longer allows, as a `subscribe`
    /// for it would now be refused: out of the hub at once (its messages stop), and the client
    /// is told with `unsubscribed`. The channels a connection has from the start stay.
    pub(super) fn recheck_subscriptions(&mut self) {
        let own = format!("user:{}", self.user);
        let now = SystemTime::now();
        let mut ended = Vec::new();
        for channel in self.channels.iter().filter(|c| &***c != "alerts" && ***c != *own) {
            let (allowed, audit) = self.pipeline.ctx.allows_subscription(channel, now);
            decisions::would_deny(&self.gw.metrics, "reload", &audit, self.who());
            if let Err(denial) = allowed {
                ended.push((channel.clone(), denial));
            }
        }
        let generation = self.pipeline.ctx.policy().generation;
        for (channel, denial) in ended {
            self.unsubscribe(&channel);
            decisions::subscription_ended(&self.gw.metrics, &denial, generation, self.who());
            let reason = format!("policy reloaded: {}", denial.reason);
            self.queue_json(&json!({"type": "unsubscribed", "channel": &*channel, "reason": reason}));
        }
    }

    /// The periodic re-authentication: the token and the connect rules again, under the current
    /// policy; a refusal closes the connection.
    pub(super) fn reauthenticate(&mut self) -> Step {
        let policy = self.gw.policy.current();
        match self.admit(&policy, &self.token, "reauth") {
            Ok(admission) => {
                self.adopt(policy, None, admission);
                Step::Continue
            }
            Err(denied) => {
                let (code, reason) = Ending::ReauthFailed(denied.readmission(), denied.reason()).close();
                decisions::reauth_denied(&self.gw.metrics, denied.rule(), code, &denied.reason(), self.who());
                Step::Close(code, reason)
            }
        }
    }
}
