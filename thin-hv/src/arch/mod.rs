//! Privileged code: only built for `x86_64-unknown-none`.
//!
//! Everything here moves state between the hardware and the pure half of
//! the crate; decisions live in [`crate::handlers`].
//!
//! This code only exists for x86-64: physical addresses and lengths are
//! `u64` and `usize` is 64 bits wide, so the `u64`/`usize` conversions
//! here cannot truncate; the `u64` → `u32` ones split register halves
//! (EDX:EAX) on purpose.
#![allow(clippy::cast_possible_truncation)]

const _: () = assert!(usize::BITS == 64);
pub mod core_init;
pub mod core_state;
pub mod entry;
pub mod env_impl;
pub mod exit_timer;
pub mod idt;
pub mod instr;
pub mod iommu;
pub mod logger;
pub mod os_iommu;
pub mod percpu;
pub mod phys;
pub mod status_page;
pub mod svm;
pub mod vcpu;
pub mod vmx;
