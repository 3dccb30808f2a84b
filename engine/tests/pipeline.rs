//! The message pipeline under the default policy: order of checks, error codes, max_invalid,
//! rate limits on paused time.

mod common;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::json;
use tokio::time::Instant;
use wsgate::close::{CloseCode, ErrorCode};
use wsgate::pipeline::{Decision, Frame, Pipeline};
use wsgate::policy::decision::{ConnContext, ConnInfo, RequestInfo, Scheme};
use wsgate::policy::source::SourceFile;
use wsgate::policy::{CompileOptions, PolicySource, compile};

fn secret(_: &str) -> Option<String> {
    Some(common::SECRET.to_string())
}

fn pipeline_with(edit: impl Fn(String) -> String) -> Pipeline {
    let mut source = PolicySource::read_dir(&common::default_policy_dir()).unwrap();
    let doc = source.documents[0].text.clone();
    source.documents = vec![SourceFile { name: "policy.yaml".into(), text: edit(doc) }];
    let policy = Arc::new(compile(&source, &CompileOptions { generation: 1, secret_lookup: &secret }).unwrap());
    let claims = json!({"sub": "alice", "roles": ["publisher"]});
    let ip: IpAddr = "127.0.0.1".parse().unwrap();
    let request =
        RequestInfo { ip, scheme: Scheme::Ws, origin: None, path: "/ws".into(), query: vec![], headers: vec![] };
    let limits = policy.handshake_scope(&claims, &request, SystemTime::now()).limits().unwrap();
    let conn =
        ConnInfo { id: "s".into(), user: "alice".into(), ip, instance: "i".into(), connected_at: SystemTime::now() };
    Pipeline::new(ConnContext::new(policy, &claims, &conn), limits)
}

fn code(d: &Decision) -> Option<ErrorCode> {
    match d {
        Decision::Refuse { code, .. } => Some(*code),
        _ => None,
    }
}

fn close_code(d: &Decision) -> Option<CloseCode> {
    match d {
        Decision::Close { code, .. } => Some(*code),
        _ => None,
    }
}

#[tokio::test(start_paused = true)]
async fn each_check_in_order() {
    let mut p = pipeline_with(|d| d.replace("max_invalid: 5", "max_invalid: 100"));
    let now = SystemTime::now();
    let mut send = |text: &str| p.process(Frame::Text(text), Instant::now(), now);
    assert!(matches!(send(r#"{"type":"ping","id":"1"}"#), Decision::Accept { .. }));
    assert_eq!(code(&send("not json")), Some(ErrorCode::InvalidJson));
    let deep = format!("{{\"type\":\"ping\",\"x\":{}1{}}}", "[".repeat(10_000), "]".repeat(10_000));
    assert_eq!(close_code(&send(&deep)), Some(CloseCode::TooBig), "10 KiB first: size comes before parsing");
    let deep = format!("{}1{}", "[".repeat(40), "]".repeat(40));
    assert_eq!(code(&send(&deep)), Some(ErrorCode::InvalidJson));
    assert_eq!(
        code(&send("{\"type\":\"publish\",\"channel\":\"alerts\",\"data\":\"\\u0007\"}")),
        Some(ErrorCode::InvalidJson)
    );
    assert_eq!(code(&send(r#"{"type":"nope"}"#)), Some(ErrorCode::UnknownType));
    assert_eq!(code(&send(r#"{"type":"subscribe"}"#)), Some(ErrorCode::SchemaViolation));
    match send(r#"{"type":"subscribe","id":"s1","channel":"payroll"}"#) {
        Decision::Refuse { code, id, rule, .. } => {
            assert_eq!(code, ErrorCode::Forbidden);
            assert_eq!(id.as_deref(), Some("s1"));
            assert_eq!(rule.map(|r| r.rule.to_string()).as_deref(), Some("subscribe.allow"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(code(&p.process(Frame::Binary(b"x"), Instant::now(), now)), Some(ErrorCode::BinaryNotAllowed));
    let big = format!("{{\"type\":\"ping\",\"pad\":\"{}\"}}", "x".repeat(20_000));
    assert_eq!(close_code(&p.process(Frame::Text(&big), Instant::now(), now)), Some(CloseCode::TooBig));
}

#[tokio::test(start_paused = true)]
async fn max_invalid_then_1008() {
    let mut p = pipeline_with(|d| d);
    let now = SystemTime::now();
    for _ in 0..5 {
        assert_eq!(code(&p.process(Frame::Text("{"), Instant::now(), now)), Some(ErrorCode::InvalidJson));
    }
    assert_eq!(close_code(&p.process(Frame::Text("{"), Instant::now(), now)), Some(CloseCode::PolicyViolation));
}

#[tokio::test(start_paused = true)]
async fn rate_limit_reject_then_recover_and_close_variant() {
    let mut p = pipeline_with(|d| d);
    let now = SystemTime::now();
    let ping = r#"{"type":"ping"}"#;
    for _ in 0..20 {
        assert!(matches!(p.process(Frame::Text(ping), Instant::now(), now), Decision::Accept { .. }));
    }
    assert_eq!(code(&p.process(Frame::Text(ping), Instant::now(), now)), Some(ErrorCode::RateLimited));
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(matches!(p.process(Frame::Text(ping), Instant::now(), now), Decision::Accept { .. }));

    let mut p = pipeline_with(|d| d.replace("action: reject}", "action: close}"));
    for _ in 0..20 {
        p.process(Frame::Text(ping), Instant::now(), now);
    }
    assert_eq!(close_code(&p.process(Frame::Text(ping), Instant::now(), now)), Some(CloseCode::RateLimited));
}

#[tokio::test(start_paused = true)]
async fn binary_close_and_allow() {
    let mut p = pipeline_with(|d| d.replace("binary: reject", "binary: close"));
    assert_eq!(
        close_code(&p.process(Frame::Binary(b"x"), Instant::now(), SystemTime::now())),
        Some(CloseCode::Unsupported)
    );
    let mut p = pipeline_with(|d| d.replace("binary: reject", "binary: allow"));
    assert!(matches!(p.process(Frame::Binary(b"x"), Instant::now(), SystemTime::now()), Decision::Ignore));
}
