//! A server's process: `stop` (a signal), `sighup`, `expect_exit`, `start` (a late server) —
//! and `wait`, which lets time pass.

use serde::Deserialize;
use tokio::time::Instant;

use crate::duration::Dur;
use crate::process::supervisor::describe_exit;
use crate::runner::ctx::RunCtx;
use crate::scenario::kind::{StepKind, about};
use crate::scenario::server::DEFAULT_SERVER;

/// The signal a `stop` step sends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub(crate) enum StopSignal {
    /// SIGTERM (what an orchestrator sends).
    #[default]
    #[serde(alias = "SIGTERM")]
    #[serde(rename = "TERM")]
    Term,
    /// SIGINT (Ctrl-C).
    #[serde(alias = "SIGINT")]
    #[serde(rename = "INT")]
    Int,
}

impl StopSignal {
    /// The name `kill` takes (`TERM`, `INT`).
    pub(crate) fn name(self) -> &'static str {
        match self {
            StopSignal::Term => "TERM",
            StopSignal::Int => "INT",
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct StopStep {
    /// Which server (default: the only one).
    pub(crate) server: Option<String>,
    /// `TERM` (default) or `INT`.
    pub(crate) signal: StopSignal,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct SighupStep {
    /// Which server (default: the only one).
    pub(crate) server: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct ExpectExitStep {
    /// Which server (default: the only one).
    pub(crate) server: Option<String>,
    /// The exit status it must have (default 0).
    pub(crate) code: i32,
    /// Deadline (default 15s: the server's default drain timeout of 10s, and some margin).
    pub(crate) within: Option<Dur>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct StartStep {
    /// Which server (one declared with `start: false`).
    pub(crate) server: Option<String>,
}

/// The default deadline of `expect_exit`.
pub(crate) const DEFAULT_EXIT_WITHIN: Dur = Dur::secs(15);

/// `wait: <duration>`.
#[derive(Debug, Clone, Deserialize)]
#[serde(transparent)]
pub(crate) struct WaitStep(pub(crate) Dur);

impl StepKind for WaitStep {
    async fn run(&self, _: &mut RunCtx<'_>) -> Result<(), String> {
        tokio::time::sleep(self.0.0).await;
        Ok(())
    }
}

impl StepKind for StopStep {
    about!(server);

    async fn run(&self, ctx: &mut RunCtx<'_>) -> Result<(), String> {
        let state = ctx.server_mut(&self.server)?;
        state.server.process.signal(self.signal.name()).await?;
        state.signalled = Some((self.signal.name(), Instant::now()));
        Ok(())
    }
}

impl StepKind for SighupStep {
    about!(server);

    async fn run(&self, ctx: &mut RunCtx<'_>) -> Result<(), String> {
        ctx.server_mut(&self.server)?.server.process.signal("HUP").await
    }
}

impl StepKind for ExpectExitStep {
    about!(server);

    async fn run(&self, ctx: &mut RunCtx<'_>) -> Result<(), String> {
        let s = self;
        let within = s.within.unwrap_or(DEFAULT_EXIT_WITHIN);
        let until = Instant::now() + within.0;
        let state = ctx.server_mut(&s.server)?;
        let outcome = state.server.process.wait_exit(until).await?;
        // "(2301 ms after SIGTERM)", when a `stop` step sent one.
        let after = state
            .signalled
            .map(|(signal, at)| format!(" ({} ms after SIG{signal})", at.elapsed().as_millis()))
            .unwrap_or_default();
        match outcome {
            Some(status) if status.code() == Some(s.code) => Ok(()),
            Some(status) => Err(format!("expected exit status {}, got {}{after}", s.code, describe_exit(status))),
            None => Err(format!(
                "expected the server to exit with status {} within {within}; it is still running{after}",
                s.code
            )),
        }
    }
}

impl StepKind for StartStep {
    about!(server);

    async fn run(&self, ctx: &mut RunCtx<'_>) -> Result<(), String> {
        ctx.start_server(self.server.as_deref().unwrap_or(DEFAULT_SERVER)).await
    }
}
