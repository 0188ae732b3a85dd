//! libostree, loaded on first use.
//!
//! libostree-1.so.1 pulls about 60 shared libraries into a process (curl,
//! gnutls, gpgme, libarchive, libsystemd, …); loading and initialising them
//! is most of the start-up time of `host` (≈ 10 ms here, ≈ 0.4 s under TCG),
//! and most commands — `host app run` of an image already checked out,
//! `ps`, `stop`, `--help` — never call it. So this executable carries no
//! DT_NEEDED entry for libostree. Instead it defines every function
//! libostree exports (the list is read from the library at build time, see
//! build.rs) as a small trampoline:
//!
//! ```text
//! ostree_repo_open:  jmp *slot[i]            (after the first call)
//!                    else: r11 = i; jmp cairn_ostree_lazy_slow
//! ```
//!
//! The first call of any of them saves the argument registers, dlopen()s
//! libostree-1.so.1 (RTLD_NOW | RTLD_GLOBAL), fills all slots with dlsym and
//! jumps to the real function with the registers restored. The trampolines
//! are hidden symbols (not in .dynsym), so libostree's calls into itself
//! never come back here. Because the executable defines these symbols, the
//! linker's `--as-needed` (rustc's default) drops `-lostree-1` from the
//! dynamic section; tests/lazy_ostree.rs checks that.
//!
//! Only the `host` executable gets this: test binaries and the other crates
//! link libostree as usual.

#[cfg(not(target_arch = "x86_64"))]
compile_error!("the lazy libostree trampolines are written for x86_64");

use std::ffi::CStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;

include!(concat!(env!("OUT_DIR"), "/lazy_ostree_names.rs"));

const LIBRARY: &CStr = c"libostree-1.so.1";

// The trampolines and their slots (generated).
std::arch::global_asm!(
    include_str!(concat!(env!("OUT_DIR"), "/lazy_ostree.s")),
    options(att_syntax)
);

// The slow path, entered by a jump from a trampoline with the caller's
// arguments untouched and r11 = the function's index. Saves everything the
// SysV ABI passes arguments in (rdi rsi rdx rcx r8 r9, rax = the vector
// register count of a variadic call, xmm0-7), calls the resolver with the
// stack 16-byte aligned, restores, and tail-jumps to the real function.
// On entry rsp ≡ 8 (mod 16) (the caller's return address is on top);
// 200 bytes make it ≡ 0 for the call.
std::arch::global_asm!(
    "
    .section .text.cairn_lazy_slow,\"ax\",@progbits
    .globl cairn_ostree_lazy_slow
    .hidden cairn_ostree_lazy_slow
    .type cairn_ostree_lazy_slow,@function
    .balign 16
cairn_ostree_lazy_slow:
    .cfi_startproc
    subq $200, %rsp
    .cfi_adjust_cfa_offset 200
    movaps %xmm0, 0(%rsp)
    movaps %xmm1, 16(%rsp)
    movaps %xmm2, 32(%rsp)
    movaps %xmm3, 48(%rsp)
    movaps %xmm4, 64(%rsp)
    movaps %xmm5, 80(%rsp)
    movaps %xmm6, 96(%rsp)
    movaps %xmm7, 112(%rsp)
    movq %rdi, 128(%rsp)
    movq %rsi, 136(%rsp)
    movq %rdx, 144(%rsp)
    movq %rcx, 152(%rsp)
    movq %r8, 160(%rsp)
    movq %r9, 168(%rsp)
    movq %rax, 176(%rsp)
    movq %r11, %rdi
    call cairn_ostree_lazy_resolve
    movq %rax, %r11
    movaps 0(%rsp), %xmm0
    movaps 16(%rsp), %xmm1
    movaps 32(%rsp), %xmm2
    movaps 48(%rsp), %xmm3
    movaps 64(%rsp), %xmm4
    movaps 80(%rsp), %xmm5
    movaps 96(%rsp), %xmm6
    movaps 112(%rsp), %xmm7
    movq 128(%rsp), %rdi
    movq 136(%rsp), %rsi
    movq 144(%rsp), %rdx
    movq 152(%rsp), %rcx
    movq 160(%rsp), %r8
    movq 168(%rsp), %r9
    movq 176(%rsp), %rax
    addq $200, %rsp
    .cfi_adjust_cfa_offset -200
    jmp *%r11
    .cfi_endproc
    .size cairn_ostree_lazy_slow, .-cairn_ostree_lazy_slow
    .text
",
    options(att_syntax)
);

extern "C" {
    /// One slot per entry of NAMES: the real address once loaded, else 0.
    static cairn_ostree_slots: [AtomicUsize; COUNT];
}

fn slots() -> &'static [AtomicUsize; COUNT] {
    // SAFETY: the array is defined (zeroed, 8-byte aligned, COUNT * 8 bytes)
    // by the generated assembly; AtomicUsize has the layout of a u64.
    unsafe { &*std::ptr::addr_of!(cairn_ostree_slots) }
}

/// Called (from cairn_ostree_lazy_slow) with a trampoline's index: loads
/// libostree once, and returns the address of the real function.
#[no_mangle]
extern "C" fn cairn_ostree_lazy_resolve(index: usize) -> usize {
    static LOAD: Once = Once::new();
    LOAD.call_once(load);
    let addr = slots()[index].load(Ordering::Acquire);
    if addr == 0 {
        fail(&format!(
            "{} has no function {}: this host was built against another libostree version",
            LIBRARY.to_string_lossy(),
            NAMES[index].to_string_lossy()
        ));
    }
    addr
}

fn load() {
    // SAFETY: plain dlopen/dlsym/dlerror calls with NUL-terminated names.
    unsafe {
        let handle = libc::dlopen(LIBRARY.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL);
        if handle.is_null() {
            let why = dlerror_text();
            fail(&format!(
                "cannot load {}: {why} (it comes with the Debian package libostree-1-1: apt-get install libostree-1-1)",
                LIBRARY.to_string_lossy()
            ));
        }
        for (slot, name) in slots().iter().zip(NAMES.iter()) {
            // A function this libostree lacks stays 0; only calling it fails.
            slot.store(
                libc::dlsym(handle, name.as_ptr()) as usize,
                Ordering::Release,
            );
        }
    }
    tracing::debug!("loaded {} on first use", LIBRARY.to_string_lossy());
}

unsafe fn dlerror_text() -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated string.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        "unknown error".into()
    } else {
        // SAFETY: non-null, NUL-terminated (see above).
        unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
    }
}

/// The process cannot go on without libostree: say why, and exit non-zero.
fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(1)
}
