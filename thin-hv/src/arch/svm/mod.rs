//! The SVM backend: VMCB set-up from the running firmware, the world
//! switch, and the exit dispatcher that hands neutral exits to
//! [`crate::handlers`].
pub mod exit;
pub mod guest;
pub mod launch;
pub mod nmi;
pub mod world;
