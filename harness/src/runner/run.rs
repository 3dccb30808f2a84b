//! Runs one scenario: starts its Redis (with `redis: true`) and its servers from private policy
//! copies, carries out its steps in order against them, and turns the first unmet expectation
//! into a precise failure (step, what was expected, what arrived, and the tail of each
//! process's log). Every token and secret the scenario hands out is registered for redaction and
//! for the log-leak check that ends every passing scenario.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::fixtures::token::SigningKey;
use crate::process::redis_cluster::{Redis, RedisCluster};
use crate::process::redis_server::{self, RedisServer};
use crate::runner::ctx::{RunConfig, RunCtx};
use crate::scenario::format::Scenario;

/// How long Redis may take to start with the scenario.
const REDIS_READY: Duration = Duration::from_secs(10);
/// How long a three-node Redis Cluster may take to form.
const REDIS_CLUSTER_READY: Duration = Duration::from_secs(30);

/// Runs `scenario`; `Err` carries the complete, redacted failure report.
pub(crate) async fn run(scenario: &Scenario, cfg: &RunConfig) -> Result<(), String> {
    let mut ctx = RunCtx::new(cfg, &scenario.servers, scenario.redis);
    let result = match start_servers(&mut ctx, scenario).await {
        Err(e) => Err(e),
        Ok(()) => {
            let mut current = 0usize;
            let limit = scenario.timeout();
            let outcome = tokio::time::timeout(limit.0, run_steps(&mut ctx, scenario, &mut current)).await;
            match outcome {
                Ok(result) => result,
                Err(_) => Err(format!(
                    "step {} ({}): the scenario did not finish within its timeout of {limit}",
                    current + 1,
                    scenario.steps[current].kind()
                )),
            }
        }
    };
    // A step failure is reported while the servers are as the failure left them.
    let report = result.map_err(|e| ctx.failure_report(&e, true));
    ctx.conns.clear();
    for state in ctx.servers.values_mut() {
        let process = &mut state.server.process;
        // A server that has already exited (an `expect_exit`, or a crash) is left alone; its
        // captured output is still complete for the leak check below.
        let _ = process.stop(Duration::from_secs(10)).await;
        // The last lines are still in the pipes when the process exits.
        let _ = process.log().wait_for(|_| None::<()>, Instant::now() + Duration::from_secs(2)).await;
        if let Some(haproxy) = &mut state.haproxy {
            haproxy.stop(Duration::from_secs(5)).await;
        }
    }
    // Redis last, so the servers never see it go away while they shut down.
    if let Some(redis) = &mut ctx.redis {
        redis.stop(Duration::from_secs(5)).await;
    }
    report?;
    // Checked after the stop, so what the servers print while shutting down counts too.
    let leaks = ctx.redactor.leaks();
    if leaks.is_empty() {
        Ok(())
    } else {
        Err(ctx.failure_report(&format!("a log contains a secret (SPEC §2): {}", leaks.join("; ")), false))
    }
}

async fn start_servers(ctx: &mut RunCtx<'_>, scenario: &Scenario) -> Result<(), String> {
    for (i, marker) in scenario.never_logged.iter().enumerate() {
        ctx.redactor.register(format!("the planted marker `never_logged[{i}]`"), marker.clone());
    }
    for name in &scenario.signing_keys {
        let key = SigningKey::generate(name)?;
        ctx.redactor.register(format!("the private signing key `{name}`"), key.private_marker.clone());
        ctx.signing_keys.insert(name.clone(), key);
    }
    if scenario.redis {
        let bin = redis_server::find_redis_server().map_err(|e| format!("the scenario has `redis: true`, but {e}"))?;
        let redactor = Arc::clone(&ctx.redactor);
        ctx.redis = Some(if scenario.redis_cluster {
            Redis::Cluster(RedisCluster::start(&bin, redactor, REDIS_CLUSTER_READY).await?)
        } else {
            Redis::Server(Box::new(RedisServer::start(&bin, redactor, REDIS_READY).await?))
        });
    }
    for (name, spec) in &scenario.servers {
        if spec.starts_with_the_scenario() {
            ctx.start_server(name).await?;
        }
    }
    Ok(())
}

async fn run_steps(ctx: &mut RunCtx<'_>, scenario: &Scenario, current: &mut usize) -> Result<(), String> {
    for (i, step) in scenario.steps.iter().enumerate() {
        *current = i;
        ctx.index = i;
        let label = match step.conn() {
            Some(conn) => format!("step {} ({} `{conn}`)", i + 1, step.kind()),
            None => format!("step {} ({})", i + 1, step.kind()),
        };
        step.run(ctx).await.map_err(|e| format!("{label}: {e}"))?;
    }
    Ok(())
}
