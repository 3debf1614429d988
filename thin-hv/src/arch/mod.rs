//! Privileged code: only built for `x86_64-unknown-none`.
//!
//! Everything here moves state between the hardware and the pure half of
//! the crate; decisions live in [`crate::handlers`].
pub mod core_state;
pub mod entry;
pub mod env_impl;
pub mod idt;
pub mod instr;
pub mod logger;
pub mod percpu;
pub mod phys;
pub mod status_page;
pub mod svm;
