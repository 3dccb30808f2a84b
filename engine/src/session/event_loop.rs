//! The loop of one connection: open it, then one `select!` over the next frame, the outbound
//! queue, the timers and the signals from outside, until it ends; and what each event means.

use std::net::IpAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};
use tungstenite::{Error as WsError, Message};

use super::timers::{Timers, instant_of};
use crate::broker::delivery::Delivery;
use crate::broker::hub::{Outbound, Outbox, SessionId};
use crate::broker::redis::admission::Lease;
use crate::close::{CloseCode, Ended, Ending};
use crate::decisions::{self, Who};
use crate::gateway::{Failpoint, Gateway};
use crate::handshake::Admitted;
use crate::lifecycle::Phase;
use crate::limits::per_ip::IpSlot;
use crate::pipeline::{Decision, Frame, Pipeline};
use crate::policy::{ConnContext, ConnInfo, Policy, RequestInfo};
use crate::registry::{Instruction, Mailbox};
use crate::ws::WebSocket;

/// Deliveries queued for one client before it counts as a slow consumer (4008).
pub const OUTBOX_CAPACITY: usize = 256;
/// Channels one connection may be subscribed to, `alerts` and `user:<id>` included.
pub const MAX_SUBSCRIPTIONS: usize = 64;
/// How long a close handshake may take before the connection is simply dropped.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the loop does after a handler.
pub(super) enum Step {
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

impl From<Ending> for Step {
    fn from(ending: Ending) -> Step {
        let (code, reason) = ending.close();
        Step::Close(code, reason)
    }
}

/// One live connection.
pub struct Session<S> {
    /// Shared instance state.
    pub(super) gw: Arc<Gateway>,
    pub(super) ws: WebSocket<S>,
    /// Frames to send once the current handler is done.
    pub(super) out: Vec<Message>,
    /// Process-unique number (registry and hub key).
    pub(super) id: SessionId,
    /// The id clients and logs see: `<instance>.<number>`.
    pub(super) name: String,
    pub(super) user: String,
    /// The client's address.
    pub(super) ip: IpAddr,
    /// When the connection was accepted (for `conn.connected_at`).
    pub(super) connected_at: SystemTime,
    /// Decides each client frame.
    pub(super) pipeline: Pipeline,
    /// Deliveries for this client.
    pub(super) outbox: Outbox,
    /// Instructions from the registry (replacement, logout).
    pub(super) mailbox: Arc<Mailbox>,
    pub(super) phase: watch::Receiver<Phase>,
    /// Whether `phase` can still change (stop polling a closed channel).
    pub(super) phase_open: bool,
    /// The active policy: a new generation is re-checked and adopted at once.
    pub(super) policy: watch::Receiver<Arc<Policy>>,
    /// Channels this session is subscribed to.
    pub(super) channels: Vec<Box<str>>,
    /// A subscription was made that the backplane may not have in effect yet: wait for it
    /// before the next write confirms it (the welcome, or `ok` to a `subscribe`).
    pub(super) listen_pending: bool,
    /// The current token, for re-authentication. Never logged.
    pub(super) token: String,
    /// The upgrade request as connect rules see it, for re-authentication.
    pub(super) request: RequestInfo,
    /// Heartbeat, idle, re-authentication and expiry.
    pub(super) timers: Timers,
    /// Keeps this connection counted against its IP until it ends.
    pub(super) _ip_slot: IpSlot,
    /// Keeps it counted across every instance (`--redis`) until it ends.
    pub(super) _lease: Option<Lease>,
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
    decisions::would_deny(&gw.metrics, "handshake", &audit, Who { user: &user, ip, session: &name });
    let connected_at = SystemTime::now();
    let conn =
        ConnInfo { id: name.clone(), user: user.clone(), ip, instance: gw.options.instance_id.clone(), connected_at };
    let generation = policy.generation;
    let ctx = ConnContext::new(policy, &claims, &conn);
    let timers = Timers::new(Instant::now(), expires_at.map(instant_of));
    // A reload between this connection's handshake and now is adopted at the first event.
    let mut active_policy = gw.policy.watch();
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
    if let (Some(redis), Some(lease)) = (gw.broker.redis_link(), &lease) {
        // Connections of the user on other instances beyond `max_per_user` close with 4009.
        let (redis, member, user) = (redis.clone(), lease.member().to_string(), user.clone());
        tokio::spawn(async move { redis.register(&member, &user, max_per_user).await });
    }
    let mut session = Box::new(Session {
        phase: gw.lifecycle.watch(),
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
    let replaced = gw.registry.register(&session.user, id, session.mailbox.clone(), max_per_user);
    gw.metrics.connections_active.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(session = %session.name, user = %session.user, ip = %ip, replaced, "connection opened");
    session.subscribe("alerts");
    let own = format!("user:{}", session.user);
    session.subscribe(&own);
    session.queue_json(&welcome);
    session
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
        metrics.closed(&ended);
        tracing::info!(session = %self.name, user = %self.user, ended = ?ended, seconds = lived.as_secs_f64(), "connection closed");
        ended
    }

    /// The loop: wait for the next event, let its handler decide, then publish, write and
    /// close as it said.
    pub(super) async fn serve(&mut self) -> Ended {
        // A session opened just as the drain began has already "seen" the new phase, and is
        // not among those the drain closes (it takes its list after the phase changed).
        if !self.phase.borrow().serves() {
            let (code, reason) = Ending::ShuttingDown.close();
            return self.close(code, &reason).await;
        }
        loop {
            if std::mem::take(&mut self.listen_pending) {
                self.gw.broker.listening().await;
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
    pub(super) async fn act(&mut self, step: Step) -> Option<Ended> {
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

    pub(super) fn on_control(&mut self, control: Instruction) -> Step {
        match control {
            Instruction::Close(code, reason) => Step::Close(code, reason),
        }
    }

    /// The server's phase moved on. The drain closes live sessions itself, paced
    /// ([`crate::drain`]), so only the end of the drain (or of the server) closes one here.
    pub(super) fn on_phase(&mut self, open: bool) -> Step {
        self.phase_open = open;
        if !open || *self.phase.borrow_and_update() == Phase::Closed {
            return Ending::ShuttingDown.into();
        }
        Step::Continue
    }

    pub(super) fn on_frame(&mut self, frame: Option<Result<Message, WsError>>) -> Step {
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

    pub(super) fn on_read_error(&mut self, e: WsError) -> Step {
        match e {
            WsError::Capacity(_) => {
                let (code, reason) = Ending::TooBig { max: self.pipeline.limits.max_bytes }.close();
                decisions::message_refused(&self.gw.metrics, Err(code), None, &reason, self.who());
                Step::Close(code, reason)
            }
            // It pings faster than it reads the answers.
            WsError::WriteBufferFull(_) => Ending::NotReading.into(),
            WsError::Utf8(_) => Ending::NotUtf8.into(),
            WsError::Protocol(p) => {
                tracing::debug!(session = %self.name, error = %p, "WebSocket protocol error");
                Ending::ProtocolError.into()
            }
            _ => Step::Drop("connection lost"),
        }
    }

    /// A data frame: the pipeline decides, then the message is routed or refused. A panic in
    /// here (a bug, in us or a dependency) closes this connection with 1011 and leaves everyone
    /// else untouched.
    pub(super) fn on_data(&mut self, frame: Frame<'_>) -> Step {
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
                Ending::Internal.into()
            }
        }
    }

    pub(super) fn decide(&mut self, frame: Frame<'_>, now: Instant) -> Step {
        let decision = self.pipeline.process(frame, now, SystemTime::now());
        self.apply(decision)
    }

    /// Acts on the pipeline's decision.
    pub(super) fn apply(&mut self, decision: Decision) -> Step {
        match decision {
            Decision::Accept { message, audit } => {
                decisions::would_deny(&self.gw.metrics, "message", &audit, self.who());
                if let Some(Failpoint::PanicOnMessageType(kind)) = self.gw.failpoint()
                    && message.get("type").and_then(Value::as_str) == Some(kind.as_str())
                {
                    panic!("failpoint panic_on_message_type:{kind}");
                }
                self.route(&message)
            }
            Decision::Ignore => Step::Continue,
            Decision::Refuse { code, id, reason, rule, audit } => {
                decisions::would_deny(&self.gw.metrics, "message", &audit, self.who());
                decisions::message_refused(&self.gw.metrics, Ok(code), rule.as_ref(), &reason, self.who());
                self.queue_error(id.as_deref(), code, &reason);
                Step::Continue
            }
            Decision::Close { code, reason, rule } => {
                decisions::message_refused(&self.gw.metrics, Err(code), rule.as_ref(), &reason, self.who());
                Step::Close(code, reason)
            }
        }
    }

    pub(super) fn on_outbound(&mut self, out: Outbound) -> Step {
        match out {
            Outbound::Frame(frame) => {
                self.out.push(Message::Text(frame));
                Step::Continue
            }
            Outbound::Overflow => Ending::Overflow { capacity: OUTBOX_CAPACITY }.into(),
        }
    }

    pub(super) fn on_timer(&mut self) -> Step {
        let now = Instant::now();
        if self.timers.expires.is_some_and(|e| now >= e) {
            return Ending::TokenExpired.into();
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
            return Ending::Idle.into();
        }
        // A connection a reload denied has its (paced) close booked: no re-check before it.
        if now >= self.timers.reauth(&self.pipeline.limits) && self.timers.revoked.is_none() {
            self.timers.last_auth = now;
            return self.reauthenticate();
        }
        Step::Continue
    }

    /// The connection, as decision lines name it.
    pub(super) fn who(&self) -> Who<'_> {
        Who { user: &self.user, ip: self.ip, session: &self.name }
    }
}

impl<S> Drop for Session<S> {
    fn drop(&mut self) {
        self.gw.metrics.connections_active.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        self.gw.registry.deregister(&self.user, self.id);
        self.gw.broker.unsubscribe_all(self.channels.iter().map(|c| &**c), self.id);
    }
}
