//! thinhv's hypervisor core, pure half.
//!
//! Everything here is plain safe Rust, compiled and unit-tested on the host
//! and linked into the freestanding core (`thin-hv`), whose `arch` module
//! is the privileged half: the VMCB model and exit decoding ([`svm`]), the
//! VMCS model, controls and entry checker ([`vmx`]), the neutral exit
//! handlers ([`handlers`]) written against [`guest::GuestCpu`] and
//! [`env::Env`], the guest NMI-blocking model ([`nmi`]), CPUID filtering,
//! the APIC ICR model ([`apic`]), guest memory checks and page walks
//! ([`guest_mem`]), instruction decoding ([`insn`]), MTRR memory types
//! ([`mtrr`]), NPT building ([`npt`]) and the log ring.
//!
//! `forbid(unsafe_code)`: whatever touches hardware or raw physical memory
//! is behind the traits in [`env`], [`guest`] and `thinhv_paging`, and is
//! implemented in `thin-hv`'s `arch` module, never here.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

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
pub mod os_amdvi;
pub mod os_iommu;
pub mod partition;
pub mod svm;
#[cfg(test)]
mod test_mem;
pub mod uart;
pub mod vmx;
pub mod vvtd_shadow;
