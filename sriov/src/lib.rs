//! SR-IOV: the capability model, VF numbering and BAR placement, the enable
//! sequence and VF assignment.
//!
//! Not built yet: the PCI ownership / SR-IOV issue fills this crate.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]
