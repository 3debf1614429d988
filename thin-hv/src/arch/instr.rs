//! Raw processor instructions. All are `unsafe fn`: each can break memory
//! safety or the hypervisor's invariants in the wrong hands. The few safe
//! wrappers read state without side effects.
use core::arch::asm;

/// Reads an MSR.
///
/// # Safety
/// The MSR must exist on this processor (else #GP in host mode, fatal).
pub unsafe fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: the caller guarantees the MSR exists; RDMSR has no memory effects.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags));
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Writes an MSR.
///
/// # Safety
/// The MSR must exist and the value must not break the hypervisor (EFER,
/// PAT, APIC base and friends change how memory is accessed).
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: guaranteed by the caller.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nostack, preserves_flags));
    }
}

/// CPUID (safe: no side effects beyond the registers).
pub fn cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    [r.eax, r.ebx, r.ecx, r.edx]
}

macro_rules! read_cr {
    ($name:ident, $reg:literal) => {
        /// Reads a control register (safe: no side effects).
        pub fn $name() -> u64 {
            let v: u64;
            // SAFETY: reading a control register at CPL 0 has no side effects.
            unsafe { asm!(concat!("mov {}, ", $reg), out(reg) v, options(nomem, nostack, preserves_flags)) };
            v
        }
    };
}
read_cr!(read_cr0, "cr0");
read_cr!(read_cr2, "cr2");
read_cr!(read_cr3, "cr3");
read_cr!(read_cr4, "cr4");
read_cr!(read_dr6, "dr6");
read_cr!(read_dr7, "dr7");

/// Reads RFLAGS.
pub fn read_rflags() -> u64 {
    let v: u64;
    // SAFETY: pushfq/pop only touch the stack slot they use.
    unsafe { asm!("pushfq", "pop {}", out(reg) v, options(nomem, preserves_flags)) };
    v
}

/// A pseudo-descriptor as SGDT/SIDT store it.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C, packed)]
pub struct DescriptorPointer {
    /// Limit.
    pub limit: u16,
    /// Base.
    pub base: u64,
}

/// SGDT.
pub fn sgdt() -> DescriptorPointer {
    let mut p = DescriptorPointer::default();
    // SAFETY: SGDT writes 10 bytes to the pointer, which is valid for them.
    unsafe { asm!("sgdt [{}]", in(reg) &raw mut p, options(nostack, preserves_flags)) };
    p
}

/// SIDT.
pub fn sidt() -> DescriptorPointer {
    let mut p = DescriptorPointer::default();
    // SAFETY: SIDT writes 10 bytes to the pointer, which is valid for them.
    unsafe { asm!("sidt [{}]", in(reg) &raw mut p, options(nostack, preserves_flags)) };
    p
}

macro_rules! read_sel {
    ($name:ident, $reg:literal) => {
        /// Reads a segment selector.
        pub fn $name() -> u16 {
            let v: u16;
            // SAFETY: reading a segment register has no side effects.
            unsafe { asm!(concat!("mov {:x}, ", $reg), out(reg) v, options(nomem, nostack, preserves_flags)) };
            v
        }
    };
}
read_sel!(read_cs, "cs");
read_sel!(read_ss, "ss");
read_sel!(read_ds, "ds");
read_sel!(read_es, "es");

/// Writes a byte to an I/O port.
///
/// # Safety
/// The port must be one the hypervisor may drive (its serial port, the
/// reset register).
pub unsafe fn outb(port: u16, value: u8) {
    // SAFETY: guaranteed by the caller.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags));
    };
}

/// IN of 1, 2 or 4 bytes.
///
/// # Safety
/// The port must be one the guest itself was about to read (an
/// intercepted access performed on its behalf).
pub unsafe fn port_in(port: u16, size: u8) -> u32 {
    let v: u32;
    // SAFETY: guaranteed by the caller.
    unsafe {
        match size {
            1 => {
                let b: u8;
                asm!("in al, dx", in("dx") port, out("al") b, options(nomem, nostack, preserves_flags));
                v = u32::from(b);
            }
            2 => {
                let w: u16;
                asm!("in ax, dx", in("dx") port, out("ax") w, options(nomem, nostack, preserves_flags));
                v = u32::from(w);
            }
            _ => {
                asm!("in eax, dx", in("dx") port, out("eax") v, options(nomem, nostack, preserves_flags));
            }
        }
    }
    v
}

/// OUT of 1, 2 or 4 bytes.
///
/// # Safety
/// As [`port_in`]: an access the guest made, performed on its behalf.
pub unsafe fn port_out(port: u16, size: u8, value: u32) {
    // SAFETY: guaranteed by the caller.
    unsafe {
        match size {
            1 => {
                asm!("out dx, al", in("dx") port, in("al") value as u8, options(nomem, nostack, preserves_flags));
            }
            2 => {
                asm!("out dx, ax", in("dx") port, in("ax") value as u16, options(nomem, nostack, preserves_flags));
            }
            _ => {
                asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags));
            }
        }
    }
}

/// CLI.
///
/// # Safety
/// Only the hypervisor's own code paths may disable interrupts.
pub unsafe fn cli() {
    // SAFETY: guaranteed by the caller.
    unsafe { asm!("cli", options(nomem, nostack)) };
}

/// HLT forever with interrupts disabled (NMIs are held off by GIF = 0 in
/// host mode on SVM; if one arrives the loop halts again).
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: stopping this CPU is always memory-safe.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// VMSAVE of the processor's hidden state into the VMCB at `pa`.
///
/// # Safety
/// EFER.SVME must be set and `pa` must be a 4 KiB-aligned VMCB owned by
/// the hypervisor.
pub unsafe fn vmsave(pa: u64) {
    // SAFETY: guaranteed by the caller.
    unsafe { asm!("vmsave rax", in("rax") pa, options(nostack, preserves_flags)) };
}

/// CLGI: clears GIF, holding NMI, SMI and INIT pending (and INTR) until
/// VMRUN sets it again (APM Vol. 2 §15.17). thinhv has no STGI in host
/// mode while it runs a guest: intercepted NMIs are taken in guest mode
/// (`svm::nmi`), so a real INIT is never taken in host mode.
///
/// # Safety
/// EFER.SVME must be set (else #UD); only the SVM launch path clears GIF
/// before entering its VMRUN loop.
pub unsafe fn clgi() {
    // SAFETY: guaranteed by the caller.
    unsafe { asm!("clgi", options(nomem, nostack)) };
}

/// Resets the platform: the PCI reset control register (0xCF9), then the
/// keyboard controller, then a triple fault.
pub fn reset_platform() -> ! {
    // SAFETY: these ports reset the machine; nothing after them matters.
    unsafe {
        outb(0xcf9, 0x02);
        outb(0xcf9, 0x06);
        outb(0x64, 0xfe);
        let null = DescriptorPointer { limit: 0, base: 0 };
        asm!("lidt [{}]", "int3", in(reg) &raw const null, options(nostack));
    }
    halt_forever()
}
