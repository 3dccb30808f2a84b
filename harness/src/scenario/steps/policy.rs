//! A running server's policy and log: `edit_policy` rewrites its directory, `expect_log` waits
//! for a line.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

use crate::duration::Dur;
use crate::runner::ctx::{RunCtx, deadline};
use crate::scenario::check::CheckCtx;
use crate::scenario::kind::{StepKind, about};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct EditPolicyStep {
    pub(crate) server: Option<String>,
    /// Overrides merged into the policy as it stands (or into the repository's with `replace`).
    pub(crate) policy: Option<Value>,
    /// Files to (re)write.
    pub(crate) files: BTreeMap<String, String>,
    /// Start from the repository's policy instead of the current one.
    pub(crate) replace: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ExpectLogStep {
    pub(crate) server: Option<String>,
    /// The text a line must contain.
    pub(crate) contains: String,
    /// Deadline (default 5s).
    pub(crate) within: Option<Dur>,
}

impl StepKind for EditPolicyStep {
    about!(server);

    fn check_keys(&mut self, _: &mut CheckCtx) -> Result<(), String> {
        if self.policy.as_ref().is_some_and(|p| !p.is_object()) {
            return Err("`policy` must be a mapping".into());
        }
        Ok(())
    }

    async fn run(&self, ctx: &mut RunCtx<'_>) -> Result<(), String> {
        let files: Vec<(String, String)> = self.files.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let state = ctx.server_mut(&self.server)?;
        state.dir.apply(self.policy.as_ref(), &files, self.replace)
    }
}

impl StepKind for ExpectLogStep {
    about!(server);

    async fn run(&self, ctx: &mut RunCtx<'_>) -> Result<(), String> {
        let (until, within) = deadline(self.within);
        let log = Arc::clone(ctx.server(&self.server).server.process.log());
        log.wait_for(|line| line.contains(self.contains.as_str()).then_some(()), until)
            .await
            .map_err(|_| format!("no log line containing {:?} within {within}", self.contains))
    }
}
