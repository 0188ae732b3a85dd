//! Pulling commits from a remote into the sysroot repo, with progress.

use std::cell::RefCell;
use std::io::IsTerminal;
use std::rc::Rc;

use anyhow::{Context, Result};
use ostree::gio;
use ostree::glib;
use ostree::prelude::*;

/// What a pull cost, as libostree's progress reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PullStats {
    pub bytes_transferred: u64,
    pub objects_fetched: u32,
    pub metadata_fetched: u32,
    /// Static deltas used (superblocks) and their parts (inline ones included).
    pub delta_superblocks: u32,
    pub delta_parts: u32,
}

impl PullStats {
    pub fn describe(&self) -> String {
        if self.objects_fetched == 0 && self.bytes_transferred == 0 && self.delta_superblocks == 0 {
            return "nothing transferred over the network (local repo or already here)".to_string();
        }
        let mut s = format!(
            "fetched {} objects ({} metadata), {}",
            self.objects_fetched,
            self.metadata_fetched,
            human_bytes(self.bytes_transferred)
        );
        if self.delta_superblocks > 0 {
            s.push_str(&format!(
                " via {} static delta(s) of {} part(s)",
                self.delta_superblocks, self.delta_parts
            ));
        }
        s
    }
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// What to pull.
pub struct PullRequest<'a> {
    pub remote: &'a str,
    pub ref_: &'a str,
    /// Pull this commit of the ref instead of its head.
    pub commit: Option<&'a str>,
    /// Commit objects only (no trees or files): enough to read metadata.
    pub commit_only: bool,
    /// History depth: 0 the commit only, -1 all ancestors.
    pub depth: i32,
}

fn uint_of(p: &ostree::AsyncProgress, key: &str) -> u32 {
    p.variant(key).and_then(|v| v.get::<u32>()).unwrap_or(0)
}

fn uint64_of(p: &ostree::AsyncProgress, key: &str) -> u64 {
    p.variant(key).and_then(|v| v.get::<u64>()).unwrap_or(0)
}

/// Pull into `repo`; progress goes to a bar on a terminal, plain lines otherwise
/// (only when `show_progress`).
pub fn pull(repo: &ostree::Repo, req: &PullRequest, show_progress: bool) -> Result<PullStats> {
    let options = glib::VariantDict::new(None);
    options.insert_value("refs", &vec![req.ref_.to_string()].to_variant());
    if let Some(c) = req.commit {
        options.insert_value("override-commit-ids", &vec![c.to_string()].to_variant());
    }
    // Verify every object, also from file:// remotes (libostree trusts local
    // repos otherwise): a node never trusts the medium its update comes on.
    let mut flags = ostree::RepoPullFlags::UNTRUSTED;
    if req.commit_only {
        flags |= ostree::RepoPullFlags::COMMIT_ONLY;
    }
    options.insert_value("flags", &(flags.bits() as i32).to_variant());
    if req.depth != 0 {
        options.insert_value("depth", &req.depth.to_variant());
    }
    let options = options.end();

    let progress = ostree::AsyncProgress::new();
    let bar: Rc<RefCell<Option<indicatif::ProgressBar>>> = Rc::new(RefCell::new(None));
    if show_progress {
        let tty = std::io::stderr().is_terminal();
        let bar = bar.clone();
        let last_line = RefCell::new(std::time::Instant::now());
        progress.connect_changed(move |p| {
            let fetched = uint_of(p, "fetched");
            let requested = uint_of(p, "requested");
            let bytes = uint64_of(p, "bytes-transferred");
            let msg = format!(
                "receiving objects: {fetched}/{requested}, {}",
                human_bytes(bytes)
            );
            if tty {
                let mut slot = bar.borrow_mut();
                let b = slot.get_or_insert_with(|| {
                    let b = indicatif::ProgressBar::new(requested as u64);
                    b.set_style(
                        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
                            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                    );
                    b
                });
                b.set_length(requested as u64);
                b.set_position(fetched as u64);
                b.set_message(human_bytes(bytes));
            } else {
                let mut last = last_line.borrow_mut();
                if last.elapsed().as_secs() >= 2 {
                    eprintln!("{msg}");
                    *last = std::time::Instant::now();
                }
            }
        });
    }
    let remote_url = repo
        .remote_get_url(req.remote)
        .map(|u| u.to_string())
        .unwrap_or_else(|_| "(unknown url)".to_string());
    let what = match req.commit {
        Some(c) => format!("commit {c} of {}:{}", req.remote, req.ref_),
        None => format!("{}:{}", req.remote, req.ref_),
    };
    let result = repo.pull_with_options(
        req.remote,
        &options,
        Some(&progress),
        gio::Cancellable::NONE,
    );
    progress.finish();
    if let Some(b) = bar.borrow_mut().take() {
        b.finish_and_clear();
    }
    result.with_context(|| format!("pulling {what} from {remote_url}"))?;
    Ok(PullStats {
        bytes_transferred: uint64_of(&progress, "bytes-transferred"),
        objects_fetched: uint_of(&progress, "fetched"),
        metadata_fetched: uint_of(&progress, "metadata-fetched"),
        delta_superblocks: uint_of(&progress, "total-delta-superblocks"),
        delta_parts: uint_of(&progress, "total-delta-parts"),
    })
}
