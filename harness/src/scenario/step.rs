//! The [`Step`] enum: the serde entry point of a step, dispatching once to its [`StepKind`].
//! Adding a step is its struct and impl in a `steps/` file, plus one line in the `steps!` list
//! below.

use serde::Deserialize;

use crate::runner::ctx::RunCtx;
use crate::scenario::check::CheckCtx;
use crate::scenario::kind::StepKind;
use crate::scenario::steps::close::{CloseStep, ExpectCloseStep, ExpectDroppedStep};
use crate::scenario::steps::connect::ConnectStep;
use crate::scenario::steps::frames::{ExpectNoFrameStep, ExpectStep, PauseReadingStep, ResumeReadingStep, SendStep};
use crate::scenario::steps::http::HttpStep;
use crate::scenario::steps::policy::{EditPolicyStep, ExpectLogStep};
use crate::scenario::steps::process::{ExpectExitStep, SighupStep, StartStep, StopStep, WaitStep};
use crate::scenario::steps::publish::PublishStep;
use crate::scenario::steps::redis::{RedisPublishStep, StartRedisStep, StopRedisStep};

macro_rules! steps {
    ($($(#[doc = $doc:literal])* $key:literal => $variant:ident($ty:ty),)*) => {
        /// One step. Written as a one-key mapping: `- connect: {…}`.
        #[derive(Debug, Clone, Deserialize)]
        pub(crate) enum Step {
            $($(#[doc = $doc])* #[serde(rename = $key)] $variant($ty),)*
        }

        impl Step {
            /// The step's key, for messages.
            pub(crate) fn kind(&self) -> &'static str {
                match self {
                    $(Step::$variant(_) => $key,)*
                }
            }

            pub(crate) fn check(&mut self, ctx: &mut CheckCtx) -> Result<(), String> {
                match self {
                    $(Step::$variant(s) => s.check(ctx),)*
                }
            }

            /// The server a step talks to, once `check` has filled it in.
            pub(crate) fn server(&self) -> Option<&str> {
                match self {
                    $(Step::$variant(s) => s.server(),)*
                }
            }

            pub(crate) fn conn(&self) -> Option<&str> {
                match self {
                    $(Step::$variant(s) => s.conn(),)*
                }
            }

            pub(crate) async fn run(&self, ctx: &mut RunCtx<'_>) -> Result<(), String> {
                match self {
                    $(Step::$variant(s) => s.run(ctx).await,)*
                }
            }
        }
    };
}

steps! {
    /// Open a WebSocket connection (or expect the handshake to be refused).
    "connect" => Connect(ConnectStep),
    /// Send one or more frames.
    "send" => Send(SendStep),
    /// The next frame(s) must match.
    "expect" => Expect(ExpectStep),
    /// The server must close the connection with a close frame.
    "expect_close" => ExpectClose(ExpectCloseStep),
    /// The connection must end (TCP closed), with or without a close frame.
    "expect_dropped" => ExpectDropped(ExpectDroppedStep),
    /// Nothing may arrive for a while.
    "expect_no_frame" => ExpectNoFrame(ExpectNoFrameStep),
    /// The client closes and expects the server's close echo.
    "close" => Close(CloseStep),
    /// Let time pass (only where time itself is the subject).
    "wait" => Wait(WaitStep),
    /// Publish through the admin API.
    "publish" => Publish(PublishStep),
    /// A plain HTTP request to a listener.
    "http" => Http(HttpStep),
    /// Rewrite a running server's policy directory.
    "edit_policy" => EditPolicy(EditPolicyStep),
    /// Stop reading a connection's socket (a slow consumer).
    "pause_reading" => PauseReading(PauseReadingStep),
    /// Read it again.
    "resume_reading" => ResumeReading(ResumeReadingStep),
    /// A server's log must (come to) contain a text.
    "expect_log" => ExpectLog(ExpectLogStep),
    /// Send a server a signal (SIGTERM by default) and go on at once.
    "stop" => Stop(StopStep),
    /// Send a server SIGHUP (reload its policy and certificate) and go on at once.
    "sighup" => Sighup(SighupStep),
    /// A server must exit, with this status, within a deadline.
    "expect_exit" => ExpectExit(ExpectExitStep),
    /// Start a server declared with `start: false`, and wait until it listens.
    "start" => Start(StartStep),
    /// Kill the scenario's Redis (SIGKILL by default) and wait until it is gone.
    "stop_redis" => StopRedis(StopRedisStep),
    /// Start the scenario's Redis again, on the same port, and wait until it answers.
    "start_redis" => StartRedis(StartRedisStep),
    /// `PUBLISH` straight into the scenario's Redis, as a backend would.
    "redis_publish" => RedisPublish(RedisPublishStep),
}
