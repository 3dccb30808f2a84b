//! One connection's life after the upgrade: welcome → one `select!` over the next frame, the
//! outbound queue, the timers (heartbeat, token expiry, re-authentication, idle) and the
//! signals from outside (replacement, shutdown) → close. No connection state lives anywhere
//! else; the registry and the hub hold only ways to reach this task.
//!
//! The handlers are synchronous: they decide, queue the frames to send and say what happens
//! next ([`Step`]). The loop is the only place that waits (to publish, to write, to close).
//! That keeps the task small — every idle connection holds its whole state machine — and
//! makes each handler a plain function.
//!
//! Timers: the server pings every `heartbeat.interval`; a peer that sends nothing within
//! `heartbeat.timeout` of a ping is dropped (its TCP connection closed, no close frame: a dead
//! peer cannot read one). The token's expiry closes with 4001 at that instant. Every
//! `reauth_interval` the token and connect rules are checked again under the current policy.
//! No client message for `idle_timeout` closes with 1000.
//!
//! Slow consumers: deliveries wait in a bounded queue of [`OUTBOX_CAPACITY`] frames. A client
//! whose queue overflows, or that does not take a frame within `heartbeat.timeout`, is closed
//! with 4008, so a client that does not read never makes the server hold more than that.

use std::net::IpAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until, timeout_at};
use tungstenite::protocol::CloseFrame;
use tungstenite::{Error as WsError, Message, Utf8Bytes};

use crate::auth::{self, Admission, NotAdmitted};
use crate::broker::Delivery;
use crate::broker::hub::{Outbound, Outbox, SessionId};
use crate::close::{CloseCode, ErrorCode};
use crate::cluster::Lease;
use crate::decisions;
use crate::gateway::{Failpoint, Gateway, Phase};
use crate::handshake::Admitted;
use crate::limits::IpSlot;
use crate::pipeline::{Decision, Frame, Pipeline};
use crate::policy::keys::TokenError;
use crate::policy::{ConnContext, ConnInfo, ConnLimits, Policy, RequestInfo};
use crate::sessions::{Control, Mailbox};
use crate::ws::WebSocket;

/// Deliveries queued for one client before it counts as a slow consumer (4008).
pub const OUTBOX_CAPACITY: usize = 256;
/// Channels one connection may be subscribed to, `alerts` and `user:<id>` included.
pub const MAX_SUBSCRIPTIONS: usize = 64;
/// How long a close handshake may take before the connection is simply dropped.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest close reason (RFC 6455: the close payload is at most 125 bytes).
const MAX_CLOSE_REASON: usize = 123;

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The server closed it with this code.
    Closed(CloseCode, String),
    /// The client closed it (its close code, if it sent one).
    ClientClosed(Option<u16>),
    /// The connection was dropped without a close handshake.
    Dropped(&'static str),
}

/// The timers of one connection, as instants on tokio's clock. They keep when things
/// happened, not deadlines: each deadline is computed from the connection's current limits,
/// so a reloaded policy's heartbeat, idle and re-authentication intervals apply at once.
struct Timers {
    /// When the last ping was sent (the connection's start before the first).
    last_ping: Instant,
    /// A ping was sent and nothing has arrived since.
    awaiting_pong: bool,
    /// The last client message (idle time counts from here).
    last_message: Instant,
    /// The last re-authentication (or the handshake).
    last_auth: Instant,
    /// The token's expiry (`exp` + leeway), if it has one.
    expires: Option<Instant>,
    /// A reloaded policy no longer admits this connection: it closes then (see
    /// [`Gateway::reload_closes`]), or at its next message, whichever comes first.
    revoked: Option<(Instant, CloseCode, Box<str>)>,
}

impl Timers {
    fn new(now: Instant, expires: Option<Instant>) -> Timers {
        Timers { last_ping: now, awaiting_pong: false, last_message: now, last_auth: now, expires, revoked: None }
    }

    /// Send a ping then, or (when a pong is awaited) drop the peer then.
    fn heartbeat(&self, limits: &ConnLimits) -> Instant {
        let wait = if self.awaiting_pong { limits.heartbeat_timeout } else { limits.heartbeat_interval };
        self.last_ping + wait
    }

