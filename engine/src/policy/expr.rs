//! CEL expressions: compiled once at load time, bounded so that no policy can crash or stall
//! the server, and evaluated fail-closed.
//!
//! The `cel` crate has no cost limit, and deep expressions overflow the stack while parsing,
//! evaluating or dropping (see CRATES.md). So before an expression is accepted it must pass,
//! in this order:
//! 1. a length bound ([`MAX_EXPR_LEN`]) checked before parsing, which also bounds how deep
//!    the parser can recurse; the whole policy compile runs on a thread with a large stack
//!    (`compile.rs`), so even the longest allowed expression parses and drops safely;
//! 2. an AST depth bound ([`MAX_AST_DEPTH`]), measured without recursion, so every accepted
//!    expression evaluates and drops well within a 2 MiB worker stack;
//! 3. a bound on nested comprehensions ([`MAX_COMPREHENSION_NESTING`]);
//! 4. known variables only, from the set the expression's place allows (a connect rule cannot
//!    read `message`), and known functions only, so a typo fails at load, not per request;
//! 5. a static worst-case cost estimate under [`COST_BUDGET`], in the spirit of Kubernetes'
//!    CEL cost estimator: each node costs one unit, work over strings and lists costs by
//!    their worst-case size, and a comprehension multiplies its body by its range's worst-case
//!    length. Sizes of inputs come from the policy's own bounds (`messages.max_bytes`, the
//!    token and header limits).
//!
//! Regular expressions (`matches`) must be string literals: each is compiled here, once, under
//! [`MAX_REGEX_BYTES`], and the expression is rewritten to call the compiled regex (see
//! `matches.rs`), so no evaluation compiles a pattern and no pattern can come from a message or
//! a claim.
//!
//! Run-time errors ([`EvalError`]) name the kind of failure and the types involved, never an
//! operand's value: a value can be a claim, a message field or a token, and these errors are
//! logged and shown in policy test output.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use cel::common::ast::{EntryExpr, Expr as Node, LiteralValue};
use cel::objects::ValueType;
use cel::{Context, ExecutionError, IdedExpr, Program, Value};
use regex::Regex;

pub use super::matches::MAX_REGEX_BYTES;
use super::matches::{self, RegexScope, RegexTable};

/// Longest expression accepted, in bytes.
pub const MAX_EXPR_LEN: usize = 4096;
/// Deepest expression tree accepted.
pub const MAX_AST_DEPTH: usize = 48;
/// Most comprehensions (`all`, `exists`, `map`, `filter`, …) nested inside each other.
pub const MAX_COMPREHENSION_NESTING: usize = 2;
/// Largest estimated worst-case cost accepted for one evaluation. One unit is about one node
/// evaluated or one byte allocated, so no accepted expression builds a megabyte of data.
pub const COST_BUDGET: u64 = 1_000_000;

/// The variables a CEL expression may read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Var {
    /// The verified token's claims.
    Claims,
    /// The HTTP upgrade request: `ip`, `origin`, `path`, `query`, `headers`.
    Request,
    /// The connection: `id`, `user`, `ip`, `instance`, `connected_at`.
    Conn,
    /// The client message being decided.
    Message,
    /// The current time, a timestamp.
    Now,
}

impl Var {
    /// Every variable, in the order they are listed in messages.
    pub const ALL: [Var; 5] = [Var::Claims, Var::Request, Var::Conn, Var::Message, Var::Now];

    /// The name CEL code uses.
    pub fn name(self) -> &'static str {
        match self {
            Var::Claims => "claims",
            Var::Request => "request",
            Var::Conn => "conn",
            Var::Message => "message",
            Var::Now => "now",
        }
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// A set of variables.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VarSet(u8);

impl VarSet {
    /// The empty set.
    pub const NONE: VarSet = VarSet(0);

    /// A set of the given variables.
    pub const fn of(vars: &[Var]) -> VarSet {
        let mut bits = 0u8;
        let mut i = 0;
        while i < vars.len() {
            bits |= 1 << vars[i] as u8;
            i += 1;
        }
        VarSet(bits)
    }

    /// Whether `var` is in the set.
    pub fn contains(self, var: Var) -> bool {
        self.0 & var.bit() != 0
    }

    fn insert(&mut self, var: Var) {
        self.0 |= var.bit();
    }

