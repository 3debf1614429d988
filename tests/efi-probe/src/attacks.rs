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
    // Moving the local APIC (emulated under thinhv; the ICR must stay
    // filtered at the new base).
    apic_relocation();
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

// ---- Relocating the local APIC --------------------------------------

use crate::apic::{
    BASE_FIELD as APIC_BASE_FIELD, EN as APIC_BASE_EN, EXTD as APIC_BASE_EXTD, IA32_APIC_BASE,
};
/// Where the probe moves its xAPIC page: a page of the 0xFEC00000–
/// 0xFEDFFFFF area that nothing decodes on QEMU's q35 (`info mtree`: the
/// I/O APIC at 0xFEC00000, the HPET at 0xFED00000; with the firmware, the
/// ICH9 root complex block at 0xFED1C000; the IOMMUs at 0xFED80000 and
/// 0xFED90000) nor on Bochs' i440FX, and that no firmware reports as RAM.
const RELOCATED: u64 = 0xfec8_0000;
/// xAPIC registers (SDM Vol. 3A Table 12-1).
const APIC_ID: u64 = 0x20;
const APIC_VERSION: u64 = 0x30;
const APIC_TPR: u64 = 0x80;
const APIC_ICR_LOW: u64 = 0x300;
const APIC_ICR_HIGH: u64 = 0x310;
/// ICR low: INIT, level assert; STARTUP (SDM Vol. 3A §12.6.1).
const ICR_INIT: u32 = 0x0000_c500;
const ICR_STARTUP: u32 = 0x0000_0600;
/// The AP's stub: real mode at CS = vector << 8, IP = 0; stores CPUID
/// 0x40000000 EBX, ECX, EDX at 0x100, 0x104, 0x108 of its page and
/// [`STUB_DONE`] at 0x10c, then `cli; hlt` for good.
const STUB: [u8; 43] = [
    0x8c, 0xc8, // mov ax, cs
    0x8e, 0xd8, // mov ds, ax
    0x66, 0xb8, 0x00, 0x00, 0x00, 0x40, // mov eax, 0x40000000
    0x66, 0x31, 0xc9, // xor ecx, ecx
    0x0f, 0xa2, // cpuid
    0x66, 0x89, 0x1e, 0x00, 0x01, // mov [0x100], ebx
    0x66, 0x89, 0x0e, 0x04, 0x01, // mov [0x104], ecx
    0x66, 0x89, 0x16, 0x08, 0x01, // mov [0x108], edx
    0x66, 0xc7, 0x06, 0x0c, 0x01, 0xef, 0xbe, 0xad, 0xde, // mov dword [0x10c], STUB_DONE
    0xfa, // cli
    0xf4, // hlt
    0xeb, 0xfd, // jmp back to hlt
];
const STUB_DONE: u32 = 0xdead_beef;
/// ESP file whose presence makes [`apic_relocation`] leave out the
/// INIT-SIPI (a test bed that can wake each AP only once: the probe's
/// `ap_check` needs that wake; see docs/emulator-faults.md).
const APIC_RELOC_NO_IPI_MARKER: &str = "\\EFI\\thinhv\\apic-reloc-no-ipi";

/// What [`apic_relocation`] saw, with its interrupts off.
#[derive(Default)]
struct Relocated {
    msr_after: u64,
    id_old: u32,
    version_old: u32,
    id_new: u32,
    version_new: u32,
    tpr_readback: u32,
    old_page_id: u32,
    sipi_ran: bool,
    msr_back: u64,
    id_back: u32,
}

/// # Safety
/// `base + reg` is this CPU's xAPIC register (or a page nothing decodes),
/// identity-mapped by the firmware.
unsafe fn apic_read(base: u64, reg: u64) -> u32 {
    // SAFETY: per the contract.
    unsafe { core::ptr::read_volatile((base + reg) as *const u32) }
}

/// # Safety
/// As [`apic_read`]; the write is one the probe means (an IPI included).
unsafe fn apic_write(base: u64, reg: u64, value: u32) {
    // SAFETY: per the contract.
    unsafe { core::ptr::write_volatile((base + reg) as *mut u32, value) }
}