    fn idle(&self, limits: &ConnLimits) -> Instant {
        self.last_message + limits.idle_timeout
    }

    fn reauth(&self, limits: &ConnLimits) -> Instant {
        self.last_auth + limits.reauth_interval
    }

    /// The next instant that may end the connection outright: the token's expiry or a
    /// reload's booked close.
    fn ends(&self) -> Option<Instant> {
        match (self.expires, &self.revoked) {
            (Some(e), Some((r, ..))) => Some(e.min(*r)),
            (e, r) => e.or(r.as_ref().map(|(at, ..)| *at)),
        }
    }

    fn next(&self, limits: &ConnLimits) -> Instant {
        let t = self.heartbeat(limits).min(self.idle(limits)).min(self.reauth(limits));
        let t = self.expires.map_or(t, |e| t.min(e));
        self.revoked.as_ref().map_or(t, |(at, ..)| t.min(*at))
    }
}

/// Why a connection is no longer admitted (a re-authentication, an `auth` message or a reload).
enum Denied {
    /// The origin is no longer allowed.
    Origin(String),
    /// The token no longer admits it.
    Token(NotAdmitted),
}

impl Denied {
    /// The close code: a token that no longer verifies is 4001 at a re-authentication, and
    /// 4003 after a reload (a reload changed what is accepted), unless it simply expired.
    fn code(&self, reload: bool) -> CloseCode {
        use NotAdmitted::{NoUser, OtherUser, Token};
        match self {
            Denied::Token(Token(TokenError::Expired)) => CloseCode::TokenExpired,
            Denied::Token(Token(_) | OtherUser | NoUser(_)) if !reload => CloseCode::TokenExpired,
            _ => CloseCode::Revoked,
        }
    }

    fn reason(&self) -> String {
        match self {
            Denied::Origin(reason) => reason.clone(),
            Denied::Token(not) => match not {
                NotAdmitted::Token(e) => e.reason().to_string(),
                NotAdmitted::OtherUser => "the token is for another user".into(),
                NotAdmitted::NoUser(_) => "the user id could not be determined".into(),
                NotAdmitted::Revoked { .. } => "token revoked".into(),
                NotAdmitted::Rule { denial, .. } => denial.reason.to_string(),
                NotAdmitted::Limits { error, .. } => format!("{} could not be evaluated", error.key),
            },
        }
    }
}

