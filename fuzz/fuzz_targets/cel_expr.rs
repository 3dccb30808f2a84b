//! A CEL expression with every variable allowed: compiling must never panic, and an accepted
//! expression must evaluate and drop on a server worker's stack, quickly, without panicking
//! and without naming anything the interpreter does not know.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use wsgate::policy::compile::{MAX_CLAIMS_BYTES, MAX_REQUEST_BYTES};
use wsgate::policy::decision::timestamp;
use wsgate::policy::expr::{self, InputSizes, Var, VarSet};
use wsgate::policy::value::{cel_map, cel_string, json_to_cel};
use wsgate_fuzz as common;

const ALL: VarSet = VarSet::of(&Var::ALL);
/// The default policy's `messages.max_bytes`.
const SIZES: InputSizes =
    InputSizes { claims: MAX_CLAIMS_BYTES, request: MAX_REQUEST_BYTES, conn: 1024, message: 10240 };
/// Far above what the cost budget should allow (even with a sanitizer's slowdown).
const SLOW: Duration = Duration::from_secs(1);
/// A scope with every variable bound, built once.
fn context() -> &'static cel::Context<'static, 'static> {
    static CTX: OnceLock<cel::Context<'static, 'static>> = OnceLock::new();
    CTX.get_or_init(|| {
        let mut ctx = cel::Context::with_env(Arc::new(expr::env()));
        let request = common::request_info();
        let conn = common::conn_info();
        ctx.add_variable_from_value("claims", json_to_cel(&common::publisher_claims()));
        ctx.add_variable_from_value(
            "request",
            cel_map([
                ("ip", cel_string(&request.ip.to_string())),
                ("origin", request.origin.as_deref().map_or(cel::Value::Null, cel_string)),
                ("path", cel_string(&request.path)),
                ("query", cel_map(request.query.iter().map(|(k, v)| (k.as_str(), cel_string(v))))),
                ("headers", cel_map(request.headers.iter().map(|(k, v)| (k.as_str(), cel_string(v))))),
            ]),
        );
        ctx.add_variable_from_value(
            "conn",
            cel_map([
                ("id", cel_string(&conn.id)),
                ("user", cel_string(&conn.user)),
                ("ip", cel_string(&conn.ip.to_string())),
                ("instance", cel_string(&conn.instance)),
                ("connected_at", timestamp(conn.connected_at)),
            ]),
        );
        ctx.add_variable_from_value("message", json_to_cel(&common::sample_message()));
        ctx.add_variable_from_value("now", timestamp(common::now()));
        ctx
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(source) = std::str::from_utf8(data) else { return };
    let ctx = context();
    // Like the policy compiler: parse on a large stack (a refused expression drops there too).
    let source = source.to_string();
    let Ok(expr) = common::compile_worker().run(move || expr::compile(&source, ALL, &SIZES)) else { return };
    common::eval_worker().run(move || {
        // A fuzz target measures real time: there is no tokio clock here.
        #[allow(clippy::disallowed_methods)]
        let start = Instant::now();
        let result = expr.eval(ctx);
        let took = start.elapsed();
        assert!(took < SLOW, "accepted expression (estimated cost {}) took {took:?}: {}", expr.cost, expr.source);
        if let Err(e) = &result {
            assert!(
                !e.0.contains("undeclared reference") && !e.0.contains("interpreter failed"),
                "accepted expression failed at run time with every variable bound: {e}: {}",
                expr.source
            );
        }
        drop(result);
        drop(expr);
    });
});
