//! Device pass-through, as pure logic: PCI/ECAM enumeration and BAR sizing
//! (`pci`, `bars`), the ownership policy (`policy`), what the OS sees of a
//! mediated function's configuration space (`mediate`), quiescing and
//! resetting a function that changes hands (`reset`), NVMe
//! virtualization management (`nvme_virt`), a BAR the OS must not move
//! (`fixed_bar`), interrupt remapping entries (`irq_remap`), the ACPI IOMMU
//! tables (`dmar`, `ivrs`, `acpi`) and the VT-d / AMD-Vi register drivers
//! (`vtd`, `amdvi`) over an MMIO trait, and the VT-d unit thinhv emulates
//! for the OS (`vvtd`), its AMD-Vi counterpart (`vamdvi`) and the ACPI
//! tables that announce them (`os_tables`).
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod acpi;
pub mod amdvi;
pub mod bars;
pub mod dmar;
pub mod fixed_bar;
pub mod hpet;
pub mod irq_remap;
pub mod ivrs;
pub mod madt;
pub mod mediate;
pub mod nvme_virt;
pub mod os_tables;
pub mod pci;
pub mod policy;
pub mod reset;
pub mod shared_pf;
pub mod vamdvi;
pub mod vtd;
pub mod vvtd;

pub use thinhv_sriov as sriov;
