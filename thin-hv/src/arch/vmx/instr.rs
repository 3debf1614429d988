//! VMX instructions (SDM Vol. 3C chapter 31). Each reports failure through
//! RFLAGS: CF = VMfailInvalid, ZF = VMfailValid (error in the VMCS).
use crate::vmx::fields::Field;
use core::arch::asm;

/// A VMX instruction failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmFail {
    /// No current VMCS (CF).
    Invalid,
    /// Error number in VM_INSTRUCTION_ERROR (ZF).
    Valid,
}

fn result(cf: u8, zf: u8) -> Result<(), VmFail> {
    if cf != 0 {
        Err(VmFail::Invalid)
    } else if zf != 0 {
        Err(VmFail::Valid)
    } else {
        Ok(())
    }
}

macro_rules! vmx_pa_insn {
    ($name:ident, $insn:literal, $doc:literal) => {
        #[doc = $doc]
        ///
        /// # Safety
        /// VMX rules for the instruction: `pa` names a page-aligned region of
        /// the hypervisor with the VMCS revision identifier written, and the
        /// processor is in the required VMX state.
        pub unsafe fn $name(pa: u64) -> Result<(), VmFail> {
            let (cf, zf): (u8, u8);
            // SAFETY: guaranteed by the caller; the operand is a pointer to
            // the 8-byte physical address on this stack.
            unsafe {
                asm!(concat!($insn, " [{p}]"), "setc {cf}", "setz {zf}", p = in(reg) &raw const pa,
                    cf = out(reg_byte) cf, zf = out(reg_byte) zf, options(nostack));
            }
            result(cf, zf)
        }
    };
}

vmx_pa_insn!(vmxon, "vmxon", "VMXON.");
vmx_pa_insn!(vmclear, "vmclear", "VMCLEAR.");
vmx_pa_insn!(vmptrld, "vmptrld", "VMPTRLD.");

/// VMXOFF.
///
/// # Safety
/// In VMX root operation, with no guest depending on VMX any more.
pub unsafe fn vmxoff() {
    // SAFETY: guaranteed by the caller.
    unsafe { asm!("vmxoff", options(nostack)) };
}

/// VMREAD of the current VMCS (0 if the field cannot be read).
pub fn vmread(f: Field) -> u64 {
    let v: u64;
    // SAFETY: VMREAD only reads the current VMCS; outside VMX operation it
    // would #UD, but this module is only used on CPUs in VMX root operation
    // with a current VMCS (the exit path and launch after VMPTRLD).
    unsafe {
        // A failing VMREAD leaves the destination alone: it stays 0.
        asm!("vmread {v}, {f}", f = in(reg) u64::from(f.0), v = inout(reg) 0u64 => v, options(nostack));
    };
    v
}

/// VMWRITE to the current VMCS.
///
/// # Safety
/// The current VMCS is this CPU's, and the value keeps the hypervisor's
/// invariants (host state, controls, second-level tables).
pub unsafe fn vmwrite(f: Field, v: u64) -> Result<(), VmFail> {
    let (cf, zf): (u8, u8);
    // SAFETY: guaranteed by the caller.
    unsafe {
        asm!("vmwrite {f}, {v}", "setc {cf}", "setz {zf}", f = in(reg) u64::from(f.0), v = in(reg) v,
            cf = out(reg_byte) cf, zf = out(reg_byte) zf, options(nostack));
    }
    result(cf, zf)
}

/// INVEPT all contexts (type 2).
///
/// # Safety
/// VMX root operation with INVEPT supported.
pub unsafe fn invept_all() {
    let desc = [0u64; 2];
    // SAFETY: guaranteed by the caller; the descriptor is 16 bytes on the stack.
    unsafe {
        asm!("invept {t}, [{d}]", t = in(reg) 2u64, d = in(reg) &raw const desc, options(nostack));
    };
}

/// INVVPID all contexts (type 2).
///
/// # Safety
/// VMX root operation with INVVPID supported.
pub unsafe fn invvpid_all() {
    let desc = [0u64; 2];
    // SAFETY: guaranteed by the caller; the descriptor is 16 bytes on the stack.
    unsafe {
        asm!("invvpid {t}, [{d}]", t = in(reg) 2u64, d = in(reg) &raw const desc, options(nostack));
    };
}
