//! libostree, gio, gobject and glib, loaded on first use.
//!
//! libostree-1.so.1 pulls about 60 shared libraries into a process (curl,
//! gnutls, gpgme, libarchive, libsystemd, …) and glib's three libraries
//! another ten; mapping, relocating and initialising them was most of the
//! start-up time of `host` (≈ 10 ms here, ≈ 0.4 s under TCG), and the
//! commands that matter for latency — `host app run` of an image already
//! checked out, `ps`, `stop`, the monitor — never call them. So this
//! executable has no DT_NEEDED entry for any of them. Instead it defines
//! every function they export (listed from the libraries at build time, see
//! build.rs) as a small trampoline:
//!
//! ```text
//! g_variant_new:  jmp *slot[i]                 (once resolved)
//!                 else: r11 = i; jmp cairn_lazy_slow
//! ```
//!
//! The first call of a function saves the argument registers, dlopen()s its
//! library (RTLD_NOW | RTLD_GLOBAL, once per library; the library's own
//! dependencies come along), looks the function up with dlsym, stores it in
//! its slot and jumps to it with the registers restored. Slots are filled
//! one by one as functions are first called: the table has some 4,800
//! entries of which a command uses a few dozen. The trampolines are hidden
//! symbols (not in .dynsym), so the libraries' calls into themselves and
//! each other never come back here, and only one copy of each library is
//! ever loaded. Because the executable defines these symbols, rustc's
//! default `--as-needed` drops `-lostree-1 -lgio-2.0 …` from its dynamic
//! section; tests/lazy_libs.rs checks that.
//!
//! Only the `host` executable gets this: test binaries and the other crates
//! link the libraries as usual.

#[cfg(not(target_arch = "x86_64"))]
compile_error!("the lazy-loading trampolines are written for x86_64");

use std::ffi::CStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

include!(concat!(env!("OUT_DIR"), "/lazy_libs.rs"));

// The trampolines and their slots (generated).
std::arch::global_asm!(
    include_str!(concat!(env!("OUT_DIR"), "/lazy_libs.s")),
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
    .globl cairn_lazy_slow
    .hidden cairn_lazy_slow
    .type cairn_lazy_slow,@function
    .balign 16
cairn_lazy_slow:
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
    call cairn_lazy_resolve
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
    .size cairn_lazy_slow, .-cairn_lazy_slow
    .text
",
    options(att_syntax)
);

extern "C" {
    /// One slot per function: its address once resolved, else 0.
    static cairn_lazy_slots: [AtomicUsize; COUNT];
}

fn slots() -> &'static [AtomicUsize; COUNT] {
    // SAFETY: the array is defined (zeroed, 8-byte aligned, COUNT * 8 bytes)
    // by the generated assembly; AtomicUsize has the layout of a u64.
    unsafe { &*std::ptr::addr_of!(cairn_lazy_slots) }
}

fn name(index: usize) -> &'static CStr {
    let at = NAME_AT[index] as usize;
    CStr::from_bytes_until_nul(&NAME_BLOB[at..]).expect("NUL-terminated names")
}

/// Called (from cairn_lazy_slow) with a trampoline's index: returns the
/// address of the real function, loading its library first if need be.
#[no_mangle]
extern "C" fn cairn_lazy_resolve(index: usize) -> usize {
    let slot = &slots()[index];
    let known = slot.load(Ordering::Acquire);
    if known != 0 {
        return known; // another thread resolved it meanwhile
    }
    let lib = LIBRARY_OF[index] as usize;
    let handle = library(lib);
    // SAFETY: a handle from dlopen and a NUL-terminated name.
    let addr = unsafe { libc::dlsym(handle as *mut libc::c_void, name(index).as_ptr()) } as usize;
    if addr == 0 {
        fail(&format!(
            "{} has no function {}: this host was built against another version of it",
            LIBRARIES[lib].0,
            name(index).to_string_lossy()
        ));
    }
    slot.store(addr, Ordering::Release);
    addr
}

/// dlopen()s library `lib` once; exits with a clear error if it cannot.
fn library(lib: usize) -> usize {
    static HANDLES: [OnceLock<usize>; LIBRARIES.len()] =
        [const { OnceLock::new() }; LIBRARIES.len()];
    *HANDLES[lib].get_or_init(|| {
        let (soname, package) = LIBRARIES[lib];
        let c = std::ffi::CString::new(soname).expect("no NUL in a soname");
        // SAFETY: dlopen with a NUL-terminated name.
        let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        if handle.is_null() {
            // SAFETY: called right after the failing dlopen.
            let why = unsafe { dlerror_text() };
            fail(&format!(
                "cannot load {soname}: {why} (it comes with the Debian package {package}: apt-get install {package})"
            ));
        }
        tracing::debug!("loaded {soname} on first use");
        handle as usize
    })
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

/// The process cannot go on without the library: say why, exit non-zero.
fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(1)
}