    fn names(self) -> String {
        let names: Vec<&str> = Var::ALL.iter().filter(|v| self.contains(**v)).map(|v| v.name()).collect();
        if names.is_empty() { "none".into() } else { names.join(", ") }
    }
}

/// Worst-case sizes (bytes) of the values bound to each variable, for the cost estimate.
#[derive(Debug, Clone, Copy)]
pub struct InputSizes {
    /// Claims come from a token, bounded by the request header limit.
    pub claims: u64,
    /// The request's headers, bounded by the request header limit.
    pub request: u64,
    /// The connection's own small record.
    pub conn: u64,
    /// A message, bounded by `messages.max_bytes`.
    pub message: u64,
}

impl InputSizes {
    fn of(&self, var: Var) -> u64 {
        match var {
            Var::Claims => self.claims,
            Var::Request => self.request,
            Var::Conn => self.conn,
            Var::Message => self.message,
            Var::Now => 1,
        }
    }
}

/// A compiled, bounded CEL expression.
pub struct Expr {
    /// The expression as written, for messages and decision logs.
    pub source: Arc<str>,
    /// The parsed tree, with every `matches` rewritten to call one of `regexes`.
    tree: IdedExpr,
    /// The regular expressions its `matches` calls use, compiled at load.
    regexes: Arc<[Regex]>,
    /// The variables it reads, so callers bind only those.
    pub uses: VarSet,
    /// Its estimated worst-case cost.
    pub cost: u64,
}

impl fmt::Debug for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Expr").field("source", &self.source).field("cost", &self.cost).finish()
    }
}

/// Why an expression was refused at load time. The offset is the 0-based byte offset inside the
/// expression, when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExprError {
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ExprError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

fn refuse<T>(message: impl Into<String>) -> Result<T, ExprError> {
    Err(ExprError { message: message.into() })
}

/// Functions and operators of CEL's standard library that policies may call. Anything else is
/// refused at load time (a misspelt `startswith` must not become a runtime deny for everyone).
const KNOWN_FUNCTIONS: &[&str] = &[
    // operators
    "_?_:_",
    "_&&_",
    "_||_",
    "!_",
    "_-_",
    "_+_",
    "_*_",
    "_/_",
    "_%_",
    "_==_",
    "_!=_",
    "_>=_",
    "_<=_",
    "_>_",
    "_<_",
    "-_",
    "_[_]",
    "@in",
    "@not_strictly_false",
    // functions
    "size",
    "contains",
    "startsWith",
    "endsWith",
    "matches",
    "int",
    "uint",
    "double",
    "string",
    "bytes",
    "bool",
    "dyn",
    "type",
    "duration",
    "timestamp",
    "getDate",
    "getDayOfMonth",
    "getDayOfWeek",
    "getDayOfYear",
    "getFullYear",
    "getHours",
    "getMilliseconds",
    "getMinutes",
    "getMonth",
    "getSeconds",
];

/// Functions the interpreter knows only in call form (`duration("1s")`, not `x.duration(…)`).
const GLOBAL_ONLY: &[&str] =
    &["int", "uint", "double", "string", "bytes", "bool", "dyn", "type", "duration", "timestamp"];
/// Functions the interpreter knows only as methods (`s.contains(…)`), besides the `get*`
/// timestamp accessors.
const METHOD_ONLY: &[&str] = &["contains", "startsWith", "endsWith"];

/// Type names an expression may mention (`type(x) == string`).
/// (`timestamp` and `duration` are functions only: cel 0.15 has no such identifiers.)
const TYPE_IDENTS: &[&str] = &["int", "uint", "double", "bool", "string", "bytes", "list", "map", "null_type", "type"];

