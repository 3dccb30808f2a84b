//! Policy engine benchmarks: compiling the default policy, each of its rules alone, and whole
//! message decisions (the target: a `publish` decision in at most 1 µs, median).
//!
//! Run: `cargo bench -p wsgate-benches --bench policy`.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::json;
use wsgate::policy::decision::MessageRefusal;
use wsgate::policy::expr::{self, InputSizes, Var, VarSet};
use wsgate::policy::value::json_to_cel;
use wsgate::policy::{CompileOptions, ConnContext, ConnInfo, Policy, PolicySource, RequestInfo, Scheme, compile};

const POLICY_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../policies");
const SECRET: &str = "0123456789abcdef0123456789abcdef-bench";

fn secret_lookup(_: &str) -> Option<String> {
    Some(SECRET.to_string())
}

fn options() -> CompileOptions<'static> {
    CompileOptions { generation: 1, secret_lookup: &secret_lookup }
}

fn source() -> PolicySource {
    PolicySource::read_dir(Path::new(POLICY_DIR)).unwrap_or_else(|e| panic!("reading {POLICY_DIR}: {e:?}"))
}

fn policy() -> Arc<Policy> {
    Arc::new(compile(&source(), &options()).unwrap_or_else(|e| panic!("compiling {POLICY_DIR}: {e:?}")))
}

fn publisher_claims() -> serde_json::Value {
    json!({"sub": "ops", "roles": ["reader", "publisher"], "exp": 4_102_444_800_i64, "iat": 1_700_000_000})
}

fn conn_info() -> ConnInfo {
    ConnInfo {
        id: "c-0001".into(),
        user: "ops".into(),
        ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)),
        instance: "bench".into(),
        connected_at: SystemTime::now(),
    }
}

fn request_info() -> RequestInfo {
    RequestInfo {
        ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)),
        scheme: Scheme::Wss,
        origin: Some("https://app.example.com".into()),
        path: "/ws".into(),
        query: vec![("v".into(), "1".into())],
        headers: vec![("user-agent".into(), "bench/1.0".into()), ("host".into(), "gw.example.com".into())],
    }
}

fn publish_message() -> serde_json::Value {
    json!({"type": "publish", "id": "m-42", "channel": "alerts:eu", "data": {"level": "high", "text": "disk full"}})
}

fn subscribe_message() -> serde_json::Value {
    json!({"type": "subscribe", "id": "m-41", "channel": "alerts:eu"})
}

fn compile_benches(c: &mut Criterion) {
    let source = source();
    let options = options();
    let mut group = c.benchmark_group("compile");
    group.sample_size(20);
    group.bench_function("default_policy", |b| {
        b.iter(|| compile(black_box(&source), &options).expect("the default policy compiles"))
    });
    group.finish();
}

fn rule_benches(c: &mut Criterion) {
    let policy = policy();
    let now = SystemTime::now();
    let mut group = c.benchmark_group("rule");

    // The connect rule, on a scope built once (binding claims and request is not part of it).
    let claims = publisher_claims();
    let request = request_info();
    let scope = policy.handshake_scope(&claims, &request, now);
    assert_eq!(scope.connect_rules().denied, None, "not-banned must accept these claims");
    group.bench_function("not-banned", |b| b.iter(|| black_box(&scope).connect_rules()));

    // Message rules, through a whole decision of a message that passes the schema and the rule.
    let ctx = ConnContext::new(policy.clone(), &claims, &conn_info());
    for (name, message) in [("subscribe.allow", subscribe_message()), ("publish.allow", publish_message())] {
        assert_eq!(ctx.decide(&message, now).refused, None, "{name} must accept {message}");
        group.bench_function(name, |b| b.iter(|| ctx.decide(black_box(&message), black_box(now))));
    }
    group.finish();

    // Each rule's expression alone, in a scope with its variables already bound: the CEL part of
    // the decisions above, without the envelope checks, the schema and binding `message`.
    let mut group = c.benchmark_group("rule_expr");
    let env = Arc::new(expr::env());
    let mut cel_ctx = cel::Context::with_env(env);
    cel_ctx.add_variable_from_value("claims", json_to_cel(&claims));
    let connect_rule = policy.auth.rules.iter().find(|r| &*r.name == "not-banned").expect("rule not-banned");
    group.bench_function("not-banned", |b| b.iter(|| connect_rule.expr.eval_bool(black_box(&cel_ctx))));
    for (kind, message) in [("subscribe", subscribe_message()), ("publish", publish_message())] {
        let mut scope = cel_ctx.new_inner_scope();
        scope.add_variable_from_value("message", json_to_cel(&message));
        let rule = policy.messages.types[kind].rules.first().unwrap_or_else(|| panic!("{kind} has an allow rule"));
        assert_eq!(rule.expr.eval_bool(&scope), Ok(true), "{}", rule.name);
        group.bench_function(&*rule.name, |b| b.iter(|| rule.expr.eval_bool(black_box(&scope))));
    }
    group.finish();
}

