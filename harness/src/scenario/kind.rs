//! What every step is: a check against the scenario before anything runs, and a run against
//! the live servers. Each step implements it next to its serde struct in `steps/`; a step about
//! one server or one connection gets its `check`, `server` and `conn` from [`about!`].

use crate::runner::ctx::RunCtx;
use crate::scenario::check::CheckCtx;

pub(crate) trait StepKind {
    /// Fills in defaults (`server`, `conn`) and refuses what cannot run, before anything runs:
    /// `ctx` holds what the steps before this one opened and saved, and this step adds its own.
    fn check(&mut self, ctx: &mut CheckCtx) -> Result<(), String> {
        self.check_keys(ctx)
    }

    /// The step's own rules; with [`about!`], they run once `server`/`conn` is filled in and
    /// known to exist.
    fn check_keys(&mut self, _ctx: &mut CheckCtx) -> Result<(), String> {
        Ok(())
    }

    /// Carries the step out; `Err` says what was expected and what happened instead.
    async fn run(&self, ctx: &mut RunCtx<'_>) -> Result<(), String>;

    /// The server it talks to, once checked (`None` for steps about a connection, whose server
    /// was named when it was opened).
    fn server(&self) -> Option<&str> {
        None
    }

    fn conn(&self) -> Option<&str> {
        None
    }
}

/// Inside `impl StepKind`, for a step whose `server` (or `conn`) key says what it is about: the
/// accessor, and a `check` that fills the key in when the scenario leaves one choice and
/// refuses a name that does not exist before the step's `check_keys` run.
macro_rules! about {
    (server) => {
        $crate::scenario::kind::about!(server, pick_server, servers);
    };
    (conn) => {
        $crate::scenario::kind::about!(conn, pick_conn, conns);
    };
    ($key:ident, $pick:ident, $names:ident) => {
        fn $key(&self) -> Option<&str> {
            self.$key.as_deref()
        }

        fn check(&mut self, ctx: &mut $crate::scenario::check::CheckCtx) -> Result<(), String> {
            $crate::scenario::check::$pick(&mut self.$key, &ctx.$names)?;
            self.check_keys(ctx)
        }
    };
}
pub(crate) use about;
