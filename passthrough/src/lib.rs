//! Device pass-through: PCI/ECAM enumeration and the device inventory, the
//! ACPI IOMMU tables (DMAR, IVRS); later device ownership policy and the
//! VT-d / AMD-Vi drivers.
//!
//! The IOMMU is not driven yet: thinhv passes every device to the OS
//! untouched and does **not** protect itself from DMA; `docs/security.md`
//! says so.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod acpi;
pub mod amdvi;
pub mod bars;
pub mod dmar;
pub mod ivrs;
pub mod mediate;
pub mod pci;
pub mod policy;
pub mod vtd;

pub use thinhv_sriov as sriov;
