//! AMD SVM: the VMCB model, exit decoding, the MSR permission map and guest
//! state construction (pure parts; the world switch is in `arch::svm`).
pub mod exit_code;
pub mod intercepts;
pub mod msrpm;
pub mod state;
pub mod vmcb;
