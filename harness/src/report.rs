//! Results of a scenario run: the console lines (`PASS name`, `FAIL name: reason`, the closing
//! `N passed, N failed`) and the JUnit XML that CI systems read.

use std::fmt::Write as _;
use std::time::Duration;

/// The result of one scenario.
#[derive(Debug, Clone)]
pub struct CaseResult {
    /// The scenario's name (its file name without `.yaml`).
    pub name: String,
    /// The scenario file, for the report.
    pub file: String,
    /// How long it took.
    pub elapsed: Duration,
    /// `None` when it passed; otherwise the failure report (first line: the reason).
    pub failure: Option<String>,
}

/// The console line(s) for one result: `PASS name`, or `FAIL name: reason` followed by the
/// indented details.
pub fn console_line(result: &CaseResult) -> String {
    match &result.failure {
        None => format!("PASS {}", result.name),
        Some(failure) => format!("FAIL {}: {failure}", result.name),
    }
}

/// The closing line.
pub fn summary(results: &[CaseResult]) -> String {
    let failed = results.iter().filter(|r| r.failure.is_some()).count();
    format!("{} passed, {failed} failed", results.len() - failed)
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // XML 1.0 forbids most control characters even when escaped.
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

/// JUnit XML: one `testsuite` (`suite`) with one `testcase` per scenario.
pub fn junit(suite: &str, results: &[CaseResult]) -> String {
    let failed = results.iter().filter(|r| r.failure.is_some()).count();
    let total: f64 = results.iter().map(|r| r.elapsed.as_secs_f64()).sum();
    let mut xml = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        xml,
        "<testsuites name=\"wsgate-harness\" tests=\"{}\" failures=\"{failed}\" errors=\"0\" time=\"{total:.3}\">",
        results.len()
    );
    let _ = writeln!(
        xml,
        "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failed}\" errors=\"0\" skipped=\"0\" time=\"{total:.3}\">",
        escape(suite),
        results.len()
    );
    for r in results {
        let _ = write!(
            xml,
            "    <testcase classname=\"{}\" name=\"{}\" file=\"{}\" time=\"{:.3}\"",
            escape(suite),
            escape(&r.name),
            escape(&r.file),
            r.elapsed.as_secs_f64()
        );
        match &r.failure {
            None => xml.push_str("/>\n"),
            Some(failure) => {
                let message = failure.lines().next().unwrap_or_default();
                let _ = writeln!(
                    xml,
                    ">\n      <failure message=\"{}\" type=\"scenario\">{}</failure>\n    </testcase>",
                    escape(message),
                    escape(failure)
                );
            }
        }
    }
    xml.push_str("  </testsuite>\n</testsuites>\n");
    xml
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