/// The first AP that runs: (MP services number, APIC ID).
fn first_ap() -> Option<(usize, u32)> {
    use uefi::proto::pi::mp::MpServices;
    let h = uefi::boot::get_handle_for_protocol::<MpServices>().ok()?;
    let mp = uefi::boot::open_protocol_exclusive::<MpServices>(h).ok()?;
    let count = mp.get_number_of_processors().ok()?;
    (0..count.total).find_map(|i| {
        let p = mp.get_processor_info(i).ok()?;
        let id = u32::try_from(p.processor_id).ok()?;
        (!p.is_bsp() && p.is_enabled()).then_some((i, id))
    })
}

/// The AP's INIT and SIPI exit counts (under thinhv only).
fn ap_init_sipi_exits(ap: usize) -> Option<(u64, u64)> {
    let s = cpuid(thinhv_abi::cpuid::LEAF_SIGNATURE, 0);
    if thinhv_abi::cpuid::signature_from_regs(s[1], s[2], s[3]) != thinhv_abi::cpuid::SIGNATURE {
        return None;
    }
    let mut counts = [0u64; thinhv_abi::exit::EXIT_REASON_COUNT];
    let r = hc(
        Function::EXIT_COUNTS,
        counts.as_mut_ptr() as u64,
        core::mem::size_of_val(&counts) as u64,
        ap as u64,
    );
    use thinhv_abi::exit::ExitReason as R;
    (r[0] == Status::OK.0).then(|| (counts[R::INIT.index()], counts[R::SIPI.index()]))
}