/// What the loop does after a handler.
enum Step {
    /// Keep serving.
    Continue,
    /// Hand a publish to the backplane, then answer `ok` to this message id.
    /// (Boxed: a step is held while it is acted on, and most steps are small.)
    Publish(Box<(Delivery, Option<String>)>),
    /// Close with this code and reason.
    Close(CloseCode, String),
    /// Drop the connection without a close handshake.
    Drop(&'static str),
    /// The client closed; flush the echo and end.
    ClientClosed(Option<u16>),
}

/// One live connection.
pub struct Session<S> {
    /// Shared instance state.
    gw: Arc<Gateway>,
    /// The socket.
    ws: WebSocket<S>,
    /// Frames to send once the current handler is done.
    out: Vec<Message>,
    /// Process-unique number (registry and hub key).
    id: SessionId,
    /// The id clients and logs see: `<instance>.<number>`.
    name: String,
    /// The user id.
    user: String,
    /// The client's address.
    ip: IpAddr,
    /// When the connection was accepted (for `conn.connected_at`).
    connected_at: SystemTime,
    /// Decides each client frame.
    pipeline: Pipeline,
    /// Deliveries for this client.
    outbox: Outbox,
    /// Instructions from the registry (replacement, logout).
    mailbox: Arc<Mailbox>,
    /// The lifecycle phase.
    phase: watch::Receiver<Phase>,
    /// Whether `phase` can still change (stop polling a closed channel).
    phase_open: bool,
    /// The active policy: a new generation is re-checked and adopted at once.
    policy: watch::Receiver<Arc<Policy>>,
    /// Channels this session is subscribed to.
    channels: Vec<Box<str>>,
    /// A subscription was made that the backplane may not have in effect yet: wait for it
    /// before the next write confirms it (the welcome, or `ok` to a `subscribe`).
    listen_pending: bool,
    /// The current token, for re-authentication. Never logged.
    token: String,
    /// The upgrade request as connect rules see it, for re-authentication.
    request: RequestInfo,
    /// Heartbeat, idle, re-authentication and expiry.
    timers: Timers,
    /// Keeps this connection counted against its IP until it ends.
    _ip_slot: IpSlot,
    /// Keeps it counted across the cluster (`--redis`) until it ends.
    _lease: Option<Lease>,
}

/// Builds the session, registers it (replacing older ones of the user), subscribes it to
/// `alerts` and `user:<id>` and queues the welcome frame. Synchronous, so that nothing of the
/// handshake stays in the connection's task.
pub fn open<S>(ws: WebSocket<S>, admitted: Admitted, gw: Arc<Gateway>) -> Box<Session<S>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let Admitted {
        policy, user, claims, token, expires_at, limits, request, ip_slot, lease, audit, session: id, ..
    } = admitted;
    let name = format!("{}.{id}", gw.options.instance_id);
    let ip = request.ip;
    decisions::would_deny(&gw.metrics, "handshake", &audit, &user, ip, &name);
    let connected_at = SystemTime::now();
    let conn =
        ConnInfo { id: name.clone(), user: user.clone(), ip, instance: gw.options.instance_id.clone(), connected_at };
    let generation = policy.generation;
    let ctx = ConnContext::new(policy, &claims, &conn);
    let timers = Timers::new(Instant::now(), expires_at.map(instant_of));
    // A reload between this connection's handshake and now is adopted at the first event.
    let mut active_policy = gw.watch_policy();
    if active_policy.borrow().generation != generation {
        active_policy.mark_changed();
    }
    let max_per_user = limits.max_per_user;
    let welcome = json!({
        "type": "welcome",
        "session": name,
        "user": user,
        "instance": gw.options.instance_id,
        "heartbeat_ms": limits.heartbeat_interval.as_millis(),
    });
    if let (Some(cluster), Some(lease)) = (&gw.cluster, &lease) {
        // Connections of the user on other instances beyond `max_per_user` close with 4009.
        let (cluster, gw, member, user) = (cluster.clone(), gw.clone(), lease.member().to_string(), user.clone());
        tokio::spawn(async move { cluster.register(&gw, &member, &user, max_per_user).await });
    }
    let mut session = Box::new(Session {
        phase: gw.watch_phase(),
        gw: gw.clone(),
        ws,
        out: Vec::new(),
        id,
        name,
        user,
        ip,
        connected_at,
        pipeline: Pipeline::new(ctx, limits),
        outbox: Outbox::new(OUTBOX_CAPACITY),
        mailbox: Arc::default(),
        phase_open: true,
        policy: active_policy,
        channels: Vec::new(),
        listen_pending: false,
        token,
        request,
        timers,
        _ip_slot: ip_slot,
        _lease: lease,
    });
    let replaced = gw.sessions.register(&session.user, id, session.mailbox.clone(), max_per_user);
    gw.metrics.connections_active.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(session = %session.name, user = %session.user, ip = %ip, replaced, "connection opened");
    session.subscribe("alerts");
    let own = format!("user:{}", session.user);
    session.subscribe(&own);
    session.queue_json(&welcome);
    session
}

/// A wall-clock instant as an instant on tokio's clock (the past becomes now).
fn instant_of(t: SystemTime) -> Instant {
    let now = Instant::now();
    t.duration_since(SystemTime::now()).map_or(now, |d| now + d)
}

