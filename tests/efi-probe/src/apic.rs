//! This CPU's local APIC as the probe's checks find it (Intel SDM Vol. 3A
//! §12.4.4, Figure 12-5; §12.12): IA32_APIC_BASE and its fields.
use core::arch::asm;

/// The IA32_APIC_BASE MSR.
pub const IA32_APIC_BASE: u32 = 0x1b;
/// Its base field: the xAPIC page.
pub const BASE_FIELD: u64 = 0x000f_ffff_ffff_f000;
/// x2APIC mode.
pub const EXTD: u64 = 1 << 10;
/// APIC enabled.
pub const EN: u64 = 1 << 11;
/// The x2APIC ID register (x2APIC mode only).
const X2APIC_ID: u32 = 0x802;

/// RDMSR.
///
/// # Safety
/// `msr` exists in the processor's current mode (a #GP is not caught).
unsafe fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: guaranteed by the caller; RDMSR only reads.
    unsafe { asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// IA32_APIC_BASE now.
pub fn base_msr() -> u64 {
    // SAFETY: every x86-64 processor has IA32_APIC_BASE.
    unsafe { rdmsr(IA32_APIC_BASE) }
}

/// This CPU's xAPIC page (meaningful in xAPIC mode).
pub fn page() -> u64 {
    base_msr() & BASE_FIELD
}

/// Whether this CPU's APIC is in x2APIC mode.
pub fn x2apic() -> bool {
    base_msr() & EXTD != 0
}

/// This CPU's x2APIC ID, in x2APIC mode; `None` in xAPIC mode.
pub fn x2apic_id() -> Option<u32> {
    // SAFETY: the x2APIC registers exist in x2APIC mode (checked first).
    // The ID is the low 32 bits (SDM Vol. 3A §12.12.5.1).
    x2apic().then(|| (unsafe { rdmsr(X2APIC_ID) } & 0xffff_ffff) as u32)
}
