//! The VMX backend: VMXON and the VMCS on every CPU, the world switch, and
//! the exit dispatcher that hands neutral exits to [`crate::handlers`].
pub mod exit;
pub mod guest;
pub mod instr;
pub mod launch;
pub mod world;
