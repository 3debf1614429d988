//! Finding the PCI functions before the OS: MCFG (through the `acpi`
//! crate) gives the ECAM regions; the walk itself is pure
//! (`thinhv_passthrough::pci`). Reads only: nothing is written to any
//! device.
use alloc::vec::Vec;
use core::ptr::NonNull;
use thinhv_passthrough::pci::{Bdf, ConfigSpace, EcamRegion, Function, enumerate};
use uefi::table::cfg::ConfigTableEntry;

/// UEFI identity-maps all memory and MMIO it describes, so "mapping" a
/// physical region is taking its address.
#[derive(Clone, Copy, Debug)]
struct Identity;

impl acpi::AcpiHandler for Identity {
    unsafe fn map_physical_region<T>(
        &self,
        physical_address: usize,
        size: usize,
    ) -> acpi::PhysicalMapping<Self, T> {
        // SAFETY: boot services identity-map the ACPI tables; the caller
        // (the acpi crate) asks only for regions the tables describe.
        unsafe {
            acpi::PhysicalMapping::new(
                physical_address,
                NonNull::new_unchecked(physical_address as *mut T),
                size,
                size,
                Self,
            )
        }
    }

    fn unmap_physical_region<T>(_region: &acpi::PhysicalMapping<Self, T>) {}
}

/// ECAM reads through the identity-mapped MMIO window.
struct Ecam<'a> {
    regions: &'a [EcamRegion],
}

impl ConfigSpace for Ecam<'_> {
    fn read32(&self, bdf: Bdf, offset: u16) -> u32 {
        let Some(base) = self.regions.iter().find_map(|r| r.address(bdf)) else {
            return u32::MAX;
        };
        if offset > 0xffc || !offset.is_multiple_of(4) {
            return u32::MAX;
        }
        // SAFETY: the address lies in an ECAM window the MCFG describes,
        // which the firmware maps as uncached MMIO; a dword read of
        // configuration space has no side effects.
        unsafe { core::ptr::read_volatile((base + u64::from(offset)) as *const u32) }
    }
}

/// The ECAM regions from the MCFG, or why there are none.
pub fn ecam_regions() -> Result<Vec<EcamRegion>, &'static str> {
    let rsdp = uefi::system::with_config_table(|t| {
        t.iter()
            .find(|e| e.guid == ConfigTableEntry::ACPI2_GUID)
            .map(|e| e.address as usize)
    })
    .ok_or("no ACPI 2.0 tables from the firmware")?;
    // SAFETY: the firmware's configuration table points at a valid RSDP.
    let tables = unsafe { acpi::AcpiTables::from_rsdp(Identity, rsdp) }
        .map_err(|_| "the ACPI tables are unreadable")?;
    let mcfg = tables
        .find_table::<acpi::mcfg::Mcfg>()
        .map_err(|_| "no MCFG table (no PCI Express configuration space)")?;
    Ok(mcfg
        .get()
        .entries()
        .iter()
        .map(|e| EcamRegion {
            base: e.base_address,
            segment: e.pci_segment_group,
            bus_start: e.bus_number_start,
            bus_end: e.bus_number_end,
        })
        .collect())
}

/// Every PCI function the firmware left visible.
pub fn functions(regions: &[EcamRegion]) -> Vec<Function> {
    enumerate(regions, &Ecam { regions })
}
