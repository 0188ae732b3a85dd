// A deny-list seccomp filter in its shortest form. Also include!d by
// build.rs, which compacts the default profile at build time (so this file
// uses nothing but core and std, and has no inner attributes).
//
// seccompiler spends five instructions on each syscall of a list without
// argument conditions (a compare, two jumps, two returns), 245 for the
// default profile. Installing a filter costs in proportion to its length
// (the kernel checks it, converts it to eBPF and JIT-compiles it): about
// 0.1 ms of every container start. The filter is run, not read: the
// compact one is made from what the original decides for every syscall
// number, and is used only when it decides the same.

/// One classic BPF instruction: (code, jt, jf, k), as `struct sock_filter`.
pub type Insn = (u16, u8, u8, u32);

// The opcodes a deny list needs (linux/bpf_common.h).
const LD_W_ABS: u16 = 0x20;
const JMP_JA: u16 = 0x05;
const JMP_JEQ_K: u16 = 0x15;
const JMP_JGT_K: u16 = 0x25;
const JMP_JGE_K: u16 = 0x35;
const JMP_JSET_K: u16 = 0x45;
const RET_K: u16 = 0x06;

/// Offsets in `struct seccomp_data`.
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;

const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;

/// The `AUDIT_ARCH_*` a filter sees for a Rust target architecture
/// (linux/audit.h), for those seccompiler compiles.
pub fn audit_arch(target_arch: &str) -> Option<u32> {
    match target_arch {
        "x86_64" => Some(AUDIT_ARCH_X86_64),
        "aarch64" => Some(0xC000_00B7),
        "riscv64" => Some(0xC000_00F3),
        _ => None,
    }
}

/// [`compact`] for a Rust target architecture: the short form where it
/// decides as `prog` does, else None (keep `prog`).
pub fn compact_for(prog: &[Insn], target_arch: &str) -> Option<Vec<Insn>> {
    compact(prog, audit_arch(target_arch)?)
}

/// Set in the number of an x32 syscall, which x86_64 filters see with the
/// x86_64 arch: the same calls under other numbers.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// Syscall numbers simulated: every architecture's table ends below it.
const MAX_NR: u32 = 1024;

/// What `prog` returns for syscall `nr` on `arch` (arguments play no part
/// in a deny list). None: an instruction outside the subset above, a load
/// of anything but the number or the arch, a jump out of the program, or
/// no return within its length.
pub fn decide(prog: &[Insn], arch: u32, nr: u32) -> Option<u32> {
    let mut acc = 0u32;
    let mut pc = 0usize;
    for _ in 0..=prog.len() {
        let &(code, jt, jf, k) = prog.get(pc)?;
        let cond = |taken: bool| pc + 1 + usize::from(if taken { jt } else { jf });
        pc = match code {
            LD_W_ABS => {
                acc = match k {
                    DATA_NR => nr,
                    DATA_ARCH => arch,
                    _ => return None,
                };
                pc + 1
            }
            JMP_JA => pc + 1 + usize::try_from(k).ok()?,
            JMP_JEQ_K => cond(acc == k),
            JMP_JGT_K => cond(acc > k),
            JMP_JGE_K => cond(acc >= k),
            JMP_JSET_K => cond(acc & k != 0),
            RET_K => return Some(k),
            _ => return None,
        };
    }
    None
}

/// The shortest filter deciding as `prog` does on `arch`: a wrong arch
/// gets `prog`'s action for it, the listed numbers one action and every
/// other number another (on x86_64, every x32 number is refused too).
/// None when `prog` is not such a list, or the list is too long for the
/// 8-bit jumps of one compare each.
pub fn compact(prog: &[Insn], arch: u32) -> Option<Vec<Insn>> {
    // Compares only with numbers below MAX_NR (or the arch), and no bit
    // tests: then every number from MAX_NR up but the arch's value takes
    // the same path, and simulating below MAX_NR and those two is all of it.
    let plain = prog.iter().all(|&(code, _, _, k)| match code {
        JMP_JEQ_K | JMP_JGT_K | JMP_JGE_K => k < MAX_NR || k == arch,
        JMP_JSET_K => false,
        _ => true,
    });
    if !plain {
        return None;
    }
    let other_arch = decide(prog, !arch, 0)?;
    let allow = decide(prog, arch, MAX_NR)?;
    let mut deny = None;
    let mut listed = Vec::new();
    for nr in 0..MAX_NR {
        let action = decide(prog, arch, nr)?;
        if action == allow {
            continue;
        }
        if deny.is_some_and(|d| d != action) {
            return None;
        }
        deny = Some(action);
        listed.push(nr);
    }
    // The numbers no table reaches (see above) must be allowed as the rest.
    for nr in [arch, u32::MAX] {
        if decide(prog, arch, nr)? != allow {
            return None;
        }
    }
    let deny = deny?;
    let x32 = arch == AUDIT_ARCH_X86_64;
    let compares = listed.len() + usize::from(x32);
    if compares > usize::from(u8::MAX) {
        return None;
    }
    let mut out = vec![
        (LD_W_ABS, 0, 0, DATA_ARCH),
        (JMP_JEQ_K, 1, 0, arch),
        (RET_K, 0, 0, other_arch),
        (LD_W_ABS, 0, 0, DATA_NR),
    ];
    // Each compare jumps past those after it and the allow, to the deny.
    let mut left = compares;
    if x32 {
        left -= 1;
        out.push((JMP_JGE_K, (left + 1) as u8, 0, X32_SYSCALL_BIT));
    }
    for nr in listed {
        left -= 1;
        out.push((JMP_JEQ_K, (left + 1) as u8, 0, nr));
    }
    out.push((RET_K, 0, 0, allow));
    out.push((RET_K, 0, 0, deny));
    Some(out)
}
