//! Results of a scenario run: the console lines (`PASS name`, `FAIL name: reason`, the closing
//! `N passed, N failed`) and the JUnit XML that CI systems read.

use std::time::Duration;

use wsgate_grammar::junit::JunitWriter;

/// The result of one scenario.
#[derive(Debug, Clone)]
pub(crate) struct CaseResult {
    /// The scenario's name (its file name without `.yaml`).
    pub(crate) name: String,
    /// The scenario file, for the report.
    pub(crate) file: String,
    pub(crate) elapsed: Duration,
    /// `None` when it passed; otherwise the failure report (first line: the reason).
    pub(crate) failure: Option<String>,
}

/// The console line(s) for one result: `PASS name`, or `FAIL name: reason` followed by the
/// indented details.
pub(crate) fn console_line(result: &CaseResult) -> String {
    match &result.failure {
        None => format!("PASS {}", result.name),
        Some(failure) => format!("FAIL {}: {failure}", result.name),
    }
}

pub(crate) fn summary(results: &[CaseResult]) -> String {
    let failed = results.iter().filter(|r| r.failure.is_some()).count();
    format!("{} passed, {failed} failed", results.len() - failed)
}

/// JUnit XML: one `testsuite` (`suite`) with one `testcase` per scenario.
pub(crate) fn junit(suite: &str, results: &[CaseResult]) -> String {
    let failed = results.iter().filter(|r| r.failure.is_some()).count().to_string();
    let total = format!("{:.3}", results.iter().map(|r| r.elapsed.as_secs_f64()).sum::<f64>());
    let tests = results.len().to_string();
    let mut xml = JunitWriter::new('\u{FFFD}');
    let counts = [("tests", tests.as_str()), ("failures", &failed), ("errors", "0")];
    xml.open(0, "testsuites", &[&[("name", "wsgate-harness")], &counts[..], &[("time", &total)]].concat());
    xml.open(1, "testsuite", &[&[("name", suite)], &counts[..], &[("skipped", "0"), ("time", &total)]].concat());
    for r in results {
        let time = format!("{:.3}", r.elapsed.as_secs_f64());
        let attrs = [("classname", suite), ("name", &r.name), ("file", &r.file), ("time", &time)];
        match &r.failure {
            None => xml.leaf(2, "testcase", &attrs, None),
            Some(failure) => {
                let message = failure.lines().next().unwrap_or_default();
                xml.open(2, "testcase", &attrs);
                xml.leaf(3, "failure", &[("message", message), ("type", "scenario")], Some(failure));
                xml.close(2, "testcase");
            }
        }
    }
    xml.close(1, "testsuite");
    xml.close(0, "testsuites");
    xml.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn results() -> Vec<CaseResult> {
        vec![
            CaseResult {
                name: "a".into(),
                file: "s/a.yaml".into(),
                elapsed: Duration::from_millis(1500),
                failure: None,
            },
            CaseResult {
                name: "b<&>".into(),
                file: "s/b.yaml".into(),
                elapsed: Duration::from_millis(250),
                failure: Some("step 2 (expect `x`): expected \"ok\"\n  log\u{1}line".into()),
            },
        ]
    }

    #[test]
    fn console_and_summary() {
        let r = results();
        assert_eq!(console_line(&r[0]), "PASS a");
        assert!(console_line(&r[1]).starts_with("FAIL b<&>: step 2"));
        assert_eq!(summary(&r), "1 passed, 1 failed");
    }

    #[test]
    fn junit_is_escaped_and_counts() {
        let xml = junit("scenarios", &results());
        assert!(xml.contains("tests=\"2\" failures=\"1\""), "{xml}");
        assert!(xml.contains("name=\"b&lt;&amp;&gt;\""), "{xml}");
        assert!(xml.contains("message=\"step 2 (expect `x`): expected &quot;ok&quot;\""), "{xml}");
        assert!(xml.contains("time=\"1.500\"/>"), "{xml}");
        assert!(!xml.contains('\u{1}'));
        assert_eq!(xml.matches("<testcase").count(), 2);
    }
}
