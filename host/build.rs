//! Generates the lazy libostree trampolines of the `host` executable (see
//! src/lazy_ostree.rs): one per function libostree-1.so exports, so whatever
//! `ostree_*` function any crate of this binary calls is defined here and the
//! linker (`--as-needed`) leaves libostree out of DT_NEEDED.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use object::{Object, ObjectSymbol, SymbolKind};

fn main() {
    let lib = find_libostree();
    println!("cargo:rerun-if-changed={}", lib.display());
    println!("cargo:rerun-if-changed=build.rs");
    let data = std::fs::read(&lib).unwrap_or_else(|e| panic!("reading {}: {e}", lib.display()));
    let file = object::File::parse(&*data)
        .unwrap_or_else(|e| panic!("parsing {} as ELF: {e}", lib.display()));
    let mut functions = Vec::new();
    for sym in file.dynamic_symbols() {
        let Ok(name) = sym.name() else { continue };
        if !sym.is_definition() || !sym.is_global() || !name.starts_with("ostree_") {
            continue;
        }
        match sym.kind() {
            SymbolKind::Text => functions.push(name.to_string()),
            // A trampoline can forward a call, not a variable: should
            // libostree ever export data, this binary must link it again.
            kind => panic!(
                "{} exports {name} as {kind:?}, not a function: the lazy loader forwards functions only",
                lib.display()
            ),
        }
    }
    functions.sort();
    functions.dedup();
    assert!(
        functions.len() > 100,
        "{} exports only {} ostree_* functions: not libostree?",
        lib.display(),
        functions.len()
    );

    let n = functions.len();
    let mut asm = String::new();
    writeln!(asm, "    .section .bss.cairn_ostree_slots,\"aw\",@nobits").unwrap();
    writeln!(asm, "    .balign 8").unwrap();
    writeln!(asm, "    .globl cairn_ostree_slots").unwrap();
    writeln!(asm, "    .hidden cairn_ostree_slots").unwrap();
    writeln!(asm, "cairn_ostree_slots:").unwrap();
    writeln!(asm, "    .zero {}", 8 * n).unwrap();
    writeln!(asm, "    .text").unwrap();
    for (i, f) in functions.iter().enumerate() {
        // Hidden: never in .dynsym, so libostree's own calls never land here.
        write!(
            asm,
            "    .section .text.cairn_lazy.{f},\"ax\",@progbits
    .globl {f}
    .hidden {f}
    .type {f},@function
    .balign 16
{f}:
    .cfi_startproc
    movq cairn_ostree_slots+{off}(%rip), %r11
    testq %r11, %r11
    jz 1f
    jmp *%r11
1:  movl ${i}, %r11d
    jmp cairn_ostree_lazy_slow
    .cfi_endproc
    .size {f}, .-{f}
",
            off = 8 * i
        )
        .unwrap();
    }
    let mut rs = String::new();
    writeln!(rs, "pub(crate) const COUNT: usize = {n};").unwrap();
    writeln!(
        rs,
        "pub(crate) static NAMES: [&::std::ffi::CStr; COUNT] = ["
    )
    .unwrap();
    for f in &functions {
        writeln!(rs, "    c{f:?},").unwrap();
    }
    writeln!(rs, "];").unwrap();

    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    std::fs::write(out.join("lazy_ostree.s"), asm).expect("writing lazy_ostree.s");
    std::fs::write(out.join("lazy_ostree_names.rs"), rs).expect("writing lazy_ostree_names.rs");
}

/// The libostree-1 the rest of the build links against (pkg-config).
fn find_libostree() -> PathBuf {
    let lib = pkg_config::Config::new()
        .cargo_metadata(false)
        .env_metadata(false)
        .probe("ostree-1")
        .unwrap_or_else(|e| panic!("pkg-config ostree-1 (install libostree-dev): {e}"));
    let mut dirs: Vec<PathBuf> = lib.link_paths.clone();
    if let Ok(out) = std::process::Command::new("pkg-config")
        .args(["--variable=libdir", "ostree-1"])
        .output()
    {
        let d = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !d.is_empty() {
            dirs.push(PathBuf::from(d));
        }
    }
    for d in &dirs {
        for name in ["libostree-1.so", "libostree-1.so.1"] {
            let p: &Path = &d.join(name);
            if p.exists() {
                return p.to_path_buf();
            }
        }
    }
    panic!("libostree-1.so not found in {dirs:?} (install libostree-dev)");
}
