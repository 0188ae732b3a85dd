//! Results as CI systems read them: TAP (version 14) and JUnit XML.

use std::fmt::Write as _;
use std::time::Duration;

/// How a check ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Passed,
    /// It exited non-zero (or was killed by a signal: 128 + N).
    Failed {
        exit: i32,
    },
    TimedOut {
        after: Duration,
    },
    /// It could not run to its end: the machine went away, a reboot it
    /// asked for did not come back, or it asked for one it may not.
    Error {
        why: String,
    },
}

/// One check's result.
#[derive(Debug, Clone)]
pub struct CheckResult {
    pub name: String,
    pub outcome: Outcome,
    pub duration: Duration,
    /// Reboots it asked for (and got).
    pub reboots: u32,
    /// Its standard output and error, interleaved, bounded.
    pub output: String,
    /// Where its failure's logs were saved.
    pub artifacts: Option<std::path::PathBuf>,
}

impl CheckResult {
    pub fn passed(&self) -> bool {
        self.outcome == Outcome::Passed
    }

    fn why(&self) -> Option<String> {
        match &self.outcome {
            Outcome::Passed => None,
            Outcome::Failed { exit } => Some(format!("exited with status {exit}")),
            Outcome::TimedOut { after } => Some(format!("timed out after {} s", after.as_secs())),
            Outcome::Error { why } => Some(why.clone()),
        }
    }
}

/// The TAP stream's first two lines.
pub fn tap_plan(count: usize) -> String {
    format!("TAP version 14\n1..{count}\n")
}

/// One TAP test point with a YAML block for a failure.
pub fn tap_line(number: usize, r: &CheckResult) -> String {
    let mut s = String::new();
    let ok = if r.passed() { "ok" } else { "not ok" };
    let _ = writeln!(s, "{ok} {number} - {}", r.name.replace('#', "\\#"));
    if let Some(why) = r.why() {
        let _ = writeln!(s, "  ---");
        let _ = writeln!(s, "  message: {}", yaml_string(&why));
        let _ = writeln!(s, "  duration_s: {:.1}", r.duration.as_secs_f64());
        let _ = writeln!(s, "  reboots: {}", r.reboots);
        if let Some(a) = &r.artifacts {
            let _ = writeln!(s, "  artifacts: {}", yaml_string(&a.display().to_string()));
        }
        if !r.output.trim().is_empty() {
            let _ = writeln!(s, "  output: |");
            for line in tail(&r.output, 40).lines() {
                let _ = writeln!(s, "    {}", printable(line));
            }
        }
        let _ = writeln!(s, "  ...");
    }
    s
}

/// A line of a check's output for a terminal: control characters (escape
/// sequences a hostile guest could send to the reader's terminal) become
/// U+FFFD.
fn printable(line: &str) -> String {
    line.chars()
        .map(|c| {
            if c.is_control() && c != '\t' {
                '\u{fffd}'
            } else {
                c
            }
        })
        .collect()
}

fn yaml_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

/// The last `lines` lines of `text`.
fn tail(text: &str, lines: usize) -> &str {
    let body = text.strip_suffix('\n').unwrap_or(text);
    let mut idx = body.len();
    for _ in 0..lines {
        match body[..idx].rfind('\n') {
            Some(i) => idx = i,
            None => return text,
        }
    }
    &text[idx + 1..]
}

/// A JUnit XML document of one suite.
pub fn junit(suite: &str, results: &[CheckResult], total: Duration) -> String {
    let failures = results
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Failed { .. } | Outcome::TimedOut { .. }))
        .count();
    let errors = results
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Error { .. }))
        .count();
    let mut s = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        s,
        "<testsuites tests=\"{}\" failures=\"{failures}\" errors=\"{errors}\" time=\"{:.3}\">",
        results.len(),
        total.as_secs_f64()
    );
    let _ = writeln!(
        s,
        "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failures}\" errors=\"{errors}\" time=\"{:.3}\">",
        xml(suite),
        results.len(),
        total.as_secs_f64()
    );
    for r in results {
        let _ = write!(
            s,
            "    <testcase name=\"{}\" classname=\"{}\" time=\"{:.3}\">",
            xml(&r.name),
            xml(suite),
            r.duration.as_secs_f64()
        );
        let why = r.why().unwrap_or_default();
        match &r.outcome {
            Outcome::Passed => {}
            Outcome::Failed { .. } | Outcome::TimedOut { .. } => {
                let _ = write!(s, "\n      <failure message=\"{}\"/>", xml(&why));
            }
            Outcome::Error { .. } => {
                let _ = write!(s, "\n      <error message=\"{}\"/>", xml(&why));
            }
        }
        let _ = write!(
            s,
            "\n      <system-out>{}</system-out>\n    </testcase>\n",
            xml(&r.output)
        );
    }
    s.push_str("  </testsuite>\n</testsuites>\n");
    s
}

/// What a JUnit document says as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub tests: usize,
    /// Failures and errors.
    pub failed: usize,
}

