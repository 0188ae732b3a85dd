//! Commit metadata keys: what a composed commit says about itself. The
//! builder writes them, the updater and the image writer read them; each key
//! is spelled here once (the table for users is in docs/manifest.md).

/// The commit's version (`<prefix>.<date>.<serial>` or `--version`), the key
/// libostree and rpm-ostree use for the same thing.
pub const VERSION: &str = "version";
/// SHA-256 of every compose input; `--unless-changed` compares it.
pub const INPUT_HASH: &str = "cairn.inputhash";
/// SHA-256 of the resolved manifest.
pub const MANIFEST_DIGEST: &str = "cairn.manifest-digest";
/// Installed packages, `name=version`, sorted.
pub const PACKAGES: &str = "cairn.packages";
/// The manifest's kernel arguments; deployments of the commit get them.
pub const KARGS: &str = "cairn.kargs";
/// Apps baked into the tree, `name@sha256:…`.
pub const APPS: &str = "cairn.apps";
/// The kernel release (`uname -r`) the tree boots.
pub const KERNEL: &str = "cairn.kernel";
/// The commit's lockfile (TOML text, builder/src/lock.rs): every package's
/// name, version, architecture and `.deb` SHA-256, the manifest and `host`
/// digests, `SOURCE_DATE_EPOCH` and the apt sources. `host compose lock`
/// prints it; `compose tree --lock` and `compose verify` read it.
pub const LOCK: &str = "cairn.lock";
/// On a promoted commit: the commit, ref and version it was promoted from.
pub const PROMOTED_FROM: &str = "cairn.promoted-from";
pub const PROMOTED_FROM_REF: &str = "cairn.promoted-from-ref";
pub const PROMOTED_FROM_VERSION: &str = "cairn.promoted-from-version";
/// On a commit promoted with `--tested-by FILE`…: `sha256:<hex>` of each
/// JUnit result (every test passed), space-separated in the order given,
/// and what they counted, `; `-separated.
pub const TESTED_BY: &str = "cairn.tested-by";
pub const TESTED_BY_SUMMARY: &str = "cairn.tested-by-summary";

/// Where a commit's tree carries its SBOM (an SPDX 2.3 JSON document of the
/// installed Debian packages), relative to the tree's root. A file rather
/// than a metadata key: it travels with the tree (promotion keeps it, a
/// deployment has it at `/usr/share/cairn/sbom.spdx.json`), and stock tools
/// read it (`ostree cat COMMIT /usr/share/cairn/sbom.spdx.json`). Trees
/// with no installed package have none.
pub const SBOM_PATH: &str = "usr/share/cairn/sbom.spdx.json";

/// Keys the compose writes itself: a manifest's `[metadata]` may not set them.
pub const COMPOSE_WRITTEN: &[&str] = &[
    VERSION,
    INPUT_HASH,
    MANIFEST_DIGEST,
    PACKAGES,
    KARGS,
    APPS,
    KERNEL,
    LOCK,
];

/// True for a key that only the compose (or libostree) may write.
pub fn is_reserved(key: &str) -> bool {
    COMPOSE_WRITTEN.contains(&key)
        || key.starts_with(PROMOTED_FROM)
        || key.starts_with(TESTED_BY)
        || key.starts_with("ostree.")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_keys() {
        for key in [
            VERSION,
            KARGS,
            LOCK,
            PROMOTED_FROM_REF,
            TESTED_BY_SUMMARY,
            "ostree.bootable",
        ] {
            assert!(is_reserved(key), "{key}");
        }
        for key in ["cairn.variant", "org.example.team", "versions"] {
            assert!(!is_reserved(key), "{key}");
        }
    }
}
