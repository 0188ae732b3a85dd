//! Progress of long steps: a spinner on a terminal, plain lines otherwise
//! (CI logs), nothing with `quiet`.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

#[derive(Debug, Clone, Copy)]
pub struct Progress {
    quiet: bool,
    terminal: bool,
}

impl Progress {
    pub fn new(quiet: bool) -> Progress {
        Progress {
            quiet,
            terminal: std::io::stderr().is_terminal(),
        }
    }

    /// No output at all (library callers and tests).
    pub fn silent() -> Progress {
        Progress {
            quiet: true,
            terminal: false,
        }
    }

    pub fn step(&self, name: &str) -> Step {
        let bar = if self.quiet {
            None
        } else if self.terminal {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} {prefix} [{elapsed}] {wide_msg}")
                    .expect("valid template"),
            );
            bar.set_prefix(name.to_string());
            bar.enable_steady_tick(Duration::from_millis(120));
            Some(bar)
        } else {
            eprintln!("==> {name}");
            None
        };
        Step {
            name: name.to_string(),
            bar,
            quiet: self.quiet,
            started: Instant::now(),
        }
    }

    /// A one-off informational line.
    pub fn note(&self, line: &str) {
        if !self.quiet {
            eprintln!("{line}");
        }
    }
}

pub struct Step {
    name: String,
    bar: Option<ProgressBar>,
    quiet: bool,
    started: Instant,
}

impl Step {
    /// Latest activity of the step (shown on the spinner; not logged to plain output).
    pub fn message(&self, msg: &str) {
        if let Some(bar) = &self.bar {
            bar.set_message(msg.to_string());
        }
        tracing::debug!("{}: {msg}", self.name);
    }

    pub fn finish(self, summary: &str) {
        let secs = self.started.elapsed().as_secs_f64();
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        if !self.quiet {
            if summary.is_empty() {
                eprintln!("    {} done in {secs:.1}s", self.name);
            } else {
                eprintln!("    {} done in {secs:.1}s: {summary}", self.name);
            }
        }
    }
}

impl Drop for Step {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
