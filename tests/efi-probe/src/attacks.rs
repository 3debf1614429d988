//! Attacks a hostile kernel at CPL 0 would try on the hypervisor's own
//! processor state (issue 11): MSRs that change how the host runs, INVD,
//! and the CPUID bits that must follow the guest. Each prints
//! `attack_<name>=<result>`; the integration tests decide, against the same
//! probe run bare (the control: there each write is taken).
//!
//! Results: `0` the write was taken, `13` it raised #GP (caught here and
//! skipped), anything else another exception vector.
use crate::probe::{catching, cpuid, hc, intel, kv};
use core::arch::asm;
use thinhv_abi::hypercall::{Function, Status};

/// WRMSR with #GP caught (WRMSR is 2 bytes: 0F 30).
fn wrmsr_caught(msr: u32, value: u64) -> u64 {
    catching(2, || {
        // SAFETY: a #GP is caught. A write that is taken is undone by the
        // caller, or (for an MSR that cannot be read back) only touches
        // state the probe and the firmware do not use: the SVM host save
        // area address and VM_CR's INIT redirection.
        unsafe {
            asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32,
                options(nostack));
        }
    })
}

/// One write attempt: reads the MSR, writes
/// `change(current)` and at once the old value back, with interrupts off
/// (a relocated APIC or a changed memory type must not meet a firmware
/// interrupt), and prints the vector the first write raised.
fn attempt(name: &str, msr: u32, change: impl FnOnce(u64) -> u64) {
    let (fault, current) = crate::probe::rdmsr_caught(msr);
    if fault != 0 {
        // Unreadable (thinhv's own MSRs read as absent): the write is
        // still tried, with nothing to put back if it were taken.
        let v = wrmsr_caught(msr, change(0));
        kv(&alloc::format!("attack_msr_{name}"), v);
        return;
    }
    let new = change(current);
    let v = catching(2, || {
        // SAFETY: the first WRMSR (2 bytes) may raise #GP, which is caught
        // and skipped; the second puts the value read above back, which the
        // processor (or thinhv) takes. Interrupts are off throughout
        // (`catching`).
        unsafe {
            asm!("wrmsr", "mov eax, {lo:e}", "mov edx, {hi:e}", "wrmsr",
                lo = in(reg) current as u32, hi = in(reg) (current >> 32) as u32,
                in("ecx") msr, inout("eax") new as u32 => _, inout("edx") (new >> 32) as u32 => _,
                options(nostack));
        }
    });
    kv(&alloc::format!("attack_msr_{name}"), v);
}

/// The MSR policy, attacked (docs/security.md, "MSR policy").
pub fn msr_attacks() {
    // EFER: a reserved bit, LMSLE, SVME.
    attempt("efer_reserved", 0xc000_0080, |v| v | 1 << 2);
    attempt("efer_lmsle", 0xc000_0080, |v| v | 1 << 13);
    attempt("efer_svme", 0xc000_0080, |v| v | 1 << 12);
    // PAT entry 0 of reserved type 2.
    attempt("pat_reserved", 0x277, |v| (v & !0xff) | 2);
    // MTRR default type 2 (reserved).
    attempt("mtrr_deftype_reserved", 0x2ff, |v| (v & !0xff) | 2);
    // A variable MTRR pair the firmware leaves unused (mask V = 0): the
    // guest must see its own write (emulated under thinhv).
    let (f, old) = crate::probe::rdmsr_caught(0x20e);
    if f == 0 {
        let value = 0x1_0000_0006;
        let w = wrmsr_caught(0x20e, value);
        let (_, back) = crate::probe::rdmsr_caught(0x20e);
        let _ = wrmsr_caught(0x20e, old);
        kv("mtrr_physbase7_write", w);
        kv("mtrr_physbase7_readback", u8::from(back == value));
    }
    // Moving the local APIC away from thinhv's ICR trap.
    attempt("apic_relocate", 0x1b, |v| (v & 0xfff) | 0xfed0_0000);
    // The SVM MSRs, absent for a guest without SVM.
    attempt("vm_hsave_pa", 0xc001_0117, |_| 0x1000);
    attempt("vm_cr", 0xc001_0114, |v| v | 1 << 4);
    if !intel() {
        // HWCR: TlbCacheDis; SYSCFG: SMEE; the DRAM/MMIO boundaries; an
        // IORR redirecting RAM; the ECAM base; NB_CFG's CF8 extension.
        attempt("hwcr_tlbcachedis", 0xc001_0015, |v| v | 1 << 3);
        attempt("syscfg_smee", 0xc001_0010, |v| v | 1 << 23);
        attempt("top_mem", 0xc001_001a, |v| v ^ 0x1000_0000);
        attempt("top_mem2", 0xc001_001d, |v| v.wrapping_add(0x1000_0000));
        attempt("iorr_base0", 0xc001_0016, |_| 0x1000_0018);
        attempt("mmio_cfg_base", 0xc001_0058, |v| v ^ 0x1000_0000);
        attempt("nb_cfg", 0xc001_001f, |v| v ^ 1 << 46);
    }
}

