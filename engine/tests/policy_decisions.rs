//! The evaluation API: origins, connect rules, audit mode, fail-closed rules, CEL limits,
//! message decisions, and token verification, on policies held in memory.

mod common;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::json;
use wsgate::close::ErrorCode;
use wsgate::policy::decision::{ConnContext, ConnInfo, MessageRefusal, RequestInfo, Scheme};
use wsgate::policy::source::SourceFile;
use wsgate::policy::{CompileOptions, Policy, PolicySource, RuleMode, compile};

fn secret(_: &str) -> Option<String> {
    Some(common::SECRET.to_string())
}

/// The default policy with its `policy.yaml` replaced by `yaml`.
fn policy(yaml: &str) -> Arc<Policy> {
    let mut source = PolicySource::read_dir(&common::default_policy_dir()).unwrap();
    source.documents = vec![SourceFile { name: "policy.yaml".into(), text: yaml.into() }];
    Arc::new(
        compile(&source, &CompileOptions { generation: 7, secret_lookup: &secret }).unwrap_or_else(|e| panic!("{e}")),
    )
}

fn default_policy() -> Arc<Policy> {
    let source = PolicySource::read_dir(&common::default_policy_dir()).unwrap();
    Arc::new(compile(&source, &CompileOptions { generation: 1, secret_lookup: &secret }).unwrap())
}

fn request(origin: Option<&str>) -> RequestInfo {
    RequestInfo {
        ip: IpAddr::from([10, 1, 2, 3]),
        scheme: Scheme::Wss,
        origin: origin.map(str::to_string),
        path: "/ws".into(),
        query: vec![],
        headers: vec![("user-agent".into(), "test".into())],
    }
}

fn conn(user: &str) -> ConnInfo {
    ConnInfo {
        id: "s1".into(),
        user: user.into(),
        ip: IpAddr::from([10, 1, 2, 3]),
        instance: "i1".into(),
        connected_at: SystemTime::now(),
    }
}

const TYPES: &str = "
  types:
    subscribe: {schema: subscribe.json}
    publish: {schema: publish.json}
";

#[test]
fn origin_patterns() {
    let p = policy(
        "version: 1\norigins:\n  allowed: [\"https://app.example.com\", \"https://*.example.org\", \"http://localhost:3000\"]\n",
    );
    assert!(p.check_origin(Some("https://app.example.com")).is_ok());
    assert!(p.check_origin(Some("HTTPS://APP.EXAMPLE.COM")).is_ok());
    assert!(p.check_origin(Some("https://a.b.example.org")).is_ok());
    assert!(p.check_origin(Some("http://localhost:3000")).is_ok());
    assert!(p.check_origin(None).is_ok());
    for bad in
        ["https://example.org", "https://evil.com", "https://app.example.com.evil.com", "http://a.example.org", "null"]
    {
        let d = p.check_origin(Some(bad)).unwrap_err();
        assert_eq!(&*d.rule, "origins", "{bad}");
    }
    let strict = policy("version: 1\norigins:\n  allowed: [\"*\"]\n  require_https: true\n  require_origin: true\n");
    assert!(strict.check_origin(Some("https://x.com")).is_ok());
    assert!(strict.check_origin(Some("http://x.com")).is_err());
    assert!(strict.check_origin(None).is_err());
}

#[test]
fn connect_rules_run_in_order_audit_rules_never_refuse() {
    let p = policy(
        r#"version: 1
auth:
  rules:
    - name: shadow-no-interns
      deny: 'has(claims.roles) && "intern" in claims.roles'
      mode: audit
    - name: need-team
      allow: 'has(claims.team)'
      reason: a team is required
"#,
    );
    let now = SystemTime::now();
    let v = p
        .handshake_scope(&json!({"sub": "a", "team": "ops", "roles": ["intern"]}), &request(None), now)
        .connect_rules();
    assert_eq!(v.denied, None);
    assert_eq!(v.audit.len(), 1);
    assert_eq!(&*v.audit[0].rule, "shadow-no-interns");
    assert_eq!(v.audit[0].mode, RuleMode::Audit);

    let v = p.handshake_scope(&json!({"sub": "a", "roles": ["intern"]}), &request(None), now).connect_rules();
    let d = v.denied.expect("need-team refuses");
    assert_eq!((&*d.rule, &*d.reason, d.error.as_deref()), ("need-team", "a team is required", None));
    assert_eq!(v.audit.len(), 1, "the audit rule before it still reports");
}

