//! The scenario format: the file (`format`), the server declaration (`server`), the steps
//! (`kind`, `step`, `steps/`) and the checks they share (`check`).

pub(crate) mod check;
pub(crate) mod format;
pub(crate) mod kind;
pub(crate) mod server;
pub(crate) mod step;
pub(crate) mod steps;
#[cfg(test)]
mod tests;