/// Compiles `source`, allowing only the variables in `allowed`.
///
/// Must run on a thread with a large stack (the policy compiler provides one): an expression
/// at the length bound may be thousands of levels deep before the depth check refuses it.
pub fn compile(source: &str, allowed: VarSet, sizes: &InputSizes) -> Result<Expr, ExprError> {
    if source.trim().is_empty() {
        return refuse("empty expression");
    }
    if source.len() > MAX_EXPR_LEN {
        return refuse(format!("expression is {} bytes long; at most {MAX_EXPR_LEN} are allowed", source.len()));
    }
    let program = match Program::compile(source) {
        Ok(program) => program,
        Err(e) => return refuse(super::error::cel_syntax_message(&e)),
    };
    let depth = tree_depth(program.expression());
    if depth > MAX_AST_DEPTH {
        return refuse(format!("expression is nested {depth} levels deep; at most {MAX_AST_DEPTH} are allowed"));
    }
    let mut check =
        Checker { allowed, sizes, uses: VarSet::NONE, scopes: Vec::new(), nesting: 0, regexes: RegexTable::default() };
    let estimate = check.visit(program.expression())?;
    if estimate.cost > COST_BUDGET {
        return refuse(format!(
            "estimated worst-case cost {} exceeds the budget of {COST_BUDGET} (iterating over inputs, \
             nested comprehensions or building large strings or lists)",
            estimate.cost
        ));
    }
    let mut tree = program.expression().clone();
    let regexes = check.regexes.finish(&mut tree);
    Ok(Expr { source: source.into(), tree, regexes, uses: check.uses, cost: estimate.cost })
}

/// The CEL environment policies run in: the standard library, plus the function that
/// `matches` calls are rewritten to. Build one per policy (it is the expensive part of a
/// context) and evaluate every [`Expr`] in a context made from it.
pub fn env() -> cel::Env {
    let mut env = cel::Env::stdlib();
    matches::register(&mut env);
    env
}

/// The depth of an expression tree, measured with an explicit stack so that a hostile tree
/// cannot overflow ours.
fn tree_depth(root: &IdedExpr) -> usize {
    let mut max = 0;
    let mut stack = vec![(root, 1usize)];
    while let Some((node, depth)) = stack.pop() {
        max = max.max(depth);
        for child in children(node) {
            stack.push((child, depth + 1));
        }
    }
    max
}

fn children(node: &IdedExpr) -> Vec<&IdedExpr> {
    match &node.expr {
        Node::Call(call) => call.target.iter().map(|t| t.as_ref()).chain(call.args.iter()).collect(),
        Node::Comprehension(c) => vec![&c.iter_range, &c.accu_init, &c.loop_cond, &c.loop_step, &c.result],
        Node::List(list) => list.elements.iter().collect(),
        Node::Map(map) => entries(&map.entries),
        Node::Struct(s) => entries(&s.entries),
        Node::Select(select) => vec![select.operand.as_ref()],
        Node::Ident(_) | Node::Literal(_) | Node::Unspecified => Vec::new(),
    }
}

fn entries(entries: &[cel::common::ast::IdedEntryExpr]) -> Vec<&IdedExpr> {
    entries
        .iter()
        .flat_map(|e| match &e.expr {
            EntryExpr::MapEntry(m) => vec![&m.key, &m.value],
            EntryExpr::StructField(f) => vec![&f.value],
        })
        .collect()
}

/// Worst-case cost of evaluating a node, and worst-case size of its result (bytes of a string,
/// or total size of a list or map).
#[derive(Debug, Clone, Copy)]
struct Estimate {
    cost: u64,
    size: u64,
}

impl Estimate {
    fn unit(size: u64) -> Estimate {
        Estimate { cost: 1, size }
    }
}

/// Walks an accepted-depth tree: checks names and estimates cost.
struct Checker<'a> {
    allowed: VarSet,
    sizes: &'a InputSizes,
    uses: VarSet,
    /// Comprehension variables in scope, with the worst-case size of their values.
    scopes: Vec<HashMap<String, u64>>,
    nesting: usize,
    /// The patterns of its `matches` calls, compiled.
    regexes: RegexTable,
}