fn message_decision_benches(c: &mut Criterion) {
    let policy = policy();
    let now = SystemTime::now();
    let ctx = ConnContext::new(policy, &publisher_claims(), &conn_info());
    let mut group = c.benchmark_group("message_decision");

    let publish = publish_message();
    assert_eq!(ctx.decide(&publish, now).refused, None);
    group.bench_function("publish", |b| b.iter(|| ctx.decide(black_box(&publish), black_box(now))));

    let subscribe = subscribe_message();
    assert_eq!(ctx.decide(&subscribe, now).refused, None);
    group.bench_function("subscribe", |b| b.iter(|| ctx.decide(black_box(&subscribe), black_box(now))));

    // A channel name with a space fails the schema's pattern: the refusal path, with its message.
    let invalid = json!({"type": "subscribe", "id": "m-43", "channel": "alerts and more"});
    assert!(
        matches!(ctx.decide(&invalid, now).refused, Some(MessageRefusal::Invalid { .. })),
        "the schema must refuse {invalid}"
    );
    group.bench_function("schema_violation", |b| b.iter(|| ctx.decide(black_box(&invalid), black_box(now))));
    group.finish();
}

/// The parts of a message decision besides its rules: where the time of a decision goes.
fn part_benches(c: &mut Criterion) {
    let policy = policy();
    let mut group = c.benchmark_group("part");
    for (kind, message) in [("subscribe", subscribe_message()), ("publish", publish_message())] {
        let schema = &policy.messages.types[kind].schema;
        assert!(schema.is_valid(&message));
        group.bench_function(format!("schema_is_valid/{kind}"), |b| b.iter(|| schema.is_valid(black_box(&message))));
        // Binding `message` for CEL: done only for types whose rules read it (subscribe here).
        group.bench_function(format!("json_to_cel/{kind}"), |b| b.iter(|| json_to_cel(black_box(&message))));
    }
    group.finish();
}

/// `matches` as the CEL library runs it (the pattern compiled on every call) against a policy
/// expression (compiled once, at load), on a 200-byte field. `^[\w\s]{1,500}$` is what a policy
/// could write before patterns had a size bound; a policy now refuses it at load.
fn matches_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("matches");
    let text = "word ".repeat(40);
    let mut per_call = cel::Context::with_env(Arc::new(cel::Env::stdlib()));
    per_call.add_variable_from_value("s", text.clone());
    for pattern in [r"^[\w\s]{1,500}$", r"^[\w\s]{1,20}", r"^[a-z ]{1,500}$"] {
        let program = cel::Program::compile(&format!("s.matches(r'{pattern}')")).expect("parses");
        // `^[\w\s]{1,500}$` exceeds even regex's default 10 MiB bound: every call spends the
        // compile and then fails.
        println!("{pattern} compiled per call: {:?}", program.execute(&per_call).map(|_| "ok"));
        group.bench_function(format!("compiled_per_call/{pattern}"), |b| {
            b.iter(|| program.execute(black_box(&per_call)))
        });
    }
    let sizes = InputSizes { claims: 8192, request: 16384, conn: 1024, message: 10240 };
    let mut at_load = cel::Context::with_env(Arc::new(expr::env()));
    at_load.add_variable_from_value("message", json_to_cel(&json!({"text": text})));
    for pattern in [r"^[\w\s]{1,20}", r"^[a-z ]{1,500}$"] {
        let source = format!("message.text.matches(r'{pattern}')");
        let compiled = expr::compile(&source, VarSet::of(&[Var::Message]), &sizes).expect("within the bounds");
        assert_eq!(compiled.eval_bool(&at_load), Ok(true), "{source}");
        group.bench_function(format!("compiled_at_load/{pattern}"), |b| {
            b.iter(|| compiled.eval_bool(black_box(&at_load)))
        });
    }
    group.finish();
}

criterion_group!(benches, compile_benches, rule_benches, message_decision_benches, part_benches, matches_benches);
criterion_main!(benches);
