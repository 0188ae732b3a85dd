//! Compiles the default seccomp profile (src/denied_syscalls.rs) into a BPF
//! program once, at build time. Compiling it at every container start meant
//! building seccompiler's whole syscall table and a JSON round trip, a
//! noticeable part of a short container's start in a VM; crun keeps a cache
//! of compiled filters for the same reason.

include!("src/denied_syscalls.rs");
include!("src/seccomp_bpf.rs");

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/denied_syscalls.rs");
    println!("cargo:rerun-if-changed=src/seccomp_bpf.rs");
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").expect("cargo sets CARGO_CFG_TARGET_ARCH");
    // An architecture seccompiler does not know gets no precompiled program;
    // the runtime then says so when a filter is asked for.
    let program = match seccompiler::TargetArch::try_from(arch.as_str()) {
        Ok(target) => {
            let rules: Vec<String> = DENIED_SYSCALLS
                .iter()
                .map(|n| format!(r#"{{"syscall":"{n}"}}"#))
                .collect();
            // errno 1 is EPERM on every Linux architecture.
            let json = format!(
                r#"{{"main":{{"mismatch_action":"allow","match_action":{{"errno":1}},"filter":[{}]}}}}"#,
                rules.join(",")
            );
            let program: Vec<Insn> = seccompiler::compile_from_json(json.as_bytes(), target)
                .unwrap_or_else(|e| panic!("compiling the default seccomp profile for {arch}: {e}"))
                .remove("main")
                .expect("the profile's one filter")
                .iter()
                .map(|i| (i.code, i.jt, i.jf, i.k))
                .collect();
            compact_for(&program, &arch).unwrap_or(program)
        }
        Err(_) => Vec::new(),
    };
    let mut out = String::from(
        "/// The default profile as BPF (code, jt, jf, k), made by build.rs; empty\n\
         /// where seccompiler does not know the architecture.\n\
         pub const DEFAULT_SECCOMP_BPF: &[(u16, u8, u8, u32)] = &[\n",
    );
    for (code, jt, jf, k) in &program {
        out.push_str(&format!("    ({code}, {jt}, {jf}, {k}),\n"));
    }
    out.push_str("];\n");
    let path = std::path::Path::new(&std::env::var("OUT_DIR").unwrap()).join("default_seccomp.rs");
    std::fs::write(&path, out).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}
