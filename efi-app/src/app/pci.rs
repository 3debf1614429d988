//! Finding the PCI functions before the OS: MCFG (through the `acpi`
//! crate) gives the ECAM regions; the walk itself is pure
//! (`thinhv_passthrough::pci`). Reads only: nothing is written to any
//! device.
use alloc::vec::Vec;
use thinhv_passthrough::pci::{Bdf, ConfigSpace, EcamRegion, Function, enumerate};

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
    let tables = super::acpi_tables::tables()?;
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