/// Relocates this CPU's xAPIC page with IA32_APIC_BASE, as an OS may (SDM
/// Vol. 3A §12.4.5), with interrupts off: reads the APIC ID and version
/// through the new base and compares them with those at the old one,
/// writes the TPR there and reads it back, reads IA32_APIC_BASE back, then
/// sends INIT-SIPI to an AP through the new base's ICR — the direct-ICR
/// INIT a hostile kernel would send past thinhv's trap — and moves back.
/// The AP runs a stub that reports its CPUID 0x40000000 signature: under
/// thinhv it must still say thinhv (the INIT was virtualized, not taken by
/// the processor). Bare, the same run is the control of what relocation
/// does on this machine.
pub fn apic_relocation() {
    let orig = crate::apic::base_msr();
    if orig & APIC_BASE_EN == 0 || orig & APIC_BASE_EXTD != 0 {
        kv("apic_reloc", "not-xapic");
        return;
    }
    let old = orig & APIC_BASE_FIELD;
    let moved = (orig & !APIC_BASE_FIELD) | RELOCATED;
    kv("apic_reloc_target", format_args!("{RELOCATED:#x}"));
    let Some((ap, ap_id)) = first_ap() else {
        kv("apic_reloc", "no-ap");
        return;
    };
    let Ok(page) = uefi::boot::allocate_pages(
        uefi::boot::AllocateType::MaxAddress(0x9_ffff),
        uefi::boot::MemoryType::LOADER_DATA,
        1,
    ) else {
        kv("apic_reloc", "no-low-memory");
        return;
    };
    // The page stays allocated: the AP stays halted in it until the
    // firmware wakes it again.
    let stub = page.as_ptr() as u64;
    // SAFETY: the page was just allocated for the probe; 4 KiB.
    let bytes = unsafe { core::slice::from_raw_parts_mut(page.as_ptr(), 4096) };
    bytes.fill(0);
    bytes[..STUB.len()].copy_from_slice(&STUB);
    let vector = u32::try_from(stub >> 12).unwrap_or(0) & 0xff;
    let send_ipi = !crate::attacks_hc::esp_has(APIC_RELOC_NO_IPI_MARKER);
    let exits_before = ap_init_sipi_exits(ap);
    let mut r = Relocated::default();
    // One `catching` for the whole window, so that interrupts stay off
    // while the APIC is away (a firmware interrupt handler would look for
    // it at the new base); a #GP of the relocating WRMSR (2 bytes) is
    // skipped and shows in the read-back.
    let fault = catching(2, || {
        // SAFETY: the old base is this CPU's xAPIC page (IA32_APIC_BASE
        // above), identity-mapped by the firmware.
        unsafe {
            r.id_old = apic_read(old, APIC_ID);
            r.version_old = apic_read(old, APIC_VERSION);
        }
        // SAFETY: WRMSR IA32_APIC_BASE, 2 bytes; a #GP is caught and
        // skipped. Interrupts are off until the base is back.
        unsafe {
            asm!("wrmsr", in("ecx") IA32_APIC_BASE, in("eax") moved as u32,
                in("edx") (moved >> 32) as u32, options(nostack));
        }
        r.msr_after = crate::apic::base_msr();
        if r.msr_after & APIC_BASE_FIELD != RELOCATED {
            return;
        }
        let new = RELOCATED;
        // SAFETY: `new` is now this CPU's xAPIC page (checked above): a
        // page nothing else decodes, identity-mapped by the firmware. The
        // IPIs go to the AP found above, whose stub page is allocated.
        unsafe {
            r.id_new = apic_read(new, APIC_ID);
            r.version_new = apic_read(new, APIC_VERSION);
            r.old_page_id = apic_read(old, APIC_ID);
            let tpr = apic_read(new, APIC_TPR);
            apic_write(new, APIC_TPR, 0x20);
            r.tpr_readback = apic_read(new, APIC_TPR);
            apic_write(new, APIC_TPR, tpr);
            if send_ipi {
                // INIT, 10 ms, SIPI twice (SDM Vol. 3A §9.4.4.1).
                apic_write(new, APIC_ICR_HIGH, ap_id << 24);
                apic_write(new, APIC_ICR_LOW, ICR_INIT);
                uefi::boot::stall(core::time::Duration::from_millis(10));
                for _ in 0..2 {
                    apic_write(new, APIC_ICR_HIGH, ap_id << 24);
                    apic_write(new, APIC_ICR_LOW, ICR_STARTUP | vector);
                    uefi::boot::stall(core::time::Duration::from_micros(200));
                }
                for _ in 0..1000 {
                    if core::ptr::read_volatile((stub + 0x10c) as *const u32) == STUB_DONE {
                        r.sipi_ran = true;
                        break;
                    }
                    uefi::boot::stall(core::time::Duration::from_millis(1));
                }
            }
            asm!("wrmsr", in("ecx") IA32_APIC_BASE, in("eax") orig as u32,
                in("edx") (orig >> 32) as u32, options(nostack));
        }
        r.msr_back = crate::apic::base_msr();
        // SAFETY: the old base is this CPU's xAPIC page again.
        r.id_back = unsafe { apic_read(old, APIC_ID) };
    });
    kv("apic_reloc_wrmsr", fault);
    kv(
        "apic_reloc_msr_readback",
        u8::from(r.msr_after & !0x100 == moved & !0x100),
    );
    kv("apic_reloc_id", format_args!("{:#x}", r.id_old));
    kv("apic_reloc_id_new", format_args!("{:#x}", r.id_new));
    kv("apic_reloc_id_match", u8::from(r.id_new == r.id_old));
    kv(
        "apic_reloc_version_match",
        u8::from(r.version_new == r.version_old),
    );
    kv("apic_reloc_tpr_readback", u8::from(r.tpr_readback == 0x20));
    kv(
        "apic_reloc_old_page_id",
        format_args!("{:#x}", r.old_page_id),
    );
    if send_ipi {
        kv("apic_reloc_sipi_ran", u8::from(r.sipi_ran));
    } else {
        kv("apic_reloc_sipi_ran", "skipped");
    }
    if r.sipi_ran {
        let regs: [u32; 3] = core::array::from_fn(|i| {
            // SAFETY: the stub's page, still allocated; the AP wrote it.
            unsafe { core::ptr::read_volatile((stub + 0x100 + 4 * i as u64) as *const u32) }
        });
        let sig = thinhv_abi::cpuid::signature_from_regs(regs[0], regs[1], regs[2]);
        let shown = sig.map(|b| if b.is_ascii_graphic() { b } else { b'.' });
        kv(
            "apic_reloc_ap_signature",
            core::str::from_utf8(&shown).unwrap_or("?"),
        );
    }
    kv("apic_reloc_msr_back", u8::from(r.msr_back == orig));
    kv("apic_reloc_id_back_match", u8::from(r.id_back == r.id_old));
    match (exits_before, ap_init_sipi_exits(ap)) {
        (Some((i0, s0)), Some((i1, s1))) => {
            kv("apic_reloc_ap_init_exits", i1 - i0);
            kv("apic_reloc_ap_sipi_exits", s1 - s0);
        }
        _ => kv("apic_reloc_ap_init_exits", "n/a"),
    }
}
