//! thinhv's hypervisor core, privileged half.
//!
//! The pure logic (exit decoding, handlers, VMCB/VMCS models, the entry
//! checker, instruction decoding) lives in `thin-hv-core`, a crate that
//! forbids `unsafe` code; its modules are re-exported here so that the
//! privileged code names them as `crate::handlers` and so on. What is left
//! in this crate is [`arch`] (only for `x86_64-unknown-none`): the entry
//! point, host GDT/IDT/page tables, the SVM and VMX world switches, the
//! IOMMU driver and the `Env` implementation over real hardware. It is
//! thin: it moves state between the hardware and the pure half.
#![cfg_attr(not(test), no_std)]

#[cfg(target_os = "none")]
extern crate alloc;

pub use thin_hv_core::{
    apic, env, exit, guest, guest_mem, handlers, hv, insn, log_ring, mtrr, nmi, npt, partition,
    svm, vmx,
};

#[cfg(target_os = "none")]
pub mod arch;
