//! The `host` executable loads libostree on first use (src/lazy_ostree.rs):
//! no DT_NEEDED entry for it, the library appears only when a command calls
//! into it, and those commands still work.

mod common;

use std::path::Path;

use common::{host, text};
use object::read::elf::{Dyn as _, ElfFile64};

/// The DT_NEEDED entries of an ELF executable.
fn needed(path: &Path) -> Vec<String> {
    let data = std::fs::read(path).unwrap();
    let elf = ElfFile64::<object::Endianness>::parse(&*data).unwrap();
    let endian = elf.endian();
    let sections = elf.elf_section_table();
    let (dyns, link) = sections
        .dynamic(endian, &*data)
        .unwrap()
        .expect("a dynamically linked executable");
    let strings = sections.strings(endian, &*data, link).unwrap();
    dyns.iter()
        .filter(|d| d.tag32(endian) == Some(object::elf::DT_NEEDED))
        .map(|d| String::from_utf8(d.string(endian, strings).unwrap().to_vec()).unwrap())
        .collect()
}

#[test]
fn host_has_no_dt_needed_on_libostree() {
    let libs = needed(Path::new(env!("CARGO_BIN_EXE_host")));
    // The parse is real: what the binary does need is there.
    assert!(libs.iter().any(|l| l == "libc.so.6"), "{libs:?}");
    assert!(libs.iter().any(|l| l == "libgio-2.0.so.0"), "{libs:?}");
    assert!(
        !libs.iter().any(|l| l.starts_with("libostree")),
        "host links libostree directly again: {libs:?}"
    );
}

/// The objects the dynamic loader mapped while running `host ARGS`, from
/// glibc's LD_DEBUG=files trace.
fn loaded_objects(args: &[&str]) -> (std::process::Output, String) {
    let out = host().args(args).env("LD_DEBUG", "files").output().unwrap();
    let trace = String::from_utf8_lossy(&out.stderr).into_owned();
    // The trace works at all: the libraries linked directly are in it.
    assert!(trace.contains("file=libgio-2.0.so.0"), "{}", text(&out));
    (out, trace)
}

#[test]
fn libostree_is_loaded_only_by_commands_that_use_it() {
    let (out, trace) = loaded_objects(&["app", "--help"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!trace.contains("libostree-1.so"), "{trace}");

    // `app verify` opens (here: creates) the image repository through
    // libostree, then looks the image up in it.
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let root_s = root.to_str().unwrap();
    let (out, trace) = loaded_objects(&["app", "verify", "--root", root_s, "nosuch:1"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        trace.contains("file=libostree-1.so.1 [0];  dynamically loaded by"),
        "{trace}"
    );
    assert!(
        trace.contains("error: no image nosuch:1 in the store"),
        "{}",
        text(&out)
    );
    // libostree made a real repository (stock ostree reads it back).
    assert!(root.join("repo/config").is_file());
    let refs = common::ostree_cli(&root.join("repo"), &["refs"]);
    assert_eq!(refs.trim(), "");
}
