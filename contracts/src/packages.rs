//! Package lists of host trees and how they differ: the `cairn.packages`
//! commit metadata (`name=version` lines) compared with Debian's version
//! order. Written by the builder, read by the updater and `host status`:
//! one type, whose serde shape is part of the status JSON schema.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;

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

/// What changes from one package list (`from`) to another (`to`), classified
/// with Debian version ordering. The one type behind `host compose diff`,
/// `host status` and the upgrade summaries; its serde shape is part of the
/// status JSON schema (docs/status-v1.schema.json).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PackageDiff {
    pub upgraded: Vec<PackageChange>,
    pub downgraded: Vec<PackageChange>,
    pub added: Vec<Package>,
    pub removed: Vec<Package>,
}

impl PackageDiff {
    /// Diff two `cairn.packages` lists (`name=version` strings); entries
    /// without `=` are ignored.
    pub fn between<S: AsRef<str>>(from: &[S], to: &[S]) -> PackageDiff {
        let map = |list: &[S]| -> BTreeMap<String, String> {
            list.iter()
                .filter_map(|e| e.as_ref().split_once('='))
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect()
        };
        PackageDiff::between_maps(&map(from), &map(to))
    }

    /// Diff two name → version maps.
    pub fn between_maps(
        from: &BTreeMap<String, String>,
        to: &BTreeMap<String, String>,
    ) -> PackageDiff {
        let mut d = PackageDiff::default();
        for (name, old) in from {
            match to.get(name) {
                None => d.removed.push(Package {
                    name: name.clone(),
                    version: old.clone(),
                }),
                Some(new) => {
                    let change = PackageChange {
                        name: name.clone(),
                        from: old.clone(),
                        to: new.clone(),
                    };
                    match compare_versions(old, new) {
                        Ordering::Less => d.upgraded.push(change),
                        Ordering::Greater => d.downgraded.push(change),
                        Ordering::Equal => {}
                    }
                }
            }
        }
        for (name, new) in to {
            if !from.contains_key(name) {
                d.added.push(Package {
                    name: name.clone(),
                    version: new.clone(),
                });
            }
        }
        d
    }

    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.upgraded.is_empty()
            && self.downgraded.is_empty()
    }

    /// "3 upgraded, 1 added" (only the non-zero parts; "no package changes" if none).
    pub fn summary(&self) -> String {
        let parts: Vec<String> = [
            (self.upgraded.len(), "upgraded"),
            (self.downgraded.len(), "downgraded"),
            (self.removed.len(), "removed"),
            (self.added.len(), "added"),
        ]
        .into_iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, what)| format!("{n} {what}"))
        .collect();
        if parts.is_empty() {
            "no package changes".into()
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

impl fmt::Display for PackageDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for line in self.lines() {
            writeln!(f, "  {line}")?;
        }
        Ok(())
    }
}

/// Debian version ordering (deb-version(7)): `[epoch:]upstream[-revision]`,
/// compared part by part with dpkg's rules (`~` sorts before everything).
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    let (ea, ua, ra) = split_version(a);
    let (eb, ub, rb) = split_version(b);
    ea.cmp(&eb)
        .then_with(|| compare_part(ua, ub))
        .then_with(|| compare_part(ra, rb))
}

fn split_version(v: &str) -> (u64, &str, &str) {
    let (epoch, rest) = match v.split_once(':') {
        Some((e, rest)) if e.chars().all(|c| c.is_ascii_digit()) && !e.is_empty() => {
            (e.parse().unwrap_or(0), rest)
        }
        _ => (0, v),
    };
    match rest.rsplit_once('-') {
        Some((upstream, revision)) => (epoch, upstream, revision),
        None => (epoch, rest, ""),
    }
}

fn char_order(c: Option<char>) -> i32 {
    match c {
        None => 0,
        Some('~') => -1,
        Some(c) if c.is_ascii_digit() => 0,
        Some(c) if c.is_ascii_alphabetic() => c as i32,
        Some(c) => c as i32 + 256,
    }
}

