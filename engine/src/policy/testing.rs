//! `wsgate policy test`: a policy's own test cases (`tests/*.yaml`), run against the policy
//! compiled exactly as the server compiles it.
//!
//! A case gives `claims` and optionally `request`, `conn`, `message` and `now`, and what must
//! happen: `accept`, or a refusal by HTTP `status` (a handshake) or error `code` (a message),
//! with the `rule` that refused. A case may also list the audit-mode rules it expects to
//! "would deny" (`audit`). A handshake is decided as the server decides it: origin, connect
//! rules, user id, limits; then the message, if any.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use wsgate_grammar::junit::JunitWriter;

use super::compiled::Policy;
use super::decision::{ConnContext, ConnInfo, MessageRefusal, RequestInfo, Scheme};
use super::error::PolicyError;
use super::model::Located;
use super::source::SourceFile;
use crate::close::{ErrorCode, STATUS_FORBIDDEN, STATUS_UNAUTHORIZED};

/// A test file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TestFile {
    cases: Vec<Located<Case>>,
}

/// One test case.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    #[serde(default = "empty_object")]
    claims: serde_json::Value,
    #[serde(default)]
    request: RequestSpec,
    #[serde(default)]
    conn: ConnSpec,
    message: Option<serde_json::Value>,
    /// RFC 3339; default: the time the test runs.
    now: Option<String>,
    expect: Expect,
    /// Audit-mode rules expected to "would deny" (default: none).
    #[serde(default)]
    audit: Vec<String>,
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestSpec {
    ip: Option<IpAddr>,
    /// `ws` or `wss`; a production client by default.
    scheme: Option<Scheme>,
    origin: Option<String>,
    path: Option<String>,
    #[serde(default)]
    query: BTreeMap<String, String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConnSpec {
    id: Option<String>,
    instance: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Expect {
    /// `accept`.
    Word(String),
    /// A refusal.
    Refusal { status: Option<u16>, code: Option<String>, rule: Option<String> },
}

/// What a case produced, in the terms a case expects.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Observed {
    status: Option<u16>,
    code: Option<String>,
    rule: Option<String>,
    audit: Vec<String>,
    /// Extra detail for failure messages (an evaluation error, a reason).
    detail: Option<String>,
}

impl std::fmt::Display for Observed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.status, &self.code) {
            (None, None) => f.write_str("accept")?,
            (Some(s), _) => write!(f, "status {s}")?,
            (None, Some(c)) => write!(f, "code {c}")?,
        }
        if let Some(r) = &self.rule {
            write!(f, " by rule `{r}`")?;
        }
        if !self.audit.is_empty() {
            write!(f, " (audit would deny: {})", self.audit.join(", "))?;
        }
        if let Some(d) = &self.detail {
            write!(f, " [{d}]")?;
        }
        Ok(())
    }
}

/// The outcome of one case.
#[derive(Debug, Clone)]
pub struct CaseResult {
    /// The test file.
    pub file: String,
    /// The case's name.
    pub name: String,
    /// `None` when it passed; otherwise what was expected and what was seen.
    pub failure: Option<String>,
}

/// Every case of every test file.
#[derive(Debug, Default)]
pub struct Report {
    /// Results in file order.
    pub cases: Vec<CaseResult>,
}

impl Report {
    /// Cases that passed.
    pub fn passed(&self) -> usize {
        self.cases.iter().filter(|c| c.failure.is_none()).count()
    }

    /// Cases that failed.
    pub fn failed(&self) -> usize {
        self.cases.len() - self.passed()
    }

    /// JUnit XML, one `testsuite` per test file.
    pub fn junit(&self) -> String {
        let mut by_file: BTreeMap<&str, Vec<&CaseResult>> = BTreeMap::new();
        for c in &self.cases {
            by_file.entry(&c.file).or_default().push(c);
        }
        let mut xml = JunitWriter::new(' ');
        let (total, failed) = (self.cases.len().to_string(), self.failed().to_string());
        xml.open(0, "testsuites", &[("name", "wsgate policy test"), ("tests", &total), ("failures", &failed)]);
        for (file, cases) in by_file {
            let failures = cases.iter().filter(|c| c.failure.is_some()).count().to_string();
            let tests = cases.len().to_string();
            xml.open(1, "testsuite", &[("name", file), ("tests", &tests), ("failures", &failures)]);
            for c in cases {
                let attrs = [("classname", file), ("name", c.name.as_str())];
                match &c.failure {
                    None => xml.leaf(2, "testcase", &attrs, None),
                    Some(f) => {
                        xml.open(2, "testcase", &attrs);
                        xml.leaf(3, "failure", &[("message", f)], None);
                        xml.close(2, "testcase");
                    }
                }
            }
            xml.close(1, "testsuite");
        }
        xml.close(0, "testsuites");
        xml.finish()
    }
}