#[test]
fn a_rule_that_fails_at_run_time_fails_closed_and_says_so() {
    // `claims.roles` is missing: evaluating `in` on it errors.
    let p = policy("version: 1\nauth:\n  rules:\n    - name: no-banned\n      deny: '\"banned\" in claims.roles'\n");
    let v = p.handshake_scope(&json!({"sub": "a"}), &request(None), SystemTime::now()).connect_rules();
    let d = v.denied.expect("an error refuses");
    assert_eq!(&*d.rule, "no-banned");
    // The kind of error, never the key or a value (either can come from a token or a message).
    assert_eq!(d.error.as_deref(), Some("no such key"), "{d:?}");
    // In audit mode the same error is a "would deny" and the request passes.
    let p = policy(
        "version: 1\nauth:\n  rules:\n    - name: no-banned\n      deny: '\"banned\" in claims.roles'\n      mode: audit\n",
    );
    let v = p.handshake_scope(&json!({"sub": "a"}), &request(None), SystemTime::now()).connect_rules();
    assert_eq!(v.denied, None);
    assert!(v.audit[0].error.is_some());
}

#[test]
fn rules_see_request_and_now() {
    let p = policy(
        r#"version: 1
auth:
  rules:
    - name: office-hours
      allow: 'now.getHours("UTC") >= 8 || request.ip.startsWith("10.")'
    - name: browser
      allow: 'request.headers["user-agent"] == "test" && request.path == "/ws"'
"#,
    );
    let midnight = SystemTime::UNIX_EPOCH + Duration::from_secs(1_790_000_000 / 86_400 * 86_400);
    let v = p.handshake_scope(&json!({"sub": "a"}), &request(None), midnight).connect_rules();
    assert_eq!(v.denied, None, "10.x is allowed at any hour");
    let mut outside = request(None);
    outside.ip = IpAddr::from([192, 0, 2, 1]);
    let v = p.handshake_scope(&json!({"sub": "a"}), &outside, midnight).connect_rules();
    assert_eq!(v.denied.map(|d| d.rule.to_string()), Some("office-hours".into()));
}

#[test]
fn user_id_and_limits_may_be_cel() {
    let p = policy(
        r#"version: 1
auth:
  user_id: 'claims.tenant + "/" + claims.sub'
  reauth_interval: '"admin" in claims.roles ? duration("1h") : duration("5m")'
connections:
  max_per_user: '"premium" in claims.roles ? 5 : 1'
  max_per_ip: 'request.ip.startsWith("10.") ? 1000 : 100'
messages:
  max_bytes: '"premium" in claims.roles ? 65536 : 4096'
  rate: {max: '"premium" in claims.roles ? 100 : 10', per: 1s, action: close}
"#,
    );
    let now = SystemTime::now();
    let premium = json!({"sub": "u", "tenant": "t", "roles": ["premium"]});
    let scope = p.handshake_scope(&premium, &request(None), now);
    assert_eq!(scope.user_id().unwrap(), "t/u");
    let l = scope.limits().unwrap();
    assert_eq!((l.max_per_user, l.max_per_ip, l.max_bytes, l.rate_max), (5, 1000, 65536, 100));
    assert_eq!(l.reauth_interval, Duration::from_secs(300));
    assert_eq!(l.heartbeat_interval, Duration::from_secs(30), "literal defaults still apply");

    let basic = json!({"sub": "u", "tenant": "t", "roles": []});
    let l = p.handshake_scope(&basic, &request(None), now).limits().unwrap();
    assert_eq!((l.max_per_user, l.max_bytes, l.rate_max), (1, 4096, 10));

    // A limit whose expression fails, or yields something out of range, refuses (fail closed).
    let e = p.handshake_scope(&json!({"sub": "u", "tenant": "t"}), &request(None), now).limits().unwrap_err();
    assert_eq!(e.key, "connections.max_per_user");
    let p = policy("version: 1\nconnections:\n  max_per_user: 'size(claims.sub) * 1000'\n");
    let e = p.handshake_scope(&json!({"sub": "abc"}), &request(None), now).limits().unwrap_err();
    assert!(e.error.contains("outside 1..=1000"), "{e}");
}