fn compare_part(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    while !a.is_empty() || !b.is_empty() {
        // Non-digit prefixes, compared with dpkg's character order.
        loop {
            let ca = a
                .first()
                .filter(|c| !c.is_ascii_digit())
                .map(|&c| c as char);
            let cb = b
                .first()
                .filter(|c| !c.is_ascii_digit())
                .map(|&c| c as char);
            if ca.is_none() && cb.is_none() {
                break;
            }
            let (oa, ob) = (char_order(ca), char_order(cb));
            if oa != ob {
                return oa.cmp(&ob);
            }
            a = &a[ca.is_some() as usize..];
            b = &b[cb.is_some() as usize..];
        }
        // Digit runs, compared numerically.
        let da = a.iter().take_while(|c| c.is_ascii_digit()).count();
        let db = b.iter().take_while(|c| c.is_ascii_digit()).count();
        let na = trim_zeros(&a[..da]);
        let nb = trim_zeros(&b[..db]);
        let ord = na.len().cmp(&nb.len()).then_with(|| na.cmp(nb));
        if ord != Ordering::Equal {
            return ord;
        }
        a = &a[da..];
        b = &b[db..];
    }
    Ordering::Equal
}

fn trim_zeros(digits: &[u8]) -> &[u8] {
    let start = digits.iter().take_while(|&&c| c == b'0').count();
    &digits[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debian_versions_order_like_dpkg() {
        let less = [
            ("1.0", "1.1"),
            ("1.0~rc1", "1.0"),
            ("1.0", "1.0-1"),
            ("1.0-1", "1.0-2"),
            ("1.0-9", "1.0-10"),
            ("2.36-9+deb12u13", "2.36-9+deb12u14"),
            ("1:0.9", "2:0.1"),
            ("9.9", "1:0.1"),
            ("1.0a", "1.0b"),
            ("1.0", "1.0a"),
            ("1.0~~", "1.0~"),
            ("252.38-1~deb12u1", "252.39-1~deb12u1"),
            ("252.38-1~deb12u1", "252.38-1"),
            ("1.0", "1.0+deb12u1"),
        ];
        for (a, b) in less {
            assert_eq!(compare_versions(a, b), Ordering::Less, "{a} < {b}");
            assert_eq!(compare_versions(b, a), Ordering::Greater, "{b} > {a}");
        }
        assert_eq!(compare_versions("1.0-1", "1.0-1"), Ordering::Equal);
        assert_eq!(compare_versions("0:1.0", "1.0"), Ordering::Equal);
        assert_eq!(compare_versions("1.01", "1.1"), Ordering::Equal);
    }

    #[test]
    fn package_diff_classifies_and_summarizes() {
        let from = ["a=1.0", "b=2.0", "c=1.0", "d=5", "no-version"];
        let to = ["a=1.1", "b=1.9", "d=5", "e=0.1"];
        let d = PackageDiff::between(&from, &to);
        let change = |n: &str, a: &str, b: &str| PackageChange {
            name: n.into(),
            from: a.into(),
            to: b.into(),
        };
        let pkg = |n: &str, v: &str| Package {
            name: n.into(),
            version: v.into(),
        };
        assert_eq!(d.upgraded, vec![change("a", "1.0", "1.1")]);
        assert_eq!(d.downgraded, vec![change("b", "2.0", "1.9")]);
        assert_eq!(d.removed, vec![pkg("c", "1.0")]);
        assert_eq!(d.added, vec![pkg("e", "0.1")]);
        assert_eq!(d.summary(), "1 upgraded, 1 downgraded, 1 removed, 1 added");
        assert_eq!(
            d.lines(),
            [
                "upgraded   a 1.0 -> 1.1",
                "downgraded b 2.0 -> 1.9",
                "removed    c 1.0",
                "added      e 0.1"
            ]
        );
        assert_eq!(d.to_string().lines().count(), 4);
        assert!(PackageDiff::between(&from, &from).is_empty());
        assert_eq!(PackageDiff::default().summary(), "no package changes");
    }

    #[test]
    fn package_diff_json_shape_is_the_status_schema_one() {
        let d = PackageDiff::between(&["a=1"], &["a=2", "b=1"]);
        let v = serde_json::to_value(&d).unwrap();
        assert_eq!(v["upgraded"][0]["name"], "a");
        assert_eq!(v["upgraded"][0]["to"], "2");
        assert_eq!(v["added"][0]["version"], "1");
        assert_eq!(v["removed"].as_array().unwrap().len(), 0);
    }
}