impl<S> Session<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    /// Serves the connection until it ends. The session is boxed: async code keeps copies of
    /// its by-value state, and every idle connection would pay for them.
    pub async fn run(mut self: Box<Self>) -> Ended {
        let ended = self.serve().await;
        let lived = self.connected_at.elapsed().unwrap_or_default();
        let metrics = &self.gw.metrics;
        metrics.connection_duration.observe(lived);
        let (code, by_client) = match &ended {
            Ended::Closed(code, _) => (code.code(), false),
            Ended::ClientClosed(code) => (code.unwrap_or(1005), true),
            Ended::Dropped(_) => (0, false),
        };
        metrics.closed(code, by_client);
        tracing::info!(session = %self.name, user = %self.user, ended = ?ended, seconds = lived.as_secs_f64(), "connection closed");
        ended
    }

    /// The loop: wait for the next event, let its handler decide, then publish, write and
    /// close as it said.
    async fn serve(&mut self) -> Ended {
        // A session opened just as the drain began has already "seen" the new phase.
        if *self.phase.borrow() != Phase::Running {
            return self.close(CloseCode::GoingAway, "server shutting down").await;
        }
        loop {
            if std::mem::take(&mut self.listen_pending) {
                self.gw.backplane.listening().await;
            }
            if let Err(ended) = self.flush().await {
                return ended;
            }
            let deadline = self.timers.next(&self.pipeline.limits);
            let step = tokio::select! {
                biased;
                control = self.mailbox.recv() => self.on_control(control),
                changed = self.phase.changed(), if self.phase_open => self.on_phase(changed.is_ok()),
                // A new policy before the next timer or frame: they are decided under it.
                changed = self.policy.changed() => match changed {
                    Ok(()) => self.on_policy(),
                    // The gateway is gone; only a test drops it under a live session.
                    Err(_) => Step::Drop("server stopped"),
                },
                // Timers before frames: a client that keeps the socket busy must not keep its
                // expired token, its re-authentication or its idle timeout from firing.
                () = sleep_until(deadline) => self.on_timer(),
                frame = self.ws.next() => self.on_frame(frame),
                out = self.outbox.recv() => self.on_outbound(out),
            };
            if let Some(ended) = self.act(step).await {
                return ended;
            }
        }
    }

    /// Does what a handler said: publish, close, drop or finish the client's close. Its own
    /// future, so that the step it holds does not take room next to the `select!` above in
    /// every idle connection's task.
    async fn act(&mut self, step: Step) -> Option<Ended> {
        let step = match step {
            Step::Publish(publish) => {
                let (delivery, id) = *publish;
                self.publish(delivery, id).await
            }
            step => step,
        };
        match step {
            Step::Continue | Step::Publish(..) => None,
            Step::Close(code, reason) => {
                // What was queued before the close (an error frame) goes first.
                if let Err(ended) = self.flush().await {
                    return Some(ended);
                }
                Some(self.close(code, &reason).await)
            }
            Step::Drop(why) => Some(Ended::Dropped(why)),
            Step::ClientClosed(code) => {
                // tungstenite has queued the close echo: write it, then end our side. (Boxed, as
                // `close`: it runs once, and inline it would size every connection's task.)
                Box::pin(self.ws.close_within(None, CLOSE_TIMEOUT)).await;
                Some(Ended::ClientClosed(code))
            }
        }
    }

    fn on_control(&mut self, control: Control) -> Step {
        match control {
            Control::Close(code, reason) => Step::Close(code, reason),
        }
    }

    fn on_phase(&mut self, open: bool) -> Step {
        self.phase_open = open;
        if !open || *self.phase.borrow_and_update() != Phase::Running {
            return Step::Close(CloseCode::GoingAway, "server shutting down".into());
        }
        Step::Continue
    }

    fn on_frame(&mut self, frame: Option<Result<Message, WsError>>) -> Step {
        let message = match frame {
            None => return Step::Drop("connection lost"),
            Some(Ok(m)) => m,
            Some(Err(e)) => return self.on_read_error(e),
        };
        // Anything from the peer shows it is alive.
        self.timers.awaiting_pong = false;
        match message {
            Message::Text(text) => self.on_data(Frame::Text(&text)),
            Message::Binary(bytes) => self.on_data(Frame::Binary(&bytes)),
            // tungstenite answers pings itself, but they count toward the message rate, and so
            // do pongs (unsolicited ones are a flood like any other; ours ask for one per ping).
            Message::Ping(_) | Message::Pong(_) => match self.pipeline.control_frame(Instant::now()) {
                None => Step::Continue,
                Some(decision) => self.apply(decision),
            },
            Message::Frame(_) => Step::Continue,
            Message::Close(frame) => Step::ClientClosed(frame.map(|f| u16::from(f.code))),
        }
    }

    fn on_read_error(&mut self, e: WsError) -> Step {
        match e {
            WsError::Capacity(_) => {
                let max = self.pipeline.limits.max_bytes;
                let reason = format!("message larger than {max} bytes");
                decisions::message_refused(
                    &self.gw.metrics,
                    Err(CloseCode::TooBig),
                    None,
                    &reason,
                    &self.user,
                    self.ip,
                    &self.name,
                );
                Step::Close(CloseCode::TooBig, reason)
            }
            // It pings faster than it reads the answers.
            WsError::WriteBufferFull(_) => Step::Close(CloseCode::SlowConsumer, "the client does not read".into()),
            WsError::Utf8(_) => Step::Close(CloseCode::InvalidPayload, "text frame is not UTF-8".into()),
            WsError::Protocol(p) => {
                tracing::debug!(session = %self.name, error = %p, "WebSocket protocol error");
                Step::Close(CloseCode::ProtocolError, "protocol error".into())
            }
            _ => Step::Drop("connection lost"),
        }
    }

    /// A data frame: the pipeline decides, then the message is routed or refused. A panic in
    /// here (a bug, in us or a dependency) closes this connection with 1011 and leaves everyone
    /// else untouched.
    fn on_data(&mut self, frame: Frame<'_>) -> Step {
        // A connection the active policy no longer admits is not served another message.
        if let Some((_, code, reason)) = self.timers.revoked.take() {
            return Step::Close(code, reason.into());
        }
        let now = Instant::now();
        self.timers.last_message = now;
        self.gw.metrics.messages_received.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let decided = std::panic::catch_unwind(AssertUnwindSafe(|| self.decide(frame, now)));
        self.gw.metrics.pipeline_duration.observe(now.elapsed());
        match decided {
            Ok(step) => step,
            Err(_) => {
                tracing::error!(session = %self.name, "internal error while handling a message");
                Step::Close(CloseCode::Internal, "internal error".into())
            }
        }
    }

    fn decide(&mut self, frame: Frame<'_>, now: Instant) -> Step {
        let decision = self.pipeline.process(frame, now, SystemTime::now());
        self.apply(decision)
    }

    /// Acts on the pipeline's decision.
    fn apply(&mut self, decision: Decision) -> Step {
        match decision {
            Decision::Accept { message, audit } => {
                decisions::would_deny(&self.gw.metrics, "message", &audit, &self.user, self.ip, &self.name);
                if let Some(Failpoint::PanicOnMessageType(kind)) = self.gw.failpoint()
                    && message.get("type").and_then(Value::as_str) == Some(kind.as_str())
                {
                    panic!("failpoint panic_on_message_type:{kind}");
                }
                self.route(&message)
            }
            Decision::Ignore => Step::Continue,
            Decision::Refuse { code, id, reason, rule, audit } => {
                decisions::would_deny(&self.gw.metrics, "message", &audit, &self.user, self.ip, &self.name);
                decisions::message_refused(
                    &self.gw.metrics,
                    Ok(code),
                    rule.as_ref(),
                    &reason,
                    &self.user,
                    self.ip,
                    &self.name,
                );
                self.queue_error(id.as_deref(), code, &reason);
                Step::Continue
            }
            Decision::Close { code, reason, rule } => {
                decisions::message_refused(
                    &self.gw.metrics,
                    Err(code),
                    rule.as_ref(),
                    &reason,
                    &self.user,
                    self.ip,
                    &self.name,
                );
                Step::Close(code, reason)
            }
        }
    }

    /// An accepted message, by type.
    fn route(&mut self, message: &Value) -> Step {
        let id = message.get("id").and_then(Value::as_str);
        let kind = message.get("type").and_then(Value::as_str).unwrap_or_default();
        let channel = message.get("channel").and_then(Value::as_str);
        match (kind, channel) {
            ("subscribe", Some(channel)) => {
                if !self.channels.iter().any(|c| &**c == channel) {
                    if self.channels.len() >= MAX_SUBSCRIPTIONS {
                        let reason = format!("at most {MAX_SUBSCRIPTIONS} subscriptions per connection");
                        self.queue_error(id, ErrorCode::Forbidden, &reason);
                        return Step::Continue;
                    }
                    self.subscribe(channel);
                }
                self.queue_ok(id);
            }
            ("unsubscribe", Some(channel)) => {
                self.unsubscribe(channel);
                self.queue_ok(id);
            }
            ("publish", Some(channel)) => {
                let data = message.get("data").unwrap_or(&Value::Null);
                let delivery = Delivery::new(channel, self.gw.ids.next_id(), data);
                return Step::Publish(Box::new((delivery, id.map(str::to_string))));
            }
            ("subscribe" | "unsubscribe" | "publish", None) => {
                self.queue_error(id, ErrorCode::SchemaViolation, "`channel` must be a string");
            }
            ("auth", _) => {
                let token = message.get("token").and_then(Value::as_str).unwrap_or_default();
                self.on_auth(id, token);
            }
            ("ping", _) => match id {
                Some(id) => self.queue_json(&json!({"type": "pong", "ref": id})),
                None => self.queue_json(&json!({"type": "pong"})),
            },
            // A type the policy defines beyond the built-in ones: validated and acknowledged.
            _ => self.queue_ok(id),
        }
        Step::Continue
    }

    async fn publish(&mut self, delivery: Delivery, id: Option<String>) -> Step {
        match self.gw.backplane.publish(delivery).await {
            Ok(_) => {
                self.queue_ok(id.as_deref());
                Step::Continue
            }
            Err(e) => {
                tracing::error!(session = %self.name, error = %e.0, "publish failed");
                Step::Close(CloseCode::Internal, "publish failed".into())
            }
        }
    }

    /// An `auth` message: a valid token for the same user replaces the session's token and
    /// its expiry; anything else is refused and the current token stands.
    fn on_auth(&mut self, id: Option<&str>, token: &str) {
        // The generation this message was decided under; a newer one is adopted (and this new
        // token re-checked under it) at the next event.
        let policy = self.pipeline.ctx.policy().clone();
        match self.admit(&policy, token, "auth") {
            Ok(admission) => {
                self.adopt(policy, Some(token.to_string()), admission);
                self.queue_ok(id);
            }
            Err(denied) => {
                let reason = denied.reason();
                decisions::message_refused(
                    &self.gw.metrics,
                    Ok(ErrorCode::Forbidden),
                    None,
                    &reason,
                    &self.user,
                    self.ip,
                    &self.name,
                );
                self.queue_error(id, ErrorCode::Forbidden, &reason);
            }
        }
    }

    /// Whether `token` admits this connection under `policy`, as the handshake would decide
    /// (origin, then [`auth::admit`] for the same user); the per-address and per-user counts
    /// are left to new handshakes.
    fn admit(&self, policy: &Policy, token: &str, kind: &'static str) -> Result<Admission, Denied> {
        policy.check_origin(self.request.origin.as_deref()).map_err(|d| Denied::Origin(d.reason.to_string()))?;
        let now = SystemTime::now();
        let (admitted, audit) = auth::admit(policy, token, &self.request, Some(&self.user), &self.gw.revocations, now);
        decisions::would_deny(&self.gw.metrics, kind, &audit, &self.user, self.ip, &self.name);
        admitted.map_err(Denied::Token)
    }

    /// Moves the connection to `policy` (and a new token, if given): its rules, limits,
    /// timers and frame limits from the next event on.
    fn adopt(&mut self, policy: Arc<Policy>, token: Option<String>, admission: Admission) {
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
    fn on_policy(&mut self) -> Step {
        let policy = self.policy.borrow_and_update().clone();
        if policy.generation == self.pipeline.ctx.policy().generation {
            return Step::Continue;
        }
        match self.admit(&policy, &self.token, "reload") {
            Ok(admission) => self.adopt(policy, None, admission),
            Err(denied) => {
                let (code, reason) = (denied.code(true), denied.reason());
                if self.timers.revoked.is_none() {
                    tracing::info!(
                        target: decisions::TARGET,
                        kind = "reload",
                        outcome = "deny",
                        close = code.code(),
                        generation = policy.generation,
                        user = %self.user,
                        ip = %self.ip,
                        session = %self.name,
                        reason = %reason,
                        "the reloaded policy no longer admits this connection"
                    );
                    let at = self.gw.reload_closes.slot(Instant::now());
                    self.timers.revoked = Some((at, code, format!("policy reloaded: {reason}").into()));
                }
            }
        }
        Step::Continue
    }

    /// Ends every subscription the connection's (new) policy no longer allows, as a `subscribe`
    /// for it would now be refused: out of the hub at once (its messages stop), and the client
    /// is told with `unsubscribed`. The channels a connection has from the start stay.
    fn recheck_subscriptions(&mut self) {
        let own = format!("user:{}", self.user);
        let now = SystemTime::now();
        let mut ended = Vec::new();
        for channel in self.channels.iter().filter(|c| &***c != "alerts" && ***c != *own) {
            let (allowed, audit) = self.pipeline.ctx.allows_subscription(channel, now);
            decisions::would_deny(&self.gw.metrics, "reload", &audit, &self.user, self.ip, &self.name);
            if let Err(denial) = allowed {
                ended.push((channel.clone(), denial));
            }
        }
        let generation = self.pipeline.ctx.policy().generation;
        for (channel, denial) in ended {
            self.unsubscribe(&channel);
            decisions::subscription_ended(&self.gw.metrics, &denial, generation, &self.user, self.ip, &self.name);
            let reason = format!("policy reloaded: {}", denial.reason);
            self.queue_json(&json!({"type": "unsubscribed", "channel": &*channel, "reason": reason}));
        }
    }

    fn on_outbound(&mut self, out: Outbound) -> Step {
        match out {
            Outbound::Frame(frame) => {
                self.out.push(Message::Text(frame));
                Step::Continue
            }
            Outbound::Overflow => {
                Step::Close(CloseCode::SlowConsumer, format!("more than {OUTBOX_CAPACITY} undelivered messages"))
            }
        }
    }

    fn on_timer(&mut self) -> Step {
        let now = Instant::now();
        if self.timers.expires.is_some_and(|e| now >= e) {
            return Step::Close(CloseCode::TokenExpired, "token expired".into());
        }
        if let Some((at, code, reason)) = self.timers.revoked.take() {
            if now >= at {
                return Step::Close(code, reason.into());
            }
            self.timers.revoked = Some((at, code, reason));
        }
        let limits = &self.pipeline.limits;
        if now >= self.timers.heartbeat(limits) {
            if self.timers.awaiting_pong {
                tracing::info!(session = %self.name, user = %self.user, "heartbeat timeout: dropping the connection");
                return Step::Drop("heartbeat timeout");
            }
            self.timers.awaiting_pong = true;
            self.timers.last_ping = now;
            self.out.push(Message::Ping(Default::default()));
        }
        if now >= self.timers.idle(&self.pipeline.limits) {
            return Step::Close(CloseCode::Normal, "idle timeout".into());
        }
        // A connection a reload denied has its (paced) close booked: no re-check before it.
        if now >= self.timers.reauth(&self.pipeline.limits) && self.timers.revoked.is_none() {
            self.timers.last_auth = now;
            let policy = self.gw.policy();
            match self.admit(&policy, &self.token, "reauth") {
                Ok(admission) => self.adopt(policy, None, admission),
                Err(denied) => {
                    let (code, reason) = (denied.code(false), denied.reason());
                    tracing::info!(
                        target: decisions::TARGET,
                        kind = "reauth",
                        outcome = "deny",
                        close = code.code(),
                        user = %self.user,
                        ip = %self.ip,
                        session = %self.name,
                        reason = %reason,
                        "re-authentication failed"
                    );
                    return Step::Close(code, format!("re-authentication failed: {reason}"));
                }
            }
        }
        Step::Continue
    }

    fn subscribe(&mut self, channel: &str) {
        if self.gw.hub.subscribe(channel, self.id, &self.outbox) {
            self.gw.backplane.interest(channel, true);
        }
        // Even when another session subscribed first: its subscription may still be on its way.
        self.listen_pending = true;
        self.channels.push(channel.into());
    }

    fn unsubscribe(&mut self, channel: &str) {
        if let Some(i) = self.channels.iter().position(|c| &**c == channel) {
            self.channels.swap_remove(i);
            if self.gw.hub.unsubscribe(channel, self.id) {
                self.gw.backplane.interest(channel, false);
            }
        }
    }

    fn queue_ok(&mut self, id: Option<&str>) {
        if let Some(id) = id {
            self.queue_json(&json!({"type": "ok", "ref": id}));
        }
    }

    fn queue_error(&mut self, id: Option<&str>, code: ErrorCode, reason: &str) {
        self.queue_json(&json!({"type": "error", "ref": id, "code": code.as_str(), "reason": reason}));
    }

    fn queue_json(&mut self, value: &Value) {
        self.out.push(Message::Text(Utf8Bytes::from(value.to_string())));
    }

    /// Writes the queued frames. A client that does not take one within the write deadline
    /// (`heartbeat.timeout`) is a slow consumer: closed with 4008. Most writes complete at once; one the socket cannot take yet waits in
    /// [`write_waiting`](Self::write_waiting) (boxed: its timers would otherwise take room in
    /// every idle connection's task).
    async fn flush(&mut self) -> Result<(), Ended> {
        // Taking the queue also gives its buffer back: an idle connection holds none.
        let mut queued = std::mem::take(&mut self.out).into_iter();
        while let Some(message) = queued.next() {
            self.queue(message).await?;
            match self.ws.try_flush() {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) => return Err(Ended::Dropped("write failed")),
                Poll::Pending => return Box::pin(self.write_waiting(queued.collect())).await,
            }
        }
        Ok(())
    }

    /// Puts one frame in the write buffer.
    async fn queue(&mut self, message: Message) -> Result<(), Ended> {
        self.ws.queue(message).await.map_err(|_| Ended::Dropped("write failed"))
    }

    /// Waits for what is buffered to be written, then writes `rest` the same way. While a write
    /// waits, what must end the connection still does at once — a logout or replacement, the
    /// shutdown, the token's expiry, a reload's close — so a client that does not read cannot
    /// hold its connection past them.
    async fn write_waiting(&mut self, rest: Vec<Message>) -> Result<(), Ended> {
        let mut rest = rest.into_iter();
        loop {
            self.wait_written().await?;
            match rest.next() {
                Some(message) => self.queue(message).await?,
                None => return Ok(()),
            }
        }
    }

    async fn wait_written(&mut self) -> Result<(), Ended> {
        let deadline = Instant::now() + self.pipeline.limits.heartbeat_timeout;
        let mut ends = self.timers.ends();
        loop {
            let step = tokio::select! {
                biased;
                control = self.mailbox.recv() => self.on_control(control),
                changed = self.phase.changed(), if self.phase_open => self.on_phase(changed.is_ok()),
                () = sleep_until(ends.unwrap_or(deadline)), if ends.is_some_and(|e| e < deadline) => self.on_timer(),
                flushed = timeout_at(deadline, self.ws.flush()) => match flushed {
                    Ok(Ok(())) => return Ok(()),
                    Ok(Err(_)) => return Err(Ended::Dropped("write failed")),
                    Err(_) => Step::Close(CloseCode::SlowConsumer, "the client does not read".into()),
                },
            };
            match step {
                Step::Close(code, reason) => return Err(self.close(code, &reason).await),
                Step::Drop(why) => return Err(Ended::Dropped(why)),
                // Nothing that ends the connection (that timer is not waited for again): keep
                // writing; the flush is cancel-safe.
                _ => ends = None,
            }
        }
    }

    /// Sends a close frame and waits (bounded) for the client's; then the connection is done.
    /// Boxed: it happens once per connection, and inline its timer would sit in every idle
    /// connection's task.
    fn close<'a>(
        &'a mut self,
        code: CloseCode,
        reason: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Ended> + Send + 'a>> {
        Box::pin(self.close_now(code, reason))
    }

    async fn close_now(&mut self, code: CloseCode, reason: &str) -> Ended {
        let frame = CloseFrame { code: code.code().into(), reason: truncate(reason, MAX_CLOSE_REASON).into() };
        // The close frame may wait behind what a slow client has not read yet: a client that
        // catches up within the close timeout still learns why (4008 included). Whatever the
        // peer still sends meanwhile is read and discarded until its close: closing with unread
        // input would reset the connection and could destroy our close frame.
        self.ws.close_within(Some(frame), CLOSE_TIMEOUT).await;
        Ended::Closed(code, reason.to_string())
    }
}

impl<S> Drop for Session<S> {
    fn drop(&mut self) {
        self.gw.metrics.connections_active.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        self.gw.sessions.deregister(&self.user, self.id);
        for channel in self.gw.hub.unsubscribe_all(self.channels.iter().map(|c| &**c), self.id) {
            self.gw.backplane.interest(&channel, false);
        }
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
