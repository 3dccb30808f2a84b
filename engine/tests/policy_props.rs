//! Random mutations of the default policy's files either compile or are refused with errors:
//! never a panic (the compiler turns one into an "internal error", which fails here), never a
//! stack overflow (which would abort this test process).

mod common;

use proptest::prelude::*;
use wsgate::policy::{CompileOptions, PolicySource, compile};

/// Fragments that stress YAML, JSON and CEL: structure, anchors, tags, huge numbers, CEL
/// operators and variables, control characters.
const FRAGMENTS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ":",
    ": ",
    "- ",
    "'",
    "\"",
    "\n",
    "  ",
    "\t",
    "*a",
    "&a ",
    "!!str ",
    "!!binary ",
    "<<: *a",
    "~",
    "null",
    "-1",
    "0",
    "99999999999999999999",
    "1e400",
    "1.5",
    "true",
    "1+1+1+1",
    "claims",
    "message",
    "now",
    "request",
    "conn",
    ".all(x, ",
    ")",
    "(",
    "duration('1s')",
    "'a' + 'b'",
    "\u{0}",
    "é",
    "?",
    "|",
    ">",
    "#",
    "%",
    "@",
    "`",
    ",",
    "\\",
    "\\u0000",
    "$ref",
    "#/$defs/x",
    "pattern",
    "(a+)+$",
    ".*",
    "type",
    "allow",
    "deny",
    "version: 2\n",
    "mode: audit",
    "action: close",
    "10KiB",
    "30s",
    "1h30m",
];

#[derive(Debug, Clone)]
enum Mutation {
    Delete { at: usize, len: usize },
    Insert { at: usize, fragment: usize },
    DuplicateLine { line: usize },
    SwapLines { a: usize, b: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1usize..40).prop_map(|(at, len)| Mutation::Delete { at, len }),
        (any::<usize>(), 0..FRAGMENTS.len()).prop_map(|(at, fragment)| Mutation::Insert { at, fragment }),
        any::<usize>().prop_map(|line| Mutation::DuplicateLine { line }),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::SwapLines { a, b }),
    ]
}

fn char_boundary(text: &str, at: usize) -> usize {
    let mut at = at % (text.len() + 1);
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

fn apply(text: &str, m: &Mutation) -> String {
    match m {
        Mutation::Delete { at, len } => {
            let start = char_boundary(text, *at);
            let end = char_boundary(text, (start + len).min(text.len()));
            let end = end.max(start);
            format!("{}{}", &text[..start], &text[end..])
        }
        Mutation::Insert { at, fragment } => {
            let at = char_boundary(text, *at);
            format!("{}{}{}", &text[..at], FRAGMENTS[*fragment], &text[at..])
        }
        Mutation::DuplicateLine { line } => {
            let mut lines: Vec<&str> = text.lines().collect();
            if !lines.is_empty() {
                let i = line % lines.len();
                lines.insert(i, lines[i]);
            }
            lines.join("\n")
        }
        Mutation::SwapLines { a, b } => {
            let mut lines: Vec<&str> = text.lines().collect();
            if !lines.is_empty() {
                let n = lines.len();
                lines.swap(a % n, b % n);
            }
            lines.join("\n")
        }
    }
}

fn secret(_: &str) -> Option<String> {
    Some(common::SECRET.to_string())
}

proptest! {
    // PROPTEST_CASES raises the count for a long run by hand.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(512),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn mutated_policies_compile_or_are_refused_cleanly(
        file in 0usize..6,
        mutations in proptest::collection::vec(mutation(), 1..4),
    ) {
        let mut source = PolicySource::read_dir(&common::default_policy_dir()).unwrap();
        let target = if file == 0 {
            &mut source.documents[0]
        } else {
            let i = (file - 1) % source.schemas.len();
            &mut source.schemas[i]
        };
        for m in &mutations {
            target.text = apply(&target.text, m);
        }
        match compile(&source, &CompileOptions { generation: 1, secret_lookup: &secret }) {
            Ok(policy) => prop_assert!(!policy.content_hash.is_empty()),
            Err(errors) => {
                prop_assert!(!errors.0.is_empty());
                for e in &errors.0 {
                    prop_assert!(!e.message.contains("internal error"), "compiler panicked: {}", e);
                    prop_assert!(!e.to_string().is_empty());
                }
            }
        }
    }
}