/// CPUID.1:ECX.OSXSAVE must follow the caller's CR4.OSXSAVE, with the
/// hypervisor's own CR4 irrelevant; SMX is hidden.
pub fn cpuid_follows_cr4() {
    kv("cpuid1_smx", (cpuid(1, 0)[2] >> 6) & 1);
    if cpuid(1, 0)[2] & (1 << 26) == 0 {
        kv("cpuid_osxsave", "no-xsave");
        return;
    }
    let cr4: u64;
    // SAFETY: reading CR4 at CPL 0.
    unsafe { asm!("mov {}, cr4", out(reg) cr4) };
    let osxsave = 1u64 << 18;
    let mut seen = [0u32; 2];
    for (i, on) in [false, true].into_iter().enumerate() {
        let v = if on { cr4 | osxsave } else { cr4 & !osxsave };
        // SAFETY: OSXSAVE only enables XGETBV/XSETBV and the XSAVE family;
        // nothing between here and the restore below uses them, and
        // interrupts are off so no firmware handler runs in between.
        unsafe {
            asm!("cli", "mov cr4, {}", in(reg) v, options(nostack));
        }
        seen[i] = (cpuid(1, 0)[2] >> 27) & 1;
        // SAFETY: restores the firmware's CR4 and interrupt flag.
        unsafe {
            asm!("mov cr4, {}", "sti", in(reg) cr4, options(nostack));
        }
    }
    kv("cpuid_osxsave_cr4_off", seen[0]);
    kv("cpuid_osxsave_cr4_on", seen[1]);
}

/// INVD after a write: the hypervisor must see it (and do WBINVD), never
/// let the processor discard unwritten data. Counted in the exit counters.
pub fn invd_attack() {
    let before = invd_exits();
    let mut cell = 0u64;
    // SAFETY: INVD at CPL 0; `cell` is written before and read after. In
    // the emulator INVD discards nothing, so only the exit count tells
    // whether the hypervisor saw it.
    unsafe {
        core::ptr::write_volatile(&raw mut cell, 0x1234_5678);
        asm!("invd", options(nostack));
    }
    // SAFETY: reading the local written above.
    let kept = unsafe { core::ptr::read_volatile(&raw const cell) } == 0x1234_5678;
    kv("attack_invd_data_kept", u8::from(kept));
    match (before, invd_exits()) {
        (Some(b), Some(a)) => kv("attack_invd_exits", a - b),
        _ => kv("attack_invd_exits", "unknown"),
    }
}

fn invd_exits() -> Option<u64> {
    let mut counts = [0u64; thinhv_abi::exit::EXIT_REASON_COUNT];
    let r = hc(
        Function::EXIT_COUNTS,
        counts.as_mut_ptr() as u64,
        core::mem::size_of_val(&counts) as u64,
        0,
    );
    (r[0] == Status::OK.0).then(|| counts[thinhv_abi::exit::ExitReason::INVD.index()])
}
