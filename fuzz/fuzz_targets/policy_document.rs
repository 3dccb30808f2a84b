//! A policy document (the top `policy.yaml`) with the default policy's schemas: compiling it
//! must never panic, and whatever compiles must evaluate without panicking too.
#![no_main]

use std::path::PathBuf;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use wsgate::policy::decision::spike_threshold;
use wsgate::policy::source::SourceFile;
use wsgate::policy::{ConnContext, PolicySource, compile};
use wsgate_fuzz as common;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let source = PolicySource {
        // Key files named by a relative path resolve here and are not found.
        dir: PathBuf::from("/nonexistent/wsgate-fuzz-policy"),
        documents: vec![SourceFile { name: "policy.yaml".into(), text: text.to_string() }],
        schemas: common::default_schemas().to_vec(),
        tests: Vec::new(),
    };
    let Ok(policy) = compile(&source, &common::options()) else { return };
    let policy = Arc::new(policy);
    // The server evaluates on tokio workers' 2 MiB stacks.
    common::eval_worker().run(move || {
        let now = common::now();
        let request = common::request_info();
        let _ = policy.check_origin(request.origin.as_deref());
        let _ = spike_threshold(&policy, now);
        for claims in [common::publisher_claims(), common::plain_claims()] {
            let scope = policy.handshake_scope(&claims, &request, now);
            let _ = scope.connect_rules();
            let _ = scope.user_id();
            let _ = scope.limits();
            drop(scope);
            let ctx = ConnContext::new(policy.clone(), &claims, &common::conn_info());
            for message in [
                common::sample_message(),
                serde_json::json!({"type": "subscribe", "channel": "alerts:eu"}),
                serde_json::json!({"type": "ping"}),
            ] {
                let _ = ctx.decide(&message, now);
            }
        }
        // The last reference: the policy, with every compiled expression, drops here.
        drop(policy);
    });
});
