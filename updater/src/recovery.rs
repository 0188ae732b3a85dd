//! What a node does about a boot that went wrong, above the operations:
//! when GRUB ran out of attempts on a new deployment and booted the
//! previous one, the new commit is recorded as bad (never staged again)
//! and the booted deployment becomes the default again; a healthy boot of
//! the default deployment is proven, which stops the counting. The boot
//! counter itself is `bootloader.rs`; `host health check` runs both.

use std::path::Path;

use anyhow::Result;
use cairn_contracts::grub::BOOT_ATTEMPTS;

use crate::bootloader::{disarm, read, CounterState};
use crate::health::{BadCommit, HealthState};
use crate::report::{FallbackReport, Observer};
use crate::sysroot::SysrootTarget;

/// Why a commit is recorded as bad after GRUB fell back from it.
pub fn fallback_reason() -> String {
    format!(
        "did not boot to a healthy user space in {BOOT_ATTEMPTS} attempts (GRUB booted the previous deployment)"
    )
}

/// Run by `host health check` before the checks: when GRUB ran out of
/// attempts and booted the previous deployment, record the default
/// (never-healthy) commit as bad, make the booted deployment the default
/// again (no reboot needed) and clear the counter. Returns what it did, if
/// anything.
pub fn recover_from_fallback(
    target: &SysrootTarget,
    state_file: &Path,
    obs: &mut dyn Observer,
) -> Result<Option<FallbackReport>> {
    let sysroot = target.open()?;
    let repo = sysroot.repo();
    let Some(counter) = read(target.path(), &repo)? else {
        return Ok(None);
    };
    if counter.state != CounterState::FellBack {
        return Ok(None);
    }
    let deployments = sysroot.deployments();
    let booted = sysroot.booted_deployment();
    let default = deployments.first();
    let staged = deployments.iter().any(|d| d.is_staged());
    let (Some(booted), Some(default)) = (booted, default) else {
        return Ok(None);
    };
    if booted.equal(default) || staged {
        // GRUB had nothing to fall back to, or a new deployment is already
        // staged: nothing to undo, just stop counting.
        disarm(target.path(), &repo)?;
        return Ok(None);
    }
    let bad = default.csum().to_string();
    let reason = fallback_reason();
    let mut state = HealthState::load(state_file);
    if !state.is_bad(&bad) {
        state.bad_commits.push(BadCommit {
            checksum: bad.clone(),
            reason: reason.clone(),
            at: chrono::Utc::now(),
        });
    }
    state.save(state_file)?;
    drop(sysroot);
    // The booted deployment is not first: a rollback puts it first again
    // (and disarms the counter).
    let rollback = crate::ops::rollback(target, obs)?;
    let sysroot = target.open()?;
    disarm(target.path(), &sysroot.repo())?;
    Ok(Some(FallbackReport {
        bad,
        reason,
        rollback,
    }))
}

/// Run by `host health check` after a healthy verdict: the booted deployment
/// is the default one and healthy, so it is proven.
pub fn prove_booted(target: &SysrootTarget) -> Result<bool> {
    let sysroot = target.open()?;
    let repo = sysroot.repo();
    let Some(counter) = read(target.path(), &repo)? else {
        return Ok(false);
    };
    let booted_is_default = match (sysroot.booted_deployment(), sysroot.deployments().first()) {
        (Some(b), Some(d)) => b.equal(d),
        _ => false,
    };
    if counter.state == CounterState::Counting && booted_is_default {
        disarm(target.path(), &repo)?;
        return Ok(true);
    }
    Ok(false)
}