impl Checker<'_> {
    fn visit(&mut self, node: &IdedExpr) -> Result<Estimate, ExprError> {
        match &node.expr {
            Node::Literal(lit) => {
                let size = match lit {
                    LiteralValue::String(s) => s.len() as u64,
                    LiteralValue::Bytes(b) => b.len() as u64,
                    _ => 1,
                };
                Ok(Estimate::unit(size))
            }
            Node::Ident(name) => self.ident(name),
            Node::Select(select) => {
                if let Node::Ident(name) = &select.operand.expr
                    && TYPE_IDENTS.contains(&name.as_str())
                    && !self.scopes.iter().any(|s| s.contains_key(name))
                {
                    return refuse(format!("`{name}` is a type: it has no field `{}`", select.field));
                }
                let operand = self.visit(&select.operand)?;
                Ok(Estimate { cost: operand.cost.saturating_add(1), size: operand.size })
            }
            Node::List(list) => {
                let mut total = Estimate::unit(0);
                for element in &list.elements {
                    let e = self.visit(element)?;
                    total.cost = total.cost.saturating_add(e.cost);
                    total.size = total.size.saturating_add(e.size).saturating_add(1);
                }
                Ok(total)
            }
            Node::Map(map) => self.entries(&map.entries),
            Node::Struct(_) => refuse("message (struct) literals are not supported in policies"),
            Node::Call(call) => self.call(&call.func_name, call.target.as_deref(), &call.args),
            Node::Comprehension(c) => {
                self.nesting += 1;
                if self.nesting > MAX_COMPREHENSION_NESTING {
                    return refuse(format!(
                        "comprehensions (all, exists, map, filter) nested {} deep; at most {MAX_COMPREHENSION_NESTING} are allowed",
                        self.nesting
                    ));
                }
                let range = self.visit(&c.iter_range)?;
                let init = self.visit(&c.accu_init)?;
                // Every element is at least one unit of its range's size.
                let iterations = range.size.max(1);
                let mut scope = HashMap::new();
                scope.insert(c.iter_var.clone(), range.size);
                if let Some(v2) = &c.iter_var2 {
                    scope.insert(v2.clone(), range.size);
                }
                scope.insert(c.accu_var.clone(), init.size);
                self.scopes.push(scope);
                let step_growth = self.visit(&c.loop_step)?.size.saturating_sub(init.size);
                // The accumulator can grow by the step's result on every iteration.
                let accu_size = init.size.saturating_add(iterations.saturating_mul(step_growth));
                if let Some(scope) = self.scopes.last_mut() {
                    scope.insert(c.accu_var.clone(), accu_size);
                }
                let cond = self.visit(&c.loop_cond)?;
                let step = self.visit(&c.loop_step)?;
                let result = self.visit(&c.result)?;
                self.scopes.pop();
                self.nesting -= 1;
                let per_iteration = cond.cost.saturating_add(step.cost).saturating_add(1);
                let cost = range
                    .cost
                    .saturating_add(init.cost)
                    .saturating_add(iterations.saturating_mul(per_iteration))
                    .saturating_add(result.cost);
                Ok(Estimate { cost, size: result.size.max(accu_size) })
            }
            Node::Unspecified => refuse("incomplete expression"),
        }
    }

    fn entries(&mut self, entries: &[cel::common::ast::IdedEntryExpr]) -> Result<Estimate, ExprError> {
        let mut total = Estimate::unit(0);
        for entry in entries {
            let parts: Vec<&IdedExpr> = match &entry.expr {
                EntryExpr::MapEntry(m) => vec![&m.key, &m.value],
                EntryExpr::StructField(f) => vec![&f.value],
            };
            for part in parts {
                let e = self.visit(part)?;
                total.cost = total.cost.saturating_add(e.cost);
                total.size = total.size.saturating_add(e.size).saturating_add(1);
            }
        }
        Ok(total)
    }

    fn ident(&mut self, name: &str) -> Result<Estimate, ExprError> {
        if let Some(size) = self.scopes.iter().rev().find_map(|s| s.get(name)) {
            return Ok(Estimate::unit(*size));
        }
        if let Some(var) = Var::ALL.iter().copied().find(|v| v.name() == name) {
            if !self.allowed.contains(var) {
                return refuse(format!(
                    "variable `{name}` is not available here (available: {})",
                    self.allowed.names()
                ));
            }
            self.uses.insert(var);
            return Ok(Estimate::unit(self.sizes.of(var)));
        }
        if TYPE_IDENTS.contains(&name) {
            return Ok(Estimate::unit(1));
        }
        refuse(format!("unknown variable `{name}` (available here: {})", self.allowed.names()))
    }

    fn call(&mut self, name: &str, target: Option<&IdedExpr>, args: &[IdedExpr]) -> Result<Estimate, ExprError> {
        if !KNOWN_FUNCTIONS.contains(&name) {
            return refuse(format!("unknown function `{name}`"));
        }
        if target.is_some() && GLOBAL_ONLY.contains(&name) {
            return refuse(format!("`{name}` is a function, not a method: write {name}(…)"));
        }
        if target.is_none() && (METHOD_ONLY.contains(&name) || name.starts_with("get")) {
            return refuse(format!("`{name}` is a method: write value.{name}(…)"));
        }
        if name == "matches" {
            self.pattern(target, args)?;
        }
        let mut operands = Vec::with_capacity(args.len() + 1);
        if let Some(t) = target {
            operands.push(self.visit(t)?);
        }
        for a in args {
            operands.push(self.visit(a)?);
        }
        let cost: u64 = operands.iter().fold(1u64, |acc, e| acc.saturating_add(e.cost));
        let size = |i: usize| operands.get(i).map_or(0, |e| e.size);
        let largest = operands.iter().map(|e| e.size).max().unwrap_or(1);
        let (extra, size) = match name {
            // Concatenation allocates the appended part (and the result can hold both).
            "_+_" => (size(1), size(0).saturating_add(size(1))),
            // Comparisons stop at the shorter operand.
            "_==_" | "_!=_" | "_<_" | "_<=_" | "_>_" | "_>=_" => (size(0).min(size(1)) / 8, 1),
            // Membership scans the container.
            "@in" => (size(1), 1),
            // A prefix or suffix test reads at most the shorter operand; `contains` scans.
            "startsWith" | "endsWith" => (size(0).min(size(1)) / 8, 1),
            "contains" => (size(0) / 8, 1),
            // The regex was compiled at load; a search runs in time linear in the text.
            "matches" => (size(0) / 4, 1),
            "string" | "bytes" => (size(0), size(0)),
            "_?_:_" => (0, size(1).max(size(2))),
            "_[_]" => (0, size(0)),
            "_&&_" | "_||_" | "!_" | "@not_strictly_false" | "size" => (0, 1),
            _ => (largest / 8, largest),
        };
        Ok(Estimate { cost: cost.saturating_add(extra), size })
    }
}

