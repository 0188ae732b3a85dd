//! Generates the lazy-loading trampolines of the `host` executable (see
//! src/lazy_libs.rs): one per function that libostree-1, gio, gobject and
//! glib export, so whatever function of theirs any crate of this binary
//! calls is defined in the executable itself and the linker (`--as-needed`)
//! leaves those libraries out of DT_NEEDED.

use std::fmt::Write as _;
use std::path::PathBuf;

use object::{Object, ObjectSymbol, SymbolKind};

/// (soname, pkg-config name, Debian package) in the order their symbols
/// are claimed: a name exported twice belongs to the first.
const LIBS: &[(&str, &str, &str)] = &[
    ("libostree-1.so.1", "ostree-1", "libostree-1-1"),
    ("libgio-2.0.so.0", "gio-2.0", "libglib2.0-0"),
    ("libgobject-2.0.so.0", "gobject-2.0", "libglib2.0-0"),
    ("libglib-2.0.so.0", "glib-2.0", "libglib2.0-0"),
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // Relative relocations as a bitmap (DT_RELR, glibc >= 2.36, Debian 12)
    // instead of 24 bytes each: ld.so reads a few KiB instead of ~700 KiB
    // at every start, which matters for short `host app run`s in slow VMs.
    println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    // (name, library index)
    let mut functions: Vec<(String, usize)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (li, (soname, pkg, _)) in LIBS.iter().enumerate() {
        let path = find_library(soname, pkg);
        println!("cargo:rerun-if-changed={}", path.display());
        let data =
            std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let file = object::File::parse(&*data)
            .unwrap_or_else(|e| panic!("parsing {} as ELF: {e}", path.display()));
        let mut mine = Vec::new();
        for sym in file.dynamic_symbols() {
            let Ok(name) = sym.name() else { continue };
            // Functions only: a trampoline forwards a call, not a variable.
            // Should a crate use one of the few variables glib exports, the
            // linker keeps that library in DT_NEEDED, and tests/lazy_libs.rs
            // says so. (libostree exports no variables at all.)
            if sym.is_definition() && sym.is_global() && sym.kind() == SymbolKind::Text {
                mine.push(name.to_string());
            }
        }
        mine.sort();
        assert!(
            mine.len() > 100,
            "{} exports only {} functions: not the library expected",
            path.display(),
            mine.len()
        );
        for name in mine {
            if seen.insert(name.clone()) {
                functions.push((name, li));
            }
        }
    }

    let n = functions.len();
    let mut asm = String::new();
    write!(
        asm,
        "    .section .bss.cairn_lazy_slots,\"aw\",@nobits
    .balign 8
    .globl cairn_lazy_slots
    .hidden cairn_lazy_slots
cairn_lazy_slots:
    .zero {}
",
        8 * n
    )
    .unwrap();
    for (i, (f, _)) in functions.iter().enumerate() {
        // Hidden: never in .dynsym, so the libraries' own calls never land
        // here. One section each, so the linker drops the unused ones.
        write!(
            asm,
            "    .section .text.cairn_lazy.{f},\"ax\",@progbits
    .globl {f}
    .hidden {f}
    .type {f},@function
    .balign 16
{f}:
    .cfi_startproc
    movq cairn_lazy_slots+{off}(%rip), %r11
    testq %r11, %r11
    jz 1f
    jmp *%r11
1:  movl ${i}, %r11d
    jmp cairn_lazy_slow
    .cfi_endproc
    .size {f}, .-{f}
",
            off = 8 * i
        )
        .unwrap();
    }
    writeln!(asm, "    .text").unwrap();

    // Names as one NUL-separated blob with offsets: no pointer tables, so
    // no load-time relocations for thousands of entries.
    let mut blob = Vec::new();
    let mut offsets = Vec::new();
    for (f, _) in &functions {
        offsets.push(blob.len());
        blob.extend_from_slice(f.as_bytes());
        blob.push(0);
    }
    let mut rs = String::new();
    writeln!(rs, "pub(crate) const COUNT: usize = {n};").unwrap();
    writeln!(
        rs,
        "pub(crate) static LIBRARIES: [(&str, &str); {}] = [",
        LIBS.len()
    )
    .unwrap();
    for (soname, _, deb) in LIBS {
        writeln!(rs, "    ({soname:?}, {deb:?}),").unwrap();
    }
    writeln!(rs, "];").unwrap();
    writeln!(
        rs,
        "pub(crate) static NAME_BLOB: &[u8] = include_bytes!(concat!(env!(\"OUT_DIR\"), \"/lazy_names.bin\"));"
    )
    .unwrap();
    writeln!(rs, "pub(crate) static NAME_AT: [u32; COUNT] = {offsets:?};").unwrap();
    let libs: Vec<usize> = functions.iter().map(|(_, l)| *l).collect();
    writeln!(rs, "pub(crate) static LIBRARY_OF: [u8; COUNT] = {libs:?};").unwrap();

    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    std::fs::write(out.join("lazy_libs.s"), asm).expect("writing lazy_libs.s");
    std::fs::write(out.join("lazy_names.bin"), blob).expect("writing lazy_names.bin");
    std::fs::write(out.join("lazy_libs.rs"), rs).expect("writing lazy_libs.rs");
}

/// The library the rest of the build links against: `soname` in the
/// library directory pkg-config gives for `pkg`.
fn find_library(soname: &str, pkg: &str) -> PathBuf {
    let lib = pkg_config::Config::new()
        .cargo_metadata(false)
        .env_metadata(false)
        .probe(pkg)
        .unwrap_or_else(|e| panic!("pkg-config {pkg} (install its -dev package): {e}"));
    let mut dirs: Vec<PathBuf> = lib.link_paths.clone();
    if let Ok(out) = std::process::Command::new("pkg-config")
        .args(["--variable=libdir", pkg])
        .output()
    {
        let d = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !d.is_empty() {
            dirs.push(PathBuf::from(d));
        }
    }
    dirs.iter()
        .map(|d| d.join(soname))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("{soname} not found in {dirs:?} (pkg-config {pkg})"))
}
