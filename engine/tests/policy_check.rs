//! `wsgate policy check` and `wsgate policy test` against the real binary: the default policy
//! passes; every broken copy is refused with exit 1 and a `file:line:col: key.path: message`
//! line pointing where the problem is.

mod common;

use common::{PolicyCopy, default_policy_dir, wsgate};

/// Runs `policy check` on `copy`, expects exit 1 and an error line that starts with `prefix`
/// and contains `needle`. Returns stderr.
fn refused(copy: &PolicyCopy, prefix: &str, needle: &str) -> String {
    refused_with_env(copy, prefix, needle, &[])
}

fn refused_with_env(copy: &PolicyCopy, prefix: &str, needle: &str, env: &[(&str, &str)]) -> String {
    let dir = copy.path().to_str().unwrap();
    let (code, stdout, stderr) = wsgate(&["policy", "check", dir], env);
    assert_eq!(code, 1, "expected exit 1\nstdout: {stdout}\nstderr: {stderr}");
    assert!(
        stderr.lines().any(|l| l.starts_with(prefix) && l.contains(needle)),
        "no line starting `{prefix}` containing `{needle}` in:\n{stderr}"
    );
    for line in stderr.lines().filter(|l| !l.starts_with("policy refused")) {
        let mut parts = line.splitn(4, ':');
        let (_file, l, c) = (parts.next(), parts.next(), parts.next());
        assert!(
            l.and_then(|l| l.parse::<usize>().ok()).is_some() && c.and_then(|c| c.parse::<usize>().ok()).is_some(),
            "not file:line:col: {line}"
        );
    }
    stderr
}

