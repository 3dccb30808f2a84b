//! What the commands share: the exit status of a configuration error, how a refused policy is
//! printed, and the duration arguments.

use std::time::Duration;

use crate::policy::compile::driver::process_env;
use crate::policy::{CompileOptions, PolicyErrors, units};

/// Exit status for a command-line or configuration error (sysexits' EX_USAGE / EX_CONFIG
/// family): a refused policy, a missing key.
pub(crate) const EXIT_CONFIG: u8 = 64;

pub(crate) fn parse_ttl(s: &str) -> Result<Duration, String> {
    units::parse_duration(s).ok_or_else(|| format!("`{s}` is not a duration (e.g. 15m, 1h)"))
}

pub(crate) fn options() -> CompileOptions<'static> {
    CompileOptions { generation: 1, secret_lookup: &process_env }
}

pub(crate) fn print_errors(errors: &PolicyErrors) {
    for e in &errors.0 {
        eprintln!("{e}");
    }
    eprintln!("policy refused: {} error{}", errors.0.len(), if errors.0.len() == 1 { "" } else { "s" });
}