impl Checker<'_> {
    /// The pattern of a `matches` call: a string literal, compiled now.
    fn pattern(&mut self, target: Option<&IdedExpr>, args: &[IdedExpr]) -> Result<(), ExprError> {
        let pattern = match (target, args) {
            (Some(_), [pattern]) | (None, [_, pattern]) => pattern,
            _ => return refuse("`matches` takes a string and a pattern: write text.matches('^[a-z]+$')"),
        };
        match &pattern.expr {
            Node::Literal(LiteralValue::String(p)) => self.regexes.add(p.inner()),
            _ => refuse(
                "the pattern of `matches` must be a string literal: patterns are compiled once, at load, \
                 and never taken from a message or a claim",
            ),
        }
    }
}

/// Why an evaluation did not produce a usable answer. Callers fail closed on it. The text names
/// the kind of failure and the types involved, never a value (see [`describe`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvalError(pub String);

impl fmt::Display for EvalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Expr {
    /// Evaluates in `ctx`. A panic inside the CEL interpreter is caught and becomes an error,
    /// so a policy can never take the process down.
    pub fn eval(&self, ctx: &Context<'_, '_>) -> Result<Value, EvalError> {
        let _regexes = (!self.regexes.is_empty()).then(|| RegexScope::enter(&self.regexes));
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ctx.resolve(&self.tree))) {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(EvalError(describe(&e))),
            Err(_) => Err(EvalError("the CEL interpreter failed on this expression".into())),
        }
    }

    /// Evaluates to a bool; anything else is an error.
    pub fn eval_bool(&self, ctx: &Context<'_, '_>) -> Result<bool, EvalError> {
        match self.eval(ctx)? {
            Value::Bool(b) => Ok(b),
            other => Err(EvalError(format!("expected a bool, got {}", type_name(other.type_of())))),
        }
    }
}

