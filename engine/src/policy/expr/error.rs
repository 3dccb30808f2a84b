//! The refusal of an expression at load time, shared by the checks here and the regex table
//! of `matches`.

use std::fmt;

/// Why an expression was refused at load time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExprError {
    /// What is wrong, for the policy's author; it never quotes a literal of the expression.
    pub message: String,
}

impl fmt::Display for ExprError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}
