use super::*;

const DEP5: &str = "\
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: demo
License: GPL-2+

Files: *
Copyright: 2020 Someone
License: GPL-2+

Files: lib/*
Copyright: 2021 Someone Else
License: BSD-3-clause or Expat, and Zlib

Files: extra/*
Copyright: 2022 A Third
License: public-domain

License: GPL-2+
 This program is free software; see /usr/share/common-licenses/GPL-2.

License: Unused-License
 A stand-alone paragraph: the text of a name, not a license of any file.
";

fn pkg(name: &str, arch: &str, version: &str) -> DebPackage {
    DebPackage {
        name: name.into(),
        arch: arch.into(),
        version: version.into(),
        ..Default::default()
    }
}

#[test]
fn dep5_licenses_become_one_spdx_expression() {
    assert_eq!(
        dep5_license(DEP5).as_deref(),
        Some("((BSD-3-Clause OR MIT) AND Zlib) AND GPL-2.0-or-later AND LicenseRef-public-domain")
    );
    let one = |line: &str| dep5_expression(line).unwrap();
    assert_eq!(one("GPL-2"), "GPL-2.0-only");
    assert_eq!(one("LGPL-2.1+"), "LGPL-2.1-or-later");
    assert_eq!(one("GPL-3.0-or-later"), "GPL-3.0-or-later");
    assert_eq!(one("GFDL-NIV-1.3+"), "GFDL-1.3-no-invariants-or-later");
    assert_eq!(one("Apache-2.0 or MPL-1.1+"), "Apache-2.0 OR MPL-1.1+");
    assert_eq!(
        one("GPL-2+ or Artistic, and BSD-3-clause"),
        "(GPL-2.0-or-later OR Artistic-1.0-Perl) AND BSD-3-Clause"
    );
    assert_eq!(
        one("GPL-2+ with OpenSSL exception or MIT"),
        "LicenseRef-GPL-2-plus-with-OpenSSL-exception OR MIT"
    );
    assert_eq!(one("public domain"), "LicenseRef-public-domain");
    assert_eq!(one("GPL-7"), "LicenseRef-GPL-7");
    assert_eq!(one("Perl"), "(Artistic-1.0-Perl OR GPL-1.0-or-later)");
    assert_eq!(one("or GPL-2 and"), "GPL-2.0-only");
    // Only what SPDX allows in an id survives in a LicenseRef.
    assert_eq!(one("Weird/$name\"x"), "LicenseRef-Weird--name-x");
    assert_eq!(dep5_expression("  , and "), None);
}

#[test]
fn copyright_files_that_are_not_dep5_have_no_license() {
    // Free text that happens to contain a License: line.
    let text = "This package was debianized by someone.\n\nLicense: GPL-2+\n";
    assert_eq!(dep5_license(text), None);
    // A header without Format: is not DEP-5.
    assert_eq!(
        dep5_license("Upstream-Name: x\n\nFiles: *\nLicense: MIT\n"),
        None
    );
    // A DEP-5 header whose paragraphs name no license.
    assert_eq!(
        dep5_license("Format: https://x/\n\nFiles: *\nCopyright: me\n"),
        None
    );
    assert_eq!(dep5_license(""), None);
}

#[test]
fn dpkg_status_lists_installed_packages_per_architecture() {
    let status = "\
Package: libc6
Status: install ok installed
Maintainer: GNU Libc Maintainers <debian-glibc@lists.debian.org>
Architecture: amd64
Version: 2.36-9+deb12u14

Package: removed
Status: deinstall ok config-files
Architecture: amd64
Version: 1.0

Package: libc6
Status: install ok installed
Architecture: i386
Version: 2.36-9+deb12u14

Package: held
Status: hold ok installed
Architecture: all
Version: 1:2.0
Description: a multi-line
 description with: a colon
";
    let p = parse_status(status);
    let keys: Vec<(&str, &str, &str)> = p
        .iter()
        .map(|p| (p.name.as_str(), p.arch.as_str(), p.version.as_str()))
        .collect();
    assert_eq!(
        keys,
        [
            ("held", "all", "1:2.0"),
            ("libc6", "amd64", "2.36-9+deb12u14"),
            ("libc6", "i386", "2.36-9+deb12u14"),
        ]
    );
    assert_eq!(
        p[1].maintainer.as_deref(),
        Some("GNU Libc Maintainers <debian-glibc@lists.debian.org>")
    );
}

#[test]
fn the_document_has_the_spdx_2_3_shape() {
    let mut a = pkg("libstdc++6", "amd64", "12.2.0-14");
    a.license = Some("GPL-3.0-or-later AND LicenseRef-public-domain".into());
    a.sha256 = Some("ab".repeat(32));
    a.maintainer = Some("Debian GCC Maintainers <debian-gcc@lists.debian.org>".into());
    let mut b = pkg("busybox", "amd64", "1:1.35.0-4");
    b.maintainer = Some("Chris Boot <bootc@debian.org>".into());
    let doc = document(&[a, b], 1_795_000_000);
    assert_eq!(doc["spdxVersion"], "SPDX-2.3");
    assert_eq!(doc["dataLicense"], "CC0-1.0");
    assert_eq!(doc["SPDXID"], "SPDXRef-DOCUMENT");
    assert_eq!(doc["name"], "cairn host tree");
    assert_eq!(doc["creationInfo"]["created"], "2026-11-18T11:06:40Z");
    let creators = doc["creationInfo"]["creators"].as_array().unwrap();
    assert!(creators[0].as_str().unwrap().starts_with("Tool: cairn-"));
    let ns = doc["documentNamespace"].as_str().unwrap();
    assert!(
        ns.starts_with("https://cairn.invalid/spdx/") && ns.len() == 27 + 64,
        "{ns}"
    );

    let pkgs = doc["packages"].as_array().unwrap();
    assert_eq!(pkgs.len(), 2);
    // Sorted by name.
    let bb = &pkgs[0];
    assert_eq!(bb["SPDXID"], "SPDXRef-Package-deb-busybox-amd64");
    assert_eq!(bb["name"], "busybox");
    assert_eq!(bb["versionInfo"], "1:1.35.0-4");
    assert_eq!(bb["supplier"], "Person: Chris Boot (bootc@debian.org)");
    assert_eq!(bb["downloadLocation"], "NOASSERTION");
    assert_eq!(bb["filesAnalyzed"], false);
    assert_eq!(bb["licenseConcluded"], "NOASSERTION");
    assert_eq!(bb["licenseDeclared"], "NOASSERTION");
    assert_eq!(bb["copyrightText"], "NOASSERTION");
    assert!(bb.get("checksums").is_none());
    assert!(bb["comment"].as_str().unwrap().contains("no checksum"));
    assert_eq!(
        bb["externalRefs"][0],
        json!({
            "referenceCategory": "PACKAGE-MANAGER",
            "referenceType": "purl",
            "referenceLocator": "pkg:deb/debian/busybox@1%3A1.35.0-4?arch=amd64",
        })
    );
    let cxx = &pkgs[1];
    assert_eq!(cxx["SPDXID"], "SPDXRef-Package-deb-libstdcplusplus6-amd64");
    assert_eq!(
        cxx["supplier"],
        "Organization: Debian GCC Maintainers (debian-gcc@lists.debian.org)"
    );
    assert_eq!(
        cxx["licenseDeclared"],
        "GPL-3.0-or-later AND LicenseRef-public-domain"
    );
    assert_eq!(
        cxx["checksums"],
        json!([{"algorithm": "SHA256", "checksumValue": "ab".repeat(32)}])
    );
    assert_eq!(
        cxx["externalRefs"][0]["referenceLocator"],
        "pkg:deb/debian/libstdc%2B%2B6@12.2.0-14?arch=amd64"
    );
    // Every LicenseRef used is defined.
    assert_eq!(
        doc["hasExtractedLicensingInfos"][0]["licenseId"],
        "LicenseRef-public-domain"
    );
    let rels = doc["relationships"].as_array().unwrap();
    assert_eq!(rels.len(), 2);
    assert_eq!(
        rels[0],
        json!({
            "spdxElementId": "SPDXRef-DOCUMENT",
            "relationshipType": "DESCRIBES",
            "relatedSpdxElement": "SPDXRef-Package-deb-busybox-amd64",
        })
    );
}

#[test]
fn the_document_is_deterministic() {
    let mut list = vec![
        pkg("b", "amd64", "1"),
        pkg("a", "all", "2"),
        pkg("a-", "amd64", "1"),
    ];
    let one = render(&list, 1_795_000_000).unwrap();
    list.reverse();
    assert_eq!(render(&list, 1_795_000_000).unwrap(), one, "input order");
    assert!(one.ends_with(b"}\n"));
    // Another time or another package set: another namespace.
    let ns = |bytes: &[u8]| {
        let v: Value = serde_json::from_slice(bytes).unwrap();
        v["documentNamespace"].as_str().unwrap().to_string()
    };
    assert_ne!(ns(&render(&list, 1_795_000_001).unwrap()), ns(&one));
    list[0].version = "1.1".into();
    assert_ne!(ns(&render(&list, 1_795_000_000).unwrap()), ns(&one));
    // Names that clean up to the same id still get distinct ones.
    let doc = document(&[pkg("x+", "amd64", "1"), pkg("xplus", "amd64", "1")], 0);
    assert_eq!(
        doc["packages"][0]["SPDXID"],
        "SPDXRef-Package-deb-xplus-amd64"
    );
    assert_eq!(
        doc["packages"][1]["SPDXID"],
        "SPDXRef-Package-deb-xplus-amd64-2"
    );
}

fn write(root: &Path, rel: &str, bytes: &[u8]) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, bytes).unwrap();
}

const STATUS: &str = "\
Package: demo
Status: install ok installed
Architecture: amd64
Version: 1:1.0-1

Package: link
Status: install ok installed
Architecture: amd64
Version: 1.0

Package: fifo
Status: install ok installed
Architecture: amd64
Version: 1.0

Package: big
Status: install ok installed
Architecture: all
Version: 1.0

Package: ../../x
Status: install ok installed
Architecture: amd64
Version: 1.0
";

/// The tree is hostile: a copyright file that is a symlink out of the tree,
/// a fifo, an oversized file, a name with `..`, invalid UTF-8.
#[test]
fn licenses_are_read_inside_the_tree_only() {
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("tree");
    let outside = dir.path().join("outside-copyright");
    std::fs::write(
        &outside,
        "Format: x\n\nFiles: *\nLicense: Build-Machine-Secret\n",
    )
    .unwrap();
    write(&t, "var/lib/dpkg/status", STATUS.as_bytes());
    let mut demo = b"Format: https://x/\n\nFiles: *\nLicense: MIT\nComment: caf\xe9\n".to_vec();
    demo.extend_from_slice(b"\nFiles: b\xff/*\nLicense: ISC\n");
    write(&t, "usr/share/doc/demo/copyright", &demo);
    std::fs::create_dir_all(t.join("usr/share/doc/link")).unwrap();
    std::os::unix::fs::symlink(&outside, t.join("usr/share/doc/link/copyright")).unwrap();
    std::fs::create_dir_all(t.join("usr/share/doc/fifo")).unwrap();
    nix::unistd::mkfifo(
        &t.join("usr/share/doc/fifo/copyright"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    let mut big = b"Format: x\n\nFiles: *\nLicense: MIT\n".to_vec();
    big.resize(MAX_COPYRIGHT_BYTES as usize + 1, b'#');
    write(&t, "usr/share/doc/big/copyright", &big);
    write(
        &t,
        "x/copyright",
        b"Format: x\n\nFiles: *\nLicense: Traversed\n",
    );

    let root = Root::open(&t).unwrap();
    let pkgs = collect(&root, &ChecksumSources::default()).unwrap();
    let lic: BTreeMap<&str, Option<&str>> = pkgs
        .iter()
        .map(|p| (p.name.as_str(), p.license.as_deref()))
        .collect();
    assert_eq!(lic["demo"], Some("ISC AND MIT"));
    assert_eq!(
        lic["link"], None,
        "the symlink resolves inside the tree, where nothing is"
    );
    assert_eq!(lic["fifo"], None);
    assert_eq!(lic["big"], None);
    assert_eq!(lic["../../x"], None);
    assert_eq!(pkgs.len(), 5);

    // The SBOM goes into the tree; no packages, no SBOM (and a stray file
    // at its path is removed).
    assert_eq!(
        write_into(&root, 0, &ChecksumSources::default()).unwrap(),
        5
    );
    let text = std::fs::read_to_string(t.join(SBOM_PATH)).unwrap();
    assert!(!text.contains("Build-Machine-Secret") && !text.contains("Traversed"));
    std::fs::remove_file(t.join("var/lib/dpkg/status")).unwrap();
    assert_eq!(
        write_into(&root, 0, &ChecksumSources::default()).unwrap(),
        0
    );
    assert!(!t.join(SBOM_PATH).exists());
}

#[test]
fn checksums_come_from_the_fetched_debs_then_the_indices() {
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("tree");
    write(&t, "var/lib/dpkg/status", STATUS.as_bytes());
    let debs = dir.path().join("debs");
    // apt's archive name: `:` of the epoch as %3a.
    write(&debs, "demo_1%3a1.0-1_amd64.deb", b"a deb");
    let lists = dir.path().join("lists");
    let sha_link = "cd".repeat(32);
    write(
        &lists,
        "deb.example_debian_dists_bookworm_main_binary-amd64_Packages",
        format!(
            "Package: link\nVersion: 1.0\nArchitecture: amd64\nSHA256: {sha_link}\n\n\
             Package: fifo\nVersion: 2.0\nArchitecture: amd64\nSHA256: {}\n",
            "ef".repeat(32)
        )
        .as_bytes(),
    );
    // apt stores indices compressed when configured to (lz4 here): read
    // through apt-helper.
    let sha_big = "12".repeat(32);
    let plain = lists.join("compressed_Packages");
    std::fs::write(
        &plain,
        format!("Package: big\nVersion: 1.0\nArchitecture: all\nSHA256: {sha_big}\n"),
    )
    .unwrap();
    let ok = std::process::Command::new("gzip")
        .arg(&plain)
        .status()
        .unwrap()
        .success();
    assert!(ok && lists.join("compressed_Packages.gz").exists());
    let root = Root::open(&t).unwrap();
    let pkgs = collect(
        &root,
        &ChecksumSources {
            debs: Some(debs),
            lists: Some(lists),
        },
    )
    .unwrap();
    let sha: BTreeMap<&str, Option<&str>> = pkgs
        .iter()
        .map(|p| (p.name.as_str(), p.sha256.as_deref()))
        .collect();
    assert_eq!(
        sha["demo"],
        Some(hex::encode(Sha256::digest(b"a deb")).as_str())
    );
    assert_eq!(sha["link"], Some(sha_link.as_str()));
    assert_eq!(sha["fifo"], None, "another version in the index");
    assert_eq!(sha["big"], Some(sha_big.as_str()));
}
