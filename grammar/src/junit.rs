//! JUnit XML, written line by line: each element on its own line, indented two spaces per
//! level, so the `policy test` report and the scenario report look alike to CI.

/// Builds a JUnit XML document.
#[derive(Debug)]
pub struct JunitWriter {
    xml: String,
    control: char,
}

impl JunitWriter {
    /// Starts a document. XML 1.0 forbids most control characters even when escaped, so each
    /// one in a text or an attribute becomes `control` (tab, newline and return stay).
    pub fn new(control: char) -> Self {
        JunitWriter { xml: String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"), control }
    }

    /// `<tag a="v" …>` on its own line, at nesting `level`.
    pub fn open(&mut self, level: usize, tag: &str, attrs: &[(&str, &str)]) {
        self.tag(level, tag, attrs);
        self.xml.push_str(">\n");
    }

    /// An element without children on its own line: `<tag …/>`, or `<tag …>text</tag>`.
    pub fn leaf(&mut self, level: usize, tag: &str, attrs: &[(&str, &str)], text: Option<&str>) {
        self.tag(level, tag, attrs);
        match text {
            None => self.xml.push_str("/>\n"),
            Some(text) => {
                self.xml.push('>');
                self.escape(text);
                self.xml.push_str("</");
                self.xml.push_str(tag);
                self.xml.push_str(">\n");
            }
        }
    }

    /// `</tag>` on its own line, at nesting `level`.
    pub fn close(&mut self, level: usize, tag: &str) {
        self.indent(level);
        self.xml.push_str("</");
        self.xml.push_str(tag);
        self.xml.push_str(">\n");
    }

    /// The document.
    pub fn finish(self) -> String {
        self.xml
    }

    fn indent(&mut self, level: usize) {
        for _ in 0..level {
            self.xml.push_str("  ");
        }
    }

    fn tag(&mut self, level: usize, tag: &str, attrs: &[(&str, &str)]) {
        self.indent(level);
        self.xml.push('<');
        self.xml.push_str(tag);
        for (name, value) in attrs {
            self.xml.push(' ');
            self.xml.push_str(name);
            self.xml.push_str("=\"");
            self.escape(value);
            self.xml.push('"');
        }
    }

    fn escape(&mut self, text: &str) {
        for c in text.chars() {
            match c {
                '&' => self.xml.push_str("&amp;"),
                '<' => self.xml.push_str("&lt;"),
                '>' => self.xml.push_str("&gt;"),
                '"' => self.xml.push_str("&quot;"),
                '\'' => self.xml.push_str("&apos;"),
                '\t' | '\n' | '\r' => self.xml.push(c),
                c if (c as u32) < 0x20 => self.xml.push(self.control),
                c => self.xml.push(c),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nests_escapes_and_replaces_control_characters() {
        let mut w = JunitWriter::new('\u{FFFD}');
        w.open(0, "testsuites", &[("tests", "2")]);
        w.leaf(1, "testcase", &[("name", "a")], None);
        w.open(1, "testcase", &[("name", "b<&>")]);
        w.leaf(2, "failure", &[("message", "expected \"ok\"")], Some("x\u{1}y\n'z'"));
        w.close(1, "testcase");
        w.close(0, "testsuites");
        assert_eq!(
            w.finish(),
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
             <testsuites tests=\"2\">\n  <testcase name=\"a\"/>\n  <testcase name=\"b&lt;&amp;&gt;\">\n    \
             <failure message=\"expected &quot;ok&quot;\">x\u{FFFD}y\n&apos;z&apos;</failure>\n  </testcase>\n\
             </testsuites>\n"
        );
    }

    #[test]
    fn the_control_replacement_is_the_callers() {
        let mut w = JunitWriter::new(' ');
        w.leaf(0, "failure", &[("message", "a\u{7}b\tc")], None);
        assert!(w.finish().ends_with("<failure message=\"a b\tc\"/>\n"));
    }
}
