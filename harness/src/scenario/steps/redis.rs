//! The scenario's Redis: `stop_redis`, `start_redis`, and `redis_publish` as a backend would.

use serde::Deserialize;
use serde_json::Value;

use crate::duration::Dur;
use crate::runner::ctx::{DEFAULT_WITHIN, RunCtx};
use crate::scenario::check::CheckCtx;
use crate::scenario::kind::StepKind;

/// The signal `stop_redis` sends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub(crate) enum RedisSignal {
    /// SIGKILL: Redis dies at once, as in a crash or a lost host.
    #[default]
    #[serde(alias = "SIGKILL")]
    #[serde(rename = "KILL")]
    Kill,
    /// SIGTERM: Redis shuts down cleanly, closing its clients' connections.
    #[serde(alias = "SIGTERM")]
    #[serde(rename = "TERM")]
    Term,
}

impl RedisSignal {
    /// The name `kill` takes (`KILL`, `TERM`).
    pub(crate) fn name(self) -> &'static str {
        match self {
            RedisSignal::Kill => "KILL",
            RedisSignal::Term => "TERM",
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct StopRedisStep {
    /// `KILL` (default) or `TERM`.
    pub(crate) signal: RedisSignal,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct StartRedisStep {
    /// How long Redis may take to answer (default 10s).
    pub(crate) within: Option<Dur>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RedisPublishStep {
    /// The Redis channel (`wsgate:ch:alerts` for the gateway channel `alerts`).
    pub(crate) channel: String,
    /// The message: a string is sent as it is, anything else as JSON.
    pub(crate) payload: Value,
    /// How many Redis subscribers must have received it (the integer `PUBLISH` answers).
    pub(crate) expect_receivers: Option<i64>,
}

/// The default deadline of `start_redis`.
pub(crate) const DEFAULT_REDIS_READY: Dur = Dur::secs(10);

impl StepKind for StopRedisStep {
    async fn run(&self, ctx: &mut RunCtx<'_>) -> Result<(), String> {
        ctx.redis_mut()?.kill(self.signal.name()).await?;
        ctx.redis_stopped = true;
        Ok(())
    }
}

impl StepKind for StartRedisStep {
    fn check_keys(&mut self, _: &mut CheckCtx) -> Result<(), String> {
        if self.within.is_some_and(|d| d.0.is_zero()) {
            return Err("`within` must be more than 0ms".into());
        }
        Ok(())
    }

    async fn run(&self, ctx: &mut RunCtx<'_>) -> Result<(), String> {
        let within = self.within.unwrap_or(DEFAULT_REDIS_READY);
        ctx.redis_mut()?.restart(within.0).await?;
        ctx.redis_stopped = false;
        Ok(())
    }
}

impl StepKind for RedisPublishStep {
    fn check_keys(&mut self, _: &mut CheckCtx) -> Result<(), String> {
        if self.channel.is_empty() {
            return Err("`channel` must not be empty".into());
        }
        Ok(())
    }

    async fn run(&self, ctx: &mut RunCtx<'_>) -> Result<(), String> {
        let payload = match &self.payload {
            Value::String(text) => text.clone(),
            other => other.to_string(),
        };
        let redis = ctx.redis_mut()?;
        let receivers = redis.publish(&self.channel, payload.as_bytes(), DEFAULT_WITHIN.0).await?;
        match self.expect_receivers {
            Some(want) if want != receivers => Err(format!(
                "expected {} {} to reach {want} Redis subscriber(s), it reached {receivers}",
                redis.publish_command(),
                self.channel
            )),
            _ => Ok(()),
        }
    }
}
