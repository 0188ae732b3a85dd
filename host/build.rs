fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // Relative relocations as a bitmap (DT_RELR, glibc >= 2.36, Debian 12)
    // instead of 24 bytes each: ld.so reads a few KiB instead of ~700 KiB
    // at every start, which matters for short `host app run`s in slow VMs.
    println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
}