/// A run-time error by kind, with the names of functions and the types of operands only. The
/// interpreter's own messages print operand values (`Unsupported binary operator '_+_': Int(1),
/// String("…")`) and map keys, which can be claims, message fields or tokens.
pub fn describe(e: &ExecutionError) -> String {
    let ty = |v: &Value| type_name(v.type_of());
    let function = |f: &str| if f == matches::COMPILED { "matches".to_string() } else { f.to_string() };
    match e {
        ExecutionError::InvalidArgumentCount { expected, actual } => {
            format!("wrong number of arguments: expected {expected}, got {actual}")
        }
        ExecutionError::UnsupportedTargetType { target } => format!("unsupported target of type {}", ty(target)),
        ExecutionError::NotSupportedAsMethod { method, target } => {
            format!("`{}` is not a method of {}", function(method), ty(target))
        }
        ExecutionError::UnsupportedKeyType(v) => format!("a {} cannot be a map key", ty(v)),
        ExecutionError::UnexpectedType { got, want } => format!("unexpected type: got {got}, want {want}"),
        ExecutionError::NoSuchKey(_) => "no such key".to_string(),
        ExecutionError::NoSuchOverload(o) => {
            format!("no overload of `{}` for ({})", function(o.function()), o.argument_types().join(", "))
        }
        ExecutionError::UndeclaredReference(_) => "undeclared reference".to_string(),
        ExecutionError::MissingArgumentOrTarget => "missing argument or target".to_string(),
        ExecutionError::ValuesNotComparable(a, b) => format!("a {} cannot be compared to a {}", ty(a), ty(b)),
        ExecutionError::UnsupportedBinaryOperator(op, a, b) => {
            format!("operator `{op}` does not apply to {} and {}", ty(a), ty(b))
        }
        ExecutionError::UnsupportedIndex(index, target) => {
            format!("cannot index a {} with a {}", ty(target), ty(index))
        }
        ExecutionError::FunctionError { function: f, .. } => format!("`{}` failed", function(f)),
        ExecutionError::DivisionByZero(_) => "division by zero".to_string(),
        ExecutionError::RemainderByZero(_) => "remainder by zero".to_string(),
        ExecutionError::Overflow(op, _, _) => format!("overflow in `{op}`"),
        ExecutionError::IndexOutOfBounds(_) => "index out of bounds".to_string(),
        ExecutionError::DuplicateKey(_) => "duplicate map key".to_string(),
        _ => "evaluation failed".to_string(),
    }
}