/// Runs every case of `tests`. A test file that does not parse is an error (not a failed case):
/// a broken test suite must not pass quietly.
pub fn run(policy: &Arc<Policy>, tests: &[SourceFile]) -> Result<Report, Vec<PolicyError>> {
    let mut report = Report::default();
    let mut errors = Vec::new();
    for file in tests {
        let parsed: TestFile = match serde_saphyr::from_str(&file.text) {
            Ok(t) => t,
            Err(e) => {
                let (line, col) = e.location().map_or((0, 0), |l| (l.line() as usize, l.column() as usize));
                let message = super::error::yaml_message(&e);
                errors.push(PolicyError { file: file.name.clone(), line, col, path: String::new(), message });
                continue;
            }
        };
        for case in parsed.cases {
            let failure = match run_case(policy, &case.value) {
                Ok(()) => None,
                Err(f) => Some(format!("{}:{}: {f}", file.name, case.line)),
            };
            report.cases.push(CaseResult { file: file.name.clone(), name: case.value.name.clone(), failure });
        }
    }
    if errors.is_empty() { Ok(report) } else { Err(errors) }
}

fn run_case(policy: &Arc<Policy>, case: &Case) -> Result<(), String> {
    let expected = expectation(case)?;
    let now = match &case.now {
        None => SystemTime::now(),
        Some(text) => {
            chrono::DateTime::parse_from_rfc3339(text).map_err(|e| format!("`now` is not RFC 3339: {e}"))?.into()
        }
    };
    let seen = observe(policy, case, now);
    let detail = seen.detail.as_ref().map(|d| format!(" [{d}]")).unwrap_or_default();
    let shown = Observed { detail: None, ..seen };
    // A case that names no rule accepts any rule refusing with the expected status or code.
    let compared = Observed { rule: if expected.rule.is_none() { None } else { shown.rule.clone() }, ..shown.clone() };
    if compared == expected { Ok(()) } else { Err(format!("expected {expected}, got {shown}{detail}")) }
}

fn expectation(case: &Case) -> Result<Observed, String> {
    let mut audit = case.audit.clone();
    audit.sort();
    let observed = match &case.expect {
        Expect::Word(w) if w == "accept" => Observed { audit, ..Observed::default() },
        Expect::Word(_) => {
            return Err("`expect`: write `accept`, or a mapping with status or code and rule".into());
        }
        Expect::Refusal { status, code, rule } => {
            if status.is_some() == code.is_some() {
                return Err("`expect` gives exactly one of `status` (a handshake) or `code` (a message)".into());
            }
            if let Some(c) = code
                && ErrorCode::parse(c).is_none()
            {
                return Err("`expect.code` is not an error code (invalid_json, schema_violation, unknown_type, \
                            forbidden, rate_limited, binary_not_allowed)"
                    .into());
            }
            Observed { status: *status, code: code.clone(), rule: rule.clone(), audit, detail: None }
        }
    };
    Ok(observed)
}

fn observe(policy: &Arc<Policy>, case: &Case, now: SystemTime) -> Observed {
    let r = &case.request;
    let request = RequestInfo {
        ip: r.ip.unwrap_or(IpAddr::from([203, 0, 113, 10])),
        scheme: r.scheme.unwrap_or(Scheme::Wss),
        origin: r.origin.clone(),
        path: r.path.clone().unwrap_or_else(|| "/ws".into()),
        query: r.query.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        headers: r.headers.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.clone())).collect(),
    };
    let mut audit = Vec::new();
    let refused = |status: u16, rule: &str, detail: Option<String>, audit: &mut Vec<String>| {
        audit.sort();
        Observed {
            status: Some(status),
            code: None,
            rule: Some(rule.to_string()),
            audit: std::mem::take(audit),
            detail,
        }
    };
    if let Err(d) = policy.check_origin(request.origin.as_deref()) {
        return refused(STATUS_FORBIDDEN, &d.rule, Some(d.reason.to_string()), &mut audit);
    }
    let scope = policy.handshake_scope(&case.claims, &request, now);
    let verdict = scope.connect_rules();
    audit.extend(verdict.audit.iter().map(|d| d.rule.to_string()));
    if let Some(d) = verdict.denied {
        return refused(STATUS_FORBIDDEN, &d.rule, d.error, &mut audit);
    }
    let user = match scope.user_id() {
        Ok(u) => u,
        Err(e) => return refused(STATUS_UNAUTHORIZED, "auth.user_id", Some(e.0), &mut audit),
    };
    if let Err(e) = scope.limits() {
        return refused(STATUS_FORBIDDEN, e.key, Some(e.error), &mut audit);
    }
    if let Some(message) = &case.message {
        let conn = ConnInfo {
            id: case.conn.id.clone().unwrap_or_else(|| "test-session".into()),
            user,
            ip: request.ip,
            instance: case.conn.instance.clone().unwrap_or_else(|| "test".into()),
            connected_at: now.checked_sub(Duration::from_secs(1)).unwrap_or(now),
        };
        let ctx = ConnContext::new(policy.clone(), &case.claims, &conn);
        let verdict = ctx.decide(message, now);
        audit.extend(verdict.audit.iter().map(|d| d.rule.to_string()));
        audit.sort();
        return match verdict.refused {
            None => Observed { audit, ..Observed::default() },
            Some(MessageRefusal::Invalid { code, reason }) => {
                Observed { status: None, code: Some(code.as_str().into()), rule: None, audit, detail: Some(reason) }
            }
            Some(MessageRefusal::Rule(d)) => Observed {
                status: None,
                code: Some(ErrorCode::Forbidden.as_str().into()),
                rule: Some(d.rule.to_string()),
                audit,
                detail: d.error,
            },
        };
    }
    audit.sort();
    Observed { audit, ..Observed::default() }
}
