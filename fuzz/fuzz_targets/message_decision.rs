//! A client message under the default policy: deciding it must never panic, and the verdict
//! must be consistent: an accepted message is an object of a known type that matches its
//! schema, and no rule of the default policy can fail on a message its schema admits.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use wsgate::policy::ConnContext;
use wsgate::policy::decision::MessageRefusal;
use wsgate_fuzz as common;

/// The default policy's `messages.max_bytes`: larger messages never reach a decision.
const MAX_BYTES: usize = 10240;

fn contexts() -> &'static [ConnContext] {
    static CONTEXTS: OnceLock<Vec<ConnContext>> = OnceLock::new();
    CONTEXTS.get_or_init(|| {
        let policy = common::default_policy();
        [common::publisher_claims(), common::plain_claims()]
            .iter()
            .map(|claims| ConnContext::new(policy.clone(), claims, &common::conn_info()))
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_BYTES {
        return;
    }
    let Ok(message) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    for ctx in contexts() {
        let verdict = ctx.decide(&message, common::now());
        let schema_valid = message
            .get("type")
            .and_then(|t| t.as_str())
            .and_then(|t| ctx.policy().messages.types.get(t))
            .is_some_and(|t| t.schema.is_valid(&message));
        match &verdict.refused {
            None => assert!(schema_valid, "accepted a message its schema refuses: {message}"),
            Some(MessageRefusal::Rule(denial)) => {
                assert!(schema_valid, "a rule ran on a message its schema refuses: {message}");
                assert_eq!(denial.error, None, "rule {} failed on {message}", denial.rule);
            }
            Some(MessageRefusal::Invalid { .. }) => {}
        }
        for denial in &verdict.audit {
            assert_eq!(denial.error, None, "audit rule {} failed on {message}", denial.rule);
        }
    }
});