#[test]
fn the_default_policy_checks_and_its_tests_pass() {
    let dir = default_policy_dir();
    let (code, stdout, stderr) = wsgate(&["policy", "check", dir.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.starts_with("policy ok"), "{stdout}");
    let junit = tempfile::NamedTempFile::new().unwrap();
    let (code, stdout, stderr) =
        wsgate(&["policy", "test", dir.to_str().unwrap(), "--junit", junit.path().to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let last = stdout.lines().last().unwrap();
    assert!(last.ends_with(" passed, 0 failed"), "{stdout}");
    let xml = std::fs::read_to_string(junit.path()).unwrap();
    assert!(xml.contains("<testsuite name=\"tests/default.yaml\"") && !xml.contains("<failure"), "{xml}");
}

#[test]
fn a_misspelt_key_is_an_error() {
    let copy = PolicyCopy::new();
    let line = copy.replace("policy.yaml", "  max_per_ip: 100", "  max_per_ipp: 100");
    refused(&copy, &format!("policy.yaml:{line}:3:"), "unknown field `max_per_ipp`");
}

#[test]
fn bad_cel_is_an_error() {
    let copy = PolicyCopy::new();
    let line = copy.replace("policy.yaml", r#"'has(claims.roles) && "banned" in claims.roles'"#, "'claims.roles &&'");
    refused(&copy, &format!("policy.yaml:{line}:"), "auth.rules[0].deny: CEL syntax error");
}

#[test]
fn an_unknown_variable_is_an_error() {
    let copy = PolicyCopy::new();
    let line = copy.replace("policy.yaml", "'message.channel.startsWith(\"alerts\")'", "'mesage.channel == \"x\"'");
    refused(&copy, &format!("policy.yaml:{line}:"), "messages.types.subscribe.allow: unknown variable `mesage`");
}

#[test]
fn message_in_a_connect_rule_is_an_error() {
    let copy = PolicyCopy::new();
    let line = copy.replace(
        "policy.yaml",
        r#"'has(claims.roles) && "banned" in claims.roles'"#,
        r#"'message.channel == "x"'"#,
    );
    refused(
        &copy,
        &format!("policy.yaml:{line}:"),
        "variable `message` is not available here (available: claims, request, now)",
    );
}

#[test]
fn a_bad_schema_is_an_error() {
    let copy = PolicyCopy::new();
    copy.write("schemas/ping.json", r#"{"type": "objekt"}"#);
    refused(&copy, "schemas/ping.json:1:1:", "invalid JSON Schema");
    copy.write("schemas/ping.json", "{\n  \"type\": \"object\",\n}");
    refused(&copy, "schemas/ping.json:3:1:", "not valid JSON");
}

#[test]
fn remote_and_file_refs_are_never_fetched() {
    let copy = PolicyCopy::new();
    copy.write("schemas/ping.json", r#"{"$ref": "https://example.com/ping.json"}"#);
    refused(&copy, "schemas/ping.json:1:1:", "invalid JSON Schema");
    copy.write("schemas/ping.json", r#"{"$ref": "file:///etc/passwd"}"#);
    refused(&copy, "schemas/ping.json:1:1:", "invalid JSON Schema");
}

#[test]
fn a_missing_key_env_var_is_an_error() {
    let copy = PolicyCopy::new();
    let (code, _, stderr) = common::wsgate_without_secret(&["policy", "check", copy.path().to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        stderr.starts_with("policy.yaml:9:17: auth.jwt.secret_env: environment variable WSGATE_JWT_SECRET is not set"),
        "{stderr}"
    );
    refused_with_env(&copy, "policy.yaml:9:17:", "at least 32 are required", &[("WSGATE_JWT_SECRET", "short")]);
}

#[test]
fn hmac_with_a_public_key_is_an_error() {
    let copy = PolicyCopy::new();
    std::fs::write(copy.path().join("key.pem"), "-----BEGIN PUBLIC KEY-----\n-----END PUBLIC KEY-----\n").unwrap();
    let line = copy.replace("policy.yaml", "    issuer: null\n", "    public_key_file: key.pem\n    issuer: null\n");
    refused(&copy, &format!("policy.yaml:{line}:"), "an HMAC algorithm is never allowed with a public key");
}

#[test]
fn mixing_hmac_and_public_key_algorithms_is_an_error() {
    let copy = PolicyCopy::new();
    let line = copy.replace("policy.yaml", "algorithms: [HS256]", "algorithms: [HS256, RS256]");
    refused(&copy, &format!("policy.yaml:{line}:"), "cannot be mixed");
}

#[test]
fn a_section_in_two_files_is_an_error() {
    let copy = PolicyCopy::new();
    copy.write("zz-extra.yaml", "version: 1\nmessages:\n  max_bytes: 2048\n");
    refused(&copy, "zz-extra.yaml:3:3: messages:", "already defined in policy.yaml");
}

#[test]
fn invalid_yaml_is_an_error() {
    let copy = PolicyCopy::new();
    let line = copy.replace("policy.yaml", "  max_per_ip: 100", "  max_per_ip: [100");
    refused(&copy, &format!("policy.yaml:{}:", line + 1), "");
}

#[test]
fn a_yml_file_is_an_error_not_silently_ignored() {
    let copy = PolicyCopy::new();
    copy.write("extra.yml", "version: 1\n");
    refused(&copy, "extra.yml:", "must end in .yaml");
}

#[test]
fn out_of_range_and_malformed_limits_are_errors() {
    let copy = PolicyCopy::new();
    let line = copy.replace(
        "policy.yaml",
        "heartbeat: {interval: 30s, timeout: 10s}",
        "heartbeat: {interval: 30sec, timeout: 0s}",
    );
    let stderr = refused(&copy, &format!("policy.yaml:{line}:"), "connections.heartbeat.interval: not a duration");
    assert!(stderr.contains("connections.heartbeat.timeout: out of range: allowed 1s to 1h"), "{stderr}");
}

#[test]
fn every_error_is_reported_not_just_the_first() {
    let copy = PolicyCopy::new();
    copy.replace("policy.yaml", "  max_per_user: 1\n", "  max_per_user: 'claimz.n'\n");
    copy.replace("policy.yaml", "  max_invalid: 5\n", "  max_invalid: 'message.n'\n");
    let stderr = refused(&copy, "policy.yaml:", "connections.max_per_user: unknown variable `claimz`");
    assert!(stderr.contains("messages.max_invalid: variable `message` is not available here"), "{stderr}");
    assert!(stderr.contains("policy refused: 2 errors"), "{stderr}");
}

/// Replaces the `not-banned` rule with `expr` and expects `needle` in the error.
fn cel_bomb(expr: &str, needle: &str) {
    let copy = PolicyCopy::new();
    let line = copy.replace(
        "policy.yaml",
        r#"'has(claims.roles) && "banned" in claims.roles'"#,
        &format!("'{}'", expr.replace('\'', "''")),
    );
    let stderr = refused(&copy, &format!("policy.yaml:{line}:13: auth.rules[0].deny: "), needle);
    assert_eq!(stderr.lines().count(), 2, "one error and the summary: {stderr}");
}

#[test]
fn cel_bomb_long_addition_chain() {
    cel_bomb(&format!("1{} > 0", "+1".repeat(5000)), "expression is 10005 bytes long; at most 4096");
    cel_bomb(&format!("1{} > 0", "+1".repeat(2000)), "levels deep");
}

#[test]
fn cel_bomb_long_field_chain() {
    cel_bomb(&format!("claims{} == 1", ".a".repeat(5000)), "bytes long");
    cel_bomb(&format!("claims{} == 1", ".a".repeat(1500)), "levels deep");
}

#[test]
fn cel_bomb_nested_parentheses() {
    cel_bomb(&format!("{}true{}", "(".repeat(1000), ")".repeat(1000)), "CEL syntax error");
}

#[test]
fn cel_bomb_nested_comprehensions() {
    let list = format!("[{}]", (1..=100).map(|i| i.to_string()).collect::<Vec<_>>().join(","));
    cel_bomb(&format!("{list}.all(x, {list}.all(y, {list}.all(z, x + y + z > 0)))"), "nested 3 deep");
    cel_bomb(&format!("{list}.all(x, {list}.all(y, claims.roles.all(z, z != string(x + y))))"), "nested 3 deep");
    // Two levels over inputs is within the nesting bound but not the cost budget.
    cel_bomb("claims.roles.all(x, claims.roles.all(y, x != y))", "estimated worst-case cost");
}

#[test]
fn cel_bomb_megabyte_string_builder() {
    let list = format!("[{}]", (1..=100).map(|i| i.to_string()).collect::<Vec<_>>().join(","));
    let s = format!("\"{}\"", "x".repeat(100));
    cel_bomb(&format!("size({list}.map(a, {list}.map(b, {s} + {s}))) > 0"), "estimated worst-case cost");
}

#[test]
fn policy_test_reports_failures_and_exits_1() {
    let copy = PolicyCopy::new();
    copy.write(
        "tests/broken.yaml",
        "cases:\n  - name: wrongly expects a banned user in\n    claims: {sub: m, roles: [banned]}\n    expect: accept\n",
    );
    let (code, stdout, _) = wsgate(&["policy", "test", copy.path().to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("FAIL tests/broken.yaml: wrongly expects a banned user in"), "{stdout}");
    assert!(stdout.contains("expected accept, got status 403 by rule `not-banned`"), "{stdout}");
    assert!(stdout.lines().last().unwrap().ends_with(" passed, 1 failed"), "{stdout}");
}

#[test]
fn schema_patterns_use_a_linear_time_regex_engine() {
    // Backreferences and lookaround exist only in backtracking engines; the linear-time engine
    // refuses them, so a schema cannot smuggle in catastrophic backtracking.
    let copy = PolicyCopy::new();
    copy.write("schemas/ping.json", r#"{"type": "object", "properties": {"id": {"pattern": "^(a+)\\1$"}}}"#);
    refused(&copy, "schemas/ping.json:1:1:", "invalid JSON Schema");
    copy.write("schemas/ping.json", r#"{"type": "object", "properties": {"id": {"pattern": "^(?=a)"}}}"#);
    refused(&copy, "schemas/ping.json:1:1:", "invalid JSON Schema");
}

#[test]
fn a_constant_cel_limit_is_range_checked_at_load() {
    let copy = PolicyCopy::new();
    let line = copy.replace("policy.yaml", "  max_per_user: 1\n", "  max_per_user: '0'\n");
    refused(&copy, &format!("policy.yaml:{line}:"), "connections.max_per_user: the result is outside 1..=1000");
}

#[test]
fn a_jwks_key_that_fits_no_allowed_algorithm_is_an_error() {
    let copy = PolicyCopy::new();
    copy.write(
        "jwks.json",
        r#"{"keys": [{"kty": "oct", "kid": "k1", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA"}]}"#,
    );
    copy.replace("policy.yaml", "algorithms: [HS256]", "algorithms: [RS256]");
    let line = copy.replace("policy.yaml", "    secret_env: WSGATE_JWT_SECRET\n", "    jwks_file: jwks.json\n");
    refused(&copy, &format!("policy.yaml:{line}:"), "auth.jwt.jwks_file: key 0 fits none of the policy's algorithms");
}

#[test]
fn a_key_file_that_never_ends_is_refused_not_read_forever() {
    let copy = PolicyCopy::new();
    copy.replace("policy.yaml", "algorithms: [HS256]", "algorithms: [RS256]");
    let line = copy.replace("policy.yaml", "    secret_env: WSGATE_JWT_SECRET\n", "    public_key_file: /dev/zero\n");
    refused(&copy, &format!("policy.yaml:{line}:"), "not a regular file");
}

#[test]
fn a_key_file_that_is_a_fifo_is_refused_without_blocking() {
    let copy = PolicyCopy::new();
    let fifo = copy.path().join("key.pem");
    let status = std::process::Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(status.success());
    copy.replace("policy.yaml", "algorithms: [HS256]", "algorithms: [RS256]");
    let line = copy.replace("policy.yaml", "    secret_env: WSGATE_JWT_SECRET\n", "    public_key_file: key.pem\n");
    refused(&copy, &format!("policy.yaml:{line}:"), "not a regular file");
}

#[test]
fn an_allowed_algorithm_that_no_key_can_verify_is_an_error() {
    let copy = PolicyCopy::new();
    // RSA keys only, but ES256 allowed too.
    let jwks = std::fs::read_to_string(default_policy_dir().join("examples/rs256-jwks/jwks.json")).unwrap();
    copy.write("jwks.json", &jwks);
    let line = copy.replace("policy.yaml", "algorithms: [HS256]", "algorithms: [RS256, ES256]");
    copy.replace("policy.yaml", "    secret_env: WSGATE_JWT_SECRET\n", "    jwks_file: jwks.json\n");
    refused(&copy, &format!("policy.yaml:{line}:"), "auth.jwt.algorithms: ES256 is allowed, but no key");
}

#[test]
fn a_jwk_that_names_its_alg_serves_only_that_algorithm() {
    let copy = PolicyCopy::new();
    // Both keys say `"alg": "RS256"`, so nothing is left to verify RS512.
    let jwks = std::fs::read_to_string(default_policy_dir().join("examples/rs256-jwks/jwks.json")).unwrap();
    copy.write("jwks.json", &jwks);
    let line = copy.replace("policy.yaml", "algorithms: [HS256]", "algorithms: [RS256, RS512]");
    copy.replace("policy.yaml", "    secret_env: WSGATE_JWT_SECRET\n", "    jwks_file: jwks.json\n");
    refused(&copy, &format!("policy.yaml:{line}:"), "auth.jwt.algorithms: RS512 is allowed, but no key");
}

#[test]
fn one_public_key_file_for_algorithms_of_two_families_is_an_error() {
    let copy = PolicyCopy::new();
    let pem = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap().public_key_pem();
    copy.write("key.pem", &pem);
    copy.replace("policy.yaml", "algorithms: [HS256]", "algorithms: [RS256, ES256]");
    let line = copy.replace("policy.yaml", "    secret_env: WSGATE_JWT_SECRET\n", "    public_key_file: key.pem\n");
    refused(&copy, &format!("policy.yaml:{line}:"), "auth.jwt.public_key_file: one public key cannot serve");
}

const COOKIE_SOURCES: (&str, &str) = (
    "token_sources: [query:token, header:authorization, subprotocol]",
    "token_sources: [header:authorization, cookie:session_cookie_name]",
);

#[test]
fn a_cookie_token_source_with_any_origin_is_an_error() {
    let copy = PolicyCopy::new();
    copy.replace("policy.yaml", COOKIE_SOURCES.0, COOKIE_SOURCES.1);
    let line = copy.replace("policy.yaml", "  allowed: [\"*\"]\n", "  allowed: [\"*\"]\n");
    let stderr =
        refused(&copy, &format!("policy.yaml:{line}:13: origins.allowed[0]:"), "cross-site WebSocket hijacking");
    assert!(!stderr.contains("session_cookie_name"), "a value from the file is quoted:\n{stderr}");
}

#[test]
fn a_cookie_token_source_with_the_default_origins_is_an_error() {
    let copy = PolicyCopy::new();
    let line = copy.replace("policy.yaml", COOKIE_SOURCES.0, COOKIE_SOURCES.1);
    copy.replace("policy.yaml", "origins:\n  allowed: [\"*\"]\n", "");
    refused(&copy, &format!("policy.yaml:{line}:41: auth.token_sources[1]:"), "cross-site WebSocket hijacking");
}

#[test]
fn a_cookie_token_source_with_an_origin_list_checks() {
    let copy = PolicyCopy::new();
    copy.replace("policy.yaml", COOKIE_SOURCES.0, COOKIE_SOURCES.1);
    copy.replace(
        "policy.yaml",
        "  allowed: [\"*\"]\n",
        "  allowed: [\"https://app.example.com\", \"https://*.example.org\"]\n",
    );
    let (code, stdout, stderr) = wsgate(&["policy", "check", copy.path().to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{stdout}{stderr}");
}

#[test]
fn a_matches_pattern_that_is_not_a_literal_is_an_error() {
    // A pattern from a claim or a message would be compiled on every evaluation, and chosen by
    // whoever sends it.
    cel_bomb("has(claims.re) && claims.sub.matches(claims.re)", "the pattern of `matches` must be a string literal");
    cel_bomb("matches(claims.sub, claims.re)", "the pattern of `matches` must be a string literal");
    cel_bomb("claims.sub.matches('^' + claims.re)", "the pattern of `matches` must be a string literal");
}

#[test]
fn a_matches_pattern_too_large_to_compile_is_an_error() {
    // Unicode `\w` is hundreds of ranges; repeated 500 times it needs megabytes compiled.
    cel_bomb(r"claims.sub.matches(r'^[\w\s]{1,500}$')", "too large once compiled");
    cel_bomb(r"matches(claims.sub, r'^[\w\s]{1,500}$')", "too large once compiled");
}

#[test]
fn an_invalid_matches_pattern_is_an_error_that_does_not_repeat_it() {
    let copy = PolicyCopy::new();
    let line = copy.replace(
        "policy.yaml",
        r#"'has(claims.roles) && "banned" in claims.roles'"#,
        r#"'claims.sub.matches("(SECRETPATTERN")'"#,
    );
    let stderr = refused(&copy, &format!("policy.yaml:{line}:13: auth.rules[0].deny: "), "invalid: unclosed group");
    assert!(!stderr.contains("SECRETPATTERN"), "an error never repeats the pattern: {stderr}");
}

#[test]
fn a_literal_matches_pattern_decides_in_a_rule() {
    let copy = PolicyCopy::new();
    copy.replace(
        "policy.yaml",
        r#"'has(claims.roles) && "banned" in claims.roles'"#,
        r#"'!claims.sub.matches("^[a-z0-9-]{1,32}$") || matches(claims.sub, "^root$")'"#,
    );
    copy.write(
        "tests/default.yaml",
        "cases:\n  - name: a plain user id connects\n    claims: {sub: alice-1}\n    expect: accept\n  \
         - name: an odd user id is refused\n    claims: {sub: Alice!}\n    expect: {status: 403, rule: not-banned}\n  \
         - name: root is refused\n    claims: {sub: root}\n    expect: {status: 403, rule: not-banned}\n",
    );
    let dir = copy.path().to_str().unwrap();
    let (code, stdout, stderr) = wsgate(&["policy", "check", dir], &[]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let (code, stdout, stderr) = wsgate(&["policy", "test", dir], &[]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.lines().last().unwrap().ends_with("3 passed, 0 failed"), "{stdout}");
}

#[test]
fn a_policy_file_that_links_out_of_the_directory_is_refused_unread() {
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("leak.yaml"), "version: 1\nmessages:\n  binary: SECRETVAL\n").unwrap();
    std::fs::write(outside.path().join("leak.json"), r#"{"type": "SECRETVAL"}"#).unwrap();
    let copy = PolicyCopy::new();
    std::os::unix::fs::symlink(outside.path().join("leak.yaml"), copy.path().join("leak.yaml")).unwrap();
    // Named through `..`, a relative link resolves outside just the same.
    let relative = format!("../../{}/leak.json", outside.path().file_name().unwrap().to_str().unwrap());
    std::os::unix::fs::symlink(relative, copy.path().join("schemas/leak.json")).unwrap();
    let stderr = refused(&copy, "leak.yaml:1:1: ", "resolves outside the policy directory");
    assert!(stderr.contains("schemas/leak.json:1:1: "), "{stderr}");
    assert!(!stderr.contains("SECRETVAL"), "{stderr}");
}

#[test]
fn links_that_stay_inside_the_directory_are_read_as_a_configmap_mounts_them() {
    // A Kubernetes ConfigMap volume: `..data` links to a timestamped directory, and each file
    // is a link through `..data`.
    let copy = PolicyCopy::new();
    let generation = copy.path().join("..2026_12_04_19_00_00.1");
    std::fs::create_dir_all(generation.join("schemas")).unwrap();
    std::fs::rename(copy.path().join("policy.yaml"), generation.join("policy.yaml")).unwrap();
    std::fs::rename(copy.path().join("schemas/ping.json"), generation.join("schemas/ping.json")).unwrap();
    std::os::unix::fs::symlink("..2026_12_04_19_00_00.1", copy.path().join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/policy.yaml", copy.path().join("policy.yaml")).unwrap();
    std::os::unix::fs::symlink("../..data/schemas/ping.json", copy.path().join("schemas/ping.json")).unwrap();
    let (code, stdout, stderr) = wsgate(&["policy", "check", copy.path().to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{stdout}{stderr}");
}

#[test]
fn errors_say_where_and_what_was_expected_but_never_repeat_a_value() {
    let marker = "SECRETVAL";
    for (file, from, to) in [
        ("policy.yaml", "binary: reject", "binary: SECRETVAL"),
        ("policy.yaml", "version: 1", "version: SECRETVAL"),
        ("policy.yaml", "max_per_user: 1\n", "max_per_user: 1.5SECRETVAL\n"),
        ("policy.yaml", "idle_timeout: 10m", "idle_timeout: 10SECRETVAL"),
        ("policy.yaml", "max_bytes: 10240", "max_bytes: 10SECRETVAL"),
        ("policy.yaml", "max_invalid: 5", "max_invalid: 99999999"),
        ("policy.yaml", "[query:token, header:authorization", "[query:token, SECRETVAL"),
        ("policy.yaml", "reconnects: {max: 5", "reconnects: {max: 9999999999"),
        ("policy.yaml", "leeway: 5s", "leeway: SECRETVAL"),
        // A secret pasted where the name of its variable goes.
        ("policy.yaml", "secret_env: WSGATE_JWT_SECRET", "secret_env: SECRETVAL0123456789ABCDEF0123456789ABCDEF"),
        ("policy.yaml", "secret_env: WSGATE_JWT_SECRET", "secret_env: s3cr3t-SECRETVAL"),
        ("policy.yaml", r#""banned" in claims.roles'"#, r#""SECRETVAL" in claims.roles &&'"#),
    ] {
        let copy = PolicyCopy::new();
        let line = copy.replace(file, from, to);
        let stderr = refused(&copy, &format!("{file}:{line}:"), "");
        assert!(!stderr.contains(marker) && !stderr.contains("99999999"), "`{to}` is repeated:\n{stderr}");
    }
    let copy = PolicyCopy::new();
    copy.write("schemas/ping.json", r#"{"type": "SECRETVAL"}"#);
    let stderr = refused(&copy, "schemas/ping.json:1:1:", "invalid JSON Schema");
    assert!(!stderr.contains(marker), "{stderr}");
    copy.write("schemas/ping.json", "{\"type\": \"object\", \"SECRETVAL\"}");
    let stderr = refused(&copy, "schemas/ping.json:1:", "not valid JSON");
    assert!(!stderr.contains(marker), "{stderr}");
}

#[test]
fn policy_test_output_never_repeats_a_value_from_a_test_file() {
    let copy = PolicyCopy::new();
    copy.write(
        "tests/broken.yaml",
        "cases:\n  - name: a word\n    claims: {sub: m}\n    expect: SECRETVAL1\n  \
         - name: a code\n    claims: {sub: m}\n    message: {type: ping}\n    expect: {code: SECRETVAL2}\n",
    );
    let (code, stdout, stderr) = wsgate(&["policy", "test", copy.path().to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(stdout.contains("tests/broken.yaml:"), "{stdout}{stderr}");
    assert!(!stdout.contains("SECRETVAL") && !stderr.contains("SECRETVAL"), "{stdout}{stderr}");
}