#[test]
fn a_user_id_must_be_a_short_non_empty_string() {
    let p = default_policy();
    let now = SystemTime::now();
    assert!(p.handshake_scope(&json!({"sub": ""}), &request(None), now).user_id().is_err());
    assert!(p.handshake_scope(&json!({"sub": "x".repeat(300)}), &request(None), now).user_id().is_err());
    assert!(p.handshake_scope(&json!({"sub": ["a"]}), &request(None), now).user_id().is_err());
    assert_eq!(p.handshake_scope(&json!({"sub": 42}), &request(None), now).user_id().unwrap(), "42");
}

#[test]
fn message_decisions_follow_envelope_type_schema_rules() {
    let p = default_policy();
    let ctx = ConnContext::new(p.clone(), &json!({"sub": "a", "roles": ["publisher"]}), &conn("a"));
    let now = SystemTime::now();
    let decide = |m: serde_json::Value| ctx.decide(&m, now).refused.map(|r| r.code());
    assert_eq!(decide(json!({"type": "publish", "channel": "alerts", "data": {"x": 1}})), None);
    assert_eq!(decide(json!([1])), Some(ErrorCode::SchemaViolation));
    assert_eq!(decide(json!({"type": 3})), Some(ErrorCode::SchemaViolation));
    assert_eq!(decide(json!({"type": "ping", "id": 5})), Some(ErrorCode::SchemaViolation));
    assert_eq!(decide(json!({"type": "ping", "id": "x".repeat(129)})), Some(ErrorCode::SchemaViolation));
    assert_eq!(decide(json!({"type": "nope"})), Some(ErrorCode::UnknownType));
    assert_eq!(decide(json!({"type": "subscribe", "channel": "payroll"})), Some(ErrorCode::Forbidden));
    match ctx.decide(&json!({"type": "subscribe", "channel": "payroll"}), now).refused {
        Some(MessageRefusal::Rule(d)) => assert_eq!(&*d.rule, "subscribe.allow"),
        other => panic!("{other:?}"),
    }
    assert_eq!(ctx.policy().generation, 1, "the context decides under the policy it was built with");
}

#[test]
fn message_rules_apply_to_their_types_and_can_close() {
    let p = policy(&format!(
        r#"version: 1
messages:
  rules:
    - name: no-shouting
      deny: 'message.channel.startsWith("LOUD")'
      action: close
      types: [subscribe]
    - name: audit-publish-size
      deny: 'size(string(message.channel)) > 3'
      mode: audit
      types: [publish]
{TYPES}"#
    ));
    let ctx = ConnContext::new(p, &json!({"sub": "a"}), &conn("a"));
    let now = SystemTime::now();
    match ctx.decide(&json!({"type": "subscribe", "channel": "LOUDNESS"}), now).refused {
        Some(MessageRefusal::Rule(d)) => {
            assert_eq!(&*d.rule, "no-shouting");
            assert_eq!(d.action, wsgate::policy::RuleAction::Close);
        }
        other => panic!("{other:?}"),
    }
    let v = ctx.decide(&json!({"type": "publish", "channel": "LOUDNESS", "data": 1}), now);
    assert_eq!(v.refused, None, "no-shouting does not apply to publish");
    assert_eq!(v.audit.iter().map(|d| d.rule.to_string()).collect::<Vec<_>>(), vec!["audit-publish-size"]);
}

#[test]
fn message_rules_see_claims_conn_message_and_now() {
    let p = policy(
        r#"version: 1
messages:
  types:
    publish:
      schema: publish.json
      allow: 'message.channel == "user:" + conn.user && claims.sub == conn.user && now > conn.connected_at - duration("1s")'
    subscribe: {schema: subscribe.json}
"#,
    );
    let ctx = ConnContext::new(p, &json!({"sub": "bob"}), &conn("bob"));
    let now = SystemTime::now();
    assert_eq!(ctx.decide(&json!({"type": "publish", "channel": "user:bob", "data": 1}), now).refused, None);
    assert!(ctx.decide(&json!({"type": "publish", "channel": "user:eve", "data": 1}), now).refused.is_some());
}

