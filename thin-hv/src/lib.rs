//! thinhv's hypervisor core.
//!
//! Two halves in one crate:
//!
//! * **Pure logic**, compiled and unit-tested on the host: the VMCB model
//!   and exit decoding ([`svm`]), the neutral exit handlers ([`handlers`])
//!   written against [`guest::GuestCpu`] and [`env::Env`], CPUID filtering,
//!   the APIC ICR model ([`apic`]), guest memory checks and page walks
//!   ([`guest_mem`]), instruction decoding ([`insn`]), the log ring.
//! * **Privileged code** ([`arch`], only for `x86_64-unknown-none`): the
//!   entry point, host GDT/IDT/page tables, the SVM world switch, and the
//!   `Env` implementation over real hardware. It is thin: it moves state
//!   between the hardware and the pure half.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod apic;
pub mod env;
pub mod exit;
pub mod guest;
pub mod guest_mem;
pub mod handlers;
pub mod hv;
pub mod insn;
pub mod log_ring;
pub mod mtrr;
pub mod nmi;
pub mod npt;
pub mod svm;
pub mod vmx;

#[cfg(target_os = "none")]
pub mod arch;
