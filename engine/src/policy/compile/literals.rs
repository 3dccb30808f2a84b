//! The values every section is made of: CEL expressions, counts, durations, sizes and windows,
//! each a literal checked against its range or an expression checked against its place's
//! variables (a constant expression is evaluated and range-checked at load).

use std::ops::RangeInclusive;
use std::time::Duration;

use super::driver::Compiler;
use crate::policy::compiled::{Limit, WindowLimit};
use crate::policy::decision::{self, LimitError};
use crate::policy::error::At;
use crate::policy::expr::check;
use crate::policy::expr::eval::Expr;
use crate::policy::expr::vars::VarSet;
use crate::policy::model::{CountSpec, DurationSpec, Located, SizeSpec, WindowSpec};
use crate::policy::units::{format_duration, parse_duration, parse_size};

/// Evaluates a limit's expression for one connection, or for the check of a constant one.
type Eval<T> = fn(&Limit<T>, &cel::Context<'_, '_>, &'static str) -> Result<T, LimitError>;

impl Compiler<'_> {
    pub(super) fn expr(&mut self, at: &At<'_>, source: &str, vars: VarSet) -> Option<Expr> {
        match check::compile(source, vars, &self.sizes) {
            Ok(e) => Some(e),
            Err(e) => {
                self.errors.push(at, e.message);
                None
            }
        }
    }

    /// The limit at `path` (a count, duration or size), reported at `spec`'s place: a literal
    /// checked against `range`, or an expression checked against `vars`.
    pub(super) fn limit<S: LimitSpec>(
        &mut self,
        file: &str,
        path: impl Into<String>,
        spec: &Located<S>,
        vars: VarSet,
        range: RangeInclusive<S::Value>,
    ) -> Option<Limit<S::Value>> {
        let at = &At::of(file, path, spec);
        match spec.value.parse() {
            Parsed::Literal(v) => self.in_range(at, v, &range, S::show).map(Limit::Literal),
            Parsed::Malformed(message) => {
                self.errors.push(at, message);
                None
            }
            Parsed::Expr(source) => self.limit_expr(at, source, vars, range, S::EVAL),
        }
    }

    /// A CEL limit. One that reads no variable is a constant: it is evaluated and range-checked
    /// now, so `max_per_user: "0"` is refused by `policy check`, not by every handshake.
    fn limit_expr<T: Copy>(
        &mut self,
        at: &At<'_>,
        source: &str,
        vars: VarSet,
        range: RangeInclusive<T>,
        eval: Eval<T>,
    ) -> Option<Limit<T>> {
        let expr = self.expr(at, source, vars)?;
        let constant = expr.uses == VarSet::NONE;
        let limit = Limit::Expr { expr, min: *range.start(), max: *range.end() };
        if !constant {
            return Some(limit);
        }
        match eval(&limit, &cel::Context::with_env(self.cel_env.clone()), "constant") {
            Ok(v) => Some(Limit::Literal(v)),
            Err(e) => {
                self.errors.push(at, e.error);
                None
            }
        }
    }

    fn in_range<T: PartialOrd + Copy>(
        &mut self,
        at: &At<'_>,
        v: T,
        range: &RangeInclusive<T>,
        show: impl Fn(&T) -> String,
    ) -> Option<T> {
        if range.contains(&v) {
            Some(v)
        } else {
            self.errors.push(at, format!("out of range: allowed {} to {}", show(range.start()), show(range.end())));
            None
        }
    }

    /// A window's `max` and `per` are checked at their own places under `path`.
    pub(super) fn window(
        &mut self,
        file: &str,
        path: &str,
        w: &Located<WindowSpec>,
        vars: VarSet,
        per: RangeInclusive<Duration>,
    ) -> Option<WindowLimit> {
        let w = &w.value;
        let max = self.limit(file, format!("{path}.max"), &w.max, vars, 1..=10_000_000);
        let per = self.limit(file, format!("{path}.per"), &w.per, vars, per);
        Some(WindowLimit { max: max?, per: per? })
    }
}

/// What a limit's text says before its range is checked.
pub(super) enum Parsed<'s, T> {
    Literal(T),
    /// Meant as a literal but not one; the message says how to write it.
    Malformed(&'static str),
    Expr(&'s str),
}

/// A kind of limit a policy writes as a literal or a CEL expression.
pub(super) trait LimitSpec {
    type Value: PartialOrd + Copy;
    const EVAL: Eval<Self::Value>;
    fn parse(&self) -> Parsed<'_, Self::Value>;
    /// A value as an error message shows a range's ends.
    fn show(v: &Self::Value) -> String;
}

impl LimitSpec for CountSpec {
    type Value = u64;
    const EVAL: Eval<u64> = decision::count;

    fn parse(&self) -> Parsed<'_, u64> {
        match self {
            CountSpec::Literal(n) => Parsed::Literal(*n),
            CountSpec::Expr(src) => Parsed::Expr(src),
        }
    }

    fn show(n: &u64) -> String {
        n.to_string()
    }
}

impl LimitSpec for DurationSpec {
    type Value = Duration;
    const EVAL: Eval<Duration> = decision::duration;

    fn parse(&self) -> Parsed<'_, Duration> {
        match parse_duration(&self.0) {
            Some(d) => Parsed::Literal(d),
            None if looks_like_a_duration(&self.0) => Parsed::Malformed(
                "not a duration: write a number with a unit (ms, s, m, h, d), e.g. \"30s\" or \"1h30m\"",
            ),
            None => Parsed::Expr(&self.0),
        }
    }

    fn show(d: &Duration) -> String {
        format_duration(*d)
    }
}

impl LimitSpec for SizeSpec {
    type Value = u64;
    const EVAL: Eval<u64> = decision::count;

    fn parse(&self) -> Parsed<'_, u64> {
        match self {
            SizeSpec::Literal(n) => Parsed::Literal(*n),
            SizeSpec::Text(t) => match parse_size(t) {
                Some(n) => Parsed::Literal(n),
                None if t.trim().bytes().next().is_some_and(|b| b.is_ascii_digit())
                    && !t.contains(['(', '?', '+', '*']) =>
                {
                    Parsed::Malformed("not a size: write bytes (10240) or a number with B, KiB, MiB, KB or MB")
                }
                None => Parsed::Expr(t),
            },
        }
    }

    fn show(n: &u64) -> String {
        format!("{n} bytes")
    }
}

fn looks_like_a_duration(text: &str) -> bool {
    let t = text.trim();
    t.bytes().next().is_some_and(|b| b.is_ascii_digit())
        && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b' ')
}