#[test]
fn tokens_are_verified_with_the_policy_keys() {
    let p = default_policy();
    let now = SystemTime::now();
    let mint = |secret: &str, ttl: u64| {
        wsgate::token::mint(
            secret.as_bytes(),
            "alice",
            Duration::from_secs(ttl),
            &[("roles".into(), "[\"publisher\"]".into())],
            now,
        )
        .unwrap()
    };
    let claims = p.auth.jwt.verify(&mint(common::SECRET, 60)).unwrap();
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["roles"][0], "publisher");
    use wsgate::policy::keys::TokenError;
    assert_eq!(p.auth.jwt.verify(&mint("another-secret-that-is-long-enough!!", 60)), Err(TokenError::BadSignature));
    assert_eq!(p.auth.jwt.verify("not.a.token"), Err(TokenError::Malformed));
    let expired = wsgate::token::mint(
        common::SECRET.as_bytes(),
        "alice",
        Duration::from_secs(1),
        &[],
        now - Duration::from_secs(3600),
    )
    .unwrap();
    assert_eq!(p.auth.jwt.verify(&expired), Err(TokenError::Expired));
    // alg: none is refused.
    let none = format!("{}.{}.", b64(r#"{"alg":"none","typ":"JWT"}"#), b64(r#"{"sub":"alice","exp":9999999999}"#));
    assert!(p.auth.jwt.verify(&none).is_err());
}

fn b64(s: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bytes = s.as_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

#[test]
fn a_configured_issuer_audience_or_custom_claim_must_be_present() {
    let p = policy(
        "version: 1\nauth:\n  jwt:\n    issuer: https://id.example.com/\n    audience: wsgate\n    required_claims: [exp, sub, tenant]\n",
    );
    let now = SystemTime::now();
    let mint = |claims: &[(&str, &str)]| {
        let claims: Vec<(String, String)> = claims.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        wsgate::token::mint(common::SECRET.as_bytes(), "alice", Duration::from_secs(60), &claims, now).unwrap()
    };
    use wsgate::policy::keys::TokenError;
    let all = [("iss", "https://id.example.com/"), ("aud", "wsgate"), ("tenant", "t1")];
    assert!(p.auth.jwt.verify(&mint(&all)).is_ok());
    assert_eq!(p.auth.jwt.verify(&mint(&all[1..])), Err(TokenError::MissingClaim), "no iss");
    assert_eq!(p.auth.jwt.verify(&mint(&[all[0], all[2]])), Err(TokenError::MissingClaim), "no aud");
    assert_eq!(p.auth.jwt.verify(&mint(&all[..2])), Err(TokenError::MissingClaim), "no tenant");
    assert_eq!(p.auth.jwt.verify(&mint(&[("iss", "https://evil/"), all[1], all[2]])), Err(TokenError::WrongIssuer));
    assert_eq!(p.auth.jwt.verify(&mint(&[all[0], ("aud", "other"), all[2]])), Err(TokenError::WrongAudience));
}

/// A fixed RSA key for tests only: the `ring` backend of rcgen cannot generate RSA keys.
const RSA_TEST_KEY: &str = include_str!("keys/rsa-2048-test-only.pem");

/// A policy allowing RS256 and ES256 over a JWKS with one RSA key (`kid` r1) and one EC key
/// (`kid` e1), and the two private keys. The directory holding the JWKS lives as long as the
/// returned guard.
fn rsa_and_ec_jwks() -> (Arc<Policy>, jsonwebtoken::EncodingKey, jsonwebtoken::EncodingKey, tempfile::TempDir) {
    rsa_and_ec_jwks_with_kids("r1", "e1")
}

fn rsa_and_ec_jwks_with_kids(
    rsa_kid: &str,
    ec_kid: &str,
) -> (Arc<Policy>, jsonwebtoken::EncodingKey, jsonwebtoken::EncodingKey, tempfile::TempDir) {
    use jsonwebtoken::jwk::{Jwk, JwkSet};
    use jsonwebtoken::{Algorithm, EncodingKey};
    let rsa = EncodingKey::from_rsa_pem(RSA_TEST_KEY.as_bytes()).unwrap();
    let ec_pem = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap().serialize_pem();
    let ec = EncodingKey::from_ec_pem(ec_pem.as_bytes()).unwrap();
    let jwk = |key: &EncodingKey, alg: Algorithm, kid: &str| {
        let mut jwk = Jwk::from_encoding_key(key, alg).unwrap();
        jwk.common.key_id = Some(kid.into());
        jwk
    };
    let set = JwkSet { keys: vec![jwk(&rsa, Algorithm::RS256, rsa_kid), jwk(&ec, Algorithm::ES256, ec_kid)] };
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, serde_json::to_string(&set).unwrap()).unwrap();
    let p = policy(&format!(
        "version: 1\nauth:\n  token_sources: [header:authorization]\n  jwt:\n    algorithms: [RS256, ES256]\n    secret_env: null\n    jwks_file: {}\n",
        jwks.display()
    ));
    (p, rsa, ec, dir)
}

fn signed(alg: jsonwebtoken::Algorithm, kid: &str, key: &jsonwebtoken::EncodingKey) -> String {
    let mut header = jsonwebtoken::Header::new(alg);
    header.kid = Some(kid.into());
    let exp = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() + 60;
    jsonwebtoken::encode(&header, &json!({"sub": "alice", "exp": exp}), key).unwrap()
}

#[test]
fn a_jwks_with_rsa_and_ec_keys_accepts_both_kinds_of_token() {
    use jsonwebtoken::Algorithm::{ES256, RS256};
    let (p, rsa, ec, _dir) = rsa_and_ec_jwks();
    let rs = p.auth.jwt.verify(&signed(RS256, "r1", &rsa));
    assert_eq!(rs.map(|c| c["sub"].clone()), Ok(json!("alice")), "RS256 token with the RSA key's kid");
    let es = p.auth.jwt.verify(&signed(ES256, "e1", &ec));
    assert_eq!(es.map(|c| c["sub"].clone()), Ok(json!("alice")), "ES256 token with the EC key's kid");
}

#[test]
fn a_token_naming_a_key_of_another_family_is_refused() {
    use jsonwebtoken::Algorithm::{ES256, RS256};
    use wsgate::policy::keys::TokenError;
    let (p, rsa, ec, _dir) = rsa_and_ec_jwks();
    assert_eq!(p.auth.jwt.verify(&signed(RS256, "e1", &rsa)), Err(TokenError::WrongAlgorithm), "RS256 with the EC kid");
    assert_eq!(p.auth.jwt.verify(&signed(ES256, "r1", &ec)), Err(TokenError::WrongAlgorithm), "ES256 with the RSA kid");
    assert_eq!(p.auth.jwt.verify(&signed(RS256, "nope", &rsa)), Err(TokenError::UnknownKey));
}

#[test]
fn keys_of_two_families_may_share_a_kid() {
    // RFC 7517 §4.5: keys of different types in one set may share a `kid`.
    use jsonwebtoken::Algorithm::{ES256, RS256};
    let (p, rsa, ec, _dir) = rsa_and_ec_jwks_with_kids("k", "k");
    assert!(p.auth.jwt.verify(&signed(RS256, "k", &rsa)).is_ok(), "RS256 token, kid shared");
    assert!(p.auth.jwt.verify(&signed(ES256, "k", &ec)).is_ok(), "ES256 token, kid shared");
}

#[test]
fn a_schema_violation_names_the_schema_keys_never_a_key_the_client_chose() {
    let mut source = PolicySource::read_dir(&common::default_policy_dir()).unwrap();
    source.documents = vec![SourceFile {
        name: "policy.yaml".into(),
        text: "version: 1\nmessages:\n  types:\n    note: {schema: note.json}\n".into(),
    }];
    source.schemas.push(SourceFile {
        name: "schemas/note.json".into(),
        text: json!({"type": "object", "properties": {"tags": {"type": "object", "additionalProperties": {"type": "string"}}}})
            .to_string(),
    });
    let p = Arc::new(compile(&source, &CompileOptions { generation: 1, secret_lookup: &secret }).unwrap());
    let ctx = ConnContext::new(p, &json!({"sub": "a"}), &conn("a"));
    let m = json!({"type": "note", "tags": {"CLIENT-CHOSEN-KEY": 1}});
    match ctx.decide(&m, SystemTime::now()).refused {
        Some(MessageRefusal::Invalid { reason, .. }) => {
            assert_eq!(reason, "does not match the schema: `type` at `/tags/*`");
        }
        other => panic!("{other:?}"),
    }
}