/// Read a JUnit XML result (any tool's) for promotion: how many test cases,
/// and how many failed or erred, counted from both the `<failure>` and
/// `<error>` elements and the suites' `failures`/`errors` attributes,
/// whichever says more (fail closed). A document with no test case is an
/// error: it proves nothing.
pub fn junit_verdict(xml: &str) -> anyhow::Result<Verdict> {
    let elements = |name: &str| {
        let open = format!("<{name}");
        xml.match_indices(&open)
            .filter(|(i, _)| {
                matches!(
                    xml.as_bytes().get(i + open.len()),
                    Some(b' ' | b'>' | b'/' | b'\t' | b'\n' | b'\r')
                )
            })
            .count()
    };
    let attribute_total = |name: &str| -> usize {
        let key = format!(" {name}=\"");
        xml.match_indices(&key)
            .filter_map(|(i, _)| {
                let rest = &xml[i + key.len()..];
                rest[..rest.find('"')?].trim().parse::<usize>().ok()
            })
            .max()
            .unwrap_or(0)
    };
    if !xml.contains("<testsuite") {
        anyhow::bail!("not a JUnit XML document (no <testsuite> element)");
    }
    let tests = elements("testcase");
    if tests == 0 {
        anyhow::bail!("the JUnit result holds no test case: it proves nothing");
    }
    let failed = (elements("failure") + elements("error"))
        .max(attribute_total("failures") + attribute_total("errors"));
    Ok(Verdict { tests, failed })
}

/// Text for XML content and attributes: the five entities, and control
/// characters XML 1.0 cannot carry dropped.
fn xml(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\n' | '\t' | '\r' => out.push(c),
            c if (c as u32) < 0x20 || c == '\u{fffe}' || c == '\u{ffff}' => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(name: &str, outcome: Outcome) -> CheckResult {
        CheckResult {
            name: name.into(),
            outcome,
            duration: Duration::from_millis(1500),
            reboots: 0,
            output: "line 1\n<b>&\u{1b}\n".into(),
            artifacts: None,
        }
    }

    #[test]
    fn tap_points() {
        assert_eq!(tap_plan(2), "TAP version 14\n1..2\n");
        assert_eq!(
            tap_line(1, &result("ok-check", Outcome::Passed)),
            "ok 1 - ok-check\n"
        );
        let failed = tap_line(2, &result("bad #1", Outcome::Failed { exit: 3 }));
        assert!(
            failed.starts_with("not ok 2 - bad \\#1\n  ---\n"),
            "{failed}"
        );
        assert!(
            failed.contains("message: \"exited with status 3\""),
            "{failed}"
        );
        assert!(
            failed.contains("    line 1\n") && failed.ends_with("  ...\n"),
            "{failed}"
        );
        assert!(
            failed.contains("    <b>&\u{fffd}\n"),
            "no escape reaches a terminal: {failed}"
        );
    }

    #[test]
    fn junit_counts_and_escapes() {
        let doc = junit(
            "host test boot img.raw",
            &[
                result("a", Outcome::Passed),
                result(
                    "b",
                    Outcome::TimedOut {
                        after: Duration::from_secs(5),
                    },
                ),
                result(
                    "c\"",
                    Outcome::Error {
                        why: "gone <away>".into(),
                    },
                ),
            ],
            Duration::from_secs(10),
        );
        assert!(
            doc.contains("<testsuites tests=\"3\" failures=\"1\" errors=\"1\""),
            "{doc}"
        );
        assert!(
            doc.contains("<failure message=\"timed out after 5 s\"/>"),
            "{doc}"
        );
        assert!(
            doc.contains("<error message=\"gone &lt;away&gt;\"/>"),
            "{doc}"
        );
        assert!(doc.contains("name=\"c&quot;\""), "{doc}");
        assert!(
            doc.contains("&lt;b&gt;&amp;\n"),
            "control characters dropped: {doc}"
        );
    }

    #[test]
    fn verdicts_fail_closed() {
        let ok = junit("s", &[result("a", Outcome::Passed)], Duration::from_secs(1));
        assert_eq!(
            junit_verdict(&ok).unwrap(),
            Verdict {
                tests: 1,
                failed: 0
            }
        );
        let bad = junit(
            "s",
            &[
                result("a", Outcome::Passed),
                result("b", Outcome::Failed { exit: 1 }),
            ],
            Duration::from_secs(1),
        );
        assert_eq!(
            junit_verdict(&bad).unwrap(),
            Verdict {
                tests: 2,
                failed: 1
            }
        );
        // Another tool's document: attributes alone, or elements alone.
        let attr = r#"<testsuites><testsuite name="x" tests="2" errors="1"><testcase name="a"/><testcase name="b"/></testsuite></testsuites>"#;
        assert_eq!(junit_verdict(attr).unwrap().failed, 1);
        let elem = "<testsuite><testcase name=\"a\"><error/></testcase></testsuite>";
        assert_eq!(junit_verdict(elem).unwrap().failed, 1);
        // A test named like an element is escaped, and does not count.
        let named = "<testsuite><testcase name=\"&lt;failure\"></testcase></testsuite>";
        assert_eq!(
            junit_verdict(named).unwrap(),
            Verdict {
                tests: 1,
                failed: 0
            }
        );
        assert!(junit_verdict("<testsuite></testsuite>").is_err());
        assert!(junit_verdict("TAP version 14\n1..1\nok 1\n").is_err());
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 1), "c\n");
        assert_eq!(tail("a\nb\nc", 2), "b\nc");
        assert_eq!(tail("one", 3), "one");
    }
}
