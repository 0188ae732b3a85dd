//! Package lists from commit metadata (`cairn.packages`: sorted `name=version`
//! strings) and the diff between two of them, with Debian version ordering.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One package whose version differs between two trees.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PackageChange {
    pub name: String,
    pub from: String,
    pub to: String,
}

/// A named package and its version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Package {
    pub name: String,
    pub version: String,
}

/// What changes from one package list (`from`) to another (`to`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PackageDiff {
    pub upgraded: Vec<PackageChange>,
    pub downgraded: Vec<PackageChange>,
    pub added: Vec<Package>,
    pub removed: Vec<Package>,
}

impl PackageDiff {
    /// Diff two `name=version` lists; entries without `=` are ignored.
    pub fn between(from: &[String], to: &[String]) -> Self {
        let a = to_map(from);
        let b = to_map(to);
        let mut diff = PackageDiff::default();
        for (name, old) in &a {
            match b.get(name) {
                None => diff.removed.push(Package {
                    name: name.to_string(),
                    version: old.to_string(),
                }),
                Some(new) => {
                    let change = PackageChange {
                        name: name.to_string(),
                        from: old.to_string(),
                        to: new.to_string(),
                    };
                    match compare_versions(old, new) {
                        Ordering::Less => diff.upgraded.push(change),
                        Ordering::Greater => diff.downgraded.push(change),
                        Ordering::Equal => {}
                    }
                }
            }
        }
        for (name, new) in &b {
            if !a.contains_key(name) {
                diff.added.push(Package {
                    name: name.to_string(),
                    version: new.to_string(),
                });
            }
        }
        diff
    }

    pub fn is_empty(&self) -> bool {
        self.upgraded.is_empty()
            && self.downgraded.is_empty()
            && self.added.is_empty()
            && self.removed.is_empty()
    }

    /// "3 upgraded, 1 added", or "no package changes".
    pub fn summary(&self) -> String {
        let parts: Vec<String> = [
            (self.upgraded.len(), "upgraded"),
            (self.downgraded.len(), "downgraded"),
            (self.removed.len(), "removed"),
            (self.added.len(), "added"),
        ]
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, what)| format!("{n} {what}"))
        .collect();
        if parts.is_empty() {
            "no package changes".to_string()
        } else {
            parts.join(", ")
        }
    }

    /// One line per change, the way `rpm-ostree db diff` lists them.
    pub fn lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        for c in &self.upgraded {
            out.push(format!("upgraded   {} {} -> {}", c.name, c.from, c.to));
        }
        for c in &self.downgraded {
            out.push(format!("downgraded {} {} -> {}", c.name, c.from, c.to));
        }
        for p in &self.removed {
            out.push(format!("removed    {} {}", p.name, p.version));
        }
        for p in &self.added {
            out.push(format!("added      {} {}", p.name, p.version));
        }
        out
    }
}

fn to_map(list: &[String]) -> BTreeMap<&str, &str> {
    list.iter()
        .filter_map(|entry| entry.split_once('='))
        .collect()
}

/// Debian version ordering (deb-version(7)); one implementation for the
/// whole project, next to the code that writes `cairn.packages`.
pub use cairn_builder::diff::compare_versions;

#[cfg(test)]
mod tests {
    use super::*;

    fn list(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn debian_version_order() {
        use Ordering::*;
        let cases = [
            ("1.0", "1.0", Equal),
            ("1.0", "1.1", Less),
            ("1.0~rc1", "1.0", Less),
            ("1.0", "1.0+deb12u1", Less),
            ("252.38-1~deb12u1", "252.38-1", Less),
            ("252.38-1~deb12u1", "252.39-1~deb12u1", Less),
            ("1:0.9", "2.0", Greater),
            ("1.10", "1.9", Greater),
            ("1.01", "1.1", Equal),
            ("2.36-9+deb12u9", "2.36-9+deb12u10", Less),
            ("1.0a", "1.0", Greater),
            ("1.0-1", "1.0", Greater),
        ];
        for (a, b, want) in cases {
            assert_eq!(compare_versions(a, b), want, "{a} vs {b}");
            assert_eq!(compare_versions(b, a), want.reverse(), "{b} vs {a}");
        }
    }

    #[test]
    fn diff_counts_each_kind() {
        let old = list(&[
            "bash=5.2.15-2",
            "curl=7.88.1-10",
            "gone=1",
            "systemd=252.38-1~deb12u1",
        ]);
        let new = list(&[
            "bash=5.2.15-2",
            "curl=7.88.1-9",
            "fresh=2",
            "systemd=252.39-1~deb12u1",
        ]);
        let diff = PackageDiff::between(&old, &new);
        assert_eq!(
            diff.summary(),
            "1 upgraded, 1 downgraded, 1 removed, 1 added"
        );
        assert_eq!(diff.upgraded[0].name, "systemd");
        assert_eq!(diff.downgraded[0].to, "7.88.1-9");
        assert_eq!(diff.removed[0].name, "gone");
        assert_eq!(diff.added[0].version, "2");
        assert_eq!(diff.lines().len(), 4);
    }

    #[test]
    fn identical_lists_have_no_changes() {
        let l = list(&["a=1", "b=2"]);
        let diff = PackageDiff::between(&l, &l);
        assert!(diff.is_empty());
        assert_eq!(diff.summary(), "no package changes");
    }
}
