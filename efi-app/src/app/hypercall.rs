//! Hypercalls from the loader (CPL 0, guest mode on a virtualized CPU).
use core::arch::asm;
use core::sync::atomic::{AtomicBool, Ordering};

/// Intel processors take VMCALL, AMD ones VMMCALL.
static INTEL: AtomicBool = AtomicBool::new(false);

/// Chooses the instruction for this platform's vendor.
pub fn set_intel(intel: bool) {
    INTEL.store(intel, Ordering::Relaxed);
}

/// Executes `VMMCALL` (AMD) or `VMCALL` (Intel) with `func` and three
/// arguments; returns RAX, RBX, RCX, RDX.
///
/// # Safety
/// Only on a CPU under thinhv (elsewhere the instruction raises #UD).
pub unsafe fn vmmcall(func: u64, a0: u64, a1: u64, a2: u64) -> [u64; 4] {
    let (rax, rbx, rcx, rdx): (u64, u64, u64, u64);
    // SAFETY: guaranteed by the caller; RBX is saved and restored around
    // the call because LLVM reserves it.
    unsafe {
        if INTEL.load(Ordering::Relaxed) {
            asm!("xchg {b}, rbx", "vmcall", "xchg {b}, rbx", b = inout(reg) a0 => rbx,
                inout("rax") func => rax, inout("rcx") a1 => rcx, inout("rdx") a2 => rdx);
        } else {
            asm!("xchg {b}, rbx", "vmmcall", "xchg {b}, rbx", b = inout(reg) a0 => rbx,
                inout("rax") func => rax, inout("rcx") a1 => rcx, inout("rdx") a2 => rdx);
        }
    }
    [rax, rbx, rcx, rdx]
}
