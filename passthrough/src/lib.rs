//! Device pass-through: ACPI tables (DMAR, IVRS, MCFG, MADT), PCI/ECAM
//! enumeration, device ownership policy and the VT-d / AMD-Vi drivers.
//!
//! Not built yet: the IOMMU issue fills this crate. Until then thinhv
//! passes every device to the OS untouched and does **not** protect itself
//! from DMA; `docs/security.md` says so.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]
