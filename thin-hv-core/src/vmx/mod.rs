//! Intel VMX: the VMCS model, control adjustment against the capability
//! MSRs, guest-state construction, CR0/CR4 write emulation, exit decoding,
//! and a checker of the VM-entry conditions (pure parts; the world switch is
//! in `arch::vmx`). References: Intel SDM Vol. 3C, chapters 25–29 and
//! Appendix A–C (order number 326019, revision 086).
pub mod caps;
pub mod controls;
pub mod cr;
pub mod entry_check;
pub mod exit_reason;
pub mod fields;
pub mod image;
pub mod msr_bitmap;
pub mod setup;
pub mod state;
pub mod task_switch;
