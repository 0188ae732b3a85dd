//! How `host app pull` shows its downloads: a bar per blob on a terminal,
//! a line per blob otherwise (CI logs).

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::Duration;

use cairn_oci::registry::PullProgress;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

pub struct PullBars {
    multi: Option<MultiProgress>,
    bars: Mutex<HashMap<String, ProgressBar>>,
}

fn short(digest: &str) -> &str {
    let hex = digest.trim_start_matches("sha256:");
    &hex[..12.min(hex.len())]
}

impl PullBars {
    pub fn new() -> Self {
        Self {
            multi: std::io::stderr().is_terminal().then(MultiProgress::new),
            bars: Mutex::new(HashMap::new()),
        }
    }

    pub fn finish(&self) {
        if let Some(m) = &self.multi {
            let _ = m.clear();
        }
    }
}

impl PullProgress for PullBars {
    fn resolved(&self, manifest: &str, blobs: usize, bytes: u64) {
        let line = format!("manifest {manifest}: {blobs} blobs, {bytes} bytes");
        match &self.multi {
            Some(m) => {
                let _ = m.println(line);
            }
            None => eprintln!("{line}"),
        }
    }

    fn blob_started(&self, digest: &str, size: u64) {
        let Some(m) = &self.multi else {
            eprintln!("fetching {} ({size} bytes)", short(digest));
            return;
        };
        let bar = m.add(ProgressBar::new(size));
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(short(digest).to_string());
        self.bars.lock().unwrap().insert(digest.to_string(), bar);
    }

    fn blob_advanced(&self, digest: &str, bytes: u64) {
        if let Some(bar) = self.bars.lock().unwrap().get(digest) {
            bar.inc(bytes);
        }
    }

    fn blob_finished(&self, digest: &str) {
        match self.bars.lock().unwrap().remove(digest) {
            Some(bar) => bar.finish(),
            None => eprintln!("fetched {}", short(digest)),
        }
    }

    fn retrying(&self, what: &str, attempt: u32, wait: Duration, error: &anyhow::Error) {
        let line = format!(
            "{what}: {error:#}; attempt {attempt} in {} s",
            wait.as_secs()
        );
        match &self.multi {
            Some(m) => {
                let _ = m.println(line);
            }
            None => eprintln!("{line}"),
        }
    }
}
