//! Running a checked scenario against real processes.

pub(crate) mod ctx;
pub(crate) mod run;
#[cfg(test)]
mod tests;