fn type_name(t: ValueType) -> String {
    t.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZES: InputSizes = InputSizes { claims: 8192, request: 16384, conn: 1024, message: 10240 };
    const ALL: VarSet = VarSet::of(&Var::ALL);

    fn on_big_stack<T: Send>(f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            std::thread::Builder::new().stack_size(256 << 20).spawn_scoped(s, f).unwrap().join().unwrap()
        })
    }

    fn refused(src: &str) -> String {
        let src = src.to_string();
        on_big_stack(move || match compile(&src, ALL, &SIZES) {
            Ok(e) => panic!("accepted, cost {}", e.cost),
            Err(e) => e.message,
        })
    }

    fn accepted(src: &str) -> Expr {
        compile(src, ALL, &SIZES).unwrap_or_else(|e| panic!("{src}: {e}"))
    }

    #[test]
    fn bombs_from_crates_md_are_refused_at_load() {
        assert!(refused(&format!("1{}", "+1".repeat(5000))).contains("bytes long"));
        assert!(refused(&format!("a{}", ".a".repeat(5000))).contains("bytes long"));
        // Within the length bound, depth is what refuses them.
        assert!(refused(&format!("1{}", "+1".repeat(2000))).contains("levels deep"));
        assert!(refused(&format!("claims{}", ".a".repeat(2000))).contains("levels deep"));
        assert!(refused(&format!("{}1{}", "(".repeat(1000), ")".repeat(1000))).contains("syntax"));
        let nested = "[1,2,3,4,5,6,7,8,9,10].all(x, [1,2,3,4,5,6,7,8,9,10].all(y, [1,2,3,4,5,6,7,8,9,10].all(z, x + y + z > 0)))";
        assert!(refused(nested).contains("nested 3 deep"));
    }

    #[test]
    fn a_megabyte_string_builder_is_refused() {
        let hundred = format!("[{}]", (0..100).map(|i| i.to_string()).collect::<Vec<_>>().join(","));
        let s = format!("\"{}\"", "x".repeat(100));
        let src = format!("size({hundred}.map(a, {hundred}.map(b, {s} + {s}))) > 0");
        assert!(refused(&src).contains("cost"), "{src}");
    }

    #[test]
    fn nested_iteration_over_a_message_is_refused_but_one_level_is_fine() {
        assert!(refused("message.items.all(x, message.items.all(y, x == y))").contains("cost"));
        accepted("message.items.all(x, x.level < 5)");
    }

    #[test]
    fn prefix_tests_cost_by_the_prefix_even_on_huge_inputs() {
        let huge = InputSizes { message: 16 << 20, ..SIZES };
        assert!(compile("message.channel.startsWith('alerts')", ALL, &huge).is_ok());
        assert!(compile("message.channel.endsWith('.eu')", ALL, &huge).is_ok());
        assert!(compile("message.text.contains('x')", ALL, &huge).is_err(), "contains scans the whole string");
    }

    #[test]
    fn names_are_checked_against_the_place() {
        let connect = VarSet::of(&[Var::Claims, Var::Request, Var::Now]);
        let e = compile("message.channel == 'x'", connect, &SIZES).unwrap_err();
        assert!(e.message.contains("`message` is not available"), "{e}");
        let e = compile("claimz.sub == 'x'", connect, &SIZES).unwrap_err();
        assert!(e.message.contains("unknown variable `claimz`"), "{e}");
        let e = compile("claims.sub.startswith('x')", connect, &SIZES).unwrap_err();
        assert!(e.message.contains("unknown function `startswith`"), "{e}");
        // Comprehension variables are in scope only inside.
        compile("claims.roles.exists(r, r == 'admin')", connect, &SIZES).unwrap();
        assert!(compile("claims.roles.exists(r, r == 'admin') && r == 'x'", connect, &SIZES).is_err());
    }

    #[test]
    fn names_the_interpreter_does_not_know_are_refused_at_load() {
        // Found by fuzzing: these passed the checker and then failed on every evaluation.
        for src in [
            "((timestamp))",
            "type(now) == timestamp",
            "duration == 1",
            "int.x == 1",
            "type.x",
            "null_type.a",
            "now - conn. duration(\"2m\") < now",
            "claims.sub.string() == 'a'",
            "contains(claims.sub, 'a')",
            "getHours(now) == 1",
        ] {
            assert!(compile(src, ALL, &SIZES).is_err(), "{src}");
        }
        let ctx = Context::with_env(Arc::new(env()));
        for src in ["type(1) == int", "type('a') == string", "type([]) == list", "type(null) == null_type"] {
            assert_eq!(accepted(src).eval_bool(&ctx), Ok(true), "{src}");
        }
    }

    #[test]
    fn uses_records_only_what_is_read() {
        let e = accepted("has(claims.roles) && 'publisher' in claims.roles");
        assert!(e.uses.contains(Var::Claims));
        assert!(!e.uses.contains(Var::Message));
    }

    #[test]
    fn every_known_function_exists_in_the_interpreter() {
        // Each sample calls one function; an unknown one would fail with "undeclared" or
        // "no such overload" at run time.
        let samples = [
            "size('ab') == 2",
            "'abc'.contains('b')",
            "'abc'.startsWith('a')",
            "'abc'.endsWith('c')",
            "'abc'.matches('^a')",
            "int('1') == 1",
            "uint(1) == 1u",
            "double(1) == 1.0",
            "string(1) == '1'",
            "bytes('a') == b'a'",
            "bool('true')",
            "dyn(1) == 1",
            "type(1) == int",
            "duration('1s') == duration('1000ms')",
            "timestamp('2026-01-01T00:00:00Z').getFullYear() == 2026",
            "timestamp('2026-01-02T03:04:05Z').getDate() == 2",
            "timestamp('2026-01-02T03:04:05Z').getDayOfMonth() == 1",
            "timestamp('2026-01-02T03:04:05Z').getDayOfWeek() >= 0",
            "timestamp('2026-01-02T03:04:05Z').getDayOfYear() == 1",
            "timestamp('2026-01-02T03:04:05Z').getHours() == 3",
            "timestamp('2026-01-02T03:04:05Z').getMilliseconds() == 0",
            "timestamp('2026-01-02T03:04:05Z').getMinutes() == 4",
            "timestamp('2026-01-02T03:04:05Z').getMonth() == 0",
            "timestamp('2026-01-02T03:04:05Z').getSeconds() == 5",
            "[1,2].exists(x, x == 2) ? 1 - 1 * 2 / 1 % 3 >= -1 : !false",
        ];
        let ctx = Context::with_env(Arc::new(env()));
        for s in samples {
            let e = accepted(s);
            assert_eq!(e.eval_bool(&ctx), Ok(true), "{s}");
        }
    }

    #[test]
    fn accepted_depth_evaluates_on_a_small_stack() {
        // The deepest accepted expression must evaluate and drop on a 2 MiB worker stack.
        let src = format!("1{} > 0", "+1".repeat(MAX_AST_DEPTH - 3));
        let expr = accepted(&src);
        std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || {
                let ctx = Context::with_env(Arc::new(env()));
                assert_eq!(expr.eval_bool(&ctx), Ok(true));
                drop(expr);
            })
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn matches_runs_the_regex_compiled_at_load_in_both_forms() {
        let mut ctx = Context::with_env(Arc::new(env()));
        ctx.add_variable_from_value(
            "claims",
            cel::Value::Map(std::collections::HashMap::from([("sub".to_string(), cel::Value::from("alice-1"))]).into()),
        );
        for (src, want) in [
            ("claims.sub.matches('^[a-z0-9-]+$')", true),
            ("matches(claims.sub, '^[a-z]+$')", false),
            // One pattern used twice is compiled once; two patterns each get their own.
            ("claims.sub.matches('^a') && matches(claims.sub, '^a') && !claims.sub.matches('^b')", true),
            ("['x1', 'y2'].exists(s, s.matches('^y[0-9]$'))", true),
        ] {
            let e = accepted(src);
            assert_eq!(e.eval_bool(&ctx), Ok(want), "{src}");
        }
        assert_eq!(accepted("claims.sub.matches('^a') && matches(claims.sub, '^a')").regexes.len(), 1);
        // The compiled regexes belong to their expression: after it, none are visible.
        let e = accepted("claims.sub.matches('^a')");
        assert_eq!(e.eval_bool(&ctx), Ok(true));
        assert!(matches::evaluating_none());
    }

    #[test]
    fn a_matches_pattern_must_be_a_literal_that_compiles_within_the_bound() {
        for src in
            ["claims.sub.matches(claims.re)", "matches(claims.sub, message.re)", "claims.sub.matches('^' + claims.re)"]
        {
            assert!(refused(src).contains("must be a string literal"), "{src}");
        }
        assert!(refused(r"claims.sub.matches('^[\\w\\s]{1,500}$')").contains("too large once compiled"));
        let e = refused("claims.sub.matches('(SECRET')");
        assert!(e.contains("unclosed group") && !e.contains("SECRET"), "{e}");
        // Unicode classes are large: twenty copies of `[\w\s]` fit, thirty do not; the ASCII
        // class fits even five hundred times.
        accepted(r"claims.sub.matches('^[\\w\\s]{1,20}$')");
        assert!(refused(r"claims.sub.matches('^[\\w\\s]{1,30}$')").contains("too large once compiled"));
        accepted(r"claims.sub.matches('^[a-zA-Z0-9_ ]{1,500}$')");
    }

    #[test]
    fn run_time_errors_name_types_never_values() {
        let mut ctx = Context::with_env(Arc::new(env()));
        ctx.add_variable_from_value(
            "claims",
            cel::Value::Map(
                std::collections::HashMap::from([("sub".to_string(), cel::Value::from("SECRETVAL"))]).into(),
            ),
        );
        for src in [
            "claims.sub + 1 == 1",
            "claims.sub < 1",
            "claims[claims.sub] == 1",
            "claims.nope == 1",
            "int(claims.sub) == 1",
            "timestamp(claims.sub) < now",
            "duration(claims.sub) > duration('1s')",
            "{claims.sub: 1, claims.sub: 2}.size() == 1",
            "[1][claims.sub] == 1",
            "claims.sub.matches('^S') && size(claims.sub) / 0 == 1",
        ] {
            let e = compile(src, ALL, &SIZES).unwrap_or_else(|e| panic!("{src}: {e}"));
            let err = e.eval_bool(&ctx).expect_err(src);
            assert!(!err.0.contains("SECRETVAL") && !err.0.contains("nope"), "{src}: {err}");
        }
    }

    #[test]
    fn non_bool_results_are_errors() {
        let ctx = Context::with_env(Arc::new(env()));
        assert!(accepted("1 + 1").eval_bool(&ctx).is_err());
    }
}
