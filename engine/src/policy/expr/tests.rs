//! The bounds, checks and evaluation of expressions, against hostile and ordinary input.

use std::sync::Arc;

use cel::Context;

use super::check::{MAX_AST_DEPTH, compile};
use super::eval::{Expr, env};
use super::vars::{InputSizes, Var, VarSet};
use crate::policy::matches;

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
    let nested =
        "[1,2,3,4,5,6,7,8,9,10].all(x, [1,2,3,4,5,6,7,8,9,10].all(y, [1,2,3,4,5,6,7,8,9,10].all(z, x + y + z > 0)))";
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
        cel::Value::Map(std::collections::HashMap::from([("sub".to_string(), cel::Value::from("SECRETVAL"))]).into()),
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
