//! The load-time bounds on an expression and the checks that enforce them: length, depth,
//! comprehension nesting, known names, and the worst-case cost estimate.

use std::collections::HashMap;

use cel::common::ast::{EntryExpr, Expr as Node, LiteralValue};
use cel::{IdedExpr, Program};

use super::error::ExprError;
use super::eval::Expr;
use super::vars::{InputSizes, Var, VarSet};
use crate::policy::error::cel_syntax_message;
use crate::policy::matches::RegexTable;

/// Longest expression accepted, in bytes.
pub const MAX_EXPR_LEN: usize = 4096;
/// Deepest expression tree accepted.
pub const MAX_AST_DEPTH: usize = 48;
/// Most comprehensions (`all`, `exists`, `map`, `filter`, …) nested inside each other.
pub const MAX_COMPREHENSION_NESTING: usize = 2;
/// Largest estimated worst-case cost accepted for one evaluation. One unit is about one node
/// evaluated or one byte allocated, so no accepted expression builds a megabyte of data.
pub const COST_BUDGET: u64 = 1_000_000;

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
        Err(e) => return refuse(cel_syntax_message(&e)),
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
            Node::List(list) => self.elements(&list.elements),
            Node::Map(map) => self.elements(entries(&map.entries)),
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

    /// A list's or a map's parts: each costs what it costs, and adds its size plus one.
    fn elements<'e>(&mut self, parts: impl IntoIterator<Item = &'e IdedExpr>) -> Result<Estimate, ExprError> {
        let mut total = Estimate::unit(0);
        for part in parts {
            let e = self.visit(part)?;
            total.cost = total.cost.saturating_add(e.cost);
            total.size = total.size.saturating_add(e.size).saturating_add(1);
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
