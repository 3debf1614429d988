//! thinhv's UEFI loader: the pure parts, unit-tested on the host.
//!
//! The UEFI application itself (`main.rs`, built for
//! `x86_64-unknown-uefi`) is glue around these: it reads files and
//! variables, asks the firmware for memory and processors, and calls into
//! the core. Every decision it takes is made here.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod appliance_image;
pub mod appliances;
pub mod blob;
pub mod boot_option;
pub mod cpu_check;
pub mod elf_load;
pub mod inventory;
pub mod iommu_plan;
pub mod memmap;
pub mod plan;
pub mod text;
