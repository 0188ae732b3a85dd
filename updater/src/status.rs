//! `host status`: the deployments of a sysroot as data first (serde structs,
//! schema in docs/status-v1.schema.json), rendered second (text or JSON).

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::commit::{format_timestamp, CommitInfo};
use crate::sysroot::SysrootTarget;
use cairn_contracts::packages::PackageDiff;

/// Value of `apiVersion`; bumped only for incompatible changes of the JSON.
pub const API_VERSION: &str = "cairn.status/v1";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub api_version: String,
    /// The sysroot directory that was read.
    pub sysroot: String,
    /// True when this sysroot is the running system.
    pub is_booted: bool,
    /// Index of the deployment package diffs are computed against: the
    /// booted one, or on a non-booted sysroot the default (index 0).
    pub diff_base_index: Option<u32>,
    pub deployments: Vec<DeploymentStatus>,
    /// The update agent's state (`host agent`), if it ever ran here.
    #[serde(default)]
    pub agent: Option<AgentSummary>,
    /// The last health check (`host health check`), if any ran here.
    #[serde(default)]
    pub health: Option<HealthSummary>,
    /// What first-boot provisioning did here (null before it ran).
    #[serde(default)]
    pub provision: Option<crate::provision::apply::ProvisionState>,
    /// GRUB's boot counter (null on other bootloaders).
    #[serde(default)]
    pub boot_counter: Option<crate::bootloader::BootCounter>,
    /// Whether the remote the current deployment follows verifies what it
    /// installs: signed commits and a signed summary.
    #[serde(default)]
    pub verified: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentSummary {
    pub policy: String,
    /// idle, checking, up-to-date, update-available, staged, waiting-for-window, …
    pub state: String,
    /// The update the state is about (staged, waiting, rebooting into).
    pub update: Option<String>,
    pub last_check: Option<String>,
    pub last_result: Option<String>,
    pub next_step: Option<String>,
    pub next_window: Option<String>,
    pub holds_fleet_lock: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthSummary {
    pub last_checked: Option<String>,
    pub last_result: Option<String>,
    pub last_healthy: Option<String>,
    pub checked_at: Option<String>,
    /// Commits that failed a required check here (never staged again), with why.
    pub bad_commits: Vec<BadCommitSummary>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BadCommitSummary {
    pub checksum: String,
    pub reason: String,
    pub at: String,
}

/// Where the node's /var is for `target`: the running system's, or the
/// stateroot's on a mounted disk.
fn var_dir(target: &SysrootTarget, is_booted: bool) -> std::path::PathBuf {
    if is_booted && target.path() == std::path::Path::new("/") {
        std::path::PathBuf::from("/var")
    } else {
        target
            .path()
            .join(format!("ostree/deploy/{}/var", crate::sysroot::STATEROOT))
    }
}

fn health_summary(var: &std::path::Path) -> Option<HealthSummary> {
    let path = var.join("lib/cairn/health/state.json");
    if !path.exists() {
        return None;
    }
    let h = crate::health::HealthState::load(&path);
    let time =
        |t: chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    Some(HealthSummary {
        last_checked: h.last_checked,
        last_result: h.last_result,
        last_healthy: h.last_healthy,
        checked_at: h.checked_at.map(time),
        bad_commits: h
            .bad_commits
            .into_iter()
            .map(|b| BadCommitSummary {
                checksum: b.checksum,
                reason: b.reason,
                at: time(b.at),
            })
            .collect(),
    })
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentStatus {
    /// Position in boot order: 0 boots next.
    pub index: u32,
    pub stateroot: String,
    pub checksum: String,
    /// Deployment serial: the `.N` after the checksum in `ostree admin status`.
    pub serial: i32,
    pub version: Option<String>,
    /// Commit timestamp, RFC 3339 UTC.
    pub timestamp: String,
    pub origin: Option<Origin>,
    pub booted: bool,
    pub staged: bool,
    pub pending: bool,
    pub rollback: bool,
    pub pinned: bool,
    pub kernel_args: Vec<String>,
    /// Packages (`cairn.packages`), only with `-v`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packages: Option<Vec<String>>,
    /// Package diff against the diff base; absent for the base itself or when
    /// a commit carries no package list.
    pub package_diff: Option<PackageDiff>,
    /// Who signed the commit, as the deployment's remote sees it; null for
    /// an unsigned commit.
    pub signature: Option<SignatureStatus>,
}

/// The first signature of a commit (the good one, if any is good).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SignatureStatus {
    /// Fingerprint of the primary key that signed (of the signing key when
    /// the key is unknown here).
    pub fingerprint: String,
    /// The key's user id, when the key is known here.
    pub user: Option<String>,
    /// A good signature by a key the deployment's remote trusts.
    pub trusted: bool,
}

/// libostree's detached metadata key for GPG signatures.
const GPG_SIGNATURES_KEY: &str = "ostree.gpgsigs";

/// Verify `checksum` against the keys `remote` trusts. Unsigned commits are
/// answered without running gpg (status is read often).
fn signature_of(
    repo: &ostree::Repo,
    checksum: &str,
    remote: Option<&str>,
) -> Option<SignatureStatus> {
    let detached = repo
        .read_commit_detached_metadata(checksum, gio::Cancellable::NONE)
        .ok()
        .flatten()?;
    let dict = glib::VariantDict::new(Some(&detached));
    if !dict.contains(GPG_SIGNATURES_KEY) {
        return None;
    }
    // Without a remote, the keys of no remote: the signature shows, untrusted.
    let result = repo
        .verify_commit_for_remote(checksum, remote.unwrap_or(""), gio::Cancellable::NONE)
        .or_else(|_| {
            repo.verify_commit_ext(
                checksum,
                None::<&gio::File>,
                None::<&gio::File>,
                gio::Cancellable::NONE,
            )
        });
    let result = match result {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!("verifying commit {checksum}: {e}");
            return Some(SignatureStatus {
                fingerprint: String::new(),
                user: None,
                trusted: false,
            });
        }
    };
    let n = result.count_all();
    let pick = (0..n)
        .find(|&i| signature_attrs(&result.all(i)).2)
        .or((n > 0).then_some(0))?;
    let (fingerprint, user, valid) = signature_attrs(&result.all(pick));
    Some(SignatureStatus {
        fingerprint,
        user,
        trusted: valid,
    })
}

/// (fingerprint, user name, valid) of one signature's attributes, in
/// OstreeGpgSignatureAttr order: 0 valid, 4 key missing, 5 fingerprint,
/// 10 user name, 12 primary key fingerprint.
fn signature_attrs(v: &glib::Variant) -> (String, Option<String>, bool) {
    let child = |i: usize| v.try_child_value(i);
    let string = |i: usize| {
        child(i)
            .and_then(|c| c.get::<String>())
            .filter(|s| !s.is_empty())
    };
    let flag = |i: usize| child(i).and_then(|c| c.get::<bool>()).unwrap_or(false);
    let fingerprint = string(12).or_else(|| string(5)).unwrap_or_default();
    let valid = flag(0) && !flag(4);
    (fingerprint, string(10), valid)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Origin {
    /// `remote:ref` as written in the origin file.
    pub refspec: String,
    pub remote: Option<String>,
    #[serde(rename = "ref")]
    pub ref_: String,
    /// Set when `host deploy` pinned the origin to one commit of the ref.
    pub override_commit: Option<String>,
}

impl Origin {
    pub fn from_keyfile(kf: &glib::KeyFile) -> Option<Self> {
        let refspec = kf.string("origin", "refspec").ok()?.to_string();
        let (remote, ref_) = split_refspec(&refspec);
        let override_commit = kf
            .string("origin", "override-commit")
            .ok()
            .map(|s| s.to_string());
        Some(Origin {
            refspec,
            remote,
            ref_,
            override_commit,
        })
    }
}

/// The remote a deployment follows, from its origin.
fn origin_remote(d: &ostree::Deployment) -> Option<String> {
    d.origin()
        .as_ref()
        .and_then(Origin::from_keyfile)
        .and_then(|o| o.remote)
}

pub fn split_refspec(refspec: &str) -> (Option<String>, String) {
    match refspec.split_once(':') {
        Some((remote, r)) => (Some(remote.to_string()), r.to_string()),
        None => (None, refspec.to_string()),
    }
}

/// The roles of the deployments in a loaded sysroot, computed once.
pub(crate) struct Roles {
    pub deployments: Vec<ostree::Deployment>,
    /// Booted, or on a non-booted sysroot the default deployment.
    pub current: Option<usize>,
    pub booted: Option<usize>,
    pub staged: Option<usize>,
}

impl Roles {
    pub fn of(sysroot: &ostree::Sysroot) -> Self {
        let deployments = sysroot.deployments();
        let booted = sysroot.booted_deployment();
        let staged = deployments.iter().position(|d| d.is_staged());
        Self::from_parts(deployments, booted.as_ref(), staged)
    }

    /// From a deployment list, the booted deployment and the staged index.
    pub fn from_parts(
        deployments: Vec<ostree::Deployment>,
        booted: Option<&ostree::Deployment>,
        staged: Option<usize>,
    ) -> Self {
        let booted = booted.and_then(|b| deployments.iter().position(|d| d.equal(b)));
        let current = booted.or(if deployments.is_empty() {
            None
        } else {
            Some(0)
        });
        Roles {
            deployments,
            current,
            booted,
            staged,
        }
    }

    /// Deployments before the booted one: they boot next (staged or written).
    pub fn is_pending(&self, i: usize) -> bool {
        matches!(self.booted, Some(b) if i < b)
    }

    /// The first deployment after the current one, of the same stateroot.
    pub fn rollback(&self) -> Option<usize> {
        let cur = self.current?;
        let os = self.deployments[cur].osname();
        (cur + 1..self.deployments.len()).find(|&i| self.deployments[i].osname() == os)
    }
}

/// Read the status of a sysroot. `verbose` adds package lists; `agent`
/// reads the update agent's summary from the node's `/var` (the agent's
/// record is the agent's to read: see `crate::read_status`).
pub fn read_status_with(
    target: &SysrootTarget,
    verbose: bool,
    agent: impl FnOnce(&std::path::Path) -> Option<AgentSummary>,
) -> Result<Status> {
    let sysroot = target.open()?;
    let repo = sysroot.repo();
    let roles = Roles::of(&sysroot);
    let rollback = roles.rollback();
    let commits = roles
        .deployments
        .iter()
        .map(|d| CommitInfo::load(&repo, &d.csum()))
        .collect::<Result<Vec<_>>>()?;
    let base = roles.current.map(|i| &commits[i]);
    let mut deployments = Vec::new();
    for (i, d) in roles.deployments.iter().enumerate() {
        let c = &commits[i];
        let kernel_args = d
            .bootconfig()
            .and_then(|b| b.get("options"))
            .map(|o| o.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default();
        let package_diff = match base {
            Some(b) if Some(i) != roles.current && b.has_packages && c.has_packages => {
                Some(PackageDiff::between(&b.packages, &c.packages))
            }
            _ => None,
        };
        deployments.push(DeploymentStatus {
            index: i as u32,
            stateroot: d.osname().to_string(),
            checksum: d.csum().to_string(),
            serial: d.deployserial(),
            version: c.version.clone(),
            timestamp: format_timestamp(c.timestamp),
            origin: d.origin().as_ref().and_then(Origin::from_keyfile),
            booted: roles.booted == Some(i),
            staged: d.is_staged(),
            pending: roles.is_pending(i),
            rollback: rollback == Some(i),
            pinned: d.is_pinned(),
            kernel_args,
            packages: verbose.then(|| c.packages.clone()),
            package_diff,
            signature: signature_of(&repo, &d.csum(), origin_remote(d).as_deref()),
        });
    }
    let verified = roles
        .current
        .and_then(|i| deployments[i].origin.as_ref())
        .and_then(|o| o.remote.as_deref())
        .is_some_and(|remote| remote_verifies(&repo, remote));
    let var = var_dir(target, roles.booted.is_some());
    Ok(Status {
        api_version: API_VERSION.to_string(),
        sysroot: target.path().display().to_string(),
        is_booted: roles.booted.is_some(),
        diff_base_index: roles.current.map(|i| i as u32),
        deployments,
        agent: agent(&var),
        health: health_summary(&var),
        provision: crate::provision::apply::ProvisionState::load(&var),
        boot_counter: crate::bootloader::read(target.path(), &repo).unwrap_or_else(|err| {
            tracing::warn!("{err:#}");
            None
        }),
        verified,
    })
}

/// Both halves of verification on: a commit and the summary that names it
/// must be signed by a trusted key. A remote that is missing verifies nothing.
fn remote_verifies(repo: &ostree::Repo, remote: &str) -> bool {
    repo.remote_get_gpg_verify(remote).unwrap_or(false)
        && repo.remote_get_gpg_verify_summary(remote).unwrap_or(false)
}

impl Status {
    /// Keep only the booted deployment (the default one on a non-booted sysroot).
    pub fn only_booted(mut self) -> Self {
        let base = self.diff_base_index;
        self.deployments.retain(|d| Some(d.index) == base);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Status {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn json_round_trips_with_stable_keys() {
        let status = fixture("status-booted-staged.json");
        let out = serde_json::to_vec_pretty(&status).unwrap();
        let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(value["apiVersion"], API_VERSION);
        let d0 = &value["deployments"][0];
        for key in [
            "index",
            "stateroot",
            "checksum",
            "serial",
            "version",
            "timestamp",
            "origin",
            "booted",
            "staged",
            "pending",
            "rollback",
            "pinned",
            "kernelArgs",
            "packageDiff",
        ] {
            assert!(d0.get(key).is_some(), "key {key} missing from {d0}");
        }
        assert_eq!(d0["origin"]["ref"], "cairn/bookworm/x86_64/container-host");
        let back: Status = serde_json::from_value(value).unwrap();
        assert_eq!(back, status);
    }

    /// docs/status-v1.schema.json names exactly the keys the JSON has.
    #[test]
    fn published_schema_matches_the_serialized_keys() {
        let path = format!(
            "{}/../docs/status-v1.schema.json",
            env!("CARGO_MANIFEST_DIR")
        );
        let schema: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(schema["$id"], API_VERSION);
        let keys = |v: &serde_json::Value| -> Vec<String> {
            let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        let value = serde_json::to_value(fixture("status-booted-staged.json")).unwrap();
        assert_eq!(keys(&schema["properties"]), keys(&value));
        let mut required: Vec<String> = schema["required"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k.as_str().unwrap().to_string())
            .collect();
        required.sort();
        assert_eq!(required, keys(&value));
        let d = &schema["$defs"]["deployment"];
        // Deployment 1 carries the optional `packages` (written with -v).
        assert_eq!(keys(&d["properties"]), keys(&value["deployments"][1]));
        for deployment in value["deployments"].as_array().unwrap() {
            for req in d["required"].as_array().unwrap() {
                let req = req.as_str().unwrap();
                assert!(deployment.get(req).is_some(), "required key {req} missing");
            }
        }
        let origin = &d["properties"]["origin"]["oneOf"][1]["properties"];
        assert_eq!(keys(origin), keys(&value["deployments"][0]["origin"]));
        let diff = &d["properties"]["packageDiff"]["oneOf"][1]["properties"];
        assert_eq!(keys(diff), keys(&value["deployments"][0]["packageDiff"]));
    }

    #[test]
    fn booted_filter_keeps_the_base_only() {
        let status = fixture("status-booted-staged.json").only_booted();
        assert_eq!(status.deployments.len(), 1);
        assert!(status.deployments[0].booted);
    }

    #[test]
    fn refspec_splits_at_the_first_colon() {
        assert_eq!(
            split_refspec("cairn:cairn/bookworm/x86_64/container-host"),
            (
                Some("cairn".to_string()),
                "cairn/bookworm/x86_64/container-host".to_string()
            )
        );
        assert_eq!(split_refspec("local/ref"), (None, "local/ref".to_string()));
    }
}
